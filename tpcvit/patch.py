"""``tpcvit.patch``: TPC on a timm ViT you already have, in place, no training needed.

    import tpcvit, timm
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    tpcvit.patch(model, keep=0.5)          # or gmacs=0.5: a fraction of the dense model's GMACs

The model keeps its class's behaviour (``forward``, ``forward_features``, ``forward_head``, ``state_dict`` keys and
weights) and gains TPC's token propagation: ``tpcvit.set_mode`` / ``count_gmacs`` / ``forward_with_trace`` and ONNX
export work on it as on a ``tpc_*`` model. The default controller is training-free (``controller="attention"``, no
new parameters): each controlled block computes the tokens the class token attends to most; paused tokens stay
visible as keys, so their attention is known in every block and a paused token whose attention rises is restarted.
In budget mode the number of tokens falls from block to block (``schedule``): geometrically by default, as
DynamicViT's and EViT's keep rates compound, and as TPC's learned controller ends up doing (it keeps most tokens in
its first controlled blocks and few in the last); ``schedule="auto"`` picks the decay that best agrees with the
dense model's predictions on a few images (no labels needed). At 196 tokens and more, paused tokens show as keys
pooled per 2 x 2 window (``paused_key_pool``, :func:`default_key_pool`): a per-token key costs 1/6 of a token's
block work in every block, and at 196 tokens that compute was worth more spent on active tokens.
``controller="learned"`` adds TPC's controller heads and stabilizer instead (zero-initialised stabilizer: the model
is unchanged until it is fine-tuned with ``tpcvit train``); ``controller="hybrid"`` adds heads initialised to zero on
top of the attention logits, so fine-tuning starts from the training-free controller's decisions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .budget import match_gmacs
from .flops import count_gmacs
from .layers import eval_mode
from .models import TPCEva, TPCViT
from .models._builder import convert_in_place
from .propagation import TPCConfig
from .runtime import current_policy, set_mode, set_policy, tpc_modules

# Budget mode's token schedule over the controlled blocks: keep factors falling geometrically, first / last =
# e^decay. DEFAULT_DECAY: the middle of what schedule="auto" chose on the converged 49-token evidence backbone
# (3 / 6 / 5 at 35 / 45 / 60% of its GMACs; evidence_fmnist49_runs/tpc-free.json); AUTO_DECAYS: the candidates "auto"
# tries (0 = the same keep everywhere).
DEFAULT_DECAY = 4.0
AUTO_DECAYS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
Schedule = str | float | Sequence[float] | None


def decay_profile(blocks: int, decay: float) -> tuple[float, ...]:
    """Keep factors for ``blocks`` controlled blocks, falling geometrically (first / last = ``e^decay``), mean 1."""
    factors = [math.exp(-decay * c / max(1, blocks - 1)) for c in range(blocks)]
    mean = sum(factors) / blocks
    return tuple(round(f / mean, 4) for f in factors)


def default_key_pool(grid: tuple[int, int]) -> int:
    """The training-free controller's ``paused_key_pool``: paused tokens pooled as keys in windows no coarser than
    one cell of a 7 x 7 grid (2 x 2 at DeiT's 14 x 14). Chosen on the converged evidence backbones (rows tpc-free,
    tpc-free-pool1 / -pool2 of benchmarks/results/evidence_fmnist{196,49}.md; one deterministic training-free run
    per row): pooling 2 x 2 was far ahead of per-token keys at 196 tokens and slightly behind at 49."""
    return max(1, min(grid) // 7)


def _family(model: nn.Module) -> type[TPCViT]:
    """The adapter ``model``'s class gets: rotary-position models (timm's ``Eva``) theirs, every other ViT the ViT's."""
    from timm.models.eva import Eva

    return TPCEva if isinstance(model, Eva) else TPCViT


def check_patchable(model: nn.Module) -> None:
    """A clear error naming what a model lacks for TPC."""
    if tpc_modules(model):
        raise ValueError("this model already has TPC (a tpc_* model or patched before): use tpcvit.set_mode")
    _family(model).check_backbone(model, "tpcvit.patch")


def with_tpc(model: nn.Module, cfg: TPCConfig | None = None) -> nn.Module:
    """TPC as configured (:class:`TPCConfig`: the learned controller and stabilizers by default, as the ``tpc_*``
    models) on a timm ``VisionTransformer`` or ``Eva`` the user has, in place (and returned): what ``tpc_deit_*`` is
    on DeiT, on any backbone :func:`patch` runs on, for fine-tuning (``tpcvit train`` with ``model.name:
    tpc_vit_small_patch14_dinov2``). Weights and state-dict keys kept; heads and stabilizers added on the model's
    device and dtype. :func:`patch` is this plus the training-free controller and a budget."""
    check_patchable(model)
    return convert_in_place(model, _family(model), "TPC",
                            lambda m: m._init_tpc(cfg or TPCConfig()))


def patch(
    model: nn.Module,
    keep: float | None = 0.5,
    *,
    gmacs: float | None = None,
    controller: str = "attention",
    mode: str = "budget",
    start_layer: int | None = None,
    images: torch.Tensor | None = None,
    schedule: Schedule = DEFAULT_DECAY,
    decide_every: int = 1,
    **tpc_options,
) -> nn.Module:
    """Give TPC to a timm ``VisionTransformer`` or ``Eva`` (EVA-02, DINOv3, RoPE ViTs, Perception Encoder: rotary
    positions follow every selection, paused keys per token) in place (and return it). A model made with
    ``dynamic_img_size=True`` takes any image size after it, each forward deciding on its images' grid.

    ``keep``: share of patch tokens computed in each controlled block (budget mode). ``gmacs``: instead, a fraction
    of the dense model's GMACs; the keep ratio is found by bisection (budget mode has static shapes, so no real
    images are needed). ``mode``: ``"budget"`` (static shapes, exportable) or ``"adaptive"`` (per-image active sets:
    the attention threshold is calibrated on ``images`` so that the mean keep ratio is ``keep``). ``start_layer``:
    the first controlled block (default: a quarter of the depth, at least 1). ``schedule`` (budget mode): how the
    kept tokens are spread over the controlled blocks: a decay strength (keep factors falling geometrically, first /
    last = e^decay), ``"uniform"`` (the same keep everywhere), ``"auto"`` (the decay whose predictions agree best with
    the dense model's on ``images``; label-free) or explicit factors, one per controlled block. ``keep`` is then the
    mean share over the controlled blocks. ``decide_every``: decide in every k-th controlled block only, the blocks
    between keep the same tokens (fewer small ops: lower batch-1 latency). Other :class:`TPCConfig` fields go in
    ``tpc_options``.
    """
    check_patchable(model)
    if mode not in ("budget", "adaptive"):
        raise ValueError(f"mode must be 'budget' or 'adaptive', got {mode!r}")
    depth = len(model.blocks)
    start = max(1, depth // 4) if start_layer is None else int(start_layer)
    options = {"stabilizer": controller != "attention", **tpc_options}
    if controller == "attention":  # (rotary models: per-token keys, each at its own position; see models/eva.py)
        options.setdefault("paused_key_pool", default_key_pool(tuple(model.patch_embed.grid_size))
                           if model.num_prefix_tokens and _family(model).pools_paused_keys else 1)
    cfg = TPCConfig(start_layer=start, target_keep=keep if keep is not None else 0.5, paused_keys=True,
                    controller=controller, **options)
    with_tpc(model, cfg)
    set_policy(model, current_policy(model).replace(decide_every=decide_every))
    if mode == "budget":
        fit_schedule(model, schedule, keep=model.tpc_cfg.target_keep if gmacs is None else None, gmacs=gmacs,
                     images=images)
    elif gmacs is not None:
        model.tpc_cfg.target_keep = fit_schedule(model, None, gmacs=gmacs)[0]
    if mode == "adaptive":
        if images is None:
            raise ValueError("mode='adaptive' needs images= (a few real images) to calibrate the attention threshold "
                             "to the keep ratio; or use mode='budget'")
        calibrate_threshold(model, images, model.tpc_cfg.target_keep)
        set_mode(model, "adaptive")
    return model


def _schedule_candidates(schedule: Schedule, blocks: int) -> list[tuple[float, ...] | None]:
    if schedule is None or schedule == "uniform":
        return [None]
    if schedule == "auto":
        return [decay_profile(blocks, d) for d in AUTO_DECAYS]
    if isinstance(schedule, str):
        raise ValueError(f"schedule must be a decay strength, 'uniform', 'auto' or keep factors, got {schedule!r}")
    if isinstance(schedule, (int, float)):
        if schedule < 0:
            raise ValueError(f"schedule: a decay strength is >= 0 (0 = uniform), got {schedule}")
        return [decay_profile(blocks, float(schedule))]
    factors = tuple(float(v) for v in schedule)
    if len(factors) != blocks:
        raise ValueError(f"schedule: {len(factors)} keep factors for {blocks} controlled blocks")
    return [factors]


@torch.no_grad()
def fit_schedule(model: nn.Module, schedule: Schedule, *, keep: float | None = None, gmacs: float | None = None,
                 images: torch.Tensor | None = None) -> tuple[float, tuple[float, ...] | None]:
    """Put a patched model in budget mode with ``schedule`` (see :func:`patch`) at ``keep`` (mean share of tokens
    per controlled block) or at ``gmacs`` (a fraction of the dense GMACs; the keep is bisected: budget mode has
    static shapes, so one probe image is enough). ``schedule="auto"`` tries each of :data:`AUTO_DECAYS` and keeps
    the one whose output distribution is closest (mean KL) to the dense model's on ``images``. Returns
    ``(keep, keep_profile)``."""
    if (keep is None) == (gmacs is None):
        raise ValueError("give exactly one of keep= and gmacs=")
    tpc = tpc_modules(model)[0]
    blocks = len(tpc.blocks) - tpc.tpc_cfg.start_layer
    candidates = _schedule_candidates(schedule, blocks)
    if len(candidates) > 1 and images is None:
        raise ValueError("schedule='auto' needs images= (a few real images, no labels) to compare schedules on")
    param = next(model.parameters())
    probe = torch.zeros(1, tpc.patch_embed.proj.in_channels, *tpc.patch_embed.img_size, device=param.device,
                        dtype=param.dtype)
    with eval_mode(model):
        reference = None
        if len(candidates) > 1:
            reference = F.log_softmax(set_mode(model, "dense")(images).float(), dim=-1)
        dense_gmacs = count_gmacs(set_mode(model, "dense"), probe) if gmacs is not None else None
        best = None
        for profile in candidates:
            policy = current_policy(model).replace(mode="budget", keep=keep if keep is not None else 0.5,
                                                   keep_profile=profile)
            set_policy(model, policy)
            k = keep if keep is not None else match_gmacs(model, probe, gmacs * dense_gmacs)[0]
            score = 0.0
            if reference is not None:
                set_policy(model, policy.replace(keep=k))
                out = F.log_softmax(model(images).float(), dim=-1)
                score = F.kl_div(out, reference, log_target=True, reduction="batchmean").item()
            if best is None or score < best[0]:
                best = (score, k, profile)
        _, k, profile = best
        set_policy(model, current_policy(model).replace(mode="budget", keep=k, keep_profile=profile))
        tpc.tpc_cfg.target_keep = k
    return k, profile


@torch.no_grad()
def calibrate_threshold(model: nn.Module, images: torch.Tensor, keep: float, iters: int = 20) -> float:
    """Bisect the training-free controller's attention threshold so that, on ``images``, the mean share of active
    patch tokens in the controlled blocks is ``keep`` (adaptive mode)."""
    if not model.tpc_cfg.reads_attention:
        raise ValueError("only the attention (training-free or hybrid) controller has a threshold to calibrate")
    with eval_mode(model):
        set_mode(model, "adaptive")
        lo, hi = -6.0, 6.0  # log relative attention: e^-6 .. e^6 times uniform
        start = model.tpc_cfg.start_layer
        for _ in range(iters):
            mid = (lo + hi) / 2
            model.tpc_cfg.attention_threshold = mid
            _, trace = model.forward_with_trace(images)
            got = trace.active[:, start:].float().mean().item()
            lo, hi = (mid, hi) if got > keep else (lo, mid)  # a higher threshold pauses more
        model.tpc_cfg.attention_threshold = (lo + hi) / 2
    return model.tpc_cfg.attention_threshold
