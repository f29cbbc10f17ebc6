"""Resident deltas of *different* full fine-tunes of one base: per-row exactness, memory, CPU decode speed.

Uses the real pair's default (whole-model ``auto``) delta and a second real fine-tune of the same
base compressed the same way (``--delta`` may be given twice or more). Reports, best of ``--reps``:

* per-row max |logits(mixed batch) - logits(rebuilt fine-tune alone)| over a 4-row batch;
* memory of the base + N attached deltas (N = 1, 4, 16; deltas reused under other names)
  against the goal ``base * (1 + N/14)``;
* greedy decode tokens/s (``--batch`` rows, ``--new-tokens``) for the base, one attached delta
  applied to every row, and a 4-tenant mixed batch (rows of both fine-tunes and the base): the decode
  steps alone (``generate(new_tokens) - generate(1)``: the same prefill cancels) and whole ``generate``
  calls including the prefill.

    python benchmarks/bench_resident_finetunes.py --delta DIR_A --delta DIR_B [--base DIR] [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from deltahub.delta import Delta
from deltahub.resident import (
    attach_delta,
    delta_memory,
    generate,
    load_resident,
    merge_adapter,
    set_adapter,
    unmerge_adapter,
    use_adapters,
)

DEMO = Path.home() / ".cache" / "deltahub" / "demo"


def model_bytes(model: nn.Module) -> int:
    """Bytes of the distinct base tensors (parameters and buffers; tied weights once)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


def best(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, default=DEMO / "base")
    ap.add_argument("--delta", type=Path, action="append", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-max", type=int, default=16)
    ap.add_argument("--attach-max", type=int, default=16, help="deltas attached for real in the memory part")
    ap.add_argument("--skip-exact", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ids = torch.randint(100, 20000, (args.batch, 32), generator=torch.Generator().manual_seed(0))
    names = [f"ft{i}" for i in range(len(args.delta))]

    t0 = time.perf_counter()
    model = load_resident(args.base, dict(zip(names, args.delta, strict=True)))
    print(f"attach {len(names)} deltas: {time.perf_counter() - t0:.1f} s (incl. base load)")
    base_b = model_bytes(model)  # wrappers hold the base tensors; the deltas are buffers of _DeviceOnly modules
    base_b -= sum(m["delta_modules"] for m in delta_memory(model).values())  # type: ignore[union-attr]

    # exactness: each row of a mixed batch vs the rebuilt fine-tune alone
    rows = [names[i % len(names)] for i in range(args.batch - 1)] + ["__base__"]
    with torch.no_grad(), use_adapters(model, rows):
        mixed = model(input_ids=ids).logits
    for i, n in enumerate([] if args.skip_exact else rows):
        if n == "__base__":
            from transformers import AutoModelForCausalLM
            ref = AutoModelForCausalLM.from_pretrained(args.base).eval()
        else:
            ref = Delta(args.delta[names.index(n)]).to_model(args.base, progress=False)
        with torch.no_grad():
            want = ref(input_ids=ids[i:i + 1]).logits[0]
        print(f"row {i} ({n}): max |mixed - alone| = {(mixed[i] - want).abs().max().item():.2e}  (|logits| max {want.abs().max().item():.1f})")
        if n == "__base__":  # alone vs in a batch differ by the GEMM's batch-size dependent rounding: same batch here
            with torch.no_grad():
                same = ref(input_ids=ids).logits[i]
            print(f"    vs the base model on the same {args.batch}-row batch: max |diff| = {(mixed[i] - same).abs().max().item():.2e}")
        del ref

    # decode speed
    gen = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": 2, "min_new_tokens": args.new_tokens}
    toks = args.batch * args.new_tokens
    with torch.no_grad():
        set_adapter(model, None)
        t_base = best(lambda: model.generate(input_ids=ids, **gen), args.reps)
        set_adapter(model, names[0])
        t_one = best(lambda: model.generate(input_ids=ids, **gen), args.reps)
        t_mix = best(lambda: generate(model, input_ids=ids, adapter_names=rows, **gen), args.reps)
        t0 = time.perf_counter()
        merge_adapter(model, names[0])  # one adapter for every row: its deltas written into the base weights
        t_merge = time.perf_counter() - t0
        t_merged = best(lambda: model.generate(input_ids=ids, **gen), args.reps)
        t0 = time.perf_counter()
        unmerge_adapter(model)
        t_unmerge = time.perf_counter() - t0
    # decode steps alone: generate(new_tokens) - generate(1) is new_tokens - 1 steps after the same prefill
    one = {**gen, "max_new_tokens": 1, "min_new_tokens": 1}
    steps = args.batch * (args.new_tokens - 1)
    with torch.no_grad():
        set_adapter(model, None)
        d_base = t_base - best(lambda: model.generate(input_ids=ids, **one), args.reps)
        set_adapter(model, names[0])
        d_one = t_one - best(lambda: model.generate(input_ids=ids, **one), args.reps)
        d_mix = t_mix - best(lambda: generate(model, input_ids=ids, adapter_names=rows, **one), args.reps)
        set_adapter(model, None)
    print(f"decode steps only (generate({args.new_tokens}) - generate(1)), tok/s: base {steps / d_base:.1f}, "
          f"1 delta {steps / d_one:.1f} ({d_base / d_one:.0%}), mixed {steps / d_mix:.1f} ({d_base / d_mix:.0%})")
    print(f"generate incl. prefill, tok/s (batch {args.batch}, {args.new_tokens} new, best of {args.reps}): base {toks / t_base:.1f}, "
          f"1 delta {toks / t_one:.1f} ({t_base / t_one:.0%}), 1 delta merged {toks / t_merged:.1f} ({t_base / t_merged:.0%}; "
          f"merge {t_merge:.2f} s, unmerge {t_unmerge:.2f} s), mixed {rows} {toks / t_mix:.1f} ({t_base / t_mix:.0%})")

    # memory for N attached deltas: the given deltas reused under other names, up to --attach-max
    # attached for real; beyond that N copies cost N times one copy (each attach holds its own)
    for n in (1, 4, args.n_max):
        while len(names) < min(n, args.attach_max):
            attach_delta(model, args.delta[len(names) % len(args.delta)], f"ft{len(names)}", check_base=False)
            names.append(f"ft{len(names)}")
        per = [delta_memory(model, names[i % len(names)])["total"] for i in range(n)]  # type: ignore[index]
        mem = sum(per)
        goal = base_b * (1 + n / 14)
        how = "attached" if n <= len(names) else f"{len(names)} attached, rest counted per copy"
        print(f"N={n:2d} ({how}): base {base_b / 2**20:.1f} MiB + deltas {mem / 2**20:.1f} MiB = {(base_b + mem) / 2**20:.1f} MiB "
              f"(goal <= {goal / 2**20:.1f} MiB: {'met' if base_b + mem <= goal else 'NOT met'})")

if __name__ == "__main__":
    main()
