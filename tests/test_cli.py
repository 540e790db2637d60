"""The click layer: help for every command, one-line errors, JSON on stdout."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cputune.cli import CputuneGroup, cli
from cputune.core.errors import ConfigError, EngineError, ModelError, NetworkError
from helpers import default_sigint


def all_commands():
    return sorted(cli.commands)


def test_help_lists_the_commands():
    r = CliRunner().invoke(cli, ["--help"], catch_exceptions=False)
    assert r.exit_code == 0
    for name in all_commands():
        assert name in r.output


@pytest.mark.parametrize("name", all_commands())
def test_every_command_has_help_text(name):
    cmd = cli.commands[name]
    assert cmd.help and len(cmd.help.strip()) > 20
    r = CliRunner().invoke(cli, [name, "-h"], catch_exceptions=False)
    assert r.exit_code == 0 and "Usage:" in r.output
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden:
            assert p.help, f"{name} {p.opts} has no help"


@pytest.mark.parametrize("name", all_commands())
def test_every_command_offers_json(name):
    opts = {o for p in cli.commands[name].params for o in getattr(p, "opts", [])}
    assert "--json" in opts


def test_bad_argument_is_one_line_without_traceback():
    r = CliRunner().invoke(cli, ["build", "--target-cpu", "zen9"])
    assert r.exit_code == 1
    assert r.output.splitlines()[0] == "Error: unknown --target-cpu 'zen9'"
    assert "hint: choose one of: native" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("error", [
    ConfigError("unknown --target-cpu 'zen9'", hint="choose one of: native"),
    ModelError("no model 'm' in the catalog", hint="pass a GGUF file"),
    EngineError("llama.cpp has not been built yet", hint="run `cputune build`"),
    NetworkError("port 8080 on 127.0.0.1 is already in use", hint="pick another with --port"),
], ids=lambda e: type(e).__name__)
def test_every_error_kind_is_one_line_and_exit_1(error):
    @click.group(cls=CputuneGroup)
    def group():
        pass

    @group.command()
    def go():
        raise error
    r = CliRunner().invoke(group, ["go"])
    assert (r.exit_code, r.output) == (1, f"Error: {error.message}\nhint: {error.hint}\n")


def test_an_engine_error_from_a_command_is_one_line():
    r = CliRunner().invoke(cli, ["build", "--engine", "ik"])
    assert r.exit_code == 1 and r.output.splitlines()[0] == "Error: unknown engine 'ik'"
    assert "hint: choose one of: llama.cpp" in r.output and "Traceback" not in r.output


def test_unknown_command_is_a_usage_error():
    r = CliRunner().invoke(cli, ["frobnicate"])
    assert r.exit_code == 2 and "No such command" in r.output and "Traceback" not in r.output


def test_build_list_json_is_one_document(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    r = CliRunner().invoke(cli, ["build", "--list", "--json"], catch_exceptions=False)
    doc = json.loads(r.stdout)
    assert doc["schema"] == "cputune.builds/1" and doc["builds"] == []
    assert doc["cputune_version"]


# --- interrupts, and outputs that are not files ------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent

# Runs `cputune plan --json` as the console script does, and sends SIG to itself once the import
# of cputune.cli reaches numpy (about 0.2 s in, before main() has run).
SIGNAL_WHILE_LOADING = """
import builtins, os, signal, sys
sys.argv = ["cputune", "plan", "--json"]
real_import = builtins.__import__
def hook(name, *args, **kwargs):
    if name == "numpy" and "numpy" not in sys.modules:
        os.kill(os.getpid(), signal.{sig})
    return real_import(name, *args, **kwargs)
builtins.__import__ = hook
from cputune.cli import main
main()
"""

# The same once the command runs: the library call raises as a signal would make it.
SIGNAL_IN_COMMAND = """
import os, signal, sys
sys.argv = ["cputune", "plan", "--json"]
from cputune.predict import selector
def plan(*args, **kwargs):
    os.kill(os.getpid(), signal.{sig})
    raise AssertionError("the signal did not arrive")
selector.plan = plan
from cputune.cli import main
main()
"""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), preexec_fn=default_sigint)


@pytest.mark.parametrize("sig, code, line", [("SIGINT", 130, "Interrupted."), ("SIGTERM", 143, "Terminated.")])
@pytest.mark.parametrize("script", [SIGNAL_WHILE_LOADING, SIGNAL_IN_COMMAND], ids=["loading", "command"])
def test_a_signal_anywhere_is_one_line_and_128_plus_its_number(script, sig, code, line):
    r = run_python(script.format(sig=sig))
    assert (r.returncode, r.stderr, r.stdout) == (code, line + "\n", "")


def test_an_inherited_ignored_sigint_stays_ignored():
    """Started with SIGINT ignored (`nohup cputune ... &` in a shell without job control), the
    command runs on through a SIGINT and finishes its work; SIGTERM still stops it."""
    import signal

    def ignore_sigint():
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    r = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_LOADING.format(sig="SIGINT")], capture_output=True,
                       text=True, timeout=120, check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       preexec_fn=ignore_sigint)
    assert r.returncode == 0 and r.stderr == "" and json.loads(r.stdout)["schema"]
    r = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_LOADING.format(sig="SIGTERM")], capture_output=True,
                       text=True, timeout=120, check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       preexec_fn=ignore_sigint)
    assert (r.returncode, r.stderr) == (143, "Terminated.\n")


def test_ctrl_c_in_a_command_under_clirunner_is_130(monkeypatch):
    from cputune.predict import selector

    def plan(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(selector, "plan", plan)
    r = CliRunner().invoke(cli, ["plan", "--json"])
    assert r.exit_code == 130 and r.output == "Interrupted.\n"


def test_output_closed_early_is_quiet():
    """`cputune plan | head -1`: no BrokenPipeError traceback, nor 'Exception ignored' at exit."""
    p = subprocess.Popen([sys.executable, "-m", "cputune", "plan", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    p.stdout.read(100)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(60) in (0, 1) and err == ""  # 0 when all of it fitted in the pipe before the close


def test_report_to_a_device_or_a_missing_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dev = Path("/dev/full")
    before = os.lstat(dev)
    r = CliRunner().invoke(cli, ["report", "--out", str(dev), "--no-charts"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "Error: /dev/full is a character device, not a file" in r.output
    after = os.lstat(dev)
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    r = CliRunner().invoke(cli, ["report", "--out", str(tmp_path / "no" / "r.html"), "--no-charts"])
    assert r.exit_code == 1 and f"Error: folder {tmp_path / 'no'} does not exist" in r.output
    assert not (tmp_path / "no").exists()
    (tmp_path / "r.html").symlink_to(tmp_path / "kept.html")
    r = CliRunner().invoke(cli, ["report", "--out", str(tmp_path / "r.html"), "--no-charts"])
    assert r.exit_code == 1 and "is a symbolic link" in r.output
    assert (tmp_path / "r.html").is_symlink() and not (tmp_path / "kept.html").exists()
