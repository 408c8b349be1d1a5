"""The one place results are turned into tables and plots (Markdown, matplotlib headless, atomic files).

Imports nothing from the harness modules (compare, pipeline, evidence, ablation): they import from here."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .checkpoint import atomic_write  # noqa: E402


def markdown_table(head: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table (cells converted with ``str``)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]], higher_x_better: bool) -> list[tuple[float, float]]:
    """Points not dominated by any other (higher y better; x = cost if not ``higher_x_better``), sorted by x."""
    ordered = sorted(points, key=lambda p: p[0], reverse=higher_x_better)
    front, best = [], float("-inf")
    for x, y in ordered:
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


def plot_pipeline(result: dict, path: str | os.PathLike) -> Path:
    """Left: top-1 vs GMACs per image. Middle: top-1 vs speed-up over dense at each timed batch size (batch 1 and a
    large batch apart: where token reduction does and does not turn into speed). Right: share of active tokens per
    block for every variant."""
    evals = result["eval"]
    speed = {(r["variant"], r["batch"]): r["speedup"] for r in result.get("speed", [])}
    batches = sorted({b for _, b in speed})
    fig, (ax1, ax_speed, ax2) = plt.subplots(1, 3, figsize=(16, 4.4))
    for i, (name, e) in enumerate(evals.items()):
        color = f"C{i % 10}"  # one colour per variant in every panel (legends, not labels: the points crowd)
        for j, b in enumerate(batches):  # rows timed in their own right (dense + extra epochs is dense's speed)
            if (name, b) in speed:
                ax_speed.scatter(speed[name, b], e["top1"], s=55, color=color, marker="os^D"[j % 4],
                                 facecolors="none" if j == 0 and len(batches) > 1 else color,
                                 label=name if j == len(batches) - 1 else None)
        if e.get("same_outputs_as"):  # a timing-only row (the lean dense executor): its point is dense's
            continue
        ax1.scatter(e["gmacs"] * 1e3, e["top1"], s=60, label=name, color=color)
        ax2.plot(range(1, len(e["keep_per_block"]) + 1), e["keep_per_block"], marker="o", label=name, color=color)
    ax1.set_xlabel("MMACs per image (averaged over the validation set)")
    ax1.set_ylabel("top-1 (%)")
    ax1.set_title("accuracy vs compute")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax_speed.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax_speed.set_xlabel("speed-up over dense (timm's forward), " + ", ".join(
        f"{'hollow' if j == 0 and len(batches) > 1 else 'filled'}: b={b}" for j, b in enumerate(batches)))
    ax_speed.set_ylabel("top-1 (%)")
    ax_speed.set_title("accuracy vs speed, per batch size")
    ax_speed.grid(alpha=0.3)
    ax_speed.legend(fontsize=7)
    ax2.set_xlabel("block")
    ax2.set_ylabel("share of active patch tokens")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("token keep ratio per block")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(result["config"].get("name", ""))
    fig.tight_layout()
    return save_figure(fig, path)


METHOD_STYLE = {"dense": ("black", "*"), "dense-lean": ("dimgrey", "X"), "tpc": ("tab:red", "o"),
                "tpc-adaptive": ("darkred", "D"),
                "tpc-keys": ("tab:orange", "o"), "tpc-keys-adaptive": ("saddlebrown", "D"),
                "tome": ("tab:blue", "s"), "tome-ft": ("navy", "P"),
                "evit": ("tab:green", "^"), "avit": ("tab:purple", "v")}


def plot_compare(result: dict, path: str | os.PathLike) -> Path:
    """Harness plots: top-1 vs GMACs and top-1 vs throughput (largest batch), per method, with the Pareto front.

    Without accuracy (speed-only runs): throughput vs GMACs.
    """
    points = result["points"]
    big = max(result["batch_sizes"])
    speed = {r["variant"]: r["img_per_s"] for r in result["speed"] if r["batch"] == big}
    has_acc = result["data"]
    panels = [("gmacs", "GMACs per image (mean over the evaluation set)", False),
              ("speed", f"images/s at batch {big}", True)] if has_acc else [("gmacs", "GMACs per image", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), squeeze=False)
    for ax, (key, xlabel, higher_better) in zip(axes[0], panels):
        xy = []
        for method in dict.fromkeys(p["method"] for p in points.values()):
            mine = [(lbl, p) for lbl, p in points.items() if p["method"] == method]
            xs = [p["gmacs"] if key == "gmacs" else speed[lbl] for lbl, p in mine]
            ys = [p["top1"] if has_acc else speed[lbl] for lbl, p in mine]
            colour, marker = METHOD_STYLE.get(method, ("grey", "o"))
            order = sorted(range(len(xs)), key=xs.__getitem__)
            ax.plot([xs[i] for i in order], [ys[i] for i in order], marker=marker, color=colour, ms=8, label=method)
            xy += list(zip(xs, ys))
        if has_acc:
            front = pareto_front(xy, higher_x_better=higher_better)
            ax.plot(*zip(*front), ls="--", color="grey", lw=1, label="Pareto front")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 (%)" if has_acc else f"images/s at batch {big}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"{result['config'].get('name', '')}: {m['cpu']}, {m['threads']} threads, fp32", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


STATE_COLOURS = {"paused": (0.15, 0.15, 0.15, 0.75), "restarted": (0.85, 0.1, 0.1, 0.6)}


def token_map_figure(image, active, restarted, grid: tuple[int, int], title: str = ""):
    """Per-block panels of one image: active tokens clear, paused dark, restarted red; last panel: the number of
    blocks each token was computed in (A-ViT-style depth map). ``active``/``restarted`` ``[depth, N]`` bool."""
    import numpy as np

    depth = active.shape[0]
    h, w = grid
    cols = min(depth + 1, 7)
    rows = -(-(depth + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.3 * rows + 0.4), squeeze=False)
    img = np.asarray(image.convert("RGB"))
    extent = (0, img.shape[1], img.shape[0], 0)
    for l in range(depth):
        ax = axes[l // cols][l % cols]
        overlay = np.zeros((h, w, 4))
        a = active[l].reshape(h, w).numpy()
        r = restarted[l].reshape(h, w).numpy()
        overlay[~a] = STATE_COLOURS["paused"]
        overlay[r] = STATE_COLOURS["restarted"]
        ax.imshow(img, extent=extent)
        ax.imshow(overlay, extent=extent, interpolation="nearest")
        ax.set_title(f"block {l}: {int(a.sum())} act, {int(r.sum())} rst", fontsize=7)
        ax.axis("off")
    ax = axes[depth // cols][depth % cols]
    computed = active.sum(dim=0).reshape(h, w).numpy()
    ax.imshow(img, extent=extent)
    im = ax.imshow(computed, extent=extent, cmap="magma", alpha=0.6, vmin=0, vmax=depth, interpolation="nearest")
    ax.set_title("blocks computed", fontsize=7)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046)
    for k in range(depth + 1, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)
    return path


def plot_ablation(table: dict[str, dict], path: Path) -> Path:
    """Ablation: accuracy per variant (every seed), training fluctuation, decision noise."""
    import numpy as np

    names = list(table)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    x = np.arange(len(names))
    axes[0].bar(x, [table[n]["top1_mean"] for n in names], yerr=[table[n]["top1_std_seeds"] for n in names],
                capsize=4, color="#4c72b0", alpha=0.8)
    for i, n in enumerate(names):  # every seed, so a collapsed run is seen rather than averaged away
        seeds = table[n]["top1_per_seed"]
        axes[0].scatter(np.full(len(seeds), i), seeds, color="black", s=14, zorder=3)
    lo = min(min(table[n]["top1_per_seed"]) for n in names)
    axes[0].set(ylim=(lo - 2, None), ylabel="top-1 (%)", title="accuracy (bars: mean ± std; dots: seeds)")
    axes[1].bar(x, [table[n]["top1_spread_epochs"] for n in names], color="#dd8452")
    axes[1].set(ylabel="std of top-1 over last epochs", title="training fluctuation (stabilizer)")
    axes[2].bar(x, [100 * table[n]["isolated"] for n in names], color="#55a868")
    axes[2].set(ylabel="% isolated decisions", title="decision noise (smoothing)")
    for ax in axes:
        ax.set_xticks(x, names, rotation=20, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_evidence(result: dict, path: Path) -> Path:
    """Evidence, 2x2: TPC and the peers (whole range, then zoomed on the top band), TPC and its claim variants
    (zoomed), and TPC's paired differences with 95% intervals. Every seed is drawn, not just the means."""
    s = result["summary"]
    methods = sorted(s["table"])
    palette = plt.get_cmap("tab20").colors
    style = {m: (palette[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], "os^vD<>ph*"[i % 10])
             for i, m in enumerate(methods)}
    variants = [m for m in methods if m.startswith("tpc-") and not m.startswith("tpc-free")]
    peers = [m for m in methods if m not in variants]
    dense = result["dense"]["top1"]
    best = max((c["mean"] for cells in s["table"].values() for c in cells.values()), default=dense)

    def curves(ax, names, title, zoom):
        for method in names:
            color, marker = style[method]
            pts = sorted((c["gmacs_ratio"], c["mean"], c["top1"]) for c in s["table"][method].values())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], f"-{marker}" if method.startswith("tpc") else
                    f"--{marker}", color=color, label=method, lw=2.4 if method == "tpc" else 1.2, ms=4)
            for x, _, seeds in pts:  # every seed, not just the mean
                ax.scatter([x] * len(seeds), seeds, color=color, s=10, alpha=0.5, marker=marker)
        ax.axhline(dense, color="grey", ls=":", label="dense backbone")
        if zoom:
            ax.set_ylim(min(dense, best) - 3.0, max(dense, best) + 0.5)
        ax.set(xlabel="GMACs / dense GMACs", ylabel="top-1 (%)", title=title)
        ax.legend(fontsize=7, ncol=2)

    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    curves(axes[0, 0], peers, f"{result['setting']}: TPC and the peers, every seed", zoom=False)
    curves(axes[0, 1], peers, "the same, zoomed on the top 3 points of top-1", zoom=True)
    curves(axes[1, 0], ["tpc", *variants] if "tpc" in s["table"] else variants,
           "TPC and its variants (claims, candidates)", zoom=True)
    ax = axes[1, 1]
    budgets = [f"{b:g}" for b in result["budgets"]]
    rows = [("vs best peer", s["tpc_vs_best_peer"])] + [(f"vs {v}", c) for v, c in s["claims"].items()]
    width = 0.8 / max(1, len(rows))
    for j, (label, cells) in enumerate(rows):
        xs, ys, lo, hi = [], [], [], []
        for i, b in enumerate(budgets):
            c = cells.get(b)
            if c and "mean" in c and c["n"] > 1:
                xs.append(i + (j - (len(rows) - 1) / 2) * width)
                ys.append(c["mean"])
                lo.append(c["mean"] - c["low"])
                hi.append(c["high"] - c["mean"])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=f"TPC {label}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(budgets)), [f"{float(b):.0%} GMACs" for b in budgets])
    ax.set(ylabel="top-1 difference (pt), 95% CI", title="TPC minus ...: paired by seed (above 0: TPC better)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:  # fewer than 2 seeds: no interval to draw yet
        ax.text(0.5, 0.5, "intervals need >= 2 seeds", ha="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_analysis(result: dict, path: str | os.PathLike) -> Path:
    """Restart analysis: token states per block, where pauses end, controller probability histograms."""
    import numpy as np

    depth = result["depth"]
    blocks = np.arange(depth)
    s = result["shares"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.bar(blocks, s["active_not_restarted"], label="active", color="#4c9a2a")
    ax.bar(blocks, s["restarted"], bottom=s["active_not_restarted"], label="restarted", color="#d62728")
    ax.bar(blocks, s["paused"], bottom=s["active"], label="paused", color="#b0b0b0")
    ax.set(xlabel="block", ylabel="share of patch tokens", title="token states per block", ylim=(0, 1))
    ax.legend(fontsize=8)
    m = np.asarray(result["restart_matrix"], dtype=float)
    ax = axes[1]
    im = ax.imshow(m, cmap="viridis", aspect="auto")
    ax.set(xlabel="restarted at block (last column: never)", ylabel="paused at block",
           title=f"where pauses end (restart rate {result['restart_rate']:.0%})")
    fig.colorbar(im, ax=ax)
    ax = axes[2]
    centers = np.convolve(result["hist_edges"], [0.5, 0.5], mode="valid")
    for name, color in (("pause", "#1f77b4"), ("restart", "#d62728")):
        h = np.asarray(result[f"{name}_hist"]).sum(axis=0)
        if h.sum():
            ax.plot(centers, h / h.sum(), color=color, label=f"{name} probability")
    ax.set(xlabel="probability", ylabel="share", title="controller probabilities (smoothed)")
    ax.legend(fontsize=8)
    fig.suptitle(f"top-1 with restarts {result['top1_learned']:.2f}% vs every pause permanent "
                 f"{result['top1_no_restart']:.2f}%")
    fig.tight_layout()
    return save_figure(fig, path)
