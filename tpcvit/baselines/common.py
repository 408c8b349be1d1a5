"""What every peer method shares: its trace, its single budget knob, and the hooks the engine and harness use.

A peer is a timm ``VisionTransformer`` subclass (so a dense timm/DeiT checkpoint loads unchanged; every peer also
comes as a timm ``Eva`` one, :class:`RotaryPeer`: the family hooks ``_peer_*`` say how the backbone's blocks run)
that exposes

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

from ..layers import (
    attend,
    attention_half,
    block_forward,
    embed_tokens,
    eva_attend,
    eva_attention_half,
    eva_embed,
    eva_mlp_half,
    image_geometry,
    mlp_half,
)
from ..models._builder import DEIT_SIZES, PEER_METHODS, build_reducer, convert_in_place

__all__ = ["PEER_METHODS", "PeerMixin", "PeerTrace", "RotaryPeer", "as_peer", "create_peer", "peer_modules",
           "reduction_blocks"]


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
    adaptive: bool = False  # cost differs per image (A-ViT): counted image by image
    reads_class_token: bool = False  # ranks tokens by the class token's attention (needs one)
    added_modules: tuple[str, ...] = ()  # modules the method adds to the backbone (absent from dense weights)

    def __init__(self, *args, **kwargs) -> None:
        """The timm model's constructor, then :meth:`_setup_peer` with the keyword arguments it takes (the method's
        knobs): the same method parts whether the model is built here or converted by :func:`as_peer`."""
        import inspect

        knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in inspect.signature(self._setup_peer).parameters}
        super().__init__(*args, **kwargs)
        self._setup_peer(**knobs)

    def _setup_peer(self, **knobs) -> None:
        """Add the method's parts to a built timm ViT (knobs as keyword arguments with defaults)."""
        raise NotImplementedError

    def _init_peer(self, budget: float) -> None:
        self._gmacs_cache: dict[tuple, float] = {}
        self.set_budget(budget)

    def set_budget(self, value: float) -> None:
        lo, hi = self.budget_bounds
        if not lo <= float(value) <= hi:
            raise ValueError(f"{self.method} budget must be in [{lo}, {hi}], got {value}")
        self.budget = float(value)

    # -- how a peer runs its backbone's blocks (a timm ViT here; RotaryPeer: timm's Eva) ----------------------
    def _peer_embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens ``[B, T, D]`` and each patch token's position rows ``[B, N, C]`` (``None``: positions are in the
        tokens). A method that merges, fuses or drops patch tokens does the same to the rows."""
        return embed_tokens(self, images), None

    def _peer_attention(self, blk: nn.Module, x: torch.Tensor, positions: torch.Tensor | None,
                        key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's attention half: ``(x + attention output, q, k)``."""
        return attention_half(blk, x, key_bias)

    def _peer_mlp(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return mlp_half(blk, x)

    def _peer_attend(self, blk: nn.Module, x: torch.Tensor, positions: torch.Tensor | None,
                     key_bias: torch.Tensor | None = None, need_weights: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The whole block plus what selection methods read: ``(x_out, cls_attn [B, T], weights or None)``
        (:func:`~tpcvit.layers.attend`)."""
        return attend(blk, x, key_bias, need_weights)

    def _peer_block(self, blk: nn.Module, x: torch.Tensor, positions: torch.Tensor | None,
                    key_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The whole block on ``x`` (lean executor at inference); ``key_bias`` ``[B, 1, 1, T]`` an additive key mask
        (masked paths: dropped or idle tokens hidden as keys)."""
        return block_forward(blk, x, key_bias)

    def _peer_head_macs(self) -> float | None:
        """MACs of the head on the final tokens for per-image GMACs counts (``None``: one linear per head)."""
        return None

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

    def forward_intermediates(self, *args, **kwargs):
        """Refused: timm's method would run the dense model silently. A peer merges, fuses or drops tokens (or, in
        A-ViT, halts them out of later blocks), so its later blocks have no whole feature map to return."""
        raise NotImplementedError(f"{self.method} has no whole per-block feature map (its blocks run on fewer tokens); "
                                  "for feature maps under token reduction use tpcvit.patch (TPC keeps every token)")

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

        key = (self.budget,)
        if key not in self._gmacs_cache:
            probe = torch.zeros(1, *image_geometry(self), device=trace.keep.device)
            self._gmacs_cache[key] = count_gmacs(self, probe)
        return trace.keep.new_full((trace.keep.shape[0],), self._gmacs_cache[key], dtype=torch.float64)


class RotaryPeer:
    """A peer's block hooks on timm's ``Eva`` (EVA-02, DINOv3, RoPE ViTs, Perception Encoder): every patch token
    carries its row of the rotary table (a selected or kept token its own row), and a merged or fused token the weighted
    mean of its members' rows, the
    rule TPC's pooled paused keys use (:func:`~tpcvit.layers.pool_rope`: a rotation is linear in its sin/cos rows).
    One table shared by every block (per-block tables are refused by :func:`as_peer`)."""

    def _peer_embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, rope = eva_embed(self, images)
        return x, None if rope is None else rope[None].expand(x.shape[0], -1, -1)

    @staticmethod
    def _rope(positions: torch.Tensor | None) -> torch.Tensor | None:
        """Per-token rows ``[B, n, C]`` as the per-image table timm's Eva attention takes ``[B, 1, n, C]``."""
        return None if positions is None else positions[:, None]

    def _peer_attention(self, blk: nn.Module, x: torch.Tensor, positions: torch.Tensor | None,
                        key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return eva_attention_half(blk, x, self._rope(positions), self.num_prefix_tokens, key_bias=key_bias)

    def _peer_mlp(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return eva_mlp_half(blk, x)

    def _peer_attend(self, blk: nn.Module, x: torch.Tensor, positions: torch.Tensor | None,
                     key_bias: torch.Tensor | None = None, need_weights: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return eva_attend(blk, x, self._rope(positions), self.num_prefix_tokens, key_bias, need_weights)

    def _peer_head_macs(self) -> float | None:
        from ..flops import head_macs

        return head_macs(self, self.patch_embed.num_patches)

    def _peer_block(self, blk: nn.Module, x: torch.Tensor, positions: torch.Tensor | None,
                    key_bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = self._rope(positions)
        if key_bias is None:
            return blk(x, rope=rows)
        return eva_mlp_half(blk, eva_attention_half(blk, x, rows, self.num_prefix_tokens, key_bias=key_bias)[0])


def _check_rotary(model: nn.Module, method: str) -> None:
    """A one-line error for what a peer cannot run on a timm ``Eva``."""
    from ..layers import check_timm_eva

    check_timm_eva(model, method)  # (a fixed grid: peers size their budgets for one)
    if getattr(model, "rope_mixed", False):
        raise ValueError(f"{method} carries one rotary row per token; this model has a table per block "
                         "(rope_mixed): use a model with one shared table, or TPC (tpcvit.patch)")


def as_peer(model: nn.Module, method: str, **knobs) -> nn.Module:
    """Give ``method`` (a peer: tome, evit, avit, idlevit, dynamicvit) to a timm ``VisionTransformer`` the user
    already has, in place (and return it): any size, patch, image size, register tokens, DINOv2 / CLIP / SigLIP
    weights, as ``tpcvit.patch`` does for TPC. Its weights and state-dict keys stay; the method's parts are added
    (``knobs``: what the method's registered models take, e.g. ``tome_r=8``, ``keep_rate=0.7``), on the model's
    device and dtype. The registered ``<method>_deit_*`` models are the same classes built from scratch.

    Why: comparing TPC with ToMe or EViT on the model a user runs (``tpcvit bench --model vit_small_patch14_dinov2
    --methods dense,tpc-free@0.5,tome@0.5``) should not need a DeiT."""
    from timm.models.eva import Eva

    from ..layers import check_timm_vit
    from . import PEERS, ROTARY_PEERS

    if method not in PEERS:
        raise ValueError(f"unknown peer method {method!r}: one of {sorted(PEERS)}")
    if peer_modules(model):
        raise ValueError(f"this model already is a token-reduction peer ({type(model).__name__})")
    if isinstance(model, Eva):  # rotary positions: every patch token carries its rotary row
        cls = ROTARY_PEERS[method]
        _check_rotary(model, method)
    else:
        cls = PEERS[method]
        check_timm_vit(model, method)
    if cls.reads_class_token and getattr(model, "cls_token", None) is None:
        raise ValueError(f"{method} ranks tokens by the class token's attention: this model has no class token "
                         "(global_pool='avg' / 'map'); use tome or dynamicvit")
    return convert_in_place(model, cls, cls.__name__.removesuffix("VisionTransformer").removesuffix("Eva"),
                            lambda m: m._setup_peer(**knobs))


def peer_modules(model: nn.Module) -> list[nn.Module]:
    """Every peer model inside ``model`` (also through DDP / wrappers)."""
    return [m for m in model.modules() if isinstance(m, PeerMixin)]


def create_peer(cls: type, size: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """A peer model on a DeiT size (``tiny``/``small``/``base``), named ``<method>_deit_<size>_patch16_224``."""
    name = f"{cls.method}_deit_{size}_patch16_224"
    return build_reducer(cls, name, pretrained, {**DEIT_SIZES[size], **kwargs}, f"deit_{size}_patch16_224")


def reduction_blocks(depth: int, at_12: tuple[int, ...] = (3, 6, 9)) -> list[int]:
    """Block indices for a schedule given for 12 blocks (e.g. EViT's blocks 4/7/10), scaled to ``depth``."""
    picked = sorted({min(depth - 1, max(1, round(i * depth / 12))) for i in at_12})
    return picked
