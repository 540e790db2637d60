"""A quant's quality cost: the published rows of configs/quant_quality.csv and an estimate from them.

Every number comes from a row of configs/quant_quality.csv, whose header and `source` column say
where it was published (llama.cpp's perplexity scoreboard, ik_llama.cpp threads, the cookers' model
cards). This module reads and checks those rows, picks the family closest to a model, and
estimates the cost at the model's bits per weight:

* per family and metric (perplexity change in %, mean KLD), the rows sorted by bits per weight are
  made monotone: the running minimum from the fewest bits up (the lower envelope, "the best quant
  published with at most this many bits"). A row that another row with fewer bits beats (a legacy
  Q4_1 above a Q4_K_M, or noise: GLM-4.6's Q8_0 above its IQ5_K) is dominated and left out, so no
  row can make more bits look worse;
* between the remaining rows (the knots) the metric is interpolated linearly in log(metric)
  against bpw: errors fall roughly exponentially with bits (the LLaMA-3-8B scoreboard in
  shared/reference/quant_quality.md loses a roughly constant factor per bit taken away);
* outside the family's rows the end knots' slope is continued, clamped to be non-increasing, and
  the result is marked extrapolated; values are never below the floors below;
* an exact preset match (the family has a row of the same name) uses that row's published values,
  at whatever bpw the model has (the same preset's bpw moves by a few tenths between models, with
  the embedding's share), but only when the row is consistent with the monotone fit: a knot of
  every metric it has, not dominated. A dominated row (the scoreboard's Q4_1, Q5_1, Q2_K without
  imatrix; GLM-4.6's Q8_0) is not used even for its own preset: the curve at the model's bpw is,
  which is the best published with at most those bits, so such a preset is shown optimistically.
"""

from __future__ import annotations

import bisect
import csv
import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from cputune.core.data import config_path
from cputune.core.errors import ConfigError

CSV_NAME = "quant_quality.csv"
METRICS = ("delta_ppl", "ppl", "ppl_change_pct", "kld")
# The smallest cost the estimate reports: a row at or below it cannot be told from its reference.
# 0.01 % of perplexity is below every published non-zero change in the csv (LLaMA-3-8B's F16 row,
# 0.0015 / 6.2332 = 0.024 %) and far below the ~0.5 % standard error the wiki.test.raw runs quote;
# 1e-4 mean KLD is below the smallest published KLD (LLaMA-3-8B F16, 0.00055). A baseline row (the
# source's own Q8_0 or BF16, cost 0 by definition) and a row measured below its baseline sit here.
PPL_FLOOR_PCT = 0.01
KLD_FLOOR = 1e-4
BPW_RANGE = (0.5, 33.0)  # generous bounds around the smallest IQ1 mixes (~1.6 bits a weight) and F32 (32)


@dataclass(frozen=True, slots=True)
class QualityRow:
    """One quant of one model family in configs/quant_quality.csv, its metrics merged."""

    model_family: str
    params_b: float
    moe: bool
    quant: str
    imatrix: str
    bpw: float
    ppl_change_pct: float | None
    kld: float | None
    source: str


@dataclass(frozen=True, slots=True)
class Quality:
    """A quant's estimated quality cost and how it was made.

    basis / kld_basis: "row" (the family's row of this preset, published), "interpolated" (between
    two of the family's rows), "extrapolated" (beyond the family's rows) or "" (no such metric for
    the family). neighbours: the rows the value comes from (the row itself, the two around it, or
    the two end rows continued). Values are never below PPL_FLOOR_PCT / KLD_FLOOR, a baseline row's
    included, so that nothing with more bits is shown costing more.
    """

    ppl_change_pct: float | None
    kld: float | None
    model_family: str
    family_params_b: float
    family_moe: bool
    n_rows: int  # rows (quants) the family has in the csv
    bpw_min: float  # the family's rows span these bits per weight
    bpw_max: float
    bits_per_weight: float  # what the estimate was made at: the model's
    basis: str
    kld_basis: str
    extrapolated: bool  # either metric is beyond the family's rows
    exact: bool  # the perplexity is the published row of this preset
    row_quant: str  # that row when exact, else ""
    neighbours: tuple[str, ...]
    sources: tuple[str, ...]
    source: str  # the sources, joined
    note: str = ""


# --- reading the csv -----------------------------------------------------------------------------


def _where(path: Path, line: int) -> str:
    return f"configs/{path.name} line {line}" if path == config_path(CSV_NAME) else f"{path} line {line}"


def _number(text: str, what: str, where: str, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> float:
    try:
        x = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {what} {text!r} is not a number") from None
    if not math.isfinite(x):
        raise ConfigError(f"{where}: {what} {text!r} is not finite")
    if lo is not None and (x <= lo if lo_open else x < lo):
        raise ConfigError(f"{where}: {what} {x:g} is out of range", hint=f"it must be {'above' if lo_open else 'at least'} {lo:g}")
    if hi is not None and x > hi:
        raise ConfigError(f"{where}: {what} {x:g} is out of range", hint=f"it must be at most {hi:g}")
    return x


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.startswith("#"):
            out.append((n, next(csv.reader([line]))))
    return out


def load_rows(path: Path | None = None) -> tuple[QualityRow, ...]:
    """The rows of configs/quant_quality.csv (or `path`), every value checked.

    A ConfigError names the file and line of the first bad value: an unknown metric, a number that
    is not finite or out of range, a family whose rows disagree on its parameters, a quant whose
    metrics disagree on its bits per weight, or a metric given twice.
    """
    path = config_path(CSV_NAME) if path is None else Path(path)
    lines = _lines(path)
    if not lines:
        raise ConfigError(f"{path}: no header and no rows")
    header_line, header = lines[0]
    need = ("model_family", "params_b", "moe", "quant", "imatrix", "bpw", "metric", "value", "baseline_ppl",
            "source")
    missing = [c for c in need if c not in header]
    if missing:
        raise ConfigError(f"{_where(path, header_line)}: the header lacks {', '.join(missing)}")
    merged: dict[tuple[str, str], dict] = {}
    families: dict[str, tuple[float, bool, int]] = {}
    seen: dict[tuple[str, str, str], int] = {}
    for n, cells in lines[1:]:
        where = _where(path, n)
        if len(cells) != len(header):
            raise ConfigError(f"{where}: {len(cells)} fields, the header has {len(header)}")
        r = dict(zip(header, (c.strip() for c in cells)))
        fam, quant, metric = r["model_family"], r["quant"].upper(), r["metric"]
        if not fam or not quant:
            raise ConfigError(f"{where}: model_family and quant must not be empty")
        where = f"{where} ({fam} {quant} {metric})"
        if metric not in METRICS:
            raise ConfigError(f"{where}: unknown metric {metric!r}", hint=", ".join(METRICS))
        if not r["source"]:
            raise ConfigError(f"{where}: no source", hint="every row names where its number was published")
        params = _number(r["params_b"], "params_b", where, 0, None, lo_open=True)
        moe_text = r["moe"].lower()
        if moe_text not in ("true", "false"):
            raise ConfigError(f"{where}: moe {r['moe']!r} is neither true nor false")
        moe = moe_text == "true"
        bpw = _number(r["bpw"], "bpw", where, *BPW_RANGE)
        value = _number(r["value"], "value", where)
        base = _number(r["baseline_ppl"], "baseline_ppl", where, 0, None, lo_open=True) if r["baseline_ppl"] else None
        if metric in ("delta_ppl", "ppl") and base is None:
            raise ConfigError(f"{where}: a {metric} row needs baseline_ppl")
        if metric == "delta_ppl":
            _number(r["value"], "delta_ppl", where, -base, None, lo_open=True)  # the quant's ppl is above 0
            pct = 100 * value / base
        elif metric == "ppl":
            _number(r["value"], "ppl", where, 0, None, lo_open=True)
            pct = 100 * (value - base) / base
        elif metric == "ppl_change_pct":
            pct = _number(r["value"], "ppl_change_pct", where, -100, None, lo_open=True)
        else:
            pct = None
            _number(r["value"], "kld", where, 0)
        if fam in families and families[fam][:2] != (params, moe):
            raise ConfigError(f"{where}: params_b {params:g} / moe {moe} disagree with line {families[fam][2]} "
                              f"of the same family")
        families.setdefault(fam, (params, moe, n))
        key = (fam, quant, "kld" if metric == "kld" else "ppl")
        if key in seen:
            raise ConfigError(f"{where}: a second {key[2]} for {fam} {quant} (line {seen[key]} has one)")
        seen[key] = n
        row = merged.setdefault((fam, quant), {
            "model_family": fam, "params_b": params, "moe": moe, "quant": quant, "imatrix": r["imatrix"],
            "bpw": bpw, "ppl_change_pct": None, "kld": None, "source": r["source"], "_line": n})
        if row["bpw"] != bpw:
            raise ConfigError(f"{where}: bpw {bpw:g} disagrees with line {row['_line']} ({row['bpw']:g})")
        if pct is None:
            row["kld"] = value
        else:
            row["ppl_change_pct"] = pct
    return tuple(QualityRow(**{k: v for k, v in d.items() if k != "_line"}) for d in merged.values())


@functools.lru_cache(maxsize=None)
def quality_rows() -> tuple[QualityRow, ...]:
    """configs/quant_quality.csv, read and checked once."""
    return load_rows()


# --- one family's curve --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Curve:
    """One metric of one family: the knots (rows on the lower envelope), bpw rising, values not.

    Between knots the value is v0 * (v1 / v0) ** t, linear in log(value); kept in that form (not
    exp of interpolated logs) so that two equal knots give exactly their value between them.
    """

    xs: tuple[float, ...]
    vs: tuple[float, ...]
    quants: tuple[str, ...]
    floor: float
    bpw_min: float  # the rows' span, dominated rows included
    bpw_max: float

    def _slope(self, i: int, j: int) -> float:
        """d log(value) / d bpw between knots i and j, clamped so more bits never cost more."""
        return min(math.log(self.vs[j] / self.vs[i]) / (self.xs[j] - self.xs[i]), 0.0)

    def at(self, bpw: float) -> tuple[float, str, tuple[str, ...]]:
        """(value, basis, neighbours) at `bpw`; basis is "interpolated" or "extrapolated"."""
        xs, vs, n = self.xs, self.vs, len(self.xs)
        if n == 1:  # one row: no slope to carry, the value holds only across the rows' span
            basis = "interpolated" if self.bpw_min <= bpw <= self.bpw_max else "extrapolated"
            return max(vs[0], self.floor), basis, self.quants
        if bpw < self.bpw_min:
            v = vs[0] * math.exp(self._slope(0, 1) * (bpw - xs[0]))
            basis, names = "extrapolated", self.quants[:2]
        elif bpw > self.bpw_max:
            # From the envelope's value at the last row (flat after the last knot), so it is continuous.
            v = vs[-1] * math.exp(self._slope(n - 2, n - 1) * (bpw - self.bpw_max))
            basis, names = "extrapolated", self.quants[-2:]
        elif bpw >= xs[-1]:  # past the last knot, dominated rows only: the envelope is flat
            v, basis, names = vs[-1], "interpolated", self.quants[-1:]
        else:
            i = bisect.bisect_right(xs, bpw)  # xs[i-1] <= bpw < xs[i]
            t = (bpw - xs[i - 1]) / (xs[i] - xs[i - 1])
            v = vs[i - 1] * (vs[i] / vs[i - 1]) ** t
            basis, names = "interpolated", (self.quants[i - 1],) if t == 0 else self.quants[i - 1:i + 1]
        return max(v, self.floor), basis, names

    def is_knot(self, quant: str) -> bool:
        """Whether `quant`'s row is on the envelope (no row with fewer bits does better)."""
        return quant in self.quants


def curve(rows: Sequence[QualityRow], metric: str) -> Curve | None:
    """The monotone curve of `metric` ("ppl_change_pct" or "kld") over `rows` (one family)."""
    floor = PPL_FLOOR_PCT if metric == "ppl_change_pct" else KLD_FLOOR
    pts = sorted((r.bpw, max(getattr(r, metric), floor), r.quant) for r in rows if getattr(r, metric) is not None)
    if not pts:
        return None
    xs, vs, quants = [], [], []
    best = math.inf
    for bpw, v, q in pts:
        if v <= best and (not xs or bpw > xs[-1]):  # a knot: no row with fewer bits does better
            xs.append(bpw)
            vs.append(v)
            quants.append(q)
        best = min(best, v)
    return Curve(tuple(xs), tuple(vs), tuple(quants), floor, pts[0][0], pts[-1][0])


# --- the family and the estimate -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    params_b: float
    moe: bool
    rows: tuple[QualityRow, ...]


def families(rows: Sequence[QualityRow]) -> dict[str, Family]:
    grouped: dict[str, list[QualityRow]] = {}
    for r in rows:
        grouped.setdefault(r.model_family, []).append(r)
    return {f: Family(f, rs[0].params_b, rs[0].moe, tuple(rs)) for f, rs in grouped.items()}


def choose_family(total_params: int, is_moe: bool, rows: Sequence[QualityRow]) -> Family | None:
    """The family closest to a model: MoE rows for a MoE model (dense for dense) when there are
    any, then the family nearest in log(parameters); on a tie the one with more rows (a denser
    curve), then the name."""
    fams = families(rows)
    pool = [f for f in fams.values() if f.moe == is_moe] or list(fams.values())
    if not pool:
        return None
    params_b = max(total_params, 1) / 1e9
    return min(pool, key=lambda f: (abs(math.log(params_b / f.params_b)), -len(f.rows), f.name))


def _sources(rows: Sequence[QualityRow]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(r.source for r in rows))


def estimate(family: Family, quant: str, bits_per_weight: float) -> Quality:
    """`quant` at `bits_per_weight` on `family`'s curves (see the module docstring)."""
    quant = quant.upper()
    ppl_c, kld_c = curve(family.rows, "ppl_change_pct"), curve(family.rows, "kld")
    row = next((r for r in family.rows if r.quant == quant), None)
    exact = (row is not None and ppl_c is not None and row.ppl_change_pct is not None
             and ppl_c.is_knot(quant) and (row.kld is None or kld_c is None or kld_c.is_knot(quant)))

    def value(c: Curve | None, published: float | None) -> tuple[float | None, str, tuple[str, ...]]:
        if c is None:
            return None, "", ()
        if exact and published is not None:
            return max(published, c.floor), "row", (quant,)
        return c.at(bits_per_weight)

    ppl, basis, names = value(ppl_c, row.ppl_change_pct if row else None)
    kld, kld_basis, _ = value(kld_c, row.kld if row else None)
    sources = _sources(family.rows)
    return Quality(
        ppl_change_pct=ppl, kld=kld, model_family=family.name, family_params_b=family.params_b,
        family_moe=family.moe, n_rows=len(family.rows), bpw_min=min(r.bpw for r in family.rows),
        bpw_max=max(r.bpw for r in family.rows), bits_per_weight=bits_per_weight, basis=basis,
        kld_basis=kld_basis, extrapolated="extrapolated" in (basis, kld_basis), exact=basis == "row",
        row_quant=quant if basis == "row" else "", neighbours=names, sources=sources,
        source="; ".join(sources))


def quality_of(quant: str, bits_per_weight: float, total_params: int, is_moe: bool,
               rows: Sequence[QualityRow] | None = None) -> Quality | None:
    """The estimated cost of `quant` at `bits_per_weight` for a model of `total_params`, from the
    closest family's published rows (choose_family, estimate); None when there are no rows."""
    rows = quality_rows() if rows is None else tuple(rows)
    fam = choose_family(total_params, is_moe, rows)
    if fam is None:
        return None
    q = estimate(fam, quant, bits_per_weight)
    params_b = max(total_params, 1) / 1e9
    note = ""
    if fam.moe != is_moe:
        note = f"measured on a {'MoE' if fam.moe else 'dense'} model"
    elif not is_moe and params_b < fam.params_b / 2:
        note = f"measured on {fam.params_b:g}B parameters; a {params_b:.1f}B model loses more"
    return replace(q, note=note) if note else q
