"""The command line: every command has help with an example; mistakes give one-line errors."""

import subprocess
import sys

import pytest

from qsmnode.cli import build_parser, main

COMMANDS = ["serve", "process", "simulate", "demo", "jobs", "retry", "check-config", "echo", "send"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qsmnode.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "example" in result.stdout.lower()
    assert f"qsmnode {command}" in result.stdout


def test_wrong_option_is_one_line():
    result = run_cli("process", "--no-such-option", "x", "-o", "y")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--no-such-option" in result.stderr


def test_missing_input_is_one_line_not_a_traceback(tmp_path):
    result = run_cli("process", str(tmp_path / "absent"), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "absent" in result.stderr


def test_bad_matrix_is_explained():
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["simulate", "out", "--matrix", "96x96"])
    assert exit_info.value.code == 2


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "qsmnode" in capsys.readouterr().out
