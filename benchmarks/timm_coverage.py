"""Which timm ViTs ``tpcvit.patch`` runs on: one model of every kind users pick (random weights, native size).

For each model: whether ``tpcvit.patch(model, keep=0.5)`` works; if it does, whether budget mode at ``keep=1.0``
gives the original model's logits (max |difference|; 0 = bitwise), the patched model's GMACs at keep 0.5 as a share
of the dense model's (``count_gmacs`` on one image), and the share of patch tokens active over the controlled
blocks; if it does not, the one-line error a user gets. Answers "does it work on my model?" before any weights are
downloaded.

    python benchmarks/timm_coverage.py --out benchmarks/results/timm_coverage
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import tpcvit  # before timm: its import guard
from tpcvit.bench import machine_info
from tpcvit.checkpoint import atomic_write

MODELS = [  # (what a user knows it as, timm name[, create_model arguments])
    ("DeiT", "deit_small_patch16_224"),
    ("DeiT distilled", "deit_small_distilled_patch16_224"),
    ("DeiT III (LayerScale)", "deit3_small_patch16_224"),
    ("ViT AugReg", "vit_small_patch16_224"),
    ("ViT-Ti 384", "vit_tiny_patch16_384"),
    ("ViT patch 32", "vit_small_patch32_224"),
    ("ViT patch 8", "vit_small_patch8_224"),
    ("ViT-B", "vit_base_patch16_224"),
    ("DINOv2", "vit_small_patch14_dinov2"),
    ("DINOv2 + registers", "vit_small_patch14_reg4_dinov2"),
    ("DINOv2 + registers, any image size", "vit_small_patch14_reg4_dinov2", {"dynamic_img_size": True}),
    ("CLIP ViT (pre-norm)", "vit_base_patch16_clip_224"),
    ("SigLIP (attention-pool head)", "vit_base_patch16_siglip_224"),
    ("FlexiViT", "flexivit_small"),
    ("ViT avg pool, no class token", "vit_medium_patch16_gap_256"),
    ("ViT registers + avg pool", "vit_betwixt_patch16_reg4_gap_256"),
    ("BEiT-3", "beit3_base_patch16_224"),
    ("BEiT (relative position bias)", "beit_base_patch16_224"),
    ("EVA-02", "eva02_small_patch14_224"),
    ("DINOv3 (timm default: dynamic image size)", "vit_small_patch16_dinov3"),
    ("DINOv3, dynamic_img_size=False", "vit_small_patch16_dinov3", {"dynamic_img_size": False}),
    ("ViT with RoPE", "vit_small_patch16_rope_224"),
    ("ViT with RoPE per block (mixed)", "vit_small_patch16_rope_mixed_224"),
    ("Perception Encoder", "vit_pe_core_small_patch16_384"),
    ("ViT parallel blocks", "vit_small_patch16_18x2_224"),
    ("ViT parallel scaling block", "vit_pwee_patch16_reg1_gap_256"),
    ("ViT differential attention", "vit_dwee_patch16_reg1_gap_256"),
    ("ViT relative position", "vit_relpos_small_patch16_224"),
    ("ResNet-ViT hybrid", "vit_small_r26_s32_224"),
    ("NaFlexViT", "naflexvit_base_patch16_gap"),
    ("CaiT", "cait_xxs24_224"),
    ("XCiT", "xcit_nano_12_p16_224"),
    ("Swin", "swin_tiny_patch4_window7_224"),
]


def check(name: str, kwargs: dict | None = None) -> dict:
    """One model: patched at keep 0.5, then keep 1.0 against the original logits."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **(kwargs or {})).eval()
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or model.pretrained_cfg["input_size"][1:]
    x = torch.randn(1, 3, *size)
    row = {"model": name, "class": type(model).__name__,
           "block": type(model.blocks[0]).__name__ if hasattr(model, "blocks") else "-",
           "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
    other = None
    if getattr(model, "dynamic_img_size", False):  # any image size: also checked two patches off on each side
        ph, pw = model.patch_embed.patch_size
        other = torch.randn(1, 3, size[0] - 2 * ph, size[1] + 2 * pw)
    with torch.no_grad():
        original = model(x)
        original_other = None if other is None else model(other)
        dense_gmacs = tpcvit.count_gmacs(model, x)
        try:
            tpcvit.patch(model, keep=0.5)
        except (TypeError, ValueError, NotImplementedError) as err:
            return {**row, "works": False, "error": str(err).splitlines()[0]}
        _, trace = model.forward_with_trace(x)
        start = model.tpc_cfg.start_layer
        row.update(works=True, gmacs_share=round(tpcvit.count_gmacs(model, x) / dense_gmacs, 3),
                   mean_keep=round(float(trace.active[:, start:].float().mean()), 3))
        tpcvit.set_mode(model, "budget", keep=1.0)
        row["keep_1_max_diff"] = float((model(x) - original).abs().max())
        if other is not None:
            row["other_size"] = list(other.shape[2:])
            row["keep_1_max_diff"] = max(row["keep_1_max_diff"], float((model(other) - original_other).abs().max()))
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Machine: {meta['machine']}", "", f"Command: `{meta['command']}` ({meta['seconds']:.0f} s)", "",
             "| model | timm name | class / block | params (M) | `tpcvit.patch` | keep 1.0 vs original, max abs diff "
             "| GMACs at keep 0.5 | mean keep |", "|---|---|---|---|---|---|---|---|"]
    for label, r in zip(meta["labels"], rows):
        kind = f"{r['class']} / {r['block']}"
        if r["works"]:
            sizes = f" (also at {r['other_size'][0]}x{r['other_size'][1]})" if r.get("other_size") else ""
            lines.append(f"| {label} | `{r['model']}` | {kind} | {r['params_m']} | works | {r['keep_1_max_diff']:.1e}"
                         f"{sizes} | {r['gmacs_share']:.0%} | {r['mean_keep']:.2f} |")
        else:
            error = r["error"].replace("|", "/")
            lines.append(f"| {label} | `{r['model']}` | {kind} | {r['params_m']} | error: {error} | - | - | - |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", help="timm names to check instead of the built-in list")
    ap.add_argument("--out", default="benchmarks/results/timm_coverage", help="writes <out>.md and <out>.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    models = [(m, m) for m in args.models] if args.models else MODELS
    t0, rows = time.time(), []
    for label, name, *kwargs in models:
        rows.append(check(name, *kwargs))
        r = rows[-1]
        print(f"{label:32s} {name:36s} " + ("works" if r["works"] else "error: " + r["error"][:90]), flush=True)
    command = "python benchmarks/timm_coverage.py" + (f" --models {' '.join(args.models)}" if args.models else "")
    meta = {"machine": machine_info(torch.device("cpu")), "command": command, "seconds": time.time() - t0,
            "timm": __import__("timm").__version__, "labels": [label for label, *_ in models]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"meta": meta, "rows": rows}, indent=1)
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))
    atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(markdown(rows, meta)))
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
