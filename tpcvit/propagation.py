"""TPC's per-forward state: configuration, the block-by-block decisions, the trace and the controller losses.

The runtime (:mod:`tpcvit.runtime`) asks a :class:`Propagation` for the token states of every controlled block and
runs the block either on the masked full sequence (training) or on the gathered active tokens (inference). The
math lives in :mod:`tpcvit.controller`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

from . import controller as C
from .policy import MODES, ExecutionPolicy

__all__ = ["MODES", "Decision", "Propagation", "TPCConfig", "TokenTrace", "tpc_loss"]


@dataclass
class TPCConfig:
    """Controller hyper-parameters (all settable as ``timm.create_model(..., start_layer=2, ...)``)."""

    start_layer: int = 1  # blocks before it are always dense
    target_keep: float = 0.5  # mean share of active patch tokens in the controlled blocks
    threshold: float = 0.5  # inference decision threshold on the smoothed probabilities
    smoothing: bool = True  # the smoothing regulariser (ablation switch)
    smooth_max_dev: float = 0.2  # spatial outlier clip: max deviation from the 3x3 neighbourhood mean
    smooth_momentum: float = 0.25  # EMA of the probabilities across blocks
    stabilizer: bool = True  # the model stabilizer (ablation switch)
    stabilizer_layers: tuple[int, ...] | None = None  # default: blocks 0 .. start_layer
    restart: bool = True  # False = pause only (A-ViT-like ablation): restart probability fixed at 0
    gumbel_tau: float = 1.0  # temperature of the straight-through Gumbel-sigmoid in training
    pause_bias_init: float = -3.0  # sigmoid(-3) = 0.05: the model starts close to dense
    restart_bias_init: float = -1.0
    prior_spread: float = 0.2  # keep prior: linear from target+spread to target-spread
    restart_prior: float = 0.1  # prior restart rate of paused tokens (0 disables that KL term)
    # False (docs/METHOD.md default): paused tokens are masked out of attention. True: visible as keys/values with
    # their frozen features (k/v projections for them, ~2/12 of a token's block cost) and skip only their own
    # query, attention output and MLP; information in paused tokens keeps reaching the class token.
    paused_keys: bool = False
    # With paused_keys: the paused tokens of each paused_key_pool x paused_key_pool window of the grid show as one
    # key/value (their mean, with ToMe's proportional attention: the sum of their attention is kept), so a paused
    # region costs one key/value projection per block instead of one per token; restarts read the window's
    # attention. 1: every paused token is its own key. [ours] At 196 tokens the per-token keys cost 1/6 of a dense
    # block in every controlled block (benchmarks/results/evidence_fmnist196.md).
    paused_key_pool: int = 1
    # "learned": a linear head per block (fine-tuned). "attention": training-free, no parameters: decisions from the
    # class token's attention to every token (paused tokens stay keys, so their attention is known every block).
    # "hybrid": attention logits + a learned head initialised to zero: starts as the training-free controller,
    # fine-tuning learns a correction.
    controller: str = "learned"
    attention_threshold: float = 0.0  # log relative attention at which a token pauses / restarts (0 = uniform)
    attention_sharpness: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 < self.target_keep <= 1.0:
            raise ValueError(f"target_keep must be in (0, 1], got {self.target_keep}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.start_layer < 0:
            raise ValueError(f"start_layer must be >= 0, got {self.start_layer}")
        if self.stabilizer_layers is not None:
            self.stabilizer_layers = tuple(int(i) for i in self.stabilizer_layers)
        if self.controller not in ("learned", "attention", "hybrid"):
            raise ValueError(f"controller must be 'learned', 'attention' or 'hybrid', got {self.controller!r}")
        if self.paused_key_pool < 1:
            raise ValueError(f"paused_key_pool must be >= 1 (a window side in patches), got {self.paused_key_pool}")
        if self.paused_key_pool > 1 and not self.paused_keys:
            raise ValueError("paused_key_pool pools paused tokens' keys: it needs paused_keys=True")
        if self.reads_attention and not self.paused_keys:
            raise ValueError(f"controller={self.controller!r} reads the class token's attention to paused tokens: it "
                             "needs paused_keys=True")

    @property
    def reads_attention(self) -> bool:
        """The attention (training-free) and hybrid controllers read the class token's attention."""
        return self.controller in ("attention", "hybrid")

    @classmethod
    def pop_from(cls, kwargs: dict) -> TPCConfig:
        """Take this config's fields (and an optional ``tpc_cfg`` object or dict) out of model kwargs."""
        base = kwargs.pop("tpc_cfg", None)
        values = asdict(base) if isinstance(base, TPCConfig) else dict(base or {})
        for f in fields(cls):
            if f.name in kwargs:
                values[f.name] = kwargs.pop(f.name)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown TPC option(s) {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")
        return cls(**values)

    def stabilized_blocks(self, depth: int) -> tuple[int, ...]:
        if not self.stabilizer:
            return ()
        layers = self.stabilizer_layers
        if layers is None:
            layers = tuple(range(0, min(self.start_layer, depth - 1) + 1))
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"stabilizer_layers {bad} outside the model's {depth} blocks")
        return layers


@dataclass
class TokenTrace:
    """What happened to every patch token in one forward pass.

    All tensors are ``[B, depth, N]``. ``active`` is bool; the probabilities are the smoothed ones the decisions
    used (``*_raw`` before smoothing); blocks before ``start_layer`` show every token active with probability 0.
    ``states`` ``[B, depth - start_layer, N]`` are the straight-through states of the controlled blocks (keep
    their gradient, for the losses).
    """

    active: torch.Tensor
    pause_prob: torch.Tensor
    restart_prob: torch.Tensor
    pause_prob_raw: torch.Tensor
    restart_prob_raw: torch.Tensor
    active_prob: torch.Tensor
    states: torch.Tensor
    start_layer: int
    num_prefix: int = 1
    grid: tuple[int, int] = (0, 0)
    stages: list | None = None  # hierarchical models (Swin): per-stage traces at their own resolution

    @property
    def paused(self) -> torch.Tensor:
        return ~self.active

    @property
    def restarted(self) -> torch.Tensor:
        """Active at block l after being paused at block l-1."""
        prev = torch.cat([torch.ones_like(self.active[:, :1]), self.active[:, :-1]], dim=1)
        return self.active & ~prev

    def keep_ratio(self) -> torch.Tensor:
        """Share of active patch tokens per block, ``[depth]``."""
        return self.active.float().mean(dim=(0, 2))

    def keep_per_image(self) -> torch.Tensor:
        """Share of active patch tokens per image and block, ``[B, depth]``."""
        return self.active.float().mean(dim=2)

    def active_counts(self) -> torch.Tensor:
        """Active patch tokens per image and block, ``[B, depth]``."""
        return self.active.sum(dim=2)


class Decision:
    """One controlled block's decision: ``states`` straight-through float ``[B, N]`` (keep their gradient),
    ``active`` their bool value, ``index`` ``[B, k]`` the kept patch indices in budget-mode inference (else
    ``None``: the selection is computed from ``active``).

    In budget-mode inference only ``index`` is made; ``active`` and ``states`` are built from it when something
    reads them (the masked path, the next decision, a trace): a model that decides once and gathers by index never
    pays the two to three ops of building a mask (batch-1 latency)."""

    __slots__ = ("_states", "_active", "index", "num_patches", "_dtype")

    def __init__(self, states: torch.Tensor | None = None, active: torch.Tensor | None = None,
                 index: torch.Tensor | None = None, num_patches: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if states is None and active is None and (index is None or num_patches is None):
            raise ValueError("a Decision needs states, active, or index with num_patches")
        self._states, self._active, self.index, self._dtype = states, active, index, dtype
        known = active if active is not None else states
        self.num_patches = known.shape[-1] if known is not None else num_patches

    @property
    def active(self) -> torch.Tensor:
        if self._active is None:
            if self._states is not None:
                self._active = self._states.detach() > 0.5
            else:
                empty = torch.zeros(self.index.shape[0], self.num_patches, dtype=torch.bool, device=self.index.device)
                self._active = empty.scatter_(-1, self.index, True)
        return self._active

    @property
    def states(self) -> torch.Tensor:
        if self._states is None:
            self._states = self.active.to(self._dtype)
        return self._states


@dataclass
class Propagation:
    """The decisions of one forward pass, block by block (state machine over :mod:`tpcvit.controller`)."""

    cfg: TPCConfig
    policy: ExecutionPolicy
    batch: int
    num_patches: int
    grid: tuple[int, int]
    device: torch.device
    sample: bool  # Gumbel noise (masked training path); False = deterministic threshold
    forced_active: torch.Tensor | None = None  # [B, blocks, N]: decisions given by the caller
    record: bool = True  # False: plain forward(), nobody reads the trace; skip its bookkeeping (batch-1 speed)
    _records: dict = field(default_factory=lambda: {k: [] for k in (
        "active", "pause", "restart", "pause_raw", "restart_raw", "a", "states")})

    def __post_init__(self) -> None:
        self.lean = not self.sample and not torch.is_grad_enabled()
        # the straight-through states and the active probabilities: the lean path (inference) reads neither unless
        # it records a trace, so it allocates nothing (every token is active before the first decision)
        self.state = None if self.lean else torch.ones(self.batch, self.num_patches, device=self.device)
        self.a = torch.ones(self.batch, self.num_patches, device=self.device) if self.record else None
        self.prev_probs: torch.Tensor | None = None
        self._last: Decision | None = None  # what repeat() gives a block that does not decide
        self.force_pause = self.policy.force_pause
        self.force_restart = self.policy.force_restart
        if self.cfg.restart is False and self.force_restart is None:
            self.force_restart = 0.0

    @property
    def mode(self) -> str:
        return self.policy.mode

    def dense_block(self) -> None:
        """Record a block where every token is computed."""
        if not self.record:
            return
        ones = torch.ones(self.batch, self.num_patches, device=self.device)
        zeros = torch.zeros_like(ones)
        self._append(ones.bool(), zeros, zeros, zeros, zeros, ones, None)

    def step(self, block: int, logits: torch.Tensor, budget_k: int) -> Decision:
        """Decide the states of block ``block`` (of this stage) from the controller ``logits`` ``[B, N, 2]``;
        ``budget_k``: active patch tokens in budget mode (:meth:`ExecutionPolicy.budget_k`)."""
        raw = C.transition_probs(logits)
        probs = raw
        if self.cfg.smoothing:
            probs = C.smooth_probs(raw, self.prev_probs, self.grid, self.cfg.smooth_max_dev,
                                   self.cfg.smooth_momentum)
        self.prev_probs = probs
        pause, restart = probs.unbind(-1)
        if self.force_pause is not None:
            pause = torch.full_like(pause, self.force_pause)
        if self.force_restart is not None:
            restart = torch.full_like(restart, self.force_restart)

        if self.forced_active is not None:
            decision = Decision(states=self.forced_active[:, block].to(pause.dtype))
        elif self.lean:  # inference: hard decisions only, no straight-through bookkeeping
            decision = self._lean_step(pause, restart, budget_k)
        elif self.mode == "budget":
            decision = Decision(states=C.topk_states(C.keep_score(self.state, pause, restart), budget_k))
        else:
            tau, (thr_pause, thr_restart) = self.cfg.gumbel_tau, self.policy.thresholds(self.cfg.threshold)
            pause_ev = C.sample_events(pause, tau, thr_pause, noise=self.sample)
            restart_ev = C.sample_events(restart, tau, thr_restart, noise=self.sample)
            decision = Decision(states=C.active_recursion(self.state, pause_ev, restart_ev))
        if not self.lean:
            self.state = decision.states
        if self.record:
            self.a = C.active_recursion(self.a, pause, restart)
            self._append(decision.active, pause, restart, raw[..., 0], raw[..., 1], self.a,
                         None if self.lean else decision.states)
        self._last = decision
        return decision

    def _lean_step(self, pause: torch.Tensor, restart: torch.Tensor, budget_k: int) -> Decision:
        """Inference decisions from the previous block's hard ones (``keep_score`` for 0/1 states, exactly)."""
        last = self._last
        if self.mode == "budget":
            if last is None:  # s = 1 everywhere: the score is 1 - p, so keep the k least likely to pause
                index = pause.topk(budget_k, dim=-1, largest=False, sorted=False).indices
            else:  # s (1 - p) + (1 - s) r: r, with 1 - p written at the kept tokens (no mask to build)
                score = (restart.scatter(-1, last.index, 1.0 - pause.gather(-1, last.index)) if last.index is not None
                         else torch.where(last.active, 1.0 - pause, restart))
                index = score.topk(budget_k, dim=-1, sorted=False).indices
            return Decision(index=index, num_patches=self.num_patches, dtype=pause.dtype)
        prev = None if last is None else last.active  # None: every token active so far
        thr_pause, thr_restart = self.policy.thresholds(self.cfg.threshold)
        if prev is None:
            return Decision(active=pause <= thr_pause, dtype=pause.dtype)
        return Decision(active=torch.where(prev, pause <= thr_pause, restart > thr_restart), dtype=pause.dtype)

    def repeat(self) -> Decision:
        """The last decision again, for a block that does not decide (``ExecutionPolicy.decide_every``): the same
        tokens stay active, recorded in the trace like a decided block (the probabilities it was made with)."""
        last = self._last
        if self.record:
            rec = self._records
            self._append(last.active, rec["pause"][-1], rec["restart"][-1], rec["pause_raw"][-1],
                         rec["restart_raw"][-1], rec["a"][-1], None if self.lean else last.states)
        return last

    def _append(self, active, pause, restart, pause_raw, restart_raw, a, states) -> None:
        rec = self._records
        for key, value in (("active", active), ("pause", pause), ("restart", restart),
                           ("pause_raw", pause_raw), ("restart_raw", restart_raw), ("a", a)):
            rec[key].append(value)
        if states is not None:
            rec["states"].append(states)

    def trace(self, start_layer: int, num_prefix: int) -> TokenTrace | None:
        if not self.record:
            return None
        rec = self._records
        stack = lambda key: torch.stack(rec[key], dim=1)  # noqa: E731
        states = stack("states") if rec["states"] else torch.ones(self.batch, 0, self.num_patches,
                                                                    device=self.device)
        return TokenTrace(active=stack("active"), pause_prob=stack("pause"), restart_prob=stack("restart"),
                          pause_prob_raw=stack("pause_raw"), restart_prob_raw=stack("restart_raw"),
                          active_prob=stack("a"), states=states, start_layer=start_layer,
                          num_prefix=num_prefix, grid=self.grid)


def tpc_loss(trace: TokenTrace, cfg: TPCConfig, alpha_budget: float, alpha_dist: float) -> dict[str, torch.Tensor]:
    """Controller losses of docs/METHOD.md section 3 for one trace: ``{"budget": ..., "dist": ..., "total": ...}``.

    The caller adds ``total`` to the task loss. Both terms use only the controlled blocks.
    """
    s = trace.start_layer
    zero = trace.active_prob.new_zeros(())
    if trace.states.shape[1] == 0:
        return {"budget": zero, "dist": zero, "total": zero}
    budget = C.budget_loss(trace.states, cfg.target_keep)
    dist = C.distribution_loss(trace.active_prob[:, s:], trace.restart_prob[:, s:], cfg.target_keep,
                               cfg.restart_prior, cfg.prior_spread)
    return {"budget": budget, "dist": dist, "total": alpha_budget * budget + alpha_dist * dist}
