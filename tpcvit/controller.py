"""Token propagation controller: pure tensor functions, no model knowledge.

Notation (per image, per patch token k, per block l; docs/METHOD.md section 2):

* ``s[k, l]`` in {0, 1}: token k is *active* (computed by block l) or *paused* (skips block l).
* ``p[k, l]``: pause probability, P(active at l-1 -> paused at l).
* ``r[k, l]``: restart probability, P(paused at l-1 -> active at l).
* ``a[k, l]``: probability that token k is active at block l, from the two-state Markov chain

      a[k, l] = a[k, l-1] * (1 - p[k, l]) + (1 - a[k, l-1]) * r[k, l],   a[k, start-1] = 1.

Everything here works on tensors shaped ``[B, N]`` (one block) or ``[B, L, N]`` (a stack of blocks), where N
is the number of patch tokens; prefix tokens (class / distillation) are always active and never appear here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------
# probabilities
# ----------------------------------------------------------------------------------------------------------
def transition_probs(logits: torch.Tensor) -> torch.Tensor:
    """Controller logits ``[..., 2]`` -> probabilities ``[..., 2]``: ``[..., 0]`` pause, ``[..., 1]`` restart."""
    return (logits if logits.dtype == torch.float32 else logits.float()).sigmoid()


def attention_logits(relative_attention: torch.Tensor, threshold: float, sharpness: float) -> torch.Tensor:
    """Training-free controller: pause/restart logits ``[B, N, 2]`` from the class token's attention.

    ``relative_attention`` ``[B, N]`` is the attention a token receives times the number of keys (1 = uniform).
    With ``s = log(relative_attention) - threshold``: pause logit ``-sharpness * s`` (a token below the threshold
    pauses), restart logit ``+sharpness * s`` (a paused token whose attention rises above it comes back). Then
    ``keep_score`` ranks every token, active or paused, by its current attention: the paper's restart insight
    without a learned head.
    """
    s = relative_attention.float().clamp_min(1e-6).log() - threshold
    return torch.stack([-sharpness * s, sharpness * s], dim=-1)


def active_recursion(a_prev: torch.Tensor, pause: torch.Tensor, restart: torch.Tensor) -> torch.Tensor:
    """One step of the two-state chain: ``a_l = a_{l-1} (1 - p_l) + (1 - a_{l-1}) r_l``.

    With hard 0/1 inputs this is also the state update ``s_l = s_{l-1} (1 - u_l) + (1 - s_{l-1}) v_l`` for
    sampled pause events ``u`` and restart events ``v``.
    """
    return a_prev * (1.0 - pause) + (1.0 - a_prev) * restart


def active_probabilities(pause: torch.Tensor, restart: torch.Tensor) -> torch.Tensor:
    """Unroll :func:`active_recursion` over blocks: ``pause``/``restart`` ``[B, L, N]`` -> ``a`` ``[B, L, N]``."""
    a = torch.ones_like(pause[:, 0])
    out = []
    for l in range(pause.shape[1]):
        a = active_recursion(a, pause[:, l], restart[:, l])
        out.append(a)
    return torch.stack(out, dim=1)


def break_probability(pause: torch.Tensor, restart: torch.Tensor) -> torch.Tensor:
    """Probability that a token *breaks* at block l: it is paused at l and never restarted afterwards.

    ``b[k, l] = a[k, l-1] * p[k, l] * prod_{m > l} (1 - r[k, m])`` (with ``a[k, start-1] = 1``).

    This is what A-ViT-style halting calls "halted at l". Summed over l it is the probability that the token
    ends paused. TPC differs from halting exactly where ``r > 0``: then ``sum_l b < sum_l a p`` (some pauses
    are temporary).
    """
    a = active_probabilities(pause, restart)
    a_prev = torch.cat([torch.ones_like(a[:, :1]), a[:, :-1]], dim=1)
    never_restart = 1.0 - restart
    # suffix product over m > l: reverse cumprod shifted by one block
    suffix = torch.flip(torch.cumprod(torch.flip(never_restart, dims=[1]), dim=1), dims=[1])
    suffix = torch.cat([suffix[:, 1:], torch.ones_like(suffix[:, :1])], dim=1)
    return a_prev * pause * suffix


# ----------------------------------------------------------------------------------------------------------
# smoothing
# ----------------------------------------------------------------------------------------------------------
_NEIGHBOUR_MEANS: dict[tuple, torch.Tensor] = {}


def neighbour_mean_matrix(grid: tuple[int, int], device: torch.device, dtype: torch.dtype,
                          transposed: bool = False) -> torch.Tensor:
    """``[N, N]`` matrix ``M`` with ``(M @ p)[k]`` = mean of ``p`` over token k's 3x3 neighbourhood on the grid
    (border-aware: only neighbours inside the grid count). Cached per grid, device and dtype; ``transposed``:
    ``M.T``, contiguous (what :func:`spatial_smooth` multiplies by)."""
    key = (tuple(grid), str(device), dtype, transposed)
    cached = _NEIGHBOUR_MEANS.get(key)
    if cached is not None:
        return cached
    # from token coordinates (pointwise ops: under torch.compile, where nothing is cached, one small fused kernel;
    # built with convolutions it was 2 conv calls per decision, ~10% of the compiled main-job model at batch 1)
    h, w = grid
    token = torch.arange(h * w, device=device)
    row, col = token // w, token % w
    near = ((row[:, None] - row[None, :]).abs() <= 1) & ((col[:, None] - col[None, :]).abs() <= 1)
    near = near.to(torch.float32 if torch.device(device).type == "mps" else torch.float64)  # 1/count, rounded once
    matrix = (near / near.sum(dim=1, keepdim=True)).to(dtype)
    if transposed:
        matrix = matrix.t().contiguous()
    if not torch.compiler.is_compiling() and _is_real(matrix):  # a tensor made while tracing must not be kept
        _NEIGHBOUR_MEANS[key] = matrix
    return matrix


def _is_real(t: torch.Tensor) -> bool:
    """A tensor with storage (not a fake or functional tensor of torch.export / ONNX export tracing)."""
    try:
        t.data_ptr()
    except RuntimeError:
        return False
    return True


def spatial_smooth(probs: torch.Tensor, grid: tuple[int, int], max_dev: float) -> torch.Tensor:
    """Clip each token's probability to within ``max_dev`` of its 3x3 neighbourhood mean on the token grid.

    ``probs`` is ``[B, N, C]`` with ``N = H * W``. ``m = avgpool3x3(probs)`` (border-aware),
    ``out = m + clamp(probs - m, -max_dev, max_dev)``. A token that agrees with its neighbours keeps its value;
    an isolated outlier is pulled back towards them. ``max_dev >= 1`` is the identity. Grids of up to 64 tokens
    take the mean as one product with :func:`neighbour_mean_matrix` (one kernel instead of five: what small models
    at batch 1 wait for; its N^2 MACs per image are <0.1% of such a model's), written ``[B, C, N] @ M.T`` so that
    it is one GEMM over every image (``M @ [B, N, C]`` broadcasts into B tiny products: 2.4x slower at batch 256,
    bitwise the same result); larger grids pool (9 adds a token).
    """
    if max_dev >= 1.0:
        return probs
    b, n, c = probs.shape
    h, w = grid
    if n <= 64:
        mean = (probs.transpose(1, 2) @ neighbour_mean_matrix(grid, probs.device, probs.dtype, True)).transpose(1, 2)
    else:
        img = probs.transpose(1, 2).reshape(b, c, h, w)
        mean = F.avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=False)
        mean = mean.reshape(b, c, n).transpose(1, 2)
    return mean + (probs - mean).clamp(-max_dev, max_dev)


def depth_smooth(probs: torch.Tensor, previous: torch.Tensor | None, momentum: float) -> torch.Tensor:
    """Exponential moving average across blocks: ``out_l = momentum * out_{l-1} + (1 - momentum) * probs_l``
    (one ``lerp``: a single kernel, no Python scalars lifted to tensors)."""
    if previous is None or momentum <= 0.0:
        return probs
    return torch.lerp(probs, previous, momentum)


def smooth_probs(
    probs: torch.Tensor,
    previous: torch.Tensor | None,
    grid: tuple[int, int],
    max_dev: float,
    momentum: float,
) -> torch.Tensor:
    """The smoothing regulariser: spatial outlier clipping, then the EMA across blocks (see both functions)."""
    return depth_smooth(spatial_smooth(probs, grid, max_dev), previous, momentum)


# ----------------------------------------------------------------------------------------------------------
# hard decisions
# ----------------------------------------------------------------------------------------------------------
def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Forward value ``hard`` (exact 0/1), gradient of ``soft``."""
    return hard.to(soft.dtype) + soft - soft.detach()


def sample_events(prob: torch.Tensor, tau: float, threshold: float = 0.5, noise: bool = True) -> torch.Tensor:
    """Bernoulli events with a straight-through Gumbel-sigmoid (``noise=False``: deterministic threshold).

    ``soft = sigmoid((logit(prob) - logit(threshold) + g) / tau)`` with ``g ~ Logistic(0, 1)``, forward value
    ``soft > 0.5``. Without noise the forward value is ``prob > threshold``, the inference rule.
    """
    logit = torch.logit(prob.clamp(_EPS, 1 - _EPS)) - math.log(threshold / (1 - threshold))
    if noise:
        u = torch.rand_like(logit).clamp(_EPS, 1 - _EPS)
        logit = logit + torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid(logit / tau)
    return straight_through(soft > 0.5, soft)


def keep_score(state: torch.Tensor, pause: torch.Tensor, restart: torch.Tensor) -> torch.Tensor:
    """Probability of being active at this block given the current state: ``s (1 - p) + (1 - s) r``.

    Used to rank tokens in ``budget`` mode (top-k by this score).
    """
    return state * (1.0 - pause) + (1.0 - state) * restart


def topk_states(score: torch.Tensor, k: int) -> torch.Tensor:
    """Hard 0/1 states keeping the ``k`` highest-scoring tokens per image (straight-through on ``score``)."""
    idx = score.topk(k, dim=-1, sorted=False).indices
    hard = torch.zeros_like(score).scatter_(-1, idx, 1.0)
    return straight_through(hard, score)


# ----------------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------------
def budget_loss(states: torch.Tensor, target_keep: float) -> torch.Tensor:
    """``(mean_l mean_k s[k, l] - target_keep)^2``, averaged over the batch.

    ``states`` ``[B, L, N]`` are the straight-through states of the controlled blocks: their forward value is the
    compute actually spent, their gradient that of the soft probabilities.
    """
    keep = states.float().mean(dim=(1, 2))
    return ((keep - target_keep) ** 2).mean()


def keep_prior(num_blocks: int, target_keep: float, spread: float = 0.2) -> torch.Tensor:
    """Prior keep ratio per controlled block: linear from ``target + spread`` down to ``target - spread``.

    Its mean is ``target_keep``; early blocks keep more tokens than late ones (the shape every gradual
    reduction method uses). Values are clipped to [0.02, 0.98] so the Bernoulli KL stays finite.
    """
    if num_blocks == 1:
        return torch.tensor([target_keep]).clamp(0.02, 0.98)
    hi, lo = target_keep + spread, target_keep - spread
    return torch.linspace(hi, lo, num_blocks).clamp(0.02, 0.98)


def bernoulli_kl(q: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """``KL(Bern(q) || Bern(prior))`` elementwise."""
    q = q.clamp(_EPS, 1 - _EPS)
    prior = prior.clamp(_EPS, 1 - _EPS)
    return q * torch.log(q / prior) + (1 - q) * torch.log((1 - q) / (1 - prior))


def distribution_loss(
    active_prob: torch.Tensor,
    restart: torch.Tensor,
    target_keep: float,
    restart_prior: float,
    spread: float = 0.2,
) -> torch.Tensor:
    """KL of the per-block token distributions from their priors (computed on smoothed probabilities).

    * ``q_l = mean_k a[k, l]``: share of active tokens at controlled block l, against :func:`keep_prior`.
    * ``rho_l = sum_k (1 - a[k, l-1]) r[k, l] / sum_k (1 - a[k, l-1])``: restart rate of paused tokens, against
      ``restart_prior`` (skipped where ``restart_prior <= 0`` or no token can be paused yet).

    Returns the mean over blocks of ``KL(q_l || prior_l) + KL(rho_l || restart_prior)``.
    """
    num_blocks = active_prob.shape[1]
    q = active_prob.float().mean(dim=(0, 2))
    prior = keep_prior(num_blocks, target_keep, spread).to(q.device)
    loss = bernoulli_kl(q, prior).mean()
    if restart_prior > 0 and num_blocks > 1:
        paused_prev = 1.0 - active_prob[:, :-1].float()
        rho = (paused_prev * restart[:, 1:].float()).sum(dim=(0, 2)) / paused_prev.sum(dim=(0, 2)).clamp_min(_EPS)
        loss = loss + bernoulli_kl(rho, torch.full_like(rho, restart_prior)).mean()
    return loss
