"""One NUMA rule: predict, select, plan, serve (and its dry run) and tune decide the policy,
threads and nodes by the same function, so they agree for one model on one box."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cputune.core import numa_policy
from cputune.engine import tune
from cputune.predict import selector
from cputune.predict.box import plan_settings, resolve_box
from cputune.model.catalog import catalog_profile
from cputune.cli import cli
from cputune.engine.placement import plan_placement

GIB = 1 << 30


def run_json(*args):
    r = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.mark.parametrize("model,quant,policy", [("deepseek-r1", "Q4_K_M", "interleave"),
                                                 ("r1-distill-llama-70b", "Q4_K_M", "one-node")])
def test_predict_select_and_plan_agree(model, quant, policy):
    box = resolve_box("epyc-9655-2s")
    prof = catalog_profile(model, quant)
    ctx = 8192
    # predict (the library call predict_cmd makes), at the same context as select's
    settings, decision = plan_settings(box.machine, prof, depth=ctx, ctx_tokens=ctx)
    assert decision.policy == policy and settings.numa == policy
    assert settings.threads == (96 if policy == "one-node" else 192)
    pred = run_json("predict", "-m", model, "-q", quant, "--hardware", "epyc-9655-2s", "--depth", str(ctx))
    assert pred["settings"]["numa"] == policy and pred["settings"]["threads"] == settings.threads
    # select and plan
    sel = run_json("select", "--model", model, "--hardware", "epyc-9655-2s", "--ctx", str(ctx))
    opt = next(o for o in sel["selection"]["options"] if o["quant"] == quant)
    assert opt["numa"]["policy"] == policy and opt["numa"]["threads"] == settings.threads
    pl = run_json("plan", "--model", model, "--quant", quant.lower(), "--hardware", "epyc-9655-2s", "--ctx", str(ctx))
    row = pl["plan"]["rows"][0]["option"]
    assert row["numa"]["policy"] == policy and row["numa"]["threads"] == settings.threads
    # the same tg everywhere
    tg = pred["prediction"]["tg_tokens_per_s"]
    assert opt["prediction"]["tg_tokens_per_s"] == pytest.approx(tg, rel=1e-9)
    assert row["prediction"]["tg_tokens_per_s"] == pytest.approx(tg, rel=1e-9)


def test_serve_placement_and_tune_ask_the_same_rule(sysfs_tree):
    """A recorded dual-socket box (hwloc's 2x EPYC 9654 is XML; this is a 2-node sysfs tree): the
    placement's auto and tune's node:N candidate follow numa_policy.fits_one_node."""
    from cputune.machine.topology import discover_topology

    t = discover_topology(root=sysfs_tree("8em64t-2s2ca2c-buggynuma"))
    nodes = [n for n in t.nodes if n.cpus]
    if len(nodes) < 2:
        t = discover_topology(root=sysfs_tree("16amd64-8n2c"))
        nodes = [n for n in t.nodes if n.cpus]
    node_bytes = {n.id: 10 * GIB for n in nodes}
    for need, fits in ((5 * GIB, True), (15 * GIB, False)):
        p = plan_placement(t, "auto", numactl_available=True, need_bytes=need, node_available_bytes=node_bytes)
        assert (p.mode == "node") is fits
        d = numa_policy.decide(nodes=len(nodes), cores_per_node=4, need_bytes=need, node_bytes=10 * GIB)
        assert d.placement_mode == ("node" if fits else "interleave") == (p.mode if not fits else "node")
        assert numa_policy.fits_one_node(need, 10 * GIB) is fits
    # tune offers node:N exactly when the rule says the model fits one node.
    big = max(nodes, key=lambda n: n.mem_total_bytes or 0)
    if big.mem_total_bytes:
        modes, _ = tune.numa_modes(t, big.mem_total_bytes // 2, numactl=True)
        assert f"node:{big.id}" in modes
        modes, _ = tune.numa_modes(t, big.mem_total_bytes + 1, numactl=True)
        assert f"node:{big.id}" not in modes


def test_select_settles_the_policy_per_quant():
    box = resolve_box("epyc-9655-2s")
    s = selector.fit_settings(box.machine, 8192)
    assert s.numa == "auto" and s.threads is None  # decided per model on a two-node box
    small, d = selector.settle(catalog_profile("r1-distill-qwen-7b", "Q8_0"), s, box.machine)
    assert (small.numa, small.threads, d.nodes) == ("one-node", 96, 1)
    big, d = selector.settle(catalog_profile("deepseek-r1", "Q8_0"), s, box.machine)
    assert (big.numa, big.threads, d.nodes) == ("interleave", 192, 2)
