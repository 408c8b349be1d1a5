"""The learned controller head: per-token pause/restart logits."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ControllerHead(nn.Module):
    """Per-block pause/restart logits from a token's own features and the class token's (global context).

    ``logits[b, k] = W_tok LN(x[b, k]) + W_ctx LN(x[b, cls]) + bias``. The context term changes every block,
    which is what lets a paused token (whose own features are frozen) be restarted later.
    """

    def __init__(self, dim: int, pause_bias: float, restart_bias: float) -> None:
        super().__init__()
        self.token = nn.Linear(dim, 2)
        self.context = nn.Linear(dim, 2, bias=False)
        nn.init.trunc_normal_(self.token.weight, std=0.02)
        nn.init.trunc_normal_(self.context.weight, std=0.02)
        with torch.no_grad():
            self.token.bias.copy_(torch.tensor([pause_bias, restart_bias]))

    def forward(self, x: torch.Tensor, num_prefix: int) -> torch.Tensor:
        normed = F.layer_norm(x, (x.shape[-1],))
        # context: the class token; models without one (Swin) use the mean token
        context = normed[:, :1] if num_prefix else normed.mean(dim=1, keepdim=True)
        # F.linear rather than the modules: the same ops, without two module calls per block (batch-1 latency)
        return (F.linear(normed[:, num_prefix:], self.token.weight, self.token.bias)
                + F.linear(context, self.context.weight))
