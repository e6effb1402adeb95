"""`rmsprop compare`: the end-to-end smoke run, the verdict rules, the runner, the tasks and their problems."""

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

from rmsprop.tools.cli import main
from rmsprop.tools.compare import TASK_NAMES, compare, write_outputs
from rmsprop.tools.compare import runner
from rmsprop.tools.compare.cartpole import CartPoleA2C
from rmsprop.tools.compare.claims import (
    CLAIMS,
    beats,
    evaluate_claims,
    lr_sensitivity,
    phase_summary,
    steps_to_target,
)
from rmsprop.tools.compare.optimizers import OPTIMIZERS, RMSPROP_VARIANTS, next_lr, optimizer_spec
from rmsprop.tools.compare.plots import SENSITIVITY_PLOT
from rmsprop.tools.compare.problems import (
    Adding,
    CharLSTM,
    DigitsCNN,
    Drift,
    adding_batch,
    adding_held_out,
    digits_splits,
    pydoc_text,
)
from rmsprop.tools.compare.runner import MAX_GRID_EXTENSIONS, RunRequest, best_lr, train
from rmsprop.tools.compare.tasks import task_by_name

VERDICTS = ("supported", "not supported", "mixed")
CLAIM_NUMBERS = list(CLAIMS)

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
    expected = {"report.md", "results.json", f"{SENSITIVITY_PLOT}.png", *(f"{name}.png" for name in TASK_NAMES)}
    assert {path.name for path in out.iterdir()} == expected
    for number in CLAIM_NUMBERS:
        assert re.search(rf"^Claim {number}: (supported|not supported|mixed) \(\d+/\d+ checks held\)$", stdout, re.M)


@pytest.mark.slow
def test_quick_run_plots_are_images(quick_run):
    out = quick_run[0]
    for name in (*TASK_NAMES, SENSITIVITY_PLOT):
        with Image.open(out / f"{name}.png") as image:
            image.verify()
        pixels = matplotlib.image.imread(out / f"{name}.png")
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
        # Not a blank canvas: the curves put colour on it.
        assert pixels[..., :3].std() > 0.05


@pytest.mark.slow
def test_quick_run_report_has_a_verdict_for_each_claim(quick_run):
    report = (quick_run[0] / "report.md").read_text()
    for number in CLAIM_NUMBERS:
        row = re.search(rf"^\| {number} \| .+ \| \*\*(supported|not supported|mixed)\*\* \|", report, re.MULTILINE)
        assert row, f"no verdict row for claim {number}"
        assert re.search(rf"^### Claim {number}: (supported|not supported|mixed)$", report, re.MULTILINE)
    assert report.count("Why this verdict could be wrong:") == len(CLAIM_NUMBERS)
    assert "Quick smoke run" in report and re.search(r"Wall time \*\*\d+ s", report)
    for name in (*TASK_NAMES, SENSITIVITY_PLOT):
        assert f"]({name}.png)" in report
    assert "| optimizer | tuned lr | step size early |" in report  # claim 1's phase table


@pytest.mark.slow
def test_quick_run_results_json(quick_run):
    results = json.loads((quick_run[0] / "results.json").read_text())
    meta = results["meta"]
    assert meta["quick"] is True and meta["seeds"] == {name: 1 for name in TASK_NAMES}
    assert meta["runs"] > 0 and meta["run_cpu_seconds"] > 0 and meta["workers"] >= 1
    assert set(results["tasks"]) == set(TASK_NAMES)
    for name, task in results["tasks"].items():
        spec_task = task_by_name(name)
        assert set(task["optimizers"]) == set(spec_task.optimizers)
        for opt_name, optimizer in task["optimizers"].items():
            if spec_task.tune_around:
                centre = results["tasks"][spec_task.tune_around]["optimizers"][opt_name]["best_lr"]
                assert optimizer["grid_centre"] == centre
                assert optimizer["lr_grid"] == [next_lr(centre, up=False), centre, next_lr(centre)]
            else:
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
    assert [claim["number"] for claim in results["claims"]] == CLAIM_NUMBERS
    for claim in results["claims"]:
        assert claim["verdict"] in VERDICTS
        assert claim["evidence"] and claim["rule"] and claim["caveats"]
        checks = claim["checks"]
        expected = "supported" if all(checks) else "not supported" if not any(checks) else "mixed"
        assert claim["verdict"] == expected


@pytest.mark.slow
def test_progress_bar_is_quiet_when_stderr_is_not_a_terminal(quick_run):
    assert quick_run[3] == ""


@pytest.mark.slow
def test_outputs_can_be_rewritten_from_results_json(quick_run, tmp_path):
    results = json.loads((quick_run[0] / "results.json").read_text())
    rewritten = write_outputs(results, tmp_path)
    assert [c["verdict"] for c in rewritten["claims"]] == [c["verdict"] for c in results["claims"]]
    assert {path.name for path in tmp_path.iterdir()} == {path.name for path in quick_run[0].iterdir()}

    def verdict_rows(report):
        return [line for line in report.splitlines() if re.match(r"\| \d \|", line)]

    assert verdict_rows((tmp_path / "report.md").read_text()) == verdict_rows((quick_run[0] / "report.md").read_text())


def test_progress_bar_shows_when_asked(tmp_path):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        compare(["seed-mlp"], out_dir=tmp_path, quick=True, workers=1, show_progress=True)
    assert re.search(r"\d+/\d+ \[", stderr.getvalue())


@pytest.mark.slow
def test_worker_processes_give_the_runs_of_one_process(tmp_path):
    inline = runner.run_study(["digits"], quick=True, seeds=2, workers=1)
    spread = runner.run_study(["digits"], quick=True, seeds=2, workers=2)
    for name, optimizer in inline["tasks"]["digits"]["optimizers"].items():
        other = spread["tasks"]["digits"]["optimizers"][name]
        for a, b in zip(optimizer["tuning"] + optimizer["runs"], other["tuning"] + other["runs"]):
            assert a["curves"] == b["curves"] and a["final"] == b["final"]


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["compare", "--task", "mnist", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="Unknown task 'mnist'"):
        compare(["mnist"], out_dir=tmp_path)


@pytest.mark.parametrize("flag", ["--seeds", "--workers"])
def test_cli_refuses_non_positive_counts(tmp_path, flag, capsys):
    with pytest.raises(SystemExit):
        main(["compare", flag, "0", "--out", str(tmp_path)])
    assert "must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("seeds", [0, -1, 1.5, True])
def test_invalid_seeds(tmp_path, seeds):
    with pytest.raises(ValueError, match="seeds must be a positive integer"):
        compare(["seed-mlp"], out_dir=tmp_path, seeds=seeds)


@pytest.mark.parametrize("workers", [0, 2.0, False])
def test_invalid_workers(tmp_path, workers):
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        compare(["seed-mlp"], out_dir=tmp_path, workers=workers)


@pytest.mark.slow
def test_one_task_leaves_the_other_claims_untested(tmp_path):
    results = compare(["drift"], out_dir=tmp_path, quick=True, seeds=2, workers=1)
    verdicts = {claim["number"]: claim["verdict"] for claim in results["claims"]}
    assert verdicts[1] == verdicts[3] == verdicts[5] == "not tested"
    assert verdicts[2] in VERDICTS and verdicts[4] in VERDICTS and verdicts[6] in VERDICTS
    expected = {"report.md", "results.json", "drift.png", f"{SENSITIVITY_PLOT}.png"}
    assert {path.name for path in tmp_path.iterdir()} == expected
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


def _run(curve, final, step_sizes=None, diverged=False, lr=0.01, seed=1, every=10):
    steps = list(range(0, every * len(curve), every))
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


def _task(optimizers, metric="m", higher_is_better=False, log_scale=False, steps=None, log_every=10):
    return {
        "metric": metric,
        "curve_metric": "m",
        "higher_is_better": higher_is_better,
        "log_scale": log_scale,
        "steps": steps,
        "log_every": log_every,
        "optimizers": optimizers,
    }


def _optimizer(runs, tuning=None, best_lr=0.01):
    return {"runs": runs, "tuning": tuning if tuning is not None else runs, "best_lr": best_lr}


def _verdict(tasks, number):
    [claim] = [c for c in evaluate_claims(tasks) if c["number"] == number]
    return claim


def test_phase_summary_averages_the_log_points_before_each_boundary():
    # 120 steps logged every 10: boundaries 0, 40, 80, 120; a window of 120/12 = 10 steps = one log point.
    curve = [10.0 - 0.05 * step for step in range(0, 130, 10)]
    sizes = [float(k) for k in range(12, 0, -1)]  # logged at steps 10..120
    task = _task({}, steps=120)
    summary = phase_summary(task, _optimizer([_run(curve, {"m": curve[-1]}, sizes)]))
    assert summary["bounds"] == [0, 40, 80, 120]
    assert summary["early"]["progress"] == pytest.approx([2.0])  # 10 - 8
    assert summary["late"]["progress"] == pytest.approx([2.0])  # 6 - 4
    assert summary["early"]["step_size"] == pytest.approx([np.mean([12, 11, 10, 9])])
    assert summary["late"]["step_size"] == pytest.approx([np.mean([4, 3, 2, 1])])


def test_claim_1_compares_step_sizes_and_late_progress():
    steps = 120
    shrinking = [1.0 / math.sqrt(k) for k in range(1, 13)]  # late/middle ratio ~0.75
    flat = [1.0] * 12

    def tasks(variant_sizes, variant_curve):
        adagrad_curve = [6.0 - 3.0 * (1 - math.exp(-k / 2)) for k in range(13)]  # flat by the late phase
        runs = {
            "adagrad": [_run(adagrad_curve, {"m": adagrad_curve[-1]}, shrinking, seed=s) for s in (1, 2, 3)],
            "variant": [
                _run([v - 0.01 * s for v in variant_curve], {"m": variant_curve[-1]}, variant_sizes, seed=s)
                for s in (1, 2, 3)
            ],
        }
        optimizers = {"adagrad": _optimizer(runs["adagrad"])}
        optimizers |= {name: _optimizer(runs["variant"]) for name in RMSPROP_VARIANTS}
        return {"char-lstm-long": _task(optimizers, steps=steps)}

    still_learning = [6.0 - 0.25 * k for k in range(13)]
    assert _verdict(tasks(flat, still_learning), 1)["verdict"] == "supported"
    # The same progress with a shrinking step size: the claim's mechanism is not there.
    assert _verdict(tasks(shrinking, still_learning), 1)["verdict"] == "not supported"
    # A flat step size but no more late progress than Adagrad.
    plateaued = [6.0 - 3.0 * (1 - math.exp(-k / 2)) for k in range(13)]
    assert _verdict(tasks(flat, plateaued), 1)["verdict"] == "not supported"


def _drift_like(values, name="drift", higher_is_better=False):
    optimizers = {
        opt: _optimizer([_run([1.0, 0.5] if not higher_is_better else [10, 400], {"m": v}, seed=s)
                         for s, v in enumerate(vs, 1)])
        for opt, vs in values.items()
    }
    return {name: _task(optimizers, higher_is_better=higher_is_better)}


def test_claim_2_and_4_from_tracking_errors():
    base = {"adagrad": [0.5, 0.52, 0.48], "sgd-momentum": [0.2, 0.21, 0.19], "adam": [0.3, 0.3, 0.3]}
    good = {name: [0.21, 0.2, 0.22] for name in RMSPROP_VARIANTS}
    claims = {c["number"]: c for c in evaluate_claims(_drift_like({**base, **good}))}
    assert claims[2]["verdict"] == "supported"  # mean 0.21 <= 1.1 * 0.2
    assert claims[4]["verdict"] == "supported"
    mixed = {**good, RMSPROP_VARIANTS[0]: [0.3, 0.31, 0.29]}  # beats Adagrad but 1.5x the best
    claims = {c["number"]: c for c in evaluate_claims(_drift_like({**base, **mixed}))}
    assert claims[2]["verdict"] == "mixed" and claims[2]["held"] == "2/3"
    assert claims[4]["verdict"] == "supported"
    worse = {name: [0.6, 0.62, 0.61] for name in RMSPROP_VARIANTS}
    claims = {c["number"]: c for c in evaluate_claims(_drift_like({**base, **worse}))}
    assert claims[2]["verdict"] == claims[4]["verdict"] == "not supported"
    untested = {c["number"]: c["verdict"] for c in evaluate_claims(_drift_like({**base, **good}))}
    assert untested[1] == untested[3] == untested[5] == "not tested"


def test_higher_is_better_figures_are_compared_the_right_way_round():
    base = {"adagrad": [200.0, 220.0, 180.0], "sgd-momentum": [480.0, 490.0, 470.0], "adam": [300.0] * 3}
    high = {name: [470.0, 480.0, 475.0] for name in RMSPROP_VARIANTS}  # within 10% of 480, above Adagrad
    low = {name: [100.0, 120.0, 110.0] for name in RMSPROP_VARIANTS}
    assert _verdict(_drift_like({**base, **high}, "cartpole-a2c", True), 2)["verdict"] == "supported"
    assert _verdict(_drift_like({**base, **high}, "cartpole-a2c", True), 4)["verdict"] == "supported"
    assert _verdict(_drift_like({**base, **low}, "cartpole-a2c", True), 2)["verdict"] == "not supported"
    runs = [{"lr": 0.1, "diverged": False, "final": {"m": 100.0}}, {"lr": 0.2, "diverged": False, "final": {"m": 400.0}}]
    assert best_lr(runs, "m", higher_is_better=True) == 0.2


def test_claim_3_needs_the_adding_problem_solved():
    lstm = {"adagrad": [2.0, 2.0, 2.0], "adam": [1.9, 1.9, 1.9], **{n: [1.92, 1.93, 1.91] for n in RMSPROP_VARIANTS}}
    adding = {"adagrad": [0.17] * 3, "adam": [0.001] * 3, **{n: [0.002, 0.004, 0.003] for n in RMSPROP_VARIANTS}}
    tasks = {**_drift_like(lstm, "char-lstm"), **_drift_like(adding, "adding")}
    assert _verdict(tasks, 3)["verdict"] == "supported"
    adding[RMSPROP_VARIANTS[1]] = [0.002, 0.17, 0.003]  # one seed stuck at the mean predictor
    tasks = {**_drift_like(lstm, "char-lstm"), **_drift_like(adding, "adding")}
    assert _verdict(tasks, 3)["held"] == "5/6"


def test_claim_4_counts_diverged_grid_runs():
    adagrad = _optimizer([_run([1.0, 0.5], {"m": 0.5})], tuning=[_run([1.0, 0.5], {"m": 0.5})])
    unstable = _optimizer(
        [_run([1.0, 0.1], {"m": 0.1})],
        tuning=[_run([1.0, 0.1], {"m": 0.1}), _run([1.0, math.nan], {"m": math.nan}, diverged=True)],
    )
    tasks = {"digits": _task({"adagrad": adagrad, "adam": adagrad, **{n: unstable for n in RMSPROP_VARIANTS}})}
    assert _verdict(tasks, 4)["verdict"] == "not supported"


def test_claim_5_times_convergence_against_adam():
    adam = _optimizer([_run([2.0, 1.0, 0.5, 0.4, 0.4], {"m": 0.4})])
    fast = _optimizer([_run([2.0, 0.8, 0.5, 0.4, 0.4], {"m": 0.4})])
    slow = _optimizer([_run([2.0, 1.8, 1.4, 0.9, 0.4], {"m": 0.4})])
    # Target: 2 + 0.9 * (0.4 - 2) = 0.56; Adam reaches it at step 20, slow at step 40.
    tasks = {"digits": _task({"adam": adam, "adagrad": adam, **{n: fast for n in RMSPROP_VARIANTS}})}
    assert _verdict(tasks, 5)["verdict"] == "not supported"
    tasks["seed-mlp"] = _task({"adam": adam, "adagrad": adam, **{n: slow for n in RMSPROP_VARIANTS}})
    assert _verdict(tasks, 5)["verdict"] == "supported"


def _grid(finals, lrs, untrained=1.0):
    tuning = [_run([untrained, v], {"m": v}, lr=lr, seed=0) for lr, v in zip(lrs, finals)]
    return _optimizer(tuning[:1], tuning=tuning)


def test_lr_sensitivity_width_of_the_good_range():
    lrs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    # Linear progress from 1.0: 0.1, 0.5, 0.92, 1.0, 0.3 of the best (0.5 -> 0.5 progress = 1.0).
    entry = lr_sensitivity(_task({}), _grid([0.95, 0.75, 0.54, 0.5, 0.85], lrs))
    assert entry["fraction"] == pytest.approx([0.1, 0.5, 0.92, 1.0, 0.3])
    assert entry["good"] == [1e-3, 3e-3]
    assert entry["width"] == pytest.approx(math.log10(3)) and not entry["at_edge"]
    # Log scale: 1 -> 1e-3 is the best (3 decades); 1e-2.8 makes 93% of it; a diverged run is a gap.
    entry = lr_sensitivity(_task({}, log_scale=True), _grid([10**-2.8, 1e-3, 0.5, 2.0], lrs[:4]))
    assert entry["good"] == [1e-4, 3e-4] and entry["at_edge"]
    grid = _grid([0.5, 0.6], lrs[:2])
    grid["tuning"][1]["diverged"] = True
    assert math.isnan(lr_sensitivity(_task({}), grid)["fraction"][1])


def test_claim_6_holds_when_no_lr_is_good_everywhere():
    lrs = [1e-3, 3e-3, 1e-2]

    def tasks(variant_finals):
        out = {}
        for name, finals in zip(("digits", "adding"), variant_finals):
            optimizers = {"adagrad": _grid([0.5, 0.5, 0.5], lrs), "adam": _grid([0.5, 0.5, 0.5], lrs)}
            optimizers |= {variant: _grid(finals, lrs) for variant in RMSPROP_VARIANTS}
            out[name] = _task(optimizers)
        return out

    # The best lr moves from 1e-3 to 1e-2 between the tasks, and nothing else is good: holds.
    assert _verdict(tasks([[0.5, 0.9, 0.95], [0.95, 0.9, 0.5]]), 6)["verdict"] == "supported"
    # 3e-3 is good on both: the lr needs no choosing across these tasks.
    claim = _verdict(tasks([[0.5, 0.52, 0.95], [0.95, 0.52, 0.5]]), 6)
    assert claim["verdict"] == "not supported"
    assert any(line.startswith("adam:") and "good on 2/2" in line for line in claim["evidence"])


# --- runner and optimizers --------------------------------------------------------------


def _drive(study, fake_train):
    """Run a study generator to its end with ``fake_train``; the result and the requests, batch by batch."""
    batches, sent = [], None
    try:
        while True:
            requests = study.send(sent)
            batches.append(requests)
            sent = [fake_train(request) for request in requests]
    except StopIteration as stop:
        return stop.value, batches


def _fake_run(best: dict[str, float]):
    """Runs whose final figure is the distance in decades from the task's best lr ``best[task]``."""

    def fake(request):
        score = abs(math.log10(request.lr / best[request.task]))
        return {"lr": request.lr, "seed": request.seed, "diverged": False, "final": {"train_mse": score, "val_bpc": score}}

    return fake


def test_best_lr_skips_diverged_runs():
    runs = [
        {"lr": 0.1, "diverged": True, "final": {"m": 0.01}},
        {"lr": 0.01, "diverged": False, "final": {"m": 0.5}},
        {"lr": 0.001, "diverged": False, "final": {"m": 0.7}},
    ]
    assert best_lr(runs, "m") == 0.01
    assert best_lr([{**run, "diverged": True} for run in runs], "m") == 0.001
    assert best_lr(runs, "m", higher_is_better=True) == 0.001


def test_tuning_grows_the_grid_past_the_best_end():
    task, spec = task_by_name("seed-mlp"), optimizer_spec("adam")
    # The score falls with lr up to 0.3: the grid (1e-4..3e-2) grows upwards, at most twice.
    result, batches = _drive(runner._study(task, spec, False, 5), _fake_run({"seed-mlp": 1.0}))
    assert result["lr_grid"] == [*spec.lr_grid, 0.1, 0.3][: len(spec.lr_grid) + MAX_GRID_EXTENSIONS]
    assert [run["lr"] for run in result["tuning"]] == result["lr_grid"]
    assert result["best_lr"] == 0.3 and result["best_lr_at_grid_edge"]
    assert [len(batch) for batch in batches] == [len(spec.lr_grid), 1, 1, 5]
    assert [request.extra for batch in batches[1:3] for request in batch] == [True, True]
    assert [request.seed for request in batches[-1]] == [1, 2, 3, 4, 5]
    result, _ = _drive(runner._study(task, spec, True, 1), _fake_run({"seed-mlp": 1.0}))
    assert result["lr_grid"] == list(spec.quick_grid)


def test_a_long_task_is_tuned_around_the_short_tasks_lr():
    long_task, spec = task_by_name("char-lstm-long"), optimizer_spec("adagrad")
    result, batches = _drive(runner._study(long_task, spec, False, 3), _fake_run({"char-lstm": 0.1, "char-lstm-long": 1.0}))
    assert {request.task for request in batches[0]} == {"char-lstm"}
    assert result["grid_centre"] == 0.1
    # Around 0.1, then grown twice upwards while the best lr (1.0) sat at the end.
    assert result["lr_grid"] == [0.03, 0.1, 0.3, 1.0, 3.0]
    assert result["best_lr"] == 1.0 and not result["best_lr_at_grid_edge"]


def test_the_scheduler_trains_each_shared_run_once(monkeypatch):
    trained = []

    def fake_train(request, quick):
        trained.append(request.key(quick))
        return _fake_run({"char-lstm": 0.01, "char-lstm-long": 0.01})(request) | {"cpu_seconds": 0.0}

    monkeypatch.setattr(runner, "_train_request", fake_train)
    studies = {
        (task, "adagrad"): runner._study(task_by_name(task), optimizer_spec("adagrad"), False, 3)
        for task in ("char-lstm", "char-lstm-long")
    }
    bar = runner.tqdm(disable=True, total=0)
    finished = runner._Scheduler(False, 1, bar).run(studies)
    assert len(trained) == len(set(trained))
    short, long = finished[("char-lstm", "adagrad")], finished[("char-lstm-long", "adagrad")]
    assert long["grid_centre"] == short["best_lr"] == 0.01
    # 6 grid runs (shared) + 3 seeds of char-lstm; 3 grid runs + 3 seeds of char-lstm-long.
    assert len(trained) == len(optimizer_spec("adagrad").lr_grid) + 3 + 3 + 3


def test_run_requests_share_runs_only_for_the_same_problem_and_budget():
    assert RunRequest("char-lstm", "adam", 0.01, 0).key(False) != RunRequest("char-lstm-long", "adam", 0.01, 0).key(False)
    assert RunRequest("char-lstm", "adam", 0.01, 0).key(False) == RunRequest("char-lstm", "adam", 0.01, 0, True).key(False)


def test_next_lr_steps_along_the_log_grid():
    assert [next_lr(lr) for lr in (1e-3, 3e-3, 0.1, 0.3)] == [3e-3, 1e-2, 0.3, 1.0]
    assert [next_lr(lr, up=False) for lr in (1e-3, 3e-3, 0.1, 0.3)] == [3e-4, 1e-3, 3e-2, 0.1]


def test_a_huge_learning_rate_diverges():
    run = train(task_by_name("seed-mlp"), optimizer_spec("sgd-momentum"), 100.0, seed=0, quick=True)
    assert run["diverged"]
    run = train(task_by_name("seed-mlp"), optimizer_spec("rmsprop-pytorch"), 0.01, seed=0, quick=True)
    assert not run["diverged"] and run["final"]["train_mse"] < run["curves"]["train_mse"][0]


@pytest.mark.parametrize("name", ["digits", "digits-cnn", "adding", "cartpole-a2c"])
def test_runs_are_reproducible_from_the_seed(name):
    task, spec = task_by_name(name), optimizer_spec("rmsprop-hinton")
    first, second = (train(task, spec, 0.003, seed=2, quick=True) for _ in range(2))
    assert first["curves"] == second["curves"] and first["final"] == second["final"]
    third = train(task, spec, 0.003, seed=3, quick=True)
    assert third["curves"] != first["curves"]


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


# --- tasks and problems -------------------------------------------------------------------


def test_digits_splits_are_disjoint_and_complete():
    splits = digits_splits()
    sizes = {name: len(y) for name, (_, y) in splits.items()}
    assert sizes == {"train": 1078, "val": 359, "test": 360}
    rows = {tuple(row.tolist()) for x, _ in splits.values() for row in x}
    assert len(rows) > 1700  # a few digits are exact duplicates in the data set itself


def test_digits_cnn_learns_from_the_flat_images():
    problem = DigitsCNN(0)
    x, _ = problem.splits["val"]
    assert problem.model(x[:5]).shape == (5, 10)
    assert isinstance(problem.model[1], torch.nn.Conv2d)
    with torch.no_grad():
        untrained = problem.evaluate()["val_loss"]
    optimizer = torch.optim.Adam(problem.model.parameters(), lr=3e-3)
    for step in range(1, 201):
        optimizer.zero_grad()
        problem.training_loss(step).backward()
        optimizer.step()
    with torch.no_grad():
        figures = problem.evaluate()
    assert figures["val_loss"] < untrained / 3 and figures["val_accuracy"] > 0.8


def test_char_lstm_text_and_uniform_model():
    codes, vocabulary_size = pydoc_text()
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


def test_adding_sequences_mark_one_value_in_each_half():
    inputs, targets = adding_batch(64, 100, torch.Generator().manual_seed(0))
    assert inputs.shape == (64, 100, 2) and targets.shape == (64,)
    markers = inputs[..., 1].numpy()
    assert (markers.sum(axis=1) == 2).all()
    assert (markers[:, :50].sum(axis=1) == 1).all() and (markers[:, 50:].sum(axis=1) == 1).all()
    values = inputs[..., 0].numpy()
    expected = [values[row][markers[row] == 1].sum() for row in range(64)]
    np.testing.assert_allclose(targets.numpy(), expected, rtol=1e-6)


def test_adding_mean_predictor_scores_one_sixth():
    problem = Adding(0)
    # Var(u1 + u2) for independent U(0, 1) values is 2/12; a net whose output is the constant 1 scores it.
    with torch.no_grad():
        problem.model.head.weight.zero_()
        problem.model.head.bias.fill_(1.0)
        figures = problem.final_metrics()
    assert figures["val_mse"] == pytest.approx(1 / 6, rel=0.1) and figures["test_mse"] == pytest.approx(1 / 6, rel=0.1)
    assert adding_held_out(100, 1000) is problem.held_out  # one fixed set for every seed


def test_a2c_returns_stop_at_a_fallen_pole_and_bootstrap_past_the_time_limit():
    problem = CartPoleA2C(0, steps=10)
    n = problem.n_steps
    # Two environments. Env 0: the pole falls at t=1, t=2 is the vector env's reset step. Env 1: the time limit
    # ends an episode at t=3 (not terminated), t=4 is its reset step.
    values = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [5.0, 50.0], [6.0, 60.0]])
    rewards = [torch.ones(2) for _ in range(n)]
    rewards[2][0] = rewards[4][1] = 0.0
    terminated = [torch.tensor([t == 1, False]) for t in range(n)]
    valid = [torch.tensor([t != 2, t != 4]) for t in range(n)]
    returns = problem._returns(values, rewards, terminated, valid)
    g = problem.gamma
    # Env 0: t=4 bootstraps from V(s5)=6; t=3 from t=4; t=1 ends the episode: its return is its reward alone.
    assert returns[4, 0] == pytest.approx(1 + g * 6)
    assert returns[3, 0] == pytest.approx(1 + g * (1 + g * 6))
    assert returns[1, 0] == pytest.approx(1.0) and returns[0, 0] == pytest.approx(1 + g)
    # Env 1: t=3 bootstraps from the value of the state the time limit cut off (V(s4) = 50).
    assert returns[3, 1] == pytest.approx(1 + g * 50)
    assert returns[0, 1] == pytest.approx(1 + g + g**2 + g**3 * (1 + g * 50))


def test_a2c_rollouts_mask_the_reset_steps_and_evaluate_from_fixed_starts():
    problem = CartPoleA2C(0, steps=40)
    for step in range(1, 41):
        loss = problem.training_loss(step)
        assert torch.isfinite(loss)
    assert problem.finished_returns and all(1 <= r <= 500 for r in problem.finished_returns)
    with torch.no_grad():
        first, second = problem.evaluate()["eval_return"], problem.evaluate()["eval_return"]
        since = problem.evaluate()["episode_return"]
    assert first == second and 1 <= first <= 500  # greedy episodes from the same held-out starts
    assert math.isnan(since)  # no training episode ended since the previous log point


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


def test_every_task_names_known_optimizers_and_a_budget():
    for name in TASK_NAMES:
        task = task_by_name(name)
        assert all(optimizer_spec(opt) for opt in task.optimizers)
        assert task.budget.steps % task.budget.log_every == 0 and task.seeds >= 3
        if task.tune_around:
            assert set(task.optimizers) <= set(task_by_name(task.tune_around).optimizers)
