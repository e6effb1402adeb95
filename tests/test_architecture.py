"""The package's import graph: no cycle among its modules, function-level imports included, and every
import pointing down the layers of pyproject.toml's import-linter contract."""

import subprocess
import sys
from pathlib import Path

import grimp


def _cycle(graph: grimp.ImportGraph) -> list[str] | None:
    """One cycle of module imports in ``graph`` (its modules in order, the first repeated at the end), or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        path.append(module)
        on_path.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported in on_path:
                return path[path.index(imported) :] + [imported]
            if imported not in done:
                found = visit(imported)
                if found:
                    return found
        path.pop()
        on_path.discard(module)
        done.add(module)
        return None

    for module in sorted(graph.modules):
        if module not in done:
            found = visit(module)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    graph = grimp.ImportGraph()
    for module in ("pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"):
        graph.add_module(module)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.d")
    assert _cycle(graph) is None
    graph.add_import(importer="pkg.b", imported="pkg.c")
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert _cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


def test_the_package_has_no_import_cycle():
    graph = grimp.build_graph("rmsprop")
    assert len(graph.modules) > 30
    assert _cycle(graph) is None


def test_imports_follow_the_layers_of_the_contract():
    root = Path(__file__).parents[1]
    result = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--config", str(root / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout
