"""TPC exported to ONNX (budget mode: static shapes) and run in onnxruntime, against the same model exported dense.

1. DeiT-S 224 (random weights: speed only): dense vs budget keep 70/50/30%, batch 1 and 32, GMACs from the model.
2. With the main job's checkpoints (``bash scripts/main.sh``): the Fashion-MNIST models, where the exported graphs
   are also evaluated on the full 10k test set (top-1 of onnxruntime vs PyTorch for the same weights and mode).

Timing: onnxruntime CPU provider, fp32, random images, warm-up, rounds interleaved across the variants, medians.
Writes ``<out>.json`` and ``<out>.md``.  ~10 min on a 2-core CPU.

    python benchmarks/onnx_speed.py --out benchmarks/results/onnx_speed
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from tpcvit.bench import machine_info, rows_to_markdown  # tpcvit before timm: its import guard
from tpcvit.config import load_config
from tpcvit.engine import build_data, build_model, init_distributed
from tpcvit.export import export_onnx, onnx_speed_rows, ort_session
from tpcvit.models import image_geometry


def random_weights(name: str, img_size: int | None, keeps: list[float], batches: list[int], rounds: int,
                   tmp: Path) -> list:
    """Part 1: the TPC model ``name`` with random weights (DeiT-S by default), dense and at each keep."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, **({"img_size": img_size} if img_size else {})).eval()
    variants = {}
    for keep in [None, *keeps]:
        mode = "dense" if keep is None else "budget"
        name = "dense" if keep is None else f"TPC budget keep {keep:.0%}"
        report = export_onnx(model, tmp / f"deit_s_{mode}_{keep}.onnx", mode, keep)
        variants[name] = (model, mode, keep, report.path)
        print(f"exported {name}: max |onnxruntime - PyTorch| = {report.max_abs_diff:.2g}")
    return onnx_speed_rows(variants, batches, rounds)


def onnx_top1(path: str, loader) -> float:
    session = ort_session(path)
    correct = total = 0
    for images, targets in tqdm(loader, desc=f"onnxruntime eval {Path(path).name}", leave=False):
        logits = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        correct += int((logits.argmax(-1) == targets).sum())
        total += len(targets)
    return 100.0 * correct / total


def torch_top1(model, loader) -> float:
    correct = total = 0
    with torch.no_grad():
        for images, targets in tqdm(loader, desc="PyTorch eval", leave=False):
            correct += int((model(images).argmax(-1) == targets).sum())
            total += len(targets)
    return 100.0 * correct / total


def fashion_mnist(main: Path, keep: float, batches: list[int], rounds: int, tmp: Path) -> dict | None:
    dense_ckpt, tpc_ckpt = main / "dense" / "best.safetensors", main / "tpc" / "best.safetensors"
    if not (dense_ckpt.is_file() and tpc_ckpt.is_file()):
        print(f"skipping the Fashion-MNIST part: {dense_ckpt} / {tpc_ckpt} missing (run bash scripts/main.sh)")
        return None
    cfg = load_config("configs/fmnist_main.yaml", [])
    info = init_distributed()
    tpc = build_model(cfg, 10, init=str(tpc_ckpt)).eval()
    dense = build_model(cfg, 10, name=cfg["model"]["name"].removeprefix("tpc_"), init=str(dense_ckpt)).eval()
    in_chans, size = image_geometry(tpc)[:2]
    _, _, _, _, val_loader = build_data(cfg, in_chans, size, info)
    paths = [str(tmp / "fmnist_dense.onnx"), str(tmp / "fmnist_tpc.onnx")]
    export_onnx(dense, paths[0], "dense")
    export_onnx(tpc, paths[1], "budget", keep)  # also leaves the PyTorch model in that mode for torch_top1
    names = ["dense", f"TPC budget keep {keep:.0%}"]
    accuracy = [{"variant": names[0], "top1_onnx": onnx_top1(paths[0], val_loader),
                 "top1_torch": torch_top1(dense, val_loader)},
                {"variant": names[1], "top1_onnx": onnx_top1(paths[1], val_loader),
                 "top1_torch": torch_top1(tpc, val_loader)}]
    speed = onnx_speed_rows({names[0]: (dense, "dense", None, paths[0]), names[1]: (tpc, "budget", keep, paths[1])},
                            batches, rounds)
    return {"accuracy": accuracy, "speed": speed}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"onnxruntime {result['onnxruntime']} CPU provider, fp32; {m['cpu']}, {m['cores']} cores; "
             f"{result['rounds']} interleaved rounds, medians.", "", f"Command: `{result['command']}`", ""]

    lines.append(f"{result.get('model', 'tpc_deit_small_patch16_224')} (random weights):")
    lines.append("")
    lines.extend([rows_to_markdown(result["deit_small"]), ""])
    fm = result.get("fashion_mnist")
    if fm:
        lines.extend(["Fashion-MNIST main-job models (full 10k test set):", "",
                      "| variant | top-1 onnxruntime | top-1 PyTorch |", "|---|---|---|"])
        lines.extend(f"| {a['variant']} | {a['top1_onnx']:.2f} | {a['top1_torch']:.2f} |" for a in fm["accuracy"])
        lines.append("")
        lines.extend([rows_to_markdown(fm["speed"]), ""])
    return "\n".join(lines)


def main() -> None:
    import shlex
    import sys

    import onnxruntime

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tpc_deit_small_patch16_224", help="TPC model of part 1 (random weights)")
    p.add_argument("--img-size", type=int, default=None, help="part 1's image size (default: the model's)")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--main", default="runs/fmnist_main", help="the main job's output (dense/ and tpc/ checkpoints)")
    p.add_argument("--fmnist-keep", type=float, default=0.25)
    p.add_argument("--fmnist-batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--out", default="benchmarks/results/onnx_speed")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                  "machine": machine_info(), "onnxruntime": onnxruntime.__version__, "rounds": args.rounds,
                  "model": args.model,
                  "deit_small": random_weights(args.model, args.img_size, args.keeps, args.batch_sizes, args.rounds,
                                               Path(tmp)),
                  "fashion_mnist": fashion_mnist(Path(args.main), args.fmnist_keep, args.fmnist_batch_sizes,
                                                 args.rounds, Path(tmp))}
    text = markdown(result)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=asdict) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
