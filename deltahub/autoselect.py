"""Pick, per tensor, the codec setting with the lowest error that fits a size budget.

Every candidate ``(codec name, params)`` is encoded (unless its data-independent size already
exceeds the budget), decoded, and scored; the lowest error wins, fewer bytes break ties. The
budget is relative to the float16 delta: ``bytes <= numel * 2 / target_ratio`` and/or
``bytes <= max_bytes``.

Errors are measured on ``Y = X D^T`` (the delta's effect on the layer's calibration inputs ``X``)
when those are known, else on ``D`` itself (``X = I``). With ``E`` the same for ``D_hat - D``:

* ``metric="rel"``: the relative error ``||E|| / ||Y||`` (``rel_output`` / ``rel_l2``).
* ``metric="aligned"`` (default): split ``E = beta Y + E_perp`` (``beta = <E, Y> / ||Y||^2``) and
  score ``sqrt(beta^2 + NOISE_WEIGHT * ||E_perp||^2 / ||Y||^2)`` (``aligned_output`` /
  ``aligned_l2``). Losing part of the delta along its own direction (BitDelta's and top-k's
  shrinkage) costs fully; error orthogonal to it (the unbiased noise of random drop-and-rescale)
  costs ``NOISE_WEIGHT`` as much. Why: the delta's direction is where the fine-tune's loss is
  sensitive, while isotropic noise mostly falls where it is not. On the real pair the plain
  relative error ranks codecs against their measured KL (it prefers top-k ternary, whose KL is
  10-60x worse than DeltaDQ's at the same bytes); this score ranks them like the KL
  (benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .codecs import get_codec
from .codecs.base import Encoded, EncodeInput, matrix_view_shape
from .errors import CodecError, InvalidCodecParamsError
from .policy import is_vocabulary_matrix


def default_candidates() -> list[tuple[str, dict[str, Any]]]:
    """A spread of settings from ~10x to ~500x: BitDelta, every DeltaDQ preset, DARE, top-k ternary
    (for :func:`choose`; compress's allocation uses :func:`model_candidates`)."""
    from .codecs.deltadq import PRESETS

    out: list[tuple[str, dict[str, Any]]] = [
        ("bitdelta", {"granularity": "tensor"}),
        ("bitdelta", {"granularity": "row"}),
        ("bitdelta", {"granularity": "group", "group_size": 128}),
    ]
    out += [("deltadq", {"preset": name}) for name in PRESETS]
    out += [("dare", {"p": p}) for p in (0.9, 0.95, 0.99)]
    out += [("topk-ternary", {"density": d}) for d in (0.2, 0.1, 0.05, 0.02, 0.01, 0.005)]
    out += lowrank_candidates()
    return out


#: Matrices at most this large also get ``raw`` (exact) as an allocation candidate.
RAW_CANDIDATE_MAX_NUMEL = 1 << 20


def model_candidates(name: str, shape: tuple[int, ...]) -> list[tuple[str, dict[str, Any]]]:
    """The whole-model allocation's candidates for one tensor (``name`` for codecs meant for some tensors).

    Vectors (norms, biases: ~0.1% of a model's bytes) stay exact. Matrices get a DeltaDQ ladder
    from ~8x to ~512x of their fp16 delta (the presets; DeltaDQ had 12x lower KL than BitDelta at
    the same bytes on the real pair), BitDelta with row scales, the low-rank family for block matrices
    (row-sparse settings for vocabulary matrices instead), and ``raw`` when small.
    """
    from .codecs.deltadq import PRESETS

    if len(shape) < 2:
        return [("raw", {})]
    out: list[tuple[str, dict[str, Any]]] = [("deltadq", {"p": 0.5, "bits": 4, "parts": 2})]
    out += [("deltadq", {"preset": n}) for n in PRESETS]
    out.append(("bitdelta", {"granularity": "row"}))
    if is_vocabulary_matrix(name):  # rows are tokens: row-sparse 1-bit rows won at 1/16 and 1/128 (benchmarks/vocab.md)
        from .codecs.rowsparse import PRESETS as ROW_PRESETS

        out += [("rowsparse", {"preset": n}) for n in ROW_PRESETS]
    else:
        out += lowrank_candidates()
    if math.prod(shape) <= RAW_CANDIDATE_MAX_NUMEL:
        out.append(("raw", {}))
    return out


def lowrank_candidates() -> list[tuple[str, dict[str, Any]]]:
    """Low-rank settings for block matrices: fp16 factors at ranks 4 and 16, Delta-CoMe mixed precision at
    the bytes of ranks 4 and 8, and rank 4 + 1-bit residual (at most 46 singular triplets: one cheap SVD per
    matrix). compress measures them only on matrices whose spectrum is concentrated enough for them to
    compete (``compression.LOWRANK_GATE_ENERGY``)."""
    out: list[tuple[str, dict[str, Any]]] = [("lowrank", {"rank": r}) for r in (4, 16)]
    out += [("lowrank-mp", {"preset": n}) for n in ("r4", "r8")]
    out.append(("lowrank-residual", {"rank": 4}))
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


#: Weight of the error orthogonal to the delta relative to the error along it (``metric="aligned"``);
#: set by measurement on the real pair: with it the codecs' scores order like their measured KL.
NOISE_WEIGHT = 0.005
METRICS = ("aligned", "rel")


def check_metric(metric: str) -> None:
    """Raise :class:`InvalidCodecParamsError` unless ``metric`` is one of :data:`METRICS`."""
    if metric not in METRICS:
        raise InvalidCodecParamsError(f"auto metric {metric!r} is not one of {', '.join(METRICS)}")


def relative_error(delta: torch.Tensor, approx: torch.Tensor, calibration: torch.Tensor | None,
                   metric: str = "rel") -> tuple[str, float]:
    """``(metric name, error)`` of ``approx`` against ``delta``; see the module docstring for the metrics.

    ``calibration`` is used when its width matches the delta's columns (``*_output``), else
    the delta itself is compared (``*_l2``).
    """
    check_metric(metric)
    rows, cols = matrix_view_shape(delta.shape)
    y = delta.reshape(rows, cols).to(torch.float32)
    e = approx.reshape(rows, cols).to(torch.float32) - y
    space = "l2"
    if calibration is not None and calibration.shape[-1] == cols:
        x = calibration.reshape(-1, cols).to(torch.float32)
        y, e, space = x @ y.T, x @ e.T, "output"
    yy, ee = float((y * y).sum()), float((e * e).sum())
    return error_from_sums(yy, ee, float((e * y).sum()) if metric != "rel" else 0.0, metric, space)


def error_from_sums(yy: float, ee: float, ey: float, metric: str, space: str = "l2") -> tuple[str, float]:
    """``(metric name, error)`` from ``Σy²``, ``Σe²`` and ``Σe·y`` (``y`` the delta or its outputs, ``e`` the
    error): what :func:`relative_error` computes, also usable with sums a codec knows without decoding."""
    if yy == 0.0:
        return f"{metric}_{space}", 0.0 if ee == 0.0 else math.inf
    if metric == "rel":
        return f"rel_{space}", math.sqrt(ee / yy)
    beta = ey / yy
    perp = max(ee / yy - beta * beta, 0.0)
    return f"aligned_{space}", math.sqrt(beta * beta + NOISE_WEIGHT * perp)


def choose(inp: EncodeInput, candidates: list[tuple[str, dict[str, Any]]], *, target_ratio: float | None = None,
           max_bytes: int | None = None, calibration: torch.Tensor | None = None, metric: str = "aligned",
           ) -> tuple[str, dict[str, Any], Encoded, dict[str, Any]]:
    """Encode ``inp`` with the candidate of lowest error whose stored bytes fit the budget.

    ``calibration`` (else ``inp.calibration``) is given to the codecs and used for the error;
    ``metric`` is ``"aligned"`` or ``"rel"`` (module docstring).
    Returns ``(codec name, validated params, Encoded, report)``; the report lists every
    candidate's bytes, error (or why it was skipped) and the index of the chosen one.
    Raises :class:`CodecError` when no candidate fits, :class:`InvalidCodecParamsError` for
    a malformed candidate.
    """
    check_metric(metric)
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
        report["metric"], err = relative_error(delta, approx, x, metric)
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
