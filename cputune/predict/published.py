"""Published big-server runs: what this machine cannot show (many cores, sockets, 671B MoE).

configs/published_runs.toml holds llama.cpp and ik_llama.cpp runs that users published, each
with its source, box, engine, flags and numbers. Here they become predictor inputs; the big-box
constants (calibration.toml [published]) are fitted to them, and every prediction's range
comes from how far a fit that did not see a run misses it (leave-one-out).

What the fit sets (everything else is physics the predictor computes from the model and box):
- per-box terms: the share of the read bandwidth decode reaches, the routed experts' share of
  it, the fixed per-token cost and its growth with threads and NUMA nodes, the thread-scaling
  exponents, SMT siblings' gain, the 4 KiB-page bandwidth share;
- per-core rates by core family (configs/core_families.csv): one scale on the decode and one on
  the prefill table of each family the runs hold, the ratios between types kept from the start;
- attention's arithmetic rate (decode and prefill) and ik_llama.cpp's factors on every rate.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, replace
from typing import Sequence

from cputune.core import cores
from cputune.predict.calibrate import PRIOR_WEIGHT, best_fit, least_squares
from cputune.core.data import load_toml
from cputune.model.gguf_model import ModelProfile
from cputune.predict.predictor import BOX_TERM_RANGE, BOX_TERMS, Calibration, MachineBandwidth, Settings, for_box, predict

# Row engines: "ik" = ik_llama.cpp with its CPU flags (-fmoe, -rtr or R4 quants, -mla, -fa);
# "ik-plain" = ik_llama.cpp without them, which runs mainline's kernels; "mainline" = llama.cpp.
ENGINE_OF_ROW = {"ik": "ik_llama", "ik-plain": "llama.cpp", "mainline": "llama.cpp"}


@dataclass(frozen=True, slots=True)
class PublishedRun:
    """One row of configs/published_runs.toml, resolved to a model profile and a machine."""

    row: int | None
    hardware: str
    model_id: str
    quant: str
    threads: int
    numa: str
    engine: str  # as the row says: ik, ik-plain or mainline
    tg_tokens_per_s: float | None
    pp_tokens_per_s: float | None
    model: ModelProfile
    machine: MachineBandwidth
    depth: int = 0
    pp_tokens: int = 512
    cache_type: str = "f16"
    hugepages: str = "unknown"
    threads_batch: int | None = None
    n_ubatch: int = 512  # -ub as published (llama.cpp's and sweep-bench's default 512)
    source: str = ""
    date: str | None = None  # YYYY-MM-DD the run was published: its build is no newer

    @property
    def label(self) -> str:
        return f"row {self.row}" if self.row is not None else f"{self.hardware} {self.model_id}"

    def settings(self) -> Settings:
        # Unknown pages are predicted as huge pages, the predictor's default; rows that say 4K
        # are the ones that pin the 4 KiB-page share.
        return Settings(threads=self.threads, numa=self.numa, depth=self.depth,
                        cache_type=self.cache_type, n_prompt=self.pp_tokens,
                        page_size="4K" if self.hugepages == "4K" else "2M",
                        engine=ENGINE_OF_ROW[self.engine], threads_batch=self.threads_batch,
                        n_ubatch=self.n_ubatch, build_date=self.date,
                        # ik_llama.cpp without -rtr has none of mainline's load-time repacking
                        repack=self.engine != "ik-plain")


def load_published_runs(held_out: bool = False) -> list[PublishedRun]:
    """The rows the [published] fit is made of; `held_out`: instead, the rows marked held_out =
    true, which no fit sees (a box and model kept apart as the out-of-sample check)."""
    from cputune.model import catalog
    from cputune.predict import hardware

    data = load_toml("published_runs.toml")
    shapes = {mid: catalog.model_from_table(mid, t, "configs/published_runs.toml")
              for mid, t in data.get("models", {}).items()}
    profiles: dict[tuple[str, str], ModelProfile] = {}
    machines: dict[str, MachineBandwidth] = {}
    out = []
    for r in data["run"]:
        flag = r.get("held_out", False)
        if not isinstance(flag, bool):
            raise ValueError(f"published_runs.toml row {r.get('row')}: held_out must be true or false, not {flag!r}")
        if flag != held_out:
            continue
        n_ubatch = r.get("n_ubatch", 512)
        if not isinstance(n_ubatch, int) or isinstance(n_ubatch, bool) or not 1 <= n_ubatch <= 1 << 16:
            raise ValueError(f"published_runs.toml row {r.get('row')}: n_ubatch must be an integer in 1..65536, "
                             f"not {n_ubatch!r}")
        date = r.get("date")
        if date is not None and not (isinstance(date, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", date)):
            raise ValueError(f"published_runs.toml row {r.get('row')}: date must be YYYY-MM-DD, not {date!r}")
        key = (r["model"], r["quant"])
        if key not in profiles:
            m = shapes.get(r["model"]) or catalog.catalog_model(r["model"])
            profiles[key] = catalog.catalog_profile(m, r["quant"], as_typed=r["model"])
        if r["hardware"] not in machines:
            machines[r["hardware"]] = hardware.machine_from_hardware(hardware.load_hardware(r["hardware"]))
        if r["engine"] not in ENGINE_OF_ROW:
            raise ValueError(f"published_runs.toml: engine {r['engine']!r} is not one of {list(ENGINE_OF_ROW)}")
        out.append(PublishedRun(
            row=r.get("row"), hardware=r["hardware"], model_id=r["model"], quant=r["quant"],
            threads=r["threads"], numa=r["numa"], engine=r["engine"],
            tg_tokens_per_s=r.get("tg_tokens_per_s"), pp_tokens_per_s=r.get("pp_tokens_per_s"),
            model=profiles[key], machine=machines[r["hardware"]], depth=r.get("depth", 0),
            pp_tokens=r.get("pp_tokens", 512), cache_type=r.get("cache_type", "f16"),
            hugepages=r.get("hugepages", "unknown"), threads_batch=r.get("threads_batch"), n_ubatch=n_ubatch,
            date=date,
            source=r.get("source") or f"configs/published_runs.toml row {r.get('row')} (its header names the thread)"))
    return out


def figures(runs: Sequence[PublishedRun], cal: Calibration) -> list[tuple[PublishedRun, str, float, float]]:
    """(run, "tg"|"pp", predicted, measured) for every published figure, each run's box with the
    terms the fit found for it (for_box)."""
    out = []
    for r in runs:
        p = predict(r.model, r.machine, r.settings(), for_box(cal, r.hardware))
        if r.tg_tokens_per_s:
            out.append((r, "tg", p.tg_tokens_per_s, r.tg_tokens_per_s))
        if r.pp_tokens_per_s:
            out.append((r, "pp", p.pp_tokens_per_s, r.pp_tokens_per_s))
    return out


# --------------------------------------------------------------------------------------------
# the fit

# name -> (Calibration field, transform): "share" in (0, 1) through a logistic, "signed" as is,
# "log" positive. The prior pulls each toward its start, weakly, so a term the runs cannot see
# stays where physics put it.
TERMS = {
    "eff": ("bw_efficiency", "share"),
    "moe": ("moe_bw_efficiency", "share"),
    "ovh": ("overhead_s_per_layer", "log"),
    "ovh_t": ("overhead_s_per_layer_thread", "log"),
    "node": ("overhead_node_factor", "log"),
    "node_pp": ("prefill_node_factor", "log"),
    "moe_pp": ("moe_prefill_efficiency", "log"),
    "ts": ("serial_share", "share"),
    "ts_pp": ("prefill_serial_share", "share"),
    "smt_tg": ("smt_tg_gain", "signed"),
    "smt_pp": ("smt_pp_gain", "signed"),
    "page4k": ("page_4k_efficiency", "share"),
    "attn": ("attn_gflops_per_core", "log"),
    "attn_pp": ("attn_prefill_gflops_per_core", "log"),
    "ik_tg": ("ik_tg_factor", "log"),
    "ik_pp": ("ik_pp_factor", "log"),
    "ik_attn": ("ik_attn_factor", "log"),
}


# How strongly a box's own terms are pulled toward the pooled ones (factor 1), in squared log
# errors per term: 0.25 makes a factor of 1.2 cost what one figure 10 % off costs.
BOX_PRIOR_WEIGHT = 0.25


# Where the fit starts the terms whose shipped default sits on a boundary (1, 0), and so has no
# gradient there: linear thread scaling, no SMT gain, no page cost, no node cost.
INTERIOR = {"ts": 0.01, "ts_pp": 0.01, "smt_tg": -0.1, "smt_pp": -0.1, "page4k": 0.85, "node": 0.2, "node_pp": 0.2,
            "moe": 0.6}


def _to_x(kind: str, v: float) -> float:
    if kind == "share":
        v = min(max(v, 1e-3), 0.999)
        return math.log(v / (1 - v))
    return v if kind == "signed" else math.log(max(v, 1e-12))


def _from_x(kind: str, x: float) -> float:
    if kind == "share":
        return 1 / (1 + math.exp(-x))
    return x if kind == "signed" else math.exp(x)


def fitted_terms(runs: Sequence[PublishedRun]) -> list[str]:
    """The terms these runs can tell: a term needs rows that vary what it describes."""
    names = ["eff", "moe", "ovh", "ovh_t", "moe_pp"]
    if any(r.machine.nodes > 1 and r.numa != "one-node" for r in runs):
        names += ["node", "node_pp"]
    if len({(r.hardware, r.threads) for r in runs}) > len({r.hardware for r in runs}):
        names += ["ts", "ts_pp"]
    if any(r.threads > r.machine.cores for r in runs):
        names += ["smt_tg", "smt_pp"]
    if any(r.hugepages == "4K" for r in runs):
        names.append("page4k")
    # Attention's rate is a property of the engine's kernel: mainline's comes from this project's
    # own depth sweeps (calibration.toml [default]) unless mainline runs at depth are published.
    deep = [r for r in runs if r.depth > 0 or r.pp_tokens > 512]
    if any(r.engine != "ik" for r in deep):
        names += ["attn", "attn_pp"]
    if any(r.engine == "ik" for r in runs):
        names += ["ik_tg", "ik_pp"] + (["ik_attn"] if any(r.engine == "ik" for r in deep) else [])
    return names


def families(runs: Sequence[PublishedRun]) -> list[str]:
    return sorted({r.machine.core_family or "unknown" for r in runs})


def fit_published(runs: Sequence[PublishedRun], start: Calibration,
                  warm: Calibration | None = None) -> Calibration:
    """Log least squares over every published figure (soft-L1 is not used here: the rows are
    published bests, not noisy repetitions). `warm` starts from an earlier fit (leave-one-out)."""
    names = fitted_terms(runs)
    fams = families(runs)
    base_d, base_p = start.decode_gbps_per_core, start.prefill_gflops_per_core
    # A family's decode or prefill scale is only told by runs of it with that figure; a family
    # without (zen5 has published decode runs, no prefill ones) borrows the nearest family's by
    # core and ISA (cores.nearest_family), not the bare base table, which no box was fitted to.
    fam_of = {id(r): r.machine.core_family or "unknown" for r in runs}
    told = {k: {fam_of[id(r)] for r in runs if getattr(r, f"{k}_tokens_per_s")} for k in ("tg", "pp")}
    isa_of = {fam_of[id(r)]: r.machine.isa for r in runs}

    def borrowed(f: str, kind: str) -> str:
        if f in told[kind] or not told[kind]:
            return f
        return cores.nearest_family(tuple(sorted(told[kind])), isa_of[f]) or f

    def unpack(x: Sequence[float]) -> Calibration:
        v = dict(zip(names, x))
        fields = {TERMS[n][0]: _from_x(TERMS[n][1], v[n]) for n in names}
        scale = {f: (math.exp(x[len(names) + 2 * i]), math.exp(x[len(names) + 2 * i + 1]))
                 for i, f in enumerate(fams)}
        rates = {}
        for f in fams:
            d, p = scale[borrowed(f, "tg")][0], scale[borrowed(f, "pp")][1]
            rates[f] = {"decode": {t: r * d for t, r in base_d.items()},
                        "prefill": {t: r * p for t, r in base_p.items()}}
        # The pooled terms only: a box's own terms come after (fit_box_terms).
        return replace(start, **fields, family_rates={**start.family_rates, **rates}, box_terms={},
                       source=f"fitted to {len(runs)} published big-server runs (configs/published_runs.toml)")

    def x_of(c: Calibration, interior: bool = False) -> list[float]:
        x = [_to_x(TERMS[n][1], INTERIOR.get(n, v) if interior else v)
             for n in names for v in [getattr(c, TERMS[n][0])]]
        for f in fams:
            fr = c.family_rates.get(f)
            # Only a table of this fit's own form (every base type) warm-starts a family's scale;
            # a box's measured table (cputune calibrate, fewer types) does not.
            if fr and set(base_d) <= set(fr["decode"]) and set(base_p) <= set(fr["prefill"]):
                x += [math.log(statistics.median(fr["decode"][t] / base_d[t] for t in base_d)),
                      math.log(statistics.median(fr["prefill"][t] / base_p[t] for t in base_p))]
            else:
                x += [0.0, 0.0]
        return x

    x0 = x_of(start, interior=True)

    def residuals(x: Sequence[float]) -> list[float]:
        cal = unpack(x)
        errs = [math.log(p / m) for _, _, p, m in figures(runs, cal)]
        return errs + [math.sqrt(PRIOR_WEIGHT) * (a - b) for a, b in zip(x, x0)]

    if warm is not None:
        return unpack(least_squares(residuals, x_of(warm), iters=30))
    # The fixed cost, the expert efficiency and slow cores trade off, and LM finds the nearest
    # minimum only: start also from a low expert efficiency and slower cores.
    alt = list(x0)
    if "moe" in names:
        alt[names.index("moe")] = _to_x("share", 0.4)
    for i in range(len(fams)):
        alt[len(names) + 2 * i] += math.log(0.3)
    return unpack(best_fit(residuals, [x0, alt]))


def fit_box_terms(runs: Sequence[PublishedRun], pooled: Calibration) -> dict[str, dict[str, float]]:
    """Each box's own terms (Calibration.box_terms), with the pooled ones held: a factor on the
    share of its profile's bandwidth figure that decode reaches (`bw`) and one on its fixed cost
    (`fixed`), fitted to its decode runs alone and pulled toward 1 by BOX_PRIOR_WEIGHT. They are
    what a box's runs say of it that the profile does not (an MLC figure that undersells the
    box, a fabric with cheaper barriers): the pooled terms stay what a box without runs gets."""
    lo, hi = BOX_TERM_RANGE
    out = {}
    for box in sorted({r.hardware for r in runs if r.tg_tokens_per_s}):
        mine = [r for r in runs if r.hardware == box and r.tg_tokens_per_s]

        def residuals(x: Sequence[float]) -> list[float]:
            f = {k: min(max(math.exp(v), lo), hi) for k, v in zip(BOX_TERMS, x)}
            cal = replace(pooled, box_terms={box: f})
            return ([math.log(p / m) for _, k, p, m in figures(mine, cal) if k == "tg"]
                    + [math.sqrt(BOX_PRIOR_WEIGHT) * v for v in x])

        x = least_squares(residuals, [0.0] * len(BOX_TERMS), iters=50)
        out[box] = {k: round(min(max(math.exp(v), lo), hi), 3) for k, v in zip(BOX_TERMS, x)}
    return out


def fit_with_boxes(runs: Sequence[PublishedRun], box_runs: Sequence[PublishedRun], start: Calibration,
                   warm: Calibration | None = None) -> Calibration:
    """The pooled fit on `runs`, then every box's own terms from `box_runs` (its fitted runs and
    any held-out runs of it: those calibrate their box, never the pooled terms)."""
    pooled = fit_published(runs, start, warm=warm)
    return replace(pooled, box_terms=fit_box_terms(box_runs, pooled))


# --------------------------------------------------------------------------------------------
# held-out errors and the range they give


@dataclass(frozen=True, slots=True)
class HeldOut:
    """A figure predicted by a fit that did not see its run."""

    run: PublishedRun
    kind: str  # tg | pp
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1


def leave_one_out(runs: Sequence[PublishedRun], start: Calibration,
                  full: Calibration | None = None, progress=None,
                  box_only: Sequence[PublishedRun] = ()) -> list[HeldOut]:
    """Each run predicted by a fit on all the others (warm-started from the fit on all): the
    pooled terms without it, and its box's own terms from that box's other runs. `box_only`:
    runs that calibrate their box but not the pooled terms (held out); each is predicted the
    same way, by the pooled fit and its box's other runs."""
    full = full or fit_published(runs, start)
    every = list(runs) + list(box_only)
    out = []
    for i, r in enumerate(every):
        if progress:
            progress(i, len(every))
        pooled = fit_published([x for x in runs if x is not r], start, warm=full) if i < len(runs) else full
        terms = fit_box_terms([x for x in every if x.hardware == r.hardware and x is not r], pooled)
        out += [HeldOut(rr, k, p, m) for rr, k, p, m in figures([r], replace(pooled, box_terms=terms))]
    return out


def box_weights(boxes: Sequence[str]) -> list[float]:
    """1 / (figures of that box) for each figure's box: every box weighs the same in a band."""
    n = {b: boxes.count(b) for b in set(boxes)}
    return [1 / n[b] for b in boxes]


def leave_one_box_out(runs: Sequence[PublishedRun], start: Calibration,
                      full: Calibration | None = None, progress=None) -> list[HeldOut]:
    """Each box's runs predicted by a fit on the other boxes' runs: the error a box the fit has
    never seen can expect (a row left out of leave_one_out still has its box's other rows in)."""
    full = full or fit_published(runs, start)
    boxes = sorted({r.hardware for r in runs})
    out = []
    for i, box in enumerate(boxes):
        if progress:
            progress(i, len(boxes))
        cal = fit_published([r for r in runs if r.hardware != box], start, warm=full)
        out += [HeldOut(rr, k, p, m) for rr, k, p, m in figures([r for r in runs if r.hardware == box], cal)]
    return out


def error_band(errors: Sequence[float], coverage: float = 0.8,
               weights: Sequence[float] | None = None) -> tuple[float, float]:
    """The (low, high) factors on a prediction that held-out errors fall within `coverage` of the
    time: a measured value m = predicted / (1 + e), so the band is the quantiles of 1 / (1 + e).
    `weights` (one per error): weighted quantiles, so that each box counts once however many runs
    it published (box_weights)."""
    lo_q, hi_q = (1 - coverage) / 2, 1 - (1 - coverage) / 2
    if weights is not None:
        pairs = sorted((1 / (1 + e), w) for e, w in zip(errors, weights, strict=True) if w > 0)
        if not pairs:
            return 1.0, 1.0
        total = sum(w for _, w in pairs)

        def wq(p: float) -> float:
            acc = 0.0
            for r, w in pairs:  # the midpoint rule: a value sits at the middle of its weight
                if acc + w / 2 >= p * total:
                    return r
                acc += w
            return pairs[-1][0]

        return wq(lo_q), wq(hi_q)
    ratios = sorted(1 / (1 + e) for e in errors)
    if not ratios:
        return 1.0, 1.0

    def q(p: float) -> float:
        k = p * (len(ratios) - 1)
        i = int(k)
        return ratios[i] + (ratios[min(i + 1, len(ratios) - 1)] - ratios[i]) * (k - i)

    return q(lo_q), q(hi_q)
