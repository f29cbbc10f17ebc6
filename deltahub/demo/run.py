"""The end-to-end job behind ``deltahub demo`` and the benchmarks: pair -> compress -> apply -> evaluate."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..compression import compress
from ..delta import apply_delta
from ..format.manifest import Manifest
from ..policy import AUTO, Policy
from .pair import DEFAULT_MODEL, DemoModel, build_pair, demo_model, load_model, stdlib_corpus

#: Held-out blocks of 512 tokens evaluated by default (16 x 3 models ≈ 30 s on 2 cores).
DEFAULT_EVAL_BLOCKS = 16


def evaluate_pair(
    base_dir: Path,
    finetune_dir: Path,
    rebuilt: dict[str, Path],
    eval_blocks: int = DEFAULT_EVAL_BLOCKS,
    model: str | DemoModel = DEFAULT_MODEL,
) -> dict[str, dict[str, Any]]:
    """Held-out loss / perplexity of base, fine-tune and each rebuilt model, and KL(fine-tune ‖ model).

    Blocks are 512 tokens (BOS-led for models that expect it, see ``DemoModel.bos_per_block``).
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..evaluation import evaluate_models

    hf_logging.disable_progress_bar()  # deltahub's own bars are enough

    tok = AutoTokenizer.from_pretrained(finetune_dir)
    _, heldout = stdlib_corpus(tok, bos=demo_model(model).bos_per_block)
    blocks = heldout[:eval_blocks]
    models = {"base": load_model(base_dir), "fine-tune": load_model(finetune_dir)}
    models.update({name: load_model(path) for name, path in rebuilt.items()})
    return evaluate_models(models, blocks, reference="fine-tune")


def run_demo(
    cache_dir: Path | None = None,
    *,
    steps: int | None = None,
    model: str | DemoModel = DEFAULT_MODEL,
    policy: Policy | None = None,
    eval_blocks: int = DEFAULT_EVAL_BLOCKS,
    stage_progress: Callable[[str, int, int], None] | None = None,
    progress: bool | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Build or reuse ``model``'s real pair, compress it, rebuild it, and evaluate; returns numbers and paths.

    ``steps`` defaults to the model's recipe (SmolLM2: 60).  Outputs go next to the pair.
    """
    if threads:
        torch.set_num_threads(threads)
    base_dir, ft_dir = build_pair(cache_dir, steps=steps, progress=stage_progress, model=model)
    work = base_dir.parent
    policy = policy or Policy(codec=AUTO, whole_model=True)  # deltahub compress's default
    delta_dir = work / f"delta-{policy.codec}"
    rebuilt_dir = work / f"rebuilt-{policy.codec}"
    t0 = time.perf_counter()
    manifest: Manifest = compress(base_dir, ft_dir, delta_dir, policy=policy, overwrite=True, progress=progress)
    t_compress = time.perf_counter() - t0
    t0 = time.perf_counter()
    apply_delta(delta_dir, base_dir, rebuilt_dir, overwrite=True, progress=progress)
    t_apply = time.perf_counter() - t0
    quality = (
        evaluate_pair(base_dir, ft_dir, {"rebuilt": rebuilt_dir}, eval_blocks=eval_blocks, model=model) if eval_blocks else {}
    )
    return {
        "base_dir": base_dir,
        "finetune_dir": ft_dir,
        "delta_dir": delta_dir,
        "rebuilt_dir": rebuilt_dir,
        "manifest": manifest,
        "compress_s": t_compress,
        "apply_s": t_apply,
        "quality": quality,
    }
