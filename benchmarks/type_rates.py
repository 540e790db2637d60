"""Decode cost of each weight type on one core: ik_llama.cpp's llama-bench tg at 1 thread on the
same synthetic llama quantized to one type at a time (--pure), in alternating rounds; every rate
as a ratio to Q4_K run with -rtr (what ik_llama.cpp makes of a Q4_K_M file). This is how
configs/decode_type_ratios.csv was measured (issue 14: per-type dequantize-and-dot rates are a
property of the core, not of the box; low-bit i-quant mixes decode no faster than Q4_K_M on big
boxes because their kernels are slower per weight, not because of bandwidth).

    python benchmarks/type_rates.py                        # 2 sizes x 40 types x 2 rounds, ~15 min
    python benchmarks/type_rates.py --types q4_K,iq1_s_r4 --rounds 1
    python benchmarks/type_rates.py --csv                  # print the rows of decode_type_ratios.csv

Two model sizes (96 and 192 MiB in f16): the ratio is taken at the larger one, whose Q4_K file
(57 MB) is out of the 32 MiB L3 as a big box's experts are, and the marginal rate between the two
sizes (overhead cancels) is printed beside it as a check. The i-quants need an importance matrix
to quantize at all; the one written here weights every column alike (the values only steer the
rounding, not the kernel's speed). Needs `cputune build --engine ik_llama`.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from pathlib import Path

from gguf import GGUFReader

from cputune.core.fsutil import cache_root
from cputune.engine import build, llama_bench
from cputune.model import synth
from cputune.model.gguf_model import read_model

# ik_llama.cpp types the shipped recipes use (configs/quant_recipes.toml) and their mainline
# neighbours; "+rtr" runs the file with -rtr 1 (repacked at load).
TYPES = ("q4_K+rtr q4_K q4_k_r4 q4_0 q4_0+rtr q2_K q2_K+rtr q3_K q3_K+rtr q5_K q5_K+rtr q6_K q6_K+rtr "
         "q8_0 q8_0+rtr q8_0_r8 q5_0 iq1_s_r4 iq1_m_r4 iq2_xxs_r4 iq2_ks iq2_k iq2_k_r4 iq2_kl iq3_ks "
         "iq3_k iq3_k_r4 iq4_kss iq4_ks iq4_ks_r4 iq4_k iq4_k_r4 iq5_ks iq5_ks_r4 iq5_k iq6_k "
         "iq1_kt iq2_kt iq3_kt").split()
SIZES_MIB = (96, 192)
REFERENCE = "q4_K+rtr"


def write_imatrix(model: Path, out: Path) -> None:
    """A legacy-format imatrix (llama-imatrix's .dat) of ones for every matrix of `model`."""
    entries = [(t.name, int(t.shape[0])) for t in GGUFReader(model).tensors
               if len(t.shape) >= 2 and t.name.endswith(".weight")]
    with out.open("wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, n in entries:
            b = name.encode()
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", 1, n) + struct.pack(f"<{n}f", *([1.0] * n)))
        f.write(struct.pack("<i", 1) + struct.pack("<i", 4) + b"ones")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated; NAME+rtr runs with -rtr 1")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--work-dir", type=Path, help="[default: cache/type-rates]")
    ap.add_argument("--csv", action="store_true", help="print decode_type_ratios.csv rows")
    args = ap.parse_args()
    types = [t for t in args.types.split(",") if t]
    if REFERENCE not in types:
        types.insert(0, REFERENCE)
    ik = build.require_build(engine="ik_llama")
    quantize, bench = ik.binary("llama-quantize"), ik.binary("llama-bench")
    work = args.work_dir or cache_root() / "type-rates"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def say(text: str) -> None:
        print(f"  [{time.time() - t0:6.0f} s] {text}", file=sys.stderr, flush=True)

    files: dict[tuple[str, int], Path] = {}
    for mib in SIZES_MIB:
        f16 = work / f"llama-{mib}M-f16-v{synth.SHAPES_VERSION}.gguf"
        if not f16.exists():
            say(f"writing {f16.name}")
            synth.write_model(f16, synth.shape_for_size("llama", mib << 20, "f16"), make_parents=True)
        imat = f16.with_suffix(".imatrix.dat")
        if not imat.exists():
            write_imatrix(f16, imat)
        for t in {t.split("+")[0] for t in types}:
            out = work / f"llama-{mib}M-{t}-v{synth.SHAPES_VERSION}.gguf"
            if not out.exists():
                say(f"quantizing {out.name}")
                synth.quantize(f16, out, t, quantize, make_parents=True,
                               options=("--pure", "--imatrix", str(imat)))
            files[(t, mib)] = out
    best: dict[tuple[str, int], list[float]] = {}
    for i in range(args.rounds):
        for t in (types if i % 2 == 0 else types[::-1]):
            name, _, flag = t.partition("+")
            for mib in SIZES_MIB:
                say(f"round {i + 1}: {t} {mib} MiB")
                argv = llama_bench.bench_argv(bench, files[(name, mib)], threads=(1,), n_prompt=(0,),
                                              n_gen=(args.n_gen,), reps=args.reps,
                                              extra=["-rtr", "1" if flag == "rtr" else "0"])
                rows = llama_bench.run(argv, timeout_s=600)
                best.setdefault((t, mib), []).extend(s for r in rows for s in (r.samples_ts or (r.avg_ts,)))
    big, small = SIZES_MIB[-1], SIZES_MIB[0]
    size = {k: read_model(files[(k[0].split("+")[0], k[1])]) for k in best}
    rate = {}  # weight bytes per second at 1 thread (whole token), and the marginal rate
    for t in types:
        ts_b, ts_s = max(best[(t, big)]), max(best[(t, small)])
        mb, ms = size[(t, big)].weight_bytes, size[(t, small)].weight_bytes
        rate[t] = (mb * ts_b, (mb - ms) / (1 / ts_b - 1 / ts_s))
    ref = rate[REFERENCE]
    print(f"ik_llama.cpp {ik.source_commit}, 1 thread, tg{args.n_gen}, best of {args.rounds} rounds x {args.reps} reps; "
          f"ratio = bytes/s over {REFERENCE}'s at {big} MiB f16")
    print(f"{'type':12} {'GB/s':>6} {'ratio':>6} {'marginal ratio':>14}")
    for t in sorted(types, key=lambda t: rate[t][0]):
        print(f"{t:12} {rate[t][0] / 1e9:6.2f} {rate[t][0] / ref[0]:6.3f} {rate[t][1] / ref[1]:14.3f}")
    if args.csv:
        for t in types:
            if "+" not in t:
                print(f"{t.upper()},{rate[t][0] / ref[0]:.3g},{rate[t][0] / 1e9:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
