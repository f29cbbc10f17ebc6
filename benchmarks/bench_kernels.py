"""Micro-benchmark of ``y = x @ Δ̂ᵀ`` options for resident deltas at SmolLM2-135M decode shapes.

For every weight shape (``576x576`` q/o, ``1536x576`` gate/up, ``576x1536`` down, ``192x576`` k/v)
and decode batch (1, 4, 16 rows) it times the base ``x @ Wᵀ`` (float32) and each way of adding the
delta, and prints the delta's cost as a fraction of the base matmul and the implied
tokens/s-equivalent ``base / (base + delta)`` of a linear layer that adds it.

BitDelta (sign bits + per-row scale): (a) ``chunked``: today's per-call unpack of the packed bits;
(b) ``int8``: a cached int8 ±1 matrix converted to float per chunk; (b') ``f32``: a cached
float32 ±1 matrix (as much memory as the base weight); ``bf16``: cached bf16 ±1 with ``x`` cast to
bf16 (lossy in ``x``: not used); (c) ``lut``: T-MAC-style 8-bit tables ``T[b, j, byte]`` summed by
``embedding_bag``; ``i4mm``: torch's CPU int4 weight-only GEMM (exact for ±1 with a per-row scale).
DeltaDQ (1/4 kept, 16-level codebook): ``decode``: today's per-call decode with the codec;
``dense``: decode-to-dense float32 cache; ``csr``: float32 CSR ``torch.sparse.mm``; ``ell``: kept
column indices + values per row summed by ``embedding_bag``.

    python benchmarks/bench_kernels.py [--threads 1] [--reps 20] [--json out.json]

``--e2e DELTA`` instead measures greedy decode tokens/s of the real pair's base with ``DELTA``
attached 4 times (``bench_resident.py``'s protocol: batch 4, an 8-token prompt, ``--new-tokens``)
for the plain base, one adapter, and a mixed batch over the 4 adapters, under each
``DELTAHUB_RESIDENT_CACHE`` mode of ``--modes``:

    python benchmarks/bench_kernels.py --e2e /tmp/d-bitdelta --modes none,int8,dense --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltahub.codecs import get_codec  # noqa: E402
from deltahub.codecs._bits import pack_bits  # noqa: E402
from deltahub.codecs.base import EncodeInput  # noqa: E402
from deltahub.resident import kernels  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536), (192, 576)]
BATCHES = [1, 4, 16]
_PM1_BYTE = (((torch.arange(256)[:, None] >> torch.arange(8)) & 1).float() * 2 - 1)  # [256, 8]


def best_us(fn: Callable[[], torch.Tensor], reps: int) -> float:
    """Best-of-5 mean microseconds of ``reps`` calls after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e6


def ell_from_dense(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[rows, cols]`` matrix as ELL: int64 column indices and float32 values ``[rows, K]``,
    ``K`` the most nonzeros of any row (shorter rows padded with index 0, value 0)."""
    nz = dense != 0
    k = int(nz.sum(1).max()) if dense.numel() else 0
    # Stable sort puts each row's nonzero columns first, in column order.
    order = torch.sort((~nz).to(torch.int8), dim=1, stable=True).indices[:, :k]
    vals = dense.gather(1, order).to(torch.float32)
    return torch.where(vals != 0, order, 0), vals


def ell_matmul(x: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """``x @ Dᵀ`` for ``D`` in ELL form (:func:`ell_from_dense`): per output row, the kept columns of
    ``xᵀ`` weighted by the values and summed (``embedding_bag``), in float32, cast to ``x``'s dtype."""
    rows, k = idx.shape
    if rows == 0 or k == 0:
        return x.new_zeros((x.shape[0], rows))
    offsets = torch.arange(0, rows * k, k, device=idx.device)
    xt = x.to(torch.float32).T.contiguous()  # [in, n]: one "embedding" per input column
    y = F.embedding_bag(idx.reshape(-1), xt, offsets, mode="sum", per_sample_weights=val.reshape(-1))
    return y.T.to(x.dtype)


def bitdelta_options(rows: int, cols: int) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]:
    """The BitDelta variants as ``f(x)`` closures, and the float64 reference ±1·scale matrix."""
    bits = torch.randn(rows, cols) > 0
    sign, scale = pack_bits(bits), torch.rand(rows) * 1e-3
    pm1_i8 = kernels.unpack_pm1_int8(sign, cols)
    pm1_f32, pm1_bf = pm1_i8.float(), pm1_i8.to(torch.bfloat16)
    nbytes = sign.shape[1]
    lut_idx = (sign.long() + torch.arange(nbytes)[None, :] * 256).reshape(-1)
    offsets = torch.arange(0, rows * nbytes, nbytes)
    q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.where(bits, 9, 7).to(torch.int32), 1)
    sz = torch.stack([scale[None, :].expand(cols // 64, rows), torch.zeros(cols // 64, rows)], -1).contiguous()

    def lut(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        table = (x.view(b, nbytes, 8) @ _PM1_BYTE.T).reshape(b, -1).T.contiguous()
        return F.embedding_bag(lut_idx, table, offsets, mode="sum").T * scale

    opts = {
        "chunked": lambda x: kernels.binary_matmul(x, sign, scale, "row", 0),
        "int8": lambda x: kernels.binary_matmul(x, sign, scale, "row", 0, pm1=pm1_i8),
        "f32": lambda x: kernels.binary_matmul(x, sign, scale, "row", 0, pm1=pm1_f32),
        "bf16": lambda x: (x.bfloat16() @ pm1_bf.T).float() * scale,
        "lut": lut,
        "i4mm": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4, 64, sz),
    }
    return opts, pm1_f32.double() * scale.double()[:, None]


def deltadq_options(rows: int, cols: int) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]:
    """The DeltaDQ variants (a real ``deltadq`` 16x encode of a random delta) and the reference matrix."""
    codec = get_codec("deltadq")
    base = torch.randn(rows, cols) * 0.02
    params = codec.validate_params({"preset": "16x", "group_size": 4, "entropy": "none"})
    enc = codec.encode(EncodeInput("w", base + torch.randn(rows, cols) * 1e-3, base), params)
    dense = codec.decode_delta(enc.tensors, enc.params, (rows, cols)).reshape(rows, cols)
    csr = dense.to_sparse_csr()
    ell_idx, ell_val = ell_from_dense(dense)
    opts = {
        "decode": lambda x: x @ codec.decode_delta(enc.tensors, enc.params, (rows, cols)).reshape(rows, cols).T,
        "dense": lambda x: x @ dense.T,
        "csr": lambda x: (csr @ x.T).T,
        "ell": lambda x: ell_matmul(x, ell_idx, ell_val),
    }
    return opts, dense.double()


def run(reps: int) -> list[dict[str, object]]:
    """Every shape x batch x option: microseconds, delta cost / base and max abs error."""
    out = []
    for rows, cols in SHAPES:
        w = torch.randn(rows, cols)
        for codec, maker in (("bitdelta", bitdelta_options), ("deltadq", deltadq_options)):
            opts, ref = maker(rows, cols)
            for b in BATCHES:
                x = torch.randn(b, cols)
                base = best_us(lambda: x @ w.T, reps)
                want = x.double() @ ref.T
                for name, fn in opts.items():
                    if codec == "deltadq" and name == "decode" and b > 1:
                        continue  # the per-call decode does not depend on the batch
                    us = best_us(lambda: fn(x), max(1, reps // (10 if name == "decode" else 1)))
                    err = float((fn(x).double() - want).abs().max() / want.abs().max())
                    out.append(dict(codec=codec, shape=f"{rows}x{cols}", batch=b, option=name, us=round(us, 1),
                                    base_us=round(base, 1), cost=round(us / base, 2), tok_s_frac=round(base / (base + us), 2),
                                    rel_err=float(f"{err:.2g}")))
                    r = out[-1]
                    print(f"{codec:8s} {r['shape']:9s} b={b:2d} {name:8s} {us:8.1f} us  base {base:7.1f} us  "
                          f"cost {r['cost']:5.2f}  linear tok/s {r['tok_s_frac']:.2f}  rel err {err:.1e}", flush=True)
    return out


def _clear_caches(model: torch.nn.Module) -> None:
    """Drop every resident adapter's kernel cache (so each mode starts from the stored form)."""
    for m in model.modules():
        m.__dict__.pop("_kernel_cache", None)


@torch.no_grad()
def e2e(delta: Path, modes: list[str], batch: int, new_tokens: int, reps: int) -> dict[str, float]:
    """Decode tokens/s: base, and per cache mode one adapter / a mixed batch over 4 adapters."""
    import os

    from transformers import AutoModelForCausalLM

    from deltahub.resident import attach_delta, set_adapter, use_adapters

    demo = Path.home() / ".cache" / "deltahub" / "demo" / "base"
    base = AutoModelForCausalLM.from_pretrained(demo, dtype="auto").eval()
    resident = AutoModelForCausalLM.from_pretrained(demo, dtype="auto").eval()
    names = [f"ft{i}" for i in range(4)]
    for n in names:
        attach_delta(resident, delta, n)
    set_adapter(resident, names[0])
    prompt = torch.randint(0, base.config.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(0))
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}

    def tok_s(model: torch.nn.Module) -> float:
        best = float("inf")
        for _ in range(reps + 1):  # the first call warms up (and fills the caches)
            t = time.perf_counter()
            model.generate(input_ids=prompt, **kw)
            best = min(best, time.perf_counter() - t)
        return batch * new_tokens / best

    out = {"base": tok_s(base)}
    print(f"base {out['base']:.1f} tok/s", flush=True)
    for mode in modes:
        os.environ["DELTAHUB_RESIDENT_CACHE"] = mode
        _clear_caches(resident)
        out[f"{mode}: 1 adapter"] = tok_s(resident)
        with use_adapters(resident, [names[i % 4] for i in range(batch)]):
            out[f"{mode}: mixed over 4"] = tok_s(resident)
        for k in (f"{mode}: 1 adapter", f"{mode}: mixed over 4"):
            print(f"{k:24s} {out[k]:7.1f} tok/s = {out[k] / out['base']:.0%} of base", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--e2e", type=Path, default=None, help="a delta of the demo pair: measure decode end to end")
    ap.add_argument("--modes", default="none,int8,dense", help="DELTAHUB_RESIDENT_CACHE modes for --e2e")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.e2e is not None:
        print(f"torch {torch.__version__}, threads={args.threads}, delta {args.e2e}, batch {args.batch}, "
              f"{args.new_tokens} new tokens, best of {min(args.reps, 3)} after a warm-up")
        rows = e2e(args.e2e, args.modes.split(","), args.batch, args.new_tokens, min(args.reps, 3))
    else:
        print(f"torch {torch.__version__}, threads={args.threads}, best of 5 x {args.reps} calls")
        rows = run(args.reps)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
