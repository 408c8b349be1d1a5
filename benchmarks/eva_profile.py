"""Where the time goes on a rotary (timm Eva) backbone: TPC against IdleViT at the same GMACs, by op.

Why: on DINOv3-S at 50% of the GMACs TPC trails IdleViT, EViT and DynamicViT by 2-4% at b=32
(`patch_speed_dinov3_small_peers_cpu.md`). This splits each method's self CPU time (``torch.profiler``) into matrix
products, attention and elementwise ops, so the gap can be placed. A diagnosis, not a timing: profiler times carry
its overhead; the speed-ups are in the bench tables. Both methods are profiled in interleaved rounds (medians; the
spread of the round totals says whether the host was quiet: run it with no other torch process).

    python benchmarks/eva_profile.py --batch 32 --out benchmarks/results/eva_profile_dinov3_small_cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import tpcvit  # before timm: its import guard
from tpcvit.baselines import as_peer
from tpcvit.budget import match_gmacs
from tpcvit.checkpoint import atomic_write
from tpcvit.flops import count_gmacs
from tpcvit.reporting import markdown_table

GROUPS = {"matrix products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::mkldnn_convolution"),
          "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                        "aten::_scaled_dot_product_attention_math")}


def _group(op: str) -> str:
    return next((g for g, ops in GROUPS.items() if op in ops), "elementwise / copies / other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_dinov3", help="a timm Eva model name")
    parser.add_argument("--img-size", type=int, default=224, help="square image side (a multiple of the patch)")
    parser.add_argument("--batch", type=int, default=32, help="images per forward")
    parser.add_argument("--forwards", type=int, default=3, help="profiled forwards per method and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (after 2 warm-up forwards each)")
    parser.add_argument("--gmacs", type=float, default=0.5, help="fraction of the dense GMACs for both methods")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    import timm

    torch.set_num_threads(min(2, torch.get_num_threads()))

    def backbone() -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model(args.model, dynamic_img_size=False, img_size=args.img_size).eval()

    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    methods = {"tpc-free/3": tpcvit.patch(backbone(), gmacs=args.gmacs, decide_every=3)}
    dense = count_gmacs(backbone(), images[:1])
    idle = as_peer(backbone(), "idlevit")
    match_gmacs(idle, images[:1], args.gmacs * dense)
    methods["idlevit"] = idle
    ratios = {name: count_gmacs(m, images[:1]) / dense for name, m in methods.items()}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in methods}  # one per round
    with torch.no_grad():
        for model in methods.values():
            for _ in range(2):
                model(images)
        for r in range(args.rounds):  # interleaved, the order alternating: host drift hits both alike
            for name in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(args.forwards):
                        methods[name](images)
                groups: dict[str, float] = {}
                for event in prof.key_averages():
                    groups[_group(event.key)] = groups.get(_group(event.key), 0.0) + event.self_cpu_time_total / 1e6
                groups["total"] = sum(groups.values())
                samples[name].append(groups)
    rows = {name: {g: round(statistics.median(s.get(g, 0.0) for s in rounds), 3) for g in rounds[0]}
            for name, rounds in samples.items()}
    spread = {name: round(max(s["total"] for s in rounds) / min(s["total"] for s in rounds), 3)
              for name, rounds in samples.items()}
    names = sorted({g for r in rows.values() for g in r if g != "total"}) + ["total"]
    lines = [f"{args.model} at {args.img_size} px (random weights), b={args.batch}, fp32, "
             f"{torch.get_num_threads()} threads, {args.forwards} forwards per round, {args.rounds} interleaved rounds "
             "(medians; slowest / fastest round total " + ", ".join(f"{k} {v:.3f}x" for k, v in spread.items()) +
             "), "
             "GMACs vs dense " + ", ".join(f"{k} {v:.1%}" for k, v in ratios.items()) +
             "; self CPU seconds (torch.profiler):", "",
             markdown_table(["ops", *rows], [[g] + [f"{r.get(g, 0.0):.3f}" for r in rows.values()] for g in names])]
    text = "\n".join(lines) + "\n\nCommand: `python " + " ".join(sys.argv) + "`\n"
    print(text)
    if args.out:
        record = json.dumps({"args": vars(args), "gmacs_ratio": ratios, "seconds": rows, "spread": spread,
                             "rounds": samples}, indent=1)
        atomic_write(f"{args.out}.json", lambda tmp: Path(tmp).write_text(record))
        atomic_write(f"{args.out}.md", lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
