"""The files cputune reads back (machine.json, calibration.json, tuned.json, a hardware TOML,
config.toml, bench-history.jsonl) damaged or replaced by something that is not a file: each is one
line naming the file, never a traceback, a hang or a read without end (fault-injection run)."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
from click.testing import CliRunner

from cputune.cli import cli
from cputune.commands import report_file
from cputune.core import fsutil
from cputune.core.errors import ConfigError
from cputune.core.jsonio import read_json
from cputune.engine import bench
from cputune.model import modelfiles, resolve
from cputune.predict import hardware

HW_TOML = ('[cpu]\nmodel = "x"\nsockets = 1\ncores_per_socket = 8\n'
           '[memory]\nchannels_per_socket = 2\nmts = 5600\ndimm_gib = 32\n')


@pytest.fixture(autouse=True)
def own_dirs(tmp_path, monkeypatch):
    """A cache and a config folder of the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.delenv(modelfiles.ENV_VAR, raising=False)
    (tmp_path / "cache" / "cputune").mkdir(parents=True)
    (tmp_path / "cfg" / "cputune").mkdir(parents=True)


def fails(*args: str, env: dict | None = None) -> str:
    r = CliRunner().invoke(cli, list(args), env=env)
    assert r.exit_code == 1 and "Traceback" not in r.output and r.output.startswith("Error: "), r.output
    return r.output


def not_a_file(tmp_path, kind: str):
    """A path that is `kind`: a link to /dev/zero (endless zeros), a FIFO (open blocks), a folder."""
    p = tmp_path / f"thing-{kind}"
    if kind == "zero":
        p.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(p)
    else:
        p.mkdir()
    return p, {"zero": "a character device", "fifo": r"a FIFO \(named pipe\)", "dir": "a folder"}[kind]


# --- the one reader: fsutil.read_small_text ------------------------------------------------------

@pytest.mark.parametrize("kind", ["zero", "fifo", "dir"])
def test_small_text_refuses_what_is_not_a_regular_file_at_once(tmp_path, kind):
    p, what = not_a_file(tmp_path, kind)
    with pytest.raises(ConfigError, match=f"is {what}, not a file"):
        fsutil.read_small_text(p)


def test_small_text_caps_the_size_and_reads_proc_files_that_claim_nothing(tmp_path):
    p = tmp_path / "big.json"
    p.write_bytes(b" " * 101)
    with pytest.raises(ConfigError, match="larger than"):
        fsutil.read_small_text(p, limit=100)
    assert fsutil.read_small_text(p, limit=101) == " " * 101
    # /proc/self/status says 0 bytes in its stat; it is read to the end all the same.
    assert "Pid:" in fsutil.read_small_text("/proc/self/status")
    with pytest.raises(ConfigError, match="larger than"):  # and one that claims 0 is cut at the cap
        fsutil.read_small_text("/proc/self/status", limit=10)
    with pytest.raises(ConfigError, match=r"cannot read /proc/self/mem \(Input/output error\)"):
        fsutil.read_small_text("/proc/self/mem")  # EIO even as root


# --- 1. the JSON state files ----------------------------------------------------------------------

def test_deeply_nested_json_is_a_config_error(tmp_path):
    p = tmp_path / "calibration.json"
    p.write_text("[" * 200000)
    with pytest.raises(ConfigError, match="nested too deeply") as e:
        read_json(p)
    assert str(p) in e.value.message and e.value.hint


@pytest.mark.parametrize("kind", ["zero", "fifo"])
def test_a_state_file_that_is_a_device_or_fifo_is_refused_at_once(tmp_path, kind):
    p, what = not_a_file(tmp_path, kind)
    with pytest.raises(ConfigError, match=f"is {what}, not a file"):
        read_json(p)


@pytest.mark.parametrize("kind", ["zero", "fifo"])
def test_predict_with_machine_json_linked_to_dev_zero_or_a_fifo_is_one_line(tmp_path, kind):
    """`cputune predict` on this box reads machine.json: a link to /dev/zero there used to read
    3.8 GB and die of MemoryError, a FIFO to block for ever."""
    p, what = not_a_file(tmp_path, kind)
    (tmp_path / "cache" / "cputune" / "machine.json").symlink_to(p)
    out = fails("predict", "-m", "deepseek-r1", "-q", "q4_k_m")
    assert re.search(f"machine.json is {what}, not a file", out)


# --- 2. the TOML files: --hardware FILE and config.toml -------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("a = " + "[" * 3000 + "]" * 3000 + "\n", "not valid TOML (nested too deeply)"),
    (b"\xff\xfe", "is not UTF-8 text"),
])
def test_hardware_toml_nested_or_not_text_is_one_line(tmp_path, content, message):
    p = tmp_path / "box.toml"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = fails("predict", "-m", "deepseek-r1", "-q", "q4_k_m", "--hardware", str(p))
    assert message in out and str(p) in out


def test_hardware_file_that_cannot_be_read_says_why(tmp_path):
    out = fails("predict", "-m", "deepseek-r1", "-q", "q4_k_m", "--hardware", "/proc/self/mem")
    assert "cannot read /proc/self/mem (Input/output error)" in out
    p, _ = not_a_file(tmp_path, "fifo")
    fifo = p.rename(tmp_path / "fifo.toml")
    with pytest.raises(ConfigError, match="is a FIFO"):
        hardware.load_hardware(fifo)


def config_toml(tmp_path):
    return tmp_path / "cfg" / "cputune" / "config.toml"


@pytest.mark.parametrize("content, message", [
    ("models_dir = " + "[" * 3000 + "]" * 3000 + "\n", r"not valid TOML \(nested too deeply\)"),
    ("models_dir = 5\n", "models_dir in .*config.toml must be a string, not 5"),
    ("models_dir = [1]\n", r"must be a string, not \[1\]"),
    ("[models_dir]\nx = 1\n", r"must be a string, not \{'x': 1\}"),
    ('models_dir = "~nosuchuser/m"\n', "there is no user 'nosuchuser'"),
])
def test_config_toml_models_dir_is_checked(tmp_path, content, message):
    config_toml(tmp_path).write_text(content)
    with pytest.raises(ConfigError, match=message):
        modelfiles.models_dir()


@pytest.mark.parametrize("kind", ["zero", "fifo"])
def test_config_toml_that_is_not_a_file_is_refused_not_skipped(tmp_path, kind):
    p, what = not_a_file(tmp_path, kind)
    config_toml(tmp_path).symlink_to(p)
    with pytest.raises(ConfigError, match=f"is {what}, not a file"):
        modelfiles.models_dir()


def test_config_toml_unreadable_says_why(tmp_path):
    config_toml(tmp_path).symlink_to("/proc/self/mem")
    with pytest.raises(ConfigError, match=r"cannot read .*config.toml \(Input/output error\)"):
        modelfiles.models_dir()


# --- 3. ~user in --models-dir and $CPUTUNE_MODELS_DIR ---------------------------------------------

def test_an_unknown_user_in_a_models_dir_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match=r"--models-dir '~nosuchuser/m': there is no user 'nosuchuser'"):
        modelfiles.models_dir("~nosuchuser/m")
    monkeypatch.setenv(modelfiles.ENV_VAR, "~nosuchuser")
    with pytest.raises(ConfigError, match=f"{modelfiles.ENV_VAR} '~nosuchuser'"):
        modelfiles.models_dir()
    assert modelfiles.models_dir("~/m") == modelfiles.Path.home() / "m"


@pytest.fixture
def homeless(monkeypatch):
    """No $HOME and no password-database entry (a container run with an arbitrary uid)."""
    import pwd

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(RuntimeError):
        fsutil.Path.home()  # what cputune must not let through


def test_no_home_folder_is_one_line_or_the_xdg_folders(homeless, tmp_path, monkeypatch):
    assert fsutil.cache_root() == tmp_path / "cache" / "cputune"  # $XDG_CACHE_HOME needs no home
    assert modelfiles.config_file() == tmp_path / "cfg" / "cputune" / "config.toml"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("XDG_CONFIG_HOME")
    with pytest.raises(ConfigError, match=r"^\$HOME is not set and user \d+ has no entry") as e:
        fsutil.cache_root()
    assert "XDG_CACHE_HOME" in e.value.hint
    with pytest.raises(ConfigError, match="no home folder for the config file") as e:
        modelfiles.config_file()
    assert "XDG_CONFIG_HOME" in e.value.hint
    with pytest.raises(ConfigError, match=r"no home folder for the models folder") as e:
        modelfiles.models_dir()
    assert "--models-dir" in e.value.hint
    assert modelfiles.models_dir(str(tmp_path)) == tmp_path
    with pytest.raises(ConfigError, match=r"--models-dir '~/m': ~ names no folder"):
        modelfiles.models_dir("~/m")
    with pytest.raises(ConfigError, match=r"the model '~/x.gguf': ~ names no folder"):
        resolve.resolve("~/x.gguf")
    assert "Traceback" not in fails("report", "-o", str(tmp_path / "r.html"))
    monkeypatch.setenv("HOME", "")  # Path.home() would be "/": the cache would go in /.cache
    with pytest.raises(ConfigError, match=r"\$HOME is '', not an absolute path"):
        fsutil.cache_root()


def test_no_home_folder_at_import_is_not_a_traceback(tmp_path):
    """~/models was worked out when cputune.model.modelfiles was imported: every command died."""
    import subprocess
    import sys

    code = ("import pwd, sys\n"
            "def no_entry(uid): raise KeyError(uid)\n"
            "pwd.getpwuid = no_entry\n"
            "from cputune.cli import cli\n"
            f"cli(['report', '--no-charts', '-o', {str(tmp_path / 'r.html')!r}])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("Error: $HOME is not set") and "hint: set HOME" in r.stderr, r.stderr


# --- 4. a damaged bench-history.jsonl -------------------------------------------------------------

GOOD = {"at": "2026-01-01T00:00:00+00:00", "machine": "vm", "model": "/m/x.gguf", "model_name": "x",
        "file_type": "Q8_0", "test": "tg32", "kind": "tg", "threads": 2, "depth": 0,
        "median_tokens_per_s": 10.0, "mean_tokens_per_s": 10.0, "stddev_tokens_per_s": None,
        "min_tokens_per_s": 10.0, "max_tokens_per_s": 10.0, "samples_tokens_per_s": [10.0],
        "predicted_tokens_per_s": 11.0, "roofline_tokens_per_s": 20.0, "build_commit": "abc",
        "bytes_per_token": 1e9, "effective_bw_gbps": 20.0, "read_gbps": None, "read_samples_gbps": [],
        "predicted_at_read_tokens_per_s": None, "engine": "llama.cpp", "args": []}
DAMAGED = ["[1,2]", "5", json.dumps({**GOOD, "median_tokens_per_s": "fast"}), json.dumps({"threads": [1]}),
           json.dumps({**GOOD, "bytes_per_token": "x"}), "[" * 100000, json.dumps({**GOOD, "threads": True}),
           json.dumps({**GOOD, "median_tokens_per_s": float("inf")}), json.dumps({**GOOD, "threads": 10**9}),
           json.dumps({**GOOD, "samples_tokens_per_s": ["a"]}), '{"b": ']


def history(tmp_path) -> os.PathLike:
    return tmp_path / "cache" / "cputune" / "bench-history.jsonl"


def test_history_keeps_what_bench_wrote_and_counts_the_rest(tmp_path):
    h = history(tmp_path)
    h.write_text("\n".join([json.dumps(GOOD), *DAMAGED, json.dumps({**GOOD, "threads": 4})]) + "\n")
    got = bench.load_history(h)
    assert [r["threads"] for r in got.records] == [2, 4] and got.skipped == len(DAMAGED)
    assert bench.read_history(h) == list(got.records)


def test_a_report_on_a_damaged_history_is_written_and_says_what_it_skipped(tmp_path):
    history(tmp_path).write_text("\n".join([json.dumps(GOOD), *DAMAGED]) + "\n")
    out = tmp_path / "r.html"
    r = CliRunner().invoke(cli, ["report", "--no-charts", "-o", str(out)])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    text = out.read_text()
    assert f"Skipped {len(DAMAGED)} damaged lines of the bench history" in text
    assert "<td>tg32</td>" in text


@pytest.mark.parametrize("content, why", [
    ('{"schema": "cputune.tuned/1", "profi', "cannot read"),
    ('{"schema": "cputune.tuned/1", "profiles": [1]}', "field profiles must be an object"),
    ('{"schema": "cputune.tuned/1", "profiles": {"/m/x.gguf": {"results": 5}}}', "field profiles['/m/x.gguf']"),
])
def test_a_report_on_a_damaged_tuned_json_is_written_and_says_what_it_skipped(tmp_path, content, why):
    (tmp_path / "cache" / "cputune" / "tuned.json").write_text(content)
    data = report_file.collect()
    assert data.tuned == () and why in data.tuned_skipped and "tuned.json" in data.tuned_skipped
    out = tmp_path / "r.md"
    r = CliRunner().invoke(cli, ["report", "--no-charts", "-o", str(out)])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    text = out.read_text()
    assert "Skipped the saved tuned settings, which cannot be read: " in text and "tuned.json" in text


def test_latest_runs_leaves_out_records_bench_could_not_have_written():
    runs = report_file.latest_runs([GOOD, [1, 2], {"threads": [1]}, {**GOOD, "bytes_per_token": "x"}])
    assert runs == [GOOD]
    assert report_file.bench_blocks(None, [5, {"median_tokens_per_s": "fast", "predicted_tokens_per_s": 1.0}],
                                    False)[1].text.startswith("No bench results yet")


def test_a_history_that_is_not_a_file_is_one_line(tmp_path):
    p, what = not_a_file(tmp_path, "fifo")
    history(tmp_path).symlink_to(p)
    with pytest.raises(ConfigError, match=f"is {what}, not a file"):
        bench.load_history()


def test_an_endless_line_and_a_huge_history_stay_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(bench, "HISTORY_BYTES", 4000)
    h = history(tmp_path)
    line = json.dumps(GOOD) + "\n"
    assert len(line) < 1000
    h.write_text(line + "x" * 2500 + "\n" + line)
    got = bench.load_history(h)
    assert len(got.records) == 2 and got.skipped == 1
    with h.open("a") as f:
        f.write(line * 20)  # beyond HISTORY_BYTES: the oldest lines are not read
    got = bench.load_history(h)
    assert 0 < len(got.records) <= 4000 // len(line) + 1 and got.skipped == 0
    assert stat.S_ISREG(h.stat().st_mode)  # the history itself untouched
