"""The memory benchmark's measurements on small inputs (its numbers are reported, not tested)."""

import io
import math
import sys

import pytest
import torch

from rmsprop.tools import memory_bench
from rmsprop.tools.cli import main
from rmsprop.tools.memory_bench import Run, build_parser, dynamic_range, quality_table, train


def test_dynamic_range_counts_zeros_of_square_avg_codes_but_not_of_root_codes():
    # One block holding 10 decades: the map's 7 decades cannot hold them, their roots' 5 decades fit.
    square_avg = torch.logspace(-10, 0, 4096)[torch.randperm(4096, generator=torch.Generator().manual_seed(0))]
    direct, root = dynamic_range("synthetic", [square_avg])
    assert direct.stored == "square_avg" and root.stored == "sqrt(square_avg)"
    # Below 1e-7 of the block maximum (about 3 of the 10 decades) a code of square_avg is 0.
    assert 0.2 < direct.zero_fraction < 0.35
    assert root.zero_fraction == 0
    assert direct.max_error == 1.0 and root.max_error < 1.0


def test_quality_table_compares_each_mode_with_the_fp32_range():
    def run(mode, loss):
        return Run("task", "plain", mode, 0, loss, 1.0, [])

    runs = [run("full", 1.0), run("full", 1.2), run("bf16", 1.1), run("bf16", 1.15), run("8bit", 1.3), run("8bit", 1.4)]
    rows = quality_table(runs).splitlines()[2:]
    assert [row.split("|")[6].strip() for row in rows] == ["", "yes", "no"]
    assert "1.1000 ± 0.1414" in rows[0]


@pytest.mark.parametrize("task", ["digits", "char-lstm"])
@pytest.mark.parametrize("mode", ["full", "8bit"])
def test_tasks_train(task, mode):
    if task == "digits":
        pytest.importorskip("sklearn")
    before = train(task, "centered+momentum", mode, seed=0, steps=1).held_out_loss
    after = train(task, "centered+momentum", mode, seed=0, steps=20).held_out_loss
    assert math.isfinite(after) and after < before


def test_cli_refuses_a_single_seed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench-memory", "--seeds", "1"])
    assert exit_info.value.code == 2
    assert "must be at least 2" in capsys.readouterr().err


def test_cli_step_time_flag_selects_the_first_table_only():
    assert build_parser().parse_args(["--step-time"]).step_time
    assert not build_parser().parse_args([]).step_time


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def two_small_trainings_per_mode(monkeypatch):
    monkeypatch.setattr(memory_bench, "TASKS", {"digits": (memory_bench.digits_task, 2)})
    monkeypatch.setattr(memory_bench, "CONFIGS", {"plain": {}})
    monkeypatch.setattr(memory_bench, "measure_memory", lambda: [])


def test_progress_bar_shows_on_a_terminal(two_small_trainings_per_mode, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    memory_bench.run(seeds=2)
    assert "rmsprop bench-memory" in terminal.getvalue() and "digits plain 8bit seed 1" in terminal.getvalue()


def test_not_on_a_terminal_only_the_tables_are_printed(two_small_trainings_per_mode, capsys):
    assert main(["bench-memory", "--seeds", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert all(line.startswith(("|", "torch ")) for line in captured.out.splitlines() if line)
