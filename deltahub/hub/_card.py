"""The Hub model card (``README.md``) of a pushed delta, built with ``huggingface_hub.ModelCard``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..format.manifest import Manifest
from ..format.spec import MANIFEST_NAME
from ._ids import is_hub_id

# Hub pipeline tags of the common transformers heads (architecture class name suffix -> tag).
_PIPELINE_TAGS = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("ForSeq2SeqLM", "text2text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
)
# Metadata of the fine-tune's own card carried over to the delta's card.
_CARRIED = ("license", "license_name", "license_link", "language", "datasets")


def pipeline_tag(config: dict[str, Any] | None) -> str | None:
    """The Hub ``pipeline_tag`` for a model config, from its ``architectures`` (``*ForCausalLM`` -> ``text-generation``)."""
    for arch in (config or {}).get("architectures") or []:
        for suffix, tag in _PIPELINE_TAGS:
            if isinstance(arch, str) and arch.endswith(suffix):
                return tag
    return None


def card_metadata(path: str | Path | None) -> dict[str, Any]:
    """The YAML metadata of a ``README.md`` (``{}`` if there is none or it cannot be parsed)."""
    if path is None:
        return {}
    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a README without or with broken YAML: no metadata to carry over
        return {}


def model_card_data(manifest: Manifest, *, license: str | None = None, finetune_card: dict[str, Any] | None = None) -> ModelCardData:
    """The card's YAML metadata: ``base_model``, ``base_model_relation``, ``pipeline_tag``, ``license``, tags."""
    base = manifest.base
    codecs = sorted({e.codec for e in manifest.tensors.values() if e.alias_of is None})  # an alias is no codec
    carried = {k: v for k, v in (finetune_card or {}).items() if k in _CARRIED and v}
    if license is not None:
        carried["license"] = license
    hub_base = is_hub_id(base.name_or_path)
    return ModelCardData(
        base_model=base.name_or_path if hub_base else None,
        # The Hub knows adapter / merge / quantized / finetune. What this repo rebuilds is the *full*
        # fine-tuned model (every weight of the fine-tune, bit-exact or within the codec's error), not
        # an adapter loaded on top of the base (it is no PEFT adapter), not a merge of several models,
        # and not a quantized copy of the base: so the rebuilt model is a `finetune` of the base.
        base_model_relation="finetune" if hub_base else None,
        pipeline_tag=pipeline_tag(manifest.config),
        library_name="deltahub",
        tags=["deltahub", *codecs],
        **carried,
    )


def model_card(manifest: Manifest, repo_id: str | None = None, *, license: str | None = None,
               finetune_card: dict[str, Any] | None = None, quality: dict[str, Any] | None = None) -> str:
    """A Hub model card (``README.md``) for a delta: YAML metadata, the storage-cost table, how to rebuild.

    The metadata (:func:`model_card_data`) has ``base_model`` + ``base_model_relation: finetune``
    (when the base is a Hub repo, so the Hub links the delta to its base), ``pipeline_tag`` (from
    the config's architecture), ``license`` (``license``, else the fine-tune's card
    ``finetune_card``), ``library_name: deltahub`` and tags (``deltahub`` + the codec names).

    ``quality`` (a :func:`deltahub.eval.evaluate_delta` report) adds a "Measured quality" section
    and ``model-index`` metadata (the rebuild's perplexity on the evaluation text).
    """
    from ..report import human_bytes, storage_rows

    base = manifest.base
    data = model_card_data(manifest, license=license, finetune_card=finetune_card)
    title = repo_id or (manifest.finetuned or {}).get("name_or_path") or "deltahub delta"
    rows = storage_rows(manifest)
    total = rows[-1]
    fp16 = 2 * total["parameters"]
    base_line = f"`{base.name_or_path}`" + (f" at commit `{base.revision}`" if base.revision else " (a local model)")
    lines = [
        f"# {title}",
        "",
        f"A fine-tune of {base_line}, stored as a compressed delta with "
        "deltahub: this repo holds only what differs from the base, "
        f"{human_bytes(total['stored_bytes'])} instead of {human_bytes(fp16)} for the fp16 fine-tune "
        f"({fp16 / total['stored_bytes'] if total['stored_bytes'] else math.inf:.1f}x smaller).",
        "",
        f"The base is pinned by commit and by content fingerprint (`{base.fingerprint}`); rebuilding "
        "checks it and refuses any other base.",
        "",
        "## Rebuild the fine-tune",
        "",
        "```bash",
        "pip install deltahub",
        f"deltahub pull {repo_id or '<repo_id>'} -o ./model   # a model directory transformers loads",
        "```",
        "",
        "```python",
        "from deltahub import AutoDeltaModel",
        f"model = AutoDeltaModel.from_pretrained({json.dumps(repo_id or '<repo_id>')})",
        "```",
        "",
        "## Storage cost",
        "",
        "| codec | tensors | parameters | stored | bits/weight | vs fp16 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "∞" if math.isinf(r["ratio_vs_fp16"]) else f"{r['ratio_vs_fp16']:.1f}x"
        cells = [r["codec"], str(r["tensors"]), f"{r['parameters']:,}", f"{r['stored_bytes']:,} B ({human_bytes(r['stored_bytes'])})",
                 f"{r['bits_per_weight']:.3f}", ratio]
        if r["codec"] == "total":
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Ratios are against the fine-tune in fp16 ({fp16:,} bytes). Format: deltahub {manifest.format_version} "
        f"(`{MANIFEST_NAME}` + safetensors), written by {manifest.created_with or 'deltahub'}.",
        "",
    ]
    if quality is not None:
        from ..eval import card_section

        lines.append(card_section(quality))
        _add_eval_results(data, quality, title)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


def _add_eval_results(data: ModelCardData, quality: dict[str, Any], title: str) -> None:
    """``model-index`` metadata: the rebuild's held-out perplexity (and KL vs the fine-tune, when measured)."""
    from huggingface_hub import EvalResult

    name = Path(str(quality["text"])).name
    common = {"task_type": "text-generation", "dataset_type": "text", "dataset_name": name}
    results = []
    ppl = quality["models"]["rebuilt"]["perplexity"]
    if isinstance(ppl, float) and math.isfinite(ppl):
        results.append(EvalResult(metric_type="perplexity", metric_value=round(ppl, 4), **common))
    if quality.get("kl") is not None:
        results.append(EvalResult(metric_type="kl_divergence", metric_name="KL(fine-tune || rebuilt) per token",
                                  metric_value=round(quality["kl"], 6), **common))
    if results:
        data.model_name = title
        data.eval_results = results


def with_quality_section(card_text: str, quality: dict[str, Any]) -> str:
    """``card_text`` with its "Measured quality" section replaced by (or appended with) the report's."""
    import re

    from ..eval import card_section

    section = card_section(quality)
    pattern = re.compile(r"^## Measured quality\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(card_text):
        return pattern.sub(lambda _m: section + "\n", card_text, count=1)
    return card_text.rstrip("\n") + "\n\n" + section
