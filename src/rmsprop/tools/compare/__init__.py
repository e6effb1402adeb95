"""``rmsprop compare``: RMSProp's claims put to the test on real tasks, with plots.

>>> from rmsprop.tools.compare import compare
>>> results = compare(["digits", "drift"], out_dir="out", quick=True)   # doctest: +SKIP

:mod:`~rmsprop.tools.compare.problems` and :mod:`~rmsprop.tools.compare.cartpole` hold
the training problems, :mod:`~rmsprop.tools.compare.tasks` the tasks built on them,
:mod:`~rmsprop.tools.compare.optimizers` the optimizers and their lr grids,
:mod:`~rmsprop.tools.compare.runner` the tuning protocol, :mod:`~rmsprop.tools.compare.claims`
the verdict rules, and :mod:`~rmsprop.tools.compare.report` and
:mod:`~rmsprop.tools.compare.plots` the outputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rmsprop.tools.compare.claims import evaluate_claims
from rmsprop.tools.compare.tasks import TASKS

__all__ = ["TASK_NAMES", "compare", "write_outputs"]

TASK_NAMES = tuple(task.name for task in TASKS)


def compare(
    task_names: Iterable[str] = TASK_NAMES,
    *,
    out_dir: str | Path,
    quick: bool = False,
    seeds: int | None = None,
    workers: int | None = None,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Run the study and write ``report.md``, ``results.json`` and PNG plots to ``out_dir``.

    ``seeds`` overrides each task's number of final seeds (3 or 5; 1 with
    ``quick``); ``workers`` is the number of worker processes (default: one
    per CPU core). Returns the results (the content of ``results.json``, with
    the verdicts under ``"claims"``).
    """
    from rmsprop.tools.compare.report import write_json
    from rmsprop.tools.compare.runner import run_study

    out = Path(out_dir)
    results = run_study(task_names, quick=quick, seeds=seeds, workers=workers, show_progress=show_progress)
    out.mkdir(parents=True, exist_ok=True)
    # The runs first: an error in the verdicts or plots must not lose them.
    write_json(results, out / "results.json")
    return write_outputs(results, out)


def write_outputs(results: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Judge the claims of a study's ``results`` and write ``report.md``, ``results.json`` and the plots.

    ``results`` is what :func:`compare` returns or ``results.json`` holds;
    the verdicts are recomputed from its runs. Returns it with the verdicts.
    """
    from rmsprop.tools.compare.plots import write_plots
    from rmsprop.tools.compare.report import render_report, write_json

    out = Path(out_dir)
    results = {**results, "claims": evaluate_claims(results["tasks"])}
    plots = {path.stem: path.name for path in write_plots(results["tasks"], out)}
    (out / "report.md").write_text(render_report(results, plots))
    write_json(results, out / "results.json")
    return results
