"""LV-ViT (Jiang et al., "All Tokens Matter: Token Labeling", 2021), our implementation on timm's ViT, and TPC on it.

LV-ViT is not in timm. What makes it LV-ViT rather than DeiT:

- a 4-conv patch stem (7x7 stride 2, two 3x3, then a ``patch/2`` projection), BatchNorm + ReLU;
- residual scaling: each branch output is divided by ``skip_lam`` (2.0) before the residual add;
- no qkv bias, MLP ratio 3;
- a token-labelling auxiliary head on every patch token; at inference the prediction is
  ``head(cls) + 0.5 * max_k aux_head(token_k)`` (as in the official release); in training
  ``model(x, token_logits=True)`` returns both (:meth:`LVViT.forward_head_tokens`) so a dense per-token target
  ("token labels") can supervise the aux head (:func:`token_labeling_loss`).

State-dict keys follow the official release (``patch_embed.conv1/bn1/.../proj``, ``blocks.*``, ``head``,
``aux_head``), so its checkpoints load with :func:`tpcvit.load_backbone`. The blocks are timm ``Block``s whose
LayerScale is replaced by a fixed scale (no parameters), so TPC's gather/scatter and packed paths apply unchanged.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from ..propagation import TPCConfig
from ._builder import build_reducer
from .vit import TPCViT


class ConvStem(nn.Module):
    """LV-ViT's patch embedding: 4 convolutions, the first three at 64 channels (official key names)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=384, stem_dim: int = 64, **_) -> None:
        super().__init__()
        img = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if patch_size % 2 or img[0] % patch_size or img[1] % patch_size:
            raise ValueError(f"LV-ViT needs an even patch_size dividing img_size, got {patch_size} / {img}")
        self.img_size, self.patch_size, self.in_chans = img, (patch_size, patch_size), in_chans
        self.grid_size = (img[0] // patch_size, img[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.dynamic_img_pad, self.flatten = False, True
        self.conv1 = nn.Conv2d(in_chans, stem_dim, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_dim)
        self.conv2 = nn.Conv2d(stem_dim, stem_dim, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_dim)
        self.conv3 = nn.Conv2d(stem_dim, stem_dim, 3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(stem_dim)
        self.proj = nn.Conv2d(stem_dim, embed_dim, patch_size // 2, stride=patch_size // 2)

    def feat_ratio(self, as_scalar: bool = True) -> int:
        return self.patch_size[0]

    def stem_macs(self) -> int:
        """Multiply-adds of the stem for one image (used by the analytic FLOP count)."""
        h, w = self.img_size[0] // 2, self.img_size[1] // 2
        c1, c2 = self.conv1, self.conv2
        macs = h * w * c1.out_channels * c1.in_channels * 49 + 2 * h * w * c2.out_channels * c2.in_channels * 9
        return macs + self.num_patches * self.proj.out_channels * self.proj.in_channels * self.proj.kernel_size[0] ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.proj(x).flatten(2).transpose(1, 2)


class FixedScale(nn.Module):
    """LV-ViT's residual scaling ``branch / skip_lam``, in the place of timm's LayerScale (no parameters)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class LVViT(VisionTransformer):
    """LV-ViT on timm's ``VisionTransformer``: conv stem, scaled residuals, class + token-labelling heads."""

    def __init__(self, *args, skip_lam: float = 2.0, aux_weight: float = 0.5, stem_dim: int = 64, **kwargs) -> None:
        kwargs.setdefault("qkv_bias", False)
        kwargs.setdefault("mlp_ratio", 3.0)
        super().__init__(*args, embed_layer=partial(ConvStem, stem_dim=stem_dim), **kwargs)
        for blk in self.blocks:
            blk.ls1, blk.ls2 = FixedScale(1.0 / skip_lam), FixedScale(1.0 / skip_lam)
        self.aux_weight = aux_weight
        self.aux_head = nn.Linear(self.embed_dim, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.aux_head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits ``[B, C]`` and per-token aux logits ``[B, N, C]`` (what token labelling trains)."""
        return self.head(self.head_drop(x[:, 0])), self.aux_head(x[:, self.num_prefix_tokens:])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if pre_logits:
            return super().forward_head(x, pre_logits=True)
        cls_logits, aux = self.forward_head_tokens(x)
        return cls_logits + self.aux_weight * aux.max(dim=1).values

    def forward(self, x: torch.Tensor, attn_mask=None, token_logits: bool = False):
        """timm's forward; ``token_logits=True`` returns ``(class logits, per-token aux logits)`` (training)."""
        feats = self.forward_features(x) if attn_mask is None else self.forward_features(x, attn_mask=attn_mask)
        return self.forward_head_tokens(feats) if token_logits else self.forward_head(feats)


def token_labeling_loss(cls_logits: torch.Tensor, aux_logits: torch.Tensor, targets: torch.Tensor,
                        token_targets: torch.Tensor, aux_weight: float = 0.5) -> torch.Tensor:
    """LV-ViT's objective: soft-target CE on the class token + ``aux_weight`` x mean per-token soft CE.

    ``targets`` ``[B]`` class indices or ``[B, C]`` soft labels; ``token_targets`` ``[B, N, C]`` dense per-token
    soft labels (e.g. from a machine annotator), or ``[B, N]`` indices.
    """
    if token_targets.shape[:2] != aux_logits.shape[:2]:
        raise ValueError(f"token_targets must be [B, N(={aux_logits.shape[1]}), ...], got {list(token_targets.shape)}")

    def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dtype in (torch.long, torch.int):
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        return -(target * logits.log_softmax(dim=-1)).sum(dim=-1).mean()

    return soft_ce(cls_logits, targets) + aux_weight * soft_ce(aux_logits, token_targets)


class TPCLVViT(TPCViT, LVViT):
    """LV-ViT with token propagation control (paused tokens keep their last features for the aux head too)."""

    def __init__(self, *args, tpc_cfg: TPCConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_tpc(tpc_cfg or TPCConfig())


LVVIT_SIZES = {
    "s": dict(patch_size=16, embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0),
    "m": dict(patch_size=16, embed_dim=512, depth=20, num_heads=8, mlp_ratio=3.0),
}


def _lvvit(size: str, tpc: bool, pretrained: bool, kwargs: dict) -> nn.Module:
    name = f"{'tpc_' if tpc else ''}lvvit_{size}"
    kwargs = {**LVVIT_SIZES[size], **kwargs}
    init = {"tpc_cfg": TPCConfig.pop_from(kwargs)} if tpc else {}
    model = build_reducer(TPCLVViT if tpc else LVViT, name, pretrained, kwargs, None, **init)  # not on timm's hub
    model.pretrained_cfg["first_conv"] = "patch_embed.conv1"
    model.pretrained_cfg["classifier"] = ("head", "aux_head")
    return model


@register_model
def lvvit_s(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-S: 26.2M parameters, 6.6 GMACs at 224."""
    return _lvvit("s", False, pretrained, kwargs)


@register_model
def lvvit_m(pretrained: bool = False, **kwargs) -> LVViT:
    """LV-ViT-M: 55.8M parameters, 12.7 GMACs at 224."""
    return _lvvit("m", False, pretrained, kwargs)


@register_model
def tpc_lvvit_s(pretrained: bool = False, **kwargs) -> TPCLVViT:
    """LV-ViT-S with TPC."""
    return _lvvit("s", True, pretrained, kwargs)


@register_model
def tpc_lvvit_m(pretrained: bool = False, **kwargs) -> TPCLVViT:
    """LV-ViT-M with TPC."""
    return _lvvit("m", True, pretrained, kwargs)
