"""TPC on timm's ``VisionTransformer`` (DeiT, incl. distilled): the ViT adapter.

The backbone is timm's own class, unchanged; :class:`TPCViTMixin` replaces ``forward_features`` by the token
propagation loop and adds the controller heads and the stabilizer. State-dict keys of the backbone are exactly
timm's, so a dense timm/DeiT checkpoint loads (``tpcvit.load_backbone``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from ..propagation import ControllerHead, Propagation, TokenTrace, TPCConfig, TPCHooks
from ..stabilizer import TokenGridStabilizer
from ..tokens import (
    from_padded,
    masked_update,
    pack,
    run_on_selection,
    select_active,
    select_packed,
    select_topk,
    to_padded,
    unpack,
)


def supports_packing(blk: nn.Module) -> bool:
    """Packed execution re-implements timm's pre-norm ``Block`` + ``Attention``; anything else uses padding."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    return type(blk) is Block and type(blk.attn) is Attention and blk.attn.gate is None


def packed_block(blk: nn.Module, x: torch.Tensor, active: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Run a timm ``Block`` (eval) on the active tokens of ``x`` only, with no padding in the per-token layers.

    qkv, output projection and MLP see exactly the M active tokens of the batch; only the attention product uses the
    padded ``[B, n_max]`` layout with a key mask. Same math as ``Block.forward`` on the gathered tokens.
    """
    if bool(active.all()):
        return blk(x)
    attn = blk.attn
    sel = select_packed(active, num_prefix, x.dtype)
    b = x.shape[0]
    tokens = pack(x, sel)
    qkv = to_padded(attn.qkv(blk.norm1(tokens)), sel, b)
    q, k, v = qkv.reshape(b, sel.n_max, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sel.key_bias)
    o = from_padded(o.transpose(1, 2).reshape(b, sel.n_max, attn.attn_dim), sel)
    tokens = tokens + blk.ls1(attn.proj(attn.norm(o)))
    tokens = tokens + blk.ls2(blk.mlp(blk.norm2(tokens)))
    return unpack(x, sel, tokens)


def context_block(blk: nn.Module, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A timm ``Block`` (eval) updating ``tokens`` ``[B, n, D]`` while attending to ``context`` ``[B, T, D]``.

    For ``paused_keys``: the queries, attention output and MLP run on the selected tokens only; keys and values
    come from the whole buffer, where paused tokens hold their frozen features. Same math as ``Block.forward``
    on the full sequence, restricted to the rows of ``tokens``.
    """
    attn = blk.attn
    d, heads, b = attn.num_heads * attn.head_dim, attn.num_heads, tokens.shape[0]
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(blk.norm1(tokens), weight[:d], None if bias is None else bias[:d])
    kv = F.linear(blk.norm1(context), weight[d:], None if bias is None else bias[d:])
    q = q.view(b, -1, heads, attn.head_dim).transpose(1, 2)
    k, v = kv.view(b, context.shape[1], 2, heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v)
    tokens = tokens + blk.ls1(attn.proj(attn.norm(o.transpose(1, 2).reshape(b, -1, d))))
    return tokens + blk.ls2(blk.mlp(blk.norm2(tokens)))


def image_geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the images a timm ViT/Swin (or our LV-ViT stem) expects."""
    from ..checkpoint import unwrap

    pe = unwrap(model).patch_embed
    return (getattr(pe, "in_chans", None) or pe.proj.in_channels, *(int(s) for s in pe.img_size))


def check_images(model: nn.Module, x: torch.Tensor) -> None:
    """A clear error for images of the wrong size or channel count."""
    c, h, w = image_geometry(model)
    if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
        raise ValueError(
            f"expected images [B, {c}, {h}, {w}], got {list(x.shape)}: resize/convert the input (the data "
            "pipeline does this), or create the model with img_size=/in_chans= matching your data")
    if x.shape[0] == 0:
        raise ValueError("empty batch: pass at least one image")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"images must be float32 (or bf16/fp16) tensors, normalised as in training, got {x.dtype}: "
                         "use the data pipeline's transform, or x.float() (uint8: x.float() / 255, then normalise)")


def embed_tokens(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """timm ViT patch + position embedding, with a clear error for images of the wrong size or channel count."""
    check_images(model, x)
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


class TPCViTMixin(TPCHooks):
    """Token propagation control for a timm ViT. Call :meth:`_init_tpc` at the end of ``__init__``."""

    def _init_tpc(self, cfg: TPCConfig) -> None:
        depth = len(self.blocks)
        if getattr(self, "dynamic_img_size", False):
            raise ValueError("TPC models need a fixed token grid: create them without dynamic_img_size=True")
        if cfg.start_layer >= depth:
            raise ValueError(f"start_layer={cfg.start_layer} must be < depth={depth}")
        self.tpc_cfg = cfg
        self.controller = nn.ModuleList(
            ControllerHead(self.embed_dim, cfg.pause_bias_init, cfg.restart_bias_init)
            for _ in range(cfg.start_layer, depth)
        )
        self.stabilizers = nn.ModuleDict(
            {str(i): TokenGridStabilizer(self.embed_dim) for i in cfg.stabilized_blocks(depth)}
        )
        self.tpc_mode, self.tpc_keep = "adaptive", None
        self.tpc_force_pause = self.tpc_force_restart = None
        self.tpc_packed = True  # adaptive batches: per-token layers on packed tokens (see packed_block)

    # ------------------------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return embed_tokens(self, x)

    def _propagate(
        self,
        x: torch.Tensor,
        forced_active: torch.Tensor | None = None,
        path: str | None = None,
        with_trace: bool = True,
    ) -> tuple[torch.Tensor, TokenTrace | None]:
        """Run the blocks with token propagation control; returns normalised features and the trace (``None``
        with ``with_trace=False``)."""
        x = self._embed(x)
        cfg, P = self.tpc_cfg, self.num_prefix_tokens
        grid = tuple(self.patch_embed.grid_size)
        n = grid[0] * grid[1]
        if path not in (None, "fast", "masked"):
            raise ValueError(f"path must be None, 'fast' or 'masked', got {path!r}")
        fast = (not self.training) if path is None else path == "fast"
        mode = self.tpc_mode
        if forced_active is not None and forced_active.shape != (x.shape[0], len(self.blocks), n):
            raise ValueError(f"forced_active must be [B, depth, N] = {[x.shape[0], len(self.blocks), n]}")
        prop = Propagation(cfg, mode, self.tpc_keep, x.shape[0], n, grid, x.device,
                           sample=self.training and not fast, forced_active=forced_active,
                           force_pause=self.tpc_force_pause, force_restart=self.tpc_force_restart,
                           record=with_trace)
        for i, blk in enumerate(self.blocks):
            stab = self.stabilizers[str(i)] if str(i) in self.stabilizers else None
            if stab is not None:
                x = stab(x, P, grid)
            if mode == "dense" or i < cfg.start_layer:
                x = blk(x)
                prop.dense_block()
                continue
            states, active = prop.step(i, self.controller[i - cfg.start_layer](x, P))

            def run(tokens: torch.Tensor, mask: torch.Tensor | None, blk=blk) -> torch.Tensor:
                return blk(tokens, attn_mask=mask)

            if fast and cfg.paused_keys:  # selected tokens query the whole buffer; padding rows are discarded
                def run(tokens: torch.Tensor, mask: torch.Tensor | None, blk=blk, context=x) -> torch.Tensor:
                    return context_block(blk, tokens, context)

            if fast:
                if mode == "budget" and forced_active is None:
                    x = run_on_selection(run, x, select_topk(active, prop.budget_k, P, prop.topk_index))
                elif (self.tpc_packed and not cfg.paused_keys and not self.training and x.shape[0] > 1
                      and supports_packing(blk)):
                    x = packed_block(blk, x, active, P)
                else:
                    x = run_on_selection(run, x, select_active(active, P, x.dtype))
            else:
                x = masked_update(run, x, states, P, mask_keys=not cfg.paused_keys)
        return self.norm(x), prop.trace(cfg.start_layer, P)

    # ------------------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("TPC models make their own attention masks; attn_mask/is_causal unsupported")
        return self._propagate(x, with_trace=False)[0]

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False, return_trace: bool = False):
        """timm's forward; ``return_trace=True`` gives ``(logits, trace)`` (use it through DDP wrappers)."""
        if not return_trace:
            return self.forward_head(self.forward_features(x, attn_mask, is_causal))
        return self.forward_with_trace(x)

    def forward_with_trace(
        self,
        x: torch.Tensor,
        forced_active: torch.Tensor | None = None,
        path: str | None = None,
    ) -> tuple[torch.Tensor, TokenTrace]:
        """Logits and a :class:`TokenTrace` of which tokens were active/paused/restarted in every block.

        ``forced_active`` ``[B, depth, N]`` replaces the controller's decisions (fixed-decision comparisons);
        ``path`` forces ``"fast"`` (gather/scatter) or ``"masked"`` regardless of train/eval.
        """
        feats, trace = self._propagate(x, forced_active=forced_active, path=path)
        return self.forward_head(feats), trace

    def gmacs_per_image(self, trace: TokenTrace) -> torch.Tensor:
        from ..flops import vit_gmacs_from_trace

        return vit_gmacs_from_trace(self, trace)


class TPCVisionTransformer(TPCViTMixin, VisionTransformer):
    """timm ``VisionTransformer`` with token propagation control."""

    def __init__(self, *args, tpc_cfg: TPCConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_tpc(tpc_cfg or TPCConfig())


class TPCVisionTransformerDistilled(TPCViTMixin, VisionTransformerDistilled):
    """timm DeiT distilled (class + distillation token) with token propagation control."""

    def __init__(self, *args, tpc_cfg: TPCConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_tpc(tpc_cfg or TPCConfig())


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------
def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj", "classifier": "head", **kwargs,
    }


def check_create_kwargs(variant: str, pretrained: bool, kwargs: dict) -> None:
    """Refuse what a local-weights model cannot honour, with the fix in the message."""
    if pretrained:
        raise RuntimeError(
            f"{variant}: no weights are downloaded. Build it with pretrained=False and load a local dense "
            "checkpoint: tpcvit.load_backbone(model, 'deit_small.safetensors')")
    for key in ("features_only", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        if kwargs.pop(key, None) not in (None, False):
            raise ValueError(f"{variant}: {key} is not supported by token-reduction models")


def attach_default_cfg(model: VisionTransformer, variant: str, distilled: bool = False) -> None:
    model.pretrained_cfg = model.default_cfg = _cfg(
        num_classes=model.num_classes, input_size=image_geometry(model),
        classifier=("head", "head_dist") if distilled else "head", architecture=variant)


def create_tpc_vit(variant: str, pretrained: bool = False, distilled: bool = False, **kwargs) -> nn.Module:
    """Build a TPC ViT. ``kwargs`` mix timm ViT arguments and :class:`TPCConfig` fields."""
    check_create_kwargs(variant, pretrained, kwargs)
    tpc_cfg = TPCConfig.pop_from(kwargs)
    cls = TPCVisionTransformerDistilled if distilled else TPCVisionTransformer
    model = cls(tpc_cfg=tpc_cfg, **kwargs)
    attach_default_cfg(model, variant, distilled)
    return model


DEIT_SIZES = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


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
