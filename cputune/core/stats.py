"""Summaries of repeated measurements, and their wording, in one place: every mean ± σ, min … max,
median and outlier that probe, bench, tune, calibrate and the reports show comes from here, so
one rule holds everywhere (hyperfine's: a single run has no σ)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

# Outliers by the modified Z-score of Iglewicz & Hoaglin ("How to Detect and Handle Outliers",
# ASQC Basic References in Quality Control vol. 16, 1993): M = 0.6745 (x - median) / MAD, flagged
# when |M| > 3.5, the threshold they recommend. hyperfine computes the same score
# (src/outlier_detection.rs) but flags only past 10 (OUTLIER_THRESHOLD = 1.4826 * 10, in MAD
# units): runs of 100, 98, 102, 99, 101 and 80 t/s give the 80 a score of 8.8, past the book's
# 3.5 and short of hyperfine's 10, and a run 20 % slow is beyond the predictions' 15 % target.
# Tukey's fences need quartiles, which 3 to 5 repetitions do not pin down.
MODIFIED_Z_CONSTANT = 0.6745
OUTLIER_Z = 3.5


@dataclass(frozen=True, slots=True)
class Summary:
    """n samples: their mean, sample standard deviation (n - 1 in the denominator; None at n = 1,
    where there is no σ to give), min, max, median, and the indices of the outliers."""

    n: int
    mean: float
    stdev: float | None
    min: float
    max: float
    median: float
    outliers: tuple[int, ...]  # indices of samples with |modified Z| > OUTLIER_Z
    samples: tuple[float, ...]

    @property
    def rel_stdev(self) -> float | None:
        """σ / mean, the share runs vary by; None without σ (or with a mean of 0)."""
        return self.stdev / self.mean if self.stdev is not None and self.mean else None


def modified_z(samples: list[float] | tuple[float, ...]) -> list[float]:
    """0.6745 (x - median) / MAD for each sample. A MAD of 0 (most samples equal) gives any other
    value an infinite score, as hyperfine's epsilon MAD does (its test_detect_outliers_if_mad_becomes_0)."""
    med = statistics.median(samples)
    mad = statistics.median(abs(x - med) for x in samples)
    if mad == 0:
        return [0.0 if x == med else float("inf") for x in samples]
    return [MODIFIED_Z_CONSTANT * (x - med) / mad for x in samples]


def summarize(samples) -> Summary:
    xs = tuple(float(x) for x in samples)
    if not xs:
        raise ValueError("no samples to summarize")
    # Two samples are never outliers: each sits one MAD from their median (|M| = 0.6745).
    z = modified_z(xs)
    return Summary(
        n=len(xs), mean=statistics.fmean(xs),
        stdev=statistics.stdev(xs) if len(xs) > 1 else None,
        min=min(xs), max=max(xs), median=statistics.median(xs),
        outliers=tuple(i for i, v in enumerate(z) if abs(v) > OUTLIER_Z), samples=xs)


# ---- wording (the terminal tables and the report file say it the same way) -----------------

def pm_text(s: Summary, digits: int = 2, center: str = "mean") -> str:
    """hyperfine's `mean ± σ` (or `median ± σ` with center="median"); one run has no σ and says
    so, `12.30 (1 run)`, never `± 0.00`."""
    value = s.median if center == "median" else s.mean
    if s.stdev is None:
        return f"{value:.{digits}f} (1 run)"
    return f"{value:.{digits}f} ± {s.stdev:.{digits}f}"


def range_text(s: Summary, digits: int = 2) -> str:
    """`min … max`; "-" for one run, which has no range (hyperfine prints none)."""
    return "-" if s.n == 1 else f"{s.min:.{digits}f} … {s.max:.{digits}f}"


def count_text(s: Summary) -> str:
    """The number of runs, with the outliers among them: `5`, `5 (1 outlier)`."""
    k = len(s.outliers)
    return str(s.n) if not k else f"{s.n} ({k} outlier{'s' if k > 1 else ''})"


def outliers_text(s: Summary, digits: int = 2) -> str | None:
    """What hyperfine warns of, with the values: `1 of 5 runs is a statistical outlier (modified
    Z > 3.5): 30.00`. None when there is none."""
    k = len(s.outliers)
    if not k:
        return None
    values = ", ".join(f"{s.samples[i]:.{digits}f}" for i in s.outliers)
    return (f"{k} of {s.n} runs {'is a statistical outlier' if k == 1 else 'are statistical outliers'} "
            f"(modified Z > {OUTLIER_Z}): {values}")
