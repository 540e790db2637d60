"""`cputune bench`: llama-bench on a model, measured beside predicted and the roofline, kept in a history.

The efficiency column (measured / roofline) is the number a builder tracks: it says how much of
what the memory allows llama.cpp gets, independent of the model's size.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from cputune.core import stats
from cputune.engine import llama_bench
from cputune.machine import bandwidth
from cputune.machine.bandwidth import Measurement
from cputune.engine.build import DEFAULT_ENGINE
from cputune.core.checks import MAX_THREADS, MAX_TOKENS, finite
from cputune.core.errors import ConfigError, EngineError, WriteError
from cputune.core.fsutil import cache_root, open_regular
from cputune.model.gguf_model import ModelProfile
from cputune.predict.hardware import Box
from cputune.predict.predictor import Prediction, Settings, at_read_bandwidth, predict


@dataclass(frozen=True, slots=True)
class BenchResult:
    """One test (pp or tg) at one thread count: samples, their spread (stats.summarize's, kept
    flat for the history lines), and the prediction."""

    test: str  # "tg32", "pp256", "tg32 @ d4096"
    kind: str  # tg | pp
    threads: int
    depth: int
    median_tokens_per_s: float
    mean_tokens_per_s: float
    stddev_tokens_per_s: float | None  # None for one repetition: no σ
    min_tokens_per_s: float
    max_tokens_per_s: float
    samples_tokens_per_s: tuple[float, ...]
    predicted_tokens_per_s: float
    roofline_tokens_per_s: float | None  # decode only: effective bandwidth / bytes per token
    build_commit: str
    bytes_per_token: float | None = None  # decode: weights and KV read per token (the roofline's x)
    effective_bw_gbps: float | None = None
    # Read bandwidth at these threads just before the llama-bench call (bandwidth.combine_bursts
    # of its burst, whose timed trials are kept), and the prediction at that bandwidth (issue 18).
    read_gbps: float | None = None
    read_samples_gbps: tuple[float, ...] = ()
    predicted_at_read_tokens_per_s: float | None = None
    engine: str = DEFAULT_ENGINE
    args: tuple[str, ...] = ()  # the engine's own options the test ran with (engine_args.choose)

    @property
    def summary(self) -> stats.Summary:
        return stats.summarize(self.samples_tokens_per_s)

    @property
    def vs_predicted(self) -> float:
        return self.median_tokens_per_s / self.predicted_tokens_per_s - 1

    @property
    def vs_predicted_at_read(self) -> float | None:
        p = self.predicted_at_read_tokens_per_s
        return self.median_tokens_per_s / p - 1 if p else None

    @property
    def efficiency(self) -> float | None:
        return self.median_tokens_per_s / self.roofline_tokens_per_s if self.roofline_tokens_per_s else None


def summarize(row: llama_bench.BenchRow, pred: Prediction, read: Measurement | None = None,
              pred_at_read: Prediction | None = None, engine: str = DEFAULT_ENGINE,
              args: Sequence[str] = (), build_commit: str = "") -> BenchResult:
    """`build_commit` stands in for a row's own when the build could not stamp it (ik_llama.cpp's
    rows say "unknown")."""
    s = stats.summarize(row.samples_ts or (row.avg_ts,))
    kind = "tg" if row.n_gen else "pp"

    def rate(p: Prediction | None) -> float | None:
        return None if p is None else p.tg_tokens_per_s if kind == "tg" else p.pp_tokens_per_s
    return BenchResult(
        test=row.test, kind=kind, threads=row.n_threads, depth=row.n_depth,
        median_tokens_per_s=s.median, mean_tokens_per_s=s.mean, stddev_tokens_per_s=s.stdev,
        min_tokens_per_s=s.min, max_tokens_per_s=s.max, samples_tokens_per_s=s.samples,
        predicted_tokens_per_s=rate(pred),
        roofline_tokens_per_s=pred.roofline_tg_tokens_per_s if kind == "tg" else None,
        build_commit=row.build_commit if row.build_commit not in ("", "unknown") else build_commit,
        bytes_per_token=pred.bytes_per_token if kind == "tg" else None,
        effective_bw_gbps=pred.effective_bw_gbps,
        read_gbps=bandwidth.combine_bursts([read]).gbps if read else None,
        read_samples_gbps=read.gbps.samples if read else (), predicted_at_read_tokens_per_s=rate(pred_at_read),
        engine=engine, args=tuple(args))


def run_bench(bench_bin: Path, model_path: Path, model: ModelProfile, box: Box, threads: Sequence[int],
              n_prompt: int = 256, n_gen: int = 32, depth: int = 0, reps: int = 5,
              progress: Callable[[int, int, str], None] | None = None,
              read_now: Callable[[int], Measurement] | None = None, *, engine: str = DEFAULT_ENGINE,
              extra: Sequence[str] = (), sweep_bin: Path | None = None, sweep_extra: Sequence[str] = (),
              build_commit: str = "") -> list[BenchResult]:
    """One llama-bench call per thread count (so progress can move), each predicted the same way;
    `read_now(threads)` (probe.moment_reader) reads bandwidth just before each call, and each
    result is predicted at that bandwidth too. `extra` goes to llama-bench (the engine's own
    options); at depth, a llama-bench without -d (ik_llama.cpp's) runs decode with -gp and leaves
    prefill to `sweep_bin` (llama-sweep-bench, given `sweep_extra`)."""
    sweeps = bool(depth and n_prompt and not llama_bench.takes_depth(bench_bin))
    if sweeps and sweep_bin is None:
        raise EngineError("this llama-bench cannot measure prefill at depth, and the build has no "
                          f"{llama_bench.SWEEP_BENCH}", hint="pass --n-prompt 0 to bench decode only")
    out = []
    for i, t in enumerate(threads):
        if progress:
            progress(i, len(threads), f"{t} threads")
        read = read_now(t) if read_now else None
        rows = []
        if sweeps:
            rows.append(llama_bench.run_sweep(
                llama_bench.sweep_argv(sweep_bin, model_path, t, n_prompt, depth, extra=sweep_extra),
                depth, reps, model_path, timeout_s=3600))
        if n_gen or not sweeps:
            argv = llama_bench.bench_argv(bench_bin, model_path, threads=(t,), n_prompt=(0 if sweeps else n_prompt,),
                                          n_gen=(n_gen,), reps=reps, extra=extra, depth=depth)
            rows += llama_bench.run(argv, timeout_s=3600)
        settings = Settings(threads=t, depth=depth, n_ubatch=min(n_prompt, 512) or 512, engine=engine)
        pred = predict(model, box.machine, settings, box.calibration)
        pred_at_read = None
        if read:
            now = at_read_bandwidth(box.machine, t, bandwidth.combine_bursts([read]).gbps, settings.numa)
            pred_at_read = predict(model, now, settings, box.calibration)
        out += [summarize(row, pred, read, pred_at_read, engine, sweep_extra if row.n_prompt and sweeps else extra,
                          build_commit) for row in rows]
    if progress:
        progress(len(threads), len(threads), "done")
    return out


def history_path() -> Path:
    return cache_root() / "bench-history.jsonl"


def append_history(results: Sequence[BenchResult], model: ModelProfile, machine_name: str,
                   path: Path | None = None) -> Path:
    """One JSON line per result, appended in one write so lines never interleave. Only to a
    regular file (never through a symbolic link, never blocking on a FIFO); a last line left
    without its newline (a run cut off) is ended first, so the new lines stay readable. A
    failure is a WriteError naming the file; what was there stays as it was."""
    from cputune.core.jsonio import plain

    path = path or history_path()
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    text = "".join(json.dumps({"at": when, "machine": machine_name, "model": model.path,
                               "model_name": model.name, "file_type": model.file_type,
                               **plain(r)}) + "\n" for r in results)
    hint = f"the results above are not in the history; remove or move {path} and bench again"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            there = os.lstat(path).st_mode
        except FileNotFoundError:
            there = stat.S_IFREG
        if not stat.S_ISREG(there):
            what = "a symbolic link" if stat.S_ISLNK(there) else "not a regular file"
            raise WriteError(f"cannot add to the bench history {path}: it is {what}", hint=hint)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o666)
    except OSError as e:
        why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise WriteError(f"cannot add to the bench history {path} ({why})", hint=hint) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise WriteError(f"cannot add to the bench history {path}: it is not a regular file", hint=hint)
        if st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
            text = "\n" + text
        data = text.encode()
        if os.write(fd, data) != len(data):
            raise WriteError(f"cannot add to the bench history {path} (a short write)", hint=hint)
    except OSError as e:
        raise WriteError(f"cannot add to the bench history {path} ({e.strerror})", hint=hint) from None
    finally:
        os.close(fd)
    return path


# What append_history writes on a line, and what each field may hold when a line has it: text, a
# whole number in range, or a finite number in range (None where the result allows it). An older
# line may lack later fields; a field of the wrong kind makes the line damaged (a report
# must not die on `"threads": [1]` or `"median_tokens_per_s": "fast"`).
_TEXT = {"at", "machine", "test", "kind", "build_commit", "engine"}
_TEXT_OR_NONE = {"model", "model_name", "file_type"}  # model: None for a catalog profile
_WHOLE = {"threads": (1, MAX_THREADS), "depth": (0, MAX_TOKENS)}
_RATE = (0.0, 1e9)  # tokens/s
_NUMBERS = {"median_tokens_per_s": _RATE, "mean_tokens_per_s": _RATE, "min_tokens_per_s": _RATE,
            "max_tokens_per_s": _RATE, "predicted_tokens_per_s": _RATE}
_NUMBERS_OR_NONE = {"stddev_tokens_per_s": _RATE, "roofline_tokens_per_s": _RATE,
                    "predicted_at_read_tokens_per_s": _RATE, "bytes_per_token": (0.0, 1e15),
                    "effective_bw_gbps": (0.0, 1e6), "read_gbps": (0.0, 1e6)}
_NUMBER_LISTS = {"samples_tokens_per_s": _RATE, "read_samples_gbps": (0.0, 1e6)}
# A history line is about 1 KB; one far longer is not one of bench's, and only the newest
# HISTORY_BYTES of a history are read (memory stays bounded however long it grows).
MAX_LINE_BYTES = 1 << 20
HISTORY_BYTES = 16 << 20


def _in(value, lo: float, hi: float) -> bool:
    return finite(value) and lo <= value <= hi


def history_record_ok(rec) -> bool:
    """Whether one parsed history line is a record bench could have written (see the tables)."""
    if not isinstance(rec, dict):
        return False
    for k, v in rec.items():
        if k in _TEXT and not isinstance(v, str) or k in _TEXT_OR_NONE and not (v is None or isinstance(v, str)):
            return False
        if k in _WHOLE and not (isinstance(v, int) and _in(v, *_WHOLE[k])):
            return False
        if k in _NUMBERS and not _in(v, *_NUMBERS[k]) or k in _NUMBERS_OR_NONE and not (v is None or _in(v, *_NUMBERS_OR_NONE[k])):
            return False
        if k in _NUMBER_LISTS and not (isinstance(v, list) and all(_in(x, *_NUMBER_LISTS[k]) for x in v)):
            return False
        if k == "args" and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            return False
    return True


@dataclass(frozen=True, slots=True)
class History:
    records: tuple[dict, ...]
    skipped: int  # damaged lines (cut by a crash, edited, of another program) left out
    path: Path


def load_history(path: Path | None = None) -> History:
    """Every well-formed record of the bench history, oldest first, and how many lines were
    damaged (cut by a crash, not JSON, nested absurdly deep, or fields of the wrong kind or out
    of range): those are skipped and counted, not fatal. A history that is not a regular file
    (a FIFO, a device) is a ConfigError; beyond HISTORY_BYTES only the newest lines are read."""
    path = path or history_path()
    if not path.exists():
        return History((), 0, path)
    fd, st = open_regular(path, hint=f"remove {path}; `cputune bench` starts a new one")
    out, skipped = [], 0
    try:
        with os.fdopen(fd, "rb") as f:
            if st.st_size > HISTORY_BYTES:
                f.seek(st.st_size - HISTORY_BYTES)
                f.readline(MAX_LINE_BYTES)  # the rest of a line cut by the seek: not counted
            while line := f.readline(MAX_LINE_BYTES + 1):
                if len(line) > MAX_LINE_BYTES:
                    skipped += 1
                    while line and not line.endswith(b"\n"):  # the rest of the long line
                        line = f.readline(MAX_LINE_BYTES)
                    continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except (ValueError, RecursionError):
                    rec = None
                if history_record_ok(rec):
                    out.append(rec)
                else:
                    skipped += 1
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or e})") from None
    return History(tuple(out), skipped, path)


def read_history(path: Path | None = None) -> list[dict]:
    """The well-formed records of the bench history (load_history, without the count)."""
    return list(load_history(path).records)
