"""Distillation on the real pair: KL(fine-tune || rebuild) before/after, held-out text of another domain.

Calibration: CPython stdlib ``*.py`` files of the fine-tune's training split (zlib.crc32(basename) % 10 != 0).
Held-out evaluation: the license texts in /usr/share/common-licenses (English prose, a different domain).
Usage: python benchmarks/bench_distill.py OUT_JSON [codec:loss:steps:lr ...]
"""
import glob, json, os, sys, time, zlib
from pathlib import Path

import torch

torch.set_num_threads(2)
from deltahub import Delta, compress
from deltahub.distill import distill, token_blocks
from deltahub.evaluation import mean_token_kl
from transformers import AutoModelForCausalLM, AutoTokenizer

BASE = "/root/.cache/deltahub/demo/base"
FT = "/root/.cache/deltahub/demo/finetune-s60-lr0.0001"
STDLIB = "/root/.pyenv/versions/3.11.7/lib/python3.11"
calib = sorted(p for p in glob.glob(f"{STDLIB}/*.py") if zlib.crc32(os.path.basename(p).encode()) % 10 != 0)
held_files = sorted(glob.glob("/usr/share/common-licenses/*"))
tok = AutoTokenizer.from_pretrained(FT)
held = token_blocks([Path(p).read_text(errors="replace") for p in held_files if os.path.isfile(p)], tok, 128, 64 * 128)
teacher = AutoModelForCausalLM.from_pretrained(FT, dtype=torch.float32).eval()
results = []
for spec in sys.argv[2:]:
    codec, loss, steps, lr = spec.split(":")
    out = Path(f"/tmp/dist/{codec}")
    if not out.exists():
        kw = {} if codec == "bitdelta" else {"codec": "deltadq", "preset": "16x"}
        compress(BASE, FT, out, progress=False, **kw)
    kl0 = mean_token_kl(teacher, Delta(out).to_model(BASE, progress=False), held)
    dst = Path(f"/tmp/dist/{codec}-{loss}-{steps}-{lr}")
    t0 = time.perf_counter()
    m = distill(out, BASE, FT, calib, steps=int(steps), lr=float(lr), loss=loss, output_dir=dst, progress=False)
    wall = time.perf_counter() - t0
    kl1 = mean_token_kl(teacher, Delta(dst).to_model(BASE, progress=False), held)
    r = {"codec": codec, "loss": loss, "steps": int(steps), "lr": float(lr), "kl_before": kl0, "kl_after": kl1,
         "reduction": 1 - kl1 / kl0, "wall_s": wall, "bytes": m.totals.get("stored_bytes"),
         "initial_loss": m.distillation["initial_loss"], "final_loss": m.distillation["final_loss"]}
    print(json.dumps(r), flush=True)
    results.append(r)
    Path(sys.argv[1]).write_text(json.dumps(results, indent=1))
