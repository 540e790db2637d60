"""Summaries of repeated measurements, as hyperfine reports them (mean ± σ, min … max, outliers)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Iglewicz & Hoaglin's modified Z-score: 0.6745 * (x - median) / MAD; |z| > 3.5 is an outlier.
MODIFIED_Z_CONSTANT = 0.6745
OUTLIER_Z = 3.5


@dataclass(frozen=True, slots=True)
class Summary:
    n: int
    mean: float
    stdev: float | None  # None when n == 1: no σ from one sample
    min: float
    max: float
    median: float
    outliers: tuple[int, ...]  # indices of samples with |modified Z| > 3.5
    samples: tuple[float, ...]


def modified_z(samples: list[float] | tuple[float, ...]) -> list[float]:
    med = statistics.median(samples)
    mad = statistics.median(abs(x - med) for x in samples)
    if mad == 0:
        return [0.0 if x == med else math.inf for x in samples]
    return [MODIFIED_Z_CONSTANT * (x - med) / mad for x in samples]


def summarize(samples) -> Summary:
    xs = tuple(float(x) for x in samples)
    if not xs:
        raise ValueError("no samples to summarize")
    z = modified_z(xs) if len(xs) >= 3 else [0.0] * len(xs)
    return Summary(
        n=len(xs), mean=statistics.fmean(xs),
        stdev=statistics.stdev(xs) if len(xs) > 1 else None,
        min=min(xs), max=max(xs), median=statistics.median(xs),
        outliers=tuple(i for i, v in enumerate(z) if abs(v) > OUTLIER_Z), samples=xs)


def ratio(a: Summary, b: Summary) -> tuple[float, float | None]:
    """a.mean / b.mean and its σ by first-order error propagation (as hyperfine's comparison)."""
    r = a.mean / b.mean
    if a.stdev is None or b.stdev is None:
        return r, None
    return r, r * math.sqrt((a.stdev / a.mean) ** 2 + (b.stdev / b.mean) ** 2)


def first_is_slow(samples, factor: float = 1.5) -> bool:
    """hyperfine's warning: the first run much slower than the rest (caches/page faults cold)."""
    xs = list(samples)
    return len(xs) >= 3 and xs[0] > factor * statistics.median(xs[1:])
