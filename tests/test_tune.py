"""`cputune tune`: the search space on recorded machines, successive halving and the confirm round
against llama.cpp's defaults with a scripted measuring function, and the real llama-bench end to end."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from cputune.core import launch
from cputune.engine import serve, tune
from cputune.engine.build import load_engine
from cputune.cli import cli
from cputune.core.errors import ConfigError, ProcessFailed
from cputune.model.gguf_model import read_model
from cputune.machine.topology import discover_topology
from helpers import SERVER_FLAGS, xml_box

FIXTURES = Path(__file__).parent / "fixtures"
GiB = 1 << 30


# ---- defaults and the search space ---------------------------------------------------------------

def test_defaults_are_read_from_the_builds_help(llama_bin_dir):
    from cputune.engine import llama_bench

    d = tune.defaults_from_help(llama_bench.help_text(llama_bin_dir / "llama-bench"), cores=2)
    assert (d.n_batch, d.n_ubatch, d.flash_attn, d.repack, d.cache_type, d.numa) == \
        (2048, 512, "auto", True, "f16", "off")
    assert d.threads >= 1
    # An older build: flash attention as 0|1, no --repack option.
    old = ("  -t, --threads <n>       (default: 16)\n  -fa, --flash-attn <0|1>   (default: 0)\n"
           "  -ub, --ubatch-size <n>   (default: 256)\n")
    d = tune.defaults_from_help(old, cores=8)
    assert (d.threads, d.flash_attn, d.n_ubatch, d.n_batch, d.repack) == (16, "off", 256, 2048, True)


def test_thread_candidates_decode_goes_lower_than_prefill():
    assert tune.thread_candidates(2, "tg") == (2, 1)
    assert tune.thread_candidates(2, "pp") == (2,)
    # 96 Zen 4 cores in 8-core CCDs, SMT on: decode down to one CCD, prefill up to every logical CPU.
    assert tune.thread_candidates(96, "tg", 8, 192) == (96, 72, 48, 24, 8)
    assert tune.thread_candidates(96, "pp", 8, 192) == (192, 96, 72)


@pytest.fixture(scope="module")
def q4(tiny_models):
    return read_model(tiny_models["llama"].quantized["q4_k_m"])


def test_space_on_a_dual_epyc_9654_tries_every_numa_mode(q4):
    t = xml_box("AMD-19h-Zen4-2xEpyc-9654", 384)
    default = tune.Knobs(threads=192)
    space = tune.search_space("tg", t, q4, default, n_prompt=512, need_bytes=100 * GiB)
    modes = {m for _, m in space.placements}
    assert modes == {"off", "distribute", "isolate", "interleave", "node:0"}
    assert (96, "node:0") in space.placements and (192, "node:0") not in space.placements
    assert (192, "interleave") in space.placements and (24, "distribute") in space.placements
    # Too big for one node; and without numactl neither interleave nor node:N can be run.
    big = tune.search_space("tg", t, q4, default, n_prompt=512, need_bytes=500 * GiB)
    assert "node:0" not in {m for _, m in big.placements}
    assert any("does not fit in one node" in n for n in big.notes)
    bare = tune.search_space("tg", t, q4, default, n_prompt=512, need_bytes=100 * GiB, numactl=False)
    assert {m for _, m in bare.placements} == {"off", "distribute", "isolate"}


def test_space_here_skips_what_cannot_matter(tiny_models, q4):
    t = discover_topology()
    d = tune.Knobs(threads=2)
    f16 = read_model(tiny_models["llama"].f16)
    s = tune.search_space("tg", t, f16, d, n_prompt=256)
    if len([n for n in t.nodes if n.cpus]) == 1:
        assert {m for _, m in s.placements} == {"off"}
    assert s.repack == (True,) and any("repack" in n for n in s.notes)  # no Q4_0/Q4_K weights
    assert s.n_ubatch == (512,)  # decode: one token, ubatch is moot
    pp = tune.search_space("pp", t, q4, d, n_prompt=256, cache_types=("f16", "q8_0"))
    if "avx2" in t.isa_flags:
        assert pp.repack == (True, False)
    assert pp.n_ubatch == (128, 256, 512) and pp.cache_types == ("f16", "q8_0")


def test_kernel_candidates_never_quantize_v_without_flash_attention():
    space = tune.Space(placements=((2, "off"),), n_ubatch=(128, 512), flash_attn=("on", "off"),
                       repack=(True, False), cache_types=("f16", "q8_0"), notes=())
    base = tune.Knobs(threads=2)
    full = tune.kernel_candidates(space, base)
    assert full[0] == base and len(set(full)) == len(full)
    assert not [k for k in full if k.cache_type == "q8_0" and k.flash_attn == "off"]
    assert len(full) == 1 + 2 * 2 * (2 + 1)  # base (fa auto) + ub x repack x (fa on f16/q8_0, off f16)
    few = tune.kernel_candidates(space, base, full=False)
    assert few[0] == base and len(few) < len(full)
    assert {k.n_ubatch for k in few} == {128, 512} and {k.repack for k in few} == {True, False}
    assert all(sum(getattr(k, f) != getattr(base, f) for f in ("n_ubatch", "flash_attn", "repack", "cache_type")) <= 1
               for k in few)


def test_prune_keeps_the_default_and_orders_by_prediction():
    d, a, b, c = (tune.Knobs(threads=n) for n in (1, 2, 3, 4))
    kept, pruned = tune.prune([(d, 1.0), (a, 10.0), (b, 4.9), (c, 6.0)], keep=d)
    assert [k for k, _ in kept] == [a, c, d] and [k for k, _ in pruned] == [b]


# ---- the engine, with a scripted llama-bench ----------------------------------------------------

class FakeBench:
    """tokens/s = the setting's true speed x noise; each run costs (reps + 1) x 1 s on a fake clock."""

    def __init__(self, speed, noise=0.03, seed=0, fail=()):
        self.speed, self.noise, self.rng, self.fail = speed, noise, random.Random(seed), set(fail)
        self.now, self.calls = 0.0, []

    def clock(self) -> float:
        return self.now

    def __call__(self, k: tune.Knobs, reps: int):
        self.calls.append((k, reps))
        self.now += reps + 1
        if k in self.fail:
            raise ProcessFailed("llama-bench failed (exit 1)\nmore", ["llama-bench"], 1)
        return [self.speed(k) * (1 + self.rng.uniform(-self.noise, self.noise)) for _ in range(reps)], reps + 1.0


def job(kind="tg", space=None, default=None, predict=None):
    default = default or tune.Knobs(threads=8)
    space = space or tune.Space(placements=tuple((t, "off") for t in (8, 6, 4, 2, 1)), n_ubatch=(512,),
                                flash_attn=("on", "off"), repack=(True, False), cache_types=("f16",), notes=())
    return tune.KindJob(kind, 10, 0, default, space, predict or (lambda k: 10.0 * min(k.threads, 6)))


def tg_speed(k: tune.Knobs) -> float:
    # Decode peaks at 6 threads; repack off is 20% faster on this imaginary box; fa does nothing.
    return {8: 40, 6: 50, 4: 45, 2: 25, 1: 13}[k.threads] * (1.2 if not k.repack else 1.0)


def test_tune_finds_the_faster_setting_and_measures_the_gain_alternately():
    fake = FakeBench(tg_speed)
    r = tune.tune_kind(job(), fake, budget_s=400, clock=fake.clock)
    assert (r.best.threads, r.best.repack) == (6, False)
    assert r.gain == pytest.approx(60 / 40, rel=0.08)
    assert fake.now <= 400 + 2 * 4  # the budget holds, within one run
    stages = [t.stage for t in r.trials]
    assert stages[0] == "baseline" and stages.count("confirm") == 2
    place = {t.knobs.threads: t for t in r.trials if t.stage == "placement"}
    assert place[1].outcome == "pruned"  # predicted 10 < half of 60: never run
    assert not [c for c in fake.calls if c[0].threads == 1]
    # The close calls got the repetitions: the winner was measured in more rungs than the loser.
    assert place[6].rungs > place[2].rungs
    # The defaults were alternated with the winner in the confirm rounds.
    confirm = [c[0] for c in fake.calls[-2 * tune.CONFIRM_ROUNDS:]]
    assert confirm[::2] == [r.default] * tune.CONFIRM_ROUNDS and confirm[1::2] == [r.best] * tune.CONFIRM_ROUNDS


def test_a_winner_that_does_not_beat_the_defaults_alternately_is_not_kept():
    calls = {"n": 0}

    def speed(k):
        # Lucky in the search (first calls), equal to the defaults afterwards.
        calls["n"] += 1
        return 50 if k.threads == 4 and calls["n"] < 8 else 40

    fake = FakeBench(speed, noise=0.0)
    space = tune.Space(placements=((8, "off"), (4, "off")), n_ubatch=(512,), flash_attn=("auto",),
                       repack=(True,), cache_types=("f16",), notes=())
    r = tune.tune_kind(job(space=space, predict=lambda k: None), fake, budget_s=200, clock=fake.clock)
    assert r.best == r.default and r.gain == 1.0
    assert any("did not beat the defaults" in n for n in r.notes)


def test_a_small_budget_measures_fewer_and_says_so():
    fake = FakeBench(tg_speed)
    r = tune.tune_kind(job(), fake, budget_s=40, clock=fake.clock)
    assert fake.now <= 40 + 2 * 4
    assert any(t.outcome == "unmeasured" for t in r.trials)
    assert any("budget" in n for n in r.notes)


def test_a_setting_llama_bench_rejects_is_reported_not_fatal():
    bad = tune.Knobs(threads=8, repack=False)
    fake = FakeBench(tg_speed, fail={bad})
    space = tune.Space(placements=((8, "off"),), n_ubatch=(512,), flash_attn=("auto",), repack=(True, False),
                       cache_types=("f16",), notes=())
    r = tune.tune_kind(job(space=space), fake, budget_s=100, clock=fake.clock)
    failed = [t for t in r.trials if t.outcome == "failed"]
    assert [t.knobs for t in failed] == [bad] and failed[0].note == "llama-bench failed (exit 1)"
    assert r.best == r.default


def test_rung_plan_and_budget_fit():
    assert tune.rung_plan(9) == [(9, 1), (5, 2), (3, 4), (2, 8)]
    assert tune.rung_plan(1) == []
    run_s = lambda reps: reps + 1  # noqa: E731
    assert tune.plan_cost(4, run_s) == 4 * 2 + 2 * 3
    assert tune.fit_count(20, 14, run_s) == 4 and tune.fit_count(20, 1, run_s) == 2


# ---- the saved profile and serve -------------------------------------------------------------------

def result_for(path: Path, tg: tune.Knobs, pp: tune.Knobs) -> tune.TuneResult:
    def kr(kind, best):
        return tune.KindResult(kind, f"{kind}8", tune.Knobs(threads=2), best, 10.0, 11.0, 1.1, (), 1.0, ())
    return tune.TuneResult(path, path.stat().st_size, "vm", "0c1e57098", 60, 50, 0,
                           (kr("tg", tg), kr("pp", pp)), "2026-11-23T12:00:00+00:00")


def test_saved_profile_round_trips_and_follows_the_file(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 100)
    store = tmp_path / "tuned.json"
    r = result_for(model, tune.Knobs(threads=1, repack=False), tune.Knobs(threads=2, n_ubatch=256))
    tune.save(r, store)
    assert tune.tuned_for(model, store) == r
    assert tune.serve_settings(r) == {"engine": "llama.cpp", "threads": 1, "numa": "off", "flash_attn": "auto",
                                      "repack": False, "cache_type": "f16", "threads_batch": 2, "n_ubatch": 256,
                                      "n_batch": 2048}
    assert tune.serve_settings(r, "ik_llama") is None and tune.tuned_engine(r) == "llama.cpp"
    model.write_bytes(b"x" * 101)  # a new file under the same name is not the one tuned
    assert tune.tuned_for(model, store) is None
    store.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read") as e:  # said, not silently no settings
        tune.tuned_for(model, store)
    assert "--no-tuned" in e.value.hint
    said = []
    tune.save(r, store, warn=said.append)  # an unreadable store is kept aside, never lost
    assert json.loads(store.read_text())["schema"] == tune.SCHEMA
    aside = [p for p in store.parent.iterdir() if p.name.startswith(store.name + ".damaged-")]
    assert len(aside) == 1 and aside[0].read_text() == "{not json" and str(aside[0]) in said[0]


def test_saving_keeps_every_other_models_entry_when_one_is_damaged(tmp_path):
    """One entry out of range (here another model's gain) does not cost the others: they are
    carried over, and the file as it was is kept beside the new one."""
    store = tmp_path / "tuned.json"
    first, second = (tmp_path / "a.gguf"), (tmp_path / "b.gguf")
    for m in (first, second):
        m.write_bytes(b"x" * 100)
    knobs = (tune.Knobs(threads=1), tune.Knobs(threads=2))
    ra = result_for(first, *knobs)
    tune.save(ra, store)
    tune.save(result_for(second, *knobs), store)
    doc = json.loads(store.read_text())
    key_b = next(k for k in doc["profiles"] if k.endswith("b.gguf"))
    doc["profiles"][key_b]["model_size_bytes"] = "big"
    store.write_text(json.dumps(doc))
    said = []
    third = tmp_path / "c.gguf"
    third.write_bytes(b"x" * 100)
    tune.save(result_for(third, *knobs), store, warn=said.append)
    kept = tune.load_all(store)
    assert sorted(Path(k).name for k in kept) == ["a.gguf", "c.gguf"] and kept[next(iter(kept))] == ra
    assert said and ".damaged-" in said[0] and "1 other entries" in said[0]
    aside = next(p for p in tmp_path.iterdir() if ".damaged-" in p.name)
    assert json.loads(aside.read_text())["profiles"][key_b]["model_size_bytes"] == "big"


def test_apply_tuned_leaves_what_the_user_set():
    settings = {"threads": 1, "numa": "off", "flash_attn": "on", "repack": False, "cache_type": "q8_0",
                "threads_batch": 2, "n_ubatch": 256, "n_batch": 2048}
    req = serve.ServeRequest(quant="q8_0", threads=3, extra_args=("-ub", "64"))
    new, skipped = tune_apply(req, settings)
    assert new.threads == 3 and new.threads_batch == 2 and new.cache_type == "q8_0"
    assert "-ub" not in new.tuned_args and skipped == ["n_ubatch (set after `--`)"]
    assert new.tuned_args == ("-b", "2048", "-fa", "on", "--no-repack", "-ctk", "q8_0", "-ctv", "q8_0")


def tune_apply(req, settings):
    return serve.apply_tuned(req, settings, SERVER_FLAGS)


def test_serve_starts_with_the_tuned_settings(own_cache, tiny_models):
    path = tiny_models["llama"].quantized["q4_k_m"]
    tune.save(result_for(path, tune.Knobs(threads=1, flash_attn="off", repack=False),
                         tune.Knobs(threads=2, n_ubatch=128)))
    args = ["serve", "-m", str(path), "--dry-run", "--json"]
    plan = json.loads(CliRunner().invoke(cli, args, catch_exceptions=False).stdout)["plan"]
    argv = plan["argv"]
    assert argv[argv.index("-t") + 1] == "1" and argv[argv.index("-tb") + 1] == "2"
    assert argv[argv.index("-ub") + 1] == "128" and argv[argv.index("-fa") + 1] == "off"
    assert "--no-repack" in argv and any("cputune tune" in n for n in plan["notes"])
    plain = json.loads(CliRunner().invoke(cli, args + ["--no-tuned"], catch_exceptions=False).stdout)["plan"]
    assert "-ub" not in plain["argv"] and "--no-repack" not in plain["argv"]
    mine = json.loads(CliRunner().invoke(cli, args + ["-t", "2"], catch_exceptions=False).stdout)["plan"]
    assert mine["argv"][mine["argv"].index("-t") + 1] == "2"


# ---- the real llama-bench ----------------------------------------------------------------------------

@pytest.fixture
def probed(own_cache):
    assert CliRunner().invoke(cli, ["probe", "--quick"], catch_exceptions=False).exit_code == 0
    return own_cache


@pytest.mark.llama
def test_tune_runs_llama_bench_and_saves_what_serve_reads(probed, tiny_models):
    path = tiny_models["llama"].quantized["q4_k_m"]
    args = ["tune", "-m", str(path), "--engine", "llama.cpp", "--budget", "30s", "--n-prompt", "32", "--n-gen", "8",
            "--json"]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "cputune.engine.tune/1"
    res = {x["kind"]: x for x in doc["result"]["results"]}
    assert set(res) == {"tg", "pp"} and res["tg"]["test"] == "tg8" and res["pp"]["test"] == "pp32"
    for x in res.values():
        base = x["trials"][0]
        assert base["stage"] == "baseline" and len(base["samples_tokens_per_s"]) == tune.BASELINE_REPS
        assert all(s > 0 for t in x["trials"] for s in t["samples_tokens_per_s"])
        assert x["gain"] >= 1.0  # the defaults are kept unless the winner beat them alternately
        assert any(t["stage"] == "kernels" and t["samples_tokens_per_s"] for t in x["trials"])
    assert doc["result"]["budget_s"] == 30  # keeping to it is tested on a fake clock, not timed here
    saved = tune.tuned_for(path)
    assert saved is not None and saved.for_kind("tg").best == tune.Knobs(**res["tg"]["best"])
    # The human table names the stages and the gain.
    r = CliRunner().invoke(cli, args[:-1] + ["--budget", "10s", "--for", "tg", "--no-save"], catch_exceptions=False)
    assert "llama.cpp's defaults" in r.stdout and "baseline" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--budget", "soon"], "cannot read the duration"),
    (["--for", "tg,xx"], "choose tg, pp"),
])
def test_tune_bad_input_is_one_line(probed, tiny_models, args, message):
    path = tiny_models["llama"].quantized["q8_0"]
    r = CliRunner().invoke(cli, ["tune", "-m", str(path), *args])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_bench_argv_puts_the_placement_first(tiny_models, llama_bin_dir):
    t = xml_box("AMD-19h-Zen4-2xEpyc-9654", 384)
    runner = tune.BenchRunner(llama_bin_dir / "llama-bench", Path("m.gguf"), t, "tg", 16)
    argv = runner.argv(replace(tune.Knobs(threads=96), numa="interleave", repack=False), 2)
    assert argv[:2] == ["numactl", "--interleave=all"]
    assert argv[argv.index("--numa") + 1] == "distribute" and argv[argv.index("--repack") + 1] == "0"
    assert argv[argv.index("-n") + 1] == "16" and argv[argv.index("-p") + 1] == "0"
    node = runner.argv(tune.Knobs(threads=96, numa="node:1"), 1)
    assert "--cpunodebind=1" in node and "--numa" not in node


# ---- engines: each searched from its own defaults, then run alternately against llama.cpp's -------

IK_BENCH_HELP = (FIXTURES / "llama_help" / "8337e4cd3-ik-llama-bench.txt").read_text()


def test_ik_defaults_are_read_under_its_own_option_names():
    d = tune.defaults_from_help(IK_BENCH_HELP, cores=2, engine=load_engine("ik_llama"))
    # -fa 1, -rtr 0, -fmoe 1 and -mla 3 are this llama-bench's defaults (its print_usage).
    assert (d.engine, d.flash_attn, d.repack, d.fused_moe, d.mla, d.n_ubatch, d.threads) == \
        ("ik_llama", "on", False, True, 3, 512, 2)
    assert d.bench_args() == ["-b", "2048", "-ub", "512", "-ctk", "f16", "-ctv", "f16",
                              "-fa", "1", "-rtr", "0", "-fmoe", "1", "-mla", "3"]
    assert d.label == "ik_llama t2 numa=off ub512 fa=on repack=off kv=f16 fmoe=on mla=3"
    # Mainline's llama-bench has none of ik's switches: they stay None and are not written.
    assert tune.Knobs(threads=2).bench_args()[-4:] == ["-fa", "auto", "--repack", "1"]


def test_ik_space_searches_its_own_switches_where_the_model_has_them(tiny_models, ik_models):
    ik = load_engine("ik_llama")
    d = tune.defaults_from_help(IK_BENCH_HELP, cores=2, engine=ik)
    here = discover_topology()
    ds2 = read_model(ik_models["deepseek2"].quantized["q4_k_m"])
    space = tune.search_space("pp", here, ds2, d, n_prompt=64, engine=ik)
    assert (space.fused_moe, space.mla, space.repack, space.flash_attn) == ((True, False), (3,), (True, False), ("on", "off"))
    grid = tune.kernel_candidates(space, d)
    assert {k.fused_moe for k in grid} == {True, False} and {k.repack for k in grid} == {True, False}
    assert all(k.engine == "ik_llama" for k in grid)
    one_at_a_time = tune.kernel_candidates(space, d, full=False)
    assert replace(d, fused_moe=False) in one_at_a_time and len(one_at_a_time) < len(grid)
    # A dense model has no experts to fuse; mainline has no such switch at all.
    dense = tune.search_space("tg", here, read_model(tiny_models["llama"].quantized["q4_k_m"]), d, n_prompt=64, engine=ik)
    assert dense.fused_moe == (True,)
    main = tune.search_space("pp", here, ds2, tune.Knobs(threads=2), n_prompt=64)
    assert (main.fused_moe, main.mla) == ((None,), (None,))
    # Prefill at depth is llama-sweep-bench's one window: no ubatch search.
    assert tune.search_space("pp", here, ds2, d, n_prompt=64, engine=ik, sweep=True).n_ubatch == (512,)


def engine_speed(k: tune.Knobs) -> float:
    # ik_llama.cpp is 1.5x faster than llama.cpp's defaults once -rtr is on; repack off helps mainline.
    if k.engine == "ik_llama":
        return 30.0 * (2.0 if k.repack else 1.0)
    return 40.0 * (1.1 if not k.repack else 1.0)


def test_the_engines_round_alternates_winners_with_mainline_defaults():
    fake = FakeBench(engine_speed, noise=0.0)
    space = tune.Space(placements=((2, "off"),), n_ubatch=(512,), flash_attn=("auto",), repack=(True, False),
                       cache_types=("f16",), notes=())
    ik_default = tune.Knobs(threads=2, flash_attn="on", repack=False, engine="ik_llama", fused_moe=True, mla=3)
    ik_space = replace(space, flash_attn=("on",), fused_moe=(True,), mla=(3,))
    jobs = [tune.KindJob("tg", 10, 0, tune.Knobs(threads=2), space, lambda k: 40.0),
            tune.KindJob("tg", 10, 0, ik_default, ik_space, lambda k: 40.0, engine="ik_llama")]
    results, notes = tune.tune_kinds(jobs, lambda job: fake, 400, clock=fake.clock)
    main, ik = results
    assert (main.engine, main.best.repack, ik.engine, ik.best.repack) == ("llama.cpp", False, "ik_llama", True)
    assert ik.gain == pytest.approx(2.0)  # over its own defaults
    fake.calls.clear()
    out, notes = tune.compare_engines(results, lambda k: fake, 200, clock=fake.clock)
    main, ik = out
    assert ik.overall and not main.overall and notes == []
    assert ik.vs_baseline == pytest.approx(60 / 40) and main.vs_baseline == pytest.approx(44 / 40)
    # ABBA: the order turns every round, so drift on the box favours no one.
    order = [k for k, _ in fake.calls]
    base = main.default
    assert order == [base, main.best, ik.best, ik.best, main.best, base, base, main.best, ik.best]
    rows = [t for t in ik.trials if t.stage == "engines"]
    assert [t.outcome for t in rows] == ["best"] and len(rows[0].samples_tokens_per_s) == 3 * tune.CONFIRM_REPS
    assert [t.outcome for t in main.trials if t.stage == "engines"] == ["default", "dropped"]
    r = tune.TuneResult(Path("m.gguf"), 1, "vm", "0c1e57098", 600, 500, 0, tuple(out))
    assert r.for_kind("tg") is ik and r.for_kind("tg", "llama.cpp") is main and tune.tuned_engine(r) == "ik_llama"
    settings = tune.serve_settings(r)
    assert (settings["engine"], settings["repack"], settings["fused_moe"], settings["mla"]) == ("ik_llama", True, True, 3)
    assert tune.serve_settings(r, "llama.cpp")["repack"] is False and "mla" not in tune.serve_settings(r, "llama.cpp")


def test_no_engines_round_fits_keeps_llama_cpp():
    fake = FakeBench(engine_speed, noise=0.0)
    main = tune.KindResult("tg", "tg10", tune.Knobs(threads=2), tune.Knobs(threads=2, repack=False),
                           40.0, 44.0, 1.1, (), 1.0, ())
    ik = replace(main, engine="ik_llama", default=tune.Knobs(threads=2, engine="ik_llama", repack=False),
                 best=tune.Knobs(threads=2, engine="ik_llama"), gain=2.0, best_tokens_per_s=60.0)
    out, notes = tune.compare_engines([main, ik], lambda k: fake, 1, clock=fake.clock)
    assert [r.overall for r in out] == [True, False] and out[0].vs_baseline == 1.1 and out[1].vs_baseline is None
    assert "no engines round was run" in notes[-1] and fake.calls == []


def test_apply_tuned_writes_ik_settings_in_its_own_words():
    ik_flags = launch.parse_help_flags((FIXTURES / "llama_help" / "8337e4cd3-ik-llama-server.txt").read_text())
    settings = {"engine": "ik_llama", "threads": 2, "numa": "off", "flash_attn": "on", "repack": True,
                "cache_type": "f16", "threads_batch": 2, "n_ubatch": 256, "n_batch": 2048, "fused_moe": False, "mla": 3}
    new, skipped = serve.apply_tuned(serve.ServeRequest(quant="q4_k_m", extra_args=("-rtr",)), settings, ik_flags,
                                     load_engine("ik_llama"))
    assert new.tuned_args == ("-b", "2048", "-ub", "256", "-fa", "on", "-no-fmoe", "-mla", "3")
    assert skipped == ["repack (set after `--`)"]


def test_a_tuned_file_naming_an_unknown_engine_is_refused(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 100)
    store = tmp_path / "tuned.json"
    tune.save(result_for(model, tune.Knobs(threads=1), tune.Knobs(threads=2)), store)
    doc = json.loads(store.read_text())
    entry = next(iter(doc["profiles"].values()))
    entry["results"][0]["best"]["engine"] = "vllm"
    store.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"results\[0\]\.best\.engine"):
        tune.tuned_for(model, store)


@pytest.mark.llama
def test_tune_searches_both_engines_and_serve_starts_the_winner(probed, ik_models):
    path = ik_models["deepseek2"].quantized["q4_k_m"]
    args = ["tune", "-m", str(path), "--budget", "60s", "--n-prompt", "32", "--n-gen", "8", "--json"]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    results = doc["result"]["results"]
    assert {(x["engine"], x["kind"]) for x in results} == {(e, k) for e in ("llama.cpp", "ik_llama") for k in ("tg", "pp")}
    for kind in ("tg", "pp"):
        mine = [x for x in results if x["kind"] == kind]
        assert sum(x["overall"] for x in mine) == 1
        # The engines round ran each winner beside llama.cpp's defaults.
        assert all(x["vs_baseline"] and any(t["stage"] == "engines" for t in x["trials"]) for x in mine)
    ik = next(x for x in results if x["engine"] == "ik_llama" and x["kind"] == "tg")
    assert ik["default"]["mla"] == 3 and ik["default"]["fused_moe"] is True and ik["build_commit"] == "8337e4cd3"
    winner = next(x["engine"] for x in results if x["kind"] == "tg" and x["overall"])
    assert doc["serve"]["engine"] == winner
    # serve starts the engine tune found fastest, with its settings; --engine picks the other.
    plan = json.loads(CliRunner().invoke(cli, ["serve", "-m", str(path), "--dry-run", "--json"],
                                         catch_exceptions=False).stdout)["plan"]
    assert plan["engine"] == winner and any("cputune tune" in n for n in plan["notes"])
    other = "llama.cpp" if winner == "ik_llama" else "ik_llama"
    plan = json.loads(CliRunner().invoke(cli, ["serve", "-m", str(path), "--engine", other, "--dry-run", "--json"],
                                         catch_exceptions=False).stdout)["plan"]
    assert plan["engine"] == other and any(f"{load_engine(other).title} settings from" in n for n in plan["notes"])
    table = CliRunner().invoke(cli, args[:-1] + ["--budget", "20s", "--for", "tg", "--no-save"], catch_exceptions=False)
    assert "Engines: each one's best" in table.stdout and "fastest" in table.stdout
