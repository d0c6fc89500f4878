"""Statistics for the book's claims: the one home of every interval, test and resampling scheme.

Every function here is deterministic given its ``seed``, raises one clear ``ValueError`` on bad input
(empty arrays, mismatched lengths, a level outside (0, 1)) and uses ``scipy.stats`` where scipy has the
test or interval.

* :func:`t_quantile`, :func:`mean_ci`: Student t quantile; mean with a percentile-bootstrap or t interval.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import stats as _st


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
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
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
