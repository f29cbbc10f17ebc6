"""Attaching deltas to a loaded base model (checked against the base first), and loading a base with deltas."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..codecs import matrix_view_shape
from ..codecs.unchanged import same_bits
from ..delta import Delta, check_base_digest, check_base_shape
from ..errors import BaseMismatchError, DeltaHubError, ShapeMismatchError
from ..format.digest_cache import CheckpointDigests
from ..format.io import Checkpoint, base_digest, pipelined, sha256_of as tensor_sha256
from ..format.manifest import TensorEntry
from ..format.spec import dtype_name
from .layers import (
    CHUNK_ROWS,
    DeltaLinear,
    RoutedModule,
    _check_adapter_name,
    is_conv1d,
    is_delta_codec,
    make_adapter,
)
from .model import (
    ResidentState,
    _AdapterInfo,
    _replace,
    _sync,
    _walk_tensors,
    resident_state,
    unmerge_adapter,
)
from .routing import DeltaEmbedding, RawRouted


@dataclass
class _Plan:
    """One delta's resident parts, decoded and checked before the model is touched."""

    linears: list[tuple[str, nn.Module]] = field(default_factory=list)
    #: (module paths sharing the embedding matrix, its resident delta)
    embeddings: list[tuple[list[str], nn.Module]] = field(default_factory=list)
    raw: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_base(model: nn.Module, delta: Delta, tensors: dict[str, torch.Tensor], state: ResidentState, check_base: bool,
                disk: _BaseOnDisk) -> None:
    """Shapes of every manifest tensor against the model; with ``check_base`` also the base sha256 per tensor."""
    m = delta.manifest
    skipped: list[str] = []
    for name, entry in m.tensors.items():
        t = tensors.get(name)
        if t is None:
            raise BaseMismatchError(
                f"the model has no tensor {name!r}, which the delta (base {m.base.name_or_path}) has; "
                "resident adapters can only change existing tensors (use Delta.to_model)",
                path=delta.directory,
            )
        check_base_shape(m, name, t.shape, path=delta.directory, why="; resident adapters cannot change shapes")
        if not check_base or entry.base_sha256 is None:
            continue
        if dtype_name(t.dtype) != entry.dtype:
            skipped.append(name)
            continue
        base_t = state.base_raw.get(name, t)
        key = f"{name}@{base_t.data_ptr()}"
        if key not in state.base_digests:  # hashed once per base tensor, for all the deltas attached to it
            state.base_digests[key] = tensor_sha256(base_t)
        check_base_digest(m, name, state.base_digests[key], path=delta.directory)
    if skipped:
        skipped = _check_on_disk(delta, skipped, disk)
    if skipped:
        warnings.warn(
            f"{len(skipped)} model tensor(s) (e.g. {skipped[0]!r}) are not in the delta's dtype, so their base sha256 "
            "cannot be checked; only shapes were checked (load the base in the delta's dtype for the full check)",
            stacklevel=3,
        )


class _BaseOnDisk:
    """The base checkpoint the model was loaded from (a local directory), opened at most once per attach:
    the stored bits and sha256 (through the per-file digest cache) of tensors the model holds in another dtype."""

    def __init__(self, base_dir: str | None) -> None:
        self._dir = base_dir
        self._ckpt: Checkpoint | None = None
        self._cache: CheckpointDigests | None = None
        self._tried = False

    def _checkpoint(self) -> Checkpoint | None:
        if not self._tried:
            self._tried = True
            if self._dir and Path(self._dir).is_dir():
                try:
                    self._ckpt = Checkpoint(self._dir)
                    self._cache = CheckpointDigests(self._ckpt.files)
                except DeltaHubError:
                    self._ckpt = None
        return self._ckpt

    def has(self, name: str, dtype: str) -> bool:
        """Whether the checkpoint stores ``name`` in ``dtype`` (a format dtype name)."""
        ckpt = self._checkpoint()
        return ckpt is not None and name in ckpt and dtype_name(ckpt.info(name).dtype) == dtype

    def digest(self, name: str) -> str:
        """sha256 of the stored tensor (cached by file identity: an unchanged file is hashed once, ever)."""
        assert self._ckpt is not None
        return base_digest(self._ckpt, name, self._cache)

    def read(self, name: str) -> torch.Tensor:
        """The stored tensor, in owned memory (the file is closed with this object)."""
        assert self._ckpt is not None
        return self._ckpt.read(name).clone()

    def __enter__(self) -> _BaseOnDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ckpt is not None:
            if self._cache is not None:
                self._cache.save()
            self._ckpt.close()


def _check_on_disk(delta: Delta, names: list[str], disk: _BaseOnDisk) -> list[str]:
    """Check the base sha256 of ``names`` (held by the model in another dtype) on the base checkpoint on disk;
    returns the names left unchecked (no checkpoint, or not stored in the delta's dtype)."""
    left = []
    for name in names:
        if disk.has(name, delta.manifest.tensors[name].dtype):
            check_base_digest(delta.manifest, name, disk.digest(name), path=delta.directory)
        else:
            left.append(name)
    return left


def _tensor_owners(model: nn.Module, t: torch.Tensor) -> list[tuple[str, str]]:
    """``(module path, local name)`` of every module holding tensor ``t`` (tied weights: several).

    A resident wrapper counts as the owner of its ``base_layer``'s tensors (its path is returned).
    """
    out: list[tuple[str, str]] = []
    for path, mod in model.named_modules(remove_duplicate=False):
        if "base_layer" in path.split("."):
            continue
        holder = mod.base_layer if isinstance(mod, RoutedModule) else mod
        for local, v in [*holder._parameters.items(), *holder._buffers.items()]:
            if v is t:
                out.append((path, local))
    return out


def _embedding_paths(model: nn.Module, t: torch.Tensor) -> list[str] | None:
    """Modules using embedding matrix ``t`` as their weight, when all can hold a compressed delta
    (an embedding and, tied, Linear LM heads); else None (the tensor is kept exact per adapter)."""
    owners = _tensor_owners(model, t)
    if not owners or any(local != "weight" for _, local in owners):
        return None
    mods = [model.get_submodule(p) if p else model for p, _ in owners]
    if not any(isinstance(m, nn.Embedding | DeltaEmbedding) for m in mods):
        return None
    if not all(isinstance(m, nn.Embedding | DeltaEmbedding | nn.Linear | DeltaLinear) for m in mods):
        return None
    return [p for p, _ in owners]


def _open(delta: Delta | str | Path, hub_kwargs: dict[str, Any]) -> tuple[Delta, bool]:
    """An open :class:`Delta` for a Delta, a local directory or a Hub id (``namespace/name[@rev]``); True if opened here."""
    if isinstance(delta, Delta):
        return delta, False
    from .. import hub  # noqa: F401  (registers the Hub opener)

    return Delta.from_pretrained(delta, **hub_kwargs), True


def attach_delta(model: nn.Module, delta: Delta | str | Path, adapter_name: str, check_base: bool = True, *,
                 cache_decoded: bool = False, chunk_rows: int = CHUNK_ROWS, revision: str | None = None,
                 token: str | bool | None = None, cache_dir: str | Path | None = None, endpoint: str | None = None,
                 local_files_only: bool = False) -> nn.Module:
    """Attach ``delta`` (a Delta, a directory or a Hub id) to ``model`` (its base) as adapter ``adapter_name``.

    Delta-coded ``nn.Linear`` weights go into :class:`DeltaLinear` layers, a delta-coded embedding
    (and its tied LM head) into :class:`DeltaEmbedding` (one shared compressed copy), in their
    resident compressed form; other changed tensors (``raw`` norms…) are rebuilt exactly, kept per
    adapter and routed per batch row by :class:`RawRouted`. Everything is read and checked before
    the model is modified, so a failure leaves the model as it was. The first adapter attached
    becomes the active one (like PEFT). Returns ``model``, modified in place.

    ``check_base`` verifies each base tensor's sha256 against the manifest (each base tensor is
    hashed once per model, whatever the number of deltas; tensors not in the delta's dtype are
    skipped with a warning). Shapes are always checked. ``cache_decoded`` keeps the decoded float32
    delta of codecs without a compact resident form (faster, much larger). ``revision``, ``token``,
    ``cache_dir``, ``endpoint``, ``local_files_only``: for a Hub id, as in ``huggingface_hub``.
    """
    _check_adapter_name(adapter_name)
    state = resident_state(model)
    if adapter_name in state.adapters:
        raise ValueError(f"an adapter named {adapter_name!r} is already attached")
    unmerge_adapter(model)  # the base is checked and wrapped with its own weights
    if state.base_dir is None and Path(str(getattr(model, "name_or_path", "") or "")).is_dir():
        state.base_dir = str(model.name_or_path)
    d, own = _open(delta, {"revision": revision, "token": token, "cache_dir": cache_dir, "endpoint": endpoint,
                           "local_files_only": local_files_only})
    try:
        tensors = _walk_tensors(model)
        with _BaseOnDisk(state.base_dir) as disk:
            _check_base(model, d, tensors, state, check_base, disk)
            plan = _plan(model, d, tensors, state, adapter_name, cache_decoded, disk)
    finally:
        if own:
            d.close()
    _install(model, state, _AdapterInfo(adapter_name, str(d.directory)), plan, tensors, chunk_rows=chunk_rows)
    return model


def _plan(model: nn.Module, d: Delta, tensors: dict[str, torch.Tensor], state: ResidentState, adapter_name: str,
          cache_decoded: bool, disk: _BaseOnDisk) -> _Plan:
    """Read, decode and check every changed tensor of ``d`` into its resident form (the model is not modified)."""
    plan = _Plan()
    fallback: list[str] = []
    jobs: list[tuple[str, TensorEntry, str, Any]] = []  # (coded entry name, entry, module path, embedding paths or None)
    holders = Counter(id(t) for t in tensors.values())  # > 1: a tensor tied between modules
    for name, entry in d.manifest.tensors.items():
        target = entry.alias_of
        if target is not None and tensors[name] is tensors[target]:
            continue  # tied in the model too: the target's adapter or raw tensor already covers every owner
        coded, entry = d.manifest.coded(name)  # an alias (format 1.3) is resident as its target, sharing its parts
        if entry.codec == "unchanged":
            continue
        mod_path, _, attr = name.rpartition(".")
        try:
            mod = model.get_submodule(mod_path) if mod_path else model
        except AttributeError:
            mod = None
        delta_2d = is_delta_codec(entry.codec) and len(entry.shape) == 2 and attr == "weight"
        linear = delta_2d and mod is not None and (isinstance(mod, nn.Linear | DeltaLinear) or is_conv1d(mod))
        # an embedding's matrix, also when met first as its tied LM head (a delta storing the head first)
        shared = linear and holders[id(tensors[name])] > 1
        paths = (_embedding_paths(model, tensors[name]) if delta_2d and (shared or not linear) and name not in state.base_raw
                 else None)
        linear = linear and paths is None
        if linear or paths is not None:
            jobs.append((coded, entry, mod_path, None if linear else paths))
            continue
        if coded != name and coded in plan.raw and plan.raw[coded].dtype == tensors[name].dtype \
                and plan.raw[coded].device == tensors[name].device:
            plan.raw[name] = plan.raw[coded]  # the same bytes: one tensor for both names
            continue
        rebuilt = _rebuilt_if_changed(d, name, entry, state.base_raw.get(name, tensors[name]), disk)
        if rebuilt is not None:
            plan.raw[name] = rebuilt
            if is_delta_codec(entry.codec) and len(entry.shape) >= 2:  # (delta-coded biases cost next to nothing)
                fallback.append(name)

    def build(job: tuple[str, TensorEntry, str, Any]) -> Any:
        entry = job[1]
        return make_adapter(entry.codec, d.files.stored(entry.stored), entry.params, matrix_view_shape(entry.shape),
                            entry.dtype, cache_decoded=cache_decoded)

    # Decoding into the resident form is per tensor and GIL-free (torch / numpy kernels): all cores, in order;
    # an alias (format 1.3) shares its target's adapter, decoded once.
    unique = list({job[0]: job for job in jobs}.values())
    made = {job[0]: adapter for job, adapter in pipelined(unique, build)}
    for coded, _, mod_path, paths in jobs:
        if paths is None:
            plan.linears.append((mod_path, made[coded]))
        else:
            plan.embeddings.append((paths, made[coded]))
    if fallback:
        nbytes = sum(plan.raw[n].numel() * plan.raw[n].element_size() for n in fallback)
        warnings.warn(
            f"{len(fallback)} delta-coded tensor(s) of {adapter_name!r} (e.g. {fallback[0]!r}) are neither nn.Linear nor "
            f"embedding weights, so they are kept as full exact tensors per adapter ({nbytes / 2**20:.1f} MiB)",
            stacklevel=3,
        )
    return plan


def _rebuilt_if_changed(d: Delta, name: str, entry: TensorEntry, base_t: torch.Tensor,
                        disk: _BaseOnDisk | None = None) -> torch.Tensor | None:
    """The exact rebuilt tensor ``name`` in the model's dtype and device, or None when it equals the base bit for bit.

    A tensor stored as XOR against the base's bits needs the base in the delta's dtype: when the model
    holds it in another one (a base served in bf16), the base tensor is read from the checkpoint on
    disk (``disk``), checked against the manifest's sha256, rebuilt, then cast to the model's dtype.
    """
    source = base_t.detach().cpu()
    if entry.codec == "raw" and entry.params.get("mode") == "xor" and dtype_name(base_t.dtype) != entry.dtype:
        if disk is None or not disk.has(name, entry.dtype):
            raise ShapeMismatchError(
                f"tensor {name!r} is stored as an exact XOR against a {entry.dtype} base, but the model holds it as "
                f"{dtype_name(base_t.dtype)} and its base checkpoint is not on disk; load the base with "
                f"torch_dtype={entry.dtype} (or with load_resident) to attach this delta",
                path=d.directory,
            )
        if entry.base_sha256 is not None:
            check_base_digest(d.manifest, name, disk.digest(name), path=d.directory)
        source = disk.read(name)
    rebuilt = d.reconstruct(name, source).to(dtype=base_t.dtype, device=base_t.device)
    return None if same_bits(rebuilt, base_t.detach()) else rebuilt


def _install(model: nn.Module, state: ResidentState, info: _AdapterInfo, plan: _Plan, tensors: dict[str, torch.Tensor],
             *, chunk_rows: int) -> None:
    """Modify the model (everything was checked): wrap or extend layers, record and route the raw tensors, select."""
    name = info.name
    for mod_path, adapter in plan.linears:
        _wrapped(model, mod_path, DeltaLinear, chunk_rows).add_adapter_module(name, adapter)
        info.linear_modules.append(mod_path)
    for paths, adapter in plan.embeddings:
        for p in paths:
            mod = model.get_submodule(p)
            if isinstance(mod, nn.Embedding | DeltaEmbedding):
                _wrapped(model, p, DeltaEmbedding, chunk_rows).add_adapter_module(name, adapter)
                info.embedding_modules.append(p)
            else:  # a tied LM head: the same adapter object, no second copy
                _wrapped(model, p, DeltaLinear, chunk_rows).add_adapter_module(name, adapter)
                info.linear_modules.append(p)
    for tname, value in plan.raw.items():
        if tname not in state.base_raw:
            state.base_raw[tname] = tensors[tname].data
        for p, local in _tensor_owners(model, tensors[tname]):
            mod = model.get_submodule(p) if p else model
            if isinstance(mod, DeltaLinear) and local == "bias":
                mod.raw_bias[name] = value  # added per row group in a mixed batch
                continue
            if isinstance(mod, DeltaLinear | DeltaEmbedding) or not p:
                state.unroutable.add(tname)  # e.g. an embedding's padding buffer inside a delta-wrapped layer
                continue
            routed = _wrapped(model, p, RawRouted, chunk_rows)
            routed.raw.setdefault(name, {})[local] = value
            if p not in info.routed_modules:
                info.routed_modules.append(p)
    info.raw = plan.raw
    state.adapters[name] = info
    state._mixed_ok.clear()
    if state.active is None and len(state.adapters) == 1:
        state.active = name
    _sync(model)


def _wrapped(model: nn.Module, path: str, kind: type, chunk_rows: int) -> Any:
    """The resident wrapper of type ``kind`` at ``path``, wrapping the module there first if needed."""
    mod = model.get_submodule(path)
    if isinstance(mod, kind):
        return mod
    new = kind(mod, chunk_rows=chunk_rows) if kind is DeltaLinear else kind(mod)
    _replace(model, path, new)
    return new


def load_resident(base_path: str | Path | None, deltas: dict[str, str | Path | Delta], torch_dtype: torch.dtype | None = None,
                  *, check_base: bool = True, revision: str | None = None, base_revision: str | None = None,
                  token: str | bool | None = None, cache_dir: str | Path | None = None, endpoint: str | None = None,
                  local_files_only: bool = False, dtype: torch.dtype | None = None, **model_kwargs: Any) -> nn.Module:
    """Load the base once with ``AutoModelForCausalLM.from_pretrained`` and attach every delta under its key.

    Deltas may be Delta objects, directories or Hub ids (``namespace/name[@rev]``; ``revision``
    applies to every delta given without ``@rev``). ``base_path`` ``None``: the base the deltas were
    made against, pinned to its recorded commit (:func:`deltahub.hub.resolve_base`); a path or Hub id
    overrides it. All deltas must name the same base (fingerprint), checked once before loading;
    each base tensor's sha256 is then hashed once for all of them. ``dtype`` (or its older alias, the
    positional ``torch_dtype``) ``None`` keeps the checkpoint's dtype; another one (``torch.bfloat16`` to serve in 16 bits) works too: tensors the model then
    holds in another dtype are checked on the checkpoint's bytes, and exact tensors stored as XOR against
    the base are rebuilt from them. The first delta becomes the active adapter. The model is in eval mode with
    its base weights frozen (``requires_grad=False``, as under PEFT): it serves inference.
    """
    from transformers import AutoModelForCausalLM

    from ..delta import _one_dtype
    from ..hub import explain_base_mismatch, is_hub_spec, resolve_base

    torch_dtype = _one_dtype(dtype, torch_dtype)

    hub_kw = {"token": token, "cache_dir": cache_dir, "endpoint": endpoint, "local_files_only": local_files_only}
    opened = {n: _open(d, {"revision": revision, **hub_kw}) for n, d in deltas.items()}
    try:
        first = next(iter(opened.values()), (None, False))[0]
        if first is None:
            raise ValueError("load_resident() needs at least one delta")
        prints = {n: d.manifest.base.fingerprint for n, (d, _) in opened.items()}
        if len(set(prints.values())) > 1:
            raise BaseMismatchError(f"the deltas were made against different bases: {prints}; load them on separate models")
        spec = deltas[next(iter(deltas))]
        base = resolve_base(first.manifest, base_model=base_path, base_revision=base_revision,
                            local_ok=isinstance(spec, Delta) or not is_hub_spec(str(spec)), **hub_kw)
        kwargs = dict(model_kwargs)
        kwargs["dtype"] = torch_dtype if torch_dtype is not None else "auto"
        model = AutoModelForCausalLM.from_pretrained(str(base.local_dir), **kwargs)
        model.eval()
        # frozen like a PEFT base: calls without torch.no_grad() then record no graph over the base weights, and
        # the native kernels (which skip autograd) still run
        model.requires_grad_(False)
        resident_state(model).base_dir = str(base.local_dir)
        with explain_base_mismatch(first.manifest, base):
            for name, (d, _) in opened.items():
                attach_delta(model, d, name, check_base=check_base)
    finally:
        for d, own in opened.values():
            if own:
                d.close()
    return model
