"""Every error deltahub raises on purpose: one hierarchy, so callers can catch ``DeltaHubError``.

Each message names the file (or tensor) and the problem, in one line, so the CLI can print
it as-is and exit non-zero without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class DeltaHubError(Exception):
    """Base class of every expected deltahub failure."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


class MissingFileError(DeltaHubError, FileNotFoundError):
    """A file or directory deltahub needs does not exist."""


class CorruptFileError(DeltaHubError):
    """A file exists but cannot be parsed (truncated safetensors, bad JSON, bad header)."""


class UnsupportedFormatError(DeltaHubError):
    """The manifest is not a deltahub manifest, or its major format version is unknown."""


class ManifestError(DeltaHubError):
    """The manifest is well-formed JSON but inconsistent (missing fields, missing tensors)."""


class ShapeMismatchError(DeltaHubError):
    """A tensor does not have the shape or dtype the manifest or the base promises."""


class BaseMismatchError(DeltaHubError):
    """The base model given is not the one the delta was compressed against."""


class CodecError(DeltaHubError):
    """A codec is unknown, or cannot encode/decode the tensor it was given."""


class InvalidCodecParamsError(CodecError, ValueError):
    """Codec parameters are out of range (e.g. dropout rate outside [0, 1))."""


class OutputExistsError(DeltaHubError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class UnsafePathError(DeltaHubError, ValueError):
    """A file name read from a delta, an index or a Hub listing is not a plain name inside its
    directory (``..``, absolute, a symlink out of it), or collides with a file deltahub writes."""


class IntegrityError(CorruptFileError):
    """A stored tensor or aux file does not match the digest the manifest records for it."""


class UnsafeOutputError(DeltaHubError):
    """The output directory is, contains or lies inside an input (overwriting it would delete the input)."""


class OutputWriteError(DeltaHubError, OSError):
    """Writing the output failed at the OS level: disk full, read-only, file too large, permission denied."""


class HubError(DeltaHubError):
    """A Hub operation failed (missing repo, bad token, interrupted download)."""


class RepoNotFoundError(HubError):
    """The Hub repository does not exist, or is private/gated and the token cannot see it."""


class RevisionNotFoundError(HubError):
    """The repository exists but has no branch, tag or commit of that name."""


class RemoteFileNotFoundError(HubError, FileNotFoundError):
    """The repository (at that revision) has no file of that name (e.g. it is not a deltahub delta)."""


class AuthenticationError(HubError):
    """The Hub refused the request: missing, wrong or insufficient token (HTTP 401/403)."""


class DownloadError(HubError):
    """A download did not complete: connection lost, truncated file, or offline with a cache miss."""
