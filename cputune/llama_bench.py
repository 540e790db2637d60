"""Running the built llama-bench and reading its JSON rows (never its markdown table)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cputune.errors import ProcessFailed


@dataclass(frozen=True, slots=True)
class BenchRow:
    """One llama-bench test (tools/llama-bench/llama-bench.cpp JSON fields)."""

    model_filename: str
    model_type: str
    model_size_bytes: int
    model_n_params: int
    n_threads: int
    n_prompt: int
    n_gen: int
    n_depth: int
    n_batch: int
    n_ubatch: int
    use_mmap: bool
    flash_attn: bool
    type_k: str
    type_v: str
    avg_ts: float
    stddev_ts: float
    samples_ts: tuple[float, ...]
    samples_ns: tuple[int, ...]
    build_commit: str
    cpu_info: str

    @property
    def test(self) -> str:
        name = f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"
        if self.n_prompt and self.n_gen:
            name = f"pp{self.n_prompt}+tg{self.n_gen}"
        return name + (f" @ d{self.n_depth}" if self.n_depth else "")


def parse_rows(text: str) -> list[BenchRow]:
    rows = json.loads(text)
    out = []
    for r in rows:
        out.append(BenchRow(
            model_filename=r.get("model_filename", ""), model_type=r.get("model_type", ""),
            model_size_bytes=int(r.get("model_size", 0)), model_n_params=int(r.get("model_n_params", 0)),
            n_threads=int(r.get("n_threads", 0)), n_prompt=int(r.get("n_prompt", 0)),
            n_gen=int(r.get("n_gen", 0)), n_depth=int(r.get("n_depth", 0)),
            n_batch=int(r.get("n_batch", 0)), n_ubatch=int(r.get("n_ubatch", 0)),
            use_mmap=bool(r.get("use_mmap", False)), flash_attn=bool(r.get("flash_attn", False)),
            type_k=str(r.get("type_k", "")), type_v=str(r.get("type_v", "")),
            avg_ts=float(r.get("avg_ts", 0.0)), stddev_ts=float(r.get("stddev_ts", 0.0)),
            samples_ts=tuple(float(x) for x in r.get("samples_ts", [])),
            samples_ns=tuple(int(x) for x in r.get("samples_ns", [])),
            build_commit=str(r.get("build_commit", "")), cpu_info=str(r.get("cpu_info", ""))))
    return out


def bench_argv(binary: Path, model: Path, threads: Sequence[int] = (), n_prompt: Sequence[int] = (512,),
               n_gen: Sequence[int] = (128,), reps: int = 5, mmap: bool = True,
               extra: Sequence[str] = ()) -> list[str]:
    """-mmp is always explicit: its default flipped twice in 2026 (llama_cpp_cpu.md A1)."""
    argv = [str(binary), "-m", str(model), "-o", "json", "-r", str(reps),
            "-p", ",".join(map(str, n_prompt)) or "0", "-n", ",".join(map(str, n_gen)) or "0",
            "-mmp", "1" if mmap else "0"]
    if threads:
        argv += ["-t", ",".join(map(str, threads))]
    return argv + list(extra)


def run(argv: Sequence[str], timeout_s: float | None = None) -> list[BenchRow]:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s)
    if p.returncode != 0:
        raise ProcessFailed(f"llama-bench failed (exit {p.returncode})", argv, p.returncode,
                            p.stdout + p.stderr)
    try:
        return parse_rows(p.stdout)
    except (ValueError, TypeError) as e:
        raise ProcessFailed("llama-bench printed no JSON rows", argv, p.returncode,
                            p.stdout + p.stderr) from e
