"""What images a model expects, checked with errors that say how to fix the input, and the ViT embedding."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._timm import add_pos_embed


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def image_geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the images a timm ViT/Swin (or our LV-ViT stem) expects."""
    pe = unwrap(model).patch_embed
    return (getattr(pe, "in_chans", None) or pe.proj.in_channels, *(int(s) for s in pe.img_size))


def check_fixed_grid(model: nn.Module, who: str) -> None:
    """A one-line error where ``model`` has no fixed token grid, which ``who`` (TPC, a peer) needs: its
    controllers, budgets and token windows are sized for one grid."""
    if getattr(model, "dynamic_img_size", False):
        raise ValueError(f"{who} needs a fixed token grid: create the model with dynamic_img_size=False (timm's "
                         "DINOv3 models default to True)")
    if not hasattr(getattr(model, "patch_embed", None), "grid_size"):
        raise ValueError(f"{type(getattr(model, 'patch_embed', None)).__name__} has no fixed patch grid: {who} "
                         "needs timm's PatchEmbed")


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


def embed_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ViT patch + position embedding, with a clear error for images of the wrong size or channel count."""
    check_images(model, x)
    x = model.patch_embed(x)
    x = add_pos_embed(model, x)
    x = model.patch_drop(x)
    return model.norm_pre(x)
