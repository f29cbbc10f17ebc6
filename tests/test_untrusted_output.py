"""Untrusted outputs: nothing outside the output is touched, nothing is lost.

* the final move never replaces an output that appeared (or was replaced) while a run wrote it;
* an output that is, contains or lies inside an input (or is ``.``, ``..``, ``/``) is refused;
* SIGTERM / SIGKILL leave no temp directory behind (the next run removes a dead run's temp);
* OS write failures (disk full, file too large, read-only) are one typed line, temp removed.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import deltahub.calibration as calibration_mod
import deltahub.delta as delta_mod
import deltahub.format.io as io
from conftest import make_tiny_pair
from deltahub.calibration import save_calibration
from deltahub.cli import app
from deltahub.compression import compress
from deltahub.delta import apply_delta
from deltahub.errors import OutputExistsError, OutputWriteError, UnsafeOutputError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
CLI = [sys.executable, "-c", "from deltahub.cli import app; app()"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(DELTAHUB_DISABLE_PROGRESS_BARS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


def _temps(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _one_error_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.fixture
def pair_and_delta(tmp_path: Path) -> tuple[Path, Path, Path]:
    base, ft = make_tiny_pair(tmp_path)
    compress(base, ft, tmp_path / "delta", codec="bitdelta", progress=False, compute_stats=False)
    return base, ft, tmp_path / "delta"


@pytest.fixture(params=["renameat2", "fallback"])
def rename_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with Linux renameat2, and again with the portable fallback (link / check-then-rename)."""
    if request.param == "fallback":
        monkeypatch.setattr(io, "_renameat2", lambda src, dst, flags: False)
    elif not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux-only")
    return request.param


def test_renameat2_is_used_on_linux(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):  # an EMPTY directory is not replaced either
        io._rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert io._renameat2_fn, "glibc renameat2 not found"
    io._rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").is_dir() and not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------ 1. final rename


def _patch_write(monkeypatch: pytest.MonkeyPatch, before: object) -> None:
    """Run ``before(tmp_file)`` in the middle of an apply (when its first model file is written)."""
    original = delta_mod.write_safetensors_parallel

    def slow(path, *a, **kw):  # type: ignore[no-untyped-def]
        before(Path(path))  # type: ignore[operator]
        return original(path, *a, **kw)

    monkeypatch.setattr(delta_mod, "write_safetensors_parallel", slow)


def test_output_created_during_apply_is_kept(pair_and_delta: tuple[Path, Path, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, rename_mode: str) -> None:
    base, _, delta = pair_and_delta
    out = tmp_path / "out"

    def user_makes_folder(_: Path) -> None:
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("mine")

    _patch_write(monkeypatch, user_makes_folder)
    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        apply_delta(delta, base, out, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["notes.txt"]
    assert _temps(tmp_path) == []


def test_empty_folder_created_during_apply_is_not_replaced(pair_and_delta: tuple[Path, Path, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    base, _, delta = pair_and_delta
    out = tmp_path / "out"
    _patch_write(monkeypatch, lambda _: out.mkdir(exist_ok=True))  # plain rename() would silently replace it
    with pytest.raises(OutputExistsError):
        apply_delta(delta, base, out, progress=False)
    assert out.is_dir() and os.listdir(out) == [] and _temps(tmp_path) == []


def test_overwrite_keeps_an_output_replaced_meanwhile(pair_and_delta: tuple[Path, Path, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, rename_mode: str) -> None:
    base, _, delta = pair_and_delta
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")  # the output the user asked to replace

    def someone_replaces_it(_: Path) -> None:
        if (out / "old.txt").exists():
            shutil.rmtree(out)
            out.mkdir()
            (out / "new.txt").write_text("someone else's")

    _patch_write(monkeypatch, someone_replaces_it)
    with pytest.raises(OutputExistsError, match="was replaced while this run"):
        apply_delta(delta, base, out, overwrite=True, progress=False)
    assert (out / "new.txt").read_text() == "someone else's" and _temps(tmp_path) == []
    # Without interference, --overwrite replaces the output it saw.
    monkeypatch.undo()
    apply_delta(delta, base, out, overwrite=True, progress=False)
    assert (out / "model.safetensors").is_file() and not (out / "new.txt").exists() and _temps(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_concurrent_applies_one_wins(pair_and_delta: tuple[Path, Path, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, rename_mode: str, overwrite: bool) -> None:
    base, _, delta = pair_and_delta
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "old.txt").write_text("old")
    barrier = threading.Barrier(2, timeout=60)
    _patch_write(monkeypatch, lambda _: barrier.wait())  # both runs are mid-write before either finishes
    results: list[object] = [None, None]

    def run(i: int) -> None:
        try:
            results[i] = apply_delta(delta, base, out, overwrite=overwrite, progress=False)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertions
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], OutputExistsError), results
    assert (out / "model.safetensors").is_file() and not (out / "old.txt").exists()
    assert _temps(tmp_path) == []


def _old_output_on_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An existing output ``tmp_path/out`` (holding ``old.txt``), with the portable rename fallback forced."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(io, "_renameat2", lambda src, dst, flags: False)
    return out


def test_output_written_by_another_run_after_the_old_one_moved_aside(pair_and_delta: tuple[Path, Path, Path],
                                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Portable fallback, overwrite: the old output has been moved aside (identity checked) when another run
    writes the output. That run's output is kept untouched, this run's result is discarded with a one-line
    error, and the old output, which the user asked to replace, is removed (no leftover temp)."""
    base, _, delta = pair_and_delta
    out = _old_output_on_fallback(tmp_path, monkeypatch)
    real = io._rename_noreplace

    def racing(src: Path, dst: Path) -> None:
        if Path(dst) == out and ".tmp-" in Path(src).name and not out.exists():
            out.mkdir()
            (out / "theirs.txt").write_text("another run")  # lands between our two renames
        real(src, dst)

    monkeypatch.setattr(io, "_rename_noreplace", racing)
    with pytest.raises(OutputExistsError, match="appeared"):
        apply_delta(delta, base, out, overwrite=True, progress=False)
    assert (out / "theirs.txt").read_text() == "another run" and not (out / "model.safetensors").exists()
    assert _temps(tmp_path) == []


def test_calibration_file_appearing_meanwhile_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      rename_mode: str) -> None:
    out = tmp_path / "calib.safetensors"
    original = calibration_mod.save_tensors

    def racing(path, *a, **kw):  # type: ignore[no-untyped-def]
        out.write_text("someone else's")
        return original(path, *a, **kw)

    monkeypatch.setattr(calibration_mod, "save_tensors", racing)
    with pytest.raises(OutputExistsError):
        save_calibration({"a.weight": torch.ones(2, 3)}, out)
    assert out.read_text() == "someone else's" and _temps(tmp_path) == []
    monkeypatch.undo()
    save_calibration({"a.weight": torch.ones(2, 3)}, out, overwrite=True)  # asked: replaced
    assert out.read_bytes()[:8] != b"someone " and _temps(tmp_path) == []


# ------------------------------------------------------------------------------------ 2. overwrite guard


def _snapshot_of(tree: Path) -> dict[str, int]:
    return {str(p.relative_to(tree)): p.stat().st_size for p in sorted(tree.rglob("*"))}


@pytest.mark.parametrize("which", ["base", "ft", "delta", "parent", "inside-base", "dot", "dotdot", "root"])
def test_output_over_an_input_is_refused(pair_and_delta: tuple[Path, Path, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    base, ft, delta = pair_and_delta
    before = _snapshot_of(tmp_path)
    monkeypatch.chdir(base if which in ("dot", "dotdot") else tmp_path)
    out = {"base": str(base), "ft": str(ft), "delta": str(delta), "parent": str(tmp_path), "inside-base": str(base / "sub"),
           "dot": ".", "dotdot": "..", "root": "/"}[which]
    cmds = []
    if which != "delta":  # the delta is no input of compress, the fine-tune none of apply
        cmds.append(["compress", str(base), str(ft), "-o", out, "--overwrite", "-q"])
    if which != "ft":
        cmds.append(["apply", str(delta), "--base", str(base), "-o", out, "--overwrite", "-q"])
    for cmd in cmds:
        r = runner.invoke(app, cmd)
        assert r.exit_code == 1, (cmd, r.output)
        line = _one_error_line(r.output)
        assert "error:" in line and ("output is" in line or "output contains" in line), line
    assert _snapshot_of(tmp_path) == before  # nothing deleted, no hidden copy left


def test_output_refused_before_any_work_and_without_overwrite(pair_and_delta: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, ft, delta = pair_and_delta
    with pytest.raises(UnsafeOutputError, match="is inside the base"):
        compress(base, ft, base / "delta", codec="bitdelta", progress=False)  # a new dir inside an input: refused too
    with pytest.raises(UnsafeOutputError, match="is the delta"):
        apply_delta(delta, base, delta, progress=False)
    link = tmp_path / "link"
    link.symlink_to(base)
    with pytest.raises(UnsafeOutputError, match="is the base"):
        apply_delta(delta, base, link, overwrite=True, progress=False)
    assert not (base / "delta").exists() and (base / "model.safetensors").is_file()


def test_hub_snapshot_and_cache_are_inputs(pair_and_delta: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, _, delta = pair_and_delta
    repo = tmp_path / "cache" / "models--org--base"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in base.iterdir():  # a Hub-cache-like snapshot: symlinks into blobs/
        shutil.copy2(f, repo / "blobs" / f.name)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f.name))
    for out in (repo / "blobs", repo, tmp_path / "cache"):
        with pytest.raises(UnsafeOutputError):
            apply_delta(delta, snap, out, overwrite=True, progress=False)
    assert (repo / "blobs" / "model.safetensors").is_file()
    # pull: the cache is refused before anything is downloaded (no server needed).
    r = runner.invoke(app, ["pull", "org/delta", "-o", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--overwrite", "-q"])
    assert r.exit_code == 1 and "contains a cache deltahub reads" in _one_error_line(r.output), r.output


def test_calibrate_output_over_its_inputs(pair_and_delta: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, _, _ = pair_and_delta
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    for out in (base, base / "model.safetensors", text, tmp_path):
        r = runner.invoke(app, ["calibrate", str(base), "--text", str(text), "-o", str(out), "--overwrite"])
        assert r.exit_code == 1 and "output " in _one_error_line(r.output), r.output
    assert (base / "model.safetensors").stat().st_size > 1000 and text.read_text().startswith("hello")


# ------------------------------------------------------------------------------------ 3. killed runs


def test_stale_temps_of_dead_runs_are_removed(pair_and_delta: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, _, delta = pair_and_delta
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = io._host_tag()
    names = {
        "dead": f".out.tmp-{host}-{dead.pid}-0123abcd",
        "dead-old": f".out.old-{host}-{dead.pid}-0123abce",
        "alive": f".out.tmp-{host}-{os.getpid()}-0123abcf",
        "other-host": f".out.tmp-{host}x-{dead.pid}-0123abd0",
        "legacy": ".out.tmp-0123abd1",
        "other-name": f".out2.tmp-{host}-{dead.pid}-0123abd2",
        "bad-suffix": f".out.tmp-{host}-{dead.pid}-0123abd3.keep",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "big.safetensors").write_bytes(b"x" * 1000)
    apply_delta(delta, base, tmp_path / "out", progress=False)
    left = set(os.listdir(tmp_path))
    assert names["dead"] not in left and names["dead-old"] not in left
    for k in ("alive", "other-host", "legacy", "other-name", "bad-suffix"):
        assert names[k] in left, k


def _big_pair(root: Path) -> tuple[Path, Path]:
    """Two single-file checkpoints that `--codec auto` takes seconds to compress (16 MB each)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    b = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(1024, 1024) for i in range(4)}
    f = {k: v + 0.01 * torch.randn_like(v) for k, v in b.items()}
    save_file(b, str(root / "base.safetensors"))
    save_file(f, str(root / "ft.safetensors"))
    return root / "base.safetensors", root / "ft.safetensors"


def _start_and_wait_mid_run(tmp_path: Path, out: Path) -> tuple[subprocess.Popen[str], Path]:
    """Start a CLI compress and return once its temp dir exists (seconds of coding still ahead)."""
    base, ft = _big_pair(tmp_path)
    proc = subprocess.Popen([*CLI, "compress", str(base), str(ft), "-o", str(out), "--codec", "auto", "--target-ratio", "8",
                             "--max-shard-size", "100KB", "-q"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        if tmps:
            return proc, tmps[0]
        if proc.poll() is not None:
            pytest.fail(f"compress ended before it could be signalled: {proc.communicate()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("compress never started writing")


def test_sigterm_mid_compress_removes_the_temp(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, tmp = _start_and_wait_mid_run(tmp_path, out)
    assert re.fullmatch(rf"\.out\.tmp-.+-{proc.pid}-[0-9a-f]{{8}}", tmp.name)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in _one_error_line(err)
    assert not out.exists() and _temps(tmp_path) == []


def test_sigkill_leftover_is_removed_by_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, tmp = _start_and_wait_mid_run(tmp_path, out)
    proc.kill()
    proc.communicate(timeout=60)
    assert tmp.is_dir() and not out.exists()  # SIGKILL: nothing can clean up now...
    compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", out, progress=False, compute_stats=False,
             codec="raw")
    assert not tmp.exists() and (out / "delta_config.json").is_file() and _temps(tmp_path) == []  # ...the next run does


# ------------------------------------------------------------------------------------ 4. write failures


def test_disk_full_is_one_line(pair_and_delta: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, _, delta = pair_and_delta

    def full(path, *a, **kw):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(delta_mod, "write_safetensors_parallel", full)
    with pytest.raises(OutputWriteError) as exc:
        apply_delta(delta, base, tmp_path / "out", progress=False)
    assert exc.value.errno == errno.ENOSPC and isinstance(exc.value, OSError) and "ENOSPC" in str(exc.value)
    r = runner.invoke(app, ["apply", str(delta), "--base", str(base), "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 1
    line = _one_error_line(r.output)
    assert str(tmp_path / "out") in line and "No space left on device" in line
    assert not (tmp_path / "out").exists() and _temps(tmp_path) == []


def test_reading_an_input_is_not_an_output_error(pair_and_delta: tuple[Path, Path, Path]) -> None:
    e = io.output_write_error(PermissionError(errno.EACCES, "Permission denied", "/data/base/model.safetensors"), "/out/x")
    assert e is None
    e = io.output_write_error(PermissionError(errno.EACCES, "Permission denied", "/out"), "/out/x")
    assert isinstance(e, OutputWriteError)


def test_file_size_limit_is_one_line(pair_and_delta: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """``ulimit -f``: Python ignores SIGXFSZ, so the write fails with EFBIG (works as root too)."""
    import resource

    base, _, delta = pair_and_delta
    out = tmp_path / "out"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    r = subprocess.run([*CLI, "apply", str(delta), "--base", str(base), "-o", str(out), "-q"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 1, r.stderr
    line = _one_error_line(r.stderr)
    assert "File too large" in line and "EFBIG" in line and str(out) in line
    assert not out.exists() and _temps(tmp_path) == []


def test_read_only_destination_is_one_line(pair_and_delta: tuple[Path, Path, Path], tmp_path: Path) -> None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories; covered by the file-size-limit test")
    base, _, delta = pair_and_delta
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = runner.invoke(app, ["apply", str(delta), "--base", str(base), "-o", str(ro / "out"), "-q"])
        assert r.exit_code == 1 and "Permission denied" in _one_error_line(r.output), r.output
    finally:
        ro.chmod(0o755)


def test_interrupted_overwrite_keeps_the_old_output(pair_and_delta: tuple[Path, Path, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Fallback path (old output moved aside first): Ctrl-C before the new one is in place puts it back."""
    base, _, delta = pair_and_delta
    out = _old_output_on_fallback(tmp_path, monkeypatch)
    original = io._rename_noreplace

    def interrupted(src: Path, dst: Path) -> None:
        if ".tmp-" in src.name:
            raise KeyboardInterrupt
        original(src, dst)

    monkeypatch.setattr(io, "_rename_noreplace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        apply_delta(delta, base, out, overwrite=True, progress=False)
    assert (out / "old.txt").read_text() == "old" and _temps(tmp_path) == []
