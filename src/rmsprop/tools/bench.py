"""``rmsprop bench``: the optimizer step of every implementation, timed in one process.

Each case is a list of parameters with gradients (fp32, one case bf16). Every implementation
gets its own optimizer over the same parameters, all sharing one state, so that all of them
step the same memory; after one first call
(reported apart: compiling or loading kernels happens there) and a warm-up,
the implementations take steps in turn, round after round, so that a change
in the machine's load hits them all alike. The median ms per step is
reported, with ratios to torch's for-loop and foreach steps and to a memory
bound measured in the same rounds: a C++ loop that only moves memory in
the step's own pattern (the gradient read; the parameter and each buffer of
the case read and written; same chunks and threads): the bytes the case's
step must move, moved as fast as this machine moves them that way. Timings
never enter tests.

With ``device="cuda"`` the same cases run on CUDA tensors (the fused path is
then the Triton kernel), each step is timed up to ``torch.cuda.synchronize()``,
and the bound is a device-to-device copy of as many bytes as the case's step
moves (copy bandwidth). CI has no GPU: that mode is never run there.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rmsprop.backends.cpu import kernel as cpu_kernel
from rmsprop.core.optimizer import RMSprop

__all__ = ["Case", "cases", "main", "markdown_table", "run_benchmark", "state_precision_cases", "state_precision_table"]

TORCH_LOOP = "torch for-loop"
TORCH_FOREACH = "torch foreach"
TORCH_COMPILED = "torch.compile(torch step)"
FUSED = "rmsprop fused"
BOUND = "memory bound (the step's reads and writes only)"
LR = 1e-4  # small, so that many steps leave the parameters in a normal range


@dataclass(frozen=True)
class Case:
    name: str
    shapes: list[tuple[int, ...]]
    settings: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.shapes)

    @property
    def bytes_per_step(self) -> int:
        """Bytes a one-pass step moves: p, g, v read, p, v written; b and m read and written where used."""
        accesses = 5 + 2 * (self.settings.get("momentum", 0) > 0) + 2 * self.settings.get("centered", False)
        return accesses * self.dtype.itemsize * self.numel


def transformer_shapes(layers: int, width: int, vocab: int) -> list[tuple[int, ...]]:
    """The weights and biases of a GPT-like stack: attention in/out, MLP in/out per layer, plus embeddings."""
    shapes: list[tuple[int, ...]] = [(vocab, width)]
    for _ in range(layers):
        shapes += [(3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


def cases(quick: bool = False) -> list[Case]:
    """The benchmark's cases; ``quick`` shrinks them for a smoke test (and renames those it shrinks)."""
    big = 1 << 16 if quick else 32 << 20
    transformer = transformer_shapes(2, 32, 256) if quick else transformer_shapes(24, 288, 8192)
    small = [(256,)] * 20 if quick else [(4096,)] * 1000
    both = {"momentum": 0.9, "centered": True}
    return [
        Case("one tensor, 32M" if not quick else "one tensor", [(big,)]),
        Case("transformer list", transformer),
        Case("1000 tensors of 4096" if not quick else "small tensors", small),
        Case("one tensor, 32M, momentum + centered" if not quick else "one tensor, momentum + centered", [(big,)], both),
        Case("transformer list, momentum", transformer, {"momentum": 0.9}),
        Case("transformer list, centered", transformer, {"centered": True}),
        Case("transformer list, bf16 params", transformer, dtype=torch.bfloat16),
    ]


def _compiled(optimizer: torch.optim.Optimizer) -> Callable[[], Any]:
    """``optimizer``'s step under torch.compile, as in torch's "compiling the optimizer" recipe."""

    @torch.compile(fullgraph=False)
    def step() -> None:
        optimizer.step()

    return step


def _bound_step(params: list[torch.Tensor], case: Case, state_of: RMSprop) -> Callable[[], Any]:
    """Moving the bytes of the case's step and nothing else.

    On CPU, the memory-only loop on this case's parameters, gradients and
    state buffers, each in its own format (bf16 and 8-bit state: 2 and 1 bytes per element; the
    8-bit blocks' absmaxes, 4 bytes per 256 elements, are left out); on CUDA, a copy of half as
    many bytes (read once, written once).
    """
    if params[0].is_cuda:
        source = torch.empty(case.bytes_per_step // 8, device=params[0].device)
        target = torch.empty_like(source)
        return lambda: target.copy_(source)
    if cpu_kernel.kernel() is None:
        raise RuntimeError(f"the memory bound is measured with the CPU kernel's loop: {cpu_kernel.problem()}")

    def as_float32(tensor: torch.Tensor) -> torch.Tensor:
        # The loop moves float32: a 16-bit tensor's bytes are moved as half as many floats.
        return tensor.detach().reshape(-1).view(torch.float32)

    def buffer(p: torch.Tensor, *keys: str) -> torch.Tensor | None:
        # Beside float32 parameters the loop moves the state's own elements (bf16, 8-bit codes).
        state = state_of.state[p]
        tensor = next((state[key] for key in keys if key in state), None)
        if tensor is None:
            return None
        return tensor.detach().reshape(-1) if p.dtype == torch.float32 else as_float32(tensor)

    def buffers(*keys: str) -> list[torch.Tensor]:
        found = [buffer(p, *keys) for p in params]
        return [] if None in found else found

    tensors = (
        [as_float32(p) for p in params],
        [as_float32(p.grad) for p in params],
        # Centered bf16 and 8-bit state keeps grad_variance where fp32 keeps square_avg.
        buffers("grad_variance", "square_avg"),
        buffers("grad_avg"),
        buffers("momentum_buffer"),
    )
    return lambda: cpu_kernel.stream_step_traffic(*tensors)


def _implementations(
    params: list[torch.Tensor], case: Case, compile_torch: bool
) -> tuple[dict[str, Callable[[], Any]], RMSprop]:
    """The step of each implementation, and our fused optimizer (the bound reads its state).

    All optimizers share one state (torch's and ours hold the same tensors under the same
    keys): every implementation then reads and writes the very same memory. Each with buffers
    of its own, where the pages of a 128 MiB buffer happened to land moved a step's time by
    up to 50% on a 4 KB-page machine, whichever implementation it was.
    """
    settings = case.settings
    optimizers: dict[str, torch.optim.Optimizer] = {
        TORCH_LOOP: torch.optim.RMSprop(params, lr=LR, foreach=False, **settings),
        TORCH_FOREACH: torch.optim.RMSprop(params, lr=LR, foreach=True, **settings),
    }
    if compile_torch:
        optimizers[TORCH_COMPILED] = torch.optim.RMSprop(params, lr=LR, **settings)
    optimizers["rmsprop for-loop"] = RMSprop(params, lr=LR, foreach=False, fused=False, **settings)
    optimizers["rmsprop foreach"] = RMSprop(params, lr=LR, foreach=True, fused=False, **settings)
    optimizers[FUSED] = RMSprop(params, lr=LR, fused=True, **settings)
    shared_state = optimizers[TORCH_LOOP].state
    for optimizer in optimizers.values():
        optimizer.state = shared_state
    steps = {name: _compiled(o) if name == TORCH_COMPILED else o.step for name, o in optimizers.items()}
    return steps, optimizers[FUSED]


def _timed(step: Callable[[], Any], device: str) -> float:
    """ms of one step; on CUDA, until the GPU has finished it."""
    synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    step()
    synchronize()
    return (time.perf_counter() - start) * 1e3


def _interleaved_rounds(steps: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Each step's times in ms: after ``warmup`` untimed rounds, one timed call per round, in an
    order rotating from round to round so that no implementation always runs right after the same one."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_timed(steps[name], device))
    return times


def run_case(case: Case, repeats: int, warmup: int, compile_torch: bool, device: str = "cpu") -> dict[str, Any]:
    """Median ms per step and first-call ms of each implementation on ``case``."""
    generator = torch.Generator().manual_seed(0)

    def draw(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device=device, dtype=case.dtype)

    params = [torch.nn.Parameter(draw(shape)) for shape in case.shapes]
    for p in params:
        p.grad = draw(p.shape)
    steps, fused = _implementations(params, case, compile_torch)
    first = {name: _timed(step, device) for name, step in steps.items()}
    # After the first fused step, which creates the square averages the bound reads.
    steps[BOUND] = _bound_step(params, case, fused)
    first[BOUND] = _timed(steps[BOUND], device)
    times = _interleaved_rounds(steps, repeats, warmup, device)
    torch._dynamo.reset()
    return _summary(case, first, times)


def _quartiles(values: list[float]) -> list[float]:
    """The first and third quartiles (both the value itself for a single value)."""
    if len(values) < 2:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


def _paired(times: dict[str, list[float]], ours: str, theirs: str) -> dict[str, Any]:
    """``ours`` against ``theirs`` round by round: each round runs both once, close in time, so the
    ratio of the two is steadier than the ratio of medians when the machine's bandwidth swings."""
    ratios = [a / b for a, b in zip(times[ours], times[theirs], strict=True)]
    return {
        "median_ratio": statistics.median(ratios),
        "rounds_faster": sum(ratio < 1 for ratio in ratios),
        "rounds": len(ratios),
    }


def _summary(case: Case, first: dict[str, float], times: dict[str, list[float]]) -> dict[str, Any]:
    median = {name: statistics.median(values) for name, values in times.items()}
    bound_ms = median[BOUND]
    results = []
    for name, ms in median.items():
        if name == BOUND:
            continue
        results.append(
            {
                "implementation": name,
                "median_ms": ms,
                "quartiles_ms": _quartiles(times[name]),
                "speedup_vs_torch_for_loop": median[TORCH_LOOP] / ms,
                "speedup_vs_torch_foreach": median[TORCH_FOREACH] / ms,
                # Round by round, like the comparison with torch.compile: the bound's loop runs in
                # every round too, so a swing of the machine's bandwidth cancels out.
                "times_bound": _paired(times, name, BOUND)["median_ratio"],
                "first_call_ms": first[name],
                "steps_timed": len(times[name]),
                "times_ms": times[name],
            }
        )
    summary = {
        "case": case.name,
        "settings": case.settings,
        "tensors": len(case.shapes),
        "parameters": case.numel,
        "bytes_per_step": case.bytes_per_step,
        "bandwidth_gb_per_s": case.bytes_per_step / (bound_ms * 1e-3) / 1e9,
        "bound_ms": bound_ms,
        "bound_times_ms": times[BOUND],
        "results": results,
    }
    if TORCH_COMPILED in times:
        summary["fused_vs_compiled"] = _paired(times, FUSED, TORCH_COMPILED)
    return summary


def fresh_process_first_step_ms(device: str = "cpu") -> dict[str, float]:
    """In a new Python process that has imported torch and rmsprop, the first fused step (it loads the kernel)."""
    sync = "torch.cuda.synchronize()" if device == "cuda" else "pass"
    script = (
        "import time, torch\n"
        "from rmsprop import RMSprop\n"
        f"p = torch.nn.Parameter(torch.ones(1000, device={device!r})); p.grad = torch.ones_like(p)\n"
        "opt = RMSprop([p], fused=True)\n"
        f"start = time.perf_counter(); opt.step(); {sync}; first = time.perf_counter() - start\n"
        f"start = time.perf_counter(); opt.step(); {sync}; second = time.perf_counter() - start\n"
        "print(first * 1e3, second * 1e3)\n"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    first, second = (float(value) for value in output.split())
    return {"first_step_ms": first, "second_step_ms": second}


# --- state precision ----------------------------------------------------------------

STATE_PRECISIONS = ("full", "bf16", "8bit")
BITSANDBYTES = "bitsandbytes RMSprop8bit"


def state_precision_cases(quick: bool = False) -> list[Case]:
    """The cases of the state-precision comparison: fp32 parameters, plain and momentum + centered."""
    big = 1 << 16 if quick else 32 << 20
    transformer = transformer_shapes(2, 32, 256) if quick else transformer_shapes(24, 288, 8192)
    small = [(4096,)] * (20 if quick else 1000)
    both = {"momentum": 0.9, "centered": True}
    return [
        Case("one tensor, 32M" if not quick else "one tensor", [(big,)]),
        Case("one tensor, 32M, momentum + centered" if not quick else "one tensor, momentum + centered", [(big,)], both),
        Case("transformer list", transformer),
        Case("transformer list, momentum + centered", transformer, both),
        Case("1000 tensors of 4096" if not quick else "small tensors", small),
    ]


def _format_bound(state_precision: str) -> str:
    """The name of the memory bound of a state format's step (the fp32 one is :data:`BOUND`)."""
    return BOUND if state_precision == "full" else f"{BOUND}, {state_precision} state"


def state_bytes_per_step(case: Case, state_precision: str) -> float:
    """Bytes a one-pass step moves with state stored as ``state_precision`` (fp32 parameters): p read
    and written, g read, each buffer read and written (8-bit: its codes, and one float32 absmax per
    256 elements; tensors below 4096 elements keep fp32 state, as the optimizer's default)."""
    buffers = 1 + (case.settings.get("momentum", 0) > 0) + case.settings.get("centered", False)
    total = 0.0
    for shape in case.shapes:
        n = int(np.prod(shape))
        per_buffer = {"full": 4.0, "bf16": 2.0, "8bit": 1.0 + 4 / 256 if n >= 4096 else 4.0}[state_precision]
        total += n * (12 + 2 * buffers * per_buffer)
    return total


def _bitsandbytes_optimizer(params: list[torch.Tensor], case: Case) -> torch.optim.Optimizer | None:
    """bitsandbytes' 8-bit RMSprop on the same parameters, where it is installed and takes the settings."""
    # Its CPU backend logs a warning at import on CPUs with AVX512-BF16 about a 4-bit matmul kernel
    # it could not fetch, which its RMSprop8bit does not use.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        return None
    if case.settings.get("centered"):
        return None  # it refuses centered RMSProp
    return bitsandbytes.optim.RMSprop8bit(params, lr=LR, momentum=case.settings.get("momentum", 0.0))


def run_state_precision_case(case: Case, repeats: int, warmup: int) -> dict[str, Any]:
    """Our fused step with fp32, bf16 and 8-bit state (and bitsandbytes' 8-bit RMSprop) on the same
    parameters, round by round, with the fp32 step's memory bound; ratios to our fp32-state step."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in case.shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    optimizers: dict[str, torch.optim.Optimizer] = {
        fmt: RMSprop(params, lr=LR, fused=True, state_precision=fmt, **case.settings) for fmt in STATE_PRECISIONS
    }
    theirs = _bitsandbytes_optimizer(params, case)
    if theirs is not None:
        optimizers[BITSANDBYTES] = theirs
    steps = {name: optimizer.step for name, optimizer in optimizers.items()}
    first = {name: _timed(step, "cpu") for name, step in steps.items()}
    for fmt in STATE_PRECISIONS:
        steps[_format_bound(fmt)] = _bound_step(params, case, optimizers[fmt])
    times = _interleaved_rounds(steps, repeats, warmup, "cpu")
    full_bytes = state_bytes_per_step(case, "full")
    results = []
    for name in optimizers:
        fmt = "8bit" if name == BITSANDBYTES else name
        own_bound = _format_bound(fmt)
        results.append(
            {
                "implementation": name,
                "median_ms": statistics.median(times[name]),
                "times_full": _paired(times, name, "full")["median_ratio"],
                "times_bound": _paired(times, name, BOUND)["median_ratio"],
                "bytes_ratio": state_bytes_per_step(case, fmt) / full_bytes,
                # The least this format's step can take here: its own bytes, moved by the same loop.
                "times_own_bound": _paired(times, name, own_bound)["median_ratio"],
                "own_bound_ms": statistics.median(times[own_bound]),
                "own_bound_times_full": _paired(times, own_bound, "full")["median_ratio"],
                "first_call_ms": first[name],
                "times_ms": times[name],
            }
        )
    return {
        "case": case.name,
        "settings": case.settings,
        "tensors": len(case.shapes),
        "parameters": case.numel,
        "bound_ms": statistics.median(times[BOUND]),
        "bound_times_ms": times[BOUND],
        "own_bound_times_ms": {fmt: times[_format_bound(fmt)] for fmt in STATE_PRECISIONS},
        "results": results,
    }


# The limit of each format's step time over our fp32-state step; 1000 small tensors have their own.
_TARGETS = {"bf16": 0.9, "8bit": 1.0}
_SMALL_TENSOR_TARGET = 1.3


def state_precision_table(report: dict[str, Any]) -> str:
    """The state-precision comparison as markdown, each target marked met, not met, or out of reach
    (not met, and the format's own memory bound, measured in the same rounds, lies above it)."""
    lines = [
        "| case | state | median ms/step | × our fp32-state step | × the fp32 memory bound "
        "| × its own memory bound | its bound × our fp32-state step | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for case in report["state_precision"]:
        label = f"{case['case']} ({case['parameters'] / 1e6:.1f}M params, {case['tensors']} tensors; fp32 bound {case['bound_ms']:.2f} ms)"
        by_name = {result["implementation"]: result for result in case["results"]}
        for result in case["results"]:
            name = result["implementation"]
            reachable = True
            if name == "full":
                target, met = "≤ 1.1× the bound", result["times_bound"] <= 1.1
            elif name == BITSANDBYTES:
                ours = by_name["8bit"]["median_ms"]
                target, met = "ours ≥ 5× faster", result["median_ms"] >= 5 * ours
            else:
                many_small = case["case"].startswith(("1000 tensors", "small tensors"))
                limit = _SMALL_TENSOR_TARGET if many_small else _TARGETS[name]
                target, met = f"≤ {limit}× fp32", result["times_full"] <= limit
                reachable = result["own_bound_times_full"] <= limit
            verdict = "met" if met else "not met" if reachable else "out of reach"
            lines.append(
                f"| {label} | {name} | {result['median_ms']:.2f} | {result['times_full']:.2f} "
                f"| {result['times_bound']:.2f} | {result['times_own_bound']:.2f} "
                f"| {result['own_bound_times_full']:.2f} | {target} | {verdict} |"
            )
            label = ""
    return "\n".join(lines)


def case_names(quick: bool = False) -> list[str]:
    """The names ``--case`` accepts: the step cases, and the state-precision ones as ``state precision: <name>``."""
    return [case.name for case in cases(quick)] + [f"state precision: {case.name}" for case in state_precision_cases(quick)]


def run_benchmark(
    quick: bool = False,
    repeats: int | None = None,
    compile_torch: bool | None = None,
    case_names: list[str] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Every case, one after the other, in this process, on ``device``; a dict ready for JSON."""
    repeats = repeats or (3 if quick else 15)
    compile_torch = (not quick) if compile_torch is None else compile_torch
    chosen = [case for case in cases(quick) if not case_names or case.name in case_names]
    results = []
    precision_cases = [
        case
        for case in (state_precision_cases(quick) if device == "cpu" else [])
        if not case_names or f"state precision: {case.name}" in case_names
    ]
    precision = []
    # On a terminal only (disable=None): piped or redirected, stderr stays empty.
    with tqdm(total=len(chosen) + len(precision_cases) + 1, desc="rmsprop bench", unit="stage", disable=None, leave=False) as bar:
        for case in chosen:
            bar.set_postfix_str(case.name)
            results.append(run_case(case, repeats, warmup=1 if quick else 3, compile_torch=compile_torch, device=device))
            bar.update()
        for case in precision_cases:
            bar.set_postfix_str(f"state precision: {case.name}")
            precision.append(run_state_precision_case(case, repeats, warmup=1 if quick else 3))
            bar.update()
        bar.set_postfix_str("first step in a fresh process")
        fresh = fresh_process_first_step_ms(device)
        bar.update()
    return {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "cpu_kernel": cpu_kernel.describe(),
            "quick": quick,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        },
        "fresh_process": fresh,
        "cases": results,
        "state_precision": precision,
    }


def markdown_table(report: dict[str, Any]) -> str:
    """The report as markdown: one table row per (case, implementation)."""
    machine = report["machine"]
    fresh = report["fresh_process"]
    lines = [
        f"torch {machine['torch']}, {machine['torch_threads']} torch threads, device {machine['device']}. "
        f"Fused first step in a fresh process, torch and rmsprop imported (it loads the kernel): "
        f"{fresh['first_step_ms']:.0f} ms.",
        "",
        "| case | implementation | median ms/step | q1-q3 ms | × faster than torch for-loop "
        "| × faster than torch foreach | × the memory bound | first call ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in report["cases"]:
        label = (
            f"{case['case']} ({case['parameters'] / 1e6:.1f}M params, {case['tensors']} tensors; "
            f"bound {case['bound_ms']:.2f} ms at {case['bandwidth_gb_per_s']:.0f} GB/s)"
        )
        for result in case["results"]:
            q1, q3 = result["quartiles_ms"]
            lines.append(
                f"| {label} | {result['implementation']} | {result['median_ms']:.2f} | {q1:.2f}-{q3:.2f} "
                f"| {result['speedup_vs_torch_for_loop']:.2f} | {result['speedup_vs_torch_foreach']:.2f} "
                f"| {result['times_bound']:.2f} | {result['first_call_ms']:.0f} |"
            )
            label = ""
    paired = [case for case in report["cases"] if "fused_vs_compiled" in case]
    if paired:
        lines += ["", "Fused against torch.compile round by round (time ratio; below 1: fused faster):", ""]
        for case in paired:
            pair = case["fused_vs_compiled"]
            lines.append(
                f"- {case['case']}: median {pair['median_ratio']:.2f}, "
                f"fused faster in {pair['rounds_faster']} of {pair['rounds']} rounds"
            )
    return "\n".join(lines)


def main(
    quick: bool,
    json_path: Path | None,
    repeats: int | None,
    compile_torch: bool | None,
    case_names: list[str] | None,
    device: str = "cpu",
) -> int:
    report = run_benchmark(quick=quick, repeats=repeats, compile_torch=compile_torch, case_names=case_names, device=device)
    print(markdown_table(report))
    if report["state_precision"]:
        print("\nState precision: our fused step with fp32, bf16 and 8-bit state (fp32 parameters), round by round:\n")
        print(state_precision_table(report))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwritten: {json_path}")
    return 0
