"""The one protocol every token reducer implements: TPC (every family, and models given TPC by ``tpcvit.patch``)
and each peer method. The engine, the harness and the evidence runner see models only through it."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class TokenReducer(Protocol):
    """``method``: its name in the harness. The budget knob: ``budget_bounds`` ``(lo, hi)``,
    ``budget_raises_compute`` (the direction) and ``set_budget(value)``. ``adaptive``: cost differs per image.
    ``added_modules``: modules absent from dense weights. ``forward_with_trace`` gives ``(logits, trace)``;
    ``reduction_loss(trace, train_cfg)`` the method's own training loss (``{"total": ...}``);
    ``gmacs_per_image(trace)`` the work each image really cost; ``reduction_parameters`` what the method adds."""

    method: str
    budget_raises_compute: bool
    added_modules: tuple[str, ...]

    @property
    def budget_bounds(self) -> tuple[float, float]: ...

    @property
    def adaptive(self) -> bool: ...

    def set_budget(self, value: float) -> None: ...

    def forward_with_trace(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]: ...

    def reduction_parameters(self) -> list[nn.Parameter]: ...

    def reduction_loss(self, trace: Any, train_cfg: dict) -> dict[str, torch.Tensor]: ...

    def gmacs_per_image(self, trace: Any) -> torch.Tensor: ...


def reducers(model: nn.Module) -> list[nn.Module]:
    """Token reducers inside ``model`` (TPC or a peer; also through DDP / wrappers)."""
    return [m for m in model.modules() if isinstance(m, TokenReducer)]
