"""cputune.model.quality: the published rows of configs/quant_quality.csv, checked, and the estimate made
from them (monotone in bits per weight, log-linear between rows, marked when extrapolated)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from cputune.model import quality
from cputune.core.data import config_path
from cputune.core.errors import ConfigError

ROWS = quality.quality_rows()
FAMILIES = quality.families(ROWS)
GRID = [1.5 + 0.01 * i for i in range(1451)]  # 1.50 ... 16.00 bits per weight


def csv_rows() -> list[dict]:
    """The csv read with nothing but the csv module, to check the module against."""
    with config_path("quant_quality.csv").open(newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


# --- (a) monotone in bits per weight ----------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_estimate_never_rises_with_more_bits(family):
    fam = FAMILIES[family]
    est = [quality.estimate(fam, "", b) for b in GRID]
    for metric, floor in (("ppl_change_pct", quality.PPL_FLOOR_PCT), ("kld", quality.KLD_FLOOR)):
        values = [getattr(q, metric) for q in est]
        if all(v is None for v in values):
            continue
        assert all(v is not None and math.isfinite(v) and v >= floor for v in values), metric
        rises = [(GRID[i], values[i], values[i + 1]) for i in range(len(values) - 1) if values[i + 1] > values[i]]
        assert not rises, f"{family} {metric} rises with bits: {rises[:3]}"
    # And far beyond the rows on both sides it stays monotone and non-negative.
    far = [quality.estimate(fam, "", b).ppl_change_pct for b in (0.6, 1.0, 16.0, 24.0, 32.0)]
    assert far == sorted(far, reverse=True) and far[-1] >= quality.PPL_FLOOR_PCT


def test_a_dominated_row_does_not_make_more_bits_look_worse():
    # The scoreboard's Q4_1 (no imatrix, 5.11 bpw) is worse than its Q4_K_M (4.89 bpw). The envelope
    # leaves it out, even for a Q4_1 file: the estimate is the best published with at most 5.11 bits.
    llama = FAMILIES["llama-3-8b"]
    q41 = next(r for r in llama.rows if r.quant == "Q4_1")
    q4km = next(r for r in llama.rows if r.quant == "Q4_K_M")
    assert q41.bpw > q4km.bpw and q41.ppl_change_pct > q4km.ppl_change_pct
    q = quality.estimate(llama, "Q4_1", q41.bpw)
    assert not q.exact and q.basis == "interpolated" and q.ppl_change_pct <= q4km.ppl_change_pct
    # GLM-4.6's IQ5_K measured below its BF16 (noise): its Q8_0, measured above, is not used either.
    glm = FAMILIES["glm-4.6"]
    q8 = quality.estimate(glm, "Q8_0", 8.5)
    iq5 = quality.estimate(glm, "IQ5_K", 6.0)
    assert not q8.exact and q8.ppl_change_pct <= iq5.ppl_change_pct == quality.PPL_FLOOR_PCT


def test_a_row_on_the_envelope_is_used_for_its_preset():
    # Q4_K_M is on LLaMA-3-8B's envelope: its published row, at any bpw the model's Q4_K_M has.
    llama = FAMILIES["llama-3-8b"]
    for bpw in (4.82, 4.89, 5.0):
        q = quality.estimate(llama, "q4_k_m", bpw)
        assert q.exact and q.basis == q.kld_basis == "row" and q.row_quant == "Q4_K_M"
        assert q.ppl_change_pct == pytest.approx(100 * 0.1755 / 6.2332) and q.kld == pytest.approx(0.03127)


# --- (b) the old nearest-row failures ----------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_more_bits_cost_clearly_less(family):
    """The nearest-row estimate gave IQ1_S (1.56 bpw) Q3_K_M's cost and Q6_K (6.56) IQ4_XS's (4.25)
    on a family without those presets. Now every family with rows around 3.9 and 6.56 bpw orders them,
    by name (an exact row where the family has one) and by bits alone."""
    fam = FAMILIES[family]
    rows_around = fam_min(fam) < 3.9 and fam_max(fam) > 6.56
    if not rows_around:
        pytest.skip(f"{family} has no rows around 3.9 and 6.56 bpw")
    for named in (True, False):
        def cost(quant, bpw, named=named):
            return quality.estimate(fam, quant if named else "", bpw).ppl_change_pct

        assert cost("IQ1_S", 1.56) > 2 * cost("Q3_K_M", 3.9)
        assert cost("Q6_K", 6.56) < cost("IQ4_XS", 4.25)


def fam_min(fam) -> float:
    return min(r.bpw for r in fam.rows)


def fam_max(fam) -> float:
    return max(r.bpw for r in fam.rows)


def test_a_big_moe_model_gets_its_own_curve():
    # DeepSeek-R1 at 671B, the catalog's presets: the cost falls with every step up in bits.
    presets = [("IQ1_S", 1.594), ("IQ2_XXS", 2.081), ("Q2_K", 2.911), ("Q3_K_M", 3.806), ("IQ4_XS", 4.287),
               ("Q4_K_M", 4.822), ("Q6_K", 6.568), ("Q8_0", 8.504)]
    costs = [quality.quality_of(q, b, 671_000_000_000, is_moe=True).ppl_change_pct for q, b in presets]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)
    # Far less per bit than an 8B dense model (shared/reference/quant_quality.md).
    dense = quality.quality_of("Q3_K_M", 3.996, 8_030_000_000, is_moe=False).ppl_change_pct
    assert costs[3] < dense / 3


# --- (c) extrapolated outside the rows, not inside ------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_outside_the_rows_is_marked_extrapolated(family):
    fam = FAMILIES[family]
    c = quality.curve(fam.rows, "ppl_change_pct")
    inside = quality.estimate(fam, "", (c.xs[0] + c.xs[1]) / 2)
    assert inside.basis == "interpolated" and not inside.extrapolated and not inside.exact
    assert inside.neighbours == c.quants[:2]
    for bpw in (fam_min(fam) - 0.1, fam_max(fam) + 1.0):
        q = quality.estimate(fam, "", bpw)
        assert q.basis == "extrapolated" and q.extrapolated, bpw
    below = quality.estimate(fam, "", fam_min(fam) - 0.1)
    assert below.ppl_change_pct > quality.estimate(fam, "", fam_min(fam)).ppl_change_pct  # the end slope, continued


def test_extrapolation_continues_the_end_rows_in_log_space():
    # Below LLaMA-3-8B's IQ1_S (2.0042 bpw, +832 %) the slope from IQ1_M (2.1460 bpw, +309 %) goes on.
    llama = FAMILIES["llama-3-8b"]
    lo, hi = (2.0042, 100 * 51.87 / 6.2332), (2.1460, 100 * 19.26 / 6.2332)
    slope = (math.log(hi[1]) - math.log(lo[1])) / (hi[0] - lo[0])
    q = quality.estimate(llama, "", 1.9)
    assert q.ppl_change_pct == pytest.approx(lo[1] * math.exp(slope * (1.9 - lo[0])))
    assert q.neighbours == ("IQ1_S", "IQ1_M")


def test_interpolation_is_linear_in_log_space():
    llama = FAMILIES["llama-3-8b"]
    (x0, d0), (x1, d1) = (3.9960, 0.6569), (4.2979, 0.5562)  # Q3_K_M, Q3_K_L (no imatrix)
    b = 4.1
    t = (b - x0) / (x1 - x0)
    expect = math.exp((1 - t) * math.log(100 * d0 / 6.2332) + t * math.log(100 * d1 / 6.2332))
    q = quality.estimate(llama, "", b)
    assert q.ppl_change_pct == pytest.approx(expect) and q.neighbours == ("Q3_K_M", "Q3_K_L")


# --- (d) what the estimate says about itself -------------------------------------------------------------


def test_quality_reports_family_rows_span_and_sources():
    table = [r for r in csv_rows() if r["model_family"] == "llama-3-8b"]
    quants = {r["quant"] for r in table}
    bpws = [float(r["bpw"]) for r in table]
    q = quality.quality_of("IQ3_S", 3.6, 8_030_000_000, is_moe=False)
    assert q.model_family == "llama-3-8b" and q.family_params_b == 8.03 and not q.family_moe
    assert q.n_rows == len(quants) == 28
    assert (q.bpw_min, q.bpw_max) == (min(bpws), max(bpws))
    assert q.bits_per_weight == 3.6
    assert q.sources == tuple(dict.fromkeys(r["source"] for r in table)) and q.source in q.sources[0]
    moe = quality.quality_of("Q4_K_M", 4.9, 1_030_000_000_000, is_moe=True)
    kimi = [r for r in csv_rows() if r["model_family"] == "kimi-k2-instruct"]
    assert moe.model_family == "kimi-k2-instruct" and moe.family_moe and moe.n_rows == len(kimi)
    assert all(s.startswith("https://") for s in moe.sources)


def test_family_choice_moe_first_then_nearest_in_log_params():
    pick = quality.choose_family
    assert pick(30_000_000_000, True, ROWS).name == "qwen3-235b-a22b"  # MoE beats a nearer dense family
    assert pick(400_000_000_000, True, ROWS).name == "glm-4.6"
    assert pick(1_000_000_000_000, True, ROWS).name == "kimi-k2-instruct"
    assert pick(32_000_000_000, False, ROWS).name == "llama-2-70b"  # log(70/32) < log(32/8)
    assert pick(14_000_000_000, False, ROWS).name == "llama-3-8b"
    # Three DeepSeek families at 671B: the tie goes to the one with the most rows.
    deepseek = [f for f in FAMILIES.values() if f.params_b == 671]
    assert len(deepseek) == 3
    assert pick(671_000_000_000, True, ROWS) == max(deepseek, key=lambda f: len(f.rows))
    dense_only = [r for r in ROWS if not r.moe]
    assert pick(671_000_000_000, True, dense_only).name == "llama-2-70b"  # no MoE rows: the nearest dense
    assert pick(8_000_000_000, False, ()) is None and quality.quality_of("Q4_K_M", 4.8, 1, False, rows=()) is None
    note = quality.quality_of("Q4_K_M", 4.8, 671_000_000_000, True, rows=dense_only).note
    assert note == "measured on a dense model"


def test_every_new_moe_row_names_a_url():
    for r in csv_rows():
        if r["moe"] == "true":
            assert "https://" in r["source"], r


# --- the csv is checked ------------------------------------------------------------------------------------

HEADER = "model_family,params_b,moe,quant,imatrix,bpw,metric,value,baseline_ppl,source\n"
GOOD = "fam,10,false,Q4_K_M,,4.8,ppl,6.5,6.2,src\n"


def write(tmp_path: Path, *lines: str) -> Path:
    p = tmp_path / "q.csv"
    p.write_text("# a comment\n" + HEADER + "".join(lines))
    return p


def test_a_good_file_loads(tmp_path):
    (r,) = quality.load_rows(write(tmp_path, GOOD, "fam,10,false,Q4_K_M,,4.8,kld,0.03,,src\n"))
    assert r.ppl_change_pct == pytest.approx(100 * 0.3 / 6.2) and r.kld == 0.03 and r.quant == "Q4_K_M"


@pytest.mark.parametrize("line, message", [
    ("fam,10,false,Q4_K_M,,4.8,ppx,6.5,6.2,src\n", "unknown metric 'ppx'"),
    ("fam,10,false,Q4_K_M,,4.8,ppl,nan,6.2,src\n", "value 'nan' is not finite"),
    ("fam,10,false,Q4_K_M,,4.8,ppl,abc,6.2,src\n", "value 'abc' is not a number"),
    ("fam,10,false,Q4_K_M,,inf,ppl,6.5,6.2,src\n", "bpw 'inf' is not finite"),
    ("fam,10,false,Q4_K_M,,40,ppl,6.5,6.2,src\n", "bpw 40 is out of range"),
    ("fam,0,false,Q4_K_M,,4.8,ppl,6.5,6.2,src\n", "params_b 0 is out of range"),
    ("fam,10,maybe,Q4_K_M,,4.8,ppl,6.5,6.2,src\n", "moe 'maybe' is neither true nor false"),
    ("fam,10,false,Q4_K_M,,4.8,ppl,6.5,,src\n", "a ppl row needs baseline_ppl"),
    ("fam,10,false,Q4_K_M,,4.8,ppl,-1,6.2,src\n", "ppl -1 is out of range"),
    ("fam,10,false,Q4_K_M,,4.8,delta_ppl,-7,6.2,src\n", "delta_ppl -7 is out of range"),
    ("fam,10,false,Q4_K_M,,4.8,ppl_change_pct,-100,,src\n", "ppl_change_pct -100 is out of range"),
    ("fam,10,false,Q4_K_M,,4.8,kld,-0.1,,src\n", "kld -0.1 is out of range"),
    ("fam,10,false,Q4_K_M,,4.8,ppl,6.5,0,src\n", "baseline_ppl 0 is out of range"),
    ("fam,10,false,Q4_K_M,,4.8,ppl,6.5,6.2,\n", "no source"),
    ("fam,10,false,Q4_K_M,,4.8,ppl,6.5\n", "8 fields, the header has 10"),
    (",10,false,Q4_K_M,,4.8,ppl,6.5,6.2,src\n", "model_family and quant must not be empty"),
])
def test_a_bad_value_is_a_config_error_naming_file_and_line(tmp_path, line, message):
    p = write(tmp_path, GOOD, line)
    with pytest.raises(ConfigError) as e:
        quality.load_rows(p)
    assert message in e.value.message and f"{p} line 4" in e.value.message


@pytest.mark.parametrize("line, message", [
    ("fam,12,false,Q8_0,,8.5,ppl,6.3,6.2,src\n", "disagree with line 3 of the same family"),
    ("fam,10,false,Q4_K_M,,4.9,kld,0.03,,src\n", "bpw 4.9 disagrees with line 3"),
    ("fam,10,false,q4_k_m,,4.8,delta_ppl,0.3,6.2,src\n", "a second ppl for fam Q4_K_M (line 3 has one)"),
])
def test_rows_that_contradict_each_other_are_config_errors(tmp_path, line, message):
    p = write(tmp_path, GOOD, line)
    with pytest.raises(ConfigError, match="line 4") as e:
        quality.load_rows(p)
    assert message in e.value.message


def test_the_shipped_file_is_named_as_configs(tmp_path, monkeypatch):
    bad = write(tmp_path, "fam,10,false,Q4_K_M,,4.8,ppl,6.5,6.2,src\n", "fam,10,false,Q5_K_M,,5.7,ppx,1,,src\n")
    monkeypatch.setattr(quality, "config_path", lambda name: bad)
    with pytest.raises(ConfigError, match=r"^configs/q\.csv line 4 \(fam Q5_K_M ppx\): unknown metric"):
        quality.load_rows()
    with pytest.raises(ConfigError, match="no header and no rows"):
        (tmp_path / "empty.csv").write_text("# nothing\n")
        quality.load_rows(tmp_path / "empty.csv")
    with pytest.raises(ConfigError, match="the header lacks bpw"):
        (tmp_path / "h.csv").write_text("model_family,params_b,moe,quant,imatrix,metric,value,baseline_ppl,source\n")
        quality.load_rows(tmp_path / "h.csv")
