"""GPU benchmark: DeiT-S and DeiT-B, bf16 and fp32, batch 1 and 256, TPC vs dense vs every peer at matched GMACs.

    python benchmarks/gpu_bench.py --out benchmarks/results/gpu_h100        # on a GPU (scripts/gpu_check.sh)
    python benchmarks/gpu_bench.py --dry-run --out /tmp/gpu_dry             # CPU, tiny sizes: CI keeps it working

Random weights (speed only; accuracy comes from the evidence runs): knobs bisected to each GMACs target on random
images in fp32, then every variant timed in one interleaved loop per (model, dtype), medians, synchronised, the GPU
named in the JSON. Writes ``<out>_<model>_<dtype>.{json,md,png}`` and prints one summary table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import tpcvit  # noqa: F401  (registers the models; import before timm)
from tpcvit.bench import machine_info
from tpcvit.compare import compare_markdown, run_compare, write_compare
from tpcvit.config import load_config

METHODS = ("tpc", "tpc-free", "tome", "evit", "idlevit", "dynamicvit", "avit")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "deit_base_patch16_224"])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25], help="GMACs fractions of dense")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--decide-every", type=int, nargs="+", default=[1, 3], metavar="K",
                   help="TPC variants deciding in every K-th controlled block (the blocks between reuse the decision "
                        "and keep their tokens gathered): one per K, e.g. tpc@0.25/3")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay every variant without host synchronisation from a CUDA graph (batch 1: one launch "
                        "instead of hundreds); the others run eagerly, marked (not with --dry-run: CPU)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True, help="output prefix")
    p.add_argument("--dry-run", action="store_true", help="CPU, a 4-block 32 px model, batch 1 and 4, one round, "
                   "budget 0.5")
    p.add_argument("--fresh", action="store_true", help="re-measure every (model, dtype), even those whose result "
                   "this same run already wrote under --out (by default they are reused: a GPU lease that ends "
                   "mid-run loses nothing finished)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    extra: list[str] = []
    if args.dry_run and args.cuda_graphs:
        print("--cuda-graphs needs a GPU: drop --dry-run", file=sys.stderr)
        return 2
    if args.dry_run:
        args.device, args.batch_sizes, args.rounds, args.budgets = "cpu", [1, 4], 1, [0.5]
        args.models, args.dtypes = ["deit_small_patch16_224"], ["float32", "bfloat16"]
        extra = ["model.kwargs={img_size: 32, patch_size: 8, depth: 4, embed_dim: 64, num_heads: 2}"]
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run (CPU) or on a GPU machine", file=sys.stderr)
        return 2
    # dense-lean: the dense model on the reducers' lean block executor (the speed-up of the token saving alone)
    everies = {m: args.decide_every if m.startswith("tpc") else [1] for m in args.methods}
    specs = ["dense", "dense-lean"] + [f"{m}@{b:g}" + (f"/{k}" if k > 1 else "") for b in args.budgets
                                       for m in args.methods for k in everies[m]]
    summary = []
    where_now = machine_info(torch.device(args.device))
    for name in args.models:
        for dtype_name in args.dtypes:
            out = Path(f"{args.out}_{name}_{dtype_name}")
            run_args = {"model": name, "dtype": dtype_name, "specs": specs, "batch_sizes": args.batch_sizes,
                        "rounds": args.rounds, "cuda_graphs": args.cuda_graphs, "extra": extra,
                        "device": where_now.get("gpu", where_now["cpu"])}
            result = None if args.fresh else finished(out, run_args)
            if result is not None:
                print(f"reused {out}.json (the same run, already measured; --fresh re-measures it)", flush=True)
            else:
                cfg = load_config(None, [f"model.name={name}", *extra])
                result = run_compare(cfg, specs, {}, args.batch_sizes, args.rounds, calib_images=4, with_data=False,
                                     device=args.device, progress=False, dtype=getattr(torch, dtype_name),
                                     cuda_graphs=args.cuda_graphs)
                result["command"] = "python benchmarks/gpu_bench.py " + " ".join(sys.argv[1:])
                result["gpu_bench_args"] = run_args
                write_compare(result, out)
            where = result["machine"].get("gpu", result["machine"]["cpu"])
            graphs = ", CUDA graphs" if args.cuda_graphs else ""
            summary.append(f"## {name}, {dtype_name}{graphs}, {where}\n\n{compare_markdown(result)}\n")
            print(summary[-1], flush=True)
    Path(f"{args.out}_summary.md").write_text("\n".join(summary))
    return 0


def finished(out: Path, run_args: dict) -> dict | None:
    """The result of exactly this (model, dtype, variants, batch sizes, rounds, device) already written under
    ``out``, or None. Lets a run cut off at the end of a GPU lease resume where it stopped."""
    path = out.with_suffix(".json")  # where write_compare puts it
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("gpu_bench_args") == run_args else None


if __name__ == "__main__":
    sys.exit(main())
