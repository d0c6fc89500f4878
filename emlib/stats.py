"""Statistics for the book's claims: the one home of every interval, test, resampling scheme and correction.

Every function is deterministic given its ``seed``, raises one clear ``ValueError`` on bad input (empty
arrays, mismatched lengths, a level outside (0, 1)), and uses ``scipy.stats`` where scipy has the test or
interval. Missing values (NaN) are dropped where a docstring says so, never silently elsewhere.

Intervals of a mean or a rate
  * :func:`t_quantile`, :func:`mean_ci`: Student t quantile; mean with a percentile-bootstrap or t interval.
  * :func:`bootstrap_ci`: percentile bootstrap of a statistic, optionally resampling whole clusters (e.g.
    all answers to one question); :func:`ratio_ci`: the same for a ratio of per-cluster sums.
  * :func:`wilson`: Wilson score interval of k successes in n trials; :func:`widen_to_wilson`.
Comparisons
  * :func:`paired_diff_ci`: bootstrap CI and p-value of mean(a - b) over paired rows (optionally clustered);
    :func:`paired_diff_seeds_ci`: the same over rows paired within several training seeds, seed variance included.
  * :func:`two_rate_test`: two independent rates: Newcombe's CI of the difference and Fisher's exact p.
  * :func:`holm`: Holm-Bonferroni adjusted p-values for "any of K" comparisons.
  * :func:`null_percentile`, :func:`exceeds_null`: an observed value against draws from a null.
Ranks
  * :func:`auroc`, :func:`auroc_ci`: area under the ROC curve and its (clustered) bootstrap CI.
  * :func:`spearman`: Spearman rank correlation of paired values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats as _st

Seed = int | np.random.Generator  # an int seeds a fresh generator; a Generator is drawn from (and advanced)


# =========================================================================== checks
def _check_level(level: float, name: str = "level") -> None:
    if not 0 < level < 1:
        raise ValueError(f"{name} must be in (0, 1), got {level}.")


def _check_n_boot(n_boot: int) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}.")


def _vector(values, name: str) -> np.ndarray:
    """``values`` as a 1-D float array; ValueError when it is empty or not 1-D."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {x.shape}.")
    if x.size == 0:
        raise ValueError(f"{name} is empty.")
    return x


def _same_length(name_a: str, a, name_b: str, b) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} differ in length ({len(a)} vs {len(b)}).")


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# =========================================================================== intervals
def t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom: the ``t`` with ``P(T <= t) = q``."""
    if not 0 < q < 1 or df < 1:
        raise ValueError("t_quantile needs 0 < q < 1 and df >= 1.")
    return float(_st.t.ppf(q, df))


def mean_ci(values: Sequence[float], ci: str = "bootstrap", level: float = 0.95, n_boot: int = 2000,
            seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of ``values`` (NaNs dropped): percentile bootstrap or Student t interval.

    ``ci="t"``: ``mean -/+ t_{(1+level)/2, n-1} * sd / sqrt(n)``. ``ci="bootstrap"``: the
    ``(1-level)/2`` and ``(1+level)/2`` quantiles of ``n_boot`` resampled means (``numpy`` generator
    seeded with ``seed``). No values: all NaN; one value: (value, NaN, NaN).
    """
    _check_level(level)
    if ci not in ("bootstrap", "t"):
        raise ValueError(f"ci must be 'bootstrap' or 't', got {ci!r}.")
    x = np.asarray([v for v in values if v == v], dtype=float)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(x.mean())
    if x.size == 1:
        return m, float("nan"), float("nan")
    if ci == "t":
        half = t_quantile(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
        return m, m - half, m + half
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # [n_boot]
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return m, float(lo), float(hi)


def _percentile_interval(boots: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _ratio_boots(sums: np.ndarray, counts: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot] ratios sum(sums) / sum(counts) over clusters resampled with replacement."""
    idx = rng.integers(0, len(sums), size=(n_boot, len(sums)))  # [n_boot, clusters]
    return sums[idx].sum(1) / counts[idx].sum(1)


def _row_boots(x: np.ndarray, f: Callable[[np.ndarray], float], n_boot: int,
               rng: np.random.Generator) -> np.ndarray:
    """[n_boot] values of ``f`` on rows of ``x`` resampled with replacement (in chunks of ~2M values)."""
    boots = np.empty(n_boot)
    chunk = max(1, 2_000_000 // x.size)
    for s in range(0, n_boot, chunk):
        idx = rng.integers(0, x.size, size=(min(chunk, n_boot - s), x.size))  # [chunk, n]
        boots[s:s + idx.shape[0]] = [f(row) for row in x[idx]]
    return boots


def _cluster_sums(x: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster (sorted by label): the sum of ``x`` and the number of rows."""
    _, inv = np.unique(clusters, return_inverse=True)
    return np.bincount(inv, weights=x), np.bincount(inv).astype(float)


def _mean_boots(x: np.ndarray, clusters: np.ndarray | None, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot] bootstrap means of ``x``: rows resampled, or whole clusters (mean over all their rows)."""
    if clusters is None:
        return _row_boots(x, np.mean, n_boot, rng)
    return _ratio_boots(*_cluster_sums(x, clusters), n_boot, rng)


def bootstrap_ci(values: Sequence[float], *, stat: Callable[[np.ndarray], float] | None = None,
                 clusters: Sequence | None = None, n_boot: int = 2000, level: float = 0.95,
                 seed: Seed = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat`` (default: the mean) over ``values``; NaN values are dropped.

    The interval is the ``(1-level)/2`` and ``(1+level)/2`` quantiles of ``stat`` on ``n_boot`` resamples.
    ``clusters`` (one label per value): resample whole clusters instead of values (e.g. all answers to
    one question, which are correlated); each resample's statistic is then the mean over all rows of
    the drawn clusters (only the mean is supported). For 0/1 values without clusters the resampled mean
    is drawn from its exact law, Binomial(n, mean) / n, which is the same distribution as resampling.
    """
    x = _vector(values, "values")
    _check_level(level)
    _check_n_boot(n_boot)
    keep = ~np.isnan(x)
    g = None
    if clusters is not None:
        _same_length("values", x, "clusters", clusters)
        if stat is not None:
            raise ValueError("The cluster bootstrap supports the mean only (stat=None).")
        g = np.asarray(clusters)[keep]
    x = x[keep]
    if x.size == 0:
        raise ValueError("values has no non-missing value to bootstrap.")
    rng = _rng(seed)
    if g is None and stat is None and np.isin(x, (0.0, 1.0)).all():
        boots = rng.binomial(x.size, x.mean(), size=n_boot) / x.size
    elif g is None:
        boots = _row_boots(x, stat or np.mean, n_boot, rng)
    else:
        boots = _mean_boots(x, g, n_boot, rng)
    return _percentile_interval(boots, level)


def ratio_ci(num: Sequence[float], den: Sequence[float], *, n_boot: int = 1000, level: float = 0.95,
             seed: Seed = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``sum(num) / sum(den)`` resampling the paired entries (clusters).

    E.g. a token-weighted mean over documents: ``num`` the per-document sum, ``den`` its token count.
    """
    s, c = _vector(num, "num"), _vector(den, "den")
    _same_length("num", s, "den", c)
    _check_level(level)
    _check_n_boot(n_boot)
    return _percentile_interval(_ratio_boots(s, c, n_boot, _rng(seed)), level)


def wilson(k: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (``scipy.stats.binomtest``'s).

    The interval ``(p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`` with ``p = k/n`` and
    ``z`` the ``(1+level)/2`` normal quantile; exactly 0 at k = 0 and 1 at k = n. No trials (``n`` 0 or
    NaN) or an unknown ``k``: (nan, nan).
    """
    _check_level(level)
    if not n or n != n or k != k:
        return float("nan"), float("nan")
    if k != int(k) or n != int(n) or not 0 <= k <= n:
        raise ValueError(f"wilson needs whole counts 0 <= k <= n, got k={k}, n={n}.")
    ci = _st.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


def widen_to_wilson(lo: float, hi: float, k: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """The interval (lo, hi) widened to cover the Wilson interval of ``k`` of ``n`` (unchanged without
    counts): a bootstrap interval of a rate is [0, 0] for 0 hits, which claims more than the data say."""
    wl, wh = wilson(k, n, level)
    return (lo, hi) if wl != wl else (min(lo, wl), max(hi, wh))


# =========================================================================== comparisons
@dataclass(frozen=True)
class PairedDiff:
    """mean(a - b) over paired rows with its bootstrap interval and two-sided bootstrap p-value."""

    estimate: float
    lo: float
    hi: float
    n: int  # pairs used (both values present)
    p: float


def paired_diff_ci(a: Sequence[float], b: Sequence[float], *, clusters: Sequence | None = None,
                   n_boot: int = 2000, level: float = 0.95, seed: Seed = 0) -> PairedDiff:
    """Bootstrap CI of ``mean(a - b)`` over paired rows (row i of ``a`` with row i of ``b``).

    Pairs where either value is NaN are dropped. Resamples rows, or whole ``clusters`` (one label per
    row, e.g. the question or the noise draw; the statistic is then the mean over all rows of the drawn
    clusters). The interval is the percentile interval at ``level``; the two-sided p-value is
    ``min(1, 2 * min(#{d* <= 0} + 1, #{d* >= 0} + 1) / (n_boot + 1))`` over the bootstrap means ``d*``
    (small when the bootstrap distribution lies on one side of 0; the +1 keeps it above 0).
    """
    x, y = _vector(a, "a"), _vector(b, "b")
    _same_length("a", x, "b", y)
    _check_level(level)
    _check_n_boot(n_boot)
    d = x - y  # [n]
    keep = ~np.isnan(d)
    g = None
    if clusters is not None:
        _same_length("a", x, "clusters", clusters)
        g = np.asarray(clusters)[keep]
    d = d[keep]
    if d.size == 0:
        raise ValueError("a and b have no pair where both values are present.")
    boots = _mean_boots(d, g, n_boot, _rng(seed))
    lo, hi = _percentile_interval(boots, level)
    tail = min(int((boots <= 0).sum()), int((boots >= 0).sum())) + 1
    return PairedDiff(float(d.mean()), lo, hi, int(d.size), min(1.0, 2 * tail / (n_boot + 1)))


def paired_diff_seeds_ci(a, b, *, n_boot: int = 2000, level: float = 0.95, seed: Seed = 0) -> PairedDiff:
    """``mean(a - b)`` over rows paired within each training seed, with an interval that includes the
    training-seed variance. ``a``, ``b``: [seeds, rows] (row i of seed s of ``a`` with the same of ``b``;
    a 1-D input is one seed); NaN pairs dropped.

    One seed: :func:`paired_diff_ci` over the rows. Several: the union of (i) the Student t interval over the
    seeds' mean differences (``t_{(1+level)/2, S-1} * sd / sqrt(S)``, the training-seed variance) and (ii)
    :func:`paired_diff_ci` of the per-row differences averaged over the seeds (the row/draw variance); the
    p-value is the larger of the one-sample t-test's over the seeds and that bootstrap p. The estimate is
    the mean over seeds of each seed's mean difference; ``n`` counts rows.
    """
    x, y = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if x.shape != y.shape or x.ndim != 2 or x.size == 0:
        raise ValueError(f"a and b must be [seeds, rows] arrays of one shape, got {x.shape} and {y.shape}.")
    d = x - y  # [S, n]
    per_seed = np.array([np.nanmean(r) if (~np.isnan(r)).any() else np.nan for r in d])  # [S]
    per_seed = per_seed[~np.isnan(per_seed)]
    if per_seed.size == 0:
        raise ValueError("a and b have no pair where both values are present.")
    with np.errstate(all="ignore"):
        rows = np.nanmean(d, axis=0) if d.shape[0] > 1 else d[0]  # [n] (all-NaN columns stay NaN)
    boot = paired_diff_ci(rows, np.zeros_like(rows), n_boot=n_boot, level=level, seed=seed)
    if per_seed.size < 2:
        return boot
    est = float(per_seed.mean())
    half = t_quantile(0.5 + level / 2, per_seed.size - 1) * per_seed.std(ddof=1) / math.sqrt(per_seed.size)
    p_t = float(_st.ttest_1samp(per_seed, 0.0).pvalue) if per_seed.std(ddof=1) > 0 else float(est == 0)
    return PairedDiff(est, min(est - half, boot.lo), max(est + half, boot.hi), boot.n, max(p_t, boot.p))


@dataclass(frozen=True)
class RateDiff:
    """Two independent rates k1/n1 and k2/n2: their difference with Newcombe's CI and Fisher's exact p."""

    p1: float
    p2: float
    diff: float  # p1 - p2
    lo: float
    hi: float
    p: float  # Fisher's exact test, two-sided


def two_rate_test(k1: int, n1: int, k2: int, n2: int, *, level: float = 0.95) -> RateDiff:
    """Compare two independent rates (e.g. EM of two models): ``p1 - p2`` with Newcombe's hybrid score
    interval (method 10 of Newcombe 1998, from the two Wilson intervals ``[l_i, u_i]``:
    ``d - sqrt((p1-l1)^2 + (u2-p2)^2)``, ``d + sqrt((u1-p1)^2 + (p2-l2)^2)``) and the two-sided p-value
    of Fisher's exact test on the 2x2 table (``scipy.stats.fisher_exact``).

    Treats answers as independent: with many answers per question the interval is optimistic (use
    :func:`paired_diff_ci` or :func:`bootstrap_ci` with clusters for that).
    """
    for k, n, i in ((k1, n1, 1), (k2, n2, 2)):
        if k != int(k) or n != int(n) or n < 1 or not 0 <= k <= n:
            raise ValueError(f"two_rate_test needs whole counts 0 <= k{i} <= n{i} and n{i} >= 1, got {k} of {n}.")
    _check_level(level)
    k1, n1, k2, n2 = int(k1), int(n1), int(k2), int(n2)
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson(k1, n1, level), wilson(k2, n2, level)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    p = float(_st.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue)
    return RateDiff(p1, p2, d, lo, hi, min(1.0, p))


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order.

    With the m p-values sorted ascending, ``p_(1) <= ... <= p_(m)``: ``adj_(i) = max_{j <= i} min(1,
    (m - j + 1) p_(j))`` (step-down, so the adjusted values keep the order of the raw ones). Rejecting
    where ``adj <= alpha`` controls the family-wise error rate at ``alpha``.
    """
    p = _vector(pvalues, "pvalues")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"pvalues must lie in [0, 1] (no NaN), got {p.tolist()}.")
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))  # [m], sorted order
    out = np.empty(m)
    out[order] = adj
    return out


def null_percentile(value: float, null_draws: Sequence[float]) -> float:
    """Where ``value`` falls among N draws from a null, as a fraction in [0, 1): ``#{draws < value} / (N + 1)``.

    That is ``1 - p`` for the one-sided permutation p-value ``p = (1 + #{draws >= value}) / (N + 1)``
    (the +1 counts the observed value as one draw, so p > 0). Ties count against ``value``. Above all of
    100 draws gives 100/101 = 0.990; below all gives 0.
    """
    draws = _vector(null_draws, "null_draws")
    if value != value or np.isnan(draws).any():
        raise ValueError("null_percentile needs a non-missing value and null draws without NaN.")
    return float((draws < value).sum() / (draws.size + 1))


def exceeds_null(value: float, null_draws: Sequence[float], q: float = 0.95) -> bool:
    """True when ``value`` is above the null's ``q`` quantile in the sense of :func:`null_percentile`
    (``null_percentile >= q``, i.e. the one-sided permutation p-value is at most ``1 - q``). Needs at least
    ``q / (1 - q)`` draws (19 for q = 0.95) to be able to say True."""
    _check_level(q, "q")
    return null_percentile(value, null_draws) >= q - 1e-12


# =========================================================================== ranks
def auroc(scores: Sequence[float], labels: Sequence) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half.

    Computed as the Mann-Whitney U of the positives over ``n_pos * n_neg`` (midranks from
    ``scipy.stats.rankdata``). ``labels``: truthy = positive. Pairs with a missing score are dropped.
    Raises ValueError when the lengths differ or a class is empty.
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length ({s.size} vs {y.size}).")
    keep = ~np.isnan(s)
    s, y = s[keep], y[keep]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes with scores (got {n_pos} positive, {n_neg} negative).")
    ranks = _st.rankdata(s)  # midranks for ties
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_ci(scores: Sequence[float], labels: Sequence, *, clusters: Sequence | None = None, n_boot: int = 1000,
             level: float = 0.95, seed: Seed = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of :func:`auroc`, resampling rows or whole ``clusters`` (e.g. pair ids).

    Rows with a missing score are dropped first. Resamples that lose a class are skipped; (nan, nan)
    when no resample has both classes.
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length ({s.size} vs {y.size}).")
    _check_level(level)
    _check_n_boot(n_boot)
    g = np.arange(len(s)) if clusters is None else np.asarray(clusters)
    _same_length("scores", s, "clusters", g)
    keep = ~np.isnan(s)
    s, y, g = s[keep], y[keep], g[keep]
    uniq, inv = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(inv == k) for k in range(len(uniq))]
    rng = _rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(uniq), len(uniq))]) if len(uniq) else []
        yy = y[idx]
        if yy.any() and (~yy).any():
            vals.append(auroc(s[idx], yy))
    if not vals:
        return float("nan"), float("nan")
    return _percentile_interval(np.asarray(vals), level)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (``scipy.stats.spearmanr``) on the pairs where both values are present;
    NaN with fewer than 3 such pairs or when one side is constant."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    _same_length("x", a, "y", b)
    ok = ~np.isnan(a) & ~np.isnan(b)
    a, b = a[ok], b[ok]
    if a.size < 3 or np.unique(a).size < 2 or np.unique(b).size < 2:
        return float("nan")
    return float(_st.spearmanr(a, b).statistic)
