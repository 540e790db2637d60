"""Rendering results: rich tables for people (stdout), one JSON document for scripts, and
progress on stderr so `cputune ... --json | jq` always works."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cputune.machine.bandwidth import combine_bursts, group_bursts
from cputune.engine.build import load_engine
from cputune.core.jsonio import document, plain  # noqa: F401  (re-exported for the CLI)
from cputune.core import stats
from cputune.core.checks import printable
from cputune.core.units import gib_text

# Pipes and CliRunner get 120 columns rather than rich's 80, so tables do not wrap mid-number.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False)


def print_json(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


def warn(message: str, hint: str | None = None) -> None:
    # Messages quote names from files (an architecture, a path): shown as written, never as markup.
    err.print(f"[yellow]Warning:[/] {printable(message)}")
    if hint:
        err.print(f"  hint: {printable(hint)}")


def info(message: str) -> None:
    err.print(printable(message))


@contextlib.contextmanager
def progress(description: str, total: float | None = 100.0, enabled: bool = True) -> Iterator:
    """A progress bar on stderr; yields update(completed, text=None). In a pipe or a CI log,
    where a bar cannot redraw, one line per 10% step instead."""
    if not enabled:
        yield lambda completed, text=None: None
        return
    if not err.is_terminal and total is None:
        shown = [None]

        def state(completed: float, text: str | None = None) -> None:
            # No percentage to step through: one line each time the state changes.
            if text != shown[0]:
                shown[0] = text
                err.print(f"{description}: {text}")

        yield state
        return
    if not err.is_terminal:
        last = [-1]

        def line(completed: float, text: str | None = None) -> None:
            step = int(10 * completed / total) if total else 0
            if step > last[0]:
                last[0] = step
                err.print(f"{description}: {10 * step}%" + (f" ({text})" if text else ""))

        yield line
        return
    cols = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
            TimeElapsedColumn(), TextColumn("[dim]{task.fields[detail]}")]
    with Progress(*cols, console=err, transient=True) as p:
        task = p.add_task(description, total=total, detail="")

        def update(completed: float, text: str | None = None) -> None:
            p.update(task, completed=completed, detail=(text or "")[:60])

        yield update


def kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    """A two-column table. Its title, labels and values quote model names, paths and strings from
    files, so each is passed through `printable` (control characters escaped, markup shown as
    written); a value that means to be styled is given as a rich Text."""
    t = Table(title=printable(title), show_header=False, title_justify="left", box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(printable(k), v if isinstance(v, Text) else "" if v is None else printable(v))
    return t


# ---- build ---------------------------------------------------------------------------------

def render_build(b) -> None:
    feats = " ".join(k for k, v in sorted(b.features.items()) if v == 1)
    out.print(kv_table(f"{b.engine} build" + (" (cached)" if b.cached else ""), [
        ("key", b.key),
        ("target cpu", b.target_cpu),
        ("source", f"{b.engine} {b.source_commit or b.source_label}"
                   + (f" (llama-cpp-python {b.llama_cpp_python})" if b.llama_cpp_python else "")),
        ("compiler", b.compiler),
        ("built", f"{b.built_at} in {b.build_seconds:.0f} s"),
        ("features on", feats),
        ("binaries", str(b.bin_dir)),
    ]))


def render_build_list(builds) -> None:
    if not builds:
        out.print("No cached builds. Run `cputune build`.")
        return
    t = Table(title="Cached builds", title_justify="left")
    for col, just in (("engine", "left"), ("key", "left"), ("target", "left"), ("built", "left"),
                      ("seconds", "right"), ("AVX2", "right"), ("AVX512", "right")):
        t.add_column(col, justify=just)
    for b in builds:
        t.add_row(b.engine, b.key, b.target_cpu, b.built_at, f"{b.build_seconds:.0f}",
                  str(b.features.get("AVX2", "?")), str(b.features.get("AVX512", "?")))
    out.print(t)


def render_binding(status) -> None:
    if status.lib_dir is None:
        out.print("llama-cpp-python: not installed (run `cputune build --python`)")
    else:
        out.print(f"llama-cpp-python {status.installed_version}: linked {len(status.linked)} "
                  f"libraries into {status.lib_dir}")


# ---- probe ---------------------------------------------------------------------------------

_LEVEL_STYLE = {"bad": "bold red", "warn": "yellow", "info": "cyan", "ok": "green"}


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / (1 << 20):.0f} MiB"


def render_probe(p) -> None:
    from cputune.core.sysfs import format_cpulist

    from cputune.machine.probe import summary_rows

    t, bw = p.inventory.topology, p.bandwidth
    rows = summary_rows(p)
    out.print(kv_table(f"cputune probe: {p.hostname}", rows))

    nodes = Table(title="NUMA nodes", title_justify="left")
    for col in ("node", "CPUs", "cores", "memory", "free", "read GB/s"):
        nodes.add_column(col, justify="left" if col == "CPUs" else "right")
    for n in t.nodes:
        cores = len(t.physical_cores_of_node(n.id))
        read = bw.node_read_gbps.get(n.id) if bw else None
        nodes.add_row(str(n.id), format_cpulist(n.cpus) or "-", str(cores), gib_text(n.mem_total_bytes),
                      gib_text(n.mem_free_bytes), "-" if read is None else f"{read:.1f}")
    out.print(nodes)

    if p.measurements:
        runs = Table(title="Bandwidth (STREAM-style variant; GB/s = 10^9 B/s, best of n after the first, "
                           "over every burst)", title_justify="left")
        for col in ("run", "kernel", "threads", "array/thread", "best", "mean ± σ", "min … max", "n",
                    "bursts (median)"):
            runs.add_column(col, justify="left" if col in ("run", "kernel") else "right")
        for group in group_bursts(p.measurements):
            x, spread = group[0], combine_bursts(group)
            trials = stats.summarize([v for m in group for v in m.gbps.samples])
            kernel = x.run.kernel + (" (NT stores)" if x.nt_stores else "")
            bursts = "-" if len(group) == 1 else (
                f"{stats.range_text(stats.summarize(spread.burst_gbps), 1)} x{len(group)} "
                f"({spread.median_gbps:.1f})")
            runs.add_row(x.run.name, kernel, str(len(x.run.cpus)), _mib(x.elements_per_thread * 8),
                         f"{spread.gbps:.1f}", stats.pm_text(trials, 1), stats.range_text(trials, 1),
                         stats.count_text(trials), bursts)
        out.print(runs)

    fs = Table(title="Findings", title_justify="left", show_header=False, box=None)
    fs.add_column()
    fs.add_column()
    for f in p.findings:
        text = printable(f.message) + (f"\n[dim]hint: {printable(f.hint)}[/]" if f.hint else "")
        fs.add_row(f"[{_LEVEL_STYLE[f.level]}]{f.level}[/]", text)
    out.print(fs)


# ---- inspect -------------------------------------------------------------------------------

def _bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _share_table(title: str, what: str, by: dict[str, int], total: int) -> Table:
    """Bytes by type or by role, with each one's share of the weights."""
    t = Table(title=title, title_justify="left")
    t.add_column(what)
    t.add_column("bytes", justify="right")
    t.add_column("share", justify="right")
    for name, n in by.items():
        t.add_row(printable(name), _bytes(n), f"{n / total:.1%}" if total else "-")
    return t


def render_model(m, kv_f16: float) -> None:
    moe = (f"{m.n_expert} experts, {m.n_expert_used} used per token, {m.n_expert_shared} shared, "
           f"{m.n_dense_lead} leading dense blocks" if m.is_moe else "dense")
    attn = "MLA (latent KV, V-less cache)" if m.mla else f"GQA/MHA, {m.n_head} heads"
    out.print(kv_table(f"{m.name or m.path} ({m.arch})", [
        ("file", f"{m.path}" + (f" (+{m.n_shards - 1} more shards)" if m.n_shards > 1 else "")),
        ("file type", m.file_type),
        ("size", f"{_bytes(m.file_bytes)} on disk, {_bytes(m.weight_bytes)} of weights"),
        ("layers", f"{m.n_layer}, n_embd {m.n_embd}, vocabulary {m.n_vocab}"),
        ("attention", attn),
        ("experts", moe),
        ("parameters", f"{_count(m.total_params)} total, {_count(m.active_params)} active per token"),
        ("read per token", f"{_bytes(m.active_bytes_per_token)} ({m.active_fraction:.1%} of the weights)"),
        ("FLOPs per token", f"{_count(m.flops_per_token)} (+ {m.attn_flops_per_ctx_token} per token of context)"),
        ("KV cache", f"{_bytes(kv_f16)} per token in f16"),
    ]))
    out.print(_share_table("Weights by type", "type", m.bytes_by_type, m.weight_bytes))
    if m.roles_from_table:
        out.print(_share_table(f"Weights by role ({printable(m.arch)} table)", "role",
                               m.bytes_by_role, m.weight_bytes))
        if "unknown" in m.bytes_by_role:
            warn(f"some tensors of this {m.arch} file are not in cputune's table for it: the file is "
                 "a variant the table does not describe", "its bytes are counted; `--json` lists the roles")
    if m.unknown_types:
        warn(f"tensor types unknown to this cputune: {', '.join(m.unknown_types)}; their bytes are "
             "not counted", "upgrade cputune, or add them to configs/ggml_types_extra.csv")


# ---- predict / calibrate / synth -------------------------------------------------------------

def _range(lo: float, hi: float, digits: int) -> str:
    return f"({lo:.{digits}f}–{hi:.{digits}f})" if hi > lo else ""


def render_prediction(model, box, settings, p, decision=None, best=None, huge=None, other_fa=None) -> None:
    m = box.machine
    numa = settings.numa + (f", {p.nodes_used} of {m.nodes} nodes" if m.nodes > 1 else "")
    rows = [
        ("decode (tg)", f"{p.tg_tokens_per_s:.2f} tokens/s {_range(*p.tg_range, 2)}, {p.bottleneck}-bound"),
        ("prefill (pp)", f"{p.pp_tokens_per_s:.1f} tokens/s {_range(*p.pp_range, 1)}, {p.pp_bottleneck}-bound "
                         f"(ubatch {settings.n_ubatch})"),
        ("roofline", f"{p.roofline_tg_tokens_per_s:.2f} tokens/s = {p.effective_bw_gbps:.1f} GB/s / "
                     f"{_bytes(p.bytes_per_token)} per token"),
        ("per token", f"memory {p.t_memory_s * 1e3:.2f} ms, compute {p.t_compute_s * 1e3:.2f} ms "
                      f"(attention {p.t_attention_s * 1e3:.2f}), fixed {p.t_overhead_s * 1e3:.2f} ms"),
        ("settings", f"{settings.engine}, {settings.threads} threads, numa {numa}, depth {settings.depth}, "
                     f"KV cache {settings.cache_type}, {settings.page_size} pages, "
                     f"flash attention {'on' if settings.flash_attn else 'off'}"),
    ]
    if decision is not None:
        rows.append(("why this numa", decision.reason))
    if best is not None:
        rows.append(("best threads", f"-t {best[0]} for decode, -tb {best[1]} for prefill (predicted)"))
    rows += [
        ("memory needed", f"{_bytes(p.memory_needed_bytes)} (weights + KV at this depth); "
                          f"{_bytes(m.mem_bytes)} in the box"
                          + ("; served with mmap, llama.cpp also keeps the repacked weights' "
                             "second copy, which the NUMA rule counts" if decision is not None else "")),
        ("machine", box.source),
        ("constants", box.calibration.source),
        ("range", "80 % of runs a fit did not see fell in it: " + box.calibration.error_band_source),
    ]
    out.print(kv_table(f"{model.name or model.path} on {m.name}", rows))
    for note in (*(decision.notes if decision is not None else ()), *p.notes):
        warn(note)
    if other_fa is not None and other_fa.tg_tokens_per_s > p.tg_tokens_per_s * 1.05:
        now, other = ("on", "off") if settings.flash_attn else ("off", "on")
        warn(f"at depth {settings.depth}, flash attention {other} decodes {other_fa.tg_tokens_per_s:.2f} "
             f"tokens/s (+{other_fa.tg_tokens_per_s / p.tg_tokens_per_s - 1:.0%}, predicted; this is -fa {now})",
             f"serve it with `cputune serve ... -- -fa {other}` after checking with "
             f"llama-bench -d {settings.depth} -fa 0,1")
    if huge is not None and huge.tg_tokens_per_s > p.tg_tokens_per_s * 1.02:
        warn(f"4 KiB pages: with 2 MiB huge pages this decodes {huge.tg_tokens_per_s:.2f} tokens/s "
             f"(+{huge.tg_tokens_per_s / p.tg_tokens_per_s - 1:.0%}); set transparent_hugepage to "
             "always and serve with --no-mmap, or use hugetlbfs pages")


def render_calibration(run, path: Path | None) -> None:
    t = Table(title="Calibration runs: predicted with the fitted constants vs measured", title_justify="left")
    for col, just in (("model", "left"), ("threads", "right"), ("read GB/s before (bursts)", "right"),
                      ("tg t/s", "right"), ("tg err", "right"), ("pp t/s", "right"), ("pp err", "right")):
        t.add_column(col, justify=just)
    for pt, e_tg, e_pp in run.errors:
        xs = stats.summarize(pt.read_gbps_samples) if pt.read_gbps_samples else None
        read = "-" if not pt.read_gbps else f"{pt.read_gbps:.1f}" + (
            f" ({stats.range_text(xs, 1)} x{xs.n})" if xs and xs.n > 1 else "")
        t.add_row(printable(Path(pt.model.path or "?").name), str(pt.threads), read, f"{pt.tg_tokens_per_s:.2f}",
                  f"{e_tg:+.1%}", f"{pt.pp_tokens_per_s:.1f}", f"{e_pp:+.1%}")
    out.print(t)
    c = run.calibration
    moe_pp = (", ".join(f"{t} {v:.2f}" for t, v in c.moe_prefill_efficiency_by_type.items())
              if c.moe_prefill_efficiency_by_type else f"{c.moe_prefill_efficiency:.2f}")
    of = ("the read bandwidth measured before each run" if all(pt.read_gbps for pt in run.points)
          else "the probe's read bandwidth")
    rows = [("bandwidth efficiency", f"{c.bw_efficiency:.2f} of {of}"),
            ("MoE expert efficiency", f"{c.moe_bw_efficiency:.2f} of bandwidth, {c.moe_decode_efficiency:.2f} "
                                      f"of decode compute, of prefill compute {moe_pp}"),
            ("thread scaling", f"compute grows as threads^{c.thread_scaling:.2f} in decode, "
                               f"threads^{c.prefill_thread_scaling:.2f} in prefill"),
            ("memory/compute overlap", "perfect: the larger term" if c.overlap_p <= 0
             else f"p-norm, p = {c.overlap_p:.1f}"),
            ("fixed cost per token", f"{c.overhead_s_per_layer * 1e6:.1f} µs + "
                                     f"{c.overhead_s_per_layer_thread * 1e6:.2f} µs x threads, per layer"),
            ("width cost in prefill", f"{c.elementwise_s * 1e9:.1f} ns per layer x embedding element")]
    rows += [(f"decode {k}", f"{v:.1f} GB/s per core") for k, v in c.decode_gbps_per_core.items()
             if any(k in pt.model.active_bytes_by_type for pt in run.points)]
    rows += [(f"prefill {k}", f"{v:.1f} GFLOP/s per core") for k, v in c.prefill_gflops_per_core.items()
             if any(k in pt.model.active_bytes_by_type for pt in run.points)]
    if path:
        rows.append(("saved to", str(path)))
    out.print(kv_table("Fitted constants", rows))


# ---- bench -------------------------------------------------------------------------------------

def render_bench(results, model, box, history: Path | None) -> None:
    t = Table(title=printable(f"{model.name or model.path} on {box.machine.name}"), title_justify="left")
    for col in ("test", "threads", "measured t/s (median ± σ)", "min … max", "predicted", "vs predicted",
                "read GB/s", "vs at read", "roofline", "efficiency"):
        t.add_column(col, justify="left" if col == "test" else "right")
    for r in results:
        at_read = r.vs_predicted_at_read
        t.add_row(printable(r.test), str(r.threads), stats.pm_text(r.summary, 2, center="median"),
                  stats.range_text(r.summary, 2), f"{r.predicted_tokens_per_s:.2f}",
                  f"{r.vs_predicted:+.1%}", f"{r.read_gbps:.1f}" if r.read_gbps else "-",
                  f"{at_read:+.1%}" if at_read is not None else "-",
                  f"{r.roofline_tokens_per_s:.2f}" if r.roofline_tokens_per_s else "-",
                  f"{r.efficiency:.0%}" if r.efficiency is not None else "-")
    out.print(t)
    if any(r.read_gbps for r in results):
        info("read GB/s: read bandwidth at these threads just before the run; vs at read: measured "
             "against the prediction at that bandwidth")
    for r in results:
        s = r.summary
        if s.rel_stdev is not None and s.rel_stdev > 0.10:
            warn(f"{r.test} at {r.threads} threads varied by {s.rel_stdev:.0%} between repetitions",
                 "another process may be using the cores; run again on a quiet box")
        outliers = stats.outliers_text(s, 2)
        if outliers:
            warn(f"{r.test} at {r.threads} threads: {outliers} t/s",
                 "the median shown is robust to them; run again on a quiet box, or with more --reps")
    info(f"constants: {box.calibration.source}")
    if history:
        info(f"appended to {history}")

# ---- tune --------------------------------------------------------------------------------------

def render_tune(result, saved: Path | None) -> None:
    from cputune.commands.report_file import TRIAL_HEADERS, trial_rows

    for r in result.results:
        title = _engine_title(r.engine)
        t = Table(title=printable(f"{r.test} on {title}: {r.best.label}  —  {r.best_tokens_per_s:.2f} t/s, "
                                  f"{r.gain:.2f}x {title}'s defaults ({r.default_tokens_per_s:.2f} t/s)"),
                  title_justify="left")
        for col in TRIAL_HEADERS:
            t.add_column(col, justify="left" if col in ("stage", "settings", "outcome") else "right")
        for row in trial_rows(r):
            t.add_row(*row)
        out.print(t)
        for n in r.notes:
            info(n)
    if len(result.engines) > 1:
        _render_engines(result)
    info(f"tuned in {result.seconds:.0f} s of a {result.budget_s:.0f} s budget")
    if saved:
        info(f"saved to {saved}: `cputune serve` starts {result.model_path.name} with these settings")


def _render_engines(result) -> None:
    """Each engine's best beside llama.cpp's defaults (the engines round), per kind."""
    t = Table(title="Engines: each one's best, run alternately with llama.cpp's defaults", title_justify="left")
    for col, just in (("test", "left"), ("engine", "left"), ("best settings", "left"), ("t/s", "right"),
                      ("vs its defaults", "right"), ("vs llama.cpp defaults", "right"), ("", "left")):
        t.add_column(col, justify=just)
    for r in result.results:
        vs = "-" if r.vs_baseline is None else f"{r.vs_baseline:.2f}x"
        t.add_row(r.test, _engine_title(r.engine), r.best.label, f"{r.best_tokens_per_s:.2f}", f"{r.gain:.2f}x",
                  vs, "fastest" if r.overall else "")
    out.print(t)


# --- select / plan ---------------------------------------------------------------------------

def _gib1(n: float | None) -> str:
    return "-" if n is None else f"{n / (1 << 30):.1f}"


def _capacity_text(cap, numa: str) -> str:
    nodes = cap.node_bytes
    text = f"{gib_text(cap.total_bytes)} usable"
    if len(nodes) > 1:
        sizes = sorted(set(nodes.values()))
        per = " / ".join(gib_text(n) for n in sizes)
        text += f", {len(nodes)} NUMA nodes x {per}"
    if cap.hugepage_bytes:
        text += f" (hugepage pools of {gib_text(cap.hugepage_bytes)} counted as used)"
    if numa == "one-node":
        text += f"; pinned to node {cap.largest_node}: {gib_text(cap.largest_node_bytes)}"
    return text


def _settings_text(s) -> str:
    return (f"{s.ctx_tokens} tokens of {s.cache_type} KV cache, --numa {s.numa}, {s.threads} threads, "
            f"mmap {'on' if s.mmap else 'off'}, flash attention {'on' if s.flash_attn else 'off'}")


def _quality_cells(q) -> tuple[str, str, str]:
    """(PPL, KLD, how) cells of a cputune.model.quality.Quality. The PPL cell stays as narrow as plan's
    table needs: no mark for the preset's published row, ≈ interpolated, ? extrapolated; the third
    cell (select's table) spells out how, from how many rows of which family and which rows."""
    if q is None:
        return "-", "-", "-"
    mark = {"row": "", "interpolated": "≈", "extrapolated": "?"}.get(q.basis, "")
    v = q.ppl_change_pct
    ppl = "-" if v is None else mark + (f"+{v:.0f}" if v >= 10 else f"+{v:.1f}" if v >= 1 else f"+{v:.2f}")
    kld = "-" if q.kld is None else {"interpolated": "≈", "extrapolated": "?"}.get(q.kld_basis, "") + f"{q.kld:.4f}"
    how = {"row": "row", "interpolated": "interp.", "extrapolated": "extrap."}.get(q.basis, q.basis)
    rows = q.row_quant if q.exact else ("beyond " if q.basis == "extrapolated" else "≈ ") + "..".join(q.neighbours)
    return ppl, kld, f"{rows} ({how}, {q.n_rows} rows {q.model_family})"


def _calibration_text(cal) -> str:
    return cal.source.split(":")[0].split(";")[0]


def _yes(b: bool) -> str:
    return "[green]yes[/]" if b else "[red]no[/]"


def _ram_text(n) -> str:
    parts = [f"{_gib1(n.weights_bytes)} weights"]
    if n.repack_copy_bytes:
        parts.append(f"{_gib1(n.repack_copy_bytes)} repacked copy (mmap on)")
    parts += [f"{_gib1(n.kv_bytes)} KV", f"{_gib1(n.compute_bytes)} compute", f"{_gib1(n.headroom_bytes)} OS"]
    return f"{_gib1(n.total_bytes)} GiB = " + " + ".join(parts)


def _quality_sources(options) -> list[str]:
    seen = {}
    for o in options:
        if o.quality is not None:
            seen.setdefault(o.quality.model_family, o.quality.source)
    return [f"PPL and KLD estimated from the published rows of {fam} ({src}); no mark: the preset's own row, "
            "≈: interpolated between two rows in log(cost) against bits per weight, ?: extrapolated beyond the rows"
            for fam, src in seen.items()]


def render_selection(sel, box) -> None:
    s = sel.settings
    rows = [
        ("box", f"{box.machine.name} ({box.source})"),
        ("memory", _capacity_text(sel.capacity, s.numa)),
        ("serving", _settings_text(s) + (f", at least {s.min_tps:g} tok/s" if s.min_tps else "")),
        ("quants from", "catalog presets (no GGUF files)" if sel.from_catalog
         else "GGUF files: " + ", ".join(sorted({o.origin for o in sel.options}))),
        ("speed from", _calibration_text(box.calibration)),
    ]
    rec = sel.recommended
    rows.append(("recommended", Text.from_markup(f"[bold green]{printable(rec.quant)}[/] ({printable(rec.origin)})"
                                                 if rec else "[bold red]none[/]")))
    rows.append(("why", sel.why))
    if rec:
        rows.append(("RAM", _ram_text(rec.need)))
    out.print(kv_table(f"cputune select: {sel.model}", rows))

    files = not sel.from_catalog
    kld = any(o.quality and o.quality.kld is not None for o in sel.options)
    t = Table(title=f"Every quant at {s.ctx_tokens} tokens of context, best quality first", title_justify="left")
    cols = ["quant"] + (["file"] if files else []) + ["bpw", "RAM GiB", "spare GiB", "fits", "1 node",
                                                      "tg t/s", "pp t/s", "PPL +%"] + (["KLD"] if kld else []) + ["PPL row"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("quant", "file", "PPL row") else "right")
    for o in sel.options:
        ppl, kl, row = _quality_cells(o.quality)
        quant = printable(o.quant)
        cells = [f"[bold]{quant}[/]" if o is rec else quant] + ([printable(o.origin)] if files else [])
        cells += [f"{o.bits_per_weight:.2f}", _gib1(o.need_bytes), _gib1(o.margin_bytes), _yes(o.fits),
                  _yes(o.fits_one_node), f"{o.tg_tokens_per_s:.1f}", f"{o.prediction.pp_tokens_per_s:.1f}", ppl]
        t.add_row(*cells, *([kl] if kld else []), printable(row))
    out.print(t)
    if sel.what_would_fit:
        title = (f"What would fit {sel.what_would_fit[0].quant} instead" if rec
                 else "What would change that")
        out.print(kv_table(title, [(c.option, c.text) for c in sel.what_would_fit]))
    for line in sel.notes + tuple(_quality_sources(sel.options)):
        out.print(f"[dim]note: {printable(line)}[/]")


def render_plan(p, box) -> None:
    s = p.settings
    rows = [
        ("box", f"{p.machine.name} ({box.source})"),
        ("memory", _capacity_text(p.capacity, s.numa)),
        ("serving", _settings_text(s)),
        ("speed from", _calibration_text(box.calibration)),
    ]
    if p.target_tg_tokens_per_s:
        rows.append(("target", f"{p.target_tg_tokens_per_s:g} tok/s decode at {s.ctx_tokens} tokens of context"))
    out.print(kv_table("cputune plan", rows))
    target = p.target_tg_tokens_per_s
    t = Table(title="Every model and quant on this box, best quality first", title_justify="left")
    cols = ["model", "quant", "bpw", "RAM GiB", "fits", "1 node", "tg t/s", "pp t/s", "PPL +%"]
    if target:
        cols += ["needs GB/s", "channels"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("model", "quant") else "right", no_wrap=True)
    for i, r in enumerate(p.rows):
        o = r.option
        first = i == 0 or p.rows[i - 1].model_id != r.model_id
        last = i == len(p.rows) - 1 or p.rows[i + 1].model_id != r.model_id
        cells = [printable(r.model_id) if first else "", printable(o.quant), f"{o.bits_per_weight:.2f}", _gib1(o.need_bytes),
                 _yes(o.fits), _yes(o.fits_one_node), f"{o.tg_tokens_per_s:.1f}",
                 f"{o.prediction.pp_tokens_per_s:.1f}", _quality_cells(o.quality)[0]]
        if target:
            q = r.requirement
            cells += ([f"{q.read_gbps:.0f}", str(q.channels)] if q.reachable
                      else [f"[red]max {q.ceiling_tg_tokens_per_s:.1f} t/s[/]", "-"])
        t.add_row(*cells, end_section=last)
    out.print(t)
    if p.target_tg_tokens_per_s:
        from cputune.predict.hardware import ESTIMATED_READ_FRACTION

        mts = p.rows[0].requirement.channel_mts if p.rows else 0

        out.print(f"[dim]note: to decode {target:g} tok/s a box needs the RAM column and `needs GB/s` of "
                  "read bandwidth as `cputune probe` measures it over the nodes used, about the channels "
                  f"shown of {mts} MT/s memory at {ESTIMATED_READ_FRACTION:.0%} of their peak; 'max' rows are capped by compute and "
                  "per-token overhead at this thread count[/]")
    for line in p.notes + tuple(_quality_sources(r.option for r in p.rows)):
        out.print(f"[dim]note: {printable(line)}[/]")

# --- serve ---

def _gib_or_unknown(n: int | None) -> str:
    return "unknown" if n is None else f"{n / (1 << 30):.1f} GiB"


def warn_all(messages) -> None:
    for m in messages:
        warn(m)


def _placement_rows(p) -> list[tuple[str, Any]]:
    return [
        ("NUMA", f"{p.mode} ({p.reason})" if p.reason != f"--numa {p.requested}" else p.mode),
        ("nodes", f"threads on {', '.join(map(str, p.node_ids))}; memory on "
                  f"{', '.join(map(str, p.mem_node_ids))}"),
        ("numactl", " ".join(p.numactl_argv) or "-"),
        ("llama.cpp --numa", p.llama_numa or "-"),
        ("threads", f"{p.threads} (batch {p.threads_batch}); {p.physical_cores} physical cores on "
                    f"CPUs {p.cpu_list}"),
    ]


def render_serve_plan(plan) -> None:
    """The placement plan, the memory check and the exact command (what --dry-run shows)."""
    m = plan.memory
    rows = [("model", f"{plan.model_label} [{plan.quant}]"), ("engine", _engine_title(plan.engine)),
            ("url", plan.url)]
    rows += _placement_rows(plan.placement)
    n = m.need
    rows.append(("memory need", f"{_gib_or_unknown(n.total_bytes)}: weights {_bytes(n.weights_bytes)}, "
                                f"repack copy {_bytes(n.repack_copy_bytes)}, KV {_bytes(n.kv_bytes)} "
                                f"({n.ctx_tokens} tokens {n.cache_type}), compute {_bytes(n.compute_bytes)}, "
                                f"headroom {_bytes(n.headroom_bytes)}"))
    out.print(kv_table("llama-server plan", rows))
    t = Table(title="Memory", title_justify="left")
    for col, just in (("box", "left"), ("layers", "right"), ("needs", "right"), ("available", "right"),
                      ("fits", "left"), ("available from", "left")):
        t.add_column(col, justify=just)
    for b in m.boxes:
        t.add_row(printable(b.name), "-" if b.units is None else str(b.units), _gib_or_unknown(b.need_bytes),
                  _gib_or_unknown(b.available_bytes), "yes" if b.fits else "[bold red]no[/]", printable(b.source))
    out.print(t)
    if plan.page_cache is not None:
        pc = plan.page_cache
        nodes = ", ".join(f"node {k}: {v}" for k, v in sorted(pc.pages_by_node.items())) or "none"
        out.print(f"page cache: {pc.resident_fraction:.0%} of the model cached ({nodes} of "
                  f"{pc.sampled_pages} sampled pages), {pc.misplaced_fraction:.0%} on the wrong node")
    for note in plan.notes:
        out.print(f"note: {printable(note)}")
    env = " ".join(f"{k}={v}" for k, v in plan.environment.items())
    out.print("environment: " + (env or "inherited; no LLAMA_ARG_*, OMP_*, GOMP_* or KMP_* variable set"),
              markup=False, soft_wrap=True)
    out.print("command:", markup=False)
    out.print(plan.command, markup=False, soft_wrap=True)
    _render_choices(plan)


def _engine_title(name: str) -> str:
    return load_engine(name).title


def _choice_lines(choices) -> list[str]:
    """Why each of the engine's own options in a command is there."""
    return [f"why {' '.join(c.args) if c.args else f'{c.setting} {c.value} (the default, nothing written)'}: "
            f"{c.reason}" for c in choices]


def _render_choices(plan, indent: str = "") -> None:
    for line in _choice_lines(plan.choices):
        out.print(indent + line, markup=False, soft_wrap=True)


def render_choices(choices) -> None:
    """The engine's own options a bench ran with, and why (on stderr, beside the progress)."""
    for line in _choice_lines(choices):
        info(line)


def render_serve_started(plan, server, seconds: float) -> None:
    out.print(f"llama-server is ready at {plan.url} (pid {server.pid}, loaded in {seconds:.1f} s)",
              markup=False)
    out.print(f"  metrics: {plan.url}/metrics   log: {server.log_path}", markup=False, soft_wrap=True)
    out.print(f"  command: {plan.command}", markup=False, soft_wrap=True)
    _render_choices(plan, "  ")
    out.print("  Ctrl-C stops the server.", markup=False)


def render_worker_plan(plan) -> None:
    out.print(kv_table("ggml-rpc-server plan", [("endpoint", str(plan.endpoint))]
                       + _placement_rows(plan.placement)))
    out.print("command:", markup=False)
    out.print(plan.command, markup=False, soft_wrap=True)


def render_worker_started(plan, server, memory) -> None:
    out.print(f"RPC worker is ready at {plan.endpoint} (pid {server.pid}, {memory.devices} device, "
              f"{_gib_or_unknown(memory.total_bytes)} RAM, protocol {memory.protocol})", markup=False)
    out.print(f"  add it with: cputune serve --rpc {plan.endpoint} ...   log: {server.log_path}",
              markup=False, soft_wrap=True)
    out.print(f"  command: {plan.command}", markup=False, soft_wrap=True)
    out.print("  Ctrl-C stops the worker.", markup=False)
