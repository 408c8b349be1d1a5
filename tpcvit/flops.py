"""FLOPs that count the work actually done.

``count_gmacs`` runs the model under torch's ``FlopCounterMode`` (matmuls, convolutions, attention) with one
addition: CPU fused attention (``aten._scaled_dot_product_flash_attention_for_cpu``) is missing from torch's
table, which would make dense DeiT-S read 4.24 instead of 4.60 GMACs. Adaptive models are counted image by
image, so batch padding is never counted as work. ``vit_gmacs_from_trace`` gives the same numbers analytically
from a trace (fast, used during evaluation); a test keeps the two in agreement.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .layers import eval_mode, image_geometry, unwrap
from .layers._timm import head_dim
from .policy import ExecutionPolicy
from .propagation import TokenTrace

aten = torch.ops.aten


def _attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """2 * (QK^T + AV) multiply-adds for ``[B, H, S, D]`` inputs."""
    b, h, s_q, d = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * b * h * s_q * s_k * (d + d_v)


def _packed_linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """2 * rows * in * out for oneDNN's packed linear (``tpcvit.onednn_linears``; its packed weight is ``[out, in]``),
    so a converted model counts what ``F.linear`` counts (the fused GELU, like ``F.gelu``, is not counted)."""
    return 2 * math.prod(x_shape[:-1]) * weight_shape[0] * weight_shape[1]


CUSTOM_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
                torch.ops.mkldnn._linear_pointwise: _packed_linear_flops}


def count_flops(fn, *args) -> int:
    """Total FLOPs (2 per multiply-add) of ``fn(*args)``.

    A module's parameters stop requiring grad while it is counted (restored after): the counter's module tracker
    hooks every module input that requires grad, and a view of a parameter still does under ``no_grad`` (SigLIP's
    attention-pool head feeds ``latent.expand(...)`` to a linear), which made it fail with an AssertionError."""
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)  # a module or its bound method
    frozen = [q for q in owner.parameters() if q.requires_grad] if isinstance(owner, nn.Module) else []
    for q in frozen:
        q.requires_grad_(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
            fn(*args)
    finally:
        for q in frozen:
            q.requires_grad_(True)
    return counter.get_total_flops()


def _is_adaptive(model: nn.Module) -> bool:
    """Cost differs per image: adaptive TPC, or a peer with per-image decisions (A-ViT): the reducer protocol's
    ``adaptive``."""
    return any(getattr(m, "adaptive", False) for m in model.modules())


@torch.no_grad()
def count_gmacs(model: nn.Module, x: torch.Tensor) -> float:
    """Mean GMACs per image of ``model`` on ``x``, in eval mode, counting only the work done.

    Adaptive TPC models are run one image at a time (each image's own active set, no padding); dense and
    budget-mode models have the same cost for every image and run as one batch.
    """
    with eval_mode(model):
        if _is_adaptive(model):
            flops = sum(count_flops(model, x[i:i + 1]) for i in range(x.shape[0]))
        else:
            flops = count_flops(model, x)
    return flops / 2 / 1e9 / x.shape[0]


@torch.no_grad()
def measured_gmacs(model: nn.Module, x: torch.Tensor) -> float:
    """Mean GMACs per image of ``model`` on ``x``: :func:`count_gmacs`, except for adaptive token reducers, whose
    cost is read from the trace of one batched pass (``gmacs_per_image``: each image's own work, as evaluation
    reports it) instead of one counted pass per image. Tests keep the two within 1%.

    Why: bisecting a budget (``compare.match_gmacs``) counts ~18 times; per-image counting made an A-ViT
    evaluation take 20 minutes on 256 calibration images.
    """
    inner = unwrap(model)
    traced = hasattr(inner, "forward_with_trace") and hasattr(inner, "gmacs_per_image")
    if not (traced and _is_adaptive(inner)):
        return count_gmacs(model, x)
    with eval_mode(inner):
        _, trace = inner.forward_with_trace(x)
        return inner.gmacs_per_image(trace).mean().item()


def block_linear_macs(blk: nn.Module) -> tuple[int, int, int]:
    """MACs of a transformer block's linears per computed token (query side: q, output projection, gate, MLP) and
    per key/value token (k, v), and the attention width (heads x head size): what its work is made of, read from
    its modules so that any MLP (GELU, SwiGLU) and attention (fused or separate q/k/v, fewer kv heads) counts."""
    attn = blk.attn
    per_query = per_key = 0
    for name, layer in blk.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        macs = layer.in_features * layer.out_features
        if name == "attn.qkv":  # q | k | v rows
            q = attn.num_heads * head_dim(attn) * layer.in_features
            per_query, per_key = per_query + q, per_key + macs - q
        elif name in ("attn.k_proj", "attn.v_proj"):
            per_key += macs
        else:
            per_query += macs
    return per_query, per_key, attn.num_heads * head_dim(attn)


def head_macs(model: nn.Module, num_patches: int) -> float:
    """MACs of ``model.forward_head`` on its final tokens (``num_patches`` plus the prefix tokens): pooling, an
    attention-pool head, norms and classifier, counted by the FLOP counter (for :func:`vit_gmacs_from_counts` where the
    head is not one linear per head, e.g. timm's Eva)."""
    m = unwrap(model)
    param = next(m.parameters())
    feats = torch.zeros(1, num_patches + m.num_prefix_tokens, m.embed_dim, device=param.device, dtype=param.dtype)
    return count_flops(m.forward_head, feats) / 2


def vit_gmacs_from_counts(model: nn.Module, counts: torch.Tensor, extra_macs: float = 0.0,
                          paused_keys: bool | torch.Tensor = False, head_macs: float | None = None,
                          num_patches: int | None = None) -> torch.Tensor:
    """GMACs per image ``[B]`` of a timm ViT whose block ``l`` computes ``counts[:, l]`` patch tokens (plus the
    prefix tokens): patch embedding, blocks, classifier head(s), plus ``extra_macs`` per image. ``paused_keys``:
    every token is a key/value; or ``[B, depth]`` keys/values besides the computed tokens (pooled paused keys).
    ``head_macs``: the head's MACs when they are not one linear per head (an attention-pool head).
    ``num_patches``: the images' patch tokens (a dynamic-size model; default: the model's fixed grid)."""
    m = unwrap(model)
    dim = m.embed_dim
    n = m.patch_embed.num_patches if num_patches is None else num_patches
    if hasattr(m.patch_embed, "stem_macs"):  # convolutional stem (LV-ViT)
        macs = m.patch_embed.stem_macs()
    else:
        conv = m.patch_embed.proj
        macs = n * dim * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    macs += extra_macs
    tokens = counts.double() + m.num_prefix_tokens
    if head_macs is None:
        heads = 2 if getattr(m, "head_dist", None) is not None else 1
        heads += n if getattr(m, "aux_head", None) is not None else 0  # token-labelling head on every patch token
        head_macs = heads * dim * m.num_classes
    if isinstance(paused_keys, torch.Tensor):
        context = tokens + paused_keys.double()
    else:
        context = n + m.num_prefix_tokens if paused_keys else tokens  # every token is a key/value
    per_query, per_key, width = block_linear_macs(m.blocks[0])
    blocks = tokens * per_query + context * per_key + 2 * tokens * context * width
    return (blocks.sum(dim=1) + macs + head_macs) / 1e9


def vit_gmacs_from_trace(model: nn.Module, trace: TokenTrace, head_macs: float | None = None) -> torch.Tensor:
    """GMACs per image ``[B]`` of a TPC ViT's fast path, from the active counts in ``trace`` (``head_macs``: see
    :func:`vit_gmacs_from_counts`)."""
    m = unwrap(model)
    dim, n = m.embed_dim, trace.active.shape[2]
    dense, policy = m.tpc_policy.mode == "dense", m.tpc_policy
    controlled = 0 if dense else len(m.blocks) - m.tpc_cfg.start_layer
    if policy.keeps_every_token(n, range(controlled), m.tpc_cfg.target_keep):
        controlled = 0  # every token kept in every block: inference runs no controller (the runtime's shortcut)
    extra = 0.0
    if m.tpc_cfg.reads_attention:  # the class query against every key, in each controlled block + the seed block
        extra += (controlled + 1 if controlled else 0) * (n + m.num_prefix_tokens) * dim
    if m.tpc_cfg.controller != "attention":  # controller heads, in the blocks that decide (decide_every)
        deciding = sum(policy.decides(c) for c in range(controlled))
        prefix = m.num_prefix_tokens  # with a class token: one [N + prefix, D] x [D, 4] GEMM (ControllerHead)
        extra += deciding * ((n + prefix) * dim * 4 if prefix else n * dim * 2 + dim * 2)
    extra += len(m.stabilizers) * n * dim * 9  # depthwise 3x3
    keys = m.tpc_cfg.paused_keys and not dense
    if keys and m.tpc_cfg.paused_key_pool > 1:  # every window's pooled key/value, in a block that pauses any token
        windows = math.prod(-(-side // m.tpc_cfg.paused_key_pool) for side in trace.grid)  # (static shapes)
        keys = (~trace.active).any(dim=2) * windows
    return vit_gmacs_from_counts(m, trace.active_counts(), extra, paused_keys=keys, head_macs=head_macs,
                                 num_patches=n)


def swin_gmacs_from_trace(model: nn.Module, trace: TokenTrace) -> torch.Tensor:
    """GMACs per image ``[B]`` of a TPC Swin: dense GMACs (FLOP counter, cached) minus the output projection +
    LayerNorm + MLP work of each paused token, plus the controller heads."""
    m = unwrap(model)
    device = trace.active.device
    if not hasattr(m, "_dense_gmacs"):
        dense = ExecutionPolicy(mode="dense")
        probe = torch.zeros(1, *image_geometry(m), device=device)
        with eval_mode(m), torch.no_grad():
            flops = count_flops(lambda t: m.forward_head(m._propagate(t, dense, with_trace=False)[0]), probe)
        m._dense_gmacs = flops / 2 / 1e9
    blocks = m.block_list
    saved = torch.zeros(trace.active.shape[0], dtype=torch.float64, device=device)
    g = 0
    for t in trace.stages:
        for j in range(t.active.shape[1]):
            blk = blocks[g]
            per_token = blk.mlp.fc1.in_features * blk.mlp.fc1.out_features * 2 + blk.attn.proj.in_features ** 2
            saved += (~t.active[:, j]).sum(dim=1).double() * per_token
            g += 1
    controlled, start, policy = 0.0, m.tpc_cfg.start_layer, m.tpc_policy
    if policy.mode != "dense":  # controller heads: 2 logits from each token of every controlled block
        first = 0  # a stage keeping every token in budget mode runs no controller at inference (runtime shortcut)
        for t in trace.stages:
            last, n = first + t.active.shape[1], t.active.shape[2]
            if not policy.keeps_every_token(n, range(max(first, start) - start, last - start), m.tpc_cfg.target_keep):
                controlled += sum(blocks[i].dim * 2 * n for c, i in enumerate(range(max(first, start), last))
                                  if policy.decides(c))  # the blocks that decide (decide_every)
            first = last
    return m._dense_gmacs - saved / 1e9 + controlled / 1e9
