"""The big-box physics of the predictor, term by term: attention at depth, SMT siblings, page
size, NUMA placement of repacked weights, serial share, engines, core families, ranges."""

from __future__ import annotations

import dataclasses

import pytest

from cputune.core import cores
from cputune.predict import calibrate
from cputune.predict.box import resolve_box
from cputune.model.catalog import catalog_profile
from cputune.predict.predictor import (
    Calibration,
    MachineBandwidth,
    Settings,
    best_threads,
    predict,
    rates_for,
    repacked_types,
    workers,
)

GB = 1e9
BOX = MachineBandwidth(name="2-node", sockets=2, nodes=2, cores=64, node_read_gbps=400.0,
                       core_read_gbps=25.0, remote_ratio=0.5, mem_bytes=768 << 30, threads_per_core=2,
                       isa=("avx2",))
CAL = Calibration(bw_efficiency=0.8, decode_gbps_per_core={"Q8_0": 15.0, "Q4_K": 10.0, "F16": 8.0},
                  prefill_gflops_per_core={"Q8_0": 50.0, "Q4_K": 50.0, "F16": 40.0},
                  overhead_s_per_layer=1e-5, overhead_s_per_layer_thread=1e-7)


@pytest.fixture(scope="module")
def r1():
    return catalog_profile("deepseek-r1", "Q4_K_M")


def test_mla_attention_flops_per_cached_token(r1):
    # 61 layers x 2 x 128 heads x (576 + 512): scores against the latent, then the value mix.
    assert r1.mla and r1.attn_flops_per_ctx_token == 61 * 2 * 128 * (576 + 512)


def test_decode_attention_grows_with_depth_at_its_own_rate(r1):
    base = predict(r1, BOX, Settings(threads=32), CAL)
    deep = predict(r1, BOX, Settings(threads=32, depth=8192), CAL)
    w = workers(32, 64, 1.0, 0.0)
    assert base.t_attention_s == 0
    # MLA: the shared latent makes the scores a matrix-matrix product, mla_attn_factor faster per FLOP.
    assert deep.t_attention_s == pytest.approx(r1.attn_flops_per_ctx_token * 8192
                                               / (w * CAL.mla_attn_factor * CAL.attn_gflops_per_core * GB))
    fast = predict(r1, BOX, Settings(threads=32, depth=8192), dataclasses.replace(CAL, attn_gflops_per_core=84.0))
    assert fast.t_attention_s == pytest.approx(deep.t_attention_s / 10)
    assert deep.tg_tokens_per_s < base.tg_tokens_per_s


def test_a_long_prompt_attends_over_half_of_itself(r1):
    short = predict(r1, BOX, Settings(threads=32), CAL)
    long = predict(r1, BOX, Settings(threads=32, n_prompt=8192), CAL)
    assert long.pp_t_attention_s == pytest.approx(short.pp_t_attention_s * 4096 / 256)
    # The same average depth as a ubatch at depth 3840: pp8192 from 0 ~ one ubatch at 3840.
    same = predict(r1, BOX, Settings(threads=32, depth=4096 - 256), CAL)
    assert long.pp_t_attention_s == pytest.approx(same.pp_t_attention_s)


def test_smt_siblings_add_their_gain_and_no_bandwidth(r1):
    cal = dataclasses.replace(CAL, smt_tg_gain=-0.2, smt_pp_gain=0.1)
    assert workers(128, 64, 1.0, -0.2) == pytest.approx(64 * 0.8)
    assert workers(96, 64, 1.0, 0.1) == pytest.approx(64 * 1.05)
    phys = predict(r1, BOX, Settings(threads=64, numa="interleave"), cal)
    smt = predict(r1, BOX, Settings(threads=128, numa="interleave"), cal)
    assert smt.effective_bw_gbps == phys.effective_bw_gbps
    assert smt.t_compute_s == pytest.approx(phys.t_compute_s / 0.8)
    assert any("SMT siblings" in n for n in smt.notes)
    capped = predict(r1, BOX, Settings(threads=1000, numa="interleave"), cal)
    assert capped.tg_tokens_per_s == predict(r1, BOX, Settings(threads=128, numa="interleave"), cal).tg_tokens_per_s
    assert any("1000 threads asked, 128 CPUs" in n for n in capped.notes)


def test_serial_share_is_amdahl():
    assert workers(1, 64, 1.0, 0.0, 0.01) == 1
    assert workers(64, 64, 1.0, 0.0, 0.01) == pytest.approx(64 / (1 + 0.63))
    # 64 -> 128 threads gives 1.5x with s = 0.00775 (the published prefill scaling on one 6980P).
    assert workers(128, 128, 1.0, 0.0, 0.00775) / workers(64, 128, 1.0, 0.0, 0.00775) == pytest.approx(1.5, rel=0.01)


def test_four_kib_pages_cost_bandwidth_only(r1):
    cal = dataclasses.replace(CAL, page_4k_efficiency=0.8)
    big = predict(r1, BOX, Settings(threads=32, page_size="2M"), cal)
    small = predict(r1, BOX, Settings(threads=32, page_size="4K"), cal)
    assert small.effective_bw_gbps == pytest.approx(big.effective_bw_gbps * 0.8)
    assert small.t_memory_s == pytest.approx(big.t_memory_s / 0.8)
    assert small.t_compute_s == big.t_compute_s


def test_distribute_leaves_repacked_weights_on_the_loaders_node(r1):
    """Q4_K is repacked on an AVX2 box: under --numa distribute the loading thread's node holds
    it, so two sockets read it through one node's controllers; interleave spreads it."""
    dist = predict(r1, BOX, Settings(threads=64, numa="distribute"), CAL)
    inter = predict(r1, BOX, Settings(threads=64, numa="interleave"), CAL)
    one = predict(r1, BOX, Settings(threads=32, numa="one-node"), CAL)
    assert one.effective_bw_gbps < dist.effective_bw_gbps < inter.effective_bw_gbps  # Q6_K etc. stay local
    # ik_llama.cpp's -rtr repacks every weight: all of it on one node, read by both sockets.
    ik = predict(r1, BOX, Settings(threads=64, numa="distribute", engine="ik_llama"), CAL)
    assert ik.effective_bw_gbps <= one.effective_bw_gbps * 1.01
    plain = dataclasses.replace(BOX, isa=())  # nothing repacked: distribute is local again
    assert predict(r1, plain, Settings(threads=64, numa="distribute"), CAL).effective_bw_gbps \
        == pytest.approx(2 * 400 * 0.8)


def test_a_build_older_than_a_repack_leaves_that_type_where_threads_touched_it(r1):
    """Q4_K's x86 repack came with llama.cpp#12332 (opened 2025-03-11): a run published before
    it read its Q4_K weights locally under distribute; the pinned build and ik_llama.cpp without
    -rtr (repack=False: none of mainline's load-time repacks) read them as the settings say."""
    old = predict(r1, BOX, Settings(threads=64, numa="distribute", build_date="2025-01-30"), CAL)
    new = predict(r1, BOX, Settings(threads=64, numa="distribute", build_date="2025-12-19"), CAL)
    pinned = predict(r1, BOX, Settings(threads=64, numa="distribute"), CAL)
    off = predict(r1, BOX, Settings(threads=64, numa="distribute", repack=False), CAL)
    assert new.effective_bw_gbps == pinned.effective_bw_gbps < old.effective_bw_gbps
    assert old.effective_bw_gbps == off.effective_bw_gbps == pytest.approx(2 * 400 * 0.8)
    assert repacked_types(("avx2",), "2025-01-30") == {"Q4_0", "MXFP4"}
    assert repacked_types(("avx2",), "2024-11-02") == {"MXFP4"}
    assert repacked_types(("avx2", "avx512f")) == {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4", "Q2_K"}


def test_nodes_of_one_socket_add_no_socket_link_cost(r1):
    """NPS4 + L3-as-NUMA makes one EPYC socket eight nodes: distribute over them reads every
    channel like one node of the socket would, and pays no cross-socket barrier or prefill cost."""
    cal = dataclasses.replace(CAL, overhead_node_factor=0.7, prefill_node_factor=0.1)
    split = MachineBandwidth(name="nps4", sockets=1, nodes=8, cores=32, node_read_gbps=48.0,
                             core_read_gbps=24.0, remote_ratio=0.91, mem_bytes=384 << 30, isa=())
    whole = dataclasses.replace(split, nodes=1, node_read_gbps=8 * 48.0, remote_ratio=1.0)
    a = predict(r1, split, Settings(threads=32, numa="distribute"), cal)
    b = predict(r1, whole, Settings(threads=32, numa="one-node"), cal)
    assert a.nodes_used == 8 and a.tg_tokens_per_s == pytest.approx(b.tg_tokens_per_s)
    assert a.pp_tokens_per_s == pytest.approx(b.pp_tokens_per_s)
    two = dataclasses.replace(split, name="2x nps4", sockets=2, nodes=16, cores=64, mem_bytes=768 << 30)
    assert [two.sockets_spanned(n) for n in (1, 8, 9, 16)] == [1, 1, 2, 2]
    # Two sockets of it: the link's cost once (1 + 0.7), for 64 threads' fixed cost.
    assert predict(r1, two, Settings(threads=64, numa="distribute"), cal).t_overhead_s \
        == pytest.approx(r1.n_layer * (1e-5 + 1e-7 * 64) * 1.7)
    assert a.t_overhead_s == pytest.approx(r1.n_layer * (1e-5 + 1e-7 * 32))


def test_ik_engine_scales_its_rates_only():
    cal = dataclasses.replace(CAL, ik_tg_factor=2.0, ik_pp_factor=3.0, ik_attn_factor=4.0)
    m = catalog_profile("deepseek-r1", "Q8_0")
    main = predict(m, BOX, Settings(threads=4, depth=4096), cal)
    ik = predict(m, BOX, Settings(threads=4, depth=4096, engine="ik_llama"), cal)
    assert ik.t_attention_s == pytest.approx(main.t_attention_s / 4)
    assert ik.t_compute_s - ik.t_attention_s == pytest.approx((main.t_compute_s - main.t_attention_s) / 2)
    assert ik.t_memory_s == main.t_memory_s
    with pytest.raises(ValueError):
        predict(m, BOX, Settings(threads=4, engine="vllm"), cal)


def test_core_family_rates_and_the_nearest_family():
    fam = {"zen4": {"decode": {"Q8_0": 30.0}, "prefill": {"Q8_0": 100.0}},
           "zen3": {"decode": {"Q8_0": 20.0}, "prefill": {"Q8_0": 60.0}}}
    cal = dataclasses.replace(CAL, family_rates=fam)
    zen4 = dataclasses.replace(BOX, core_family="zen4")
    assert rates_for(cal, zen4)[0].decode_gbps_per_core == {"Q8_0": 30.0}
    # An AVX-512 core no table knows takes zen4's (the nearest with the same vector width), and says so.
    other = dataclasses.replace(BOX, core_family="graniterapids", isa=("avx2", "avx512f"))
    c, used = rates_for(cal, other)
    assert used == "zen4" and c.prefill_gflops_per_core == {"Q8_0": 100.0}
    m = catalog_profile("deepseek-r1", "Q8_0")
    assert any("per-core rates of zen4" in n for n in predict(m, other, Settings(threads=8), cal).notes)
    assert rates_for(CAL, zen4) == (CAL, None)  # a box's own calibration has no family tables
    # A family told only by caches and flags (the VM hid the model) is said to be so.
    told = dataclasses.replace(other, core_told="caches")
    assert any("graniterapids told by its caches" in n for n in predict(m, told, Settings(threads=8), cal).notes)
    assert not any("told by" in n for n in predict(m, other, Settings(threads=8), cal).notes)


def test_a_family_without_rates_takes_another_scaled_by_its_simd_width():
    only_zen4 = dataclasses.replace(CAL, family_rates={"zen4": {"decode": {"Q8_0": 30.0},
                                                                "prefill": {"Q8_0": 100.0}}})
    # Zen 1 (AVX2 cracked into 128-bit halves) has no AVX2 table to take: Zen 4's, at half.
    zen1 = dataclasses.replace(BOX, core_family="zen1", isa=("avx2", "fma"))
    c, used = rates_for(only_zen4, zen1)
    assert used == "zen4"
    assert c.decode_gbps_per_core == {"Q8_0": 15.0} and c.prefill_gflops_per_core == {"Q8_0": 50.0}
    m = catalog_profile("deepseek-r1", "Q8_0")
    assert any("x0.5 for its SIMD width" in n for n in predict(m, zen1, Settings(threads=8), only_zen4).notes)
    # An AVX2 family first when there is one: Zen 3 from Zen 1's table, twice as wide.
    with_zen1 = dataclasses.replace(CAL, family_rates={**only_zen4.family_rates,
                                                       "zen1": {"decode": {"Q8_0": 5.0}, "prefill": {"Q8_0": 20.0}}})
    c, used = rates_for(with_zen1, dataclasses.replace(BOX, core_family="zen3", isa=("avx2",)))
    assert used == "zen1" and c.prefill_gflops_per_core == {"Q8_0": 40.0}
    # 512-bit units count as 256 (the published fit: Zen 5 and Granite Rapids per core = Zen 4).
    assert cores.vector_scale("graniterapids", "zen4") == 1.0
    assert cores.vector_scale("sierraforest", "zen3") == 0.5
    # A core of no known family keeps the table as it is.
    c, used = rates_for(only_zen4, dataclasses.replace(BOX, core_family=None, isa=("avx2",)))
    assert used == "zen4" and c.prefill_gflops_per_core == {"Q8_0": 100.0}
    assert cores.core_family("Intel(R) Xeon(R) CPU E5-2699 v4 @ 2.20GHz") == "broadwell"
    assert cores.core_family(vendor="GenuineIntel", cpu_family=6, model=63) == "haswell"


def test_every_prediction_carries_its_range(r1):
    cal = dataclasses.replace(CAL, tg_error_band=(0.8, 1.1), pp_error_band=(0.9, 1.2))
    p = predict(r1, BOX, Settings(threads=32), cal)
    assert p.tg_range == pytest.approx((0.8 * p.tg_tokens_per_s, 1.1 * p.tg_tokens_per_s))
    assert p.pp_range == pytest.approx((0.9 * p.pp_tokens_per_s, 1.2 * p.pp_tokens_per_s))


def test_best_threads_for_decode_and_prefill_separately(r1):
    # A per-thread fixed cost makes decode peak below all threads once bandwidth is spent;
    # prefill, compute-bound, wants every physical core (siblings cost here).
    cal = dataclasses.replace(CAL, overhead_s_per_layer_thread=2e-6, smt_tg_gain=-0.2, smt_pp_gain=-0.2)
    tg, pp = best_threads(r1, BOX, Settings(threads=64, numa="interleave"), cal)
    assert tg < 64 and pp == 64
    for n in (tg - 1, tg + 2):
        assert predict(r1, BOX, Settings(threads=n, numa="interleave"), cal).tg_tokens_per_s \
            <= predict(r1, BOX, Settings(threads=tg, numa="interleave"), cal).tg_tokens_per_s


def test_reference_box_decode_slows_with_depth_as_published():
    """ik_llama.cpp on one 6980P socket (PR #287): 9.1 t/s at depth 512 -> 7.5 at 8192 (-18 %)."""
    box = resolve_box("xeon-6980p-2s")
    m = catalog_profile("deepseek-r1", "Q4_K_M")
    s = Settings(threads=64, numa="one-node", engine="ik_llama", cache_type="q8_0")
    near = predict(m, box.machine, dataclasses.replace(s, depth=512), box.calibration).tg_tokens_per_s
    far = predict(m, box.machine, dataclasses.replace(s, depth=8192), box.calibration).tg_tokens_per_s
    assert 0.70 < far / near < 0.92
    assert calibrate.default_calibration("published").page_4k_efficiency < 0.95


def test_calibrate_fits_attention_rates_from_runs_at_depth():
    """Points 'measured' by predict() with known attention rates at depths 0, 1024 and 4096 on a
    GQA llama and an MLA deepseek2 (as `cputune calibrate --depths` runs them): the fit finds the
    rates and MLA's factor again, and predicts each depth within 3 %."""
    small = MachineBandwidth(name="vm", sockets=1, nodes=1, cores=2, node_read_gbps=30.0, core_read_gbps=20.0,
                             remote_ratio=1.0, mem_bytes=24 << 30)
    truth = dataclasses.replace(CAL, attn_gflops_per_core=9.0, attn_prefill_gflops_per_core=25.0,
                                mla_attn_factor=2.5,
                                decode_gbps_per_core={"Q8_0": 5.0, "Q4_K": 4.0, "F16": 8.0})
    models = [catalog_profile("r1-distill-llama-8b", "Q8_0"), catalog_profile("deepseek-r1", "Q8_0")]
    points = []
    for m in models:
        for t in (1, 2):
            for d in (0, 1024, 4096):
                p = predict(m, small, Settings(threads=t, n_ubatch=64, depth=d), truth)
                points.append(calibrate.Point(m, t, 64, p.tg_tokens_per_s, p.pp_tokens_per_s, depth=d))
    fitted = calibrate.fit(points, small, CAL, fit_efficiency=False)
    assert fitted.attn_gflops_per_core == pytest.approx(9.0, rel=0.1)
    assert fitted.attn_prefill_gflops_per_core == pytest.approx(25.0, rel=0.1)
    assert fitted.mla_attn_factor == pytest.approx(2.5, rel=0.15)
    assert max(abs(e) for e in calibrate.log_errors(points, small, fitted)) < 0.03


def test_prefill_attention_scales_with_threads_like_the_matrices_where_tiles_are_whole(r1):
    """DeepSeek's 128 heads x 512 tokens on 1 or 2 threads cut no tile: a second thread halves
    MLA prefill's attention over the cache (the 2-vCPU VM's flat MLA prefill at depth was its
    4-head twins' half tiles, now fa_prefill_tile_factor's); decode attention is untouched."""
    one = predict(r1, BOX, Settings(threads=1, depth=4096), CAL)
    two = predict(r1, BOX, Settings(threads=2, depth=4096), CAL)
    assert two.pp_t_attention_s == pytest.approx(one.pp_t_attention_s / 2)
    four_heads = dataclasses.replace(r1, n_head=4)
    s1, s2 = (Settings(threads=t, depth=4096, n_ubatch=64) for t in (1, 2))
    assert (predict(four_heads, BOX, s2, CAL).pp_t_attention_s
            == pytest.approx(predict(four_heads, BOX, s1, CAL).pp_t_attention_s))


def test_flash_attention_off_changes_only_attention_and_by_path():
    """-fa off: GQA decode attention runs fa_off_decode_factor faster, MLA's falls back to the
    slow decompressed path; nothing changes at depth 0 (no attention over a cache) for GQA."""
    from dataclasses import replace as _replace

    from cputune.model import catalog
    from cputune.predict.predictor import Calibration, MachineBandwidth, Settings, predict

    m = MachineBandwidth(name="box", sockets=1, nodes=1, cores=32, node_read_gbps=200.0,
                         core_read_gbps=20.0, remote_ratio=1.0, mem_bytes=1 << 40, isa=("avx512f",))
    cal = Calibration(bw_efficiency=0.9, decode_gbps_per_core={"Q4_K": 5.0, "Q6_K": 4.0, "F32": 8.0},
                      prefill_gflops_per_core={"Q4_K": 50.0, "Q6_K": 40.0, "F32": 20.0},
                      overhead_s_per_layer=1e-5, overhead_s_per_layer_thread=1e-7)
    gqa = catalog.catalog_profile("r1-distill-llama-8b", "q4_k_m")
    mla = catalog.catalog_profile("deepseek-r1", "q4_k_m")
    for model in (gqa, mla):
        at0 = Settings(threads=32)
        assert predict(model, m, _replace(at0, flash_attn=False), cal).t_attention_s == \
            predict(model, m, at0, cal).t_attention_s == 0.0
    deep = Settings(threads=32, depth=8192)
    on, off = predict(gqa, m, deep, cal), predict(gqa, m, _replace(deep, flash_attn=False), cal)
    assert off.tg_tokens_per_s > on.tg_tokens_per_s and off.pp_tokens_per_s > on.pp_tokens_per_s
    assert off.t_attention_s < on.t_attention_s
    on, off = predict(mla, m, deep, cal), predict(mla, m, _replace(deep, flash_attn=False), cal)
    assert off.tg_tokens_per_s < on.tg_tokens_per_s


# --------------------------------------------------------------------------------------------
# per-type decode cost (issue 14: low-bit i-quant mixes decode no faster than Q4_K_M on big boxes)


def test_type_ratios_ship_for_the_recipes_ik_types_and_every_calibration_carries_them():
    from cputune.model.gguf_model import bits_per_weight
    from cputune.model.recipes import load_recipes

    ratios = calibrate.decode_type_ratios()
    assert set(ratios) <= set(bits_per_weight()) and all(0 < r <= 10 for r in ratios.values())
    # Every type a shipped recipe writes has a rate: a table's or a measured ratio.
    table = calibrate.default_calibration("published").decode_gbps_per_core
    used = {r.type for rcps in load_recipes().values() for rcp in rcps for r in rcp.rules}
    assert {t for t in used if t not in table} <= set(ratios)
    assert calibrate.default_calibration("published").decode_type_ratio == ratios
    assert calibrate.default_calibration("default").decode_type_ratio == ratios


def test_a_type_without_a_rate_takes_its_measured_ratio_to_q4_k():
    from cputune.predict.predictor import nearest_rate

    rates = {"Q4_K": 10.0, "Q2_K": 8.0}
    assert nearest_rate(rates, "IQ1_S_R4", per_byte=True, ratios={"IQ1_S_R4": 0.15}) == pytest.approx(1.5)
    # Without a ratio it borrows the nearest type in bits per weight, converted through weights/s.
    from cputune.model.gguf_model import bits_per_weight

    bpw = bits_per_weight()
    guess = nearest_rate(rates, "IQ1_S_R4", per_byte=True)
    assert guess == pytest.approx(8.0 * bpw["IQ1_S_R4"] / bpw["Q2_K"])
    # A type the table has keeps the table's rate.
    assert nearest_rate(rates, "Q2_K", per_byte=True, ratios={"Q2_K": 0.1}) == 8.0


def test_an_iq1_mix_is_no_faster_than_q4_k_m_where_decode_is_compute_bound():
    """ubergarm's 6980P: the IQ1_S_R4 mix of R1-0528 decodes 7.4 t/s, Q4_K_M 10 (rows 1, 210);
    its kernels unpack half Q4_K's weights per second, which the measured ratios carry."""
    box = resolve_box("xeon-6980p-2s")
    q4 = catalog_profile("deepseek-r1", "Q4_K_M")
    iq1 = catalog_profile("deepseek-r1", "IQ1_S_R4", as_typed="deepseek-r1-0528")
    s = Settings(threads=80, engine="ik_llama")
    cal = box.calibration
    assert iq1.active_bytes_per_token < 0.65 * q4.active_bytes_per_token
    assert predict(iq1, box.machine, s, cal).tg_tokens_per_s <= predict(q4, box.machine, s, cal).tg_tokens_per_s
    # Without the measured ratios the same model was predicted 1.2x faster than Q4_K_M (+42 %).
    blind = dataclasses.replace(cal, decode_type_ratio={})
    assert predict(iq1, box.machine, s, blind).tg_tokens_per_s > 1.1 * predict(q4, box.machine, s, blind).tg_tokens_per_s


def test_a_bad_ratio_row_is_refused_in_one_line(monkeypatch):
    from cputune.core.errors import ConfigError

    rows = ({"type": "IQ1_S_R4", "ratio_to_q4_k": "nan"},)
    monkeypatch.setattr(calibrate, "load_csv", lambda name: rows)
    with pytest.raises(ConfigError, match="IQ1_S_R4"):
        calibrate.decode_type_ratios()
    monkeypatch.setattr(calibrate, "load_csv", lambda name: ({"type": "IQ9_Z", "ratio_to_q4_k": "0.5"},))
    with pytest.raises(ConfigError, match="IQ9_Z"):
        calibrate.decode_type_ratios()


# --------------------------------------------------------------------------------------------
# mainline flash-attention decode by head layout (issue 14: the GQA form)


def test_flash_attention_row_pass_costs_by_the_gap_between_a_heads_rows_and_its_group():
    """The first pass over each KV head's rows costs fa_kv_row_flops per row once the gap between
    a head's rows (the other KV heads' rows) reaches fa_kv_gap_bytes, in proportion below: a
    12 x 128 / 2-KV-head model (gap 256 B) pays half of it per row, a 32 / 8 x 128 one (1792 B) all,
    and the cost is added to attention's FLOPs at its rate, nothing else."""
    from dataclasses import replace as _replace

    from cputune.model import catalog
    from cputune.model.gguf_model import kv_rows_at

    m = MachineBandwidth(name="box", sockets=1, nodes=1, cores=8, node_read_gbps=100.0,
                         core_read_gbps=20.0, remote_ratio=1.0, mem_bytes=1 << 40, isa=("avx2",))
    without = _replace(CAL, fa_kv_row_flops=0.0, attn_gflops_per_core=10.0)
    with_ = _replace(without, fa_kv_row_flops=800.0, fa_kv_gap_bytes=512.0)
    deep = Settings(threads=4, depth=4096)
    w = workers(4, 8, 1.0, 0.0, 0.0)
    for model_id, share in (("r1-distill-qwen-1.5b", 0.5), ("r1-distill-llama-8b", 1.0)):
        model = catalog.catalog_profile(model_id, "q4_k_m")
        assert model.key_length == 128 and not model.mla
        extra = predict(model, m, deep, with_).t_compute_s - predict(model, m, deep, without).t_compute_s
        rows = kv_rows_at(model, 4096)
        assert rows == model.n_layer * model.n_head_kv * 4096
        assert extra == pytest.approx(rows * 800.0 * share / (w * 10.0e9), rel=1e-9)
        assert predict(model, m, deep, with_).tg_tokens_per_s < predict(model, m, deep, without).tg_tokens_per_s
        # Not at depth 0, not without flash attention, not ik_llama.cpp's kernels, not prefill.
        for s in (Settings(threads=4), _replace(deep, flash_attn=False), _replace(deep, engine="ik_llama")):
            assert predict(model, m, s, with_).t_compute_s == predict(model, m, s, without).t_compute_s
        assert predict(model, m, deep, with_).pp_tokens_per_s == predict(model, m, deep, without).pp_tokens_per_s
    # A q8_0 cache halves the gap in bytes (34/32 B per element): the 1.5B model pays a quarter-ish.
    qwen = catalog.catalog_profile("r1-distill-qwen-1.5b", "q4_k_m")
    q8 = _replace(deep, cache_type="q8_0")
    extra_q8 = predict(qwen, m, q8, with_).t_compute_s - predict(qwen, m, q8, without).t_compute_s
    assert extra_q8 == pytest.approx(kv_rows_at(qwen, 4096) * 800.0 * (128 * 34 / 32 / 512) / (w * 10.0e9))


def test_mla_pays_no_row_pass_and_the_default_calibration_carries_one():
    from dataclasses import replace as _replace

    r1 = catalog_profile("deepseek-r1", "Q4_K_M")
    assert r1.mla and r1.n_head_kv == 1
    deep = Settings(threads=32, depth=8192)
    a = predict(r1, BOX, deep, _replace(CAL, fa_kv_row_flops=0.0))
    b = predict(r1, BOX, deep, _replace(CAL, fa_kv_row_flops=5000.0))
    assert a.t_compute_s == b.t_compute_s
    for section in ("default", "published"):
        cal = calibrate.default_calibration(section)
        assert cal.fa_kv_row_flops > 0 and cal.fa_kv_gap_bytes > 0


def test_a_window_layer_walks_its_window_only():
    """kv_rows_at counts a sliding-window layer's rows up to its window (gpt-oss)."""
    from cputune.model import catalog
    from cputune.model.gguf_model import kv_rows_at

    oss = catalog.catalog_profile("gpt-oss-120b", "mxfp4_moe")
    assert oss.n_swa > 0
    full = (oss.kv_k_elems_per_token - oss.swa_kv_k_elems_per_token) / oss.key_length
    swa = oss.swa_kv_k_elems_per_token / oss.key_length
    assert kv_rows_at(oss, 8 * oss.n_swa) == pytest.approx(full * 8 * oss.n_swa + swa * oss.n_swa)
    assert kv_rows_at(oss, 0) == 0


def test_mainline_tiled_flash_attention_pays_for_the_tiles_its_chunks_cut():
    """ggml-cpu's tiled flash attention (a batch of >= 64 queries): 4 x threads chunks of the
    n_tokens x n_head rows, tiles of up to 64 rows of one head, each a full 64-row pass over the
    cache. 12 heads x 64 tokens on 2 threads: 8 chunks of 96 rows, each 2 tiles: 16 tiles of work
    for 12 heads' worth; 8 heads: 8 chunks of one whole tile; 4 heads: 8 half tiles, 2x."""
    from cputune.predict.predictor import fa_prefill_tile_factor as tiles

    assert tiles(64, 12, 1) == 1.0 and tiles(64, 8, 2) == 1.0
    assert tiles(64, 12, 2) == pytest.approx(4 / 3)
    assert tiles(64, 4, 2) == pytest.approx(2.0)
    assert tiles(512, 128, 64) == 1.0 and tiles(512, 128, 128) == 1.0  # chunks of 256 / 128 rows
    assert tiles(512, 128, 96) > 1.2  # chunks of 171 rows: 64 + 64 + 43
    assert tiles(100, 8, 1) == pytest.approx(128 / 100)  # one head's 100 rows: two full tiles
    assert tiles(32, 12, 2) == 1.0  # below one tile: the row-by-row path, no padding
    # --numa turns chunking off: one chunk per thread (64 x 12 / 2 = 384 rows = 6 whole tiles).
    assert tiles(64, 12, 2, chunking=False) == 1.0

    gqa = dataclasses.replace(catalog_profile("r1-distill-llama-8b", "Q8_0"), n_head=12)
    one_node = MachineBandwidth(name="vm", sockets=1, nodes=1, cores=2, node_read_gbps=30.0,
                                core_read_gbps=20.0, remote_ratio=1.0, mem_bytes=24 << 30)

    def attn(threads, cache="f16", engine="llama.cpp", fa=True):
        s = Settings(threads=threads, n_ubatch=64, depth=4096, cache_type=cache, engine=engine, flash_attn=fa)
        return predict(gqa, one_node, s, CAL).pp_t_attention_s

    # Only the f16/f32 cache runs the tiled path; ik_llama.cpp has its own kernels.
    assert attn(1) == pytest.approx(attn(1, "q8_0"))
    assert attn(2) == pytest.approx(attn(2, "q8_0") * 4 / 3)
    assert attn(2, engine="ik_llama") / attn(1, engine="ik_llama") == pytest.approx(attn(2, "q8_0") / attn(1, "q8_0"))
    assert attn(2, fa=False) / attn(1, fa=False) == pytest.approx(attn(2, "q8_0") / attn(1, "q8_0"))
