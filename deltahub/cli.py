"""The ``deltahub`` command line: compress, apply, push, pull, info, demo (typer + rich)."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import DeltaHubError
from .policy import Policy, Rule, parse_params
from .report import auto_table, human_bytes, parse_size, storage_table, tensor_table

app = typer.Typer(
    name="deltahub",
    help="Store fine-tuned LLMs as compressed deltas against their base model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (CI logs, files) gets a wide fixed width instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
F = TypeVar("F", bound=Callable[..., Any])


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every ``finally`` (temp-directory cleanup) runs."""


_NOT_INSTALLED = object()


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _friendly(fn: F) -> F:
    """Expected failures become one red line on stderr and exit code 1, never a traceback.

    Ctrl-C exits 130 and SIGTERM 143 (128 + signal number, as a shell reports them), after the
    partial output was removed: SIGTERM is handled like SIGINT while the command runs.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous: Any = _NOT_INSTALLED
        with contextlib.suppress(ValueError, OSError):  # ValueError: not the main thread
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return fn(*args, **kwargs)
        except DeltaHubError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except Terminated:
            err_console.print("[yellow]terminated (SIGTERM); the partial output was removed[/]")
            raise typer.Exit(143) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted; the partial output was removed[/]")
            raise typer.Exit(130) from None
        finally:
            if previous is not _NOT_INSTALLED:
                with contextlib.suppress(ValueError, OSError):
                    signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        console.print(f"deltahub {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """deltahub: fine-tunes as compressed deltas (BitDelta, DeltaDQ), local or on the Hugging Face Hub."""


def _policy(codec: str, granularity: Optional[str], group_size: Optional[int], param: list[str], rule: list[str],
            include: list[str], exclude: list[str]) -> Policy:
    from .errors import InvalidCodecParamsError

    params: dict[str, Any] = {}
    for p in param:
        params.update(parse_params(p))
    if granularity is not None:
        params["granularity"] = granularity
    if group_size is not None:
        params["group_size"] = group_size
        params.setdefault("granularity", "group")
    if (granularity or group_size) and codec != "bitdelta":
        raise InvalidCodecParamsError(f"--scale-granularity/--group-size are BitDelta options; codec is {codec!r}")
    return Policy(codec=codec, params=params, rules=[Rule.parse(r) for r in rule], include=list(include), exclude=list(exclude))


def _size(text: str) -> int:
    from .errors import InvalidCodecParamsError

    try:
        return parse_size(text)
    except ValueError as exc:
        raise InvalidCodecParamsError(str(exc)) from None


@app.command()
@_friendly
def compress(
    base: str = typer.Argument(..., help="Base model: a directory with safetensors weights, a .safetensors file, or a Hub id namespace/name[@revision]."),
    finetuned: str = typer.Argument(..., help="Fine-tuned model, same forms as BASE."),
    output: Path = typer.Option(..., "-o", "--output", help="Delta directory to write (atomically)."),
    codec: str = typer.Option("bitdelta", "--codec", help="Codec for transformer-block matrices (see `deltahub codecs`), or auto: the lowest-error candidate per tensor within --target-ratio / --max-bytes."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Named setting of the main codec, e.g. deltadq's 16x, 32x, ... 512x."),
    target_ratio: Optional[float] = typer.Option(None, "--target-ratio", help="--codec auto: each auto-coded tensor at most numel*2/R bytes (R times smaller than its fp16 delta)."),
    max_bytes: Optional[str] = typer.Option(None, "--max-bytes", help="--codec auto: total bytes of the auto-coded tensors (e.g. 50MB), shared out by parameter count."),
    candidate: list[str] = typer.Option([], "--candidate", help="--codec auto: a candidate CODEC[:key=value,...] (repeat; default: bitdelta, deltadq presets, dare, topk-ternary)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Layer inputs: a .safetensors from `deltahub calibrate`, or a text file run through BASE. Auto then scores output error."),
    auto_metric: str = typer.Option("aligned", "--auto-metric", help="--codec auto: aligned (lost delta counts fully, orthogonal noise little; ranks like measured KL) or rel (plain relative error)."),
    scale_granularity: Optional[str] = typer.Option(None, "--scale-granularity", help="BitDelta scales: tensor | row | group."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="BitDelta: columns per scale group (implies group)."),
    param: list[str] = typer.Option([], "--param", "-p", help="Codec parameters, key=value[,key=value]."),
    rule: list[str] = typer.Option([], "--rule", help="PATTERN=CODEC[:key=value,...]; first match wins. Glob, or re:REGEX."),
    include: list[str] = typer.Option([], "--include", help="Only tensors matching these patterns get the main codec."),
    exclude: list[str] = typer.Option([], "--exclude", help="Tensors matching these patterns stay exact (raw)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Cut delta files above this size."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    no_stats: bool = typer.Option(False, "--no-stats", help="Skip the per-tensor reconstruction error (faster)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no table."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token for Hub ids (default: HF_TOKEN / stored login)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Hub cache for downloaded models (default: HF_HUB_CACHE)."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)."),
) -> None:
    """Compress FINETUNED against BASE into a delta directory.

    Hub ids are downloaded first; the base's commit sha is recorded, so `deltahub pull` rebuilds
    against exactly that base.
    """
    from .compression import compress as _compress

    policy = _policy(codec, scale_granularity, group_size, param, rule, include, exclude)
    cands = [_candidate(c) for c in candidate] or None
    if cands is not None and not policy.uses_auto():
        from .errors import InvalidCodecParamsError

        raise InvalidCodecParamsError(f"--candidate only applies to --codec auto (or a PATTERN=auto rule); codec is {codec!r}")
    manifest = _compress(base, finetuned, output, policy=policy, overwrite=overwrite, max_shard_size=_size(max_shard_size),
                         compute_stats=not no_stats, progress=False if quiet else None,
                         token=token, cache_dir=cache_dir, endpoint=endpoint, preset=preset, target_ratio=target_ratio,
                         max_bytes=None if max_bytes is None else _size(max_bytes), candidates=cands,
                         calibration=calibration, auto_metric=auto_metric)
    if not quiet:
        console.print(storage_table(manifest, title=f"delta written to {output}"))
        table = auto_table(manifest)
        if table is not None:
            console.print(table)


def _candidate(text: str) -> tuple[str, dict[str, Any]]:
    """``CODEC[:key=value,...]`` -> ``(codec, params)`` (the --candidate syntax)."""
    name, _, args = text.partition(":")
    if not name.strip():
        from .errors import InvalidCodecParamsError

        raise InvalidCodecParamsError(f"candidate {text!r} is not CODEC[:key=value,...]")
    return name.strip(), parse_params(args)


@app.command()
@_friendly
def calibrate(
    base: Path = typer.Argument(..., help="Base model directory (transformers loads it, float32 on CPU)."),
    text: list[Path] = typer.Option(..., "--text", help="UTF-8 text file(s) to run through the model (tokenized with its tokenizer)."),
    output: Path = typer.Option(..., "-o", "--output", help="Calibration .safetensors file to write."),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="Tokens to run (the texts are concatenated, then cut)."),
    max_rows: int = typer.Option(512, "--max-rows", help="Input rows kept per layer (an even-stride subsample)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per forward pass."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
) -> None:
    """Record the inputs of every Linear layer of BASE on some text, for `compress --calibration`."""
    from .calibration import collect_activations, read_text_file, save_calibration
    from .format.io import check_output

    inputs: dict[str, Any] = {"base model": base, **{f"text file {i}": t for i, t in enumerate(text, 1)}}
    check_output(output, inputs=inputs, overwrite=overwrite)  # before the (slow) forward passes
    texts = [read_text_file(t, "calibration text") for t in text]
    acts = collect_activations(base, texts, max_tokens=max_tokens, max_rows=max_rows, seq_len=seq_len)
    save_calibration(acts, output, overwrite=overwrite, inputs=inputs,
                     metadata={"model": str(base), "max_tokens": str(max_tokens)})
    nbytes = sum(a.numel() * 4 for a in acts.values())
    console.print(f"[green]calibration written to[/] {output}: {len(acts)} layers, "
                  f"{max((a.shape[0] for a in acts.values()), default=0)} rows each at most, {human_bytes(nbytes)}", highlight=False)


@app.command()
@_friendly
def apply(
    delta: Path = typer.Argument(..., help="Delta directory."),
    base: Path = typer.Option(..., "--base", "-b", help="The base model the delta was made against."),
    output: Path = typer.Option(..., "-o", "--output", help="Model directory to write (atomically)."),
    ignore_base_mismatch: bool = typer.Option(False, "--ignore-base-mismatch", help="Experts: apply to a base whose fingerprint differs."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Cut model files above this size."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Rebuild the fine-tuned model from BASE + DELTA into a directory transformers loads."""
    from .delta import apply_delta

    apply_delta(delta, base, output, check_base=not ignore_base_mismatch, overwrite=overwrite,
                max_shard_size=_size(max_shard_size), progress=False if quiet else None)
    if not quiet:
        console.print(f"[green]rebuilt model written to[/] {output}")


@app.command()
@_friendly
def push(
    delta: Path = typer.Argument(..., help="Delta directory (from `deltahub compress`)."),
    repo_id: str = typer.Argument(..., help="Hub repo to create or update, namespace/name."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (an existing repo keeps its visibility)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (created if missing; default main)."),
    commit_message: Optional[str] = typer.Option(None, "--commit-message", "-m", help="Commit title."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN / stored login)."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)."),
) -> None:
    """Publish DELTA to the Hub as REPO_ID: one commit with the delta files and a generated model card."""
    from .hub import push_to_hub

    info = push_to_hub(delta, repo_id, private=private, revision=revision, commit_message=commit_message,
                       create_pr=create_pr, token=token, endpoint=endpoint)
    console.print(f"[green]pushed[/] {delta} -> {info.commit_url}", highlight=False)
    if getattr(info, "pr_url", None):
        console.print(f"pull request: {info.pr_url}", highlight=False)


@app.command()
@_friendly
def pull(
    repo_id: str = typer.Argument(..., help="Delta repo on the Hub, namespace/name[@revision]."),
    output: Path = typer.Option(..., "-o", "--output", help="Model directory to write (atomically)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Revision of the delta repo (branch, tag or sha)."),
    base_revision: Optional[str] = typer.Option(None, "--base-revision", help="Experts: base commit to use instead of the pinned one."),
    base: Optional[str] = typer.Option(None, "--base", "-b", help="Experts: base model (local dir or Hub id) instead of the recorded one."),
    ignore_base_mismatch: bool = typer.Option(False, "--ignore-base-mismatch", help="Experts: apply to a base whose fingerprint differs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN / stored login)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Hub cache (default: HF_HUB_CACHE)."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Download a delta and its base (at the pinned commit) and rebuild the fine-tune into OUTPUT."""
    from .hub import pull_model

    result = pull_model(repo_id, output, revision=revision, base_revision=base_revision, base_model=base, token=token,
                        cache_dir=cache_dir, endpoint=endpoint, overwrite=overwrite, check_base=not ignore_base_mismatch,
                        progress=False if quiet else None)
    if not quiet:
        console.print(f"[green]rebuilt model written to[/] {output} (delta {repo_id}"
                      + (f"@{result.delta_revision}" if result.delta_revision else "") + f", base {result.base.describe()})",
                      highlight=False)


@app.command()
@_friendly
def info(
    delta: str = typer.Argument(..., help="Delta directory, or a Hub repo id namespace/name[@revision] (reads only the manifest and file headers)."),
    tensors: bool = typer.Option(False, "--tensors", help="Also list every tensor."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Revision of the Hub repo (branch, tag or sha)."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN / stored login)."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)."),
) -> None:
    """Summarize a delta: format, base, and a size table per codec (local, or on the Hub without downloading weights)."""
    if Path(delta).exists() or not _looks_like_repo_id(delta):
        from .delta import Delta

        d = Delta(delta)
        try:
            _print_info(d.manifest, tensors=tensors, as_json=as_json)
        finally:
            d.close()
        return
    from .hub import remote_info

    manifest, headers = remote_info(delta, revision=revision, token=token, endpoint=endpoint)
    files = []
    for name, meta in headers:
        payload = sum(t.data_offsets[1] - t.data_offsets[0] for t in meta.tensors.values())
        files.append({"file": name, "tensors": len(meta.tensors), "payload_bytes": payload, "metadata": dict(meta.metadata or {})})
    _print_info(manifest, tensors=tensors, as_json=as_json, source=delta, remote_files=files)


def _looks_like_repo_id(text: str) -> bool:
    """``namespace/name[@rev]`` that is not a local path (only asked once the path does not exist)."""
    from .hub import is_hub_spec

    return is_hub_spec(text)


def _print_info(m: Any, *, tensors: bool = False, as_json: bool = False, source: str | None = None,
                remote_files: list[dict[str, Any]] | None = None) -> None:
    """Render a manifest (and, for Hub repos, the delta files' headers) as `deltahub info` prints it."""
    from .format.integrity import describe as describe_integrity

    if as_json:
        from .report import auto_rows, storage_rows

        out = {"format_version": m.format_version, "created_with": m.created_with, "base": m.base.name_or_path,
               "base_revision": m.base.revision, "fingerprint": m.base.fingerprint, "totals": m.totals,
               "codecs": storage_rows(m), "integrity": describe_integrity(m)}
        auto = auto_rows(m)
        if auto:
            out["auto"] = auto
        if remote_files is not None:
            out["repo"] = source
            out["files"] = remote_files
        print(json.dumps(out, indent=2, default=str))
        return
    head = Table.grid(padding=(0, 2))
    if source is not None:
        head.add_row("repo", source)
    head.add_row("format", f"{m.format} {m.format_version} ({m.created_with})")
    head.add_row("base", f"{m.base.name_or_path}" + (f" @ {m.base.revision}" if m.base.revision else ""))
    head.add_row("fingerprint", m.base.fingerprint)
    head.add_row("integrity", describe_integrity(m))
    head.add_row("fine-tune", str(m.finetuned.get("name_or_path", "")))
    arch = (m.config or {}).get("architectures") or ["?"]
    head.add_row("model", f"{arch[0]}, {m.totals.get('parameters', 0):,} parameters")
    ft_b, stored = m.totals.get("finetuned_bytes", 0), m.totals.get("stored_bytes", 0)
    fp16 = m.totals.get("finetuned_fp16_bytes", 0)
    head.add_row("size", f"{human_bytes(stored)} stored vs {human_bytes(fp16)} fp16 fine-tune "
                         f"({fp16 / stored if stored else float('inf'):.1f}x); checkpoint {human_bytes(ft_b)}")
    console.print(head)
    console.print(storage_table(m))
    auto = auto_table(m)
    if auto is not None:
        console.print(auto)
    if remote_files:
        t = Table("file", "tensors", "payload", "codecs (header)", title="delta files on the Hub (headers only)", title_justify="left")
        for f in remote_files:
            t.add_row(f["file"], str(f["tensors"]), human_bytes(f["payload_bytes"]), str(f["metadata"].get("codecs", "")))
        console.print(t)
    if tensors:
        console.print(tensor_table(m))


@app.command()
def codecs() -> None:
    """List the available codecs."""
    from .codecs import available_codecs, get_codec

    table = Table("codec", "default params", "what")
    for name in available_codecs():
        c = get_codec(name)
        table.add_row(name, json.dumps(c.default_params), (type(c).__doc__ or "").strip().splitlines()[0])
    console.print(table)


@app.command()
@_friendly
def demo(
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where the real pair and outputs live (default ~/.cache/deltahub/demo or $DELTAHUB_CACHE)."),
    steps: int = typer.Option(60, "--steps", help="Fine-tune steps of the real pair (≈3.3 s each on 2 cores)."),
    codec: str = typer.Option("bitdelta", "--codec", help="Codec for the transformer-block matrices."),
    scale_granularity: Optional[str] = typer.Option(None, "--scale-granularity", help="BitDelta scales: tensor | row | group."),
    param: list[str] = typer.Option([], "--param", "-p", help="Codec parameters, key=value."),
    eval_blocks: int = typer.Option(16, "--eval-blocks", help="Held-out 512-token blocks to evaluate (0 skips evaluation)."),
) -> None:
    """The whole job on a real model: build SmolLM2-135M + a stdlib fine-tune, compress, apply, report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .demo.run import run_demo

    policy = _policy(codec, scale_granularity, None, param, [], [], [])
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err_console) as prog:
        tasks: dict[str, Any] = {}

        def stage(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = prog.add_task(name, total=max(total, 1))
            prog.update(tasks[name], completed=done, total=max(total, 1))

        result = run_demo(cache_dir, steps=steps, policy=policy, eval_blocks=eval_blocks, stage_progress=stage)
    m = result["manifest"]
    console.print(storage_table(m, title=f"delta: {result['delta_dir']}"))
    q = result["quality"]
    if q:
        t = Table(title=f"quality on {q['base']['tokens']:,} held-out tokens (stdlib files)", title_justify="left")
        for col in ("model", "loss", "perplexity", "KL(fine-tune ‖ model)"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for name in ("base", "fine-tune", "rebuilt"):
            r = q[name]
            t.add_row(name, f"{r['loss']:.4f}", f"{r['perplexity']:.3f}", "0" if name == "fine-tune" else f"{r['kl']:.5f}")
        console.print(t)
        gain = q["base"]["loss"] - q["fine-tune"]["loss"]
        kept = (q["base"]["loss"] - q["rebuilt"]["loss"]) / gain if gain > 0 else float("nan")
        console.print(f"rebuilt model keeps {100 * kept:.0f}% of the fine-tune's loss improvement over the base")
    console.print(f"compress {result['compress_s']:.1f} s, apply {result['apply_s']:.1f} s; rebuilt model: {result['rebuilt_dir']}")


def run() -> None:  # pragma: no cover - console-script shim
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
