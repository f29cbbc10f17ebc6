"""Pick, per tensor, the codec setting with the lowest error that fits a size budget.

Every candidate ``(codec name, params)`` is encoded (unless its data-independent size already
exceeds the budget), decoded, and scored; the lowest error wins, fewer bytes break ties. The
error is the relative output error ``||X (D_hat - D)^T|| / ||X D^T||`` when calibration inputs
``X`` of the layer are known (they are what the delta acts on), else the relative L2 error of the
delta ``||D_hat - D|| / ||D||``. The budget is relative to the float16 delta:
``bytes <= numel * 2 / target_ratio`` and/or ``bytes <= max_bytes``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .codecs import get_codec
from .codecs.base import EncodeInput, Encoded, matrix_view_shape
from .errors import CodecError, InvalidCodecParamsError


def default_candidates() -> list[tuple[str, dict[str, Any]]]:
    """A spread of settings from ~10x to ~500x: BitDelta, every DeltaDQ preset, DARE, top-k ternary."""
    from .codecs.deltadq import PRESETS

    out: list[tuple[str, dict[str, Any]]] = [
        ("bitdelta", {"granularity": "tensor"}),
        ("bitdelta", {"granularity": "row"}),
        ("bitdelta", {"granularity": "group", "group_size": 128}),
    ]
    out += [("deltadq", {"preset": name}) for name in PRESETS]
    out += [("dare", {"p": p}) for p in (0.9, 0.95, 0.99)]
    out += [("topk-ternary", {"density": d}) for d in (0.2, 0.1, 0.05, 0.02, 0.01, 0.005)]
    return out


def _budget(numel: int, target_ratio: float | None, max_bytes: int | None) -> float:
    budget = math.inf
    if target_ratio is not None:
        if isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float)) or not target_ratio > 0:
            raise InvalidCodecParamsError(f"target_ratio={target_ratio!r} must be a number > 0")
        budget = numel * 2 / float(target_ratio)
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise InvalidCodecParamsError(f"max_bytes={max_bytes!r} must be an integer >= 0")
        budget = min(budget, float(max_bytes))
    return budget


def relative_error(delta: torch.Tensor, approx: torch.Tensor, calibration: torch.Tensor | None) -> tuple[str, float]:
    """``("rel_output", ||X(D^-D)^T||/||XD^T||)`` if ``X`` fits the delta's columns, else ``("rel_l2", ...)``."""
    rows, cols = matrix_view_shape(delta.shape)
    d = delta.reshape(rows, cols).to(torch.float32)
    e = approx.reshape(rows, cols).to(torch.float32) - d
    if calibration is not None and calibration.shape[-1] == cols:
        x = calibration.reshape(-1, cols).to(torch.float32)
        num, den = float(torch.linalg.norm(x @ e.T)), float(torch.linalg.norm(x @ d.T))
        metric = "rel_output"
    else:
        num, den = float(torch.linalg.norm(e)), float(torch.linalg.norm(d))
        metric = "rel_l2"
    if den == 0.0:
        return metric, 0.0 if num == 0.0 else math.inf
    return metric, num / den


def choose(inp: EncodeInput, candidates: list[tuple[str, dict[str, Any]]], *, target_ratio: float | None = None,
           max_bytes: int | None = None, calibration: torch.Tensor | None = None,
           ) -> tuple[str, dict[str, Any], Encoded, dict[str, Any]]:
    """Encode ``inp`` with the candidate of lowest error whose stored bytes fit the budget.

    ``calibration`` (else ``inp.calibration``) is given to the codecs and used for the error.
    Returns ``(codec name, validated params, Encoded, report)``; the report lists every
    candidate's bytes, error (or why it was skipped) and the index of the chosen one.
    Raises :class:`CodecError` when no candidate fits, :class:`InvalidCodecParamsError` for
    a malformed candidate.
    """
    x = calibration if calibration is not None else inp.calibration
    if x is not inp.calibration:
        inp = dataclasses.replace(inp, calibration=x)
    delta = inp.delta
    shape = tuple(delta.shape)
    budget = _budget(delta.numel(), target_ratio, max_bytes)
    report: dict[str, Any] = {"budget_bytes": None if math.isinf(budget) else int(budget), "candidates": [],
                              "chosen": None, "metric": None}
    best: tuple[float, int, int, str, dict[str, Any], Encoded] | None = None
    for i, (name, params) in enumerate(candidates):
        codec = get_codec(name)
        validated = codec.validate_params(dict(params))
        row: dict[str, Any] = {"codec": name, "params": dict(params)}
        report["candidates"].append(row)
        predicted = codec.expected_nbytes(shape, validated)
        if predicted is not None and predicted > budget:
            row.update(bytes=predicted, skipped="over budget")
            continue
        try:
            enc = codec.encode(inp, validated)
            approx = codec.decode_delta(enc.tensors, enc.params, shape)
        except CodecError as exc:
            row["skipped"] = f"cannot code this tensor: {exc}"
            continue
        row["bytes"] = enc.nbytes
        if enc.nbytes > budget:
            row["skipped"] = "over budget"
            continue
        metric, err = relative_error(delta, approx, x)
        report["metric"] = metric
        row["error"] = err
        key = (err, enc.nbytes, i)
        if best is None or key < best[:3]:
            best = (err, enc.nbytes, i, name, validated, enc)
    if best is None:
        sizes = [r["bytes"] for r in report["candidates"] if "bytes" in r]
        smallest = f"; the smallest candidate takes {min(sizes)} bytes" if sizes else ""
        raise CodecError(
            f"tensor {inp.name!r}: no candidate fits the budget of {report['budget_bytes']} bytes{smallest}")
    report["chosen"] = best[2]
    return best[3], best[4], best[5], report
