"""The one ``mmkd`` command: every tool is a subcommand, the old ``python -m`` entry points are the same commands,
and bad input ends every one of them with the same one-line error."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from mmkd import cli
from tests.conftest import REPO


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=180)


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("zeroshot", "bias", "report", "export", "push"):
        assert f"  {name} " in out
    assert set(cli.COMMANDS) == {"zeroshot", "bias", "report", "export", "push"}


@pytest.mark.parametrize(
    "module, command",
    [("mmkd.eval.zeroshot", "zeroshot"), ("mmkd.eval.bias", "bias"), ("mmkd.report", "report"),
     ("mmkd.export", "export"), ("mmkd.push", "push")],
)
def test_python_m_entry_points_are_the_commands(module, command):
    proc = run("-m", module, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m {module}")
    # the same options as the subcommand's
    ours = importlib.import_module(cli.COMMANDS[command][0]).build_parser("x")
    for action in ours._actions:
        for flag in action.option_strings:
            assert flag in proc.stdout


def test_unknown_command_and_bad_input_are_one_line(tmp_path, capsys):
    assert cli.main(["distil"]) == 2
    assert capsys.readouterr().err.strip() == (
        "mmkd: error: unknown command 'distil' (commands: zeroshot, bias, report, export, push)"
    )
    assert cli.main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmkd export: error:") and "missing" in err[0]


def test_python_m_mmkd_is_the_console_script():
    proc = run("-m", "mmkd", "--help")
    assert proc.returncode == 0 and "commands:" in proc.stdout
