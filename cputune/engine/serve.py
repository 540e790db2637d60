"""`cputune serve` and `cputune worker` as library calls: resolve the model, check memory, plan the
placement, write the argv with only the flags this build takes, start, verify, and wait.

Orchestration: placement.py decides, selector.py counts bytes, launch.py runs processes, rpc.py
speaks to workers; the checks after start (thread affinity) read /proc through a SysRoot.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from cputune.core import launch
from cputune.engine import engine_args, rpc, tune
from cputune.machine import pagecache
from cputune.engine.build import DEFAULT_ENGINE, Build, Engine, find_build, load_engine, require_build
from cputune.engine.engine_args import Choice
from cputune.core.errors import ConfigError, EngineError, InsufficientMemory, NetworkError, Terminated, process_failed
from cputune.model.gguf_model import shard_paths
from cputune.machine.memory import MemoryInfo, discover_memory
from cputune.model.modelfiles import ModelFile
from cputune.machine.pagecache import CacheVerdict
from cputune.model.resolve import check_model_arg, looks_like_path, resolve
from cputune.engine.placement import Placement, plan_placement
from cputune.engine.rpc import Endpoint, LayerSplit, WorkerMemory
from cputune.predict.selector import OS_HEADROOM_BYTES, RamNeed, ram_needed
from cputune.core.sysfs import SysRoot, format_cpulist, parse_cpulist
from cputune.machine.topology import Topology, discover_topology, parse_meminfo

GIB = 1 << 30
DEFAULT_CTX = 8192
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080  # llama-server's own default (tools/server/README.md)
LOAD_MODES = ("mmap", "none", "mlock")
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")  # CMake target; the binary's older name
# Inherited variables that change what llama.cpp or its OpenMP runtime does.
ENV_PREFIXES = ("LLAMA_ARG_", "OMP_", "GOMP_", "KMP_")
PINNING_ENV = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")
# Options serve writes itself; the same option after `--` would contradict the checked plan.
OWN_OPTIONS = {
    "-m": "--model", "--model": "--model", "--host": "--host", "--port": "--port",
    "-c": "--ctx", "--ctx-size": "--ctx", "-t": "--threads", "--threads": "--threads",
    "-tb": "--threads-batch", "--threads-batch": "--threads-batch", "--numa": "--numa",
    "-lm": "--load-mode", "--load-mode": "--load-mode", "--no-mmap": "--load-mode",
    "--mlock": "--load-mode", "--mmap": "--load-mode", "--rpc": "--rpc",
    "--api-key-file": "--api-key-file",
}


@dataclass(frozen=True, slots=True)
class ServeRequest:
    """What the user asked `cputune serve` for. threads None means auto."""

    quant: str | None
    model: str | None = None
    models_dir: Path | None = None
    ctx_tokens: int = DEFAULT_CTX
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    numa: str = "auto"
    threads: int | None = None
    threads_batch: int | None = None
    api_key_file: Path | None = None
    load_mode: str = "mmap"
    cache_type: str = "f16"
    rpc: tuple[Endpoint, ...] = ()
    extra_args: tuple[str, ...] = ()
    drop_caches: bool = False
    tuned: bool = True  # start with `cputune tune`'s saved settings for this file, when there are some
    engine: str | None = None  # None: the engine tune found fastest for this file, else llama.cpp
    tuned_args: tuple[str, ...] = ()  # filled by apply_tuned
    chosen_args: tuple[str, ...] = ()  # the engine's own settings (engine_args.choose), filled by plan_serve


@dataclass(frozen=True, slots=True)
class BoxMemory:
    """One machine's part of the model: the bytes it must hold and the bytes it has."""

    name: str
    units: int | None  # layers (and the output layer) it holds when split over RPC workers
    need_bytes: int
    available_bytes: int | None
    source: str
    fits: bool


@dataclass(frozen=True, slots=True)
class MemoryCheck:
    need: RamNeed
    boxes: tuple[BoxMemory, ...]
    fits: bool


@dataclass(frozen=True, slots=True)
class ServePlan:
    engine: str
    binary: Path
    model_path: Path
    model_label: str
    quant: str
    shards: tuple[Path, ...]
    argv: tuple[str, ...]
    environment: dict[str, str]
    placement: Placement
    memory: MemoryCheck
    workers: tuple[WorkerMemory, ...]
    split: LayerSplit | None
    page_cache: CacheVerdict | None
    host: str
    port: int
    url: str
    warnings: tuple[str, ...]
    notes: tuple[str, ...]
    choices: tuple[Choice, ...] = ()  # the engine's own settings in argv, each with why

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True, slots=True)
class WorkerRequest:
    host: str = DEFAULT_HOST
    port: int = rpc.DEFAULT_PORT
    numa: str = "auto"
    threads: int | None = None
    extra_args: tuple[str, ...] = ()
    engine: str = DEFAULT_ENGINE


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    binary: Path
    argv: tuple[str, ...]
    environment: dict[str, str]
    placement: Placement
    endpoint: Endpoint
    warnings: tuple[str, ...]

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True, slots=True)
class ThreadAffinity:
    tid: int
    name: str
    cpus: tuple[int, ...]


# ---- model ---------------------------------------------------------------------------------

def resolve_model(req: ServeRequest) -> ModelFile:
    """--model FILE as given (checked against --quant), else the --quant file in the models
    folder (of --model NAME): the one resolver, files only."""
    check_model_arg(req.model)
    if not req.quant and not (req.model and looks_like_path(req.model)):
        raise ConfigError("which quant? --quant is required unless --model names a file",
                          hint="for example --quant q4_k_m")
    return resolve(req.model, req.quant, req.models_dir, catalog=False).one_file(req.quant)


# ---- tuned settings --------------------------------------------------------------------------

# The user's own `--` arguments win over the tuned value of the same setting.
TUNED_FLAGS = {"n_ubatch": ("-ub", "--ubatch-size"), "n_batch": ("-b", "--batch-size"),
               "cache_type": ("-ctk", "--cache-type-k", "-ctv", "--cache-type-v")}
# Settings each engine spells its own way (configs/engines.toml [args.server]): -fa on, --no-repack
# or -rtr, -no-fmoe, -mla 3.
SPELLED_SETTINGS = ("flash_attn", "repack", "fused_moe", "mla")
PROGRAM = "llama-server"


def given_options(req: ServeRequest) -> set[str]:
    return {a.split("=", 1)[0] for a in req.extra_args}


def apply_tuned(req: ServeRequest, settings: dict, flags: frozenset[str],
                engine: Engine | None = None) -> tuple[ServeRequest, list[str]]:
    """The request with tune's settings where the user left the choice to cputune, and notes on
    what was left out (an option the user set, a flag this build lacks)."""
    engine = engine or load_engine()
    given = given_options(req)
    skipped = []
    args: list[str] = []

    def want(key: str) -> bool:
        names = TUNED_FLAGS[key]
        if given & set(names):
            skipped.append(f"{key} (set after `--`)")
            return False
        if not flags & set(names):
            skipped.append(f"{key} (this llama-server has no {names[0]})")
            return False
        return True

    if want("n_batch"):
        args += ["-b", str(settings["n_batch"])]
    if want("n_ubatch"):
        args += ["-ub", str(settings["n_ubatch"])]
    for key in SPELLED_SETTINGS:
        if settings.get(key) is None:
            continue
        if given & engine_args.owned_names(engine, key):
            skipped.append(f"{key} (set after `--`)")
            continue
        spelled, missing = engine_args.spell(engine, PROGRAM, {key: settings[key]}, flags)
        skipped += missing
        args += spelled
    cache_type = req.cache_type
    if settings["cache_type"] != "f16" and want("cache_type"):
        cache_type = settings["cache_type"]
        args += ["-ctk", cache_type, "-ctv", cache_type]
    new = replace(req, threads=req.threads or settings["threads"],
                  threads_batch=req.threads_batch or settings["threads_batch"],
                  numa=settings["numa"] if req.numa == "auto" else req.numa,
                  cache_type=cache_type, tuned_args=tuple(args))
    return new, skipped


# ---- memory --------------------------------------------------------------------------------

def node_available_bytes(root: Path | str = Path("/")) -> dict[int, int]:
    """Per node: MemFree + file pages (Active(file) + Inactive(file)) + reclaimable slab.

    The kernel's MemAvailable (si_mem_available) is the same sum less low watermarks, and exists
    for the whole machine only; nodeN/meminfo has the terms (drivers/base/node.c).
    """
    sr = SysRoot(Path(root))
    out = {}
    for d in sr.listdir("sys/devices/system/node"):
        if not (d.startswith("node") and d[4:].isdigit()):
            continue
        m = parse_meminfo(sr.text(f"sys/devices/system/node/{d}/meminfo") or "")
        if "MemFree" in m:
            out[int(d[4:])] = (m["MemFree"] + m.get("Active(file)", 0) + m.get("Inactive(file)", 0)
                               + m.get("KReclaimable", m.get("SReclaimable", 0)))
    return out


def box_available_bytes(memory: MemoryInfo, topology: Topology) -> int | None:
    """MemAvailable, lowered to the cgroup's memory limit when one is set."""
    vals = [v for v in (memory.mem_available_bytes, topology.cgroup_memory_limit_bytes) if v]
    return min(vals) if vals else None


def share_needs(need: RamNeed, split: LayerSplit) -> list[int]:
    """Bytes each box holds when the layers are split: weights, repack copy and KV cache in
    proportion to its units (every layer weighs the same), plus its own compute buffer and OS
    headroom. The repack copy is local only: tensors sent to a worker are not repacked there."""
    out = []
    for i, units in enumerate((split.local_units, *split.worker_units)):
        frac = units / split.n_units
        repack = need.repack_copy_bytes * frac if i == 0 else 0
        out.append(round((need.weights_bytes + need.kv_bytes) * frac + repack)
                   + need.compute_bytes + need.headroom_bytes)
    return out


def local_available(placement: Placement, topology: Topology, node_avail: Mapping[int, int],
                    box_avail: int | None) -> tuple[int | None, str]:
    """What the planned server can use: a bound node's available memory, else the machine's."""
    if placement.mode == "node" and len(topology.nodes) > 1:
        nid = placement.mem_node_ids[0]
        if nid in node_avail:
            v = node_avail[nid] if box_avail is None else min(node_avail[nid], box_avail)
            return v, f"node {nid}: free + reclaimable page cache"
    return box_avail, "MemAvailable" + (" (cgroup limit)" if topology.cgroup_memory_limit_bytes
                                        and box_avail == topology.cgroup_memory_limit_bytes else "")


def check_memory(need: RamNeed, boxes: Sequence[BoxMemory]) -> MemoryCheck:
    return MemoryCheck(need, tuple(boxes), all(b.fits for b in boxes))


def _box(name: str, units: int | None, need_bytes: int, avail: int | None, source: str) -> BoxMemory:
    return BoxMemory(name, units, need_bytes, avail, source, avail is None or need_bytes <= avail)


def require_fit(plan: ServePlan, force: bool = False) -> None:
    """InsufficientMemory with the numbers, unless it fits or `force`."""
    if plan.memory.fits or force:
        return
    n = plan.memory.need
    parts = (f"weights {n.weights_bytes / GIB:.1f}"
             + (f" + repack copy {n.repack_copy_bytes / GIB:.1f}" if n.repack_copy_bytes else "")
             + f" + KV cache {n.kv_bytes / GIB:.1f} + compute {n.compute_bytes / GIB:.1f}"
             + f" + headroom {n.headroom_bytes / GIB:.1f}")
    short = [b for b in plan.memory.boxes if not b.fits]
    where = "; ".join(f"{b.name} needs {b.need_bytes / GIB:.1f} GiB but has "
                      f"{b.available_bytes / GIB:.1f} GiB available ({b.source})" for b in short)
    hints = [f"a smaller --ctx than {n.ctx_tokens} or a smaller quant"]
    if plan.placement.mode == "node":
        hints.append("--numa interleave to use every node's memory")
    if not plan.workers:
        hints.append("--rpc workers to spread it over more machines")
    hints.append("--force to start anyway")
    raise InsufficientMemory(
        f"{plan.model_label} with a {n.ctx_tokens}-token context does not fit: {where} "
        f"(GiB: {parts})", hint="; ".join(hints))


def memory_notes(memory: MemoryInfo, load_mode: str, weights_bytes: int,
                 huge_pages: bool = False) -> tuple[list[str], list[str]]:
    """(warnings, notes) about hugepages, THP and mlock for this load mode; `huge_pages`: the
    engine reads the weights into the reserved pages (ik_llama.cpp's -thp)."""
    warnings, notes = [], []
    reserved = sum(p.page_bytes * (p.total_pages or 0) for p in memory.hugepages if p.node_id is None)
    if reserved and not huge_pages:
        notes.append(f"{reserved / GIB:.1f} GiB is reserved as hugetlb pages, which llama.cpp cannot "
                     "put weights in (no hugetlbfs option in mainline: PRs #12552, #21821) and which "
                     "MemAvailable leaves out; release it if nothing else uses it "
                     "(echo 0 | sudo tee /proc/sys/vm/nr_hugepages)")
    if load_mode == "none":
        if memory.thp_enabled == "always":
            notes.append("weights load into anonymous buffers, which THP 'always' backs with 2 MiB pages")
        elif memory.thp_enabled:
            notes.append(f"THP is '{memory.thp_enabled}' and llama.cpp does not madvise its buffers "
                         "(PR #22022 is open), so the weights use 4 KiB pages; THP 'always' gives "
                         "them 2 MiB pages")
    if load_mode == "mlock" and os.geteuid() != 0:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft != resource.RLIM_INFINITY and soft < weights_bytes:
            warnings.append(f"--load-mode mlock: the locked-memory limit is {soft / GIB:.1f} GiB, "
                            f"less than the {weights_bytes / GIB:.1f} GiB of weights, so llama.cpp "
                            "cannot lock them (ulimit -l unlimited, or LimitMEMLOCK=infinity in a "
                            "systemd unit)")
    return warnings, notes


# ---- argv ----------------------------------------------------------------------------------

def load_mode_args(mode: str, flags: frozenset[str]) -> list[str]:
    """-lm MODE since PR #20834 (mlock there implies mmap); --no-mmap / --mlock before it."""
    if mode not in LOAD_MODES:
        raise ConfigError(f"unknown --load-mode {mode!r}", hint="choose one of: " + ", ".join(LOAD_MODES))
    if "--load-mode" in flags or "-lm" in flags:
        return ["-lm", mode]
    return {"mmap": [], "none": ["--no-mmap"], "mlock": ["--mlock"]}[mode]


def check_extra_args(extra: Sequence[str]) -> None:
    for a in extra:
        name = a.split("=", 1)[0]
        if name in OWN_OPTIONS:
            raise ConfigError(f"{name} after `--` would override the checked plan",
                              hint=f"use cputune serve's {OWN_OPTIONS[name]} instead")


def server_argv(binary: Path, flags: frozenset[str], model_path: Path, placement: Placement,
                req: ServeRequest, split: LayerSplit | None = None,
                own_log: Path | None = None) -> tuple[list[str], list[str]]:
    """The llama-server command line (numactl prefix included) and warnings for flags this build
    lacks. Only options the build's --help lists are written, except the ones every build has.
    `own_log`: where an engine that writes its own log file is told to (launch.engine_log_base)."""
    warnings = []
    argv = [*placement.numactl_argv, str(binary), "-m", str(model_path), "--host", req.host,
            "--port", str(req.port), "-c", str(req.ctx_tokens), "-t", str(placement.threads)]
    if "-tb" in flags or "--threads-batch" in flags:
        argv += ["-tb", str(placement.threads_batch)]
    elif placement.threads_batch != placement.threads:
        warnings.append("this llama-server has no --threads-batch: prompt processing uses --threads")
    if placement.llama_numa:
        if "--numa" in flags:
            argv += ["--numa", placement.llama_numa]
        else:
            warnings.append(f"this llama-server has no --numa: threads are not spread "
                            f"({placement.llama_numa} left out)")
    argv += load_mode_args(req.load_mode, flags)
    if "--metrics" in flags:
        argv.append("--metrics")
    if req.api_key_file is not None:
        if "--api-key-file" not in flags:
            raise EngineError("this llama-server has no --api-key-file, so it cannot be protected "
                              "by a key", hint="run `cputune build --force` to build a current llama.cpp")
        argv += ["--api-key-file", str(req.api_key_file)]
    if req.rpc:
        if "--rpc" not in flags:
            raise EngineError("this llama-server was built without the RPC backend",
                              hint="run `cputune build --force` (the build turns GGML_RPC on)")
        argv += ["--rpc", ",".join(str(e) for e in req.rpc)]
        if split is not None:
            argv += split.llama_args()
    if own_log is not None and "--log-file" in flags and "--log-file" not in req.extra_args:
        argv += ["--log-file", str(own_log)]
    argv += list(req.chosen_args) + list(req.tuned_args) + list(req.extra_args)
    return argv, warnings


def relevant_env(environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The inherited variables that steer llama.cpp or OpenMP, and warnings for those that pin threads."""
    env = {k: v for k, v in sorted(environ.items()) if k.startswith(ENV_PREFIXES)}
    warnings = [f"{k}={env[k]} pins OpenMP threads itself and can undo the placement plan"
                for k in PINNING_ENV if k in env]
    return env, warnings


def find_binary(build: Build, names: Sequence[str]) -> Path:
    for name in names:
        if build.binary(name).exists():
            return build.binary(name)
    raise EngineError(f"the llama.cpp build in {build.bin_dir} has no {names[0]}",
                      hint="run `cputune build --force` to rebuild it")


# ---- plan ----------------------------------------------------------------------------------

def check_rpc(engine: Engine, what: str) -> None:
    """A clear refusal when the engine's build has no RPC backend (configs/engines.toml rpc_server)."""
    if not engine.rpc_server:
        raise EngineError(f"{what}: {engine.title} has no RPC backend here (cputune builds it without "
                          "GGML_RPC, so there is no rpc-server and its llama-server cannot reach workers)",
                          hint="run the workers and the server with --engine llama.cpp")


def tuned_build(tuned: tune.TuneResult, fallback: Build) -> tuple[Build, str | None]:
    """The build of the engine `cputune tune` found fastest for this file, when it is built."""
    name = tune.tuned_engine(tuned)
    if name == fallback.engine:
        return fallback, None
    b = find_build(engine=name)
    if b is None:
        return fallback, (f"`cputune tune` found {load_engine(name).title} fastest for this file, but it "
                          f"is not built: serving with {load_engine(fallback.engine).title} "
                          f"(`cputune build --engine {name}`)")
    return b, f"{load_engine(name).title}: `cputune tune` found it fastest for this file (--engine chooses another)"


def engine_choices(req: ServeRequest, engine: Engine, model, memory: MemoryInfo, flags: frozenset[str],
                   tuned: Mapping[str, object]) -> tuple[ServeRequest, tuple[Choice, ...], list[str]]:
    """The engine's own settings for this model and box (engine_args.choose), less what the user
    gave after `--` or tune measured, in this llama-server's spelling; warnings for what it lacks."""
    given = given_options(req)
    kept, args, warnings = [], [], []
    for c in engine_args.choose(engine, model, memory, req.load_mode, PROGRAM):
        if given & engine_args.owned_names(engine, c.setting) or tuned.get(c.setting) is not None:
            continue
        if c.args and c.args[0] not in flags:
            warnings.append(f"this llama-server has no {c.args[0]}: {c.setting} {c.value} left out ({c.reason})")
            continue
        kept.append(c)
        args += c.args
    return replace(req, chosen_args=tuple(args)), tuple(kept), warnings


def _numactl_available(numactl: bool | None) -> bool:
    return shutil.which("numactl") is not None if numactl is None else numactl


def plan_serve(req: ServeRequest, root: Path | str = Path("/"), build: Build | None = None,
               numactl: bool | None = None,
               query_worker: Callable[[Endpoint], WorkerMemory] = rpc.query_memory) -> ServePlan:
    """Everything `serve` decides before it starts anything (what --dry-run shows)."""
    if req.ctx_tokens < 1:
        raise ConfigError(f"--ctx {req.ctx_tokens}: must be at least 1")
    rpc.check_host(req.host)
    check_extra_args(req.extra_args)
    if req.engine is not None and req.rpc:
        check_rpc(load_engine(req.engine), "serve --rpc")
    b = build or require_build(engine=req.engine or DEFAULT_ENGINE)
    mf = resolve_model(req)
    tuned_notes, tuned_warnings = [], []
    tuned = tune.tuned_for(mf.path) if req.tuned else None
    if build is None and req.engine is None and tuned is not None and not req.rpc:  # RPC: llama.cpp's
        b, note = tuned_build(tuned, b)
        tuned_notes += [note] if note else []
    eng = load_engine(b.engine)
    if req.rpc:
        check_rpc(eng, "serve --rpc")
    engine_args.check_model(eng, mf.profile)
    binary = find_binary(b, ["llama-server"])
    flags = launch.help_flags(binary)
    settings = tune.serve_settings(tuned, eng.name) if tuned is not None else None
    if settings is not None:
        req, skipped = apply_tuned(req, settings, flags, eng)
        gains = ", ".join(f"{r.kind} {r.gain:.2f}x" + (f" ({r.vs_baseline:.2f}x llama.cpp's)"
                                                        if r.vs_baseline and r.engine != DEFAULT_ENGINE else "")
                          for r in tuned.results if r.engine == eng.name)
        tuned_notes.append(f"{eng.title} settings from `cputune tune` ({tuned.created_at}: {gains} its defaults)"
                           + (f"; kept yours for {', '.join(skipped)}" if skipped else "")
                           + "; --no-tuned starts without them")
        commit = b.source_commit or b.source_label
        measured = tune.build_commit_of(tuned, eng.name)
        if measured and commit and measured != commit:
            tuned_warnings.append(f"the tuned settings were measured with {eng.title} {measured}, "
                                  f"this build is {commit}: run `cputune tune` again")
    elif tuned is not None:
        tuned_notes.append(f"`cputune tune` measured other engines on this file, not {eng.title}: "
                           "its defaults are used")
    shards = tuple(shard_paths(mf.path))
    topo = discover_topology(root)
    mem = discover_memory(root, dmidecode_text="", udev_text="")  # no dmidecode: DIMMs are not needed
    node_avail = node_available_bytes(root)
    box_avail = box_available_bytes(mem, topo)
    req, choices, choice_warnings = engine_choices(req, eng, mf.profile, mem, flags, settings or {})
    effective = {**engine_args.chosen(choices), **{k: (settings or {}).get(k) for k in SPELLED_SETTINGS
                                                    if (settings or {}).get(k) is not None}}
    need = ram_needed(mf.profile, req.ctx_tokens, req.cache_type,
                      mmap=req.load_mode != "none" and not engine_args.loads_into_ram(eng, effective),
                      isa=topo.isa_flags,
                      # Only an engine that repacks by ISA on its own keeps the file's copy beside it.
                      repack=not eng.repack_types and effective.get("repack") not in (False, "off"))
    warnings: list[str] = list(choice_warnings)

    workers = tuple(query_worker(e) for e in req.rpc)
    split = None
    needs = [need.total_bytes]
    if workers:
        # A CPU worker reports its total RAM (rpc.WorkerMemory): keep the OS headroom free there.
        caps = [box_avail or 0] + [max(0, w.free_bytes - OS_HEADROOM_BYTES) for w in workers]
        split = rpc.split_layers(mf.profile.n_layer, caps)
        needs = share_needs(need, split)
        idle = [str(w.endpoint) for w, u in zip(workers, split.worker_units) if u == 0]
        if idle:
            warnings.append(f"worker{'s' if len(idle) > 1 else ''} {', '.join(idle)} get no layers: "
                            f"the model has only {mf.profile.n_layer} layers to share")

    placement = plan_placement(
        topo, req.numa, threads=req.threads, threads_batch=req.threads_batch,
        numactl_available=_numactl_available(numactl), numa_balancing=mem.numa_balancing,
        need_bytes=needs[0], node_available_bytes=node_avail)
    avail, source = local_available(placement, topo, node_avail, box_avail)
    where = {"node": f"this box (node {placement.mem_node_ids[0]})"}.get(placement.mode, "this box")
    boxes = [_box(where, split.local_units if split else None, needs[0], avail, source)]
    for w, u, n in zip(workers, split.worker_units if split else (), needs[1:]):
        boxes.append(_box(str(w.endpoint), u, n, w.free_bytes, "the worker's RAM, as it reports it over RPC"))
    memory = check_memory(need, boxes)
    if avail is None:
        warnings.append("available memory is unknown here, so the memory check was skipped")

    verdict = None
    multi = len({n.id for n in topo.nodes if n.cpus}) > 1
    if multi and placement.mode != "off" and SysRoot(Path(root)).is_live():
        samples = [s for s in (pagecache.sample_file(p) for p in shards) if s is not None]
        if samples:
            verdict = pagecache.judge(samples, placement.mem_node_ids,
                                      spread=placement.mode in ("interleave", "distribute"))
            if verdict.warning and not req.drop_caches:
                warnings.append(verdict.warning + "; --drop-caches evicts the model's pages before "
                                "the start (posix_fadvise, no root needed)")

    own_log = launch.engine_log_base(f"{eng.name}-server") if eng.name == "ik_llama" else None
    argv, flag_warnings = server_argv(binary, flags, mf.path, placement, req, split, own_log)
    env, env_warnings = relevant_env(os.environ)
    mem_warnings, mem_notes = memory_notes(mem, req.load_mode, need.weights_bytes,
                                           huge_pages="huge_pages" in effective)
    if mf.profile.n_ctx_train and req.ctx_tokens > mf.profile.n_ctx_train:
        warnings.append(f"--ctx {req.ctx_tokens} is beyond the {mf.profile.n_ctx_train} tokens the "
                        "model was trained on")
    if req.host not in ("127.0.0.1", "localhost", "::1") and req.api_key_file is None:
        warnings.append(f"listening on {req.host} without --api-key-file: anyone who can reach "
                        "the port can use the server")
    warnings = list(placement.warnings) + warnings + flag_warnings + env_warnings + mem_warnings + tuned_warnings
    notes = tuned_notes + list(placement.notes) + mem_notes
    host = "127.0.0.1" if req.host in ("0.0.0.0", "") else req.host
    return ServePlan(
        engine=eng.name, binary=binary, model_path=mf.path, model_label=mf.label, quant=mf.quant,
        shards=shards, argv=tuple(argv), environment=env, placement=placement, memory=memory,
        workers=workers, split=split, page_cache=verdict, host=req.host, port=req.port,
        url=f"http://{host}:{req.port}", warnings=tuple(warnings), notes=tuple(notes), choices=choices)


def plan_worker(req: WorkerRequest, root: Path | str = Path("/"), build: Build | None = None,
                numactl: bool | None = None) -> WorkerPlan:
    rpc.check_host(req.host)
    check_rpc(load_engine(build.engine if build else req.engine), "worker")
    b = build or require_build(engine=req.engine)
    binary = find_binary(b, RPC_SERVER_NAMES)
    topo = discover_topology(root)
    mem = discover_memory(root, dmidecode_text="", udev_text="")
    placement = plan_placement(topo, req.numa, threads=req.threads,
                               numactl_available=_numactl_available(numactl),
                               numa_balancing=mem.numa_balancing, worker=True)
    for a in req.extra_args:
        if a.split("=", 1)[0] in ("-H", "--host", "-p", "--port", "-t", "--threads"):
            raise ConfigError(f"{a} after `--` would override the plan",
                              hint="use cputune worker's --host, --port and --threads")
    argv = [*placement.numactl_argv, str(binary), "-H", req.host, "-p", str(req.port),
            "-t", str(placement.threads), *req.extra_args]
    env, env_warnings = relevant_env(os.environ)
    warnings = list(placement.warnings) + env_warnings
    if req.host not in ("127.0.0.1", "localhost", "::1"):
        warnings.append(f"the RPC protocol has no authentication: keep {req.host}:{req.port} on a "
                        "network you trust (tools/rpc/README.md)")
    return WorkerPlan(binary, tuple(argv), env, placement, Endpoint(req.host, req.port), tuple(warnings))


# ---- run -----------------------------------------------------------------------------------

def start(plan: ServePlan, drop_caches: bool = False, timeout_s: float | None = None,
          progress: Callable[[float, str], None] | None = None,
          signals: "SignalForwarder | None" = None) -> launch.Server:
    """Start llama-server and wait until /health answers 200; stop it again on any failure,
    a signal included. Once ready, `signals` forwards SIGINT/SIGTERM to it."""
    if drop_caches:
        pagecache.evict(plan.shards)
    server = launch.start_server(plan.argv, plan.host, plan.port, die_with_parent=True)
    try:
        server.wait_ready(timeout_s=timeout_s, progress=progress)
        if signals is not None:
            signals.server = server
    except BaseException:
        server.stop()
        raise
    return server


def start_worker(plan: WorkerPlan, timeout_s: float | None = 60.0,
                 progress: Callable[[float, str], None] | None = None,
                 signals: "SignalForwarder | None" = None) -> tuple[launch.Server, WorkerMemory]:
    """Start ggml-rpc-server; ready once it answers an RPC HELLO and reports its memory."""
    seen: list[WorkerMemory] = []

    def probe() -> str | None:
        try:
            seen.append(rpc.query_memory(plan.endpoint, timeout_s=2.0))
        except NetworkError:
            return "starting"
        return None

    server = launch.start_server(plan.argv, plan.endpoint.host, plan.endpoint.port, die_with_parent=True)
    try:
        server.wait_ready(timeout_s=timeout_s, progress=progress, probe=probe)
        if signals is not None:
            signals.server = server
    except BaseException:
        server.stop()
        raise
    return server, seen[-1]


def parse_task_status(text: str) -> tuple[str, tuple[int, ...]]:
    """Name and Cpus_allowed_list of /proc/PID/task/TID/status (proc(5))."""
    name, cpus = "", ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Name":
            name = value.strip()
        elif key == "Cpus_allowed_list":
            cpus = parse_cpulist(value)
    return name, cpus


def thread_affinities(pid: int, root: Path | str = Path("/")) -> list[ThreadAffinity]:
    sr = SysRoot(Path(root))
    out = []
    for path in sr.glob(f"proc/{pid}/task/*/status"):
        text = sr.text(path)
        if text:  # a thread may exit while we read
            name, cpus = parse_task_status(text)
            out.append(ThreadAffinity(int(path.split("/")[-2]), name, cpus))
    return out


def affinity_mismatches(expected_cpus: Sequence[int],
                        threads: Sequence[ThreadAffinity]) -> list[ThreadAffinity]:
    """Threads allowed on a CPU outside the plan's set."""
    allowed = set(expected_cpus)
    return [t for t in threads if not set(t.cpus) <= allowed]


def affinity_warning(placement: Placement, threads: Sequence[ThreadAffinity]) -> str | None:
    bad = affinity_mismatches(placement.cpus, threads)
    if not bad:
        return None
    shown = ", ".join(f"{t.tid} ({t.name}) on {format_cpulist(t.cpus)}" for t in bad[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    return (f"{len(bad)} of {len(threads)} server threads may run outside the planned CPUs "
            f"{placement.cpu_list}: {shown}{more} (the plan was {placement.requested})")


def check_affinity(server: launch.Server, placement: Placement,
                   root: Path | str = Path("/")) -> str | None:
    """Compare every thread's Cpus_allowed_list with the plan: llama.cpp's affinity handling has
    regressed before (llama_cpp_cpu.md A3: #26997, #28650), so the flag alone is not trusted."""
    return affinity_warning(placement, thread_affinities(server.pid, root))


class SignalForwarder:
    """SIGINT/SIGTERM from before a server starts until it exits. While it loads, a signal
    unwinds cputune (KeyboardInterrupt, or Terminated for SIGTERM; start() stops the server);
    once `server` is set, it is forwarded to the server's process group, and a second one kills it."""

    HANDLED = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.server: launch.Server | None = None
        self.received: list[int] = []
        self._previous: dict = {}

    def __enter__(self) -> "SignalForwarder":
        self._previous = {s: signal.signal(s, self._handle) for s in self.HANDLED}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame) -> None:
        self.received.append(signum)
        if self.server is None:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)
        try:
            os.killpg(self.server.pid, signum if len(self.received) == 1 else signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        """Once the server has exited after a forwarded signal: 128 + that signal (130 for
        SIGINT, 143 for SIGTERM), as a shell reports a program a signal ended; llama-server's
        own status (0 after its clean shutdown) would tell a supervisor that nothing stopped it.
        An exit nobody asked for is a ProcessFailed with the log tail."""
        server = self.server
        assert server is not None, "wait() before the server was ready"
        rc = server.proc.wait()
        if self.received:
            return 128 + self.received[0]
        raise process_failed(server.name, server.argv, rc, server.log_tail(), " while serving",
                             log_path=str(server.log_path), hint="the last log lines above say why")
