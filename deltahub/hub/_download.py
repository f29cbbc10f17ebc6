"""Downloading models and deltas into the Hub cache, and resolving the base a delta pins."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

from ..errors import (
    BaseMismatchError,
    EntryNotFoundError,
    MissingFileError,
    UnsafePathError,
)
from ..format.manifest import Manifest
from ..format.spec import AUX_FILE_PATTERNS, MANIFEST_NAME, WEIGHTS_INDEX_NAME
from ..utils.logging import get_logger
from ._errors import hub_errors, offline
from ._ids import SHA_RE, is_hub_id, is_hub_spec, parse_model_spec

logger = get_logger(__name__)

#: Files of a model repo deltahub needs: weights (safetensors only), configs, tokenizer files.
MODEL_PATTERNS: list[str] = ["*.safetensors", "*.safetensors.index.json", "*.json", *AUX_FILE_PATTERNS, "*.jinja", "*.tiktoken"]
#: Files of a delta repo: the manifest, the stored tensors and the fine-tune's tokenizer files (no README).
DELTA_PATTERNS: list[str] = [MANIFEST_NAME, "delta*.safetensors", WEIGHTS_INDEX_NAME, *AUX_FILE_PATTERNS]
#: Extra files of a base fetched with ``trust_remote_code=True``: its modeling code.
CODE_PATTERNS: list[str] = ["*.py"]


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
              cache_dir: str | Path | None, endpoint: str | None, action: str,
              local_files_only: bool = False, force_download: bool = False) -> Path:
    local_only = local_files_only or offline()
    with hub_errors(action, repo_id, revision, endpoint=endpoint, local_files_only=local_only):
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, token=token, cache_dir=cache_dir,
            endpoint=endpoint, local_files_only=local_only, force_download=force_download, library_name="deltahub",
        )
    return Path(path)


def _commit_sha(path: Path, repo_id: str, revision: str | None, *, token: str | bool | None, endpoint: str | None,
                local_files_only: bool = False) -> str | None:
    """The commit sha of a snapshot: its cache folder name, or the Hub's answer for ``revision``."""
    if SHA_RE.fullmatch(path.name):
        return path.name
    if offline() or local_files_only:
        return revision if revision and SHA_RE.fullmatch(revision) else None
    with hub_errors("resolve", repo_id, revision, endpoint=endpoint):
        return HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision).sha


def hub_cache_root(cache_dir: str | Path | None = None) -> Path:
    """The Hub cache directory downloads go to: ``cache_dir``, else ``HF_HUB_CACHE`` (outputs may not contain it)."""
    return Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)


def resolve_model(spec: str | os.PathLike[str], revision: str | None = None, token: str | bool | None = None,
                  cache_dir: str | Path | None = None, endpoint: str | None = None, *, role: str = "model",
                  local_files_only: bool = False, force_download: bool = False,
                  extra_patterns: list[str] | None = None) -> ResolvedModel:
    """A local model directory for ``spec``: an existing path as-is, or a Hub id downloaded with ``snapshot_download``.

    Hub ids are ``namespace/name`` or ``namespace/name@revision``; an explicit ``revision``
    wins over the ``@`` suffix. Only safetensors weights, JSON and tokenizer files are fetched
    (plus ``extra_patterns``). Returns ``(local_dir, repo_id, commit_sha)``; the last two are
    ``None`` for local paths. ``role`` ("model", "base", ...) only words error messages.
    """
    if not is_hub_spec(spec):
        path = Path(spec)
        if not path.exists():
            raise MissingFileError(f"{role} path not found, and not a Hub model id (namespace/name[@revision])", path=path)
        return ResolvedModel(path)
    repo_id, rev = parse_model_spec(str(spec))
    return _resolve_hub(repo_id, revision or rev, token=token, cache_dir=cache_dir, endpoint=endpoint, role=role,
                        local_files_only=local_files_only, force_download=force_download, extra_patterns=extra_patterns)


def _resolve_hub(repo_id: str, revision: str | None, *, token: str | bool | None, cache_dir: str | Path | None,
                 endpoint: str | None, role: str, local_files_only: bool = False, force_download: bool = False,
                 extra_patterns: list[str] | None = None) -> ResolvedModel:
    """Download ``repo_id`` at ``revision`` (never a local folder of that name)."""
    local = _snapshot(repo_id, revision, [*MODEL_PATTERNS, *(extra_patterns or [])], token=token, cache_dir=cache_dir,
                      endpoint=endpoint, action=f"download {role}", local_files_only=local_files_only, force_download=force_download)
    sha = _commit_sha(local, repo_id, revision, token=token, endpoint=endpoint, local_files_only=local_files_only)
    logger.info("%s %s@%s resolved to commit %s (%s)", role, repo_id, revision or "main", sha, local)
    return ResolvedModel(local, repo_id, sha)


def download_delta(repo_id: str, revision: str | None = None, token: str | bool | None = None,
                   cache_dir: str | Path | None = None, endpoint: str | None = None, *,
                   local_files_only: bool = False, force_download: bool = False) -> Path:
    """Download a delta repo (manifest, stored tensors, tokenizer files; not the README) into the Hub cache.

    ``repo_id`` may carry an ``@revision`` suffix; ``revision`` wins over it. Returns the snapshot directory.
    """
    repo_id, rev = parse_model_spec(repo_id)
    rev = revision or rev
    local = _snapshot(repo_id, rev, DELTA_PATTERNS, token=token, cache_dir=cache_dir, endpoint=endpoint, action="download delta",
                      local_files_only=local_files_only, force_download=force_download)
    where = f"{repo_id}" + (f"@{rev}" if rev else "")
    if not (local / MANIFEST_NAME).is_file():
        raise EntryNotFoundError(f"{where} has no {MANIFEST_NAME}: not a deltahub delta repository",
                                 repo_id=repo_id, revision=rev, filename=MANIFEST_NAME)
    manifest = Manifest.load(local)
    missing = [f for f in manifest.files if not (local / f).is_file()]
    if missing:
        raise EntryNotFoundError(f"{where}: files listed in {MANIFEST_NAME} are missing from the repo: {missing}",
                                 repo_id=repo_id, revision=rev, filename=missing[0])
    return local


def download_manifest(repo_id: str, revision: str | None = None, token: str | bool | None = None,
                      cache_dir: str | Path | None = None, endpoint: str | None = None, *,
                      local_files_only: bool = False, force_download: bool = False) -> tuple[Manifest, str | None]:
    """Only the manifest of a delta repo (one small file, ``hf_hub_download``), and the commit it was read at.

    The manifest names the base, so :func:`deltahub.hub.pull` can start the base download right
    after it instead of after the whole delta; passing the returned sha to :func:`download_delta`
    keeps the rest of the delta at the same commit. ``repo_id`` may carry an ``@revision`` suffix.
    """
    repo_id, rev = parse_model_spec(repo_id)
    rev = revision or rev
    where = f"{repo_id}" + (f"@{rev}" if rev else "")
    local_only = local_files_only or offline()
    try:
        with hub_errors("download delta", repo_id, rev, endpoint=endpoint, filename=MANIFEST_NAME, local_files_only=local_only):
            path = Path(hf_hub_download(repo_id, MANIFEST_NAME, revision=rev, token=token, cache_dir=cache_dir, endpoint=endpoint,
                                        local_files_only=local_only, force_download=force_download, library_name="deltahub"))
    except EntryNotFoundError as exc:
        raise EntryNotFoundError(f"{where} has no {MANIFEST_NAME}: not a deltahub delta repository",
                                 repo_id=repo_id, revision=rev, filename=MANIFEST_NAME) from exc
    snapshot = path.parent
    return Manifest.load(snapshot), (snapshot.name if SHA_RE.fullmatch(snapshot.name) else None)


def resolve_base(manifest: Manifest, *, base_model: str | os.PathLike[str] | None = None, base_revision: str | None = None,
                 token: str | bool | None = None, cache_dir: str | Path | None = None, endpoint: str | None = None,
                 local_ok: bool = True, local_files_only: bool = False, force_download: bool = False,
                 extra_patterns: list[str] | None = None) -> ResolvedModel:
    """The base a delta applies to, pinned to the commit it was compressed against.

    Default: ``manifest.base.name_or_path`` at ``manifest.base.revision`` (the recorded sha, never
    ``main``). ``base_revision`` overrides the sha; ``base_model`` (a local path or a Hub id,
    optionally ``@rev``) overrides the whole base, for experts (mirrors, re-uploads, local copies).
    ``local_files_only`` / ``force_download`` are passed to ``snapshot_download``.

    ``local_ok=False`` (a delta downloaded from the Hub): the manifest's base name is only ever a
    Hub repo id; a delta from someone else never makes deltahub read a local folder it names.
    """
    recorded = manifest.base
    dl: dict[str, Any] = {"token": token, "cache_dir": cache_dir, "endpoint": endpoint, "role": "base",
                          "local_files_only": local_files_only, "force_download": force_download, "extra_patterns": extra_patterns}
    if base_model is not None:
        logger.info("base override: %s instead of the recorded %s@%s", base_model, recorded.name_or_path, recorded.revision)
        if not is_hub_spec(base_model):
            return resolve_model(base_model, role="base")
        repo_id, rev = parse_model_spec(str(base_model))
        if base_revision is not None:
            rev = base_revision
        elif rev is None and repo_id == recorded.name_or_path:
            rev = recorded.revision  # same repo: keep the pin
        return resolve_model(repo_id, revision=rev, **dl)
    name = recorded.name_or_path
    rev = base_revision or recorded.revision
    if not local_ok:
        if not is_hub_id(name):
            raise UnsafePathError(
                f"the downloaded delta names the base {name[:120]!r}, which is not a Hub repo id; deltahub never uses a "
                "local folder named by a downloaded delta: pass base_model= / --base with the base model")
        return _resolve_hub(name, rev, **dl)
    if recorded.revision is None and base_revision is None and Path(name).exists():
        return ResolvedModel(Path(name))  # a local base, on the machine that made the delta
    if not is_hub_id(name):
        raise MissingFileError(
            f"the delta was made against the local base {name!r} (fingerprint {recorded.fingerprint}), which is neither "
            "here nor a Hub repo id; pass base_model= / --base with that model"
        )
    return resolve_model(name, revision=rev, **dl)


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
