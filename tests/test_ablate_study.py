"""Spearman correlation and its bootstrap interval (gradscore_train/ablation/study.py) against scipy.stats.

Oracle: ``scipy.stats.spearmanr`` (Pearson correlation of average ranks);
the bootstrap interval is recomputed with scipy on the same resampled indices. Tolerance 1e-12:
both sides are the same float64 arithmetic up to summation order.
"""
import numpy as np
import pytest
from scipy import stats

from gradscore_train.ablation.study import bootstrap_ci, correlation_table, spearman


@pytest.mark.parametrize("n", [3, 7, 50])
def test_spearman_matches_scipy_continuous(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=n)
    y = x + rng.normal(size=n)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_matches_scipy_with_ties_and_inf():
    # ties get the average rank; +inf (a diverged sampler) ranks last, as in scipy
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.5, np.inf, 4.0])
    y = np.array([0.1, 0.3, 0.2, 0.2, 0.9, 0.4, 0.9, 0.0, 7.0, np.inf])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_drops_nan_pairs_and_handles_degenerate_input():
    x = np.array([1.0, np.nan, 3.0, 4.0, 2.0, 6.0])
    y = np.array([2.0, 5.0, 1.0, 8.0, np.nan, 9.0])
    keep = ~(np.isnan(x) | np.isnan(y))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x[keep], y[keep]).statistic, abs=1e-12)
    assert np.isnan(spearman([1.0, 2.0], [2.0, 1.0]))               # fewer than 3 pairs
    assert np.isnan(spearman([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]))   # constant variable
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2, 3], [1, 2])


def test_bootstrap_interval_equals_scipy_on_the_same_resamples():
    rng = np.random.default_rng(3)
    x = rng.normal(size=30)
    y = 0.6 * x + rng.normal(size=30)
    lo, hi = bootstrap_ci(x, y, n_boot=300, confidence=0.9, seed=11)
    draw = np.random.default_rng(11)
    ref = []
    for _ in range(300):
        idx = draw.integers(0, 30, 30)
        r = stats.spearmanr(x[idx], y[idx]).statistic
        if not np.isnan(r):
            ref.append(r)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(ref, [0.05, 0.95])), abs=1e-12)
    rho = spearman(x, y)
    assert lo < rho < hi                 # the point estimate lies inside its interval here
    assert hi - lo < 1.0                 # and n = 30 correlated pairs give an informative interval


def test_correlation_table_rows():
    rows = [{"quality": {"ed": q}, "predictors": {"good": q * 2 + 1, "bad": (-1) ** i * q}}
            for i, q in enumerate([0.1, 0.5, 0.2, 0.9, 0.3, 0.7])]
    table = correlation_table(rows, "ed", ["good", "bad"], n_boot=100)
    assert [r["predictor"] for r in table] == ["good", "bad"]
    assert table[0]["spearman"] == pytest.approx(1.0) and table[0]["n"] == 6
    assert table[0]["ci_low"] == pytest.approx(1.0)     # a monotone predictor stays perfect under resampling
    assert table[1]["spearman"] == pytest.approx(stats.spearmanr([r["predictors"]["bad"] for r in rows],
                                                                 [r["quality"]["ed"] for r in rows]).statistic)
