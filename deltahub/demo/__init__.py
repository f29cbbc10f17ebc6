"""A real, offline base/fine-tune pair (SmolLM2-135M or Gemma-3-270M + a stdlib fine-tune) for demos and benchmarks."""

from __future__ import annotations

from .pair import *  # noqa: F403  (the public names are pair.__all__)
from .pair import __all__  # noqa: F401
