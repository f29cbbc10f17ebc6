"""Storage-cost reports: bytes per codec and per tensor, bits per weight, ratios, delta error."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich is imported by the table builders only (compress and apply use the size helpers)
    from rich.table import Table

    from .format.manifest import Manifest

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str | int) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"512MiB"`` -> 536_870_912, ints pass through."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 500MB, 2GB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def human_bytes(n: float) -> str:
    """Decimal units, 3 significant digits: ``12.3 MB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n} TB"


def _rel_l2(stats: list[dict[str, float]]) -> float | None:
    """Aggregate relative L2 error: sqrt(sum err^2) / sqrt(sum delta^2) over tensors with stats."""
    d2 = sum(s["delta_l2"] ** 2 for s in stats if "delta_l2" in s)
    e2 = sum(s["error_l2"] ** 2 for s in stats if "error_l2" in s)
    if not any("delta_l2" in s for s in stats):
        return None
    return math.sqrt(e2 / d2) if d2 > 0 else 0.0


def storage_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """One row per codec plus a total row: tensors, parameters, bytes, bits/weight, ratio vs fp16, rel. L2.

    Alias entries (tied weights, format 1.3) are a row ``alias`` of 0 bytes: their bytes are their
    targets', counted once, in the target's codec row; their parameters count in the total (the model has them)."""
    rows = []
    by: dict[str, list[Any]] = {}
    for e in manifest.tensors.values():
        by.setdefault(e.codec, []).append(e)
    total_params = sum(math.prod(e.shape) for e in manifest.tensors.values())
    for codec, entries in sorted(by.items()):
        params = sum(math.prod(e.shape) for e in entries)
        nbytes = sum(e.stored_bytes for e in entries)
        rows.append({
            "codec": codec,
            "tensors": len(entries),
            "parameters": params,
            "share": params / total_params if total_params else 0.0,
            "stored_bytes": nbytes,
            "bits_per_weight": 8 * nbytes / params if params else 0.0,
            "ratio_vs_fp16": (2 * params / nbytes) if nbytes else math.inf,
            "rel_l2": _rel_l2([e.stats for e in entries if e.stats]),
        })
    nbytes = sum(r["stored_bytes"] for r in rows)
    rows.append({
        "codec": "total",
        "tensors": len(manifest.tensors),
        "parameters": total_params,
        "share": 1.0,
        "stored_bytes": nbytes,
        "bits_per_weight": 8 * nbytes / total_params if total_params else 0.0,
        "ratio_vs_fp16": (2 * total_params / nbytes) if nbytes else math.inf,
        "rel_l2": _rel_l2([e.stats for e in manifest.tensors.values() if e.stats]),
    })
    return rows


_GROUPS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("embeddings / LM head", re.compile(r"(embed|wte|wpe|lm_head|word_embeddings|position_embeddings|(^|\.)shared\.)", re.I)),
    ("norms and other", re.compile(r"(norm|ln_|layernorm|bias$)", re.I)),
    ("attention", re.compile(r"(attn|attention|q_proj|k_proj|v_proj|o_proj|qkv|query|key|value)", re.I)),
    ("MLP", re.compile(r"(mlp|ffn|feed_forward|fc1|fc2|gate_proj|up_proj|down_proj|experts|c_fc|intermediate|dense_h_to_4h|dense_4h_to_h)", re.I)),
)


def tensor_group(name: str, shape: list[int] | tuple[int, ...]) -> str:
    """Which part of the model a tensor belongs to, for size reports: embeddings / LM head, attention, MLP, norms and other."""
    for group, pattern in _GROUPS:
        if pattern.search(name) and (group != "attention" and group != "MLP" or len(shape) >= 2):
            return group
    return "norms and other"


def group_rows(manifest: Manifest, aux_bytes: int | None = None, directory_bytes: int | None = None) -> list[dict[str, Any]]:
    """Stored bytes by tensor group, then aux files and manifest/headers when the directory's sizes are known, and a total.

    A tied tensor (an alias entry, format 1.3) counts its parameters in its own group and no bytes: the
    bytes are its target's, counted once in the target's group."""
    fp16 = 2 * sum(math.prod(e.shape) for e in manifest.tensors.values())
    by: dict[str, list[Any]] = {}
    for name, e in manifest.tensors.items():
        by.setdefault(tensor_group(name, e.shape), []).append(e)
    rows = []
    for group in [g for g, _ in _GROUPS if g in by]:
        entries = by[group]
        params = sum(math.prod(e.shape) for e in entries)
        nbytes = sum(e.stored_bytes for e in entries)
        rows.append({"group": group, "tensors": len(entries), "parameters": params, "bytes": nbytes,
                     "ratio_vs_fp16": 2 * params / nbytes if nbytes else math.inf})
    tensor_bytes = sum(r["bytes"] for r in rows)
    if aux_bytes is not None:
        rows.append({"group": "aux files (tokenizer, ...)", "tensors": 0, "parameters": 0, "bytes": aux_bytes, "ratio_vs_fp16": None})
    if directory_bytes is not None:
        rows.append({"group": "manifest and headers", "tensors": 0, "parameters": 0,
                     "bytes": directory_bytes - tensor_bytes - (aux_bytes or 0), "ratio_vs_fp16": None})
    total = directory_bytes if directory_bytes is not None else tensor_bytes + (aux_bytes or 0)
    rows.append({"group": "whole delta" if directory_bytes is not None else "total", "tensors": len(manifest.tensors),
                 "parameters": fp16 // 2, "bytes": total, "ratio_vs_fp16": fp16 / total if total else math.inf})
    return rows


def _table(**kwargs: Any) -> Table:
    """A rich table (rich is imported on first use: a library compress needs none)."""
    from rich.table import Table

    return Table(**kwargs)


def group_table(rows: list[dict[str, Any]]) -> Table:
    """The ``deltahub info`` table of bytes by tensor group (and aux files, manifest) vs the fp16 fine-tune."""
    table = _table(title="bytes by part of the model", title_justify="left")
    for col in ("part", "tensors", "params", "stored", "share", "vs fp16"):
        table.add_column(col, justify="left" if col == "part" else "right")
    total = rows[-1]["bytes"] or 1
    for r in rows:
        ratio = r["ratio_vs_fp16"]
        table.add_row(r["group"], str(r["tensors"] or ""), f"{r['parameters']:,}" if r["parameters"] else "",
                      human_bytes(r["bytes"]), f"{100 * r['bytes'] / total:.1f}%",
                      "" if ratio is None else ("∞" if math.isinf(ratio) else f"{ratio:.1f}x"),
                      style="bold" if r is rows[-1] else None)
    return table


def storage_table(manifest: Manifest, title: str | None = None) -> Table:
    """The ``deltahub info`` size table."""
    table = _table(title=title, title_justify="left")
    for col, just in (("codec", "left"), ("tensors", "right"), ("params", "right"), ("share", "right"),
                      ("stored", "right"), ("bits/weight", "right"), ("vs fp16", "right"), ("delta rel. L2", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in storage_rows(manifest):
        table.add_row(
            r["codec"], str(r["tensors"]), f"{r['parameters']:,}", f"{100 * r['share']:.1f}%",
            human_bytes(r["stored_bytes"]), f"{r['bits_per_weight']:.3f}",
            "∞" if math.isinf(r["ratio_vs_fp16"]) else f"{r['ratio_vs_fp16']:.1f}x",
            "" if r["rel_l2"] is None else f"{r['rel_l2']:.3f}",
            style="bold" if r["codec"] == "total" else None,
        )
    return table


def auto_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """What ``--codec auto`` chose: one row per chosen setting (tensors, parameters, bytes, ratio, mean error)."""
    by: dict[str, list[Any]] = {}
    for e in manifest.tensors.values():
        if "auto_choice" in e.stats:
            by.setdefault(str(e.stats["auto_choice"]), []).append(e)
    rows = []
    for choice, entries in sorted(by.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        params = sum(math.prod(e.shape) for e in entries)
        nbytes = sum(e.stored_bytes for e in entries)
        errors = [float(e.stats["auto_error"]) for e in entries if e.stats.get("auto_error") is not None]
        rows.append({
            "choice": choice,
            "tensors": len(entries),
            "parameters": params,
            "stored_bytes": nbytes,
            "ratio_vs_fp16": (2 * params / nbytes) if nbytes else math.inf,
            "metric": "/".join(sorted({str(e.stats.get("auto_metric")) for e in entries})),
            "mean_error": sum(errors) / len(errors) if errors else None,
        })
    return rows


def auto_table(manifest: Manifest, title: str | None = "auto: chosen per tensor") -> Table | None:
    """The table of :func:`auto_rows`, or None when no tensor was auto-coded."""
    rows = auto_rows(manifest)
    if not rows:
        return None
    table = _table(title=title, title_justify="left")
    for col, just in (("choice", "left"), ("tensors", "right"), ("params", "right"), ("stored", "right"),
                      ("vs fp16", "right"), ("metric", "left"), ("mean error", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in rows:
        table.add_row(r["choice"], str(r["tensors"]), f"{r['parameters']:,}", human_bytes(r["stored_bytes"]),
                      "∞" if math.isinf(r["ratio_vs_fp16"]) else f"{r['ratio_vs_fp16']:.1f}x", r["metric"],
                      "" if r["mean_error"] is None else f"{r['mean_error']:.4f}")
    return table


def tensor_table(manifest: Manifest, limit: int | None = None) -> Table:
    """Per-tensor rows: codec, shape, dtype, stored bytes, bits/weight, relative L2 of the delta."""
    table = _table(title_justify="left")
    for col in ("tensor", "codec", "shape", "dtype", "stored", "bits/weight", "rel. L2"):
        table.add_column(col, justify="left" if col in ("tensor", "codec", "shape", "dtype") else "right")
    items = list(manifest.tensors.items())[: limit or None]
    for name, e in items:
        n = math.prod(e.shape)
        rel = e.stats.get("error_l2", 0) / e.stats["delta_l2"] if e.stats.get("delta_l2") else None
        codec = e.codec if e.alias_of is None else f"alias of {e.alias_of}"
        table.add_row(name, codec, "×".join(map(str, e.shape)), e.dtype, human_bytes(e.stored_bytes),
                      f"{8 * e.stored_bytes / n:.3f}" if n else "-", "" if rel is None else f"{rel:.3f}")
    return table


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Render rows as a GitHub markdown table; ``columns`` = [(key, header)]."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isinf(v):
            return "∞"
        return f"{v:.4g}"
    return str(v)
