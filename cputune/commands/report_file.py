"""`cputune report`: one file a builder can keep or post — the machine, its bandwidth, decode
against its roofline and the tuning table — from what probe, bench and tune saved in the cache.

The document is built once as a list of blocks (heading, paragraph, table, chart) and written
either as self-contained HTML (charts inlined as base64 PNG) or as Markdown with the PNGs in a
folder beside it, so the two formats cannot drift apart.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cputune import __version__
from cputune.core import stats
from cputune.engine import bench, tune
from cputune.machine import probe
from cputune.core.checks import printable
from cputune.core.errors import ConfigError
from cputune.core.fsutil import atomic_write_bytes, check_target

FORMATS = ("html", "md")


@dataclass(frozen=True, slots=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True, slots=True)
class Para:
    text: str


@dataclass(frozen=True, slots=True)
class TableBlock:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...] = ()  # right-aligned columns


@dataclass(frozen=True, slots=True)
class Chart:
    name: str  # file stem
    alt: str
    png: bytes = field(repr=False)


Block = Heading | Para | TableBlock | Chart


@dataclass(frozen=True, slots=True)
class ReportData:
    machine: probe.MachineProfile | None
    history: tuple[dict, ...]
    tuned: tuple[tune.TuneResult, ...]
    sources: dict[str, str]  # what was read from where
    history_skipped: int = 0  # damaged bench-history lines left out (bench.load_history)
    tuned_skipped: str | None = None  # why a damaged tuned.json was left out (its ConfigError)


def collect(profile_path: Path | None = None, history_path: Path | None = None,
            tuned_path: Path | None = None) -> ReportData:
    """What the cache holds; a part never made is None/empty (the report says how to make it)."""
    pp = profile_path or probe.profile_path()
    hp = history_path or bench.history_path()
    tp = tuned_path or tune.tuned_path()
    machine = probe.load_profile(pp) if pp.exists() else None
    tuned_skipped = None
    try:
        tuned = tuple(tune.load_all(tp).values())
    except ConfigError as e:  # a damaged file is left out of the report, and the report says why
        tuned = ()
        tuned_skipped = e.message + (f" ({e.hint})" if e.hint else "")
    history = bench.load_history(hp)
    return ReportData(machine, history.records, tuned,
                      {"machine profile": str(pp), "bench history": str(hp), "tuned settings": str(tp)},
                      history.skipped, tuned_skipped)


# ---- blocks ---------------------------------------------------------------------------------------

def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def machine_blocks(m: probe.MachineProfile | None, charts: bool) -> list[Block]:
    from cputune.commands import plots

    out: list[Block] = [Heading("Machine")]
    if m is None:
        return out + [Para("No machine profile yet: run `cputune probe`.")]
    out.append(TableBlock(("", ""), tuple((k, v) for k, v in probe.summary_rows(m))))
    if m.findings:
        out.append(TableBlock(("level", "finding"), tuple((f.level, f.message + (f" (hint: {f.hint})" if f.hint else ""))
                                                          for f in m.findings)))
    out.append(Heading("Memory bandwidth"))
    bw, peak = m.bandwidth, m.inventory.peak
    if bw is None:
        return out + [Para("The probe ran without a bandwidth measurement: run `cputune probe`.")]
    t = m.inventory.topology
    per_node_peak = peak.total_gbps / max(len(t.nodes), 1) if peak and peak.total_gbps else None
    out.append(TableBlock(("node", "read GB/s", "of the node's peak"),
                          tuple((str(n), f"{g:.1f}", f"{g / per_node_peak:.0%}" if per_node_peak else "-")
                                for n, g in sorted(bw.node_read_gbps.items())), (False, True, True)))
    if bw.matrix_read_gbps:
        out.append(TableBlock(("CPUs on node", "memory on node", "read GB/s"),
                              tuple((str(c), str(mm), f"{g:.1f}") for c, mm, g in bw.matrix_read_gbps),
                              (False, False, True)))
    if charts:
        out.append(Chart("bandwidth-per-node", "read bandwidth per NUMA node",
                         plots.node_bandwidth(bw.node_read_gbps, per_node_peak)))
        if len(bw.sweep_read_gbps) > 1:
            out.append(Chart("bandwidth-thread-scaling", "read bandwidth against threads on one node",
                             plots.thread_scaling({"one node, read": list(bw.sweep_read_gbps)}, "read GB/s",
                                                  "Bandwidth thread scaling (one node)", per_node_peak)))
    return out


def latest_runs(history: Sequence[dict]) -> list[dict]:
    """The newest result of each (model, test, threads): the history keeps every run. A record
    bench could not have written (bench.history_record_ok) is left out here too."""
    latest: dict[tuple, dict] = {}
    for h in history:
        if not bench.history_record_ok(h):
            continue
        latest[(h.get("model"), h.get("test"), h.get("threads"))] = h
    return list(latest.values())


def bench_blocks(m: probe.MachineProfile | None, history: Sequence[dict], charts: bool,
                 skipped: int = 0) -> list[Block]:
    from cputune.commands import plots

    out: list[Block] = [Heading("Measured against predicted")]
    if skipped:
        out.append(Para(f"Skipped {skipped} damaged line{'s' if skipped != 1 else ''} of the bench history "
                        "(cut by a crash, edited, or not bench's): they are left out below."))
    runs = latest_runs(history)
    if not runs:
        return out + [Para("No bench results yet: run `cputune bench -m MODEL` (or `--twin 2GB` "
                           "for a synthetic model).")]
    rows = []
    for h in sorted(runs, key=lambda h: (str(h.get("model_name") or h.get("model")), h.get("test", ""),
                                         h.get("threads", 0))):
        med, pred, roof = h.get("median_tokens_per_s"), h.get("predicted_tokens_per_s"), h.get("roofline_tokens_per_s")
        read, at_read = h.get("read_gbps"), h.get("predicted_at_read_tokens_per_s")
        rows.append((str(h.get("at", ""))[:16].replace("T", " "), Path(str(h.get("model", ""))).name,
                     str(h.get("file_type", "")), str(h.get("test", "")), str(h.get("threads", "")),
                     _f(med), _f(pred), f"{med / pred - 1:+.0%}" if med and pred else "-",
                     f"{read:.1f}" if read else "-", f"{med / at_read - 1:+.0%}" if med and at_read else "-",
                     _f(roof), f"{med / roof:.0%}" if med and roof else "-"))
    out.append(TableBlock(("when", "model", "type", "test", "threads", "measured t/s", "predicted",
                           "vs predicted", "read GB/s before", "vs predicted at that read", "roofline", "efficiency"),
                          tuple(rows), (False, False, False, False) + (True,) * 8))
    points = [{"quant": str(h.get("file_type") or "?"), "gb_per_token": h["bytes_per_token"] / 1e9,
               "measured": h["median_tokens_per_s"], "predicted": h["predicted_tokens_per_s"]}
              for h in runs if h.get("kind") == "tg" and h.get("bytes_per_token")]
    if charts and points:
        roofs = []
        effs = [h["effective_bw_gbps"] for h in runs if h.get("kind") == "tg" and h.get("effective_bw_gbps")]
        if effs:
            roofs.append(("llama.cpp's effective bandwidth (predictor)", max(effs)))
        if m is not None and m.bandwidth is not None:
            roofs.append(("probe read bandwidth", m.bandwidth.read_gbps))
        out.append(Chart("roofline", "decode roofline with measured and predicted points",
                         plots.roofline(points, roofs)))
    elif not points:
        out.append(Para("No decode result carries its bytes per token (older history lines): "
                        "run `cputune bench` again for the roofline chart."))
    return out


STAGE_ORDER = {"baseline": 0, "placement": 1, "kernels": 2, "confirm": 3}
OUTCOME_ORDER = {"best": 0, "default": 1, "dropped": 2, "unmeasured": 3, "failed": 4, "pruned": 5}
TRIAL_HEADERS = ("stage", "settings", "predicted", "runs", "measured t/s (median ± σ)", "outcome")


def trial_rows(k: tune.KindResult) -> list[tuple[str, ...]]:
    """One row per candidate, by stage, then how it ended, then speed: the terminal table and the
    report file show the same rows."""
    rows = []
    for x in sorted(k.trials, key=lambda x: (STAGE_ORDER.get(x.stage, 9), OUTCOME_ORDER.get(x.outcome, 9),
                                             -(x.median_tokens_per_s or 0))):
        s = x.summary
        rows.append((x.stage, x.knobs.label, _f(x.predicted_tokens_per_s), stats.count_text(s) if s else "0",
                     stats.pm_text(s, 2, center="median") if s else "-",
                     x.outcome + (f" ({x.note})" if x.note else "")))
    return rows


def tune_blocks(tuned: Sequence[tune.TuneResult], charts: bool, skipped: str | None = None) -> list[Block]:
    from cputune.commands import plots

    out: list[Block] = [Heading("Tuning")]
    if skipped:
        out.append(Para(f"Skipped the saved tuned settings, which cannot be read: {printable(skipped, markup=False)}."))
    if not tuned:
        return out + [Para("No tuned settings yet: run `cputune tune -m MODEL`.")]
    for i, r in enumerate(tuned):
        out.append(Heading(f"{r.model_path.name} ({r.created_at[:16].replace('T', ' ')}, "
                           f"llama.cpp {r.build_commit or '?'}, {r.seconds:.0f} s of a {r.budget_s:.0f} s budget)", 3))
        out.append(TableBlock(("test", "best settings", "t/s", "llama.cpp defaults", "t/s", "gain"),
                              tuple((k.test, k.best.label, _f(k.best_tokens_per_s), k.default.label,
                                     _f(k.default_tokens_per_s), f"{k.gain:.2f}x") for k in r.results),
                              (False, False, True, False, True, True)))
        rows = [(k.test, *row) for k in r.results for row in trial_rows(k)]
        out.append(TableBlock(("test", *TRIAL_HEADERS), tuple(rows), (False, False, False, True, True, True, False)))
        series = {}
        for k in r.results:
            pts = {}
            for x in k.trials:
                if x.stage in ("baseline", "placement") and x.samples_tokens_per_s and x.knobs.numa == k.default.numa:
                    pts[x.knobs.threads] = x.median_tokens_per_s
            if len(pts) > 1:
                series[k.test] = sorted(pts.items())
        if charts and series:
            out.append(Chart(f"tune-threads-{i + 1}", "llama.cpp tokens/s against threads, from tune",
                             plots.thread_scaling(series, "tokens/s", f"Thread scaling: {r.model_path.name}")))
    return out


def build_blocks(data: ReportData, charts: bool = True) -> list[Block]:
    title = f"cputune report: {data.machine.hostname if data.machine else 'this machine'}"
    head: list[Block] = [Heading(title, 1),
                         Para(f"cputune {__version__}; read from " +
                              ", ".join(f"{k} {v}" for k, v in data.sources.items()) + ".")]
    return (head + machine_blocks(data.machine, charts) + bench_blocks(data.machine, data.history, charts, data.history_skipped)
            + tune_blocks(data.tuned, charts, data.tuned_skipped))


# ---- writers --------------------------------------------------------------------------------------

CSS = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}"
       "table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #ccc;padding:.2rem .5rem;"
       "font-size:.9rem}th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}"
       "img{max-width:100%;display:block;margin:.5rem 0 1rem}")


def to_html(blocks: Sequence[Block]) -> str:
    e = html.escape
    parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(next((b.text for b in blocks if isinstance(b, Heading)), 'cputune report'))}</title>",
             f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            parts.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, TableBlock):
            num = b.numeric or (False,) * len(b.headers)
            rows = "".join("<tr>" + "".join(f'<td{" class=n" if n else ""}>{e(c)}</td>' for c, n in zip(r, num))
                           + "</tr>" for r in b.rows)
            head = "" if not any(b.headers) else "<tr>" + "".join(f"<th>{e(h)}</th>" for h in b.headers) + "</tr>"
            parts.append(f"<table>{head}{rows}</table>")
        elif isinstance(b, Chart):
            data = base64.b64encode(b.png).decode()
            parts.append(f'<img alt="{e(b.alt)}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def image_name(chart: Chart) -> str:
    """A Markdown report's file for one chart: its name and a hash of its bytes. A new report
    never writes over a file the one before it links to, so until the new Markdown is in place
    (written last), the old report and every image it shows stay whole."""
    return f"{chart.name}-{hashlib.sha256(chart.png).hexdigest()[:12]}.png"


_IMAGE_NAME = re.compile(r"[a-z0-9][a-z0-9-]*-[0-9a-f]{12}\.png")


def to_markdown(blocks: Sequence[Block], image_dir: str) -> str:
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            parts.append(b.text)
        elif isinstance(b, TableBlock):
            num = b.numeric or (False,) * len(b.headers)
            lines = ["| " + " | ".join(_md_cell(h) or " " for h in b.headers) + " |",
                     "|" + "|".join("---:" if n else "---" for n in num) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b.rows]
            parts.append("\n".join(lines))
        elif isinstance(b, Chart):
            parts.append(f"![{b.alt}]({image_dir}/{image_name(b)})")
    return "\n\n".join(parts) + "\n"


def _utf8(text: str) -> bytes:
    """The page as UTF-8. A name read from a state file may hold a lone surrogate (a model file
    whose name is not UTF-8, as json.dumps wrote it): shown as its escape, not a crash."""
    return text.encode("utf-8", "backslashreplace")


def write_report(blocks: Sequence[Block], out: Path, fmt: str | None = None) -> list[Path]:
    """Writes the report (and, for Markdown, its PNGs in OUT's stem + '-images/'); every file atomically."""
    fmt = fmt or ("md" if out.suffix.lower() in (".md", ".markdown") else "html")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown report format {fmt!r}", hint="choose html or md")
    if out.exists() and out.is_dir():
        raise ConfigError(f"{out} is a folder", hint="give a file name, e.g. --out report.html")
    # OUT's folder must exist (the user named it); a device, FIFO or link there is refused before
    # any chart is drawn into the folder beside it.
    check_target(out, make_parents=False)
    if fmt == "html":
        atomic_write_bytes(out, _utf8(to_html(blocks)), make_parents=False)
        return [out]
    img_dir = out.parent / f"{out.stem}-images"
    written = []
    for b in blocks:
        if isinstance(b, Chart):
            p = img_dir / image_name(b)
            atomic_write_bytes(p, b.png, make_parents=True)  # the images folder is the report's own
            written.append(p)
    atomic_write_bytes(out, _utf8(to_markdown(blocks, os.path.relpath(img_dir, out.parent))), make_parents=False)
    # Only now is the old report gone: remove the charts it linked to and this one does not.
    # Only files named as image_name() names them; anything else in the folder is left alone.
    keep = {p.name for p in written}
    try:
        stale = [p for p in img_dir.iterdir() if _IMAGE_NAME.fullmatch(p.name) and p.name not in keep]
    except OSError:
        stale = []
    for p in stale:
        try:
            if p.is_file() and not p.is_symlink():
                p.unlink()
        except OSError:
            pass  # an old chart left behind costs a few KB, never the report just written
    return [out, *written]
