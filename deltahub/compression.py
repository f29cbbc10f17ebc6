"""``compress``: (base, fine-tune) checkpoints -> a delta directory, streaming tensor by tensor.

With the default ``auto`` policy there are two passes, each on worker threads (one torch thread each):
the measure pass sizes every candidate setting of every tensor on a row sample (a tall tensor whose base
digest is cached is read only at those rows) and allocates the byte budget; the final pass encodes each
tensor with its chosen setting, written in storage order (the same bytes as a serial run). Memory holds,
per worker, one fine-tuned tensor, its base tensor and their delta in reused buffers, plus the encoded
tensors not yet written; the base fingerprint is computed from the same reads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._progress import progress_bar
from .allocation import Curve, Point, allocate
from .allocation import total as allocation_total
from .autoselect import check_metric, error_from_sums, model_candidates, relative_error
from .codecs import EncodeInput, get_codec, matrix_view_shape
from .codecs.base import diff_into, row_blocks
from .codecs.rowsparse import row_sums, streams_rows
from .codecs.raw import xor_into
from .codecs._svd import OVERSAMPLE as SVD_OVERSAMPLE
from .codecs._svd import delta_svd, sketch_energy
from .codecs.unchanged import same_bits
from .errors import (
    CodecError,
    DeltaHubError,
    InvalidCodecParamsError,
    ShapeMismatchError,
    UnsafePathError,
)
from .format.delta_files import DeltaShardWriter
from .format.digest_cache import CheckpointDigests
from .format import io as _io
from .format.integrity import file_digest, is_weights_file, manifest_bytes
from .format.io import (
    Checkpoint,
    MappedBytes,
    atomic_directory,
    atomic_file,
    bytes_to_tensor,
    base_digest,
    check_output,
    default_workers,
    one_torch_thread,
    fingerprint,
    pipelined,
    read_with_digest,
    tensor_bytes,
)
from .format.manifest import BaseInfo, Manifest, TensorEntry
from .format.names import path_exists
from .format.spec import (
    ALIAS_CODEC,
    AUX_FILE_PATTERNS,
    DEFAULT_MAX_SHARD_BYTES,
    MANIFEST_NAME,
    dtype_name,
)
from .policy import AUTO, Policy, check_preset, is_vocabulary_matrix
from .ties import TieFinder, sample_step
from .utils.logging import get_logger
from .utils.gc_pause import paused_gc
from .utils.scratch import BufferPool, ThreadScratch, release_free_heap

logger = get_logger(__name__)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: ``compress(base, ft, out)`` with no codec option: ``codec="auto"`` over the whole model, the whole
#: delta directory this many times smaller than the fp16 fine-tune (measured: benchmarks/whole_model.md).
DEFAULT_TARGET_RATIO = 20.0


@paused_gc()
def compress(
    base: str | Path,
    finetuned: str | Path,
    output_dir: str | Path,
    *,
    codec: str | None = None,
    params: dict[str, Any] | None = None,
    policy: Policy | None = None,
    overwrite: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    base_name_or_path: str | None = None,
    base_revision: str | None = None,
    finetuned_name_or_path: str | None = None,
    finetuned_revision: str | None = None,
    compute_stats: bool = True,
    progress: bool | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    preset: str | None = None,
    target_ratio: float | None = None,
    max_bytes: int | str | None = None,
    candidates: list[tuple[str, dict[str, Any]]] | None = None,
    auto_metric: str = "aligned",
    calibration: str | Path | Mapping[str, torch.Tensor] | list[str | Path] | torch.Tensor | None = None,
    distill: bool = False,
    distill_steps: int | None = None,
    distill_lr: float | None = None,
    distill_tokens: int | None = None,
    distill_loss: str | None = None,
    distill_device: str | None = None,
    keep_aux_files: bool = False,
) -> Manifest:
    """Compress ``finetuned`` against ``base`` into ``output_dir``.

    Each model is a local model dir or ``.safetensors`` file, or a Hub id ``namespace/name[@revision]``
    (not an existing path), downloaded with ``snapshot_download`` (``token``, ``cache_dir``,
    ``endpoint`` as in huggingface_hub); the base's repo id and resolved commit sha are recorded
    so a pull fetches exactly that base.

    Default (no ``codec``, ``policy`` or budget): ``codec="auto"`` over the whole model with
    ``target_ratio=DEFAULT_TARGET_RATIO``: every tensor's bytes are allocated by measured error
    (:mod:`deltahub.allocation`) so the whole delta directory is that many times smaller than the
    fp16 fine-tune. A named ``codec``/``params`` is instead applied by the BitDelta paper's policy
    (transformer-block matrices; embeddings, LM head and norms exact); pass a :class:`~deltahub.policy.Policy` for
    per-pattern rules (``params`` given with a policy is merged into the policy's main params; a key
    both give with different values raises :class:`InvalidCodecParamsError`). The output is written
    to a temporary directory and renamed when complete.

    ``preset`` names a preset of the main codec (e.g. DeltaDQ's ``"16x"``). A codec of ``"auto"``
    (main, or a rule's) measures, for every tensor it covers, the bytes and error of each of
    ``candidates`` (default :func:`~deltahub.autoselect.model_candidates`, per tensor shape) and
    allocates bytes over the whole model: ``target_ratio`` R makes the whole delta directory
    (stored tensors, headers, manifest, aux files) at most ``fp16 fine-tune bytes / R``;
    ``max_bytes`` caps the directory's bytes; both may be given.
    ``calibration`` (a dict or a ``.safetensors`` file from :mod:`deltahub.calibration`, or any
    other file read as UTF-8 text and run through the base) gives each tensor its layer's inputs;
    DeltaDQ then picks its group size from them (auto's errors stay in weight space, see
    ``CALIBRATED_ERRORS``). ``auto_metric``:
    ``"aligned"`` (default: lost delta counts fully, orthogonal noise little) or ``"rel"`` (plain
    relative error); see :mod:`deltahub.autoselect`.

    ``distill=True`` then trains the delta's continuous parameters (BitDelta scales, DeltaDQ
    codebooks / uniform scales, top-k ternary scales, DARE norms) so the rebuilt model's logits
    match the fine-tune's on ``calibration``, which then means *text*: files, globs, directories,
    a saved ``datasets`` directory, or token blocks (:func:`deltahub.distill.distill`; ``distill_*``
    override its defaults). The output appears only once distilled.

    Tokenizer and other aux files byte-identical to the base's are not stored: the manifest's
    ``base_files`` records their digests and a rebuild copies them from the base (format 1.2);
    ``keep_aux_files=True`` stores them anyway (a delta that is complete without the base's folder).
    """
    distill_calibration = None
    if distill:
        if calibration is None:
            raise DeltaHubError("distillation needs calibration text (calibration=files, globs or a saved dataset)")
        from .distill import calibration_texts

        distill_calibration = calibration
        if not isinstance(calibration, torch.Tensor):
            calibration_texts(calibration)  # refuse bad text before any work  # type: ignore[arg-type]
        calibration = None
    calib_path = None if calibration is None or isinstance(calibration, Mapping) else calibration
    inputs = {"base": base, "fine-tune": finetuned, "calibration file": calib_path}
    protect = _hub_protect((base, finetuned), cache_dir)
    # Refuse an unsafe or existing output before downloading or reading anything.
    check_output(output_dir, inputs=inputs, protect=protect, overwrite=overwrite)
    hub_kw = {"token": token, "cache_dir": cache_dir, "endpoint": endpoint}
    base, base_name_or_path, base_revision = _resolve_input(base, base_name_or_path, base_revision, role="base", **hub_kw)
    finetuned, finetuned_name_or_path, finetuned_revision = _resolve_input(
        finetuned, finetuned_name_or_path, finetuned_revision, role="fine-tune", **hub_kw)
    inputs.update({"base": base, "fine-tune": finetuned})
    job = _plan_job(codec, params, policy, preset, target_ratio, max_bytes, candidates, auto_metric, compute_stats)
    calib = _open_calibration(calibration, base)
    base_ckpt, ft_ckpt = Checkpoint(base), Checkpoint(finetuned)
    try:
        job.start(ft_ckpt, calib)
        job.ties = TieFinder(ft_ckpt, lambda a, b: job.policy.choose(a, len(ft_ckpt.info(a).shape))
                             == job.policy.choose(b, len(ft_ckpt.info(b).shape)), base=base_ckpt)
        job.base_cache = CheckpointDigests(base_ckpt.files)  # base digests of an unchanged file are not recomputed
        aux = _plan_aux_files(ft_ckpt.dir, None if keep_aux_files else base_ckpt.dir)
        base_digests: dict[str, str] = {}
        if job.policy.uses_auto():
            with one_torch_thread():  # this thread coordinates; the workers compute
                job.decisions = _allocate(job, ft_ckpt, base_ckpt, aux, base_digests, progress)
        total_bytes = sum(ft_ckpt.info(n).nbytes for n in ft_ckpt.keys())
        with atomic_directory(output_dir, overwrite=overwrite, inputs=inputs, protect=protect) as tmp, \
                progress_bar("compress", total_bytes, enabled=progress) as advance:
            writer = DeltaShardWriter(tmp, max_shard_size)
            with one_torch_thread():
                entries = _encode_all(job, ft_ckpt, base_ckpt, writer, advance, base_digests)
            copied, base_files = _copy_aux_files(aux, tmp)
            files = writer.finish() + copied
            manifest = _build_manifest(
                tmp, entries, files, ft_ckpt, base_ckpt, base_digests, base_files, job.base_cache,
                known_digests={f.name: f.digest for f in aux if not f.from_base},
                base={"name_or_path": base_name_or_path or str(base), "revision": base_revision},
                finetuned={"name_or_path": finetuned_name_or_path or str(finetuned), "revision": finetuned_revision})
            job.base_cache.check_unchanged(base)
            with atomic_file(tmp / MANIFEST_NAME) as mtmp:
                mtmp.write_bytes(manifest_bytes(manifest.to_dict()))
            job.base_cache.save()
            if distill:
                from .distill import distill as _distill

                kw = {k: v for k, v in {"steps": distill_steps, "lr": distill_lr, "tokens": distill_tokens,
                                        "loss": distill_loss, "device": distill_device}.items() if v is not None}
                manifest = _distill(tmp, base, finetuned, distill_calibration, in_place_dir=True, progress=progress, **kw)
    finally:
        base_ckpt.close()
        ft_ckpt.close()
    return manifest


def candidate_label(codec: str, params: dict[str, Any]) -> str:
    """``CODEC[:k=v,...]`` (the ``--candidate`` / ``--rule`` syntax) naming an auto candidate."""
    args = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{codec}:{args}" if args else codec


# ---------------------------------------------------------------------------------------- inputs


def _hub_protect(specs: tuple[str | Path, ...], cache_dir: str | Path | None) -> list[Path]:
    """The Hub cache (never a valid output) when any input is a Hub id (an existing path is not: then the Hub
    client, ~0.25 s of imports, is not loaded for a local compress)."""
    ids = [x for x in specs if not isinstance(x, Path) and not path_exists(x)]
    if not ids:
        return []
    from .hub import hub_cache_root, is_hub_spec

    uses_hub = any(is_hub_spec(x) for x in ids)
    return [hub_cache_root(cache_dir)] if uses_hub else []


def _resolve_input(spec: str | Path, name: str | None, revision: str | None, *, token: str | bool | None,
                   cache_dir: str | Path | None, endpoint: str | None, role: str) -> tuple[str | Path, str | None, str | None]:
    """Local paths pass through; a Hub id is downloaded and becomes ``(local dir, repo id, commit sha)``.

    ``revision`` (when the id has no ``@rev``) is the revision to download; the recorded
    revision is always the resolved commit sha.
    """
    if isinstance(spec, Path) or path_exists(spec):
        return spec, name, revision
    from .hub import is_hub_spec, parse_model_spec, resolve_model

    if not is_hub_spec(spec):
        return spec, name, revision  # Checkpoint reports the missing path
    resolved = resolve_model(spec, revision=parse_model_spec(str(spec))[1] or revision, token=token, cache_dir=cache_dir, endpoint=endpoint, role=role)
    return resolved.local_dir, name or resolved.repo_id, resolved.commit_sha or revision


def _open_calibration(calibration: str | Path | Mapping[str, torch.Tensor] | None, base: str | Path) -> Mapping[str, torch.Tensor] | None:
    """A dict passes through; a ``.safetensors`` file is opened lazily; another file is text run through the base."""
    if calibration is None or isinstance(calibration, Mapping):
        return calibration
    from .calibration import CalibrationFile, collect_activations, read_text_file

    path = Path(calibration)
    if path.suffix == ".safetensors":
        return CalibrationFile(path)
    return collect_activations(base, read_text_file(path, "calibration file (a .safetensors from `deltahub calibrate`, or a text file)"))


def _layer_input(calib: Mapping[str, torch.Tensor] | None, name: str, shape: Any) -> torch.Tensor | None:
    """The calibration inputs of tensor ``name`` (None when absent); their width must match its columns."""
    if calib is None or name not in calib:
        return None
    x = calib[name]
    cols = matrix_view_shape(tuple(shape))[1]
    if x.ndim < 1 or x.shape[-1] != cols:
        raise ShapeMismatchError(f"tensor {name!r}: calibration activations have {x.shape[-1] if x.ndim else 0} features "
                                 f"but the tensor has {cols} columns (made for another model?)")
    return x


# ---------------------------------------------------------------------------------------- policy


def _validated_policy(codec: str, params: dict[str, Any] | None, policy: Policy | None, preset: str | None) -> Policy:
    """The policy to apply: ``policy`` (with ``params`` merged into its main params) or one built from ``codec``/``params``."""
    if policy is None:
        policy = Policy(codec=codec, params=dict(params or {}), whole_model=codec == AUTO)
    elif params:
        clash = sorted(k for k in params if k in policy.params and policy.params[k] != params[k])
        if clash:
            raise InvalidCodecParamsError(
                f"params {clash} given both in policy=Policy(params=...) and params=... with different values; give them once")
        policy = dataclasses.replace(policy, params={**policy.params, **params})
    if preset is not None:
        policy = dataclasses.replace(policy, preset=preset)
    if policy.preset is not None:
        check_preset(policy.codec, policy.preset)
    return policy


class _Codecs:
    """Codec lookup with each distinct ``(codec, params)`` validated once."""

    def __init__(self) -> None:
        self._validated: dict[tuple[str, str], dict[str, Any]] = {}
        self._labels: dict[tuple[str, str], str] = {}

    @staticmethod
    def _key(codec_name: str, params: dict[str, Any]) -> Any:
        try:  # called per candidate and tensor: a tuple key where the params are hashable
            key: Any = (codec_name, tuple(params.items()))
            hash(key)
        except TypeError:
            key = (codec_name, repr(sorted(params.items())))
        return key

    def get(self, codec_name: str, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        key = self._key(codec_name, params)
        c = get_codec(codec_name)
        if key not in self._validated:
            self._validated[key] = c.validate_params(params)
        return c, dict(self._validated[key])

    def label(self, codec_name: str, params: dict[str, Any]) -> str:
        """:func:`candidate_label`, made once per distinct candidate."""
        key = self._key(codec_name, params)
        label = self._labels.get(key)
        if label is None:
            label = self._labels[key] = candidate_label(codec_name, params)
        return label

    def check_all(self, policy: Policy, candidates: list[tuple[str, dict[str, Any]]]) -> None:
        """Validate every codec the policy (and auto's candidates) names, so a typo fails before any work."""
        if policy.codec != AUTO:
            self.get(policy.codec, policy.main_params())
        for rule in policy.rules:
            if rule.codec != AUTO:
                self.get(rule.codec, rule.params)
        self.get("raw", policy.raw_params)
        if policy.uses_auto():
            if not candidates:
                raise InvalidCodecParamsError("codec 'auto' needs at least one candidate")
            for cname, cparams in candidates:
                self.get(cname, dict(cparams))


def _check_auto(policy: Policy, target_ratio: float | None, max_bytes: int | str | None) -> tuple[float | None, int | None]:
    """Check the budget options against the policy; returns ``(target_ratio, max_bytes in bytes)``.

    ``auto`` without a budget gets :data:`DEFAULT_TARGET_RATIO`; a budget without ``auto`` is an error.
    """
    budget = target_ratio is not None or max_bytes is not None
    if budget and not policy.uses_auto():
        raise InvalidCodecParamsError(f"target_ratio / max_bytes (--target-ratio / --max-bytes) allocate bytes with codec 'auto' "
                                      f"(the default); codec is {policy.codec!r}")
    for rule in policy.rules:
        if rule.codec == AUTO and rule.params:
            raise InvalidCodecParamsError(f"rule {rule.pattern!r}: codec 'auto' takes no parameters (got {sorted(rule.params)}); "
                                          "its budget is target_ratio / max_bytes")
    if policy.codec == AUTO and policy.params:
        raise InvalidCodecParamsError(f"codec 'auto' (the default) takes no parameters (got {sorted(policy.main_params())}); "
                                      "its budget is target_ratio / max_bytes; name a codec to give it parameters "
                                      "(codec='bitdelta', --codec bitdelta)")
    if target_ratio is not None and (isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float))
                                     or not target_ratio > 0 or math.isinf(target_ratio)):
        raise InvalidCodecParamsError(f"target_ratio={target_ratio!r} must be a number > 0")
    if policy.uses_auto() and not budget:
        target_ratio = DEFAULT_TARGET_RATIO
    return target_ratio, _budget_bytes(max_bytes)


def _budget_bytes(max_bytes: int | str | None) -> int | None:
    """``max_bytes`` (a number of bytes or a size like ``"50MB"``) in bytes."""
    from .report import parse_size

    if max_bytes is None:
        return None
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, str)):
        raise InvalidCodecParamsError(f"max_bytes={max_bytes!r} must be a number of bytes or a size like '50MB'")
    try:
        size = parse_size(max_bytes)
    except ValueError as exc:
        raise InvalidCodecParamsError(f"max_bytes: {exc}") from None
    if size < 0:
        raise InvalidCodecParamsError(f"max_bytes={max_bytes!r} must be a size >= 0")
    return size


# ---------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class _Job:
    """One compress run's validated settings, and the state shared across tensors."""

    policy: Policy
    codecs: _Codecs
    candidates: list[tuple[str, dict[str, Any]]] | None
    target_ratio: float | None
    max_bytes: int | None
    auto_metric: str
    compute_stats: bool
    calib: Mapping[str, torch.Tensor] | None = None
    #: Cached per-tensor digests of the base's files (:mod:`deltahub.format.digest_cache`).
    base_cache: CheckpointDigests | None = None
    #: True when the budget is the default (no target_ratio / max_bytes given): a small model may miss it.
    default_budget: bool = False
    #: Allocation result: tensor name -> the chosen point (``codec="auto"`` tensors only).
    decisions: dict[str, Point] = dataclasses.field(default_factory=dict)
    #: Which names are aliases of an earlier, identical tensor (format 1.3 tied weights), decided once.
    ties: TieFinder | None = None
    #: Read / scratch buffers shared by the measure and the final pass (the final pass reuses the pages the
    #: first one touched).
    buffers: BufferPool = dataclasses.field(default_factory=lambda: BufferPool(SCRATCH_BYTES, keep=2 * MEASURE_THREADS + 2))
    #: The measure pass's row samples (and their deltas), one set of buffers per thread reused for every tensor: a
    #: fresh 0.1-2 MB array per sample was page-faulted in each time (half the time of picking the rows).
    picks: ThreadScratch = dataclasses.field(default_factory=lambda: ThreadScratch(PICK_SCRATCH_BYTES))

    def start(self, ft_ckpt: Checkpoint, calib: Mapping[str, torch.Tensor] | None) -> None:
        """Check the calibration against the fine-tune (headers only)."""
        if calib is not None and not any(n in calib for n in ft_ckpt.keys()):
            raise ShapeMismatchError("the calibration activations name none of the fine-tune's tensors "
                                     "(made for another model?)")
        self.calib = calib

    def candidates_for(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, dict[str, Any]]]:
        """The auto candidates of one tensor: the user's, else :func:`model_candidates` for its shape."""
        return list(self.candidates) if self.candidates is not None else model_candidates(name, shape)


def _plan_job(codec: str | None, params: dict[str, Any] | None, policy: Policy | None, preset: str | None,
              target_ratio: float | None, max_bytes: int | str | None, candidates: list[tuple[str, dict[str, Any]]] | None,
              auto_metric: str, compute_stats: bool) -> _Job:
    """Validate every setting up front (policy, codecs, budget, metric), before any tensor is read."""
    if policy is None and codec is None:
        codec = AUTO
    policy = _validated_policy(codec or "bitdelta", params, policy, preset)
    default_budget = target_ratio is None and max_bytes is None
    target_ratio, budget_bytes = _check_auto(policy, target_ratio, max_bytes)
    check_metric(auto_metric)
    codecs = _Codecs()
    codecs.check_all(policy, list(candidates) if candidates is not None else model_candidates("", (2, 2)))
    return _Job(policy, codecs, list(candidates) if candidates is not None else None, target_ratio, budget_bytes,
                auto_metric, compute_stats, default_budget=default_budget)


def _encode_all(job: _Job, ft_ckpt: Checkpoint, base_ckpt: Checkpoint, writer: DeltaShardWriter, advance: Any,
                base_digests: dict[str, str]) -> dict[str, TensorEntry]:
    """Encode every fine-tune tensor into ``writer``; returns the entries.

    Tensors are encoded on all cores (one torch thread each), each worker reading and subtracting into its own
    reused buffers; they are written and recorded in storage order, so the delta's bytes are those of a serial
    run. Ties the allocation pass did not decide (a named codec) are decided here, in that order, from the keys
    the workers took: a tensor found to be an alias then drops its coding.
    ``base_digests`` gets the digest of every base tensor read (those already in it are not rehashed).
    """
    entries: dict[str, TensorEntry] = {}
    names = list(ft_ckpt.keys())
    ties = job.ties
    job.buffers.trim(2 * default_workers())  # the fine-tune and base buffers of each worker; the rest is freed
    release_free_heap()
    scratch = ThreadScratch(SCRATCH_BYTES, job.buffers)
    load = _loader(ft_ckpt, base_ckpt, base_digests, job.base_cache, scratch=scratch)

    def encode(name: str) -> tuple[TensorEntry, str | None, tuple[Any, ...] | None, tuple[dict[str, torch.Tensor], str] | None]:
        info = ft_ckpt.info(name)
        kind = _stream_kind(job, name, info, base_ckpt)
        if kind is not None:
            undecided = ties is not None and not ties.is_decided(name)
            known = base_digests.get(name)
            xor = rows = None
            if kind == "delta":
                delta, digest, sample = _read_delta(ft_ckpt, base_ckpt, name, known, job.base_cache,
                                                    scratch.get("delta", 4 * math.prod(info.shape)), sample=undecided)
            elif kind == "rows":
                rows_of = _DeltaRows(ft_ckpt, base_ckpt, name)
                sums, same, digest, sample = _row_pass(rows_of, known, job.base_cache, undecided)
                delta, rows = None, None if same else (rows_of, sums)
            else:
                payload, digest, sample = _read_xor(ft_ckpt, base_ckpt, name, known, job.base_cache,
                                                    scratch.get("delta", info.nbytes), kind == "xor-planes",
                                                    sample=undecided)
                delta, xor = None, None if payload is None else (payload, kind == "xor-planes")
            if delta is not None or xor is not None or rows is not None:  # (else unchanged: read whole below)
                binfo = base_ckpt.info(name)
                key = None
                if undecided:  # decided in storage order below; an alias then drops this coding
                    assert ties is not None and sample is not None
                    key = ties.key_of(info.dtype, tuple(info.shape), (binfo.dtype, tuple(binfo.shape)), digest, sample)
                shapes = (torch.empty(info.shape, dtype=info.dtype, device="meta"),
                          torch.empty(binfo.shape, dtype=binfo.dtype, device="meta"))  # no data: the input is given
                entry, tensors, codec = _encode_entry(job, name, info, *shapes, digest, scratch, delta=delta, xor=xor,
                                                      rows=rows)
                return entry, digest, key, (tensors, codec)
        ft_t, base_t, digest = load(name)
        key = None
        if ties is not None:
            if ties.is_decided(name):
                target = ties.decide(name, None)  # decided by the allocation pass: a lookup
                if target is not None:
                    return alias_entry(name, info, target, digest), digest, None, None
            else:
                key = ties.key(ft_t, base_t, digest)
        entry, tensors, codec = _encode_entry(job, name, info, ft_t, base_t, digest, scratch)
        return entry, digest, key, (tensors, codec)

    # Results are the stored tensors (at most about the input's bytes, far less for lossy codecs): by their
    # bytes, workers run ahead of a large tensor at the head of the queue instead of idling behind it.
    for name, (entry, digest, key, stored) in pipelined(names, encode, cost=lambda n: ft_ckpt.info(n).nbytes,
                                                         max_cost=ENCODE_AHEAD_BYTES):
        if digest is not None:
            base_digests[name] = digest
        target = ties.decide(name, key) if ties is not None else None
        if target is not None and stored is not None:  # decided just now: an alias of an earlier tensor
            entry, stored = alias_entry(name, ft_ckpt.info(name), target, digest), None
        if stored is None:
            logger.info("tied: %s is byte-identical to %s (and so are their base tensors): coded once",
                        name, entry.params["target"])
        else:
            _record(entry, *stored, writer)
        entries[name] = entry
        advance(ft_ckpt.info(name).nbytes)
    return entries


def _loader(ft_ckpt: Checkpoint, base_ckpt: Checkpoint, known: dict[str, str], cache: CheckpointDigests | None = None,
            scratch: ThreadScratch | None = None, pool: BufferPool | None = None,
            held: dict[str, list[torch.Tensor]] | None = None) -> Any:
    """``name -> (fine-tuned tensor, base tensor or None, base digest or None)``, hashing each base tensor once
    (never, when ``cache`` has its digest). With ``scratch`` the tensors are read into the calling thread's
    buffers (valid until its next load); with ``pool`` into its buffers, listed in ``held[name]`` for the
    caller to release."""
    def buf(slot: str, ckpt: Checkpoint, name: str) -> torch.Tensor | None:
        nbytes = ckpt.info(name).nbytes
        if pool is not None and held is not None:
            b = pool.acquire(nbytes)
            held.setdefault(name, []).append(b)
            return b
        return scratch.get(slot, nbytes) if scratch is not None else None

    def load(name: str) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
        info = ft_ckpt.info(name)
        ft_t = bytes_to_tensor(ft_ckpt.read_bytes(name, buf("ft", ft_ckpt, name)), info.dtype, info.shape)
        if name not in base_ckpt:
            return ft_t, None, None
        if name in known:
            binfo = base_ckpt.info(name)
            return ft_t, bytes_to_tensor(base_ckpt.read_bytes(name, buf("base", base_ckpt, name)), binfo.dtype, binfo.shape), known[name]
        return (ft_t, *read_with_digest(base_ckpt, name, cache, buf("base", base_ckpt, name)))
    return load


def _stream_kind(job: _Job, name: str, info: Any, base_ckpt: Checkpoint) -> str | None:
    """How compress's final pass may read ``name`` without the whole tensors in memory: ``"delta"``
    (:func:`_read_delta`: a float tensor with a same-shape float base, coded by a
    :attr:`~deltahub.codecs.base.Codec.delta_only` codec), ``"xor"`` / ``"xor-planes"`` (:func:`_read_xor`, the
    payload as it is or in byte planes: ``raw`` ``xor`` of a same-shape, same-dtype base), ``"rows"`` (a large
    delta that ``rowsparse`` codes a block of rows at a time: :func:`_row_pass`, then :class:`_DeltaRows`), or None
    (read whole).
    Never for a tensor the allocation pass decided is an alias."""
    if name not in base_ckpt or not info.nbytes:
        return None
    if job.ties is not None and job.ties.is_decided(name) and job.ties.decide(name, None) is not None:
        return None  # an alias: nothing to encode
    codec_name, p = job.policy.choose(name, len(info.shape))
    if codec_name == AUTO:
        point = (job.decisions or {}).get(name)
        if point is None:
            return None
        codec_name, p = point.codec, point.params
    binfo = base_ckpt.info(name)
    if codec_name == "raw":
        p = job.codecs.get(codec_name, p)[1]
        if p["mode"] == "full" or tuple(binfo.shape) != tuple(info.shape) or binfo.dtype != info.dtype:
            return None
        return "xor-planes" if p["shuffle"] and p["zstd_level"] > 0 and info.dtype.itemsize > 1 else "xor"
    if not _has_delta(binfo.shape, binfo.dtype, info.shape, info.dtype):
        return None
    if codec_name == "rowsparse" and 4 * math.prod(info.shape) >= ROWS_STREAM_MIN_BYTES:
        if streams_rows(job.codecs.get(codec_name, p)[1], tuple(info.shape)):
            return "rows"
    # the fine-tune is read into the delta's own buffer: at most 4 bytes per element (float64 reads whole)
    return "delta" if get_codec(codec_name).delta_only and info.dtype.itemsize <= 4 else None


#: Elements per chunk when compress computes a delta straight from the files (the base is read a chunk at a time).
DELTA_CHUNK = 1 << 17


class _Streamed:
    """What compress learns of one tensor while reading its bytes a chunk at a time (:meth:`add`, in order): whether
    the fine-tune's bits equal the base's, the base's digest (hashed on the way unless given or cached) and, with
    ``sample``, the fine-tune's tie sample (the strided sample :class:`~deltahub.ties.TieFinder` keys a tensor by)."""

    def __init__(self, ft_ckpt: Checkpoint, base_ckpt: Checkpoint, name: str, digest: str | None,
                 cache: CheckpointDigests | None, sample: bool) -> None:
        info, binfo = ft_ckpt.info(name), base_ckpt.info(name)
        if digest is None and cache is not None:
            digest = cache.get(name)
        self.name, self.digest, self.cache = name, digest, cache
        self.same = info.dtype == binfo.dtype
        self._hash = _io.tensor_hasher() if digest is None else None
        self._step = sample_step(info.nbytes) if sample else 0
        self._parts: list[bytes] = []

    def add(self, f: torch.Tensor, offset: int, b: torch.Tensor) -> None:
        """The next chunk: the fine-tune's bytes ``f`` from byte ``offset`` and the base's bytes ``b`` of the same
        elements."""
        if self._hash is not None:
            self._hash.update(memoryview(b.numpy()))
        if self._step:  # the bytes whose offsets are multiples of the step
            self._parts.append(f.numpy()[-offset % self._step::self._step].tobytes())
        self.same = self.same and bool(torch.equal(f, b))

    def finish(self) -> tuple[str, bytes | None]:
        """``(base digest, tie sample or None)`` after the last chunk (a computed digest goes into the cache)."""
        if self._hash is not None:
            self.digest = self._hash.hexdigest()
            if self.cache is not None:
                self.cache.put(self.name, self.digest)
        assert self.digest is not None
        return self.digest, (b"".join(self._parts) if self._step else None)


def _base_chunks(base_ckpt: Checkpoint, name: str) -> Any:
    """``(i0, i1, bytes)`` of the base tensor ``name`` a chunk of :data:`DELTA_CHUNK` elements at a time (one
    reused buffer)."""
    binfo = base_ckpt.info(name)
    n, bs = math.prod(binfo.shape), binfo.dtype.itemsize
    chunk = torch.empty(min(n, DELTA_CHUNK) * bs, dtype=torch.uint8)
    for i0 in range(0, n, DELTA_CHUNK):
        i1 = min(n, i0 + DELTA_CHUNK)
        yield i0, i1, base_ckpt.read_span(name, i0 * bs, chunk[:(i1 - i0) * bs])


def _read_delta(ft_ckpt: Checkpoint, base_ckpt: Checkpoint, name: str, digest: str | None,
                cache: CheckpointDigests | None, buf: torch.Tensor | None,
                sample: bool = False) -> tuple[torch.Tensor | None, str, bytes | None]:
    """``(float32(fine-tune) - float32(base), base digest, tie sample)`` of one tensor (:class:`_Streamed`), without
    either tensor whole in memory beside the delta: the fine-tune is read into the upper part of the delta's buffer
    (``buf``, at least 4 bytes per element, else a fresh one) and overwritten by the delta a chunk at a time while
    the base is read a chunk at a time. The delta is None when the two tensors have the same bits (unchanged)."""
    info, binfo = ft_ckpt.info(name), base_ckpt.info(name)
    n, fs = math.prod(info.shape), info.dtype.itemsize
    raw = buf.view(-1)[:4 * n] if buf is not None and buf.numel() >= 4 * n else torch.empty(4 * n, dtype=torch.uint8)
    if MAPPED_READS:
        with ft_ckpt.mapped(name) as fm, base_ckpt.mapped(name) as bm:
            if fm is not None and bm is not None:
                return _mapped_delta(fm, bm, info, binfo, raw.view(torch.float32),
                                     _Streamed(ft_ckpt, base_ckpt, name, digest, cache, sample))
    at = (4 - fs) * n  # where the fine-tune's bytes sit: every chunk's delta lands at or below its own bytes
    ft_ckpt.read_span(name, 0, raw[at:])
    seen = _Streamed(ft_ckpt, base_ckpt, name, digest, cache, sample)
    delta = raw.view(torch.float32)
    for i0, i1, b in _base_chunks(base_ckpt, name):
        f = raw[at + i0 * fs:at + i1 * fs]
        seen.add(f, i0 * fs, b)  # before any delta lands on these bytes
        if 4 * i1 > at + i0 * fs and at:  # the delta overlaps its own fine-tune bytes, shifted: diff from a copy
            f = f.clone()  # (a float32 fine-tune's chunk is its delta's very bytes: elementwise in place is exact)
        diff_into(f.view(info.dtype), b.view(binfo.dtype), delta[i0:i1])
    return (None if seen.same else delta.view(info.shape)), *seen.finish()


#: compress reads the fine-tune and the base from mappings of their files where it can (no copy into a buffer).
MAPPED_READS = True
#: Elements per step of a mapped read (the pages of each step are dropped from the process once used).
MAPPED_CHUNK = 1 << 20


def _mapped_delta(fm: MappedBytes, bm: MappedBytes, info: Any, binfo: Any, delta: torch.Tensor,
                  seen: _Streamed) -> tuple[torch.Tensor | None, str, bytes | None]:
    """:func:`_read_delta` from the files' mappings: each step's delta computed from the page cache's pages."""
    n, fs, bs = math.prod(info.shape), info.dtype.itemsize, binfo.dtype.itemsize
    for i0 in range(0, n, MAPPED_CHUNK):
        i1 = min(n, i0 + MAPPED_CHUNK)
        f, b = fm.span(i0 * fs, (i1 - i0) * fs), bm.span(i0 * bs, (i1 - i0) * bs)
        seen.add(f, i0 * fs, b)
        diff_into(f.view(info.dtype), b.view(binfo.dtype), delta[i0:i1])
        fm.done(i0 * fs, (i1 - i0) * fs)
        bm.done(i0 * bs, (i1 - i0) * bs)
    return (None if seen.same else delta[:n].view(info.shape)), *seen.finish()


def _read_xor(ft_ckpt: Checkpoint, base_ckpt: Checkpoint, name: str, digest: str | None,
              cache: CheckpointDigests | None, buf: torch.Tensor | None, shuffle: bool,
              sample: bool = False) -> tuple[torch.Tensor | None, str, bytes | None]:
    """``raw``'s ``xor`` payload of one tensor (``bits(fine-tune) XOR bits(base)`` as uint8, in byte planes with
    ``shuffle``), both tensors read a chunk at a time into ``buf`` (at least the tensor's bytes, else a fresh
    one): the payload is the only whole-tensor buffer. Returns ``(payload or None when the bits are equal,
    base digest, tie sample or None)`` as :func:`_read_delta`."""
    info = ft_ckpt.info(name)
    n, its = math.prod(info.shape), info.dtype.itemsize
    out = buf.view(-1)[:n * its] if buf is not None and buf.numel() >= n * its else torch.empty(n * its, dtype=torch.uint8)
    seen = _Streamed(ft_ckpt, base_ckpt, name, digest, cache, sample)
    fchunk = torch.empty(min(n, DELTA_CHUNK) * its, dtype=torch.uint8)
    for i0, i1, b in _base_chunks(base_ckpt, name):
        f = ft_ckpt.read_span(name, i0 * its, fchunk[:(i1 - i0) * its])
        seen.add(f, i0 * its, b)
        xor_into(f, b, out, i0, n, its, shuffle)
    return (None if seen.same else out), *seen.finish()


#: A ``rowsparse`` delta of at least these float32 bytes is never held whole by compress's final pass (a large
#: vocabulary's embedding): its rows are streamed from the files twice (:func:`_row_pass`, :class:`_DeltaRows`).
ROWS_STREAM_MIN_BYTES = 64 << 20


class _DeltaRows:
    """``(r0, r1) -> float32(fine-tune rows) - float32(base rows)`` of one tensor's ``[rows, cols]`` view, read from
    the files into reused block buffers (:attr:`~deltahub.codecs.base.EncodeInput._delta_rows`): the returned view
    lives until the next call."""

    def __init__(self, ft_ckpt: Checkpoint, base_ckpt: Checkpoint, name: str) -> None:
        self.ft, self.base, self.name = ft_ckpt, base_ckpt, name
        info, binfo = ft_ckpt.info(name), base_ckpt.info(name)
        self.dtype, self.bdtype = info.dtype, binfo.dtype
        self.rows, self.cols = matrix_view_shape(info.shape)
        self._bufs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def raw(self, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fine-tune's and the base's bytes of rows ``[r0, r1)``."""
        n = (r1 - r0) * self.cols
        fs, bs = self.dtype.itemsize, self.bdtype.itemsize
        if self._bufs is None or self._bufs[2].numel() < n:
            self._bufs = (torch.empty(n * fs, dtype=torch.uint8), torch.empty(n * bs, dtype=torch.uint8),
                          torch.empty(n, dtype=torch.float32))
        f = self.ft.read_span(self.name, r0 * self.cols * fs, self._bufs[0][:n * fs])
        b = self.base.read_span(self.name, r0 * self.cols * bs, self._bufs[1][:n * bs])
        return f, b

    def diff(self, f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The float32 delta of bytes :meth:`raw` returned, as ``[rows, cols]``."""
        assert self._bufs is not None
        n = f.numel() // self.dtype.itemsize
        out = diff_into(f.view(self.dtype), b.view(self.bdtype), self._bufs[2][:n])
        return out.view(-1, self.cols)

    def __call__(self, r0: int, r1: int) -> torch.Tensor:
        return self.diff(*self.raw(r0, r1))


def _row_pass(rows_of: _DeltaRows, digest: str | None, cache: CheckpointDigests | None,
              sample: bool) -> tuple[tuple[torch.Tensor, torch.Tensor], bool, str, bytes | None]:
    """One pass over a tensor's rows (:class:`_DeltaRows`): ``((sum d^2, sum |d|) per row, same bits?, base digest,
    tie sample or None)`` (:class:`_Streamed`)."""
    rows, cols = rows_of.rows, rows_of.cols
    seen = _Streamed(rows_of.ft, rows_of.base, rows_of.name, digest, cache, sample)
    sq, ab = torch.empty(rows, dtype=torch.float64), torch.empty(rows, dtype=torch.float64)
    for r0, r1 in row_blocks(rows, cols):
        f, b = rows_of.raw(r0, r1)
        seen.add(f, r0 * cols * rows_of.dtype.itemsize, b)
        sq[r0:r1], ab[r0:r1] = row_sums(rows_of.diff(f, b))
    return (sq, ab), seen.same, *seen.finish()


def _select_codec(job: _Job, name: str, info: Any, ft_t: torch.Tensor, base_t: torch.Tensor | None, *,
                  unchanged: bool | None = None) -> tuple[Any, dict[str, Any], bool]:
    """``(codec, params, auto)`` for one tensor: the policy's choice, unless it is unchanged (``unchanged``: known
    already, else compared) or has no usable base."""
    codec_name, p = job.policy.choose(name, len(info.shape))
    auto = codec_name == AUTO
    c, p = (None, p) if auto else job.codecs.get(codec_name, p)
    compatible = base_t is not None and _has_delta(base_t.shape, base_t.dtype, ft_t.shape, info.dtype)
    if base_t is not None and (same_bits(base_t, ft_t) if unchanged is None else unchanged):
        return (*job.codecs.get("unchanged", {}), False)
    if auto and not compatible and base_t is not None and _grown(base_t, ft_t):
        return None, p, True  # allocated among row-sparse settings (base rows coded, added rows exact)
    resized = None if compatible or base_t is None else _resized_vocab(job, c, p, base_t, ft_t)
    if resized is not None:
        return (*resized, False)
    if (auto or c.needs_base) and not compatible:
        # No usable base counterpart (new tensor, resized vocabulary, integer buffer): keep it exact.
        return (*job.codecs.get("raw", job.policy.raw_params), False)
    return c, p, auto


def _run_codec(job: _Job, inp: EncodeInput, c: Any, p: dict[str, Any], auto: bool) -> tuple[Any, Any, dict[str, Any]]:
    """Encode one tensor with ``c`` or, for auto, the setting the allocation chose; returns ``(codec, encoded, auto stats)``."""
    stats: dict[str, Any] = {}
    if auto:
        point = job.decisions[inp.name]
        c, p = job.codecs.get(point.codec, point.params)
        stats = {"auto_choice": point.label, "auto_metric": point.metric, "auto_error": point.error}
        logger.info("auto: %s -> %s (%d bytes, %s error %.4g)", inp.name, point.label, point.nbytes, point.metric, point.error)
    try:
        enc = c.encode(inp, p)
    except DeltaHubError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise CodecError(f"tensor {inp.name!r}: codec {c.name!r} failed: {exc}") from exc
    if auto and point.error_l2 is not None and not enc.stats:
        enc.stats = {"delta_l2": point.delta_l2, "error_l2": point.error_l2}
    return c, enc, stats


def _record(entry: TensorEntry, tensors: dict[str, torch.Tensor], codec: str, writer: DeltaShardWriter) -> TensorEntry:
    """Write an encoded tensor's stored tensors (keyed by their stored names) and fill in the entry's digests."""
    written = writer.add(tensors, codec)
    entry.digests = {r: written[k] for r, k in entry.stored.items()}
    return entry


def _encode_entry(job: _Job, name: str, info: Any, ft_t: torch.Tensor, base_t: torch.Tensor | None,
                  digest: str | None, scratch: ThreadScratch | None = None,
                  delta: torch.Tensor | None = None,
                  xor: tuple[torch.Tensor, bool] | None = None,
                  rows: tuple[Callable[[int, int], torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                  ) -> tuple[TensorEntry, dict[str, torch.Tensor], str]:
    """Encode one tensor: its manifest entry (digests not yet known), its stored tensors by stored name, the codec.

    With ``scratch``, the delta is computed in the thread's buffer, and stored tensors that would be views of
    one of its buffers (``raw`` may store the fine-tune's bytes as they are) are copied out. ``delta``, ``xor`` or
    ``rows`` (the delta's row reader and its row sums) given (a tensor that differs from its base, see
    :func:`_read_delta`, :func:`_read_xor`, :func:`_row_pass`): ``ft_t`` and ``base_t`` only carry shapes and
    dtypes."""
    given = delta is not None or xor is not None or rows is not None
    c, p, auto = _select_codec(job, name, info, ft_t, base_t, unchanged=False if given else None)
    inp = EncodeInput(name=name, finetuned=ft_t, base=base_t, calibration=_layer_input(job.calib, name, info.shape),
                      _delta=delta, _xor=xor, _delta_rows=None if rows is None else rows[0],
                      _delta_buffer=None if scratch is None else (lambda n: scratch.get("delta", n)))
    if rows is not None:
        inp._memo["rowsparse.row_sums"] = rows[1]
    c, enc, auto_stats = _run_codec(job, inp, c, p, auto)
    if scratch is not None:
        enc.tensors = {r: t.clone() if scratch.owns(t) else t for r, t in enc.tensors.items()}
    stored = {role: f"{name}.{role}" for role in enc.tensors}
    entry = TensorEntry(codec=c.name, shape=list(info.shape), dtype=dtype_name(info.dtype), params=enc.params,
                        stored=stored, stored_bytes=enc.nbytes, base_sha256=digest)
    if job.compute_stats and c.needs_base and c.name != "unchanged":
        entry.stats = {k: v for k, v in (enc.stats or _stats(c, enc, inp, tuple(info.shape))).items() if k in _REPORTED}
    entry.stats.update(auto_stats)
    return entry, {stored[r]: t for r, t in enc.tensors.items()}, c.name


def alias_entry(name: str, info: Any, target: str, digest: str | None) -> TensorEntry:
    """The manifest entry of a tensor byte-identical to the earlier entry ``target`` (format 1.3): no stored
    tensors, ``params`` ``{"target": target}``, its own base digest (equal to the target's)."""
    return TensorEntry(codec=ALIAS_CODEC, shape=list(info.shape), dtype=dtype_name(info.dtype), params={"target": target},
                       stored={}, stored_bytes=0, base_sha256=digest)


#: Codec stats written into the manifest entry.
_REPORTED = ("delta_l2", "error_l2")


def _stats(codec: Any, enc: Any, inp: EncodeInput, shape: tuple[int, ...]) -> dict[str, float]:
    """Delta norm and reconstruction error norm of a lossy delta codec (for the reports)."""
    approx = codec.decode_delta(enc.tensors, enc.params, shape)
    delta = inp.delta
    d2 = float(delta.pow(2).sum(dtype=torch.float64))
    e2 = float((approx - delta).pow(2).sum(dtype=torch.float64))
    return {"delta_l2": math.sqrt(d2), "error_l2": math.sqrt(e2)}


def _resized_vocab(job: _Job, c: Any, p: dict[str, Any], base_t: torch.Tensor, ft_t: torch.Tensor) -> tuple[Any, dict[str, Any]] | None:
    """``rowsparse`` for a resized vocabulary matrix (2-D float, more rows than the base, same columns) to which
    the policy gives a lossy delta codec by name (``raw`` and ``auto`` keep it exact, as before): the base rows
    are delta-coded, the added rows stored exactly. The policy's params when it chose ``rowsparse``, else
    rowsparse's defaults (1 bit per weight, every row); None otherwise."""
    if not _grown(base_t, ft_t) or c is None or not c.needs_base or c.name == "unchanged":
        return None
    return (c, p) if c.name == "rowsparse" else job.codecs.get("rowsparse", {})


def _grown(base_t: torch.Tensor, ft_t: torch.Tensor) -> bool:
    """A resized vocabulary matrix: 2-D floats, more rows than the base, the same columns."""
    return (ft_t.dim() == 2 and base_t.dim() == 2 and ft_t.shape[1] == base_t.shape[1] and ft_t.shape[0] > base_t.shape[0]
            and ft_t.dtype in _FLOATS and base_t.dtype in _FLOATS)


def _has_delta(base_shape: Any, base_dtype: torch.dtype, shape: Any, dtype: torch.dtype) -> bool:
    """True when a base tensor can give a delta: same shape, both floating point."""
    return tuple(base_shape) == tuple(shape) and dtype in _FLOATS and base_dtype in _FLOATS


# ---------------------------------------------------------------------------------------- allocation


def _allocate(job: _Job, ft_ckpt: Checkpoint, base_ckpt: Checkpoint, aux: list[_AuxFile], base_digests: dict[str, str],
              progress: bool | None) -> dict[str, Point]:
    """Pass 1 of an ``auto`` compress: measure every auto tensor's candidates, size the other tensors,
    and allocate the directory budget (:mod:`deltahub.allocation`). ``base_digests`` gets the base digests read."""
    curves: list[Curve] = []
    fixed = 0
    uses: Counter[str] = Counter()  # tensor name -> names it is coded for beyond its own (tied: format 1.3 aliases)
    workers = max(1, min(MEASURE_THREADS, os.cpu_count() or 1))
    # Workers read each tensor into reused buffers (no fresh pages per tensor), key it for the tie check and
    # measure it; this thread only takes their results in storage order (ties are decided in that order).
    buffers, held = job.buffers, {}
    load = _loader(ft_ckpt, base_ckpt, base_digests, job.base_cache, pool=buffers, held=held)
    ties = job.ties

    def measure(name: str) -> tuple[str | None, tuple[Any, ...] | None, Curve | int]:
        """(base digest, tie key, curve or, for a tensor the policy codes by a rule or keeps exact, its bytes)."""
        try:
            info = ft_ckpt.info(name)
            shape = tuple(info.shape)
            sampled = _measure_sampled(job, ft_ckpt, base_ckpt, name, base_digests)
            if sampled is not None:
                return sampled
            ft_t, base_t, digest = load(name)
            key = ties.key(ft_t, base_t, digest, _key_sample(ft_t, shape)) if ties is not None else None
            c, p, auto = _select_codec(job, name, info, ft_t, base_t)
            inp = EncodeInput(name=name, finetuned=ft_t, base=base_t, calibration=_layer_input(job.calib, name, info.shape))
            if auto:
                return digest, key, _curve(job, inp, shape, info.dtype)
            enc = c.encode(inp, p)
            return digest, key, enc.nbytes + _entry_overhead(name, c.name, enc, shape, info.dtype, "")
        finally:
            for b in held.pop(name, ()):
                buffers.release(b)

    with progress_bar("measure", sum(ft_ckpt.info(n).nbytes for n in ft_ckpt.keys()), enabled=progress) as advance:
        # results are a few numbers: workers may run well ahead of this loop
        for name, (digest, key, result) in pipelined(ft_ckpt.keys(), measure, workers=workers, ahead=4 * workers):
            info = ft_ckpt.info(name)
            if digest is not None:
                base_digests[name] = digest
            target = ties.decide(name, key) if ties is not None else None
            if target is not None:  # coded once, as its target: only the alias entry's manifest bytes
                uses[target] += 1
                fixed += _alias_overhead(name, info, target, digest)
            elif isinstance(result, Curve):
                curves.append(result)
            else:
                fixed += result
            advance(info.nbytes)
    curves = [_tied_curve(c, 1 + uses[c.name]) for c in curves]
    fp16 = 2 * sum(math.prod(ft_ckpt.info(n).shape) for n in ft_ckpt.keys())
    directory = min(fp16 / job.target_ratio if job.target_ratio else math.inf,
                    job.max_bytes if job.max_bytes is not None else math.inf)
    overhead = sum(f.path.stat().st_size for f in aux if not f.from_base) + _manifest_overhead(ft_ckpt, aux)
    budget = directory - overhead - fixed
    coded_fp16 = 2 * sum(c.numel for c in curves)
    smallest = sum(min((p.nbytes for p in c.points), default=0) for c in curves)
    if job.default_budget and budget - ALLOCATION_MARGIN * max(budget, 0) < smallest:
        # A small model whose manifest and exact tensors alone take most of the default budget: code its
        # coded tensors at the default ratio instead of failing (the user asked for no particular size).
        logger.warning("the whole delta cannot be %gx smaller than the fp16 fine-tune (%d bytes of manifest, aux files and "
                       "exact tensors); coding the allocated tensors %gx smaller instead", job.target_ratio,
                       overhead + fixed, job.target_ratio)
        budget = (smallest + coded_fp16 / job.target_ratio) / (1 - ALLOCATION_MARGIN)  # the margin comes off below
    if budget < 0:
        raise CodecError(f"the budget of {int(directory)} bytes for the whole delta is smaller than what is not allocated: "
                         f"{overhead} bytes of manifest and aux files, {fixed} of tensors coded by rules or exact "
                         f"(norms, new tensors); give a larger budget (a lower --target-ratio)")
    # Sampled measurements estimate bytes within a fraction of a percent: keep a margin so the cap holds.
    choice = allocate(curves, budget - ALLOCATION_MARGIN * max(budget, 0))
    used, _ = allocation_total(choice)
    logger.info("allocation: %d of %d bytes for %d coded tensors (directory budget %d, fixed %d, overhead %d): %s", used,
                int(budget), len(choice), int(directory), fixed, overhead,
                ", ".join(f"{k} x {v}" for k, v in sorted(Counter(p.label for p in choice.values()).items())))
    return choice


def _tied_curve(curve: Curve, uses: int) -> Curve:
    """The curve of a tensor coded once for ``uses`` names (tied weights, format 1.3 aliases): its bytes once,
    its distortion ``uses`` times. The one rebuilt tensor serves every name (a tied embedding is also the LM
    head): its error reaches the model through each use, as it would have from ``uses`` separately coded
    copies, while its bytes are paid once; so a byte spent on it buys ``uses`` times the usual reduction,
    and the allocation gives it a finer setting than either name alone would get."""
    if uses == 1:
        return curve
    return Curve(curve.name, curve.numel, [dataclasses.replace(p, distortion=p.distortion * uses) for p in curve.points])


def _alias_overhead(name: str, info: Any, target: str, digest: str | None) -> int:
    """Bytes an alias entry adds to the manifest (as written, indented)."""
    return _manifest_json_size({name: alias_entry(name, info, target, digest or "0" * 64).to_dict()})


#: Input bytes of the tensors in flight in compress's final pass (bounds the encoded results held for the writer).
ENCODE_AHEAD_BYTES = 512 * 2**20
#: The measure pass reads only a tall tensor's sampled rows when they are at most 1 / this of its rows.
SAMPLED_READ_MAX = 3
#: Largest buffer a compress worker keeps for reuse (per buffer: fine-tune, base, delta tensor).
SCRATCH_BYTES = 256 * 2**20
#: Largest row sample (per buffer) the measure pass keeps for reuse; a larger one (a large vocabulary's rows) is
#: allocated for its tensor alone, so idle buffers never add to the peak.
PICK_SCRATCH_BYTES = 16 * 2**20
#: Candidates are measured on evenly spaced rows of a matrix (the chosen one is then encoded on the whole tensor;
#: distortion and bytes scale with the row count): at least this many elements, at least MEASURE_MIN_ROWS rows,
#: and at least 1 / MEASURE_FRACTION of a large tensor's rows (its sample then costs little next to encoding
#: it). Measured on the real pair (20x): 32768 elements gave KL 0.00297 against 0.00305 with 65536 (noise:
#: 0.00309 with 16384), in 0.2 s less.
MEASURE_NUMEL = 1 << 15
MEASURE_MIN_ROWS = 16
MEASURE_FRACTION = 64
#: Tensors measured at once (threads) in the allocation pass.
MEASURE_THREADS = 2
#: Share of the allocated bytes kept free against the sampled byte estimates.
ALLOCATION_MARGIN = 0.02


def _curve(job: _Job, inp: EncodeInput, shape: tuple[int, ...], dtype: torch.dtype) -> Curve:
    """Stored bytes (with their manifest and header overhead) and distortion of each candidate for one tensor,
    measured on a row sample of large matrices and scaled to the whole tensor."""
    if inp.base is not None and tuple(inp.base.shape) != tuple(inp.finetuned.shape):
        return _resized_curve(job, inp, shape, dtype)
    union = _read_rows_plan(shape)
    d2 = inp.delta_sumsq() if union is None else _estimated_sumsq(_pick_rows(inp, shape, union, job.picks, "union"), shape)
    return _measure_curve(job, inp.name, shape, dtype, d2, lambda idx, slot: _pick_rows(inp, shape, idx, job.picks, slot),
                          lambda: inp)


def _estimated_sumsq(rows: EncodeInput, shape: tuple[int, ...]) -> float:
    """``||D||^2`` of a tall tensor as the row-sampled measurement estimates it, from the rows it reads (used
    whether those rows or the whole tensor were read: the same delta with or without cached base digests)."""
    return rows.delta_sumsq() * matrix_view_shape(shape)[0] / rows.finetuned.shape[0]


@functools.lru_cache(maxsize=256)  # per shape (a model has a handful); the index tensor is only read
def _read_rows_plan(shape: tuple[int, ...]) -> torch.Tensor | None:
    """The rows a tall tensor's measurement reads (its sample and gate rows), or None when it reads most of them
    anyway (then the whole tensor is read)."""
    idx = _sample_rows(shape)
    if len(shape) < 2 or idx is None:
        return None
    gate = _gate_rows(shape)
    union = torch.unique(idx if gate is None else torch.cat([idx, gate]))
    return None if len(union) * SAMPLED_READ_MAX > matrix_view_shape(shape)[0] else union


def _pick_rows(inp: EncodeInput, shape: tuple[int, ...], idx: torch.Tensor, scratch: ThreadScratch | None = None,
               slot: str = "") -> EncodeInput:
    """The rows ``idx`` of a full input's ``[rows, cols]`` view, as an input of its own (:func:`_rows_input`)."""
    rows, cols = matrix_view_shape(shape)
    assert inp.base is not None
    return _rows_input(inp.name, inp.finetuned.reshape(rows, cols), inp.base.reshape(rows, cols), idx, inp.calibration,
                       scratch, slot)


def _rows_input(name: str, ft: torch.Tensor, base: torch.Tensor, idx: torch.Tensor, calibration: torch.Tensor | None,
                scratch: ThreadScratch | None, slot: str) -> EncodeInput:
    """Rows ``idx`` of the 2-D ``ft`` and ``base`` as an input; with ``scratch``, in (and its delta computed into) this
    thread's buffers named after ``slot``: valid until the thread picks that slot again."""
    return EncodeInput(name=name, finetuned=_select_rows(ft, idx, scratch, slot + ".ft"),
                       base=_select_rows(base, idx, scratch, slot + ".base"), calibration=calibration,
                       _delta_buffer=None if scratch is None else (lambda n: scratch.get(slot + ".delta", n)))


def _select_rows(t: torch.Tensor, idx: torch.Tensor, scratch: ThreadScratch | None, slot: str) -> torch.Tensor:
    """``t.index_select(0, idx)``, into the scratch buffer ``slot`` when there is one (and it fits its cap)."""
    nbytes = len(idx) * t.shape[1] * t.element_size()
    buf = scratch.get(slot, nbytes) if scratch is not None and nbytes else None
    if buf is None:
        return t.index_select(0, idx)
    return torch.index_select(t, 0, idx, out=buf[:nbytes].view(t.dtype).view(len(idx), t.shape[1]))



@functools.lru_cache(maxsize=256)  # per shape (a model has a handful); the index tensor is only read
def _sample_rows(shape: tuple[int, ...]) -> torch.Tensor | None:
    """The evenly spaced rows candidates are measured on (None: the whole tensor)."""
    rows, cols = matrix_view_shape(shape)
    keep = max(1, MEASURE_NUMEL // max(cols, 1), MEASURE_MIN_ROWS, rows // MEASURE_FRACTION)
    if len(shape) < 2 or rows <= 2 * keep:
        return None
    return torch.linspace(0, rows - 1, keep).round().long().unique()


@functools.lru_cache(maxsize=256)  # per shape (a model has a handful); the index tensor is only read
def _gate_rows(shape: tuple[int, ...]) -> torch.Tensor | None:
    """The evenly spaced rows the low-rank gate sketches (None: all of them)."""
    rows, _ = matrix_view_shape(shape)
    return torch.linspace(0, rows - 1, LOWRANK_GATE_ROWS).round().long().unique() if rows > LOWRANK_GATE_ROWS else None


def _key_sample(ft_t: torch.Tensor, shape: tuple[int, ...]) -> bytes:
    """What the measure pass hashes for a tensor's tie key: the bytes of its sample rows (the same rows for every
    tensor of a shape, whether the tensor was read whole or only those rows)."""
    idx = _sample_rows(shape)
    rows, cols = matrix_view_shape(shape)
    t = ft_t if idx is None else ft_t.reshape(rows, cols).index_select(0, idx)
    return tensor_bytes(t).numpy().tobytes()


def _measure_sampled(job: _Job, ft_ckpt: Checkpoint, base_ckpt: Checkpoint, name: str,
                     base_digests: dict[str, str]) -> tuple[str, tuple[Any, ...] | None, Curve] | None:
    """Measure an ``auto`` tensor from the rows its measurement looks at, reading only those (a tall matrix whose
    base digest is known: it needs no hashing). None when the tensor must be read whole: not auto, no same-shape
    float base, small, digest unknown, its sampled rows equal to the base's (possibly unchanged), or a low-rank
    candidate passes the gate (those are measured on the whole matrix, read then)."""
    info = ft_ckpt.info(name)
    shape = tuple(info.shape)
    if len(shape) < 2 or job.policy.choose(name, len(shape))[0] != AUTO or name not in base_ckpt:
        return None
    binfo = base_ckpt.info(name)
    digest = base_digests.get(name) or (job.base_cache.get(name) if job.base_cache is not None else None)
    union = _read_rows_plan(shape)
    if digest is None or union is None or not _has_delta(binfo.shape, binfo.dtype, shape, info.dtype):
        return None
    idx = _sample_rows(shape)
    assert idx is not None
    rows, cols = matrix_view_shape(shape)
    at = torch.full((rows,), -1, dtype=torch.long)
    at[union] = torch.arange(len(union))
    ft_rows, base_rows = ft_ckpt.read_rows(name, union.tolist()), base_ckpt.read_rows(name, union.tolist())
    if same_bits(ft_rows, base_rows):
        return None  # maybe unchanged: read it whole
    calib = _layer_input(job.calib, name, shape)

    def pick(sel: torch.Tensor, slot: str) -> EncodeInput:
        return _rows_input(name, ft_rows, base_rows, at[sel], calib, job.picks, slot)

    whole: list[EncodeInput] = []

    def full() -> EncodeInput:  # a low-rank candidate passed the gate: the whole tensor, read once
        if not whole:
            whole.append(EncodeInput(name=name, finetuned=ft_ckpt.read(name), base=base_ckpt.read(name), calibration=calib))
        return whole[0]

    d2 = _estimated_sumsq(EncodeInput(name=name, finetuned=ft_rows, base=base_rows), shape)
    key = job.ties.key_of(info.dtype, shape, (binfo.dtype, tuple(binfo.shape)), digest,
                          tensor_bytes(ft_rows.index_select(0, at[idx])).numpy().tobytes()) if job.ties is not None else None
    return digest, key, _measure_curve(job, name, shape, info.dtype, d2, pick, full)


def _measure_curve(job: _Job, name: str, full_shape: tuple[int, ...], dtype: torch.dtype, d2_full: float,
                   rows_of: Callable[[torch.Tensor, str], EncodeInput], full: Callable[[], EncodeInput]) -> Curve:
    """The curve of one tensor from ``rows_of(row indices, scratch slot)`` (an input of those rows) and ``full()`` (the whole
    tensor, for the candidates measured on whole matrices and for small tensors); ``d2_full`` is ``||D||^2``."""
    cands = [(cname, cparams, *job.codecs.get(cname, cparams)) for cname, cparams in job.candidates_for(name, full_shape)]
    rest = [x for x in cands if not x[2].whole_matrix]
    cands = rest + _whole_matrix_candidates(full_shape, rows_of, full, [x for x in cands if x[2].whole_matrix], gate=bool(rest))
    idx = _sample_rows(full_shape)
    if idx is None:
        sample_inp, sample_shape, sample_scale = full(), full_shape, 1.0
    else:
        sample_inp, sample_shape = rows_of(idx, "sample"), (len(idx), matrix_view_shape(full_shape)[1])
        sample_scale = matrix_view_shape(full_shape)[0] / len(idx)
    curve = Curve(name, math.prod(full_shape))
    metric_name = _metric_for(job, name)
    ladders = _ladders(sample_inp, cands)
    for i, (cname, cparams, c, p) in enumerate(cands):
        # A low-rank error is a property of the whole matrix: those candidates are measured on all of it.
        inp, shape, scale = (full(), full_shape, 1.0) if c.whole_matrix else (sample_inp, sample_shape, sample_scale)
        label = job.codecs.label(cname, cparams)
        try:
            enc = ladders[i] if i in ladders else c.encode(inp, p)
            if isinstance(enc, CodecError):
                raise enc
            x = inp.calibration if CALIBRATED_ERRORS else None
            if not c.needs_base:  # an exact codec (raw): no error
                metric, err, e2 = "exact", 0.0, 0.0
            elif x is None and {"delta_l2", "error_l2", "error_dot"} <= enc.stats.keys():  # known without decoding
                e2 = enc.stats["error_l2"] ** 2
                metric, err = error_from_sums(enc.stats["delta_l2"] ** 2, e2, enc.stats["error_dot"], metric_name)
            else:
                approx = c.decode_delta(enc.tensors, enc.params, shape)
                metric, err = relative_error(inp.delta, approx, x, metric_name)
                e2 = float((approx - inp.delta).pow(2).sum(dtype=torch.float64))
                del approx
        except CodecError as exc:
            logger.debug("allocation: %s cannot use %s: %s", name, label, exc)
            continue
        fixed = sum(t.numel() * t.element_size() for r, t in enc.tensors.items() if r in c.fixed_size_roles)
        nbytes = fixed + math.ceil((enc.nbytes - fixed) * scale) + _entry_overhead(name, c.name, enc, full_shape, dtype, label)
        distortion = err * err * d2_full if d2_full > 0 and math.isfinite(err) else e2 * scale  # a zero delta: its own error
        curve.points.append(Point(cname, c.measured_params(p, enc), nbytes, distortion, err, label, metric,
                                  math.sqrt(d2_full), math.sqrt(e2 * scale) if scale == 1.0 else None))
    return curve


def _ladders(inp: EncodeInput, cands: list[tuple[str, dict[str, Any], Any, dict[str, Any]]]) -> dict[int, Any]:
    """The sample encodings of every codec with several candidates (DeltaDQ's ladder), each codec's settings in one
    :meth:`~deltahub.codecs.base.Codec.encode_many` call: candidate index -> its result or error."""
    by_codec: dict[str, list[int]] = {}
    for i, (_, _, c, _) in enumerate(cands):
        if not c.whole_matrix:
            by_codec.setdefault(c.name, []).append(i)
    out: dict[int, Any] = {}
    for idx in by_codec.values():
        if len(idx) > 1:
            out.update(zip(idx, cands[idx[0]][2].encode_many(inp, [cands[i][3] for i in idx])))
    return out


#: Low-rank candidates are measured only on matrices whose top ``LOWRANK_GATE_RANK`` singular directions hold
#: at least this share of the delta's energy (a two-product sketch estimates it, from below): below it
#: their error along the delta (the discarded energy, which auto's score counts fully) cannot beat DeltaDQ's
#: noise at the same bytes, and measuring them (an SVD, whole-matrix decodes) would slow every compress.
#: On the real pair the block matrices' sketched top-16 shares are 0.08-0.73 (median 0.24): only layer 0's
#: k_proj passes (and is picked at 20x, lowrank-mp r8); a LoRA-like delta has ~1.
LOWRANK_GATE_ENERGY = 0.7
LOWRANK_GATE_RANK = 16
#: The gate's sketch looks at this many evenly spaced rows of a taller matrix (its cost then no longer grows
#: with the rows; the sampled rows' top-16 share estimates the whole matrix's, a little above it for a flat
#: spectrum: 16 directions fit 16 / 512 of sampled noise).
LOWRANK_GATE_ROWS = 512


def _whole_matrix_candidates(shape: tuple[int, ...], rows_of: Callable[[torch.Tensor, str], EncodeInput],
                             full: Callable[[], EncodeInput], cands: list[tuple[str, dict[str, Any], Any, dict[str, Any]]], *,
                             gate: bool) -> list[tuple[str, dict[str, Any], Any, dict[str, Any]]]:
    """The low-rank candidates worth measuring (with ``gate``, none when the spectrum is flat: sketched on
    :data:`LOWRANK_GATE_ROWS` evenly spaced rows of a taller matrix, the same energy share in expectation), with
    the delta's SVD computed once, at their largest rank, and cached on the whole input for all of them."""
    if not cands or len(shape) < 2:
        return []
    rows, cols = matrix_view_shape(shape)
    if gate:
        idx = _gate_rows(shape)
        sample = full() if idx is None else rows_of(idx, "gate")
        energy = sketch_energy(sample.delta.reshape(-1, cols), LOWRANK_GATE_RANK)
    else:
        energy = 1.0
    if energy < LOWRANK_GATE_ENERGY:
        logger.debug("allocation: skips low-rank candidates (top-%d energy ~%.2f)", LOWRANK_GATE_RANK, energy)
        return []
    inp = full()
    if inp.base is None:
        return []
    rank = min(max(c.svd_rank(p) for _, _, c, p in cands), rows, cols)
    if rank:  # randomised unless the rank is a large share of the matrix (truncated_svd's own rule)
        delta_svd(inp, rank, exact=None if 4 * (rank + SVD_OVERSAMPLE) >= min(rows, cols) else False)
    return cands


def _metric_for(job: _Job, name: str) -> str:
    """The auto metric of one tensor: vocabulary matrices (a tied one is also the LM head, whose noise
    lands on the logits directly) count orthogonal noise fully (``rel``) when ``VOCAB_METRIC`` says so."""
    return VOCAB_METRIC if VOCAB_METRIC and job.auto_metric == "aligned" and is_vocabulary_matrix(name) else job.auto_metric


#: Score candidates on the layer outputs when calibration inputs are given. Off: the inputs steer the
#: codecs (DeltaDQ's group size) and errors stay in weight space. Measured on the real pair at 20x: KL
#: 0.00375 scored on outputs, 0.00305 in weight space, 0.00297 without calibration. Output-space errors of
#: the block matrices are not commensurate with the weight-space errors of tensors without inputs (the
#: embedding), so one sum over both moved bytes from the embedding to the blocks.
CALIBRATED_ERRORS = False
#: Metric for vocabulary matrices under ``aligned``. Measured on the real pair at 20x: KL 0.0030 with
#: ``rel`` here against 0.0055 with ``aligned`` everywhere (which gave the embedding 8x DeltaDQ and its
#: dropout noise, instead of 1-bit rows): noise on a tied embedding is noise on every logit.
VOCAB_METRIC: str | None = "rel"


def _resized_curve(job: _Job, inp: EncodeInput, shape: tuple[int, ...], dtype: torch.dtype) -> Curve:
    """A resized vocabulary matrix: row-sparse settings (base rows coded, added rows exact) and ``raw``;
    distortion is the squared error of the base rows' delta (the codec's own exact ``error_l2``)."""
    from .codecs.rowsparse import PRESETS as ROW_PRESETS

    curve = Curve(inp.name, math.prod(shape))
    cands = [("rowsparse", {"preset": n}) for n in ROW_PRESETS] + [("rowsparse", {"density": 1.0, "bits": 8}), ("raw", {})]
    for cname, cparams in cands:
        c, p = job.codecs.get(cname, cparams)
        label = candidate_label(cname, cparams)
        enc = c.encode(inp, p)
        e2, d2 = (enc.stats["error_l2"] ** 2, enc.stats["delta_l2"] ** 2) if c.needs_base else (0.0, 0.0)
        nbytes = enc.nbytes + _entry_overhead(inp.name, c.name, enc, shape, dtype, label)
        err = math.sqrt(e2 / d2) if d2 > 0 else 0.0
        curve.points.append(Point(cname, p, nbytes, e2, err, label, "rel_l2" if c.needs_base else "exact",
                                  math.sqrt(d2) if c.needs_base else None, math.sqrt(e2) if c.needs_base else None))
    return curve


_PLACEHOLDER_DIGEST = "sha256:" + "0" * 64
_PLACEHOLDER_FLOAT = 0.12345678901234567


def _entry_overhead(name: str, codec: str, enc: Any, shape: tuple[int, ...], dtype: torch.dtype, label: str) -> int:
    """Bytes one tensor adds beyond its payloads: its manifest entry (as written, indented) and safetensors header
    entries. The entry without its params and byte count is sized once per name length, shape, codec and stored
    roles (every candidate of a tensor differs only there, and so do the same matrices of other layers); the
    params' indented size and the count's digits are added."""
    # a plain name (json writes it as it is) counts by its length alone: the layers of a model share their templates
    fixed = _entry_template_size("n" * len(name) if _plain(name) else name, codec, tuple(shape), dtype, label,
                                 tuple((r, t.dim()) for r, t in enc.tensors.items()))
    params = enc.params
    digits = len(str(enc.nbytes))
    if not params:
        return fixed + digits - 1
    size = _flat_json_size(params)
    if size is not None:  # one line per item at depth 3 (10 spaces with the manifest's nesting) and the closing brace
        n = len(params)
        return fixed + size - 2 + n * 11 + 9 + digits - 1
    extra, lines = _indentation(params, 2)  # the params object sits two levels down: {name: {"params": {...}}}
    return fixed + len(json.dumps(params, separators=(",", ": "))) - 2 + extra + 4 * lines + digits - 1


def _flat_json_size(obj: dict[str, Any]) -> int | None:
    """``len(json.dumps(obj, separators=(",", ": ")))`` of a dict of plain keys and scalar values, without json's
    encoder (sized per candidate and tensor); None for anything else (nested values, keys or strings needing
    escapes, non-finite floats)."""
    size = 1 + len(obj)  # braces and the separators: n - 1 commas + 2 braces
    for k, v in obj.items():
        if type(k) is not str or not _plain(k):
            return None
        t = type(v)
        if t is bool:
            n = 4 if v else 5
        elif t is int:
            n = len(int.__repr__(v))
        elif t is float:
            if not math.isfinite(v):
                return None
            n = len(float.__repr__(v))
        elif t is str:
            if not _plain(v):
                return None
            n = len(v) + 2
        elif v is None:
            n = 4
        else:
            return None
        size += len(k) + 4 + n  # "key": value
    return size


@functools.lru_cache(maxsize=4096)  # the same param keys, values and names come back for every candidate
def _plain(s: str) -> bool:
    """Whether json writes ``s`` as its characters between quotes (printable ASCII, no quote or backslash)."""
    return s.isascii() and s.isprintable() and '"' not in s and "\\" not in s


@functools.lru_cache(maxsize=8192)
def _entry_template_size(name: str, codec: str, shape: tuple[int, ...], dtype: torch.dtype, label: str,
                         roles: tuple[tuple[str, int], ...]) -> int:
    """:func:`_entry_overhead` of an entry with empty params and a one-digit byte count."""
    stats = {"delta_l2": _PLACEHOLDER_FLOAT, "error_l2": _PLACEHOLDER_FLOAT}
    if label:
        stats.update(auto_choice=label, auto_metric="aligned_output", auto_error=_PLACEHOLDER_FLOAT)
    entry = TensorEntry(codec=codec, shape=list(shape), dtype=dtype_name(dtype), params={},
                        stored={r: f"{name}.{r}" for r, _ in roles}, stored_bytes=0, base_sha256="0" * 64,
                        stats=stats, digests=dict.fromkeys((r for r, _ in roles), _PLACEHOLDER_DIGEST))
    header = sum(len(json.dumps(f"{name}.{r}")) + 64 + 8 * dim for r, dim in roles)
    return _manifest_json_size({name: entry.to_dict()}) + header


def _manifest_json_size(obj: dict[str, Any]) -> int:
    """Characters ``obj`` takes in the manifest: ``json.dumps(obj, indent=2)`` nested two levels deeper (4 more
    spaces per line). Computed from the compact encoding (C-accelerated; ``indent`` forces json's pure-Python
    encoder, which took most of the time of sizing each candidate) plus the line breaks and indentation."""
    extra, lines = _indentation(obj, 0)
    return len(json.dumps(obj, separators=(",", ": "))) + extra + 4 * lines


def _indentation(o: Any, depth: int) -> tuple[int, int]:
    """(characters, line breaks) ``indent=2`` adds to the compact encoding of ``o`` at nesting ``depth``: each
    element of a non-empty container on its own line, indented, and the closing bracket on its own line."""
    items = o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else ()
    n = len(items)
    if not n:
        return 0, 0
    extra, lines = n * (1 + 2 * (depth + 1)) + 1 + 2 * depth, n + 1
    for v in items:
        if isinstance(v, (dict, list, tuple)) and v:  # scalars and empty containers add nothing
            e, k = _indentation(v, depth + 1)
            extra += e
            lines += k
    return extra, lines


def _manifest_overhead(ft_ckpt: Checkpoint, aux: list[_AuxFile]) -> int:
    """Bytes of the manifest outside the tensor entries (config, base, totals, files, digests), generously."""
    config = json.dumps(ft_ckpt.config(), indent=2)
    return 2 * len(config) + 200 * len(aux) + 8192


# ---------------------------------------------------------------------------------------- manifest


def _base_info(base_ckpt: Checkpoint, base_digests: dict[str, str], name_or_path: str, revision: str | None,
               cache: CheckpointDigests | None = None) -> BaseInfo:
    """The base's fingerprint; base tensors the fine-tune dropped are read here (they still belong to it)."""
    extra: dict[str, dict[str, Any]] = {}
    for name in base_ckpt.keys():
        if name not in base_digests:
            binfo = base_ckpt.info(name)
            base_digests[name] = base_digest(base_ckpt, name, cache)
            extra[name] = {"dtype": dtype_name(binfo.dtype), "shape": list(binfo.shape), "sha256": base_digests[name]}
    fp = fingerprint({n: (base_ckpt.info(n).dtype, base_ckpt.info(n).shape, base_digests[n]) for n in base_ckpt.keys()})
    return BaseInfo(name_or_path=name_or_path, fingerprint=fp, revision=revision, extra_tensors=extra)


def _build_manifest(tmp: Path, entries: dict[str, TensorEntry], files: list[str], ft_ckpt: Checkpoint, base_ckpt: Checkpoint,
                    base_digests: dict[str, str], base_files: dict[str, str], cache: CheckpointDigests | None, *,
                    base: dict[str, Any], finetuned: dict[str, Any], known_digests: dict[str, str] | None = None) -> Manifest:
    """The manifest of the delta written in ``tmp`` (its non-weights files digested; ``known_digests``: aux files
    already hashed when they were planned, copied byte for byte)."""
    known = known_digests or {}
    return Manifest(
        base=_base_info(base_ckpt, base_digests, base["name_or_path"], base["revision"], cache),
        tensors=entries,
        config=ft_ckpt.config(),
        finetuned=finetuned,
        totals=totals(entries, ft_ckpt),
        files=sorted(files),
        file_digests={n: known.get(n) or file_digest(tmp / n) for n in sorted(files) if not is_weights_file(n)},
        base_files=base_files,
        created_with=f"deltahub {__version__}",
    )


@dataclasses.dataclass(frozen=True)
class _AuxFile:
    """One tokenizer/aux file of the fine-tune: stored in the delta, or (``from_base``) taken from the base."""

    name: str
    path: Path
    digest: str
    from_base: bool


def _plan_aux_files(src: Path, base_dir: Path | None) -> list[_AuxFile]:
    """The fine-tune's tokenizer and generation-config files, each marked stored or taken from the base.

    A file byte-identical to the same-named file of ``base_dir`` is taken from the base (the
    manifest's ``base_files`` records its digest). A file that is a symlink out of the fine-tune's
    folder (or its Hub cache repo) is left out with a warning, never followed: a delta is pushed
    to the Hub, and a stranger's checkpoint could link ``tokenizer.json`` to a secret.
    """
    import warnings

    from .format.names import member

    out: list[_AuxFile] = []
    for pattern in AUX_FILE_PATTERNS:
        for p in sorted(src.glob(pattern)):
            try:
                path = member(src, p.name, what="fine-tune file", missing_ok=True)
            except UnsafePathError as exc:
                warnings.warn(f"{exc}; left out of the delta", UserWarning, stacklevel=3)
                continue
            if path is not None:
                digest = file_digest(path)
                out.append(_AuxFile(p.name, path, digest, base_dir is not None and _same_base_file(base_dir, p.name, path, digest)))
    return out


def _copy_aux_files(aux: list[_AuxFile], dst: Path) -> tuple[list[str], dict[str, str]]:
    """Copy the stored aux files into ``dst``; returns ``(copied names, base_files)``."""
    copied: list[str] = []
    for f in aux:
        if not f.from_base:
            shutil.copyfile(f.path, dst / f.name)
            copied.append(f.name)
    return copied, {f.name: f.digest for f in aux if f.from_base}


def _same_base_file(base_dir: Path, name: str, path: Path, digest: str) -> bool:
    """True when the base folder has a regular file ``name`` with the same bytes as ``path``."""
    from .format.names import member

    try:
        other = member(base_dir, name, what="base file", missing_ok=True)
    except DeltaHubError:
        return False
    return other is not None and other.stat().st_size == path.stat().st_size and file_digest(other) == digest


def totals(entries: dict[str, TensorEntry], ft_ckpt: Checkpoint | None = None) -> dict[str, Any]:
    """Manifest totals: parameters, stored bytes, fine-tune bytes, and the same per codec."""
    by_codec: dict[str, dict[str, float]] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "stored_bytes": 0})
    params = stored = ft_bytes = 0
    for e in entries.values():
        n = math.prod(e.shape)
        size = n * getattr(torch, e.dtype).itemsize
        params += n
        stored += e.stored_bytes
        ft_bytes += size
        c = by_codec[e.codec]
        c["tensors"] += 1
        c["parameters"] += n
        c["stored_bytes"] += e.stored_bytes
    return {
        "parameters": params,
        "stored_bytes": stored,
        "finetuned_bytes": ft_bytes,
        "finetuned_fp16_bytes": 2 * params,
        "by_codec": dict(sorted(by_codec.items())),
    }
