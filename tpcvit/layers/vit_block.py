"""Running a timm pre-norm ViT ``Block`` on a selection of its tokens (eval executors) and the attention parts
that selection methods read. Same math as ``Block.forward``; only which rows are computed changes."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..tokens import from_padded, pack, select_packed, to_padded, unpack
from ._timm import attention_dim, attention_gate, attention_out_norm


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
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=sel.key_bias)
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


def attention_parts(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, H, T, Dh]`` of a timm ``Attention`` (q/k norms applied)."""
    b, t, _ = x.shape
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_output(attn: nn.Module, o: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, Dh]`` head outputs -> projected ``[B, T, D]``."""
    b, _, t, _ = o.shape
    return attn.proj_drop(attn.proj(attention_out_norm(attn)(o.transpose(1, 2).reshape(b, t, attention_dim(attn)))))


def attend(blk: nn.Module, x: torch.Tensor, key_bias: torch.Tensor | None = None,
           need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A timm pre-norm ``Block`` on ``x`` ``[B, T, D]`` that also returns what selection methods read.

    Returns ``(x_out, cls_attn, weights)``: ``cls_attn`` ``[B, T]`` is the class token's attention over the keys
    (mean over heads; masked keys get 0); ``weights`` ``[B, H, T, T]`` the whole map with ``need_weights``
    (else ``None``: the output then comes from fused attention and only the class row is computed explicitly,
    one query, so inference stays cheap). ``key_bias`` ``[B, 1, 1, T]`` is an additive key mask.
    """
    attn = blk.attn
    q, k, v = attention_parts(attn, blk.norm1(x))
    if need_weights:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        weights = (logits if key_bias is None else logits + key_bias).softmax(dim=-1)
        o = attn.attn_drop(weights) @ v
        cls_attn = weights[:, :, 0].mean(dim=1)
    else:
        weights = None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)
        cls_logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
        cls_attn = (cls_logits if key_bias is None else cls_logits + key_bias).softmax(dim=-1)[:, :, 0].mean(dim=1)
    x = x + blk.drop_path1(blk.ls1(attention_output(attn, o)))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, cls_attn, weights
