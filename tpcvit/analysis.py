"""What the controller did, from traces: active / paused / restarted shares, where paused tokens come back,
what restarts are worth, and the probability distributions (the paper's claim that redundancy is temporary)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .checkpoint import atomic_write, unwrap
from .engine import count_blocks
from .propagation import TokenTrace
from .runtime import override_probs


def restart_matrix(active: torch.Tensor) -> torch.Tensor:
    """``M[l, m]`` = number of pauses that begin at block l and end with a restart at block m (m > l).

    ``active`` ``[B, L, N]`` bool. A pause begins where a token goes active -> paused; it ends at the first later
    block where the token is active again. Pauses never restarted are counted in ``M[l, L]`` (the last column).
    """
    b, depth, n = active.shape
    out = torch.zeros(depth, depth + 1, dtype=torch.long)
    prev = torch.ones(b, n, dtype=torch.bool)
    began = torch.full((b, n), -1, dtype=torch.long)  # block where the current pause began, -1 = not paused
    for l in range(depth):
        cur = active[:, l].cpu()
        start = prev & ~cur
        began = torch.where(start, torch.full_like(began, l), began)
        restart = ~prev & cur
        if restart.any():
            out[:, l].index_put_((began[restart],), torch.ones(int(restart.sum()), dtype=torch.long), accumulate=True)
        began = torch.where(cur, torch.full_like(began, -1), began)
        prev = cur
    open_pauses = began[began >= 0]
    if open_pauses.numel():
        out[:, depth].index_put_((open_pauses,), torch.ones_like(open_pauses), accumulate=True)
    return out


def trace_statistics(trace: TokenTrace) -> dict:
    """Per-block shares (summing to 1: active = computed, of which restarted; paused) and pause provenance."""
    active = trace.active.cpu()
    restarted = trace.restarted.cpu()
    shares_active = active.float().mean(dim=(0, 2))
    shares_restarted = restarted.float().mean(dim=(0, 2))
    matrix = restart_matrix(active)
    return {
        "active": shares_active.tolist(),
        "restarted": shares_restarted.tolist(),
        "active_not_restarted": (shares_active - shares_restarted).tolist(),
        "paused": (1 - shares_active).tolist(),
        "pauses_started": matrix.sum(dim=1).tolist(),
        "pauses_restarted": matrix[:, :-1].sum(dim=1).tolist(),
        "restart_matrix": matrix.tolist(),
    }


@torch.no_grad()
def analyze(model: nn.Module, loader, device: torch.device, progress: bool = True, bins: int = 20) -> dict:
    """Run the model (eval, its current mode) over ``loader``; restart statistics and what restarts are worth."""
    inner = unwrap(model).eval()
    depth = count_blocks(inner)
    totals: dict = {}
    correct = {"learned": 0, "no_restart": 0}
    gmacs = {"learned": 0.0, "no_restart": 0.0}
    seen = 0
    hist = {"pause": np.zeros((depth, bins)), "restart": np.zeros((depth, bins))}
    matrix = torch.zeros(depth, depth + 1, dtype=torch.long)
    edges = np.linspace(0, 1, bins + 1)
    for images, targets in tqdm(loader, desc="analyze", disable=not progress, leave=False):
        images, targets = images.to(device), targets.to(device)
        logits, trace = inner.forward_with_trace(images)
        with override_probs(inner, restart=0.0):
            logits_nr, trace_nr = inner.forward_with_trace(images)
        gmacs["learned"] += inner.gmacs_per_image(trace).sum().item()
        gmacs["no_restart"] += inner.gmacs_per_image(trace_nr).sum().item()
        correct["learned"] += (logits.argmax(-1) == targets).sum().item()
        correct["no_restart"] += (logits_nr.argmax(-1) == targets).sum().item()
        stats = trace_statistics(trace)
        for key in ("active", "restarted", "active_not_restarted", "paused"):
            totals[key] = totals.get(key, 0) + np.asarray(stats[key]) * len(targets)
        matrix += torch.tensor(stats["restart_matrix"])
        for l in range(max(trace.start_layer, 1), depth):
            was_active = trace.active[:, l - 1]  # pause decisions apply to active tokens, restarts to paused ones
            pause_vals = trace.pause_prob[:, l][was_active].cpu().numpy()
            restart_vals = trace.restart_prob[:, l][~was_active].cpu().numpy()
            hist["pause"][l] += np.histogram(pause_vals, bins=edges)[0]
            hist["restart"][l] += np.histogram(restart_vals, bins=edges)[0]
        seen += len(targets)
    started = matrix.sum(dim=1)
    return {
        "images": seen,
        "depth": depth,
        "start_layer": inner.tpc_cfg.start_layer,
        "shares": {k: (v / max(seen, 1)).round(5).tolist() for k, v in totals.items()},
        "restart_matrix": matrix.tolist(),
        "pauses_started": started.tolist(),
        "pauses_restarted": matrix[:, :-1].sum(dim=1).tolist(),
        "restart_rate": float(matrix[:, :-1].sum() / max(int(started.sum()), 1)),
        "top1_learned": 100 * correct["learned"] / max(seen, 1),
        "top1_no_restart": 100 * correct["no_restart"] / max(seen, 1),
        "gmacs_learned": gmacs["learned"] / max(seen, 1),  # the no-restart model also computes less
        "gmacs_no_restart": gmacs["no_restart"] / max(seen, 1),
        "hist_edges": edges.tolist(),
        "pause_hist": hist["pause"].tolist(),
        "restart_hist": hist["restart"].tolist(),
    }


def write_analysis(result: dict, out: str | os.PathLike) -> list[Path]:
    """``analysis.json`` and ``analysis.png`` (shares per block, restart matrix, probability histograms)."""
    from .reporting import plot_analysis

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "analysis.json", lambda t: Path(t).write_text(json.dumps(result, indent=2)))
    return [out / "analysis.json", plot_analysis(result, out / "analysis.png")]


def decision_noise(trace: TokenTrace) -> dict:
    """How noisy the controller's decisions are (the smoothing regulariser's claim), in the controlled blocks.

    * ``isolated``: share of tokens whose state disagrees with the majority of its (up to 8) grid neighbours,
      i.e. salt-and-pepper decisions;
    * ``flip_rate``: state changes per token per block transition (active <-> paused);
    * ``keep_std``: standard deviation over images of the mean keep ratio.
    """
    import torch.nn.functional as F

    s = trace.start_layer
    active = trace.active[:, s:].float()  # [B, Lc, N]
    b, lc, n = active.shape
    h, w = trace.grid
    grid = active.reshape(b * lc, 1, h, w)
    ones = torch.ones(1, 1, 3, 3)
    neighbours = F.conv2d(F.pad(torch.ones_like(grid), (1, 1, 1, 1)), ones) - 1
    agree_active = F.conv2d(F.pad(grid, (1, 1, 1, 1)), ones) - grid  # active neighbours
    share_active = agree_active / neighbours
    isolated = torch.where(grid > 0.5, share_active < 0.5, share_active > 0.5).float().mean().item()
    flips = (active[:, 1:] != active[:, :-1]).float().mean().item() if lc > 1 else 0.0
    return {"isolated": isolated, "flip_rate": flips, "keep_std": active.mean(dim=(1, 2)).std(correction=0).item()}


@torch.no_grad()
def decision_noise_over(model: nn.Module, loader, device: torch.device, limit: int = 2000) -> dict:
    """:func:`decision_noise` averaged over up to ``limit`` validation images."""
    inner = unwrap(model).eval()
    sums: dict = {}
    seen = 0
    keeps = []
    for images, _ in loader:
        _, trace = inner.forward_with_trace(images.to(device))
        stats = decision_noise(trace)
        for k in ("isolated", "flip_rate"):
            sums[k] = sums.get(k, 0.0) + stats[k] * len(images)
        keeps.append(trace.active[:, trace.start_layer:].float().mean(dim=(1, 2)).cpu())
        seen += len(images)
        if seen >= limit:
            break
    return {**{k: v / seen for k, v in sums.items()}, "keep_std": torch.cat(keeps).std(correction=0).item()}
