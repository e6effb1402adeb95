import pytest

from rmsprop import __version__
from rmsprop.cli import main


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
