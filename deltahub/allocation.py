"""Model-level byte allocation: which codec setting each tensor gets so the *whole delta* fits a budget.

Every tensor the policy leaves to ``auto`` is encoded with each candidate setting, giving a
curve of ``(stored bytes, distortion)`` points. The distortion of a point is the tensor's
error energy under the auto metric (:func:`deltahub.autoselect.relative_error`): the squared
relative error times the delta's energy ``||D||^2``, so that tensors are compared in one unit
(a tensor whose fine-tune moved more, or whose error is larger, costs more). With calibration
inputs the relative error is measured on the layer's outputs, the weighting stays ``||D||^2``.

The total ``sum(distortion)`` is minimised subject to ``sum(bytes) <= budget`` as a knapsack
solved by marginal analysis (the Lagrangian relaxation; Shoham & Gersho 1988): every tensor
starts at its smallest point, and upgrades along each curve's lower convex hull are taken in
order of distortion saved per byte while they fit; leftover bytes then buy any single upgrade
that still fits. The result is optimal for budgets that fall on the hull and within one
upgrade of it otherwise.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import CodecError


@dataclass(frozen=True)
class Point:
    """One candidate setting of one tensor: its codec, params, stored bytes and distortion."""

    codec: str
    params: dict[str, Any]
    nbytes: int
    distortion: float
    #: The auto metric's relative error and its name (informative: recorded in the manifest's stats).
    error: float = 0.0
    label: str = ""
    metric: str = ""
    #: ``||D||`` and ``||D_hat - D||`` (the manifest's ``delta_l2`` / ``error_l2`` stats), when measured.
    delta_l2: float | None = None
    error_l2: float | None = None


@dataclass
class Curve:
    """The candidate points of one tensor (any order; dominated points are ignored)."""

    name: str
    numel: int
    points: list[Point] = field(default_factory=list)

    def frontier(self) -> list[Point]:
        """Points that are not dominated (fewer bytes or lower distortion than every other), by bytes."""
        out: list[Point] = []
        for p in sorted(self.points, key=lambda p: (p.nbytes, p.distortion)):
            if not out or p.distortion < out[-1].distortion:
                out.append(p)
        return out


def _hull(front: list[Point]) -> list[Point]:
    """The lower convex hull of a frontier (bytes ascending, distortion descending)."""
    hull: list[Point] = []
    for p in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a -> p: drop it
            if (b.distortion - a.distortion) * (p.nbytes - a.nbytes) >= (p.distortion - a.distortion) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(curves: list[Curve], budget: float) -> dict[str, Point]:
    """The point per tensor that minimises total distortion with total bytes ``<= budget``.

    Raises :class:`CodecError` when even the smallest point of every tensor does not fit.
    """
    fronts = {c.name: c.frontier() for c in curves}
    for c in curves:
        if not fronts[c.name]:
            raise CodecError(f"tensor {c.name!r}: no candidate could code it")
    choice = {name: f[0] for name, f in fronts.items()}
    used = sum(p.nbytes for p in choice.values())
    if used > budget:
        raise CodecError(f"the smallest setting of every tensor takes {used} bytes, more than the budget of "
                         f"{int(budget)} bytes for the coded tensors; raise the budget (a lower --target-ratio)")
    hulls = {name: _hull(f) for name, f in fronts.items()}
    pos = dict.fromkeys(hulls, 0)
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        h, i = hulls[name], pos[name]
        if i + 1 < len(h):
            gain = (h[i].distortion - h[i + 1].distortion) / max(h[i + 1].nbytes - h[i].nbytes, 1)
            heapq.heappush(heap, (-gain, name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], pos[name]
        extra = h[i + 1].nbytes - h[i].nbytes
        if used + extra > budget:
            continue  # this tensor's later upgrades cost more per unit gained: stop it here
        used += extra
        pos[name] = i + 1
        choice[name] = h[i + 1]
        push(name)
    return _fill(fronts, choice, budget - used)


def _fill(fronts: dict[str, list[Point]], choice: dict[str, Point], left: float) -> dict[str, Point]:
    """Spend leftover bytes on the single off-hull upgrades that save most distortion per byte."""
    while True:
        best: tuple[float, str, Point] | None = None
        for name, front in fronts.items():
            cur = choice[name]
            for p in front:
                extra = p.nbytes - cur.nbytes
                if 0 < extra <= left and p.distortion < cur.distortion:
                    gain = (cur.distortion - p.distortion) / extra
                    if best is None or gain > best[0]:
                        best = (gain, name, p)
        if best is None:
            return choice
        _, name, p = best
        left -= p.nbytes - choice[name].nbytes
        choice[name] = p


def total(choice: dict[str, Point]) -> tuple[int, float]:
    """``(bytes, distortion)`` of an allocation."""
    return sum(p.nbytes for p in choice.values()), math.fsum(p.distortion for p in choice.values())
