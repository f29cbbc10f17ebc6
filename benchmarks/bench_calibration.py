"""Calibration text and the default whole-model policy: is the delta better with it than without?

Compresses the real pair with the default policy (``auto``, 20x the fp16 fine-tune), then
distils the continuous stored parameters (DeltaDQ codebooks, BitDelta row scales) on calibration
text (the fine-tune's training split of the CPython stdlib), as ``deltahub compress BASE FT -o D
--distill --calibration TEXT`` does. Both deltas are evaluated on the held-out stdlib blocks that
``bench_whole_model.py`` uses (KL(fine-tune || rebuilt), loss gain kept) and on prose of another
domain (``/usr/share/common-licenses``). Bytes are identical (only float values change).

    python benchmarks/bench_calibration.py [--steps 100] [--ratio 20] [--eval-blocks 8]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--ratio", type=float, default=20.0)
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--out", type=Path, default=HERE / "calibration.json")
    a = ap.parse_args()

    import sysconfig

    import torch
    from transformers import AutoTokenizer

    from deltahub import Delta, compress
    from deltahub.demo import build_pair, stdlib_corpus
    from deltahub.demo.pair import load_model
    from deltahub.distill import distill, token_blocks
    from deltahub.evaluation import evaluate_models

    torch.set_num_threads(2)
    base, ft = build_pair(None, steps=60)
    tok = AutoTokenizer.from_pretrained(ft)
    stdlib = sysconfig.get_paths()["stdlib"]
    calib = sorted(p for p in glob.glob(f"{stdlib}/*.py") if zlib.crc32(os.path.basename(p).encode()) % 10 != 0)
    held = {"stdlib held-out": stdlib_corpus(tok)[1][: a.eval_blocks],
            "prose (licenses)": token_blocks([Path(p).read_text(errors="replace") for p in sorted(glob.glob("/usr/share/common-licenses/*"))
                                              if os.path.isfile(p)], tok, 128, 64 * 128)}
    work = Path(tempfile.mkdtemp(prefix="deltahub-cal-"))
    plain, tuned = work / "default", work / "distilled"
    compress(base, ft, plain, target_ratio=a.ratio, progress=False)
    t0 = time.perf_counter()
    distill(plain, base, ft, calib, steps=a.steps, output_dir=tuned, progress=False)
    wall = time.perf_counter() - t0
    models = {"fine-tune": load_model(ft), "base": load_model(base)}
    models["no calibration"] = Delta(plain).to_model(base, progress=False)
    models["distilled on calibration text"] = Delta(tuned).to_model(base, progress=False)
    result = {"ratio": a.ratio, "steps": a.steps, "distill_wall_s": wall,
              "bytes": sum(p.stat().st_size for p in plain.iterdir() if p.is_file()),
              "bytes_distilled": sum(p.stat().st_size for p in tuned.iterdir() if p.is_file()), "eval": {}}
    for name, blocks in held.items():
        r = evaluate_models(models, blocks, reference="fine-tune")
        gain = r["base"]["loss"] - r["fine-tune"]["loss"]
        result["eval"][name] = {m: {"kl": v["kl"], "loss": v["loss"], "top1": v["top1_agreement"], "tokens": v["tokens"],
                                    "gain_kept": (r["base"]["loss"] - v["loss"]) / gain if gain > 0 else None}
                                for m, v in r.items()}
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
