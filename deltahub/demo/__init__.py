"""A real, offline base/fine-tune pair (SmolLM2-135M + a stdlib fine-tune) for demos and benchmarks."""

from __future__ import annotations

from .pair import (
    GGUF_FILE,
    INSTALL_HINT,
    MARKER,
    DemoBuildError,
    DemoDependencyError,
    ProgressCallback,
    build_base,
    build_finetune,
    build_pair,
    default_cache_dir,
    finetune_dir_name,
    gguf_path,
    heldout_split,
    is_heldout,
    load_model,
    stdlib_corpus,
)

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
