"""Running a timm ``SwinTransformerBlock`` (eval) with only some tokens updated, and trace resampling.

Window attention sees every token (keys/values); what a paused token skips is its own update: the output
projection, residual, LayerNorm and MLP. :func:`window_attention_heads` is timm's ``SwinTransformerBlock._attn``
stopped before the output projection (a per-token linear, which commutes with window reverse and shift), so the
projection can run on the active tokens only, without touching the block's modules.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import window_partition, window_reverse

from ..tokens import flat_index, true_positions


def window_attention_heads(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, H, W, C]`` (normed) -> the concatenated window-attention heads ``[B, H, W, C]`` before ``attn.proj``.

    Same operations as timm's shifted-window attention (cyclic shift, padding, partition, relative position bias
    plus shift mask, attention fused or not as the block is set, reverse), so ``attn.proj(heads)`` equals
    ``blk._attn(x)`` (eval).
    """
    attn = blk.attn
    b, h, w, c = x.shape
    shift = tuple(blk.shift_size)
    shifted = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2)) if any(shift) else x
    win = blk.window_size
    pad_h, pad_w = (win[0] - h % win[0]) % win[0], (win[1] - w % win[1]) % win[1]
    shifted = F.pad(shifted, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = shifted.shape[1:3]
    windows = window_partition(shifted, win).view(-1, blk.window_area, c)
    mask = blk.get_attn_mask(shifted) if getattr(blk, "dynamic_mask", False) else blk.attn_mask
    n = windows.shape[1]
    qkv = attn.qkv(windows).reshape(windows.shape[0], n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if attn.fused_attn:
        bias = attn._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            mask = mask.view(1, num_win, 1, n, n).expand(windows.shape[0] // num_win, -1, attn.num_heads, -1, -1)
            bias = bias + mask.reshape(-1, attn.num_heads, n, n)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:  # timm's default for Swin (fused attention is experimental there)
        scores = (q * attn.scale) @ k.transpose(-2, -1) + attn._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            scores = scores.view(-1, num_win, attn.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            scores = scores.view(-1, attn.num_heads, n, n)
        heads = attn.softmax(scores) @ v
    heads = heads.transpose(1, 2).reshape(windows.shape[0], n, -1).view(-1, win[0], win[1], c)
    out = window_reverse(heads, win, hp, wp)[:, :h, :w, :].contiguous()
    return torch.roll(out, shifts=shift, dims=(1, 2)) if any(shift) else out


def sparse_swin_block(blk: nn.Module, x: torch.Tensor, active: torch.Tensor,
                      index: torch.Tensor | None = None) -> torch.Tensor:
    """A timm ``SwinTransformerBlock`` (eval) where only ``active`` ``[B, H*W]`` tokens are updated.

    Window attention sees every token (keys/values); output projection, residual, LayerNorm and MLP run on the
    active tokens only. ``index`` ``[B, k]`` (budget mode: the kept positions of each image) replaces the
    ``nonzero`` of ``active``, which keeps every shape static (ONNX export, compilers).
    """
    b, h, w, c = x.shape
    # adaptive: the one host synchronisation of the block (how many tokens run is a shape)
    count = index.numel() if index is not None else int(active.sum())
    if count == b * h * w:
        return blk(x)
    heads = window_attention_heads(blk, blk.norm1(x))
    proj = blk.attn.proj
    flat = x.reshape(b * h * w, c)
    idx = flat_index(index, h * w) if index is not None else true_positions(active.reshape(-1), count)
    tokens = flat.index_select(0, idx) + proj(heads.reshape(b * h * w, c).index_select(0, idx))
    tokens = tokens + blk.mlp(blk.norm2(tokens))
    return flat.index_copy(0, idx, tokens).view(b, h, w, c)


def upsample_tokens(t: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """``[B, L, H*W]`` per-token values -> ``[B, L, H0*W0]`` on a finer grid (nearest: each token's area)."""
    fh, fw = target[0] // grid[0], target[1] // grid[1]
    b, blocks = t.shape[:2]
    up = t.reshape(b, blocks, grid[0], grid[1]).repeat_interleave(fh, dim=2).repeat_interleave(fw, dim=3)
    return up.reshape(b, blocks, target[0] * target[1])
