"""The ``rmsprop`` command line (also ``python -m rmsprop``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from rmsprop import __version__


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from rmsprop.demo import run_demo

    return 0 if run_demo(seed=args.seed, epochs=args.epochs) else 1


def _bench(args: argparse.Namespace) -> int:
    from rmsprop.bench import main

    return main(
        quick=args.quick,
        json_path=args.json,
        repeats=args.repeats,
        compile_torch=args.compile,
        case_names=args.case,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmsprop",
        description="RMSProp for PyTorch: demo and tools.",
    )
    parser.add_argument("--version", action="version", version=f"rmsprop {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="train the mission document's SimpleNet with RMSprop and compare with torch.optim.RMSprop",
        description="Train SimpleNet (10->50->1) on random data for a few epochs with "
        "RMSprop(lr=0.01, alpha=0.9, eps=1e-8), then show torch.optim.RMSprop gives the same losses.",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed for model and data (default: 0)")
    demo.add_argument("--epochs", type=_positive_int, default=10, help="number of epochs (default: 10)")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser(
        "bench",
        help="time the optimizer step of torch and of every rmsprop path; print a markdown table",
        description="Time torch.optim.RMSprop (for-loop, foreach, torch.compile) and rmsprop.RMSprop "
        "(for-loop, foreach, fused) on the issue's cases, interleaved in one process, against a "
        "memory bound measured in the same run. Prints a markdown table and writes JSON.",
    )
    bench.add_argument("--quick", action="store_true", help="tiny cases and few steps: a smoke test, not a measurement")
    bench.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    bench.add_argument("--repeats", type=_positive_int, default=None, help="timed steps per implementation (default: 15, quick: 3)")
    bench.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include torch.compile of torch's step (default: on, off with --quick); compiling takes seconds to minutes per case",
    )
    bench.add_argument("--case", action="append", default=None, help="run only this case (by name; repeatable)")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def console_main() -> None:
    raise SystemExit(main())
