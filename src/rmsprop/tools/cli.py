"""The ``rmsprop`` command line (also ``python -m rmsprop``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from rmsprop import __version__
from rmsprop.tools.bench import case_names
from rmsprop.tools.compare import TASK_NAMES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from rmsprop.tools.demo import run_demo

    return 0 if run_demo(seed=args.seed, epochs=args.epochs) else 1


def _compare(args: argparse.Namespace) -> int:
    missing = [
        name for name in ("matplotlib", "sklearn", "gymnasium") if importlib.util.find_spec(name) is None
    ]
    if missing:
        print(f"rmsprop compare needs {', '.join(missing)}: pip install 'rmsprop[compare]'", file=sys.stderr)
        return 2
    from rmsprop.tools.compare import compare

    results = compare(
        args.task or TASK_NAMES, out_dir=args.out, quick=args.quick, seeds=args.seeds, workers=args.workers
    )
    for claim in results["claims"]:
        print(f"Claim {claim['number']}: {claim['verdict']} ({claim.get('held', '-')} checks held)")
    print(f"Wrote report.md, results.json and plots to {args.out}")
    return 0


def _bench_memory(args: argparse.Namespace) -> int:
    from rmsprop.tools.memory_bench import main_with_args

    return main_with_args(args)


def _bench(args: argparse.Namespace) -> int:
    from rmsprop.tools.bench import main

    names = case_names(args.quick)
    unknown = [name for name in args.case or () if name not in names]
    if unknown:
        print(
            f"rmsprop bench: unknown --case {', '.join(map(repr, unknown))}; "
            f"the {'--quick ' if args.quick else ''}cases are: {'; '.join(map(repr, names))}",
            file=sys.stderr,
        )
        return 2
    return main(
        quick=args.quick,
        json_path=args.json,
        repeats=args.repeats,
        compile_torch=args.compile,
        case_names=args.case,
        device=args.device,
    )


def _build_kernel(args: argparse.Namespace) -> int:
    import subprocess

    from rmsprop.backends.cpu import kernel as cpu_kernel

    if cpu_kernel.kernel() is None:
        print(f"rmsprop: {cpu_kernel.problem()}; building it in {cpu_kernel.build_directory()}", file=sys.stderr)
        try:
            cpu_kernel.build()
        except (OSError, subprocess.CalledProcessError) as error:
            details = getattr(error, "stderr", "") or str(error)
            print(f"rmsprop: the fused CPU kernel cannot be built here: {details.strip()}; "
                  "CPU steps use torch's paths", file=sys.stderr)
            return 1
    print(cpu_kernel.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmsprop",
        description="RMSProp for PyTorch: a demo, the optimizer-step and optimizer-state benchmarks, "
        "the study of RMSProp's claims, and the fused CPU kernel's build.",
        epilog="Run 'rmsprop COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"rmsprop {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="train a small net with RMSprop, then with torch.optim.RMSprop: the same losses",
        description="Train SimpleNet (Linear 10->50, ReLU, Linear 50->1) on random regression data for a few "
        "epochs with RMSprop(lr=0.01, alpha=0.9, eps=1e-8), then repeat the run with torch.optim.RMSprop "
        "from the same seed and show that the losses agree.",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed for model and data (default: 0)")
    demo.add_argument("--epochs", type=_positive_int, default=10, help="number of epochs (default: 10)")
    demo.set_defaults(run=_demo)

    compare = commands.add_parser(
        "compare",
        help="test RMSProp's claims against Adagrad, Adam and SGD on small real tasks; write a report and plots",
        description="Tune each optimizer's learning rate on a log grid (seed 0), train from N more seeds with "
        "the same step budget, and write report.md (tables and a verdict per claim), results.json and PNG plots.",
    )
    compare.add_argument(
        "--task",
        action="extend",
        nargs="+",
        choices=TASK_NAMES,
        metavar="NAME",
        help=f"tasks to run (default: all of {', '.join(TASK_NAMES)})",
    )
    compare.add_argument("--quick", action="store_true", help="tiny budgets, 3-point lr grid: a smoke run (< 60 s)")
    compare.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help="seeds per optimizer after tuning (default: each task's 3 or 5, 1 with --quick)",
    )
    compare.add_argument(
        "--workers", type=_positive_int, default=None, help="worker processes for the runs (default: one per CPU core)"
    )
    compare.add_argument("--out", default="compare-results", help="output folder (default: compare-results)")
    compare.set_defaults(run=_compare)

    from rmsprop.tools.memory_bench import build_parser as build_bench_parser

    bench_memory = commands.add_parser(
        "bench-memory",
        help="state bytes, training quality and step time of bf16 and 8-bit optimizer state against fp32",
        description="Measure optimizer-state bytes per parameter, held-out loss over seeds on digits and a "
        "char-level LSTM, and step time, for state_precision full, bf16 and 8bit. Shows a progress bar on "
        "a terminal; the tables go to standard output.",
    )
    build_bench_parser(bench_memory)
    bench_memory.set_defaults(run=_bench_memory)

    bench = commands.add_parser(
        "bench",
        help="time the optimizer step of torch and of every rmsprop path; print a markdown table",
        description="Time torch.optim.RMSprop (for-loop, foreach, torch.compile) and rmsprop.RMSprop "
        "(for-loop, foreach, fused) on one large tensor, a transformer's parameter list and many small "
        "tensors (plain, with momentum, centered, bf16 parameters), interleaved round by round in one "
        "process on the same tensors, against a memory bound measured in the same rounds. Prints a "
        "markdown table; --json also writes every round's times. Shows a progress bar on a terminal.",
    )
    bench.add_argument("--quick", action="store_true", help="tiny cases and few steps: a smoke test, not a measurement")
    bench.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON to this file")
    bench.add_argument("--repeats", type=_positive_int, default=None, metavar="N", help="timed steps per implementation (default: 15, quick: 3)")
    bench.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include torch.compile of torch's step (default: on, off with --quick); compiling takes seconds to minutes per case",
    )
    bench.add_argument(
        "--case",
        action="append",
        default=None,
        metavar="NAME",
        help=f"run only this case (repeatable): {'; '.join(map(repr, case_names()))}",
    )
    bench.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the tensors live; with cuda the fused path is the Triton kernel and the bound is copy bandwidth (default: cpu)",
    )
    bench.set_defaults(run=_bench)

    build_kernel = commands.add_parser(
        "build-kernel",
        help="check the fused CPU kernel, building it if the install could not, e.g. in a container image",
        description="Print where the fused CPU kernel comes from and which instruction set it runs. "
        "Where the package was installed without it (no C++ compiler then), compile it now into "
        "RMSPROP_KERNEL_DIR (default ~/.cache/rmsprop); exit status 1 if it cannot be built here.",
    )
    build_kernel.set_defaults(run=_build_kernel)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def console_main() -> None:
    raise SystemExit(main())
