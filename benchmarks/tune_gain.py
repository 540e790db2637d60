"""Does `cputune tune` beat llama.cpp's defaults? Tune a model, then run the defaults and the tuned
settings alternately (ABBA order, so drift on a shared box hits both alike) and print the ratios.

    python benchmarks/tune_gain.py                          # synthetic llama and deepseek2, ~20 min
    python benchmarks/tune_gain.py --model F.gguf --budget 10m --rounds 6

Target (issue 7): tuned / default >= 1.0x for tg and for pp. Needs `cputune probe` and
`cputune build` done. When tune keeps the defaults (nothing it tried beat them alternately),
both arms run the same settings and the ratio shows this box's noise, not a gain.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

from cputune.core import units
from cputune.engine import build, tune
from cputune.model import gguf_model, synth
from cputune.predict import selector
from cputune.predict.box import resolve_box
from cputune.core.fsutil import cache_root
from cputune.machine.topology import discover_topology

MODELS = (("llama", 300_000_000, "q4_k_m"), ("deepseek2", 300_000_000, "q4_k_m"))


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows])


def alternate(runner: tune.BenchRunner, a: tune.Knobs, b: tune.Knobs, rounds: int, reps: int
              ) -> tuple[list[float], list[float], list[float]]:
    """Samples of a and b over `rounds` ABBA rounds, and each round's median ratio b / a."""
    sa, sb, ratios = [], [], []
    for i in range(rounds):
        # Two arms by position, not by settings: when tune kept the defaults, a == b and both
        # arms still run, so the ratio shows this box's noise.
        got: list[list[float]] = [[], []]
        for arm in ((0, 1) if i % 2 == 0 else (1, 0)):
            got[arm] = runner((a, b)[arm], reps)[0]
        sa += got[0]
        sb += got[1]
        ratios.append(statistics.median(got[1]) / statistics.median(got[0]))
    return sa, sb, ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", help="GGUF file(s) [default: two synthetic ones]")
    ap.add_argument("--budget", default="4m", help="tune's budget per model (default 4m)")
    ap.add_argument("--rounds", type=int, default=6, help="ABBA rounds of the comparison (default 6)")
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions per arm and round")
    ap.add_argument("--n-prompt", type=int, default=256)
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--work-dir", type=Path, help="where synthetic models go [default: cache/bench-models]")
    args = ap.parse_args()

    box = resolve_box(None)
    b = build.require_build()
    bench_bin = b.bin_dir / "llama-bench"
    topo = discover_topology()
    numactl = shutil.which("numactl") is not None
    work = args.work_dir or cache_root() / "bench-models"
    paths = args.model or []
    if not paths:
        for arch, size, quant in MODELS:
            p = work / f"tune-{arch}-{size // 10**6}MB-{quant}.gguf"
            if not p.exists():
                print(f"writing {p.name}", file=sys.stderr)
                synth.make_quantized(p, arch, size, quant, b.bin_dir / "llama-quantize")
            paths.append(p)

    print(f"machine: {box.machine.name}: {box.machine.cores} cores; llama.cpp {b.source_commit or b.source_label}; "
          f"budget {args.budget} per model, {args.rounds} ABBA rounds x {args.reps} reps per arm")
    rows, ok = [], True
    t0 = time.time()
    for path in paths:
        prof = gguf_model.read_model(path)
        need = selector.ram_needed(prof, 4096, isa=topo.isa_flags).total_bytes

        def progress(frac, text, name=path.name):
            print(f"  [{time.time() - t0:6.0f} s] {name}: {text}", file=sys.stderr, flush=True)

        result = tune.run_tune(bench_bin, path, prof, box.machine, box.calibration, topo,
                               budget_s=units.parse_duration(args.budget), n_prompt=args.n_prompt,
                               n_gen=args.n_gen, numactl=numactl, need_bytes=need,
                               build_commit=b.source_commit or "", progress=progress)
        for kr in result.results:
            n = args.n_gen if kr.kind == "tg" else args.n_prompt
            runner = tune.BenchRunner(bench_bin, path, topo, kr.kind, n, 0, numactl)
            print(f"  [{time.time() - t0:6.0f} s] {path.name}: {kr.test} defaults vs tuned, alternating",
                  file=sys.stderr, flush=True)
            sd, st, ratios = alternate(runner, kr.default, kr.best, args.rounds, args.reps)
            ratio = statistics.median(st) / statistics.median(sd)
            same = kr.best == kr.default
            ok &= ratio >= 1.0 or same
            rows.append((path.name, kr.test, "(same as defaults)" if same else kr.best.label,
                         f"{statistics.median(sd):.2f}", f"{statistics.median(st):.2f}", f"{ratio:.3f}x",
                         f"{min(ratios):.2f}-{max(ratios):.2f}", f"{sum(r > 1 for r in ratios)}/{len(ratios)}",
                         f"{kr.gain:.3f}x"))
    print()
    print(table(rows, ("model", "test", "tuned settings", "default t/s", "tuned t/s", "tuned/default",
                       "per-round", "rounds won", "tune's own")))
    print()
    print("t/s are medians of every sample of the arm; 'tune's own' is the gain tune measured in its "
          "confirm rounds (1.000x when it kept the defaults).")
    print("target: tuned/default >= 1.0x for tg and pp ->", "MET" if ok else "NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
