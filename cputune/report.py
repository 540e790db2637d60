"""Rendering results: rich tables for people (stdout), one JSON document for scripts, and
progress on stderr so `cputune ... --json | jq` always works."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from cputune import __version__

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def plain(obj: Any) -> Any:
    """Dataclasses, paths and tuples -> JSON-ready values (field names kept, as asdict does)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def document(schema: str, **payload: Any) -> dict:
    return {"cputune_version": __version__, "schema": schema, **plain(payload)}


def print_json(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


def warn(message: str, hint: str | None = None) -> None:
    err.print(f"[yellow]Warning:[/] {message}")
    if hint:
        err.print(f"  hint: {hint}")


def info(message: str) -> None:
    err.print(message)


@contextlib.contextmanager
def progress(description: str, total: float | None = 100.0, enabled: bool = True) -> Iterator:
    """A progress bar on stderr; yields update(completed, text=None)."""
    if not enabled:
        yield lambda completed, text=None: None
        return
    cols = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
            TimeElapsedColumn(), TextColumn("[dim]{task.fields[detail]}")]
    with Progress(*cols, console=err, transient=True) as p:
        task = p.add_task(description, total=total, detail="")

        def update(completed: float, text: str | None = None) -> None:
            p.update(task, completed=completed, detail=(text or "")[:60])

        yield update


def kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    t = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, "" if v is None else str(v))
    return t


# ---- build ---------------------------------------------------------------------------------

def render_build(b) -> None:
    feats = " ".join(k for k, v in sorted(b.features.items()) if v == 1)
    out.print(kv_table("llama.cpp build" + (" (cached)" if b.cached else ""), [
        ("key", b.key),
        ("target cpu", b.target_cpu),
        ("source", f"llama.cpp {b.source_commit or b.source_label}"
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
    t = Table(title="Cached llama.cpp builds", title_justify="left")
    for col, just in (("key", "left"), ("target", "left"), ("built", "left"), ("seconds", "right"),
                      ("AVX2", "right"), ("AVX512", "right")):
        t.add_column(col, justify=just)
    for b in builds:
        t.add_row(b.key, b.target_cpu, b.built_at, f"{b.build_seconds:.0f}",
                  str(b.features.get("AVX2", "?")), str(b.features.get("AVX512", "?")))
    out.print(t)


def render_binding(status) -> None:
    if status.lib_dir is None:
        out.print("llama-cpp-python: not installed (run `cputune build --python`)")
    else:
        out.print(f"llama-cpp-python {status.installed_version}: linked {len(status.linked)} "
                  f"libraries into {status.lib_dir}")
