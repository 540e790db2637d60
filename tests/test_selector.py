"""select and plan: RAM arithmetic by hand, fit edges, per-node fits, models folders of real GGUFs,
published quality rows, the reverse (bandwidth) question through the predictor, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cputune.predict import candidates, hardware, selector
from cputune.predict.box import resolve_box
from cputune.model.catalog import catalog_profile, load_catalog
from cputune.cli import cli
from cputune.core.errors import ConfigError
from cputune.model.gguf_model import read_model
from cputune.machine.memory import HugepagePool, MemoryInfo, NodeMemory
from cputune.predict.predictor import (
    Calibration,
    MachineBandwidth,
    Settings,
    predict,
    read_bandwidth_gbps,
)
from cputune.predict.selector import Candidate, Capacity, FitSettings, ram_needed

GIB = 1 << 30
CAL = Calibration(bw_efficiency=0.8, decode_gbps_per_core={"Q8_0": 15.0, "Q4_K": 10.0, "F16": 8.0},
                  prefill_gflops_per_core={"Q8_0": 50.0, "Q4_K": 40.0, "F16": 40.0},
                  overhead_s_per_layer=1e-5, overhead_s_per_layer_thread=1e-7)
# One node, 16 cores at 20 GB/s each, 100 GB/s for the node: decode of a GiB-sized model is memory-bound.
SMALL_BOX = MachineBandwidth(name="1-node", sockets=1, nodes=1, cores=16, node_read_gbps=100.0,
                             core_read_gbps=20.0, remote_ratio=1.0, mem_bytes=64 * GIB, isa=("avx2",))


def settings(**kw) -> FitSettings:
    return FitSettings(**{"ctx_tokens": 1000, "threads": 16, "numa": "distribute", **kw})


def capacity(total: int, nodes: int = 1) -> Capacity:
    return Capacity(total, {i: total // nodes for i in range(nodes)}, 0, "test")


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def run_json(*args) -> dict:
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# --- RAM by hand ---------------------------------------------------------------------------------


def test_ram_needed_by_hand_on_a_real_q4_k_m(tiny_models):
    m = read_model(tiny_models["llama"].quantized["q4_k_m"])
    n = ram_needed(m, 1000, "f16", isa=("avx2",))
    # TINY_LLAMA: 2 layers, 2 KV heads of 256/4 = 64 dims: K and V are 2 x 64 = 128 elements per layer,
    # (128 + 128) x 2 layers = 512 elements of 2 bytes per token.
    assert n.kv_bytes == 512 * 2 * 1000
    # Compute buffer: f32 activations 4 x 512 ubatch x (512 vocab + 8 x 256 embd), plus the scores
    # 4 x 4 heads x 512 x 1000 context without flash attention.
    assert n.compute_bytes == 4 * 512 * (512 + 8 * 256) + 4 * 4 * 512 * 1000
    # With mmap on the repacked Q4_K matrices (AVX2) are held twice; the copy is their bytes.
    assert n.repack_copy_bytes == m.matmul_bytes_by_type["Q4_K"] > 0
    assert n.total_bytes == m.weight_bytes + n.repack_copy_bytes + n.kv_bytes + n.compute_bytes + 2 * GIB
    off = ram_needed(m, 1000, "f16", isa=("avx2",), mmap=False)
    assert off.repack_copy_bytes == 0 and off.total_bytes == n.total_bytes - n.repack_copy_bytes
    # Q8_0 is never repacked on x86.
    q8 = read_model(tiny_models["llama"].quantized["q8_0"])
    assert ram_needed(q8, 1000, isa=("avx2", "avx512f")).repack_copy_bytes == 0


def test_quantized_cache_turns_flash_attention_on_and_drops_the_scores():
    s = selector.fit_settings(SMALL_BOX, 4096, "q8_0")
    assert s.flash_attn and s.threads == 16
    assert not selector.fit_settings(SMALL_BOX, 4096, "f16").flash_attn
    m = catalog_profile("r1-distill-qwen-1.5b", "Q8_0")
    f16 = selector.need_for(m, selector.fit_settings(SMALL_BOX, 4096, "f16"), ())
    q8 = selector.need_for(m, s, ())
    # Flash attention drops the f32 scores, 4 bytes x 12 heads x 512 ubatch x 4096 context; a q8_0 cache
    # element is 34/32 bytes instead of f16's 2.
    assert f16.compute_bytes - q8.compute_bytes == 4 * 12 * 512 * 4096
    assert q8.kv_bytes == round(f16.kv_bytes / 2 * 34 / 32)


def test_unknown_cache_type_lists_the_types():
    with pytest.raises(ConfigError, match="unknown KV cache type 'q3'") as e:
        selector.fit_settings(SMALL_BOX, 100, "q3")
    assert "q8_0" in e.value.hint and "iq4_nl" in e.value.hint


# --- capacity --------------------------------------------------------------------------------------


def test_capacity_counts_hugepage_pools_as_used_per_node():
    mem = MemoryInfo(
        mem_total_bytes=64 * GIB, mem_available_bytes=60 * GIB,
        nodes=(NodeMemory(0, 32 * GIB, 20 * GIB), NodeMemory(1, 32 * GIB, 30 * GIB)),
        thp_enabled=None, thp_defrag=None, numa_balancing=None, governors={}, kernel_release=None,
        dimms=(), dimm_slots=None, dimm_source="none", dimm_unreadable_reason=None,
        hugepages=(HugepagePool(None, GIB, 8, 8), HugepagePool(None, 2 << 20, 0, 0),
                   HugepagePool(0, GIB, 6, 6), HugepagePool(1, GIB, 2, 2)))
    cap = selector.capacity_from_memory(mem, "probe")
    # 8 x 1 GiB pages reserved in all: 64 - 8; node 0 loses 6 of its 32, node 1 loses 2.
    assert cap.total_bytes == 56 * GIB and cap.hugepage_bytes == 8 * GIB
    assert cap.node_bytes == {0: 26 * GIB, 1: 30 * GIB}
    assert cap.largest_node == 1
    assert cap.available_bytes("one-node") == 30 * GIB and cap.available_bytes("distribute") == 56 * GIB
    # Without NUMA sysfs only the system-wide pool is known: 1000 x 2 MiB pages off one node.
    flat = dataclasses.replace(mem, nodes=(NodeMemory(0, 64 * GIB, None),),
                               hugepages=(HugepagePool(None, 2 << 20, 1000, 10),))
    cap = selector.capacity_from_memory(flat, "probe")
    assert cap.total_bytes == 64 * GIB - 1000 * (2 << 20) and cap.hugepage_bytes == 1000 * (2 << 20)
    assert cap.node_bytes == {0: cap.total_bytes}


def test_hardware_capacity_splits_dimms_over_nodes():
    box = resolve_box("epyc-9655-2s")
    cap = candidates.box_capacity(box)
    # 24 DIMMs x 32 GiB, two sockets in NPS1.
    assert cap.total_bytes == 24 * 32 * GIB and cap.node_bytes == {0: 12 * 32 * GIB, 1: 12 * 32 * GIB}


# --- fit edges and the recommendation --------------------------------------------------------------


def test_fit_edge_exactly_enough_and_one_byte_short(tiny_models):
    m = read_model(tiny_models["deepseek2"].quantized["q8_0"])
    c = Candidate("Q8_0", m)
    s = settings()
    need = ram_needed(m, 1000, "f16", isa=SMALL_BOX.isa).total_bytes
    exact = selector.select("tiny", [c], SMALL_BOX, CAL, capacity(need), s)
    assert exact.options[0].fits and exact.options[0].margin_bytes == 0
    assert exact.recommended is not None and exact.recommended.quant == "Q8_0"
    short = selector.select("tiny", [c], SMALL_BOX, CAL, capacity(need - 1), s)
    o = short.options[0]
    assert not o.fits and o.margin_bytes == -1 and short.recommended is None
    assert "nothing fits" in short.why
    more = [ch for ch in short.what_would_fit if ch.kind == "more_ram"]
    assert len(more) == 1 and more[0].value == 1


def test_per_node_fit_under_one_node_policy(tiny_models):
    m = read_model(tiny_models["llama"].quantized["q8_0"])
    c = Candidate("Q8_0", m)
    need = ram_needed(m, 1000, isa=SMALL_BOX.isa).total_bytes
    two = capacity(2 * need, nodes=2)  # each node holds exactly need: fits one node
    assert selector.select("t", [c], SMALL_BOX, CAL, two, settings(numa="one-node")).recommended
    tight = Capacity(2 * need - 2, {0: need - 1, 1: need - 1}, 0, "test")
    one = selector.select("t", [c], SMALL_BOX, CAL, tight, settings(numa="one-node"))
    assert not one.options[0].fits and not one.options[0].fits_one_node
    assert one.options[0].available_bytes == need - 1
    assert [ch.option for ch in one.what_would_fit if ch.kind == "numa"] == ["--numa distribute"]
    spread = selector.select("t", [c], SMALL_BOX, CAL, tight, settings(numa="distribute"))
    assert spread.options[0].fits and not spread.options[0].fits_one_node


def _seven_b(*presets):
    return [Candidate(p, catalog_profile("r1-distill-qwen-7b", p)) for p in presets]


def test_recommends_best_quality_that_fits_and_meets_min_tps():
    cands = _seven_b("Q4_K_M", "Q8_0", "Q6_K")
    big = capacity(1 << 50)
    sel = selector.select("7b", cands, SMALL_BOX, CAL, big, settings())
    assert [o.quant for o in sel.options] == ["Q8_0", "Q6_K", "Q4_K_M"]  # published ΔPPL order
    assert sel.recommended.quant == "Q8_0" and "best quality that fits" in sel.why
    tg = {o.quant: o.tg_tokens_per_s for o in sel.options}
    assert tg["Q4_K_M"] > tg["Q6_K"] > tg["Q8_0"]  # memory-bound: fewer bytes, faster
    between = (tg["Q6_K"] + tg["Q4_K_M"]) / 2
    sel = selector.select("7b", cands, SMALL_BOX, CAL, big, settings(min_tps=between))
    assert sel.recommended.quant == "Q4_K_M"
    assert "Q6_K fits but predicts" in sel.why
    # Too fast for any: no recommendation; the change is the bandwidth the fastest needs.
    sel = selector.select("7b", cands, SMALL_BOX, CAL, big, settings(min_tps=tg["Q4_K_M"] * 1.5))
    assert sel.recommended is None and "below --min-tps" in sel.why
    (change,) = sel.what_would_fit
    assert change.kind == "bandwidth" and change.quant == "Q4_K_M"
    assert change.value > read_bandwidth_gbps(SMALL_BOX, 16, "distribute")[0]


def test_the_next_better_quant_says_what_would_fit_it():
    cands = _seven_b("Q8_0", "Q4_K_M")
    s = settings(ctx_tokens=32768)
    q4_need = selector.need_for(cands[1].profile, s, SMALL_BOX.isa).total_bytes
    sel = selector.select("7b", cands, SMALL_BOX, CAL, capacity(q4_need), s)
    assert sel.recommended.quant == "Q4_K_M" and "Q8_0 needs" in sel.why
    assert {ch.quant for ch in sel.what_would_fit} == {"Q8_0"}


def test_what_would_fit_is_the_smallest_change_in_each_direction():
    (c,) = _seven_b("Q4_K_M")
    s = settings(ctx_tokens=32768)
    isa = SMALL_BOX.isa

    def need(**kw) -> int:
        return selector.need_for(c.profile, dataclasses.replace(s, **kw), isa).total_bytes

    avail = need(ctx_tokens=9000)  # between 8192 and 32768 tokens
    sel = selector.select("7b", [c], SMALL_BOX, CAL, capacity(avail), s)
    assert sel.recommended is None
    changes = {ch.kind: ch for ch in sel.what_would_fit}
    ctx = changes["ctx"].value
    assert ctx % selector.CTX_STEP_TOKENS == 0 and 8192 <= ctx <= 9000
    assert need(ctx_tokens=ctx) <= avail < need(ctx_tokens=ctx + selector.CTX_STEP_TOKENS)
    assert ("cache_type" in changes) == (need(cache_type="q8_0", flash_attn=True) <= avail)
    # The Q4_K matrices are repacked on AVX2: --no-mmap drops their second copy.
    assert ("no_mmap" in changes) == (need(mmap=False) <= avail)
    assert changes["more_ram"].value == need() - avail


def test_nothing_fits_even_without_context_gives_only_more_ram():
    (c,) = _seven_b("Q8_0")
    sel = selector.select("7b", [c], SMALL_BOX, CAL, capacity(GIB), settings(mmap=False))
    assert [ch.kind for ch in sel.what_would_fit] == ["more_ram"]


# --- published quality ---------------------------------------------------------------------------


def test_quality_rows_by_hand():
    q = selector.quality_of("Q4_K_M", 4.9, 8_030_000_000, is_moe=False)
    assert q.model_family == "llama-3-8b" and q.exact
    assert q.ppl_change_pct == pytest.approx(100 * 0.1755 / 6.2332)  # +2.8 %, the scoreboard's ΔPPL / PPL
    assert q.kld == pytest.approx(0.03127)
    moe = selector.quality_of("Q4_K_M", 4.82, 671_000_000_000, is_moe=True)
    # Three DeepSeek families have 671B; the one with the most rows (V3.1, 13) wins the tie. It has no
    # mainline Q4_K_M row: 4.82 bpw lies between its IQ4_KS (363.151 GiB) and IQ4_K (384.765 GiB)
    # rows, interpolated in log(PPL change) against bpw.
    assert moe.model_family == "deepseek-v3.1" and not moe.exact and moe.basis == "interpolated"
    assert moe.neighbours == ("IQ4_KS", "IQ4_K") and not moe.extrapolated
    lo, hi = (363.151 * 2**33 / 671e9, 3.3806), (384.765 * 2**33 / 671e9, 3.3715)
    t = (4.82 - lo[0]) / (hi[0] - lo[0])
    pct = [100 * (ppl - 3.3473) / 3.3473 for _, ppl in (lo, hi)]
    assert moe.ppl_change_pct == pytest.approx(math.exp((1 - t) * math.log(pct[0]) + t * math.log(pct[1])), rel=1e-3)
    big = selector.quality_of("Q4_K_M", 4.8, 70_000_000_000, is_moe=False)
    assert big.model_family == "llama-2-70b" and big.ppl_change_pct == pytest.approx(1.20)
    small = selector.quality_of("Q4_K_M", 5.0, 1_500_000_000, is_moe=False)
    assert small.model_family == "llama-3-8b" and "loses more" in small.note


def test_every_catalog_model_and_preset_gets_a_quality_row():
    params = {r.model_family: (r.params_b, r.moe) for r in selector.quality_rows()}
    for mid in load_catalog():
        for p in ("Q8_0", "Q2_K"):
            m = catalog_profile(mid, p)
            q = selector.quality_of(p, m.weight_bytes * 8 / m.total_params, m.total_params, m.is_moe)
            assert q is not None and q.ppl_change_pct is not None and q.source and q.n_rows >= 3
            # The csv has dense and MoE families: a model gets one of its own kind, the nearest in size.
            assert q.family_moe == m.is_moe
            dist = {f: abs(math.log(m.total_params / 1e9 / b)) for f, (b, moe) in params.items() if moe == m.is_moe}
            assert dist[q.model_family] == min(dist.values())



def test_select_table_says_how_each_quality_was_made(tmp_path, monkeypatch):
    """Each quant's PPL cell is marked (none: the preset's published row, ≈ interpolated, ? extrapolated)
    and the next cell says how, from how many rows of which family; --json carries the same fields."""
    from cputune.commands import report

    monkeypatch.setattr(report.out, "width", 250)  # each cell on one line
    empty = tmp_path / "m"
    empty.mkdir()
    args = ("select", "--model", "r1-distill-llama-8b", "--models-dir", str(empty), "--hardware", "ryzen-7950x")
    options = run_json(*args)["selection"]["options"]
    text = run(*args).stdout
    n = len({r.quant for r in selector.quality_rows() if r.model_family == "llama-3-8b"})
    by = {o["quant"]: o["quality"] for o in options}
    q4 = by["Q4_K_M"]
    assert (q4["basis"], q4["exact"], q4["row_quant"], q4["model_family"], q4["n_rows"]) == \
        ("row", True, "Q4_K_M", "llama-3-8b", n)
    assert {"family_params_b", "family_moe", "bpw_min", "bpw_max", "extrapolated", "neighbours", "sources"} <= set(q4)
    assert f"Q4_K_M (row, {n} rows llama-3-8b)" in text and "+2.8 " in text
    # Q2_K's scoreboard row (no imatrix) is beaten by IQ2_M with fewer bits: interpolated instead.
    q2 = by["Q2_K"]
    assert q2["basis"] == "interpolated" and not q2["extrapolated"] and len(q2["neighbours"]) == 2
    assert f"≈ {'..'.join(q2['neighbours'])} (interp., {n} rows llama-3-8b)" in text
    assert f"≈+{q2['ppl_change_pct']:.0f} " in text
    # BF16 has more bits than any row (F16's 16.0005): extrapolated, and says so.
    bf16 = by["BF16"]
    assert bf16["bits_per_weight"] > bf16["bpw_max"] and bf16["extrapolated"] and bf16["basis"] == "extrapolated"
    assert f"(extrap., {n} rows llama-3-8b)" in text and "?+0.0" in text
    assert "≈: interpolated between two rows" in text


def test_plan_table_marks_estimates(monkeypatch):
    from cputune.commands import report

    monkeypatch.setattr(report.out, "width", 250)
    r = run("plan", "--model", "deepseek-r1", "--hardware", "epyc-9655-2s")
    assert r.exit_code == 0
    rows = [line for line in r.stdout.splitlines() if "deepseek-r1" in line or line.startswith("│")]
    assert any("≈+" in line for line in rows) and "PPL and KLD estimated from the published rows of deepseek" in r.stdout

# --- the reverse question ------------------------------------------------------------------------


@pytest.mark.parametrize("numa", ["distribute", "one-node", "interleave"])
def test_requirement_round_trips_through_the_predictor(numa):
    box = resolve_box("epyc-9655-2s")
    m = catalog_profile("deepseek-r1", "Q4_K_M")
    s = selector.fit_settings(box.machine, 8192, numa=numa)
    ps = Settings(s.threads, numa, 8192, s.n_ubatch, s.cache_type)
    own = predict(m, box.machine, ps, box.calibration)
    for target in (0.5 * own.tg_tokens_per_s, 0.9 * own.tg_tokens_per_s):
        r = selector.requirements(m, target, box.machine, box.calibration, s, "Q4_K_M")
        assert r.reachable
        p = predict(m, r.machine, ps, box.calibration)
        assert p.tg_tokens_per_s == pytest.approx(target, rel=0.01)
        assert read_bandwidth_gbps(r.machine, s.threads, numa)[0] == pytest.approx(r.read_gbps)
        # Less speed needs less bandwidth than the box has.
        assert r.read_gbps < read_bandwidth_gbps(box.machine, s.threads, numa)[0]
        assert r.capacity_bytes == selector.need_for(m, s, box.machine.isa).total_bytes
        # One DDR5-6000 channel: 6000e6 transfers x 8 bytes = 48 GB/s peak, read at the estimated share.
        assert r.channels == math.ceil(r.read_gbps / (hardware.ESTIMATED_READ_FRACTION * 6000e6 * 8 / 1e9))


def test_requirement_at_the_box_own_speed_is_the_box_bandwidth():
    m = _seven_b("Q8_0")[0].profile
    s = settings()
    own = predict(m, SMALL_BOX, Settings(16, "distribute", 1000), CAL)
    assert own.bottleneck == "memory"
    r = selector.requirements(m, own.tg_tokens_per_s, SMALL_BOX, CAL, s)
    assert r.read_gbps == pytest.approx(read_bandwidth_gbps(SMALL_BOX, 16, "distribute")[0], rel=1e-6)


def test_unreachable_target_reports_the_ceiling():
    m = _seven_b("Q4_K_M")[0].profile
    s = settings()
    r = selector.requirements(m, 1e6, SMALL_BOX, CAL, s)
    assert not r.reachable and r.read_gbps is None
    # A thousand times the bandwidth stays under the ceiling, and close to it.
    fast = dataclasses.replace(SMALL_BOX, node_read_gbps=1e5, core_read_gbps=2e4)
    tg = predict(m, fast, Settings(16, "distribute", 1000), CAL).tg_tokens_per_s
    assert tg <= r.ceiling_tg_tokens_per_s and tg == pytest.approx(r.ceiling_tg_tokens_per_s, rel=0.02)


# --- models folders of real GGUF files -------------------------------------------------------------


@pytest.fixture
def folder(tmp_path, tiny_models, tiny_split):
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(tiny_models["deepseek2"].quantized["q8_0"], d / "DeepSeek-R1-Q8_0.gguf")
    shutil.copy(tiny_models["deepseek2"].quantized["q4_k_m"], d / "DeepSeek-R1-Q4_K_M.gguf")
    shutil.copy(tiny_models["llama"].quantized["q8_0"], d / "DeepSeek-R1-Distill-Llama-8B-Q8_0.gguf")
    for p in tiny_split:
        shutil.copy(p, d / p.name)
    return d


def test_catalog_name_picks_its_own_files_not_the_distills(folder):
    r1 = candidates.resolve_model("deepseek-r1", folder)
    assert not r1.from_catalog and r1.catalog_id == "deepseek-r1"
    assert sorted(Path(c.file).name for c in r1.candidates) == ["DeepSeek-R1-Q4_K_M.gguf", "DeepSeek-R1-Q8_0.gguf"]
    assert {c.quant for c in r1.candidates} == {"Q8_0", "Q4_K_M"}
    distill = candidates.resolve_model("r1-distill-llama-8b", folder)
    assert [Path(c.file).name for c in distill.candidates] == ["DeepSeek-R1-Distill-Llama-8B-Q8_0.gguf"]


def test_split_files_are_one_model(folder, tiny_split):
    doc = run_json("select", "--model", "llama-split", "--models-dir", str(folder), "--hardware", "ryzen-7950x")
    sel = doc["selection"]
    assert not sel["from_catalog"]
    (o,) = sel["options"]
    assert o["n_shards"] == 2 and o["file"].endswith("llama-split-00001-of-00002.gguf")
    whole = read_model(tiny_split[0])
    assert o["weight_bytes"] == whole.weight_bytes
    # The second shard's tensors are counted: more than the first shard holds alone.
    assert whole.weight_bytes > read_model_first_shard_only(tiny_split[0])


def read_model_first_shard_only(path: Path) -> int:
    from cputune.model.gguf_model import read_raw

    return sum(t.n_bytes or 0 for t in read_raw(path).tensors)


def test_empty_models_folder_falls_back_to_the_catalog_and_says_so(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ("select", "--model", "r1-distill-qwen-1.5b", "--models-dir", str(empty), "--hardware", "epyc-9655-2s")
    sel = run_json(*args)["selection"]
    assert sel["from_catalog"]
    assert any("no GGUF of DeepSeek-R1-Distill-Qwen-1.5B" in n for n in sel["notes"])
    assert {o["quant"] for o in sel["options"]} == set(selector.CATALOG_PRESETS)
    assert all(o["origin"] == "catalog preset" for o in sel["options"])
    # 1.5B on 768 GiB: everything fits, so the best quality (BF16) is recommended.
    assert sel["recommended"]["quant"] == "BF16"
    r = run(*args)
    assert r.exit_code == 0 and "catalog presets" in r.stdout and "no GGUF of" in r.stdout


def test_gguf_file_as_model(tiny_models):
    path = tiny_models["deepseek2"].quantized["q4_k_m"]
    sel = run_json("select", "--model", str(path), "--hardware", "epyc-9655-2s")["selection"]
    (o,) = sel["options"]
    assert o["quant"] == "Q4_K_M" and o["file"] == str(path)
    assert sel["recommended"]["quant"] == "Q4_K_M"


# --- the CLI ---------------------------------------------------------------------------------------


def write_two_node_box(tmp_path: Path) -> Path:
    p = tmp_path / "two-node.toml"
    p.write_text('name = "two small nodes"\nsource = "test"\n[cpu]\nmodel = "test"\nsockets = 2\n'
                 'cores_per_socket = 4\nisa = ["avx2"]\n[memory]\nchannels_per_socket = 1\nmts = 4800\n'
                 'dimms = 2\ndimm_gib = 2\n')
    return p


def test_select_per_node_fit_on_a_two_node_profile(tmp_path, tiny_models):
    box = write_two_node_box(tmp_path)
    model = str(tiny_models["llama"].quantized["q8_0"])
    one = run_json("select", "--model", model, "--hardware", str(box), "--numa", "one-node")["selection"]
    (o,) = one["options"]
    # 2 DIMMs x 2 GiB over 2 nodes: 2 GiB a node, which the 2 GiB OS headroom alone fills.
    assert o["node_available_bytes"] == 2 * GIB == o["available_bytes"]
    assert o["need_bytes"] > 2 * GIB and not o["fits"] and not o["fits_one_node"]
    assert one["recommended"] is None
    assert "--numa distribute" in [c["option"] for c in one["what_would_fit"]]
    spread = run_json("select", "--model", model, "--hardware", str(box), "--numa", "distribute")["selection"]
    assert spread["options"][0]["fits"] and spread["options"][0]["available_bytes"] == 4 * GIB
    assert spread["recommended"]["quant"] == "Q8_0"


def test_select_table_names_the_recommendation(tmp_path, tiny_models):
    r = run("select", "--model", str(tiny_models["llama"].quantized["q8_0"]), "--hardware", "ryzen-7950x")
    assert r.exit_code == 0
    assert "recommended" in r.stdout and "Q8_0" in r.stdout and "small dense models" in r.stdout


def test_plan_json_covers_every_catalog_model():
    doc = run_json("plan", "--hardware", "epyc-9655-2s")
    assert doc["schema"] == "cputune.plan/1"
    rows = doc["plan"]["rows"]
    assert {r["model_id"] for r in rows} == set(load_catalog())
    for mid in load_catalog():
        quants = [r["option"]["quant"] for r in rows if r["model_id"] == mid]
        assert sorted(quants) == sorted(selector.CATALOG_PRESETS)
    for r in rows:
        o = r["option"]
        # The one NUMA rule: a model that fits one node is served there, else over the whole box.
        one = o["numa"]["policy"] == "one-node"
        assert o["available_bytes"] == (12 if one else 24) * 32 * GIB
        assert one == (o["need_bytes"] <= 12 * 32 * GIB)
        assert o["fits"] == (o["need_bytes"] <= o["available_bytes"])
        assert o["fits_one_node"] == (o["need_bytes"] <= 12 * 32 * GIB)
        assert r["requirement"] is None
    # R1 at BF16 (1.34 TB of weights) cannot fit 768 GiB; the 1.5B distill at Q4_K_M fits one node.
    by = {(r["model_id"], r["option"]["quant"]): r["option"] for r in rows}
    assert not by[("deepseek-r1", "BF16")]["fits"]
    assert by[("r1-distill-qwen-1.5b", "Q4_K_M")]["fits_one_node"]


def test_plan_target_tps_gives_bandwidth_and_capacity():
    doc = run_json("plan", "--model", "deepseek-r1", "--quant", "q4_k_m", "--target-tps", "3")
    (row,) = doc["plan"]["rows"]
    req = row["requirement"]
    assert req["reachable"] and req["capacity_bytes"] == row["option"]["need_bytes"]
    assert req["prediction"]["tg_tokens_per_s"] == pytest.approx(3, rel=0.01)
    r = run("plan", "--model", "deepseek-r1", "--target-tps", "5")
    assert r.exit_code == 0 and "needs GB/s" in r.stdout and "deepseek-r1" in r.stdout


@pytest.mark.parametrize("args, message, listed", [
    (["select", "--model", "no-such-model", "--hardware", "epyc-9655-2s"], "Error: no model 'no-such-model'",
     "deepseek-r1"),
    (["plan", "--model", "no-such-model"], "Error: no model 'no-such-model' in the catalog", "r1-distill-qwen-32b"),
    (["plan", "--hardware", "no-such-box"], "Error: no hardware profile 'no-such-box'", "epyc-9655-2s"),
    (["select", "--model", "deepseek-r1", "--hardware", "no-such-box"], "Error: no hardware profile 'no-such-box'",
     "epyc-9655-2s"),
    (["plan", "--quant", "q9_z"], "Error: unknown quantization preset 'q9_z'", "q4_k_m"),
    (["plan", "--cache-type", "q3"], "Error: unknown KV cache type 'q3'", "q8_0"),
])
def test_unknown_names_are_one_line_errors_listing_what_exists(tmp_path, args, message, listed):
    empty = tmp_path / "m"
    empty.mkdir()
    extra = ["--models-dir", str(empty)] if args[0] == "select" else []
    r = CliRunner().invoke(cli, args + extra)
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert lines[0].startswith(message)
    assert lines[1].startswith("hint:") and listed in lines[1]
    assert "Traceback" not in r.output


def test_select_on_this_box_reads_the_probe_and_its_hugepage_pools(tmp_path, monkeypatch, tiny_models):
    from cputune.machine import probe
    from cputune.machine.bandwidth import BandwidthSummary

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    xml = Path(__file__).parent / "fixtures" / "hwloc" / "AMD-19h-Zen4-2xEpyc-9654.xml"
    p = probe.run_probe(hwloc_xml=xml, memory_spec="24x DDR5-4800")
    # The lstopo XML carries no memory sizes: give the profile a 2 x 384 GiB box with
    # 100 x 1 GiB pages reserved, 60 on node 0 and 40 on node 1.
    nodes = (NodeMemory(0, 384 * GIB, 300 * GIB), NodeMemory(1, 384 * GIB, 300 * GIB))
    pools = (HugepagePool(None, GIB, 100, 100), HugepagePool(0, GIB, 60, 60), HugepagePool(1, GIB, 40, 40))
    mem = dataclasses.replace(p.inventory.memory, mem_total_bytes=768 * GIB, nodes=nodes, hugepages=pools)
    bw = BandwidthSummary("avx2", 700.0, None, None, {0: 350.0, 1: 350.0}, ((0, 1, 160.0),), ((1, 30.0),))
    p = dataclasses.replace(p, inventory=dataclasses.replace(p.inventory, memory=mem), bandwidth=bw)
    probe.save_profile(p)
    model = str(tiny_models["llama"].quantized["q8_0"])
    sel = run_json("select", "--model", model, "--numa", "one-node")["selection"]
    cap = sel["capacity"]
    assert cap["total_bytes"] == 668 * GIB and cap["hugepage_bytes"] == 100 * GIB
    assert cap["node_bytes"] == {"0": 324 * GIB, "1": 344 * GIB}
    assert sel["options"][0]["available_bytes"] == 344 * GIB  # pinned to the node with more left
    assert "probe profile" in cap["source"]


def test_r1_q4_k_m_on_one_node_needs_no_mmap_and_a_q8_0_cache_together():
    # The repack trap (llama_cpp_cpu.md A5) on the reference box: Q4_K_M's repacked Q4_K matrices
    # are held twice with mmap on, so one 384 GiB node cannot hold it; --no-mmap alone leaves it
    # just over, and only --no-mmap with a q8_0 cache (flash attention drops the scores) fits.
    box = resolve_box("epyc-9655-2s")
    c = Candidate("Q4_K_M", catalog_profile("deepseek-r1", "Q4_K_M"))
    s = selector.fit_settings(box.machine, 16384, numa="one-node")
    cap = candidates.box_capacity(box)
    node = 12 * 32 * GIB

    def need(**kw) -> int:
        return selector.need_for(c.profile, dataclasses.replace(s, **kw), box.machine.isa).total_bytes

    assert need() > node and need(mmap=False) > node and need(cache_type="q8_0", flash_attn=True) > node
    assert need(ctx_tokens=selector.CTX_STEP_TOKENS) > node
    both = need(mmap=False, cache_type="q8_0", flash_attn=True)
    changes = {ch.kind: ch for ch in selector.what_would_fit(c, box.machine, cap, s)}
    assert set(changes) == {"numa", "combined", "more_ram"}
    assert both <= node and changes["combined"].option == "--no-mmap --cache-type q8_0"
    assert changes["combined"].value == both
