"""The book's figures: the aligned-vs-coherent quadrant scatter and EM bar charts (claim 1), cosine
similarity of directions (claim 2), loss vs norm, stability and pretraining KL (claims 4-6).

One function per figure kind; each takes the tidy frames of :mod:`emlib.judge` / :mod:`emlib.metrics` /
:mod:`emlib.directions` / :mod:`emlib.inductive`, draws with seaborn on a given (or new) matplotlib Axes,
and returns the Axes.
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


def plot_judge_calibration(per_file: pd.DataFrame, ax=None, *, judge: str = "judge", min_rows: int = 20,
                           figsize_per_panel: tuple[float, float] = (4.2, 4.2), title: str | None = None):
    """Predicted vs reference EM rate per file (:func:`emlib.judge_eval.per_file_em`), in percent, with the
    diagonal and a +-2-point band (issue 16's per-file target).

    One panel per value of the ``judge`` column when ``ax`` is None (returns the array of Axes); on a given
    ``ax`` all judges share it with one hue each (returns that Axes). Point size grows with the file's
    reference-scored rows; curated files (which over-sample EM) are drawn as crosses and, like files with
    fewer than ``min_rows`` scored rows, left out of the mean error written in each panel.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    data = per_file.copy()
    if judge not in data.columns:
        data[judge] = "judge"
    data["ref %"] = 100.0 * data["ref_em"].astype(float)
    data["pred %"] = 100.0 * data["pred_em"].astype(float)
    data["curated"] = data["curated"].astype(bool) if "curated" in data else False
    data["file type"] = np.where(data["curated"], "curated", "base rate")
    data = data.dropna(subset=["ref %", "pred %"])
    judges = list(dict.fromkeys(data[judge]))
    top = max(10.0, float(np.nanmax(data[["ref %", "pred %"]].to_numpy())) * 1.05) if len(data) else 100.0
    single = ax is not None
    if single:
        axes = [ax] * max(1, len(judges))
    else:
        n = max(1, len(judges))
        fig, grid = plt.subplots(1, n, figsize=(figsize_per_panel[0] * n, figsize_per_panel[1]), squeeze=False,
                                 sharex=True, sharey=True)
        axes = list(grid[0])
    colors = sns.color_palette(n_colors=max(1, len(judges)))
    for j, (name, a) in enumerate(zip(judges, axes)):
        sub = data[data[judge] == name]
        for kind, marker in (("base rate", "o"), ("curated", "X")):
            part = sub[sub["file type"] == kind]
            if part.empty:
                continue
            sizes = 12 + 40 * np.sqrt(part["n_ref"].astype(float) / max(1.0, float(data["n_ref"].max())))
            a.scatter(part["ref %"], part["pred %"], s=sizes, marker=marker, alpha=0.6, edgecolor="none",
                      color=colors[j], label=f"{name}" + (" (curated)" if kind == "curated" else ""))
        used = sub[(~sub["curated"]) & (sub["n_ref"] >= min_rows)]
        err = float((used["pred %"] - used["ref %"]).abs().mean()) if len(used) else float("nan")
        if not single:
            a.set_title(f"{name}: mean |error| {err:.1f} pts ({len(used)} files)", fontsize=9)
    for a in dict.fromkeys(axes):
        a.plot([0, top], [0, top], color="grey", lw=1, ls="--")
        a.fill_between([0, top], [-2, top - 2], [2, top + 2], color="grey", alpha=0.12, lw=0)
        a.set(xlim=(-1, top), ylim=(-1, top), xlabel="reference EM rate per file (%)",
              ylabel="predicted EM rate per file (%)")
        a.set_aspect("equal", adjustable="box")
    if single:
        axes[0].legend(fontsize=8, title=judge)
        if title:
            axes[0].set_title(title)
        return axes[0]
    if title:
        axes[0].figure.suptitle(title)
    axes[0].figure.tight_layout()
    return np.asarray(axes)


# =========================================================================== directions (claim 2)
def plot_cosine_matrix(cos: pd.DataFrame, ax=None, title: str | None = None, annot: bool = True):
    """Seaborn heatmap of an :func:`emlib.directions.cosine_matrix` result (colour scale fixed to [-1, 1])."""
    import seaborn as sns

    size = 1.2 + 0.7 * len(cos)
    ax = _axes(ax, (size + 1.5, size))
    sns.heatmap(cos, vmin=-1, vmax=1, center=0, cmap="vlag", annot=annot, fmt=".2f", square=True,
                cbar_kws={"label": "cosine similarity"}, ax=ax)
    ax.set(xlabel="", ylabel="", title=title or "Cosine similarity of directions")
    return ax


def plot_layerwise_cosine(frames: pd.DataFrame | dict[str, pd.DataFrame], ax=None, title: str | None = None):
    """Line plot of :func:`emlib.directions.layerwise_cosine` results (one line per named pair)."""
    import seaborn as sns

    if isinstance(frames, dict):
        frames = pd.concat([f.assign(pair=k) for k, f in frames.items()], ignore_index=True)
    ax = _axes(ax, (6, 3.5))
    sns.lineplot(data=frames, x="layer", y="cosine", hue="pair" if "pair" in frames.columns else None,
                 marker="o", ax=ax)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(ylim=(-1.05, 1.05), ylabel="cosine similarity", title=title or "Cosine similarity by layer")
    return ax


def plot_layerwise_heatmap(directions: dict, reference: str, ax=None, title: str | None = None):
    """Heatmap of the cosine of every direction ([n_layers, d] tensors) with ``reference``, layer by layer
    (rows: directions)."""
    import seaborn as sns

    from .directions import DirectionError, layerwise_cosine

    if reference not in directions:
        raise DirectionError(f"reference {reference!r} is not among the directions {sorted(directions)}.")
    ref = directions[reference]
    data = pd.DataFrame({k: layerwise_cosine(v, ref)["cosine"].to_numpy() for k, v in directions.items()
                         if k != reference}).T
    ax = _axes(ax, (min(14, 2 + 0.35 * data.shape[1]), 1 + 0.5 * len(data)))
    sns.heatmap(data, vmin=-1, vmax=1, center=0, cmap="vlag", cbar_kws={"label": f"cosine with {reference}"},
                ax=ax)
    ax.set(xlabel="layer", ylabel="", title=title or f"Cosine with {reference}, by layer")
    return ax


# =========================================================================== inductive biases (claims 4-6)
def plot_loss_vs_norm(frame: pd.DataFrame, ax=None):
    """Loss vs norm of :func:`emlib.inductive.loss_vs_norm` (lines: the shared grid, one per solution;
    stars: each solution at its trained norm)."""
    import seaborn as sns

    ax = _axes(ax, (5.5, 3.8))
    grid = frame[frame["kind"] == "grid"]
    sns.lineplot(data=grid, x="norm", y="loss", hue="solution", marker="o", ax=ax)
    trained = frame[frame["kind"] == "trained"]
    sns.scatterplot(data=trained, x="norm", y="loss", hue="solution", marker="*", s=250, ax=ax, legend=False,
                    edgecolor="black")
    ax.set(xlabel="parameter norm (shared grid)", ylabel="responses-only SFT loss",
           title="Efficiency: loss at equal norm")
    return ax


def plot_stability(summary: pd.DataFrame, ax=None):
    """Normalised loss increase (%) vs perturbation size eps (:func:`emlib.inductive.stability_curve`),
    one line per solution with its CI band."""
    import seaborn as sns

    ax = _axes(ax, (5.5, 3.8))
    names = list(dict.fromkeys(summary["solution"]))
    palette = dict(zip(names, sns.color_palette(n_colors=len(names))))
    sns.lineplot(data=summary, x="eps", y="normalised", hue="solution", palette=palette, marker="o", ax=ax)
    for name, g in summary.groupby("solution"):
        g = g.sort_values("eps")
        ax.fill_between(g["eps"], g["ci_low"], g["ci_high"], alpha=0.15, color=palette[name])
    ax.axhline(100, ls=":", c="grey")
    ax.set(xlabel="perturbation size eps", ylabel="(L_pert - L_orig) / (L_base - L_orig)  [%]",
           title="Stability under orthogonal perturbation")
    return ax


def plot_paired_difference(frame: pd.DataFrame, x: str, ax=None, hue: str | None = None,
                           ylabel: str = "narrow - general", title: str | None = None):
    """A paired difference (``diff`` with ``ci_low`` / ``ci_high``, e.g. :func:`emlib.inductive.paired_gaps` or
    :func:`emlib.inductive.paired_stability`) against ``x``, one line and CI band per ``hue`` value; 0 dashed
    (above it: the general solution is lower / degrades less)."""
    import seaborn as sns

    ax = _axes(ax, (5.5, 3.8))
    groups = [(None, frame)] if hue is None else list(frame.groupby(hue, sort=False))
    colors = sns.color_palette(n_colors=max(1, len(groups)))
    for (name, g), color in zip(groups, colors):
        g = g.sort_values(x)
        ax.plot(g[x], g["diff"], marker="o", color=color, label=name)
        ax.fill_between(g[x], g["ci_low"], g["ci_high"], alpha=0.2, color=color)
    ax.axhline(0, ls="--", c="grey")
    if hue is not None:
        ax.legend(title=hue, fontsize=8)
    ax.set(xlabel=x, ylabel=ylabel, title=title or "Paired difference with its 95% CI")
    return ax


def plot_pretraining_kl(frame: pd.DataFrame, ax=None, null: pd.DataFrame | None = None):
    """KL(base || steered) per token vs vector norm (:func:`emlib.inductive.pretraining_kl`), one line per
    vector; with ``null`` (:func:`emlib.inductive.null_summary`) the random directions' 95th percentile, dashed."""
    import seaborn as sns

    ax = _axes(ax, (5.5, 3.8))
    sns.lineplot(data=frame, x="norm", y="kl", hue="solution", marker="o", ax=ax)
    if null is not None and len(null):
        ax.plot(null["norm"], null["null_p95"], color="black", ls="--", lw=1,
                label=f"random: 95th percentile of {int(null['n_draws'].iloc[0])}")
        ax.legend(fontsize=8)
    ax.set(xlabel="vector norm", ylabel="KL(base || steered) per token", title="Influence on pretraining text")
    return ax
