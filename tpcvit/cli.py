"""Command line: ``tpcvit bench | train | eval | analyze | viz | ablate | export | pipeline`` (also
``python -m tpcvit`` and under ``torchrun``)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import tpcvit  # noqa: F401  (import guard + model registration before anything imports timm)
from tpcvit.checkpoint import ensure_writable
from tpcvit.config import ConfigError


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import bench_tpc_speed, speed_markdown, write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out:
        ensure_writable(Path(args.out).parent)
    command = "tpcvit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.cuda_graphs and not args.device.startswith("cuda"):
        raise ConfigError(f"--cuda-graphs needs a CUDA device, got --device {args.device}: drop --cuda-graphs or "
                          "add --device cuda")
    if args.breakdown:
        return _bench_breakdown(args, command)
    if args.methods:
        return _bench_methods(args, command)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    rows, meta = bench_tpc_speed(args.model, tuple(args.keeps), tuple(args.batch_sizes), args.rounds,
                                 args.device, args.dtype, compile=args.compile,
                                 decide_every=tuple(args.decide_every), cuda_graphs=args.cuda_graphs,
                                 progress=not args.quiet, onednn=args.onednn, **kwargs)
    meta["command"] = command
    linears = {"on": ", oneDNN linears", "both": ", with and without oneDNN linears"}.get(args.onednn, "")
    print(f"{meta['model']} vs {meta['dense']} on {meta['machine']['cpu']} "
          f"({meta['machine']['threads']} threads, {args.device}, {args.dtype}{', compiled' if args.compile else ''}"
          f"{linears})")
    print(speed_markdown(rows))
    if args.out:
        print(f"wrote {write_results(args.out, rows, meta)}")
    return 0


def _bench_breakdown(args: argparse.Namespace, command: str) -> int:
    """``tpcvit bench --breakdown``: where TPC's time goes, per controlled block and per forward."""
    import json

    from .breakdown import breakdown, breakdown_markdown
    from .checkpoint import atomic_write

    if args.methods or args.compile or args.cuda_graphs or args.onednn == "both":
        raise ConfigError("--breakdown times TPC's own parts: drop --methods / --compile / --cuda-graphs, and take "
                          "--onednn on or off")
    name, kwargs, tpc = args.model, {"img_size": args.img_size} if args.img_size else {}, {}
    if args.config:  # the config's model: backbone kwargs and TPC options (e.g. the main job's)
        from .config import load_config

        cfg = load_config(args.config, [*(args.set or []), *args.overrides])
        name, kwargs, tpc = cfg["model"]["name"], dict(cfg["model"]["kwargs"]), dict(cfg["model"]["tpc"])
    result = breakdown(name, list(args.keeps), list(args.batch_sizes), args.rounds, args.device, tpc,
                       tuple(args.decide_every), onednn=args.onednn == "on", **kwargs)
    result["command"] = command
    md = breakdown_markdown(result)
    print(md)
    if args.out:
        out = Path(args.out)
        atomic_write(out.with_suffix(".json"), lambda t: Path(t).write_text(json.dumps(result, indent=2)))
        atomic_write(out.with_suffix(".md"), lambda t: Path(t).write_text(f"Command: `{command}`\n\n{md}\n"))
        print(f"wrote {out.with_suffix('.md')}")
    return 0


def _bench_methods(args: argparse.Namespace, command: str) -> int:
    """``tpcvit bench --methods ...``: the one harness for TPC, dense and the peers (see tpcvit.compare)."""
    from .compare import compare_markdown, run_compare, write_compare
    from .config import load_config

    overrides = list(args.set or []) + list(args.overrides or [])
    if args.config is None:  # speed only: the named backbone at its own size on random images
        overrides.append(f"model.name={args.model}")
        if args.img_size:
            overrides.append(f"model.kwargs.img_size={args.img_size}")  # beside any other model.kwargs given
    cfg = load_config(args.config, overrides)
    weights = {}
    for item in args.weights or []:
        method, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--weights takes METHOD=PATH (e.g. tpc=runs/x/tpc/best.safetensors), got {item!r}")
        weights[method] = path
    if args.config is None and args.dtype != "float32":
        raise ConfigError("--methods benchmarks run in float32")
    result = run_compare(cfg, args.methods, weights, list(args.batch_sizes), args.rounds,
                         calib_images=args.calib_images, with_data=args.config is not None and not args.no_data,
                         device=args.device, progress=not args.quiet, compile=args.compile,
                         cuda_graphs=args.cuda_graphs, onednn=args.onednn)
    result["command"] = command
    print(compare_markdown(result))
    if args.out:
        print("wrote " + ", ".join(map(str, write_compare(result, args.out))))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _fraction(text: str) -> float:
    """A keep ratio in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a keep ratio is a fraction in (0, 1], got {value}")
    return value


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None


def _load(args: argparse.Namespace) -> dict:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.output:
        cfg["output"] = args.output
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from .engine import fit

    summary = fit(_load(args), resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary line per job, not one per DDP rank
        print(json.dumps(summary))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .engine import build_eval, evaluate
    from .runtime import set_mode, tpc_modules

    cfg = _load(args)
    model, val_loader, info, _ = build_eval(cfg, args.checkpoint)
    if tpc_modules(model):
        set_mode(model, cfg["eval"]["mode"], cfg["eval"]["keep"])
    metrics = evaluate(model, val_loader, info.device, info, progress=not args.quiet)
    if info.main:
        print(json.dumps(metrics))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze, write_analysis
    from .engine import build_eval
    from .runtime import set_mode

    cfg = _load(args)
    ensure_writable(args.output or "runs/analysis")
    model, val_loader, info, _ = build_eval(cfg, args.checkpoint)
    set_mode(model.eval(), "adaptive")
    result = analyze(model, val_loader, info.device, progress=not args.quiet)
    files = write_analysis(result, args.output or "runs/analysis")
    s = result["shares"]
    print(f"images {result['images']}: restart rate {result['restart_rate']:.1%} of pauses; top-1 with restarts "
          f"{result['top1_learned']:.2f}% ({result['gmacs_learned']:.4f} GMACs) vs every pause permanent "
          f"{result['top1_no_restart']:.2f}% ({result['gmacs_no_restart']:.4f} GMACs)")
    print("block   active  restarted  paused")
    for l in range(result["depth"]):
        print(f"{l:5d}  {s['active'][l]:7.3f}  {s['restarted'][l]:9.3f}  {s['paused'][l]:6.3f}")
    print("wrote " + ", ".join(map(str, files)))
    return 0


def _cmd_viz(args: argparse.Namespace) -> int:

    import torch

    from .data import AugmentConfig, build_transform, eval_view, list_images, load_image
    from .engine import build_eval, build_model
    from .models import image_geometry
    from .reporting import save_figure, token_map_figure
    from .runtime import set_mode

    cfg = _load(args)
    out = ensure_writable(args.output or "runs/viz")
    if args.num_classes:
        model = build_model(cfg, args.num_classes, init=args.checkpoint).eval()
        classes = None
    else:
        model, _, _, val_ds = build_eval(cfg, args.checkpoint)
        model, classes = model.cpu().eval(), getattr(val_ds, "classes", None)
    set_mode(model, "adaptive")
    in_chans, size = image_geometry(model)[:2]
    d = cfg["data"]
    aug = AugmentConfig(**{**d["aug"], "scale": tuple(d["aug"]["scale"])})
    tf = build_transform(size, in_chans, False, aug, d["mean"], d["std"])
    for path in list_images(args.images):
        image = load_image(path, dataset=False)
        with torch.no_grad():
            logits, trace = model.forward_with_trace(tf(image)[None])
        pred = int(logits.argmax(-1))
        label = classes[pred] if classes else str(pred)
        shown = eval_view(image, size, aug)  # the crop the model saw, so the token grid lines up
        fig = token_map_figure(shown, trace.active[0], trace.restarted[0], tuple(model.patch_embed.grid_size),
                               title=f"{path.name}: predicted {label}")
        print(f"wrote {save_figure(fig, out / (path.stem + '_tokens.png'))}")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from .ablation import run_ablation

    run_ablation(_load(args), args.dense, args.seeds, progress=not args.quiet)
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from .pipeline import run_pipeline

    run_pipeline(_load(args), progress=not args.quiet)
    return 0


def _cmd_evidence(args: argparse.Namespace) -> int:
    from .evidence import Evidence, evidence_markdown, write_evidence

    cfg = _load(args)
    ensure_writable(cfg["output"])
    out = args.out or f"benchmarks/results/evidence_{Path(cfg['output']).name.removeprefix('evidence_')}"
    result = Evidence(cfg, ledger=f"{out}_runs", progress=not args.quiet, report_only=args.report_only).run()
    result["command"] = "tpcvit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    ensure_writable(Path(out).parent)
    print(evidence_markdown(result))
    print("wrote " + ", ".join(str(p) for p in write_evidence(result, out)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import json
    import tempfile
    from dataclasses import asdict
    from pathlib import Path

    from .bench import rows_to_markdown
    from .config import load_config
    from .engine import build_model
    from .export import classes_in_checkpoint, export_onnx, onnx_speed_rows

    overrides = list(args.overrides) + ([f"model.name={args.model}"] if args.model else [])
    cfg = load_config(args.config, overrides)
    ensure_writable(Path(args.out).parent)
    num_classes = args.num_classes or (classes_in_checkpoint(args.checkpoint) if args.checkpoint else None) or 1000
    model = build_model(cfg, num_classes, init=args.checkpoint)
    report = export_onnx(model, args.out, args.mode, args.keep, args.batch_size, dynamic_batch=not args.static_batch,
                         check=not args.no_check)
    checked = f"onnxruntime matches PyTorch (max |diff| {report.max_abs_diff:.2g})" if report.checked_batches \
        else "not checked"
    print(f"wrote {report.path} ({report.size_mb} MB, {report.mode}"
          f"{'' if report.keep is None else f' keep {report.keep}'}): {checked}")
    if args.bench is not None:
        batches = args.bench or [1, 32]
        if args.static_batch and any(b != args.batch_size for b in batches):
            raise ConfigError("--bench batch sizes need a dynamic batch axis: drop --static-batch")
        with tempfile.TemporaryDirectory() as tmp:
            dense = export_onnx(model, Path(tmp) / "dense.onnx", "dense", None, args.batch_size,
                                dynamic_batch=not args.static_batch, check=False)
            name = "exported" if args.keep is None else f"exported, keep {args.keep:.0%}"
            rows = onnx_speed_rows({"dense": (model, "dense", None, dense.path),
                                    name: (model, args.mode, args.keep, report.path)}, batches, args.rounds)
        print("onnxruntime CPU provider, interleaved rounds, medians")
        print(rows_to_markdown(rows))
        if args.json:
            Path(args.json).write_text(json.dumps({**asdict(report), "bench": [asdict(r) for r in rows]}, indent=2))
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML experiment config (see configs/)")
    p.add_argument("--output", "-o", default=None, help="output folder (overrides the config's output)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="config overrides: key.sub=value (e.g. train.epochs=3)")


def build_parser() -> argparse.ArgumentParser:
    from .bench import ONEDNN_CHOICES

    parser = argparse.ArgumentParser(prog="tpcvit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="time dense vs TPC (budget mode) at several keep ratios; with --methods: "
                       "TPC vs dense vs peers at matched GMACs (accuracy too with --config)")
    b.add_argument("--model", default="tpc_deit_small_patch16_224",
                   help="a tpc_* model, or any timm ViT name (patched training-free; random weights: speed only)")
    b.add_argument("--keeps", type=_fraction, nargs="+", default=[1.0, 0.7, 0.5, 0.3],
                   help="without --methods: budget-mode keep ratios to time (share of patch tokens per block)")
    b.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[1, 32], help="batch sizes to time")
    b.add_argument("--rounds", type=_positive_int, default=7,
                   help="interleaved timing rounds (every variant once per round); medians and 95%% intervals")
    b.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and images (bfloat16 / float16: the model cast, no autocast)")
    b.add_argument("--img-size", type=int, default=None, help="image side (default: the model's own)")
    b.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    b.add_argument("--decide-every", type=_positive_int, nargs="+", default=[1], metavar="K",
                   help="TPC variants deciding in every K-th controlled block (the others reuse the decision): "
                        "one per K below keep 100%% (tpc@30%%/5); with --methods use the spec suffix METHOD@F/K")
    b.add_argument("--compile", action="store_true", help="time every variant (dense and peers included) through "
                   "torch.compile, compiled once per batch size before timing; not with --breakdown")
    b.add_argument("--cuda-graphs", action="store_true", help="GPU: capture every variant without host "
                   "synchronisation (dense, budget mode, fixed-budget peers) in a CUDA graph once per batch size and "
                   "time its replays (batch 1: one launch instead of hundreds); the others run eagerly, marked")
    b.add_argument("--onednn", choices=ONEDNN_CHOICES, default="off",
                   help="CPU float32: run every model's linears through oneDNN with pre-packed weights "
                        "(tpcvit.onednn_linears; DeiT-S 2x faster on our AMD EPYC); both: time each variant with "
                        "and without, in the same rounds (not with --methods or --breakdown)")
    b.add_argument("--out", default=None, help="write <out>.json and <out>.md (and <out>.png with --methods)")
    b.add_argument("--breakdown", action="store_true", help="per controlled block: controller head, decision, "
                   "gather/scatter, block on its selection vs on every token; and TPC at keep 100%% vs dense")
    b.add_argument("--methods", type=_str_list, default=None,
                   help="comma-separated specs: dense, dense-lean (dense on the reducers' lean block executor), "
                        "tpc-adaptive, METHOD@GMACS_FRACTION or METHOD=KNOB with METHOD in tpc, tpc-keys, tome, evit, "
                        "avit, idlevit, dynamicvit (e.g. dense,dense-lean,tpc@0.5,tome@0.5,evit@0.5); a TPC spec may "
                        "end in /K (decide in every K-th controlled block)")
    b.add_argument("--config", "-c", default=None, help="experiment config: backbone + dataset (accuracy)")
    b.add_argument("--weights", action="append", help="METHOD=PATH weights (dense=... used for untrained peers)")
    b.add_argument("--set", action="append", help="config override key=value (repeatable)")
    b.add_argument("--no-data", action="store_true", help="with --config: speed and GMACs on random images only")
    b.add_argument("--calib-images", type=int, default=64, help="images used to match GMACs targets")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("overrides", nargs="*", help="with --methods: config overrides key.sub=value (as --set)")
    b.set_defaults(func=_cmd_bench)

    t = sub.add_parser("train", help="train or fine-tune a dense or TPC model (also under torchrun)")
    _add_config_args(t)
    t.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="top-1/top-5, GMACs and keep ratios of a checkpoint on the validation set")
    _add_config_args(e)
    e.add_argument("--checkpoint", required=True, help="weights (.safetensors / .pth)")
    e.set_defaults(func=_cmd_eval)

    a = sub.add_parser("analyze", help="restart analysis of a trained TPC model on the validation set")
    _add_config_args(a)
    a.add_argument("--checkpoint", required=True, help="weights of the trained TPC model (.safetensors / .pth)")
    a.set_defaults(func=_cmd_analyze)

    v = sub.add_parser("viz", help="per-block token maps (active / paused / restarted) for images")
    _add_config_args(v)
    v.add_argument("--checkpoint", required=True, help="weights of the TPC model (.safetensors / .pth)")
    v.add_argument("--images", nargs="+", required=True, help="image files or folders")
    v.add_argument("--num-classes", type=int, default=0, help="class count of the checkpoint (no data read at all)")
    v.set_defaults(func=_cmd_viz)

    ab = sub.add_parser("ablate", help="TPC vs no restart / no smoothing / no stabilizer, several seeds")
    _add_config_args(ab)
    ab.add_argument("--dense", required=True, help="dense checkpoint every variant is fine-tuned from")
    ab.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="comma-separated, e.g. 0,1,2")
    ab.set_defaults(func=_cmd_ablate)

    x = sub.add_parser("export", help="ONNX export of a model in dense or budget mode (static shapes), checked "
                       "against PyTorch with onnxruntime; --bench times it against the exported dense model")
    x.add_argument("--config", "-c", default=None, help="experiment config (model name and kwargs)")
    x.add_argument("--model", default=None, help="model name (overrides the config's model.name)")
    x.add_argument("--checkpoint", default=None, help="weights; without: random weights (speed only)")
    x.add_argument("--num-classes", type=int, default=0, help="default: from the checkpoint's classifier, else 1000")
    x.add_argument("--mode", default="budget", choices=["budget", "dense"],
                   help="budget: TPC with static shapes (exportable); dense: the backbone alone")
    x.add_argument("--keep", type=_fraction, default=None, help="budget mode: share of patch tokens kept per block "
                   "(default: the model's target_keep)")
    x.add_argument("--batch-size", type=int, default=1, help="batch of the check (the batch axis stays dynamic)")
    x.add_argument("--static-batch", action="store_true", help="fix the batch axis to --batch-size")
    x.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    x.add_argument("--bench", type=int, nargs="*", default=None, metavar="BATCH",
                   help="time onnxruntime at these batch sizes (default 1 32) against the same model exported dense")
    x.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds of --bench (medians)")
    x.add_argument("--json", default=None, help="write the report (and timings) to this JSON file")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("overrides", nargs="*", help="config overrides: key.sub=value")
    x.set_defaults(func=_cmd_export)

    p = sub.add_parser("pipeline", help="dense training + TPC fine-tuning + evaluation + speed, one table")
    _add_config_args(p)
    p.set_defaults(func=_cmd_pipeline)

    ev = sub.add_parser("evidence", help="converged dense model -> TPC and every peer fine-tuned alike over seeds, "
                        "evaluated at matched GMACs, paired 95%% CIs (resumable: finished runs are reused)")
    _add_config_args(ev)
    ev.add_argument("--out", default=None, help="write <out>.json/.md/.png and one JSON per finished run in "
                    "<out>_runs/ (commit it: runs found there are reused); default: benchmarks/results/"
                    "evidence_<output folder name>")
    ev.epilog = ("Start from a converged dense model you already have (a pretrained DeiT, say) instead of training "
                 "one: evidence.dense_weights=FILE (.safetensors/.pth; the ledger then keys every run to its digest). "
                 "Keep the dense model trained here for later sessions (a disk that outlives the machine): "
                 "evidence.dense_copy=FILE; a "
                 "fresh machine then fine-tunes from it instead of re-training.")
    ev.add_argument("--report-only", action="store_true", help="train and evaluate nothing: write the report from the "
                    "finished runs in the ledger (unfinished ones are listed as missing)")
    ev.set_defaults(func=_cmd_evidence)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _os_message(err: OSError) -> str:
    """What an OS error means for the user: disk full, no permission, a file where a folder should be, ..."""
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    if isinstance(err, PermissionError):
        return f"permission denied{where}: choose a location you can write to / read from"
    if isinstance(err, (NotADirectoryError, FileExistsError)):
        return f"a file is in the way{where}: part of the path is not a folder"
    if getattr(err, "errno", None) == 28:
        return f"no space left on the device{where}: free some space, then run again (with --resume for training)"
    return f"{err.strerror or _one_line(err)}{where}"


def _run_command(args: argparse.Namespace) -> int:
    """Run the command; under torchrun, tear the process group down cleanly at the end (left to interpreter exit,
    gloo's threads can abort a rank: "terminate called without an active exception")."""
    import torch.distributed as dist

    try:
        return args.func(args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Run a command. The project's own errors, the OS/IO errors a user can cause (disk full, permissions) and
    Ctrl-C become one line and exit code 2 (130 for Ctrl-C); anything else is a bug and keeps its traceback."""
    from safetensors import SafetensorError

    from .errors import TpcvitError

    args = build_parser().parse_args(argv)
    prefix = f"tpcvit {args.command}"
    try:
        return _run_command(args)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; finished checkpoints are kept (tpcvit train ... --resume continues)",
              file=sys.stderr)
        # an interrupt inside a progress bar's constructor leaves a half-built bar whose finalizer fails at exit
        # ("Exception ignored ... Traceback"): the one line above already said what happened
        sys.unraisablehook = lambda _unraisable: None
        return 130
    except FloatingPointError as err:  # training diverged (its message names the step and the fix)
        print(f"{prefix}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (TpcvitError, FileNotFoundError) as err:  # ConfigError, DataError, CheckpointError, ExportError, ...
        print(f"{prefix}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{prefix}: error: {_os_message(err)}", file=sys.stderr)
        return 2
    except SafetensorError as err:
        reason = "no space left on the device" if "No space left" in str(err) else _one_line(err)
        print(f"{prefix}: error writing weights: {reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
