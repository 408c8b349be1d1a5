"""The one TPC runtime every backbone shares (ViT/DeiT, LV-ViT, Swin, and models given TPC by ``tpcvit.patch``).

:class:`TPCRuntime` owns what is the same for every family: building the controller heads and stabilizers, the
block-by-block :class:`~tpcvit.propagation.Propagation`, the training-free attention signal, the choice of the
execution path from an explicit :class:`~tpcvit.policy.ExecutionPolicy`, and timm's forward trio
(``forward_features`` / ``forward`` / ``forward_with_trace``). A family adapter supplies only its geometry and
"run this block on this selection" (:meth:`TPCRuntime._tpc_run_block`): see ``tpcvit/models/vit.py`` (one stage,
prefix tokens) and ``tpcvit/models/swin.py`` (four stages, windows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import controller as C
from .layers import ControllerHead, TokenGridStabilizer, check_fixed_grid, eval_mode
from .policy import ExecutionPolicy
from .propagation import Decision, Propagation, TokenTrace, TPCConfig, tpc_loss


@dataclass(frozen=True)
class BlockStep:
    """Everything a family needs to run one controlled block: the decision and how to execute it."""

    decision: Decision
    fast: bool  # gather/scatter (True) or the masked full sequence (False)
    policy: ExecutionPolicy
    forced: bool  # decisions given by the caller (``forced_active``), not by the controller
    budget_k: int  # active patch tokens per image in budget mode
    attention: bool  # the attention controller needs this block's class attention back
    grid: tuple[int, int]  # the patch grid the block runs on (these images'; see Stage)
    rope: torch.Tensor | None = None  # the block's rotary table over every patch token (RoPE families), else None

    @property
    def budget_selection(self) -> bool:
        """Every image keeps exactly ``budget_k`` tokens: a static-shape selection."""
        return self.policy.mode == "budget" and not self.forced


@dataclass(frozen=True)
class Stage:
    """A run of blocks on one token grid (``grid``: patch rows, columns of these images); ``enter`` (e.g. Swin's
    patch merging) runs before the first block."""

    blocks: list[nn.Module]
    grid: tuple[int, int]
    enter: Callable[[torch.Tensor], torch.Tensor] | None = None


class TPCRuntime:
    """Token propagation control on a timm backbone. Families call :meth:`_init_tpc` at the end of ``__init__``
    and implement the ``_tpc_*`` geometry hooks and :meth:`_tpc_run_block`."""

    added_modules: tuple[str, ...] = ("controller", "stabilizers")  # not in dense weights (load_backbone)

    # -- what a family supplies ----------------------------------------------------------------------------
    def _tpc_stages(self, images: torch.Tensor) -> list[Stage]:
        """The stages ``images`` run through, each on its token grid (a dynamic-size model: these images')."""
        raise NotImplementedError

    def _tpc_block_dims(self) -> list[int]:
        """Token width at every block (controller heads and stabilizers are built for it)."""
        raise NotImplementedError

    def _tpc_embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _tpc_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``x`` as ``[B, T, D]`` tokens (prefix tokens first, then the stage's grid row-major) and the number of
        prefix tokens."""
        raise NotImplementedError

    def _tpc_restore(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_tpc_tokens` (``[B, T, D]`` back to the family's layout)."""
        return tokens

    def _tpc_embed_positions(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """:meth:`_tpc_embed` and, per block, the rotary position table of every patch token (RoPE families: made
        with the embedding, once per forward; it must follow every token selection), or ``None``: the positions
        are in the tokens."""
        return self._tpc_embed(x), None

    def _tpc_dense_block(self, blk: nn.Module, x: torch.Tensor, seed_attention: bool,
                         rope: torch.Tensor | None = None):
        """A block computing every token; ``seed_attention``: also return the class attention (see ViT);
        ``rope``: the block's rotary table (:meth:`_tpc_embed_positions`)."""
        return blk(x), None

    def _tpc_run_block(self, blk: nn.Module, x: torch.Tensor, step: BlockStep):
        """Run a controlled block on the decided selection: ``(x, class attention or None)``."""
        raise NotImplementedError

    def _tpc_run_group(self, blocks: list[nn.Module], x: torch.Tensor, steps: list[BlockStep]):
        """Run consecutive controlled blocks that share one decision (``steps[0]`` decided, the rest repeat it;
        ``ExecutionPolicy.decide_every``): ``(x, the last class attention or None)``. One block at a time here; a
        family may keep the selection gathered across the group instead (see ViT)."""
        seen = None
        for blk, step in zip(blocks, steps):
            x, score = self._tpc_run_block(blk, x, step)
            seen = score if score is not None else seen
        return x, seen

    def _tpc_finish(self, x: torch.Tensor, props: list[Propagation], with_trace: bool):
        """Final features and the trace (``None`` when ``with_trace`` is False)."""
        raise NotImplementedError

    def _tpc_check_forced(self, forced_active, batch: int, stages: list[Stage]) -> list[torch.Tensor] | None:
        """Caller-forced decisions, one ``[B, blocks, N]`` tensor per stage (clear error on a wrong shape)."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------------------
    def _init_tpc(self, cfg: TPCConfig) -> None:
        dims = self._tpc_block_dims()
        depth = len(dims)
        check_fixed_grid(self, "TPC", dynamic_ok=True)  # (each stage's grid is that of the input: _tpc_stages)
        if cfg.start_layer >= depth:
            raise ValueError(f"start_layer={cfg.start_layer} must be < depth={depth}")
        if cfg.reads_attention and cfg.start_layer < 1:
            raise ValueError(f"controller={cfg.controller!r} reads the previous block's class attention: "
                             "start_layer >= 1")
        if cfg.paused_key_pool > 1 and not getattr(self, "num_prefix_tokens", 0):
            raise ValueError("paused_key_pool needs a class token (its query reads the pooled keys): use "
                             "paused_key_pool=1 on a model without one")
        self.tpc_cfg = cfg
        heads = range(cfg.start_layer, depth) if cfg.controller != "attention" else ()  # training-free: none
        self.controller = nn.ModuleList(ControllerHead(dims[i], cfg.pause_bias_init, cfg.restart_bias_init)
                                        for i in heads)
        if cfg.controller == "hybrid":  # a zero correction: the model starts as the training-free controller
            for head in self.controller:
                for param in head.parameters():
                    nn.init.zeros_(param)
        self.stabilizers = nn.ModuleDict({str(i): TokenGridStabilizer(dims[i]) for i in cfg.stabilized_blocks(depth)})
        self.tpc_policy = ExecutionPolicy()

    def _propagate(self, images: torch.Tensor, policy: ExecutionPolicy | None = None, forced_active=None,
                   with_trace: bool = True, taps: dict[int, torch.Tensor | None] | None = None,
                   stop_early: bool = False) -> tuple[torch.Tensor, TokenTrace | None]:
        """Run every block under ``policy`` (default: the model's stored one); features and trace.

        ``taps``: block indices whose output to keep (timm's ``forward_intermediates``), filled in place with the
        family's buffer after that block: every token, paused ones with the features they were paused with. A group
        of blocks sharing one decision ends at a tapped block (the next one reuses the decision), so a tap changes no
        result. ``stop_early``: no block after the last tapped one runs."""
        policy = self.tpc_policy if policy is None else policy
        cfg = self.tpc_cfg
        fast = policy.is_fast(self.training)
        x, ropes = self._tpc_embed_positions(images)

        def rope(block: int) -> torch.Tensor | None:  # the block's rotary table (RoPE families), else None
            return None if ropes is None else ropes[block]
        stages = self._tpc_stages(images)
        forced = self._tpc_check_forced(forced_active, x.shape[0], stages)
        attention = cfg.reads_attention and policy.mode != "dense"
        score = None  # training-free controller: relative class attention of every token, from the last block

        def wants_score(controlled: int, last: bool) -> bool:  # the class attention feeds the next decision only
            return attention and (last or policy.decides(controlled + 1))

        # the last block to run: every block, or (stop_early) the last tapped one
        last = max(taps) if stop_early and taps else float("inf")

        props, g = [], 0
        for s, stage in enumerate(stages):
            if stage.enter is not None:
                x = stage.enter(x)
            (tokens, prefix), grid = self._tpc_tokens(x), stage.grid
            prop = Propagation(cfg, policy, tokens.shape[0], grid[0] * grid[1], grid, x.device,
                               sample=self.training and not fast, forced_active=None if forced is None else forced[s],
                               record=with_trace)
            blocks, j, controlled, k = stage.blocks, 0, 0, 0  # controlled: blocks of this stage decide_every counts
            # budget mode keeping every token in every controlled block of the stage: the decisions are known
            # (all active), so an inference pass nobody traces skips the controller (keep-100% overhead: none)
            keeps_all = forced is None and not with_trace and not self.training and policy.keeps_every_token(
                prop.num_patches, range(max(g, cfg.start_layer) - cfg.start_layer, g + len(blocks) - cfg.start_layer),
                cfg.target_keep)
            while j < len(blocks) and g <= last:
                if str(g) in self.stabilizers:
                    x = self._tpc_restore(self.stabilizers[str(g)](self._tpc_tokens(x)[0], prefix, grid), x)
                if policy.mode == "dense" or g < cfg.start_layer or keeps_all:
                    x, seeded = self._tpc_dense_block(blocks[j], x,
                                                      attention and not keeps_all and g == cfg.start_layer - 1, rope(g))
                    score = seeded if seeded is not None else score
                    prop.dense_block()
                    if taps and g in taps:  # a copy: inference writes the buffer in place
                        taps[g] = x.clone()
                    j, g = j + 1, g + 1
                    continue

                if forced is None and not policy.decides(controlled):  # a run cut by a stabilizer: reuse
                    first = BlockStep(prop.repeat(), fast, policy, False, k,
                                      wants_score(controlled, j + 1 == len(blocks)), grid, rope(g))
                else:
                    tokens = self._tpc_tokens(x)[0]
                    logits = self.controller[g - cfg.start_layer](tokens, prefix) if len(self.controller) else None
                    if attention:
                        free = C.attention_logits(score[:, prefix:], cfg.attention_threshold,
                                                  cfg.attention_sharpness)
                        logits = free if logits is None else free + logits
                    k = policy.budget_k(prop.num_patches, g - cfg.start_layer, cfg.target_keep)
                    first = BlockStep(prop.step(j, logits, k), fast, policy, forced is not None, k,
                                      wants_score(controlled, j + 1 == len(blocks)), grid, rope(g))
                # the blocks after it that reuse this decision (decide_every) run with it as one group
                run = [first]
                while (forced is None and j + len(run) < len(blocks) and not policy.decides(controlled + len(run))
                       and str(g + len(run)) not in self.stabilizers and g + len(run) - 1 not in (taps or ())):
                    run.append(BlockStep(prop.repeat(), fast, policy, False, k,
                                         wants_score(controlled + len(run), j + len(run) + 1 == len(blocks)),
                                         grid, rope(g + len(run))))
                x, seen = self._tpc_run_group(blocks[j:j + len(run)], x, run)
                score = seen if seen is not None else score
                j, g, controlled = j + len(run), g + len(run), controlled + len(run)
                if taps and g - 1 in taps:  # the run's last block (a tapped block ends its run)
                    taps[g - 1] = x.clone()
            props.append(prop)
            if g > last:
                break
        return self._tpc_finish(x, props, with_trace)

    # -- timm's forward trio -------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("TPC models make their own attention masks; attn_mask/is_causal unsupported")
        return self._propagate(x, with_trace=False)[0]

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False, return_trace: bool = False,
                token_logits: bool = False):
        """timm's forward; ``return_trace=True`` gives ``(logits, trace)`` (use it through DDP wrappers);
        ``token_logits=True``: the outputs of :meth:`forward_head_tokens` (models with a token-labelling head)."""
        if return_trace:
            return self.forward_with_trace(x, token_logits=token_logits)
        return self._tpc_head(self.forward_features(x, attn_mask, is_causal), token_logits)

    def _tpc_head(self, feats: torch.Tensor, token_logits: bool):
        if not token_logits:
            return self.forward_head(feats)
        if not hasattr(self, "forward_head_tokens"):
            raise ValueError(f"{type(self).__name__} has no token-labelling head: token_logits=True needs an LV-ViT")
        return self.forward_head_tokens(feats)

    def forward_with_trace(self, x: torch.Tensor, forced_active=None, path: str | None = None,
                           policy: ExecutionPolicy | None = None,
                           token_logits: bool = False) -> tuple[torch.Tensor, TokenTrace]:
        """Logits and a :class:`TokenTrace` of which tokens were active/paused/restarted in every block.

        ``policy``: how to execute this pass (default: the model's, see ``tpcvit.set_mode``); ``path`` is a
        shortcut for ``policy.replace(path=...)`` (``"fast"`` gather/scatter, ``"masked"``). ``forced_active``
        replaces the controller's decisions (fixed-decision comparisons): ``[B, depth, N]`` bool for a ViT, one
        ``[B, H_l*W_l]`` tensor per block for Swin.
        """
        policy = self.tpc_policy if policy is None else policy
        if path is not None:
            policy = policy.replace(path=path)
        feats, trace = self._propagate(x, policy, forced_active)
        return self._tpc_head(feats, token_logits), trace

    # -- reducer protocol ----------------------------------------------------------------------------------
    method = "tpc"
    budget_raises_compute = True

    @property
    def budget_bounds(self) -> tuple[float, float]:
        """The keep ratio of budget mode: from one patch token to all; with an ``adaptive_level`` in the policy,
        that level (adaptive mode's knob)."""
        if self.tpc_policy.adaptive_level is not None:
            return 0.0, 1.0
        return 1.0 / self.patch_embed.num_patches, 1.0

    def set_budget(self, value: float) -> None:
        """The harness's knob: budget mode with ``keep = value``, or, when the policy holds an ``adaptive_level``
        (``set_policy(model, policy.replace(mode="adaptive", adaptive_level=0.5))``), adaptive mode at that level."""
        if self.tpc_policy.adaptive_level is not None:
            self.tpc_policy = self.tpc_policy.replace(mode="adaptive", adaptive_level=float(value))
        else:
            self.tpc_policy = self.tpc_policy.replace(mode="budget", keep=float(value))

    @property
    def adaptive(self) -> bool:
        """Cost differs per image (adaptive decisions)."""
        return self.tpc_policy.mode == "adaptive"

    def tpc_parameters(self) -> list[nn.Parameter]:
        """Parameters TPC adds to the backbone (controller heads and stabilizers)."""
        return list(self.controller.parameters()) + list(self.stabilizers.parameters())

    def reduction_parameters(self) -> list[nn.Parameter]:
        return self.tpc_parameters()

    def reduction_loss(self, trace: TokenTrace, train_cfg: dict) -> dict[str, torch.Tensor]:
        """docs/METHOD.md's controller losses, weighted by ``train.alpha_budget`` / ``train.alpha_dist``."""
        return tpc_loss(trace, self.tpc_cfg, train_cfg["alpha_budget"], train_cfg["alpha_dist"])


# ----------------------------------------------------------------------------------------------------------
# user-facing switches
# ----------------------------------------------------------------------------------------------------------
def tpc_modules(model: nn.Module) -> list[nn.Module]:
    """Every TPC model inside ``model`` (also through DDP / wrappers)."""
    return [m for m in model.modules() if isinstance(m, TPCRuntime)]


def set_policy(model: nn.Module, policy: ExecutionPolicy) -> nn.Module:
    """Store ``policy`` on every TPC model inside ``model`` (what plain ``model(x)`` then uses)."""
    targets = tpc_modules(model)
    if not targets:
        raise TypeError(f"{type(model).__name__} is not a TPC model (create one with timm.create_model('tpc_...'))")
    for m in targets:
        m.tpc_policy = policy
    return model


def set_mode(model: nn.Module, mode: str, keep: float | None = None) -> nn.Module:
    """Choose how a TPC model propagates tokens (stores ``ExecutionPolicy(mode, keep)``, other fields kept).

    ``"dense"``: controller off, every token in every block (the backbone). ``"adaptive"``: learned per-image
    decisions. ``"budget"``: exactly ``round(keep * N)`` active patch tokens per controlled block (``keep``
    defaults to the model's ``target_keep``). ``model.eval()`` then uses the gather/scatter path,
    ``model.train()`` the masked path.
    """
    return set_policy(model, current_policy(model).replace(mode=mode, keep=keep))


@torch.no_grad()
def calibrate_keep_profile(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> tuple[float, ...]:
    """Budget mode's schedule over the controlled blocks, learned from the model itself (docs/METHOD.md: "k from
    the learned mean schedule"): the mean share of active tokens per controlled block in ``adaptive`` mode on
    ``images``, divided by its mean. Stored in the model's policy (``keep_profile``, kept by :func:`set_mode`), so
    budget mode at ``keep`` then keeps ``keep * profile[c]`` tokens in controlled block ``c`` (a block asked for more
    than all its tokens passes the rest on: :func:`tpcvit.policy.spread_keep`); returned.

    Why: a TPC model fine-tuned adaptively learns to keep more tokens early and fewer late (its keep prior); the
    same ``keep`` in every block asks it for a distribution it never saw in training.
    """
    saved = current_policy(model)
    set_policy(model, saved.replace(mode="adaptive", keep=None, keep_profile=None))
    try:
        tpc = unwrap_reducer(model)
        with eval_mode(model):
            keep = sum(tpc.forward_with_trace(chunk)[1].keep_ratio() * len(chunk)
                       for chunk in images.split(batch_size))
        keep = (keep / images.shape[0])[tpc.tpc_cfg.start_layer:].clamp_min(1e-3)
        profile = tuple(round(float(v), 4) for v in keep / keep.mean())
    finally:
        set_policy(model, saved)
    set_policy(model, saved.replace(keep_profile=profile))
    return profile


def unwrap_reducer(model: nn.Module) -> TPCRuntime:
    """The (first) TPC model inside ``model``."""
    targets = tpc_modules(model)
    if not targets:
        raise TypeError(f"{type(model).__name__} is not a TPC model (create one with timm.create_model('tpc_...'))")
    return targets[0]


def current_policy(model: nn.Module) -> ExecutionPolicy:
    """The policy stored on (the first TPC model inside) ``model``."""
    return unwrap_reducer(model).tpc_policy


@contextlib.contextmanager
def override_probs(model: nn.Module, pause: float | None = None, restart: float | None = None):
    """Within the block, replace the pause and/or restart probabilities by constants (analysis, tests).

    ``override_probs(model, restart=0.0)`` makes every pause permanent; ``pause=0.0`` never pauses.
    """
    saved = current_policy(model)
    set_policy(model, saved.replace(force_pause=pause, force_restart=restart))
    try:
        yield model
    finally:
        set_policy(model, saved)
