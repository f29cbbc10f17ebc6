"""Benchmark resident deltas: one base + N attached deltas vs N fully rebuilt models.

Measures model memory (bytes of distinct tensor storages; the same for RSS up to allocator
overhead) and throughput (prefill tokens/s of a ``[batch, seq]`` forward, and greedy decode
tokens/s with ``generate``) for: the plain base, a full rebuild, the resident model with one
adapter active, and a mixed batch spread over N adapters (resident: one pass; full models: one
pass per model over its rows).

Real pair (``~/.cache/deltahub/demo/{base,finetune-s60-lr0.0001}``, made by ``deltahub demo``)
when present, else a tiny random Llama. The real pair has one fine-tune, so its delta is attached
N times under different names (each adapter holds its own copy, as distinct fine-tunes would).

    python benchmarks/bench_resident.py [--n 4] [--batch 4] [--seq 128] [--new-tokens 16] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from deltahub.compression import compress  # noqa: E402
from deltahub.delta import Delta  # noqa: E402
from deltahub.resident import adapter_nbytes, attach_delta, set_adapter, use_adapters  # noqa: E402

DEMO = Path.home() / ".cache" / "deltahub" / "demo"


def model_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers (tied weights once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def resident_bytes(model: nn.Module, names: list[str]) -> tuple[int, int]:
    """(base bytes, adapters bytes): the base storages plus every adapter's delta modules and raw tensors."""
    adapters = sum(adapter_nbytes(model, n)["delta_modules"] + adapter_nbytes(model, n)["raw"] for n in names)
    base = model_bytes(model) - sum(adapter_nbytes(model, n)["delta_modules"] for n in names)
    return base, adapters


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Best-of-``reps`` wall seconds of ``fn`` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def pair_dirs(tiny: bool, work: Path) -> tuple[Path, Path]:
    """(base, delta) directories: the demo pair's (compressing it when needed) or a tiny random pair."""
    if not tiny and (DEMO / "base").is_dir() and (DEMO / "finetune-s60-lr0.0001").is_dir():
        delta = DEMO / "delta-bitdelta"
        if not (delta / "delta_config.json").is_file():
            delta = work / "delta"
            compress(DEMO / "base", DEMO / "finetune-s60-lr0.0001", delta, codec="bitdelta", params={"granularity": "row"}, progress=False)
        return DEMO / "base", delta
    from conftest import make_tiny_pair

    base, ft = make_tiny_pair(work, seed=0)
    compress(base, ft, work / "delta", codec="bitdelta", params={"granularity": "row"}, progress=False)
    return base, work / "delta"


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4, help="number of resident adapters / full models")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tiny", action="store_true", help="use a tiny random Llama even when the demo pair exists")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        base_dir, delta_dir = pair_dirs(args.tiny, Path(tmp))
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto").eval()
        full = Delta(delta_dir).to_model(base_dir).eval()
        resident = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto").eval()
        names = [f"ft{i}" for i in range(args.n)]
        t0 = time.perf_counter()
        for n in names:
            attach_delta(resident, delta_dir, n)
        attach_s = (time.perf_counter() - t0) / args.n

        vocab = base.config.vocab_size
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        prompt = ids[:, :8]
        gen_kw = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                  "pad_token_id": 0}

        def prefill(m: nn.Module) -> Callable[[], Any]:
            return lambda: m(input_ids=ids)

        def decode(m: nn.Module) -> Callable[[], Any]:
            return lambda: m.generate(input_ids=prompt, **gen_kw)

        rows = {}
        set_adapter(resident, names[0])
        mixed = [names[i % args.n] for i in range(args.batch)]
        # check: resident == full rebuild (float32 rounding only)
        err = float((resident(input_ids=ids).logits - full(input_ids=ids).logits).abs().max())
        for label, model in (("base", base), ("full rebuild", full), ("resident, 1 adapter", resident)):
            rows[label] = (timed(prefill(model), args.reps), timed(decode(model), args.reps))
        with use_adapters(resident, mixed):
            rows[f"resident, mixed batch over {min(args.n, args.batch)} adapters"] = (
                timed(prefill(resident), args.reps), timed(decode(resident), args.reps))
        groups = sorted(set(mixed))
        sub_ids = [ids[[i for i, n in enumerate(mixed) if n == g]] for g in groups]
        sub_prompt = [prompt[[i for i, n in enumerate(mixed) if n == g]] for g in groups]
        rows[f"{len(groups)} full models, one pass each"] = (
            timed(lambda: [full(input_ids=s) for s in sub_ids], args.reps),
            timed(lambda: [full.generate(input_ids=s, **gen_kw) for s in sub_prompt], args.reps),
        )

        base_b, adapters_b = resident_bytes(resident, names)
        per = adapter_nbytes(resident, names[0])
        full_b = model_bytes(full)
        mb = 1 / 2**20
        print(f"pair: {base_dir} + {delta_dir}  ({'tiny' if args.tiny or 'demo' not in str(base_dir) else 'real'}), "
              f"threads={args.threads}, batch={args.batch}, seq={args.seq}, new_tokens={args.new_tokens}")
        print(f"max |logits resident - full rebuild| = {err:.2e}; attach time per delta {attach_s:.2f} s")
        print("\nmemory")
        print(f"  base model                              {base_b * mb:9.1f} MiB")
        print(f"  per adapter: delta modules {per['delta_modules'] * mb:.1f} MiB (of which scales {per['scales'] * mb:.2f}), "
              f"raw tensors {per['raw'] * mb:.1f} MiB; covers {per['covered_weights'] * mb:.1f} MiB of Linear weights "
              f"(ratio 1/{per['covered_weights'] / max(per['delta_modules'], 1):.1f})")
        print(f"  base + {args.n} resident adapters            {(base_b + adapters_b) * mb:9.1f} MiB")
        print(f"  {args.n} full models                          {args.n * full_b * mb:9.1f} MiB")
        print("\nthroughput (best of reps)          prefill tok/s   decode tok/s")
        for label, (p, d) in rows.items():
            print(f"  {label:42s} {args.batch * args.seq / p:10.0f} {args.batch * args.new_tokens / d:12.1f}")
        summary = {"memory_mib": {"base": base_b * mb, "resident_total": (base_b + adapters_b) * mb,
                                  "full_total": args.n * full_b * mb, "per_adapter": {k: v * mb for k, v in per.items()}},
                   "prefill_tok_s": {k: args.batch * args.seq / v[0] for k, v in rows.items()},
                   "decode_tok_s": {k: args.batch * args.new_tokens / v[1] for k, v in rows.items()},
                   "max_abs_logit_diff": err}
        print("\n" + json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
