"""`rmsprop compare`: the end-to-end smoke run, the verdict rules, the runner and the tasks."""

import contextlib
import io
import json
import math
import re

import matplotlib.image
import numpy as np
import pytest
import torch
from PIL import Image

from rmsprop.cli import main
from rmsprop.compare import TASK_NAMES, compare
from rmsprop.compare.claims import beats, evaluate_claims, steps_to_target
from rmsprop.compare.optimizers import OPTIMIZERS, RMSPROP_VARIANTS, next_lr, optimizer_spec
from rmsprop.compare.runner import MAX_GRID_EXTENSIONS, _tune, best_lr, train
from rmsprop.compare.tasks import CharLSTM, Drift, _digits_splits, _pydoc_text, task_by_name

VERDICTS = ("supported", "not supported", "mixed")

# --- end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()) as stdout:
        code = main(["compare", "--quick", "--out", str(out)])
    return out, code, stdout.getvalue(), stderr.getvalue()


@pytest.mark.slow
def test_quick_run_writes_every_file(quick_run):
    out, code, stdout, _ = quick_run
    assert code == 0
    expected = {"report.md", "results.json", *(f"{name}.png" for name in TASK_NAMES)}
    assert expected <= {path.name for path in out.iterdir()}
    assert "Claim 1:" in stdout and "Claim 5:" in stdout


@pytest.mark.slow
def test_quick_run_plots_are_images(quick_run):
    out = quick_run[0]
    for name in TASK_NAMES:
        with Image.open(out / f"{name}.png") as image:
            image.verify()
        pixels = matplotlib.image.imread(out / f"{name}.png")
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
        # Not a blank canvas: the curves put colour on it.
        assert pixels[..., :3].std() > 0.05


@pytest.mark.slow
def test_quick_run_report_has_a_verdict_for_each_claim(quick_run):
    report = (quick_run[0] / "report.md").read_text()
    for number in range(1, 6):
        row = re.search(rf"^\| {number} \| .+ \| \*\*(supported|not supported|mixed)\*\* \|", report, re.MULTILINE)
        assert row, f"no verdict row for claim {number}"
        assert re.search(rf"^### Claim {number}: (supported|not supported|mixed)$", report, re.MULTILINE)
    assert "Quick smoke run" in report
    for name in TASK_NAMES:
        assert f"]({name}.png)" in report


@pytest.mark.slow
def test_quick_run_results_json(quick_run):
    results = json.loads((quick_run[0] / "results.json").read_text())
    assert results["meta"]["quick"] is True and results["meta"]["final_seeds"] == [1]
    assert set(results["tasks"]) == set(TASK_NAMES)
    for name, task in results["tasks"].items():
        spec_task = task_by_name(name)
        assert set(task["optimizers"]) == set(spec_task.optimizers)
        for opt_name, optimizer in task["optimizers"].items():
            assert optimizer["lr_grid"] == list(optimizer_spec(opt_name).quick_grid)
            assert optimizer["best_lr"] in optimizer["lr_grid"]
            assert [run["lr"] for run in optimizer["tuning"]] == optimizer["lr_grid"]
            assert all(run["seed"] == 0 for run in optimizer["tuning"])
            assert [run["seed"] for run in optimizer["runs"]] == [1]
            for run in optimizer["tuning"] + optimizer["runs"]:
                curves = run["curves"]
                assert curves["step"][0] == 0 and curves["step"][-1] == task["steps"]
                assert len(curves[task["curve_metric"]]) == len(curves["step"])
                assert task["metric"] in run["final"]
                if opt_name == "sgd-momentum":
                    assert run["step_size"] is None
                else:
                    assert len(run["step_size"]["median"]) == len(curves["step"]) - 1
    assert [claim["number"] for claim in results["claims"]] == [1, 2, 3, 4, 5]
    for claim in results["claims"]:
        assert claim["verdict"] in VERDICTS
        assert claim["evidence"] and claim["rule"]
        checks = claim["checks"]
        expected = "supported" if all(checks) else "not supported" if not any(checks) else "mixed"
        assert claim["verdict"] == expected


@pytest.mark.slow
def test_progress_bar_is_quiet_when_stderr_is_not_a_terminal(quick_run):
    assert quick_run[3] == ""


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["compare", "--task", "mnist", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="Unknown task 'mnist'"):
        compare(["mnist"], out_dir=tmp_path)


@pytest.mark.parametrize("seeds", [0, -1, 1.5])
def test_invalid_seeds(tmp_path, seeds):
    with pytest.raises(ValueError, match="seeds must be a positive integer"):
        compare(["seed-mlp"], out_dir=tmp_path, seeds=seeds)


@pytest.mark.slow
def test_one_task_leaves_the_other_claims_untested(tmp_path):
    results = compare(["drift"], out_dir=tmp_path, quick=True, seeds=2)
    verdicts = {claim["number"]: claim["verdict"] for claim in results["claims"]}
    assert verdicts[1] == verdicts[3] == verdicts[5] == "not tested"
    assert verdicts[2] in VERDICTS and verdicts[4] in VERDICTS
    assert {path.name for path in tmp_path.iterdir()} == {"report.md", "results.json", "drift.png"}
    assert all(len(opt["runs"]) == 2 for opt in results["tasks"]["drift"]["optimizers"].values())


# --- verdict rules --------------------------------------------------------------------


def test_beats_is_a_paired_comparison():
    # Differences b - a = [0.1, 0.2, 0.3]: mean 0.2, sd 0.1, standard error 0.0577; 0.2 > 2 * 0.0577.
    assert beats([1.0, 2.0, 3.0], [1.1, 2.2, 3.3])
    # Differences [0.1, -0.1, 0.6]: mean 0.2, sd 0.3606, twice the standard error 0.416 > 0.2.
    assert not beats([1.0, 2.0, 3.0], [1.1, 1.9, 3.6])
    # Unpaired, these means (2.0 vs 2.2) would be far inside each other's spread.
    assert not beats([1.1, 2.2, 3.3], [1.0, 2.0, 3.0])
    assert beats([1.0], [1.0001]) and not beats([1.0], [1.0])
    assert beats([5.0, 6.0], [math.inf, 1.0])
    assert not beats([math.inf, 1.0], [5.0, 6.0])
    with pytest.raises(ValueError, match="paired"):
        beats([1.0, 2.0], [1.0])


def test_steps_to_target():
    steps = np.array([0.0, 10.0, 20.0, 30.0])
    assert steps_to_target(steps, np.array([4.0, 3.0, 2.0, 1.0]), 2.5) == 20.0
    assert steps_to_target(steps, np.array([4.0, 3.0, 2.0, 1.0]), 0.5) == math.inf


def _run(curve, final, step_sizes=None, diverged=False, lr=0.01, seed=1):
    steps = list(range(0, 10 * len(curve), 10))
    return {
        "lr": lr,
        "seed": seed,
        "curves": {"step": steps, "m": list(curve)},
        "final": final,
        "diverged": diverged,
        "step_size": None
        if step_sizes is None
        else {"step": steps[1:], "median": list(step_sizes), "min": list(step_sizes), "max": list(step_sizes)},
    }


def _task(optimizers, metric="m"):
    return {"metric": metric, "curve_metric": "m", "optimizers": optimizers}


def _optimizer(runs, tuning=None):
    return {"runs": runs, "tuning": tuning if tuning is not None else runs}


def test_claim_1_follows_the_step_sizes_and_late_progress():
    falling = [1.0, 0.8, 0.6, 0.5, 0.4]  # ratio end/mid = 0.4/0.6 < 0.9
    flat = [1.0, 1.0, 1.0, 1.0, 1.0]

    def tasks(variant_steps, variant_curve):
        adagrad = _optimizer([_run([5, 4, 3.5, 3.2, 3.1, 3.05], {"m": 3.05}, falling)])
        variant = _optimizer([_run(variant_curve, {"m": 3.0}, variant_steps)])
        optimizers = {"adagrad": adagrad, **{name: variant for name in RMSPROP_VARIANTS}}
        return {"step-size": _task(optimizers)}

    # Adagrad's late progress (curve at mid step 20 -> end): 3.5 - 3.05 = 0.45.
    [claim_1] = [c for c in evaluate_claims(tasks(flat, [5, 4.5, 4, 3.5, 3.2, 3.0])) if c["number"] == 1]
    assert claim_1["verdict"] == "supported"
    [claim_1] = [c for c in evaluate_claims(tasks(falling, [5, 4.5, 4, 3.5, 3.2, 3.0])) if c["number"] == 1]
    assert claim_1["verdict"] == "not supported"
    [claim_1] = [c for c in evaluate_claims(tasks(flat, [5, 3.1, 3.05, 3.02, 3.01, 3.0])) if c["number"] == 1]
    assert claim_1["verdict"] == "not supported"


def test_claim_2_and_4_from_tracking_errors():
    def drift(values):
        optimizers = {
            name: _optimizer([_run([1.0, 0.5], {"m": v, "x": 0.0}, seed=s) for s, v in enumerate(vs, 1)])
            for name, vs in values.items()
        }
        return {"drift": _task(optimizers)}

    base = {"adagrad": [0.5, 0.52, 0.48], "sgd-momentum": [0.2, 0.21, 0.19]}
    good = {name: [0.21, 0.2, 0.22] for name in RMSPROP_VARIANTS}
    claims = {c["number"]: c for c in evaluate_claims(drift({**base, **good}))}
    assert claims[2]["verdict"] == "supported"  # mean 0.21 <= 1.1 * 0.2
    assert claims[4]["verdict"] == "supported"
    mixed = {**good, RMSPROP_VARIANTS[0]: [0.3, 0.31, 0.29]}  # beats Adagrad but 1.5x the best
    claims = {c["number"]: c for c in evaluate_claims(drift({**base, **mixed}))}
    assert claims[2]["verdict"] == "mixed" and claims[2]["held"] == "2/3"
    assert claims[4]["verdict"] == "supported"
    worse = {name: [0.6, 0.62, 0.61] for name in RMSPROP_VARIANTS}
    claims = {c["number"]: c for c in evaluate_claims(drift({**base, **worse}))}
    assert claims[2]["verdict"] == claims[4]["verdict"] == "not supported"
    assert {c["verdict"] for c in evaluate_claims(drift({**base, **good})) if c["number"] in (1, 3, 5)} == {
        "not tested"
    }


def test_claim_4_counts_diverged_grid_runs():
    adagrad = _optimizer([_run([1.0, 0.5], {"m": 0.5})], tuning=[_run([1.0, 0.5], {"m": 0.5})])
    unstable = _optimizer(
        [_run([1.0, 0.1], {"m": 0.1})],
        tuning=[_run([1.0, 0.1], {"m": 0.1}), _run([1.0, math.nan], {"m": math.nan}, diverged=True)],
    )
    tasks = {"digits": _task({"adagrad": adagrad, "adam": adagrad, **{n: unstable for n in RMSPROP_VARIANTS}})}
    [claim_4] = [c for c in evaluate_claims(tasks) if c["number"] == 4]
    assert claim_4["verdict"] == "not supported"


def test_claim_5_times_convergence_against_adam():
    adam = _optimizer([_run([2.0, 1.0, 0.5, 0.4, 0.4], {"m": 0.4})])
    fast = _optimizer([_run([2.0, 0.8, 0.5, 0.4, 0.4], {"m": 0.4})])
    slow = _optimizer([_run([2.0, 1.8, 1.4, 0.9, 0.4], {"m": 0.4})])
    # Target: 2 + 0.9 * (0.4 - 2) = 0.56; Adam reaches it at step 20, slow at step 40.
    tasks = {"digits": _task({"adam": adam, "adagrad": adam, **{n: fast for n in RMSPROP_VARIANTS}})}
    assert [c["verdict"] for c in evaluate_claims(tasks) if c["number"] == 5] == ["not supported"]
    tasks["seed-mlp"] = _task({"adam": adam, "adagrad": adam, **{n: slow for n in RMSPROP_VARIANTS}})
    assert [c["verdict"] for c in evaluate_claims(tasks) if c["number"] == 5] == ["supported"]


# --- runner and optimizers --------------------------------------------------------------


def test_best_lr_skips_diverged_runs():
    runs = [
        {"lr": 0.1, "diverged": True, "final": {"m": 0.01}},
        {"lr": 0.01, "diverged": False, "final": {"m": 0.5}},
        {"lr": 0.001, "diverged": False, "final": {"m": 0.7}},
    ]
    assert best_lr(runs, "m") == 0.01
    assert best_lr([{**run, "diverged": True} for run in runs], "m") == 0.001


def test_tuning_grows_the_grid_past_the_best_end():
    task, spec = task_by_name("seed-mlp"), optimizer_spec("adam")

    def fake_train(task, spec, lr, seed, extra=False):
        # The score falls with lr up to 0.1: the grid (1e-4..3e-2) must grow upwards.
        return {"lr": lr, "seed": seed, "diverged": False, "final": {"train_mse": abs(math.log10(lr) + 1)}}

    grid, tuning = _tune(task, spec, False, fake_train)
    assert grid == [*spec.lr_grid, 0.1, 0.3][: len(spec.lr_grid) + MAX_GRID_EXTENSIONS]
    assert [run["lr"] for run in tuning] == grid
    assert best_lr(tuning, "train_mse") == 0.1
    grid, _ = _tune(task, spec, True, fake_train)
    assert grid == list(spec.quick_grid)


def test_next_lr_steps_along_the_log_grid():
    assert [next_lr(lr) for lr in (1e-3, 3e-3, 0.1, 0.3)] == [3e-3, 1e-2, 0.3, 1.0]
    assert [next_lr(lr, up=False) for lr in (1e-3, 3e-3, 0.1, 0.3)] == [3e-4, 1e-3, 3e-2, 0.1]


def test_a_huge_learning_rate_diverges():
    run = train(task_by_name("seed-mlp"), optimizer_spec("sgd-momentum"), 100.0, seed=0, quick=True)
    assert run["diverged"]
    run = train(task_by_name("seed-mlp"), optimizer_spec("rmsprop-pytorch"), 0.01, seed=0, quick=True)
    assert not run["diverged"] and run["final"]["train_mse"] < run["curves"]["train_mse"][0]


def test_runs_are_reproducible_from_the_seed():
    task, spec = task_by_name("digits"), optimizer_spec("rmsprop-hinton")
    first, second = (train(task, spec, 0.003, seed=2, quick=True) for _ in range(2))
    assert first["curves"] == second["curves"] and first["final"] == second["final"]


def test_lr_grids_are_log_spaced():
    for spec in OPTIMIZERS:
        ratios = np.diff(np.log10(spec.lr_grid))
        assert len(spec.lr_grid) == 6 and np.allclose(ratios, 0.5, atol=0.03)
        assert spec.quick_grid == spec.lr_grid[2:5]


def test_rmsprop_variants_build_our_optimizer_with_their_preset():
    params = [torch.zeros(1, requires_grad=True)]
    hinton = optimizer_spec("rmsprop-hinton").build(params, 0.5)
    assert hinton.defaults["alpha"] == 0.9 and hinton.defaults["eps_in_sqrt"] and hinton.defaults["lr"] == 0.5
    centered = optimizer_spec("rmsprop-centered-momentum").build(params, 0.5)
    assert centered.defaults["centered"] and centered.defaults["momentum"] == 0.9


# --- tasks ----------------------------------------------------------------------------


def test_digits_splits_are_disjoint_and_complete():
    splits = _digits_splits()
    sizes = {name: len(y) for name, (_, y) in splits.items()}
    assert sizes == {"train": 1078, "val": 359, "test": 360}
    rows = {tuple(row.tolist()) for x, _ in splits.values() for row in x}
    assert len(rows) > 1700  # a few digits are exact duplicates in the data set itself


def test_char_lstm_text_and_uniform_model():
    codes, vocabulary_size = _pydoc_text()
    assert len(codes) > 400_000 and 80 < vocabulary_size < 200
    problem = CharLSTM(0)
    # A model that predicts every character with equal probability scores log2(V) bits/char.
    with torch.no_grad():
        problem.model.head.weight.zero_()
        problem.model.head.bias.zero_()
        figures = {**problem.final_metrics(), "curve_bpc": problem.evaluate()["val_bpc"]}
    assert figures["val_bpc"] == pytest.approx(math.log2(vocabulary_size), rel=1e-6)
    assert figures["test_bpc"] == pytest.approx(math.log2(vocabulary_size), rel=1e-6)
    assert figures["curve_bpc"] == pytest.approx(math.log2(vocabulary_size), rel=1e-6)


def test_drift_target_jumps_on_schedule():
    assert Drift.jump_schedule(3000) == (1000, 2000)
    problem = Drift(seed=0, steps=30)
    targets = []
    for step in range(1, 31):
        problem.training_loss(step)
        targets.append(problem.target.clone())
    moves = [float((b - a).norm()) for a, b in zip(targets, targets[1:])]
    jumps = [step for step, move in zip(range(2, 31), moves) if move > 0.5]
    assert jumps == [10, 20]
    # Between jumps the walk moves by about drift * sqrt(d) per step.
    assert np.median(moves) == pytest.approx(Drift.drift * math.sqrt(Drift.dimension), rel=0.5)
