"""Resident deltas on a GPU: the fused Triton kernels checked on the device, then a 16-tenant mixed batch vs the base.

1. Correctness on the device: ``codebook_sgmv`` (DeltaDQ / top-k ternary codebook form, the default policy's) and
   ``binary_sgmv`` (BitDelta) against the float64 product, on tile-unaligned and 7B-sized shapes.
2. One layer (7B shapes, bf16 base weight): ``F.linear`` alone vs ``F.linear`` + the fused delta kernel over
   ``--tenants`` segments of 1 and 4 rows each (CUDA events, median of 50 after warm-up).
3. A Llama-style model (random weights, ``--hidden`` / ``--layers``, bf16) whose every Linear of the decoder holds
   ``--tenants`` codebook adapters (random 25%-dense deltas with 16 values, as DeltaDQ stores them): greedy
   decode tokens/s of the base, of one adapter on every row, and of a mixed batch with one tenant per row
   (decode steps alone: ``generate(n) - generate(1)``).

    python benchmarks/bench_resident_gpu.py [--tenants 16] [--hidden 2048 --layers 16] [--json OUT]

``--smoke`` runs everything tiny on the CPU under Triton's interpreter (a check of this script, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.tenants, args.hidden, args.intermediate, args.layers, args.new_tokens, args.prompt = 3, 64, 96, 2, 3, 4

    import torch
    from torch import nn

    from deltahub.resident import kernels
    from deltahub.resident.layers import DeltaLinear, _BitDeltaAdapter, _CodebookAdapter
    from deltahub.codecs._bits import pack_bits

    dev = torch.device("cpu" if args.smoke else "cuda")
    name = "cpu (Triton interpreter)" if args.smoke else torch.cuda.get_device_name(0)
    out: dict[str, object] = {"device": name, "torch": torch.__version__}
    print(f"device {name}, torch {torch.__version__}", flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def codebook(rows: int, cols: int, scale: float = 1.0) -> tuple[_CodebookAdapter, torch.Tensor]:
        book = torch.sort(torch.randn(16, device=dev, generator=gen))[0] * scale
        pick = torch.randint(0, 16, (rows, cols), device=dev, generator=gen)
        dense = book[pick] * (torch.rand(rows, cols, device=dev, generator=gen) < 0.25)
        return _CodebookAdapter("deltadq", dense, {}, "float32", book).to(dev), dense

    # 1. correctness on the device
    checks = []
    for rows, cols in [(40, 72), (33, 130), (4096, 4096), (11008, 4096)]:
        made = [codebook(rows, cols) for _ in range(3)]
        x = torch.randn(21, cols, device=dev, generator=gen)
        segs = torch.tensor([[0, 3, 2], [3, 4, 0], [4, 20, 1]], dtype=torch.int32, device=dev)
        got = kernels.codebook_sgmv(x, segs, [a for a, _ in made]).double()
        want = torch.zeros_like(got)
        mag = torch.zeros_like(got)
        for s, e, a in segs.tolist():
            want[s:e] = x[s:e].double() @ made[a][1].double().T
            mag[s:e] = x[s:e].double().abs() @ made[a][1].double().abs().T
        ratio = float(((got - want).abs() / (cols * 2.0**-23 * mag + 1e-30)).max())
        ok = ratio <= 1.0 and bool((got[20] == 0).all())
        checks.append({"kernel": "codebook_sgmv", "shape": [rows, cols], "max_err_over_bound": ratio, "ok": ok})
        if dev.type == "cuda":  # 16-bit x: tensor-core products of x and the delta rounded to bf16, fp32 sums
            xb = x.to(torch.bfloat16)
            got = kernels.codebook_sgmv(xb, segs, [a for a, _ in made]).double()
            for s, e, a in segs.tolist():
                want[s:e] = xb[s:e].double() @ made[a][1].double().T
            ratio = float(((got - want).abs() / ((2.0**-8 + cols * 2.0**-23) * mag + 1e-30)).max())
            checks.append({"kernel": "codebook_sgmv bf16", "shape": [rows, cols], "max_err_over_bound": ratio,
                           "ok": ratio <= 1.0})
        signs = [pack_bits(torch.rand(rows, cols, device=dev, generator=gen) > 0.5) for _ in range(3)]
        bds = [_BitDeltaAdapter(s, torch.rand(rows, device=dev, generator=gen), {"granularity": "row"}, (rows, cols),
                                "float32") for s in signs]
        sg, sc, width = kernels.stack_bitdelta(bds)
        got = kernels.binary_sgmv(x, segs, sg, sc, width).double()
        for s, e, a in segs.tolist():
            d = bds[a].dense().double()
            want[s:e] = x[s:e].double() @ d.T
            mag[s:e] = x[s:e].double().abs() @ d.abs().T
        ratio = float(((got - want).abs() / (cols * 2.0**-23 * mag + 1e-30)).max())
        checks.append({"kernel": "binary_sgmv", "shape": [rows, cols], "max_err_over_bound": ratio,
                       "ok": ratio <= 1.0 and bool((got[20] == 0).all())})
        del made, bds, signs
        print(*checks[-3 if dev.type == "cuda" else -2:], flush=True)
    out["correctness"] = checks

    def timed(fn, reps: int = 50) -> float:  # type: ignore[no-untyped-def]
        for _ in range(5):
            fn()
        sync()
        if dev.type != "cuda":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e6
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        return statistics.median(times)

    # 1b. block sizes of the codebook kernel (16 tenants x 1 row, 4096 x 4096): the best one serves below
    best_cfg = {}
    if not args.smoke:
        rows = cols = 4096
        ads = [codebook(rows, cols, 1e-3)[0] for _ in range(args.tenants)]
        x = torch.randn(args.tenants, cols, device=dev, generator=gen).to(torch.bfloat16)
        segs = torch.tensor([[t, t + 1, t] for t in range(args.tenants)], dtype=torch.int32, device=dev)
        sweep = []
        for bn in (16, 32, 64, 128):
            for bk in (32, 64, 128):
                for nw in (2, 4, 8):
                    cfg = {"block_n": bn, "block_k": bk, "num_warps": nw}
                    try:
                        us = timed(lambda: kernels.codebook_sgmv(x, segs, ads, **cfg), reps=10)
                    except Exception as exc:  # noqa: BLE001 - a config the compiler refuses (registers, shared memory)
                        print(f"{cfg}: {type(exc).__name__}", flush=True)
                        continue
                    sweep.append((us, cfg))
        sweep.sort(key=lambda t: t[0])
        print("codebook_sgmv block sweep (us):", [(round(u, 1), c) for u, c in sweep[:6]], flush=True)
        out["sweep"] = [{"us": u, **c} for u, c in sweep]
        best_cfg = sweep[0][1]
        del ads
        real = kernels.codebook_sgmv
        kernels.codebook_sgmv = lambda x, segs, ads, **kw: real(x, segs, ads, **{**best_cfg, **kw})  # type: ignore[assignment]
    out["codebook_blocks"] = best_cfg

    # 2. one layer
    layer_rows = []
    shapes = [(64, 96)] if args.smoke else [(4096, 4096), (11008, 4096), (4096, 11008)]
    for rows, cols in shapes:
        w = torch.randn(rows, cols, device=dev, generator=gen).to(torch.bfloat16 if dev.type == "cuda" else torch.float32)
        ads = [codebook(rows, cols, 1e-3)[0] for _ in range(args.tenants)]
        bsg, bsc, bw = kernels.stack_bitdelta([_BitDeltaAdapter(
            pack_bits(torch.rand(rows, cols, device=dev, generator=gen) > 0.5), torch.rand(rows, device=dev, generator=gen) * 1e-3,
            {"granularity": "row"}, (rows, cols), "float32") for _ in range(args.tenants)])
        for per in (1, 4):
            n = args.tenants * per
            x = torch.randn(n, cols, device=dev, generator=gen).to(w.dtype)
            segs = torch.tensor([[t * per, (t + 1) * per, t] for t in range(args.tenants)], dtype=torch.int32, device=dev)
            t_base = timed(lambda: nn.functional.linear(x, w))
            t_mix = timed(lambda: nn.functional.linear(x, w) + kernels.codebook_sgmv(x, segs, ads).to(w.dtype))
            t_bd = timed(lambda: nn.functional.linear(x, w) + kernels.binary_sgmv(x, segs, bsg, bsc, bw).to(w.dtype))
            layer_rows.append({"shape": [rows, cols], "rows_per_tenant": per, "base_us": t_base, "base_plus_codebook_us": t_mix,
                               "codebook_ratio": t_base / t_mix, "base_plus_bitdelta_us": t_bd, "bitdelta_ratio": t_base / t_bd})
            print(layer_rows[-1], flush=True)
        del ads, bsg, bsc
    out["layer"] = layer_rows

    # 3. a model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=max(args.hidden // 128, 1), num_key_value_heads=max(args.hidden // 128, 1),
                      vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = LlamaForCausalLM(cfg).to(device=dev, dtype=dtype).eval()
    names = [f"t{i}" for i in range(args.tenants)]
    wrapped: list[DeltaLinear] = []
    t0 = time.perf_counter()
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for attr, mod in list(parent.named_children()):
                if isinstance(mod, nn.Linear):
                    dl = DeltaLinear(mod)
                    for nm in names:
                        dl.add_adapter_module(nm, codebook(mod.weight.shape[0], mod.weight.shape[1], 1e-3)[0])
                    setattr(parent, attr, dl)
                    wrapped.append(dl)
    sync()
    build_s = time.perf_counter() - t0
    delta_bytes = sum(sum(t.numel() * t.element_size() for t in a.stored().values()) for dl in wrapped
                      for a in dl.adapters.values())
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {base_bytes / 2**30:.2f} GiB base, {len(wrapped)} DeltaLinear x {args.tenants} adapters "
          f"({delta_bytes / 2**30:.2f} GiB of resident deltas), built in {build_s:.0f} s", flush=True)

    def select(mode: str) -> None:
        for dl in wrapped:
            dl.disabled = mode == "base"
            dl.active_adapter = names[0] if mode == "one" else None
            dl.batch_adapters = list(names) if mode == "mixed" else None

    ids = torch.randint(100, 30000, (args.tenants, args.prompt), device=dev, generator=gen)
    kw = {"do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}

    def gen_time(n: int) -> float:
        best = float("inf")
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, **kw)
            sync()
            best = min(best, time.perf_counter() - t0)
        return best

    res = {}
    for mode in ("base", "one", "mixed", "base"):
        select(mode)
        gen_time(2)  # warm-up: kernels compiled, caches filled
        full, one = gen_time(args.new_tokens), gen_time(1)
        steps = args.tenants * (args.new_tokens - 1)
        res[mode] = steps / max(full - one, 1e-9)
        print(f"{mode}: decode {res[mode]:.0f} tok/s (generate({args.new_tokens}) {full:.3f} s, generate(1) {one:.3f} s)",
              flush=True)
    model_out = {"config": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers,
                            "tenants": args.tenants, "batch": args.tenants, "prompt": args.prompt,
                            "new_tokens": args.new_tokens, "dtype": str(dtype)},
                 "base_gib": base_bytes / 2**30, "deltas_gib": delta_bytes / 2**30,
                 "decode_tok_s": res, "one_over_base": res["one"] / res["base"], "mixed_over_base": res["mixed"] / res["base"]}
    out["model"] = model_out
    print(json.dumps(model_out), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
