"""A-ViT-style adaptive token halting (Yin et al., 2022), our implementation on timm's ViT.

After every block each still-running patch token emits a halting score and adds it to its cumulative score. The
score is ``h = sigmoid(w . LN(x) + b)`` from a learned linear head (``halt_gate="linear"``, default: it learns to
halt within a short fine-tune from a dense checkpoint) or A-ViT's own gate on embedding channel 0,
``h = sigmoid(gate_scale * x[..., 0] - gate_center)`` (``halt_gate="channel"``, scale 10, centre 75 for DeiT-S,
30 for DeiT-T, as in its released code). Once the cumulative score reaches the threshold (``1 - eps``) the token
halts for good: it is masked out of attention and carried unchanged (training), or no longer gathered
(inference). This is TPC *without restart* and without smoothing, with halting (not per-block pause) scores.

Losses (A-ViT's): the ponder loss (mean remainder ``1 - c`` at the halting block, weighted by ``ponder_weight``,
pushes towards halting early) and a distribution prior: KL from a Gaussian over blocks centred at
``target_depth * depth`` to the batch's halting distribution. Budget knob at inference: the halting ``threshold``
(more = more compute); the bias of the halting head starts low so a freshly loaded dense model runs (almost) dense.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from ..layers import packed_block, supports_packing
from ..tokens import masked_update, run_on_selection, select_active, take_rows
from .common import PeerMixin, PeerTrace, RotaryPeer, create_peer


def halting_step(
    cum: torch.Tensor, h: torch.Tensor, running: torch.Tensor, threshold: float, last: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block of cumulative halting. ``cum``/``h`` ``[B, N]`` float, ``running`` bool.

    Returns ``(cum', halts, mass)``: tokens whose cumulative score reaches ``threshold`` (every running token at the
    last block) halt; ``mass`` is their share of the halting distribution at this block: the remainder ``1 - cum``
    for halting tokens, ``h`` for tokens that go on, 0 for tokens already halted. Pure function.
    """
    new_cum = cum + h * running
    halts = running & ((new_cum >= threshold) | last)
    mass = torch.where(halts, (1.0 - cum).clamp_min(0.0), h) * running
    return new_cum, halts, mass


def gaussian_prior(depth: int, mean: float, std: float, device=None) -> torch.Tensor:
    """Discrete Gaussian over blocks ``0..depth-1`` (normalised), A-ViT's target halting distribution."""
    blocks = torch.arange(depth, dtype=torch.float32, device=device)
    p = torch.exp(-0.5 * ((blocks - mean) / std) ** 2)
    return p / p.sum()


class AViTPeer(PeerMixin):
    """Per-token adaptive halting (no restart), on any backbone the peer hooks run (a timm ViT, or an Eva: each
    running token attends with its own rotary row)."""

    method = "avit"
    adaptive = True
    added_modules = ("halting",)

    def _setup_peer(self, halt_threshold: float = 0.99, target_depth: float = 0.5, prior_std: float = 1.0,
                    halt_gate: str = "linear", gate_scale: float = 10.0, gate_center: float = 30.0,
                    ponder_weight: float = 5e-4) -> None:
        depth = len(self.blocks)
        if not 0.0 < target_depth <= 1.0:
            raise ValueError(f"target_depth is a fraction of the depth in (0, 1], got {target_depth}")
        if halt_gate not in ("linear", "channel"):
            raise ValueError(f"halt_gate must be 'linear' or 'channel', got {halt_gate!r}")
        self.target_depth, self.prior_std, self.ponder_weight = target_depth, prior_std, ponder_weight
        self.halt_gate, self.gate_scale, self.gate_center = halt_gate, gate_scale, gate_center
        self.budget_bounds = (0.0, float(depth))
        self.halting = nn.Linear(self.embed_dim, 1)
        # LN's unit scale / zero shift passed explicitly: torch's CPU kernel without them is 2-3x slower
        self.register_buffer("halt_norm_scale", torch.ones(self.embed_dim), persistent=False)
        self.register_buffer("halt_norm_shift", torch.zeros(self.embed_dim), persistent=False)
        nn.init.zeros_(self.halting.weight)
        nn.init.constant_(self.halting.bias, math.log(0.5 / depth) - math.log(1 - 0.5 / depth))  # sum h ~ 0.5
        self._init_peer(halt_threshold)

    def _halt_scores(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix_tokens
        if self.halt_gate == "channel":
            return torch.sigmoid(self.gate_scale * x[:, p:, 0].float() - self.gate_center)
        normed = F.layer_norm(x[:, p:], x.shape[-1:], self.halt_norm_scale, self.halt_norm_shift)
        return torch.sigmoid(self.halting(normed).squeeze(-1).float())

    def _run(self, x: torch.Tensor, path: str | None = None) -> tuple[torch.Tensor, PeerTrace]:
        x, positions = self._peer_embed(x)
        b, p, n = x.shape[0], self.num_prefix_tokens, self.patch_embed.num_patches
        fast = (not self.training) if path is None else path == "fast"
        cum = x.new_zeros(b, n, dtype=torch.float32)
        running = torch.ones(b, n, dtype=torch.bool, device=x.device)
        actives, masses, remainders = [], [], x.new_zeros(b, n, dtype=torch.float32)
        depth = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            actives.append(running)
            if not fast:
                x = masked_update(lambda t, m, blk=blk: self._peer_block(blk, t, positions, m), x,
                                  running.to(x.dtype), p)
            elif b > 1 and positions is None and supports_packing(blk):
                x = packed_block(blk, x, running, p)
            else:
                sel = select_active(running, p, x.dtype)
                # the running tokens' rotary rows (padding slots: the image's own halted tokens)
                rows = positions if sel.full else take_rows(positions, sel.index[:, p:] - p)
                x = run_on_selection(lambda t, m, blk=blk, rows=rows: self._peer_block(blk, t, rows, m), x, sel)
            last = i == depth - 1
            h = x.new_ones(b, n, dtype=torch.float32) if last else self._halt_scores(x)
            cum_before = cum
            cum, halts, mass = halting_step(cum, h, running, self.budget, last)
            remainders = remainders + torch.where(halts, 1.0 - cum_before, 0.0)
            masses.append(mass)
            running = running & ~halts
        active = torch.stack(actives, dim=1)
        trace = PeerTrace(keep=active.float().mean(dim=2), active=active,
                          extras={"halt_mass": torch.stack(masses, dim=1), "remainder": remainders})
        return self.norm(x), trace


    def reduction_parameters(self) -> list[nn.Parameter]:
        return list(self.halting.parameters()) if self.halt_gate == "linear" else []

    def reduction_loss(self, trace: PeerTrace, train_cfg: dict) -> dict[str, torch.Tensor]:
        depth = len(self.blocks)
        ponder = trace.extras["remainder"].mean()
        dist = trace.extras["halt_mass"].mean(dim=(0, 2))  # [depth], sums to 1
        prior = gaussian_prior(depth, self.target_depth * depth - 0.5, self.prior_std, dist.device)
        kl = (prior * (prior.clamp_min(1e-8).log() - dist.clamp_min(1e-8).log())).sum()
        total = self.ponder_weight * ponder + train_cfg["alpha_dist"] * kl
        return {"ponder": ponder, "dist": kl, "total": total}

    def gmacs_per_image(self, trace: PeerTrace) -> torch.Tensor:
        from ..flops import vit_gmacs_from_counts

        n, dim = self.patch_embed.num_patches, self.embed_dim
        heads = (len(self.blocks) - 1) * n * dim  # halting head on every patch token after each block but the last
        return vit_gmacs_from_counts(self, trace.active.sum(dim=2), extra_macs=heads, head_macs=self._peer_head_macs())


class AViTVisionTransformer(AViTPeer, VisionTransformer):
    """timm ``VisionTransformer`` with per-token adaptive halting (no restart)."""


class AViTEva(RotaryPeer, AViTPeer):
    """A-ViT on a timm ``Eva`` (converted in place by :func:`~tpcvit.baselines.as_peer`)."""



@register_model
def avit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> AViTVisionTransformer:
    """DeiT-Tiny with A-ViT-style halting (``halt_threshold``, ``target_depth``)."""
    return create_peer(AViTVisionTransformer, "tiny", pretrained, kwargs)


@register_model
def avit_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> AViTVisionTransformer:
    """DeiT-Small with A-ViT-style halting."""
    return create_peer(AViTVisionTransformer, "small", pretrained, kwargs)


@register_model
def avit_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> AViTVisionTransformer:
    """DeiT-Base with A-ViT-style halting."""
    return create_peer(AViTVisionTransformer, "base", pretrained, kwargs)
