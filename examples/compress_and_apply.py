"""Compress a (base, fine-tune) pair with BitDelta, inspect the delta, and rebuild the fine-tune.

    python examples/compress_and_apply.py BASE_DIR FINETUNED_DIR [WORK_DIR]

With no arguments it uses the demo pair (SmolLM2-135M + a stdlib fine-tune; built and cached
on first use, see `deltahub demo`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from rich.console import Console
from transformers import AutoTokenizer

from deltahub.compression import compress
from deltahub.delta import Delta, load_model
from deltahub.policy import Policy, Rule
from deltahub.report import storage_table


def main() -> None:
    if len(sys.argv) >= 3:
        base, ft = Path(sys.argv[1]), Path(sys.argv[2])
    else:
        from deltahub.demo import build_pair

        base, ft = build_pair()
    work = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("deltahub-example")

    # 1-bit deltas with one scale per output row for the block matrices; keep the rest exact.
    policy = Policy(codec="bitdelta", params={"granularity": "row"},
                    rules=[Rule.parse("*.self_attn.o_proj.weight=bitdelta:granularity=group,group_size=64")])
    manifest = compress(base, ft, work / "delta", policy=policy, overwrite=True)
    Console().print(storage_table(manifest, title="delta"))

    # Rebuild the fine-tune in memory (a transformers model) and use it.
    model = load_model(work / "delta", base)
    tok = AutoTokenizer.from_pretrained(work / "delta")  # tokenizer files travel with the delta
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    print(tok.decode(out[0]))

    # Or write a complete model directory that any transformers code loads.
    Delta(work / "delta").apply(base, work / "rebuilt", overwrite=True)
    print(f"rebuilt model directory: {work / 'rebuilt'}")


if __name__ == "__main__":
    main()
