"""`cputune report`: the HTML and Markdown files from a real probe, a real bench and a saved tune
result, their charts, and what the report says when a part was never measured."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from cputune.commands import report_file
from cputune.engine import tune
from cputune.cli import cli
from cputune.core.fsutil import atomic_write_text

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def measured(own_cache, tiny_models):
    """A cache holding a quick probe, two bench runs (tg and pp at 1 thread) and a tune result."""
    run = CliRunner()
    assert run.invoke(cli, ["probe", "--quick"], catch_exceptions=False).exit_code == 0
    for q in ("q8_0", "q4_k_m"):
        path = tiny_models["llama"].quantized[q]
        r = run.invoke(cli, ["bench", "-m", str(path), "-t", "1", "--n-prompt", "16", "--n-gen", "4",
                             "--reps", "2"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
    path = tiny_models["llama"].quantized["q8_0"]

    def kind(name, n):
        trials = tuple(tune.Tried(name, "placement", tune.Knobs(threads=t), 10.0 * t, (9.0 * t, 9.5 * t), 1,
                                  "best" if t == 2 else "dropped") for t in (1, 2))
        return tune.KindResult(name, f"{name}{n}", tune.Knobs(threads=2), tune.Knobs(threads=2), 19.0, 19.0, 1.0,
                               trials, 5.0, ())

    tune.save(tune.TuneResult(path, path.stat().st_size, "vm", "0c1e57098", 60, 42, 0,
                              (kind("tg", 8), kind("pp", 32)), "2026-11-23T12:00:00+00:00"))
    return own_cache


def images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def test_html_report_is_self_contained_with_every_chart(measured, tmp_path):
    out = tmp_path / "report.html"
    r = CliRunner().invoke(cli, ["report", "-o", str(out), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["charts"] == ["bandwidth-per-node", "roofline", "tune-threads-1"]  # one node: no sweep
    text = out.read_text()
    pngs = images(text)
    assert len(pngs) == 3 and all(p.startswith(PNG) for p in pngs)
    assert "<script" not in text and not re.search(r'(src|href)="https?:', text)  # nothing fetched
    # The tables carry the numbers behind the charts.
    assert "read GB/s" in text and "tg4" in text and "pp16" in text and "efficiency" in text
    assert "t2 numa=off ub512" in text and "1.00x" in text
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~current_umask()


def test_markdown_report_writes_its_charts_beside_it(measured, tmp_path):
    out = tmp_path / "r.md"
    r = CliRunner().invoke(cli, ["report", "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    md = out.read_text()
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert [re.sub(r"-[0-9a-f]{12}\.png$", "", link) for link in links] == [
        "r-images/bandwidth-per-node", "r-images/roofline", "r-images/tune-threads-1"]
    for link in links:
        assert (tmp_path / link).read_bytes().startswith(PNG)
    assert "| node | read GB/s |" in md and "## Tuning" in md


def test_a_new_markdown_report_never_writes_over_the_old_ones_images(measured, tmp_path, monkeypatch):
    """Charts are named by their content and the Markdown is written last: a run cut off while
    it writes its charts leaves the old report and every image it links to as they were; a
    finished run removes the old report's charts, and nothing else in the folder."""
    out = tmp_path / "r.md"
    old = [report_file.Heading("old"), report_file.Chart("roofline", "old chart", PNG + b"old")]
    report_file.write_report(old, out)
    old_md, old_link = out.read_text(), re.findall(r"\]\(([^)]+)\)", out.read_text())[0]
    mine = tmp_path / "r-images" / "notes.txt"
    mine.write_text("mine")
    new = [report_file.Heading("new"), report_file.Chart("roofline", "new chart", PNG + b"new"),
           report_file.Chart("bandwidth-per-node", "second", PNG + b"second")]
    real, calls = report_file.atomic_write_bytes, []

    def cut_off_after_one(path, data, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(path)
        return real(path, data, **kw)

    monkeypatch.setattr(report_file, "atomic_write_bytes", cut_off_after_one)
    with pytest.raises(KeyboardInterrupt):
        report_file.write_report(new, out)
    assert out.read_text() == old_md and (tmp_path / old_link).read_bytes() == PNG + b"old"
    monkeypatch.setattr(report_file, "atomic_write_bytes", real)
    report_file.write_report(new, out)
    links = re.findall(r"\]\(([^)]+)\)", out.read_text())
    assert sorted(p.name for p in (tmp_path / "r-images").iterdir()) == sorted(
        [Path(link).name for link in links] + ["notes.txt"])
    assert [(tmp_path / link).read_bytes() for link in links] == [PNG + b"new", PNG + b"second"]


def test_an_empty_cache_gives_a_report_that_says_what_to_run(own_cache, tmp_path):
    out = tmp_path / "r.html"
    r = CliRunner().invoke(cli, ["report", "-o", str(out), "--no-charts"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    for hint in ("run `cputune probe`", "run `cputune bench", "run `cputune tune"):
        assert hint in text
    assert images(text) == []


def test_report_into_a_folder_is_refused_and_nothing_is_written(own_cache, tmp_path):
    r = CliRunner().invoke(cli, ["report", "-o", str(tmp_path), "--no-charts"])
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_tables_escape_what_they_show():
    blocks = [report_file.Heading("a <b>"), report_file.TableBlock(("x|y",), (("<td>|",),))]
    assert "&lt;td&gt;|" in report_file.to_html(blocks) and "a &lt;b&gt;" in report_file.to_html(blocks)
    assert "<td>\\|" in report_file.to_markdown(blocks, "img")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_keeps_the_files_mode(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "one")
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~current_umask()
    p.chmod(0o640)
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and stat.S_IMODE(p.stat().st_mode) == 0o640
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]  # no temporary file left behind


@pytest.mark.parametrize("name", ["r.html", "r.md"])
def test_a_name_that_is_not_utf8_is_shown_as_its_escape(tmp_path, name):
    """A model file whose name is not UTF-8 is benched as '/m/\\udcff.gguf' (json.dumps of the
    lone surrogate); the report shows the escape instead of dying on the encode."""
    out = tmp_path / name
    report_file.write_report([report_file.Heading("bench"), report_file.Para("/m/\udcff.gguf"),
                              report_file.TableBlock(("model",), (("/m/\udcff.gguf",),))], out)
    assert "/m/\\udcff.gguf" in out.read_text()
