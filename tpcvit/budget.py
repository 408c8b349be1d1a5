"""The single budget knob of every token reducer (TPC and each peer), and matching it to a GMACs target.

Every reducer implements the same protocol: ``budget_bounds`` ``(lo, hi)``, ``budget_raises_compute`` (the
direction) and ``set_budget(value)`` (TPC: budget mode with ``keep = value``; ToMe: tokens merged per block; ...).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .flops import measured_gmacs
from .layers import unwrap


def knob_bounds(model: nn.Module) -> tuple[float, float, bool]:
    """``(lo, hi, raises_compute)`` of the model's budget knob."""
    m = unwrap(model)
    lo, hi = m.budget_bounds
    return lo, hi, m.budget_raises_compute


def set_knob(model: nn.Module, value: float) -> None:
    unwrap(model).set_budget(value)


def match_gmacs(model: nn.Module, images: torch.Tensor, target_gmacs: float, iters: int = 18) -> tuple[float, float]:
    """Bisect the knob until ``measured_gmacs(model, images)`` is closest to ``target_gmacs``.

    Returns ``(knob, measured_gmacs)``. The measured GMACs are a monotone step function of the knob; the best
    point seen is kept (for adaptive methods on untrained weights the steps can be coarse: check the result).
    """
    lo, hi, raises = knob_bounds(model)
    best = (float("inf"), hi, 0.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        set_knob(model, mid)
        g = measured_gmacs(model, images)
        best = min(best, (abs(g - target_gmacs), mid, g))
        if (g < target_gmacs) == raises:
            lo = mid
        else:
            hi = mid
    set_knob(model, best[1])
    return best[1], best[2]
