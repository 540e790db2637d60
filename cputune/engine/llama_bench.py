"""Running the built llama-bench (and ik_llama.cpp's llama-sweep-bench) and reading its JSON rows
(never its markdown table)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cputune.core.errors import ConfigError, EngineError, ProcessFailed, process_failed
from cputune.core import launch
from cputune.core.launch import die_with_parent, help_flags

SWEEP_BENCH = "llama-sweep-bench"
# ik_llama.cpp's llama-bench names a -gp test "tg16@pp256": 16 tokens generated after a 256-token
# prompt, timed from the end of the prompt (examples/llama-bench/llama-bench.cpp @8337e4cd,
# TEST_KIND_GP), which is mainline's `-n 16 -d 256`.
_GEN_AFTER_PROMPT = re.compile(r"^tg(\d+)@pp(\d+)$")


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
    load_mode: str  # none, mmap, mlock, mmap+mlock, dio or auto
    use_mmap: bool | None  # None: "auto", llama.cpp decided
    flash_attn: bool | None  # None: "auto"
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


def _load_mode(r: dict) -> tuple[str, bool | None]:
    # Rows before PR #20834 (2026-07) carry use_mmap; later ones carry load_mode instead, where
    # mlock implies mmap (llama_cpp_cpu.md A4).
    if "load_mode" not in r:
        use_mmap = bool(r.get("use_mmap", False))
        return ("mmap" if use_mmap else "none"), use_mmap
    mode = str(r["load_mode"])
    return mode, None if mode == "auto" else mode in ("mmap", "mlock", "mmap+mlock")


def _flash_attn(value) -> bool | None:
    # A bool in older rows; since `-fa on|off|auto` the enum value 1, 0 or -1 (auto).
    if isinstance(value, str):
        return {"on": True, "off": False}.get(value)
    return None if value is None or value == -1 else bool(value)


def parse_rows(text: str) -> list[BenchRow]:
    rows = json.loads(text)
    out = []
    for r in rows:
        load_mode, use_mmap = _load_mode(r)
        n_prompt, n_depth = int(r.get("n_prompt", 0)), int(r.get("n_depth", 0))
        if _GEN_AFTER_PROMPT.match(str(r.get("test", ""))):
            n_prompt, n_depth = 0, n_prompt  # the prompt only fills the cache: it is the depth
        out.append(BenchRow(
            model_filename=r.get("model_filename", ""), model_type=r.get("model_type", ""),
            model_size_bytes=int(r.get("model_size", 0)), model_n_params=int(r.get("model_n_params", 0)),
            n_threads=int(r.get("n_threads", 0)), n_prompt=n_prompt,
            n_gen=int(r.get("n_gen", 0)), n_depth=n_depth,
            n_batch=int(r.get("n_batch", 0)), n_ubatch=int(r.get("n_ubatch", 0)),
            load_mode=load_mode, use_mmap=use_mmap, flash_attn=_flash_attn(r.get("flash_attn")),
            type_k=str(r.get("type_k", "")), type_v=str(r.get("type_v", "")),
            avg_ts=float(r.get("avg_ts", 0.0)), stddev_ts=float(r.get("stddev_ts", 0.0)),
            samples_ts=tuple(float(x) for x in r.get("samples_ts", [])),
            samples_ns=tuple(int(x) for x in r.get("samples_ns", [])),
            build_commit=str(r.get("build_commit", "")), cpu_info=str(r.get("cpu_info", ""))))
    return out


def takes_load_mode(binary: Path | str) -> bool:
    """Whether this llama-bench takes `-lm/--load-mode` (PR #20834, 2026-07), which replaced `-mmp 0|1`."""
    return "--load-mode" in help_text(binary)


def help_text(binary: Path | str) -> str:
    """The binary's --help (its defaults and the flags it takes), read once per binary version;
    "" for a missing binary (run() reports it)."""
    return launch.help_text(binary)


def depth_args(takes: frozenset[str], depth: int, n_prompt: Sequence[int],
               n_gen: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], list[str]]:
    """(n_prompt, n_gen, extra options) that run the tests with `depth` tokens in the KV cache:
    mainline's `-d` (PR #14363); where llama-bench has none, ik_llama.cpp's `-gp DEPTH,N` for
    decode (prefill at depth is llama-sweep-bench's: sweep_argv)."""
    n_prompt, n_gen = tuple(n_prompt), tuple(n_gen)
    if not depth:
        return n_prompt, n_gen, []
    if "-d" in takes or "--n-depth" in takes:
        return n_prompt, n_gen, ["-d", str(depth)]
    if "-gp" in takes:
        if any(n_prompt):
            raise EngineError("this llama-bench fills the cache only before decode (-gp): prefill at "
                              f"depth is measured with {SWEEP_BENCH}", hint="bench decode and prefill apart")
        return (0,), (0,), [w for n in n_gen if n for w in ("-gp", f"{depth},{n}")]
    raise EngineError("this llama-bench cannot fill the KV cache before a test (no -d or -gp)",
                      hint="run `cputune build --force` for a current build, or bench without --depth")


def takes_depth(binary: Path | str) -> bool:
    """Whether this llama-bench measures prefill at depth itself (-d); else llama-sweep-bench does."""
    flags = help_flags(binary)
    return "-d" in flags or "--n-depth" in flags


def bench_argv(binary: Path, model: Path, threads: Sequence[int] = (), n_prompt: Sequence[int] = (512,),
               n_gen: Sequence[int] = (128,), reps: int = 5, mmap: bool = True,
               extra: Sequence[str] = (), load_mode: bool | None = None, depth: int = 0) -> list[str]:
    """The mmap choice is always explicit: its default flipped twice in 2026 (llama_cpp_cpu.md A1).

    `load_mode` says whether to write it as `-lm mmap|none` or as the older `-mmp 1|0`; None asks
    the binary's --help, as `depth` (depth_args) does.
    """
    if load_mode is None:
        load_mode = takes_load_mode(binary)
    n_prompt, n_gen, fill = depth_args(help_flags(binary) if depth else frozenset(), depth, n_prompt, n_gen)
    mmap_args = ["-lm", "mmap" if mmap else "none"] if load_mode else ["-mmp", "1" if mmap else "0"]
    argv = [str(binary), "-m", str(model), "-o", "json", "-r", str(reps),
            "-p", ",".join(map(str, n_prompt)) or "0", "-n", ",".join(map(str, n_gen)) or "0",
            *mmap_args, *fill]
    if threads:
        argv += ["-t", ",".join(map(str, threads))]
    return argv + list(extra)


def sweep_argv(binary: Path, model: Path, threads: int, n_prompt: int, depth: int, mmap: bool = True,
               extra: Sequence[str] = ()) -> list[str]:
    """llama-sweep-bench measuring one ubatch of `n_prompt` tokens processed at `depth`: it sweeps
    the context in ubatch windows (examples/sweep-bench/sweep-bench.cpp @8337e4cd) and, with
    --sweep-stride depth/n_prompt, times only the windows at 0 and at `depth`. -n 1 keeps the
    decode it also times at each window short."""
    if n_prompt < 1 or depth % n_prompt:
        raise ConfigError(f"--depth {depth}: {SWEEP_BENCH} measures prefill at depth in windows of "
                          f"--n-prompt {n_prompt} tokens, so the depth must be a multiple of it",
                          hint=f"for example --depth {max(1, depth // max(n_prompt, 1)) * max(n_prompt, 1)}")
    argv = [str(binary), "-m", str(model), "-c", str(depth + n_prompt), "-ub", str(n_prompt),
            "-b", str(max(2048, n_prompt)), "-n", "1", "--sweep-stride", str(depth // n_prompt),
            "--output-format", "jsonl", "-t", str(threads), "-tb", str(threads)]
    # ik's common writes llama.log into the working directory unless given a --log-file base.
    argv += ["--log-file", str(launch.engine_log_base("ik_llama-sweep-bench"))]
    return argv + ([] if mmap else ["--no-mmap"]) + list(extra)


def parse_sweep(text: str, depth: int) -> dict:
    """The JSON line of the window at `depth` in llama-sweep-bench's output (its LOG_TEE lines go
    to stderr, among the loader's)."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"n_kv"' in line:
            row = json.loads(line)
            if int(row.get("n_kv", -1)) == depth:
                return row
    raise ValueError(f"no window at n_kv {depth}")


def run_sweep(argv: Sequence[str], depth: int, reps: int, model: Path, timeout_s: float | None = None) -> BenchRow:
    """`reps` llama-sweep-bench runs (it repeats only its first window itself, so each sample is
    one process: fill to `depth`, then the timed window); one BenchRow of prefill at depth."""
    samples = []
    for _ in range(reps):
        out = _run(argv, timeout_s, SWEEP_BENCH)
        try:
            row = parse_sweep(out, depth)
        except ValueError as e:
            raise ProcessFailed(f"{SWEEP_BENCH} printed no window at depth {depth}", argv, 0, out) from e
        samples.append(float(row["speed_pp"]))
    return BenchRow(
        model_filename=Path(model).name, model_type="", model_size_bytes=Path(model).stat().st_size,
        model_n_params=0, n_threads=int(row.get("n_threads_batch", 0)), n_prompt=int(row["pp"]),
        n_gen=0, n_depth=depth, n_batch=int(row.get("n_batch", 0)), n_ubatch=int(row.get("n_ubatch", 0)),
        load_mode="none" if "--no-mmap" in argv else "mmap", use_mmap="--no-mmap" not in argv,
        flash_attn=bool(row.get("flash_attn")), type_k="", type_v="",
        avg_ts=sum(samples) / len(samples), stddev_ts=0.0, samples_ts=tuple(samples),
        samples_ns=tuple(round(int(row["pp"]) / s * 1e9) for s in samples), build_commit="", cpu_info="")


def run(argv: Sequence[str], timeout_s: float | None = None) -> list[BenchRow]:
    """Run llama-bench and parse its rows. It dies with cputune (no orphan bench keeps the cores
    busy), and GGML_NO_BACKTRACE (unless set) keeps ggml from attaching gdb to a crash: the
    GGML_ASSERT line is the reason shown, and gdb's dump only delays it."""
    p = _run(argv, timeout_s, "llama-bench", split=True)
    try:
        return parse_rows(p.stdout)
    except (ValueError, TypeError) as e:
        raise ProcessFailed("llama-bench printed no JSON rows", argv, p.returncode,
                            p.stdout + p.stderr) from e


def _run(argv: Sequence[str], timeout_s: float | None, name: str, split: bool = False):
    """Run a bench program that dies with cputune; its stdout + stderr (the process when `split`)."""
    env = dict(os.environ)
    env.setdefault("GGML_NO_BACKTRACE", "1")
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, errors="replace", timeout=timeout_s,
                           env=env, preexec_fn=die_with_parent())
    except OSError as e:
        raise ProcessFailed(f"cannot run {name}: {e}", argv, None,
                            hint="build llama.cpp first (`cputune build`)") from e
    except subprocess.TimeoutExpired as e:
        # TimeoutExpired holds bytes whatever text= says (subprocess docs).
        out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
        raise ProcessFailed(f"{name} did not finish in {timeout_s:g} s", argv, None, out) from e
    if p.returncode != 0:
        raise process_failed(name, argv, p.returncode, p.stdout + p.stderr)
    return p if split else p.stdout + p.stderr
