"""What every peer method shares: its trace, its single budget knob, and the hooks the engine and harness use.

A peer is a timm ``VisionTransformer`` subclass (so a dense timm/DeiT checkpoint loads unchanged) that exposes

- ``forward_with_trace(x) -> (logits, PeerTrace)`` and ``forward(x, return_trace=False)``;
- ``budget`` with ``set_budget(value)``, ``budget_bounds`` and ``budget_raises_compute`` (the direction), so the
  harness can bisect the knob to a GMACs target (:func:`tpcvit.compare.match_gmacs`);
- ``reduction_loss(trace, train_cfg)`` (zero unless the method learns its decisions) and
  ``gmacs_per_image(trace)`` (the work actually done, for the training logs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._timm import attention_dim, attention_out_norm

# every peer method, by the prefix of its registered model names (``<method>_deit_<size>_patch16_224``)
PEER_METHODS = ("tome", "evit", "avit", "idlevit", "dynamicvit")
PEER_PREFIXES = tuple(f"{m}_" for m in PEER_METHODS)


@dataclass
class PeerTrace:
    """``keep`` ``[B, depth]``: tokens each block computes, as a fraction of the patch tokens (a merged or fused
    token counts as one). ``active`` ``[B, depth, N]`` for methods with per-token decisions (A-ViT)."""

    keep: torch.Tensor
    active: torch.Tensor | None = None
    extras: dict | None = None

    def keep_ratio(self) -> torch.Tensor:
        return self.keep.float().mean(dim=0)

    def keep_per_image(self) -> torch.Tensor:
        return self.keep.float()


class PeerMixin:
    """Budget knob and engine hooks; subclasses set the class attributes and implement ``_run``."""

    method: str = ""
    budget_bounds: tuple[float, float] = (0.0, 1.0)
    budget_raises_compute: bool = True
    per_image_compute: bool = False  # adaptive: cost differs per image, count image by image
    added_modules: tuple[str, ...] = ()  # modules the method adds to the backbone (absent from dense weights)

    def _init_peer(self, budget: float) -> None:
        self._gmacs_cache: dict[tuple, float] = {}
        self.set_budget(budget)

    def set_budget(self, value: float) -> None:
        lo, hi = self.budget_bounds
        if not lo <= float(value) <= hi:
            raise ValueError(f"{self.method} budget must be in [{lo}, {hi}], got {value}")
        self.budget = float(value)

    def _run(self, x: torch.Tensor, path: str | None = None) -> tuple[torch.Tensor, PeerTrace]:
        """Features and trace. ``path`` forces ``"fast"`` (gather) or ``"masked"`` regardless of train/eval, for
        methods that have both (static-shape methods without a masked path ignore it)."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError(f"{self.method} makes its own token sets; attn_mask/is_causal unsupported")
        return self._run(x)[0]

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False, return_trace: bool = False):
        if return_trace:
            return self.forward_with_trace(x)
        return self.forward_head(self.forward_features(x, attn_mask, is_causal))

    def forward_with_trace(self, x: torch.Tensor, path: str | None = None) -> tuple[torch.Tensor, PeerTrace]:
        """Logits and the trace; ``path`` forces ``"fast"`` or ``"masked"`` (see :meth:`_run`)."""
        feats, trace = self._run(x, path)
        return self.forward_head(feats), trace

    def reduction_parameters(self) -> list[nn.Parameter]:
        """Parameters the method adds to the backbone (trained at ``controller_lr_scale`` x lr)."""
        return []

    def reduction_loss(self, trace: PeerTrace, train_cfg: dict) -> dict[str, torch.Tensor]:
        zero = trace.keep.new_zeros((), dtype=torch.float32)
        return {"total": zero}

    def gmacs_per_image(self, trace: PeerTrace) -> torch.Tensor:
        """Static-shape methods cost the same for every image: count once per budget with the FLOP counter."""
        from ..flops import count_gmacs
        from ..models.vit import image_geometry

        key = (self.budget,)
        if key not in self._gmacs_cache:
            probe = torch.zeros(1, *image_geometry(self), device=trace.keep.device)
            self._gmacs_cache[key] = count_gmacs(self, probe)
        return trace.keep.new_full((trace.keep.shape[0],), self._gmacs_cache[key], dtype=torch.float64)


def peer_modules(model: nn.Module) -> list[nn.Module]:
    """Every peer model inside ``model`` (also through DDP / wrappers)."""
    return [m for m in model.modules() if isinstance(m, PeerMixin)]


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


def create_peer(cls: type, size: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """A peer model on a DeiT size (``tiny``/``small``/``base``), named ``<method>_deit_<size>_patch16_224``."""
    from ..models.vit import DEIT_SIZES, build_reducer

    name = f"{cls.method}_deit_{size}_patch16_224"
    return build_reducer(cls, name, pretrained, {**DEIT_SIZES[size], **kwargs}, f"deit_{size}_patch16_224")


def reduction_blocks(depth: int, at_12: tuple[int, ...] = (3, 6, 9)) -> list[int]:
    """Block indices for a schedule given for 12 blocks (e.g. EViT's blocks 4/7/10), scaled to ``depth``."""
    picked = sorted({min(depth - 1, max(1, round(i * depth / 12))) for i in at_12})
    return picked
