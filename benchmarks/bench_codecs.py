"""Codec throughput on the real pair's 210 transformer-block matrices, one torch thread.

Times only the codec work, tensors already in memory: ``encode`` (delta, scales, packing, masks,
codes) and ``reconstruct`` (decode + add to the base, cast to the checkpoint dtype). Throughput is
in GB/s of the fp16 weights processed (``2 * numel`` bytes), the unit of the foundation issue's
target. The end-to-end ``compress`` / ``apply`` (reading, sha256 of the base, writing) is in
``bench_real_pair.py``. Writes ``benchmarks/codecs.md``.

    python benchmarks/bench_codecs.py [--dtypes float32,bfloat16] [--codecs bitdelta,...]

``--deltadq LABEL`` instead times the DeltaDQ presets on *every* matrix of the real pair (the
49152x576 embedding too) and optionally a synthetic big-vocab matrix, at 1 and 2 torch threads,
stores the result under ``LABEL`` in ``benchmarks/codecs_deltadq.json`` and rewrites the
"DeltaDQ presets" section of ``codecs.md`` from all stored labels (e.g. ``before`` and ``after``;
``--src DIR`` imports ``deltahub`` from another checkout, to time an older version):

    python benchmarks/bench_codecs.py --deltadq after [--threads 1,2] [--synthetic 262144x640]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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
    ap.add_argument("--deltadq", metavar="LABEL", help="time the DeltaDQ presets instead (see the module doc)")
    ap.add_argument("--presets", default="16x,32x,64x,128x,512x")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--synthetic", default="", help="also a random ROWSxCOLS matrix, e.g. 262144x640")
    ap.add_argument("--src", type=Path, help="import deltahub from this checkout (--deltadq only)")
    a = ap.parse_args()
    if a.deltadq:
        bench_deltadq(a)
        return
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


DELTADQ_JSON = HERE / "codecs_deltadq.json"
DELTADQ_HEADING = "## DeltaDQ presets"


def _deltadq_sets(steps: int, synthetic: str) -> dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """Tensor sets: every 2-D tensor of the real pair, and the synthetic matrix if asked (float32)."""
    from deltahub.demo import build_pair
    from deltahub.format.io import Checkpoint

    base_dir, ft_dir = build_pair(steps=steps)
    bc, fc = Checkpoint(base_dir), Checkpoint(ft_dir)
    names = [n for n in fc.keys() if len(fc.info(n).shape) == 2]
    sets = {"real pair, all matrices": [(n, bc.read(n).float(), fc.read(n).float()) for n in names]}
    if synthetic:
        rows, cols = (int(x) for x in synthetic.split("x"))
        g = torch.Generator().manual_seed(0)
        base = torch.randn(rows, cols, generator=g) * 0.02
        sets[f"synthetic {rows}x{cols}"] = [("lm_head.weight", base, base + torch.randn(rows, cols, generator=g) * 1e-4)]
    return sets


def _time_deltadq(pairs: list, preset: str, repeats: int) -> dict[str, float]:
    """Best wall and CPU seconds of encode and decode of one preset over a tensor set, and the stored bytes."""
    from deltahub.codecs import get_codec
    from deltahub.codecs.base import EncodeInput

    codec = get_codec("deltadq")
    prm = codec.validate_params({"preset": preset})
    best = dict.fromkeys(("encode_s", "encode_cpu_s", "decode_s", "decode_cpu_s"), float("inf"))
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        encoded = [codec.encode(EncodeInput(n, f, b), prm) for n, b, f in pairs]
        w1, c1 = time.perf_counter(), time.process_time()
        for (n, b, f), enc in zip(pairs, encoded):
            codec.decode_delta(enc.tensors, enc.params, tuple(f.shape))
        w2, c2 = time.perf_counter(), time.process_time()
        for key, val in (("encode_s", w1 - w0), ("encode_cpu_s", c1 - c0), ("decode_s", w2 - w1), ("decode_cpu_s", c2 - c1)):
            best[key] = min(best[key], val)
    best["nbytes"] = sum(e.nbytes for e in encoded)
    return best


def bench_deltadq(a: argparse.Namespace) -> None:
    """Time every preset at every thread count; store under the label; rewrite the codecs.md section."""
    if a.src:
        sys.path.insert(0, str(a.src.resolve()))
        for mod in [m for m in sys.modules if m == "deltahub" or m.startswith("deltahub.")]:
            del sys.modules[mod]
    sets = _deltadq_sets(a.steps, a.synthetic)
    stored = json.loads(DELTADQ_JSON.read_text()) if DELTADQ_JSON.exists() else {}
    rows = stored.get(a.deltadq, {}).get("rows", [])
    for threads in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(threads)
        for set_name, pairs in sets.items():
            numel = sum(b.numel() for _, b, _ in pairs)
            for preset in a.presets.split(","):
                got = _time_deltadq(pairs, preset, a.repeats)
                row = {"set": set_name, "preset": preset, "threads": threads, "numel": numel,
                       "bits_per_weight": 8 * got.pop("nbytes") / numel, **got, "load": os.getloadavg()[0]}
                rows[:] = [r for r in rows if (r["set"], r["preset"], r["threads"]) != (set_name, preset, threads)]
                rows.append(row)
                print(row, flush=True)
    results = json.loads(DELTADQ_JSON.read_text()) if DELTADQ_JSON.exists() else {}  # re-read: runs may overlap
    results[a.deltadq] = {"date": dt.date.today().isoformat(), "rows": rows}
    DELTADQ_JSON.write_text(json.dumps(results, indent=1) + "\n")
    _write_deltadq_section(a.out, results)


def _write_deltadq_section(out: Path, results: dict) -> None:
    """Replace (or append) the DeltaDQ section of codecs.md: GB/s of fp16 weights per label."""
    from deltahub.report import markdown_table

    labels = sorted(results, key=lambda lab: lab != "before")  # before first, then in run order
    keys = sorted({(r["set"], r["preset"], r["threads"]) for lab in labels for r in results[lab]["rows"]},
                  key=lambda k: (k[0], k[2], float(k[1].rstrip("x"))))
    table = []
    for key in keys:
        got = {lab: next((r for r in results[lab]["rows"] if (r["set"], r["preset"], r["threads"]) == key), None)
               for lab in labels}
        row = {"tensors": key[0], "preset": key[1], "threads": str(key[2])}
        for what in ("encode", "decode"):
            row[f"{what} GB/s fp16, wall [cpu]"] = " -> ".join(
                f"{2 * r['numel'] / 1e9 / r[what + '_s']:.3f} [{2 * r['numel'] / 1e9 / r[what + '_cpu_s']:.3f}]"
                if r else "-" for r in got.values())
        row["bits/weight"] = next(f"{r['bits_per_weight']:.3f}" for r in reversed(got.values()) if r)
        table.append(row)
    section = "\n".join([
        DELTADQ_HEADING, "",
        "Codec time only (tensors in memory as float32; `encode` = group-size choice, mask, k-means, "
        "packing, zstd; `decode` = `decode_delta`), in GB/s of the fp16 weights (`2 * numel` bytes), "
        "by wall time and [by CPU time of the process, all threads], each the fastest of the passes, "
        f"columns {' -> '.join(labels)} "
        f"({', '.join(lab + ': ' + results[lab]['date'] for lab in labels)}). "
        "Timed on a 2-core VM shared with other jobs (load average 5-17 during these runs, in "
        "`codecs_deltadq.json`): wall times are inflated, CPU times are the steadier measure.", "",
        "Commands: `python benchmarks/bench_codecs.py --deltadq after`; `--src DIR --deltadq before` with DIR "
        "a checkout of the older code.", "",
        markdown_table(table, [(k, k) for k in table[0]]), "",
        *[f"- {lab}: {note}" for lab in labels for note in results[lab].get("notes", [])], ""])
    text = out.read_text() if out.exists() else "# Codec throughput\n"
    head = text.split(DELTADQ_HEADING)[0].rstrip("\n")
    out.write_text(head + "\n\n" + section)


if __name__ == "__main__":
    main()
