"""The box a prediction is for, and the settings it assumes: this box's probe profile with its
own calibration, or a described box (configs/hardware) with the published constants; the one
NUMA rule and the page size applied to them. Above hardware.py (the TOML schema) and
profile_machine.py (the probe profile's view), beside the selector whose memory arithmetic it
uses, so the three no longer import each other in a circle."""

from __future__ import annotations

from pathlib import Path

from cputune.core import numa_policy
from cputune.machine import probe
from cputune.predict import calibrate
from cputune.core.errors import ConfigError
from cputune.predict.hardware import Box, hardware_dir, list_hardware, load_hardware, machine_from_hardware
from cputune.core.numa_policy import NumaDecision
from cputune.predict.predictor import MachineBandwidth, Settings, cache_type_name, check_context, for_box, for_new_box
from cputune.predict.profile_machine import machine_from_profile
from cputune.predict.selector import ram_needed


def numa_decision(m: MachineBandwidth, need_bytes: int | None, numa: str = "auto",
                  threads: int | None = None, numactl: bool = True) -> NumaDecision:
    """The one NUMA rule (numa_policy.decide) on a predictor machine: a node offers its share of
    the box's memory."""
    return numa_policy.decide(nodes=m.nodes, cores_per_node=m.cores_per_node, need_bytes=need_bytes,
                              node_bytes=numa_policy.node_bytes_of_box(m.mem_bytes, m.nodes),
                              numactl=numactl, requested=numa, threads=threads,
                              threads_per_core=m.threads_per_core)


def plan_settings(m: MachineBandwidth, model, numa: str = "auto", threads: int | None = None,
                  depth: int = 0, cache_type: str = "f16", ctx_tokens: int = 4096, *,
                  numactl: bool = True, engine: str = "llama.cpp",
                  page_size: str = "2M") -> tuple[Settings, NumaDecision]:
    """The settings a prediction assumes when the user gives only some of them, and the NUMA
    decision behind them; the model is sized as serve will load it (mmap, repack copy, KV cache
    at ctx_tokens)."""
    cache_type = cache_type_name(cache_type)
    check_context(model, depth, f"a depth of {depth} tokens")
    need = ram_needed(model, max(ctx_tokens, depth), cache_type, isa=m.isa).total_bytes
    d = numa_decision(m, need, numa, threads, numactl)
    return Settings(threads=d.threads, numa=d.policy, depth=depth, cache_type=cache_type,
                    engine=engine, page_size=page_size), d


def page_size_of(box: Box) -> str:
    """The page size predictions assume: huge pages for a described box (what the published runs
    used), this box's own THP setting otherwise ("always" backs the weights with 2 MiB pages once
    llama.cpp copies or repacks them; madvise/never leave 4 KiB ones)."""
    if box.hardware is not None:
        return "2M"
    try:
        thp = probe.load_profile().inventory.memory.thp_enabled
    except Exception:  # an unreadable profile was reported when the box was resolved
        thp = None
    return "2M" if thp == "always" else "4K"


def default_settings(m: MachineBandwidth, model, numa: str = "auto", threads: int | None = None,
                     depth: int = 0, cache_type: str = "f16", ctx_tokens: int = 4096) -> Settings:
    """plan_settings' Settings alone."""
    return plan_settings(m, model, numa, threads, depth, cache_type, ctx_tokens)[0]


def resolve_box(spec: str | Path | None) -> Box:
    """--hardware: a shipped name or TOML path; none means this box's saved probe profile.

    A hardware profile gets the constants fitted to published big-server runs; this box gets
    its own `cputune calibrate` fit when there is one, else the shipped starting values.
    """
    if spec is not None:
        hw = load_hardware(spec)
        cal = calibrate.default_calibration("published")
        # A box whose runs the fit never saw gets the range of one (leave-one-box-out): wider.
        fitted = hw.id in cal.fitted_boxes and Path(hw.path).parent == hardware_dir()
        # A fitted box also gets what its own runs said of its bandwidth share and fixed cost.
        return Box(machine_from_hardware(hw), for_box(cal, hw.id) if fitted else for_new_box(cal),
                   f"hardware profile {hw.path}", hw)
    path = probe.profile_path()
    if not path.exists():
        raise ConfigError("no machine profile: this box has not been probed",
                          hint="run `cputune probe` first, or pass --hardware NAME "
                          f"(one of {', '.join(list_hardware())})")
    profile = probe.load_profile(path)
    if profile.bandwidth is None:
        raise ConfigError(f"{path} has no bandwidth measurement",
                          hint="run `cputune probe` without --no-bandwidth")
    try:
        machine = machine_from_profile(profile)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.message}", hint=probe.REPROBE) from None
    cal = calibrate.load_calibration()
    return Box(machine, cal or calibrate.default_calibration(),
               f"probe profile {path}" + ("" if cal else " (not calibrated: run `cputune calibrate`)"))
