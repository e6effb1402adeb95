"""The tables the README and the site generate from the project's data instead of copying it.

Each table stands in a page below a marker line ``<!-- table: NAME -->`` and ends at the next
blank line. This module's mkdocs hook fills them in while the site builds;
``python tools/docs/tables.py`` rewrites them in README.md, and tests/test_docs.py checks that
README.md is up to date.

- ``presets``: :data:`rmsprop.PRESETS` and :data:`rmsprop.PRESET_SOURCES`;
- ``benchmark``: the latest run of ``rmsprop bench``, docs/benchmark.json, one row per case;
- ``benchmark-full``: the same run, every implementation (``rmsprop.tools.bench.markdown_table``);
- ``cli``: ``rmsprop --help`` and each command's help.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rmsprop import PRESET_SOURCES, PRESETS
from rmsprop.tools.bench import FUSED, TORCH_COMPILED, TORCH_FOREACH, TORCH_LOOP, markdown_table
from rmsprop.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
BENCHMARK_JSON = ROOT / "docs" / "benchmark.json"
README = ROOT / "README.md"
MARKER = re.compile(r"^<!-- table: ([a-z-]+) -->\n((?:.+\n)*)", re.MULTILINE)


def _setting(name: str, value: Any) -> str:
    if value is True:
        return name
    written = f"{value:g}".replace("e-0", "e-") if isinstance(value, float) else str(value)
    return f"{name} {written}"


def presets_table() -> str:
    lines = ["| preset | reproduces | settings |", "|---|---|---|"]
    for name, settings in PRESETS.items():
        written = ", ".join(_setting(key, value) for key, value in settings.items())
        lines.append(f"| `{name}` | {PRESET_SOURCES[name]} | {written} |")
    return "\n".join(lines)


def _benchmark() -> dict[str, Any]:
    return json.loads(BENCHMARK_JSON.read_text())


def benchmark_table(report: dict[str, Any] | None = None) -> str:
    """One row per case: the median step of torch's paths and of the fused one, and the ratios."""
    report = _benchmark() if report is None else report
    lines = [
        "| case (parameters in tensors) | torch for-loop ms | torch foreach ms | torch.compile ms (first call) | rmsprop fused ms "
        "| fused vs for-loop | fused vs foreach | fused / memory bound | fused / compile per round (rounds faster) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in report["cases"]:
        results = {result["implementation"]: result for result in case["results"]}
        fused = results[FUSED]
        compiled = results.get(TORCH_COMPILED)
        compiled_ms = f"{compiled['median_ms']:.1f} ({compiled['first_call_ms'] / 1e3:.1f} s)" if compiled else "-"
        pair = case.get("fused_vs_compiled")
        per_round = f"{pair['median_ratio']:.2f} ({pair['rounds_faster']}/{pair['rounds']})" if pair else "-"
        lines.append(
            f"| {case['case']} ({case['parameters'] / 1e6:.1f}M in {case['tensors']}) "
            f"| {results[TORCH_LOOP]['median_ms']:.1f} | {results[TORCH_FOREACH]['median_ms']:.1f} "
            f"| {compiled_ms} | {fused['median_ms']:.1f} | {fused['speedup_vs_torch_for_loop']:.1f}× "
            f"| {fused['speedup_vs_torch_foreach']:.1f}× | {fused['times_bound']:.2f}× | {per_round} |"
        )
    return "\n".join(lines)


def benchmark_full_table() -> str:
    return markdown_table(_benchmark())


def _help_texts() -> str:
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    sections = [("rmsprop --help", parser.format_help())]
    sections += [(f"rmsprop {name} --help", command.format_help()) for name, command in commands.choices.items()]
    return "\n".join(f"`{title}`\n\n```text\n{text.rstrip()}\n```\n" for title, text in sections).rstrip()


TABLES: dict[str, Callable[[], str]] = {
    "presets": presets_table,
    "benchmark": benchmark_table,
    "benchmark-full": benchmark_full_table,
    "cli": _help_texts,
}


def filled(markdown: str) -> str:
    """``markdown`` with every marked table generated anew; an unknown name is an error."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r} after a '<!-- table: -->' marker; known: {', '.join(TABLES)}")
        return f"<!-- table: {name} -->\n{TABLES[name]()}\n"

    return MARKER.sub(fill, markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """The mkdocs hook (mkdocs.yml: hooks): every page's marked tables, generated at build time."""
    return filled(markdown)


def main() -> int:
    """Rewrite README.md's marked tables from the data."""
    text = README.read_text()
    updated = filled(text)
    README.write_text(updated)
    print(f"{README.name}: {'rewritten' if updated != text else 'already up to date'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
