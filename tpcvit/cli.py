"""Command line: ``tpcvit bench | train | eval`` (also ``python -m tpcvit`` and under ``torchrun``)."""

from __future__ import annotations

import argparse
import shlex
import sys

import tpcvit  # noqa: F401  (import guard + model registration before anything imports timm)


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import bench_tpc_speed, rows_to_markdown, write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    rows, meta = bench_tpc_speed(args.model, tuple(args.keeps), tuple(args.batch_sizes), args.rounds,
                                 args.device, args.dtype, **kwargs)
    meta["command"] = "tpcvit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"{meta['model']} vs {meta['dense']} on {meta['machine']['cpu']} "
          f"({meta['machine']['threads']} threads, {args.device}, {args.dtype})")
    print(rows_to_markdown(rows))
    if args.out:
        print(f"wrote {write_results(args.out, rows, meta)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpcvit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="time dense vs TPC (budget mode) at several keep ratios")
    b.add_argument("--model", default="tpc_deit_small_patch16_224")
    b.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.3])
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    b.add_argument("--rounds", type=int, default=7)
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--img-size", type=int, default=None)
    b.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    b.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    b.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"tpcvit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
