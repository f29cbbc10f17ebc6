"""Resident matmul kernels (deltahub/resident/kernels.py): every path against the decoded delta.

The torch paths are checked bit-exactly against the pre-kernel chunked unpack where they promise
it (``none`` vs ``int8`` cache) and within float32 rounding otherwise; the fused Triton kernel is
checked against the torch path under Triton's CPU interpreter (skipped without Triton).
"""

from __future__ import annotations

import pytest
import torch

from deltahub.codecs import get_codec
from deltahub.codecs._bits import pack_bits, unpack_pm1
from deltahub.codecs.base import EncodeInput
from deltahub.codecs.bitdelta import expand_scales
from deltahub.resident import kernels
from deltahub.resident.layers import DeltaLinear

GRANS = [("tensor", 0), ("row", 0), ("group", 16), ("group", 7)]


def _bitdelta(rows: int, cols: int, gran: str, gs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed signs, stored scales, float64 decoded Δ̂) of a random BitDelta delta."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(rows, cols, generator=g) > 0.5
    if gran == "tensor":
        scale = torch.rand(1, generator=g)
    elif gran == "row":
        scale = torch.rand(rows, generator=g)
    else:
        scale = torch.rand(rows, (cols + gs - 1) // gs, generator=g)
    dense = (bits.double() * 2 - 1) * expand_scales(scale, rows, cols, gran, gs).double()
    return pack_bits(bits), scale, dense


def _reference_chunked(x: torch.Tensor, sign: torch.Tensor, scale: torch.Tensor, gran: str, gs: int, chunk: int) -> torch.Tensor:
    """The resident forward before the kernels module (layers.py at a8b8cdf), for bit-exactness."""
    rows, cols = sign.shape[0], x.shape[1]
    out = x.new_empty((x.shape[0], rows))
    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        pm1 = unpack_pm1(sign[r0:r1], cols, x.dtype)
        if gran == "group":
            out[:, r0:r1] = x @ (pm1 * expand_scales(scale[r0:r1].to(x.dtype), r1 - r0, cols, "group", gs)).T
        elif gran == "row":
            out[:, r0:r1] = (x @ pm1.T) * scale[r0:r1].to(x.dtype)
        else:
            out[:, r0:r1] = x @ pm1.T
    if gran == "tensor":
        out.mul_(scale[0].to(x.dtype))
    return out


def _close(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> None:
    """Within float32 rounding: |error| ≤ cols · eps · (|x| @ |Δ̂|ᵀ) (a sum of ``cols`` products)."""
    bound = x.shape[1] * 2.0**-23 * (x.double().abs() @ dense.abs().T) + 1e-30
    assert torch.all((got.double() - want).abs() <= bound), float(((got.double() - want).abs() / bound).max())


@pytest.mark.parametrize("gran,gs", GRANS)
@pytest.mark.parametrize("mode", ["none", "int8", "dense"])
def test_bitdelta_matmul_modes(monkeypatch: pytest.MonkeyPatch, gran: str, gs: int, mode: str) -> None:
    monkeypatch.setenv("DELTAHUB_RESIDENT_CACHE", mode)
    sign, scale, dense = _bitdelta(37, 45, gran, gs)
    x = torch.randn(5, 45)
    cache: dict = {}
    got = kernels.bitdelta_matmul(x, sign, scale, gran, gs, cache, chunk_rows=16)
    _close(got, x.double() @ dense.T, x, dense)
    if mode != "dense":  # the unpack and the int8 cache give the old path's exact bits
        assert torch.equal(got, _reference_chunked(x, sign, scale, gran, gs, 16))
    assert (len(cache) == 1) == (mode != "none")
    again = kernels.bitdelta_matmul(x, sign, scale, gran, gs, cache, chunk_rows=16)
    assert torch.equal(again, got) and (len(cache) == 1) == (mode != "none")


def test_cache_follows_dtype_and_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    sign, scale, dense = _bitdelta(8, 16, "row", 0)
    cache: dict = {}
    monkeypatch.setenv("DELTAHUB_RESIDENT_CACHE", "dense")
    kernels.bitdelta_matmul(torch.randn(2, 16), sign, scale, "row", 0, cache)
    y = kernels.bitdelta_matmul(torch.randn(2, 16, dtype=torch.float64), sign, scale, "row", 0, cache)
    assert y.dtype == torch.float64 and [k[1] for k in cache] == [torch.float64]  # one dense entry, replaced
    monkeypatch.setenv("DELTAHUB_RESIDENT_CACHE", "int8")
    kernels.bitdelta_matmul(torch.randn(2, 16), sign, scale, "row", 0, cache)
    assert [k[0] for k in cache] == ["int8"]  # the dense entry is freed
    monkeypatch.setenv("DELTAHUB_RESIDENT_CACHE", "none")
    kernels.bitdelta_matmul(torch.randn(2, 16), sign, scale, "row", 0, cache)
    assert cache == {}  # switching the cache off frees it


def test_bad_cache_mode_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTAHUB_RESIDENT_CACHE", "fp8")
    with pytest.raises(kernels.ResidentCacheError, match="DELTAHUB_RESIDENT_CACHE='fp8' is not one of none, int8, dense"):
        kernels.cache_mode()


def test_unpack_pm1_int8_matches_bits() -> None:
    bits = torch.rand(1100, 13) > 0.5  # more rows than one chunk, a partial last byte
    pm1 = kernels.unpack_pm1_int8(pack_bits(bits), 13)
    assert pm1.dtype == torch.int8 and torch.equal(pm1, bits.to(torch.int8) * 2 - 1)


def _layer_with(adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], rows: int, cols: int) -> DeltaLinear:
    layer = DeltaLinear(torch.nn.Linear(cols, rows))
    for name, (sign, scale) in adapters.items():
        layer.add_adapter(name, "bitdelta", {"sign": sign, "scale": scale}, {"granularity": "row"})
    return layer


def test_sort_by_adapter_and_segments_fallback() -> None:
    rows, cols = 12, 24
    made = {n: _bitdelta(rows, cols, "row", 0, seed=i) for i, n in enumerate("abc")}
    layer = _layer_with({n: (s, sc) for n, (s, sc, _) in made.items()}, rows, cols)
    names = ["b", None, "a", "b", "c", None, "a"]
    perm, segs, keys = kernels.sort_by_adapter(names)
    assert keys == ["b", "a", "c"] and perm.tolist() == [0, 3, 2, 6, 4, 1, 5]
    assert segs.tolist() == [[0, 2, 0], [2, 4, 1], [4, 5, 2]]
    x = torch.randn(len(names), cols)
    y = kernels.delta_matmul_segments(x[perm], segs, [layer.adapters[k] for k in keys])
    for j, i in enumerate(perm.tolist()):
        want = torch.zeros(rows, dtype=torch.float64) if names[i] is None else x[i].double() @ made[names[i]][2].T
        _close(y[j:j + 1], want[None], x[i:i + 1], made["a"][2].abs() + made["b"][2].abs() + made["c"][2].abs())
    with pytest.raises(ValueError, match="outside 7 rows"):
        kernels.delta_matmul_segments(x, torch.tensor([[0, 8, 0]], dtype=torch.int32), [layer.adapters["a"]])


@pytest.mark.parametrize("gran,gs", [("tensor", 0), ("row", 0), ("group", 24), ("group", 100)])
def test_triton_sgmv_matches_torch_under_interpreter(monkeypatch: pytest.MonkeyPatch, gran: str, gs: int) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows, cols = 40, 72  # not multiples of the 16/32 tiles: masked edges
    made = [_bitdelta(rows, cols, gran, gs, seed=i) for i in range(3)]
    layer = DeltaLinear(torch.nn.Linear(cols, rows))
    params = {"granularity": gran} | ({"group_size": gs} if gran == "group" else {})
    for i, (sign, scale, _) in enumerate(made):
        layer.add_adapter(f"a{i}", "bitdelta", {"sign": sign, "scale": scale}, params)
    adapters = [layer.adapters[f"a{i}"] for i in range(3)]
    signs, scales, width = kernels.stack_bitdelta(adapters)
    x = torch.randn(21, cols)
    segs = torch.tensor([[0, 3, 2], [3, 4, 0], [4, 20, 1]], dtype=torch.int32)  # row 20: no segment
    got = kernels.binary_sgmv(x, segs, signs, scales, width, block_m=16, block_n=16, block_k=32)
    in_place = kernels.bitdelta_sgmv(x, segs, adapters, block_m=16, block_n=16, block_k=32)  # no stacked copy
    assert torch.equal(in_place, got)
    torch_path = kernels.delta_matmul_segments(x, segs, adapters)  # the fallback (x is on the CPU)
    exact = torch.zeros(21, rows, dtype=torch.float64)
    for s, e, a in segs.tolist():
        exact[s:e] = x[s:e].double() @ made[a][2].T
    dense_abs = sum(m[2].abs() for m in made)
    _close(got, exact, x, dense_abs)
    _close(torch_path, exact, x, dense_abs)
    assert torch.all(got[20] == 0) and got.dtype == x.dtype


def test_delta_linear_mixed_batch_uses_fused_sgmv(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed batch of BitDelta adapters in DeltaLinear goes through the fused kernel (Triton's interpreter
    here, CUDA when served): one launch over per-adapter token segments, equal to the per-group torch path."""
    pytest.importorskip("triton")
    rows, cols = 24, 40
    layer = DeltaLinear(torch.nn.Linear(cols, rows))
    made = [_bitdelta(rows, cols, "row", 0, seed=i) for i in range(3)]
    for i, (sign, scale, _) in enumerate(made):
        layer.add_adapter(f"a{i}", "bitdelta", {"sign": sign, "scale": scale}, {"granularity": "row"})
    x = torch.randn(5, 3, cols)
    layer.batch_adapters = ["a2", None, "a0", "a2", "a1"]
    torch_path = layer(x)
    calls: list[int] = []
    real = kernels.bitdelta_sgmv
    monkeypatch.setattr(kernels, "bitdelta_sgmv", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fused = layer(x)
    assert calls == [1]
    base = layer.base_layer(x)
    exact = base.double().clone()
    for r, name in enumerate(layer.batch_adapters):
        if name is not None:
            exact[r] += x[r].double() @ made[int(name[1])][2].T
    dense_abs = sum(m[2].abs() for m in made)  # a bound over every adapter's |Δ̂|
    bound = cols * 2.0**-23 * (x.double().abs() @ dense_abs.T) + 2.0**-23 * exact.abs() + 1e-30
    assert torch.all((fused.double() - exact).abs() <= bound)
    torch.testing.assert_close(fused, torch_path, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused[1], base[1])  # a base row gets no delta


@pytest.mark.parametrize("mode", ["int8", "dense"])
def test_delta_linear_forward_per_cache_mode(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """DeltaLinear's output under a cache mode: BitDelta bit-identical to ``none`` for ``int8``, and
    every codec (a real DeltaDQ adapter too) within float32 rounding of ``none`` for ``dense``. These are the
    torch paths: the native CPU kernels (``none`` only) are compared in tests/test_resident_native.py."""
    monkeypatch.setenv("DELTAHUB_NATIVE", "0")
    rows, cols = 20, 32
    sign, scale, bd = _bitdelta(rows, cols, "row", 0)
    codec = get_codec("deltadq")
    w = torch.randn(rows, cols) * 0.02
    enc = codec.encode(EncodeInput("w", w + torch.randn(rows, cols) * 1e-3, w),
                       codec.validate_params({"preset": "16x", "group_size": 8, "entropy": "none"}))
    layer = DeltaLinear(torch.nn.Linear(cols, rows))
    layer.add_adapter("bd", "bitdelta", {"sign": sign, "scale": scale}, {"granularity": "row"})
    layer.add_adapter("dq", "deltadq", enc.tensors, enc.params)
    dq = layer.delta_weight("dq").double()
    x = torch.randn(3, 5, cols)
    for name, dense in (("bd", bd), ("dq", dq)):
        layer.set_adapter(name)
        monkeypatch.setenv("DELTAHUB_RESIDENT_CACHE", "none")
        before = layer(x)
        monkeypatch.setenv("DELTAHUB_RESIDENT_CACHE", mode)
        after = layer(x)
        assert layer.adapters[name].__dict__["_kernel_cache"] or (mode == "int8" and name == "dq")
        if mode == "int8":
            assert torch.equal(after, before)
        else:
            # both within cols·eps·|x||Δ̂| of the exact delta, plus one rounding of the sum with the base
            x2 = x.reshape(-1, cols).double()
            bound = 2 * cols * 2.0**-23 * (x2.abs() @ dense.abs().T) + 2 * 2.0**-24 * before.reshape(-1, rows).double().abs()
            assert torch.all((after - before).reshape(-1, rows).double().abs() <= bound)


def _codebook_adapter(rows: int, cols: int, p: float, seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    from deltahub.resident.layers import _CodebookAdapter

    g = torch.Generator().manual_seed(seed)
    book = torch.sort(torch.randn(16, generator=g))[0]
    dense = book[torch.randint(0, 16, (rows, cols), generator=g)] * (torch.rand(rows, cols, generator=g) < p)
    dense[3] = 0  # a row without non-zeros
    return _CodebookAdapter("deltadq", dense, {}, "float32", book), dense.double()


@pytest.mark.parametrize("rows,cols,block_k", [(40, 72, 32), (17, 9, 16), (33, 130, 64)])
def test_triton_codebook_sgmv_matches_the_decoded_delta_under_interpreter(monkeypatch: pytest.MonkeyPatch, rows: int,
                                                                          cols: int, block_k: int) -> None:
    """The codebook kernel (bitmap + 4-bit codes decoded per tile in registers, the running non-zero count
    carried across column tiles) against the exact product, on shapes that are not tile multiples."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    made = [_codebook_adapter(rows, cols, p, seed=i) for i, p in enumerate((0.3, 0.05, 0.9))]
    adapters = [a for a, _ in made]
    x = torch.randn(21, cols)
    segs = torch.tensor([[0, 3, 2], [3, 4, 0], [4, 20, 1]], dtype=torch.int32)  # row 20: no segment
    got = kernels.codebook_sgmv(x, segs, adapters, block_m=16, block_n=16, block_k=block_k)
    exact = torch.zeros(21, rows, dtype=torch.float64)
    for s, e, a in segs.tolist():
        exact[s:e] = x[s:e].double() @ made[a][1].T
    _close(got, exact, x, sum(d.abs() for _, d in made))
    assert torch.all(got[20] == 0) and got.dtype == x.dtype
    assert kernels.fused_sgmv_applies(x, adapters)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.codebook_sgmv(torch.randn(2, cols + 1), segs[:1], adapters)


def test_delta_linear_mixed_codebook_batch_uses_fused_sgmv(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed batch of DeltaDQ (codebook form) adapters goes through the fused codebook kernel: one launch,
    each row its own adapter's delta, the base row untouched."""
    pytest.importorskip("triton")
    rows, cols = 24, 40
    layer = DeltaLinear(torch.nn.Linear(cols, rows))
    codec = get_codec("deltadq")
    w = layer.base_layer.weight.detach().clone()
    dense = {}
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        enc = codec.encode(EncodeInput("w", w + torch.randn(rows, cols, generator=g) * 1e-2, w),
                           codec.validate_params({"preset": "16x", "group_size": 8, "entropy": "none"}))
        layer.add_adapter(f"a{i}", "deltadq", enc.tensors, enc.params)
        dense[f"a{i}"] = layer.delta_weight(f"a{i}").double()
    assert all(hasattr(layer.adapters[n], "row_ptr") for n in dense)
    x = torch.randn(4, 2, cols)
    layer.batch_adapters = ["a1", None, "a0", "a1"]
    calls: list[int] = []
    real = kernels.codebook_sgmv
    monkeypatch.setattr(kernels, "codebook_sgmv", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DELTAHUB_NATIVE", "0")  # on the CPU the native kernels come first; here: the GPU's path
    with torch.no_grad():
        fused = layer(x)
        base = layer.base_layer(x)
    assert calls == [1]
    exact = base.double().clone()
    for r, name in enumerate(layer.batch_adapters):
        if name is not None:
            exact[r] += x[r].double() @ dense[name].T
    bound = cols * 2.0**-23 * (x.double().abs() @ (dense["a0"].abs() + dense["a1"].abs()).T) + 2.0**-23 * exact.abs() + 1e-30
    assert torch.all((fused.double() - exact).abs() <= bound)
    assert torch.equal(fused[1], base[1])


def test_codebook_sgmv_scan_counting_in_a_fresh_interpreter() -> None:
    """The compiled kernels' paths (``tl.cumsum`` / ``tl.sum`` counting per tile, register sums for decode-sized
    segments, as on a GPU) under Triton's interpreter, in a fresh process where Triton is imported after
    ``TRITON_INTERPRET=1`` (its standard library then runs): codebook and BitDelta kernels."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from deltahub.resident import kernels\n"
        "from deltahub.resident.layers import _CodebookAdapter\n"
        "assert kernels._SCAN_IN_INTERPRETER\n"
        "g = torch.Generator().manual_seed(0)\n"
        "made = []\n"
        "for i in range(2):\n"
        "    book = torch.sort(torch.randn(16, generator=g))[0]\n"
        "    d = book[torch.randint(0, 16, (37, 150), generator=g)] * (torch.rand(37, 150, generator=g) < 0.3)\n"
        "    made.append((_CodebookAdapter('deltadq', d, {}, 'float32', book), d.double()))\n"
        "x = torch.randn(5, 150, generator=g)\n"
        "segs = torch.tensor([[0, 2, 1], [2, 5, 0]], dtype=torch.int32)\n"
        "got = kernels.codebook_sgmv(x, segs, [a for a, _ in made], block_k=64).double()\n"
        "want = torch.cat([x[:2].double() @ made[1][1].T, x[2:].double() @ made[0][1].T])\n"
        "mag = torch.cat([x[:2].double().abs() @ made[1][1].abs().T, x[2:].double().abs() @ made[0][1].abs().T])\n"
        "assert torch.all((got - want).abs() <= 150 * 2.0**-23 * mag + 1e-30), float((got - want).abs().max())\n"
        "assert kernels._decode_sized(5, segs)  # the register-sum path, as decode steps run on a GPU\n"
        "from deltahub.codecs._bits import pack_bits\n"
        "from deltahub.resident.layers import _BitDeltaAdapter\n"
        "bds = [_BitDeltaAdapter(pack_bits(torch.rand(37, 150, generator=g) > 0.5), torch.rand(37, generator=g),\n"
        "                        {'granularity': 'row'}, (37, 150), 'float32') for _ in range(2)]\n"
        "sg, sc, width = kernels.stack_bitdelta(bds)\n"
        "got = kernels.binary_sgmv(x, segs, sg, sc, width, block_k=64).double()\n"
        "ds = [b.dense().double() for b in bds]\n"
        "want = torch.cat([x[:2].double() @ ds[1].T, x[2:].double() @ ds[0].T])\n"
        "mag = torch.cat([x[:2].double().abs() @ ds[1].abs().T, x[2:].double().abs() @ ds[0].abs().T])\n"
        "assert torch.all((got - want).abs() <= 150 * 2.0**-23 * mag + 1e-30), float((got - want).abs().max())\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "DELTAHUB_TRITON_SCAN": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
