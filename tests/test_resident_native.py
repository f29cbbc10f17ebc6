"""The native CPU kernels of resident deltas (deltahub/resident/_native.c via _cpu.py) against the
exact decoded delta: codebook (DeltaDQ) and BitDelta forms, [out, in] and transposed [in, out]
layouts, row subsets of a mixed batch, the AVX-512 paths and the portable loops, and DeltaLinear
end to end (native vs the torch paths)."""

from __future__ import annotations

import shutil
import sysconfig

import pytest
import torch

from deltahub.codecs._bits import pack_bits
from deltahub.codecs.bitdelta import expand_scales
from deltahub.resident import _cpu
from deltahub.resident.layers import DeltaLinear, _BitDeltaAdapter, _CodebookAdapter

needs_native = pytest.mark.skipif(_cpu._NATIVE is None, reason="the native resident kernels were not built")
EPS = 2.0**-24


def test_resident_kernels_are_built_where_a_compiler_is() -> None:
    """An install on a machine with a C compiler (CI's included) must not silently fall back to torch."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None and shutil.which("cc") is None:
        pytest.skip("no C compiler here")
    assert _cpu._NATIVE is not None


@pytest.fixture(params=["simd", "portable"])
def simd_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the AVX-512 paths (where the CPU has them) and on the portable loops."""
    if request.param == "simd" and not (_cpu._NATIVE is not None and _cpu._NATIVE.simd()):
        pytest.skip("this CPU has no AVX-512 VBMI2")
    monkeypatch.setenv("DELTAHUB_NATIVE", "1")
    monkeypatch.setenv("DELTAHUB_NATIVE_SIMD", "1" if request.param == "simd" else "0")
    return str(request.param)


def _codebook(rows: int, cols: int, p: float, seed: int, k: int = 16) -> tuple[_CodebookAdapter, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    book = torch.sort(torch.randn(k, generator=g))[0]
    book = book[book != 0]
    dense = book[torch.randint(0, book.numel(), (rows, cols), generator=g)] * (torch.rand(rows, cols, generator=g) < p)
    return _CodebookAdapter("deltadq", dense, {}, "float32", book), dense


def _bitdelta(rows: int, cols: int, gran: str, gs: int, seed: int) -> tuple[_BitDeltaAdapter, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(rows, cols, generator=g) > 0.5
    scale = {"tensor": lambda: torch.rand(1, generator=g), "row": lambda: torch.rand(rows, generator=g)}.get(
        gran, lambda: torch.rand(rows, (cols + gs - 1) // gs, generator=g))()
    dense = (bits.float() * 2 - 1) * expand_scales(scale, rows, cols, gran, gs)
    return _BitDeltaAdapter(pack_bits(bits), scale, {"granularity": gran, "group_size": gs}, (rows, cols), "float32"), dense


def _check(got: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, transposed: bool) -> None:
    """Within the float32 rounding of an n-term sum (plus the masked-sum trick's one extra rounding)."""
    x64, d64 = x.double(), dense.double()
    want = x64 @ d64 if transposed else x64 @ d64.T
    mag = x64.abs() @ d64.abs() if transposed else x64.abs() @ d64.abs().T
    n = dense.shape[0] if transposed else dense.shape[1]
    bound = 4 * (n + 2) * EPS * (mag + (x64.abs().sum(1, keepdim=True) * d64.abs().max()))
    assert torch.all((got.double() - want).abs() <= bound), float(((got.double() - want).abs() - bound).max())


SHAPES = [(1, 1), (3, 15), (7, 16), (5, 17), (9, 63), (4, 64), (6, 65), (11, 130), (33, 200)]


@needs_native
@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_codebook_product_matches_the_decoded_delta(simd_mode: str, rows: int, cols: int, transposed: bool) -> None:
    for p, seed in ((0.25, 0), (0.9, 1), (0.0, 2), (1.0, 3)):
        a, dense = _codebook(rows, cols, p, seed)
        for n in (1, 3, 8, 9, 16):
            x = torch.randn(n, rows if transposed else cols, generator=torch.Generator().manual_seed(n))
            y = torch.zeros(n, cols if transposed else rows)
            _cpu.codebook_addmm_(y, x, a, transposed=transposed)
            _check(y, x, dense, transposed)


@needs_native
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_codebook_decode_is_bit_exact(simd_mode: str, rows: int, cols: int) -> None:
    for p, seed in ((0.25, 0), (1.0, 1), (0.0, 2)):
        a, dense = _codebook(rows, cols, p, seed, k=7)
        for r0, r1 in ((0, rows), (rows // 2, rows), (rows - 1, rows), (0, 0)):
            assert torch.equal(_cpu.codebook_decode(a, r0, r1), dense[r0:r1])


@needs_native
@pytest.mark.parametrize("gran,gs", [("tensor", 0), ("row", 0), ("group", 7), ("group", 16), ("group", 100),
                                     ("group", 128), ("group", 4096)])
@pytest.mark.parametrize("transposed", [False, True])
def test_bitdelta_product_matches_the_decoded_delta(simd_mode: str, gran: str, gs: int, transposed: bool) -> None:
    for rows, cols in ((5, 17), (9, 64), (7, 130), (3, 576)):
        a, dense = _bitdelta(rows, cols, gran, gs, seed=rows)
        for n in (1, 4, 9):
            x = torch.randn(n, rows if transposed else cols, generator=torch.Generator().manual_seed(n))
            y = torch.zeros(n, cols if transposed else rows)
            _cpu.bitdelta_addmm_(y, x, a, transposed=transposed)
            _check(y, x, dense, transposed)


@needs_native
def test_row_subsets_accumulate_into_their_rows_only(simd_mode: str) -> None:
    """A mixed batch: each adapter adds into its own rows of y (indices in any order), the others stay put."""
    cb, dcb = _codebook(40, 70, 0.3, 5)
    bd, dbd = _bitdelta(40, 70, "row", 0, 6)
    x = torch.randn(6, 70)
    y0 = torch.randn(6, 40)
    y = y0.clone()
    _cpu.codebook_addmm_(y, x, cb, torch.tensor([4, 1]))
    _cpu.bitdelta_addmm_(y, x, bd, torch.tensor([0, 5, 2]))
    assert torch.equal(y[3], y0[3])
    _check(y[[4, 1]] - y0[[4, 1]], x[[4, 1]], dcb, False)
    _check(y[[0, 5, 2]] - y0[[0, 5, 2]], x[[0, 5, 2]], dbd, False)


@needs_native
def test_kernels_refuse_what_does_not_fit() -> None:
    a, _ = _codebook(8, 24, 0.5, 0)
    x, y = torch.randn(2, 24), torch.zeros(2, 8)
    with pytest.raises(ValueError, match="row index out of range"):
        _cpu.codebook_addmm_(y, x, a, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="row index out of range"):
        _cpu.codebook_addmm_(y, x, a, torch.tensor([-1]))
    with pytest.raises(ValueError, match="do not fit"):
        _cpu.codebook_addmm_(torch.zeros(2, 9), x, a)
    with pytest.raises(ValueError, match="contiguous"):
        _cpu.codebook_addmm_(y, torch.randn(24, 2).T, a)
    b, _ = _bitdelta(8, 24, "row", 0, 0)
    with pytest.raises(ValueError, match="do not fit"):
        _cpu.bitdelta_addmm_(y, torch.randn(2, 23), b)
    # the codes must cover the non-zero count the row pointers claim
    bad = a.codes[:1].clone()
    with pytest.raises(ValueError, match="code buffer"):
        _cpu._NATIVE.cb_matmul(x.data_ptr(), 24, 2, 0, 2, y.data_ptr(), 8, 2, a.nz.data_ptr(), bad.data_ptr(), 1,
                               a.row_ptr.data_ptr(), a.codebook.data_ptr(), 8, 24, False, True, 1)


def _layer(seed: int = 0) -> tuple[DeltaLinear, dict[str, torch.Tensor]]:
    from deltahub.codecs import EncodeInput, get_codec

    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(48, 40)
    layer = DeltaLinear(base)
    codec = get_codec("deltadq")
    w = base.weight.detach().clone()
    enc = codec.encode(EncodeInput("w", w + torch.randn(40, 48, generator=g) * 1e-2, w),
                       codec.validate_params({"preset": "16x", "group_size": 8, "entropy": "none"}))
    layer.add_adapter("dq", "deltadq", enc.tensors, enc.params)
    bits = torch.rand(40, 48, generator=g) > 0.5
    layer.add_adapter("bd", "bitdelta", {"sign": pack_bits(bits), "scale": torch.rand(40, generator=g) * 1e-3},
                      {"granularity": "row"})
    return layer, {n: layer.delta_weight(n) for n in ("dq", "bd")}


@needs_native
def test_delta_linear_native_matches_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """One adapter for every row and a mixed batch ([dq, base, bd, dq]) with tokens: native vs torch paths
    within rounding, the base row bit-identical to the base layer, and no autograd graph skipped."""
    layer, deltas = _layer()
    x = torch.randn(4, 3, 48)
    names = ["dq", None, "bd", "dq"]
    outs = {}
    for native in ("1", "0"):
        monkeypatch.setenv("DELTAHUB_NATIVE", native)
        with torch.no_grad():
            layer.set_adapter("dq")
            one = layer(x)
            layer.set_adapter(None)
            layer.batch_adapters = names
            mixed = layer(x)
            layer.batch_adapters = None
        outs[native] = (one, mixed)
    with torch.no_grad():
        base = layer.base_layer(x)
    for (a, b), d in ((( outs["1"][0], outs["0"][0]), deltas["dq"]),):
        _check((a - base).reshape(-1, 40), x.reshape(-1, 48), d, False)
        _check((b - base).reshape(-1, 40), x.reshape(-1, 48), d, False)
    mixed_n, mixed_t = outs["1"][1], outs["0"][1]
    assert torch.equal(mixed_n[1], base[1]) and torch.equal(mixed_t[1], base[1])
    for i, n in enumerate(names):
        if n is not None:
            _check(mixed_n[i] - base[i], x[i], deltas[n], False)
    # with autograd recording, the torch path runs and gradients flow
    monkeypatch.setenv("DELTAHUB_NATIVE", "1")
    layer.set_adapter("dq")
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@needs_native
@pytest.mark.parametrize("name", ["dq", "bd"])
def test_prefill_sized_batches_run_the_rebuilt_weight(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Above MAX_NATIVE_ROWS token rows one adapter's layer forms ``W + Δ̂`` a chunk of output rows at a time
    and runs one GEMM per chunk: the rebuilt layer's product within rounding (chunks of 16 rows: 3 chunks here)."""
    layer, deltas = _layer(1)
    layer.chunk_rows = 16
    x = torch.randn(2, _cpu.MAX_NATIVE_ROWS + 1, 48)
    layer.set_adapter(name)
    base = layer.base_layer
    with torch.no_grad():
        got = layer(x)
    _check_rebuilt(got.reshape(-1, 40), x.reshape(-1, 48), base.weight.detach(), deltas[name], base.bias.detach())


@needs_native
def test_threaded_products_equal_one_thread(simd_mode: str) -> None:
    """Rows split over torch's OpenMP threads compute each output row exactly as one thread does."""
    a, dense = _codebook(300, 400, 0.25, 9)
    b, dbd = _bitdelta(300, 400, "group", 64, 10)
    x = torch.randn(3, 400)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = torch.zeros(3, 300)
            _cpu.codebook_addmm_(y, x, a)
            z = torch.zeros(3, 300)
            _cpu.bitdelta_addmm_(z, x, b)
            outs.append((y, z))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    _check(outs[1][0], x, dense, False)
    _check(outs[1][1], x, dbd, False)


def _check_rebuilt(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Within the float32 rounding of the rebuilt layer's product: weight fp32(W + Δ̂), as the rebuilt model holds it."""
    w1 = (w + dense).double()  # the float32 sum, then exact in float64
    x64 = x.double()
    want = x64 @ w1.T + (bias.double() if bias is not None else 0)
    mag = x64.abs() @ w1.abs().T + (bias.double().abs() if bias is not None else 0)
    bound = 4 * (w.shape[1] + 2) * EPS * mag + 1e-30
    assert torch.all((got.double() - want).abs() <= bound), float(((got.double() - want).abs() - bound).max())


@needs_native
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_fused_base_weight_product_is_the_rebuilt_layers(simd_mode: str, rows: int, cols: int) -> None:
    """``y += x @ (W + Δ̂)ᵀ`` in one pass (codebook adapter + base weight): the rebuilt weight's product, for
    every tail shape, on 1..9 batch rows (one register block and a second one), a row subset included."""
    a, dense = _codebook(rows, cols, 0.3, rows * 131 + cols)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols))
    b = torch.randn(rows)
    for n in (1, 4, 9):
        x = torch.randn(n, cols)
        y = b.expand(n, -1).clone()
        _cpu.addmm_(y, x, a.native_args(), None, False, _cpu.simd(), torch.get_num_threads(), weight=w)
        _check_rebuilt(y, x, w, dense, b)
    x = torch.randn(5, cols)
    y = torch.zeros(5, rows)
    _cpu.addmm_(y, x, a.native_args(), torch.tensor([3, 0]), False, _cpu.simd(), 1, weight=w)
    _check_rebuilt(y[[3, 0]], x[[3, 0]], w, dense, None)
    assert not y[[1, 2, 4]].any()


@needs_native
@pytest.mark.parametrize("gran,gs", [("tensor", 0), ("row", 0), ("group", 7)])
@pytest.mark.parametrize("rows,cols", [(3, 15), (9, 63), (6, 65), (11, 130), (33, 200)])
def test_fused_bitdelta_product_is_the_rebuilt_layers(simd_mode: str, gran: str, gs: int, rows: int, cols: int) -> None:
    """``y += x @ (W + Δ̂)ᵀ`` for a BitDelta adapter (AVX-512 for tensor / row scales, the portable loop for group
    scales): the rebuilt weight's product within rounding, 1..9 batch rows."""
    b, dense = _bitdelta(rows, cols, gran, gs, rows * 7 + cols)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols + 1))
    for n in (1, 4, 9):
        x = torch.randn(n, cols)
        y = torch.zeros(n, rows)
        _cpu.addmm_(y, x, b.native_args(), None, False, _cpu.simd(), torch.get_num_threads(), weight=w)
        _check_rebuilt(y, x, w, dense, None)


@needs_native
def test_fused_product_refuses_what_does_not_fit() -> None:
    a, _ = _codebook(8, 24, 0.5, 1)
    b, _ = _bitdelta(8, 24, "row", 0, 2)
    x, y = torch.randn(2, 24), torch.zeros(2, 8)
    for weight, adapter, transposed in ((torch.randn(8, 23), a, False), (torch.randn(8, 24).double(), a, False),
                                        (torch.randn(24, 8).T, a, False), (torch.randn(8, 23), b, False),
                                        (torch.randn(24, 8), b, True)):
        with pytest.raises(ValueError):
            _cpu.addmm_(y, x, adapter.native_args(), None, transposed, True, 1, weight=weight)
    with pytest.raises(ValueError):  # the C side checks again: no base weight with the transposed layout
        _cpu._NATIVE.cb_matmul(y.data_ptr(), 8, 2, 0, 2, x.data_ptr(), 24, 2, *a.native_args()[1], True, True, 1,
                               torch.randn(8, 24).data_ptr(), 24, 8)
    assert not y.any()


@needs_native
def test_delta_linear_one_adapter_runs_the_rebuilt_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """One codebook adapter for every row: the layer's output is the rebuilt Linear's (``W + Δ̂``, bias) within
    rounding; a hook on the base layer is honoured (the fused pass is skipped and the hook runs)."""
    monkeypatch.setenv("DELTAHUB_NATIVE", "1")
    layer, deltas = _layer(2)
    x = torch.randn(3, 2, 48)
    layer.set_adapter("dq")
    base = layer.base_layer
    with torch.no_grad():
        got = layer(x)
    _check_rebuilt(got.reshape(-1, 40), x.reshape(-1, 48), base.weight.detach(), deltas["dq"], base.bias.detach())
    calls = []
    handle = base.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        with torch.no_grad():
            again = layer(x)
    finally:
        handle.remove()
    assert calls == [1]
    _check((again - base(x)).detach().reshape(-1, 40), x.reshape(-1, 48), deltas["dq"], False)


@needs_native
@pytest.mark.parametrize("transposed", [False, True])
def test_many_products_in_one_call_equal_one_call_each(simd_mode: str, transposed: bool) -> None:
    """A mixed batch's adapters of one layer in one native call (one thread team): every row group's result is
    bit-identical to its own call, the other rows untouched."""
    a, _ = _codebook(300, 200, 0.3, 21)
    b, _ = _bitdelta(300, 200, "row", 0, 22)
    c, _ = _codebook(300, 200, 0.1, 23)
    xin = 300 if transposed else 200
    x = torch.randn(7, xin)
    groups = [(a, torch.tensor([0, 4])), (b, torch.tensor([2])), (c, torch.tensor([5, 1, 6]))]
    one = torch.randn(7, 500 - xin)
    many = one.clone()
    for adapter, rows in groups:
        _cpu.addmm_(one, x, adapter.native_args(), rows, transposed, _cpu.simd(), 2)
    _cpu.run_many([_cpu.job(ad.native_args(), x.data_ptr(), xin, 7, rows.data_ptr(), rows.numel(), many.data_ptr(),
                            500 - xin, 7, transposed, _cpu.simd(), 2) for ad, rows in groups], 2)
    assert torch.equal(one, many)
    d, _ = _codebook(100, 200, 0.3, 24)
    xs, ya, yd = torch.randn(7, 200), torch.zeros(7, 300), torch.zeros(7, 100)
    jobs = [(0, (xs.data_ptr(), 200, 7, 0, 7, yy.data_ptr(), yy.shape[1], 7, *ad.native_args()[1], False, True, 2))
            for ad, yy in ((a, ya), (d, yd))]
    with pytest.raises(ValueError, match="different output sizes"):  # threads would share output rows unevenly
        _cpu._NATIVE.matmul_many(jobs, 2)
    assert not ya.any() and not yd.any()
    with pytest.raises(ValueError):
        _cpu._NATIVE.matmul_many([(7, ())], 1)
    with pytest.raises(ValueError):
        _cpu._NATIVE.matmul_many([], 1)


@needs_native
def test_mixed_plan_is_reused_and_follows_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-selection native plan of a mixed batch is built once and reused while the selection stands; another
    selection, another token count or an adapter replaced under the same name give a new one, with right rows."""
    monkeypatch.setenv("DELTAHUB_NATIVE", "1")
    layer, deltas = _layer(3)
    base = layer.base_layer

    def run(names: list[str | None], x: torch.Tensor) -> torch.Tensor:
        layer.batch_adapters = names
        with torch.no_grad():
            out, ref = layer(x), base(x)  # the base on the same batch (a GEMM's rounding depends on its size)
            for i, n in enumerate(names):
                if n is None:
                    assert torch.equal(out[i], ref[i])
                else:
                    _check((out[i] - ref[i]).reshape(-1, 40), x[i].reshape(-1, 48), deltas[n], False)
        return out

    x = torch.randn(3, 1, 48)
    first = run(["dq", "bd", None], x)
    plan = layer.__dict__["_mixed_plan"]
    assert torch.equal(run(["dq", "bd", None], x), first) and layer.__dict__["_mixed_plan"] is plan
    run(["bd", "dq", "dq"], x)
    assert layer.__dict__["_mixed_plan"] is not plan
    run(["bd", "dq", "dq"], torch.randn(3, 2, 48))  # two tokens per row
    run(["dq", None, "bd"], x)
    bd = layer.adapters["bd"]
    layer.delete_adapter("dq")
    layer.add_adapter_module("dq", bd)  # the name now holds the BitDelta delta
    deltas["dq"] = deltas["bd"]
    run(["dq", None, "bd"], x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_in_one_chunk_is_the_rebuilt_layer_bit_for_bit(dtype: torch.dtype) -> None:
    """A prefill-sized batch through one adapter, in one chunk of rows: exactly ``F.linear(x, dtype(fp32(W) + Δ̂), b)``,
    the rebuilt model's layer (float32 and a bf16-served base alike)."""
    layer, deltas = _layer(4)
    layer.to(dtype)
    base = layer.base_layer
    x = torch.randn(2, _cpu.MAX_NATIVE_ROWS + 3, 48).to(dtype)
    for name in ("dq", "bd"):
        layer.set_adapter(name)
        with torch.no_grad():
            got = layer(x)
            rebuilt = (base.weight.float() + deltas[name]).to(dtype)
            want = torch.nn.functional.linear(x, rebuilt, base.bias)
        assert got.dtype == dtype and torch.equal(got, want), name
