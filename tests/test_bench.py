"""``rmsprop bench --quick`` end to end: the table and the JSON have their shape (never timings)."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import pytest
import torch

from rmsprop.tools.bench import (
    BOUND,
    FUSED,
    TORCH_COMPILED,
    Case,
    _implementations,
    _summary,
    cases,
    markdown_table,
    run_benchmark,
    state_precision_cases,
    transformer_shapes,
)
from rmsprop.tools.cli import main

IMPLEMENTATIONS = ["torch for-loop", "torch foreach", "rmsprop for-loop", "rmsprop foreach", "rmsprop fused"]


def test_quick_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(path)]) == 0

    report = json.loads(path.read_text())
    assert report["machine"]["quick"] is True
    assert report["fresh_process"]["first_step_ms"] > 0
    assert [case["case"] for case in report["cases"]] == [case.name for case in cases(quick=True)]
    for case in report["cases"]:
        assert case["bound_ms"] > 0 and case["bandwidth_gb_per_s"] > 0
        assert [result["implementation"] for result in case["results"]] == IMPLEMENTATIONS
        assert "fused_vs_compiled" not in case  # --quick leaves torch.compile out
        for result in case["results"]:
            assert result["steps_timed"] == 3 == len(result["times_ms"])
            assert result["median_ms"] > 0 and result["first_call_ms"] > 0
            assert result["median_ms"] == sorted(result["times_ms"])[1]
            q1, q3 = result["quartiles_ms"]
            assert min(result["times_ms"]) <= q1 <= result["median_ms"] <= q3 <= max(result["times_ms"])
            ratios = [ms / bound for ms, bound in zip(result["times_ms"], case["bound_times_ms"], strict=True)]
            assert result["times_bound"] == sorted(ratios)[1]
        by_name = {result["implementation"]: result for result in case["results"]}
        assert by_name["torch for-loop"]["speedup_vs_torch_for_loop"] == 1.0
        assert by_name["torch foreach"]["speedup_vs_torch_foreach"] == 1.0

    table, precision_table = capsys.readouterr().out.split("State precision:")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| case | implementation | median ms/step")
    assert len(rows) == 1 + len(IMPLEMENTATIONS) * len(report["cases"])
    assert f"written: {path}" in precision_table
    # The state-precision cases: our fused step with each format, bitsandbytes' 8-bit where installed.
    assert [case["case"] for case in report["state_precision"]] == [case.name for case in state_precision_cases(quick=True)]
    precision_rows = [line for line in precision_table.splitlines() if line.startswith("| ") and "---" not in line]
    assert precision_rows[0].startswith("| case | state | median ms/step | × our fp32-state step")
    for case in report["state_precision"]:
        names = [result["implementation"] for result in case["results"]]
        assert names[:3] == ["full", "bf16", "8bit"] and set(names[3:]) <= {"bitsandbytes RMSprop8bit"}
        full = case["results"][0]
        assert full["times_full"] == 1.0 and full["bytes_ratio"] == 1.0
        assert all(result["bytes_ratio"] < 1 for result in case["results"][1:])
        # Each format against its own memory bound, measured in the same rounds.
        assert full["times_own_bound"] == full["times_bound"] and full["own_bound_ms"] == case["bound_ms"]
        for result in case["results"]:
            fmt = "8bit" if result["implementation"] == "bitsandbytes RMSprop8bit" else result["implementation"]
            bounds = case["own_bound_times_ms"][fmt]
            ratios = [ms / bound for ms, bound in zip(result["times_ms"], bounds, strict=True)]
            assert result["times_own_bound"] == sorted(ratios)[1]
            assert result["own_bound_ms"] == sorted(bounds)[1]
    assert len(precision_rows) == 1 + sum(len(case["results"]) for case in report["state_precision"])
    assert all(row.endswith(("| met |", "| not met |", "| out of reach |")) for row in precision_rows[1:])


def test_bench_cases_count_the_bytes_a_one_pass_step_moves():
    plain = Case("plain", [(10,), (2, 5)])
    both = Case("both", [(10,)], {"momentum": 0.9, "centered": True})
    assert plain.numel == 20 and plain.bytes_per_step == 20 * 20
    assert both.bytes_per_step == (20 + 8 + 8) * 10
    assert Case("bf16", [(10,)], {"momentum": 0.9}, torch.bfloat16).bytes_per_step == (10 + 4) * 10


def test_transformer_case_matches_the_issue():
    """~25M parameters in ~200 tensors, as in the issue's measurements."""
    shapes = transformer_shapes(24, 288, 8192)
    numel = sum(math.prod(shape) for shape in shapes)
    assert 190 <= len(shapes) <= 210
    assert 24e6 <= numel <= 28e6



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_bench_runs_on_cuda(capsys):
    assert main(["bench", "--quick", "--no-compile", "--device", "cuda", "--case", "small tensors"]) == 0
    assert "rmsprop fused" in capsys.readouterr().out


def test_fused_and_compiled_are_compared_round_by_round():
    """Rounds where the machine was slow for both cancel out in the ratio of each round."""
    times = {name: [10.0, 10.0, 10.0, 10.0] for name in IMPLEMENTATIONS}
    times[TORCH_COMPILED] = [10.0, 20.0, 10.0, 20.0]
    times[FUSED] = [9.0, 18.0, 11.0, 18.0]  # ratios 0.9, 0.9, 1.1, 0.9
    times[BOUND] = [5.0, 10.0, 5.0, 10.0]
    summary = _summary(Case("pairs", [(4,)]), {name: 1.0 for name in times}, times)
    assert summary["fused_vs_compiled"] == {"median_ratio": pytest.approx(0.9), "rounds_faster": 3, "rounds": 4}
    fused = next(result for result in summary["results"] if result["implementation"] == FUSED)
    # Inclusive quartiles of 9, 11, 18, 18: positions 1.75 and 3.25 of the sorted values.
    assert fused["quartiles_ms"] == pytest.approx([10.5, 18.0])
    # Against the bound, round by round too: 1.8, 1.8, 2.2, 1.8 (the ratio of medians would be 14.5 / 7.5).
    assert fused["times_bound"] == pytest.approx(1.8)
    assert summary["bound_times_ms"] == [5.0, 10.0, 5.0, 10.0]
    report = {"machine": {"torch": "x", "torch_threads": 2, "device": "cpu"}, "fresh_process": {"first_step_ms": 1.0}}
    table = markdown_table({**report, "cases": [summary]})
    assert "- pairs: median 0.90, fused faster in 3 of 4 rounds" in table
    assert "| 14.50 | 10.50-18.00 |" in table


@pytest.mark.parametrize("settings", [{}, {"momentum": 0.9, "centered": True}])
def test_every_implementation_steps_the_same_state_tensors(settings):
    """Placement in memory moves a large step's time: all implementations share one state."""
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))]
    for p in params:
        p.grad = torch.randn_like(p)
    steps, fused = _implementations(params, Case("shared", [(5,), (2, 3)], settings), compile_torch=False)
    assert list(steps) == IMPLEMENTATIONS
    for step in steps.values():
        step()
    first = fused.state[params[0]]
    assert first["step"].item() == len(IMPLEMENTATIONS)  # one counter, advanced by each
    assert set(first) == {"step", "square_avg"} | ({"momentum_buffer", "grad_avg"} if settings else set())
    for step in steps.values():
        assert step.__self__.state[params[0]] is first


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_on_a_terminal(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run_benchmark(quick=True, repeats=1, case_names=["small tensors"])
    shown = terminal.getvalue()
    assert "rmsprop bench" in shown and "small tensors" in shown and "first step in a fresh process" in shown


def test_piped_output_is_the_table_alone():
    command = [sys.executable, "-m", "rmsprop", "bench", "--quick", "--repeats", "1", "--case", "small tensors"]
    finished = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "rmsprop bench" not in finished.stderr and "\r" not in finished.stderr
    assert finished.stdout.splitlines()[2].startswith("| case | implementation |")


def test_unknown_case_is_a_usage_error_listing_the_cases(capsys):
    assert main(["bench", "--quick", "--case", "small tensors", "--case", "one tensor, 32M"]) == 2
    error = capsys.readouterr().err
    assert "unknown --case 'one tensor, 32M'" in error
    assert all(repr(case.name) in error for case in cases(quick=True))
