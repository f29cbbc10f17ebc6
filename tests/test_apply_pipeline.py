"""The pipelined rebuild (same bytes as one tensor at a time), ``apply --dtype``, and the base digest cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltahub.delta as delta_mod
import deltahub.format.io as io_mod
from conftest import make_tiny_pair
from deltahub.cli import OutputDtype, app
from deltahub.compression import compress
from deltahub.delta import OUTPUT_DTYPES, Delta, apply_delta
from deltahub.errors import BaseMismatchError
from deltahub.format import digest_cache
from deltahub.format.io import Checkpoint


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture
def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """(base, fine-tune, delta): default policy (BitDelta blocks, raw embeddings), own digest cache, no racy window."""
    monkeypatch.setenv("DELTAHUB_DIGEST_CACHE", str(tmp_path / "digests"))
    monkeypatch.setattr(digest_cache, "RACY_WINDOW_NS", 0)
    base, ft = make_tiny_pair(tmp_path)
    compress(base, ft, tmp_path / "delta", codec="bitdelta", progress=False)
    return base, ft, tmp_path / "delta"


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts base-tensor sha256 computations, whole or streamed (stored-tensor digests are another function)."""
    calls: list[int] = []
    real = io_mod.tensor_hasher

    def counting() -> object:
        calls.append(1)
        return real()

    monkeypatch.setattr(io_mod, "tensor_hasher", counting)
    return calls


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_pipelined_apply_is_bit_identical_to_one_at_a_time(pair: tuple[Path, Path, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    base, _, delta = pair
    monkeypatch.setattr(delta_mod, "PIPELINE_BYTES", 1)  # window = the largest tensor: exercises the byte bound
    out = apply_delta(delta, base, tmp_path / f"out{workers}", progress=False, workers=workers)
    d = Delta(delta)
    with Checkpoint(base) as ck:  # the reference: each tensor rebuilt alone, in the calling thread
        ref = {n: d.reconstruct(n, ck.read(n) if n in ck else None) for n in d.manifest.tensors}
    got = load_file(out / "model.safetensors")
    assert list(got) == sorted(ref) and all(torch.equal(got[n].view(torch.uint8), ref[n].view(torch.uint8)) for n in ref)
    seq = apply_delta(delta, base, tmp_path / "seq", progress=False, workers=1)
    assert _files(out) == _files(seq)
    with Checkpoint(base) as ck:  # the in-memory stream (pipelined, in order) gives the same tensors
        streamed = list(d.iter_tensors(ck, workers=workers))
    assert [n for n, _ in streamed] == list(d.manifest.tensors)
    assert all(torch.equal(t.view(torch.uint8), ref[n].view(torch.uint8)) for n, t in streamed)


def test_pipelined_keeps_order_and_first_error() -> None:
    seen = list(io_mod.pipelined(range(20), lambda i: i * i, workers=3, cost=lambda i: 10, max_cost=25))
    assert seen == [(i, i * i) for i in range(20)]

    def fail(i: int) -> int:
        if i in (4, 7):
            raise ValueError(f"item {i}")
        return i

    got = []
    with pytest.raises(ValueError, match="item 4"):
        for i, _ in io_mod.pipelined(range(10), fail, workers=4):
            got.append(i)
    assert got == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_apply_dtype_casts_floating_tensors_and_config(pair: tuple[Path, Path, Path], tmp_path: Path, dtype: str) -> None:
    base, _, delta = pair
    full = load_file(apply_delta(delta, base, tmp_path / "full", progress=False) / "model.safetensors")
    out = apply_delta(delta, base, tmp_path / "small", progress=False, dtype=dtype)
    small = load_file(out / "model.safetensors")
    want = getattr(torch, dtype)
    assert set(small) == set(full)
    for n, t in full.items():  # exactly the full-precision rebuild, rounded once
        assert small[n].dtype == want and torch.equal(small[n], t.to(want)), n
    cfg = json.loads((out / "config.json").read_text())
    assert [cfg[k] for k in ("torch_dtype", "dtype") if k in cfg] and all(cfg[k] == dtype for k in ("torch_dtype", "dtype") if k in cfg)
    assert json.loads((tmp_path / "full" / "config.json").read_text()) == Delta(delta).manifest.config  # default: untouched


def test_apply_dtype_cli_and_bad_value(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    base, _, delta = pair
    assert [d.value for d in OutputDtype] == list(OUTPUT_DTYPES)
    r = CliRunner().invoke(app, ["apply", str(delta), "--base", str(base), "-o", str(tmp_path / "o"), "--dtype", "float16", "-q"])
    assert r.exit_code == 0, r.output
    assert {t.dtype for t in load_file(tmp_path / "o" / "model.safetensors").values()} == {torch.float16}
    r = CliRunner().invoke(app, ["apply", str(delta), "--base", str(base), "-o", str(tmp_path / "o2"), "--dtype", "int8"])
    assert r.exit_code != 0 and not (tmp_path / "o2").exists()
    with pytest.raises(ValueError, match="int8"):
        apply_delta(delta, base, tmp_path / "o3", progress=False, dtype="int8")
    assert not (tmp_path / "o3").exists()


# ------------------------------------------------------------------------------------------ digest cache


def _cache_files(tmp_path: Path, of: str = "model.safetensors") -> list[Path]:
    """The digest cache files of the files named ``of`` (the base's by default; the delta's are cached too)."""
    return sorted(p for p in (tmp_path / "digests").glob("*.json") if json.loads(p.read_text())["path"].endswith(os.sep + of))


def test_repeated_apply_does_not_rehash_the_base(pair: tuple[Path, Path, Path], tmp_path: Path, hash_calls: list[int]) -> None:
    base, _, delta = pair
    shutil.rmtree(tmp_path / "digests", ignore_errors=True)
    apply_delta(delta, base, tmp_path / "o1", progress=False)
    n_tensors = len(Checkpoint(base).keys())
    assert len(hash_calls) == n_tensors and len(_cache_files(tmp_path)) == 1
    hash_calls.clear()
    apply_delta(delta, base, tmp_path / "o2", progress=False)
    assert hash_calls == []  # every base digest came from the cache, and the fingerprint still matched
    assert _files(tmp_path / "o1") == _files(tmp_path / "o2")


@pytest.mark.parametrize("change", ["touch", "rewrite same bytes", "copy over"])
def test_any_change_to_the_base_file_invalidates_the_cache(pair: tuple[Path, Path, Path], tmp_path: Path,
                                                          hash_calls: list[int], change: str) -> None:
    base, _, delta = pair
    apply_delta(delta, base, tmp_path / "o1", progress=False)
    f = base / "model.safetensors"
    if change == "touch":
        os.utime(f)
    elif change == "rewrite same bytes":
        st = os.stat(f)
        f.write_bytes(f.read_bytes())
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime restored, ctime differs
    else:
        shutil.copyfile(f, tmp_path / "copy")
        os.replace(tmp_path / "copy", f)  # new inode
    hash_calls.clear()
    apply_delta(delta, base, tmp_path / "o2", progress=False)
    assert len(hash_calls) == len(Checkpoint(base).keys())


def test_a_cached_digest_never_lets_a_changed_wrong_base_pass(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The right base's digests are cached; the file is then overwritten by another model of the same
    shapes, mtime put back: the identity (ctime) differs, so the base is rehashed and refused."""
    base, _, delta = pair
    apply_delta(delta, base, tmp_path / "o1", progress=False)
    f = base / "model.safetensors"
    st = os.stat(f)
    sd = load_file(f)
    name = "model.layers.0.self_attn.q_proj.weight"
    sd[name] = sd[name] + 1.0
    save_file(sd, str(f), metadata={"format": "pt"})
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(BaseMismatchError, match="q_proj"):
        apply_delta(delta, base, tmp_path / "o2", progress=False)
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("damage", ["garbage", "wrong digest, stale checksum", "other schema", "symlink"])
def test_a_corrupt_or_stranger_cache_file_is_ignored(pair: tuple[Path, Path, Path], tmp_path: Path,
                                                     hash_calls: list[int], damage: str) -> None:
    base, _, delta = pair
    apply_delta(delta, base, tmp_path / "o1", progress=False)
    (cf,) = _cache_files(tmp_path)
    doc = json.loads(cf.read_text())
    if damage == "garbage":
        cf.write_bytes(b"\x00{not json")
    elif damage == "wrong digest, stale checksum":
        doc["tensors"] = {k: [*v[:2], "0" * 64] for k, v in doc["tensors"].items()}
        cf.write_text(json.dumps(doc))
    elif damage == "other schema":
        doc["format"] = "deltahub-digests/999"
        cf.write_text(json.dumps(doc))
    else:
        (tmp_path / "elsewhere.json").write_text(cf.read_text())
        cf.unlink()
        cf.symlink_to(tmp_path / "elsewhere.json")
    hash_calls.clear()
    apply_delta(delta, base, tmp_path / "o2", progress=False)  # still right, by hashing again
    assert len(hash_calls) == len(Checkpoint(base).keys())
    assert _files(tmp_path / "o1") == _files(tmp_path / "o2")


def test_base_changing_during_apply_is_refused(pair: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, _, delta = pair
    apply_delta(delta, base, tmp_path / "o1", progress=False)  # cached: later digests are not recomputed
    real = Delta._rebuild_one
    touched: list[bool] = []

    def touching(self: Delta, *a: object, **k: object) -> object:
        if not touched:
            touched.append(True)
            os.utime(base / "model.safetensors")
        return real(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Delta, "_rebuild_one", touching)
    with pytest.raises(BaseMismatchError, match="changed while it was being read"):
        apply_delta(delta, base, tmp_path / "o2", progress=False, workers=1)
    assert not (tmp_path / "o2").exists()


def test_racy_files_are_not_cached(pair: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, _, delta = pair
    shutil.rmtree(tmp_path / "digests", ignore_errors=True)
    monkeypatch.setattr(digest_cache, "RACY_WINDOW_NS", 3600 * 10**9)  # the base was written "just now"
    apply_delta(delta, base, tmp_path / "o1", progress=False)
    assert _cache_files(tmp_path) == []


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DELTAHUB_DIGEST_CACHE", raising=False)
    monkeypatch.setenv("DELTAHUB_CACHE", str(tmp_path / "dh"))
    assert digest_cache.digest_cache_dir() == tmp_path / "dh" / "digests"
    monkeypatch.setenv("DELTAHUB_DIGEST_CACHE", "off")
    assert digest_cache.digest_cache_dir() is None
    monkeypatch.delenv("DELTAHUB_DIGEST_CACHE")
    monkeypatch.delenv("DELTAHUB_CACHE")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert digest_cache.digest_cache_dir() == (tmp_path / "hf").resolve() / "deltahub" / "digests"


def test_hub_blobs_are_keyed_by_their_content_address(tmp_path: Path) -> None:
    blob = tmp_path / "models--a--b" / "blobs" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"x" * 10)
    fd = digest_cache.FileDigests(blob, {}, tmp_path / "c")
    assert fd.cache_file is not None and fd.cache_file.name == f"blob-{'ab' * 32}-10.json"


def test_parallel_writer_writes_the_serial_writers_bytes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(300, 7, generator=g), "empty": torch.zeros(0, 3), "b": torch.randint(0, 9, (5,), generator=g),
               "c": torch.randn(1000, generator=g).to(torch.bfloat16), "z": torch.zeros(0)}
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    io_mod.write_safetensors(tmp_path / "serial.safetensors", specs, tensors.values(), {"format": "pt"})
    order: list[str] = []
    io_mod.write_safetensors_parallel(tmp_path / "par.safetensors", specs, lambda s: tensors[s[0]], {"format": "pt"},
                                      workers=3, on_written=lambda s: order.append(s[0]))
    assert (tmp_path / "par.safetensors").read_bytes() == (tmp_path / "serial.safetensors").read_bytes()
    assert order == list(tensors)

    def bad(spec: tuple[str, torch.dtype, tuple[int, ...]]) -> torch.Tensor:
        return tensors[spec[0]].double() if spec[0] in ("b", "c") else tensors[spec[0]]

    with pytest.raises(io_mod.CorruptFileError, match="'b' is torch.float64"):
        io_mod.write_safetensors_parallel(tmp_path / "bad.safetensors", specs, bad, workers=4)


def test_disk_full_in_a_worker_is_one_typed_error(pair: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from deltahub.errors import OutputWriteError

    base, _, delta = pair
    real = os.pwrite

    def full(fd: int, data: object, offset: int) -> int:
        if offset > 0:  # the header goes through; a tensor write on a worker thread fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(io_mod.os, "pwrite", full)
    with pytest.raises(OutputWriteError, match="No space left"):
        apply_delta(delta, base, tmp_path / "out", progress=False, workers=3)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_compress_fills_and_reuses_the_digest_cache(pair: tuple[Path, Path, Path], tmp_path: Path, hash_calls: list[int]) -> None:
    """compress hashes each base tensor once per base file: a second compress (or an apply) against the
    same unchanged base reuses the digests, and records the same fingerprint."""
    base, ft, delta = pair
    shutil.rmtree(tmp_path / "digests", ignore_errors=True)
    m1 = compress(base, ft, tmp_path / "d1", codec="bitdelta", progress=False)
    assert len(hash_calls) == len(Checkpoint(base).keys())
    hash_calls.clear()
    m2 = compress(base, ft, tmp_path / "d2", codec="deltadq", preset="64x", progress=False)
    apply_delta(tmp_path / "d2", base, tmp_path / "o", progress=False)
    assert hash_calls == [] and m1.base.fingerprint == m2.base.fingerprint == Delta(delta).manifest.base.fingerprint


def test_pipelined_small_items_run_past_a_slow_large_one() -> None:
    """With a byte cost, small items are not held behind a slow large one at the head of the queue (more than
    workers + 1 in flight), the bytes in flight never exceed max_cost, and results still come in order."""
    import threading
    import time

    sizes = [100] + [1] * 12
    started: list[int] = []
    lock = threading.Lock()
    inflight = {"now": 0, "max": 0}
    head_done = threading.Event()

    def fn(i: int) -> int:
        with lock:
            started.append(i)
            inflight["now"] += sizes[i]
            inflight["max"] = max(inflight["max"], inflight["now"])
        if i == 0:
            time.sleep(0.3)  # the large head item is slow
            with lock:
                inflight["past_head"] = len(started) - 1
            head_done.set()
        with lock:
            inflight["now"] -= sizes[i]
        return i * 10

    out = list(io_mod.pipelined(range(len(sizes)), fn, workers=2, cost=sizes.__getitem__, max_cost=106))
    assert [r for _, r in out] == [i * 10 for i in range(len(sizes))]
    assert inflight["max"] <= 106
    assert len(started) == len(sizes)
    assert inflight["past_head"] == 6  # bytes allowed 6 small items past the head (a count bound: 2)
    # without a cost, the count bound (workers + 1 in flight) stays
    seen: list[int] = []
    list(io_mod.pipelined(range(6), lambda i: seen.append(i) or i, workers=2))
    assert sorted(seen) == list(range(6))


def test_parallel_writer_never_stalls_behind_a_slow_head(tmp_path: Path) -> None:
    """A finished write holds no memory, so every small tensor is written while a slow large one at the head
    is still being produced (no window of pending items), and the file is still the serial writer's."""
    import threading
    import time

    tensors = {"big": torch.randn(4000)} | {f"s{i:02d}": torch.full((3,), float(i)) for i in range(40)}
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    done_before_head: list[str] = []
    head_done = threading.Event()

    def produce(spec: tuple[str, torch.dtype, tuple[int, ...]]) -> torch.Tensor:
        if spec[0] == "big":
            time.sleep(0.5)
            head_done.set()
        elif not head_done.is_set():
            done_before_head.append(spec[0])
        return tensors[spec[0]]

    io_mod.write_safetensors_parallel(tmp_path / "par.safetensors", specs, produce, {"format": "pt"}, workers=2)
    io_mod.write_safetensors(tmp_path / "serial.safetensors", specs, tensors.values(), {"format": "pt"})
    assert (tmp_path / "par.safetensors").read_bytes() == (tmp_path / "serial.safetensors").read_bytes()
    assert len(done_before_head) == 40


def test_read_bytes_into_a_reused_buffer(tmp_path: Path) -> None:
    """``read_bytes(name, out)`` reads into the caller's scratch (a view of it, same bytes as a fresh read); a
    scratch too small or of another dtype is ignored; reads from several threads at once get their own bytes."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(1000 + i, generator=g) for i in range(16)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with io_mod.SafetensorsFile(tmp_path / "m.safetensors") as f:
        scratch = torch.empty(8000, dtype=torch.uint8)
        got = f.read_bytes("t3", scratch)
        assert got.data_ptr() == scratch.data_ptr() and torch.equal(got, f.read_bytes("t3"))
        assert f.read_bytes("t3", torch.empty(10, dtype=torch.uint8)).numel() == 1003 * 4
        assert f.read_bytes("t3", torch.empty(8000, dtype=torch.int16)).data_ptr() != scratch.data_ptr()
        with ThreadPoolExecutor(4) as pool:
            res = list(pool.map(lambda n: f.read(n), list(tensors) * 8))
        assert all(torch.equal(r, tensors[n]) for r, n in zip(res, list(tensors) * 8))


def test_paused_gc_nests_and_restores() -> None:
    """The collector is off inside (nested, from several threads) and back as it was after, even on error."""
    import gc
    import threading

    from deltahub.utils.gc_pause import paused_gc

    assert gc.isenabled()
    inner_ok = threading.Event()

    def other() -> None:
        with paused_gc():
            inner_ok.set()

    with paused_gc():
        assert not gc.isenabled()
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert inner_ok.is_set() and not gc.isenabled()  # the other thread's exit did not re-enable it
        with pytest.raises(ValueError), paused_gc():
            raise ValueError
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # a collector the caller had disabled stays disabled
    finally:
        gc.enable()


@pytest.fixture
def stored_hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stored tensors hashed to verify them (delta side), by key."""
    import deltahub.format.delta_files as df

    calls: list[str] = []
    real = df.check_tensor

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(k["key"])
        return real(*a, **k)

    monkeypatch.setattr(df, "check_tensor", counting)
    return calls


def test_a_delta_loaded_again_is_not_rehashed(pair: tuple[Path, Path, Path], tmp_path: Path, stored_hashes: list[str]) -> None:
    """Stored tensors verified once are not hashed again while their file is unchanged (a server restart, a
    repeated apply); the output is the same bytes."""
    base, _, delta = pair
    apply_delta(delta, base, tmp_path / "o1", progress=False)
    n = len(stored_hashes)
    assert n > 0 and len(_cache_files(tmp_path, "delta.safetensors")) == 1
    stored_hashes.clear()
    apply_delta(delta, base, tmp_path / "o2", progress=False)
    assert stored_hashes == []
    assert _files(tmp_path / "o1") == _files(tmp_path / "o2")
    Delta(delta).close()  # opened again without reading: the cache is kept
    apply_delta(delta, base, tmp_path / "o3", progress=False)
    assert stored_hashes == []


@pytest.mark.parametrize("change", ["corrupt a byte, mtime restored", "touch"])
def test_a_changed_delta_file_is_hashed_and_refused_again(pair: tuple[Path, Path, Path], tmp_path: Path,
                                                           stored_hashes: list[str], change: str) -> None:
    """Any change to a delta file after its tensors were verified (ctime moves even when mtime is put back)
    makes every stored tensor of it be hashed again: a corrupted byte is still an IntegrityError."""
    from deltahub.errors import IntegrityError

    base, _, delta = pair
    apply_delta(delta, base, tmp_path / "o1", progress=False)
    f = delta / "delta.safetensors"
    st = os.stat(f)
    if change == "touch":
        os.utime(f)
    else:
        data = bytearray(f.read_bytes())
        data[-1] ^= 0x01  # the last stored tensor's last byte
        f.write_bytes(bytes(data))
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    stored_hashes.clear()
    if change == "touch":
        apply_delta(delta, base, tmp_path / "o2", progress=False)
        assert len(stored_hashes) > 0
    else:
        with pytest.raises(IntegrityError, match="does not match its digest"):
            apply_delta(delta, base, tmp_path / "o2", progress=False)
        assert not (tmp_path / "o2").exists()


def test_a_delta_file_changing_while_read_is_hashed(pair: tuple[Path, Path, Path], tmp_path: Path,
                                                    stored_hashes: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is re-checked after each stored tensor is read: a change after the cache was loaded means the
    bytes read may not be those that were hashed, so they are hashed."""
    import deltahub.format.delta_files as df

    base, _, delta = pair
    apply_delta(delta, base, tmp_path / "o1", progress=False)
    stored_hashes.clear()
    real = df.DeltaFiles.stored
    touched: list[int] = []

    def touching(self, keys):  # type: ignore[no-untyped-def]
        if not touched:
            os.utime(delta / "delta.safetensors")
            touched.append(1)
        return real(self, keys)

    monkeypatch.setattr(df.DeltaFiles, "stored", touching)
    apply_delta(delta, base, tmp_path / "o2", progress=False)
    assert len(stored_hashes) > 0
