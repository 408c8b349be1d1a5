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

from .. import controller as C
from .._timm import add_pos_embed, attention_dim, attention_gate, attention_out_norm
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

    return type(blk) is Block and type(blk.attn) is Attention and attention_gate(blk.attn) is None


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
    o = from_padded(o.transpose(1, 2).reshape(b, sel.n_max, attention_dim(attn)), sel)
    tokens = tokens + blk.ls1(attn.proj(attention_out_norm(attn)(o)))
    tokens = tokens + blk.ls2(blk.mlp(blk.norm2(tokens)))
    return unpack(x, sel, tokens)


def context_block(blk: nn.Module, tokens: torch.Tensor, context: torch.Tensor, class_attention: bool = False,
                  num_prefix: int = 1):
    """A timm ``Block`` (eval) updating ``tokens`` ``[B, n, D]`` while attending to ``context`` ``[B, T, D]``.

    For ``paused_keys``: the queries, attention output and MLP run on the selected tokens only; keys and values
    come from the whole buffer, where paused tokens hold their frozen features. Same math as ``Block.forward``
    on the full sequence, restricted to the rows of ``tokens``.

    ``class_attention=True`` also returns the class token's attention over every key, times the number of keys
    (``[B, T]``, 1 = uniform; the mean query stands in for models without a class token): the signal of the
    training-free controller, one extra query row.
    """
    attn = blk.attn
    d, heads, b = attn.num_heads * attn.head_dim, attn.num_heads, tokens.shape[0]
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(blk.norm1(tokens), weight[:d], None if bias is None else bias[:d])
    kv = F.linear(blk.norm1(context), weight[d:], None if bias is None else bias[d:])
    q = q.view(b, -1, heads, attn.head_dim).transpose(1, 2)
    k, v = kv.view(b, context.shape[1], 2, heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v)
    tokens = tokens + blk.ls1(attn.proj(attention_out_norm(attn)(o.transpose(1, 2).reshape(b, -1, d))))
    out = tokens + blk.ls2(blk.mlp(blk.norm2(tokens)))
    if not class_attention:
        return out
    if num_prefix:
        query = q[:, :, :1]
    else:  # no class token: the query of the buffer's mean (normed) token, the same whatever is selected
        mean = F.linear(blk.norm1(context).mean(dim=1, keepdim=True), weight[:d], None if bias is None else bias[:d])
        query = attn.q_norm(mean.view(b, 1, heads, attn.head_dim).transpose(1, 2))
    row = ((query * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0].mean(dim=1)
    return out, row * context.shape[1]


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
    x = add_pos_embed(model, x)
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
        if cfg.reads_attention and cfg.start_layer < 1:
            raise ValueError(f"controller={cfg.controller!r} reads the previous block's class attention: "
                             "start_layer >= 1")
        self.tpc_cfg = cfg
        heads = range(cfg.start_layer, depth) if cfg.controller != "attention" else ()  # training-free: none
        self.controller = nn.ModuleList(
            ControllerHead(self.embed_dim, cfg.pause_bias_init, cfg.restart_bias_init) for _ in heads)
        if cfg.controller == "hybrid":  # a zero correction: the model starts as the training-free controller
            for head in self.controller:
                for param in head.parameters():
                    nn.init.zeros_(param)
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
        attention = cfg.reads_attention and mode != "dense"
        score = None  # training-free controller: relative class attention of every token, from the last block
        for i, blk in enumerate(self.blocks):
            stab = self.stabilizers[str(i)] if str(i) in self.stabilizers else None
            if stab is not None:
                x = stab(x, P, grid)
            if mode == "dense" or i < cfg.start_layer:
                if attention and i == cfg.start_layer - 1:  # seeds the scores of the first controlled block
                    x, score = context_block(blk, x, x, class_attention=True, num_prefix=P)
                else:
                    x = blk(x)
                prop.dense_block()
                continue
            logits = self.controller[i - cfg.start_layer](x, P) if len(self.controller) else None
            if attention:
                free = C.attention_logits(score[:, P:], cfg.attention_threshold, cfg.attention_sharpness)
                logits = free if logits is None else free + logits
            states, active = prop.step(i, logits)
            seen: dict[str, torch.Tensor] = {}

            def run(tokens: torch.Tensor, mask: torch.Tensor | None, blk=blk) -> torch.Tensor:
                return blk(tokens, attn_mask=mask)

            if cfg.paused_keys and (fast or attention):  # selected tokens query the whole buffer
                def run(tokens: torch.Tensor, mask: torch.Tensor | None, blk=blk, context=x, seen=seen):
                    if not attention:
                        return context_block(blk, tokens, context)
                    out, seen["score"] = context_block(blk, tokens, context, class_attention=True, num_prefix=P)
                    return out

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
            if attention:
                score = seen["score"]
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


# timm's pretrained-weight arguments: passed on to the dense model when pretrained=True
PRETRAINED_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def build_reducer(cls: type, variant: str, pretrained: bool, kwargs: dict, dense_name: str | None,
                  distilled: bool = False, **init) -> nn.Module:
    """Construct a token-reduction model (TPC or a peer) the timm way.

    ``pretrained=True`` goes through timm's own pretrained machinery for the dense model ``dense_name`` (hub id and
    cache from its ``pretrained_cfg``, ``HF_HUB_OFFLINE``, ``pretrained_cfg_overlay=dict(file=...)`` for a local
    file) and loads its weights into the backbone; what the method adds (controller heads, stabilizers, predictors)
    stays freshly initialised. ``init``: extra constructor arguments (e.g. ``tpc_cfg``).
    """
    if kwargs.pop("features_only", False):
        raise ValueError(f"{variant}: features_only is not supported by token-reduction models")
    pre = {k: kwargs.pop(k) for k in PRETRAINED_KWARGS if k in kwargs}
    model = cls(**init, **kwargs)
    attach_default_cfg(model, variant, distilled)
    if pretrained:
        load_pretrained_dense(model, variant, dense_name, kwargs, pre)
    return model


def load_pretrained_dense(model: nn.Module, variant: str, dense_name: str | None, kwargs: dict, pre: dict) -> None:
    """Load the pretrained weights of the dense timm model ``dense_name`` into ``model``'s backbone."""
    import inspect

    import timm

    from ..checkpoint import load_backbone

    if dense_name is None:
        raise RuntimeError(f"{variant}: timm has no pretrained weights for this backbone; load a local checkpoint "
                           "with tpcvit.load_backbone(model, PATH)")
    base = next(c for c in type(model).__mro__ if c.__module__.startswith("timm."))
    accepted = inspect.signature(base.__init__).parameters
    from ..checkpoint import CheckpointError

    try:
        dense = timm.create_model(dense_name, pretrained=True, **{k: v for k, v in kwargs.items() if k in accepted},
                                  **pre)
    except (OSError, RuntimeError, ValueError) as err:  # hub unreachable, not cached, bad file
        hub = timm.models.get_pretrained_cfg(dense_name)
        where = getattr(hub, "hf_hub_id", None) or dense_name
        first = " ".join(str(err).split())[:200]
        raise CheckpointError(f"{variant}: could not load the pretrained weights of {dense_name} ({where}): {first}. "
                              "Allow the download once (it is then cached), put the weights in the Hugging Face "
                              "cache, or pass pretrained_cfg_overlay=dict(file='weights.safetensors')") from None
    load_backbone(model, dense.state_dict())
    model.pretrained_cfg = model.default_cfg = {**dense.pretrained_cfg, "architecture": variant}


def attach_default_cfg(model: VisionTransformer, variant: str, distilled: bool = False) -> None:
    model.pretrained_cfg = model.default_cfg = _cfg(
        num_classes=model.num_classes, input_size=image_geometry(model),
        classifier=("head", "head_dist") if distilled else "head", architecture=variant)


def create_tpc_vit(variant: str, pretrained: bool = False, distilled: bool = False, **kwargs) -> nn.Module:
    """Build a TPC ViT. ``kwargs`` mix timm ViT arguments and :class:`TPCConfig` fields; ``pretrained=True``
    loads the dense DeiT's weights (timm's hub cache) into the backbone."""
    tpc_cfg = TPCConfig.pop_from(kwargs)
    cls = TPCVisionTransformerDistilled if distilled else TPCVisionTransformer
    return build_reducer(cls, variant, pretrained, kwargs, variant.removeprefix("tpc_"), distilled, tpc_cfg=tpc_cfg)


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
