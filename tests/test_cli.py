import argparse
import re

import pytest

from rmsprop import __version__
from rmsprop.cli import build_parser, main


def test_help_lists_the_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out


def test_bad_epochs_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_demo_runs_in_process(capsys):
    assert main(["demo", "--epochs", "3"]) == 0
    assert "Epoch [3/3]" in capsys.readouterr().out


def test_build_kernel_loads_the_kernel_and_says_where(capsys):
    from rmsprop import _cpp_kernels

    assert main(["build-kernel"]) == 0  # built now, or before
    assert main(["build-kernel"]) == 0
    out = capsys.readouterr().out.splitlines()[-1]
    assert out.startswith("loaded the fused CPU kernel, built before, in ")
    assert out.endswith(_cpp_kernels.module().__file__)


def test_build_kernel_says_when_it_builds(capsys, monkeypatch):
    from rmsprop import _cpp_kernels

    monkeypatch.setattr(_cpp_kernels, "is_built", lambda: False)
    assert main(["build-kernel"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"building the fused CPU kernel in {_cpp_kernels.build_directory()}")
    assert lines[1].startswith("built the fused CPU kernel in ")


def test_build_kernel_fails_clearly_without_a_compiler(capsys, monkeypatch):
    from rmsprop import _cpp_kernels

    monkeypatch.setattr(_cpp_kernels, "build_problem", lambda: "no C++ compiler ('x') on PATH")
    assert main(["build-kernel"]) == 1
    assert "no C++ compiler ('x') on PATH; the fused CPU path will use the numba kernel" in capsys.readouterr().err


def _help_texts() -> list[str]:
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return [parser.format_help()] + [command.format_help() for command in commands.choices.values()]


def test_every_help_text_speaks_of_the_project_only():
    texts = _help_texts()
    assert len(texts) == 6
    for text in texts:
        assert not re.search(r"\b(issue|ticket|mission|session)", text, re.IGNORECASE), text
