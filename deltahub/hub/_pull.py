"""Pulling a delta and its pinned base from the Hub and rebuilding the fine-tune into a directory."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

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
from ..utils.gc_pause import paused_gc

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


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


class _Background(Generic[T]):
    """``fn(*args, **kwargs)`` in a daemon thread; :meth:`result` joins it and returns or raises its outcome.

    A daemon thread (not an executor's worker) so that an error or a Ctrl-C in the caller never
    waits for a large download to finish: the download goes on in the background and only fills
    the Hub cache (``huggingface_hub`` writes ``.incomplete`` files and renames them when complete).
    """

    def __init__(self, name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            self._value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._error = exc

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def fetch_delta_and_base(repo_id: str, revision: str | None = None, *, base_model: str | os.PathLike[str] | None = None,
                         base_revision: str | None = None, token: str | bool | None = None, cache_dir: str | Path | None = None,
                         endpoint: str | None = None, local_files_only: bool = False,
                         force_download: bool = False) -> tuple[Path, ResolvedModel]:
    """Download a delta repo and the base it pins, concurrently: ``(delta snapshot dir, base)``.

    The manifest comes first (one small file: it names the base and its commit); then the
    delta's stored tensors and tokenizer files and the base's files download at the same time,
    each repo through ``snapshot_download`` (one ``hf_hub_download`` per file on its worker
    pool). Files already in the cache cost no request when the revision is a commit sha, as the
    base's always is; the rest of the delta is fetched at the manifest's commit. The base
    downloads in a background thread: a delta error is raised at once, without waiting for it.
    """
    rid, rev = parse_model_spec(repo_id)
    rev = revision or rev
    hub: dict[str, Any] = {"token": token, "cache_dir": cache_dir, "endpoint": endpoint,
                           "local_files_only": local_files_only, "force_download": force_download}
    manifest, sha = download_manifest(rid, rev, **hub)
    base_job = _Background("deltahub-pull-base", resolve_base, manifest, base_model=base_model, base_revision=base_revision,
                           local_ok=False, **hub)
    delta_dir = download_delta(rid, sha or rev, **hub)
    return delta_dir, base_job.result()


def pull_model(repo_id: str, output_dir: str | os.PathLike[str], *, revision: str | None = None, base_revision: str | None = None,
               base_model: str | os.PathLike[str] | None = None, token: str | bool | None = None, cache_dir: str | Path | None = None,
               endpoint: str | None = None, overwrite: bool = False, check_base: bool = True, progress: bool | None = None,
               local_files_only: bool = False, force_download: bool = False, dtype: str | torch.dtype | None = None) -> PullResult:
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
            delta.apply(base.local_dir, output_dir, check_base=check_base, overwrite=overwrite, progress=progress, protect=protect,
                        dtype=dtype)
    finally:
        delta.close()
    sha = delta_dir.name if SHA_RE.fullmatch(delta_dir.name) else None
    return PullResult(output_dir, delta_dir, sha, base)


@paused_gc()
def pull(repo_id: str, output_dir: str | os.PathLike[str], *, revision: str | None = None, base_revision: str | None = None,
         base_model: str | os.PathLike[str] | None = None, token: str | bool | None = None, cache_dir: str | Path | None = None,
         endpoint: str | None = None, overwrite: bool = False, check_base: bool = True, progress: bool | None = None,
         local_files_only: bool = False, force_download: bool = False, dtype: str | torch.dtype | None = None) -> Path:
    """Download a delta repo and its base (at the pinned sha) and rebuild the fine-tune into ``output_dir``.

    ``revision`` is the *delta* repo's revision; ``base_revision`` / ``base_model`` override the
    pinned base (experts only). ``local_files_only`` / ``force_download`` apply to both downloads,
    as in ``huggingface_hub``. The delta's files and the base's missing files download
    concurrently (:func:`fetch_delta_and_base`). ``dtype`` writes the floating-point weights in that dtype
    (e.g. ``"bfloat16"``: half the bytes of an fp32 fine-tune), as ``apply``'s. The rebuild streams into a temporary directory that is renamed
    when complete and verified against the base fingerprint, so a failure leaves no output.
    """
    return pull_model(repo_id, output_dir, revision=revision, base_revision=base_revision, base_model=base_model, token=token,
                      cache_dir=cache_dir, endpoint=endpoint, overwrite=overwrite, check_base=check_base, progress=progress,
                      local_files_only=local_files_only, force_download=force_download, dtype=dtype).output_dir
