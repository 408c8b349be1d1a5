"""TPC on timm's Swin Transformer (Swin-T/S): the hierarchical adapter.

How paused tokens meet (shifted) window attention and patch merging, and where the saving comes from:

- **Window attention runs on every token.** A paused token stays in its window as a key and value (its frozen
  features are still good context for its active neighbours) and the window shapes stay static, so shifted
  windows and their masks work unchanged. What a paused token skips is *its own update*: the attention output
  projection, the residual, LayerNorm and the MLP. Those are 9C^2 of the ~12C^2 + window-attention MACs per
  token, so the ceiling is ~71% of a block's work saved at keep 0.
- **Real saving**: the fast path gathers the active tokens of the whole batch into one flat list, runs the
  output projection, LayerNorm and MLP on exactly those, and scatters them back (no padding at all: all three
  are per-token).
- **Patch merging** sees the full buffer, where every paused token holds its last features, so merging is
  exactly timm's. Merged tokens are new tokens: each stage starts with every token active and its own
  controller state (smoothing on that stage's grid, EMA reset).
- **Trace**: per stage at its own resolution (``trace.stages``), and for convenience all blocks upsampled to the
  first stage's grid (``trace.active`` ``[B, depth, H0*W0]``), which is what the analysis and the maps use.

The training path is the masked form of the same math: the block runs on all tokens and a paused token's output
is replaced by its input, ``x' = s * block(x) + (1 - s) * x``; for fixed decisions both paths are equal.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer

from ..layers import check_images, sparse_swin_block, upsample_tokens
from ..layers._timm import take_indices
from ..propagation import Propagation, TokenTrace, TPCConfig
from ..runtime import BlockStep, Stage, TPCRuntime
from ._builder import build_reducer, dense_name


class TPCSwinTransformer(TPCRuntime, SwinTransformer):
    """timm ``SwinTransformer`` with token propagation control in every block from ``start_layer`` on."""

    def __init__(self, *args, tpc_cfg: TPCConfig | None = None, **kwargs) -> None:
        if kwargs.get("dynamic_img_size"):
            raise ValueError("TPC Swin needs a fixed token grid: create it without dynamic_img_size=True")
        super().__init__(*args, **kwargs)
        cfg = tpc_cfg or TPCConfig()
        if cfg.controller != "learned":  # attention / hybrid read a class token Swin does not have
            raise ValueError("Swin's TPC has the learned controller only (its windows have no class token to read "
                             "attention from): drop controller=")
        if cfg.paused_keys:
            raise ValueError("Swin's paused tokens always stay keys/values of their window (window attention runs "
                             "on every token): drop paused_keys=")
        self._init_tpc(cfg)

    @property
    def block_list(self) -> list[nn.Module]:
        return [blk for stage in self.layers for blk in stage.blocks]

    # -- the runtime's hooks -------------------------------------------------------------------------------
    def _tpc_stages(self, images: torch.Tensor) -> list[Stage]:
        return [Stage(list(stage.blocks), tuple(stage.output_resolution), stage.downsample) for stage in self.layers]

    def _tpc_block_dims(self) -> list[int]:
        return [blk.dim for blk in self.block_list]

    def _tpc_embed(self, x: torch.Tensor) -> torch.Tensor:
        check_images(self, x)
        return self.patch_embed(x)  # [B, H, W, C]

    def _tpc_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        b, h, w, c = x.shape
        return x.reshape(b, h * w, c), 0

    def _tpc_restore(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return tokens.view(like.shape)

    def _tpc_check_forced(self, forced_active, batch: int, stages: list[Stage]) -> list[torch.Tensor] | None:
        if forced_active is None:
            return None
        if len(forced_active) != len(self.block_list):
            raise ValueError(f"forced_active must list one [B, H*W] bool tensor per block ({len(self.block_list)})")
        out, g = [], 0
        for stage in self.layers:
            out.append(torch.stack(list(forced_active[g:g + len(stage.blocks)]), dim=1))
            g += len(stage.blocks)
        return out

    def _tpc_run_block(self, blk: nn.Module, x: torch.Tensor, step: BlockStep):
        d = step.decision
        if step.fast:
            return sparse_swin_block(blk, x, d.active, d.index), None
        b, h, w, _ = x.shape
        s = d.states.to(x.dtype).view(b, h, w, 1)
        return s * blk(x) + (1.0 - s) * x, None

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's ``forward_intermediates`` (each chosen stage's output map: detection / segmentation necks) with
        TPC: a paused token is in its stage's map with the features it was paused with. Arguments as timm's."""
        if output_fmt != "NCHW":
            raise ValueError(f"Swin's intermediates are NCHW maps, got output_fmt={output_fmt!r}")
        stages = take_indices(len(self.layers), indices)
        ends = [sum(len(s.blocks) for s in self.layers[:i + 1]) - 1 for i in range(len(self.layers))]
        taps = {ends[i]: None for i in stages}
        final, _ = self._propagate(x, with_trace=False, taps=taps, stop_early=stop_early)
        last = len(self.layers) - 1
        maps = [(self.norm(t) if norm and i == last else t).permute(0, 3, 1, 2).contiguous()
                for i, t in zip(stages, taps.values())]
        return maps if intermediates_only else (final, maps)

    def _tpc_finish(self, x: torch.Tensor, props: list[Propagation], with_trace: bool):
        if len(props) < len(self.layers):  # stopped early (forward_intermediates): the norm fits the last stage only
            return x, None
        if not with_trace:
            return self.norm(x), None
        top = tuple(self.patch_embed.grid_size)
        return self.norm(x), self._merge_traces([p.trace(0, 0) for p in props], top)

    def _merge_traces(self, traces: list[TokenTrace], top: tuple[int, int]) -> TokenTrace:
        def cat(field: str) -> torch.Tensor:
            return torch.cat([upsample_tokens(getattr(t, field), t.grid, top) for t in traces], dim=1)

        states = [upsample_tokens(t.states, t.grid, top) for t in traces if t.states.shape[1]]
        b = traces[0].active.shape[0]
        return TokenTrace(
            active=cat("active"), pause_prob=cat("pause_prob"), restart_prob=cat("restart_prob"),
            pause_prob_raw=cat("pause_prob_raw"), restart_prob_raw=cat("restart_prob_raw"),
            active_prob=cat("active_prob"),
            states=torch.cat(states, dim=1) if states else torch.ones(b, 0, top[0] * top[1]),
            start_layer=self.tpc_cfg.start_layer, num_prefix=0, grid=top, stages=traces)

    def gmacs_per_image(self, trace: TokenTrace) -> torch.Tensor:
        from ..flops import swin_gmacs_from_trace

        return swin_gmacs_from_trace(self, trace)


def _swin(name: str, pretrained: bool, arch: dict, kwargs: dict) -> TPCSwinTransformer:
    tpc_cfg = TPCConfig.pop_from(kwargs)
    model = build_reducer(TPCSwinTransformer, name, pretrained, {**arch, **kwargs}, dense_name(name),
                          tpc_cfg=tpc_cfg)
    if not pretrained:
        model.pretrained_cfg["crop_pct"] = 0.9
    return model


@register_model
def tpc_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> TPCSwinTransformer:
    """Swin-T (28M, 4.5 GMACs dense) with TPC."""
    arch = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _swin("tpc_swin_tiny_patch4_window7_224", pretrained, arch, kwargs)


@register_model
def tpc_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs) -> TPCSwinTransformer:
    """Swin-S (50M, 8.7 GMACs dense) with TPC."""
    arch = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _swin("tpc_swin_small_patch4_window7_224", pretrained, arch, kwargs)
