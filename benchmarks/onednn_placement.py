"""Do models that run the identical ATen ops time alike? dense-lean, a second copy of it, and training-free TPC at
keep 100% (no controller runs: the same ops, shapes and strides, checked here) with torch's default linears and
with oneDNN linears (``tpcvit.onednn_linears``), timed in interleaved rounds; paired ratios against dense-lean of
the same kind. Whatever separates them is not computation (memory placement), and bounds how far a "+onednn" row
over dense-lean can be read as token saving. Random weights.

    python benchmarks/onednn_placement.py --batch 32 --rounds 11 --out benchmarks/results/onednn_placement_deit_small
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tpcvit  # before timm: its import guard
from tpcvit.bench import machine_info, paired_speedup, time_interleaved
from tpcvit.checkpoint import atomic_write
from tpcvit.layers import lean_dense


class _Ops(TorchDispatchMode):
    """Every ATen op with its first argument's shape and strides."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self.calls[(func._schema.name, None if first is None else (tuple(first.shape), first.stride()))] += 1
        return func(*args, **(kwargs or {}))


def _ops(model: torch.nn.Module, x: torch.Tensor) -> Counter:
    with torch.no_grad():
        model(x)  # caches built
        with _Ops() as mode:
            model(x)
    return mode.calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224", help="a timm ViT")
    ap.add_argument("--img-size", type=int, default=None, help="image side (default: the model's own)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--out", default="benchmarks/results/onednn_placement_deit_small", help="<out>.md and .json")
    args = ap.parse_args()
    import timm

    t0 = time.time()
    torch.manual_seed(0)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    dense = timm.create_model(args.model, **kwargs).eval()
    side = dense.patch_embed.img_size
    x = torch.randn(args.batch, 3, *side)
    base = {"dense-lean": lean_dense(copy.deepcopy(dense)), "dense-lean copy": lean_dense(copy.deepcopy(dense)),
            "tpc@100%": tpcvit.patch(copy.deepcopy(dense), keep=1.0)}
    variants = {**base, **{f"{k}+onednn": tpcvit.onednn_linears(copy.deepcopy(m)) for k, m in base.items()}}
    ops = {name: _ops(m, x) for name, m in variants.items()}
    identical = {name: ops[name] == ops["dense-lean+onednn" if name.endswith("+onednn") else "dense-lean"]
                 for name in variants}
    with torch.inference_mode():
        samples = time_interleaved({n: (lambda m=m: m(x)) for n, m in variants.items()}, torch.device("cpu"),
                                   rounds=args.rounds, iters=max(1, 8 // args.batch), progress=False)
    rows = []
    for name, times in samples.items():
        ref = samples["dense-lean+onednn" if name.endswith("+onednn") else "dense-lean"]
        ratio, low, high = paired_speedup(ref, times)
        rows.append({"variant": name, "ms": round(statistics.median(times) * 1e3, 2), "over_dense_lean": ratio,
                     "low": low, "high": high, "spread": round(max(times) / min(times), 3),
                     "identical_ops": identical[name], "aten_calls": sum(ops[name].values())})
    command = (f"python benchmarks/onednn_placement.py --model {args.model} --batch {args.batch} "
               f"--rounds {args.rounds}")
    m = machine_info("cpu")
    lines = [f"Command: `{command}` ({time.time() - t0:.0f} s); {m['cpu']}, {m['threads']} threads, fp32, batch "
             f"{args.batch}, random weights, {args.rounds} interleaved rounds, medians; ratios paired per round "
             "(95% interval) over dense-lean with the same kind of linears", "",
             "| variant | ATen calls | same ops, shapes, strides as dense-lean | ms | speed over dense-lean | "
             "round spread |", "|---|---|---|---|---|---|"]
    for r in rows:
        interval = "" if r["low"] is None else f" [{r['low']:.2f}, {r['high']:.2f}]"
        lines.append(f"| {r['variant']} | {r['aten_calls']} | {'yes' if r['identical_ops'] else 'no'} | {r['ms']} | "
                     f"{r['over_dense_lean']:.2f}x{interval} | {r['spread']:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"command": command, "machine": m, "rows": rows}, indent=1)
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
