"""The one place tpcvit reaches into timm's ViT beyond its public API, so several timm 1.0.x releases work.

Supported: timm >= 1.0.17 (the first release whose ``Block.forward`` takes ``attn_mask``); CI runs the model tests
on 1.0.17 and on the pinned release. What differs across them: the optional output norm ``Attention.norm``
(scale_norm) and the output ``gate`` exist only in some releases, ``Attention.attn_dim`` not in the oldest;
``VisionTransformer._pos_embed`` (position embedding + prefix tokens) and ``timm.models._features.feature_take_indices``
(which blocks ``forward_intermediates`` returns) are private names every 1.0.x release has.
The Eva family: ``EvaAttention.head_dim`` and the ``half`` (rotate-half) argument of ``apply_rot_embed_cat`` are not
in the oldest; ``Eva._pos_embed`` (tokens and rotary table) is in every one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

_IDENTITY = nn.Identity()


def attention_dim(attn: nn.Module) -> int:
    """Width of the concatenated heads of a timm ``Attention``."""
    return getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)


def head_dim(attn: nn.Module) -> int:
    """Width of one head of a timm ``Attention`` / ``EvaAttention`` / ``AttentionRope`` (the output projection
    reads every head)."""
    return getattr(attn, "head_dim", None) or attn.proj.in_features // attn.num_heads


def rotate(x: torch.Tensor, rope: torch.Tensor, half: bool) -> torch.Tensor:
    """timm's rotation of ``x`` by a concatenated sin/cos table (interleaved, or rotate-half where supported)."""
    from timm.layers import apply_rot_embed_cat

    return apply_rot_embed_cat(x, rope, half=True) if half else apply_rot_embed_cat(x, rope)


def attention_out_norm(attn: nn.Module) -> nn.Module:
    """The norm timm applies to the head outputs before ``proj`` (``scale_norm``; identity where absent)."""
    return getattr(attn, "norm", _IDENTITY)


def attention_gate(attn: nn.Module) -> nn.Module | None:
    """The attention output gate of newer timm releases (``None``: no gate)."""
    return getattr(attn, "gate", None)


def add_pos_embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Position embedding and prefix tokens (class / distillation / register) of a timm ViT."""
    return model._pos_embed(x)


def take_indices(depth: int, indices: int | list[int] | None) -> list[int]:
    """The blocks timm's ``forward_intermediates(indices=...)`` returns: the last n (int), all (None), or those
    listed (negative: from the end)."""
    from timm.models._features import feature_take_indices

    return list(feature_take_indices(depth, indices)[0])
