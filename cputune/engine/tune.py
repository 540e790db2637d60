"""`cputune tune`: search llama.cpp's settings for decode (tg) and prefill (pp) separately, inside a
time budget, and keep the best as the profile `cputune serve` starts with.

Why two searches: decode streams the weights once per token and usually peaks below the core
count; prefill is compute-bound and wants every core and a large ubatch.

Why engines are searched apart: llama.cpp and ik_llama.cpp have different defaults and options
(configs/engines.toml), so each engine's search starts from its own defaults; then each engine's
winner runs in alternating rounds (ABBA) against llama.cpp's defaults ("engines"), which gives the
gain over the same baseline and the fastest engine, for tg and pp separately.

Why stages rather than one grid: thread count and NUMA placement interact and dominate, so they
are searched together first ("placement"); ubatch, flash attention, repacking and the KV cache
type hardly depend on them, so they are searched next with the placement fixed ("kernels").
Each stage is successive halving (Jamieson & Talwalkar 2016): every candidate gets one short
run, the better half gets twice the repetitions, and so on, so the budget goes to the close
calls. The predictor drops placements it expects to be hopeless (under half the best
prediction) and orders the rest when the budget cannot measure them all. The winner then runs
alternately with llama.cpp's defaults; it is kept only if it beats them there.

The engine (`halve`, `tune_kind`) takes a measuring function and a clock, so its logic is tested
without llama.cpp; `BenchRunner` is the measuring function that runs the real llama-bench.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

from cputune.core import checks, stats
from cputune.engine import engine_args, llama_bench
from cputune.engine.build import DEFAULT_ENGINE, Engine, engine_names, find_build, load_engine, require_build
from cputune.core.errors import ConfigError, EngineError, ProcessFailed, WriteError
from cputune.core.fsutil import cache_root
from cputune.core import numa_policy
from cputune.model.gguf_model import ModelProfile
from cputune.engine.placement import parse_numa, plan_placement
from cputune.predict.predictor import (Calibration, MachineBandwidth, Settings, cache_type_name, predict,
                                      repacked_types)
from cputune.machine.topology import Topology

KINDS = ("tg", "pp")
PRUNE_RATIO = 0.5  # a placement predicted under half the best one is not measured
ETA = 2  # successive halving keeps 1/ETA of the candidates and gives them ETA x the repetitions
BASELINE_REPS = 3
CONFIRM_ROUNDS = 3
CONFIRM_REPS = 2
UBATCHES = (128, 256, 512, 1024, 2048)
SCHEMA = "cputune.tuned/1"


# Knobs each engine spells its own way (configs/engines.toml [args.bench] / [args.server]).
SPELLED = ("flash_attn", "repack", "fused_moe", "mla")


@dataclass(frozen=True, slots=True)
class Knobs:
    """One setting of everything tune searches. numa is a placement mode (placement.py); the
    engine's own switches are None where it has none (fused MoE and MLA mode: ik_llama.cpp's)."""

    threads: int
    numa: str = "off"
    n_batch: int = 2048
    n_ubatch: int = 512
    flash_attn: str = "auto"  # on | off | auto
    repack: bool = True  # mainline: its repack by ISA (on by default); ik_llama.cpp: -rtr
    cache_type: str = "f16"  # K and V alike
    engine: str = DEFAULT_ENGINE
    fused_moe: bool | None = None
    mla: int | None = None

    @property
    def label(self) -> str:
        own = "".join(f" {name}={engine_args.value_text(v)}" for name, v in
                      (("fmoe", self.fused_moe), ("mla", self.mla)) if v is not None)
        head = "" if self.engine == DEFAULT_ENGINE else f"{self.engine} "
        return (f"{head}t{self.threads} numa={self.numa} ub{self.n_ubatch} fa={self.flash_attn} "
                f"repack={'on' if self.repack else 'off'} kv={self.cache_type}{own}")

    def spelled(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in SPELLED}

    def bench_args(self, engine: Engine | None = None, program: str = "llama-bench") -> list[str]:
        """The program's options besides -t (numa goes through the placement's prefix), in the
        engine's spelling."""
        engine = engine or load_engine(self.engine)
        own, missing = engine_args.spell(engine, program, self.spelled())
        if missing:  # the search space holds only what the engine can be given
            raise EngineError(f"{self.label}: {'; '.join(missing)}")
        sizes = [] if program == llama_bench.SWEEP_BENCH else ["-b", str(self.n_batch), "-ub", str(self.n_ubatch)]
        return sizes + ["-ctk", self.cache_type, "-ctv", self.cache_type] + own


@dataclass(frozen=True, slots=True)
class Space:
    """What one kind's search may vary, and why the rest is fixed."""

    placements: tuple[tuple[int, str], ...]  # (threads, numa mode)
    n_ubatch: tuple[int, ...]
    flash_attn: tuple[str, ...]
    repack: tuple[bool, ...]
    cache_types: tuple[str, ...]
    notes: tuple[str, ...]
    fused_moe: tuple[bool | None, ...] = (None,)
    mla: tuple[int | None, ...] = (None,)


@dataclass(frozen=True, slots=True)
class Tried:
    """One candidate of one stage: every sample it got, and how it ended."""

    kind: str
    stage: str  # baseline | placement | kernels | confirm | engines
    knobs: Knobs
    predicted_tokens_per_s: float | None
    samples_tokens_per_s: tuple[float, ...]
    rungs: int  # successive-halving rungs it was measured in
    outcome: str  # best | default | dropped | pruned | unmeasured | failed
    note: str = ""

    @property
    def summary(self) -> stats.Summary | None:
        """None for a candidate never measured (pruned, out of budget, failed)."""
        return stats.summarize(self.samples_tokens_per_s) if self.samples_tokens_per_s else None

    @property
    def median_tokens_per_s(self) -> float | None:
        s = self.summary
        return s.median if s else None


@dataclass(frozen=True, slots=True)
class KindResult:
    """The outcome of one kind's search: the settings to use and what they gain."""

    kind: str
    test: str  # tg32, pp256 @ d4096 ...
    default: Knobs
    best: Knobs
    default_tokens_per_s: float  # median of the confirm rounds (or the baseline when best is default)
    best_tokens_per_s: float
    gain: float  # best / default, alternating in the same run
    trials: tuple[Tried, ...]
    seconds: float
    notes: tuple[str, ...]
    engine: str = DEFAULT_ENGINE  # whose search this is; `default` is that engine's defaults
    build_commit: str = ""
    # best / llama.cpp's defaults, alternating in the engines round (None: not run there; for
    # llama.cpp alone it is `gain`), and whether this engine was the fastest of its kind there.
    vs_baseline: float | None = None
    overall: bool = True


@dataclass(frozen=True, slots=True)
class TuneResult:
    model_path: Path
    model_size_bytes: int
    machine: str
    build_commit: str
    budget_s: float
    seconds: float
    depth: int
    results: tuple[KindResult, ...]
    created_at: str = ""
    notes: tuple[str, ...] = ()  # what the budget left out (a kind not tuned)

    def for_kind(self, kind: str, engine: str | None = None) -> KindResult | None:
        """The fastest engine's result for `kind` (or the named engine's)."""
        mine = [r for r in self.results if r.kind == kind and (engine is None or r.engine == engine)]
        return next((r for r in mine if r.overall or engine is not None), mine[0] if mine else None)

    @property
    def engines(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.engine for r in self.results))


# ---- llama.cpp's defaults ---------------------------------------------------------------------

def _default_of(text: str, *names: str) -> str | None:
    for name in names:
        m = re.search(rf"^\s*(?:-[\w-]+,\s*)*{re.escape(name)}\b[^\n]*\(default:\s*([^)]*)\)", text, re.M)
        if m:
            return m.group(1).strip()
    return None


def defaults_from_help(text: str, cores: int, engine: Engine | None = None) -> Knobs:
    """The engine's defaults as this llama-bench prints them, so 'default' means this build's;
    its own switches (ik_llama.cpp's -fmoe, -mla) are read under the names it spells them with."""
    engine = engine or load_engine()

    def num(v: str | None, fallback: int) -> int:
        return int(v) if v and v.strip().isdigit() else fallback

    def own(setting: str) -> str | None:
        names = sorted(engine_args.owned_names(engine, setting), key=lambda n: (not n.startswith("--"), n))
        return _default_of(text, *names) if names else None

    fa = (_default_of(text, "--flash-attn") or "auto").split()[0]
    fa = {"0": "off", "1": "on", "-1": "auto"}.get(fa, fa)
    fused, mla = own("fused_moe"), own("mla")
    return Knobs(threads=num(_default_of(text, "--threads"), cores), numa="off",
                 n_batch=num(_default_of(text, "--batch-size"), 2048),
                 n_ubatch=num(_default_of(text, "--ubatch-size"), 512),
                 flash_attn=fa if fa in ("on", "off", "auto") else "auto",
                 repack=(own("repack") or "1") not in ("0", "false"),
                 cache_type=_default_of(text, "--cache-type-k") or "f16", engine=engine.name,
                 fused_moe=None if fused is None else fused not in ("0", "false"),
                 mla=num(mla, 0) if mla is not None else None)


# ---- the search space -------------------------------------------------------------------------

def thread_candidates(cores: int, kind: str, l3_group_cores: int = 1, logical: int = 0) -> tuple[int, ...]:
    """Decode: all cores down to an eighth (bandwidth saturates early). Prefill: all cores, three
    quarters, and every logical CPU when SMT is on. Counts round to whole L3 groups (CCDs)."""
    fracs = (1, 0.75, 0.5, 0.25, 0.125) if kind == "tg" else (1, 0.75)
    out = set()
    for f in fracs:
        n = int(cores * f + 0.5)
        if l3_group_cores > 1 and n >= l3_group_cores and f != 1:
            n = n // l3_group_cores * l3_group_cores
        if n >= 1:
            out.add(n)
    if kind == "pp" and logical > cores:
        out.add(logical)
    return tuple(sorted(out, reverse=True))


def numa_modes(topology: Topology, need_bytes: int | None, numactl: bool) -> tuple[tuple[str, ...], list[str]]:
    """Placement modes worth trying here, and notes on the ones left out."""
    nodes = [n for n in topology.nodes if n.cpus]
    if len(nodes) < 2:
        return ("off",), ["NUMA mode: one node, nothing to choose"]
    modes, notes = ["off", "distribute", "isolate"], []
    if numactl:
        modes.append("interleave")
        big = max(nodes, key=lambda n: n.mem_total_bytes or 0)
        # The one NUMA rule's test (numa_policy, as predict, select and serve's auto use it).
        if numa_policy.fits_one_node(need_bytes, big.mem_total_bytes):
            modes.append(f"node:{big.id}")
        else:
            notes.append("NUMA node:N left out: the model does not fit in one node")
    else:
        notes.append("NUMA interleave and node:N left out: numactl is not installed")
    return tuple(modes), notes


def search_space(kind: str, topology: Topology, model: ModelProfile, default: Knobs, *,
                 n_prompt: int, cache_types: Sequence[str] = ("f16",), need_bytes: int | None = None,
                 numactl: bool = True, engine: Engine | None = None, sweep: bool = False) -> Space:
    """`sweep`: prefill is measured by llama-sweep-bench (ik_llama.cpp at depth), one ubatch of
    n_prompt tokens, so the ubatch is not searched."""
    engine = engine or load_engine(default.engine)
    modes, notes = numa_modes(topology, need_bytes, numactl)
    groups = [g for g in topology.l3_groups if g.cpus]
    placements = []
    for mode in modes:
        if mode.startswith("node:"):
            cpus = topology.node(int(mode[5:])).cpus
        else:
            cpus = topology.allowed_cpus
        cores = len(topology.first_thread_per_core(cpus))
        group = max(1, round(len(topology.first_thread_per_core()) / max(len(groups), 1)))
        logical = len([c for c in cpus if c in set(topology.allowed_cpus)])
        placements += [(t, mode) for t in thread_candidates(cores, kind, group, logical)]
    if (default.threads, default.numa) not in placements:
        placements.insert(0, (default.threads, default.numa))

    if kind == "pp" and sweep:
        ubatches = (default.n_ubatch,)
        notes.append(f"ubatch: {llama_bench.SWEEP_BENCH} measures prefill at depth as one ubatch of the prompt")
    elif kind == "pp":
        ubatches = tuple(sorted({u for u in UBATCHES if u <= max(n_prompt, UBATCHES[0])} | {default.n_ubatch}))
    else:
        ubatches = (default.n_ubatch,)
        notes.append("ubatch: only splits prompts, so decode keeps the default")
    if engine.repack_types:  # run-time repacking of the types the engine lists (ik_llama.cpp's -rtr)
        repackable = engine_args.repackable_share(engine, model)[1]
    else:  # mainline repacks by ISA on its own
        repackable = sorted(set(model.matmul_bytes_by_type) & repacked_types(topology.isa_flags))
    if repackable:
        repack = (True, False)
    else:
        repack = (default.repack,)
        notes.append("repack: no weights of a type this CPU repacks, so it changes nothing")
    cts = tuple(dict.fromkeys([default.cache_type, *cache_types]))
    if len(cts) == 1:
        notes.append("KV cache type: f16 only (quantizing it costs quality: allow with --cache-types f16,q8_0)")
    program = llama_bench.SWEEP_BENCH if kind == "pp" and sweep else "llama-bench"
    fa = tuple(v for v in ("on", "off") if engine_args.offers(engine, program, "flash_attn", v))
    fused = (True, False) if model.is_moe and default.fused_moe is not None else (default.fused_moe,)
    mla = tuple(dict.fromkeys([default.mla, engine_args.MLA_MODE])) if model.mla and default.mla is not None \
        else (default.mla,)
    return Space(tuple(placements), ubatches, fa or (default.flash_attn,), repack, cts, tuple(notes),
                 fused_moe=fused, mla=mla)


def kernel_candidates(space: Space, base: Knobs, full: bool = True) -> list[Knobs]:
    """ubatch x flash attention x repack x KV type (x fused MoE x MLA mode, where the engine has
    them) around the placement winner (which keeps its own flash-attention value, auto by
    default). With full=False, one setting changed at a time: the grid's few dozen runs shrink to
    about ten when the budget is short. A quantized V cache needs flash attention on (llama.cpp
    refuses it otherwise)."""
    def knobs(ub: int, fa: str, rp: bool, ct: str, fm: bool | None = base.fused_moe,
              mla: int | None = base.mla) -> Knobs:
        return replace(base, n_ubatch=ub, n_batch=max(base.n_batch, ub), flash_attn=fa, repack=rp,
                       cache_type=ct, fused_moe=fm, mla=mla)

    if full:
        out = [knobs(ub, fa, rp, ct, fm, mla) for ub in space.n_ubatch for fa in space.flash_attn
               for rp in space.repack for ct in space.cache_types if ct == "f16" or fa != "off"
               for fm in space.fused_moe for mla in space.mla]
    else:
        b = base
        out = ([knobs(ub, b.flash_attn, b.repack, b.cache_type) for ub in space.n_ubatch]
               + [knobs(b.n_ubatch, fa, b.repack, b.cache_type) for fa in space.flash_attn
                  if b.cache_type == "f16" or fa != "off"]
               + [knobs(b.n_ubatch, b.flash_attn, rp, b.cache_type) for rp in space.repack]
               + [knobs(b.n_ubatch, "on" if ct != "f16" and b.flash_attn == "off" else b.flash_attn,
                        b.repack, ct) for ct in space.cache_types]
               + [knobs(b.n_ubatch, b.flash_attn, b.repack, b.cache_type, fm) for fm in space.fused_moe]
               + [knobs(b.n_ubatch, b.flash_attn, b.repack, b.cache_type, mla=m) for m in space.mla])
    return list(dict.fromkeys([base, *out]))


# ---- the predictor's view ---------------------------------------------------------------------

PREDICTOR_NUMA = {"off": "off", "distribute": "distribute", "isolate": "one-node", "interleave": "interleave"}


def predicted(kind: str, knobs: Knobs, model: ModelProfile, machine: MachineBandwidth,
              calibration: Calibration, depth: int = 0) -> float:
    numa = "one-node" if knobs.numa.startswith("node:") or machine.nodes < 2 else PREDICTOR_NUMA[knobs.numa]
    p = predict(model, machine, Settings(threads=knobs.threads, numa=numa, depth=depth,
                                         n_ubatch=knobs.n_ubatch, cache_type=knobs.cache_type,
                                         engine=knobs.engine), calibration)
    return p.tg_tokens_per_s if kind == "tg" else p.pp_tokens_per_s


def prune(cands: Sequence[tuple[Knobs, float | None]], keep: Knobs, ratio: float = PRUNE_RATIO
          ) -> tuple[list[tuple[Knobs, float | None]], list[tuple[Knobs, float | None]]]:
    """(kept in predicted order, pruned): under `ratio` x the best prediction is hopeless; `keep`
    (llama.cpp's default) is always measured."""
    preds = [p for _, p in cands if p]
    best = max(preds) if preds else None
    kept, pruned = [], []
    for k, p in cands:
        (pruned if best and p is not None and p < ratio * best and k != keep else kept).append((k, p))
    kept.sort(key=lambda kp: -(kp[1] or 0))
    return kept, pruned


# ---- successive halving -------------------------------------------------------------------------

Measure = Callable[[Knobs, int], tuple[list[float], float]]  # (knobs, reps) -> (tokens/s samples, wall s)


@dataclass(slots=True)
class _Cand:
    knobs: Knobs
    pred: float | None
    samples: list[float] = field(default_factory=list)
    rungs: int = 0
    failed: str = ""

    @property
    def median(self) -> float:
        """What halving ranks by: the median, which one disturbed run cannot move far."""
        return stats.summarize(self.samples).median


def rung_plan(n: int, eta: int = ETA, reps0: int = 1) -> list[tuple[int, int]]:
    """(candidates, repetitions) per rung until one candidate is left."""
    plan, reps = [], reps0
    while n >= 2:
        plan.append((n, reps))
        n, reps = math.ceil(n / eta), reps * eta
    return plan


def plan_cost(n: int, run_s: Callable[[int], float], eta: int = ETA) -> float:
    return sum(k * run_s(r) for k, r in rung_plan(n, eta))


def fit_count(n_max: int, budget_s: float, run_s: Callable[[int], float]) -> int:
    """How many candidates successive halving can take within the budget (at least 2)."""
    n = n_max
    while n > 2 and plan_cost(n, run_s) > budget_s:
        n -= 1
    return min(n, n_max)


def halve(cands: Sequence[tuple[Knobs, float | None]], measure: Measure, deadline: float,
          clock: Callable[[], float], run_s: Callable[[Knobs, int], float],
          seed: dict[Knobs, list[float]] | None = None,
          tick: Callable[[str], None] | None = None) -> list[_Cand]:
    """Successive halving over `cands`, stopping a rung when the next run would pass `deadline`.
    `seed` holds samples already taken (the baseline), pooled with new ones."""
    pool = [_Cand(k, p, list((seed or {}).get(k, []))) for k, p in cands]
    alive = list(pool)
    for size, reps in rung_plan(len(pool)):
        if len(alive) < 2:
            break
        ran_out = False
        for c in alive[:size]:
            if clock() + run_s(c.knobs, reps) > deadline:
                ran_out = True
                break
            if tick:
                tick(c.knobs.label)
            try:
                samples, _ = measure(c.knobs, reps)
            except ProcessFailed as e:
                c.failed = e.message.splitlines()[0]
                continue
            c.samples += samples
            c.rungs += 1
        ranked = sorted((c for c in alive if c.samples and not c.failed), key=lambda c: -c.median)
        if not ranked:
            break
        if ran_out:  # rank what was measured; the rest of the rung is not run
            break
        alive = ranked[:math.ceil(len(ranked) / ETA)]
    return pool


# ---- one kind ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KindJob:
    """What tune_kind needs besides the measuring function: the candidates and the predictor."""

    kind: str
    n_tokens: int
    depth: int
    default: Knobs
    space: Space
    predict: Callable[[Knobs], float | None]
    engine: str = DEFAULT_ENGINE
    build_commit: str = ""

    @property
    def test(self) -> str:
        return f"{self.kind}{self.n_tokens}" + (f" @ d{self.depth}" if self.depth else "")

    @property
    def title(self) -> str:
        return load_engine(self.engine).title


def _tried(kind: str, stage: str, c: _Cand, outcome: str, note: str = "") -> Tried:
    return Tried(kind, stage, c.knobs, c.pred, tuple(c.samples), c.rungs, outcome, note or c.failed)


def _stage(job: KindJob, stage: str, cands: list[Knobs], measure: Measure, deadline: float,
           clock, run_s, seed, tick, notes: list[str]) -> tuple[Knobs, list[Tried]]:
    scored = [(k, job.predict(k)) for k in dict.fromkeys(cands)]
    keep_default = job.default if job.default in cands else cands[0]
    kept, pruned = prune(scored, keep_default) if stage == "placement" else (scored, [])
    n = fit_count(len(kept), deadline - clock(), lambda r: run_s(keep_default, r))
    ordered = [kp for kp in kept if kp[0] == keep_default] + [kp for kp in kept if kp[0] != keep_default]
    kept, unmeasured = ordered[:n], ordered[n:]
    if unmeasured:
        notes.append(f"{stage}: the budget measures {n} of {len(ordered)} candidates "
                     "(the predictor's best, and the defaults)")
    pool = halve(kept, measure, deadline, clock, run_s, seed, tick)
    ranked = sorted((c for c in pool if c.samples and not c.failed), key=lambda c: -c.median)
    winner = ranked[0].knobs if ranked else keep_default
    rows = []
    best_pred = max((p for _, p in scored if p), default=None)
    for c in pool:
        outcome = "failed" if c.failed else "best" if c.knobs == winner else "dropped" if c.samples else "unmeasured"
        rows.append(_tried(job.kind, stage, c, outcome))
    for k, p in pruned:
        rows.append(Tried(job.kind, stage, k, p, (), 0, "pruned",
                          f"predicted {p:.3g} t/s, under {PRUNE_RATIO:.0%} of the best ({best_pred:.3g})"))
    for k, p in unmeasured:
        rows.append(Tried(job.kind, stage, k, p, (), 0, "unmeasured", "out of budget"))
    return winner, rows


def tune_kind(job: KindJob, measure: Measure, budget_s: float, clock: Callable[[], float] = time.monotonic,
              progress: Callable[[float, str], None] | None = None) -> KindResult:
    """Baseline, placement, kernels, then the winner against the default in alternating rounds."""
    start = clock()
    deadline = start + budget_s
    notes = list(job.space.notes)
    trials: list[Tried] = []

    def tick(text: str) -> None:
        if progress:
            progress(min((clock() - start) / budget_s, 1.0), f"{job.kind}: {text}")

    tick(f"{job.title} defaults ({job.default.label})")
    t0 = clock()
    base_samples, wall = measure(job.default, BASELINE_REPS)
    wall = wall or (clock() - t0)
    med = stats.summarize(base_samples).median
    rep_s = job.n_tokens / med if med > 0 else wall / (BASELINE_REPS + 1)
    overhead = max(wall - (BASELINE_REPS + 1) * rep_s, 0.0)
    base_pred = job.predict(job.default)

    def estimate_s(k: Knobs, reps: int) -> float:
        p = job.predict(k)
        scale = min(max(base_pred / p, 0.5), 4.0) if base_pred and p else 1.0
        return overhead + (reps + 1) * rep_s * scale

    # Runs are scheduled by these estimates; the last run's wall time over its estimate (at least 1,
    # at most 10) scales them, so a box that slows down (another job, thermal limits) does not get
    # runs started that would pass the deadline.
    drift = [1.0]

    def run_s(k: Knobs, reps: int) -> float:
        return estimate_s(k, reps) * drift[0]

    def timed(k: Knobs, reps: int) -> tuple[list[float], float]:
        t = clock()
        samples, wall = measure(k, reps)
        drift[0] = min(max((clock() - t or wall) / estimate_s(k, reps), 1.0), 10.0)
        return samples, wall

    trials.append(Tried(job.kind, "baseline", job.default, base_pred, tuple(base_samples), 1, "default"))
    if clock() + run_s(job.default, 1) > deadline:
        # Not even one more run fits: measuring anything else would overrun the budget.
        notes.append(f"the {budget_s:.0f} s budget was spent on the baseline ({clock() - start:.0f} s): "
                     "nothing else was measured; give a larger --budget")
        if progress:
            progress(1.0, f"{job.kind}: done")
        return KindResult(job.kind, job.test, job.default, job.default, med, med, 1.0, tuple(trials),
                          clock() - start, tuple(notes), job.engine, job.build_commit)
    seed = {job.default: list(base_samples)}
    confirm_s = CONFIRM_ROUNDS * 2 * run_s(job.default, CONFIRM_REPS)

    placements = [replace(job.default, threads=t, numa=m) for t, m in job.space.placements]
    n_place = len(placements) if len(placements) > 1 else 0
    n_kernel = len(kernel_candidates(job.space, job.default))
    n_kernel = n_kernel if n_kernel > 1 else 0
    share = 0.0 if not n_place else 1.0 if not n_kernel else min(max(n_place / (n_place + n_kernel), 0.3), 0.7)
    left = deadline - clock() - confirm_s
    best = job.default
    if len(placements) > 1:
        best, rows = _stage(job, "placement", placements, timed, clock() + left * share, clock, run_s,
                            seed, tick, notes)
        trials += rows
        seed.update({t.knobs: list(t.samples_tokens_per_s) for t in rows if t.samples_tokens_per_s})
    kernels = kernel_candidates(job.space, best)
    stage_s = deadline - confirm_s - clock()
    if plan_cost(len(kernels), lambda r: run_s(best, r)) > stage_s:
        few = kernel_candidates(job.space, best, full=False)
        notes.append(f"kernels: one setting changed at a time ({len(few)} runs): the full grid of "
                     f"{len(kernels)} does not fit the budget")
        kernels = few
    if len(kernels) > 1:
        best, rows = _stage(job, "kernels", kernels, timed, deadline - confirm_s, clock, run_s,
                            seed, tick, notes)
        trials += rows

    if best == job.default:
        notes.append(f"{job.title}'s defaults were the fastest setting tried")
        gain, d_med, b_med = 1.0, med, med
    else:
        d_s, b_s = [], []
        for i in range(CONFIRM_ROUNDS):
            if clock() + 2 * run_s(best, CONFIRM_REPS) > deadline:
                if i:
                    notes.append(f"confirm: {i} of {CONFIRM_ROUNDS} rounds fitted the budget")
                break
            tick(f"confirm round {i + 1}: defaults")
            d_s += timed(job.default, CONFIRM_REPS)[0]
            tick(f"confirm round {i + 1}: {best.label}")
            b_s += timed(best, CONFIRM_REPS)[0]
        if not d_s:  # no round fitted: the winner was never run beside the defaults, so it is not kept
            notes.append(f"{best.label} was not run alternately with the defaults (no budget left): "
                         "the defaults are kept")
            best, gain, d_med, b_med = job.default, 1.0, med, med
        else:
            d_med, b_med = stats.summarize(d_s).median, stats.summarize(b_s).median
            trials.append(Tried(job.kind, "confirm", job.default, base_pred, tuple(d_s), 1, "default"))
            trials.append(Tried(job.kind, "confirm", best, job.predict(best), tuple(b_s), 1,
                                "best" if b_med > d_med else "dropped"))
            gain = b_med / d_med
            if gain <= 1.0:
                notes.append(f"{best.label} did not beat the defaults when run alternately "
                             f"({gain:.2f}x): the defaults are kept")
                best, gain, b_med = job.default, 1.0, d_med
    if progress:
        progress(1.0, f"{job.kind}: done")
    return KindResult(job.kind, job.test, job.default, best, d_med, b_med, gain, tuple(trials),
                      clock() - start, tuple(notes), job.engine, job.build_commit)


# ---- the real measuring function --------------------------------------------------------------

@dataclass
class BenchRunner:
    """Runs one llama-bench per (settings, repetitions) under the placement's numactl prefix; for
    prefill at depth where llama-bench has no -d (ik_llama.cpp), llama-sweep-bench instead."""

    binary: Path
    model: Path
    topology: Topology
    kind: str
    n_tokens: int
    depth: int = 0
    numactl: bool = True
    timeout_s: float = 3600
    engine: Engine | None = None  # None: the knobs' own engine
    sweep_binary: Path | None = None

    @property
    def sweeps(self) -> bool:
        return bool(self.kind == "pp" and self.depth and not llama_bench.takes_depth(self.binary))

    def argv(self, k: Knobs, reps: int) -> list[str]:
        pl = plan_placement(self.topology, k.numa, threads=k.threads, threads_batch=k.threads,
                            numactl_available=self.numactl)
        engine = self.engine or load_engine(k.engine)
        numa = ["--numa", pl.llama_numa] if pl.llama_numa else []
        if self.sweeps:
            if self.sweep_binary is None:
                raise EngineError(f"{engine.title}'s llama-bench cannot measure prefill at depth, and "
                                  f"its build has no {llama_bench.SWEEP_BENCH}", hint="tune with --for tg")
            argv = llama_bench.sweep_argv(self.sweep_binary, self.model, k.threads, self.n_tokens, self.depth,
                                          extra=k.bench_args(engine, llama_bench.SWEEP_BENCH) + numa)
        else:
            argv = llama_bench.bench_argv(
                self.binary, self.model, threads=(k.threads,),
                n_prompt=(self.n_tokens if self.kind == "pp" else 0,),
                n_gen=(self.n_tokens if self.kind == "tg" else 0,), reps=reps,
                extra=k.bench_args(engine) + numa, depth=self.depth)
        return [*pl.numactl_argv, *argv]

    def __call__(self, k: Knobs, reps: int) -> tuple[list[float], float]:
        t0 = time.monotonic()
        argv = self.argv(k, reps)
        if self.sweeps:
            rows = [llama_bench.run_sweep(argv, self.depth, reps, self.model, timeout_s=self.timeout_s)]
        else:
            rows = llama_bench.run(argv, timeout_s=self.timeout_s)
        samples = [s for r in rows for s in (r.samples_ts or (r.avg_ts,))]
        if not samples:
            raise ProcessFailed("llama-bench returned no samples", argv, 0)
        return samples, time.monotonic() - t0


@dataclass(frozen=True, slots=True)
class EngineBench:
    """One engine's build as tune runs it: its llama-bench (and llama-sweep-bench, if built)."""

    engine: Engine
    bench: Path
    sweep: Path | None = None
    commit: str = ""


def engine_benches(names: Sequence[str] = ()) -> tuple[EngineBench, ...]:
    """The engines to tune: `names`, each of which must be built; by default llama.cpp (which must
    be built: its defaults are the baseline) and every other engine that is."""
    if names:
        builds = [require_build(engine=n) for n in dict.fromkeys(names)]
    else:
        builds = [require_build()] + [b for n in engine_names() if n != DEFAULT_ENGINE
                                      if (b := find_build(engine=n)) is not None]
    return tuple(EngineBench(load_engine(b.engine), b.binary("llama-bench"),
                             b.binary(llama_bench.SWEEP_BENCH) if llama_bench.SWEEP_BENCH in b.binaries else None,
                             b.source_commit or b.source_label) for b in builds)


def run_tune(bench_bin: Path | None, model_path: Path, model: ModelProfile, machine: MachineBandwidth,
             calibration: Calibration, topology: Topology, *, kinds: Sequence[str] = KINDS,
             budget_s: float = 600, depth: int = 0, n_prompt: int = 256, n_gen: int = 32,
             cache_types: Sequence[str] = ("f16",), numactl: bool = True, need_bytes: int | None = None,
             build_commit: str = "", progress: Callable[[float, str], None] | None = None,
             engines: Sequence[EngineBench] = ()) -> TuneResult:
    """Every kind on every engine (`engines`; default llama.cpp's `bench_bin`) on the real
    llama-bench, each search with an even share of the budget, then the engines round of each
    kind with the same share."""
    t0 = time.monotonic()
    engines = tuple(engines) or (EngineBench(load_engine(), Path(bench_bin), None, build_commit),)
    jobs, runners = [], {}
    for kind in kinds:
        n_tokens = n_gen if kind == "tg" else n_prompt
        for eb in engines:
            default = defaults_from_help(llama_bench.help_text(eb.bench), machine.cores, eb.engine)
            sweep = bool(kind == "pp" and depth and not llama_bench.takes_depth(eb.bench))
            if sweep:  # one window of the prompt, as llama-sweep-bench measures it
                default = replace(default, n_ubatch=n_tokens, n_batch=max(default.n_batch, n_tokens))
            space = search_space(kind, topology, model, default, n_prompt=n_prompt, cache_types=cache_types,
                                 need_bytes=need_bytes, numactl=numactl, engine=eb.engine, sweep=sweep)
            jobs.append(KindJob(kind, n_tokens, depth, default, space,
                                lambda k, kind=kind: predicted(kind, k, model, machine, calibration, depth),
                                engine=eb.engine.name, build_commit=eb.commit))
            runners[(eb.engine.name, kind)] = BenchRunner(eb.bench, model_path, topology, kind, n_tokens, depth,
                                                          numactl, engine=eb.engine, sweep_binary=eb.sweep)
    rounds = len(kinds) if len(engines) > 1 else 0
    left = budget_s - (time.monotonic() - t0)
    results, notes = tune_kinds(jobs, lambda job: runners[(job.engine, job.kind)],
                                left * len(jobs) / (len(jobs) + rounds), progress=progress)
    final: list[KindResult] = []
    for i, kind in enumerate(kinds):
        mine = [r for r in results if r.kind == kind]
        if rounds and len(mine) > 1:
            share = (budget_s - (time.monotonic() - t0)) / (len(kinds) - i)
            mine, round_notes = compare_engines(mine, lambda k, kind=kind: runners[(k.engine, kind)], share,
                                                progress=progress and (lambda f, text: progress(1.0, text)))
            notes += round_notes
        else:
            mine = [replace(r, vs_baseline=r.gain if r.engine == DEFAULT_ENGINE else None) for r in mine]
        final += mine
    return TuneResult(model_path=Path(model_path), model_size_bytes=Path(model_path).stat().st_size,
                      machine=machine.name, build_commit=next(
                          (eb.commit for eb in engines if eb.engine.name == DEFAULT_ENGINE), build_commit),
                      budget_s=budget_s,
                      seconds=time.monotonic() - t0, depth=depth, results=tuple(final),
                      created_at=now_iso(), notes=tuple(notes))


def _n_tokens(test: str) -> int:
    m = re.match(r"[a-z]+(\d+)", test)
    return int(m.group(1)) if m else 0


def compare_engines(results: Sequence[KindResult], measure_for: Callable[[Knobs], Measure], budget_s: float,
                    clock: Callable[[], float] = time.monotonic,
                    progress: Callable[[float, str], None] | None = None) -> tuple[list[KindResult], list[str]]:
    """The engines round of one kind: llama.cpp's defaults and each engine's winner, CONFIRM_ROUNDS
    rounds whose order turns every round (ABBA, so a box that drifts favours no one), while the
    budget holds a whole round. Each result gets its gain over llama.cpp's defaults measured
    there (vs_baseline), and the fastest engine is marked overall."""
    base_r = next((r for r in results if r.engine == DEFAULT_ENGINE), None)
    if base_r is None:
        return [replace(r, vs_baseline=None, overall=i == 0) for i, r in enumerate(results)], []
    base = base_r.default
    contenders = list(dict.fromkeys([base, *(r.best for r in results)]))
    tps = {base: base_r.default_tokens_per_s, **{r.best: r.best_tokens_per_s for r in results}}
    n = _n_tokens(base_r.test)

    def est_s(k: Knobs) -> float:  # CONFIRM_REPS timed runs and a warmup at the speed its search saw
        return (CONFIRM_REPS + 1) * n / tps[k] if tps.get(k) else 0.0

    deadline = clock() + budget_s
    samples: dict[Knobs, list[float]] = {k: [] for k in contenders}
    failed: dict[Knobs, str] = {}
    notes: list[str] = []
    done = 0
    for i in range(CONFIRM_ROUNDS):
        order = [k for k in (contenders if i % 2 == 0 else contenders[::-1]) if k not in failed]
        if clock() + sum(est_s(k) for k in order) > deadline:
            notes.append(f"{base_r.kind}: engines round {i + 1} of {CONFIRM_ROUNDS} did not fit the budget")
            break
        for k in order:
            if progress:
                progress(i / CONFIRM_ROUNDS, f"{base_r.kind}: engines round {i + 1}: {k.label}")
            try:
                samples[k] += measure_for(k)(k, CONFIRM_REPS)[0]
            except ProcessFailed as e:
                failed[k] = e.message.splitlines()[0]
        done += 1
    if not done or not samples[base]:
        notes.append(f"{base_r.kind}: no engines round was run, so each engine's gain is over its own defaults "
                     "and llama.cpp stays the choice")
        return [replace(r, vs_baseline=r.gain if r is base_r else None, overall=r is base_r) for r in results], notes
    base_med = stats.summarize(samples[base]).median
    med = {k: stats.summarize(v).median for k, v in samples.items() if v}
    winner = max((r for r in results if r.best in med), key=lambda r: med[r.best])
    out = []
    for r in results:
        overall = r is winner
        rows = []
        if r is base_r and r.best != base:
            rows.append(Tried(r.kind, "engines", base, None, tuple(samples[base]), done, "default"))
        rows.append(Tried(r.kind, "engines", r.best, None, tuple(samples.get(r.best, ())), done,
                          "failed" if r.best in failed else "best" if overall else "dropped", failed.get(r.best, "")))
        vs = med[r.best] / base_med if r.best in med else None
        out.append(replace(r, vs_baseline=vs, overall=overall, trials=r.trials + tuple(rows)))
    return out, notes


def baseline_s(job: KindJob) -> float:
    """The predicted seconds of a kind's baseline (BASELINE_REPS timed runs and llama-bench's
    warmup); 0 when the predictor has no figure."""
    p = job.predict(job.default)
    return (BASELINE_REPS + 1) * job.n_tokens / p if p else 0.0


def tune_kinds(jobs: Sequence[KindJob], measure_for: Callable[[KindJob], Measure], budget_s: float,
               clock: Callable[[], float] = time.monotonic,
               progress: Callable[[float, str], None] | None = None) -> tuple[list[KindResult], list[str]]:
    """Each kind in turn, with an even share of what is left of the budget. A kind starts only when
    its baseline is predicted to fit in what is left, and the budget must hold the first one:
    the baseline is the one run a search cannot do without."""
    first = baseline_s(jobs[0])
    if first > budget_s:
        raise ConfigError(f"a budget of {budget_s:.3g} s is shorter than one baseline of {jobs[0].title}'s defaults "
                          f"({jobs[0].test}: about {first:.3g} s predicted)",
                          hint=f"give --budget {math.ceil(10 * first)}s or more, so the search has room too")
    t0 = clock()
    results, notes = [], []
    for i, job in enumerate(jobs):
        left = budget_s - (clock() - t0)
        if i and (left <= 0 or baseline_s(job) > left):
            who = "" if job.engine == DEFAULT_ENGINE else f" ({job.title})"
            notes.append(f"{job.kind}{who} was not tuned: {max(left, 0):.0f} s of the {budget_s:.0f} s budget was "
                         f"left, and its baseline needs about {baseline_s(job):.0f} s")
            continue

        def step(frac: float, text: str, i=i) -> None:
            if progress:
                progress((i + frac) / len(jobs), text)

        results.append(tune_kind(job, measure_for(job), left / (len(jobs) - i), clock=clock, progress=step))
    return results, notes


# ---- the saved profile serve reads ------------------------------------------------------------

def tuned_path() -> Path:
    return cache_root() / "tuned.json"


def _key(model_path: Path) -> str:
    return str(Path(model_path).resolve())


FLASH_ATTN = ("on", "off", "auto")


def check_knobs(k: Knobs, where: str) -> None:
    """The ranges of settings read back from tuned.json (serve passes them to llama-server)."""
    checks.number(k.threads, f"field {where}.threads", 1, checks.MAX_THREADS, integer=True)
    checks.number(k.n_batch, f"field {where}.n_batch", 1, checks.MAX_TOKENS, integer=True)
    checks.number(k.n_ubatch, f"field {where}.n_ubatch", 1, k.n_batch, integer=True)
    checks.text(k.flash_attn, f"field {where}.flash_attn", FLASH_ATTN)
    checks.text(k.engine, f"field {where}.engine", tuple(engine_names()))
    if k.mla is not None:
        checks.number(k.mla, f"field {where}.mla", 0, engine_args.MLA_MODE, integer=True)
    for name, check in (("numa", parse_numa), ("cache_type", cache_type_name)):
        try:
            check(getattr(k, name))
        except ConfigError as e:
            raise ConfigError(f"field {where}.{name}: {e.message} ({e.hint})") from None


def check_result(r: TuneResult, where: str) -> None:
    checks.number(r.model_size_bytes, f"field {where}.model_size_bytes", 0, None, integer=True)
    for i, kr in enumerate(r.results):
        at = f"{where}.results[{i}]"
        checks.text(kr.kind, f"field {at}.kind", KINDS)
        check_knobs(kr.default, f"{at}.default")
        check_knobs(kr.best, f"{at}.best")
        for name in ("default_tokens_per_s", "best_tokens_per_s", "gain"):
            checks.number(getattr(kr, name), f"field {at}.{name}", 0, None, lo_open=True)
    if not r.results:
        raise ConfigError(f"field {where}.results is empty")


RETUNE = "re-run `cputune tune` to write it again"


def _profiles(path: Path) -> dict:
    """The file's raw entries by model path ({} when there is no file)."""
    from cputune.core.jsonio import read_json

    if not path.exists():
        return {}
    profiles = read_json(path, SCHEMA).get("profiles", {})
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: field profiles must be an object, not {checks.shown(profiles)}", hint=RETUNE)
    return profiles


def _entry(path: Path, key: str, value) -> TuneResult:
    """One entry, every field's type and range checked; a ConfigError names the file and field."""
    from cputune.core.jsonio import from_plain

    where = f"profiles[{key!r}]"
    try:
        r = from_plain(TuneResult, value, where)
        check_result(r, where)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.message}", hint=RETUNE) from None
    return r


def load_all(path: Path | None = None) -> dict[str, TuneResult]:
    """Every saved result; a ConfigError names the file and the field that is wrong."""
    path = path or tuned_path()
    return {k: _entry(path, k, v) for k, v in _profiles(path).items()}


def save(result: TuneResult, path: Path | None = None, warn: Callable[[str], None] | None = None) -> Path:
    """Adds (or replaces) this model's entry, written atomically. Nothing saved before is lost:
    when the file cannot be read whole (cut off, edited, one entry out of range), the entries
    that still validate are carried over and the file as it was is kept beside it as
    tuned.json.damaged-<UTC time>, which `warn` is told."""
    from cputune.core.jsonio import document, write_json

    path = path or tuned_path()
    profiles, problem = {}, None
    try:
        for k, v in _profiles(path).items():
            try:
                profiles[k] = _entry(path, k, v)
            except ConfigError as e:
                problem = problem or e.message
    except ConfigError as e:
        problem = e.message
    aside = None
    if problem:
        try:
            regular = stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            regular = False
        if regular:  # anything else there is write_json's to refuse
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = path.with_name(f"{path.name}.damaged-{stamp}")
            try:
                os.rename(path, aside)
            except OSError as e:
                raise WriteError(f"cannot keep the damaged {path} aside as {aside} ({e.strerror})",
                                 hint=f"move {path} away and tune again") from None
    profiles[_key(result.model_path)] = result
    write_json(path, document(SCHEMA, profiles=profiles))
    if aside and warn:
        kept = f"; the {len(profiles) - 1} other entries that were readable are carried over" if len(profiles) > 1 else ""
        warn(f"{problem}: the file as it was is kept as {aside}{kept}")
    return path


def tuned_for(model_path: Path, path: Path | None = None) -> TuneResult | None:
    """The saved result for this file, if it is still the same size (a new download is re-tuned).
    A file that is there but cannot be used is a ConfigError naming it, not silently no settings:
    serve would otherwise start untuned with nothing said."""
    path = path or tuned_path()
    try:
        raw = _profiles(path).get(_key(model_path))
        r = None if raw is None else _entry(path, _key(model_path), raw)
    except ConfigError as e:
        raise ConfigError(e.message, hint=f"{RETUNE}, or pass --no-tuned to start without it") from None
    if r is None:
        return None
    try:
        size = Path(model_path).stat().st_size
    except OSError:
        return None
    return r if size == r.model_size_bytes else None


def tuned_engine(r: TuneResult) -> str:
    """The engine serve starts: decode's fastest (decode is what a chat waits on), else prefill's."""
    best = r.for_kind("tg") or r.for_kind("pp")
    return best.engine if best else DEFAULT_ENGINE


def build_commit_of(r: TuneResult, engine: str) -> str:
    """The build of `engine` the result was measured with."""
    mine = [x.build_commit for x in r.results if x.engine == engine and x.build_commit]
    return mine[0] if mine else (r.build_commit if engine == DEFAULT_ENGINE else "")


def serve_settings(r: TuneResult, engine: str | None = None) -> dict | None:
    """What serve takes from a tune result for `engine` (default: tuned_engine): decode's threads,
    placement and kernels (decode is what a chat waits on), prefill's threads and ubatch for
    --threads-batch and -ub. None when the engine was not tuned on this file."""
    engine = engine or tuned_engine(r)
    tg, pp = r.for_kind("tg", engine), r.for_kind("pp", engine)
    if tg is None and pp is None:
        return None
    main = (tg or pp).best
    out = {"engine": engine, "threads": main.threads, "numa": main.numa, "flash_attn": main.flash_attn,
           "repack": main.repack, "cache_type": main.cache_type,
           "threads_batch": (pp.best.threads if pp else main.threads),
           "n_ubatch": (pp.best.n_ubatch if pp else main.n_ubatch),
           "n_batch": (pp.best.n_batch if pp else main.n_batch)}
    out.update({k: getattr(main, k) for k in ("fused_moe", "mla") if getattr(main, k) is not None})
    return out


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def kinds_from(text: str | Iterable[str]) -> tuple[str, ...]:
    items = [x.strip().lower() for x in (text.split(",") if isinstance(text, str) else text) if x.strip()]
    bad = [x for x in items if x not in KINDS]
    if bad or not items:
        raise ConfigError(f"--for {','.join(items) or text!r}: choose tg, pp or tg,pp")
    return tuple(dict.fromkeys(items))
