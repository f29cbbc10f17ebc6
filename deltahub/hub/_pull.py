"""Pulling a delta and its pinned base from the Hub and rebuilding the fine-tune into a directory."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import delta as _delta
from ..delta import Delta
from ..format.io import check_output
from ._download import (
    ResolvedModel,
    download_delta,
    download_manifest,
    explain_base_mismatch,
    hub_cache_root,
    resolve_base,
)
from ._ids import SHA_RE, is_hub_spec, parse_model_spec


def open_delta_dir(spec: str, revision: str | None = None, *, token: str | bool | None = None, cache_dir: str | Path | None = None,
                   endpoint: str | None = None, local_files_only: bool = False, force_download: bool = False) -> Path | None:
    """The local directory of a delta spec that is a Hub id (downloaded into the Hub cache); ``None`` for anything else.

    Registered with :func:`deltahub.delta.register_delta_opener`, so ``Delta.from_pretrained`` opens Hub
    ids while ``deltahub.delta`` never imports ``deltahub.hub`` (the dependency points hub -> delta).
    """
    if not is_hub_spec(spec):
        return None
    return download_delta(spec, revision, token=token, cache_dir=cache_dir, endpoint=endpoint,
                          local_files_only=local_files_only, force_download=force_download)


_delta.register_delta_opener(open_delta_dir)


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull_model` did: the output dir, the delta snapshot and the base it used."""

    output_dir: Path
    delta_dir: Path
    delta_revision: str | None
    base: ResolvedModel


def fetch_delta_and_base(repo_id: str, revision: str | None = None, *, base_model: str | os.PathLike[str] | None = None,
                         base_revision: str | None = None, token: str | bool | None = None, cache_dir: str | Path | None = None,
                         endpoint: str | None = None, local_files_only: bool = False,
                         force_download: bool = False) -> tuple[Path, ResolvedModel]:
    """Download a delta repo and the base it pins, concurrently: ``(delta snapshot dir, base)``.

    The manifest comes first (one small file: it names the base and its commit); then the
    delta's stored tensors and tokenizer files and the base's files download at the same time,
    each repo through ``snapshot_download`` (one ``hf_hub_download`` per file on its worker
    pool). Files already in the cache cost no request when the revision is a commit sha, as the
    base's always is; the rest of the delta is fetched at the manifest's commit. If both fail,
    the delta's error is raised.
    """
    rid, rev = parse_model_spec(repo_id)
    rev = revision or rev
    hub: dict[str, Any] = {"token": token, "cache_dir": cache_dir, "endpoint": endpoint,
                           "local_files_only": local_files_only, "force_download": force_download}
    manifest, sha = download_manifest(rid, rev, **hub)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="deltahub-pull") as pool:
        delta_job = pool.submit(download_delta, rid, sha or rev, **hub)
        base_job = pool.submit(resolve_base, manifest, base_model=base_model, base_revision=base_revision,
                               local_ok=False, **hub)
        errors = [job.exception() for job in (delta_job, base_job)]
    for error in errors:
        if error is not None:
            raise error
    return delta_job.result(), base_job.result()


def pull_model(repo_id: str, output_dir: str | os.PathLike[str], *, revision: str | None = None, base_revision: str | None = None,
               base_model: str | os.PathLike[str] | None = None, token: str | bool | None = None, cache_dir: str | Path | None = None,
               endpoint: str | None = None, overwrite: bool = False, check_base: bool = True, progress: bool | None = None,
               local_files_only: bool = False, force_download: bool = False) -> PullResult:
    """Lower-level :func:`pull`: the same rebuild, returning the details (delta snapshot, the base ``repo@sha``) for reports."""
    output_dir = Path(output_dir)
    protect = [hub_cache_root(cache_dir)]
    local_base = None if base_model is None or is_hub_spec(base_model) else base_model
    # Refuse an unsafe or existing output before downloading anything (the snapshots are checked again by apply).
    check_output(output_dir, inputs={"base": local_base}, protect=protect, overwrite=overwrite)
    delta_dir, base = fetch_delta_and_base(repo_id, revision, base_model=base_model, base_revision=base_revision, token=token,
                                           cache_dir=cache_dir, endpoint=endpoint, local_files_only=local_files_only,
                                           force_download=force_download)
    delta = Delta(delta_dir)
    try:
        with explain_base_mismatch(delta.manifest, base):
            delta.apply(base.local_dir, output_dir, check_base=check_base, overwrite=overwrite, progress=progress, protect=protect)
    finally:
        delta.close()
    sha = delta_dir.name if SHA_RE.fullmatch(delta_dir.name) else None
    return PullResult(output_dir, delta_dir, sha, base)


def pull(repo_id: str, output_dir: str | os.PathLike[str], *, revision: str | None = None, base_revision: str | None = None,
         base_model: str | os.PathLike[str] | None = None, token: str | bool | None = None, cache_dir: str | Path | None = None,
         endpoint: str | None = None, overwrite: bool = False, check_base: bool = True, progress: bool | None = None,
         local_files_only: bool = False, force_download: bool = False) -> Path:
    """Download a delta repo and its base (at the pinned sha) and rebuild the fine-tune into ``output_dir``.

    ``revision`` is the *delta* repo's revision; ``base_revision`` / ``base_model`` override the
    pinned base (experts only). ``local_files_only`` / ``force_download`` apply to both downloads,
    as in ``huggingface_hub``. The delta's files and the base's missing files download
    concurrently (:func:`fetch_delta_and_base`). The rebuild streams into a temporary directory that is renamed
    when complete and verified against the base fingerprint, so a failure leaves no output.
    """
    return pull_model(repo_id, output_dir, revision=revision, base_revision=base_revision, base_model=base_model, token=token,
                      cache_dir=cache_dir, endpoint=endpoint, overwrite=overwrite, check_base=check_base, progress=progress,
                      local_files_only=local_files_only, force_download=force_download).output_dir
