"""What pooled paused keys buy on a rotary-position model: the keep ratio training-free TPC reaches at a GMACs target
with per-token paused keys (``paused_key_pool=1``, the default on these models) and with keys pooled per 2 x 2 window
(``paused_key_pool=2``, opt-in: each pooled key at its window's mean rotation). GMACs are exact (budget mode has
static shapes), so nothing here is timed; random weights: what it says about accuracy is nothing.

    python benchmarks/rope_key_pool.py --out benchmarks/results/rope_key_pool
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tpcvit  # before timm: its import guard
from tpcvit.checkpoint import atomic_write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_dinov3", help="a timm Eva (rotary) model")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448], help="image sides")
    ap.add_argument("--gmacs", type=float, nargs="+", default=[0.5, 0.35], help="GMACs fractions of the dense model")
    ap.add_argument("--out", default="benchmarks/results/rope_key_pool", help="writes <out>.md and <out>.json")
    args = ap.parse_args()
    import timm

    t0, rows = time.time(), []
    for size in args.sizes:
        for target in args.gmacs:
            row = {"img_size": size, "gmacs_fraction": target}
            for pool in (1, 2):
                torch.manual_seed(0)
                model = tpcvit.patch(timm.create_model(args.model, img_size=size).eval(), gmacs=target,
                                     paused_key_pool=pool)
                row[f"keep_pool{pool}"] = round(model.tpc_cfg.target_keep, 3)
            rows.append(row)
            print(row, flush=True)
    command = f"python benchmarks/rope_key_pool.py --model {args.model}"
    lines = [f"Command: `{command}` ({time.time() - t0:.0f} s); model `{args.model}`, training-free TPC in budget mode "
             "(default schedule), keep = mean share of patch tokens computed per controlled block", "",
             "| image side | GMACs vs dense | keep, per-token paused keys | keep, paused keys pooled 2 x 2 |",
             "|---|---|---|---|"]
    lines += [f"| {r['img_size']} | {r['gmacs_fraction']:.0%} | {r['keep_pool1']:.3f} | {r['keep_pool2']:.3f} |"
              for r in rows]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"command": command, "model": args.model, "rows": rows}, indent=1)
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
