"""Reused buffers in compress (deltahub.utils.scratch): no output may be a view of a buffer that a later tensor
overwrites, and a delta computed into a buffer has the bits of a fresh one."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltahub import apply_delta, compress
from deltahub.codecs.base import EncodeInput
from deltahub.utils.scratch import BufferPool, ThreadScratch


def test_thread_scratch_reuses_per_thread_and_knows_its_views() -> None:
    s = ThreadScratch(cap=1 << 20)
    a = s.get("x", 1000)
    assert s.get("x", 10).data_ptr() == a.data_ptr()  # reused while it fits
    assert s.get("x", 5000).numel() >= 5000  # grown
    assert s.get("x", (1 << 20) + 1) is None  # above the cap: the caller allocates
    v = s.get("x", 64)[8:40].view(torch.float32)
    assert s.owns(v) and not s.owns(v.clone()) and not s.owns(torch.empty(0))
    other: list[torch.Tensor | None] = []
    t = threading.Thread(target=lambda: other.append(s.get("x", 64)))
    t.start()
    t.join()
    assert other[0] is not None and other[0].data_ptr() != s.get("x", 64).data_ptr()  # one set per thread
    assert not s.owns(other[0])


def test_buffer_pool_hands_out_the_smallest_fitting_buffer_and_keeps_a_few() -> None:
    pool = BufferPool(cap=1 << 16, keep=2)
    small, big = pool.acquire(100), pool.acquire(1000)
    pool.release(big)
    pool.release(small)
    assert pool.acquire(50).data_ptr() == small.data_ptr()
    assert pool.acquire(50).data_ptr() == big.data_ptr()  # the only free one that fits
    assert pool.acquire(2000).numel() >= 2000  # none fits: a new one
    for n in (10, 20, 30):
        pool.release(pool.acquire(n) if n != 20 else torch.empty(n, dtype=torch.uint8))
    assert len(pool._free) == 2  # at most `keep` free buffers
    pool.release(torch.empty((1 << 16) + 1, dtype=torch.uint8))  # above the cap: not kept
    assert all(b.numel() <= 1 << 16 for b in pool._free)


@pytest.mark.parametrize("ft_dtype,base_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                                 (torch.float64, torch.float32)])
def test_delta_computed_in_a_buffer_has_the_bits_of_a_fresh_one(ft_dtype: torch.dtype, base_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 19, generator=g).to(base_dtype)
    ft = (base.double() + torch.randn(37, 19, generator=g, dtype=torch.float64) * 1e-2).to(ft_dtype)
    want = ft.to(torch.float32) - base.to(torch.float32)
    buf = torch.full((4 * 37 * 19 + 64,), 0xAB, dtype=torch.uint8)
    got = EncodeInput("w", ft, base, _delta_buffer=lambda n: buf).delta
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert (got.data_ptr() == buf.data_ptr()) == (ft_dtype != torch.float64)  # float64 is not computed in place
    assert EncodeInput("w", ft, base).delta_sumsq() == pytest.approx(float(want.double().pow(2).sum()), rel=1e-12)


def test_stored_tensors_never_alias_a_reused_read_buffer(tmp_path: Path) -> None:
    """``raw`` without compression stores the fine-tune's bytes as they are (a view of the worker's read buffer):
    many tensors of mixed sizes through two workers must still rebuild bit-exactly."""
    g = torch.Generator().manual_seed(1)
    base = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(17 + 5 * (i % 4), 33, generator=g) for i in range(24)}
    ft = {k: v + torch.randn(v.shape, generator=g) * 1e-3 for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    # auto decides every tensor first, so the final pass runs on the workers with their reused buffers
    m = compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "d", codec="auto",
                 candidates=[("raw", {"mode": "full", "zstd_level": 0})], max_bytes=10**9, progress=False)
    assert all(e.codec == "raw" and e.params["mode"] == "full" for e in m.tensors.values())
    out = apply_delta(tmp_path / "d", tmp_path / "base.safetensors", tmp_path / "out", progress=False)
    files = sorted(Path(out).glob("*.safetensors"))
    rebuilt = {k: v for f in files for k, v in load_file(f).items()}
    assert rebuilt.keys() == ft.keys()
    for k in ft:
        assert torch.equal(rebuilt[k].view(torch.int32), ft[k].view(torch.int32)), k


def test_thread_scratch_takes_buffers_from_a_pool_and_the_pool_trims() -> None:
    pool = BufferPool(cap=1 << 20, keep=4)
    warm = [pool.acquire(n) for n in (100, 200, 300, 400)]
    for b in warm:
        pool.release(b)
    s = ThreadScratch(cap=1 << 20, pool=pool)
    assert s.get("ft", 250).data_ptr() == warm[2].data_ptr()  # the smallest free one that fits
    pool.trim(1)
    assert [b.numel() for b in pool._free] == [400]  # the largest kept
    assert s.get("ft", 500).numel() >= 500 and pool._free[0].numel() == 400  # outgrown: dropped, not pooled


def _tall_pair(root: Path, *, tie: bool = False, unchanged: bool = False) -> tuple[Path, Path]:
    """Tall matrices (4096 x 64: the measure pass can read only their sampled rows) in a block, a norm, and
    optionally a second name with the same bytes (tied) or a matrix equal to its base."""
    g = torch.Generator().manual_seed(7)
    base = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(4096, 64, generator=g) * 0.02 for i in range(3)}
    base["model.norm.weight"] = torch.ones(64)
    ft = {k: v + torch.randn(v.shape, generator=g) * 1e-3 * (1 + torch.rand(v.shape[0], 1, generator=g)) if v.dim() == 2 else v * 1.01
          for k, v in base.items()}
    if tie:
        base["model.layers.3.mlp.down_proj.weight"] = base["model.layers.0.mlp.down_proj.weight"].clone()
        ft["model.layers.3.mlp.down_proj.weight"] = ft["model.layers.0.mlp.down_proj.weight"].clone()
    if unchanged:
        ft["model.layers.1.mlp.down_proj.weight"] = base["model.layers.1.mlp.down_proj.weight"].clone()
    root.mkdir(parents=True, exist_ok=True)
    save_file(base, root / "base.safetensors")
    save_file(ft, root / "ft.safetensors")
    return root / "base.safetensors", root / "ft.safetensors"


@pytest.mark.parametrize("gap,span", [(0, 1 << 20), (64, 1 << 20), (10_000, 256), (10_000, 1 << 20), (1 << 20, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_rows_are_the_rows_whatever_reads_they_take(gap: int, span: int, dtype: torch.dtype, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows read by one call per run, by calls that also read (and drop) the rows between close ones, and by
    calls cut at a span: the rows asked for, in order; rows outside the tensor are refused, a truncated file is a
    typed error."""
    import deltahub.format.io as fio
    from deltahub.errors import CorruptFileError
    from deltahub.format.io import SafetensorsFile

    monkeypatch.setattr(fio, "ROW_READ_GAP", gap)
    monkeypatch.setattr(fio, "ROW_READ_SPAN", span)
    t = torch.randn(300, 7, generator=torch.Generator().manual_seed(2)).to(dtype)
    save_file({"w": t, "v": torch.ones(3)}, tmp_path / "m.safetensors")
    f = SafetensorsFile(tmp_path / "m.safetensors")
    reads: list[int] = []
    orig = f._read_into
    monkeypatch.setattr(f, "_read_into", lambda view, off: reads.append(len(view)) or orig(view, off))
    for rows in ([0], [299], list(range(300)), [0, 1, 2, 10, 11, 40, 41, 42, 43, 298, 299], list(range(0, 300, 3)),
                 list(range(5, 300, 37)), []):
        reads.clear()
        got = f.read_rows("w", rows)
        assert got.dtype == dtype and tuple(got.shape) == (len(rows), 7)
        assert torch.equal(got, t[rows]) if rows else got.numel() == 0
        if gap == 0:
            assert len(reads) == sum(1 for i, r in enumerate(rows) if i == 0 or rows[i - 1] + 1 != r)  # one per run
        rb = 7 * t.element_size()
        assert sum(reads) <= len(rows) * (rb + gap)  # at most `gap` bytes read and dropped between two rows
        if gap >= 37 * rb and span >= 300 * rb and rows:
            assert len(reads) == 1  # every row asked for is close to the next: one read
    with pytest.raises(ValueError):
        f.read_rows("w", [5, 300])
    f.close()
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) - 2000])
    with pytest.raises(CorruptFileError):
        SafetensorsFile(tmp_path / "cut.safetensors").read_rows("w", list(range(200, 300, 2)))


@pytest.mark.parametrize("kind", ["plain", "tie", "unchanged"])
def test_measure_pass_reads_only_sampled_rows_of_tall_tensors(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the base's digests cached, tall matrices are measured from their sampled rows alone (no whole read in
    the measure pass); the allocation matches a measure pass that reads everything, ties and unchanged tensors
    are still found, and the delta fits its budget and rebuilds."""
    import deltahub.compression as comp
    from deltahub.format.io import SafetensorsFile

    from deltahub.format import digest_cache

    monkeypatch.setenv("DELTAHUB_DIGEST_CACHE", str(tmp_path / "digests"))
    monkeypatch.setattr(digest_cache, "RACY_WINDOW_NS", -10**18)  # the files were just written: cache them anyway
    base, ft = _tall_pair(tmp_path / "pair", tie=kind == "tie", unchanged=kind == "unchanged")
    budget = 120_000
    compress(base, ft, tmp_path / "cold", max_bytes=budget, progress=False)  # hashes the base: digests cached
    rows_read: list[str] = []
    whole_reads: list[str] = []
    orig_rows, orig_bytes, orig_alloc = SafetensorsFile.read_rows, SafetensorsFile.read_bytes, comp._allocate
    in_measure = threading.Event()

    def read_rows(self, name, rows):  # type: ignore[no-untyped-def]
        rows_read.append(name)
        return orig_rows(self, name, rows)

    def read_bytes(self, name, out=None):  # type: ignore[no-untyped-def]
        if in_measure.is_set():
            whole_reads.append(name)
        return orig_bytes(self, name, out)

    def allocate(*a, **k):  # type: ignore[no-untyped-def]
        in_measure.set()
        try:
            return orig_alloc(*a, **k)
        finally:
            in_measure.clear()

    monkeypatch.setattr(SafetensorsFile, "read_rows", read_rows)
    monkeypatch.setattr(SafetensorsFile, "read_bytes", read_bytes)
    monkeypatch.setattr(comp, "_allocate", allocate)
    m = compress(base, ft, tmp_path / "warm", max_bytes=budget, progress=False)
    tall = [n for n in m.tensors if n.endswith("down_proj.weight")]
    assert set(rows_read) >= {"model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    assert "model.layers.2.mlp.down_proj.weight" not in whole_reads  # measured from its rows alone
    assert sum(p.stat().st_size for p in (tmp_path / "warm").iterdir()) <= budget
    if kind == "tie":
        assert m.tensors["model.layers.3.mlp.down_proj.weight"].codec == "alias"
    if kind == "unchanged":
        assert m.tensors["model.layers.1.mlp.down_proj.weight"].codec == "unchanged"
    monkeypatch.setattr(comp, "_measure_sampled", lambda *a, **k: None)  # every tensor read whole
    m_full = compress(base, ft, tmp_path / "full", max_bytes=budget, progress=False)
    for n in tall:  # the same settings chosen (the sampled rows are the rows the full path samples too)
        assert m.tensors[n].codec == m_full.tensors[n].codec
        assert m.tensors[n].stats.get("auto_choice") == m_full.tensors[n].stats.get("auto_choice")
    # the same delta, byte for byte, whether the measure pass read the rows alone or the whole tensors
    files = sorted(p.name for p in (tmp_path / "warm").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "full").iterdir())
    for f in files:
        assert (tmp_path / "warm" / f).read_bytes() == (tmp_path / "full" / f).read_bytes(), f
    cold = tmp_path / "cold"  # and as the first compress against this base, which hashed it (full reads)
    for f in files:
        assert (cold / f).read_bytes() == (tmp_path / "full" / f).read_bytes(), f
    out = apply_delta(tmp_path / "warm", base, tmp_path / "out", progress=False)
    rebuilt = load_file(next(Path(out).glob("*.safetensors")))
    want = load_file(ft)
    for n in tall:  # the rebuild errs by what the final pass measured on the whole tensor
        e = m.tensors[n]
        if e.codec in ("alias", "unchanged"):
            continue
        assert float((rebuilt[n].double() - want[n].double()).norm()) == pytest.approx(e.stats["error_l2"], rel=1e-3)


@pytest.mark.parametrize("ft_dtype,base_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                                 (torch.float32, torch.float16)])
@pytest.mark.parametrize("chunk", [7, 64, 1 << 17])
@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("mapped", [False, True])
def test_streamed_delta_has_the_bits_of_the_whole_one(ft_dtype: torch.dtype, base_dtype: torch.dtype, chunk: int,
                                                      reuse: bool, mapped: bool, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """compress's final pass reads a delta-only codec's input as ``ft - base`` straight from the files, in chunks
    and in place: the same bits as the delta of the whole tensors, the base's sha256 computed on the way (or taken
    from the caller), and None for a tensor whose bits equal its base's."""
    import deltahub.compression as comp
    from deltahub.format.io import Checkpoint, sha256_of
    from deltahub.ties import _sample_bytes

    monkeypatch.setattr(comp, "DELTA_CHUNK", chunk)
    monkeypatch.setattr(comp, "MAPPED_CHUNK", chunk)
    monkeypatch.setattr(comp, "MAPPED_READS", mapped)
    g = torch.Generator().manual_seed(3)
    base = {"w": (torch.randn(53, 31, generator=g) * 0.02).to(base_dtype)}
    base["w"].view(-1)[:3] = torch.tensor([-0.0, float("nan"), float("inf")]).to(base_dtype)
    ft = {"w": (base["w"].float() + torch.randn(53, 31, generator=g) * 1e-3).to(ft_dtype)}
    ft["w"].view(-1)[1] = float("nan")
    base["same"] = torch.randn(9, 5, generator=g).to(base_dtype)
    ft["same"] = base["same"].to(ft_dtype)
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    bc, fc = Checkpoint(tmp_path / "base.safetensors"), Checkpoint(tmp_path / "ft.safetensors")
    buf = torch.full((4 * 53 * 31 + 100,), 0xAB, dtype=torch.uint8) if reuse else None
    got, digest, sample = comp._read_delta(fc, bc, "w", None, None, buf, sample=True)
    want = EncodeInput("w", ft["w"], base["w"]).delta
    assert got is not None and got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert digest == sha256_of(base["w"])
    assert sample == _sample_bytes(ft["w"])  # the tie key's sample, taken before the bytes were overwritten
    if buf is not None:
        assert got.data_ptr() == buf.data_ptr()
    assert comp._read_delta(fc, bc, "w", "given", None, None)[1] == "given"  # a known digest is not recomputed
    same, d_same, no_sample = comp._read_delta(fc, bc, "same", None, None, None)
    assert no_sample is None
    assert d_same == sha256_of(base["same"])
    assert (same is None) == (ft_dtype == base_dtype)  # same bits only when the dtypes agree


@pytest.mark.parametrize("codec", ["bitdelta", "deltadq", "auto", "raw", "rowsparse"])
@pytest.mark.parametrize("kind", ["tie", "unchanged"])
def test_compress_writes_the_same_bytes_with_and_without_the_streamed_delta(codec: str, kind: str, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed final-pass reads (:func:`deltahub.compression._read_delta`, ``_read_xor``) are an optimisation
    only: with a tied tensor or one equal to its base, the delta's files are byte-identical to those of
    whole-tensor reads."""
    import deltahub.compression as comp

    base, ft = _tall_pair(tmp_path / "pair", tie=kind == "tie", unchanged=kind == "unchanged")
    kw = {"max_bytes": 120_000} if codec == "auto" else {}
    streamed: list[str] = []
    fn = {"raw": "_read_xor", "rowsparse": "_row_pass"}.get(codec, "_read_delta")
    orig = getattr(comp, fn)
    monkeypatch.setattr(comp, "ROWS_STREAM_MIN_BYTES", 0)  # rowsparse: rows streamed whatever the size

    def spy(*a, **k):  # type: ignore[no-untyped-def]
        streamed.append(a[0].name if fn == "_row_pass" else a[2])
        return orig(*a, **k)

    monkeypatch.setattr(comp, fn, spy)
    m = compress(base, ft, tmp_path / "a", codec=codec, progress=False, **kw)
    if kind == "tie":
        assert m.tensors["model.layers.3.mlp.down_proj.weight"].codec == "alias"
    else:
        assert m.tensors["model.layers.1.mlp.down_proj.weight"].codec == "unchanged"
    assert "model.layers.2.mlp.down_proj.weight" in streamed  # the path under test ran
    monkeypatch.setattr(comp, "_stream_kind", lambda *a: None)
    compress(base, ft, tmp_path / "b", codec=codec, progress=False, **kw)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("chunk", [7, 1 << 17])  # 7: chunks not a multiple of the tie sample's stride
def test_streamed_xor_payload_is_the_whole_one(dtype: torch.dtype, shuffle: bool, chunk: int, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``raw``'s xor payload read a chunk at a time from the files has the bytes of the whole-tensor XOR (in byte
    planes when shuffled), the base's sha256 and the tie sample of the whole fine-tune; equal bits give None."""
    import deltahub.compression as comp
    from deltahub.codecs.raw import _int_view, _shuffle
    from deltahub.format.io import Checkpoint, sha256_of, tensor_bytes
    from deltahub.ties import _sample_bytes

    monkeypatch.setattr(comp, "DELTA_CHUNK", chunk)
    g = torch.Generator().manual_seed(5)
    if dtype.is_floating_point:
        base = {"w": torch.randn(250, 200, generator=g).to(dtype)}
        ft = {"w": (base["w"].float() + torch.randn(250, 200, generator=g) * 1e-2).to(dtype)}
    else:
        base = {"w": torch.randint(0, 200, (250, 200), generator=g).to(dtype)}
        ft = {"w": base["w"] ^ torch.randint(0, 3, (250, 200), generator=g).to(dtype)}
    base["same"], ft["same"] = base["w"][:3].clone(), base["w"][:3].clone()
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    bc, fc = Checkpoint(tmp_path / "base.safetensors"), Checkpoint(tmp_path / "ft.safetensors")
    got, digest, sample = comp._read_xor(fc, bc, "w", None, None, None, shuffle, sample=True)
    want = tensor_bytes(_int_view(ft["w"]) ^ _int_view(base["w"]))
    want = _shuffle(want, dtype.itemsize) if shuffle else want
    assert got is not None and torch.equal(got, want)
    assert digest == sha256_of(base["w"]) and sample == _sample_bytes(ft["w"])
    assert comp._read_xor(fc, bc, "same", None, None, None, shuffle)[0] is None


@pytest.mark.parametrize("ft_dtype,base_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                                 (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("codec", ["bitdelta", "rowsparse", "raw"])
def test_streamed_reads_of_mixed_and_wide_dtypes_write_the_same_bytes(ft_dtype: torch.dtype, base_dtype: torch.dtype,
                                                                      codec: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """float64 fine-tunes (8 bytes per element: not read into the delta's buffer) and mixed dtypes give the bytes
    of whole-tensor reads, and rebuild to the fine-tune's dtype."""
    import deltahub.compression as comp

    monkeypatch.setattr(comp, "ROWS_STREAM_MIN_BYTES", 0)
    g = torch.Generator().manual_seed(9)
    base = {f"model.layers.{i}.mlp.down_proj.weight": (torch.randn(96, 64, generator=g) * 0.02).to(base_dtype)
            for i in range(2)}
    ft = {k: (v.double() + torch.randn(96, 64, generator=g, dtype=torch.float64) * 1e-3).to(ft_dtype)
          for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "a", codec=codec, progress=False)
    monkeypatch.setattr(comp, "_stream_kind", lambda *a: None)
    compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", tmp_path / "b", codec=codec, progress=False)
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    out = apply_delta(tmp_path / "a", tmp_path / "base.safetensors", tmp_path / "out", progress=False)
    rebuilt = load_file(next(Path(out).glob("*.safetensors")))
    assert all(rebuilt[k].dtype == ft_dtype for k in ft)


def test_large_zstd_frames_are_tensors_over_their_own_bytes() -> None:
    """A large frame is not copied (it would briefly exist twice), stays valid after its bytes object is dropped
    by the caller, and neither warns nor touches the process's warnings filters (compress's workers call it)."""
    import gc
    import os
    import warnings

    import deltahub.codecs._zstd as zs

    data = os.urandom(zs.ZERO_COPY_MIN) + bytes(3 * zs.ZERO_COPY_MIN)
    filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = zs.compress(data, 1)
        small = zs.compress(b"abc" * 100, 1)
    gc.collect()
    assert warnings.filters == filters
    assert t.numel() >= zs.ZERO_COPY_MIN and t.dtype == torch.uint8
    assert zs.decompress_frame(t.numpy(), what="t", size=len(data)) == data
    assert zs.decompress_frame(small.numpy(), what="s", size=300) == b"abc" * 100


def test_auto_keeps_the_group_size_deltadq_chose_on_the_measured_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tall matrix measured on a row sample is encoded with the group size ``group_size="auto"`` chose on that
    sample (what was measured is what is written), and the search does not run again on the whole matrix."""
    from deltahub.codecs import deltadq

    base, ft = _tall_pair(tmp_path / "pair")
    calls: list[tuple[int, int]] = []
    orig = deltadq.choose_group_size

    def choose(d2d, p, calibration, memo=None):  # type: ignore[no-untyped-def]
        g = orig(d2d, p, calibration, memo)
        calls.append((d2d.shape[0], g))
        return g

    monkeypatch.setattr(deltadq, "choose_group_size", choose)
    m = compress(base, ft, tmp_path / "d", codec="auto", candidates=[("deltadq", {"preset": "16x"})],
                 max_bytes=10**6, progress=False)
    tall = [n for n in m.tensors if n.endswith("down_proj.weight")]
    assert calls and all(rows < 4096 for rows, _ in calls)  # only samples were searched
    assert {m.tensors[n].params["group_size"] for n in tall} <= {g for _, g in calls}
    assert all(m.tensors[n].codec == "deltadq" for n in tall)
    out = apply_delta(tmp_path / "d", base, tmp_path / "out", progress=False)
    rebuilt = load_file(next(Path(out).glob("*.safetensors")))
    want = load_file(ft)
    for n in tall:  # dropout keeping 1 in 4, rescaled x4: E||D_hat - D||^2 = p / (1 - p) ||D||^2 = 3 ||D||^2 (+ 4-bit codes)
        err = (rebuilt[n] - want[n]).norm() / (load_file(base)[n] - want[n]).norm()
        assert 3 ** 0.5 * 0.9 < err < 3 ** 0.5 * 1.1, n


def _misaligned_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A valid safetensors file whose data starts at an odd offset (the header is not padded): no tensor's bytes
    are aligned to its element size."""
    import json
    import struct

    from deltahub.format.io import tensor_bytes

    header: dict[str, object] = {}
    blobs, at = [], 0
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    for k, v in tensors.items():
        b = tensor_bytes(v.contiguous()).numpy().tobytes()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [at, at + len(b)]}
        blobs.append(b)
        at += len(b)
    h = json.dumps(header).encode()
    if (8 + len(h)) % 2 == 0:
        h += b" "
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mapped_reads_are_used_where_aligned_and_give_the_bytes_of_plain_reads(dtype: torch.dtype, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """compress reads the delta from mappings of both files (no copy) when the tensors' bytes are aligned, and falls
    back to reads when they are not (a valid file with an unpadded header): either way the delta's files are
    byte-identical to those of plain reads."""
    import deltahub.compression as comp

    g = torch.Generator().manual_seed(11)
    base = {f"model.layers.{i}.mlp.down_proj.weight": (torch.randn(80, 48, generator=g) * 0.02).to(dtype)
            for i in range(2)}
    ft = {k: (v.float() + torch.randn(80, 48, generator=g) * 1e-3).to(dtype) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    _misaligned_safetensors(tmp_path / "odd-ft.safetensors", ft)
    mapped: list[str] = []
    orig = comp._mapped_delta
    monkeypatch.setattr(comp, "_mapped_delta", lambda *a: mapped.append("x") or orig(*a))
    monkeypatch.setattr(comp, "MAPPED_CHUNK", 1000)  # several steps per tensor, pages dropped between them
    outs = {}
    for tag, ft_file, on in [("mapped", "ft", True), ("odd", "odd-ft", True), ("read", "ft", False)]:
        monkeypatch.setattr(comp, "MAPPED_READS", on)
        mapped.clear()
        compress(tmp_path / "base.safetensors", tmp_path / f"{ft_file}.safetensors", tmp_path / tag,
                 codec="bitdelta", progress=False)
        outs[tag] = {p.name: p.read_bytes() for p in (tmp_path / tag).iterdir() if p.suffix == ".safetensors"}
        assert bool(mapped) == (tag == "mapped"), tag
    assert outs["mapped"] == outs["read"]
    assert outs["odd"] == outs["read"]


def test_mapped_bytes_checks_spans_and_outlives_a_view(tmp_path: Path) -> None:
    from deltahub.format.io import SafetensorsFile

    t = torch.arange(5000, dtype=torch.float32)
    save_file({"t": t}, tmp_path / "a.safetensors")
    with SafetensorsFile(tmp_path / "a.safetensors") as f, f.mapped("t") as m:
        assert m is not None and m.nbytes == 20000
        assert torch.equal(m.span(400, 40).view(torch.float32), t[100:110])
        with pytest.raises(ValueError):
            m.span(19990, 20)
        m.done(0, 12000)  # dropped pages read back from the file
        assert torch.equal(m.span(0, 20000).view(torch.float32), t)
        kept = m.span(0, 8)
    assert torch.equal(kept.view(torch.float32), t[:2])  # a view alive at exit keeps the mapping


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measure_pass_row_samples_in_reused_buffers_choose_the_same_delta(dtype: torch.dtype, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The measure pass picks its row samples (and their deltas) into per-thread buffers reused across tensors of
    several shapes; the allocation and the delta are byte for byte those of fresh arrays per sample (buffers off)."""
    import deltahub.compression as comp

    g = torch.Generator().manual_seed(3)
    shapes = [(1200, 64), (96, 64), (700, 96), (1200, 64), (40, 32)]
    base = {f"model.layers.{i}.mlp.w{i}.weight": (torch.randn(s, generator=g) * 0.02).to(dtype) for i, s in enumerate(shapes)}
    ft = {k: (v.float() + torch.randn(v.shape, generator=g) * 1e-3).to(dtype) for k, v in base.items()}
    (tmp_path / "pair").mkdir()
    save_file(base, tmp_path / "pair" / "base.safetensors")
    save_file(ft, tmp_path / "pair" / "ft.safetensors")
    b, f = tmp_path / "pair" / "base.safetensors", tmp_path / "pair" / "ft.safetensors"
    picked: list[bool] = []
    orig = comp._select_rows

    def spy(t, idx, scratch, slot):  # type: ignore[no-untyped-def]
        picked.append(scratch is not None and scratch.get(slot, 1) is not None)
        return orig(t, idx, scratch, slot)

    monkeypatch.setattr(comp, "_select_rows", spy)
    compress(b, f, tmp_path / "reused", target_ratio=12, progress=False)
    assert picked and all(picked)
    monkeypatch.setattr(comp, "PICK_SCRATCH_BYTES", 0)  # every sample a fresh array
    compress(b, f, tmp_path / "fresh", target_ratio=12, progress=False)
    for p in sorted((tmp_path / "fresh").iterdir()):
        assert (tmp_path / "reused" / p.name).read_bytes() == p.read_bytes(), p.name
