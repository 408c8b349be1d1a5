"""IdleViT-style token idling (Xu et al., 2023), our implementation on timm's ViT: the closest prior art to TPC.

From block ``idle_start`` on, every block computes only the ``k = round(keep_rate * N)`` patch tokens with the
highest *class-attention score*; the others stay *idle* (passed to the block's output unchanged) and may be selected
again by any later block. No token is dropped for good, and nothing is learned for the selection: this is the
"paused tokens can come back" idea without a learned controller.

The score of a token is the class token's attention to it (mean over heads) times the number of keys it competed
with (1.0 = uniform attention), taken from the last block that computed the token: computed tokens refresh their
score every block, idle ones keep theirs, so an idle token is selected again as soon as the computed ones fall
below it. The block before ``idle_start`` runs dense and seeds every score.

Training (masked path): full sequence, idle tokens masked out as keys (-inf bias) and carried unchanged, plus the
*token cut loss*: a normalised graph cut on the (symmetrised, head-averaged) patch-to-patch attention of each
block, between the tokens the next block selects and the rest, so attention separates what will be computed from
what idles. Inference (fast path): gather the k tokens, run the block, scatter back (static shapes).

Budget knob ``keep_rate`` in (0, 1]: the same share of patch tokens in every controlled block; more = more compute.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from ..tokens import masked_update, run_on_selection, select_topk, take_rows
from .common import PeerMixin, PeerTrace, RotaryPeer, create_peer, reduction_blocks


def token_cut_loss(weights: torch.Tensor, visible: torch.Tensor, selected: torch.Tensor, num_prefix: int,
                   eps: float = 1e-6) -> torch.Tensor:
    """Normalised cut ``cut(S, I) / assoc(S) + cut(S, I) / assoc(I)`` on the patch-to-patch attention.

    ``weights`` ``[B, H, T, T]`` attention of one block; ``visible`` ``[B, N]`` the patch tokens that took part in
    it; ``selected`` ``[B, N]`` the tokens the next block computes (S); I = visible and not selected. Mean over
    the batch. Pure function.
    """
    p = num_prefix
    a = weights[:, :, p:, p:].mean(dim=1)
    vis = visible.to(a.dtype)
    a = 0.5 * (a + a.transpose(1, 2)) * vis[:, :, None] * vis[:, None, :]
    s = (selected & visible).to(a.dtype)
    i = (~selected & visible).to(a.dtype)
    cut = torch.einsum("bn,bnm,bm->b", s, a, i)
    degree = a.sum(dim=2)
    return (cut / (degree * s).sum(1).clamp_min(eps) + cut / (degree * i).sum(1).clamp_min(eps)).mean()


class IdleViTPeer(PeerMixin):
    """Blocks compute only the top-k tokens by class attention, the rest idle; on any backbone the peer hooks run
    (a timm ViT, or an Eva: each selected token attends with its own rotary row)."""

    method = "idlevit"
    reads_class_token = True

    def _setup_peer(self, keep_rate: float = 0.5, idle_start: int | None = None,
                    token_cut_weight: float = 0.1) -> None:
        depth = len(self.blocks)
        self.idle_start = reduction_blocks(depth)[0] if idle_start is None else int(idle_start)
        if not 1 <= self.idle_start < depth:
            raise ValueError(f"idle_start must be in [1, {depth - 1}] (the block before it seeds the scores), "
                             f"got {self.idle_start}")
        self.token_cut_weight = float(token_cut_weight)
        self.budget_bounds = (1.0 / self.patch_embed.num_patches, 1.0)
        self._init_peer(keep_rate)

    def _run(self, x: torch.Tensor, path: str | None = None) -> tuple[torch.Tensor, PeerTrace]:
        x, positions = self._peer_embed(x)
        b, p, n = x.shape[0], self.num_prefix_tokens, self.patch_embed.num_patches
        fast = (not self.training) if path is None else path == "fast"
        k = max(1, min(n, round(self.budget * n)))
        reduce = k < n
        need_weights = reduce and not fast and self.training and self.token_cut_weight > 0
        everyone = torch.ones(b, n, dtype=torch.bool, device=x.device)
        actives, cuts = [], []
        score, last_map = None, None  # last_map: (attention weights, tokens that took part) for the token cut
        for i, blk in enumerate(self.blocks):
            if not reduce or i < self.idle_start - 1:
                x = self._peer_block(blk, x, positions)
                actives.append(everyone)
                continue
            if i == self.idle_start - 1:  # last dense block: its class attention seeds every score
                x, cls_attn, w = self._peer_attend(blk, x, positions, need_weights=need_weights)
                score = (cls_attn[:, p:] * x.shape[1]).detach()
                last_map = (w, everyone)
                actives.append(everyone)
                continue
            top = score.topk(k, dim=1, sorted=False).indices
            active = torch.zeros_like(everyone).scatter_(1, top, True)
            if last_map is not None and last_map[0] is not None:
                cuts.append(token_cut_loss(last_map[0], last_map[1], active, p))
            seen: dict[str, torch.Tensor | None] = {}
            rows = take_rows(positions, top) if fast else positions  # rotary rows of the tokens the block runs on

            def run(tokens: torch.Tensor, mask: torch.Tensor | None, blk=blk, seen=seen, rows=rows) -> torch.Tensor:
                out, seen["cls"], seen["w"] = self._peer_attend(blk, tokens, rows, mask, need_weights)
                return out

            if fast:
                x = run_on_selection(run, x, select_topk(active.shape[1], k, p, index=top))
                score = score.scatter(1, top, seen["cls"][:, p:] * (p + k))
            else:
                x = masked_update(run, x, active.to(x.dtype), p)
                score = torch.where(active, seen["cls"][:, p:] * (p + k), score)
            score = score.detach()
            last_map = (seen["w"], active)
            actives.append(active)
        active = torch.stack(actives, dim=1)
        cut = torch.stack(cuts).mean() if cuts else x.new_zeros(())
        return self.norm(x), PeerTrace(keep=active.float().mean(dim=2), active=active, extras={"token_cut": cut})


    def reduction_loss(self, trace: PeerTrace, train_cfg: dict) -> dict[str, torch.Tensor]:
        cut = trace.extras["token_cut"]
        return {"token_cut": cut, "total": self.token_cut_weight * cut}


class IdleViTVisionTransformer(IdleViTPeer, VisionTransformer):
    """timm ``VisionTransformer`` whose blocks compute only the top-k tokens by class attention; the rest idle."""


class IdleViTEva(RotaryPeer, IdleViTPeer):
    """IdleViT on a timm ``Eva`` (converted in place by :func:`~tpcvit.baselines.as_peer`)."""


@register_model
def idlevit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> IdleViTVisionTransformer:
    """DeiT-Tiny with IdleViT token idling (``keep_rate``, ``idle_start``)."""
    return create_peer(IdleViTVisionTransformer, "tiny", pretrained, kwargs)


@register_model
def idlevit_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> IdleViTVisionTransformer:
    """DeiT-Small with IdleViT token idling."""
    return create_peer(IdleViTVisionTransformer, "small", pretrained, kwargs)


@register_model
def idlevit_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> IdleViTVisionTransformer:
    """DeiT-Base with IdleViT token idling."""
    return create_peer(IdleViTVisionTransformer, "base", pretrained, kwargs)


__all__ = ["IdleViTEva", "IdleViTPeer", "IdleViTVisionTransformer", "token_cut_loss"]
