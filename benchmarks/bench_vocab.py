"""Codecs for the vocabulary matrix, compared at equal bytes on the real pair's tied embedding.

For byte budgets of 1/16 ... 1/128 of ``model.embed_tokens.weight``'s fp16 size (49152 x 576),
codes its delta with ``rowsparse`` (every bits setting at the largest density that fits, with
MSE-fitted and absmax scales), the ``deltadq`` preset of the same ratio and ``bitdelta`` row-wise,
then measures the relative L2 error of the delta for every setting, and KL(fine-tune || rebuilt)
per token on held-out stdlib text for the references, the deltadq preset and the ``--kl-per-budget``
rowsparse settings of lowest L2 error per budget, with every other tensor of the fine-tune kept
exact (the embedding is tied, so the LM head changes with it). Writes
``benchmarks/vocab_results.json`` and prints the table of ``benchmarks/vocab.md``.

    python benchmarks/bench_vocab.py [--eval-blocks 4] [--kl-per-budget 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from deltahub.codecs import EncodeInput, get_codec  # noqa: E402
from deltahub.codecs.rowsparse import kept_rows, max_nbytes  # noqa: E402

NAME = "model.embed_tokens.weight"
RATIOS = (16, 32, 64, 128)
DEMO = Path.home() / ".cache" / "deltahub" / "demo"


def largest_density(shape: tuple[int, int], bits: int, budget: int, group_size: int | None = None) -> float | None:
    """The largest density (a multiple of 1/rows) whose bitmap-mask size fits ``budget`` bytes."""
    rows = shape[0]
    lo, hi = 0, rows
    while lo < hi:  # largest K with size(K) <= budget
        mid = (lo + hi + 1) // 2
        if max_nbytes(shape, {"density": mid / rows, "bits": bits, "group_size": group_size}) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return None
    density = lo / rows
    assert kept_rows(density, rows) == lo
    return density


def candidates(shape: tuple[int, int], ratio: int) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, codec, params)`` fitting ``fp16 bytes / ratio``."""
    budget = shape[0] * shape[1] * 2 // ratio
    out: list[tuple[str, str, dict[str, Any]]] = []
    for bits in (1, 2, 3, 4, 8):
        d = largest_density(shape, bits, budget)
        if d is not None:
            out.append((f"rowsparse b={bits} d={d:.3f}", "rowsparse", {"density": d, "bits": bits, "mask_encoding": "bitmap"}))
            if bits in (2, 3) and ratio in (16, 32):
                out.append((f"rowsparse b={bits} d={d:.3f} absmax", "rowsparse",
                            {"density": d, "bits": bits, "mask_encoding": "bitmap", "scale_fit": "absmax"}))
    d = largest_density(shape, 1, budget, group_size=64)
    if d is not None and ratio == 16:
        out.append((f"rowsparse b=1 d={d:.3f} g=64", "rowsparse", {"density": d, "bits": 1, "group_size": 64,
                                                                  "mask_encoding": "bitmap"}))
    if ratio == 16:
        best = max((c for c in out if c[2]["bits"] == 2 and "absmax" not in c[0]), key=lambda c: c[2]["density"])
        out.append((best[0] + " zstd", "rowsparse", {**best[2], "entropy": "zstd"}))
    out.append((f"deltadq {ratio}x", "deltadq", {"preset": f"{ratio}x"}))
    return out


def heldout_blocks(ft_dir: Path, n: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from deltahub.demo import stdlib_corpus

    _, heldout = stdlib_corpus(AutoTokenizer.from_pretrained(ft_dir), block_size=512)
    return heldout[:n]


@torch.no_grad()
def kl_vs_reference(model: torch.nn.Module, blocks: torch.Tensor, ref: list[torch.Tensor]) -> float:
    """Mean per-token KL(ref || model) (nats), ``ref`` the fine-tune's float32 log-probs per block."""
    total, count = 0.0, 0
    for i, block in enumerate(blocks):
        logp = F.log_softmax(model(input_ids=block[None], use_cache=False).logits[0, :-1].float(), dim=-1)
        total += float((ref[i].exp() * (ref[i] - logp)).sum(dtype=torch.float64))
        count += logp.shape[0]
    return total / count


def render(data: dict[str, Any]) -> str:
    """The results table (markdown), one block per budget, best KL first."""
    lines = ["| budget | setting | bytes | vs fp16 | rel. L2 error of the delta | KL(fine-tune ‖ rebuilt) |", "|---|---|---:|---:|---:|---:|"]
    order = [None] + [f"1/{r}" for r in RATIOS]
    for budget in order:
        rows = [r for r in data["results"] if r["budget"] == budget]
        rows.sort(key=lambda r: (r.get("kl", math.inf), r["rel_l2"]))
        for r in rows:
            kl = f"{r['kl']:.5f}" if "kl" in r else "–"
            ratio = f"{r['ratio_vs_fp16']:.1f}x" if r["bytes"] else "–"
            lines.append(f"| {budget or 'reference'} | `{r['label']}` | {r['bytes']:,} | {ratio} | {r['rel_l2']:.3f} | {kl} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-blocks", type=int, default=4)
    ap.add_argument("--kl-per-budget", type=int, default=2, help="rowsparse settings per budget whose KL is measured "
                    "(those of lowest relative L2 error); every setting gets the L2 error")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetune", default="finetune-s60-lr0.0001")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from safetensors.torch import load_file

    base_dir, ft_dir = DEMO / "base", DEMO / a.finetune
    base_w = load_file(base_dir / "model.safetensors")[NAME]
    ft_w = load_file(ft_dir / "model.safetensors")[NAME]
    delta = ft_w - base_w
    shape = tuple(ft_w.shape)
    fp16 = shape[0] * shape[1] * 2
    norms2 = delta.norm(dim=1).double() ** 2
    energy = norms2.sort(descending=True).values.cumsum(0) / norms2.sum()
    share = {f"top{int(f * 100)}%": float(energy[int(f * shape[0]) - 1]) for f in (0.01, 0.1, 0.25, 0.5)}
    print("delta energy in the top rows:", share, flush=True)
    out = HERE / "vocab_results.json"
    results: list[dict[str, Any]] = []
    rebuilt: dict[str, torch.Tensor] = {"base embedding (delta dropped)": base_w}
    results.append({"label": "base embedding (delta dropped)", "bytes": 0, "rel_l2": 1.0, "budget": None})

    def run(label: str, cname: str, params: dict[str, Any], budget: str | None) -> None:
        c = get_codec(cname)
        t0 = time.perf_counter()
        enc = c.encode(EncodeInput(NAME, ft_w, base_w), c.validate_params(params))
        seconds = time.perf_counter() - t0
        w = c.reconstruct(enc.tensors, enc.params, base_w, shape, torch.float32)
        rebuilt[label] = w
        row = {"label": label, "budget": budget, "bytes": enc.nbytes, "ratio_vs_fp16": fp16 / enc.nbytes,
               "rel_l2": float((w - base_w - delta).norm() / delta.norm()), "encode_s": round(seconds, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)

    run("bitdelta row", "bitdelta", {"granularity": "row"}, None)
    for ratio in RATIOS:
        for label, cname, params in candidates(shape, ratio):
            run(label, cname, params, f"1/{ratio}")
    out.write_text(json.dumps({"energy_share": share, "results": results}, indent=1) + "\n")
    # KL(fine-tune || rebuilt) for the references, deltadq and the best rowsparse settings of each budget.
    chosen = ["base embedding (delta dropped)", "bitdelta row"]
    for ratio in RATIOS:
        rows = [r for r in results if r["budget"] == f"1/{ratio}"]
        rs = sorted((r for r in rows if r["label"].startswith("rowsparse") and "zstd" not in r["label"]), key=lambda r: r["rel_l2"])
        chosen += [r["label"] for r in rs[: a.kl_per_budget]] + [r["label"] for r in rows if r["label"].startswith("deltadq")]
    evaluate_kl(ft_dir, a.eval_blocks, chosen, rebuilt, results)
    out.write_text(json.dumps({"energy_share": share, "eval_tokens": a.eval_blocks * 511, "results": results}, indent=1) + "\n")
    print("wrote", out)
    print(render(json.loads(out.read_text())))


def evaluate_kl(ft_dir: Path, n_blocks: int, labels: list[str], rebuilt: dict[str, torch.Tensor],
                results: list[dict[str, Any]]) -> None:
    """Fill ``kl`` of the ``labels`` rows: the fine-tune with only its (tied) embedding replaced."""
    from deltahub.demo.pair import load_model

    model = load_model(ft_dir)
    assert model.config.tie_word_embeddings, "the benchmark assumes a tied embedding"
    blocks = heldout_blocks(ft_dir, n_blocks)
    with torch.no_grad():
        ref = [F.log_softmax(model(input_ids=b[None], use_cache=False).logits[0, :-1].float(), dim=-1) for b in blocks]
    emb = model.get_input_embeddings().weight
    by_label = {r["label"]: r for r in results}
    for label in labels:
        with torch.no_grad():
            emb.copy_(rebuilt[label])
        t0 = time.perf_counter()
        by_label[label]["kl"] = kl_vs_reference(model, blocks, ref)
        print(f"KL {label}: {by_label[label]['kl']:.5f} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
