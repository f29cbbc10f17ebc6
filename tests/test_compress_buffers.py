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
