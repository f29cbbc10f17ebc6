"""Whole-delta size vs quality: the byte allocator's curve against BitDelta with exact embeddings.

For each configuration the *whole delta directory* (stored tensors, headers, manifest, aux files)
is compared with the fp16 fine-tune (2 bytes per parameter), and the rebuilt model with the
fine-tune on held-out stdlib blocks: KL(fine-tune || rebuilt), held-out loss, share of the
fine-tune's loss gain kept. Writes ``whole_model.md``, ``whole_model.json`` and ``whole_model.png``.

    python benchmarks/bench_whole_model.py [--name smollm2-135m] [--ratios 10,20,50,100,200,500] [--eval-blocks 8]
    python benchmarks/bench_whole_model.py --name gemma3-270m --ratios 20,100 --references bitdelta

``--name`` picks the demo pair (built or reused with its default recipe unless ``--base``/``--finetuned``
are given) and whether held-out blocks start with BOS (Gemma's do, as in its fine-tune).

The allocation's measurements do not depend on the budget, so they are made once per pair
and reused across ratios (``--no-reuse`` measures every run from scratch); the compress wall
time reported for the default (20x) run is a fresh, full run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=None, help="base dir (default: the demo pair's)")
    ap.add_argument("--finetuned", type=Path, default=None)
    ap.add_argument("--ratios", default="10,20,50,100,200,500")
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--reference-configs", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--references", default="bitdelta,deltadq", help="which reference configs to run (comma list)")
    ap.add_argument("--name", default="smollm2-135m", help="demo model name (a DEMO_MODELS key) or a free label")
    ap.add_argument("--no-reuse", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE)
    a = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    import deltahub.compression as comp
    from deltahub.delta import Delta
    from deltahub.demo import build_pair, stdlib_corpus
    from deltahub.demo.pair import DEMO_MODELS, load_model
    from deltahub.evaluation import evaluate_models

    spec = DEMO_MODELS.get(a.name)
    if a.base:
        base, ft = a.base, a.finetuned
    else:
        base, ft = build_pair(None, model=spec.name if spec else "smollm2-135m")
    from deltahub.format.io import Checkpoint

    with Checkpoint(ft) as ck:  # stored tensors (a tied LM head is stored once)
        fp16 = 2 * sum(ck.info(n).numel for n in ck.keys())
    tok = AutoTokenizer.from_pretrained(ft)
    blocks = stdlib_corpus(tok, bos=bool(spec and spec.bos_per_block))[1][: a.eval_blocks]
    models = {"fine-tune": load_model(ft)}
    ref = evaluate_models({**models, "base": load_model(base)}, blocks, reference="fine-tune")
    work = Path(tempfile.mkdtemp(prefix="deltahub-wm-"))

    references = {"bitdelta": ("bitdelta, exact embeddings (BitDelta paper policy)", {"codec": "bitdelta"}),
                  "deltadq": ("deltadq 16x, exact embeddings (earlier auto's best)", {"codec": "deltadq", "preset": "16x"})}
    wanted = [r for r in a.references.split(",") if r] if a.reference_configs else []
    configs: list[tuple[str, dict[str, Any]]] = [references[r] for r in wanted]
    configs += [(f"auto --target-ratio {r}" + (" (default)" if r == comp.DEFAULT_TARGET_RATIO else ""), {"target_ratio": float(r)})
                for r in map(int, a.ratios.split(","))]
    t0 = time.perf_counter()
    comp.compress(base, ft, work / "default", progress=False)  # fresh: the default policy's wall time
    default_s = time.perf_counter() - t0
    if not a.no_reuse:
        cache: dict[str, Any] = {}
        real = comp._curve

        def memo(job: Any, inp: Any, shape: Any, dtype: Any) -> Any:
            if inp.name not in cache:
                cache[inp.name] = real(job, inp, shape, dtype)
            return cache[inp.name]
        comp._curve = memo  # type: ignore[assignment]

    rows = []
    for label, kw in configs:
        out = work / f"d{len(rows)}"
        t0 = time.perf_counter()
        try:
            comp.compress(base, ft, out, progress=False, **kw)
        except comp.CodecError as exc:  # a ratio below what the smallest settings reach
            print(f"{label}: {exc}", flush=True)
            continue
        seconds = time.perf_counter() - t0
        d = Delta(out)
        model = d.to_model(base, progress=False)
        res = {**evaluate_models({**models, "rebuilt": model}, blocks, reference="fine-tune"), "base": ref["base"]}
        gain = res["base"]["loss"] - res["fine-tune"]["loss"]
        nbytes = _dir_bytes(out)
        row = {"config": label, "bytes": nbytes, "ratio": fp16 / nbytes, "kl": res["rebuilt"]["kl"],
               "loss": res["rebuilt"]["loss"], "gain_kept": (res["base"]["loss"] - res["rebuilt"]["loss"]) / gain,
               "top1": res["rebuilt"]["top1_agreement"], "compress_s": seconds,
               "choices": {k: v["tensors"] for k, v in d.manifest.totals.get("by_codec", {}).items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        d.close()
    result = {"pair": a.name, "fp16_bytes": fp16, "base_loss": ref["base"]["loss"], "finetune_loss": ref["fine-tune"]["loss"],
              "base_kl": ref["base"]["kl"], "eval_tokens": ref["fine-tune"]["tokens"], "default_compress_s": default_s,
              "torch_threads": torch.get_num_threads(), "rows": rows}
    (a.out / f"whole_model_{a.name}.json").write_text(json.dumps(result, indent=2))
    _write(a.out, a.name, result)


def _write(out: Path, name: str, r: dict[str, Any]) -> None:
    from deltahub.report import human_bytes

    lines = [f"## {name}: whole delta directory vs the fp16 fine-tune ({human_bytes(r['fp16_bytes'])})", "",
             f"Held-out: {r['eval_tokens']} tokens; base loss {r['base_loss']:.4f} (KL {r['base_kl']:.4f}), "
             f"fine-tune {r['finetune_loss']:.4f}. Default compress (fresh) {r['default_compress_s']:.0f} s.", "",
             "| config | whole delta | vs fp16 fine-tune | KL(ft ‖ rebuilt) | held-out loss | gain kept | top-1 agree | compress s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['config']} | {human_bytes(row['bytes'])} | {row['ratio']:.1f}x | {row['kl']:.5f} | "
                     f"{row['loss']:.4f} | {100 * row['gain_kept']:.0f}% | {100 * row['top1']:.2f}% | {row['compress_s']:.0f} |")
    (out / f"whole_model_{name}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    auto = [x for x in r["rows"] if x["config"].startswith("auto")]
    ax.plot([x["ratio"] for x in auto], [x["kl"] for x in auto], "o-", label="deltahub auto (whole-model allocation)")
    for x in r["rows"]:
        if not x["config"].startswith("auto"):
            ax.plot([x["ratio"]], [x["kl"]], "s", label=x["config"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("whole delta: times smaller than the fp16 fine-tune")
    ax.set_ylabel("KL(fine-tune ‖ rebuilt), nats/token")
    ax.set_title(name)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"whole_model_{name}.png", dpi=110)



if __name__ == "__main__":
    main()
