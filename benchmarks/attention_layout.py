"""Flash-attention decode at depth by head layout: mainline llama-bench -fa 1 tg at depths 0,
1024 and 4096 on synthetic llama models that differ only in their attention heads (query heads,
KV heads, head size), in alternating rounds. What decode gains per cached token is attention over
the cache; printed per query head, per KV head and as GFLOP/s (4 x head size FLOPs per query head
and cached token), beside the K/V row stride and a KV head's span per thread.

Issue 14: the predictor's attention term was one FLOP rate; mainline's CPU flash attention
(ggml-cpu/ops.cpp, split-KV path for one query row and >= 512 cached tokens) walks each query
head's K and V rows in turn, so the group of query heads sharing a KV head reads its rows again
from wherever they are: this measures what that costs on the machine it runs on.

    python benchmarks/attention_layout.py                     # 9 layouts x 2 rounds, 1 and 2 threads
    python benchmarks/attention_layout.py --threads 1 --rounds 1 --layouts 8/2/128,8/8/128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from cputune.core.fsutil import cache_root
from cputune.engine import build, llama_bench
from cputune.model import synth

# query heads / KV heads / head size
LAYOUTS = ("8/2/128 12/3/128 16/4/128 32/8/128 8/8/128 16/16/128 16/2/64 12/3/64 32/4/128").split()
DEPTHS = (0, 1024, 4096)


def shape(layout: str, layers: int) -> synth.Shape:
    h, kv, d = (int(x) for x in layout.split("/"))
    n_embd = h * d
    n_ff = 512  # the feed-forward only adds to the depth-0 time; attention is what is measured
    return synth.Shape("llama", n_layer=layers, n_embd=n_embd, n_ff=n_ff, n_head=h, n_head_kv=kv,
                       head_dim=d, n_vocab=512, ctx=8192)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="HEADS/KV_HEADS/HEAD_SIZE, comma-separated")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-gen", type=int, default=16)
    ap.add_argument("--work-dir", type=Path, help="[default: cache/attention-layout]")
    args = ap.parse_args()
    layouts = [x for x in args.layouts.split(",") if x]
    threads = tuple(int(t) for t in args.threads.split(","))
    b = build.require_build()
    work = args.work_dir or cache_root() / "attention-layout"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def say(text: str) -> None:
        print(f"  [{time.time() - t0:6.0f} s] {text}", file=sys.stderr, flush=True)

    files = {}
    for lay in layouts:
        out = work / f"llama-{lay.replace('/', '-')}-L{args.layers}-q4_k_m-v{synth.SHAPES_VERSION}.gguf"
        if not out.exists():
            say(f"writing {out.name}")
            synth.quantize_shape(out, shape(lay, args.layers), "Q4_K_M", b.bin_dir / "llama-quantize",
                                 make_parents=True)
        files[lay] = out
    best: dict[tuple[str, int, int], list[float]] = {}
    for i in range(args.rounds):
        for lay in (layouts if i % 2 == 0 else layouts[::-1]):
            say(f"round {i + 1}: {lay}")
            argv = llama_bench.bench_argv(b.bin_dir / "llama-bench", files[lay], threads=threads, n_prompt=(0,),
                                          n_gen=(args.n_gen,), reps=args.reps,
                                          extra=["-fa", "1", "-d", ",".join(map(str, DEPTHS))])
            for r in llama_bench.run(argv, timeout_s=1200):
                best.setdefault((lay, r.n_threads, r.n_depth), []).extend(r.samples_ts or (r.avg_ts,))
    print(f"llama.cpp {b.source_commit}, llama-bench -fa 1 tg{args.n_gen}, {args.layers} layers, best of "
          f"{args.rounds} rounds x {args.reps} reps; ns per (head x cached token x layer) over each depth step")
    print(f"{'layout':>10} {'thr':>3} {'stride':>6} {'span@4096':>9} {'t0 ms':>6} "
          f"{'ns/q 0-1k':>9} {'1k-4k':>6} {'ns/kv 0-1k':>10} {'1k-4k':>6} {'GF/s 0-1k':>9} {'1k-4k':>6}")
    for lay in layouts:
        h, kv, d = (int(x) for x in lay.split("/"))
        for t in threads:
            ts = [max(best.get((lay, t, dd), [0.0])) for dd in DEPTHS]
            if min(ts) <= 0:
                continue
            ms = [1e3 / x for x in ts]
            cells, steps = [], list(zip(DEPTHS, ms))
            for (d0, m0), (d1, m1) in zip(steps, steps[1:]):
                per = (m1 - m0) * 1e6 / ((d1 - d0) * args.layers)  # ns per cached token and layer
                cells.append((per / h, per / kv, 4 * d * h / per if per > 0 else float("nan")))
            span = 4096 // t * 2 * d * 2  # one KV head's K and V rows one thread walks, bytes
            print(f"{lay:>10} {t:3d} {kv * d * 2:5d}B {span / 1024:7.0f}Ki {ms[0]:6.2f} "
                  f"{cells[0][0]:9.1f} {cells[1][0]:6.1f} {cells[0][1]:10.1f} {cells[1][1]:6.1f} "
                  f"{cells[0][2]:9.1f} {cells[1][2]:6.1f}")
    agree = [min(v) / max(v) for v in best.values() if len(v) > 1 and max(v) > 0]
    if agree:
        print(f"slowest / fastest sample, median over the points: {statistics.median(agree):.2f}")
    print(f"took {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
