"""Plots people would rather look at than read (matplotlib, headless)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .checkpoint import atomic_write  # noqa: E402


def plot_pipeline(result: dict, path: str | os.PathLike) -> Path:
    """Left: top-1 vs GMACs per image. Right: share of active tokens per block for every variant."""
    evals = result["eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, e in evals.items():
        ax1.scatter(e["gmacs"] * 1e3, e["top1"], s=60, label=name)
        ax1.annotate(name, (e["gmacs"] * 1e3, e["top1"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax2.plot(range(1, len(e["keep_per_block"]) + 1), e["keep_per_block"], marker="o", label=name)
    ax1.set_xlabel("MMACs per image (averaged over the validation set)")
    ax1.set_ylabel("top-1 (%)")
    ax1.set_title("accuracy vs compute")
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("block")
    ax2.set_ylabel("share of active patch tokens")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("token keep ratio per block")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(result["config"].get("name", ""))
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
