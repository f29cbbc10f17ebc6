"""Peak memory of compress and apply against the issue-9 bound (peak RSS <= 1.5x the largest shard + imports).

The pair that stresses it: a Llama-layout bfloat16 model with Gemma-3's 262,144-token vocabulary (hidden 640,
MLP 2048, 18 layers, tied embedding: 268M parameters, one 511 MiB shard of which the embedding is 320 MiB),
the "fine-tune" adding Gaussian noise with log-normal row scales to every tensor. Made once by this script (no
download). Each compress and apply runs twice, each in a fresh process from Python after imports (page and digest caches
warm); reported: wall, peak RSS over imports (``VmHWM`` less the RSS after imports), and that over the largest
shard, for the default policy and named codecs (whose embedding is stored exactly, ``raw`` xor).
Writes ``benchmarks/memory.md`` and ``memory.json``.

    python benchmarks/bench_memory.py [--work DIR]
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
ROOT = HERE.parent

_CHILD = r"""
import json, os, shutil, sys, time
def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
from deltahub import apply_delta, compress
op, a, b, out, kw = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
shutil.rmtree(out, ignore_errors=True)
r0 = hwm(); t0 = time.perf_counter()
if op == "compress":
    compress(a, b, out, progress=False, **kw)
else:
    apply_delta(a, b, out, progress=False)
wall = time.perf_counter() - t0
size = sum(p.stat().st_size for p in __import__("pathlib").Path(out).iterdir())
print(json.dumps({"wall_s": wall, "over_imports_mib": hwm() - r0, "out_bytes": size}))
"""

CONFIGS: dict[str, dict[str, Any]] = {
    "default policy (auto)": {},
    "bitdelta": {"codec": "bitdelta"},
    "deltadq": {"codec": "deltadq"},
    "deltadq 128x": {"codec": "deltadq", "preset": "128x"},
}


def vocab_pair(work: Path) -> tuple[Path, Path]:
    """The 262k-vocabulary bf16 pair (made once into ``work``)."""
    base, ft = work / "vocab262k-base", work / "vocab262k-ft"
    if (ft / "model.safetensors").exists():
        return base, ft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=256, vocab_size=262144, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            scale = torch.exp(torch.randn(p.shape[0], *([1] * (p.dim() - 1)), generator=g) * 0.5) * 2e-3
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
    m.save_pretrained(ft)
    return base, ft


def child(op: str, a: Path, b: Path, out: Path, kw: dict[str, Any], repeats: int = 2) -> dict[str, Any]:
    """``repeats`` fresh-process runs: the best wall, the largest peak."""
    runs = []
    for _ in range(repeats):
        p = subprocess.run([sys.executable, "-c", _CHILD, op, str(a), str(b), str(out), json.dumps(kw)],
                           capture_output=True, text=True, check=True, cwd=ROOT)
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return {"wall_s": min(r["wall_s"] for r in runs), "over_imports_mib": max(r["over_imports_mib"] for r in runs),
            "out_bytes": runs[-1]["out_bytes"], "runs_wall_s": [round(r["wall_s"], 3) for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deltahub-bench-memory")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DELTAHUB_DIGEST_CACHE", str(a.work / "digests"))
    base, ft = vocab_pair(a.work)
    shard = max(p.stat().st_size for p in ft.glob("*.safetensors"))
    res: dict[str, Any] = {"date": dt.date.today().isoformat(), "largest_shard_bytes": shard,
                           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {__import__('torch').__version__}",
                           "rows": {}}
    child("compress", base, ft, a.work / "warm", {})  # warms the page and digest caches
    for label, kw in CONFIGS.items():
        d = a.work / "delta"
        c = child("compress", base, ft, d, kw)
        r = child("apply", d, base, a.work / "out", {})
        res["rows"][label] = {"compress": c, "apply": r}
        print(label, json.dumps(res["rows"][label]), flush=True)
    (HERE / "memory.json").write_text(json.dumps(res, indent=1) + "\n")
    (HERE / "memory.md").write_text(_md(res))
    print((HERE / "memory.md").read_text())


def _md(res: dict[str, Any]) -> str:
    mib = res["largest_shard_bytes"] / 2**20
    rows = []
    for label, r in res["rows"].items():
        c, p = r["compress"], r["apply"]
        rows.append(f"| {label} | {c['out_bytes'] / 1e6:.0f} | {c['wall_s']:.2f} | {c['over_imports_mib']:.0f} | "
                    f"**{c['over_imports_mib'] / mib:.2f}x** | {p['wall_s']:.2f} | {p['over_imports_mib']:.0f} | "
                    f"**{p['over_imports_mib'] / mib:.2f}x** |")
    return "\n".join([
        "# Peak memory of compress and apply (262k-vocabulary bf16 pair)", "",
        f"{res['date']}, {res['machine']}; `python benchmarks/bench_memory.py` (best wall and largest peak of 2 fresh processes, from Python "
        f"after imports, page and digest caches warm). Largest shard: {mib:.0f} MiB (the embedding alone: 320 MiB).", "",
        "| delta | delta (MB) | compress wall (s) | compress peak RSS - imports (MiB) | / largest shard | "
        "apply wall (s) | apply peak RSS - imports (MiB) | / largest shard |",
        "|---|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        "Issue 9's bound: peak RSS <= 1.5x the largest shard + imports. Named codecs store the embedding exactly "
        "(`raw` xor); the default policy codes it with 1-bit rows (`rowsparse`).", ""])


if __name__ == "__main__":
    main()
