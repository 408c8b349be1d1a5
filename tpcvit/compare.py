"""One harness for TPC, the dense model and the peers: matched budgets, accuracy, GMACs, speed, Pareto plots.

A *spec* names a method and its budget: ``dense`` (timm's model, the speed-ups' baseline); ``dense-lean`` (the same
model with its blocks run by the lean executor every token reducer here uses, :class:`tpcvit.layers.LeanDenseViT`:
over it a speed-up is the token reduction's alone); ``tpc-adaptive`` / ``tpc-keys-adaptive`` (learned per-image
decisions, as trained); ``METHOD@F`` with F a fraction of the dense model's GMACs, the method's knob then bisected
until the GMACs measured on real calibration images match; or ``METHOD=V`` to set the knob to V directly. Methods
with a knob: ``tpc`` (budget-mode keep ratio; ``tpc-keys``: the ``paused_keys`` variant, paused tokens visible as
keys/values), ``tome`` (tokens merged per block; ``tome-ft``: ToMe with its own fine-tuned weights, trained with
merging on), ``evit`` (keep rate), ``avit`` (halting threshold),
``idlevit`` (share of tokens computed per block), ``dynamicvit`` (keep rate per stage), ``tpc-free`` (training-free
TPC, ``tpcvit.patch`` on the dense weights: keep ratio). A TPC spec may end in ``/K``: the controller decides in
every K-th controlled block only (``ExecutionPolicy.decide_every``), e.g. ``tpc-keys@0.45/2``.

Every variant is evaluated on the same images (top-1/top-5, GMACs per image averaged over the evaluation set,
counting only the work done) and timed in one interleaved loop (medians, warm-up, machine named).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .bench import SpeedRow, machine_info, paired_speedup, speed_table, speedup_header
from .budget import match_gmacs, set_knob
from .checkpoint import atomic_write
from .config import ConfigError
from .data import take_batches
from .flops import count_gmacs
from .layers import lean_dense
from .models import PEER_METHODS, image_geometry, variant_name
from .policy import every_suffix
from .reporting import markdown_table
from .runtime import current_policy, set_mode, set_policy

# harness method -> the token-reduction method of its registered model (None: the dense model)
MODEL_METHOD = {"dense": None, "dense-lean": None, "tpc-adaptive": "tpc", "tpc": "tpc", "tpc-keys-adaptive": "tpc",
                "tpc-keys": "tpc", "tome-ft": "tome", "tpc-free": None, **{m: m for m in PEER_METHODS}}
METHODS = tuple(MODEL_METHOD)
NEEDS_WEIGHTS = {"tome-ft": "ToMe fine-tuned with merging on (tpcvit train ... model.name=tome_<backbone>)"}
NO_KNOB = ("dense", "dense-lean", "tpc-adaptive", "tpc-keys-adaptive")
# methods with learned parts: measuring their accuracy on dense weights would score an untrained controller
LEARNED = ("tpc", "tpc-adaptive", "tpc-keys", "tpc-keys-adaptive", "avit", "dynamicvit", "tome-ft")


@dataclass
class Spec:
    """One (method, budget) point: ``target`` = GMACs fraction of dense, or ``knob`` set directly."""

    method: str
    target: float | None = None
    knob: float | None = None
    every: int = 1  # TPC: decide in every k-th controlled block (ExecutionPolicy.decide_every)

    @property
    def label(self) -> str:
        if self.target is not None:
            label = f"{self.method}@{self.target:.0%}"
        else:
            label = self.method if self.knob is None else f"{self.method}={self.knob:g}"
        return label + every_suffix(self.every)


def parse_spec(text: str) -> Spec:
    """``dense`` | ``tpc-adaptive`` | ``METHOD@FRACTION`` | ``METHOD=KNOB``, TPC ones optionally ``/K`` ->
    :class:`Spec` (clear errors)."""
    if "/" in text:
        head, _, tail = text.rpartition("/")
        if not head.startswith("tpc") or not tail.isdigit() or int(tail) < 1:
            raise ConfigError(f"{text!r}: '/K' (decide in every K-th controlled block, K >= 1) follows a TPC spec "
                              "only, e.g. tpc-keys@0.45/2")
        spec = parse_spec(head)
        spec.every = int(tail)
        return spec
    sep = "@" if "@" in text else "=" if "=" in text else None
    method, value = (text.split(sep, 1) if sep else (text, None))
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r} in {text!r}: choose from {', '.join(METHODS)}")
    if method in NO_KNOB:
        if value is not None:
            raise ConfigError(f"{method} has no budget knob: write just {method!r}")
        return Spec(method)
    if value is None:
        raise ConfigError(f"{method} needs a budget: {method}@0.5 (GMACs fraction) or {method}=VALUE (raw knob)")
    try:
        v = float(value)
    except ValueError:
        raise ConfigError(f"budget in {text!r} must be a number") from None
    if sep == "@" and not 0 < v <= 1:
        raise ConfigError(f"GMACs fraction in {text!r} must be in (0, 1]")
    return Spec(method, target=v) if sep == "@" else Spec(method, knob=v)


# ----------------------------------------------------------------------------------------------------------
# the harness
# ----------------------------------------------------------------------------------------------------------
def missing_weights(method: str) -> str:
    return f"{method} needs its own weights: --weights {method}=PATH, the checkpoint of {NEEDS_WEIGHTS[method]}"


def weights_key(method: str) -> str:
    """The ``--weights`` key a method reads (``tpc-adaptive`` reads ``tpc``'s checkpoint)."""
    return method.removesuffix("-adaptive")


def check_weights(specs: list[Spec], weights: dict[str, str], with_data: bool) -> None:
    """Refuse what would score the wrong model: an unused ``--weights`` key, a learned method without its own
    weights (accuracy runs), a TPC checkpoint under the other variant (paused keys or not; read from the
    ``config.yaml`` beside the checkpoint)."""
    import yaml

    used = {"dense"} | {weights_key(s.method) for s in specs} | {s.method for s in specs}
    unused = sorted(set(weights) - used)
    if unused:
        raise ConfigError(f"--weights {', '.join(unused)}: no method in --methods uses it (keys are method names "
                          f"without '-adaptive', e.g. tpc-keys=PATH)")
    for spec in specs:
        path = weights.get(spec.method) or weights.get(weights_key(spec.method))
        if path is None:
            if with_data and spec.method in LEARNED:
                raise ConfigError(f"{spec.method} has learned parts: give its fine-tuned checkpoint with --weights "
                                  f"{weights_key(spec.method)}=PATH (with the dense weights its controller would "
                                  "be untrained)")
            continue
        saved = Path(path).parent / "config.yaml"
        if spec.method.startswith("tpc") and saved.is_file():
            trained = bool(((yaml.safe_load(saved.read_text()) or {}).get("model", {}).get("tpc") or {})
                           .get("paused_keys", False))
            wanted = spec.method.startswith("tpc-keys")
            if trained != wanted:
                right = "tpc-keys" if trained else "tpc"
                raise ConfigError(f"{path} was trained with paused_keys: {str(trained).lower()} ({saved}), but "
                                  f"{spec.label} runs paused_keys: {str(wanted).lower()}: use the spec "
                                  f"{right}{spec.label[len(weights_key(spec.method)):]} and --weights {right}=PATH")


def build_variant(cfg: dict, spec: Spec, num_classes: int, weights: dict[str, str]) -> nn.Module:
    """The model for ``spec``: its own fine-tuned weights if given (``weights[method]``), else the dense ones."""
    from .engine import build_model

    name = variant_name(MODEL_METHOD[spec.method], cfg["model"]["name"])
    if spec.method in NEEDS_WEIGHTS and spec.method not in weights:
        raise ConfigError(missing_weights(spec.method))
    fallback = weights.get(spec.method.removesuffix("-adaptive")) if spec.method.endswith("-adaptive") else None
    init = weights.get(spec.method) or fallback or weights.get("dense")
    if spec.method.startswith("tpc"):
        cfg = {**cfg, "model": {**cfg["model"], "tpc": {**cfg["model"]["tpc"],
                                                          "paused_keys": spec.method.startswith("tpc-keys")}}}
    model = build_model(cfg, num_classes, name=name, init=init)
    if spec.method == "tpc-free":  # training-free TPC on the dense model (tpcvit.patch, attention controller)
        from .patch import patch

        try:
            patch(model)
        except (TypeError, ValueError) as err:  # a backbone patch cannot run on: its one-line reason
            raise ConfigError(f"tpc-free on {cfg['model']['name']}: {err}") from None
    if spec.method.endswith("-adaptive"):
        set_mode(model, "adaptive")
    if spec.every > 1:
        set_policy(model, current_policy(model).replace(decide_every=spec.every))
    if spec.method == "dense-lean":
        lean = lean_dense(model)
        if lean is None:
            raise ConfigError(f"dense-lean runs timm VisionTransformer backbones, not {type(model).__name__}: drop "
                              "dense-lean from --methods for this backbone")
        model = lean
    return model.eval()


def run_compare(
    cfg: dict,
    specs: list[str],
    weights: dict[str, str],
    batch_sizes: list[int],
    rounds: int,
    calib_images: int = 64,
    with_data: bool = True,
    device: str = "cpu",
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    cuda_graphs: bool = False,
    onednn: str = "off",
) -> dict:
    """Evaluate and time every spec on one backbone; ``with_data=False`` = speed/GMACs on random images only.

    Knobs are matched and accuracy measured in float32 and eager; ``dtype`` is what the models run in for the
    timing, ``compile``: every model (dense included) is timed through ``torch.compile``, ``cuda_graphs``: replayed
    from a CUDA graph where it can be, ``onednn="on"``: every model's linears through oneDNN (:func:`speed_table`).
    """
    from .engine import build_val_data, evaluate, init_distributed

    if onednn == "both":  # the +onednn copies would have no spec, accuracy or GMACs point of their own
        raise ConfigError("--methods takes --onednn on or off (every model alike); a with/without table: tpcvit bench "
                          "--model NAME --onednn both")

    parsed = [parse_spec(s) for s in specs]
    if not any(s.method == "dense" for s in parsed):
        parsed.insert(0, Spec("dense"))
    labels = [s.label for s in parsed]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"duplicate specs in {specs}")
    for method in sorted({s.method for s in parsed} & set(NEEDS_WEIGHTS) - set(weights)):
        raise ConfigError(missing_weights(method))
    check_weights(parsed, weights, with_data)
    info = init_distributed(device)
    dev = info.device
    probe = build_variant(cfg, Spec("dense"), 1, {})
    size = image_geometry(probe)
    if with_data:
        val_ds, val_loader = build_val_data(cfg, size[0], size[1], info)
        num_classes = val_ds.num_classes
        pool = torch.cat([x for x, _ in take_batches(val_loader, max(calib_images, *batch_sizes))])
    else:
        val_loader, num_classes = None, cfg["model"]["kwargs"].get("num_classes", 1000)
        pool = torch.randn(max(calib_images, *batch_sizes), *size, generator=torch.Generator().manual_seed(0))
    calib = pool[:calib_images].to(dev)

    variants: dict[str, tuple[nn.Module, float | None]] = {}
    points: dict[str, dict] = {}
    dense_gmacs = None
    for spec in parsed:
        model = build_variant(cfg, spec, num_classes, weights).to(dev)
        knob = None
        if spec.target is not None:
            knob, got = match_gmacs(model, calib, spec.target * dense_gmacs)
            matched = abs(got / dense_gmacs / spec.target - 1) <= 0.05
            if progress and info.main:
                note = "" if matched else "  (NOT within 5%: outside what this method's knob can reach)"
                print(f"{spec.label}: knob {knob:.4g} -> {got / dense_gmacs:.1%} of dense GMACs on calibration "
                      f"images{note}")
        elif spec.knob is not None:
            set_knob(model, spec.knob)
            knob = spec.knob
        gmacs = count_gmacs(model, calib)
        if spec.method == "dense":
            dense_gmacs = gmacs
        point = {"method": spec.method, "target": spec.target, "knob": knob, "calib_gmacs": gmacs,
                 "matched": None if spec.target is None else matched}
        if val_loader is not None:
            point.update(evaluate(model, val_loader, dev, info, progress=progress, desc=f"eval {spec.label}"))
        else:
            point["gmacs"] = gmacs
        point["gmacs_ratio"] = point["gmacs"] / (dense_gmacs or gmacs)
        points[spec.label] = point
        variants[spec.label] = (model.eval(), None)
    if dtype != torch.float32:
        variants = {k: (m.to(dtype), keep) for k, (m, keep) in variants.items()}
    rows = speed_table(variants, {k: p["gmacs"] for k, p in points.items()}, lambda b: pool[:b], batch_sizes, dev,
                       dtype, rounds, baseline="dense", progress=progress, compile=compile, cuda_graphs=cuda_graphs,
                       onednn=onednn)
    return {"config": cfg, "specs": labels, "weights": weights, "machine": machine_info(dev), "points": points,
            "dtype": str(dtype).removeprefix("torch."), "compiled": compile, "cuda_graphs": cuda_graphs,
            "onednn": onednn,
            "speed": [r.__dict__ for r in rows], "batch_sizes": batch_sizes, "rounds": rounds,
            "data": with_data}


def compare_markdown(result: dict) -> str:
    """Accuracy (when there is data), GMACs, and speed at every batch size, one row per spec."""
    rows = [SpeedRow(**r) for r in result["speed"]]
    acc = result["data"]
    batches = sorted({r.batch for r in rows})
    speed = {(r.variant, r.batch): r for r in rows}
    head = ["method", "budget", "knob"] + (["top-1", "top-5"] if acc else []) + ["GMACs/img", "GMACs vs dense"]
    for b in batches:
        head += [f"img/s (b={b})", speedup_header([r for r in rows if r.batch == b], f"speed-up (b={b})")]
    head.append(f"speed-up/FLOPs (b={batches[-1]})")
    table = []
    for label, p in result["points"].items():
        knob = "-" if p["knob"] is None else f"{p['knob']:.3g}"
        target = "-" if p["target"] is None else f"{p['target']:.0%}"
        target += "" if p.get("matched") in (None, True) else " (unmatched)"
        every = label[label.rfind("/"):] if "/" in label else ""  # TPC deciding every K-th block: "/K"
        cells = [p["method"] + every, target, knob] + ([f"{p['top1']:.2f}", f"{p['top5']:.2f}"] if acc else [])
        cells += [f"{p['gmacs']:.4f}", f"{p['gmacs_ratio']:.0%}"]
        for b in batches:
            r = speed[(label, b)]
            cells += [r.img_per_s_text, r.speedup_text]
        cells.append(f"{speed[(label, batches[-1])].speedup_per_flops:.2f}")
        table.append(cells)
    text = markdown_table(head, table)
    versus = tpc_versus_peers(result)
    if versus:
        text += ("\n\nTPC's speed over each peer at the same budget (and over dense-lean: the dense model on the same "
                 "block executor), paired per round (median of peer time / TPC time in the same round, "
                 "95% interval; above 1: TPC faster):\n\n" + markdown_table(
                     ["batch", "TPC", "peer", "TPC / peer speed"],
                     [[v["batch"], v["tpc"], v["peer"], _ratio_text(v)] for v in versus]))
    return text


def _ratio_text(v: dict) -> str:
    if v["low"] is None:
        return f"{v['ratio']:.2f}x (too few rounds for an interval)"
    verdict = "faster" if v["low"] > 1 else "slower" if v["high"] < 1 else "within noise"
    return f"{v['ratio']:.2f}x [{v['low']:.2f}, {v['high']:.2f}] {verdict}"


def tpc_versus_peers(result: dict) -> list[dict]:
    """Every TPC row against every peer row at the same GMACs budget and batch size, paired per round
    (:func:`tpcvit.bench.paired_speedup`): what "TPC is faster than EViT at equal GMACs" needs, from the same
    rounds as the table. Rows at different budgets are not paired: that difference is the budget's, not TPC's.
    A ``dense-lean`` row is paired with every TPC row: TPC's speed-up over dense on the same block executor."""
    rows = [r for r in result["speed"] if r["variant"] != "dense"]
    method = {label: p["method"] for label, p in result["points"].items()}
    budget = {label: p.get("target") for label, p in result["points"].items()}
    out = []
    for b in sorted({r["batch"] for r in rows}):
        at = [r for r in rows if r["batch"] == b]
        for t in (r for r in at if method[r["variant"]].startswith("tpc")):
            for peer in (r for r in at if not method[r["variant"]].startswith("tpc")
                         and (budget[r["variant"]] == budget[t["variant"]] or method[r["variant"]] == "dense-lean")):
                ratio, low, high = paired_speedup(peer["samples_s"], t["samples_s"])
                out.append({"batch": b, "tpc": t["variant"], "peer": peer["variant"], "ratio": ratio, "low": low,
                            "high": high})
    return out


def write_compare(result: dict, out: str | os.PathLike) -> list[Path]:
    """``<out>.json``, ``<out>.md`` and ``<out>.png`` (Pareto plots), all written atomically."""
    from .reporting import plot_compare

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    m = result["machine"]
    compiled = ", torch.compile (every model, dense included)" if result.get("compiled") else ", eager"
    if result.get("onednn") == "on":
        compiled += ", oneDNN linears (every model, dense included: tpcvit.onednn_linears)"
    if result.get("cuda_graphs"):
        eager = sorted({f"{r['variant']} ({r['eager_reason']})" for r in result["speed"] if r.get("eager_reason")})
        compiled += ", replayed from CUDA graphs" + (f" (eager: {'; '.join(eager)})" if eager else "")
    spreads = ", ".join(f"b={b}: <= {max(r['spread'] for r in result['speed'] if r['batch'] == b):.2f}x"
                        for b in result["batch_sizes"])
    md = (f"Machine: {m['cpu']}, {m['threads']} threads, {m['device']}, {result.get('dtype', 'float32')}{compiled}; "
          f"batch sizes {result['batch_sizes']}, "
          f"{result['rounds']} interleaved rounds, medians; slowest / fastest round of any row {spreads}."
          f"\n\nCommand: `{result.get('command', '')}`\n\n"
          f"{compare_markdown(result)}\n")
    atomic_write(out.with_suffix(".json"), lambda t: Path(t).write_text(json.dumps(result, indent=2)))
    atomic_write(out.with_suffix(".md"), lambda t: Path(t).write_text(md))
    return [out.with_suffix(".json"), out.with_suffix(".md"), plot_compare(result, out.with_suffix(".png"))]
