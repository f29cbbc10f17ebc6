"""compress wall time: the default whole-model policy (auto) vs each single codec it chooses among (issue 9's
goal: the budget search <= 3x the slowest single codec), one process, the base's digests cached by a warm-up run.

    python benchmarks/bench_auto_search.py      # needs `deltahub demo`'s pair in ~/.cache/deltahub/demo
"""
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from deltahub.compression import compress
D = Path.home() / ".cache/deltahub/demo"
base, ft = D / "base", D / "finetune-s60-lr0.0001"
runs = [("auto (default policy)", None, None),
        ("bitdelta row", "bitdelta", {"granularity": "row"}),
        ("deltadq p0.5 4b 2 parts", "deltadq", {"p": 0.5, "bits": 4, "parts": 2}),
        ("deltadq 16x", "deltadq", {"preset": "16x"}),
        ("deltadq 128x", "deltadq", {"preset": "128x"}),
        ("deltadq 512x", "deltadq", {"preset": "512x"}),
        ("lowrank r16", "lowrank", {"rank": 16}),
        ("lowrank-mp r8", "lowrank-mp", {"preset": "r8"}),
        ("lowrank-residual r4", "lowrank-residual", {"rank": 4})]
out = {}
tmp = Path(tempfile.mkdtemp())
compress(base, ft, tmp / "warm", codec="bitdelta", params={"granularity": "row"}, progress=False)  # digest cache, imports
for label, codec, params in runs:
    d = tmp / label.replace(" ", "_")
    t0 = time.perf_counter()
    kw = {} if codec is None else {"codec": codec, "params": params}
    try:
        compress(base, ft, d, progress=False, **kw)
    except Exception as exc:
        print(label, "FAILED", type(exc).__name__, exc); continue
    out[label] = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    print(f"{label:28s} {out[label]:7.2f} s  {size/1e6:7.1f} MB", flush=True)
    shutil.rmtree(d)
single = {k: v for k, v in out.items() if not k.startswith("auto")}
slow = max(single, key=single.get)
print(json.dumps(out))
print(f"auto {out['auto (default policy)']:.2f} s / slowest single ({slow}) {single[slow]:.2f} s = {out['auto (default policy)']/single[slow]:.2f}x (goal <= 3x)")
