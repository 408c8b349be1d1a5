"""``tpcvit.patch``: TPC on a timm ViT you already have, in place, no training needed.

    import tpcvit, timm
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    tpcvit.patch(model, keep=0.5)          # or gmacs=0.5: a fraction of the dense model's GMACs

The model keeps its class's behaviour (``forward``, ``forward_features``, ``forward_head``, ``state_dict`` keys and
weights) and gains TPC's token propagation: ``tpcvit.set_mode`` / ``count_gmacs`` / ``forward_with_trace`` and ONNX
export work on it as on a ``tpc_*`` model. The default controller is training-free (``controller="attention"``, no
new parameters): each controlled block computes the tokens the class token attends to most; paused tokens stay
visible as keys, so their attention is known in every block and a paused token whose attention rises is restarted.
``controller="learned"`` adds TPC's controller heads and stabilizer instead (zero-initialised stabilizer: the model
is unchanged until it is fine-tuned with ``tpcvit train``); ``controller="hybrid"`` adds heads initialised to zero on
top of the attention logits, so fine-tuning starts from the training-free controller's decisions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from .budget import match_gmacs
from .flops import count_gmacs
from .layers import supports_packing
from .models import TPCViT
from .propagation import TPCConfig
from .runtime import set_mode, tpc_modules

_PATCHED: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    """``cls`` with the TPC propagation loop in front of it in the MRO (one class per timm class, cached)."""
    if cls not in _PATCHED:
        _PATCHED[cls] = type(f"TPC{cls.__name__}", (TPCViT, cls),
                             {"__module__": __name__, "__doc__": f"{cls.__name__} patched with tpcvit.patch"})
    return _PATCHED[cls]


def check_patchable(model: nn.Module) -> None:
    """A clear error naming what a model lacks for TPC."""
    if tpc_modules(model):
        raise ValueError("this model already has TPC (a tpc_* model or patched before): use tpcvit.set_mode")
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"tpcvit.patch works on timm VisionTransformer models (DeiT, ViT, AugReg, DINOv2-style "
                        f"register tokens, ...), got {type(model).__name__}; for Swin use "
                        "timm.create_model('tpc_swin_tiny_patch4_window7_224')")
    if getattr(model, "dynamic_img_size", False):
        raise ValueError("TPC needs a fixed token grid: create the model without dynamic_img_size=True")
    if not hasattr(getattr(model, "patch_embed", None), "grid_size"):
        raise ValueError(f"{type(model.patch_embed).__name__} has no fixed patch grid: TPC needs timm's PatchEmbed")
    other = sorted({type(b).__name__ + (f"/{type(b.attn).__name__}" if hasattr(b, "attn") else "")
                    for b in model.blocks if not supports_packing(b)})
    if other:
        raise ValueError(f"blocks {other} are not timm's pre-norm Block with Attention: TPC runs a block on a token "
                         "selection through that block's parts (qkv, proj, mlp, layer scale)")


def patch(
    model: nn.Module,
    keep: float | None = 0.5,
    *,
    gmacs: float | None = None,
    controller: str = "attention",
    mode: str = "budget",
    start_layer: int | None = None,
    images: torch.Tensor | None = None,
    **tpc_options,
) -> nn.Module:
    """Give TPC to a timm ``VisionTransformer`` in place (and return it).

    ``keep``: share of patch tokens computed in each controlled block (budget mode). ``gmacs``: instead, a fraction
    of the dense model's GMACs; the keep ratio is found by bisection (budget mode has static shapes, so no real
    images are needed). ``mode``: ``"budget"`` (static shapes, exportable) or ``"adaptive"`` (per-image active sets:
    the attention threshold is calibrated on ``images`` so that the mean keep ratio is ``keep``). ``start_layer``:
    the first controlled block (default: a quarter of the depth, at least 1). Other :class:`TPCConfig` fields go in
    ``tpc_options``.
    """
    check_patchable(model)
    depth = len(model.blocks)
    start = max(1, depth // 4) if start_layer is None else int(start_layer)
    options = {"stabilizer": controller != "attention", **tpc_options}
    cfg = TPCConfig(start_layer=start, target_keep=keep if keep is not None else 0.5, paused_keys=True,
                    controller=controller, **options)
    param = next(model.parameters())
    was_training = model.training
    model.__class__ = _patched_class(type(model))
    model._init_tpc(cfg)
    model.to(device=param.device, dtype=param.dtype).train(was_training)
    if gmacs is not None:
        probe = torch.zeros(1, model.patch_embed.proj.in_channels, *model.patch_embed.img_size,
                            device=param.device, dtype=param.dtype)
        dense = count_gmacs(set_mode(model, "dense"), probe)
        set_mode(model, "budget", 0.5)
        keep, _ = match_gmacs(model, probe, gmacs * dense)
        model.tpc_cfg.target_keep = keep
    if mode == "adaptive":
        if images is None:
            raise ValueError("mode='adaptive' needs images= (a few real images) to calibrate the attention threshold "
                             "to the keep ratio; or use mode='budget'")
        calibrate_threshold(model, images, model.tpc_cfg.target_keep)
        set_mode(model, "adaptive")
    elif mode == "budget":
        set_mode(model, "budget", model.tpc_cfg.target_keep)
    else:
        raise ValueError(f"mode must be 'budget' or 'adaptive', got {mode!r}")
    return model


@torch.no_grad()
def calibrate_threshold(model: nn.Module, images: torch.Tensor, keep: float, iters: int = 20) -> float:
    """Bisect the training-free controller's attention threshold so that, on ``images``, the mean share of active
    patch tokens in the controlled blocks is ``keep`` (adaptive mode)."""
    if not model.tpc_cfg.reads_attention:
        raise ValueError("only the attention (training-free or hybrid) controller has a threshold to calibrate")
    was_training = model.training
    set_mode(model.eval(), "adaptive")
    lo, hi = -6.0, 6.0  # log relative attention: e^-6 .. e^6 times uniform
    start = model.tpc_cfg.start_layer
    for _ in range(iters):
        mid = (lo + hi) / 2
        model.tpc_cfg.attention_threshold = mid
        _, trace = model.forward_with_trace(images)
        got = trace.active[:, start:].float().mean().item()
        lo, hi = (mid, hi) if got > keep else (lo, mid)  # a higher threshold pauses more
    model.tpc_cfg.attention_threshold = (lo + hi) / 2
    model.train(was_training)
    return model.tpc_cfg.attention_threshold
