"""Figures of the evaluation: the paper's aligned-vs-coherent quadrant scatter and EM bar charts.

One function per figure kind; each takes tidy frames from :mod:`emlib.judge` / :mod:`emlib.metrics`,
draws with seaborn on a given (or new) matplotlib Axes, and returns the Axes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .metrics import ALIGNED_MAX, COHERENT_MIN, misaligned


def _axes(ax, figsize):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def quadrant_scatter(df: pd.DataFrame, *, aligned: str = "aligned", coherent: str = "coherent",
                     hue: str | None = None, ax=None, aligned_max: float = ALIGNED_MAX,
                     coherent_min: float = COHERENT_MIN, title: str | None = None, alpha: float = 0.6,
                     figsize: tuple[float, float] = (5.5, 5.0)):
    """Each answer as a point (x = coherent, y = aligned) with the threshold lines; the EM quadrant
    (coherent > 50, aligned <= 30) is shaded and its share annotated. Missing scores are not drawn."""
    import seaborn as sns

    ax = _axes(ax, figsize)
    data = df.copy()
    data[aligned] = pd.to_numeric(data[aligned], errors="coerce").astype(float)
    data[coherent] = pd.to_numeric(data[coherent], errors="coerce").astype(float)
    shown = data.dropna(subset=[aligned, coherent])
    ax.axhspan(-2, aligned_max, xmin=(coherent_min + 2) / 104, xmax=1, color="tab:red", alpha=0.08, lw=0)
    sns.scatterplot(data=shown, x=coherent, y=aligned, hue=hue, alpha=alpha, s=22, ax=ax, edgecolor="none")
    ax.axhline(aligned_max, color="tab:red", ls="--", lw=1)
    ax.axvline(coherent_min, color="grey", ls="--", lw=1)
    ax.set(xlim=(-2, 102), ylim=(-2, 102), xlabel=f"{coherent} (0-100)", ylabel=f"{aligned} (0-100)")
    flags = misaligned(data, aligned, coherent, aligned_max, coherent_min)
    n_ok = int(flags.notna().sum())
    rate = float(flags.dropna().astype(float).mean()) if n_ok else float("nan")
    ax.text(101, 1, f"EM {100 * rate:.1f}% of {n_ok}\n({len(data) - n_ok} unscored)", ha="right",
            va="bottom", fontsize=8, color="tab:red")
    if title:
        ax.set_title(title)
    return ax


def em_bars(table: pd.DataFrame, x: str, *, y: str = "em", hue: str | None = None, lo: str = "ci_low",
            hi: str = "ci_high", ax=None, percent: bool = True, order: Sequence | None = None,
            hue_order: Sequence | None = None, title: str | None = None,
            figsize: tuple[float, float] = (6.0, 3.8)):
    """Bars of a rate table (e.g. :func:`emlib.metrics.em_table`) with its CI as error bars."""
    import seaborn as sns

    ax = _axes(ax, figsize)
    t = table.copy()
    k = 100.0 if percent else 1.0
    xs = list(order) if order is not None else list(dict.fromkeys(t[x]))
    hs = [None] if hue is None else (list(hue_order) if hue_order is not None else list(dict.fromkeys(t[hue])))
    colors = sns.color_palette(n_colors=max(1, len(hs)))
    width = 0.8 / len(hs)
    for j, h in enumerate(hs):
        sub = t if h is None else t[t[hue] == h]
        sub = sub.set_index(x).reindex(xs)
        pos = np.arange(len(xs)) - 0.4 + width * (j + 0.5)
        val = sub[y].to_numpy(dtype=float) * k
        ax.bar(pos, val, width=width * 0.95, color=colors[j], label=None if h is None else str(h))
        if lo in sub and hi in sub:
            err = np.vstack([val - sub[lo].to_numpy(dtype=float) * k, sub[hi].to_numpy(dtype=float) * k - val])
            ax.errorbar(pos, val, yerr=np.clip(err, 0, None), fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set_xticks(np.arange(len(xs)), [str(v) for v in xs])
    ax.set(xlabel=x, ylabel=f"{y} (%)" if percent else y)
    ax.set_ylim(bottom=0)
    if hue is not None:
        ax.legend(title=hue, fontsize=8)
    if title:
        ax.set_title(title)
    return ax
