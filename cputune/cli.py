"""The command line: a thin click layer over the library. Errors become one line, no traceback."""

from __future__ import annotations

from pathlib import Path

import click

from cputune import __version__, report
from cputune.errors import CputuneError, ProcessFailed

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class CputuneGroup(click.Group):
    """Turns CputuneError into `Error: ...` / `hint: ...` and exit 1; --debug keeps tracebacks."""

    def invoke(self, ctx: click.Context):
        debug = ctx.params.get("debug", False)
        try:
            return super().invoke(ctx)
        except CputuneError as e:
            if debug:
                raise
            click.echo(f"Error: {e.message}", err=True)
            if isinstance(e, ProcessFailed) and (e.output_tail or e.log_path):
                click.echo(e.details(), err=True)
            if e.hint:
                click.echo(f"hint: {e.hint}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("Interrupted.", err=True)
            ctx.exit(130)

    def list_commands(self, ctx):
        return list(self.commands)  # in the order a builder needs them, not alphabetical


def json_option(f):
    return click.option("--json", "as_json", is_flag=True,
                        help="Write one JSON document to stdout instead of tables.")(f)


def root_option(f):
    return click.option("--sysfs-root", "sysfs_root", type=click.Path(path_type=Path),
                        default=Path("/"), hidden=True,
                        help="Read /sys and /proc under this folder (a recorded machine).")(f)


@click.group(cls=CputuneGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="cputune")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def cli(debug: bool) -> None:
    """Measure a CPU box, predict llama.cpp speed on it, and run llama.cpp tuned for it."""


@cli.command("build")
@click.option("--target-cpu", default="native", show_default=True, metavar="NAME",
              help="CPU to build for: native, znver5, znver4, sapphirerapids, icelake, avx2, generic.")
@click.option("--source", type=click.Path(path_type=Path, file_okay=False),
              help="Build your own llama.cpp checkout instead of the pinned version.")
@click.option("--cmake-arg", "cmake_args", multiple=True, metavar="-DNAME=VALUE",
              help="Extra CMake option (repeatable); part of the cache key.")
@click.option("--jobs", "-j", type=click.IntRange(1), help="Parallel compile jobs [default: all cores].")
@click.option("--force", is_flag=True, help="Rebuild even when the cache has this key.")
@click.option("--python", "python_binding", is_flag=True,
              help="Also install llama-cpp-python without its own llama.cpp and link it to this build.")
@click.option("--list", "list_only", is_flag=True, help="List cached builds and exit.")
@json_option
def build_cmd(target_cpu, source, cmake_args, jobs, force, python_binding, list_only, as_json):
    """Compile llama.cpp for this CPU (or another), cached by version and flags."""
    from cputune import binding, build

    if list_only:
        builds = build.list_builds()
        if as_json:
            return report.print_json(report.document("cputune.builds/1",
                                                     builds=[b.to_json() for b in builds]))
        return report.render_build_list(builds)
    src = build.user_source(source) if source else build.fetch_pinned_source()
    spec = build.make_spec(src, target_cpu, cmake_args)
    with report.progress(f"building llama.cpp ({target_cpu})") as update:
        b = build.build(spec, jobs=jobs, force=force, progress=update)
    status = binding.ensure(b) if python_binding else binding.link(b)
    if as_json:
        return report.print_json(report.document("cputune.build/1", build=b.to_json(),
                                                 python_binding=status))
    report.render_build(b)
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
    from cputune import probe

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
@click.argument("model", type=click.Path(path_type=Path))
@json_option
def inspect_cmd(model, as_json):
    """What a GGUF model costs per token: active bytes (MoE-aware), FLOPs, KV cache; headers only."""
    from cputune import gguf_model

    m = gguf_model.read_model(model)
    kv = gguf_model.kv_bytes_per_token(m, "f16")
    if as_json:
        return report.print_json(report.document("cputune.model/1", model=m,
                                                 kv_bytes_per_token_f16=kv))
    report.render_model(m, kv)

# --- select / plan ---------------------------------------------------------------------------

def fit_options(f):
    """Options select and plan share: how the model would be served."""
    for opt in reversed([
        click.option("--ctx", "ctx_tokens", type=click.IntRange(1), default=8192, show_default=True,
                     help="Context (KV cache) size in tokens; speed is predicted with it full."),
        click.option("--cache-type", default="f16", show_default=True, metavar="TYPE",
                     help="KV cache type: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1 "
                          "(a quantized one turns flash attention on)."),
        click.option("--numa", type=click.Choice(["one-node", "distribute", "interleave"]),
                     default="distribute", show_default=True,
                     help="How serving spreads over NUMA nodes; one-node must fit one node's memory."),
        click.option("--threads", "-t", type=click.IntRange(1),
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
@click.option("--min-tps", type=click.FloatRange(0, min_open=True), metavar="X",
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
    from cputune import candidates, hardware, selector

    box = hardware.resolve_box(hardware_spec)
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
@click.option("--target-tps", type=click.FloatRange(0, min_open=True), metavar="X",
              help="Also say what read bandwidth and RAM a box needs to decode X tokens/s.")
@fit_options
@json_option
def plan_cmd(hardware_spec, model, quant, target_tps, ctx_tokens, cache_type, numa, threads, mmap,
             flash_attn, as_json):
    """Fit and speed of every catalog model and quant on a box not built yet; what box a speed needs."""
    from cputune import candidates, hardware, selector

    box = hardware.resolve_box(hardware_spec)
    s = selector.fit_settings(box.machine, ctx_tokens, cache_type, numa, threads, mmap, flash_attn)
    models = [(c.catalog_id or c.label, c.label, c.candidates) for c in candidates.plan_models(model, quant)]
    mts = box.hardware.mts if box.hardware else selector.DEFAULT_CHANNEL_MTS
    p = selector.plan(models, box.machine, box.calibration, candidates.box_capacity(box), s, target_tps, mts)
    if as_json:
        return report.print_json(report.document("cputune.plan/1", box=box.source,
                                                 calibration=box.calibration.source, plan=p))
    report.render_plan(p, box)


def main() -> None:
    cli(prog_name="cputune")


if __name__ == "__main__":  # pragma: no cover
    main()
