"""Ablations of the paper's components: TPC full vs without restart (pause only, A-ViT-like), without smoothing,
without stabilizer; several seeds each, all fine-tuned from the same dense checkpoint with the same recipe."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from .analysis import decision_noise_over
from .checkpoint import atomic_write
from .engine import build_model, build_val_data, config_geometry, fit, init_distributed
from .models import dense_name
from .reporting import markdown_table, plot_ablation

VARIANTS = {
    "tpc full": {},
    "no restart": {"restart": False},
    "no smoothing": {"smoothing": False},
    "no stabilizer": {"stabilizer": False},
}


def _slug(name: str) -> str:
    return name.replace(" ", "_")


def run_ablation(cfg: dict, dense: str, seeds: list[int], progress: bool = True) -> dict:
    info = init_distributed()
    out = Path(cfg["output"])
    runs: dict[str, list[dict]] = {}
    in_chans, img_size, _ = config_geometry(cfg)
    val_ds, val_loader = build_val_data(cfg, in_chans, img_size, info)
    for name, overrides in VARIANTS.items():
        for seed in seeds:
            c = copy.deepcopy(cfg)
            c["seed"] = seed
            c["model"]["tpc"] = {**c["model"]["tpc"], **overrides}
            c["model"]["init"] = dense
            c["distill"]["teacher"] = dense  # distilled from the dense model, as in the main recipe
            c["distill"]["teacher_model"] = c["distill"]["teacher_model"] or dense_name(cfg["model"]["name"])
            c["output"] = str(out / f"{_slug(name)}_seed{seed}")
            if progress and info.main:
                print(f"== {name}, seed {seed}", flush=True)
            fit(c, resume=(Path(c["output"]) / "last.json").exists(), progress=progress)
            epochs = [json.loads(ln) for ln in (Path(c["output"]) / "metrics.jsonl").read_text().splitlines()]
            model = build_model(c, val_ds.num_classes, init=str(Path(c["output"]) / "last.safetensors"))
            noise = decision_noise_over(model.to(info.device), val_loader, info.device)
            runs.setdefault(name, []).append({
                "seed": seed, "top1": epochs[-1]["top1"], "gmacs": epochs[-1]["gmacs"],
                "top1_per_epoch": [e["top1"] for e in epochs],
                "keep_per_epoch": [float(np.mean(e["keep_per_block"])) for e in epochs], **noise})
    table = summarize(runs)
    result = {"config": cfg, "dense": dense, "seeds": seeds, "runs": runs, "summary": table}
    if info.main:
        atomic_write(out / "ablation.json", lambda t: Path(t).write_text(json.dumps(result, indent=2)))
        md = ablation_markdown(table)
        atomic_write(out / "ablation.md", lambda t: Path(t).write_text(md + "\n"))
        plot_ablation(table, out / "ablation.png")
        print(md)
    return result


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant: mean/std over seeds of final top-1, GMACs; the within-run spread of top-1 over the last
    epochs (std, mean over seeds); keep-ratio drift over epochs; decision noise (isolated, flips)."""
    out = {}
    for name, rs in runs.items():
        top1 = np.array([r["top1"] for r in rs])
        within = [float(np.std(r["top1_per_epoch"][-3:])) for r in rs]
        keep_drift = [float(np.std(r["keep_per_epoch"][-3:])) for r in rs]
        out[name] = {
            "top1_mean": float(top1.mean()), "top1_std_seeds": float(top1.std()), "top1_worst": float(top1.min()),
            "top1_per_seed": top1.tolist(),
            "top1_spread_epochs": float(np.mean(within)), "gmacs": float(np.mean([r["gmacs"] for r in rs])),
            "keep_drift_epochs": float(np.mean(keep_drift)),
            "isolated": float(np.mean([r["isolated"] for r in rs])),
            "flip_rate": float(np.mean([r["flip_rate"] for r in rs])),
            "keep_std_images": float(np.mean([r["keep_std"] for r in rs])), "seeds": len(rs),
        }
    return out


def ablation_markdown(table: dict[str, dict]) -> str:
    head = ["variant", "top-1 (mean ± std over seeds)", "worst seed", "MMACs/img", "top-1 spread over last epochs",
            "isolated decisions", "flips per block", "keep std over images"]
    return markdown_table(head, [
        [name, f"{r['top1_mean']:.2f} ± {r['top1_std_seeds']:.2f}", f"{r['top1_worst']:.2f}", f"{1e3 * r['gmacs']:.2f}",
         f"{r['top1_spread_epochs']:.2f}", f"{100 * r['isolated']:.2f}%", f"{r['flip_rate']:.3f}",
         f"{r['keep_std_images']:.3f}"] for name, r in table.items()])
