"""Hub benchmark on the real pair: bytes uploaded as a delta vs as a full fp16 fine-tune, push/pull wall time,
and ``deltahub pull`` vs downloading the fp16 fine-tune over a bandwidth-limited link.

Runs the local Hub-compatible server (``python -m deltahub.testing.hub_server``) in a subprocess
on a temporary root and drives it with the real ``huggingface_hub`` client, exactly like a user
would the Hub. Bytes uploaded are measured at the server (growth of its blob store; each push
goes to a fresh server root so nothing is deduplicated against an earlier upload) and checked
against the sum of the committed files' sizes. The link section restarts the server with
``--bandwidth MBPS`` (one token bucket over all response bodies, like a real link) and times
``pull`` with the base cached against ``snapshot_download`` of the fp16 fine-tune, for the default
delta and a small one, at several link speeds; the crossover is where downloading the fine-tune
becomes faster. Writes ``benchmarks/hub.md`` and prints it.

    python benchmarks/bench_hub.py [--steps 60] [--cache-dir DIR] [--out benchmarks/hub.md]
        [--bandwidth 125] [--sweep 15,30,60,250,inf] [--repeats 2] [--only publish|link]
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
SMALL_REPO = "bench/smollm2-python-delta-32x"
#: The small delta of the link section: DeltaDQ 32x on the block matrices and on the embeddings.
SMALL_CODEC, SMALL_PRESET, SMALL_RULE = "deltadq", "32x", "model.embed_tokens.weight=deltadq:preset=32x"
LINK_SECTION = "## Pull vs download over a limited link"


@contextmanager
def hub_server(root: Path, bandwidth: float | None = None) -> Iterator[str]:
    """A local Hub server in a subprocess (so its work does not share the client's GIL); yields its URL.

    ``bandwidth``: MB/s for all response bodies together (``--bandwidth``); ``None`` = loopback speed.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    link = [] if bandwidth is None else ["--bandwidth", str(bandwidth)]
    proc = subprocess.Popen([sys.executable, "-m", "deltahub.testing.hub_server", "--root", str(root), *link],
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


def publish_measure(a: argparse.Namespace, base_local: Path, ft_local: Path, work: Path) -> tuple[dict[str, Any], Any]:
    """Push base, delta and fp16 fine-tune to fresh servers; time compress / push / pull / download."""
    from huggingface_hub import HfApi, snapshot_download

    from deltahub.compression import compress
    from deltahub.delta import apply_delta
    from deltahub.hub import pull_model, push_to_hub

    res: dict[str, Any] = {}
    work.mkdir(parents=True, exist_ok=True)
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
            f"{BASE_REPO}", ft_local, work / "delta", **({"codec": a.codec} if a.codec else {}), progress=False,
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
    return res, manifest


def publish_lines(a: argparse.Namespace, res: dict[str, Any]) -> list[str]:
    """The bytes table and the loopback timing table (markdown lines)."""
    from deltahub.report import human_bytes

    ratio = res["fp16_bytes"] / res["delta_bytes"]
    rows_bytes = [
        ("fine-tune as a **delta** (" + (f"`--codec {a.codec}`" if a.codec else "default whole-model policy") + "; tokenizer files, model card)",
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
    return lines + [
        "",
        f"**The delta uploads {ratio:.1f}x fewer bytes than the fp16 fine-tune** "
        f"({human_bytes(res['delta_bytes'])} vs {human_bytes(res['fp16_bytes'])}). Stored tensors by codec: "
        + ", ".join(f"{k} {human_bytes(v)}" for k, v in res["by_codec"].items())
        + " (`raw` = exact tensors, xor + zstd; see `benchmarks/README.md` for other policies).",
        "",
        "| operation (loopback, no bandwidth limit) | wall time |",
        "|---|---:|",
        f"| `compress` from the Hub id of the base (downloads the base, records its sha) | {res['compress_s']:.2f} s |",
        f"| `deltahub pull`, fresh cache (delta + pinned base download + verified rebuild) | {res['pull_fresh_s']:.2f} s |",
        f"| `deltahub pull`, base already in the cache (delta download + rebuild) | {res['pull_cached_base_s']:.2f} s |",
        f"| download the fp16 fine-tune, fresh cache (`snapshot_download`) | {res['download_fp16_s']:.2f} s |",
        f"| local `apply` (no network), for reference | {res['apply_local_s']:.2f} s |",
        "",
        f"Pulled weights bit-identical to the local `apply`: {'yes' if res['bit_exact'] else 'NO'}; "
        f"base fetched at the pinned commit: {'yes' if res['base_pinned'] else 'NO'}. Loopback network: wall times "
        "are local disk + CPU + HTTP overhead, not Internet transfer (see the next section for a limited link).",
        "",
    ]


def link_setup(base_local: Path, ft_local: Path, work: Path, root: Path) -> dict[str, Any]:
    """One server root holding the base, the fp16 fine-tune and two deltas (default policy; DeltaDQ 32x).

    The deltas are compressed from the local pair with the base recorded as the uploaded repo at
    its commit (what compressing from the Hub id records, without downloading the base again).
    """
    from huggingface_hub import HfApi

    from deltahub.compression import compress
    from deltahub.hub import push_to_hub
    from deltahub.policy import Policy, Rule

    setup: dict[str, Any] = {}
    with hub_server(root) as url:
        api = HfApi(endpoint=url, token=False)
        for repo in (BASE_REPO, FP16_REPO, DELTA_REPO, SMALL_REPO):
            api.create_repo(repo)
        base_sha = api.upload_folder(folder_path=base_local, repo_id=BASE_REPO, ignore_patterns=[".*"]).oid
        api.upload_folder(folder_path=fp16_copy(ft_local, work / "ft-fp16"), repo_id=FP16_REPO)
        pinned = {"base_name_or_path": BASE_REPO, "base_revision": base_sha, "progress": False}
        small = Policy(codec=SMALL_CODEC, rules=[Rule.parse(SMALL_RULE)])
        _, setup["compress_default_s"] = timed(lambda: compress(base_local, ft_local, work / "d-default", **pinned))
        _, setup["compress_small_s"] = timed(lambda: compress(base_local, ft_local, work / "d-small", policy=small,
                                                               preset=SMALL_PRESET, **pinned))
        push_to_hub(work / "d-default", DELTA_REPO, endpoint=url, token=False)
        push_to_hub(work / "d-small", SMALL_REPO, endpoint=url, token=False)
        for key, repo in (("default", DELTA_REPO), ("small", SMALL_REPO), ("fp16", FP16_REPO)):
            info = api.model_info(repo, files_metadata=True)
            setup[f"{key}_repo_bytes"] = sum(f.size or 0 for f in info.siblings if f.rfilename not in (".gitattributes", "README.md"))
    return setup


def _repo_cache(cache: Path, repo_id: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}"


def link_run(work: Path, root: Path, bandwidth: float | None, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` wall times on one link: pull (base cached, delta not) of both deltas, fp16 download.

    Timed in this process, where torch is already imported: the numbers exclude torch's import time.
    """
    from huggingface_hub import snapshot_download

    from deltahub.hub import pull_model

    cache = work / "cache-base"  # holds the base (first pull, unlimited link); the delta repos are removed before each pull
    out: dict[str, float] = {}
    with hub_server(root, bandwidth) as url:
        for _ in range(repeats):
            for key, repo in (("default", DELTA_REPO), ("small", SMALL_REPO)):
                shutil.rmtree(_repo_cache(cache, repo), ignore_errors=True)
                shutil.rmtree(work / f"out-{key}", ignore_errors=True)
                _, secs = timed(lambda: pull_model(repo, work / f"out-{key}", cache_dir=cache, endpoint=url, progress=False))
                out[f"pull_{key}_s"] = min(secs, out.get(f"pull_{key}_s", secs))
            shutil.rmtree(work / "cache-fp16", ignore_errors=True)
            _, secs = timed(lambda: snapshot_download(FP16_REPO, endpoint=url, cache_dir=work / "cache-fp16", token=False))
            out["fp16_s"] = min(secs, out.get("fp16_s", secs))
    return out


def crossover(points: list[tuple[float | None, float, float]], mb_pull: float, mb_dl: float) -> tuple[float, float, float | None]:
    """Model ``t = fixed + MB / (MB/s)`` per method from (link MB/s or None = unlimited, t_pull, t_download).

    The link term is known exactly (the server's token bucket moves ``MB`` megabytes in ``MB / rate``
    seconds), so only the fixed costs are fitted: the mean of ``t - MB / rate`` over the links, which
    averages out the noise of a shared machine. Returns ``(fixed_pull, fixed_download, B*)``, ``B*`` the
    bandwidth above which downloading the fine-tune is faster (``None``: pull wins at every speed).
    """
    def fixed(i: int, mb: float) -> float:
        return sum(p[i] - (0.0 if p[0] is None else mb / p[0]) for p in points) / len(points)

    a_pull, a_dl = fixed(1, mb_pull), fixed(2, mb_dl)
    cross = (mb_dl - mb_pull) / (a_pull - a_dl) if a_pull > a_dl and mb_dl > mb_pull else None
    return a_pull, a_dl, cross


def link_measure(a: argparse.Namespace, base_local: Path, ft_local: Path, work: Path) -> dict[str, Any]:
    """The link section: setup, one unlimited warm-up pull (caches the base), then each link speed."""
    from deltahub.delta import apply_delta
    from deltahub.hub import pull_model

    work.mkdir(parents=True, exist_ok=True)
    root = work / "hub-link"
    res = link_setup(base_local, ft_local, work, root)
    with hub_server(root) as url:  # warm-up: the base lands in the cache once, as for a user who pulled before
        pull_model(DELTA_REPO, work / "warm", cache_dir=work / "cache-base", endpoint=url, progress=False)
    for key in ("default", "small"):
        shutil.rmtree(work / "local", ignore_errors=True)
        _, res[f"apply_{key}_s"] = timed(lambda: apply_delta(work / f"d-{key}", base_local, work / "local", progress=False))
        res[f"local_sha_{key}"] = sha256(work / "local" / "model.safetensors")
    res["links"] = {}
    for bw in [a.bandwidth, *a.sweep]:
        res["links"][str(bw)] = link_run(work, root, bw, a.repeats)
        print(f"link {bw}: {res['links'][str(bw)]}", file=sys.stderr, flush=True)
    res["bit_exact"] = all(sha256(work / f"out-{k}" / "model.safetensors") == res[f"local_sha_{k}"] for k in ("default", "small"))
    for key in ("default", "small"):
        pts = [(None if b == "None" else float(b), r[f"pull_{key}_s"], r["fp16_s"]) for b, r in res["links"].items()]
        res[f"fit_{key}"] = crossover(pts, res[f"{key}_repo_bytes"] / 1e6, res["fp16_repo_bytes"] / 1e6)
    return res


def _mbps(bw: str) -> str:
    return "unlimited (loopback)" if bw == "None" else f"{float(bw):g} MB/s ({float(bw) * 8 / 1000:g} Gbit/s)"


def link_lines(a: argparse.Namespace, res: dict[str, Any]) -> list[str]:
    """The pull-vs-download table per link speed, the headline ratio and the crossover bandwidths."""
    from deltahub.report import human_bytes

    lines = [LINK_SECTION, "",
             f"Server restarted with `--bandwidth MBPS` (one token bucket over every response body, shared by all "
             f"connections like one link). `pull` = `deltahub.hub.pull_model` with the base already in the cache and the "
             f"delta not (delta download + verified rebuild); `download` = `snapshot_download` of the fp16 fine-tune into "
             f"a fresh cache. Wall times best of {a.repeats}, measured in one process where torch is already imported (so "
             "they exclude torch's import time), on a shared 2-core machine (noisy). Repo bytes (without README / "
             f".gitattributes): default delta {human_bytes(res['default_repo_bytes'])}, small delta "
             f"(`--codec {SMALL_CODEC} --preset {SMALL_PRESET} --rule '{SMALL_RULE}'`) {human_bytes(res['small_repo_bytes'])}, "
             f"fp16 fine-tune {human_bytes(res['fp16_repo_bytes'])}. Local `apply` (no network): default "
             f"{res['apply_default_s']:.2f} s, small {res['apply_small_s']:.2f} s.", "",
             "| link | pull, default delta | pull, small delta | download fp16 fine-tune | pull small / download |",
             "|---|---:|---:|---:|---:|"]
    for bw, r in res["links"].items():
        lines.append(f"| {_mbps(bw)} | {r['pull_default_s']:.2f} s | {r['pull_small_s']:.2f} s | {r['fp16_s']:.2f} s | "
                     f"{r['pull_small_s'] / r['fp16_s']:.2f} |")
    head = res["links"][str(a.bandwidth)]
    lines += ["", f"At {_mbps(str(a.bandwidth))}: pull / download = {head['pull_default_s'] / head['fp16_s']:.2f} (default delta), "
              f"{head['pull_small_s'] / head['fp16_s']:.2f} (small delta); the goal is < 0.5. "
              f"Pulled weights bit-identical to a local `apply`: {'yes' if res['bit_exact'] else 'NO'}.", ""]
    for key, what in (("default", "default delta"), ("small", "small delta")):
        a_p, a_d, cross = res[f"fit_{key}"]
        mb_p, mb_d = res[f"{key}_repo_bytes"] / 1e6, res["fp16_repo_bytes"] / 1e6
        where = "none: pull is faster at every link speed" if cross is None else f"**{cross:.0f} MB/s** ({cross * 8 / 1000:.2f} Gbit/s)"
        lines.append(f"- Crossover, {what}: {where}. Model t = fixed + MB / (MB/s), fixed costs averaged over the links "
                     f"above: pull {a_p:.2f} s + {mb_p:.1f} MB, download {a_d:.2f} s + {mb_d:.1f} MB. Above the crossover the "
                     "rebuild's fixed cost outweighs the bytes saved and downloading the fine-tune wins.")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="fine-tune steps of the real pair")
    ap.add_argument("--cache-dir", type=Path, default=None, help="demo cache (default ~/.cache/deltahub/demo)")
    ap.add_argument("--codec", default=None, help="publish section: compress with this codec (default: the default policy)")
    ap.add_argument("--bandwidth", type=float, default=125.0, help="headline link, MB/s (125 = 1 Gbit/s)")
    ap.add_argument("--sweep", type=lambda s: [None if v in ("inf", "none") else float(v) for v in s.split(",") if v],
                    default=[15.0, 30.0, 60.0, 250.0, None], help="more links for the crossover fit, MB/s ('inf' = unlimited)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per link (best is reported)")
    ap.add_argument("--only", choices=["publish", "link"], default=None, help="run one section; the other is kept from --out")
    ap.add_argument("--out", type=Path, default=HERE / "hub.md")
    a = ap.parse_args()

    from deltahub import __version__
    from deltahub.demo import build_pair

    base_local, ft_local = build_pair(a.cache_dir, steps=a.steps)
    # hub.md = the publish part, then LINK_SECTION and the link part; --only keeps the other part as it was.
    old_publish, sep, old_link = (a.out.read_text() if a.out.is_file() else "").partition(LINK_SECTION)
    footer = [f"Measured {dt.date.today().isoformat()} with deltahub {__version__}, Python {platform.python_version()}, "
              f"{platform.machine()}, {os.cpu_count()} CPUs.", "",
              "Reproduce: `python benchmarks/bench_hub.py` (`--only publish` / `--only link`: one section).", ""]
    work = Path(tempfile.mkdtemp(prefix="deltahub-bench-hub-"))
    try:
        publish = (old_publish.rstrip("\n") if a.only == "link"
                   else "\n".join(publish_lines(a, publish_measure(a, base_local, ft_local, work / "publish")[0]) + footer))
        link_res = link_measure(a, base_local, ft_local, work / "link") if a.only != "publish" else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    link = (sep + old_link).rstrip("\n") if link_res is None else "\n".join(link_lines(a, link_res) + footer)
    text = publish.rstrip("\n") + "\n\n" + link.rstrip("\n") + "\n"
    a.out.write_text(text)
    print(text)
    if link_res is not None:
        print(json.dumps(link_res, indent=2, default=str), file=sys.stderr)


if __name__ == "__main__":
    main()
