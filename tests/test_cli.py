import subprocess
import sys

import pytest

from moleflow.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("fit", "add-task", "evaluate", "predict", "demo", "grid", "report", "analyze"):
        assert name in COMMANDS and name in out


def test_console_script_runs():
    # The installed entry point, as a user calls it.
    exe = subprocess.run([sys.executable, "-m", "moleflow.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert exe.returncode == 0 and "add-task" in exe.stdout


def test_bad_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit"])  # CONFIG missing
    assert exc.value.code == 2
    assert "usage" in capsys.readouterr().err
