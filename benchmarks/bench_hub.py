"""Hub benchmark on the real pair: bytes uploaded as a delta vs as a full fp16 fine-tune, push/pull wall time.

Runs the local Hub-compatible server (``python -m deltahub.testing.hub_server``) in a subprocess
on a temporary root and drives it with the real ``huggingface_hub`` client, exactly like a user
would the Hub. Bytes uploaded are measured at the server (growth of its blob store; each push
goes to a fresh server root so nothing is deduplicated against an earlier upload) and checked
against the sum of the committed files' sizes. Writes ``benchmarks/hub.md`` and prints it.

    python benchmarks/bench_hub.py [--steps 60] [--cache-dir DIR] [--out benchmarks/hub.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# huggingface_hub reads these at import time: set them before anything imports it.
os.environ.update({"HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
                   "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DELTAHUB_DISABLE_PROGRESS_BARS": "1",
                   "HF_HUB_DISABLE_UPDATE_CHECK": "1"})
os.environ.pop("HF_TOKEN", None)

T = TypeVar("T")
BASE_REPO, DELTA_REPO, FP16_REPO = "bench/smollm2-135m", "bench/smollm2-python-delta", "bench/smollm2-python-fp16"


@contextmanager
def hub_server(root: Path) -> Iterator[str]:
    """A local Hub server in a subprocess (so its work does not share the client's GIL); yields its URL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "deltahub.testing.hub_server", "--root", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if "running at " not in line:
            raise RuntimeError(f"hub server did not start: {line}{proc.stderr.read() if proc.stderr else ''}")
        yield line.split("running at ", 1)[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def blob_bytes(root: Path) -> int:
    """Bytes in the server's content-addressed blob store (everything ever uploaded to it)."""
    blobs = root / "blobs"
    return sum(p.stat().st_size for p in blobs.iterdir() if p.is_file()) if blobs.is_dir() else 0


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fp16_copy(src: Path, dst: Path) -> Path:
    """The fine-tune as people publish it: floating tensors in fp16, config and tokenizer files alongside."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    sd = load_file(str(src / "model.safetensors"))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
              str(dst / "model.safetensors"), {"format": "pt"})
    del sd
    for p in src.iterdir():
        if p.is_file() and p.name != "model.safetensors" and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "float16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def commit_bytes(api: Any, repo_id: str, commit_sha: str, parent_sha: str) -> tuple[int, int]:
    """(files, bytes) added or changed by one commit, from the server's file listings."""
    new = {f.rfilename: (f.size, f.blob_id) for f in api.model_info(repo_id, revision=commit_sha, files_metadata=True).siblings}
    old = {f.rfilename: f.blob_id for f in api.model_info(repo_id, revision=parent_sha, files_metadata=True).siblings}
    changed = [n for n, (_, blob) in new.items() if old.get(n) != blob]
    return len(changed), sum(new[n][0] or 0 for n in changed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="fine-tune steps of the real pair")
    ap.add_argument("--cache-dir", type=Path, default=None, help="demo cache (default ~/.cache/deltahub/demo)")
    ap.add_argument("--granularity", default="row", help="BitDelta scale granularity")
    ap.add_argument("--out", type=Path, default=HERE / "hub.md")
    a = ap.parse_args()

    from huggingface_hub import HfApi, snapshot_download

    from deltahub import __version__
    from deltahub.compression import compress
    from deltahub.delta import apply_delta
    from deltahub.demo import build_pair
    from deltahub.hub import pull_model, push_to_hub
    from deltahub.report import human_bytes

    base_local, ft_local = build_pair(a.cache_dir, steps=a.steps)
    work = Path(tempfile.mkdtemp(prefix="deltahub-bench-hub-"))
    res: dict[str, Any] = {}
    try:
        root_a, root_b = work / "hub-a", work / "hub-b"
        with hub_server(root_a) as url:
            api = HfApi(endpoint=url, token=False)
            api.create_repo(BASE_REPO)
            b0 = blob_bytes(root_a)
            base_commit, res["push_base_s"] = timed(lambda: api.upload_folder(folder_path=base_local, repo_id=BASE_REPO,
                                                                               ignore_patterns=[".*"]))
            res["base_bytes"] = blob_bytes(root_a) - b0

            compress_cache = work / "cache-compress"
            manifest, res["compress_s"] = timed(lambda: compress(
                f"{BASE_REPO}", ft_local, work / "delta", params={"granularity": a.granularity}, progress=False,
                cache_dir=compress_cache, endpoint=url, finetuned_name_or_path="smollm2-python (local)"))
            assert manifest.base.revision == base_commit.oid, "base sha not recorded"

            api.create_repo(DELTA_REPO)
            parent = api.model_info(DELTA_REPO).sha
            delta_commit, res["push_delta_s"] = timed(lambda: push_to_hub(work / "delta", DELTA_REPO, endpoint=url, token=False))
            res["delta_files"], res["delta_commit_bytes"] = commit_bytes(api, DELTA_REPO, delta_commit.oid, parent)

            pulled, res["pull_fresh_s"] = timed(lambda: pull_model(DELTA_REPO, work / "pulled-fresh", cache_dir=work / "cache-fresh",
                                                                   endpoint=url, progress=False))
            _, res["pull_cached_base_s"] = timed(lambda: pull_model(DELTA_REPO, work / "pulled-cached", cache_dir=compress_cache,
                                                                    endpoint=url, progress=False))
            _, res["apply_local_s"] = timed(lambda: apply_delta(work / "delta", base_local, work / "local", progress=False))
            res["bit_exact"] = sha256(work / "pulled-fresh" / "model.safetensors") == sha256(work / "local" / "model.safetensors")
            res["base_pinned"] = pulled.base.commit_sha == base_commit.oid

        # Bytes of the delta push, measured on a server that has never seen the base (the tokenizer
        # files are identical in base and fine-tune and would otherwise be deduplicated).
        root_c = work / "hub-c"
        with hub_server(root_c) as url:
            b0 = blob_bytes(root_c)
            push_to_hub(work / "delta", DELTA_REPO, endpoint=url, token=False)
            res["delta_bytes"] = blob_bytes(root_c) - b0
        res["by_codec"] = {k: v["stored_bytes"] for k, v in manifest.totals["by_codec"].items()}

        fp16_dir = fp16_copy(ft_local, work / "ft-fp16")
        with hub_server(root_b) as url:
            api = HfApi(endpoint=url, token=False)
            api.create_repo(FP16_REPO)
            parent = api.model_info(FP16_REPO).sha
            b0 = blob_bytes(root_b)
            fp16_commit, res["push_fp16_s"] = timed(lambda: api.upload_folder(folder_path=fp16_dir, repo_id=FP16_REPO))
            res["fp16_bytes"] = blob_bytes(root_b) - b0
            res["fp16_files"], res["fp16_commit_bytes"] = commit_bytes(api, FP16_REPO, fp16_commit.oid, parent)
            _, res["download_fp16_s"] = timed(lambda: snapshot_download(FP16_REPO, endpoint=url, cache_dir=work / "cache-fp16", token=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratio = res["fp16_bytes"] / res["delta_bytes"]
    rows_bytes = [
        ("fine-tune as a **delta** (BitDelta " + a.granularity + " + exact embeddings/norms, tokenizer files, model card)",
         res["delta_files"], res["delta_commit_bytes"], res["delta_bytes"], res["push_delta_s"]),
        ("fine-tune as a **full fp16** checkpoint (weights, config, tokenizer files)",
         res["fp16_files"], res["fp16_commit_bytes"], res["fp16_bytes"], res["push_fp16_s"]),
        ("base, once (fp32 as published; shared by every delta of it)", "", "", res["base_bytes"], res["push_base_s"]),
    ]
    lines = [
        "# Hub benchmark: publishing the real fine-tune as a delta vs as a full fp16 checkpoint",
        "",
        f"Pair: SmolLM2-135M base + {a.steps}-step stdlib fine-tune (`deltahub.demo.build_pair`). Server: the local "
        "Hub-compatible server (`python -m deltahub.testing.hub_server`, a subprocess on 127.0.0.1), client: "
        "`huggingface_hub` (LFS upload path, `HF_HUB_DISABLE_XET=1`). Bytes uploaded = growth of the server's blob "
        "store, each push measured on a fresh server root so nothing is deduplicated (push times: delta to the server "
        "holding the base, as a user would); bytes in commit = sum of the sizes of the files the commit adds.",
        "",
        "| upload | files | bytes in commit | bytes uploaded | push wall time |",
        "|---|---:|---:|---:|---:|",
    ]
    for what, files, in_commit, uploaded, secs in rows_bytes:
        lines.append(f"| {what} | {files} | {f'{in_commit:,}' if in_commit != '' else ''} | "
                     f"{uploaded:,} ({human_bytes(uploaded)}) | {secs:.2f} s |")
    lines += [
        "",
        f"**The delta uploads {ratio:.1f}x fewer bytes than the fp16 fine-tune** "
        f"({human_bytes(res['delta_bytes'])} vs {human_bytes(res['fp16_bytes'])}). Stored tensors by codec: "
        + ", ".join(f"{k} {human_bytes(v)}" for k, v in res["by_codec"].items())
        + " (`raw` = the exact embeddings / norms, xor + zstd; see `benchmarks/README.md` for other policies).",
        "",
        "| operation | wall time |",
        "|---|---:|",
        f"| `compress` from the Hub id of the base (downloads the base, records its sha) | {res['compress_s']:.2f} s |",
        f"| `deltahub pull`, fresh cache (delta + pinned base download + verified rebuild) | {res['pull_fresh_s']:.2f} s |",
        f"| `deltahub pull`, base already in the cache (delta download + rebuild) | {res['pull_cached_base_s']:.2f} s |",
        f"| download the fp16 fine-tune, fresh cache (`snapshot_download`) | {res['download_fp16_s']:.2f} s |",
        f"| local `apply` (no network), for reference | {res['apply_local_s']:.2f} s |",
        "",
        f"Pulled weights bit-identical to the local `apply`: {'yes' if res['bit_exact'] else 'NO'}; "
        f"base fetched at the pinned commit: {'yes' if res['base_pinned'] else 'NO'}.",
        "",
        f"Measured {dt.date.today().isoformat()} with deltahub {__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs; loopback network, so wall times are local disk + CPU + HTTP "
        "overhead, not Internet transfer (over a real link, transfer time scales with the bytes column).",
        "",
        "Reproduce: `python benchmarks/bench_hub.py`.",
        "",
    ]
    text = "\n".join(lines)
    a.out.write_text(text)
    print(text)
    print(json.dumps(res, indent=2, default=str), file=sys.stderr)


if __name__ == "__main__":
    main()
