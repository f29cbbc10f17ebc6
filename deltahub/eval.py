"""Quality report of a delta: what it costs (bits per weight) and what it loses (loss, KL, L2 error).

:func:`evaluate_delta` measures, on a held-out text file:

* the held-out loss / perplexity of the base, the fine-tune and the rebuild (base + delta), the
  mean per-token KL(fine-tune ‖ rebuild), the top-1 agreement of the two, and the share of the
  fine-tune's loss gain over the base that the rebuild keeps;
* per tensor: codec, stored bytes, bits per weight (from the manifest) and the relative L2 error of
  the delta ``||rebuilt - ft|| / ||ft - base||`` (tensors streamed one at a time, float64 sums);
  per layer (``layers.N.``) and per group (embeddings, lm_head, norms, other): the same, summed.

The result is a plain dict (the JSON schema of ``deltahub eval --json``, ``schema: deltahub-eval/1``):

``models``: ``{base, finetuned, rebuilt: {loss, perplexity}}`` (``finetuned`` absent without a
fine-tune); ``kl``, ``kl_base`` (KL(fine-tune ‖ base), for scale), ``top1_agreement``,
``gain_kept`` = (loss(base) - loss(rebuilt)) / (loss(base) - loss(fine-tune)), the share of the
fine-tune's loss change that the rebuild reproduces (``null`` without a fine-tune or when the two
losses are equal; on text where the fine-tune is worse than the base it is the share of that loss);
``tokens`` (predicted tokens), ``blocks``, ``block_size``; ``tensors``: ``[{name, layer, codec,
shape, parameters, stored_bytes, bits_per_weight, delta_norm, error_norm, rel_error}]``;
``layers``: ``[{layer, index, tensors, parameters, stored_bytes, bits_per_weight, rel_error}]``
(``index`` is the block number, ``null`` for the groups); ``totals`` (same keys, whole model);
``delta``, ``base``, ``finetuned``, ``text`` (what was measured) and ``seconds``. Errors are
``null`` where undefined (no fine-tune; an unchanged tensor rebuilt with an error is ``Infinity``
in Python, ``null`` in JSON).

:func:`report_tables` renders it with rich, :func:`save_plot` draws error and bits per weight by
layer (matplotlib, imported lazily, Agg backend), :func:`card_section` writes the Markdown the Hub
model card carries (``push_to_hub(..., eval_text=...)``).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import DeltaHubError, ShapeMismatchError

__all__ = [
    "EvalError",
    "card_section",
    "evaluate_delta",
    "layer_of",
    "layer_rows",
    "load_tokenizer",
    "report_json",
    "report_tables",
    "save_plot",
    "tensor_errors",
    "text_blocks",
]

SCHEMA = "deltahub-eval/1"
DEFAULT_BLOCK_SIZE = 512
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_CHUNK = 1 << 22  # elements per float64 chunk (~32 MiB)


class EvalError(DeltaHubError):
    """The evaluation cannot run: empty text, no tokenizer, models that do not share a vocabulary."""


# ----------------------------------------------------------------------------- text -> blocks
def load_tokenizer(*dirs: str | Path | None) -> Any:
    """The first tokenizer found in ``dirs`` (the fine-tune's / delta's first, then the base's)."""
    from transformers import AutoTokenizer

    tried = []
    for d in dirs:
        if d is None:
            continue
        d = Path(d)
        if not d.is_dir() or not any((d / f).is_file() for f in _TOKENIZER_FILES):
            tried.append(str(d))
            continue
        try:
            return AutoTokenizer.from_pretrained(str(d))
        except Exception as exc:  # a broken tokenizer: try the next directory
            tried.append(f"{d} ({type(exc).__name__})")
    raise EvalError(f"no tokenizer found to tokenize the evaluation text (looked in: {', '.join(tried) or 'nothing'})")


def text_blocks(text: str, tokenizer: Any, *, block_size: int = DEFAULT_BLOCK_SIZE, max_blocks: int | None = None,
                path: str | Path | None = None) -> Any:
    """Tokenize ``text`` (no special tokens) and cut it into ``[n, block_size]`` int64 blocks, tail dropped.

    A text shorter than one block gives one shorter block (at least 2 tokens). Deterministic.
    """
    import torch

    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise EvalError(f"block_size={block_size!r} must be an integer >= 2")
    if max_blocks is not None and (isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1):
        raise EvalError(f"max_blocks={max_blocks!r} must be an integer >= 1")
    if not text.strip():
        raise EvalError("evaluation text is empty", path=path)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < 2:
        raise EvalError(f"evaluation text has {len(ids)} token(s); at least 2 are needed", path=path)
    n = len(ids) // block_size
    if n == 0:
        return torch.tensor([ids], dtype=torch.long)
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * block_size], dtype=torch.long).reshape(n, block_size)


# ----------------------------------------------------------------------------- per tensor
def layer_of(name: str) -> tuple[str, int | None]:
    """``("layer 3", 3)`` for ``model.layers.3.mlp...``; ``("embeddings"|"lm_head"|"norms"|"other", None)`` else."""
    m = _LAYER_RE.search(name)
    if m:
        return f"layer {int(m.group(1))}", int(m.group(1))
    low = name.lower()
    if "lm_head" in low or low.endswith("output.weight"):
        return "lm_head", None
    if "embed" in low or ".wte." in f".{low}" or ".wpe." in f".{low}":
        return "embeddings", None
    if "norm" in low or ".ln_" in f".{low}":
        return "norms", None
    return "other", None


def _sq_sums(rebuilt: Any, ft: Any, base: Any | None) -> tuple[float, float]:
    """(Σ(rebuilt - ft)², Σ(ft - base)²) in float64, chunk by chunk."""
    r, f = rebuilt.reshape(-1), ft.reshape(-1)
    b = base.reshape(-1) if base is not None else None
    err = dlt = 0.0
    for s in range(0, f.numel(), _CHUNK):
        fc = f[s:s + _CHUNK].double()
        err += float(((r[s:s + _CHUNK].double() - fc) ** 2).sum())
        dlt += float(((fc - b[s:s + _CHUNK].double()) ** 2).sum()) if b is not None else float((fc * fc).sum())
    return err, dlt


def _ratio(err_sq: float, delta_sq: float) -> float:
    if delta_sq == 0.0:
        return 0.0 if err_sq == 0.0 else math.inf
    return math.sqrt(err_sq / delta_sq)


def tensor_errors(delta: Any, base_dir: str | Path, finetuned_dir: str | Path | None, *, check_base: bool = True,
                  ) -> list[dict[str, Any]]:
    """One row per stored tensor: codec, bits per weight, and (with a fine-tune) the delta's relative L2 error.

    Streams: each tensor is rebuilt, compared with the fine-tune's and the base's, and dropped.
    Without a fine-tune only the storage columns are filled (errors ``None``).
    """
    from .format.io import Checkpoint

    m = delta.manifest
    rows: list[dict[str, Any]] = []
    with Checkpoint(base_dir) as base:
        ft = Checkpoint(finetuned_dir) if finetuned_dir is not None else None
        try:
            names = list(m.tensors)
            if ft is not None:
                missing = [n for n in names if n not in ft]
                if missing:
                    raise ShapeMismatchError(f"the fine-tune has no tensor {missing[0]!r} that the delta stores "
                                             f"({len(missing)} missing): not the fine-tune of this delta", path=finetuned_dir)
            source = delta.iter_tensors(base, check_base=check_base) if ft is not None else ((n, None) for n in names)
            for name, rebuilt in source:
                e = m.tensors[name]
                numel = math.prod(e.shape) if e.shape else 1
                layer, index = layer_of(name)
                row: dict[str, Any] = {"name": name, "layer": layer, "index": index, "codec": e.codec, "shape": list(e.shape),
                                       "parameters": numel, "stored_bytes": int(e.stored_bytes),
                                       "bits_per_weight": e.stored_bytes * 8 / numel if numel else 0.0,
                                       "delta_norm": None, "error_norm": None, "rel_error": None,
                                       "_err_sq": None, "_delta_sq": None}
                if ft is not None:
                    f = ft.read(name)
                    if tuple(f.shape) != tuple(rebuilt.shape):
                        raise ShapeMismatchError(f"tensor {name!r}: fine-tune shape {tuple(f.shape)} != rebuilt "
                                                 f"{tuple(rebuilt.shape)}", path=finetuned_dir)
                    b = base.read(name) if name in base and tuple(base.info(name).shape) == tuple(f.shape) else None
                    err_sq, delta_sq = _sq_sums(rebuilt, f, b)
                    row.update(delta_norm=math.sqrt(delta_sq), error_norm=math.sqrt(err_sq), rel_error=_ratio(err_sq, delta_sq),
                               _err_sq=err_sq, _delta_sq=delta_sq)
                    del f, b
                rows.append(row)
        finally:
            if ft is not None:
                ft.close()
    return rows


def _group(rows: Iterable[dict[str, Any]], key: str | None) -> dict[str, Any]:
    rows = list(rows)
    params = sum(r["parameters"] for r in rows)
    stored = sum(r["stored_bytes"] for r in rows)
    have_err = all(r["_err_sq"] is not None for r in rows) and rows
    err = sum(r["_err_sq"] for r in rows) if have_err else None
    dlt = sum(r["_delta_sq"] for r in rows) if have_err else None
    out = {"tensors": len(rows), "parameters": params, "stored_bytes": stored,
           "bits_per_weight": stored * 8 / params if params else 0.0,
           "rel_error": _ratio(err, dlt) if err is not None and dlt is not None else None}
    if key is not None:
        out = {"layer": key, "index": rows[0]["index"] if rows else None, **out}
    return out


def layer_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-layer sums (block layers by index, then embeddings, norms, lm_head, other)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["layer"], []).append(r)
    order = {"embeddings": 0, "norms": 2, "lm_head": 3, "other": 4}

    def sort_key(k: str) -> tuple[int, int]:
        idx = groups[k][0]["index"]
        return (1, idx) if idx is not None else (order.get(k, 5), 0)

    return [_group(groups[k], k) for k in sorted(groups, key=sort_key)]


# ----------------------------------------------------------------------------- whole job
def _load_lm(path: str | Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


@contextlib.contextmanager
def _no_loading_bars() -> Iterator[None]:
    """transformers' "Loading weights" bar off while the three models load (restored after)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _vocab(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None \
        else int(model.config.vocab_size)


def evaluate_delta(delta: Any, *, base: str | Path | None = None, finetuned: str | Path | None = None,
                   text: str | Path, block_size: int = DEFAULT_BLOCK_SIZE, max_blocks: int | None = None,
                   batch_size: int = 4, check_base: bool = True, token: str | bool | None = None,
                   cache_dir: str | Path | None = None, endpoint: str | None = None, revision: str | None = None,
                   ) -> dict[str, Any]:
    """Measure a delta against its base and fine-tune on a held-out text file (see the module doc).

    ``delta``: a directory, a Hub id or an opened :class:`~deltahub.delta.Delta`; ``base``: a path
    or Hub id (default: the base the manifest pins); ``finetuned``: path or Hub id, optional (without
    it: only base / rebuilt loss and the storage columns). ``text``: a UTF-8 text file, tokenized
    with the delta's tokenizer (copied from the fine-tune), else the fine-tune's, else the base's.
    """
    import torch

    from . import hub as _hub  # registers the Hub opener of Delta.from_pretrained
    from .calibration import read_text_file
    from .delta import Delta
    from .evaluation import evaluate_models

    t0 = time.perf_counter()
    body = read_text_file(text, "evaluation text")  # before any download
    if not body.strip():
        raise EvalError("evaluation text is empty", path=text)
    d = delta if isinstance(delta, Delta) else Delta.from_pretrained(delta, revision=revision, token=token,
                                                                       cache_dir=cache_dir, endpoint=endpoint)
    dl = {"token": token, "cache_dir": cache_dir, "endpoint": endpoint}
    if base is not None:
        base_dir = _hub.resolve_model(base, role="base", **dl).local_dir
    else:
        base_dir = _hub.resolve_base(d.manifest, **dl).local_dir
    ft_dir = _hub.resolve_model(finetuned, role="fine-tune", **dl).local_dir if finetuned is not None else None

    tokenizer = load_tokenizer(d.directory, ft_dir, base_dir)
    blocks = text_blocks(body, tokenizer, block_size=block_size, max_blocks=max_blocks, path=text)

    rows = tensor_errors(d, base_dir, ft_dir, check_base=check_base)
    t_tensors = time.perf_counter()

    with _no_loading_bars():
        models: dict[str, Any] = {"base": _load_lm(base_dir)}
        if ft_dir is not None:
            models["finetuned"] = _load_lm(ft_dir)
        models["rebuilt"] = d.to_model(base_dir, check_base=check_base, torch_dtype=torch.float32, progress=False)
    vocabs = {k: _vocab(m) for k, m in models.items()}
    if len(set(vocabs.values())) > 1:
        raise EvalError("the models do not share a vocabulary (output sizes "
                        + ", ".join(f"{k} {v}" for k, v in vocabs.items()) + "); KL and loss cannot be compared")
    limit = getattr(models["rebuilt"].config, "max_position_embeddings", None)
    if isinstance(limit, int) and 2 <= limit < blocks.shape[1]:
        raise EvalError(f"block_size {blocks.shape[1]} exceeds the model's max_position_embeddings {limit}")
    top = int(blocks.max())
    if top >= min(vocabs.values()):
        raise EvalError(f"the tokenizer gives token id {top}, outside the models' vocabulary of {min(vocabs.values())}: "
                        "tokenizer and models do not match")
    reference = "finetuned" if ft_dir is not None else "base"
    q = evaluate_models(models, blocks, reference=reference, batch_size=batch_size)
    del models
    t_end = time.perf_counter()

    kl = q["rebuilt"]["kl"] if ft_dir is not None else None
    top1 = q["rebuilt"]["top1_agreement"] if ft_dir is not None else None
    gain_kept = None
    if ft_dir is not None:
        gain = q["base"]["loss"] - q["finetuned"]["loss"]
        gain_kept = (q["base"]["loss"] - q["rebuilt"]["loss"]) / gain if abs(gain) > 1e-12 else None
    layers = layer_rows(rows)
    totals = _group(rows, None)
    return {
        "schema": SCHEMA,
        "delta": str(delta if not isinstance(delta, Delta) else delta.directory),
        "base": str(base if base is not None else d.manifest.base.name_or_path),
        "finetuned": None if finetuned is None else str(finetuned),
        "text": str(text),
        "tokens": q["rebuilt"]["tokens"], "blocks": int(blocks.shape[0]), "block_size": int(blocks.shape[1]),
        "models": {k: {"loss": v["loss"], "perplexity": v["perplexity"]} for k, v in q.items()},
        "kl": kl, "kl_base": q["base"]["kl"] if ft_dir is not None else None,
        "top1_agreement": top1, "gain_kept": gain_kept,
        "tensors": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "layers": layers, "totals": totals,
        "seconds": {"tensors": t_tensors - t0, "models": t_end - t_tensors, "total": t_end - t0},
    }


# ----------------------------------------------------------------------------- output
def _finite(x: Any) -> Any:
    """JSON has no inf/nan: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def report_json(report: dict[str, Any]) -> str:
    """The report as strict JSON (``inf`` / ``nan`` as ``null``)."""
    return json.dumps(_finite(report), indent=2, allow_nan=False)


def _f(x: float | None, fmt: str) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, fmt)


def _gain_word(report: dict[str, Any]) -> str:
    ms = report["models"]
    return "gain" if ms["finetuned"]["loss"] < ms["base"]["loss"] else "change (the fine-tune is worse on this text)"


def report_tables(report: dict[str, Any], *, tensors: bool = False) -> list[Any]:
    """Rich tables: the models (loss, perplexity, KL, top-1), per layer, and with ``tensors`` every tensor."""
    from rich.table import Table

    out = []
    t = Table(title=f"quality on {report['tokens']:,} held-out tokens ({report['blocks']} x {report['block_size']}) of "
                    f"{Path(report['text']).name}", title_justify="left")
    for col in ("model", "loss", "perplexity", "KL(fine-tune ‖ model)", "top-1 agreement"):
        t.add_column(col, justify="left" if col == "model" else "right")
    ms = report["models"]
    has_ft = "finetuned" in ms
    for name in ("base", "finetuned", "rebuilt"):
        if name not in ms:
            continue
        kl = {"base": report.get("kl_base"), "finetuned": 0.0 if has_ft else None, "rebuilt": report["kl"]}[name]
        top1 = {"base": None, "finetuned": 1.0 if has_ft else None, "rebuilt": report["top1_agreement"]}[name]
        t.add_row(name, _f(ms[name]["loss"], ".4f"), _f(ms[name]["perplexity"], ".3f"), _f(kl, ".5f"),
                  _f(None if top1 is None else 100 * top1, ".2f") + ("%" if top1 is not None else ""))
    if report["gain_kept"] is not None:
        t.caption = f"the rebuild keeps {100 * report['gain_kept']:.1f}% of the fine-tune's loss {_gain_word(report)} over the base"
        t.caption_justify = "left"
    out.append(t)
    lt = Table(title="delta by layer (relative L2 error = ||rebuilt - ft|| / ||ft - base||)", title_justify="left")
    for col in ("layer", "tensors", "parameters", "stored", "bits/weight", "rel. error"):
        lt.add_column(col, justify="left" if col == "layer" else "right")
    from .report import human_bytes

    for r in [*report["layers"], {"layer": "total", **report["totals"]}]:
        cells = [r["layer"], str(r["tensors"]), f"{r['parameters']:,}", human_bytes(r["stored_bytes"]),
                 f"{r['bits_per_weight']:.3f}", _f(r["rel_error"], ".4f")]
        lt.add_row(*cells, style="bold" if r["layer"] == "total" else None)
    out.append(lt)
    if tensors:
        tt = Table(title="delta by tensor", title_justify="left")
        for col in ("tensor", "codec", "parameters", "stored", "bits/weight", "rel. error"):
            tt.add_column(col, justify="left" if col in ("tensor", "codec") else "right")
        for r in report["tensors"]:
            tt.add_row(r["name"], r["codec"], f"{r['parameters']:,}", human_bytes(r["stored_bytes"]),
                       f"{r['bits_per_weight']:.3f}", _f(r["rel_error"], ".4f"))
        out.append(tt)
    return out


def save_plot(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG with two panels by layer index: the delta's relative L2 error and bits per weight."""
    try:
        import matplotlib
    except ImportError:
        raise EvalError('--plot needs matplotlib: pip install "deltahub[eval]"') from None
    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    layers = [r for r in report["layers"] if r["index"] is not None]
    if not layers:
        raise EvalError("no `layers.N.` tensors in this model: nothing to plot by layer")
    x = [r["index"] for r in layers]
    fig = Figure(figsize=(8, 6), dpi=110, layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    errs = [r["rel_error"] if r["rel_error"] is not None and math.isfinite(r["rel_error"]) else float("nan") for r in layers]
    ax1.plot(x, errs, marker="o", color="tab:red")
    ax1.set_ylabel("relative L2 error\n||rebuilt − ft|| / ||ft − base||")
    finite = [e for e in errs if math.isfinite(e)]
    ax1.set_ylim(0, 1.15 * max(finite) if finite and max(finite) > 0 else 1.0)
    ax1.grid(alpha=0.3)
    ax2.bar(x, [r["bits_per_weight"] for r in layers], color="tab:blue")
    ax2.set_ylabel("bits / weight")
    others = [r for r in report["layers"] if r["index"] is None]
    note = "; ".join(f"{r['layer']}: {r['bits_per_weight']:.2f} bits/weight"
                     + (f", error {r['rel_error']:.3g}" if r["rel_error"] is not None else "") for r in others)
    ax2.set_xlabel("layer" + (f"\n(not shown: {note})" if note else ""))
    ax2.grid(alpha=0.3, axis="y")
    title = f"{Path(str(report['delta'])).name}: {report['totals']['bits_per_weight']:.3f} bits/weight overall"
    if report.get("kl") is not None:
        title += f", KL {report['kl']:.4f}"
    if report.get("gain_kept") is not None:
        title += f", gain kept {100 * report['gain_kept']:.0f}%"
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise EvalError(f"cannot write the plot ({exc.strerror or exc})", path=path) from None
    return path


def card_section(report: dict[str, Any]) -> str:
    """The "Measured quality" Markdown section of the Hub model card."""
    ms = report["models"]
    has_ft = "finetuned" in ms
    lines = ["## Measured quality", "",
             f"Measured with `deltahub eval` on {report['tokens']:,} held-out tokens of `{Path(report['text']).name}` "
             f"({report['blocks']} blocks of {report['block_size']} tokens).", "",
             "| model | loss | perplexity | KL(fine-tune ‖ model) | top-1 agreement |",
             "|---|---:|---:|---:|---:|"]
    for name, label in (("base", "base"), ("finetuned", "fine-tune"), ("rebuilt", "rebuilt (base + this delta)")):
        if name not in ms:
            continue
        kl = {"base": report.get("kl_base"), "finetuned": 0.0 if has_ft else None, "rebuilt": report["kl"]}[name]
        top1 = {"base": None, "finetuned": 1.0 if has_ft else None, "rebuilt": report["top1_agreement"]}[name]
        lines.append(f"| {label} | {_f(ms[name]['loss'], '.4f')} | {_f(ms[name]['perplexity'], '.3f')} | {_f(kl, '.5f')} | "
                     + (f"{100 * top1:.2f}%" if top1 is not None else "–") + " |")
    lines.append("")
    blocks = [r for r in report["layers"] if r["index"] is not None]
    parts = [r for r in report["layers"] if r["index"] is None]
    lines += ["| part | parameters | stored | bits/weight | relative L2 error of the delta |", "|---|---:|---:|---:|---:|"]
    if blocks:
        params, stored = sum(r["parameters"] for r in blocks), sum(r["stored_bytes"] for r in blocks)
        errs = [r["rel_error"] for r in blocks if r["rel_error"] is not None]
        err = "–" if not errs else (_f(min(errs), ".4f") + ("" if min(errs) == max(errs) else f" … {_f(max(errs), '.4f')}"))
        lines.append(f"| {len(blocks)} transformer blocks (error: per block) | {params:,} | {stored:,} B | "
                     f"{stored * 8 / params if params else 0:.3f} | {err} |")
    for r in [*parts, {"layer": "**total**", **report["totals"]}]:
        lines.append(f"| {r['layer']} | {r['parameters']:,} | {r['stored_bytes']:,} B | {r['bits_per_weight']:.3f} | "
                     f"{_f(r['rel_error'], '.4f')} |")
    lines.append("")
    tot = report["totals"]
    facts = [f"{tot['bits_per_weight']:.3f} bits per weight overall"]
    if report["gain_kept"] is not None:
        facts.append(f"the rebuild keeps {100 * report['gain_kept']:.1f}% of the fine-tune's loss {_gain_word(report)} over the base")
    if tot["rel_error"] is not None:
        facts.append(f"relative L2 error of the whole delta {_f(tot['rel_error'], '.4f')}")
    if not has_ft:
        facts.append("measured without the fine-tune, so KL and errors are not available")
    summary = "; ".join(facts)
    lines += [summary[:1].upper() + summary[1:] + ".", ""]
    return "\n".join(lines)
