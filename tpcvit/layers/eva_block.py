"""Running a timm ``EvaBlock`` (EVA-02, DINOv3, RoPE ViTs, Perception Encoder) on a selection of its tokens.

These models have no position in the tokens: every block rotates its queries and keys by the rotary table of the
tokens' grid positions (RoPE). A token selection must therefore carry its rows of the table with it
(:func:`rope_rows`); the block itself is timm's (its forward takes a per-image table, as timm's own patch dropout
uses it). Paused tokens as keys (:func:`eva_context_block`) keep their own positions: the selected queries are
rotated by theirs, every key by its own.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..tokens import pool_paused, spread_paused
from ._timm import head_dim, rotate
from .geometry import check_fixed_grid, check_images
from .onednn import linear_rows
from .vit_block import class_row_attention


def check_timm_eva(model: nn.Module, who: str, dynamic_ok: bool = False) -> None:
    """A one-line error naming what an ``Eva`` model lacks for ``who`` (TPC's patch): a patch grid, no patch
    dropout, timm's pre-norm ``EvaBlock`` with ``EvaAttention`` or ``AttentionRope``."""
    import timm.layers
    from timm.models.eva import EvaAttention, EvaBlock

    attentions = tuple(c for c in (EvaAttention, getattr(timm.layers, "AttentionRope", None)) if c is not None)

    check_fixed_grid(model, who, dynamic_ok)
    if getattr(model, "patch_drop", None) is not None:
        raise ValueError(f"{who} selects tokens itself: create the model with patch_drop_rate=0")
    other = sorted({f"{type(b).__name__}/{type(getattr(b, 'attn', None)).__name__}" for b in model.blocks
                    if type(b) is not EvaBlock or type(b.attn) not in attentions})
    if other:
        raise ValueError(f"blocks {other} are not timm's pre-norm EvaBlock with EvaAttention/AttentionRope: {who} "
                         "runs a block on a token selection through those parts")


def eva_embed(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A timm ``Eva``'s tokens (patch embedding, prefix tokens, ``norm_pre``) and its rotary table (``None``
    without one; per block ``[depth, heads, N, C]`` with ``rope_mixed``), as ``Eva.forward_features`` makes them,
    with a clear error for images of the wrong shape."""
    check_images(model, images)
    x, rope = model._pos_embed(model.patch_embed(images))
    return model.norm_pre(x), rope


def rope_rows(rope: torch.Tensor | None, index: torch.Tensor | None, num_prefix: int) -> torch.Tensor | None:
    """The rotary table rows of the tokens at buffer positions ``index`` ``[B, n]`` (prefix tokens first; they
    have no rotation): ``[B, 1 or heads, n - prefix, C]``, the per-image table timm's Eva attention accepts.
    ``index=None``: every token, the table itself."""
    if rope is None or index is None:
        return rope
    patches = index[:, num_prefix:] - num_prefix
    rows = rope.index_select(-2, patches.reshape(-1)).unflatten(-2, patches.shape)  # [..., B, n, C]
    return rows.unsqueeze(1) if rope.dim() == 2 else rows.transpose(0, 1)


def _rows_per_token(rope: torch.Tensor, batch: int) -> torch.Tensor:
    """A rotary table (``[N, C]`` or per head ``[heads, N, C]``) as one row per token ``[B, N, heads * C]``: what
    token pooling works on."""
    table = rope if rope.dim() == 3 else rope[None]
    h, n, c = table.shape
    return table.permute(1, 0, 2).reshape(1, n, h * c).expand(batch, n, h * c)


def pool_rope(rope: torch.Tensor, paused: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """The rotation of each window's pooled paused key (``paused_key_pool``): the mean of its paused tokens' table
    rows ``[B, 1 or heads, W, C]``. A rotation is linear in its sin/cos table, so a key rotated by the mean rows is the
    mean of the key rotated by each paused token's own rows; with the pooled token's key in place of each token's
    (what pooling already assumes), that is the pooled key. ``paused`` ``[B, N]`` (bool or float states)."""
    means, _ = pool_paused(_rows_per_token(rope, paused.shape[0]), paused, grid, window)
    return means.unflatten(2, (rope.shape[0] if rope.dim() == 3 else 1, rope.shape[-1])).transpose(1, 2)


def spread_rope(rope: torch.Tensor, paused: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Masked path of :func:`pool_rope`: every token's rows ``[B, 1 or heads, N, C]``, a paused token's (``paused``
    ``[B, N]`` in [0, 1]) replaced by its window's pooled rows, as its features are by the window's mean
    (:func:`~tpcvit.tokens.spread_paused` on the table)."""
    spread = spread_paused(_rows_per_token(rope, paused.shape[0]), paused, grid, window)
    return spread.unflatten(2, (rope.shape[0] if rope.dim() == 3 else 1, rope.shape[-1])).transpose(1, 2)


def _rotate(x: torch.Tensor, rope: torch.Tensor | None, num_prefix: int, half: bool, like: torch.Tensor):
    """timm's rotation of queries or keys ``[B, H, n, Dh]``: the prefix tokens unrotated, the rest by ``rope``."""
    if rope is None:
        return x
    rotated = rotate(x[:, :, num_prefix:], rope, half)
    return torch.cat([x[:, :, :num_prefix], rotated], dim=2).type_as(like)


def _qkv_rows(attn: nn.Module, x: torch.Tensor, rows: slice) -> torch.Tensor:
    """The fused qkv projection's output ``rows`` (queries, or keys and values) on ``x``: packed for oneDNN linears
    (:func:`tpcvit.layers.onednn_linears`); EvaAttention keeps its q/k/v biases apart (k's a zero buffer)."""
    if getattr(attn, "q_bias", None) is None:
        return linear_rows(attn.qkv, x, rows)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    return F.linear(x, attn.qkv.weight[rows], bias[rows])


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def eva_queries(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Queries ``[B, H, n, Dh]`` of normed tokens ``x`` (q norm applied; not rotated)."""
    if attn.qkv is None:
        return attn.q_norm(_heads(attn.q_proj(x), attn.num_heads))
    return attn.q_norm(_heads(_qkv_rows(attn, x, slice(None, attn.num_heads * head_dim(attn))), attn.num_heads))


def eva_keys_values(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (k norm applied; not rotated) and values ``[B, H_kv, n, Dh]`` of normed tokens ``x``."""
    heads = getattr(attn, "num_kv_heads", attn.num_heads)
    if attn.qkv is None:
        return attn.k_norm(_heads(attn.k_proj(x), heads)), _heads(attn.v_proj(x), heads)
    kv = _qkv_rows(attn, x, slice(attn.num_heads * head_dim(attn), None))
    k, v = kv.view(*x.shape[:2], 2, heads, head_dim(attn)).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.k_norm(k), v


def eva_attention_half(blk: nn.Module, tokens: torch.Tensor, rope_tokens: torch.Tensor | None, num_prefix: int,
                       context: torch.Tensor | None = None, rope_context: torch.Tensor | None = None,
                       key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention half of a timm ``EvaBlock``: ``(tokens + attention output, q, k)``, q and k rotated
    (``[B, H, n or T, Dh]``, grouped kv heads repeated). ``tokens`` ``[B, n, D]`` query ``context`` ``[B, T, D]``
    (default: themselves); ``rope_tokens`` / ``rope_context``: the rotary rows of their patch tokens
    (:func:`rope_rows`; per image ``[B, 1 or heads, n, C]`` or the model's table). Follow with :func:`eva_mlp_half`.
    For methods that change the tokens between attention and MLP (the peers) and for :func:`eva_context_block`."""
    attn = blk.attn
    b, n, _ = tokens.shape
    if context is None:
        context, rope_context = tokens, rope_tokens
    half = getattr(attn, "rotate_half", False)
    normed = blk.norm1(tokens)
    normed_context = normed if context is tokens else blk.norm1(context)
    k, v = eva_keys_values(attn, normed_context)
    k = _rotate(k, rope_context, num_prefix, half, v)
    q = _rotate(eva_queries(attn, normed), rope_tokens, num_prefix, half, v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:  # grouped-query attention: each kv head serves `groups` query heads (timm's order)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)
    del v
    o = attn.norm(o.transpose(1, 2).reshape(b, n, -1))
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(normed).sigmoid()
    o = attn.proj_drop(attn.proj(o))
    return tokens + blk.drop_path1(o if blk.gamma_1 is None else blk.gamma_1 * o), q, k


def eva_mlp_half(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP half of a timm ``EvaBlock`` (``x + mlp(norm2(x))``, LayerScale and drop path as timm's)."""
    m = blk.mlp(blk.norm2(x))
    return x + blk.drop_path2(m if blk.gamma_2 is None else blk.gamma_2 * m)


def eva_attend(blk: nn.Module, x: torch.Tensor, rope_tokens: torch.Tensor | None, num_prefix: int,
               key_bias: torch.Tensor | None = None, need_weights: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A timm ``EvaBlock`` on ``x`` ``[B, T, D]`` that also returns what selection methods read, as
    :func:`~tpcvit.layers.attend` does for timm's ``Block``: ``(x_out, cls_attn [B, T], weights)``. The output
    comes from fused attention; ``need_weights`` recomputes the whole map ``[B, H, T, T]`` from the rotated q and k
    (for a loss on it: the same map, without attention dropout, which Eva models set to 0)."""
    out, q, k = eva_attention_half(blk, x, rope_tokens, num_prefix, key_bias=key_bias)
    cls_attn = class_row_attention(q, k, key_bias)
    weights = None
    if need_weights:
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        weights = (logits if key_bias is None else logits + key_bias).softmax(dim=-1)
    del q, k
    return eva_mlp_half(blk, out), cls_attn, weights


def eva_context_block(blk: nn.Module, tokens: torch.Tensor, context: torch.Tensor, rope_tokens: torch.Tensor | None,
                      rope_context: torch.Tensor | None, num_prefix: int, class_attention: bool = False,
                      key_bias: torch.Tensor | None = None):
    """A timm ``EvaBlock`` updating ``tokens`` ``[B, n, D]`` while attending to ``context`` ``[B, T, D]`` (paused
    keys: the whole buffer, paused tokens with their frozen features). Same math as ``EvaBlock.forward`` on the full
    sequence, restricted to the rows of ``tokens``; ``rope_tokens`` / ``rope_context``: the tables of their patch
    tokens (:func:`rope_rows`). ``class_attention=True`` also returns the class token's attention over every key
    times their number (``[B, T]``; the mean query stands in without a class token), as
    :func:`~tpcvit.layers.context_block` does."""
    out, q, k = eva_attention_half(blk, tokens, rope_tokens, num_prefix, context, rope_context, key_bias)
    row = None
    if class_attention:
        query = q[:, :, :1] if num_prefix else eva_queries(blk.attn, blk.norm1(context).mean(dim=1, keepdim=True))
        row = class_row_attention(query, k, key_bias) * context.shape[1]
    del q, k  # freed before the MLP, as in timm's block
    out = eva_mlp_half(blk, out)
    return out if row is None else (out, row)
