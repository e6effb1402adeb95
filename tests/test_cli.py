import argparse
import re

import pytest

from rmsprop import __version__
from rmsprop.tools.cli import build_parser, main


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


def test_build_kernel_says_where_the_kernel_comes_from(capsys):
    assert main(["build-kernel"]) == 0
    assert "fused CPU kernel installed with the package; instruction set" in capsys.readouterr().out


@pytest.fixture
def kernel_not_installed(monkeypatch, tmp_path):
    """An installation without the kernel, whose build directory is tmp_path."""
    from rmsprop.backends.cpu import kernel as cpu_kernel

    monkeypatch.setenv("RMSPROP_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_installed_spec", lambda: None)
    cpu_kernel._extension.cache_clear()
    yield
    cpu_kernel._extension.cache_clear()


def test_build_kernel_fails_clearly_without_a_compiler(capsys, monkeypatch, kernel_not_installed):
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert main(["build-kernel"]) == 1
    err = capsys.readouterr().err
    assert "the fused CPU kernel is not built" in err
    assert "the fused CPU kernel cannot be built here:" in err and "no-such-compiler" in err


@pytest.mark.slow
def test_build_kernel_builds_what_the_install_did_not_and_steps_load_it(capsys, kernel_not_installed, tmp_path):
    from rmsprop.backends.cpu import kernel as cpu_kernel

    assert cpu_kernel.kernel() is None
    assert main(["build-kernel"]) == 0
    assert f"built by `rmsprop build-kernel` in {cpu_kernel.build_directory()}" in capsys.readouterr().out
    assert cpu_kernel.build_directory().parent == tmp_path
    assert cpu_kernel.kernel() is not None


def _help_texts() -> list[str]:
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return [parser.format_help()] + [command.format_help() for command in commands.choices.values()]


def test_every_help_text_speaks_of_the_project_only():
    texts = _help_texts()
    assert len(texts) == 6
    for text in texts:
        assert not re.search(r"\b(issue|ticket|mission|session)", text, re.IGNORECASE), text
