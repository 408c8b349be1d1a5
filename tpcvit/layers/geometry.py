"""What images a model expects, checked with errors that say how to fix the input, and the ViT embedding."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; afterwards every submodule's own training flag as it was.

    Why not ``was = model.training; model.eval(); ...; model.train(was)``: ``train(flag)`` sets the whole tree to
    the top module's flag. A wrapper left in training mode around an eval model (a fresh ``nn.Module`` is in
    training mode) then put the inner model in training mode: ``tpcvit bench``'s ``dense-lean`` row ran timm's
    block calls instead of the lean executor after its GMACs were counted (sessions 16-23)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def image_geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the images a timm ViT/Swin (or our LV-ViT stem) expects."""
    pe = unwrap(model).patch_embed
    return (getattr(pe, "in_chans", None) or pe.proj.in_channels, *(int(s) for s in pe.img_size))


def dynamic_size(model: nn.Module) -> bool:
    """The model takes images of any size (timm's ``dynamic_img_size=True``: position tables follow the grid)."""
    return bool(getattr(unwrap(model), "dynamic_img_size", False))


def check_fixed_grid(model: nn.Module, who: str, dynamic_ok: bool = False) -> None:
    """A one-line error where ``model`` has no patch grid ``who`` (TPC, a peer) can size its decisions for: timm's
    ``PatchEmbed``, and (unless ``dynamic_ok``: ``who`` follows each input's grid) a fixed image size."""
    if dynamic_size(model) and not dynamic_ok:
        raise ValueError(f"{who} needs a fixed token grid: create the model with dynamic_img_size=False (timm's "
                         "DINOv3 models default to True)")
    if not hasattr(getattr(model, "patch_embed", None), "grid_size"):
        raise ValueError(f"{type(getattr(model, 'patch_embed', None)).__name__} has no fixed patch grid: {who} "
                         "needs timm's PatchEmbed")


def image_grid(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """The patch grid (rows, columns) ``images`` make in ``model``: its fixed grid, or with ``dynamic_img_size``
    the grid of these images' size."""
    pe = unwrap(model).patch_embed
    if dynamic_size(model):
        return tuple(int(s) for s in pe.dynamic_feat_size(tuple(images.shape[-2:])))
    return tuple(int(s) for s in pe.grid_size)


def check_images(model: nn.Module, x: torch.Tensor) -> None:
    """A clear error for images of the wrong size or channel count."""
    c, h, w = image_geometry(model)
    if x.ndim == 4 and x.shape[1] == c and dynamic_size(model):  # any size the patches tile (or timm pads)
        pe = unwrap(model).patch_embed
        ph, pw = pe.patch_size
        if not getattr(pe, "dynamic_img_pad", False) and (x.shape[2] % ph or x.shape[3] % pw):
            raise ValueError(f"image size {list(x.shape[2:])} is not a multiple of the patch size {[ph, pw]}: resize "
                             "or crop the input, or create the model with dynamic_img_pad=True")
        h, w = x.shape[2:]
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
