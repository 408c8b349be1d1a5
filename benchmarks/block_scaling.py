"""How a ViT block's time scales with the tokens it runs at batch 1: the ceiling of every token reducer.

A token reducer saves FLOPs by running blocks on fewer tokens; at batch 1 on a CPU the time saved is smaller. This
times timm's dense DeiT-S blocks on ``n`` tokens two ways, interleaved rounds, medians:

- ``one block x12``: one block called 12 times, its 7 MB of weights in cache: the arithmetic rate alone,
- ``chain``: the 12 blocks one after another, as in a forward: each block's weights read from memory, which
  costs the same however few tokens run,

for n = 197 (dense) and the token counts TPC keeps at 70 / 50 / 30% (139, 99, 60), against the MACs ratio of a
block (12 n d^2 for the linears + 2 n^2 d for attention). Cached speed-up / MACs ratio is what the smaller GEMMs
keep; chain / cached is what the weight reads add.

    python benchmarks/block_scaling.py --out benchmarks/results/block_scaling_deit_small_cpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median

import torch

from tpcvit.bench import machine_info, time_interleaved  # tpcvit before timm: its import guard
from tpcvit.checkpoint import atomic_write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224", help="timm ViT (random weights)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[197, 139, 99, 60], help="sequence lengths to time")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/block_scaling_deit_small_cpu")
    args = ap.parse_args()
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    blocks, dim = list(model.blocks), model.embed_dim
    one = blocks[min(3, len(blocks) - 1)]
    xs = {n: torch.randn(args.batch, n, dim) for n in args.tokens}

    def chain(x: torch.Tensor) -> None:
        for blk in blocks:
            x = blk(x)

    def repeated(x: torch.Tensor) -> None:
        for _ in blocks:
            one(x)

    fns = {}
    for n, x in xs.items():
        fns[f"chain@{n}"] = lambda x=x: chain(x)
        fns[f"one@{n}"] = lambda x=x: repeated(x)
    with torch.inference_mode():
        samples = time_interleaved(fns, torch.device("cpu"), args.rounds)
    ms = {k: 1e3 * median(v) for k, v in samples.items()}
    params = sum(p.numel() for p in one.parameters())
    top = max(args.tokens)
    def macs(n: int) -> int:  # one block: qkv, proj, fc1, fc2 (12 n d^2) and the two attention matmuls (2 n^2 d)
        return 12 * n * dim * dim + 2 * n * n * dim

    rows = []
    for n in args.tokens:
        c, o = ms[f"chain@{n}"], ms[f"one@{n}"]
        cached_up, chain_up, mac_ratio = ms[f"one@{top}"] / o, ms[f"chain@{top}"] / c, macs(top) / macs(n)
        rows.append({"tokens": n, "chain_ms": c, "one_block_x12_ms": o, "macs_ratio": mac_ratio,
                     "cached_speedup": cached_up, "chain_speedup": chain_up, "chain_over_cached": c / o,
                     "chain_speedup_per_macs": chain_up / mac_ratio})
    m = machine_info()
    md = [f"{args.model}, batch {args.batch}, fp32, random weights; {m['cpu']}, {m['threads']} threads; medians of "
          f"{args.rounds} interleaved rounds. One block: {params / 1e6:.2f} M parameters "
          f"({params * 4 / 2**20:.1f} MiB fp32), {len(blocks)} blocks.",
          "", f"Command: `python benchmarks/block_scaling.py --rounds {args.rounds} --out {args.out}`", "",
          f"| tokens | block MACs ratio | one block x{len(blocks)} (cached), ms | speed-up, cached | "
          f"{len(blocks)} blocks chained, ms | speed-up, chained | chained / cached | chained speed-up / MACs |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['tokens']} | {r['macs_ratio']:.2f}x | {r['one_block_x12_ms']:.1f} | {r['cached_speedup']:.2f}x | "
           f"{r['chain_ms']:.1f} | {r['chain_speedup']:.2f}x | {r['chain_over_cached']:.2f} | "
           f"{r['chain_speedup_per_macs']:.2f} |" for r in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), lambda t: Path(t).write_text(
        json.dumps({"machine": m, "model": args.model, "batch": args.batch, "rounds": args.rounds, "rows": rows,
                    "samples_s": samples}, indent=2)))
    atomic_write(out.with_suffix(".md"), lambda t: Path(t).write_text("\n".join(md) + "\n"))
    print("\n".join(md))


if __name__ == "__main__":
    main()
