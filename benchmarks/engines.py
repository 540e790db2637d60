"""llama.cpp against ik_llama.cpp on the same files: each engine with its defaults and with its best
flags, pp, tg and tg at depth in alternating rounds (ABBA, so drift on a shared box hits all
alike), every ratio over llama.cpp's defaults; then `tune` over both engines.

    python benchmarks/engines.py                               # 64 MiB deepseek2 and llama, ~25 min
    python benchmarks/engines.py --size 32MiB --rounds 2 --reps 2 --budget 2m

Rows, per model (one synthetic deepseek2 and one dense llama, Q4_K_M, written once by mainline's
llama-quantize so both engines read the same bytes):
  llama.cpp defaults       no option but -t (the baseline)
  llama.cpp tuned          `cputune tune`'s best llama.cpp settings for each kind
  ik_llama.cpp defaults    no option but -t
  ik_llama.cpp flags       cputune's choices for the model (engine_args.choose: -mla 3 -fa 1 -amb 512
                           -fmoe 1 -rtr 1 for deepseek2, -rtr 1 for llama), what `serve` gives it
  ik_llama.cpp tuned       tune's best ik_llama.cpp settings for each kind
cputune chooses no flags for llama.cpp (its repack and flash attention are on by default), so
its "best flags" are tune's. Decode at depth is llama-bench's -d on llama.cpp and -gp on
ik_llama.cpp (the same thing: the cache is filled untimed first). Needs `cputune probe`,
`cputune build` and `cputune build --engine ik_llama`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cputune.core import stats, units
from cputune.engine import build, engine_args, llama_bench, tune
from cputune.model import gguf_model, synth
from cputune.predict import selector
from cputune.predict.box import resolve_box
from cputune.core.errors import ProcessFailed
from cputune.core.fsutil import cache_root
from cputune.machine.topology import discover_topology

ARCHS = ("deepseek2", "llama")
IK = "ik_llama"


@dataclass(frozen=True)
class Arm:
    label: str
    engine: str
    args: dict  # kind -> llama-bench options (besides -m, -p, -n, -r, -o, the mmap choice)


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows])


def tuned_args(result: tune.TuneResult, engine: build.Engine, cores: int) -> dict:
    """Each kind's tuned settings as llama-bench options (the defaults where tune did not get to it)."""
    out = {}
    for kind in ("tg", "pp"):
        r = result.for_kind(kind, engine.name)
        out[kind] = r.best.bench_args(engine) + ["-t", str(r.best.threads)] if r else ["-t", str(cores)]
    out["depth"] = out["tg"]
    return out


def run_test(bench: Path, model: Path, test: str, args: list[str], reps: int, depth: int,
             n_prompt: int, n_gen: int) -> list[float]:
    argv = llama_bench.bench_argv(bench, model, n_prompt=(n_prompt if test == "pp" else 0,),
                                  n_gen=(0 if test == "pp" else n_gen,), reps=reps, extra=args,
                                  depth=depth if test == "depth" else 0)
    try:
        rows = llama_bench.run(argv, timeout_s=3600)
    except ProcessFailed as e:  # a shared box: something else may stop a run; one more try
        print(f"  retrying once: {e.message}", file=sys.stderr, flush=True)
        rows = llama_bench.run(argv, timeout_s=3600)
    return [s for r in rows for s in (r.samples_ts or (r.avg_ts,))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="64MiB", help="file size of each synthetic model (default 64MiB)")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--rounds", type=int, default=4, help="ABBA rounds (default 4)")
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions per arm, test and round")
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2048)
    ap.add_argument("--budget", default="4m", help="tune's budget per model, both engines (default 4m)")
    ap.add_argument("--work-dir", type=Path, help="where the models go [default: cache/bench-models]")
    args = ap.parse_args()

    box = resolve_box(None)
    cores = box.machine.cores
    main_b, ik_b = build.require_build(), build.require_build(engine=IK)
    engines = {b.engine: build.load_engine(b.engine) for b in (main_b, ik_b)}
    bench = {b.engine: b.binary("llama-bench") for b in (main_b, ik_b)}
    topo = discover_topology()
    numactl = shutil.which("numactl") is not None
    work = args.work_dir or cache_root() / "bench-models"
    size = units.parse_size(args.size)
    t0 = time.time()

    def say(text: str) -> None:
        print(f"  [{time.time() - t0:6.0f} s] {text}", file=sys.stderr, flush=True)

    print(f"machine: {box.machine.name}, {cores} cores; llama.cpp {main_b.source_commit}, ik_llama.cpp "
          f"{ik_b.source_commit}; {args.size} {args.quant} models; {args.rounds} ABBA rounds x {args.reps} "
          f"reps per arm and test; tune {args.budget} per model over both engines")
    tests = {"pp": f"pp{args.n_prompt}", "tg": f"tg{args.n_gen}", "depth": f"tg{args.n_gen} @ d{args.depth}"}
    tune_rows, flag_tables = [], []
    for arch in ARCHS:
        path = work / f"engines-{arch}-{args.size}-{args.quant}-v{synth.SHAPES_VERSION}.gguf"
        if not path.exists():
            say(f"writing {path.name}")
            synth.make_quantized(path, arch, size, args.quant.upper(), main_b.binary("llama-quantize"),
                                 make_parents=True)
        prof = gguf_model.read_model(path)
        say(f"{path.name}: tune over both engines ({args.budget})")
        result = tune.run_tune(None, path, prof, box.machine, box.calibration, topo,
                               budget_s=units.parse_duration(args.budget), n_prompt=args.n_prompt,
                               n_gen=args.n_gen, numactl=numactl,
                               need_bytes=selector.ram_needed(prof, 4096, isa=topo.isa_flags).total_bytes,
                               engines=tune.engine_benches(), progress=lambda f, text: None)
        for r in result.results:
            tune_rows.append((path.name, r.test, engines[r.engine].title, r.best.label, f"{r.best_tokens_per_s:.1f}",
                              f"{r.gain:.2f}x", "-" if r.vs_baseline is None else f"{r.vs_baseline:.2f}x",
                              "yes" if r.overall else ""))
        flags = [w for c in engine_args.choose(engines[IK], prof, program="llama-bench") for w in c.args]
        t = ["-t", str(cores)]
        arms = [Arm("llama.cpp defaults", "llama.cpp", dict.fromkeys(tests, t)),
                Arm("llama.cpp tuned", "llama.cpp", tuned_args(result, engines["llama.cpp"], cores)),
                Arm("ik_llama.cpp defaults", IK, dict.fromkeys(tests, t)),
                Arm(f"ik_llama.cpp flags ({' '.join(flags)})", IK, dict.fromkeys(tests, t + flags)),
                Arm("ik_llama.cpp tuned", IK, tuned_args(result, engines[IK], cores))]
        samples = {(a.label, test): [] for a in arms for test in tests}
        for i in range(args.rounds):
            for a in (arms if i % 2 == 0 else arms[::-1]):
                for test in tests:
                    say(f"{path.name} round {i + 1}: {a.label} {tests[test]}")
                    samples[(a.label, test)] += run_test(bench[a.engine], path, test, a.args[test], args.reps,
                                                         args.depth, args.n_prompt, args.n_gen)
        base = {test: stats.summarize(samples[(arms[0].label, test)]).median for test in tests}
        rows = []
        for a in arms:
            cells = []
            for test in tests:
                s = stats.summarize(samples[(a.label, test)])
                cells.append(f"{s.median:.1f} ({s.median / base[test]:.2f}x)")
            rows.append((path.name, a.label, *cells))
        flag_tables.append(table(rows, ("model", "engine and flags", *(f"{v} t/s (x llama.cpp defaults)"
                                                                         for v in tests.values()))))
    print()
    for t in flag_tables:
        print(t)
        print()
    print(table(tune_rows, ("model", "test", "engine", "tuned settings", "t/s", "vs its defaults",
                            "vs llama.cpp defaults", "fastest")))
    print()
    print("t/s are medians of every sample of the arm over all rounds; the tune table's 'vs llama.cpp defaults' "
          "is tune's own engines round (each winner alternating with llama.cpp's defaults).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
