"""emlib.stats against hand-worked numbers, published examples (Newcombe 1998) and scipy/numpy."""
import itertools
import math

import numpy as np
import pytest
from scipy import stats as st

from emlib import stats as S


# --------------------------------------------------------------------------- t and mean intervals
def test_t_quantile_matches_tables():
    assert S.t_quantile(0.975, 9) == pytest.approx(2.262157, abs=1e-6)
    assert S.t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-6)
    assert S.t_quantile(0.025, 30) == pytest.approx(-2.042272, abs=1e-6)
    for q, df in ((0.0, 3), (1.0, 3), (0.5, 0)):
        with pytest.raises(ValueError, match="0 < q < 1"):
            S.t_quantile(q, df)


def test_mean_ci_t_and_bootstrap_by_hand():
    m, lo, hi = S.mean_ci([1.0, 2.0, 3.0, 4.0, float("nan")], ci="t")
    half = 3.182446305 * math.sqrt(5 / 3) / 2  # t_{.975,3} * sd / sqrt(4), sd^2 = 5/3
    assert (m, lo, hi) == pytest.approx((2.5, 2.5 - half, 2.5 + half), abs=1e-8)
    x = np.array([0.3, 1.2, 2.0, 5.5, 0.1])
    rng = np.random.default_rng(7)
    boots = x[rng.integers(0, 5, size=(300, 5))].mean(axis=1)
    assert S.mean_ci(x, n_boot=300, seed=7) == pytest.approx((x.mean(), *np.quantile(boots, [0.025, 0.975])))
    assert all(math.isnan(v) for v in S.mean_ci([]))
    m1 = S.mean_ci([4.0])
    assert m1[0] == 4.0 and math.isnan(m1[1]) and math.isnan(m1[2])
    with pytest.raises(ValueError, match="'bootstrap' or 't'"):
        S.mean_ci([1.0, 2.0], ci="z")
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        S.mean_ci([1.0, 2.0], level=95)


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_paths_agree_and_are_seeded():
    x = (np.random.default_rng(1).random(400) < 0.2).astype(float)
    fast = S.bootstrap_ci(x, n_boot=4000, seed=0)  # Binomial(n, mean) / n for 0/1 data
    slow = S.bootstrap_ci(x, n_boot=4000, seed=0, stat=np.mean)  # explicit resampling
    assert fast == S.bootstrap_ci(x, n_boot=4000, seed=0) and fast != S.bootstrap_ci(x, n_boot=4000, seed=1)
    se = math.sqrt(x.mean() * (1 - x.mean()) / x.size)
    assert fast == pytest.approx((x.mean() - 1.96 * se, x.mean() + 1.96 * se), abs=0.006)
    assert slow == pytest.approx(fast, abs=0.006)
    med = S.bootstrap_ci([1.0, 2.0, 3.0, 100.0, np.nan], stat=np.median, n_boot=500, seed=0)
    assert 1.0 <= med[0] <= med[1] <= 100.0


def test_cluster_bootstrap_differs_from_row_bootstrap_on_constructed_data():
    # four questions of 100 answers each: two all EM, two none. Resampling answers gives ~0.5 +/- 0.05;
    # resampling questions draws k of 4 EM questions, k ~ Binomial(4, 1/2): P(k=0) = P(k=4) = 1/16 > 2.5%,
    # so the 95% interval is exactly [0, 1].
    y = np.r_[np.ones(100), np.zeros(100), np.ones(100), np.zeros(100)]
    q = np.repeat(np.arange(4), 100)
    assert S.bootstrap_ci(y, clusters=q, n_boot=2000, seed=0) == (0.0, 1.0)
    lo, hi = S.bootstrap_ci(y, n_boot=2000, seed=0)
    assert (lo, hi) == pytest.approx((0.5 - 1.96 * 0.025, 0.5 + 1.96 * 0.025), abs=0.006)
    # clusters of one row each resample exactly as rows do (same draws, mean of the drawn values)
    x = np.random.default_rng(2).normal(size=50)
    by_row = S.bootstrap_ci(x, clusters=np.arange(50), n_boot=300, seed=3)
    assert by_row == pytest.approx(S.mean_ci(x, n_boot=300, seed=3)[1:], abs=1e-12)


def test_bootstrap_bad_input():
    with pytest.raises(ValueError, match="values is empty"):
        S.bootstrap_ci([])
    with pytest.raises(ValueError, match="no non-missing value"):
        S.bootstrap_ci([np.nan, np.nan])
    with pytest.raises(ValueError, match="differ in length"):
        S.bootstrap_ci([1.0, 0.0], clusters=[1])
    with pytest.raises(ValueError, match="mean only"):
        S.bootstrap_ci([1.0, 0.0], clusters=[1, 2], stat=np.median)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        S.bootstrap_ci([1.0, 0.0], level=1.0)


def test_ratio_ci_is_the_token_weighted_cluster_bootstrap():
    num, den = np.array([2.0, 9.0, 1.0, 4.0]), np.array([4.0, 10.0, 2.0, 4.0])
    rng = np.random.default_rng(5)
    idx = rng.integers(0, 4, size=(400, 4))
    want = np.quantile(num[idx].sum(1) / den[idx].sum(1), [0.025, 0.975])
    assert S.ratio_ci(num, den, n_boot=400, seed=5) == pytest.approx(tuple(want))
    # a shared generator is advanced: two calls draw different resamples, reproducibly
    num, den = np.random.default_rng(0).random((2, 40)) + 0.5
    g = np.random.default_rng(5)
    first, second = S.ratio_ci(num, den, n_boot=400, seed=g), S.ratio_ci(num, den, n_boot=400, seed=g)
    assert first == S.ratio_ci(num, den, n_boot=400, seed=5) and second != first
    with pytest.raises(ValueError, match="differ in length"):
        S.ratio_ci([1.0], [1.0, 2.0])


# --------------------------------------------------------------------------- rates
def test_wilson_matches_newcombe_1998_and_the_closed_form():
    # Newcombe (1998), Stat Med 17:857, table I, method 3
    for k, n, lo, hi in ((81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
                         (1, 29, 0.0061, 0.1718)):
        assert S.wilson(k, n) == pytest.approx((lo, hi), abs=5e-5)
    z = st.norm.ppf(0.995)
    k, n = 17, 1199
    p = k / n
    mid, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert S.wilson(k, n, level=0.99) == pytest.approx((mid - half, mid + half), abs=1e-12)
    assert S.wilson(400, 400)[1] == 1.0 and S.wilson(0, 400)[0] == 0.0
    assert all(math.isnan(v) for v in S.wilson(0, 0) + S.wilson(3, float("nan")) + S.wilson(float("nan"), 10))
    with pytest.raises(ValueError, match="whole counts"):
        S.wilson(5, 4)
    with pytest.raises(ValueError, match="whole counts"):
        S.wilson(1.5, 4)


def test_widen_to_wilson():
    assert S.widen_to_wilson(0.0, 0.0, 0, 400) == (0.0, S.wilson(0, 400)[1])
    assert S.widen_to_wilson(0.1, 0.9, 5, 10) == (0.1, 0.9)  # already wider
    assert S.widen_to_wilson(0.2, 0.3, float("nan"), float("nan")) == (0.2, 0.3)


def test_two_rate_test_newcombe_example_and_fisher_by_hand():
    r = S.two_rate_test(56, 70, 48, 80)  # Newcombe (1998), Stat Med 17:873, example (a), method 10
    assert (r.p1, r.p2, r.diff) == pytest.approx((0.8, 0.6, 0.2))
    assert (r.lo, r.hi) == pytest.approx((0.0524, 0.3339), abs=5e-5)
    # 3 of 5 vs 0 of 5: hypergeometric P(a) = C(5,a) C(5,3-a) / C(10,3) = 10, 50, 50, 10 (/120) for a = 0..3;
    # two-sided p sums the tables as likely as or less likely than the observed one: (10 + 10) / 120
    r = S.two_rate_test(3, 5, 0, 5)
    assert r.p == pytest.approx(20 / 120) and r.lo > 0 > S.two_rate_test(0, 5, 3, 5).hi
    same = S.two_rate_test(10, 100, 10, 100)
    assert same.diff == 0 and same.p == pytest.approx(1.0) and same.lo < 0 < same.hi
    for bad in ((6, 5, 1, 5), (1, 0, 1, 5), (1.5, 5, 1, 5)):
        with pytest.raises(ValueError, match="whole counts"):
            S.two_rate_test(*bad)


# --------------------------------------------------------------------------- paired differences
def test_paired_diff_constant_and_zero_differences():
    a = np.arange(30, dtype=float)
    d = S.paired_diff_ci(a + 2.0, a, n_boot=999, seed=0)
    assert (d.estimate, d.lo, d.hi, d.n) == (2.0, 2.0, 2.0, 30)
    assert d.p == pytest.approx(2 / 1000)  # every bootstrap mean is > 0: the +1 keeps p above 0
    z = S.paired_diff_ci(a, a, n_boot=999, seed=0)
    assert (z.estimate, z.lo, z.hi, z.p) == (0.0, 0.0, 0.0, 1.0)


def test_paired_diff_normal_approximation_and_missing_pairs():
    rng = np.random.default_rng(3)
    b = rng.normal(size=400)
    a = b + 0.1 + rng.normal(scale=0.5, size=400)
    a[:5] = np.nan
    d = S.paired_diff_ci(a, b, n_boot=4000, seed=1)
    diff = (a - b)[5:]
    se = diff.std(ddof=1) / math.sqrt(diff.size)
    assert d.n == 395 and d.estimate == pytest.approx(diff.mean())
    assert (d.lo, d.hi) == pytest.approx((diff.mean() - 1.96 * se, diff.mean() + 1.96 * se), abs=0.15 * se)
    assert d.lo > 0 and d.p < 0.01  # 0.1 with se ~0.025: clearly above 0
    assert d == S.paired_diff_ci(a, b, n_boot=4000, seed=1)


def test_paired_diff_clustered_differs_from_unclustered():
    # two questions of 100 rows: a - b is 1 on every row of question 0 and 0 on question 1. Rows: mean 0.5,
    # never 0 in a resample. Questions: resampled means are 0, 0.5, 1 with chances 1/4, 1/2, 1/4.
    a = np.r_[np.ones(100), np.zeros(100)]
    b = np.zeros(200)
    q = np.repeat([0, 1], 100)
    rows = S.paired_diff_ci(a, b, n_boot=2000, seed=0)
    clustered = S.paired_diff_ci(a, b, clusters=q, n_boot=2000, seed=0)
    assert rows.estimate == clustered.estimate == 0.5
    assert rows.hi - rows.lo < 0.16 and rows.p == pytest.approx(2 / 2001)
    assert (clustered.lo, clustered.hi) == (0.0, 1.0)
    assert clustered.p == pytest.approx(2 * 0.25, abs=0.05)


def test_paired_diff_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        S.paired_diff_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="a is empty"):
        S.paired_diff_ci([], [])
    with pytest.raises(ValueError, match="no pair"):
        S.paired_diff_ci([np.nan], [1.0])
    with pytest.raises(ValueError, match="a and clusters differ"):
        S.paired_diff_ci([1.0, 2.0], [1.0, 2.0], clusters=[0])
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        S.paired_diff_ci([1.0, 2.0], [1.0, 2.0], level=0)


# --------------------------------------------------------------------------- multiple comparisons and nulls
def test_holm_hand_worked():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> 0.06, kept monotone)
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert S.holm([0.03]) == pytest.approx([0.03])
    assert S.holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # 0.4 x 2 = 0.8; 0.5 x 1 -> 0.8
    assert S.holm([0.9, 0.6, 0.7]) == pytest.approx([1.0, 1.0, 1.0])  # capped at 1
    for bad in ([], [0.1, np.nan], [1.2]):
        with pytest.raises(ValueError):
            S.holm(bad)


def test_null_percentile_edges():
    draws = np.arange(100, dtype=float)  # 0..99
    assert S.null_percentile(1000.0, draws) == pytest.approx(100 / 101)
    assert S.null_percentile(-1.0, draws) == 0.0
    assert S.null_percentile(50.0, draws) == pytest.approx(50 / 101)  # ties count against the value
    assert S.null_percentile(50.5, draws) == pytest.approx(51 / 101)
    assert S.exceeds_null(1000.0, draws) and not S.exceeds_null(95.0, draws)  # 95/101 = 0.941
    assert S.exceeds_null(96.0, draws)  # 96/101 = 0.9505
    assert S.exceeds_null(1.0, np.zeros(19)) and not S.exceeds_null(1.0, np.zeros(18))  # 19/20 vs 18/19
    assert S.null_percentile(1.0, [0.0]) == 0.5
    with pytest.raises(ValueError, match="null_draws is empty"):
        S.null_percentile(1.0, [])
    with pytest.raises(ValueError, match="without NaN"):
        S.null_percentile(1.0, [0.0, np.nan])
    with pytest.raises(ValueError, match="without NaN"):
        S.null_percentile(float("nan"), [0.0])
    with pytest.raises(ValueError, match=r"q must be in \(0, 1\)"):
        S.exceeds_null(1.0, [0.0], q=95)


# --------------------------------------------------------------------------- ranks
def test_auroc_matches_pairwise_definition_and_mann_whitney():
    assert S.auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert S.auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert S.auroc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 30).astype(float)
    y = rng.random(30) < 0.4
    want = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(s[y], s[~y])])
    assert S.auroc(s, y) == pytest.approx(want)
    assert S.auroc(s, y) == pytest.approx(st.mannwhitneyu(s[y], s[~y]).statistic / (y.sum() * (~y).sum()))
    assert S.auroc([1, np.nan, 3], [0, 1, 1]) == 1.0  # missing scores dropped
    with pytest.raises(ValueError, match="both classes"):
        S.auroc([1, 2], [1, 1])
    with pytest.raises(ValueError, match="differ in length"):
        S.auroc([1, 2, 3], [1, 0])


def test_auroc_ci_seeded_and_clustered_wider():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 30).astype(float)
    y = rng.random(30) < 0.4
    lo, hi = S.auroc_ci(s, y, n_boot=300, seed=0)
    assert lo < S.auroc(s, y) < hi and (lo, hi) == S.auroc_ci(s, y, n_boot=300, seed=0)
    assert S.auroc_ci([1, 2, 3, 4], [0, 0, 1, 1], n_boot=200) == (1.0, 1.0)
    assert all(math.isnan(v) for v in S.auroc_ci([1, 2], [1, 1], n_boot=50))  # never both classes
    # 8 questions of 40 answers: on four the score separates the classes (+4), on four not at all. Resampling
    # questions changes that mix, so the clustered interval is much wider than the per-answer one (~3x).
    g = np.repeat(np.arange(8), 40)
    yy = np.tile(np.r_[np.ones(20, bool), np.zeros(20, bool)], 8)
    ss = np.r_[4.0, 4, 4, 4, 0, 0, 0, 0][g] * yy + np.random.default_rng(0).normal(size=g.size)
    rows = S.auroc_ci(ss, yy, n_boot=400, seed=1)
    clustered = S.auroc_ci(ss, yy, clusters=g, n_boot=400, seed=1)
    assert clustered[0] < rows[0] < S.auroc(ss, yy) < rows[1] < clustered[1]
    assert clustered[1] - clustered[0] > 2 * (rows[1] - rows[0])
    with pytest.raises(ValueError, match="differ in length"):
        S.auroc_ci([1.0, 2.0], [0, 1], clusters=[0])


def test_spearman():
    assert S.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert S.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1..5, y = [5, 6, 7, 8, 7] -> 1, 2, 3.5, 5, 3.5; Pearson of the ranks
    rx, ry = np.arange(1, 6.0), np.array([1, 2, 3.5, 5, 3.5])
    assert S.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert S.spearman([1, 2, np.nan, 3], [1, 2, 5, 3]) == pytest.approx(1.0)  # the NaN pair is dropped
    assert math.isnan(S.spearman([1, 2], [1, 2])) and math.isnan(S.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="differ in length"):
        S.spearman([1, 2, 3], [1, 2])
