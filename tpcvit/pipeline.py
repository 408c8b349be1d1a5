"""The two-stage recipe end to end: train a dense ViT, fine-tune it with TPC (distilled from it), evaluate
both on the validation set, time both on real validation images, print one table, write metrics and a plot."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .bench import machine_info, speed_table, speedup_header
from .checkpoint import atomic_write
from .config import dump_config
from .data import take_batches
from .engine import build_model, build_val_data, config_geometry, evaluate, fit, init_distributed
from .layers import lean_dense
from .models import dense_name as dense_model_name
from .policy import ExecutionPolicy, every_suffix
from .reporting import markdown_table
from .runtime import set_mode, set_policy

LEAN_DENSE = "dense, lean executor"  # the dense model with its blocks run as TPC's are (LeanDenseViT)


def stage_configs(cfg: dict) -> tuple[dict, dict, str]:
    """Configs of the dense stage and the TPC stage, and the dense model's name (see :func:`dense_extra_config`)."""
    p = cfg["pipeline"]
    out = Path(cfg["output"])
    dense_name = p["dense_model"] or dense_model_name(cfg["model"]["name"])
    dense = copy.deepcopy(cfg)
    dense.update(output=str(out / "dense"), name=f"{cfg['name']}-dense")
    dense["train"].update(epochs=p["dense_epochs"], lr=p["dense_lr"])
    dense["distill"]["teacher"] = None
    dense["model"]["init"] = cfg["model"]["init"]
    tpc = copy.deepcopy(cfg)
    tpc.update(output=str(out / "tpc"), name=f"{cfg['name']}-tpc")
    tpc["train"].update(epochs=p["tpc_epochs"], lr=p["tpc_lr"])
    tpc["model"]["init"] = str(out / "dense" / "best.safetensors")
    tpc["distill"]["teacher"] = tpc["model"]["init"] if p["distill"] else None
    tpc["distill"]["teacher_model"] = dense_name
    return dense, tpc, dense_name


def dense_extra_config(cfg: dict, tpc: dict, dense_name: str) -> dict:
    """The dense model fine-tuned with exactly the TPC stage's recipe (epochs, lr, distillation, data): the row that
    shows what the extra epochs alone are worth, so TPC is never credited for training longer."""
    extra = copy.deepcopy(tpc)
    extra.update(output=str(Path(cfg["output"]) / "dense_extra"), name=f"{cfg['name']}-dense-extra")
    extra["model"]["name"] = dense_name
    return extra


def run_pipeline(cfg: dict, progress: bool = True) -> dict:
    info = init_distributed()
    out = Path(cfg["output"])
    dense_cfg, tpc_cfg, dense_name = stage_configs(cfg)
    log = print if (progress and info.main) else (lambda *a, **k: None)

    log(f"[1/4] dense {dense_name}: {dense_cfg['train']['epochs']} epochs")
    resume_dense = (out / "dense" / "last.json").exists()
    fit(dense_cfg, resume=resume_dense, progress=progress, model_name=dense_name)
    log(f"[2/4] TPC {cfg['model']['name']}: fine-tune {tpc_cfg['train']['epochs']} epochs from the dense model"
        f"{' with distillation' if tpc_cfg['distill']['teacher'] else ''}")
    fit(tpc_cfg, resume=(out / "tpc" / "last.json").exists(), progress=progress)
    extra_cfg = dense_extra_config(cfg, tpc_cfg, dense_name) if cfg["pipeline"]["dense_extra"] else None
    if extra_cfg is not None:
        log(f"[2b/4] dense + the same {tpc_cfg['train']['epochs']} epochs (TPC's recipe, no token reduction)")
        fit(extra_cfg, resume=(out / "dense_extra" / "last.json").exists(), progress=progress, model_name=dense_name)

    log("[3/4] evaluate both on the validation set")
    device = info.device
    in_chans, img_size, _ = config_geometry(cfg)
    val_ds, val_loader = build_val_data(cfg, in_chans, img_size, info)
    n_cls = val_ds.num_classes
    dense = build_model(dense_cfg, n_cls, name=dense_name, init=str(out / "dense" / "best.safetensors")).to(device)
    tpc = build_model(tpc_cfg, n_cls, init=str(out / "tpc" / "best.safetensors")).to(device)
    variants = {"dense": (dense, None)}
    evals = {"dense": evaluate(dense, val_loader, device, info, progress=progress, desc="eval dense")}
    lean = lean_dense(dense)  # the speed baseline on the executor TPC's blocks run with: dense's outputs
    if lean is not None:
        variants[LEAN_DENSE] = (lean, None)
        evals[LEAN_DENSE] = {**evals["dense"], "same_outputs_as": "dense"}  # not re-evaluated
    if extra_cfg is not None:  # same architecture as dense: its speed is dense's, not timed again
        extra = build_model(extra_cfg, n_cls, name=dense_name, init=str(out / "dense_extra" / "best.safetensors"))
        evals[f"dense + {tpc_cfg['train']['epochs']} epochs"] = evaluate(
            extra.to(device), val_loader, device, info, progress=progress, desc="eval dense + epochs")
    set_mode(tpc, "adaptive")
    evals["tpc adaptive"] = evaluate(tpc, val_loader, device, info, progress=progress, desc="eval tpc")
    variants["tpc adaptive"] = (tpc, None)
    for keep in cfg["pipeline"]["budget_keeps"]:
        for every in cfg["pipeline"]["budget_decide_every"]:
            m = build_model(tpc_cfg, n_cls, init=str(out / "tpc" / "best.safetensors")).to(device)
            set_policy(m, ExecutionPolicy(mode="budget", keep=keep, decide_every=every))
            name = f"tpc budget {keep:.0%}{every_suffix(every)}"
            evals[name] = evaluate(m, val_loader, device, info, progress=progress, desc=f"eval {name}")
            variants[name] = (m, keep)

    log("[4/4] time on real validation images (interleaved rounds, medians)")
    val_images = torch.cat([x for x, _ in take_batches(val_loader, max(cfg["pipeline"]["bench_batch_sizes"]))])
    for m, _ in variants.values():
        m.eval()
    rows = speed_table(variants, {k: v["gmacs"] for k, v in evals.items()}, lambda b: val_images[:b],
                       cfg["pipeline"]["bench_batch_sizes"], device, torch.float32, cfg["pipeline"]["bench_rounds"],
                       baseline="dense", progress=progress)
    result = {"config": cfg, "machine": machine_info(device), "eval": evals,
              "speed": [r.__dict__ for r in rows]}
    if info.main:
        table = results_table(evals, rows)
        print(table)
        atomic_write(out / "results.json", lambda p: Path(p).write_text(json.dumps(result, indent=2)))
        atomic_write(out / "results.md", lambda p: Path(p).write_text(
            f"{cfg['name']}: {machine_info(device)['cpu']}, {torch.get_num_threads()} threads, fp32\n\n{table}\n"))
        atomic_write(out / "config.yaml", lambda p: Path(p).write_text(dump_config(cfg)))
        from .reporting import plot_pipeline

        plot_pipeline(result, out / "results.png")
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return result


def results_table(evals: dict, rows) -> str:
    """One Markdown table: accuracy, GMACs (averaged over the validation set), speed at each batch size."""
    batches = sorted({r.batch for r in rows})
    speed = {(r.variant, r.batch): r for r in rows}
    dense_gmacs = evals["dense"]["gmacs"]
    head = ["model", "top-1", "top-5", "GMACs/img", "GMACs vs dense", "mean keep"]
    for b in batches:
        head += [f"img/s (b={b})", speedup_header([r for r in rows if r.batch == b], f"speed-up (b={b})")]
    table = []
    for name, e in evals.items():
        keep = sum(e["keep_per_block"]) / max(len(e["keep_per_block"]), 1)
        cells = [name, f"{e['top1']:.2f}", f"{e['top5']:.2f}", f"{e['gmacs']:.4f}",
                 f"{100 * e['gmacs'] / dense_gmacs:.0f}%", f"{keep:.2f}"]
        for b in batches:
            r = speed.get((name, b), speed[("dense", b)])  # dense + epochs: the dense architecture
            cells += [f"{r.img_per_s:.0f}", r.speedup_text]
        table.append(cells)
    return markdown_table(head, table)
