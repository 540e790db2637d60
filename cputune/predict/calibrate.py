"""Fit the predictor's constants to real llama-bench runs on synthetic models shaped like the target.

Orchestration (generate, quantize, bench) and the fit live here; the model they fit is
predictor.predict, so what is calibrated is exactly what is predicted.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cputune.core import stats
from cputune.engine import llama_bench
from cputune.machine import bandwidth
from cputune.model import gguf_model, synth
from cputune.machine.bandwidth import Measurement
from cputune.core.data import load_csv, load_toml
from cputune.core.fsutil import cache_root
from cputune.core.errors import ConfigError
from cputune.core.jsonio import document, from_plain, read_json, write_json
from cputune.model.gguf_model import ModelProfile
from cputune.predict.predictor import (BOX_TERM_RANGE, BOX_TERMS, Calibration, MachineBandwidth, Settings,
                                      at_read_bandwidth, nearest_rate, predict, rates_for)

MIB = 1 << 20
PRIOR_WEIGHT = 0.01
SCHEMA = "cputune.calibration/1"


@dataclass(frozen=True, slots=True)
class Point:
    """One model at one thread count: the best decode and prompt tokens/s of its repetitions,
    with every repetition kept (`*_samples`) to show the spread; and the read bandwidth at that
    thread count just before its runs (bandwidth.combine_bursts over the bursts, each burst's
    figure in `read_gbps_samples`), which the fit predicts it at. None: the profile's."""

    model: ModelProfile
    threads: int
    n_prompt: int
    tg_tokens_per_s: float
    pp_tokens_per_s: float
    tg_samples: tuple[float, ...] = ()
    pp_samples: tuple[float, ...] = ()
    read_gbps: float | None = None
    read_gbps_samples: tuple[float, ...] = ()
    depth: int = 0  # tokens in the KV cache before the test (llama-bench -d)

    def settings(self) -> Settings:
        return Settings(threads=self.threads, n_ubatch=self.n_prompt, depth=self.depth)

    def machine(self, m: MachineBandwidth) -> MachineBandwidth:
        """The machine this point ran on: `m` at the read bandwidth measured before it."""
        return at_read_bandwidth(m, self.threads, self.read_gbps) if self.read_gbps else m


def decode_type_ratios() -> dict[str, float]:
    """configs/decode_type_ratios.csv: each weight type's decode rate per byte over Q4_K's on
    the same core, measured one type at a time (benchmarks/type_rates.py), each value checked."""
    known = gguf_model.bits_per_weight()
    out = {}
    for r in load_csv("decode_type_ratios.csv"):
        t, v = r.get("type") or "", r.get("ratio_to_q4_k") or ""
        try:
            ratio = float(v)
        except ValueError:
            ratio = math.nan
        if t not in known or not 0 < ratio <= 10:
            raise ConfigError(f"decode_type_ratios.csv: row {t!r} {v!r} is not a known ggml type with a "
                              "ratio in (0, 10]", hint="re-run benchmarks/type_rates.py --csv")
        out[t] = ratio
    return out


# Each scalar constant's range (lo, hi, lo_open): wide enough for any fit of a real box, narrow
# enough that a damaged file cannot divide by zero, overflow a power or predict a negative speed.
_SCALAR_RANGES: dict[str, tuple[float, float, bool]] = {
    **{k: (0.0, 10.0, True) for k in ("bw_efficiency", "moe_bw_efficiency", "moe_prefill_efficiency",
                                      "moe_decode_efficiency", "page_4k_efficiency", "avx512_prefill_factor")},
    **{k: (0.0, 1e6, True) for k in ("attn_gflops_per_core", "attn_prefill_gflops_per_core")},
    **{k: (0.0, 100.0, True) for k in ("mla_attn_factor", "fa_off_decode_factor", "fa_off_prefill_factor",
                                       "fa_off_mla_decode_factor", "ik_tg_factor", "ik_pp_factor", "ik_attn_factor")},
    **{k: (0.0, 2.0, False) for k in ("thread_scaling", "prefill_thread_scaling")},
    **{k: (0.0, 1.0, False) for k in ("overhead_s_per_layer", "overhead_s_per_layer_thread")},
    "elementwise_s": (0.0, 1e-3, False),
    "fa_kv_row_flops": (0.0, 1e6, False),
    "fa_kv_gap_bytes": (0.0, 1e6, True),
    **{k: (0.0, 100.0, False) for k in ("overhead_node_factor", "prefill_node_factor")},
    **{k: (0.0, 0.99, False) for k in ("serial_share", "prefill_serial_share")},
    **{k: (-0.99, 1.0, False) for k in ("smt_tg_gain", "smt_pp_gain")},
    "overlap_p": (0.0, 64.0, False),
}
_BANDS = ("tg_error_band", "pp_error_band", "tg_error_band_new_box", "pp_error_band_new_box")


def _check_scalars(cal: Calibration, where: str) -> None:
    for name, (lo, hi, lo_open) in _SCALAR_RANGES.items():
        v = getattr(cal, name)
        ok = math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi
        if name == "overlap_p":
            ok = ok and (v == 0 or v >= 0.05)  # 0 is max(); a p-norm's 2^(1/p) overflows below
        if not ok:
            span = f"{'above ' + str(lo) if lo_open else 'from ' + str(lo)} to {hi:g}"
            raise ConfigError(f"{where}: {name} must be a number {span}, not {v}", hint="re-run `cputune calibrate`")
    for name in _BANDS:
        lo, hi = getattr(cal, name)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= 100):
            raise ConfigError(f"{where}: {name} must be [low, high] with 0 < low <= high <= 100, not "
                              f"[{lo}, {hi}]", hint="re-run `cputune calibrate`")


def calibration_from(c: dict, where: str = "calibration") -> Calibration:
    """A Calibration from a calibration.toml section or a saved calibration.json, every field
    checked for its type (jsonio.from_plain) and every rate for being positive."""
    if not isinstance(c, dict):
        raise ConfigError(f"{where} is not a table of constants")
    try:
        cal = from_plain(Calibration, {k: v for k, v in c.items() if k in Calibration.__slots__})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e.message}", hint="re-run `cputune calibrate`") from None
    _check_scalars(cal, where)
    tables = [("decode_gbps_per_core", cal.decode_gbps_per_core),
              ("prefill_gflops_per_core", cal.prefill_gflops_per_core),
              ("moe_prefill_efficiency_by_type", cal.moe_prefill_efficiency_by_type)]
    tables += [(f"family_rates.{f}.{k}", t) for f, fr in cal.family_rates.items() for k, t in fr.items()]
    for name, table in tables:
        for t, r in table.items():
            if not (math.isfinite(r) and 0 < r <= 1e9):
                raise ConfigError(f"{where}: {name}.{t} must be a number above 0 (at most 1e9), not {r}",
                                  hint="re-run `cputune calibrate`")
    lo, hi = BOX_TERM_RANGE
    for box, terms in cal.box_terms.items():
        for k, v in terms.items():
            if k not in BOX_TERMS or not (math.isfinite(v) and lo <= v <= hi):
                raise ConfigError(f"{where}: box_terms.{box}.{k} must be one of {', '.join(BOX_TERMS)} "
                                  f"with a factor in {lo}..{hi}, not {v}", hint="re-run `cputune calibrate`")
    if not cal.decode_gbps_per_core or not cal.prefill_gflops_per_core:
        raise ConfigError(f"{where}: no per-core rates", hint="re-run `cputune calibrate`")
    # The types' ratios are the kernels' and the core's, measured once and shipped: every
    # calibration (a box's own, the published fit) reads them from the data file.
    return replace(cal, decode_type_ratio=decode_type_ratios())


def default_calibration(section: str = "default") -> Calibration:
    """configs/calibration.toml: the constants shipped, each with its source.

    `default` is the starting point for this box's fit; `published` is fitted to the big-server
    runs in shared/reference/published_measurements.md and serves the hardware profiles.
    """
    return calibration_from(load_toml("calibration.toml")[section], f"calibration.toml [{section}]")


def calibration_path() -> Path:
    """Beside the machine profile: a calibration belongs to the box it was measured on."""
    return cache_root() / "calibration.json"


def save_calibration(cal: Calibration, path: Path | None = None) -> Path:
    path = path or calibration_path()
    write_json(path, document(SCHEMA, calibration=cal))
    return path


def load_calibration(path: Path | None = None) -> Calibration | None:
    """This box's fitted constants, or None when `cputune calibrate` has not run."""
    path = path or calibration_path()
    if not path.exists():
        return None
    doc = read_json(path, SCHEMA)
    return calibration_from(doc.get("calibration"), str(path))


# --------------------------------------------------------------------------------------------
# measuring


def make_models(folder: Path, llama_quantize: Path, arch: str, sizes_bytes: Sequence[int],
                quants: Sequence[str], progress: Callable[[str], None] | None = None) -> list[Path]:
    """Synthetic f16 models of the given sizes, quantized; files are reused when present.

    `folder` is a work folder calibrate keeps (created here); a run killed midway leaves locked
    temporary files there, which the next write into it removes (fsutil.clean_stale)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for size in sizes_bytes:
        shape = synth.shape_for_size(arch, size, "f16")
        base = folder / f"{arch}-{size // MIB}M-f16.gguf"
        if not base.exists():
            if progress:
                progress(f"writing {base.name}")
            synth.write_model(base, shape)
        for q in quants:
            if q.lower() == "f16":
                out.append(base)
                continue
            dst = folder / f"{arch}-{size // MIB}M-{q.lower()}.gguf"
            if not dst.exists():
                if progress:
                    progress(f"quantizing {dst.name}")
                synth.quantize(base, dst, q.upper(), llama_quantize)
            out.append(dst)
    return out


def measure(llama_bench_bin: Path, models: Sequence[Path], threads: Sequence[int],
            n_prompt: int = 64, n_gen: int = 16, reps: int = 3, passes: int = 1,
            progress: Callable[[int, int, str], None] | None = None,
            read_now: Callable[[int], Measurement] | None = None,
            clock: Callable[[], float] = time.monotonic,
            depths: Sequence[int] = (0,), depth_models: Sequence[Path] = ()) -> list[Point]:
    """Bench every model at every thread count, `passes` sweeps over all of them; the models in
    `depth_models` also at each of `depths` (llama-bench -d: tokens already in the KV cache),
    which is what attention's rates are fitted on.

    A point is the fastest repetition, not the median: another tenant, a page-cache flush or a
    migrated thread only ever slows a run, so the best run is the nearest to what the box does
    alone, and that is what the predictor predicts. Sweeps spread a model's runs over time, so
    one slow minute on a shared host cannot own a point.

    `read_now(threads)` (probe.moment_reader) reads bandwidth before each model's runs at each
    thread count: a shared host's bandwidth swings 2x within seconds (issue 18), so a point is
    fitted at the bandwidth of its own runs, not at a profile's taken earlier.
    """
    samples: dict[tuple[Path, int], tuple[list[float], list[float]]] = {}
    reads: dict[tuple[Path, int], list[Measurement]] = {}
    steps = passes * len(models)
    t0 = clock()
    for k in range(passes):
        for i, path in enumerate(models):
            if progress:
                sweep = f" (sweep {k + 1}/{passes})" if passes > 1 else ""
                progress(k * len(models) + i, steps, path.name + sweep)
            if read_now:
                for t in threads:
                    at = clock() - t0
                    reads.setdefault((path, t), []).append(replace(read_now(t), burst=k, at_s=at))
            ds = sorted(set(depths) | {0}) if path in set(depth_models) else [0]
            extra = ["-d", ",".join(map(str, ds))] if len(ds) > 1 else []
            argv = llama_bench.bench_argv(llama_bench_bin, path, threads=threads, n_prompt=(n_prompt,),
                                          n_gen=(n_gen,), reps=reps, extra=extra)
            for r in llama_bench.run(argv, timeout_s=600):
                tg, pp = samples.setdefault((path, r.n_threads, r.n_depth), ([], []))
                (tg if r.n_gen > 0 else pp).extend(r.samples_ts or (r.avg_ts,))
    if progress:
        progress(steps, steps, "done")
    points = []
    for path in models:
        prof = gguf_model.read_model(path)
        for (p_, t, d), (tg, pp) in sorted(samples.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            if p_ != path or not (tg and pp):
                continue
            bw = bandwidth.combine_bursts(reads[(path, t)]) if (path, t) in reads else None
            s_tg, s_pp = stats.summarize(tg), stats.summarize(pp)
            points.append(Point(prof, t, n_prompt, s_tg.max, s_pp.max, s_tg.samples, s_pp.samples,
                                bw.gbps if bw else None, bw.burst_gbps if bw else (), depth=d))
    return points


def read_range(points: Sequence[Point]) -> dict[int, tuple[float, float, int]]:
    """(lowest, highest, bursts) of the read bandwidth measured before the runs, by thread count."""
    out: dict[int, list[float]] = {}
    for p in points:
        out.setdefault(p.threads, []).extend(p.read_gbps_samples)
    summaries = {t: stats.summarize(v) for t, v in sorted(out.items()) if v}
    return {t: (s.min, s.max, s.n) for t, s in summaries.items()}


def default_sizes(l3_bytes: int, available_bytes: int) -> tuple[int, ...]:
    """Two model sizes far beyond the last-level cache (8x and 16x, at least 256 MiB) and well
    inside free memory (each at most an eighth of it)."""
    small = max(8 * l3_bytes, 256 * MIB)
    cap = max(available_bytes // 8, 64 * MIB)
    return tuple(sorted({min(small, cap), min(2 * small, cap)}))


@dataclass(frozen=True, slots=True)
class CalibrationRun:
    calibration: Calibration
    points: tuple[Point, ...]
    errors: tuple[tuple[Point, float, float], ...]  # point, tg and pp predicted/measured - 1


def relative_errors(points: Sequence[Point], machine: MachineBandwidth,
                    cal: Calibration) -> tuple[tuple[Point, float, float], ...]:
    logs = log_errors(points, machine, cal)
    return tuple((p, math.exp(logs[2 * i]) - 1, math.exp(logs[2 * i + 1]) - 1)
                 for i, p in enumerate(points))


def calibrate_box(machine: MachineBandwidth, bin_dir: Path, work_dir: Path, archs: Sequence[str],
                  sizes_bytes: Sequence[int], quants: Sequence[str], threads: Sequence[int],
                  reps: int = 3, passes: int = 1, start: Calibration | None = None,
                  progress: Callable[[int, int, str], None] | None = None,
                  read_now: Callable[[int], Measurement] | None = None,
                  depths: Sequence[int] = (0,)) -> CalibrationRun:
    """Generate and quantize the synthetic models, bench them with llama-bench (reading bandwidth
    before each model's runs with `read_now`; the smallest model of each shape, in its first
    quant, also at `depths` for attention's rates), fit."""
    start = start or default_calibration()
    work_dir.mkdir(parents=True, exist_ok=True)
    models, deep = [], []
    for arch in archs:
        made = make_models(work_dir, bin_dir / "llama-quantize", arch, sizes_bytes, quants,
                           progress=lambda text: progress(0, 1, text) if progress else None)
        models += made
        deep += made[:1]
    points = measure(bin_dir / "llama-bench", models, threads, reps=reps, passes=passes,
                     progress=progress, read_now=read_now, depths=depths, depth_models=deep)
    save_points(points, work_dir / "points.json")
    cal = fit(points, machine, start)
    return CalibrationRun(cal, tuple(points), relative_errors(points, machine, cal))


# --------------------------------------------------------------------------------------------
# fitting


# Shares in (0, 1) are fitted through a logistic, everything else through a log: both keep the
# value in range without a kink (a hard cap has no gradient past it, and LM stalls there). The
# MoE prefill efficiencies are logs: started at 1 they sat on the logistic's flat top and never
# moved (fitted here they land at 0.35-0.85).
SHARES = ("eff", "moe", "moe_tg", "ts", "ts_pp")


def _to_x(name: str, value: float) -> float:
    if name in SHARES:
        v = min(max(value, 1e-3), 0.97)
        return math.log(v / (1 - v))
    return math.log(value)


def _from_x(name: str, x: float) -> float:
    return 1 / (1 + math.exp(-x)) if name in SHARES else math.exp(x)


ROBUST_SCALE = 0.1  # log-errors beyond ~10% count less than squared: one disturbed run must not steer


def soft_l1(r: float, c: float = ROBUST_SCALE) -> float:
    """A residual whose square is c^2 * 2(sqrt(1 + (r/c)^2) - 1): quadratic near 0, linear far out
    (the soft-L1 loss), so a run slowed by another process pulls the fit less than a square would."""
    z = (r / c) ** 2
    return math.copysign(c * math.sqrt(2 * (math.sqrt(1 + z) - 1)), r)


def best_fit(residuals: Callable[[list[float]], list[float]], starts: Sequence[list[float]]) -> list[float]:
    """least_squares from each start; the lowest sum of squares wins."""
    fits = [least_squares(residuals, x) for x in starts]
    return min(fits, key=lambda x: sum(r * r for r in residuals(x)))


def least_squares(residuals: Callable[[list[float]], list[float]], x0: list[float],
                  iters: int = 200, h: float = 1e-5) -> list[float]:
    """Minimise sum(residuals(x)^2) by Levenberg-Marquardt with a forward-difference Jacobian.

    Nelder-Mead (used first) stalled in the ~17 dimensions of a four-quant, two-shape
    calibration; LM uses the least-squares structure and converges in a few dozen steps.
    """
    x = np.asarray(x0, dtype=float)
    r = np.asarray(residuals(list(x)))
    cost, lam = float(r @ r), 1e-3
    for _ in range(iters):
        jac = np.empty((len(r), len(x)))
        for i in range(len(x)):
            xi = x.copy()
            xi[i] += h
            jac[:, i] = (np.asarray(residuals(list(xi))) - r) / h
        a, g = jac.T @ jac, jac.T @ r
        while True:
            step = np.linalg.solve(a + lam * (np.diag(np.diag(a)) + 1e-12 * np.eye(len(x))), -g)
            xn = x + step
            try:
                rn = np.asarray(residuals(list(xn)))
                cn = float(rn @ rn)
            except (OverflowError, ZeroDivisionError):  # a step far out of range: shorten it
                cn = math.inf
            if cn < cost:
                done = cost - cn < 1e-12 * max(cost, 1e-30) or float(np.abs(step).max()) < 1e-9
                x, r, cost, lam = xn, rn, cn, max(lam / 3, 1e-12)
                break
            lam *= 4
            if lam > 1e12:
                return list(x)
        if done:
            break
    return list(x)


def fitted_types(points: Sequence[Point], share: float = 0.05, experts: bool = False) -> list[str]:
    """Types holding at least `share` of some model's active bytes (of its routed-expert bytes,
    with `experts`): the ones the runs can tell apart."""
    types = set()
    for p in points:
        by_type = p.model.expert_active_bytes_by_type if experts else p.model.active_bytes_by_type
        total = sum(by_type.values()) or 1
        types |= {t for t, b in by_type.items() if b / total >= share}
    return sorted(types)


def log_errors(points: Sequence[Point], machine: MachineBandwidth, cal: Calibration) -> list[float]:
    """ln(predicted / measured) for decode and prefill of every point, each predicted at the
    bandwidth measured before its runs where it has one."""
    out = []
    for p in points:
        pred = predict(p.model, p.machine(machine), p.settings(), cal)
        out.append(math.log(pred.tg_tokens_per_s / p.tg_tokens_per_s))
        out.append(math.log(pred.pp_tokens_per_s / p.pp_tokens_per_s))
    return out


def fit(points: Sequence[Point], machine: MachineBandwidth, start: Calibration,
        fit_efficiency: bool = True, rates_only: bool = False) -> Calibration:
    """Least squares on ln(predicted/measured) over tg and pp, in log-parameters (all positive).

    bw_efficiency is capped at 1: a fit that wants more says the runs were compute-bound and
    cannot tell it; `fit_efficiency=False` keeps the starting value (from published runs).
    `rates_only` fits the per-core rate tables alone, every other constant kept at `start`'s:
    a core family's tables (calibration.toml [default.family_rates]) that predict beside the
    default constants, as an uncalibrated box of that family will use them.
    """
    # The start's core-family tables (the default calibration's) are where the rates start; the
    # fit then drops them, or predict would keep swapping them in for the rates it fits.
    start = replace(rates_for(start, machine)[0], family_rates={})
    types = fitted_types(points)
    # MoE prefill efficiency per routed-expert type (the scalar where the runs have none).
    expert_types = fitted_types(points, experts=True)
    moe = ["moe", "moe_tg"] + ([f"moe_pp:{t}" for t in expert_types] or ["moe_pp"]) \
        if any(p.model.is_moe for p in points) else []
    # Thread scaling and the overlap exponent need runs at more than one thread count to tell
    # them from the per-core rates.
    shape = ["ts", "ts_pp", "p"] if len({p.threads for p in points}) > 1 else []
    # The per-width prefill cost needs models of more than one width to tell it from the rates.
    shape += ["elem"] if len({p.model.n_embd for p in points}) > 1 else []
    # Attention's rates need runs with a filled cache (llama-bench -d); MLA's factor needs both
    # MLA and GQA models among them.
    deep = [p for p in points if p.depth > 0]
    shape += ["attn", "attn_pp"] if deep else []
    shape += ["mla"] if {p.model.mla for p in deep} == {True, False} else []
    names = (["eff"] if fit_efficiency else []) + ["ovh", "ovh_t"] + moe + shape + \
        [f"tg:{t}" for t in types] + [f"pp:{t}" for t in types]
    if rates_only:
        names = [n for n in names if n.startswith(("tg:", "pp:"))]

    def unpack(x: list[float]) -> Calibration:
        v = {n: _from_x(n, a) for n, a in zip(names, x)}
        return replace(
            start,
            bw_efficiency=v.get("eff", start.bw_efficiency),
            moe_bw_efficiency=v.get("moe", start.moe_bw_efficiency),
            moe_prefill_efficiency=v.get("moe_pp", start.moe_prefill_efficiency),
            moe_decode_efficiency=v.get("moe_tg", start.moe_decode_efficiency),
            thread_scaling=v.get("ts", start.thread_scaling),
            prefill_thread_scaling=v.get("ts_pp", start.prefill_thread_scaling),
            overlap_p=v.get("p", start.overlap_p),
            overhead_s_per_layer=v.get("ovh", start.overhead_s_per_layer),
            overhead_s_per_layer_thread=v.get("ovh_t", start.overhead_s_per_layer_thread),
            elementwise_s=v.get("elem", start.elementwise_s),
            attn_gflops_per_core=v.get("attn", start.attn_gflops_per_core),
            attn_prefill_gflops_per_core=v.get("attn_pp", start.attn_prefill_gflops_per_core),
            mla_attn_factor=v.get("mla", start.mla_attn_factor),
            moe_prefill_efficiency_by_type={
                **start.moe_prefill_efficiency_by_type,
                **{n.split(":", 1)[1]: a for n, a in v.items() if n.startswith("moe_pp:")}},
            decode_gbps_per_core={**start.decode_gbps_per_core,
                                  **{t: v[f"tg:{t}"] for t in types}},
            prefill_gflops_per_core={**start.prefill_gflops_per_core,
                                     **{t: v[f"pp:{t}"] for t in types}},
            source=f"fitted to {len(points)} llama-bench runs on {machine.name}" + (
                ", each at the read bandwidth measured before it" if all(p.read_gbps for p in points) else ""))

    def x_of(c: Calibration) -> list[float]:
        vals = {"eff": c.bw_efficiency, "ovh": c.overhead_s_per_layer,
                "ovh_t": max(c.overhead_s_per_layer_thread, 1e-9),
                # Unfitted (0): start where it is a few % of a small model's prompt token, so
                # LM sees a gradient; a log parameter cannot start at 0.
                "elem": c.elementwise_s or 2e-8,
                "attn": c.attn_gflops_per_core, "attn_pp": c.attn_prefill_gflops_per_core,
                "mla": c.mla_attn_factor,
                "moe": c.moe_bw_efficiency, "moe_pp": c.moe_prefill_efficiency,
                **{f"moe_pp:{t}": c.moe_prefill_efficiency_by_type.get(t, c.moe_prefill_efficiency)
                   for t in expert_types},
                "moe_tg": min(c.moe_decode_efficiency, 0.95), "ts": min(c.thread_scaling, 0.95),
                "ts_pp": min(c.prefill_thread_scaling, 0.95),
                # p = 0 means max(); a p-norm near it is a large p.
                "p": c.overlap_p or 16.0,
                **{f"tg:{t}": nearest_rate(c.decode_gbps_per_core, t, per_byte=True, ratios=c.decode_type_ratio)
                   for t in types},
                **{f"pp:{t}": nearest_rate(c.prefill_gflops_per_core, t) for t in types}}
        return [_to_x(n, vals[n]) for n in names]

    x0 = x_of(start)

    def residuals(x: list[float]) -> list[float]:
        # A weak pull toward the starting values keeps rates the runs cannot tell apart (a type
        # that is never the bottleneck) finite instead of drifting to 10^9. Thread scaling and
        # the width cost are free of it: they are fitted only where the runs pin them (several
        # thread counts, several widths), and a pull toward a guess would bias them.
        prior = [math.sqrt(PRIOR_WEIGHT) * (a - b) for a, b, n in zip(x, x0, names) if n not in ("ts", "ts_pp", "elem")]
        return [soft_l1(e) for e in log_errors(points, machine, unpack(x))] + prior

    # The max(memory, compute) kink leaves a rate with no gradient while the other term binds,
    # so LM starts from the shipped rates and from rates 4x lower and higher; the best fit wins.
    # Thread scaling trades against the per-thread fixed cost, so it starts both near linear and
    # well below it (0.7: two vCPUs sharing host cores).
    starts = [[_to_x(n, 0.7) if n in ("ts", "ts_pp") and low else
               a + (math.log(k) if n.startswith(("tg:", "pp:")) else 0.0) for a, n in zip(x0, names)]
              for k in (1.0, 0.25, 4.0) for low in ((False, True) if "ts" in names else (False,))]
    return unpack(best_fit(residuals, starts))


def calibration_toml(cal: Calibration, section: str, extra: dict[str, float] | None = None) -> str:
    """A calibration as a calibration.toml section, to ship a fit (3 significant digits)."""
    def num(v: float) -> str:
        text = f"{v:.3g}"
        return text if any(c in text for c in ".e") else text + ".0"

    def text(v: str) -> str:  # a TOML basic string: JSON's escapes are TOML's (an apostrophe stays one)
        return json.dumps(v, ensure_ascii=False)

    lines = [f"[{section}]", f"source = {text(cal.source)}"]
    for f in ("error_band_source", "error_band_source_new_box"):
        if getattr(cal, f) != Calibration.__dataclass_fields__[f].default:
            lines.append(f"{f} = {text(getattr(cal, f))}")
    for f in Calibration.__slots__:
        v = getattr(cal, f)
        if isinstance(v, float):
            lines.append(f"{f} = {num(v)}")
        elif isinstance(v, tuple) and v and all(isinstance(x, float) for x in v):
            lines.append(f"{f} = [{', '.join(num(x) for x in v)}]")
        elif isinstance(v, tuple) and v and all(isinstance(x, str) for x in v):
            lines.append(f"{f} = [{', '.join(text(x) for x in v)}]")
    for k, v in (extra or {}).items():
        lines.append(f"{k} = {num(v)}")
    for table in ("decode_gbps_per_core", "prefill_gflops_per_core", "moe_prefill_efficiency_by_type"):
        if not getattr(cal, table):
            continue
        lines += ["", f"[{section}.{table}]"]
        lines += [f"{t} = {num(r)}" for t, r in getattr(cal, table).items()]
    for box, terms in sorted(cal.box_terms.items()):
        lines += ["", f"[{section}.box_terms.{text(box)}]"]
        lines += [f"{k} = {num(v)}" for k, v in terms.items()]
    for fam, tables in sorted(cal.family_rates.items()):
        for kind, table in tables.items():
            lines += ["", f"[{section}.family_rates.{fam}.{kind}]"]
            lines += [f"{t} = {num(r)}" for t, r in table.items()]
    return "\n".join(lines) + "\n"


def save_points(points: Sequence[Point], path: Path) -> None:
    """Measured points as JSON (model paths, not profiles), to re-fit without re-measuring."""
    write_json(path, document("cputune.calibration-points/1", points=[
        {"model": p.model.path, "threads": p.threads, "n_prompt": p.n_prompt,
         "tg_tokens_per_s": p.tg_tokens_per_s, "pp_tokens_per_s": p.pp_tokens_per_s,
         "tg_samples": list(p.tg_samples), "pp_samples": list(p.pp_samples),
         "read_gbps": p.read_gbps, "read_gbps_samples": list(p.read_gbps_samples),
         "depth": p.depth} for p in points]))


def load_points(path: Path) -> list[Point]:
    doc = read_json(path, "cputune.calibration-points/1")
    profiles: dict[str, ModelProfile] = {}
    out = []
    for d in doc["points"]:
        prof = profiles.setdefault(d["model"], gguf_model.read_model(d["model"]))
        out.append(Point(prof, d["threads"], d["n_prompt"], d["tg_tokens_per_s"], d["pp_tokens_per_s"],
                         tuple(d.get("tg_samples", ())), tuple(d.get("pp_samples", ())),
                         d.get("read_gbps"), tuple(d.get("read_gbps_samples", ())), d.get("depth", 0)))
    return out
