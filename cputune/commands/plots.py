"""The report's charts as PNG bytes (matplotlib, the optional `report` extra).

Each function takes plain numbers and returns one PNG, so the report module decides what to
plot and tests can check a chart without a display. Agg is selected before pyplot is imported:
no display is needed (CI, SSH sessions).
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

from cputune.core.errors import ConfigError

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("the report's charts need matplotlib, which is not installed",
                          hint="pip install 'cputune[report]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    # A fixed date keeps the bytes of a chart the same from run to run.
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def node_bandwidth(node_gbps: Mapping[int, float], peak_gbps: float | None) -> bytes:
    """Bars of read GB/s per NUMA node, against each node's share of the theoretical peak."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    nodes = sorted(node_gbps)
    ax.bar([f"node {n}" for n in nodes], [node_gbps[n] for n in nodes], color=COLORS[0])
    if peak_gbps:
        ax.axhline(peak_gbps, color=COLORS[1], linestyle="--", label=f"theoretical peak {peak_gbps:.0f} GB/s")
        ax.legend(loc="lower right")
    ax.set_ylabel("read GB/s")
    ax.set_title("Memory read bandwidth per NUMA node")
    return _png(fig)


def thread_scaling(series: Mapping[str, Sequence[tuple[int, float]]], ylabel: str, title: str,
                   peak: float | None = None) -> bytes:
    """One line per series of (threads, value): the probe's bandwidth sweep, tune's tokens/s."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=COLORS[i % len(COLORS)], label=name)
    if peak:
        ax.axhline(peak, color="grey", linestyle="--", label=f"peak {peak:.0f}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("threads")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right", fontsize="small")
    return _png(fig)


def roofline(points: Sequence[dict], bandwidth_gbps: Sequence[tuple[str, float]]) -> bytes:
    """Decode tokens/s against GB read per token (log-log): each bandwidth is a roof (tokens/s =
    GB/s / GB per token); measured points filled, predicted hollow, one colour per quant.

    points: dicts with quant, gb_per_token, measured, predicted.
    """
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(8.4, 4))
    xs = [p["gb_per_token"] for p in points]
    lo, hi = min(xs) / 2, max(xs) * 2
    for i, (name, bw) in enumerate(bandwidth_gbps):
        ax.plot([lo, hi], [bw / lo, bw / hi], linestyle="--" if i else "-", color="grey" if i else "black",
                linewidth=1, label=f"{name}: {bw:.1f} GB/s")
    quants = sorted({p["quant"] for p in points})
    for i, q in enumerate(quants):
        mine = [p for p in points if p["quant"] == q]
        c = COLORS[i % len(COLORS)]
        ax.scatter([p["gb_per_token"] for p in mine], [p["measured"] for p in mine], color=c, marker="o",
                   label=f"{q} measured")
        ax.scatter([p["gb_per_token"] for p in mine], [p["predicted"] for p in mine], facecolors="none",
                   edgecolors=c, marker="s", label=f"{q} predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("GB read per token")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode roofline: measured and predicted")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1))
    return _png(fig)
