"""``compress``: (base, fine-tune) checkpoints -> a delta directory, streaming tensor by tensor.

Memory holds one fine-tuned tensor, its base tensor, their codec output and at most one
output shard of stored tensors; the base fingerprint is computed from the same reads.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import __version__
from ._progress import progress_bar
from .autoselect import check_metric, choose, default_candidates
from .codecs import EncodeInput, get_codec, matrix_view_shape
from .codecs.unchanged import same_bits
from .errors import CodecError, DeltaHubError, InvalidCodecParamsError, ShapeMismatchError, UnsafePathError
from .format.delta_files import DeltaShardWriter
from .format.integrity import file_digest, is_weights_file, manifest_bytes
from .format.io import Checkpoint, atomic_directory, atomic_file, check_output, fingerprint, prefetch, read_with_digest
from .format.manifest import BaseInfo, Manifest, TensorEntry
from .format.spec import AUX_FILE_PATTERNS, DEFAULT_MAX_SHARD_BYTES, MANIFEST_NAME, dtype_name
from .policy import AUTO, Policy, check_preset
from .utils.logging import get_logger

logger = get_logger(__name__)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compress(
    base: str | Path,
    finetuned: str | Path,
    output_dir: str | Path,
    *,
    codec: str = "bitdelta",
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
    so a pull fetches exactly that base. ``codec``/``params`` is the main codec applied by the
    default policy (transformer-block matrices); pass a :class:`~deltahub.policy.Policy` for
    per-pattern rules (``params`` given with a policy is merged into the policy's main params; a key
    both give with different values raises :class:`InvalidCodecParamsError`). The output is written
    to a temporary directory and renamed when complete.

    ``preset`` names a preset of the main codec (e.g. DeltaDQ's ``"16x"``). A codec of ``"auto"``
    (main, or a rule's) picks per tensor, among ``candidates`` (default
    :func:`~deltahub.autoselect.default_candidates`), the setting of lowest error within the
    budget: ``target_ratio`` R caps each auto-coded tensor at ``numel * 2 / R`` bytes (R times
    smaller than its fp16 delta); ``max_bytes`` caps the auto-coded tensors' total: each one may
    use its numel-proportional share of what earlier ones left, so the total never exceeds it.
    ``calibration`` (a dict or a ``.safetensors`` file from :mod:`deltahub.calibration`, or any
    other file read as UTF-8 text and run through the base) gives each tensor its layer's inputs;
    auto then measures errors on the layer outputs instead of the delta itself. ``auto_metric``:
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
        job.start(ft_ckpt, base_ckpt, calib)
        total_bytes = sum(ft_ckpt.info(n).nbytes for n in ft_ckpt.keys())
        with atomic_directory(output_dir, overwrite=overwrite, inputs=inputs, protect=protect) as tmp, \
                progress_bar("compress", total_bytes, enabled=progress) as advance:
            writer = DeltaShardWriter(tmp, max_shard_size)
            entries, base_digests = _encode_all(job, ft_ckpt, base_ckpt, writer, advance)
            copied, base_files = _copy_aux_files(ft_ckpt.dir, tmp, None if keep_aux_files else base_ckpt.dir)
            files = writer.finish() + copied
            manifest = _build_manifest(
                tmp, entries, files, ft_ckpt, base_ckpt, base_digests, base_files,
                base={"name_or_path": base_name_or_path or str(base), "revision": base_revision},
                finetuned={"name_or_path": finetuned_name_or_path or str(finetuned), "revision": finetuned_revision})
            with atomic_file(tmp / MANIFEST_NAME) as mtmp:
                mtmp.write_bytes(manifest_bytes(manifest.to_dict()))
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
    """The Hub cache (never a valid output) when any input is a Hub id."""
    from .hub import hub_cache_root, is_hub_spec

    uses_hub = any(not isinstance(x, Path) and is_hub_spec(x) for x in specs)
    return [hub_cache_root(cache_dir)] if uses_hub else []


def _resolve_input(spec: str | Path, name: str | None, revision: str | None, *, token: str | bool | None,
                   cache_dir: str | Path | None, endpoint: str | None, role: str) -> tuple[str | Path, str | None, str | None]:
    """Local paths pass through; a Hub id is downloaded and becomes ``(local dir, repo id, commit sha)``.

    ``revision`` (when the id has no ``@rev``) is the revision to download; the recorded
    revision is always the resolved commit sha.
    """
    if isinstance(spec, Path) or Path(spec).exists():
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
        policy = Policy(codec=codec, params=dict(params or {}))
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

    def get(self, codec_name: str, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        key = (codec_name, repr(sorted(params.items())))
        c = get_codec(codec_name)
        if key not in self._validated:
            self._validated[key] = c.validate_params(params)
        return c, dict(self._validated[key])

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


def _check_auto(policy: Policy, target_ratio: float | None, max_bytes: int | str | None) -> int | None:
    """Check that a budget is given exactly when ``auto`` is used; returns ``max_bytes`` in bytes."""
    budget = target_ratio is not None or max_bytes is not None
    if policy.uses_auto() and not budget:
        raise InvalidCodecParamsError("codec 'auto' needs a budget: target_ratio (--target-ratio) or max_bytes (--max-bytes)")
    if budget and not policy.uses_auto():
        raise InvalidCodecParamsError(f"target_ratio / max_bytes (--target-ratio / --max-bytes) only apply to codec 'auto'; "
                                      f"codec is {policy.codec!r}")
    for rule in policy.rules:
        if rule.codec == AUTO and rule.params:
            raise InvalidCodecParamsError(f"rule {rule.pattern!r}: codec 'auto' takes no parameters (got {sorted(rule.params)}); "
                                          "its budget is target_ratio / max_bytes")
    if policy.codec == AUTO and policy.params:
        raise InvalidCodecParamsError(f"codec 'auto' takes no parameters (got {sorted(policy.main_params())}); "
                                      "its budget is target_ratio / max_bytes")
    if target_ratio is not None and (isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float))
                                     or not target_ratio > 0 or math.isinf(target_ratio)):
        raise InvalidCodecParamsError(f"target_ratio={target_ratio!r} must be a number > 0")
    return _budget_bytes(max_bytes)


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


class _AutoBudget:
    """``max_bytes`` shared among the auto-coded tensors still to come, by numel (None: no total cap)."""

    def __init__(self, max_bytes: int | None) -> None:
        self.bytes_left = max_bytes
        self.numel_left = 0
        self.names: set[str] = set()

    def start(self, names: set[str], numel: int) -> None:
        self.names, self.numel_left = names, numel

    def allowance(self, numel: int) -> int | None:
        """What one auto-coded tensor of ``numel`` elements may use now."""
        if self.bytes_left is None:
            return None
        return int(self.bytes_left * numel // max(self.numel_left, 1))

    def spend(self, name: str, numel: int, nbytes: int) -> None:
        """Account for a tensor counted in the budget (``nbytes`` 0 when it did not end up auto-coded)."""
        if self.bytes_left is not None and name in self.names:
            self.bytes_left -= nbytes
            self.numel_left -= numel


@dataclasses.dataclass
class _Job:
    """One compress run's validated settings, and the state shared across tensors."""

    policy: Policy
    codecs: _Codecs
    candidates: list[tuple[str, dict[str, Any]]]
    budget: _AutoBudget
    target_ratio: float | None
    auto_metric: str
    compute_stats: bool
    calib: Mapping[str, torch.Tensor] | None = None

    def start(self, ft_ckpt: Checkpoint, base_ckpt: Checkpoint, calib: Mapping[str, torch.Tensor] | None) -> None:
        """Check the calibration against the fine-tune and size the auto budget (headers only)."""
        names = ft_ckpt.keys()
        if calib is not None and not any(n in calib for n in names):
            raise ShapeMismatchError("the calibration activations name none of the fine-tune's tensors "
                                     "(made for another model?)")
        self.calib = calib
        auto_names = {n for n in names if _auto_candidate(self.policy, n, ft_ckpt, base_ckpt)}
        self.budget.start(auto_names, sum(math.prod(ft_ckpt.info(n).shape) for n in auto_names))


def _plan_job(codec: str, params: dict[str, Any] | None, policy: Policy | None, preset: str | None,
              target_ratio: float | None, max_bytes: int | str | None, candidates: list[tuple[str, dict[str, Any]]] | None,
              auto_metric: str, compute_stats: bool) -> _Job:
    """Validate every setting up front (policy, codecs, budget, metric), before any tensor is read."""
    policy = _validated_policy(codec, params, policy, preset)
    budget_bytes = _check_auto(policy, target_ratio, max_bytes)
    check_metric(auto_metric)
    cands = list(candidates) if candidates is not None else default_candidates()
    codecs = _Codecs()
    codecs.check_all(policy, cands)
    return _Job(policy, codecs, cands, _AutoBudget(budget_bytes), target_ratio, auto_metric, compute_stats)


def _encode_all(job: _Job, ft_ckpt: Checkpoint, base_ckpt: Checkpoint, writer: DeltaShardWriter,
                advance: Any) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Encode every fine-tune tensor (reads prefetched) into ``writer``; returns the entries and base digests read."""
    entries: dict[str, TensorEntry] = {}
    base_digests: dict[str, str] = {}

    def load(name: str) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
        ft_t = ft_ckpt.read(name)
        if name not in base_ckpt:
            return ft_t, None, None
        return (ft_t, *read_with_digest(base_ckpt, name))

    for name, (ft_t, base_t, digest) in prefetch(ft_ckpt.keys(), load):
        info = ft_ckpt.info(name)
        if digest is not None:
            base_digests[name] = digest
        entries[name] = _encode_tensor(job, name, info, ft_t, base_t, digest, writer)
        del ft_t, base_t
        advance(info.nbytes)
    return entries, base_digests


def _select_codec(job: _Job, name: str, info: Any, ft_t: torch.Tensor, base_t: torch.Tensor | None) -> tuple[Any, dict[str, Any], bool]:
    """``(codec, params, auto)`` for one tensor: the policy's choice, unless it is unchanged or has no usable base."""
    codec_name, p = job.policy.choose(name, len(info.shape))
    auto = codec_name == AUTO
    c, p = (None, p) if auto else job.codecs.get(codec_name, p)
    compatible = base_t is not None and _has_delta(base_t.shape, base_t.dtype, ft_t.shape, info.dtype)
    if base_t is not None and same_bits(base_t, ft_t):
        return (*job.codecs.get("unchanged", {}), False)
    if (auto or c.needs_base) and not compatible:
        # No usable base counterpart (new tensor, resized vocabulary, integer buffer): keep it exact.
        return (*job.codecs.get("raw", job.policy.raw_params), False)
    return c, p, auto


def _run_codec(job: _Job, inp: EncodeInput, c: Any, p: dict[str, Any], auto: bool, numel: int) -> tuple[Any, Any, dict[str, Any]]:
    """Encode one tensor with ``c`` or, for auto, the best candidate in budget; returns ``(codec, encoded, auto stats)``."""
    try:
        if not auto:
            return c, c.encode(inp, p), {}
        cname, p, enc, report = choose(inp, job.candidates, target_ratio=job.target_ratio,
                                       max_bytes=job.budget.allowance(numel), metric=job.auto_metric)
    except DeltaHubError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise CodecError(f"tensor {inp.name!r}: codec {'auto' if auto else c.name!r} failed: {exc}") from exc
    picked = report["candidates"][report["chosen"]]
    logger.info("auto: %s -> %s (%d bytes, %s error %.4g)", inp.name, candidate_label(cname, picked["params"]), enc.nbytes,
                report["metric"], picked["error"])
    stats = {"auto_choice": candidate_label(cname, picked["params"]), "auto_metric": report["metric"],
             "auto_error": picked["error"], "auto_budget_bytes": report["budget_bytes"]}
    return get_codec(cname), enc, stats


def _encode_tensor(job: _Job, name: str, info: Any, ft_t: torch.Tensor, base_t: torch.Tensor | None,
                   digest: str | None, writer: DeltaShardWriter) -> TensorEntry:
    """Encode one tensor, hand its stored tensors to ``writer`` and return its manifest entry."""
    c, p, auto = _select_codec(job, name, info, ft_t, base_t)
    numel = math.prod(info.shape)
    inp = EncodeInput(name=name, finetuned=ft_t, base=base_t, calibration=_layer_input(job.calib, name, info.shape))
    c, enc, auto_stats = _run_codec(job, inp, c, p, auto, numel)
    job.budget.spend(name, numel, enc.nbytes if auto else 0)
    stored = {role: f"{name}.{role}" for role in enc.tensors}
    entry = TensorEntry(codec=c.name, shape=list(info.shape), dtype=dtype_name(info.dtype), params=enc.params,
                        stored=stored, stored_bytes=enc.nbytes, base_sha256=digest)
    if job.compute_stats and c.needs_base and c.name != "unchanged":
        entry.stats = dict(enc.stats or _stats(c, enc, inp, tuple(info.shape)))
    entry.stats.update(auto_stats)
    written = writer.add({stored[r]: t for r, t in enc.tensors.items()}, c.name)
    entry.digests = {r: written[k] for r, k in stored.items()}
    return entry


def _stats(codec: Any, enc: Any, inp: EncodeInput, shape: tuple[int, ...]) -> dict[str, float]:
    """Delta norm and reconstruction error norm of a lossy delta codec (for the reports)."""
    approx = codec.decode_delta(enc.tensors, enc.params, shape)
    delta = inp.delta
    d2 = float(delta.pow(2).sum(dtype=torch.float64))
    e2 = float((approx - delta).pow(2).sum(dtype=torch.float64))
    return {"delta_l2": math.sqrt(d2), "error_l2": math.sqrt(e2)}


def _auto_candidate(policy: Policy, name: str, ft_ckpt: Checkpoint, base_ckpt: Checkpoint) -> bool:
    """True when the policy gives ``name`` to auto and the base has a float tensor of the same shape (from headers)."""
    info = ft_ckpt.info(name)
    if policy.choose(name, len(info.shape))[0] != AUTO or name not in base_ckpt:
        return False
    binfo = base_ckpt.info(name)
    return _has_delta(binfo.shape, binfo.dtype, info.shape, info.dtype)


def _has_delta(base_shape: Any, base_dtype: torch.dtype, shape: Any, dtype: torch.dtype) -> bool:
    """True when a base tensor can give a delta: same shape, both floating point."""
    return tuple(base_shape) == tuple(shape) and dtype in _FLOATS and base_dtype in _FLOATS


# ---------------------------------------------------------------------------------------- manifest


def _base_info(base_ckpt: Checkpoint, base_digests: dict[str, str], name_or_path: str, revision: str | None) -> BaseInfo:
    """The base's fingerprint; base tensors the fine-tune dropped are read here (they still belong to it)."""
    extra: dict[str, dict[str, Any]] = {}
    for name in base_ckpt.keys():
        if name not in base_digests:
            binfo = base_ckpt.info(name)
            base_digests[name] = read_with_digest(base_ckpt, name)[1]
            extra[name] = {"dtype": dtype_name(binfo.dtype), "shape": list(binfo.shape), "sha256": base_digests[name]}
    fp = fingerprint({n: (base_ckpt.info(n).dtype, base_ckpt.info(n).shape, base_digests[n]) for n in base_ckpt.keys()})
    return BaseInfo(name_or_path=name_or_path, fingerprint=fp, revision=revision, extra_tensors=extra)


def _build_manifest(tmp: Path, entries: dict[str, TensorEntry], files: list[str], ft_ckpt: Checkpoint, base_ckpt: Checkpoint,
                    base_digests: dict[str, str], base_files: dict[str, str], *, base: dict[str, Any],
                    finetuned: dict[str, Any]) -> Manifest:
    """The manifest of the delta written in ``tmp`` (its non-weights files digested)."""
    return Manifest(
        base=_base_info(base_ckpt, base_digests, base["name_or_path"], base["revision"]),
        tensors=entries,
        config=ft_ckpt.config(),
        finetuned=finetuned,
        totals=totals(entries, ft_ckpt),
        files=sorted(files),
        file_digests={n: file_digest(tmp / n) for n in sorted(files) if not is_weights_file(n)},
        base_files=base_files,
        created_with=f"deltahub {__version__}",
    )


def _copy_aux_files(src: Path, dst: Path, base_dir: Path | None) -> tuple[list[str], dict[str, str]]:
    """Copy tokenizer and generation-config files of the fine-tune; returns ``(copied names, base_files)``.

    A file byte-identical to the same-named file of ``base_dir`` is not copied but recorded in
    ``base_files`` (name -> digest): a rebuild takes it from the base. A file that is a symlink
    out of the fine-tune's folder (or its Hub cache repo) is left out with a warning, never
    followed: a delta is pushed to the Hub, and a stranger's checkpoint could link
    ``tokenizer.json`` to a secret.
    """
    import warnings

    from .format.names import member

    copied: list[str] = []
    from_base: dict[str, str] = {}
    for pattern in AUX_FILE_PATTERNS:
        for p in sorted(src.glob(pattern)):
            try:
                path = member(src, p.name, what="fine-tune file", missing_ok=True)
            except UnsafePathError as exc:
                warnings.warn(f"{exc}; left out of the delta", UserWarning, stacklevel=3)
                continue
            if path is None:
                continue
            digest = file_digest(path)
            if base_dir is not None and _same_base_file(base_dir, p.name, path, digest):
                from_base[p.name] = digest
                continue
            shutil.copyfile(path, dst / p.name)
            copied.append(p.name)
    return copied, from_base


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
        size = n * torch.empty((), dtype=getattr(torch, e.dtype)).element_size()
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
