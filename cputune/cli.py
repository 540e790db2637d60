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


def main() -> None:
    cli(prog_name="cputune")


if __name__ == "__main__":  # pragma: no cover
    main()
