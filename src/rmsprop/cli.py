"""The ``rmsprop`` command line (also ``python -m rmsprop``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rmsprop import __version__


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from rmsprop.demo import run_demo

    return 0 if run_demo(seed=args.seed, epochs=args.epochs) else 1


def _bench_memory(args: argparse.Namespace) -> int:
    from rmsprop.memory_bench import main_with_args

    return main_with_args(args)


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

    from rmsprop.memory_bench import build_parser as build_bench_parser

    bench = commands.add_parser(
        "bench-memory",
        help="state bytes, training quality and step time of bf16 and 8-bit optimizer state against fp32",
        description="Measure optimizer-state bytes per parameter, held-out loss over seeds on digits and a "
        "char-level LSTM, and step time, for state_precision full, bf16 and 8bit.",
    )
    build_bench_parser(bench)
    bench.set_defaults(run=_bench_memory)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def console_main() -> None:
    raise SystemExit(main())
