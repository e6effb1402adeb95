"""Memory, training quality and step time of bf16 and 8-bit optimizer state against fp32.

``python -m rmsprop.tools.memory_bench`` or ``rmsprop bench-memory`` (``make bench-memory``).
Three measurements, each for the modes ``full`` (fp32), ``bf16`` and ``8bit``
and the configurations plain, momentum and centered+momentum:

* bytes of optimizer state per parameter of an MLP 1024-1024-1024-10 (2.1M
  parameters; its biases stay fp32 in 8-bit mode, being below ``min_8bit_size``),
  with the optimizer's step time on it;
* final held-out loss over several seeds on two small real tasks: an MLP
  classifier of scikit-learn's ``load_digits`` and a character-level LSTM on the
  text of the standard library's ``pydoc_data.topics``, with the mean step time;
* the dynamic range of ``square_avg`` after the fp32 runs: how many elements
  an 8-bit code of ``square_avg`` itself, or of its root (what 8-bit mode
  stores), rounds to 0, and the relative error of the denominator.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from rmsprop.core.optimizer import RMSprop
from rmsprop.formats.checkpoint import state_bytes
from rmsprop.formats.codecs import dequantize_blockwise, quantize_blockwise
from rmsprop.formats.maps import UNSIGNED_MAP

MODES = ("full", "bf16", "8bit")
CONFIGS = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "centered+momentum": {"momentum": 0.9, "centered": True},
}


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


# --- bytes per parameter ------------------------------------------------------


@dataclass
class MemoryRow:
    config: str
    mode: str
    bytes_per_param: float
    step_ms: float


def measure_memory(steps: int = 10) -> list[MemoryRow]:
    """State bytes per parameter and step time on a 2.1M-parameter MLP, random gradients."""
    rows = []
    for config, settings in CONFIGS.items():
        for mode in MODES:
            torch.manual_seed(0)
            model = _mlp([1024, 1024, 1024, 10])
            params = list(model.parameters())
            optimizer = RMSprop(params, lr=1e-3, state_precision=mode, **settings)
            times = []
            for _ in range(steps + 1):
                for p in params:
                    p.grad = torch.randn_like(p)
                start = time.perf_counter()
                optimizer.step()
                times.append(time.perf_counter() - start)
            numel = sum(p.numel() for p in params)
            bytes_per_param = state_bytes(optimizer.state.values()) / numel
            rows.append(MemoryRow(config, mode, bytes_per_param, 1e3 * statistics.median(times[1:])))
    return rows


# --- tasks ----------------------------------------------------------------------


@dataclass
class Task:
    """A model, a source of training batches and a held-out loss."""

    model: nn.Module
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    held_out: Callable[[], float]
    lr: float


def digits_task(seed: int) -> Task:
    """An MLP 64-256-256-10 on scikit-learn's 8x8 digits: 80% train (batches of 64), 20% held out."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    split = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    train, test = split[: int(0.8 * len(y))], split[int(0.8 * len(y)) :]
    torch.manual_seed(seed)
    model = _mlp([64, 256, 256, 10])
    generator = torch.Generator().manual_seed(seed)
    loss = nn.functional.cross_entropy

    def next_batch():
        index = train[torch.randint(len(train), (64,), generator=generator)]
        return x[index], y[index]

    def held_out():
        with torch.no_grad():
            return loss(model(x[test]), y[test]).item()

    return Task(model, next_batch, loss, held_out, lr=1e-3)


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, embedding: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.lstm = nn.LSTM(embedding, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embed(tokens))
        return self.out(hidden)


def char_lstm_task(seed: int, length: int = 64, batch: int = 32, chars: int = 200_000) -> Task:
    """A one-layer LSTM (128 units) predicting the next character of Python's pydoc topics: 90% train, 10% held out."""
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))[:chars]
    vocab = sorted(set(text))
    codes = torch.tensor([vocab.index(c) for c in text])
    cut = int(0.9 * len(codes))
    train, test = codes[:cut], codes[cut:]
    torch.manual_seed(seed)
    model = CharLSTM(len(vocab))
    generator = torch.Generator().manual_seed(seed)

    def windows(source, starts):
        rows = torch.stack([source[s : s + length + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]

    def loss(logits, targets):
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def next_batch():
        return windows(train, torch.randint(len(train) - length - 1, (batch,), generator=generator))

    test_inputs, test_targets = windows(test, torch.arange(0, len(test) - length - 1, length)[:128])

    def held_out():
        with torch.no_grad():
            return loss(model(test_inputs), test_targets).item()

    return Task(model, next_batch, loss, held_out, lr=2e-3)


TASKS = {"digits": (digits_task, 1000), "char-lstm": (char_lstm_task, 300)}


@dataclass
class Run:
    task: str
    config: str
    mode: str
    seed: int
    held_out_loss: float
    step_ms: float
    square_avgs: list[torch.Tensor]


def train(task_name: str, config: str, mode: str, seed: int, steps: int) -> Run:
    make_task, _ = TASKS[task_name]
    task = make_task(seed)
    params = list(task.model.parameters())
    settings = CONFIGS[config]
    # lr (1 - momentum): the same step size in a steady state as without momentum.
    lr = task.lr * (1 - settings.get("momentum", 0.0))
    optimizer = RMSprop(params, lr=lr, state_precision=mode, **settings)
    times = []
    for _ in range(steps):
        inputs, targets = task.next_batch()
        optimizer.zero_grad()
        task.loss(task.model(inputs), targets).backward()
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    square_avgs = [optimizer.state[p]["square_avg"].clone() for p in params if mode == "full"]
    return Run(task_name, config, mode, seed, task.held_out(), 1e3 * statistics.mean(times), square_avgs)


# --- dynamic range ----------------------------------------------------------------


@dataclass
class RangeRow:
    task: str
    stored: str
    zero_fraction: float
    p99_error: float
    max_error: float


def dynamic_range(task: str, square_avgs: Sequence[torch.Tensor], min_size: int = 4096) -> list[RangeRow]:
    """Nearest-rounded 8-bit codes of ``square_avg`` and of its root: elements decoded to 0 and the
    relative error of the denominator ``sqrt(square_avg)``, over the tensors 8-bit mode would quantize."""
    values = [v.reshape(-1) for v in square_avgs if v.numel() >= min_size]
    rows = []
    for stored in ("square_avg", "sqrt(square_avg)"):
        zeros, errors = 0, []
        for v in values:
            positive = v > 0
            if stored == "square_avg":
                root = dequantize_blockwise(*quantize_blockwise(v, UNSIGNED_MAP), UNSIGNED_MAP).sqrt()
            else:
                root = dequantize_blockwise(*quantize_blockwise(v.sqrt(), UNSIGNED_MAP), UNSIGNED_MAP)
            zeros += int((root[positive] == 0).sum())
            errors.append(((root[positive] / v[positive].sqrt()) - 1).abs())
        errors = torch.cat(errors)
        total = sum(int((v > 0).sum()) for v in values)
        p99 = torch.quantile(errors[:1_000_000], 0.99).item()
        rows.append(RangeRow(task, stored, zeros / total, p99, errors.max().item()))
    return rows


# --- report ---------------------------------------------------------------------------


def memory_table(rows: list[MemoryRow]) -> str:
    full = {r.config: r for r in rows if r.mode == "full"}
    lines = [
        "| configuration | state | bytes/param | vs fp32 | step ms (2.1M params) | vs fp32 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = full[r.config]
        lines.append(
            f"| {r.config} | {_label(r.mode)} | {r.bytes_per_param:.3f} "
            f"| {r.bytes_per_param / base.bytes_per_param:.1%} "
            f"| {r.step_ms:.2f} | {r.step_ms / base.step_ms:.1f}x |"
        )
    return "\n".join(lines)


def quality_table(runs: list[Run]) -> str:
    lines = [
        "| task | configuration | state | held-out loss, mean ± sd | seeds | within fp32 range | step ms | vs fp32 |",
        "|---|---|---|---:|---|:-:|---:|---:|",
    ]
    groups = {}
    for run in runs:
        groups.setdefault((run.task, run.config), {}).setdefault(run.mode, []).append(run)
    for (task, config), by_mode in groups.items():
        full_losses = [r.held_out_loss for r in by_mode["full"]]
        full_ms = statistics.mean(r.step_ms for r in by_mode["full"])
        for mode, mode_runs in by_mode.items():
            losses = [r.held_out_loss for r in mode_runs]
            mean = statistics.mean(losses)
            inside = "" if mode == "full" else ("yes" if min(full_losses) <= mean <= max(full_losses) else "no")
            ms = statistics.mean(r.step_ms for r in mode_runs)
            lines.append(
                f"| {task} | {config} | {_label(mode)} | {mean:.4f} ± {statistics.stdev(losses):.4f} "
                f"| {' '.join(f'{v:.4f}' for v in losses)} | {inside} | {ms:.2f} | {ms / full_ms:.1f}x |"
            )
    return "\n".join(lines)


def range_table(rows: list[RangeRow]) -> str:
    lines = [
        "| task | 8-bit code of | elements decoded to 0 | denominator error, 99th pct | max |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.task} | {r.stored} | {r.zero_fraction:.2%} | {r.p99_error:.1%} | {r.max_error:.1%} |")
    return "\n".join(lines)


def _label(mode: str) -> str:
    return {"full": "fp32", "bf16": "bf16", "8bit": "8-bit"}[mode]


def run(seeds: int = 3, scale: float = 1.0, threads: int = 1, step_time_only: bool = False) -> str:
    """All three measurements as Markdown, or only the first (bytes and step time); ``scale``
    multiplies the training steps."""
    torch.set_num_threads(threads)
    sections = [f"torch {torch.__version__}, {threads} thread(s), {seeds} seeds\n", memory_table(measure_memory())]
    if step_time_only:
        return "\n\n".join(sections) + "\n"
    trainings = [
        (task, config, mode, seed, max(1, round(scale * steps)))
        for task, (_, steps) in TASKS.items()
        for config in CONFIGS
        for mode in MODES
        for seed in range(seeds)
    ]
    runs = []
    # On a terminal only (disable=None): piped or redirected, stderr stays empty.
    with tqdm(trainings, desc="rmsprop bench-memory", unit="run", disable=None, leave=False) as bar:
        for task, config, mode, seed, steps in bar:
            bar.set_postfix_str(f"{task} {config} {mode} seed {seed}")
            runs.append(train(task, config, mode, seed, steps))
    sections.append(quality_table(runs))
    ranges = []
    for task in TASKS:
        # square_avg of the plain fp32 runs: what 8-bit mode would quantize.
        plain_fp32 = [r for r in runs if r.task == task and r.mode == "full" and r.config == "plain"]
        square_avgs = [v for r in plain_fp32 for v in r.square_avgs]
        ranges += dynamic_range(task, square_avgs)
    sections.append(range_table(ranges))
    return "\n\n".join(sections) + "\n"


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (for a seed-to-seed spread), got {value}")
    return value


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    if parser is None:
        parser = argparse.ArgumentParser(prog="python -m rmsprop.tools.memory_bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seeds", type=_at_least_two, default=3, help="seeds per task, configuration and mode, >= 2 (default: 3)"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the training steps (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, for stable timings)")
    parser.add_argument(
        "--step-time", action="store_true", help="only the bytes-per-parameter and step-time table (seconds, not minutes)"
    )
    parser.add_argument("--output", help="also write the tables to this Markdown file")
    return parser


def main_with_args(args: argparse.Namespace) -> int:
    report = run(seeds=args.seeds, scale=args.scale, threads=args.threads, step_time_only=args.step_time)
    print(report)
    if args.output:
        with open(args.output, "w") as file:
            file.write(report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return main_with_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
