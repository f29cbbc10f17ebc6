"""Bytes vs KL of every codec family on the real pair: BitDelta, DeltaDQ, low rank, Delta-CoMe mixed-precision
low rank, low rank + 1-bit residual.

Fair setup: every block Linear (attention q/k/v/o and MLP gate/up/down of every layer: 210 matrices) is
coded with one family at one setting; embeddings and norms stay *exact* for every row (the fine-tune's
own values), so the rows differ only in how the block matrices are coded. Bytes are the stored payload of
the 210 block matrices, against their fp16 delta (the ratio column). The rebuilt model is compared with
the fine-tune on the held-out stdlib blocks with :func:`deltahub.evaluation.evaluate_models` (the same
machinery as ``bench_whole_model.py``): KL(fine-tune ‖ rebuilt) and the share of the fine-tune's held-out
loss gain kept. Each matrix's SVD is computed once (at the largest rank used) and shared by every
low-rank setting (randomised for the larger matrices, as compress does). Writes ``codec_families.json``,
``codec_families_table.md`` (quoted in ``codec_families.md``) and ``codec_families.png``.

    nice -n 10 python benchmarks/bench_codec_families.py [--eval-blocks 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
BLOCK_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                  "up_proj.weight", "down_proj.weight")
FAMILIES: list[tuple[str, str, list[dict[str, Any]]]] = [
    ("low rank (fp16)", "lowrank", [{"rank": r} for r in (4, 8, 16, 32, 64)]),
    ("low rank, mixed precision (Delta-CoMe)", "lowrank-mp", [{"preset": p} for p in ("r4", "r8", "r16")]),
    ("DeltaDQ", "deltadq", [{"preset": p} for p in ("16x", "32x", "64x", "128x", "256x")]),
    ("BitDelta", "bitdelta", [{"granularity": "row"}]),
    ("low rank + 1-bit residual", "lowrank-residual", [{"rank": r} for r in (4, 16)]),
]
#: Run order: the low-rank vs mixed-precision pairs of about equal bytes first (r4 ~ rank 4, r8 ~ rank 8, ...).
ORDER = [("lowrank", 0), ("lowrank-mp", 0), ("lowrank", 1), ("lowrank-mp", 1), ("lowrank", 2), ("lowrank-mp", 2),
         ("lowrank", 3), ("lowrank", 4), ("deltadq", 0), ("deltadq", 1), ("deltadq", 2), ("deltadq", 3), ("deltadq", 4),
         ("bitdelta", 0), ("lowrank-residual", 0), ("lowrank-residual", 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=None)
    ap.add_argument("--finetuned", type=Path, default=None)
    ap.add_argument("--eval-blocks", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--from-json", type=Path, default=None, help="only redraw the table and plot from a saved run")
    a = ap.parse_args()
    if a.from_json:
        r = json.loads(a.from_json.read_text())
        _table(a.out, r)
        _plot(a.out, r)
        return

    import torch
    from transformers import AutoTokenizer

    from deltahub.codecs import EncodeInput, get_codec
    from deltahub.codecs._svd import truncated_svd
    from deltahub.demo import build_pair, stdlib_corpus
    from deltahub.demo.pair import load_model
    from deltahub.evaluation import evaluate_models

    base_dir, ft_dir = (a.base, a.finetuned) if a.base else build_pair(None, steps=60)
    tok = AutoTokenizer.from_pretrained(ft_dir)
    blocks = stdlib_corpus(tok)[1][: a.eval_blocks]
    ft, base = load_model(ft_dir), load_model(base_dir)
    ref = evaluate_models({"fine-tune": ft, "base": base}, blocks, reference="fine-tune")
    gain = ref["base"]["loss"] - ref["fine-tune"]["loss"]
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    ft_sd = {k: v.detach().clone() for k, v in ft.state_dict().items()}
    names = [n for n in ft_sd if n.endswith(BLOCK_SUFFIXES)]
    fp16 = 2 * sum(ft_sd[n].numel() for n in names)
    max_rank = max(get_codec(c).svd_rank(get_codec(c).validate_params(p)) for _, c, ps in FAMILIES for p in ps)
    t0 = time.perf_counter()
    svds = {n: truncated_svd(ft_sd[n] - base_sd[n], max_rank, exact=4 * (max_rank + 10) >= min(ft_sd[n].shape))
            for n in names}  # randomised unless the rank is a large share of the matrix, as compress's allocation
    print(f"{len(names)} SVDs in {time.perf_counter() - t0:.0f} s", flush=True)
    rebuilt = load_model(ft_dir)
    rows: list[dict[str, Any]] = []

    def _meta() -> dict[str, Any]:
        return {"fp16_block_bytes": fp16, "matrices": len(names), "eval_tokens": ref["fine-tune"]["tokens"],
                "base_loss": ref["base"]["loss"], "finetune_loss": ref["fine-tune"]["loss"], "base_kl": ref["base"]["kl"]}

    by_codec = {c: (family, settings) for family, c, settings in FAMILIES}
    for codec_name, i in ORDER:
        family, params, codec = by_codec[codec_name][0], by_codec[codec_name][1][i], get_codec(codec_name)
        t0, nbytes, sd = time.perf_counter(), 0, {}
        for n in names:
            inp = EncodeInput(n, ft_sd[n], base_sd[n])
            inp._svd = svds[n]
            enc = codec.encode(inp, codec.validate_params(dict(params)))
            nbytes += enc.nbytes
            sd[n] = base_sd[n] + codec.decode_delta(enc.tensors, enc.params, tuple(ft_sd[n].shape))
        rebuilt.load_state_dict({**ft_sd, **sd})
        res = evaluate_models({"fine-tune": ft, "rebuilt": rebuilt}, blocks, reference="fine-tune")["rebuilt"]
        row = {"family": family, "codec": codec_name, "params": params, "bytes": nbytes, "ratio": fp16 / nbytes,
               "kl": res["kl"], "loss": res["loss"], "gain_kept": (ref["base"]["loss"] - res["loss"]) / gain,
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (a.out / "codec_families.json").write_text(json.dumps({**_meta(), "rows": rows}, indent=2))
    _table(a.out, {**_meta(), "rows": rows})
    _plot(a.out, {**_meta(), "rows": rows})


def _table(out: Path, r: dict[str, Any]) -> None:
    """``codec_families_table.md``: one row per (family, setting), by family then bytes."""
    lines = [f"Held-out: {r['eval_tokens']} tokens; base loss {r['base_loss']:.4f} (KL {r['base_kl']:.4f}), fine-tune "
             f"{r['finetune_loss']:.4f}. Bytes: the {r['matrices']} block matrices' stored tensors "
             f"(fp16 delta {r['fp16_block_bytes']:,} B).", "",
             "| family | setting | bytes | vs fp16 | KL(ft ‖ rebuilt) | held-out loss | gain kept |", "|---|---|---|---|---|---|---|"]
    order = [f for f, _, _ in FAMILIES]
    for x in sorted(r["rows"], key=lambda x: (order.index(x["family"]), x["bytes"])):
        setting = ", ".join(f"{k}={v}" for k, v in x["params"].items())
        lines.append(f"| {x['family']} | {setting} | {x['bytes']:,} | {x['ratio']:.1f}x | {x['kl']:.5f} | {x['loss']:.4f} | "
                     f"{100 * x['gain_kept']:.0f}% |")
    (out / "codec_families_table.md").write_text("\n".join(lines) + "\n")


def _plot(out: Path, r: dict[str, Any]) -> None:
    """The bytes-vs-KL plot, one curve per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for family, _, _ in FAMILIES:
        pts = sorted((x["bytes"], x["kl"]) for x in r["rows"] if x["family"] == family)
        ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], "o-", label=family)
    ax.axhline(r["base_kl"], color="gray", ls="--", lw=1, label="base model (no delta)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"stored bytes of the {r['matrices']} block matrices (MB; fp16 delta {r['fp16_block_bytes'] / 1e6:.0f} MB)")
    ax.set_ylabel("KL(fine-tune ‖ rebuilt), nats/token")
    ax.set_title("SmolLM2-135M stdlib fine-tune: codec families (embeddings, norms exact)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "codec_families.png", dpi=110)


if __name__ == "__main__":
    main()
