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

import contextlib

import torch
import torch.nn as nn
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer

from ..propagation import ControllerHead, Propagation, TokenTrace, TPCConfig, TPCHooks
from ..stabilizer import TokenGridStabilizer
from ..tokens import flat_index
from .vit import check_images


@contextlib.contextmanager
def output_projection_deferred(attn: nn.Module):
    """timm's ``WindowAttention`` ends with its output projection; inside this context it returns the heads'
    output instead, so the projection (a per-token linear, which commutes with window reverse and shift) can run
    on the active tokens only."""
    proj = attn.proj
    attn.proj = nn.Identity()
    try:
        yield proj
    finally:
        attn.proj = proj


def sparse_swin_block(blk: nn.Module, x: torch.Tensor, active: torch.Tensor,
                      index: torch.Tensor | None = None) -> torch.Tensor:
    """A timm ``SwinTransformerBlock`` (eval) where only ``active`` ``[B, H*W]`` tokens are updated.

    Window attention sees every token (keys/values); output projection, residual, LayerNorm and MLP run on the
    active tokens only. ``index`` ``[B, k]`` (budget mode: the kept positions of each image) replaces the
    ``nonzero`` of ``active``, which keeps every shape static (ONNX export, compilers).
    """
    b, h, w, c = x.shape
    if (index.shape[1] == h * w) if index is not None else bool(active.all()):
        return blk(x)
    with output_projection_deferred(blk.attn) as proj:
        heads = blk._attn(blk.norm1(x))
    flat = x.reshape(b * h * w, c)
    idx = flat_index(index, h * w) if index is not None else active.reshape(-1).nonzero().squeeze(1)
    tokens = flat.index_select(0, idx) + proj(heads.reshape(b * h * w, c).index_select(0, idx))
    tokens = tokens + blk.mlp(blk.norm2(tokens))
    return flat.index_copy(0, idx, tokens).view(b, h, w, c)


def upsample_tokens(t: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """``[B, L, H*W]`` per-token values -> ``[B, L, H0*W0]`` on a finer grid (nearest: each token's area)."""
    fh, fw = target[0] // grid[0], target[1] // grid[1]
    b, blocks = t.shape[:2]
    up = t.reshape(b, blocks, grid[0], grid[1]).repeat_interleave(fh, dim=2).repeat_interleave(fw, dim=3)
    return up.reshape(b, blocks, target[0] * target[1])


class TPCSwinTransformer(TPCHooks, SwinTransformer):
    """timm ``SwinTransformer`` with token propagation control in every block from ``start_layer`` on."""

    def __init__(self, *args, tpc_cfg: TPCConfig | None = None, **kwargs) -> None:
        if kwargs.get("dynamic_img_size"):
            raise ValueError("TPC Swin needs a fixed token grid: create it without dynamic_img_size=True")
        super().__init__(*args, **kwargs)
        cfg = tpc_cfg or TPCConfig()
        self.block_list = [blk for stage in self.layers for blk in stage.blocks]
        depth = len(self.block_list)
        if cfg.start_layer >= depth:
            raise ValueError(f"start_layer={cfg.start_layer} must be < depth={depth}")
        if cfg.controller != "learned":  # attention / hybrid read a class token Swin does not have
            raise ValueError("Swin's TPC has the learned controller only (its windows have no class token to read "
                             "attention from): drop controller=")
        self.tpc_cfg = cfg
        self.controller = nn.ModuleList(
            ControllerHead(self.block_list[i].dim, cfg.pause_bias_init, cfg.restart_bias_init)
            for i in range(cfg.start_layer, depth))
        self.stabilizers = nn.ModuleDict(
            {str(i): TokenGridStabilizer(self.block_list[i].dim) for i in cfg.stabilized_blocks(depth)})
        self.tpc_mode, self.tpc_keep = "adaptive", None
        self.tpc_force_pause = self.tpc_force_restart = None

    # ------------------------------------------------------------------------------------------------------
    def _propagate(self, x: torch.Tensor, forced_active: list | None = None, path: str | None = None,
                   with_trace: bool = True) -> tuple[torch.Tensor, TokenTrace | None]:
        check_images(self, x)
        cfg, mode = self.tpc_cfg, self.tpc_mode
        if path not in (None, "fast", "masked"):
            raise ValueError(f"path must be None, 'fast' or 'masked', got {path!r}")
        fast = (not self.training) if path is None else path == "fast"
        if forced_active is not None and len(forced_active) != len(self.block_list):
            raise ValueError(f"forced_active must list one [B, H*W] bool tensor per block ({len(self.block_list)})")
        x = self.patch_embed(x)  # [B, H, W, C]
        top = tuple(x.shape[1:3])
        g, stage_traces = 0, []
        for stage in self.layers:
            x = stage.downsample(x)
            b, h, w, c = x.shape
            n = len(stage.blocks)
            forced = None if forced_active is None else torch.stack(forced_active[g:g + n], dim=1)
            prop = Propagation(cfg, mode, self.tpc_keep, b, h * w, (h, w), x.device,
                               sample=self.training and not fast, forced_active=forced,
                               force_pause=self.tpc_force_pause, force_restart=self.tpc_force_restart,
                               record=with_trace)
            for j, blk in enumerate(stage.blocks):
                if str(g) in self.stabilizers:
                    x = self.stabilizers[str(g)](x.reshape(b, h * w, c), 0, (h, w)).view(b, h, w, c)
                if mode == "dense" or g < cfg.start_layer:
                    x = blk(x)
                    prop.dense_block()
                else:
                    states, active = prop.step(j, self.controller[g - cfg.start_layer](x.reshape(b, h * w, c), 0))
                    if fast:
                        x = sparse_swin_block(blk, x, active, prop.topk_index)
                    else:
                        s = states.to(x.dtype).view(b, h, w, 1)
                        x = s * blk(x) + (1.0 - s) * x
                g += 1
            stage_traces.append(prop.trace(0, 0))
        return self.norm(x), self._merge_traces(stage_traces, top) if with_trace else None

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

    # ------------------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._propagate(x, with_trace=False)[0]

    def forward(self, x: torch.Tensor, return_trace: bool = False):
        if return_trace:
            return self.forward_with_trace(x)
        return self.forward_head(self.forward_features(x))

    def forward_with_trace(self, x: torch.Tensor, forced_active: list | None = None,
                           path: str | None = None) -> tuple[torch.Tensor, TokenTrace]:
        """Logits and the trace; ``forced_active``: one ``[B, H_l*W_l]`` bool tensor per block."""
        feats, trace = self._propagate(x, forced_active, path)
        return self.forward_head(feats), trace

    def gmacs_per_image(self, trace: TokenTrace) -> torch.Tensor:
        """Dense GMACs (FLOP counter, cached) minus the projection + LayerNorm + MLP work of each paused token."""
        from ..flops import count_gmacs

        if not hasattr(self, "_dense_gmacs"):
            mode = self.tpc_mode
            self.tpc_mode = "dense"
            try:
                self._dense_gmacs = count_gmacs(self, torch.zeros(1, *self._input_shape(), device=trace.active.device))
            finally:
                self.tpc_mode = mode
        saved = torch.zeros(trace.active.shape[0], dtype=torch.float64, device=trace.active.device)
        g = 0
        for t in trace.stages:
            for j in range(t.active.shape[1]):
                blk = self.block_list[g]
                per_token = blk.mlp.fc1.in_features * blk.mlp.fc1.out_features * 2 + blk.attn.proj.in_features ** 2
                saved += (~t.active[:, j]).sum(dim=1).double() * per_token
                g += 1
        controlled = 0 if self.tpc_mode == "dense" else sum(
            self.block_list[i].dim * 2 * t for i, t in self._controlled_tokens())
        return self._dense_gmacs - saved / 1e9 + controlled / 1e9

    def _controlled_tokens(self):
        """(block index, tokens) of the controlled blocks (controller head cost)."""
        sizes = []
        h, w = self.patch_embed.grid_size
        for s, stage in enumerate(self.layers):
            if s > 0:
                h, w = h // 2, w // 2
            sizes += [h * w] * len(stage.blocks)
        return [(i, sizes[i]) for i in range(self.tpc_cfg.start_layer, len(self.block_list))]

    def _input_shape(self) -> tuple[int, int, int]:
        from .vit import image_geometry

        return image_geometry(self)


def _swin(name: str, pretrained: bool, arch: dict, kwargs: dict) -> TPCSwinTransformer:
    from .vit import build_reducer

    tpc_cfg = TPCConfig.pop_from(kwargs)
    model = build_reducer(TPCSwinTransformer, name, pretrained, {**arch, **kwargs}, name.removeprefix("tpc_"),
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
