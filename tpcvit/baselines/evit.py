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

from ..layers import (
    attention_output,
    attention_parts,
    attention_with_class_row,
    block_forward,
    embed_tokens,
    mlp_half,
)
from .common import PeerMixin, PeerTrace, create_peer, reduction_blocks


def keep_topk_fuse(x: torch.Tensor, score: torch.Tensor, k: int, fuse: bool = True) -> torch.Tensor:
    """Keep the ``k`` highest-``score`` tokens of ``x`` ``[B, n, D]`` (``score`` ``[B, n]``) in their original
    order, and append the score-weighted mean of the others as one fused token. Pure function."""
    n = x.shape[1]
    if k >= n:
        return x
    order = score.argsort(dim=1, descending=True)
    top = order[:, :k].sort(dim=1).values
    kept = x.gather(1, top[..., None].expand(-1, -1, x.shape[-1]))
    if not fuse:
        return kept
    rest = order[:, k:]
    w = score.gather(1, rest)[..., None]
    others = x.gather(1, rest[..., None].expand(-1, -1, x.shape[-1]))
    fused = (w * others).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
    return torch.cat([kept, fused], dim=1)


class EViTVisionTransformer(PeerMixin, VisionTransformer):
    """timm ``VisionTransformer`` with EViT's attentive-token selection and inattentive-token fusion."""

    method = "evit"
    budget_bounds = (0.01, 1.0)

    def __init__(self, *args, keep_rate: float = 0.7, fuse_token: bool = True,
                 evit_blocks: tuple[int, ...] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fuse_token = fuse_token
        self.evit_blocks = list(evit_blocks) if evit_blocks is not None else reduction_blocks(len(self.blocks))
        self._init_peer(keep_rate)

    def _reorganise_block(self, blk, x: torch.Tensor) -> torch.Tensor:
        attn, p = blk.attn, self.num_prefix_tokens
        n = x.shape[1] - p
        keep = math.ceil(self.budget * n)
        if not self.training:  # fused attention, the class row alone, lean blocks: timed as TPC's blocks are
            x, cls_attn = attention_with_class_row(blk, x, p)
            x = torch.cat([x[:, :p], keep_topk_fuse(x[:, p:], cls_attn, keep, self.fuse_token)], dim=1)
            return mlp_half(blk, x)
        q, k, v = attention_parts(attn, blk.norm1(x))
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # explicit: we need the class row
        x = x + blk.drop_path1(blk.ls1(attention_output(attn, weights @ v)))
        cls_attn = weights[:, :, 0, p:].mean(dim=1)  # [B, n]
        x = torch.cat([x[:, :p], keep_topk_fuse(x[:, p:], cls_attn, keep, self.fuse_token)], dim=1)
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def _run(self, x: torch.Tensor, path: str | None = None) -> tuple[torch.Tensor, PeerTrace]:
        x = embed_tokens(self, x)
        n, p = self.patch_embed.num_patches, self.num_prefix_tokens
        keep = []
        for i, blk in enumerate(self.blocks):
            keep.append((x.shape[1] - p) / n)
            x = self._reorganise_block(blk, x) if i in self.evit_blocks and self.budget < 1.0 else block_forward(blk, x)
        return self.norm(x), PeerTrace(keep=x.new_tensor(keep).expand(x.shape[0], -1))



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
