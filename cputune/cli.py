"""The command line: a thin click layer over the library. Errors become one line, no traceback."""

from __future__ import annotations

import os
import signal
import sys


def _stopped_while_loading(signum, frame) -> None:  # pragma: no cover (tested in a subprocess)
    # The imports below take about 0.4 s (numpy, gguf). A Ctrl-C (or SIGTERM) then would print a
    # KeyboardInterrupt traceback through the entry point, before main() could catch anything:
    # nothing has been started or written yet, so say so and leave at once.
    os.write(2, b"Interrupted.\n" if signum == signal.SIGINT else b"Terminated.\n")
    os._exit(128 + signum)


def _is_entry_point() -> bool:
    """Run as the `cputune` program (console script or python -m cputune), not imported by a
    notebook or pytest, whose signal handling is theirs."""
    argv0 = sys.argv[0] if sys.argv else ""
    return os.path.basename(argv0) == "cputune" or argv0.endswith(os.path.join("cputune", "__main__.py"))


_LOADING_HANDLERS: dict = {}
if _is_entry_point():
    for _sig, _default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        try:
            if signal.getsignal(_sig) is _default:  # an inherited SIG_IGN stays ignored
                _LOADING_HANDLERS[_sig] = signal.signal(_sig, _stopped_while_loading)
        except ValueError:  # not the main thread
            break

from pathlib import Path  # after the handlers above, on purpose

import click

from cputune import __version__
from cputune.commands import report
from cputune.core import checks, units
from cputune.core.errors import ConfigError, CputuneError, ProcessFailed, Terminated, WriteError
from cputune.predict.predictor import ENGINES as ENGINE_NAMES, NUMA_POLICIES, cache_type_name, check_context

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _interrupted(e: KeyboardInterrupt) -> int:
    """Say why cputune stops (one line, no traceback) and return its exit status: 130 for Ctrl-C,
    128 + N for a signal N that Terminated stands for (143 for SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt this line
    code = e.exit_code if isinstance(e, Terminated) else 130
    try:
        print("Terminated." if isinstance(e, Terminated) else "Interrupted.", file=sys.stderr, flush=True)
    except OSError:
        pass
    return code


class CputuneGroup(click.Group):
    """Turns CputuneError into `Error: ...` / `hint: ...` and exit 1, Ctrl-C into `Interrupted.`
    and exit 130 (SIGTERM: 143); --debug keeps tracebacks."""

    def invoke(self, ctx: click.Context):
        debug = ctx.params.get("debug", False)
        try:
            return super().invoke(ctx)
        except CputuneError as e:
            if debug:
                raise
            # A message quotes names from files (general.name, a TOML key, a path) and a failed
            # program's output: control characters are shown as escapes, not acted on. Plain
            # text, so no markup escaping (click.echo shows brackets as they are).
            click.echo(f"Error: {checks.printable(e.message, markup=False)}", err=True)
            if isinstance(e, ProcessFailed) and (e.output_tail or e.log_path):
                click.echo("\n".join(checks.printable(line, markup=False)
                                      for line in e.details().splitlines()), err=True)
            if e.hint:
                click.echo(f"hint: {checks.printable(e.hint, markup=False)}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as e:
            if debug:
                raise
            ctx.exit(_interrupted(e))
        except OSError as e:
            # A path the system refused before cputune's own checks could name it (a name too
            # long, a folder it may not enter): one line naming the path, as for any bad input.
            if debug or not e.filename:
                raise
            why = e.strerror or type(e).__name__
            click.echo(f"Error: {checks.printable(checks.shown(str(e.filename), 80), markup=False)}: {why}", err=True)
            click.echo("hint: check the path (each name in it at most 255 bytes) and its permissions", err=True)
            ctx.exit(1)

    def make_context(self, *args, **kwargs):
        # Parsing happens outside invoke(): click would print "Aborted!" and exit 1.
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt as e:
            raise click.exceptions.Exit(_interrupted(e)) from None

    ORDER = ("probe", "inspect", "predict", "calibrate", "select", "plan", "build", "serve", "worker",
             "bench", "tune", "report", "synth")

    def list_commands(self, ctx):
        """In the order a builder needs them, not alphabetical."""
        rank = {name: i for i, name in enumerate(self.ORDER)}
        return sorted(self.commands, key=lambda n: rank.get(n, len(rank)))


def json_option(f):
    return click.option("--json", "as_json", is_flag=True,
                        help="Write one JSON document to stdout instead of tables.")(f)


def root_option(f):
    return click.option("--sysfs-root", "sysfs_root", type=click.Path(path_type=Path),
                        default=Path("/"), hidden=True,
                        help="Read /sys and /proc under this folder (a recorded machine).")(f)


# --- option types: every value is checked before a command starts, and a bad one is named -------

class FiniteFloat(click.FloatRange):
    """click.FloatRange lets nan and inf through (every comparison with nan is false)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not checks.finite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class Parsed(click.ParamType):
    """A value read by a library parser before the command starts. Its ConfigError goes on to
    CputuneGroup (`Error:` and `hint:` lines, exit 1), led by the flag unless the message already
    says what the value is (named=True). keep_text hands the command the text it was given."""

    def __init__(self, name: str, parse, keep_text: bool = False, named: bool = False):
        self.name, self.parse, self.keep_text, self.named = name, parse, keep_text, named

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            out = self.parse(value)
        except ConfigError as e:
            if self.named or param is None:
                raise
            raise ConfigError(f"{param.opts[0]}: {e.message}", hint=e.hint) from None
        return value if self.keep_text else out


def _engine_name(text: str) -> str:
    from cputune.engine.build import load_engine

    return load_engine(text.strip()).name


def _engine_names(text: str) -> tuple[str, ...]:
    """NAME,NAME, or `built` (every engine that is built: ())."""
    if text.strip() == "built":
        return ()
    names = tuple(dict.fromkeys(_engine_name(t) for t in text.split(",") if t.strip()))
    if not names:
        raise ConfigError(f"no engine in {text!r}", hint="e.g. llama.cpp,ik_llama or built")
    return names


def _cache_types(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(cache_type_name(x.strip()) for x in text.split(",") if x.strip()))
    if not names:
        raise ConfigError(f"no KV cache type in {text!r}", hint="e.g. f16 or f16,q8_0")
    return names


MAX_BUDGET_S = 7 * 24 * 3600  # a week: a longer tuning budget is a typo
THREADS = click.IntRange(1, checks.MAX_THREADS)
THREADS_HERE = Parsed("N,N", units.parse_threads)  # run here by llama-bench
CTX_TOKENS = click.IntRange(1, checks.MAX_TOKENS)
TOKENS = click.IntRange(0, checks.MAX_TOKENS)
TOKENS_PER_S = FiniteFloat(0, 1e6, min_open=True)
CACHE_TYPE = Parsed("TYPE", cache_type_name, named=True)
ENGINE = Parsed("NAME", _engine_name, named=True)
ENGINES = Parsed("NAME,NAME", _engine_names, named=True)
CACHE_TYPES = Parsed("T,T", _cache_types, named=True)
SIZE = Parsed("SIZE", units.parse_size, keep_text=True)
BUDGET = Parsed("DURATION", lambda text: units.parse_duration(text, MAX_BUDGET_S), keep_text=True)
REPS = click.IntRange(1, 1000)


def check_test_context(model, depth: int, **tests: int) -> None:
    """--depth plus the longest test (n_prompt or n_gen, named by keyword) within the model's
    trained context: llama-bench gives each test a context of depth + its tokens."""
    flag, n = max(tests.items(), key=lambda kv: kv[1])
    check_context(model, depth + n, f"--depth {depth} + --{flag.replace('_', '-')} {n} = {depth + n} tokens")


@click.group(cls=CputuneGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="cputune")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def cli(debug: bool) -> None:
    """Measure a CPU box, predict llama.cpp speed on it, and run llama.cpp tuned for it."""


@cli.command("build")
@click.option("--target-cpu", default="native", show_default=True, metavar="NAME",
              help="CPU to build for: native, znver5, znver4, sapphirerapids, icelake, avx2, generic.")
@click.option("--engine", default="llama.cpp", show_default=True, metavar="NAME",
              help="What to build: llama.cpp or ik_llama (ik_llama.cpp), each pinned in configs/engines.toml.")
@click.option("--source", type=click.Path(path_type=Path, exists=True), metavar="DIR|TARBALL",
              help="Build this source folder or tarball (.tar.gz) instead of the pinned version.")
@click.option("--cmake-arg", "cmake_args", multiple=True, metavar="-DNAME=VALUE",
              help="Extra CMake option (repeatable); part of the cache key.")
@click.option("--jobs", "-j", type=click.IntRange(1, checks.MAX_THREADS), help="Parallel compile jobs [default: all cores].")
@click.option("--force", is_flag=True, help="Rebuild even when the cache has this key.")
@click.option("--python", "python_binding", is_flag=True,
              help="Also install llama-cpp-python without its own llama.cpp and link it to this build.")
@click.option("--list", "list_only", is_flag=True, help="List cached builds and exit.")
@json_option
def build_cmd(target_cpu, engine, source, cmake_args, jobs, force, python_binding, list_only, as_json):
    """Compile llama.cpp or ik_llama.cpp for a CPU, cached by engine, version and flags."""
    from cputune.engine import binding, build

    if list_only:
        builds = build.list_builds()
        if as_json:
            return report.print_json(report.document("cputune.builds/1",
                                                     builds=[b.to_json() for b in builds]))
        return report.render_build_list(builds)
    eng = build.load_engine(engine)
    if python_binding and not eng.python_binding:
        raise ConfigError(f"--python links llama-cpp-python to a llama.cpp build, not to {eng.title}",
                          hint="llama-cpp-python stays on the mainline build: `cputune build --python`")
    build.check_flags(target_cpu, cmake_args, eng)  # before fetch_source downloads 200+ MB
    spec = build.make_spec(build.fetch_source(eng, source), target_cpu, cmake_args)
    with report.progress(f"building {eng.title} ({target_cpu})") as update:
        b = build.build(spec, jobs=jobs, force=force, progress=update)
    status = None  # llama-cpp-python is only ever linked to a mainline build
    if eng.python_binding:
        status = binding.ensure(b) if python_binding else binding.link(b)
    if as_json:
        return report.print_json(report.document("cputune.engine.build/1", build=b.to_json(),
                                                 flags=build.program_flags(b), python_binding=status))
    report.render_build(b)
    if status is not None:
        report.render_binding(status)


@cli.command("probe")
@click.option("--quick", is_flag=True, help="Read bandwidth only, short arrays (about 5 s).")
@click.option("--no-bandwidth", "measure", flag_value=False, default=True,
              help="Inventory and findings only; measure nothing.")
@click.option("--memory", "memory_spec", metavar="SPEC",
              help="Installed DIMMs when they cannot be read, e.g. '24x DDR5-6000'.")
@click.option("--hwloc-xml", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Describe the machine in an `lstopo --of xml` file instead of this one.")
@click.option("--show", is_flag=True, help="Print the saved machine profile and exit.")
@click.option("--save/--no-save", default=True, show_default=True,
              help="Save the result as the machine profile that predict, select and serve read.")
@root_option
@json_option
def probe_cmd(quick, measure, memory_spec, hwloc_xml, show, save, sysfs_root, as_json):
    """Inventory this box, measure memory bandwidth per NUMA node, and say what to fix."""
    from cputune.machine import probe

    if show:
        profile = probe.load_profile()
        if as_json:
            return report.print_json(probe.profile_document(profile))
        return report.render_probe(profile)
    with report.progress("probing memory bandwidth", total=1) as update:
        profile = probe.run_probe(sysfs_root, quick=quick, measure=measure, memory_spec=memory_spec,
                                  hwloc_xml=hwloc_xml,
                                  progress=lambda i, n, text: update(i / max(n, 1), text))
    if save and profile.bandwidth is not None:
        path = probe.save_profile(profile)
        report.info(f"saved the machine profile to {path}")
    if as_json:
        return report.print_json(probe.profile_document(profile))
    report.render_probe(profile)


@cli.command("inspect")
@click.argument("model", metavar="FILE|URL|NAME")
@json_option
def inspect_cmd(model, as_json):
    """What a GGUF model costs per token: active bytes (MoE-aware), FLOPs, KV cache; headers only.
    NAME is looked up in the models folder, as --model is everywhere. A URL (https://...,
    hf://OWNER/REPO/FILE.gguf) is read with HTTP range requests, a few MB, never downloaded."""
    from cputune.model import gguf_model
    from cputune.model.resolve import resolve

    m = resolve(model, catalog=False, remote_ok=True).one_file().profile
    kv = gguf_model.kv_bytes_per_token(m, "f16")
    if as_json:
        return report.print_json(report.document("cputune.model/1", model=m,
                                                 kv_bytes_per_token_f16=kv))
    report.render_model(m, kv)

# --- select / plan ---------------------------------------------------------------------------

def fit_options(f):
    """Options select and plan share: how the model would be served."""
    for opt in reversed([
        click.option("--ctx", "ctx_tokens", type=CTX_TOKENS, default=8192, show_default=True,
                     help="Context (KV cache) size in tokens; speed is predicted with it full."),
        click.option("--cache-type", type=CACHE_TYPE, default="f16", show_default=True,
                     help="KV cache type: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1 "
                          "(a quantized one turns flash attention on)."),
        click.option("--numa", type=click.Choice(["auto", "one-node", "distribute", "interleave"]),
                     default="auto", show_default=True,
                     help="How serving spreads over NUMA nodes. auto: one node when the model fits "
                          "there, else interleaved over all (the rule predict, serve and tune use)."),
        click.option("--threads", "-t", type=THREADS,
                     help="Threads [default: the physical cores of the nodes used]."),
        click.option("--mmap/--no-mmap", default=True, show_default=True,
                     help="With mmap, llama.cpp keeps the file's copy of every weight it repacks."),
        click.option("--flash-attn", is_flag=True,
                     help="Count flash attention's smaller compute buffer."),
    ]):
        f = opt(f)
    return f


@cli.command("select")
@click.option("--model", required=True, metavar="NAME|FILE",
              help="Catalog model or alias (deepseek-r1, r1-distill-qwen-32b ...), part of a file name in "
                   "the models folder, or a GGUF file.")
@click.option("--min-tps", type=TOKENS_PER_S, metavar="X",
              help="Only recommend quants predicted to decode at least X tokens/s.")
@click.option("--hardware", "hardware_spec", metavar="PROFILE",
              help="A box from configs/hardware (epyc-9655-2s ...) or a TOML file [default: this box's probe].")
@click.option("--models-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Folder of GGUF files [default: $CPUTUNE_MODELS_DIR, config.toml, ~/models].")
@fit_options
@json_option
def select_cmd(model, min_tps, hardware_spec, models_dir, ctx_tokens, cache_type, numa, threads, mmap,
               flash_attn, as_json):
    """Which quant of a model fits this box (or PROFILE), how fast, at what quality; the best one."""
    from cputune.predict import box as box_, candidates, selector

    box = box_.resolve_box(hardware_spec)
    s = selector.fit_settings(box.machine, ctx_tokens, cache_type, numa, threads, mmap, flash_attn,
                              min_tps=min_tps)
    choice = candidates.resolve_model(model, models_dir)
    sel = selector.select(choice.label, choice.candidates, box.machine, box.calibration,
                          candidates.box_capacity(box), s, from_catalog=choice.from_catalog,
                          notes=choice.notes)
    if as_json:
        return report.print_json(report.document("cputune.select/1", box=box.source, machine=box.machine,
                                                 calibration=box.calibration.source, selection=sel))
    report.render_selection(sel, box)


@cli.command("plan")
@click.option("--hardware", "hardware_spec", default="epyc-9655-2s", show_default=True, metavar="PROFILE",
              help="The box to plan: a name from configs/hardware or a TOML file.")
@click.option("--model", metavar="NAME|FILE", help="One catalog model or GGUF file [default: every catalog model].")
@click.option("--quant", metavar="PRESET", help="One llama-quantize preset [default: the usual eleven].")
@click.option("--target-tps", type=TOKENS_PER_S, metavar="X",
              help="Also say what read bandwidth and RAM a box needs to decode X tokens/s.")
@fit_options
@json_option
def plan_cmd(hardware_spec, model, quant, target_tps, ctx_tokens, cache_type, numa, threads, mmap,
             flash_attn, as_json):
    """Fit and speed of every catalog model and quant on a box not built yet; what box a speed needs."""
    from cputune.predict import box as box_, candidates, selector

    box = box_.resolve_box(hardware_spec)
    s = selector.fit_settings(box.machine, ctx_tokens, cache_type, numa, threads, mmap, flash_attn)
    models = [(c.catalog_id or c.label, c.label, c.candidates) for c in candidates.plan_models(model, quant)]
    mts = box.hardware.mts if box.hardware else selector.DEFAULT_CHANNEL_MTS
    p = selector.plan(models, box.machine, box.calibration, candidates.box_capacity(box), s, target_tps, mts)
    if as_json:
        return report.print_json(report.document("cputune.plan/1", box=box.source,
                                                 calibration=box.calibration.source, plan=p))
    report.render_plan(p, box)


@cli.command("predict")
@click.option("--model", "-m", required=True, metavar="NAME|FILE",
              help="A GGUF file, or a catalog model (deepseek-r1, r1-distill-llama-70b, ...).")
@click.option("--quant", "-q", metavar="PRESET", help="llama-quantize preset for a catalog model: q4_k_m, q8_0 ...")
@click.option("--hardware", metavar="NAME|TOML",
              help="A box from configs/hardware (epyc-9655-2s ...) or a TOML file [default: this box's probe].")
@click.option("--threads", "-t", type=THREADS, help="[default: what serve would use]")
@click.option("--numa", type=click.Choice(("auto",) + NUMA_POLICIES), default="auto", show_default=True,
              help="auto: one node when the model fits in its memory, else interleave (as serve).")
@click.option("--depth", type=TOKENS, default=0, show_default=True,
              help="Tokens already in the KV cache (decode slows as the context fills), at most the "
                   "model's trained context.")
@click.option("--cache-type", type=CACHE_TYPE, default="f16", show_default=True, help="KV cache type.")
@click.option("--engine", type=click.Choice(ENGINE_NAMES), default="llama.cpp", show_default=True,
              help="llama.cpp, or ik_llama.cpp with its CPU flags (-fmoe -rtr -mla 3 -fa), to compare.")
@click.option("--pages", type=click.Choice(("auto", "4K", "2M")), default="auto", show_default=True,
              help="What backs the weights: 4K pages (mmap'd, THP off) or 2M huge pages. auto: this "
                   "box's THP setting; huge pages for a --hardware box.")
@click.option("--flash-attn", type=click.Choice(("on", "off")), default="on", show_default=True,
              help="Flash attention (-fa): on is llama.cpp's CPU default and what serve runs.")
@json_option
def predict_cmd(model, quant, hardware, threads, numa, depth, cache_type, engine, pages, flash_attn, as_json):
    """Decode and prefill tokens/s for a model on this box or a described one, the bottleneck, the
    range held-out runs fell in, and the best thread counts."""
    import shutil

    from cputune.model import gguf_model
    from cputune.predict import box as box_
    from dataclasses import replace

    from cputune.predict.predictor import best_threads, predict
    from cputune.model.resolve import resolve

    prof = resolve(model, quant).profile(quant)
    ik_types = sorted(set(prof.bytes_by_type) & gguf_model.ik_only_types())
    if ik_types and engine != "ik_llama":
        raise ConfigError(f"{prof.name or model} holds {', '.join(ik_types)} tensors, which only "
                          "ik_llama.cpp loads", hint="predict it with --engine ik_llama")
    box = box_.resolve_box(hardware)
    page_size = box_.page_size_of(box) if pages == "auto" else pages
    settings, decision = box_.plan_settings(box.machine, prof, numa, threads, depth, cache_type,
                                          numactl=box.hardware is not None or bool(shutil.which("numactl")),
                                          engine=engine, page_size=page_size)
    settings = replace(settings, flash_attn=flash_attn == "on")
    p = predict(prof, box.machine, settings, box.calibration)
    # At depth, the other attention path may be the faster one (GQA decodes faster without it).
    other_fa = predict(prof, box.machine, replace(settings, flash_attn=not settings.flash_attn),
                       box.calibration) if depth else None
    best = best_threads(prof, box.machine, settings, box.calibration)
    huge = predict(prof, box.machine, replace(settings, page_size="2M"), box.calibration) \
        if page_size == "4K" else None
    if as_json:
        return report.print_json(report.document(
            "cputune.predict/1", model={"name": prof.name, "path": prof.path, "file_type": prof.file_type,
                                        "weight_bytes": prof.weight_bytes,
                                        "active_bytes_per_token": prof.active_bytes_per_token},
            machine=box.machine, machine_source=box.source, calibration_source=box.calibration.source,
            range_source=box.calibration.error_band_source, settings=settings, numa=decision,
            prediction=p, best_threads={"tg": best[0], "pp": best[1]},
            with_huge_pages=huge, with_other_flash_attn=other_fa))
    report.render_prediction(prof, box, settings, p, decision, best, huge, other_fa)


@cli.command("calibrate")
@click.option("--arch", "archs", multiple=True, type=click.Choice(("llama", "deepseek2")),
              help="Model shapes to run [default: both].")
@click.option("--size", "sizes", multiple=True, type=SIZE,
              help="Model size in f16, e.g. 512MiB (repeatable) [default: 8x and 16x the L3 cache].")
@click.option("--quant", "quants", multiple=True, metavar="PRESET",
              help="Quant types to fit (repeatable) [default: f16 q8_0 q4_k_m q2_k].")
@click.option("--threads", "threads", type=THREADS_HERE, default=None,
              help="Thread counts, up to 4x the CPUs this process may use [default: 1, half and all "
                   "physical cores].")
@click.option("--reps", type=REPS, default=3, show_default=True, help="llama-bench repetitions.")
@click.option("--passes", type=click.IntRange(1, 100), default=2, show_default=True,
              help="Sweeps over all models; each point is the best run of all sweeps.")
@click.option("--work-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Where the synthetic models go (kept for reuse) [default: the cache].")
@click.option("--depths", default="0,1024,4096", show_default=True, metavar="N,N",
              help="KV-cache depths (llama-bench -d) the smallest model of each shape also runs at, "
                   "to fit attention's rates; 0 alone skips them.")
@json_option
def calibrate_cmd(archs, sizes, quants, threads, reps, passes, work_dir, depths, as_json):
    """Fit the predictor's constants to llama-bench runs on synthetic models here; saves them."""
    from cputune.core import units
    from cputune.engine import build
    from cputune.machine import probe
    from cputune.predict import box as box_, calibrate
    from cputune.core.fsutil import cache_root
    from cputune.core.units import parse_size

    box = box_.resolve_box(None)
    b = build.require_build()
    profile = probe.load_profile()
    t = profile.inventory.topology
    if sizes:
        size_list = [parse_size(s) for s in sizes]
    else:
        l3 = sum(g.size_bytes or 0 for g in t.l3_groups)
        size_list = calibrate.default_sizes(l3, profile.inventory.memory.mem_available_bytes or box.machine.mem_bytes)
    n = box.machine.cores
    thread_list = sorted(set(threads)) if threads else sorted({1, max(n // 2, 1), n})
    with report.progress("calibrating (llama-bench on synthetic models)", total=1) as update:
        run = calibrate.calibrate_box(
            box.machine, b.bin_dir, work_dir or cache_root() / "calibration-models",
            archs or ("llama", "deepseek2"), size_list, quants or ("f16", "q8_0", "q4_k_m", "q2_k"),
            thread_list, reps=reps, passes=passes, progress=lambda i, k, text: update(i / max(k, 1), text),
            read_now=probe.moment_reader(), depths=units.parse_tokens_list(depths, "--depths"))
    path = calibrate.save_calibration(run.calibration)
    if as_json:
        return report.print_json(report.document("cputune.calibration-run/1", calibration=run.calibration,
                                                 saved_to=str(path), points=[
            {"model": pt.model.path, "threads": pt.threads, "tg_tokens_per_s": pt.tg_tokens_per_s,
             "pp_tokens_per_s": pt.pp_tokens_per_s, "tg_error": e_tg, "pp_error": e_pp,
             "read_gbps": pt.read_gbps, "read_gbps_samples": pt.read_gbps_samples, "depth": pt.depth}
            for pt, e_tg, e_pp in run.errors]))
    report.render_calibration(run, path)


@cli.command("synth")
@click.option("--arch", required=True, metavar="ARCH",
              help="llama.cpp architecture with a table in configs/architectures: llama (dense), "
                   "deepseek2 (DeepSeek-R1's MLA + experts), qwen3moe, glm4moe, gpt-oss ...")
@click.option("--size", required=True, type=SIZE, help="File size after quantizing, e.g. 2GB.")
@click.option("--quant", default="f16", show_default=True, metavar="PRESET", help="llama-quantize preset.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The GGUF file to write (atomically).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Random seed of the weights.")
@json_option
def synth_cmd(arch, size, quant, out_path, seed, as_json):
    """Write a random-weight model shaped like a real one, to calibrate or test before downloading."""
    from cputune.engine import build
    from cputune.model import gguf_model, synth
    from cputune.core.units import parse_size

    if arch not in synth.synth_archs():
        raise ConfigError(f"--arch {arch!r}: cputune has no synthetic generator for it",
                          hint="--arch is one of " + ", ".join(synth.synth_archs()))
    b = build.require_build()
    with report.progress(f"writing a {size} {arch} model ({quant})", total=None) as update:
        path = synth.make_quantized(out_path, arch, parse_size(size), quant, b.bin_dir / "llama-quantize", seed)
    m = gguf_model.read_model(path)
    kv = gguf_model.kv_bytes_per_token(m, "f16")
    if as_json:
        return report.print_json(report.document("cputune.model/1", model=m, kv_bytes_per_token_f16=kv))
    report.info(f"wrote {path}")
    report.render_model(m, kv)


def bench_target_options(f):
    """--model/--quant/--models-dir/--twin, shared by bench and tune."""
    for opt in reversed([
        click.option("--model", "-m", metavar="NAME|FILE",
                     help="A GGUF file, or a model name to find in the models folder."),
        click.option("--quant", "-q", metavar="PRESET", help="Which quant of --model to find (q8_0, q4_k_m ...)."),
        click.option("--models-dir", type=click.Path(path_type=Path, file_okay=False),
                     help="[default: $CPUTUNE_MODELS_DIR, ~/.config/cputune/config.toml, ~/models]"),
        click.option("--twin", "twin_size", type=SIZE,
                     help="Use a synthetic model of the same architecture and quant of this size instead."),
    ]):
        f = opt(f)
    return f


@cli.command("tune")
@bench_target_options
@click.option("--budget", type=BUDGET, default="10m", show_default=True,
              help="Time for the whole search, e.g. 10m, 90s, 1h (split between tg and pp); no run "
                   "starts that would pass it.")
@click.option("--for", "kinds", default="tg,pp", show_default=True, metavar="tg,pp",
              help="Tune decode (tg), prefill (pp) or both.")
@click.option("--depth", type=TOKENS, default=0, show_default=True,
              help="Tokens already in the KV cache during the tests.")
@click.option("--n-prompt", type=CTX_TOKENS, default=256, show_default=True,
              help="Prompt tokens of each prefill test.")
@click.option("--n-gen", type=CTX_TOKENS, default=32, show_default=True,
              help="Tokens generated in each decode test.")
@click.option("--cache-types", type=CACHE_TYPES, default="f16", show_default=True,
              help="KV cache types tune may choose; f16,q8_0 allows a quantized cache (costs quality).")
@click.option("--engine", "engines", type=ENGINES, default="built", show_default=True, metavar="NAME,NAME",
              help="Engines to search, each from its own defaults: llama.cpp, ik_llama, or built (llama.cpp "
                   "and every other engine that is built).")
@click.option("--save/--no-save", default=True, show_default=True,
              help="Keep the best settings as the profile `cputune serve` starts this model with.")
@json_option
def tune_cmd(model, quant, models_dir, twin_size, budget, kinds, depth, n_prompt, n_gen, cache_types, engines,
             save, as_json):
    """Search the engine, threads, NUMA mode, ubatch, flash attention, repacking and KV type (and
    ik_llama.cpp's fused MoE and MLA mode) for decode and prefill separately; keep the best for
    `serve` and report the gain over llama.cpp's defaults."""
    import shutil

    from cputune.core import units
    from cputune.engine import build, engine_args, tune
    from cputune.model import gguf_model, resolve
    from cputune.predict import box as box_, selector
    from cputune.machine.topology import discover_topology

    budget_s = units.parse_duration(budget)
    kind_list = tune.kinds_from(kinds)
    box = box_.resolve_box(None)
    benches = tune.engine_benches(engines)
    b = build.find_build() or build.require_build(engine=benches[0].engine.name)  # the twin's llama-quantize
    path = resolve.bench_target(model, quant, models_dir, twin_size, b.bin_dir / "llama-quantize")
    prof = gguf_model.read_model(path)
    for eb in benches:
        engine_args.check_model(eb.engine, prof)
    check_test_context(prof, depth, n_prompt=n_prompt if "pp" in kind_list else 0,
                       n_gen=n_gen if "tg" in kind_list else 0)
    topo = discover_topology()
    need = selector.ram_needed(prof, max(depth + max(n_prompt, n_gen), 512), isa=topo.isa_flags).total_bytes
    with report.progress(f"tuning {path.name}", total=1) as update:
        result = tune.run_tune(None, path, prof, box.machine, box.calibration, topo,
                               kinds=kind_list, budget_s=budget_s, depth=depth, n_prompt=n_prompt,
                               n_gen=n_gen, cache_types=list(cache_types),
                               numactl=shutil.which("numactl") is not None, need_bytes=need,
                               progress=lambda frac, text: update(frac, text), engines=benches)
    report.warn_all(result.notes)
    saved = tune.save(result, warn=report.warn) if save else None
    if as_json:
        return report.print_json(report.document("cputune.engine.tune/1", result=result, saved=saved,
                                                 serve=tune.serve_settings(result)))
    report.render_tune(result, saved)


@cli.command("report")
@click.option("--out", "-o", "out_path", type=click.Path(path_type=Path, dir_okay=False),
              default="cputune-report.html", show_default=True,
              help="File to write; .md writes Markdown with the charts in a folder beside it.")
@click.option("--format", "fmt", type=click.Choice(("html", "md")), help="[default: from --out's suffix]")
@click.option("--charts/--no-charts", default=True, show_default=True,
              help="Draw the charts (needs matplotlib: pip install 'cputune[report]').")
@json_option
def report_cmd(out_path, fmt, charts, as_json):
    """Write one HTML (or Markdown) report of what probe, bench and tune saved: the machine, its
    bandwidth per node and thread scaling, decode against the roofline, the tuning table."""
    from cputune.commands import report_file

    data = report_file.collect()
    with report.progress("writing the report", total=None) as update:
        update(0, "drawing charts" if charts else "tables")
        blocks = report_file.build_blocks(data, charts)
        paths = report_file.write_report(blocks, out_path, fmt)
    if as_json:
        return report.print_json(report.document(
            "cputune.commands.report/1", files=paths, sources=data.sources,
            sections=[b.text for b in blocks if isinstance(b, report_file.Heading)],
            charts=[b.name for b in blocks if isinstance(b, report_file.Chart)]))
    report.info(f"wrote {paths[0]}" + (f" and {len(paths) - 1} charts beside it" if len(paths) > 1 else ""))


@cli.command("bench")
@bench_target_options
@click.option("--threads", "-t", type=THREADS_HERE, default=None,
              help="Thread counts, up to 4x the CPUs this process may use [default: all physical cores].")
@click.option("--depth", type=TOKENS, default=0, show_default=True,
              help="Fill the KV cache to this many tokens first.")
@click.option("--n-prompt", type=TOKENS, default=256, show_default=True,
              help="Prompt tokens of the prefill (pp) test; 0 skips it.")
@click.option("--n-gen", type=TOKENS, default=32, show_default=True,
              help="Tokens generated in the decode (tg) test; 0 skips it.")
@click.option("--reps", type=REPS, default=5, show_default=True,
              help="Repetitions of each test (median and spread are reported).")
@click.option("--engine", type=ENGINE, default="llama.cpp", show_default=True, metavar="NAME",
              help="llama.cpp, or ik_llama (ik_llama.cpp) with the options serve would give it.")
@json_option
def bench_cmd(model, quant, models_dir, twin_size, threads, depth, n_prompt, n_gen, reps, engine, as_json):
    """Measure tokens/s with llama-bench beside the prediction and the roofline; keeps a history.
    At --depth, an engine whose llama-bench has no -d measures prefill with llama-sweep-bench."""
    from cputune.engine import bench, build, engine_args, llama_bench
    from cputune.machine import probe
    from cputune.model import gguf_model, resolve
    from cputune.predict import box as box_

    box = box_.resolve_box(None)
    b = build.require_build(engine=engine)
    quantize = (build.find_build() or b).bin_dir / "llama-quantize"  # twins are mainline files
    path = resolve.bench_target(model, quant, models_dir, twin_size, quantize)
    prof = gguf_model.read_model(path)
    check_test_context(prof, depth, n_prompt=n_prompt, n_gen=n_gen)
    eng = build.load_engine(engine)
    engine_args.check_model(eng, prof)
    extra, sweep_extra, choices = engine_args.bench_args(eng, prof)
    thread_list = list(threads) if threads else [box.machine.cores]
    sweep = b.binary(llama_bench.SWEEP_BENCH) if llama_bench.SWEEP_BENCH in b.binaries else None
    with report.progress(f"llama-bench {path.name}", total=1) as update:
        results = bench.run_bench(b.bin_dir / "llama-bench", path, prof, box, thread_list, n_prompt, n_gen,
                                  depth, reps, progress=lambda i, k, text: update(i / max(k, 1), text),
                                  read_now=probe.moment_reader(), engine=engine, extra=extra,
                                  sweep_bin=sweep, sweep_extra=sweep_extra,
                                  build_commit=b.source_commit or b.source_label)
    report.render_choices(choices)
    # The measurements are shown whatever happens to the history file; its failure comes after.
    try:
        hist, failed = bench.append_history(results, prof, box.machine.name), None
    except WriteError as e:
        hist, failed = None, e
    if as_json:
        report.print_json(report.document("cputune.engine.bench/1", model=str(path), machine=box.machine.name,
                                          calibration_source=box.calibration.source,
                                          results=results, history=str(hist) if hist else None))
    else:
        report.render_bench(results, prof, box, hist)
    if failed:
        raise failed


def _auto_int(name: str):
    """A click callback for 'auto|N' options: None for auto, else an int from 1 to MAX_THREADS."""
    def convert(ctx, param, value):
        if value is None or str(value).lower() == "auto":
            return None
        try:
            n = int(value)
        except ValueError:
            n = 0
        if not 1 <= n <= checks.MAX_THREADS:
            raise ConfigError(f"{name} {value!r}: give auto or a whole number from 1 to {checks.MAX_THREADS}",
                              hint=f"{name} auto uses the physical cores of the planned nodes")
        return n
    return convert


def numa_option(modes: str):
    return click.option("--numa", default="auto", show_default=True, metavar="MODE",
                        help=f"NUMA placement: {modes}.")


def threads_option(f):
    return click.option("--threads", "-t", default="auto", show_default=True, metavar="auto|N",
                        callback=_auto_int("--threads"),
                        help="Compute threads [auto: physical cores of the nodes used].")(f)


def dry_run_option(f):
    return click.option("--dry-run", is_flag=True,
                        help="Print the command, environment and placement plan; start nothing.")(f)


@cli.command("serve", context_settings={"ignore_unknown_options": True})
@click.option("--quant", "-q", metavar="Q", envvar="CPUTUNE_QUANT", show_envvar=True,
              help="Quant to serve (q8_0, q4_k_m, ...), found in the models folder.")
@click.option("--model", "-m", metavar="NAME|FILE", envvar="CPUTUNE_MODEL", show_envvar=True,
              help="Part of the model's file name to pick among several, or a GGUF file to serve.")
@click.option("--models-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Folder of GGUF files [default: $CPUTUNE_MODELS_DIR, models_dir in "
                   "~/.config/cputune/config.toml, ~/models].")
@click.option("--ctx", "ctx_tokens", type=CTX_TOKENS, default=8192, show_default=True,
              help="Context size in tokens, for all slots together (the memory check counts its KV cache).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True,
              help="Port to listen on.")
@numa_option("auto, off, distribute, isolate, interleave or node:N")
@threads_option
@click.option("--threads-batch", default="auto", show_default=True, metavar="auto|N",
              callback=_auto_int("--threads-batch"),
              help="Threads for prompt processing [auto: as --threads].")
@click.option("--load-mode", type=click.Choice(["mmap", "none", "mlock"]), default="mmap",
              show_default=True, help="Map the file (mmap), read it into RAM (none) or lock it (mlock).")
@click.option("--api-key-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="File of API keys, one per line, that clients must send.")
@click.option("--rpc", "rpc_workers", metavar="HOST:PORT,...",
              help="llama.cpp RPC workers (`cputune worker`) to spread the model over.")
@click.option("--drop-caches", is_flag=True,
              help="Evict the model's pages from the page cache first, so they load onto the planned nodes.")
@click.option("--force", is_flag=True, help="Start even when the memory check says it does not fit.")
@click.option("--tuned/--no-tuned", default=True, show_default=True,
              help="Start with the settings `cputune tune` saved for this file, where you set none.")
@click.option("--engine", type=ENGINE, default=None, metavar="NAME",
              help="llama.cpp or ik_llama (ik_llama.cpp, given its DeepSeek options where the model has "
                   "MLA or experts) [default: the engine `cputune tune` found fastest for this file, "
                   "else llama.cpp].")
@dry_run_option
@root_option
@json_option
@click.argument("extra", nargs=-1, type=click.UNPROCESSED, metavar="[-- LLAMA-SERVER ARGS]")
@click.pass_context
def serve_cmd(ctx, quant, model, models_dir, ctx_tokens, host, port, numa, threads, threads_batch,
              load_mode, api_key_file, rpc_workers, drop_caches, force, tuned, engine, dry_run, sysfs_root,
              as_json, extra):
    """Start llama.cpp's server tuned and pinned to NUMA nodes: the quant's file, a memory check,
    threads and NUMA policy, verified after start. Arguments after `--` go to llama-server."""
    import time

    from cputune.engine import placement, rpc, serve

    placement.parse_numa(numa)
    req = serve.ServeRequest(
        quant=quant, model=model, models_dir=models_dir, ctx_tokens=ctx_tokens, host=host, port=port,
        numa=numa, threads=threads, threads_batch=threads_batch, api_key_file=api_key_file,
        load_mode=load_mode, rpc=rpc.parse_endpoints(rpc_workers) if rpc_workers else (),
        extra_args=tuple(extra), drop_caches=drop_caches, tuned=tuned, engine=engine)
    plan = serve.plan_serve(req, sysfs_root)
    report.warn_all(plan.warnings)
    serve.require_fit(plan, force)
    if dry_run:
        if as_json:
            return report.print_json(report.document("cputune.engine.serve/1", plan=plan, command=plan.command))
        return report.render_serve_plan(plan)
    with serve.SignalForwarder() as signals:
        with report.progress("starting llama-server", total=None) as update:
            server = serve.start(plan, drop_caches, progress=update, signals=signals)
        if as_json:
            report.print_json(report.document("cputune.engine.serve/1", plan=plan, command=plan.command, running={
                "pid": server.pid, "url": plan.url, "log_path": server.log_path}))
        else:
            report.render_serve_started(plan, server, time.monotonic() - server.started_s)
        report.warn_all(filter(None, [serve.check_affinity(server, plan.placement)]))
        code = signals.wait()
    ctx.exit(code)


@cli.command("worker", context_settings={"ignore_unknown_options": True})
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for other machines; RPC has no authentication).")
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True,
              help="Port to listen on.")
@numa_option("auto, off, interleave or node:N")
@threads_option
@click.option("--engine", type=ENGINE, default="llama.cpp", show_default=True, metavar="NAME",
              help="Whose RPC worker: llama.cpp (cputune builds ik_llama.cpp without one).")
@dry_run_option
@root_option
@json_option
@click.argument("extra", nargs=-1, type=click.UNPROCESSED, metavar="[-- RPC-SERVER ARGS]")
@click.pass_context
def worker_cmd(ctx, host, port, numa, threads, engine, dry_run, sysfs_root, as_json, extra):
    """Start a pinned llama.cpp RPC worker (ggml-rpc-server) that `cputune serve --rpc` spreads
    a model onto when one box is not enough."""
    from cputune.engine import placement, serve

    placement.parse_numa(numa, worker=True)
    req = serve.WorkerRequest(host=host, port=port, numa=numa, threads=threads, extra_args=tuple(extra),
                              engine=engine)
    plan = serve.plan_worker(req, sysfs_root)
    report.warn_all(plan.warnings)
    if dry_run:
        if as_json:
            return report.print_json(report.document("cputune.worker/1", plan=plan, command=plan.command))
        return report.render_worker_plan(plan)
    with serve.SignalForwarder() as signals:
        with report.progress("starting ggml-rpc-server", total=None) as update:
            server, memory = serve.start_worker(plan, progress=update, signals=signals)
        if as_json:
            report.print_json(report.document("cputune.worker/1", plan=plan, command=plan.command,
                                              memory=memory, running={"pid": server.pid,
                                                                      "log_path": server.log_path}))
        else:
            report.render_worker_started(plan, server, memory)
        report.warn_all(filter(None, [serve.check_affinity(server, plan.placement)]))
        code = signals.wait()
    ctx.exit(code)


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


def main() -> None:
    """The `cputune` program. SIGINT raises KeyboardInterrupt and SIGTERM Terminated, so either
    unwinds through `finally` (children stopped, temporary files removed) and ends as one line
    and exit 130 / 143, wherever it arrives; from import to here _stopped_while_loading does."""
    loading_term = _LOADING_HANDLERS.pop(signal.SIGTERM, None) is not None
    if signal.SIGINT in _LOADING_HANDLERS:
        signal.signal(signal.SIGINT, _LOADING_HANDLERS.pop(signal.SIGINT))
    term = None
    try:
        if loading_term or signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # SIG_IGN stays
            signal.signal(signal.SIGTERM, _terminate)
            term = signal.SIG_DFL
    except ValueError:  # not the main thread
        pass
    try:
        cli.main(prog_name="cputune")
    except KeyboardInterrupt as e:  # outside click's own handling (its teardown)
        sys.exit(_interrupted(e))
    except BrokenPipeError:  # `cputune ... | head` closed stdout; click exits 1 the same way
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    finally:
        if term is not None:
            signal.signal(signal.SIGTERM, term)


if __name__ == "__main__":  # pragma: no cover
    main()
