"""DynamicViT-style token sparsification (Rao et al., 2021), our implementation on timm's ViT.

Before each of three stage blocks (4, 7 and 10 of 12; scaled for other depths, or ``dvit_blocks``), a light
*prediction module* scores every still-kept patch token: ``LN -> Linear(D, D) -> GELU`` splits into a local half
and a global half (the policy-weighted mean of the global half over the kept tokens), their concatenation goes
through an MLP ``D -> D/2 -> D/4 -> 2`` to log-probabilities (keep, drop).

Training (masked path): hard keep decisions by straight-through Gumbel-softmax, multiplied into the running policy
(a dropped token stays dropped), dropped tokens masked out of attention as keys and carried unchanged; the
*keep-ratio loss* pulls the kept share after stage s towards ``keep_rate ** s`` (weight ``train.alpha_budget``).
Inference (fast path): at stage s the ``round(keep_rate ** s * N)`` tokens with the highest keep probability stay
and the others are removed from the sequence for good (static shapes, real speed).

DynamicViT also distils the teacher's last-layer token features on the kept tokens; our harness distils logits only
(DeiT-style, the same for every method), so that term is left out. Budget knob ``keep_rate`` in (0, 1]: more =
more compute.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from ..tokens import masked_update, take_rows
from .common import PeerMixin, PeerTrace, RotaryPeer, create_peer, reduction_blocks


class KeepPredictor(nn.Module):
    """DynamicViT's prediction module: per-token (keep, drop) log-probabilities from local + global features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                  nn.Linear(dim // 4, 2))

    def forward(self, tokens: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``[B, n, D]``, ``policy`` ``[B, n]`` (1 = kept) -> log-probabilities ``[B, n, 2]``."""
        h = self.embed(tokens)
        half = h.shape[-1] // 2
        local, glob = h[..., :half], h[..., half:]
        w = policy[..., None].to(h.dtype)
        glob = (glob * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return self.head(torch.cat([local, glob.expand(-1, local.shape[1], -1)], dim=-1)).log_softmax(dim=-1)


class DynamicViTPeer(PeerMixin):
    """DynamicViT's learned, permanent, hierarchical token dropping, on any backbone the peer hooks run (a timm ViT,
    or an Eva: each kept token keeps its own rotary row)."""

    method = "dynamicvit"
    added_modules = ("predictors",)

    def _setup_peer(self, keep_rate: float = 0.7, dvit_blocks: tuple[int, ...] | None = None) -> None:
        depth = len(self.blocks)
        self.dvit_blocks = sorted(dvit_blocks) if dvit_blocks is not None else reduction_blocks(depth)
        if not all(1 <= i < depth for i in self.dvit_blocks):
            raise ValueError(f"dvit_blocks must lie in [1, {depth - 1}], got {self.dvit_blocks}")
        self.predictors = nn.ModuleList(KeepPredictor(self.embed_dim) for _ in self.dvit_blocks)
        self.budget_bounds = (1.0 / self.patch_embed.num_patches, 1.0)
        self._init_peer(keep_rate)

    def _kept(self, stage: int) -> int:
        n = self.patch_embed.num_patches
        return max(1, min(n, round(self.budget ** stage * n)))

    def _run(self, x: torch.Tensor, path: str | None = None) -> tuple[torch.Tensor, PeerTrace]:
        x, positions = self._peer_embed(x)
        b, p, n = x.shape[0], self.num_prefix_tokens, self.patch_embed.num_patches
        fast = (not self.training) if path is None else path == "fast"
        sample = self.training and not fast
        reduce = self.budget < 1.0 or sample
        policy = x.new_ones(b, n)  # masked path: 1 = kept
        alive = torch.arange(n, device=x.device).expand(b, n)  # fast path: original positions of the tokens left
        actives, ratios = [], []
        for i, blk in enumerate(self.blocks):
            if reduce and i in self.dvit_blocks:
                stage = self.dvit_blocks.index(i)
                if fast:
                    logp = self.predictors[stage](x[:, p:], x.new_ones(b, x.shape[1] - p))
                    k = self._kept(stage + 1)
                    if k < x.shape[1] - p:
                        keep = logp[..., 0].topk(k, dim=1).indices.sort(dim=1).values
                        x = torch.cat([x[:, :p], take_rows(x[:, p:], keep)], dim=1)
                        alive, positions = alive.gather(1, keep), take_rows(positions, keep)
                else:
                    logp = self.predictors[stage](x[:, p:], policy)
                    if sample:
                        policy = F.gumbel_softmax(logp, hard=True)[..., 0] * policy
                    else:
                        score = logp[..., 0].masked_fill(policy <= 0.5, float("-inf"))
                        top = score.topk(self._kept(stage + 1), dim=1).indices
                        policy = torch.zeros_like(policy).scatter_(1, top, 1.0) * policy
                    ratios.append(policy.mean(dim=1))
            if fast:
                x = self._peer_block(blk, x, positions)
                actives.append(torch.zeros(b, n, dtype=torch.bool, device=x.device).scatter_(1, alive, True))
            else:
                x = masked_update(lambda t, m, blk=blk, rows=positions: self._peer_block(blk, t, rows, m),
                                  x, policy, p)
                actives.append(policy.detach() > 0.5)
        active = torch.stack(actives, dim=1)
        extras = {"kept_share": torch.stack(ratios, dim=1) if ratios else x.new_zeros(b, 0)}
        return self.norm(x), PeerTrace(keep=active.float().mean(dim=2), active=active, extras=extras)


    def reduction_parameters(self) -> list[nn.Parameter]:
        return list(self.predictors.parameters())

    def reduction_loss(self, trace: PeerTrace, train_cfg: dict) -> dict[str, torch.Tensor]:
        kept = trace.extras["kept_share"]  # [B, stages]
        if kept.shape[1] == 0:
            zero = trace.keep.new_zeros((), dtype=torch.float32)
            return {"ratio": zero, "total": zero}
        targets = kept.new_tensor([self.budget ** (s + 1) for s in range(kept.shape[1])])
        ratio = ((kept - targets) ** 2).mean()
        return {"ratio": ratio, "total": train_cfg["alpha_budget"] * ratio}


class DynamicViTVisionTransformer(DynamicViTPeer, VisionTransformer):
    """timm ``VisionTransformer`` with DynamicViT's learned, permanent, hierarchical token dropping."""


class DynamicViTEva(RotaryPeer, DynamicViTPeer):
    """DynamicViT on a timm ``Eva`` (converted in place by :func:`~tpcvit.baselines.as_peer`)."""


@register_model
def dynamicvit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> DynamicViTVisionTransformer:
    """DeiT-Tiny with DynamicViT token sparsification (``keep_rate``, ``dvit_blocks``)."""
    return create_peer(DynamicViTVisionTransformer, "tiny", pretrained, kwargs)


@register_model
def dynamicvit_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> DynamicViTVisionTransformer:
    """DeiT-Small with DynamicViT token sparsification."""
    return create_peer(DynamicViTVisionTransformer, "small", pretrained, kwargs)


@register_model
def dynamicvit_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> DynamicViTVisionTransformer:
    """DeiT-Base with DynamicViT token sparsification."""
    return create_peer(DynamicViTVisionTransformer, "base", pretrained, kwargs)


__all__ = ["DynamicViTEva", "DynamicViTPeer", "DynamicViTVisionTransformer", "KeepPredictor"]
