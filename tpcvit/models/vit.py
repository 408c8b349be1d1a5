"""TPC on timm's ``VisionTransformer`` (DeiT, incl. distilled): the ViT adapter of the TPC runtime.

The backbone is timm's own class, unchanged; :class:`TPCViT` supplies the runtime (:mod:`tpcvit.runtime`) with the
ViT geometry (one stage, prefix tokens) and how to run a block on a token selection: the masked full sequence
(training), the gathered top-k (budget), packed or padded active tokens (adaptive), or, with ``paused_keys``, the
selected queries against every token. State-dict keys of the backbone are exactly timm's, so a dense timm/DeiT
checkpoint loads (``tpcvit.load_backbone``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from ..layers import (
    block_forward,
    block_rows,
    check_timm_vit,
    context_block,
    context_rows,
    embed_tokens,
    image_grid,
    packed_selection_block,
    pool_rope,
    rope_rows,
    spread_rope,
    supports_packing,
)
from ..layers._timm import take_indices
from ..propagation import Propagation, TokenTrace, TPCConfig
from ..runtime import BlockStep, Stage, TPCRuntime
from ..tokens import (
    PackedSelection,
    TokenSelection,
    flat_index,
    masked_update,
    pool_paused,
    run_on_selection,
    scatter_rows,
    select_active,
    select_packed,
    select_topk,
    spread_paused,
    window_ids,
)
from ._builder import DEIT_SIZES, build_reducer, dense_name


class TPCViT(TPCRuntime):
    """The ViT family adapter (timm ``VisionTransformer`` and subclasses: DeiT, distilled, LV-ViT, patched)."""

    # the gathered rows of a group of blocks pass from block to block flattened, through the lean executors of
    # timm's ``Block`` (:func:`~tpcvit.layers.block_rows`); a family whose blocks run as modules says False
    flat_rows_between_blocks = True
    # paused tokens may be pooled into one key per window (``paused_key_pool``): their mean's position is in it
    pools_paused_keys = True

    @staticmethod
    def check_backbone(model: nn.Module, who: str) -> None:
        """A one-line error naming what ``model`` lacks for this family's adapter (``who``: TPC's patch)."""
        check_timm_vit(model, who, dynamic_ok=True)  # decisions are sized for each input's grid

    def _tpc_stages(self, images: torch.Tensor) -> list[Stage]:
        return [Stage(list(self.blocks), image_grid(self, images))]

    def _tpc_block_dims(self) -> list[int]:
        return [self.embed_dim] * len(self.blocks)

    def _tpc_embed(self, x: torch.Tensor) -> torch.Tensor:
        return embed_tokens(self, x)

    def _tpc_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return x, self.num_prefix_tokens

    def _tpc_check_forced(self, forced_active, batch: int, stages: list[Stage]) -> list[torch.Tensor] | None:
        if forced_active is None:
            return None
        n = stages[0].grid[0] * stages[0].grid[1]
        if forced_active.shape != (batch, len(self.blocks), n):
            raise ValueError(f"forced_active must be [B, depth, N] = {[batch, len(self.blocks), n]}")
        return [forced_active]

    def _tpc_dense_block(self, blk: nn.Module, x: torch.Tensor, seed_attention: bool,
                         rope: torch.Tensor | None = None):
        if seed_attention:  # seeds the scores of the first controlled block
            return self._tpc_exec_context(blk, x, x, None, rope, class_attention=True)
        return self._tpc_exec(blk, x, None, None, rope), None

    # -- how a block runs on rows of the buffer (a RoPE family overrides these two: tpcvit/models/eva.py) ------
    def _tpc_exec(self, blk: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor | None,
                  rope: torch.Tensor | None) -> torch.Tensor:
        """``blk`` on ``tokens`` ``[B, n, D]``: the buffer positions ``index`` ``[B, n]`` (prefix first; ``None``:
        the whole buffer), ``mask`` an additive key bias. Positions are in the tokens here (absolute embeddings)."""
        return block_forward(blk, tokens, mask)

    def _tpc_exec_context(self, blk: nn.Module, tokens: torch.Tensor, context: torch.Tensor,
                          index: torch.Tensor | None, rope: torch.Tensor | None, class_attention: bool = False,
                          key_bias: torch.Tensor | None = None, context_rope: torch.Tensor | None = None):
        """``blk`` updating ``tokens`` (buffer positions ``index``) while attending to ``context``, the whole
        buffer or the selection followed by pooled paused keys (:func:`~tpcvit.layers.context_block`);
        ``context_rope``: the rotary rows of ``context``'s patch tokens where they are not ``rope`` (pooled keys)."""
        return context_block(blk, tokens, context, class_attention=class_attention,
                             num_prefix=self.num_prefix_tokens, key_bias=key_bias)

    def _tpc_run_block(self, blk: nn.Module, x: torch.Tensor, step: BlockStep,
                       sel: TokenSelection | PackedSelection | None = None):
        """``sel``: the fast path's selection when already made (:meth:`_tpc_run_group`), else made here."""
        cfg, prefix, d = self.tpc_cfg, self.num_prefix_tokens, step.decision
        seen: dict[str, torch.Tensor] = {}
        if step.fast and sel is None:
            sel = self._tpc_selection(blk, x, step)
        pooled = cfg.paused_key_pool > 1 and not (step.fast and sel.full)  # pooled keys: never packed
        index = sel.index if step.fast and isinstance(sel, TokenSelection) else None  # rows' buffer positions

        def run(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            return self._tpc_exec(blk, tokens, mask, index, step.rope)

        if cfg.paused_keys and (step.fast or step.attention or pooled):  # selected tokens query the buffer
            context, means, counts, context_rope, pooled_rope = x, None, None, None, None
            window, rope = cfg.paused_key_pool, step.rope
            if pooled and not step.fast:  # every token's row, paused ones replaced by their window's mean
                context = self._pooled_buffer(x, d.states, step.grid)
                if rope is not None:  # (rotary positions: a paused token's key at its window's mean rotation)
                    context_rope = spread_rope(rope, 1.0 - d.states.to(rope.dtype), step.grid, window)
            elif pooled:
                means, counts = pool_paused(x[:, prefix:], ~d.active, step.grid, window)
                pooled_rope = None if rope is None else pool_rope(rope, ~d.active, step.grid, window)

            def run(tokens: torch.Tensor, mask: torch.Tensor | None, context=context,
                    context_rope=context_rope) -> torch.Tensor:
                bias = None  # the whole buffer: the padding of an adaptive selection are paused tokens, keys too
                if means is not None:  # the selected tokens and one key per window of paused tokens
                    context, bias = torch.cat([tokens, means], dim=1), self._pooled_bias(mask, tokens.shape[1], counts)
                    if pooled_rope is not None:
                        context_rope = torch.cat([rope_rows(rope, index, prefix), pooled_rope], dim=-2)
                if not step.attention:
                    return self._tpc_exec_context(blk, tokens, context, index, rope, key_bias=bias,
                                                  context_rope=context_rope)
                out, score = self._tpc_exec_context(blk, tokens, context, index, rope, class_attention=True,
                                                    key_bias=bias, context_rope=context_rope)
                seen["score"] = score if means is None else self._spread_score(score, sel.index, sel.valid, counts,
                                                                               step.grid)
                return out

        if not step.fast:
            return masked_update(run, x, d.states, prefix, mask_keys=not cfg.paused_keys), seen.get("score")
        if isinstance(sel, PackedSelection):
            x = packed_selection_block(blk, x, sel)
        else:
            x = run_on_selection(run, x, sel)
        return x, seen.get("score")

    def _pooled_buffer(self, x: torch.Tensor, states: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Masked path of ``paused_key_pool``: the buffer with each paused token replaced by the mean of its
        window's paused tokens. ``count`` equal keys get the attention of one key with bias ``log(count)``, so
        this is the fast path's pooled keys, computed on every token (differentiable in the states)."""
        prefix, paused = self.num_prefix_tokens, 1.0 - states.to(x.dtype)
        return torch.cat([x[:, :prefix], spread_paused(x[:, prefix:], paused, grid, self.tpc_cfg.paused_key_pool)],
                         dim=1)

    @staticmethod
    def _pooled_bias(key_bias: torch.Tensor | None, n: int, counts: torch.Tensor) -> torch.Tensor:
        """Attention bias ``[B, 1, 1, n + W]`` of n selected tokens (``key_bias`` hides padding) followed by the W
        windows' pooled paused keys: ``log(count)``, ``-inf`` for a window without paused tokens."""
        own = key_bias[:, 0, 0] if key_bias is not None else counts.new_zeros(counts.shape[0], n)
        return torch.cat([own, counts.log()], dim=1)[:, None, None, :]

    def _spread_score(self, score: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None,
                      counts: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Class attention over the compact keys (``score`` ``[B, n + W]``, times their number) -> relative
        attention ``[B, T]`` of every buffer token: a paused token gets its window's share, split over the window's
        paused tokens (what the masked path's equal keys get)."""
        prefix, window = self.num_prefix_tokens, self.tpc_cfg.paused_key_pool
        n = index.shape[1]
        total = grid[0] * grid[1] + prefix
        probs = score * (total / score.shape[1])
        share = (probs[:, n:] / counts.clamp_min(1.0)).index_select(1, window_ids(tuple(grid), window, score.device))
        full = F.pad(share, (prefix, 0))
        own = probs[:, :n] if valid is None else torch.where(valid, probs[:, :n], full.gather(1, index))
        return full.scatter(1, index, own)

    def _tpc_selection(self, blk: nn.Module, x: torch.Tensor, step: BlockStep) -> TokenSelection | PackedSelection:
        """The tokens a fast-path block computes (a :class:`PackedSelection`: packed adaptive execution,
        :func:`packed_selection_block`). Adaptive mode reads the number of active tokens on the host here: the
        forward's only host synchronisation, once per decision; budget mode has none."""
        d = step.decision
        if step.budget_selection:
            return select_topk(d.num_patches, step.budget_k, self.num_prefix_tokens, d.index,
                               None if d.index is not None else d.active)
        if (step.policy.packed and not self.tpc_cfg.paused_keys and not self.training and x.shape[0] > 1
                and supports_packing(blk)):
            packed = select_packed(d.active, self.num_prefix_tokens, x.dtype)
            return packed if packed is not None else TokenSelection(index=None, full=True)
        return select_active(d.active, self.num_prefix_tokens, x.dtype)

    def _tpc_run_group(self, blocks: list[nn.Module], x: torch.Tensor, steps: list[BlockStep]):
        """Blocks sharing one decision keep their tokens gathered: one gather for the group (and, with paused
        tokens masked, one scatter), instead of a gather and a scatter per block. With ``paused_keys`` the buffer
        is updated after every block (it is the next block's keys and values), the gather still happens once;
        with pooled paused keys (``paused_key_pool``) the windows' means are the keys the selection does not hold,
        pooled once for the group (paused tokens do not change), and the buffer is written once.
        A group of one block (deciding in every block) runs here too: the fewest ops per gathered selection."""
        if not steps[0].fast:  # masked path: per block
            return super()._tpc_run_group(blocks, x, steps)
        sel = self._tpc_selection(blocks[0], x, steps[0])  # one selection (one host sync if adaptive) per group
        if (not self.flat_rows_between_blocks or isinstance(sel, PackedSelection) or sel.full
                or sel.valid is not None):  # per block: module-run blocks; packed, full or padded selections
            seen = None
            for blk, step in zip(blocks, steps):
                # a later block packing cannot run (not a plain timm Block) makes its own padded selection
                same = not isinstance(sel, PackedSelection) or supports_packing(blk)
                x, score = self._tpc_run_block(blk, x, step, sel if same else None)
                seen = score if score is not None else seen
            return x, seen
        # the selected rows go from block to block flattened (no reshapes in between: batch-1 latency); with paused
        # keys they are written into the flattened buffer (the next block's keys and values) after every block
        b, t, d = x.shape
        cfg, prefix = self.tpc_cfg, self.num_prefix_tokens
        rows, keys, seen = flat_index(sel.index, t), cfg.paused_keys, None
        flat = x.reshape(b * t, d)
        tokens = flat.index_select(0, rows)
        pooled = keys and cfg.paused_key_pool > 1
        if pooled:
            means, counts = pool_paused(x[:, prefix:], ~steps[0].decision.active, steps[0].grid, cfg.paused_key_pool)
            bias = self._pooled_bias(None, sel.index.shape[1], counts)
        for blk, step in zip(blocks, steps):
            if pooled:
                context = torch.cat([tokens.view(b, -1, d), means], dim=1).reshape(-1, d)
                out = context_rows(blk, tokens, context, b, step.attention, prefix, key_bias=bias)
                if step.attention:
                    tokens, seen = out[0], self._spread_score(out[1], sel.index, None, counts, steps[0].grid)
                else:
                    tokens = out
                continue
            if not keys:
                tokens = block_rows(blk, tokens, b)
            elif step.attention:
                tokens, seen = context_rows(blk, tokens, flat, b, class_attention=True, num_prefix=prefix)
            else:
                tokens = context_rows(blk, tokens, flat, b)
            if keys:
                flat = scatter_rows(flat, rows, tokens)
        return (flat if keys and not pooled else scatter_rows(flat, rows, tokens)).view(b, t, d), seen

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False,
                              attn_mask=None, is_causal: bool = False):
        """timm's ``forward_intermediates`` (the features of chosen blocks: dense prediction, timm's
        ``features_only``) with TPC's token propagation: every patch token is in every block's output, a paused
        one with the features it was paused with, so a feature map stays whole. Arguments and outputs as timm's."""
        if attn_mask is not None or is_causal:
            raise NotImplementedError("TPC models make their own attention masks; attn_mask/is_causal unsupported")
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        taps = dict.fromkeys(take_indices(len(self.blocks), indices))
        final, _ = self._propagate(x, with_trace=False, taps=taps, stop_early=stop_early)
        prefix, (h, w) = self.num_prefix_tokens, image_grid(self, x)
        kept = [self.norm(t) if norm else t for t in taps.values()]
        prefixes = [t[:, :prefix] for t in kept] if prefix else None
        maps = [t[:, prefix:] for t in kept]
        if output_fmt == "NCHW":
            maps = [t.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for t in maps]
        if output_dict:
            out = {"image_intermediates": maps}
            if prefixes is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefixes
            if not intermediates_only:
                out["image_features"] = final
            return out
        if return_prefix_tokens and prefixes is not None:
            maps = list(zip(maps, prefixes))
        return maps if intermediates_only else (final, maps)

    def _tpc_finish(self, x: torch.Tensor, props: list[Propagation], with_trace: bool):
        return self.norm(x), props[0].trace(self.tpc_cfg.start_layer, self.num_prefix_tokens) if with_trace else None

    def gmacs_per_image(self, trace: TokenTrace) -> torch.Tensor:
        from ..flops import vit_gmacs_from_trace

        return vit_gmacs_from_trace(self, trace)


class TPCVisionTransformer(TPCViT, VisionTransformer):
    """timm ``VisionTransformer`` with token propagation control."""

    def __init__(self, *args, tpc_cfg: TPCConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_tpc(tpc_cfg or TPCConfig())


class TPCVisionTransformerDistilled(TPCViT, VisionTransformerDistilled):
    """timm DeiT distilled (class + distillation token) with token propagation control."""

    def __init__(self, *args, tpc_cfg: TPCConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_tpc(tpc_cfg or TPCConfig())


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------
def create_tpc_vit(variant: str, pretrained: bool = False, distilled: bool = False, **kwargs) -> nn.Module:
    """Build a TPC ViT. ``kwargs`` mix timm ViT arguments and :class:`TPCConfig` fields; ``pretrained=True``
    loads the dense DeiT's weights (timm's hub cache) into the backbone."""
    tpc_cfg = TPCConfig.pop_from(kwargs)
    cls = TPCVisionTransformerDistilled if distilled else TPCVisionTransformer
    return build_reducer(cls, variant, pretrained, kwargs, dense_name(variant), distilled, tpc_cfg=tpc_cfg)


def _deit(size: str, distilled: bool, pretrained: bool, kwargs: dict) -> nn.Module:
    name = f"tpc_deit_{size}{'_distilled' if distilled else ''}_patch16_224"
    return create_tpc_vit(name, pretrained, distilled=distilled, **{**DEIT_SIZES[size], **kwargs})


@register_model
def tpc_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> TPCVisionTransformer:
    """DeiT-Tiny (5.7M, 1.26 GMACs dense) with TPC."""
    return _deit("tiny", False, pretrained, kwargs)


@register_model
def tpc_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> TPCVisionTransformer:
    """DeiT-Small (22M, 4.60 GMACs dense) with TPC."""
    return _deit("small", False, pretrained, kwargs)


@register_model
def tpc_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> TPCVisionTransformer:
    """DeiT-Base (86M, 17.6 GMACs dense) with TPC."""
    return _deit("base", False, pretrained, kwargs)


@register_model
def tpc_deit_tiny_distilled_patch16_224(pretrained: bool = False, **kwargs) -> TPCVisionTransformerDistilled:
    """DeiT-Tiny distilled (class + distillation token) with TPC."""
    return _deit("tiny", True, pretrained, kwargs)


@register_model
def tpc_deit_small_distilled_patch16_224(pretrained: bool = False, **kwargs) -> TPCVisionTransformerDistilled:
    """DeiT-Small distilled with TPC."""
    return _deit("small", True, pretrained, kwargs)


@register_model
def tpc_deit_base_distilled_patch16_224(pretrained: bool = False, **kwargs) -> TPCVisionTransformerDistilled:
    """DeiT-Base distilled with TPC."""
    return _deit("base", True, pretrained, kwargs)
