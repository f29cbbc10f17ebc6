"""Exports of a delta to formats other tools load: a PEFT LoRA adapter for vLLM / SGLang / TGI multi-adapter serving.

:func:`export_peft` (``deltahub export peft``) factorises each delta-coded ``nn.Linear`` weight's
decoded delta with the one truncated SVD (:mod:`deltahub.codecs._svd`) and writes
``adapter_model.safetensors`` + ``adapter_config.json`` + a model card, as ``peft`` saves them. The
files are written by deltahub itself: ``peft`` is needed only to *load* the export.
"""

from __future__ import annotations

from ..errors import ExportError
from .peft import PeftExport, export_peft, lowrank_state_dict

__all__ = ["ExportError", "PeftExport", "export_peft", "lowrank_state_dict"]
