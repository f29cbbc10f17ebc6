"""A delta as a PEFT LoRA adapter: what vLLM (``--enable-lora --lora-modules``), SGLang (``--lora-paths``) and
TGI (``LORA_ADAPTERS``) load as a per-tenant delta.

Each ``nn.Linear`` weight the delta changed (delta-coded, or an exactly stored ``raw`` matrix that differs
from the base) is factorised with the one truncated SVD (:func:`deltahub.codecs._svd.truncated_svd`):
``Δ ≈ U S Vᵀ``, ``lora_B = U √S``, ``lora_A = √S Vᵀ`` (balanced, so fp16 keeps both in range), with
``lora_alpha = r`` per layer (``rank_pattern`` = ``alpha_pattern``) so the scaling is 1 in PEFT *and* in
engines that only read the global ``r`` / ``lora_alpha``. Ranks: one ``rank`` for all, the smallest rank
keeping ``energy`` of each layer's ``‖Δ‖²``, or ranks allocated by measured error (the discarded ``Σσ²``)
under ``max_bytes`` with the model-level knapsack of :mod:`deltahub.allocation`.

Vocabulary matrices (embeddings, LM head) are exported only through ``modules_to_save`` (full fine-tuned
weights; vLLM refuses adapters that have them). What LoRA cannot carry (norms, biases, embeddings not
saved, non-Linear tensors) is reported with its relative delta norm ``‖ft - base‖ / ‖base‖``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..allocation import Curve, Point, allocate
from ..codecs._svd import rank_for_energy, truncated_svd
from ..codecs.unchanged import same_bits
from ..delta import Delta, check_base_digest, check_base_shape, model_class_for
from ..errors import DeltaHubError, ExportError
from ..format.io import Checkpoint, atomic_directory, check_output, sha256_of
from ..policy import is_vocabulary_matrix
from ..resident.layers import is_delta_codec

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "DTYPES", "ExportError", "PeftExport", "adapter_config", "export_peft",
           "lowrank_state_dict"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: Prefix of every key PEFT saves for a causal LM (``PeftModelForCausalLM.base_model.model``).
KEY_PREFIX = "base_model.model."
#: Dtypes the factors are written in.
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
#: Upper bound on one tensor's entry in the safetensors JSON header, beyond its key.
_HEADER_ENTRY = 96


@dataclass(frozen=True)
class _Target:
    """One ``nn.Linear`` (or transposed ``Conv1D``) weight the export factorises."""

    tensor: str  # e.g. model.layers.0.self_attn.q_proj.weight
    module: str  # e.g. model.layers.0.self_attn.q_proj
    rows: int  # out_features
    cols: int  # in_features
    #: A GPT-2 style ``Conv1D``: the weight is stored ``[in, out]`` (PEFT's ``fan_in_fan_out``).
    transposed: bool = False


@dataclass
class PeftExport:
    """What :func:`export_peft` wrote: ranks and relative errors per module, bytes, and what LoRA does not carry."""

    output_dir: Path
    ranks: dict[str, int]
    #: ``‖Δ - Δ_r‖ / ‖Δ‖`` per module (measured from the singular values).
    rel_errors: dict[str, float]
    #: Bytes of ``adapter_model.safetensors`` + ``adapter_config.json`` (the model card not counted).
    nbytes: int
    #: ``(tensor, ‖ft - base‖ / ‖base‖)`` of the changed tensors the adapter leaves at the base, largest first.
    not_carried: list[tuple[str, float]] = field(default_factory=list)
    #: Tensors stored whole (``modules_to_save``).
    saved_tensors: list[str] = field(default_factory=list)
    base_model_name_or_path: str = ""
    revision: str | None = None


def _check_mode(rank: int | None, energy: float | None, max_bytes: int | None, dtype: str) -> torch.dtype:
    """Exactly one of ``rank`` / ``energy`` / ``max_bytes``, each in range; the factors' dtype."""
    given = [k for k, v in (("rank", rank), ("energy", energy), ("max_bytes", max_bytes)) if v is not None]
    if len(given) != 1:
        raise ExportError("give exactly one of rank, energy or max_bytes (--rank / --energy / --max-bytes)"
                          + (f"; got {', '.join(given)}" if given else ""))
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ExportError(f"rank must be an integer >= 1, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
        raise ExportError(f"energy must be in (0, 1], got {energy!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise ExportError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    if str(dtype).removeprefix("torch.") not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {str(dtype)[:40]!r}")
    return DTYPES[str(dtype).removeprefix("torch.")]


def _skeleton(d: Delta) -> nn.Module:
    """The delta's model on the meta device (validated config; no memory), to find its ``nn.Linear`` modules."""
    config = d.manifest.config
    if config is None:
        raise ExportError("the delta has no model config, so its Linear layers cannot be found", path=d.directory)
    cls, cfg = model_class_for(config, {n: tuple(e.shape) for n, e in d.manifest.tensors.items()}, path=d.directory)
    if not cls.__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise ExportError(f"{cls.__name__} is not a causal LM; the LoRA export writes PEFT's CAUSAL_LM adapters",
                          path=d.directory)
    with torch.device("meta"):
        return cls(cfg)


def _targets(d: Delta, skeleton: nn.Module) -> list[_Target]:
    """The changed ``nn.Linear`` / ``Conv1D`` weights (not vocabulary matrices) in manifest order."""
    out = []
    for name, entry in d.manifest.tensors.items():
        mod_path, _, attr = name.rpartition(".")
        if d.manifest.coded(name)[1].codec == "unchanged" or attr != "weight" or is_vocabulary_matrix(name):
            continue
        try:
            mod = skeleton.get_submodule(mod_path)
        except AttributeError:
            continue
        if len(entry.shape) != 2:
            continue
        if isinstance(mod, nn.Linear):
            out.append(_Target(name, mod_path, int(entry.shape[0]), int(entry.shape[1])))
        elif _is_conv1d(mod):  # weight [in, out]: the LoRA factors are those of its transpose
            out.append(_Target(name, mod_path, int(entry.shape[1]), int(entry.shape[0]), transposed=True))
    if len({t.transposed for t in out}) > 1:
        raise ExportError("the model mixes nn.Linear and transposed Conv1D layers; PEFT's fan_in_fan_out is one setting "
                          "for every target", path=d.directory)
    return out


def _is_conv1d(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): a Linear whose weight is stored transposed, ``[in, out]``."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _base_tensor(d: Delta, base: Checkpoint, name: str, check_base: bool) -> torch.Tensor:
    """A base tensor the delta needs, checked against the recorded shape (and sha256 with ``check_base``)."""
    t = base.read(name)
    check_base_shape(d.manifest, name, t.shape, path=base.path)
    if check_base:
        check_base_digest(d.manifest, name, sha256_of(t), path=base.path)
    return t


def _delta_matrix(d: Delta, base: Checkpoint, target: _Target, check_base: bool) -> torch.Tensor:
    """The float32 ``Δ̂`` of a target: decoded from a delta codec, or ``rebuilt - base`` for an exact (raw) one."""
    _, entry = d.manifest.coded(target.tensor)  # an alias (format 1.3): its target's coding
    if is_delta_codec(entry.codec):
        delta = d.delta_tensor(target.tensor).to(torch.float32)
    else:
        base_t = _base_tensor(d, base, target.tensor, check_base)
        delta = d.reconstruct(target.tensor, base_t).to(torch.float32) - base_t.to(torch.float32)
    return delta.T.contiguous() if target.transposed else delta.reshape(target.rows, target.cols)


def _factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lora_B, lora_A, S)`` in float32: ``B @ A`` is the truncated SVD ``U_r S_r V_rᵀ`` of ``delta``, split as ``√S``."""
    u, s, vh = truncated_svd(delta, rank)
    root = s.sqrt()
    return (u * root).contiguous(), (root[:, None] * vh).contiguous(), s


def _rank_bytes(t: _Target, rank: int, esize: int) -> int:
    """Bytes a target's two factors take in the safetensors file (data + an upper bound on header entries)."""
    keys = sum(len(f"{KEY_PREFIX}{t.module}.lora_{x}.weight") for x in "AB")
    return rank * (t.rows + t.cols) * esize + keys + 2 * _HEADER_ENTRY


def _rank_grid(limit: int) -> list[int]:
    """Candidate ranks of the byte allocation up to ``limit``: powers of two and 1.5x them (two points per octave)."""
    return sorted({r for k in range(40) for r in (1 << k, (3 << k) >> 1) if 1 <= r <= limit} | {limit})


def _spectra(d: Delta, base: Checkpoint, targets: list[_Target], check_base: bool, advance: Any) -> dict[str, tuple[torch.Tensor, float]]:
    """Each target's full singular spectrum and ``‖Δ‖²`` (what ``energy`` and ``max_bytes`` choose ranks from)."""
    out = {}
    for t in targets:
        delta = _delta_matrix(d, base, t, check_base)
        _, s, _ = truncated_svd(delta, min(t.rows, t.cols))
        out[t.module] = (s, float(delta.to(torch.float64).pow(2).sum()))
        advance(1)
    return out


def _allocate_ranks(targets: list[_Target], spectra: dict[str, tuple[torch.Tensor, float]], budget: int, esize: int) -> dict[str, int]:
    """Per-module ranks minimising the total discarded ``Σσ²`` with the factors' bytes ``<= budget`` (knapsack)."""
    curves = []
    for t in targets:
        s, total = spectra[t.module]
        kept = torch.cumsum(s.to(torch.float64) ** 2, 0)
        points = [Point("lora", {"rank": r}, _rank_bytes(t, r, esize), max(total - float(kept[r - 1]), 0.0), label=f"r={r}")
                  for r in _rank_grid(min(t.rows, t.cols))]
        curves.append(Curve(t.module, t.rows * t.cols, points))
    need = sum(min(p.nbytes for p in c.points) for c in curves)
    if need > budget:
        raise ExportError(f"the byte budget leaves {max(budget, 0)} bytes for the LoRA factors (after the config, headers "
                          f"and modules_to_save), but rank 1 everywhere "
                          f"({len(targets)} modules) takes {need}; raise --max-bytes")
    return {name: int(p.params["rank"]) for name, p in allocate(curves, budget).items()}


def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    """The dotted path of ``module`` inside ``model`` (None if absent)."""
    if module is None:
        return None
    return next((p for p, m in model.named_modules() if m is module and p), None)


def _saved_sources(d: Delta, skeleton: nn.Module, names: list[str]) -> tuple[dict[str, str], list[str], bool]:
    """``modules_to_save``: ``{PEFT key: delta tensor}``, the config's module names, and whether tied weights are kept tied."""
    tensors = d.manifest.tensors
    emb_in = _path_of(skeleton, skeleton.get_input_embeddings())
    emb_out = _path_of(skeleton, skeleton.get_output_embeddings())
    tied = bool(getattr(skeleton.config, "tie_word_embeddings", False)) and emb_in is not None and emb_out is not None \
        and f"{emb_out}.weight" not in tensors
    keys: dict[str, str] = {}
    config_names: list[str] = []
    for n in names:
        if not isinstance(n, str) or not n.strip("."):
            raise ExportError(f"modules_to_save: {n!r} is not a module name")
        paths = [p for p, _ in skeleton.named_modules() if p and (p == n or p.endswith("." + n))]
        if not paths:
            raise ExportError(f"modules_to_save: the model has no module {n!r} (e.g. {emb_in!r}, {emb_out!r})", path=d.directory)
        config_names.append(n)
        if tied and set(paths) & {emb_in, emb_out}:
            paths = sorted(set(paths) | {emb_in, emb_out})  # type: ignore[arg-type]  # PEFT's ensure_weight_tying saves both
        for p in paths:
            for attr, param in skeleton.get_submodule(p).named_parameters(recurse=False):
                src = f"{p}.{attr}" if f"{p}.{attr}" in tensors else (f"{emb_in}.weight" if tied and p == emb_out else None)
                if src is None or src not in tensors:
                    raise ExportError(f"modules_to_save: {p}.{attr} is not in the delta", path=d.directory)
                keys[f"{KEY_PREFIX}{p}.{attr}"] = src
    return keys, config_names, tied and bool(keys)


def _rebuilt(d: Delta, base: Checkpoint, name: str, check_base: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(fine-tuned tensor, base tensor)`` of one manifest entry (base ``None`` for a tensor the base lacks)."""
    entry = d.manifest.tensors[name]
    if entry.base_sha256 is None:
        return d.reconstruct(name, None), None
    if list(base.info(name).shape) != list(entry.shape):
        raise ExportError(f"tensor {name!r} has shape {entry.shape}, the base's is {list(base.info(name).shape)} "
                          "(a resized vocabulary): not exportable as an adapter of this base", path=d.directory)
    base_t = _base_tensor(d, base, name, check_base)
    return d.reconstruct(name, base_t), base_t


def _not_carried(d: Delta, base: Checkpoint, skip: set[str], check_base: bool) -> list[tuple[str, float]]:
    """Changed tensors the adapter leaves at the base, with ``‖ft - base‖ / ‖base‖`` (inf: no base counterpart)."""
    out = []
    for name, entry in d.manifest.tensors.items():
        if name in skip or d.manifest.coded(name)[1].codec == "unchanged":
            continue
        if entry.base_sha256 is None or list(base.info(name).shape) != list(entry.shape):
            out.append((name, math.inf))
            continue
        ft, base_t = _rebuilt(d, base, name, check_base)
        assert base_t is not None
        if same_bits(ft.to(base_t.dtype), base_t):
            continue
        ref = float(base_t.to(torch.float64).norm())
        diff = float((ft.to(torch.float64) - base_t.to(torch.float64)).norm())
        out.append((name, diff / ref if ref > 0 else math.inf))
    return sorted(out, key=lambda x: -x[1])


def _target_modules(skeleton: nn.Module, modules: list[str]) -> list[str]:
    """PEFT ``target_modules``: the short names (``q_proj``, ...) when they match exactly these Linear layers
    (what every engine reads), else the full module paths."""
    chosen = set(modules)
    short = sorted({m.rpartition(".")[2] for m in modules})
    linears = {p for p, m in skeleton.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)}
    matched = {p for p in linears if p.rpartition(".")[2] in short}
    return short if matched == chosen else sorted(chosen)


def adapter_config(d: Delta, skeleton: nn.Module, ranks: dict[str, int], modules_to_save: list[str], tied: bool,
                   fan_in_fan_out: bool = False) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT 0.21 writes it for a LoRA on a causal LM, with ``r = lora_alpha`` (scaling 1);
    ``fan_in_fan_out`` for GPT-2 style ``Conv1D`` targets."""
    top = max(ranks.values(), default=1)
    pattern = {m: r for m, r in sorted(ranks.items()) if r != top}
    base = d.manifest.base
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.name_or_path, "revision": base.revision,
        "r": top, "lora_alpha": top, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": _target_modules(skeleton, list(ranks)),
        "modules_to_save": modules_to_save or None, "ensure_weight_tying": tied,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": fan_in_fan_out, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
        "exclude_modules": None,
    }


def _config_bytes_bound(d: Delta, skeleton: nn.Module, targets: list[_Target], modules_to_save: list[str], tied: bool) -> int:
    """An upper bound on ``adapter_config.json``'s size whatever the ranks (every module in the pattern, widest numbers)."""
    worst = {t.module: 10 ** len(str(max(t.rows, t.cols))) - 1 for t in targets}
    if worst:
        worst[targets[0].module] = 10 ** (len(str(max(worst.values()))) + 1) - 1  # a different top: all others in the pattern
    return len(json.dumps(adapter_config(d, skeleton, worst, modules_to_save, tied), indent=2)) + 64


def _card(d: Delta, result: PeftExport, mode: str, dtype: str) -> str:
    """The adapter's model card (``library_name: peft``, ``base_model_relation: adapter``)."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..hub import is_hub_id

    base = d.manifest.base.name_or_path
    data = ModelCardData(library_name="peft", base_model=base if is_hub_id(base) else None, base_model_relation="adapter",
                         tags=["lora", "peft", "deltahub"], pipeline_tag="text-generation")
    ranks = sorted(result.ranks.values())
    lines = [f"---\n{data.to_yaml()}\n---", "", "# LoRA adapter exported by deltahub", "",
             f"Exported from a deltahub delta of `{base}`" + (f" (revision `{d.manifest.base.revision}`)" if d.manifest.base.revision else "")
             + f" with `deltahub export peft` ({mode}, {dtype} factors): {len(ranks)} Linear layers, ranks "
             f"{ranks[0] if ranks else 0}-{ranks[-1] if ranks else 0}, {result.nbytes:,} bytes.", "",
             "Each layer's `lora_B @ lora_A` is the truncated SVD of the delta's decoded weight change, with "
             "`lora_alpha = r` (scaling 1).", ""]
    if result.saved_tensors:
        lines += ["Stored whole (`modules_to_save`, which vLLM refuses): " + ", ".join(f"`{t}`" for t in result.saved_tensors), ""]
    if result.not_carried:
        lines += ["Changed tensors this adapter does not carry (left at the base; relative change `‖ft - base‖ / ‖base‖`):", ""]
        lines += [f"- `{n}`: {r:.3g}" for n, r in result.not_carried[:40]]
        lines += ([f"- ... and {len(result.not_carried) - 40} more"] if len(result.not_carried) > 40 else []) + [""]
    lines += ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
              f"base = AutoModelForCausalLM.from_pretrained({base!r}" + (f", revision={d.manifest.base.revision!r}" if d.manifest.base.revision else "") + ")",
              "model = PeftModel.from_pretrained(base, 'path/to/this/adapter')", "```", ""]
    return str(ModelCard("\n".join(lines)))


def _factorise(d: Delta, base: Checkpoint, targets: list[_Target], ranks: dict[str, int], dtype: torch.dtype,
               check_base: bool, advance: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every target's ``lora_A`` / ``lora_B`` in ``dtype`` (PEFT's keys), and its relative error ``‖Δ - Δ_r‖ / ‖Δ‖``."""
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for t in targets:
        delta = _delta_matrix(d, base, t, check_base)
        b, a, s = _factors(delta, ranks[t.module])
        total = float(delta.to(torch.float64).pow(2).sum())
        errors[t.module] = math.sqrt(max(total - float(s.to(torch.float64).pow(2).sum()), 0.0) / total) if total > 0 else 0.0
        tensors[f"{KEY_PREFIX}{t.module}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{KEY_PREFIX}{t.module}.lora_B.weight"] = b.to(dtype).contiguous()
        advance(1)
    return tensors, errors


def _choose_ranks(d: Delta, base: Checkpoint, targets: list[_Target], *, rank: int | None, energy: float | None,
                  budget: int | None, esize: int, check_base: bool, advance: Any) -> dict[str, int]:
    """Per-module ranks: ``rank`` for all (capped by the matrix), by ``energy`` per layer, or allocated under ``budget``."""
    if rank is not None:
        return {t.module: min(rank, t.rows, t.cols) for t in targets}
    spectra = _spectra(d, base, targets, check_base, advance)
    if energy is not None:
        return {t.module: rank_for_energy(spectra[t.module][0], energy) for t in targets}
    assert budget is not None
    return _allocate_ranks(targets, spectra, budget, esize)


def _export(d: Delta, base: Checkpoint, output_dir: Path, *, rank: int | None, energy: float | None, max_bytes: int | None,
            dtype: torch.dtype, modules_to_save: list[str], check_base: bool, overwrite: bool, inputs: dict[str, Any],
            protect: list[Path], progress: bool | None) -> PeftExport:
    """Plan, factorise and write the adapter (atomically) for an opened delta and base."""
    from safetensors.torch import save_file

    from .._progress import progress_bar

    d.check_base_structure(base, check_base=check_base)
    skeleton = _skeleton(d)
    targets = _targets(d, skeleton)
    if not targets:
        raise ExportError("the delta changes no nn.Linear weight: a LoRA adapter would carry nothing", path=d.directory)
    keys, config_names, tied = _saved_sources(d, skeleton, modules_to_save)
    saved = {k: _rebuilt(d, base, src, check_base)[0].to(dtype).contiguous() for k, src in keys.items()}
    not_carried = _not_carried(d, base, {t.tensor for t in targets} | set(keys.values()), check_base)
    esize = dtype.itemsize
    budget = None
    if max_bytes is not None:
        fixed = _config_bytes_bound(d, skeleton, targets, config_names, tied) + 128 \
            + sum(t.numel() * esize + len(k) + _HEADER_ENTRY for k, t in saved.items())
        budget = max_bytes - fixed
    steps = len(targets) * (1 if rank is not None else 2)
    with progress_bar("export", steps, enabled=progress, unit="items") as advance:
        ranks = _choose_ranks(d, base, targets, rank=rank, energy=energy, budget=budget, esize=esize, check_base=check_base,
                              advance=advance)
        tensors, errors = _factorise(d, base, targets, ranks, dtype, check_base, advance)
    config = adapter_config(d, skeleton, ranks, config_names, tied, fan_in_fan_out=any(t.transposed for t in targets))
    with atomic_directory(output_dir, overwrite=overwrite, inputs=inputs, protect=protect) as tmp:
        save_file({**tensors, **saved}, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        nbytes = sum((tmp / f).stat().st_size for f in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME))
        if max_bytes is not None and nbytes > max_bytes:  # the bounds above make this unreachable
            raise ExportError(f"the adapter takes {nbytes} bytes, over the budget of {max_bytes}")
        result = PeftExport(Path(output_dir), ranks, errors, nbytes, not_carried, sorted(set(keys.values())),
                            d.manifest.base.name_or_path, d.manifest.base.revision)
        mode = f"rank {rank}" if rank is not None else (f"energy {energy}" if energy is not None else f"max {max_bytes:,} bytes")
        (tmp / "README.md").write_text(_card(d, result, mode, str(dtype).removeprefix("torch.")), encoding="utf-8")
    return result


def export_peft(delta: str | os.PathLike[str], output_dir: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
                rank: int | None = None, energy: float | None = None, max_bytes: int | None = None, dtype: str = "float16",
                modules_to_save: list[str] | tuple[str, ...] = (), overwrite: bool = False, check_base: bool = True,
                revision: str | None = None, token: str | bool | None = None, cache_dir: str | Path | None = None,
                endpoint: str | None = None, progress: bool | None = None) -> PeftExport:
    """Write ``delta`` (a directory or a Hub id) as a PEFT LoRA adapter directory ``output_dir`` (see the module doc).

    Exactly one of ``rank`` (every layer), ``energy`` (per layer, the smallest rank keeping that share of
    ``‖Δ‖²``) or ``max_bytes`` (``adapter_model.safetensors`` + ``adapter_config.json``, ranks allocated by
    measured error). ``base``: a directory or Hub id (default: the base the delta pins; it is read for
    exact-coded Linears, ``modules_to_save`` and the not-carried report, each tensor checked against its
    recorded sha256 unless ``check_base=False``). ``modules_to_save``: module names (``embed_tokens``,
    ``lm_head``) stored whole. ``output_dir`` is written atomically; an existing one needs ``overwrite``.
    """
    torch_dtype = _check_mode(rank, energy, max_bytes, dtype)
    from .. import hub as _hub  # registers the Hub opener of Delta.from_pretrained

    protect = [_hub.hub_cache_root(cache_dir)]
    check_output(output_dir, inputs={"delta": delta, "base": base}, protect=protect, overwrite=overwrite)
    local_delta = isinstance(delta, os.PathLike) or Path(delta).exists()
    d = Delta.from_pretrained(delta, revision, token=token, cache_dir=cache_dir, endpoint=endpoint)
    try:
        dl = {"token": token, "cache_dir": cache_dir, "endpoint": endpoint}
        resolved = (_hub.resolve_model(os.fspath(base), role="base", **dl) if base is not None
                    else _hub.resolve_base(d.manifest, local_ok=local_delta, **dl))
        inputs = {"delta": d.directory, "base": resolved.local_dir}
        check_output(output_dir, inputs=inputs, protect=protect, overwrite=overwrite)
        with Checkpoint(resolved.local_dir) as ckpt, _hub.explain_base_mismatch(d.manifest, resolved):
            return _export(d, ckpt, Path(output_dir), rank=rank, energy=energy, max_bytes=max_bytes, dtype=torch_dtype,
                           modules_to_save=list(modules_to_save), check_base=check_base, overwrite=overwrite,
                           inputs=inputs, protect=protect, progress=progress)
    finally:
        d.close()


def lowrank_state_dict(delta: str | os.PathLike[str] | Delta, base: str | os.PathLike[str], ranks: dict[str, int], *,
                       check_base: bool = True) -> dict[str, torch.Tensor]:
    """deltahub's own low-rank rebuild in float32: the base's tensors, with each module of ``ranks`` (module path ->
    rank) at ``W + U_r S_r V_rᵀ`` of its delta: what an exported adapter should reproduce up to its dtype's rounding."""
    d = delta if isinstance(delta, Delta) else Delta(delta)
    try:
        skeleton = _skeleton(d) if d.manifest.config is not None else None
        with Checkpoint(base) as ckpt:
            out = {n: ckpt.read(n).to(torch.float32) if ckpt.info(n).dtype.is_floating_point else ckpt.read(n) for n in ckpt.keys()}
            for module, r in ranks.items():
                name = f"{module}.weight"
                if name not in d.manifest.tensors or name not in out:
                    raise DeltaHubError(f"module {module!r} has no weight in both the delta and the base", path=d.directory)
                shape = d.manifest.tensors[name].shape
                conv = _is_conv1d(skeleton.get_submodule(module)) if skeleton is not None else False
                target = _Target(name, module, shape[1], shape[0], True) if conv else _Target(name, module, shape[0], shape[1])
                b, a, _ = _factors(_delta_matrix(d, ckpt, target, check_base), r)
                out[name] = out[name] + ((b @ a).T if conv else b @ a)
    finally:
        if d is not delta:
            d.close()
    return out
