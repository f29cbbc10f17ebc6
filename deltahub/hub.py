"""Hugging Face Hub integration: model specs, pushing deltas, pulling and rebuilding fine-tunes.

Everything goes through the real ``huggingface_hub`` client. ``token`` and ``endpoint`` are
passed through as the client takes them (``None`` means the client's own defaults:
``HF_TOKEN`` / the stored login, ``HF_ENDPOINT``), and ``cache_dir`` likewise (``None`` is the
shared Hub cache), so a delta pulled once rebuilds offline (``HF_HUB_OFFLINE=1``).

A delta records the base's repo id *and* the commit sha it was compressed against
(``manifest.base.revision``); :func:`pull` downloads the base at that sha, never at ``main``,
and the content fingerprint is verified while rebuilding. Client exceptions are translated
into :class:`~deltahub.errors.HubError` subclasses whose messages name the repo, the
revision and the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub import errors as hf_errors

from .errors import (
    AuthenticationError,
    BaseMismatchError,
    DeltaHubError,
    DownloadError,
    HubError,
    MissingFileError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsafePathError,
)
from .format.io import check_output
from .format.names import member
from .format.manifest import Manifest
from .format.spec import AUX_FILE_PATTERNS, MANIFEST_NAME, WEIGHTS_INDEX_NAME

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from huggingface_hub.utils import SafetensorsFileMetadata

    from .delta import Delta

__all__ = [
    "DELTA_PATTERNS",
    "MODEL_PATTERNS",
    "ResolvedModel",
    "download_delta",
    "is_hub_id",
    "is_hub_spec",
    "model_card",
    "parse_model_spec",
    "pull",
    "push_to_hub",
    "remote_info",
    "resolve_base",
    "resolve_model",
]

#: Files of a model repo deltahub needs: weights (safetensors only), configs, tokenizer files.
MODEL_PATTERNS: list[str] = ["*.safetensors", "*.safetensors.index.json", "*.json", *AUX_FILE_PATTERNS, "*.jinja", "*.tiktoken"]
#: Files of a delta repo: the manifest, the stored tensors and the fine-tune's tokenizer files (no README).
DELTA_PATTERNS: list[str] = [MANIFEST_NAME, "delta*.safetensors", WEIGHTS_INDEX_NAME, *AUX_FILE_PATTERNS]

# The Hub's repo-id grammar (huggingface_hub.utils.validate_repo_id), namespace required.
_NAME = r"[A-Za-z0-9_](?:[\w.\-]{0,94}[A-Za-z0-9_])?"
_REPO_ID_RE = re.compile(rf"{_NAME}/{_NAME}")
_SHA_RE = re.compile(r"[0-9a-f]{40}")


# ---------------------------------------------------------------------------------------- specs


def is_hub_id(text: str) -> bool:
    """True if ``text`` is a well-formed ``namespace/name`` repo id (no local-path check)."""
    return bool(_REPO_ID_RE.fullmatch(text)) and "--" not in text and ".." not in text and not text.endswith(".git")


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """``"user/model@rev"`` -> ``("user/model", "rev")``; ``"user/model"`` -> ``("user/model", None)``.

    The revision (branch, tag or commit sha) is everything after the first ``@``. Raises
    :class:`HubError` if the part before it is not a ``namespace/name`` repo id.
    """
    repo_id, sep, revision = str(spec).partition("@")
    if not is_hub_id(repo_id) or (sep and not revision):
        raise HubError(f"{spec!r} is not a Hub model id of the form namespace/name[@revision]")
    return repo_id, (revision or None)


def is_hub_spec(spec: str | os.PathLike[str]) -> bool:
    """A string names a Hub model iff it is not an existing local path and parses as ``namespace/name[@rev]``.

    ``Path`` objects are always local: the caller said so.
    """
    if isinstance(spec, os.PathLike) or Path(spec).exists():
        return False
    try:
        parse_model_spec(str(spec))
    except HubError:
        return False
    return True


# ---------------------------------------------------------------------------------------- errors


def _offline() -> bool:
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
               filename: str | None = None, download: bool = True) -> Iterator[None]:
    """Translate ``huggingface_hub`` / HTTP exceptions raised inside into typed :class:`HubError` s.

    ``action`` (e.g. ``"pull"``) starts the message; repo, revision, file and endpoint are named.
    """
    where = repo_id + (f"@{revision}" if revision else "")
    host = (endpoint or constants.ENDPOINT).rstrip("/")
    try:
        yield
    except DeltaHubError:
        raise
    except hf_errors.GatedRepoError as exc:
        raise AuthenticationError(f"{action}: {repo_id} on {host} is gated and this token has no access to it") from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise RepoNotFoundError(
            f"{action}: repository {repo_id!r} not found on {host} "
            "(if it is private, pass token= / --token or set HF_TOKEN)"
        ) from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise RevisionNotFoundError(f"{action}: revision {revision!r} not found in {repo_id} on {host}") from exc
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as exc:
        if _offline():
            raise DownloadError(
                f"{action}: offline mode (HF_HUB_OFFLINE=1) and {where} is not (fully) in the local Hub cache; "
                "run once online first"
            ) from exc
        raise DownloadError(f"{action}: could not download {where} from {host} and it is not in the local cache ({_server_message(exc)})") from exc
    except hf_errors.EntryNotFoundError as exc:
        what = f"file {filename!r}" if filename else "a file it needs"
        raise RemoteFileNotFoundError(f"{action}: {where} on {host} has no {what}") from exc
    except hf_errors.HfHubHTTPError as exc:
        status = _status(exc)
        if status in (401, 403):
            raise AuthenticationError(
                f"{action}: {host} refused access to {where} (HTTP {status}: missing, wrong or read-only token; "
                "pass token= / --token or set HF_TOKEN)"
            ) from exc
        raise HubError(f"{action}: {where}: HTTP {status} from {host}: {_server_message(exc)}") from exc
    except hf_errors.HFValidationError as exc:
        raise HubError(f"{action}: invalid repo id or revision {where!r}: {exc}") from exc
    except ValueError as exc:
        if "filename" not in str(exc).lower():
            raise
        # huggingface_hub refuses repo file names that would escape the download folder ('../x', '/etc/x').
        raise UnsafePathError(f"{action}: {where} on {host} has a file name that would leave the download folder: "
                              f"{' '.join(str(exc).split())[:200]}") from exc
    except _TRANSPORT_ERRORS as exc:
        if download:
            raise DownloadError(f"{action}: download of {where} from {host} was interrupted ({type(exc).__name__}: {exc})") from exc
        raise HubError(f"{action}: cannot reach {host} ({type(exc).__name__}: {exc})") from exc
    except OSError as exc:
        # Truncated downloads ("Consistency check failed"), a full disk, a broken cache entry.
        if download:
            raise DownloadError(f"{action}: download of {where} from {host} did not complete ({exc})") from exc
        raise


# ---------------------------------------------------------------------------------------- resolve


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec ended up: a local directory, plus the Hub repo id and commit sha if it came from the Hub."""

    local_dir: Path
    repo_id: str | None = None
    commit_sha: str | None = None

    def __iter__(self) -> Iterator[Any]:  # unpack as (local_dir, repo_id, commit_sha)
        return iter((self.local_dir, self.repo_id, self.commit_sha))

    def describe(self) -> str:
        """``repo@sha`` for Hub models, the path for local ones (for messages)."""
        return f"{self.repo_id}@{self.commit_sha}" if self.repo_id else str(self.local_dir)


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], *, token: str | bool | None,
              cache_dir: str | Path | None, endpoint: str | None, action: str) -> Path:
    with hub_errors(action, repo_id, revision, endpoint=endpoint):
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, token=token, cache_dir=cache_dir,
            endpoint=endpoint, local_files_only=_offline(), library_name="deltahub",
        )
    return Path(path)


def _commit_sha(path: Path, repo_id: str, revision: str | None, *, token: str | bool | None, endpoint: str | None) -> str | None:
    """The commit sha of a snapshot: its cache folder name, or the Hub's answer for ``revision``."""
    if _SHA_RE.fullmatch(path.name):
        return path.name
    if _offline():
        return revision if revision and _SHA_RE.fullmatch(revision) else None
    with hub_errors("resolve", repo_id, revision, endpoint=endpoint):
        return HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision).sha


def hub_cache_root(cache_dir: str | Path | None = None) -> Path:
    """The Hub cache directory downloads go to: ``cache_dir``, else ``HF_HUB_CACHE`` (outputs may not contain it)."""
    return Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)


def resolve_model(spec: str | os.PathLike[str], revision: str | None = None, token: str | bool | None = None,
                  cache_dir: str | Path | None = None, endpoint: str | None = None, *, role: str = "model") -> ResolvedModel:
    """A local model directory for ``spec``: an existing path as-is, or a Hub id downloaded with ``snapshot_download``.

    Hub ids are ``namespace/name`` or ``namespace/name@revision``; an explicit ``revision``
    wins over the ``@`` suffix. Only safetensors weights, JSON and tokenizer files are fetched.
    Returns ``(local_dir, repo_id, commit_sha)``; the last two are ``None`` for local paths.
    ``role`` ("model", "base", ...) only words error messages.
    """
    if not is_hub_spec(spec):
        path = Path(spec)
        if not path.exists():
            raise MissingFileError(f"{role} path not found, and not a Hub model id (namespace/name[@revision])", path=path)
        return ResolvedModel(path)
    repo_id, rev = parse_model_spec(str(spec))
    return _resolve_hub(repo_id, revision or rev, token=token, cache_dir=cache_dir, endpoint=endpoint, role=role)


def _resolve_hub(repo_id: str, revision: str | None, *, token: str | bool | None, cache_dir: str | Path | None,
                 endpoint: str | None, role: str) -> ResolvedModel:
    """Download ``repo_id`` at ``revision`` (never a local folder of that name)."""
    local = _snapshot(repo_id, revision, MODEL_PATTERNS, token=token, cache_dir=cache_dir, endpoint=endpoint, action=f"download {role}")
    return ResolvedModel(local, repo_id, _commit_sha(local, repo_id, revision, token=token, endpoint=endpoint))


def download_delta(repo_id: str, revision: str | None = None, token: str | bool | None = None,
                   cache_dir: str | Path | None = None, endpoint: str | None = None) -> Path:
    """Download a delta repo (manifest, stored tensors, tokenizer files; not the README) into the Hub cache.

    ``repo_id`` may carry an ``@revision`` suffix; ``revision`` wins over it. Returns the snapshot directory.
    """
    repo_id, rev = parse_model_spec(repo_id)
    rev = revision or rev
    local = _snapshot(repo_id, rev, DELTA_PATTERNS, token=token, cache_dir=cache_dir, endpoint=endpoint, action="download delta")
    if not (local / MANIFEST_NAME).is_file():
        raise RemoteFileNotFoundError(f"{repo_id}" + (f"@{rev}" if rev else "") + f" has no {MANIFEST_NAME}: not a deltahub delta repository")
    manifest = Manifest.load(local)
    missing = [f for f in manifest.files if not (local / f).is_file()]
    if missing:
        raise RemoteFileNotFoundError(f"{repo_id}" + (f"@{rev}" if rev else "") + f": files listed in {MANIFEST_NAME} are missing from the repo: {missing}")
    return local


def resolve_base(manifest: Manifest, *, base_model: str | os.PathLike[str] | None = None, base_revision: str | None = None,
                 token: str | bool | None = None, cache_dir: str | Path | None = None, endpoint: str | None = None,
                 local_ok: bool = True) -> ResolvedModel:
    """The base a delta applies to, pinned to the commit it was compressed against.

    Default: ``manifest.base.name_or_path`` at ``manifest.base.revision`` (the recorded sha, never
    ``main``). ``base_revision`` overrides the sha; ``base_model`` (a local path or a Hub id,
    optionally ``@rev``) overrides the whole base, for experts (mirrors, re-uploads, local copies).

    ``local_ok=False`` (a delta downloaded from the Hub): the manifest's base name is only ever a
    Hub repo id; a delta from someone else never makes deltahub read a local folder it names.
    """
    recorded = manifest.base
    if base_model is not None:
        if not is_hub_spec(base_model):
            return resolve_model(base_model, role="base")
        repo_id, rev = parse_model_spec(str(base_model))
        if base_revision is not None:
            rev = base_revision
        elif rev is None and repo_id == recorded.name_or_path:
            rev = recorded.revision  # same repo: keep the pin
        return resolve_model(repo_id, revision=rev, token=token, cache_dir=cache_dir, endpoint=endpoint, role="base")
    name = recorded.name_or_path
    rev = base_revision or recorded.revision
    if not local_ok:
        if not is_hub_id(name):
            raise UnsafePathError(
                f"the downloaded delta names the base {name[:120]!r}, which is not a Hub repo id; deltahub never uses a "
                "local folder named by a downloaded delta: pass base_model= / --base with the base model")
        return _resolve_hub(name, rev, token=token, cache_dir=cache_dir, endpoint=endpoint, role="base")
    if recorded.revision is None and base_revision is None and Path(name).exists():
        return ResolvedModel(Path(name))  # a local base, on the machine that made the delta
    if not is_hub_id(name):
        raise MissingFileError(
            f"the delta was made against the local base {name!r} (fingerprint {recorded.fingerprint}), which is neither "
            "here nor a Hub repo id; pass base_model= / --base with that model"
        )
    return resolve_model(name, revision=rev, token=token, cache_dir=cache_dir, endpoint=endpoint, role="base")


@contextlib.contextmanager
def explain_base_mismatch(manifest: Manifest, base: ResolvedModel) -> Iterator[None]:
    """Re-raise a :class:`BaseMismatchError` naming both bases: the one given and the one the delta pins."""
    try:
        yield
    except BaseMismatchError as exc:
        b = manifest.base
        wanted = b.name_or_path + (f"@{b.revision}" if b.revision else "")
        raise BaseMismatchError(
            f"base {base.describe()} is not the base this delta was made against ({wanted}, fingerprint {b.fingerprint}): {exc}"
        ) from exc


# ---------------------------------------------------------------------------------------- push


def model_card(manifest: Manifest, repo_id: str | None = None) -> str:
    """A Hub model card (``README.md``) for a delta: YAML metadata, the storage-cost table, how to rebuild.

    The YAML has ``base_model`` (when the base is a Hub repo), ``library_name: deltahub`` and
    tags (``deltahub`` + the codec names), so the Hub links the delta to its base.
    """
    from .report import human_bytes, storage_rows

    base = manifest.base
    codecs = sorted({e.codec for e in manifest.tensors.values()})
    yaml = ["---"]
    if is_hub_id(base.name_or_path):
        yaml.append(f"base_model: {json.dumps(base.name_or_path)}")
    yaml += ["library_name: deltahub", "tags:", "- deltahub", *(f"- {json.dumps(c)}" for c in codecs), "---"]

    title = repo_id or (manifest.finetuned or {}).get("name_or_path") or "deltahub delta"
    rows = storage_rows(manifest)
    total = rows[-1]
    fp16 = 2 * total["parameters"]
    base_line = f"`{base.name_or_path}`" + (f" at commit `{base.revision}`" if base.revision else " (a local model)")
    lines = [
        *yaml,
        "",
        f"# {title}",
        "",
        f"A fine-tune of {base_line}, stored as a compressed delta with "
        "deltahub: this repo holds only what differs from the base, "
        f"{human_bytes(total['stored_bytes'])} instead of {human_bytes(fp16)} for the fp16 fine-tune "
        f"({fp16 / total['stored_bytes'] if total['stored_bytes'] else math.inf:.1f}x smaller).",
        "",
        f"The base is pinned by commit and by content fingerprint (`{base.fingerprint}`); rebuilding "
        "checks it and refuses any other base.",
        "",
        "## Rebuild the fine-tune",
        "",
        "```bash",
        "pip install deltahub",
        f"deltahub pull {repo_id or '<repo_id>'} -o ./model   # a model directory transformers loads",
        "```",
        "",
        "```python",
        "from deltahub import AutoDeltaModel",
        f"model = AutoDeltaModel.from_pretrained({json.dumps(repo_id or '<repo_id>')})",
        "```",
        "",
        "## Storage cost",
        "",
        "| codec | tensors | parameters | stored | bits/weight | vs fp16 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "∞" if math.isinf(r["ratio_vs_fp16"]) else f"{r['ratio_vs_fp16']:.1f}x"
        cells = [r["codec"], str(r["tensors"]), f"{r['parameters']:,}", f"{r['stored_bytes']:,} B ({human_bytes(r['stored_bytes'])})",
                 f"{r['bits_per_weight']:.3f}", ratio]
        if r["codec"] == "total":
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Ratios are against the fine-tune in fp16 ({fp16:,} bytes). Format: deltahub {manifest.format_version} "
        f"(`{MANIFEST_NAME}` + safetensors), written by {manifest.created_with or 'deltahub'}.",
        "",
    ]
    return "\n".join(lines)


def _delta_files(directory: Path, manifest: Manifest) -> dict[str, Path]:
    """Every file of a delta directory that belongs on the Hub (manifest first): repo name -> local file.

    Only regular files inside ``directory`` (checked names, no symlink out of it) are uploaded.
    """
    names = [MANIFEST_NAME, *manifest.files]
    if member(directory, WEIGHTS_INDEX_NAME, what="push", missing_ok=True) is not None:
        names.append(WEIGHTS_INDEX_NAME)
    return {name: member(directory, name, what=f"push: file listed in {MANIFEST_NAME}") for name in dict.fromkeys(names)}  # type: ignore[misc]


def push_to_hub(delta_dir: str | os.PathLike[str] | Delta, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, commit_description: str | None = None, token: str | bool | None = None,
                endpoint: str | None = None, create_pr: bool = False) -> CommitInfo:
    """Publish a delta directory as a Hub model repo, in one commit, with a generated model card.

    ``create_repo(exist_ok=True)``, then one commit adding the manifest, the stored tensors,
    the tokenizer files and ``README.md`` (a ``README.md`` already in the directory is used
    as-is), and deleting delta shards of an earlier push that this delta no longer has.
    ``revision`` is a branch (created from ``main`` if missing). Returns the ``CommitInfo``.
    """
    from .delta import Delta

    delta = delta_dir if isinstance(delta_dir, Delta) else Delta(delta_dir)
    directory = delta.directory
    manifest = delta.manifest
    files = _delta_files(directory, manifest)
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors("push", repo_id, revision, endpoint=api.endpoint, download=False):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        existing = set(api.list_repo_files(repo_id, revision=revision))
        card = member(directory, "README.md", what="push: model card", missing_ok=True)
        ops: list[Any] = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
        ops.append(CommitOperationAdd(path_in_repo="README.md",
                                      path_or_fileobj=str(card) if card is not None else model_card(manifest, repo_id).encode()))
        stale = sorted(f for f in existing - set(files)
                       if (f.startswith("delta") and f.endswith(".safetensors")) or f == WEIGHTS_INDEX_NAME)
        ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
        ratio = manifest.totals.get("finetuned_fp16_bytes", 0) / max(manifest.totals.get("stored_bytes", 0), 1)
        message = commit_message or f"Upload deltahub delta ({', '.join(sorted(manifest.totals.get('by_codec', {})))}; {ratio:.1f}x vs fp16)"
        info = api.create_commit(repo_id, ops, commit_message=message, commit_description=commit_description,
                                 revision=revision, create_pr=create_pr)
    return info  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------- pull / info


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull_model` did: the output dir, the delta snapshot and the base it used."""

    output_dir: Path
    delta_dir: Path
    delta_revision: str | None
    base: ResolvedModel


def pull_model(repo_id: str, output_dir: str | os.PathLike[str], *, revision: str | None = None, base_revision: str | None = None,
               base_model: str | os.PathLike[str] | None = None, token: str | bool | None = None, cache_dir: str | Path | None = None,
               endpoint: str | None = None, overwrite: bool = False, check_base: bool = True, progress: bool | None = None) -> PullResult:
    """:func:`pull`, returning the details (delta snapshot and the base ``repo@sha``) for reports."""
    from .delta import Delta

    output_dir = Path(output_dir)
    protect = [hub_cache_root(cache_dir)]
    local_base = None if base_model is None or is_hub_spec(base_model) else base_model
    # Refuse an unsafe or existing output before downloading anything (the snapshots are checked again by apply).
    check_output(output_dir, inputs={"base": local_base}, protect=protect, overwrite=overwrite)
    delta_dir = download_delta(repo_id, revision, token=token, cache_dir=cache_dir, endpoint=endpoint)
    delta = Delta(delta_dir)
    try:
        base = resolve_base(delta.manifest, base_model=base_model, base_revision=base_revision, token=token,
                            cache_dir=cache_dir, endpoint=endpoint, local_ok=False)
        with explain_base_mismatch(delta.manifest, base):
            delta.apply(base.local_dir, output_dir, check_base=check_base, overwrite=overwrite, progress=progress, protect=protect)
    finally:
        delta.close()
    sha = delta_dir.name if _SHA_RE.fullmatch(delta_dir.name) else None
    return PullResult(output_dir, delta_dir, sha, base)


def pull(repo_id: str, output_dir: str | os.PathLike[str], *, revision: str | None = None, base_revision: str | None = None,
         base_model: str | os.PathLike[str] | None = None, token: str | bool | None = None, cache_dir: str | Path | None = None,
         endpoint: str | None = None, overwrite: bool = False, check_base: bool = True, progress: bool | None = None) -> Path:
    """Download a delta repo and its base (at the pinned sha) and rebuild the fine-tune into ``output_dir``.

    ``revision`` is the *delta* repo's revision; ``base_revision`` / ``base_model`` override the
    pinned base (experts only). The rebuild streams into a temporary directory that is renamed
    when complete and verified against the base fingerprint, so a failure leaves no output.
    """
    return pull_model(repo_id, output_dir, revision=revision, base_revision=base_revision, base_model=base_model, token=token,
                      cache_dir=cache_dir, endpoint=endpoint, overwrite=overwrite, check_base=check_base, progress=progress).output_dir


def remote_info(repo_id: str, revision: str | None = None, token: str | bool | None = None, endpoint: str | None = None,
                cache_dir: str | Path | None = None) -> tuple[Manifest, list[tuple[str, SafetensorsFileMetadata]]]:
    """The manifest and the safetensors headers of a delta repo, without downloading the stored tensors.

    Downloads only ``delta_config.json`` (into the Hub cache) and reads each delta file's header
    with HTTP range requests (``parse_safetensors_file_metadata``). Returns
    ``(manifest, [(filename, SafetensorsFileMetadata), ...])``.
    """
    repo_id, rev = parse_model_spec(repo_id)
    rev = revision or rev
    with hub_errors("info", repo_id, rev, endpoint=endpoint, filename=MANIFEST_NAME):
        path = Path(hf_hub_download(repo_id, MANIFEST_NAME, revision=rev, token=token, cache_dir=cache_dir,
                                    endpoint=endpoint, local_files_only=_offline(), library_name="deltahub"))
    manifest = Manifest.load(path.parent)
    sha = path.parent.name if _SHA_RE.fullmatch(path.parent.name) else rev  # read the headers of that same commit
    api = HfApi(endpoint=endpoint, token=token)
    headers: list[tuple[str, Any]] = []
    for name in manifest.files:
        if name.endswith(".safetensors"):
            with hub_errors("info", repo_id, sha, endpoint=api.endpoint, filename=name):
                headers.append((name, api.parse_safetensors_file_metadata(repo_id, name, revision=sha, token=token)))
    return manifest, headers
