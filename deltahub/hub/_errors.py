"""Translating ``huggingface_hub`` / HTTP exceptions into typed :class:`~deltahub.errors.HubError` s."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from huggingface_hub import constants
from huggingface_hub import errors as hf_errors

from ..errors import (
    AuthenticationError,
    DeltaHubError,
    DownloadError,
    EntryNotFoundError,
    GatedRepoError,
    HubError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    UnsafePathError,
)


def offline() -> bool:
    """Offline mode as huggingface_hub sees it, or as the environment says now (it may be set after import)."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception types of whichever HTTP stack huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            mod = __import__(module)
            found.append(mod.TransportError)
        except (ImportError, AttributeError):
            pass
    try:
        import requests

        found.append(requests.exceptions.ConnectionError)
    except ImportError:
        pass
    return tuple(found)


_TRANSPORT_ERRORS = _transport_errors()


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _server_message(exc: BaseException) -> str:
    msg = getattr(exc, "server_message", None) or str(exc)
    return " ".join(str(msg).split())[:300]


@contextlib.contextmanager
def hub_errors(action: str, repo_id: str, revision: str | None = None, *, endpoint: str | None = None,
               filename: str | None = None, download: bool = True, local_files_only: bool = False) -> Iterator[None]:
    """Translate ``huggingface_hub`` / HTTP exceptions raised inside into typed :class:`HubError` s.

    ``action`` (e.g. ``"pull"``) starts the message; repo, revision, file and endpoint are named,
    and set as the error's ``repo_id`` / ``revision`` / ``filename`` attributes.
    """
    where = repo_id + (f"@{revision}" if revision else "")
    host = (endpoint or constants.ENDPOINT).rstrip("/")
    at = {"repo_id": repo_id, "revision": revision, "filename": filename}
    try:
        yield
    except DeltaHubError:
        raise
    except hf_errors.GatedRepoError as exc:
        raise GatedRepoError(f"{action}: {repo_id} on {host} is gated and this token has no access to it", **at) from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise RepositoryNotFoundError(
            f"{action}: repository {repo_id!r} not found on {host} "
            "(if it is private, pass token= / --token or set HF_TOKEN)", **at
        ) from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise RevisionNotFoundError(f"{action}: revision {revision!r} not found in {repo_id} on {host}", **at) from exc
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as exc:
        if offline():
            raise LocalEntryNotFoundError(
                f"{action}: offline mode (HF_HUB_OFFLINE=1) and {where} is not (fully) in the local Hub cache; "
                "run once online first", **at
            ) from exc
        if local_files_only:
            raise LocalEntryNotFoundError(
                f"{action}: local_files_only=True and {where} is not (fully) in the local Hub cache", **at) from exc
        raise LocalEntryNotFoundError(f"{action}: could not download {where} from {host} and it is not in the local cache "
                                      f"({_server_message(exc)})", **at) from exc
    except hf_errors.EntryNotFoundError as exc:
        what = f"file {filename!r}" if filename else "a file it needs"
        raise EntryNotFoundError(f"{action}: {where} on {host} has no {what}", **at) from exc
    except hf_errors.HfHubHTTPError as exc:
        status = _status(exc)
        if status in (401, 403):
            raise AuthenticationError(
                f"{action}: {host} refused access to {where} (HTTP {status}: missing, wrong or read-only token; "
                "pass token= / --token or set HF_TOKEN)", **at
            ) from exc
        raise HubError(f"{action}: {where}: HTTP {status} from {host}: {_server_message(exc)}", **at) from exc
    except hf_errors.HFValidationError as exc:
        raise HubError(f"{action}: invalid repo id or revision {where!r}: {exc}", **at) from exc
    except ValueError as exc:
        if "filename" not in str(exc).lower():
            raise
        # huggingface_hub refuses repo file names that would escape the download folder ('../x', '/etc/x').
        raise UnsafePathError(f"{action}: {where} on {host} has a file name that would leave the download folder: "
                              f"{' '.join(str(exc).split())[:200]}") from exc
    except _TRANSPORT_ERRORS as exc:
        if download:
            raise DownloadError(f"{action}: download of {where} from {host} was interrupted ({type(exc).__name__}: {exc})", **at) from exc
        raise HubError(f"{action}: cannot reach {host} ({type(exc).__name__}: {exc})", **at) from exc
    except OSError as exc:
        # Truncated downloads ("Consistency check failed"), a full disk, a broken cache entry.
        if download:
            raise DownloadError(f"{action}: download of {where} from {host} did not complete ({exc})", **at) from exc
        raise
