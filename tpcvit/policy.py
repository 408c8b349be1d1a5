"""How one forward pass of a token-reduction model is executed: an explicit, immutable policy.

Every switch that changes what a forward pass computes lives in one :class:`ExecutionPolicy` value, passed down
the forward (``model.forward_with_trace(x, policy=...)``) instead of being spread over mutable model attributes.
``tpcvit.set_mode`` remains as a convenience: it stores one policy on the model, which plain ``model(x)`` uses.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

MODES = ("dense", "adaptive", "budget")
PATHS = (None, "fast", "masked")


@functools.lru_cache(maxsize=256)
def spread_keep(keep: float, profile: tuple[float, ...]) -> tuple[float, ...]:
    """Per-block keep ratios ``min(1, s * profile[c])`` whose mean is ``keep``: the schedule's shape, scaled.

    Why not ``keep * profile[c]``: a steep schedule asks more than every token of its first blocks (a factor above
    ``1 / keep``); clamped there, the blocks would keep fewer tokens than ``keep`` on average, and ``keep=1.0``
    would not be the dense model. Here the tokens a full block cannot take go to the others, in proportion to
    their factors (water filling), so ``keep`` is the mean share of active patch tokens over the controlled blocks
    and 1.0 keeps every token. Where no factor exceeds ``1 / keep`` it is exactly ``keep * profile[c]`` (the factors
    are taken to have mean 1, as :func:`tpcvit.calibrate_keep_profile` and the decay schedules make them).
    """
    if keep * max(profile) <= 1.0:
        return tuple(keep * f for f in profile)
    n = len(profile)
    order = sorted(range(n), key=lambda c: -profile[c])
    for full in range(n + 1):  # the `full` largest factors are clamped to 1, the rest share what is left
        rest = sum(profile[c] for c in order[full:])
        scale = (n * keep - full) / rest if rest > 0 else float("inf")
        if full == n or scale * profile[order[full]] <= 1.0:
            break
    # each block filled raised the scale, so the filled ones have scale * f > 1: min() clamps exactly them
    return tuple(min(1.0, scale * f) for f in profile)


def every_suffix(decide_every: int) -> str:
    """How reports name a variant deciding in every K-th controlled block: ``"/K"`` (nothing for K = 1)."""
    return f"/{decide_every}" if decide_every > 1 else ""


@dataclass(frozen=True)
class ExecutionPolicy:
    """``mode``: ``"dense"`` (every token, the backbone), ``"adaptive"`` (per-image decisions) or ``"budget"``
    (exactly ``round(keep * N)`` active patch tokens per controlled block; ``keep`` defaults to the model's
    ``target_keep``). ``force_pause`` / ``force_restart``: constant probabilities replacing the controller's
    (analysis: ``force_restart=0`` makes every pause permanent). ``path``: ``"fast"`` (gather/scatter, real
    savings) or ``"masked"`` (full sequence with masks, the training form); ``None`` follows train/eval.
    ``packed``: adaptive batches run the per-token layers on packed tokens (no padding) where the block allows.
    ``keep_profile``: budget mode's schedule over the controlled blocks, relative to ``keep`` (block ``c`` keeps
    ``keep * keep_profile[c]``, mean 1; a block asked for more than all its tokens gives the rest to the others,
    so ``keep`` stays the mean share: :func:`spread_keep`): docs/METHOD.md's "k from the learned mean schedule",
    measured by :func:`tpcvit.calibrate_keep_profile`. ``None``: the same ``keep`` in every block.
    ``adaptive_level``: adaptive mode's compute knob in [0, 1]: an active token pauses when its pause probability
    exceeds ``level``, a paused one restarts when its restart probability exceeds ``1 - level`` (higher: more
    compute). ``None``: both thresholds are the model's ``threshold``.
    ``decide_every``: the controller decides in every k-th controlled block of a stage (the first one included);
    the blocks between reuse that decision (same tokens active, same selection), skipping the controller head and
    the decision: fewer small ops per block, which is what batch-1 latency is made of. 1: every block decides.
    """

    mode: str = "adaptive"
    keep: float | None = None
    force_pause: float | None = None
    force_restart: float | None = None
    path: str | None = None
    packed: bool = True
    keep_profile: tuple[float, ...] | None = None
    adaptive_level: float | None = None
    decide_every: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.keep is not None and not 0.0 < float(self.keep) <= 1.0:
            raise ValueError(f"keep must be a fraction in (0, 1], got {self.keep}")
        if self.keep is not None and self.mode != "budget":
            raise ValueError(f"keep only applies to mode='budget' (got mode={self.mode!r})")
        if self.path not in PATHS:
            raise ValueError(f"path must be None, 'fast' or 'masked', got {self.path!r}")
        if self.keep_profile is not None:
            profile = tuple(float(v) for v in self.keep_profile)
            if not profile or min(profile) <= 0.0:
                raise ValueError(f"keep_profile must be positive keep factors, one per controlled block, got {profile}")
            object.__setattr__(self, "keep_profile", profile)
        if self.adaptive_level is not None and not 0.0 <= float(self.adaptive_level) <= 1.0:
            raise ValueError(f"adaptive_level must be in [0, 1], got {self.adaptive_level}")
        if isinstance(self.decide_every, bool) or not isinstance(self.decide_every, int) or self.decide_every < 1:
            raise ValueError(f"decide_every must be an integer >= 1 (1: every block decides), "
                             f"got {self.decide_every!r}")
        for name in ("force_pause", "force_restart"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {value}")

    def replace(self, **changes) -> ExecutionPolicy:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def budget_k(self, num_patches: int, controlled: int, default_keep: float) -> int:
        """Active patch tokens of controlled block number ``controlled`` (0 = ``start_layer``) in budget mode:
        ``round(keep_c * N)`` within ``[1, N]``, ``keep_c`` from :func:`spread_keep` (``keep * profile[controlled]``
        unless a block would be asked for more than all its tokens; the last factor serves deeper blocks)."""
        keep = default_keep if self.keep is None else self.keep
        if self.keep_profile is not None:
            keep = spread_keep(float(keep), self.keep_profile)[min(controlled, len(self.keep_profile) - 1)]
        return max(1, min(num_patches, round(keep * num_patches)))

    def keeps_every_token(self, num_patches: int, controlled, default_keep: float) -> bool:
        """Budget mode keeping all ``num_patches`` tokens in each of the ``controlled`` blocks (indices as in
        :meth:`budget_k`): their decisions are known without the controller (every token active)."""
        return self.mode == "budget" and all(self.budget_k(num_patches, c, default_keep) == num_patches
                                             for c in controlled)

    def decides(self, controlled: int) -> bool:
        """Whether controlled block number ``controlled`` of a stage (0 = its first) decides anew."""
        return controlled % self.decide_every == 0

    def thresholds(self, default: float) -> tuple[float, float]:
        """Adaptive mode's ``(pause, restart)`` thresholds on the probabilities (see ``adaptive_level``)."""
        if self.adaptive_level is None:
            return default, default
        level = min(max(float(self.adaptive_level), 1e-6), 1.0 - 1e-6)
        return level, 1.0 - level

    def is_fast(self, training: bool) -> bool:
        """Gather/scatter execution: by default at eval, forced either way by ``path``."""
        return (not training) if self.path is None else self.path == "fast"
