"""Running a timm pre-norm ViT ``Block`` on a selection of its tokens (eval executors) and the attention parts
that selection methods read. Same math as ``Block.forward``; only which rows are computed changes."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..tokens import PackedSelection, from_padded, pack, select_packed, to_padded, unpack
from ._timm import attention_dim, attention_gate, attention_out_norm
from .geometry import check_fixed_grid, embed_tokens
from .onednn import OneDNNLinear, OneDNNMlp, PackedLinear, autocast_cpu, linear_rows, packable, traced, version


def supports_packing(blk: nn.Module) -> bool:
    """Packed execution re-implements timm's pre-norm ``Block`` + ``Attention``; anything else uses padding."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    return type(blk) is Block and type(blk.attn) is Attention and attention_gate(blk.attn) is None


def check_timm_vit(model: nn.Module, who: str, dynamic_ok: bool = False) -> None:
    """A one-line error naming what ``model`` lacks for a token reducer that runs timm's ViT blocks on token
    selections (``who``: TPC's patch, a peer): a timm ``VisionTransformer``, a patch grid (fixed unless
    ``dynamic_ok``), timm's ``Block``."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        kind = type(model).__name__
        hint = {"SwinTransformer": "; for Swin use timm.create_model('tpc_swin_tiny_patch4_window7_224') (or _small)",
                "Eva": " (EVA-02, DINOv3, RoPE ViTs, Perception Encoder: rotary position embeddings; tpcvit.patch "
                       "and tpcvit.with_tpc run them, the peers do not yet)"}.get(kind, "")
        raise TypeError(f"{who} works on timm VisionTransformer models (DeiT, ViT, AugReg, CLIP, SigLIP, DINOv2, "
                        f"register tokens, ...), got {kind}{hint}; the models tpcvit.patch runs on: "
                        "benchmarks/results/timm_coverage.md")
    check_fixed_grid(model, who, dynamic_ok)
    other = sorted({type(b).__name__ + (f"/{type(b.attn).__name__}" if hasattr(b, "attn") else "")
                    for b in model.blocks if not supports_packing(b)})
    if other:
        raise ValueError(f"blocks {other} are not timm's pre-norm Block with Attention: {who} runs a block on a "
                         "token selection through that block's parts (qkv, proj, mlp, layer scale)")


def packed_block(blk: nn.Module, x: torch.Tensor, active: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Run a timm ``Block`` (eval) on the active tokens of ``x`` only, with no padding in the per-token layers.

    qkv, output projection and MLP see exactly the M active tokens of the batch; only the attention product uses the
    padded ``[B, n_max]`` layout with a key mask. Same math as ``Block.forward`` on the gathered tokens.
    """
    sel = select_packed(active, num_prefix, x.dtype)
    return blk(x) if sel is None else packed_selection_block(blk, x, sel)  # None: every token active


def packed_selection_block(blk: nn.Module, x: torch.Tensor, sel: PackedSelection) -> torch.Tensor:
    """:func:`packed_block` on a selection already made (blocks sharing one decision make it once)."""
    attn = blk.attn
    b = x.shape[0]
    tokens = pack(x, sel)
    qkv = to_padded(attn.qkv(blk.norm1(tokens)), sel, b)
    q, k, v = qkv.reshape(b, sel.n_max, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=sel.key_bias)
    o = from_padded(o.transpose(1, 2).reshape(b, sel.n_max, attention_dim(attn)), sel)
    del qkv, q, k, v  # freed before the MLP, as in timm's block (see _plain_attention)
    tokens = tokens + blk.ls1(attn.proj(attention_out_norm(attn)(o)))
    tokens = tokens + blk.ls2(blk.mlp(blk.norm2(tokens)))
    return unpack(x, sel, tokens)


Linear = tuple[torch.Tensor, torch.Tensor | None] | PackedLinear  # (weight.t(), bias), or packed for oneDNN


@dataclass(frozen=True)
class PlainBlock:
    """The tensors of a plain timm pre-norm ``Block``: LayerNorms, ``Attention`` with no q/k norm, output norm or
    gate, no LayerScale, an exact-GELU ``Mlp``. Such a block is a fixed formula of these tensors, so inference can
    call the tensor ops directly instead of a dozen module calls (:func:`block_forward`).

    Every linear is kept as ``(weight.t(), bias)``, views of its parameters (``q`` / ``kv``: the rows of ``qkv``
    for the selected queries / for every key), so a linear is one ``addmm`` (:func:`_affine`): what ``F.linear``
    computes, without its transpose and slicing dispatches. A block whose linears were converted by
    :func:`tpcvit.layers.onednn_linears` keeps them packed instead (:class:`PackedLinear`, fc1 with its GELU)."""

    heads: int
    eps: float
    norm1: tuple[torch.Tensor, torch.Tensor]
    qkv: Linear
    q: Linear
    kv: Linear
    proj: Linear
    norm2: tuple[torch.Tensor, torch.Tensor]
    fc1: Linear
    fc2: Linear


def _affine(rows: torch.Tensor, linear: Linear) -> torch.Tensor:
    """``F.linear(rows, weight, bias)`` for ``[M, C]`` rows from a :class:`PlainBlock` ``(weight.t(), bias)``: the
    same ``addmm`` ``F.linear`` calls (bitwise the same result); a packed linear runs oneDNN."""
    if type(linear) is PackedLinear:
        return linear(rows)
    weight_t, bias = linear
    return rows.mm(weight_t) if bias is None else torch.addmm(bias, rows, weight_t)


def _affine_gelu(rows: torch.Tensor, linear: Linear) -> torch.Tensor:
    """``F.gelu(_affine(rows, linear))``: one oneDNN call for a packed linear."""
    return linear(rows, gelu=True) if type(linear) is PackedLinear else F.gelu(_affine(rows, linear))


# block -> (generation, slots, packed, pointers, PlainBlock)
_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# Bumped whenever any module anywhere registers a parameter or a submodule (torch's global registration hooks: a
# part or a weight replaced, ``load_state_dict(assign=True)``, the fake parameters of ``torch.export``): every
# cached PlainBlock is then checked afresh. A weight whose data moves (``.to()`` / ``.half()`` swap ``param.data``)
# changes its data pointer, which the cache compares too, read from the modules' parameter dicts: a ``.to()`` that
# puts new Parameter objects there without registering them (to or from the meta device, ``to_empty``) is seen.
_GENERATION = [0]


def _registered(*_args) -> None:
    _GENERATION[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_registered)
torch.nn.modules.module.register_module_module_registration_hook(_registered)


def _slots(blk: nn.Module) -> tuple[tuple[dict, str], ...]:
    """Where every parameter of the block lives, ``(owner's parameter dict, name)``: the cache reads the current
    parameters' data pointers through them (a dict lookup each, no module attribute access)."""
    return tuple((m._parameters, n) for m in blk.modules() for n, t in m._parameters.items() if t is not None)


def _pointers(slots: tuple[tuple[dict, str], ...], packed: bool) -> list:
    """Each parameter's data pointer; for a ``packed`` block (oneDNN copies of its weights, which must follow an
    in-place ``copy_`` too) also its version. Views follow in-place writes by themselves, so an unpacked block skips
    the versions (~1 us instead of ~3 us per block call)."""
    if packed:
        return [(d[n].data_ptr(), version(d[n])) for d, n in slots]
    return [d[n].data_ptr() for d, n in slots]


def plain_block(blk: nn.Module) -> PlainBlock | None:
    """``blk``'s tensors when it is a plain timm pre-norm ``Block`` (see :class:`PlainBlock`), else ``None``.

    Cached per block under no_grad (checking the structure reads ~40 module attributes, as long as the block itself
    at batch 1); a cached entry is trusted while no module registered a parameter or submodule since and its
    weights' data pointers and versions are unchanged (~2 us); with autograd on, built afresh.
    """
    if torch.is_grad_enabled() or traced() or autocast_cpu():
        # traced (torch.compile / export / ONNX): the graph holds the result, with F.linear's ops; autograd: views
        # made now carry the gradient to the parameters (cached ones made under no_grad would not); CPU autocast
        # casts the linears: views, not float32 oneDNN packs
        return _plain_block(blk)
    cached = _PLAIN.get(blk)
    if cached is not None and cached[0] == _GENERATION[0] and _pointers(cached[1], cached[2]) == cached[3]:
        return cached[4]
    plain = _plain_block(blk, packed=True)
    slots = () if plain is None else _slots(blk)
    packed = plain is not None and type(plain.qkv) is PackedLinear
    _PLAIN[blk] = (_GENERATION[0], slots, packed, _pointers(slots, packed), plain)
    return plain


def _plain_block(blk: nn.Module, packed: bool = False) -> PlainBlock | None:
    """``packed`` (the inference cache): linears converted by :func:`onednn_linears` with float32 CPU weights are
    kept packed."""
    from timm.layers import LayerNorm, Mlp

    if not supports_packing(blk):
        return None
    attn, mlp = blk.attn, blk.mlp
    norms = (blk.norm1, blk.norm2)
    identities = (blk.ls1, blk.ls2, attn.q_norm, attn.k_norm, attention_out_norm(attn), mlp.norm)
    layer_norm = (nn.LayerNorm, LayerNorm)
    if (type(mlp) not in (Mlp, OneDNNMlp) or type(mlp.act) is not nn.GELU or mlp.act.approximate != "none"
            or not all(isinstance(m, nn.Identity) for m in identities)
            or not all(type(n) in layer_norm and n.elementwise_affine and n.bias is not None for n in norms)
            or blk.norm1.eps != blk.norm2.eps or attention_dim(attn) != blk.norm1.normalized_shape[0]):
        return None
    d = attention_dim(attn)
    linears = (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)
    if packed and all(type(m) is OneDNNLinear and packable(m.weight) for m in linears):
        qkv = attn.qkv
        return PlainBlock(attn.num_heads, blk.norm1.eps, (blk.norm1.weight, blk.norm1.bias), qkv.packed_rows(),
                          qkv.packed_rows(slice(None, d)), qkv.packed_rows(slice(d, None)), attn.proj.packed_rows(),
                          (blk.norm2.weight, blk.norm2.bias), mlp.fc1.packed_rows(), mlp.fc2.packed_rows())
    weight, bias = attn.qkv.weight, attn.qkv.bias
    split = lambda rows: (weight[rows].t(), None if bias is None else bias[rows])  # noqa: E731
    return PlainBlock(attn.num_heads, blk.norm1.eps, (blk.norm1.weight, blk.norm1.bias),
                      split(slice(None)), split(slice(None, d)), split(slice(d, None)),
                      (attn.proj.weight.t(), attn.proj.bias), (blk.norm2.weight, blk.norm2.bias),
                      (mlp.fc1.weight.t(), mlp.fc1.bias), (mlp.fc2.weight.t(), mlp.fc2.bias))


def _has_hooks(blk: nn.Module) -> bool:
    """Forward hooks on the block (or global ones) must see its call: such a block is run as ``blk(x)``."""
    from torch.nn.modules import module as _module

    return bool(blk._forward_hooks or blk._forward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks)


def block_forward(blk: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``blk(x, attn_mask=attn_mask)`` at inference with the tensor ops called directly (bitwise the same result).

    A timm block call is ~20 module calls (norms, attention, its projections, the MLP, identities for LayerScale,
    drop-path and dropout): at batch 1 on a small model their Python overhead is a third of the block's time. A
    plain block (:func:`plain_block`) outside training and without forward hooks (they must see the call) runs as
    the same tensor ops in the same order; anything else is ``blk(x)``. Every token reducer runs its blocks
    through this, so the dense timm model is the only baseline that pays the module calls.
    """
    p = _lean(blk)
    if p is None:
        return blk(x, attn_mask=attn_mask)
    b, n, d = x.shape
    return _plain_rows(p, x.reshape(b * n, d), b, attn_mask).view(b, n, d)


def block_rows(blk: nn.Module, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """:func:`block_forward` on flattened ``[B * n, D]`` rows of ``batch`` images (blocks sharing one selection
    pass rows from block to block, no reshape in between)."""
    p = _lean(blk)
    if p is None:
        return blk(rows.view(batch, -1, rows.shape[-1])).flatten(0, 1)
    return _plain_rows(p, rows, batch, None)


def _lean(blk: nn.Module) -> PlainBlock | None:
    """The block's tensors when it can run as tensor ops (plain, eval, no forward hooks, fused attention)."""
    return None if blk.training or _has_hooks(blk) or not blk.attn.fused_attn else plain_block(blk)


def _plain_rows(p: PlainBlock, rows: torch.Tensor, b: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """A plain block on ``[B * n, D]`` rows: per-token layers on the flattened rows, where a linear is one addmm
    (what F.linear does to 3-D input after two views), so the block is 5 dispatches shorter, bitwise the same."""
    return _plain_tail(p, rows + _affine(_plain_attention(p, rows, b, attn_mask), p.proj))


def _plain_attention(p: PlainBlock, rows: torch.Tensor, b: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """The attention heads' output ``[B * n, D]`` (before the projection). Its own function so that qkv is freed
    before the MLP runs, as in timm's block: kept alive through the MLP, it made the block 6-10% slower at DeiT-S
    batch 32 on CPU (a larger peak for the allocator; paired, rotated rounds)."""
    q, k, v = _plain_qkv(p, rows, b)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(-1, rows.shape[-1])


def _plain_qkv(p: PlainBlock, rows: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, H, n, Dh]`` of a plain block for ``[B * n, D]`` rows: one LayerNorm, one addmm."""
    d = rows.shape[-1]
    qkv = _affine(F.layer_norm(rows, (d,), *p.norm1, p.eps), p.qkv)
    return qkv.view(b, -1, 3, p.heads, d // p.heads).permute(2, 0, 3, 1, 4).unbind(0)


def _plain_tail(p: PlainBlock, rows: torch.Tensor) -> torch.Tensor:
    """The MLP half of a plain block on ``[M, D]`` rows (after the attention residual)."""
    d = rows.shape[-1]
    return rows + _affine(_affine_gelu(F.layer_norm(rows, (d,), *p.norm2, p.eps), p.fc1), p.fc2)


def context_block(blk: nn.Module, tokens: torch.Tensor, context: torch.Tensor, class_attention: bool = False,
                  num_prefix: int = 1, key_bias: torch.Tensor | None = None):
    """A timm ``Block`` (eval) updating ``tokens`` ``[B, n, D]`` while attending to ``context`` ``[B, T, D]``.

    For ``paused_keys``: the queries, attention output and MLP run on the selected tokens only; keys and values
    come from the whole buffer, where paused tokens hold their frozen features. Same math as ``Block.forward``
    on the full sequence, restricted to the rows of ``tokens``. A plain block (:func:`plain_block`) runs as tensor
    ops without module calls (bitwise the same result, a third fewer dispatches at batch 1).

    ``class_attention=True`` also returns the class token's attention over every key, times the number of keys
    (``[B, T]``, 1 = uniform; the mean query stands in for models without a class token): the signal of the
    training-free controller, one extra query row. ``key_bias`` ``[B, 1, 1, T]``: added to the attention logits
    (padding keys, pooled paused keys).
    """
    b, n, d = tokens.shape
    out = context_rows(blk, tokens.reshape(b * n, d), context.reshape(-1, d), b, class_attention, num_prefix,
                       key_bias)
    if not class_attention:
        return out.view(b, n, d)
    return out[0].view(b, n, d), out[1]


def context_rows(blk: nn.Module, rows: torch.Tensor, context: torch.Tensor, batch: int,
                 class_attention: bool = False, num_prefix: int = 1, key_bias: torch.Tensor | None = None):
    """:func:`context_block` on flattened rows: ``rows`` ``[B * n, D]`` (n tokens of each of ``batch`` images),
    ``context`` ``[B * T, D]``; returns ``[B * n, D]``. Blocks that share one selection (a group deciding once)
    pass rows from block to block and write them into the flattened buffer, with no reshape in between."""
    attn = blk.attn
    d, heads, b = attn.num_heads * attn.head_dim, attn.num_heads, batch
    n, t = rows.shape[0] // b, context.shape[0] // b
    p = None if blk.training else plain_block(blk)
    if p is None:
        q = linear_rows(attn.qkv, blk.norm1(rows), slice(None, d))
        kv = linear_rows(attn.qkv, blk.norm1(context), slice(d, None))
    else:
        q = _affine(F.layer_norm(rows, (d,), *p.norm1, p.eps), p.q)
        kv = _affine(F.layer_norm(context, (d,), *p.norm1, p.eps), p.kv)
    q = q.view(b, n, heads, attn.head_dim).transpose(1, 2)
    k, v = kv.view(b, t, 2, heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if p is None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias).transpose(1, 2).reshape(b * n, d)
    row = None
    if class_attention:
        if num_prefix:
            query = q[:, :, :1]
        else:  # no class token: the query of the buffer's mean (normed) token, the same whatever is selected
            mean = linear_rows(attn.qkv, blk.norm1(context.view(b, t, d)).mean(dim=1, keepdim=True), slice(None, d))
            query = attn.q_norm(mean.view(b, 1, heads, attn.head_dim).transpose(1, 2))
        row = class_row_attention(query, k, key_bias) * t
        del query
    del q, k, v, kv  # freed before the MLP, as in timm's block (see _plain_attention)
    if p is None:
        rows = rows + blk.ls1(attn.proj(attention_out_norm(attn)(o)))
        del o
        out = rows + blk.ls2(blk.mlp(blk.norm2(rows)))
    else:
        rows = rows + _affine(o, p.proj)
        del o
        out = _plain_tail(p, rows)
    return out if row is None else (out, row)


def attention_half(blk: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention half of a timm ``Block``: ``(x + attention output, q, k)`` (``[B, H, T, Dh]``, q/k norms
    applied), for methods that change the tokens between attention and MLP (EViT, ToMe) or read q/k (IdleViT).

    A plain block at inference (:func:`plain_block`) runs as tensor ops, the executor :func:`block_forward` uses,
    so such a peer is timed on the same footing as TPC and the lean dense model; otherwise timm's modules (training:
    drop-path included). Follow with :func:`mlp_half`. ``attn_mask``: additive ``[B, 1, 1, T]`` key bias."""
    p = _lean(blk)
    if p is None:
        attn = blk.attn
        q, k, v = attention_parts(attn, blk.norm1(x))
        bias = attn_mask if attn_mask is None else attn_mask.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return x + blk.drop_path1(blk.ls1(attention_output(attn, o))), q, k
    b, t, d = x.shape
    q, k, v = _plain_qkv(p, x.reshape(b * t, d), b)
    bias = attn_mask if attn_mask is None else attn_mask.to(q.dtype)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b * t, d)
    return x + _affine(o, p.proj).view(b, t, d), q, k


def class_row_attention(q: torch.Tensor, k: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The first query's (the class token's) attention over every key, mean over heads, ``[B, T]``: one query row,
    not the whole map. ``q`` ``[B, H, >=1, Dh]``, ``k`` ``[B, H, T, Dh]``, timm's scale ``Dh ** -0.5``."""
    logits = (q[:, :, :1] * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return (logits if key_bias is None else logits + key_bias).softmax(dim=-1)[:, :, 0].mean(dim=1)


def mlp_half(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP half of a timm ``Block`` (``x + mlp(norm2(x))``), lean for a plain block at inference."""
    p = _lean(blk)
    if p is None:
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    b, t, d = x.shape
    return _plain_tail(p, x.reshape(b * t, d)).view(b, t, d)


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
    if not need_weights:  # fused attention for the output, the class row alone: the lean executor at inference
        x, q, k = attention_half(blk, x, key_bias)
        return mlp_half(blk, x), class_row_attention(q, k, key_bias), None
    attn = blk.attn
    q, k, v = attention_parts(attn, blk.norm1(x))
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    weights = (logits if key_bias is None else logits + key_bias).softmax(dim=-1)
    o = attn.attn_drop(weights) @ v
    cls_attn = weights[:, :, 0].mean(dim=1)
    x = x + blk.drop_path1(blk.ls1(attention_output(attn, o)))
    return mlp_half(blk, x), cls_attn, weights


def lean_dense(model: nn.Module) -> LeanDenseViT | None:
    """``model`` on the lean executor (:class:`LeanDenseViT`), or ``None`` when it is not a timm
    ``VisionTransformer`` (Swin): the one place the benches decide whether a backbone has a ``dense-lean`` row."""
    from timm.models.vision_transformer import VisionTransformer

    return LeanDenseViT(model) if isinstance(model, VisionTransformer) else None


class LeanDenseViT(nn.Module):
    """A dense timm ``VisionTransformer`` whose blocks run through :func:`block_forward`, the executor every token
    reducer here runs its blocks with: the fair dense baseline for latency.

    timm's own forward pays ~20 module calls per block; at batch 1 on a small model that is a large share of the
    time (main-job model: ~25%), so "speed-up over timm's dense model" mixes the token saving with the leaner
    execution. Over this model the speed-up is the token reduction's alone. Same outputs as the wrapped model
    (bitwise on DeiT, distilled DeiT, LV-ViT and register-token ViTs; within float rounding with average pooling);
    training and anything :func:`block_forward` cannot run lean fall back to the block's call.
    """

    def __init__(self, dense: nn.Module) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(dense, VisionTransformer):
            raise TypeError(f"the lean dense baseline runs timm VisionTransformer models, got {type(dense).__name__}")
        self.dense = dense
        self.training = dense.training  # its mode, not a fresh module's training mode (train(True) would spread it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.dense
        x = embed_tokens(m, x)
        for blk in m.blocks:
            x = block_forward(blk, x)
        return m.forward_head(m.norm(x))
