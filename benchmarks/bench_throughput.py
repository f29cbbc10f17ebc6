"""Where `apply` and `compress` spend their time on the real pair, and apply's wall time vs `cp`.

Measures, on SmolLM2-135M + its 60-step fine-tune (``deltahub demo``'s pair, fp32, 538 MB):

* ``cp`` of the fine-tune's ``model.safetensors`` (page cache warm): the disk-speed yardstick;
* the CLI's start-up (``import deltahub.cli``) and ``import deltahub.delta``, in fresh processes;
* ``apply_delta`` from Python after imports, in a fresh process per run (wall, peak RSS), for the
  default BitDelta delta and every DeltaDQ preset, with the digest cache cold and warm;
* the same for the pair cast to bfloat16 and to float16 (default policy, DeltaDQ 16x) against their own ``cp``;
* the serial cost of each stage of apply (read the base, sha256 it, read + verify the stored
  tensors, decode, cast, write) and of compress (read, sha256, encode, write), one thread each,
  so the pipeline's wall time can be read against their sum.

Timings are best-of-``--repeats`` (the machine may be shared). Writes ``benchmarks/throughput.md``
and ``throughput.json``. Deltas are made once into ``--work`` (minutes for the DeltaDQ presets).

    python benchmarks/bench_throughput.py [--presets 16x,128x] [--repeats 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from _child import child_env  # noqa: E402  (benchmarks/, beside this script)

PRESETS = ("16x", "32x", "64x", "128x", "256x", "512x")
DEFAULT = "default policy (auto)"

#: Run in a fresh interpreter: import, then time one apply; prints a JSON line.
#: The profile and the steps taken, measured while building the pipeline (same machine, shared).
NOTES = """
## What was slow, and what changed

Profile of `apply` of the default BitDelta delta on `main` before this work (cProfile of the main
thread, py-spy for the worker threads; 2 shared CPUs, load 10-17): 15-24 s wall and **6.4-7.9 s
of CPU** (user + sys, imports excluded) for 538 MB of fp32 weights. The main thread decoded while
one prefetch thread read and hashed: `addcmul` 4.7 s, `index_select` (sign unpacking) 4.6 s,
`.to` 3.8 s, `write` 2.0 s, `contiguous` 1.1 s. The codec ops are cheap single-threaded (the
one-thread stage table below: 1.2 s for all of decode); they were slow because torch ran them
on 2 intra-op OpenMP threads competing with the prefetch thread and the other jobs on 2 cores.

Serial cost of each stage (one thread, table below), before the changes: read base 0.25 s,
sha256 of the base 0.36-0.49 s, read + verify stored tensors 0.18 s, decode 1.2-1.3 s (of which
the raw embeddings' byte unshuffle, a transposed `contiguous()` of 113 MB of uint8, 0.66-0.88 s),
write 0.8-0.95 s.

Steps, each re-measured (apply CPU seconds, user + sys, imports excluded; best of 3):

| step | apply CPU (s) |
|---|---:|
| `main` before | 6.43 |
| pipeline: read, verify, decode on one worker thread per CPU with **one torch thread each** (parallel across tensors, not inside ops); byte unshuffle as one strided copy per plane (0.88 s -> 0.10 s, bit-identical); the main thread writes in order | ~2.15 (2 runs) |
| decode + `pwrite` at each tensor's planned offset on the workers (no tensor waits for the one before it; the writer is no longer one thread) | 1.84-1.99 |
| base digest cache warm (no sha256 of the base at all; extra tensors not even read) | 1.30-1.55 |

Peak RSS over imports went from 513 MiB to 407 MiB (a window of bytes in flight bounds it,
not the number of workers). Wall times on this shared machine moved with the load (3.9-8.3 s
at load 17 for the last row); the CPU seconds are the stable measure: on 2 idle cores the
~1.4 CPU-seconds split over 2 workers is ~0.7-1.0 s, 2-3x the `cp` of the same bytes.

On this run (load 14 on 2 cores) the bitdelta apply took 3.5 s wall, 9x `cp`: the 3x goal is not
shown here; its 1.4-1.7 CPU-seconds put it at ~0.85 s (2.2x `cp`) on 2 idle cores. The DeltaDQ
deltas spend 4.5-7.5 CPU-seconds, nearly all in DeltaDQ's own decode (9.5 s serial for 16x before
the pipeline): that codec's kernels are the next item, and the pipeline spreads them over the CPUs.
Repeated applies hash nothing (CPU cold vs warm above; `tests/test_apply_pipeline.py` counts the
sha256 calls).

Left as is: the codecs' own kernels (another change); mmap'd base reads (a copy of 0.25 s of
CPU saved, but a base truncated while mapped would kill the process with SIGBUS instead of a
typed error); decoding straight into the output file (the codec interface returns tensors).
"""

_APPLY_CHILD = r"""
import json, os, resource, shutil, sys, time

def hwm():  # this process's peak RSS (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

t0 = time.perf_counter()
from deltahub.delta import apply_delta
imports_s = time.perf_counter() - t0
rss0, ru0 = hwm(), resource.getrusage(resource.RUSAGE_SELF)
delta, base, out, kwargs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
shutil.rmtree(out, ignore_errors=True)
os.sync()  # no writeback of an earlier run's output during this one (cp is timed the same way)
t = time.perf_counter()
apply_delta(delta, base, out, progress=False, **kwargs)
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_SELF)
cpu = ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime
print(json.dumps({"imports_s": imports_s, "apply_s": wall, "cpu_s": cpu, "rss_after_imports_mib": rss0, "peak_rss_mib": hwm()}))
"""


def _best(fn: Any, repeats: int, setup: Any = None) -> float:
    best = float("inf")
    for _ in range(repeats):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def time_cp(src: Path, work: Path, repeats: int) -> float:
    """Best wall time of ``cp`` of one file, its source in the page cache."""
    dst = work / "cp.bin"
    src.read_bytes()  # warm

    def setup() -> None:  # the previous copy gone and nothing left to write back
        dst.unlink(missing_ok=True)
        os.sync()

    s = _best(lambda: subprocess.run(["cp", str(src), str(dst)], check=True), repeats, setup)
    dst.unlink(missing_ok=True)
    return s


def time_imports(repeats: int, work: Path) -> dict[str, float]:
    """Fresh-interpreter import time of the CLI and of the rebuild module (with their bytecode cached)."""
    out = {}
    for mod in ("deltahub.cli", "deltahub.delta"):
        out[mod] = _best(lambda m=mod: subprocess.run([sys.executable, "-c", f"import {m}"], check=True, cwd=ROOT,
                                                      env=child_env(work)), repeats + 1)  # the first fills the bytecode cache
    py = _best(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), repeats)
    return {**out, "python": py}


def apply_runs(delta: Path, base: Path, work: Path, repeats: int, cache_dir: Path, native: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Fresh-process apply runs: the first with an empty digest cache, then ``repeats`` warm; best of each.
    ``native=False``: the numpy paths (``DELTAHUB_NATIVE=0``) instead of the native decode kernels."""
    env = child_env(work, DELTAHUB_DIGEST_CACHE=str(cache_dir), DELTAHUB_NATIVE="1" if native else "0")
    shutil.rmtree(cache_dir, ignore_errors=True)
    runs = []
    for _ in range(1 + repeats):
        p = subprocess.run([sys.executable, "-c", _APPLY_CHILD, str(delta), str(base), str(work / "out"), json.dumps(kwargs)],
                           check=True, capture_output=True, text=True, env=env)
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    shutil.rmtree(work / "out", ignore_errors=True)
    warm = min(runs[1:], key=lambda r: r["apply_s"])
    return {"cold_s": runs[0]["apply_s"], "warm_s": warm["apply_s"], "imports_s": warm["imports_s"],
            "cold_cpu_s": runs[0]["cpu_s"], "warm_cpu_s": min(r["cpu_s"] for r in runs[1:]),
            "rss_after_imports_mib": warm["rss_after_imports_mib"], "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


def apply_stages(delta_dir: Path, base: Path, work: Path, dtype: Any = None) -> dict[str, float]:
    """Serial seconds of each stage of apply, one thread, everything else as apply does it."""
    import torch

    from deltahub.delta import Delta
    from deltahub.format.io import Checkpoint, _bytes_sha256, bytes_to_tensor, write_safetensors

    torch.set_num_threads(1)
    d, ck = Delta(delta_dir), Checkpoint(base)
    st = dict.fromkeys(("read base", "sha256 base", "read + verify stored", "decode", "cast", "write"), 0.0)
    outs, specs = [], []
    for name, e in d.manifest.tensors.items():
        t = time.perf_counter()
        raw = ck.read_bytes(name) if name in ck else None
        st["read base"] += time.perf_counter() - t
        t = time.perf_counter()
        if raw is not None:
            _bytes_sha256(raw)
        st["sha256 base"] += time.perf_counter() - t
        t = time.perf_counter()
        stored = d.files.stored(e.stored)
        st["read + verify stored"] += time.perf_counter() - t
        b = bytes_to_tensor(raw, ck.info(name).dtype, ck.info(name).shape) if raw is not None else None
        t = time.perf_counter()
        out = d._rebuild(name, stored, b if d._needs_base(e) else None, owned=True)
        st["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        if dtype is not None and out.is_floating_point():
            out = out.to(dtype)
        st["cast"] += time.perf_counter() - t
        outs.append(out)
        specs.append((name, out.dtype, tuple(out.shape)))
    t = time.perf_counter()
    write_safetensors(work / "stages.safetensors", specs, outs)
    st["write"] = time.perf_counter() - t
    (work / "stages.safetensors").unlink()
    d.close()
    ck.close()
    return st


def compress_stages(base: Path, ft: Path, delta_dir: Path) -> dict[str, float]:
    """Serial seconds of compress's stages: reading both checkpoints, hashing the base, encoding
    (cProfile's time under ``_run_codec`` minus the stored-tensor digests), writing the shards.
    The final encoding's worker pool is replaced by a loop in this thread, so cProfile sees it."""
    import cProfile
    import pstats

    import torch

    import deltahub.compression as compression
    from deltahub.compression import compress

    compression.pipelined = lambda items, fn, **_: ((i, fn(i)) for i in items)  # type: ignore[assignment]
    from deltahub.format.io import Checkpoint, _bytes_sha256

    torch.set_num_threads(1)
    out: dict[str, float] = {}
    with Checkpoint(base) as bc, Checkpoint(ft) as fc:
        t = time.perf_counter()
        raws = [bc.read_bytes(n) for n in bc.keys()] + [fc.read_bytes(n) for n in fc.keys()]
        out["read base + fine-tune"] = time.perf_counter() - t
        t = time.perf_counter()
        for r in raws[: len(bc.keys())]:
            _bytes_sha256(r)
        out["sha256 base"] = time.perf_counter() - t
        del raws
    tmp = Path(tempfile.mkdtemp(dir=delta_dir.parent))
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    compress(base, ft, tmp / "d", progress=False)
    prof.disable()
    out["compress wall (default policy)"] = time.perf_counter() - t
    shutil.rmtree(tmp)
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    cum = {f"{k[0].rsplit('/', 1)[-1]}:{k[2]}": v[3] for k, v in stats.items()}
    out["encode (codecs, main thread)"] = cum.get("compression.py:_run_codec", 0.0)
    out["stored-tensor digests"] = cum.get("integrity.py:tensor_digest", 0.0)
    out["write shards"] = cum.get("delta_files.py:_flush", 0.0)
    return out


def ensure_deltas(base: Path, ft: Path, work: Path, presets: list[str]) -> dict[str, Path]:
    """The default (whole-model ``auto``) delta, a BitDelta one and one per DeltaDQ preset, made once into ``work``."""
    from deltahub.compression import compress

    out = {DEFAULT: work / "d-default", "bitdelta": work / "d-bitdelta"}
    if not out[DEFAULT].exists():
        compress(base, ft, out[DEFAULT], progress=False)
    if not out["bitdelta"].exists():
        compress(base, ft, out["bitdelta"], codec="bitdelta", progress=False)
    for p in presets:
        d = work / f"d-deltadq-{p}"
        if not d.exists():
            compress(base, ft, d, codec="deltadq", preset=p, progress=False)
        out[f"deltadq {p}"] = d
    return out


def half_pair(base: Path, ft: Path, work: Path, dtype: str) -> tuple[Path, Path]:
    """The pair cast to ``dtype`` (bfloat16 / float16: how most checkpoints ship), made once into ``work``."""
    import torch
    from safetensors.torch import load_file, save_file

    out = []
    for src in (base, ft):
        dst = work / f"{dtype}-{src.name}"
        if not (dst / "config.json").exists():
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if f.suffix == ".safetensors":
                    save_file({k: v.to(getattr(torch, dtype)) for k, v in load_file(f).items()}, dst / f.name, metadata={"format": "pt"})
                elif f.is_file() and not f.name.startswith("."):
                    shutil.copy(f, dst / f.name)
            cfg = json.loads((dst / "config.json").read_text())
            (dst / "config.json").write_text(json.dumps({**cfg, "torch_dtype": dtype}))
        out.append(dst)
    return out[0], out[1]


def half_runs(base: Path, ft: Path, work: Path, repeats: int) -> dict[str, Any]:
    """cp and apply of the pair in bfloat16 and in float16: the default policy and DeltaDQ 16x."""
    from deltahub.compression import compress

    res: dict[str, Any] = {}
    for dtype in ("bfloat16", "float16"):
        b16, f16 = half_pair(base, ft, work, dtype)
        r: dict[str, Any] = {"cp_s": time_cp(f16 / "model.safetensors", work, max(repeats, 3)),
                             "ft_mb": (f16 / "model.safetensors").stat().st_size / 1e6, "apply": {}}
        for label, kw in ((DEFAULT, {}), ("deltadq 16x", {"codec": "deltadq", "preset": "16x"})):
            d = work / f"{dtype}-d-{label.split()[-1].strip('()')}"
            if not d.exists():
                compress(b16, f16, d, progress=False, **kw)
            r["apply"][label] = apply_runs(d, b16, work, repeats, work / "digests")
        res[dtype] = r
    return res


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table, first column left-aligned, the others right-aligned."""
    out = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def _md(results: dict[str, Any]) -> str:
    """The throughput.md report."""
    cp, imp = results["cp_s"], results["imports"]
    lines = [
        "# Apply / compress throughput", "",
        f"{results['date']}, {results['machine']}; `python benchmarks/bench_throughput.py` (best of {results['repeats']} "
        "runs, each after `sync`, in fresh processes with a bytecode cache as an installed package has; a 2-core VM, whose "
        "run-to-run spread is ~10%).", "",
        f"Yardstick: `cp` of the fine-tune's `model.safetensors` ({results['ft_mb']:.0f} MB, page cache warm): **{cp:.2f} s**. "
        f"Start-up: `import deltahub.cli` {imp['deltahub.cli']:.2f} s, `import deltahub.delta` {imp['deltahub.delta']:.2f} s "
        f"(`python -c pass`: {imp['python']:.2f} s), reported beside, not inside, the apply times.", "",
        "## apply (Python, after imports; fresh process per run)", "",
    ]
    numpy_runs = results.get("apply_numpy", {})
    rows = [[k, f"{r['cold_s']:.2f}", f"{r['warm_s']:.2f}", f"{r['warm_s'] / cp:.1f}x", f"{r['cold_cpu_s']:.2f}", f"{r['warm_cpu_s']:.2f}",
             f"{numpy_runs[k]['warm_s']:.2f}" if k in numpy_runs else "",
             f"{r['peak_rss_mib'] - r['rss_after_imports_mib']:.0f}",
             f"{(r['peak_rss_mib'] - r['rss_after_imports_mib']) / results['largest_shard_mib']:.2f}x"] for k, r in results["apply"].items()]
    lines += [markdown_table(["delta", "wall, cold digest cache (s)", "wall, warm (s)", "warm / cp", "CPU cold (s)", "CPU warm (s)",
                              "warm, numpy paths (s)", "peak RSS - imports (MiB)", "/ largest shard"], rows), "",
              "Wall = `apply_delta` alone, imports excluded; CPU = user + sys of the same call. Cold: the digest cache "
              "empty, so the base is hashed; warm: the next runs, which hash nothing. Numpy paths: the same warm "
              "runs with `DELTAHUB_NATIVE=0` (no native decode kernels, as on an install without a C compiler).", ""]
    halves = results.get("half", {})
    if halves:
        lines += ["## apply of the same pair in 16-bit dtypes (how most checkpoints ship)", "",
                  markdown_table(["dtype", "delta", "wall, warm (s)", "`cp` (s)", "warm / cp", "CPU warm (s)"],
                                 [[dt, k, f"{r['warm_s']:.2f}", f"{h['cp_s']:.2f}", f"{r['warm_s'] / h['cp_s']:.1f}x", f"{r['warm_cpu_s']:.2f}"]
                                  for dt, h in halves.items() for k, r in h["apply"].items()]),
                  "", f"The fine-tune is {next(iter(halves.values()))['ft_mb']:.0f} MB in 16 bits: half the bytes of the float32 "
                  "pair, the same number of weights to decode.", ""]
    for title, key in (("apply, serial stages (one thread, default delta)", "apply_stages"), ("compress, serial stages (one thread, default policy)", "compress_stages")):
        st = results.get(key)
        if st:
            lines += [f"## {title}", "", markdown_table(["stage", "s"], [[k, f"{v:.2f}"] for k, v in st.items()]), ""]
    lines += NOTES.strip("\n").splitlines()
    return "\n".join(lines) + "\n"


def _history(out: Path) -> str:
    """The hand-written per-session sections of an existing report (from its first ``## Session``), kept."""
    if not out.exists():
        return ""
    text = out.read_text()
    at = text.find("\n## Session ")
    return "" if at < 0 else text[at:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "deltahub-bench-throughput")
    ap.add_argument("--out", type=Path, default=HERE / "throughput.md")
    ap.add_argument("--no-stages", action="store_true", help="skip the serial stage breakdown")
    ap.add_argument("--no-half", action="store_true", help="skip the bfloat16 / float16 copies of the pair")
    a = ap.parse_args()
    os.environ["DELTAHUB_DIGEST_CACHE"] = "off"  # the in-process stage runs hash for real

    from deltahub.demo import build_pair

    base, ft = (Path(p) for p in build_pair(steps=a.steps))
    a.work.mkdir(parents=True, exist_ok=True)
    deltas = ensure_deltas(base, ft, a.work, [p for p in a.presets.split(",") if p])
    shards = sorted(ft.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    res: dict[str, Any] = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {__import__('torch').__version__}",
                           "repeats": a.repeats, "ft_mb": sum(p.stat().st_size for p in shards) / 1e6,
                           "largest_shard_mib": shards[-1].stat().st_size / 2**20}
    res["cp_s"] = time_cp(shards[-1], a.work, max(a.repeats, 3))
    res["imports"] = time_imports(a.repeats, a.work)
    res["apply"], res["apply_numpy"] = {}, {}
    for label, d in deltas.items():
        res["apply"][label] = apply_runs(d, base, a.work, a.repeats, a.work / "digests")
        res["apply_numpy"][label] = apply_runs(d, base, a.work, a.repeats, a.work / "digests", native=False)
        print(label, res["apply"][label], res["apply_numpy"][label]["warm_s"], flush=True)
    res["apply"]["default policy, --dtype bfloat16"] = apply_runs(deltas[DEFAULT], base, a.work, a.repeats, a.work / "digests",
                                                                  dtype="bfloat16")
    if not a.no_half:
        res["half"] = half_runs(base, ft, a.work, a.repeats)
    if not a.no_stages:
        res["apply_stages"] = apply_stages(deltas[DEFAULT], base, a.work)
        res["compress_stages"] = compress_stages(base, ft, a.work / "x")
    (HERE / "throughput.json").write_text(json.dumps(res, indent=1) + "\n")
    a.out.write_text(_md(res) + _history(a.out))
    print(a.out.read_text())


if __name__ == "__main__":
    main()
