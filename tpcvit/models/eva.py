"""TPC on timm's ``Eva`` (EVA-02, DINOv3, RoPE ViTs, Perception Encoder): the RoPE adapter of the ViT family.

An ``Eva`` is a pre-norm ViT whose positions are not in its tokens: every block rotates queries and keys by a
rotary table of the patch grid. Everything TPC does on a ViT (one stage, prefix tokens, budget / adaptive / paused
keys, the training-free controller) carries over; what changes is how one block runs on a selection of the buffer:
the selected rows bring their rows of the rotary table (:func:`~tpcvit.layers.rope_rows`), and paused tokens seen as
keys keep their own positions (:func:`~tpcvit.layers.eva_context_block`). The tables are made once per forward with
the embedding, as timm's ``Eva.forward_features`` makes them.

Paused keys are per token by default. Pooled ones (``paused_key_pool > 1``, opt-in) are rotated by the mean of
their window's paused tokens' table rows (:func:`~tpcvit.layers.pool_rope`): a rotation is linear in its sin/cos
table, so that is the mean of the pooled key rotated to each paused token's position. It lets the same GMACs compute
about 1.5x more tokens (benchmarks/results/rope_key_pool.md); what it does to accuracy no trained rotary model here
has measured, hence not the default.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import check_timm_eva, eva_context_block, eva_embed, rope_rows
from ..propagation import TokenTrace
from .vit import TPCViT


class TPCEva(TPCViT):
    """TPC on a timm ``Eva`` (converted in place by ``tpcvit.patch`` / ``tpcvit.with_tpc``)."""

    flat_rows_between_blocks = False  # its blocks run as timm modules, each with its selection's rotary rows
    # patch's default: per-token paused keys (pooled ones, opt-in, are rotated by their window's mean rotation: an
    # approximation whose accuracy no trained rotary model here has measured)
    pools_paused_keys = False

    @staticmethod
    def check_backbone(model: nn.Module, who: str) -> None:
        check_timm_eva(model, who, dynamic_ok=True)  # the rotary tables follow each input's grid

    def _tpc_embed(self, x: torch.Tensor) -> torch.Tensor:
        return self._tpc_embed_positions(x)[0]

    def _tpc_embed_positions(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        x, rope = eva_embed(self, x)
        if rope is None:
            return x, None
        # depth-dependent RoPE: one [heads, N, C] table per block; else one [N, C] table shared by every block
        return x, list(rope.unbind(0)) if getattr(self, "rope_mixed", False) else [rope] * len(self.blocks)

    def _tpc_exec(self, blk: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor | None,
                  rope: torch.Tensor | None) -> torch.Tensor:
        return blk(tokens, rope=rope_rows(rope, index, self.num_prefix_tokens), attn_mask=mask)

    def _tpc_exec_context(self, blk: nn.Module, tokens: torch.Tensor, context: torch.Tensor,
                          index: torch.Tensor | None, rope: torch.Tensor | None, class_attention: bool = False,
                          key_bias: torch.Tensor | None = None, context_rope: torch.Tensor | None = None):
        prefix = self.num_prefix_tokens
        return eva_context_block(blk, tokens, context, rope_rows(rope, index, prefix),
                                 rope if context_rope is None else context_rope, prefix,
                                 class_attention=class_attention, key_bias=key_bias)

    def gmacs_per_image(self, trace: TokenTrace) -> torch.Tensor:
        """As a ViT's, with the head (pooling, attention pool, classifier) counted on the final tokens."""
        from ..flops import head_macs, vit_gmacs_from_trace

        return vit_gmacs_from_trace(self, trace, head_macs=head_macs(self, trace.active.shape[2]))
