"""The one statistics module: summaries at n = 1 and n = 2, outliers by the modified Z-score, and
the wording every table uses."""

from __future__ import annotations

import math
import statistics

import pytest

from cputune.core import stats


def test_one_run_has_no_sigma_and_says_so():
    s = stats.summarize([12.3])
    assert (s.n, s.mean, s.median, s.min, s.max, s.stdev, s.outliers) == (1, 12.3, 12.3, 12.3, 12.3, None, ())
    assert s.rel_stdev is None
    assert stats.pm_text(s) == "12.30 (1 run)" and "±" not in stats.pm_text(s, 1, center="median")
    assert stats.range_text(s) == "-" and stats.count_text(s) == "1"


def test_two_runs_have_a_sample_sigma_and_never_an_outlier():
    s = stats.summarize([10.0, 12.0])
    # σ with n - 1: sqrt(((10 - 11)^2 + (12 - 11)^2) / 1) = sqrt(2)
    assert s.stdev == pytest.approx(math.sqrt(2)) and s.mean == s.median == 11.0
    assert s.rel_stdev == pytest.approx(math.sqrt(2) / 11)
    assert s.outliers == ()  # each of two sits one MAD from their median: |M| = 0.6745
    assert stats.pm_text(s) == "11.00 ± 1.41" and stats.range_text(s, 1) == "10.0 … 12.0"


def test_outliers_by_the_modified_z_score():
    s = stats.summarize([10.0, 10.2, 9.8, 10.1, 30.0])
    assert s.n == 5 and s.outliers == (4,) and s.median == 10.1
    # median 10.1, MAD 0.1: M(30.0) = 0.6745 * 19.9 / 0.1 = 134; M(9.8) = 0.6745 * 0.3 / 0.1 = 2.0
    z = stats.modified_z(s.samples)
    assert z[4] == pytest.approx(0.6745 * 19.9 / 0.1) and z[2] == pytest.approx(-0.6745 * 3)
    assert stats.summarize([1.0, 2.0, 3.0, 4.0, 5.0]).outliers == ()


def test_outliers_where_hyperfine_finds_them_and_where_its_threshold_is_looser():
    # hyperfine's own cases (src/outlier_detection.rs): the same score finds the same outliers.
    normal = [2.33269488, 1.42195907, -0.57527698, -0.31293437, 2.2948158, 0.75813273, -1.0712388,
              -0.96394741, -1.15897446, 1.10976285]
    assert stats.summarize(normal).outliers == ()
    assert stats.summarize(normal + [20.0, -500.0]).outliers == (10, 11)
    assert stats.summarize([0.5, 0.30, 0.29, 0.31, 0.30]).outliers == (0,)
    # MAD = 0: any other value is an outlier (hyperfine's epsilon MAD)
    assert stats.summarize([10.0] * 7 + [100.0]).outliers == (7,)
    assert stats.summarize([10.0] * 7 + [100.0, 100.0]).outliers == (7, 8)
    # A run 20 % slow among five within 2 %: M = 0.6745 * 19.5 / 1.5 = 8.8, flagged at 3.5 (not
    # at hyperfine's 10).
    runs = [100.0, 98.0, 102.0, 99.0, 101.0, 80.0]
    assert stats.modified_z(runs)[5] == pytest.approx(-0.6745 * 19.5 / 1.5)
    assert stats.summarize(runs).outliers == (5,)


def test_summary_matches_the_standard_library():
    xs = [3.1, 2.9, 3.4, 3.0, 2.8, 3.3]
    s = stats.summarize(xs)
    assert s.mean == pytest.approx(statistics.fmean(xs)) and s.stdev == pytest.approx(statistics.stdev(xs))
    assert s.median == statistics.median(xs) and (s.min, s.max) == (2.8, 3.4) and s.samples == tuple(xs)


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        stats.summarize([])


def test_wording():
    s = stats.summarize([10.0, 10.2, 9.8, 10.1, 30.0])
    assert stats.pm_text(s, 1, center="median") == f"10.1 ± {statistics.stdev(s.samples):.1f}"
    assert stats.range_text(s, 1) == "9.8 … 30.0"
    assert stats.count_text(s) == "5 (1 outlier)"
    assert stats.outliers_text(s, 1) == "1 of 5 runs is a statistical outlier (modified Z > 3.5): 30.0"
    two = stats.summarize([10.0, 10.0, 10.0, 10.0, 10.0, 1.0, 50.0])
    assert stats.count_text(two) == "7 (2 outliers)"
    assert stats.outliers_text(two, 0) == "2 of 7 runs are statistical outliers (modified Z > 3.5): 1, 50"
    assert stats.outliers_text(stats.summarize([1.0, 1.1, 0.9])) is None
