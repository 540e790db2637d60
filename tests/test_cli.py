"""The click layer: help for every command, one-line errors, JSON on stdout."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from cputune.cli import cli


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


def test_unknown_command_is_a_usage_error():
    r = CliRunner().invoke(cli, ["frobnicate"])
    assert r.exit_code == 2 and "No such command" in r.output and "Traceback" not in r.output


def test_build_list_json_is_one_document(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    r = CliRunner().invoke(cli, ["build", "--list", "--json"], catch_exceptions=False)
    doc = json.loads(r.stdout)
    assert doc["schema"] == "cputune.builds/1" and doc["builds"] == []
    assert doc["cputune_version"]
