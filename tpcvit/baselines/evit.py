"""EViT-style token reorganisation (Liang et al., 2022), our implementation on timm's ViT.

At three blocks (4, 7 and 10 of 12; scaled for other depths), after attention, the patch tokens are ranked by the
attention the class token pays them (mean over heads); the top ``ceil(keep_rate * n)`` stay and the rest are
*fused* into one token (their mean, weighted by that attention), which then goes on like a patch token. The MLP of
that block and every later block run on the reduced set: the token count shrinks geometrically, the shapes stay
static (every image the same cost). Dropped tokens are gone for good, which is the contrast with TPC's restart.

Budget knob ``keep_rate`` in (0, 1]: more = more compute.
"""

from __future__ import annotations

import math

import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from ..layers import class_row_attention
from ..tokens import take_rows
from .common import PeerMixin, PeerTrace, RotaryPeer, create_peer, reduction_blocks


def keep_topk_fuse(x: torch.Tensor, score: torch.Tensor, k: int, fuse: bool = True) -> torch.Tensor:
    """Keep the ``k`` highest-``score`` tokens of ``x`` ``[B, n, D]`` (``score`` ``[B, n]``) in their original
    order, and append the score-weighted mean of the others as one fused token. Pure function."""
    n = x.shape[1]
    if k >= n:
        return x
    order = score.argsort(dim=1, descending=True)
    top = order[:, :k].sort(dim=1).values
    kept = take_rows(x, top)
    if not fuse:
        return kept
    rest = order[:, k:]
    w = score.gather(1, rest)[..., None]
    others = take_rows(x, rest)
    fused = (w * others).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
    return torch.cat([kept, fused], dim=1)


class EViTPeer(PeerMixin):
    """EViT's attentive-token selection and inattentive-token fusion, on any backbone the peer hooks run (a timm
    ViT, or an Eva: kept tokens keep their rotary rows, the fused token gets their attention-weighted mean)."""

    method = "evit"
    reads_class_token = True
    budget_bounds = (0.01, 1.0)

    def _setup_peer(self, keep_rate: float = 0.7, fuse_token: bool = True,
                    evit_blocks: tuple[int, ...] | None = None) -> None:
        self.fuse_token = fuse_token
        self.evit_blocks = list(evit_blocks) if evit_blocks is not None else reduction_blocks(len(self.blocks))
        self._init_peer(keep_rate)

    def _reorganise_block(self, blk, x: torch.Tensor, positions: torch.Tensor | None):
        """Attention, then keep the top tokens by the class token's attention and fuse the rest, then the MLP on the
        reduced set (the lean executor at inference, timm's modules in training)."""
        p = self.num_prefix_tokens
        keep = math.ceil(self.budget * (x.shape[1] - p))
        x, q, k = self._peer_attention(blk, x, positions)
        cls_attn = class_row_attention(q, k)[:, p:]  # [B, n]: the class row alone, not the whole map
        x = torch.cat([x[:, :p], keep_topk_fuse(x[:, p:], cls_attn, keep, self.fuse_token)], dim=1)
        if positions is not None:
            positions = keep_topk_fuse(positions, cls_attn.to(positions.dtype), keep, self.fuse_token)
        return self._peer_mlp(blk, x), positions

    def _run(self, x: torch.Tensor, path: str | None = None) -> tuple[torch.Tensor, PeerTrace]:
        x, positions = self._peer_embed(x)
        n, p = self.patch_embed.num_patches, self.num_prefix_tokens
        keep = []
        for i, blk in enumerate(self.blocks):
            keep.append((x.shape[1] - p) / n)
            if i in self.evit_blocks and self.budget < 1.0:
                x, positions = self._reorganise_block(blk, x, positions)
            else:
                x = self._peer_block(blk, x, positions)
        return self.norm(x), PeerTrace(keep=x.new_tensor(keep).expand(x.shape[0], -1))


class EViTVisionTransformer(EViTPeer, VisionTransformer):
    """timm ``VisionTransformer`` with EViT's attentive-token selection and inattentive-token fusion."""


class EViTEva(RotaryPeer, EViTPeer):
    """EViT on a timm ``Eva`` (converted in place by :func:`~tpcvit.baselines.as_peer`)."""


@register_model
def evit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> EViTVisionTransformer:
    """DeiT-Tiny with EViT token reorganisation (``keep_rate``)."""
    return create_peer(EViTVisionTransformer, "tiny", pretrained, kwargs)


@register_model
def evit_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> EViTVisionTransformer:
    """DeiT-Small with EViT token reorganisation."""
    return create_peer(EViTVisionTransformer, "small", pretrained, kwargs)


@register_model
def evit_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> EViTVisionTransformer:
    """DeiT-Base with EViT token reorganisation."""
    return create_peer(EViTVisionTransformer, "base", pretrained, kwargs)
