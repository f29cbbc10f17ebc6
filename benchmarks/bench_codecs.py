"""Codec throughput on the real pair's 210 transformer-block matrices, one torch thread.

Times only the codec work, tensors already in memory: ``encode`` (delta, scales, packing, masks,
codes) and ``reconstruct`` (decode + add to the base, cast to the checkpoint dtype). Throughput is
in GB/s of the fp16 weights processed (``2 * numel`` bytes), the unit of the foundation issue's
target. The end-to-end ``compress`` / ``apply`` (reading, sha256 of the base, writing) is in
``bench_real_pair.py``. Writes ``benchmarks/codecs.md``.

    python benchmarks/bench_codecs.py [--dtypes float32,bfloat16] [--codecs bitdelta,...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

#: label -> (codec, params)
CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "bitdelta tensor": ("bitdelta", {"granularity": "tensor"}),
    "bitdelta row": ("bitdelta", {"granularity": "row"}),
    "bitdelta group128": ("bitdelta", {"granularity": "group", "group_size": 128}),
    "deltadq 16x": ("deltadq", {"preset": "16x"}),
    "deltadq 128x": ("deltadq", {"preset": "128x"}),
    "dare p0.9": ("dare", {"p": 0.9}),
    "topk-ternary 0.1": ("topk-ternary", {"density": 0.1}),
    "raw (xor+zstd)": ("raw", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "codecs.md")
    a = ap.parse_args()
    torch.set_num_threads(1)

    from deltahub.codecs import get_codec
    from deltahub.codecs.base import EncodeInput
    from deltahub.demo import build_pair
    from deltahub.format.io import Checkpoint
    from deltahub.policy import in_transformer_block_matrix
    from deltahub.report import markdown_table

    base_dir, ft_dir = build_pair(steps=a.steps)
    bc, fc = Checkpoint(base_dir), Checkpoint(ft_dir)
    names = [n for n in fc.keys() if in_transformer_block_matrix(n, len(fc.info(n).shape))]
    pairs32 = [(n, bc.read(n), fc.read(n)) for n in names]
    numel = sum(b.numel() for _, b, _ in pairs32)
    fp16_gb = 2 * numel / 1e9
    rows = []
    for dtype_name in a.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        pairs = [(n, b.to(dtype), f.to(dtype)) for n, b, f in pairs32]
        for label in a.codecs.split(","):
            cname, params = CODECS[label]
            codec = get_codec(cname)
            prm = codec.validate_params(dict(params))
            n0, b0, f0 = pairs[0]  # warm-up: first-call allocations and dispatch stay out of the timing
            e0 = codec.encode(EncodeInput(n0, f0, b0), prm)
            codec.reconstruct(e0.tensors, e0.params, b0, tuple(f0.shape), dtype)
            t_enc = t_rec = float("inf")
            for _ in range(a.repeats):  # the fastest of a few passes: allocator and page-fault noise is large here
                t0 = time.perf_counter()
                encoded = [codec.encode(EncodeInput(n, f, b), prm) for n, b, f in pairs]
                t_enc = min(t_enc, time.perf_counter() - t0)
                t0 = time.perf_counter()
                for (n, b, f), enc in zip(pairs, encoded):
                    codec.reconstruct(enc.tensors, enc.params, b, tuple(f.shape), dtype)
                t_rec = min(t_rec, time.perf_counter() - t0)
            stored = sum(e.nbytes for e in encoded)
            rows.append({"dtype": dtype_name, "codec": label, "bits/weight": f"{8 * stored / numel:.3f}",
                         "encode s": f"{t_enc:.2f}", "encode GB/s fp16": f"{fp16_gb / t_enc:.2f}",
                         "reconstruct s": f"{t_rec:.2f}", "reconstruct GB/s fp16": f"{fp16_gb / t_rec:.2f}"})
            print(rows[-1], flush=True)
            del encoded
    cpu = platform.processor() or platform.machine()
    text = "\n".join([
        "# Codec throughput",
        "",
        f"{len(names)} transformer-block matrices of the real pair ({numel:,} weights, {fp16_gb:.3f} GB as fp16), "
        "in memory, one torch thread; base and fine-tune cast to the dtype shown; the fastest of "
        f"{a.repeats} passes. "
        f"Run {dt.date.today().isoformat()} on {platform.node() or 'unknown'} ({cpu}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}.",
        "",
        "Command: `python benchmarks/bench_codecs.py`",
        "",
        markdown_table(rows, [(k, k) for k in rows[0]]),
        "",
    ])
    a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
