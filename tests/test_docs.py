"""The README and the site's sources: generated tables up to date, recipes shown from their tests.

``make docs`` (mkdocs --strict, in CI) fails on a broken link, a missing snippet or docstring;
these checks cover what a build cannot see.
"""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "tools" / "docs" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TABLES = _tables()
README = (ROOT / "README.md").read_text()


def test_readme_tables_are_generated_from_the_current_data():
    assert "<!-- table: presets -->" in README and "<!-- table: benchmark -->" in README
    assert TABLES.filled(README) == README, "README.md is stale: run .venv/bin/python tools/docs/tables.py"


def test_readme_opens_with_the_two_set_up_commands_and_stays_short():
    first_block = README.split("```")[1].strip().splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]
    assert len(README.splitlines()) < 200


def test_every_page_table_marker_names_a_known_table():
    for page in (ROOT / "docs").rglob("*.md"):
        for name in TABLES.MARKER.findall(page.read_text()):
            assert name[0] in TABLES.TABLES, f"{page}: unknown table {name[0]!r}"
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        TABLES.filled("<!-- table: nope -->\n")


def test_every_recipe_section_of_the_tests_is_shown_on_the_recipes_page():
    page = (ROOT / "docs" / "recipes.md").read_text()
    shown = set(re.findall(r'--8<-- "(tests/recipes/[\w.]+:[\w-]+)"', page))
    defined = {
        f"tests/recipes/{path.name}:{section}"
        for path in (ROOT / "tests" / "recipes").glob("test_*.py")
        for section in re.findall(r"# --8<-- \[start:([\w-]+)\]", path.read_text())
    }
    assert defined and shown == defined
