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


class HubError(DeltaHubError, OSError):
    """A Hub operation failed (missing repo, bad token, interrupted download).

    Also an :class:`OSError`, like every ``huggingface_hub`` / ``transformers`` loading error, so
    ``except OSError`` written for ``transformers`` catches it. Carries ``repo_id``, ``revision``
    and ``filename`` where known (``None`` otherwise), like ``huggingface_hub``'s errors.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, repo_id: str | None = None,
                 revision: str | None = None, filename: str | None = None) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.filename = filename  # type: ignore[misc]  # OSError.filename, same meaning
        super().__init__(message, path=path)
        self.filename = filename  # OSError.__init__ resets it

    def __str__(self) -> str:  # the one-line message, never OSError's "[Errno None] ..." form
        return str(self.args[0]) if self.args else ""


class RepositoryNotFoundError(HubError):
    """The Hub repository does not exist, or is private/gated and the token cannot see it."""


class RevisionNotFoundError(HubError):
    """The repository exists but has no branch, tag or commit of that name."""


class EntryNotFoundError(HubError, FileNotFoundError):
    """The repository (at that revision) has no file of that name (e.g. it is not a deltahub delta)."""


class AuthenticationError(HubError):
    """The Hub refused the request: missing, wrong or insufficient token (HTTP 401/403)."""


class GatedRepoError(AuthenticationError):
    """The repository is gated and this token has not been granted access (accept its terms on the Hub)."""


class DownloadError(HubError):
    """A download did not complete: connection lost, truncated file, or offline with a cache miss."""


class LocalEntryNotFoundError(DownloadError, FileNotFoundError):
    """Offline (``HF_HUB_OFFLINE=1`` / ``local_files_only=True``) and the files are not in the local Hub cache."""


class RemoteCodeError(DeltaHubError, ValueError):
    """The model's config asks for custom code (``auto_map``) and ``trust_remote_code=True`` was not passed."""


# Earlier deltahub names, kept importable (the huggingface_hub names above are the primary ones).
RepoNotFoundError = RepositoryNotFoundError
RemoteFileNotFoundError = EntryNotFoundError


class ExportError(DeltaHubError, ValueError):
    """An export cannot be made as asked: bad options (rank, energy, byte budget, modules to save) or a model
    layout the target format cannot carry (e.g. transposed GPT-2 ``Conv1D`` layers for a LoRA export)."""
