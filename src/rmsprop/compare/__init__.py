"""``rmsprop compare``: RMSProp's claims put to the test on real tasks, with plots.

>>> from rmsprop.compare import compare
>>> results = compare(["digits", "drift"], out_dir="out", quick=True)   # doctest: +SKIP

:mod:`~rmsprop.compare.tasks` holds the training problems,
:mod:`~rmsprop.compare.optimizers` the optimizers and their lr grids,
:mod:`~rmsprop.compare.runner` the tuning protocol, :mod:`~rmsprop.compare.claims`
the verdict rules, and :mod:`~rmsprop.compare.report` and
:mod:`~rmsprop.compare.plots` the outputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rmsprop.compare.claims import evaluate_claims
from rmsprop.compare.tasks import TASKS

__all__ = ["TASK_NAMES", "compare"]

TASK_NAMES = tuple(task.name for task in TASKS)


def compare(
    task_names: Iterable[str] = TASK_NAMES,
    *,
    out_dir: str | Path,
    quick: bool = False,
    seeds: int = 3,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Run the study and write ``report.md``, ``results.json`` and ``<task>.png`` to ``out_dir``.

    Returns the results (the content of ``results.json``, with the verdicts under ``"claims"``).
    """
    from rmsprop.compare.plots import write_plots
    from rmsprop.compare.report import render_report, write_json
    from rmsprop.compare.runner import run_study

    out = Path(out_dir)
    results = run_study(task_names, quick=quick, seeds=seeds, show_progress=show_progress)
    results["claims"] = evaluate_claims(results["tasks"])
    out.mkdir(parents=True, exist_ok=True)
    plots = {path.stem: path.name for path in write_plots(results["tasks"], out)}
    (out / "report.md").write_text(render_report(results, plots))
    write_json(results, out / "results.json")
    return results
