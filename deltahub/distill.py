"""Distillation: train a delta's continuous parameters so the rebuilt model's logits match the fine-tune's.

BitDelta (arXiv 2402.10193) has two stages: 1-bit signs with L2-optimal scales, then *scale
distillation*: with the signs frozen, the scales are trained so the compressed model's outputs
match the fine-tune's on calibration text. This module is that second stage, for every codec
that has continuous parameters next to frozen codes:

=================  =====================================  ==============================
codec              trained (stored roles)                 frozen
=================  =====================================  ==============================
``bitdelta``       ``scale``                              ``sign``
``deltadq``        ``codebook`` (kmeans);                 ``part``/``low*`` code streams,
                   ``norm``, ``qmin``, ``qstep`` (uniform) the seeded mask
``topk-ternary``   ``scale``                              ``mask``, ``sign``
``dare``           ``norm``                               ``values``, the seeded mask
``raw``,           nothing (stored exactly)
``unchanged``
=================  =====================================  ==============================

The *student* is the rebuilt model in float32 in which every weight coded by one of these
codecs is ``float32(W_base) + decode(frozen codes, trainable params)``; at step 0 that is
bit-identical to :meth:`deltahub.Delta.to_model` (tested). Embeddings, the LM head and norms
are part of the student whenever they are coded lossily (a tied embedding is one tensor, and so is a
tied pair stored under two names, format 1.3 ``alias``: both uses train the one coded tensor). The
*teacher* is the fine-tune; its logits are computed on the fly per batch (no cache: at 135M
parameters one teacher forward costs less than the student's forward + backward, and nothing
vocabulary-sized is kept beyond one batch). The loss is taken at every position: ``"kl"``
(``KL(teacher || student)`` per token, the default: it is the quantity the goal measures and it
won on the same budget, benchmarks/distill.md) or ``"mse"`` on the logits (the paper's); Adam.

Each trainable stored tensor ``p0`` is trained as ``p0 + sigma * u`` with ``u`` starting at 0
and ``sigma`` = mean ``|p0|`` of that tensor, so one learning rate fits tensors of very
different magnitudes (``lr`` is a relative step). The result is written back with the same
layout and codes (the format does not change), new tensor digests, new manifest digest, and the
informative top-level manifest key ``distillation`` (format_spec.md, section 1).
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .codecs import get_codec, matrix_view_shape
from .codecs._bits import unpack_bits
from .codecs._masks import decode_mask
from .codecs._quant import dequantize_uniform
from .codecs._rng import group_keep_mask, keep_mask
from .codecs.bitdelta import expand_scales
from .codecs.deltadq import DeltaDQ, keep_count
from .errors import DeltaHubError, MissingFileError
from .format.delta_files import DeltaFiles, DeltaShardWriter
from .format.integrity import file_digest, is_weights_file, manifest_bytes
from .format.io import Checkpoint, atomic_directory, atomic_file
from .format.manifest import Manifest
from .format.spec import (
    DEFAULT_MAX_SHARD_BYTES,
    MANIFEST_NAME,
    WEIGHTS_INDEX_NAME,
    dtype_from_name,
)
from .utils.logging import get_logger

logger = get_logger(__name__)

LOSSES = ("mse", "kl")
# Measured on the 135M demo pair (benchmarks/distill.md): 100 steps of 4 x 128 tokens at a relative
# lr of 3e-3 cut held-out KL by 61% in ~11 minutes on 2 (shared) CPU cores; the paper's 200 steps
# would double that. Each of the 400 blocks is seen once.
DEFAULT_STEPS = 100
DEFAULT_LR = 3e-3
DEFAULT_TOKENS = 51_200  # 400 blocks of 128 tokens
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH = 4
# Same budget on the demo pair (benchmarks/distill.md): KL reached held-out KL 0.00854 (-66%),
# the paper's logit MSE 0.00971 (-61%); KL costs ~19% more time per step (full-vocabulary softmax).
DEFAULT_LOSS = "kl"
#: Roles trained per codec (the others are frozen codes).
TRAINED_ROLES: dict[str, tuple[str, ...]] = {
    "bitdelta": ("scale",),
    "deltadq": ("codebook", "norm", "qmin", "qstep"),
    "topk-ternary": ("scale",),
    "dare": ("norm",),
}


class CalibrationTextError(DeltaHubError, ValueError):
    """Distillation calibration input is not usable text (no files match, empty, not UTF-8, too short)."""


# ------------------------------------------------------------------------------------------- calibration text

def calibration_texts(calibration: str | Path | Sequence[str | Path]) -> tuple[list[str], str]:
    """Texts from files, globs, directories of files, or a ``datasets.save_to_disk`` directory.

    Returns the texts and a short description for the manifest (file names, or the sha256 of the
    texts when there are many). Nothing is downloaded. Errors are :class:`CalibrationTextError`.
    """
    specs = [calibration] if isinstance(calibration, (str, Path)) else list(calibration)
    if not specs:
        raise CalibrationTextError("no calibration text given (pass files, globs or a saved datasets directory)")
    paths: list[Path] = []
    texts: list[str] = []
    for spec in specs:
        s = str(spec)
        p = Path(s)
        if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()
                           or (p / "state.json").is_file()):
            texts.extend(_dataset_texts(p))
            paths.append(p)
            continue
        if p.is_dir():
            matches = sorted(q for q in p.rglob("*") if q.is_file())
        elif any(ch in s for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(s, recursive=True) if Path(m).is_file())
        else:
            if not p.is_file():
                raise CalibrationTextError(f"calibration text {s!r} not found")
            matches = [p]
        if not matches:
            raise CalibrationTextError(f"calibration pattern {s!r} matches no file")
        for m in matches:
            try:
                texts.append(m.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                if p.is_file():
                    raise CalibrationTextError(f"calibration text {s!r} is not UTF-8 text") from None
                continue  # a glob or directory: skip binary files
            except OSError as exc:
                raise CalibrationTextError(f"cannot read calibration text {str(m)!r} ({exc.strerror})") from None
            paths.append(m)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationTextError(f"calibration input {', '.join(map(str, specs))[:200]} holds no text")
    h = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    names = [q.name for q in paths]
    desc = ", ".join(names) if len(names) <= 4 else f"{len(names)} files ({', '.join(names[:3])}, ...)"
    return texts, f"{desc}; sha256:{h}"


def _dataset_texts(path: Path) -> list[str]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise CalibrationTextError(f"{str(path)!r} is a saved `datasets` dataset, but `datasets` is not installed") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - a broken dataset directory: one typed line
        raise CalibrationTextError(f"cannot load the dataset {str(path)!r} ({type(exc).__name__}: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    cols = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if not cols:
        raise CalibrationTextError(f"the dataset {str(path)!r} has no text column")
    col = "text" if "text" in cols else cols[0]
    return [t for t in ds[col] if isinstance(t, str)]


def token_blocks(texts: Sequence[str], tokenizer: Any, seq_len: int, tokens: int) -> torch.Tensor:
    """``[n, seq_len]`` blocks of at most ``tokens`` tokens, taken evenly over the tokenized texts."""
    stream: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for t in texts:
        stream.extend(tokenizer(t)["input_ids"])
        if eos is not None:
            stream.append(int(eos))
    n_all = len(stream) // seq_len
    if n_all < 1:
        raise CalibrationTextError(f"calibration text has {len(stream)} tokens, fewer than one block of {seq_len}")
    blocks = torch.tensor(stream[: n_all * seq_len], dtype=torch.long).view(n_all, seq_len)
    want = max(1, tokens // seq_len)
    if n_all > want:
        blocks = blocks[torch.linspace(0, n_all - 1, want).round().long()]
    return blocks


# ------------------------------------------------------------------------------------------------ the student

@dataclass
class _Coded:
    """One delta-coded tensor of the student: frozen codes, trainable parameters, its decoder."""

    name: str
    codec: str
    shape: tuple[int, ...]
    base: torch.Tensor  # float32, flat
    init: dict[str, torch.Tensor]  # role -> stored value (float32)
    sigma: dict[str, float]
    u: dict[str, torch.nn.Parameter]
    decode: Callable[[dict[str, torch.Tensor]], torch.Tensor]  # params -> float32 flat delta

    def params(self) -> dict[str, torch.Tensor]:
        return {r: self.init[r] + self.sigma[r] * self.u[r] for r in self.u}

    def weight(self) -> torch.Tensor:
        return (self.base + self.decode(self.params())).view(self.shape)


def _sparse(numel: int, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.zeros(numel, dtype=torch.float32, device=values.device).index_put((idx,), values)


def _decoder(codec: str, entry: Any, stored: dict[str, torch.Tensor], device: torch.device) -> Callable | None:
    """A differentiable ``params -> flat float32 delta`` equal to the codec's ``decode_delta``."""
    shape = tuple(entry.shape)
    rows, cols = matrix_view_shape(shape)
    numel = rows * cols
    p = entry.params
    if codec == "bitdelta":
        bits = unpack_bits(stored["sign"], cols).to(device)
        g = p.get("group_size", 0)

        def dec(q: dict[str, torch.Tensor]) -> torch.Tensor:
            s = expand_scales(q["scale"], rows, cols, p["granularity"], g)
            return torch.where(bits, s, -s).reshape(-1)
        return dec
    if codec == "deltadq":
        g, bits_, parts = p["group_size"], p["bits"], p["parts"]
        keep = keep_count(p["p"], g)
        mask = group_keep_mask(p["seed"], p["stream"], rows, cols, g, keep)
        idx = mask.reshape(-1).nonzero().reshape(-1).to(device)
        n = rows * (cols // g) * keep
        codes = DeltaDQ._codes(stored, n, bits_, parts).to(device=device, dtype=torch.int64)  # uint8 would index as a mask
        if p["quantizer"] == "kmeans":
            return lambda q: _sparse(numel, idx, q["codebook"][codes])
        qg = p["qgroup"]
        return lambda q: _sparse(numel, idx, dequantize_uniform(codes, q["qmin"], q["qstep"], q["norm"], qg))
    if codec == "topk-ternary":
        mask = decode_mask(p["mask_encoding"], stored["mask"], rows, cols)
        idx = mask.reshape(-1).nonzero().reshape(-1).to(device)
        sbits = unpack_bits(stored["sign"].reshape(1, -1), idx.numel()).reshape(-1).to(device)

        def dec_t(q: dict[str, torch.Tensor]) -> torch.Tensor:
            s = q["scale"].reshape(())
            return _sparse(numel, idx, torch.where(sbits, s, -s))
        return dec_t
    if codec == "dare":
        mask = keep_mask(p["seed"], p["stream"], (numel,), p["p"])
        idx = mask.nonzero().reshape(-1).to(device)
        vals = stored["values"].to(torch.float32).to(device)
        return lambda q: _sparse(numel, idx, vals * q["norm"].reshape(()))
    return None


class Student:
    """The rebuilt model with its delta-coded weights as functions of trainable parameters."""

    def __init__(self, delta_dir: str | Path, base: str | Path, device: torch.device) -> None:
        from .delta import Delta

        delta = Delta(delta_dir)
        self.manifest = delta.manifest
        self.model = delta.to_model(base, torch_dtype=torch.float32, progress=False).to(device)
        self.model.requires_grad_(False)
        names = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        self.coded: dict[str, _Coded] = {}
        #: alias name -> target (tied weights, format 1.3): the alias's parameter is the target's trained weight, so
        #: the pair is one trainable tensor whose gradient sums both uses (input embedding and LM head).
        self.tied: dict[str, str] = {}
        with Checkpoint(base) as base_ckpt:
            for name, entry in self.manifest.tensors.items():
                roles = [r for r in TRAINED_ROLES.get(entry.codec, ()) if r in entry.stored]
                if not roles or name not in names or not dtype_from_name(entry.dtype).is_floating_point:
                    continue
                stored = delta.files.stored(entry.stored)
                dec = _decoder(entry.codec, entry, stored, device)
                if dec is None:
                    continue
                init = {r: stored[r].to(torch.float32).to(device) for r in roles}
                sigma = {r: float(init[r].abs().mean()) or 1.0 for r in roles}
                u = {r: torch.nn.Parameter(torch.zeros_like(init[r])) for r in roles}
                b = base_ckpt.read(name).to(torch.float32).reshape(-1).to(device)
                self.coded[name] = _Coded(name, entry.codec, tuple(entry.shape), b, init, sigma, u, dec)
        self.tied = {a: t for a, t in self.manifest.aliases().items() if t in self.coded and a in names}
        delta.close()

    def parameters(self) -> list[torch.nn.Parameter]:
        return [u for c in self.coded.values() for u in c.u.values()]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        weights = {n: c.weight() for n, c in self.coded.items()}
        weights.update({a: weights[t] for a, t in self.tied.items()})
        out = torch.func.functional_call(self.model, weights, args=(), kwargs={"input_ids": input_ids, "use_cache": False},
                                         tie_weights=True, strict=False)
        return out.logits

    def stored_values(self) -> dict[str, dict[str, torch.Tensor]]:
        """tensor name -> role -> trained stored tensor, in the stored dtype."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for n, c in self.coded.items():
                out[n] = {r: v.detach().cpu() for r, v in c.params().items()}
        return out


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: str) -> torch.Tensor:
    """``"mse"``: mean squared logit error over all positions and vocabulary entries;
    ``"kl"``: mean over positions of ``KL(teacher || student)``."""
    if loss == "mse":
        return F.mse_loss(student_logits, teacher_logits)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


# ------------------------------------------------------------------------------------------------- distill

def distill(
    delta_dir: str | Path,
    base: str | Path,
    finetuned: str | Path,
    calibration: str | Path | Sequence[str | Path] | torch.Tensor,
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    tokens: int = DEFAULT_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = DEFAULT_BATCH,
    loss: str = DEFAULT_LOSS,
    device: str | torch.device | None = None,
    output_dir: str | Path | None = None,
    in_place_dir: bool = False,
    seed: int = 0,
    progress: bool | None = None,
    log: Callable[[int, float], None] | None = None,
) -> Manifest:
    """Distill the continuous parameters of the delta in ``delta_dir`` (in place, or into ``output_dir``).

    ``calibration``: text files, globs, directories, a ``datasets.save_to_disk`` directory, or a
    ``LongTensor`` of token blocks ``[n, seq_len]``. ``tokens`` bounds the calibration tokens used
    (``tokens // seq_len`` blocks, evenly spaced); each of ``steps`` Adam steps takes ``batch_size``
    blocks. The delta is rewritten atomically with recomputed digests; the manifest gains the key
    ``distillation``. Returns the new manifest.
    """
    if loss not in LOSSES:
        raise DeltaHubError(f"distillation loss {loss!r} is not one of {', '.join(LOSSES)}")
    if not (isinstance(steps, int) and steps >= 0) or not (lr > 0 and math.isfinite(lr)) or tokens < 1 or seq_len < 2 \
            or batch_size < 1:
        raise DeltaHubError(f"distillation needs steps >= 0, lr > 0, tokens >= 1, seq_len >= 2, batch_size >= 1 "
                            f"(got steps={steps}, lr={lr}, tokens={tokens}, seq_len={seq_len}, batch_size={batch_size})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    delta_dir = Path(delta_dir)
    if isinstance(calibration, torch.Tensor):
        blocks = calibration.to(torch.long)
        if blocks.dim() != 2 or blocks.shape[1] < 2:
            raise CalibrationTextError(f"calibration token blocks must be [n, seq_len >= 2], got {list(blocks.shape)}")
        seq_len = blocks.shape[1]
        desc = f"{blocks.shape[0]} token blocks; sha256:{hashlib.sha256(blocks.numpy().tobytes()).hexdigest()}"
    else:
        texts, desc = calibration_texts(calibration)
        try:
            tok = AutoTokenizer.from_pretrained(str(finetuned))
        except (OSError, ValueError) as exc:
            raise MissingFileError(f"cannot load the fine-tune's tokenizer to tokenize calibration text ({exc})",
                                   path=Path(finetuned)) from None
        blocks = token_blocks(texts, tok, seq_len, tokens)
    t0 = time.perf_counter()
    student = Student(delta_dir, base, dev)
    teacher = AutoModelForCausalLM.from_pretrained(str(finetuned), dtype=torch.float32).to(dev).eval()
    teacher.requires_grad_(False)
    params = student.parameters()
    trained_roles = sorted({f"{c.codec}.{r}" for c in student.coded.values() for r in c.u})
    losses: list[float] = []
    if params and steps:
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(blocks.shape[0], generator=gen)
        pos = 0
        student.model.eval()
        from ._progress import progress_bar

        with progress_bar("distill", steps, enabled=progress, unit="steps") as advance:
            for step in range(steps):
                if pos + batch_size > order.numel():
                    order, pos = torch.randperm(blocks.shape[0], generator=gen), 0
                idx = order[pos: pos + batch_size]
                pos += batch_size
                batch = blocks[idx].to(dev)
                with torch.no_grad():
                    t_logits = teacher(input_ids=batch, use_cache=False).logits.float()
                s_logits = student.logits(batch).float()
                lval = distill_loss(s_logits, t_logits, loss)
                opt.zero_grad(set_to_none=True)
                lval.backward()
                opt.step()
                losses.append(float(lval.detach()))
                if log is not None:
                    log(step, losses[-1])
                advance(1)
    info = {
        "loss": loss, "steps": steps, "lr": lr, "batch_size": batch_size, "seq_len": int(seq_len),
        "tokens": int(blocks.numel()), "calibration": desc, "trained": trained_roles,
        "tensors": len(student.coded),
        "initial_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    new_values = student.stored_values()
    del student, teacher
    return rewrite_delta(delta_dir, new_values, info, finetuned=finetuned, base=base, output_dir=output_dir,
                         in_place_dir=in_place_dir)


# ------------------------------------------------------------------------------------------------- rewriting

def rewrite_delta(delta_dir: str | Path, values: dict[str, dict[str, torch.Tensor]], info: dict[str, Any], *,
                  finetuned: str | Path | None = None, base: str | Path | None = None,
                  output_dir: str | Path | None = None, in_place_dir: bool = False) -> Manifest:
    """Write the delta with the stored tensors ``values[name][role]`` replaced (same dtype and shape),
    fresh digests and the manifest key ``distillation`` = ``info``.

    Written to a temporary sibling and swapped in atomically (``output_dir`` defaults to
    ``delta_dir`` itself). ``in_place_dir=True`` rewrites the files inside ``delta_dir``
    (a private temporary directory, e.g. compress's) through temporary files and renames.
    """
    src = Path(delta_dir)
    manifest = Manifest.load(src)
    if in_place_dir:
        _rewrite_into(src, src, manifest, values, info, finetuned, base)
        return Manifest.load(src)
    target = Path(output_dir) if output_dir is not None else src
    same = target.resolve() == src.resolve()
    with atomic_directory(target, overwrite=same, inputs=None if same else {"delta": src}) as tmp:
        _rewrite_into(src, tmp, manifest, values, info, finetuned, base)
    return Manifest.load(target)


def _delta_file(name: str) -> bool:
    """A file the shard writer produces (weights, shard index): rewritten, not copied."""
    return is_weights_file(name) or name == WEIGHTS_INDEX_NAME


def _rewrite_into(src: Path, dst: Path, manifest: Manifest, values: dict[str, dict[str, torch.Tensor]],
                  info: dict[str, Any], finetuned: str | Path | None, base: str | Path | None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    files = DeltaFiles(src, manifest)
    shard_sizes = [(src / f).stat().st_size for f in manifest.files if is_weights_file(f)]
    if len(shard_sizes) > 1:  # keep a sharded delta sharded about as before
        max_shard_bytes = max(shard_sizes)
    stage = dst / ".distill-shards.tmp" if dst == src else dst
    stage.mkdir(exist_ok=True)
    ft_ckpt = Checkpoint(finetuned) if finetuned is not None and values else None
    base_ckpt = Checkpoint(base) if base is not None and values else None
    try:
        writer = DeltaShardWriter(stage, max_shard_bytes)
        for name, entry in manifest.tensors.items():
            stored = files.stored(entry.stored)
            new = values.get(name, {})
            for role, v in new.items():
                old = stored[role]
                stored[role] = v.to(old.dtype).reshape(old.shape).contiguous()
            by_key = writer.add({entry.stored[r]: t for r, t in stored.items()}, entry.codec) if stored else {}
            entry.digests = {r: by_key[k] for r, k in entry.stored.items()}
            if new and ft_ckpt is not None and base_ckpt is not None and "error_l2" in entry.stats:
                codec = get_codec(entry.codec)
                d = ft_ckpt.read(name).to(torch.float32) - base_ckpt.read(name).to(torch.float32)
                err = codec.decode_delta(stored, entry.params, tuple(entry.shape)) - d
                entry.stats["error_l2"] = float(torch.linalg.vector_norm(err))
        weights = writer.finish()
    finally:
        files.close()
        for c in (ft_ckpt, base_ckpt):
            if c is not None:
                c.close()
    old_weights = [f for f in manifest.files if _delta_file(f)]
    if dst == src:
        for f in old_weights:
            if f not in weights:
                os.remove(src / f)
        for f in weights:
            os.replace(stage / f, dst / f)
        stage.rmdir()
    else:
        for f in manifest.files:
            if not _delta_file(f):
                (dst / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / f, dst / f)
    aux = [f for f in manifest.files if not _delta_file(f)]
    manifest.files = sorted(weights + aux)
    manifest.file_digests = {n: file_digest(dst / n) for n in manifest.files if not is_weights_file(n)}
    manifest.distillation = info
    with atomic_file(dst / MANIFEST_NAME) as mtmp:
        mtmp.write_bytes(manifest_bytes(manifest.to_dict()))


__all__ = [
    "TRAINED_ROLES",
    "CalibrationTextError",
    "Student",
    "calibration_texts",
    "distill",
    "distill_loss",
    "rewrite_delta",
    "token_blocks",
]
