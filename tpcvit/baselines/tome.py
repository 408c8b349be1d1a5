"""ToMe-style token merging (Bolya et al., 2023), our implementation on timm's ViT.

Training-free: in every block, after attention, the patch tokens are split alternately into sets A and B, each A
token is matched to its most similar B token (cosine similarity of the attention keys, averaged over heads), and
the ``r`` best-matched A tokens are merged into their partners by a size-weighted average. Token sizes are kept,
and attention is *proportional* (keys weighted by their size, ``+ log size`` on the logits), so a merged token
counts as the tokens it stands for. Prefix tokens (class / distillation) are never merged.

Budget knob ``r``: mean number of tokens merged per block (fractional values spread the merges over the blocks);
more ``r`` = less compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from ..tokens import take_rows
from .common import PeerMixin, PeerTrace, RotaryPeer, create_peer


@dataclass
class MergePlan:
    """Which A tokens stay (``keep``), which merge (``src``) and into which B token (``dst``); all ``[B, *]``."""

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def bipartite_plan(metric: torch.Tensor, r: int) -> MergePlan:
    """Bipartite soft matching on ``metric`` ``[B, N, C]``: merge the ``r`` A tokens most similar to a B token.

    A = even positions, B = odd positions; ``r`` is clipped to ``|A|``. Pure function, no model knowledge.
    """
    metric = F.normalize(metric, dim=-1)
    a, b = metric[:, 0::2], metric[:, 1::2]
    r = max(0, min(r, a.shape[1], b.shape[1]))
    if r == 0:  # nothing to merge (or nothing left to merge into)
        keep = torch.arange(a.shape[1], device=a.device).expand(a.shape[0], -1)
        empty = keep[:, :0]
        return MergePlan(keep=keep, src=empty, dst=empty)
    best, dst = (a @ b.transpose(1, 2)).max(dim=-1)  # [B, |A|]
    order = best.argsort(dim=-1, descending=True)
    src = order[:, :r]
    return MergePlan(keep=order[:, r:], src=src, dst=dst.gather(1, src))


def merge_weighted(x: torch.Tensor, size: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``plan`` to tokens ``x`` ``[B, N, D]`` with sizes ``size`` ``[B, N, 1]``: size-weighted means.

    Returns ``(x', size')`` with ``N - r`` tokens: the unmerged A tokens, then the B tokens (merged into).
    """
    d = x.shape[-1]
    xa, xb = (x * size)[:, 0::2], (x * size)[:, 1::2]
    sa, sb = size[:, 0::2], size[:, 1::2]
    keep_x, keep_s = take_rows(xa, plan.keep), take_rows(sa, plan.keep)
    xb = xb.scatter_add(1, plan.dst[..., None].expand(-1, -1, d), take_rows(xa, plan.src))
    sb = sb.scatter_add(1, plan.dst[..., None], take_rows(sa, plan.src))
    new_size = torch.cat([keep_s, sb], dim=1)
    return torch.cat([keep_x, xb], dim=1) / new_size, new_size


def merge_schedule(r: float, blocks: int) -> list[int]:
    """Spread ``round(r * blocks)`` merges over ``blocks`` blocks as evenly as possible (earlier blocks first)."""
    total = round(r * blocks)
    base, extra = divmod(total, blocks)
    return [base + (1 if i < extra else 0) for i in range(blocks)]


class ToMePeer(PeerMixin):
    """ToMe token merging in every block, on any backbone the peer hooks run (a timm ViT, or an Eva: a merged
    token's rotary rows are the size-weighted mean of its members', :class:`RotaryPeer`)."""

    method = "tome"
    budget_raises_compute = False

    def _setup_peer(self, tome_r: float = 0.0) -> None:
        n = self.patch_embed.num_patches
        self.budget_bounds = (0.0, n / 2)
        self._init_peer(tome_r)

    def _block(self, blk, x: torch.Tensor, size: torch.Tensor, r: int, positions: torch.Tensor | None):
        p = self.num_prefix_tokens
        bias = size.squeeze(-1).log()[:, None, None, :]  # proportional attention
        # timm's modules in training; at inference the lean executor TPC's blocks run on (same result)
        x, _, k = self._peer_attention(blk, x, positions, bias)
        if r > 0:  # the metric: the keys attention compares (rotated, on a rotary model)
            plan = bipartite_plan(k[:, :, p:].mean(dim=1), r)
            patches, psize = merge_weighted(x[:, p:], size[:, p:], plan)
            if positions is not None:
                positions = merge_weighted(positions, size[:, p:].to(positions.dtype), plan)[0]
            x, size = torch.cat([x[:, :p], patches], dim=1), torch.cat([size[:, :p], psize], dim=1)
        return self._peer_mlp(blk, x), size, positions

    def _run(self, x: torch.Tensor, path: str | None = None) -> tuple[torch.Tensor, PeerTrace]:
        x, positions = self._peer_embed(x)
        b, t, _ = x.shape
        n, p = self.patch_embed.num_patches, self.num_prefix_tokens
        size = x.new_ones(b, t, 1)
        keep = []
        for blk, r in zip(self.blocks, merge_schedule(self.budget, len(self.blocks))):
            keep.append((x.shape[1] - p) / n)
            x, size, positions = self._block(blk, x, size, r, positions)
        return self.norm(x), PeerTrace(keep=x.new_tensor(keep).expand(b, -1))


class ToMeVisionTransformer(ToMePeer, VisionTransformer):
    """timm ``VisionTransformer`` with ToMe token merging in every block."""


class ToMeEva(RotaryPeer, ToMePeer):
    """ToMe on a timm ``Eva`` (converted in place by :func:`~tpcvit.baselines.as_peer`)."""



@register_model
def tome_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> ToMeVisionTransformer:
    """DeiT-Tiny with ToMe merging (``tome_r`` tokens per block)."""
    return create_peer(ToMeVisionTransformer, "tiny", pretrained, kwargs)


@register_model
def tome_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> ToMeVisionTransformer:
    """DeiT-Small with ToMe merging."""
    return create_peer(ToMeVisionTransformer, "small", pretrained, kwargs)


@register_model
def tome_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> ToMeVisionTransformer:
    """DeiT-Base with ToMe merging."""
    return create_peer(ToMeVisionTransformer, "base", pretrained, kwargs)


__all__ = ["MergePlan", "ToMeEva", "ToMePeer", "ToMeVisionTransformer", "bipartite_plan", "merge_schedule",
           "merge_weighted"]
