"""Stability (claim 5): how fast each solution's loss degrades under orthogonal noise.

Two kinds of noise (:func:`stability_losses`, ``noise=``):

* ``"relative"`` (the paper's): ``x' = sqrt(1 - eps^2) x + eps y`` with ``y`` random, orthogonal to ``x`` and
  ``||y|| = ||x||`` (:func:`emlib.vectors.orthogonal_perturbation`; every LoRA ``A`` and ``B`` matrix
  separately, or the vector). The noise scales with the solution's own norm, so at one eps a solution 12x
  larger gets 12x more noise.
* ``"matched"``: ``x' = x + n`` with ``n`` orthogonal to ``x`` and ``||n|| = eps * ||x_ref||``, the norm of a
  common ``reference`` solution (for LoRA per matrix, :func:`emlib.adapters.noised`): every solution gets the
  same absolute noise at one eps. Its draws are the relative mode's at eps = 1, rescaled.

Both report ``(L_pert - L_orig) / (L_base - L_orig) * 100`` per draw (0 % = unperturbed, 100 % = as bad as
the base model); draw ``k`` is the same for every solution, so solutions compare draw by draw.
:func:`stability_curve` summarises one run with a CI over draws. Over several training seeds (a ``train_seed``
column), :func:`seed_curves` gives each solution's curve and :func:`paired_stability` the per-draw paired
difference narrow - general, both with :func:`emlib.stats.paired_diff_seeds_ci` (seed variance included).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..chat import response_loss
from ..stats import mean_ci, paired_diff_seeds_ci
from .common import (PAPER_EPS_GRID, Solution, applied, as_solutions, base, base_key_parts, cache_path, cached, encode,
                     noise_scale, progress_bar, reused_below, rows_fingerprint, session)
from ..timing import timed

NOISE_MODES = ("relative", "matched")


def _scaled(scale: float | Mapping[str, float], eps: float) -> float | dict[str, float]:
    return eps * scale if isinstance(scale, float) else {k: eps * v for k, v in scale.items()}


@timed("metrics")
def stability_losses(model, tok, rows, solutions: Mapping, eps_grid: Sequence[float] = PAPER_EPS_GRID,
                     n_seeds: int = 10, seed: int = 0, layer: int | None = None, batch_size: int = 8,
                     max_length: int = 512, cache_dir: str | Path | None = None, use_cache: bool = True,
                     progress: bool | None = None, noise: str = "relative",
                     reference: str = "general") -> pd.DataFrame:
    """Loss under orthogonal perturbations, one row per (solution, eps, seed).

    Seed ``seed + k`` drives draw ``k`` for every solution (paired comparison). ``noise``: ``"relative"`` (the
    paper's) or ``"matched"`` (noise of norm eps x the norm of the solution named ``reference``, added to
    every solution; see the module doc). Columns: solution, eps, seed, loss, loss_orig (unperturbed),
    loss_base (base model), normalised ``(loss - loss_orig) / (loss_base - loss_orig) * 100`` (NaN when the
    solution does not lower the loss). At ``eps = 0`` both modes leave the solution as it is (the perturbation
    and the noise are zero), so those draws are its unperturbed loss and take no forward pass.
    """
    sols = as_solutions(solutions, layer)
    enc = encode(rows, tok, max_length)
    if n_seeds < 1:
        raise ValueError("n_seeds must be >= 1.")
    if any(not 0 <= e <= 1 for e in eps_grid):
        raise ValueError(f"Every eps must be in [0, 1], got {list(eps_grid)}.")
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}.")
    if noise == "matched" and reference not in sols:
        raise ValueError(f"The matched noise is eps x the norm of the reference solution {reference!r}, which is "
                         f"not among the solutions {sorted(sols)}.")
    common = {**base_key_parts(model, tok), "rows": rows_fingerprint(enc),
              "eps": list(eps_grid), "n_seeds": n_seeds, "seed": seed, "layer": layer, "batch_size": batch_size,
              "max_length": max_length,
              **({"noise": noise, "reference": sols[reference].fingerprint()} if noise != "relative" else {})}
    # one cache entry per solution: its draws do not depend on the others (draw k is seed + k for each; the
    # matched noise on the reference's norm, which the key holds), so a solution measured in one call is read
    # in another (chapter 5 measures the general solutions before chapter 3 has chosen the narrow ones)
    keys = {name: {**common, "solution": sol.fingerprint()} for name, sol in sols.items()}
    todo = [n for n in sols if not use_cache or not cache_path("stability", keys[n], cache_dir).exists()]
    fresh = _measure(model, tok, enc, sols, todo, eps_grid, n_seeds, seed, batch_size, progress, noise,
                     reference) if todo else {}
    frames = [cached("stability", keys[n], (lambda n=n: fresh[n]), cache_dir, use_cache and n not in fresh)
              .assign(solution=n) for n in sols]
    return pd.concat(frames, ignore_index=True)[COLUMNS]


COLUMNS = ["solution", "eps", "seed", "loss", "loss_orig", "loss_base", "normalised"]


def _measure(model, tok, enc, sols: Mapping[str, Solution], names: Sequence[str], eps_grid, n_seeds: int, seed: int,
             batch_size: int, progress, noise: str, reference: str) -> dict[str, pd.DataFrame]:
    """The draws of the solutions ``names`` (a frame each, :func:`stability_losses`'s columns); the base model's
    loss once for all of them. The reference solution is attached too in the matched mode (its norms)."""
    attach = {n: sols[n] for n in sols if n in names or (noise == "matched" and n == reference)}
    out = {}
    with session(model, attach) as (m, adapters), reused_below(m, {n: sols[n] for n in names}):
        with base(m, attach):
            loss_base = response_loss(m, tok, enc, batch_size)
        ref = noise_scale(m, sols[reference], adapters.get(reference)) if noise == "matched" else None
        bar = progress_bar(len(names) * (1 + len(eps_grid) * n_seeds), "stability", progress)
        for name in names:
            sol, recs = sols[name], []
            with applied(m, sol, adapters.get(name)):
                orig = response_loss(m, tok, enc, batch_size)
            bar.update()
            den = loss_base - orig
            for eps in eps_grid:
                for k in range(n_seeds):
                    if eps == 0:  # no noise in either mode: the solution itself, measured above
                        loss = orig
                    else:
                        g = torch.Generator().manual_seed(seed + k)
                        how = ({"eps": float(eps)} if ref is None else {"noise": _scaled(ref, float(eps))})
                        with applied(m, sol, adapters.get(name), generator=g, **how):
                            loss = response_loss(m, tok, enc, batch_size)
                    norm = (loss - orig) / den * 100 if abs(den) > 1e-9 and den > 0 else float("nan")
                    recs.append({"solution": name, "eps": float(eps), "seed": seed + k, "loss": loss,
                                 "loss_orig": orig, "loss_base": loss_base, "normalised": norm})
                    bar.update()
            out[name] = pd.DataFrame(recs, columns=COLUMNS)
        bar.close()
    return out


def summarise_stability(raw: pd.DataFrame, ci: str = "bootstrap", level: float = 0.95, n_boot: int = 2000,
                        seed: int = 0) -> pd.DataFrame:
    """Per (solution, eps): mean normalised loss increase (%) with a CI over seeds, and the mean raw loss."""
    recs = []
    for (name, eps), g in raw.groupby(["solution", "eps"], sort=False):
        m, lo, hi = mean_ci(g["normalised"].tolist(), ci, level, n_boot, seed)
        recs.append({"solution": name, "eps": eps, "normalised": m, "ci_low": lo, "ci_high": hi,
                     "loss": g["loss"].mean(), "loss_orig": g["loss_orig"].iloc[0],
                     "loss_base": g["loss_base"].iloc[0], "n_seeds": int(g["normalised"].notna().sum())})
    return pd.DataFrame(recs)


def stability_curve(model, tok, rows, solutions: Mapping, eps_grid: Sequence[float] = PAPER_EPS_GRID,
                    n_seeds: int = 10, seed: int = 0, ci: str = "bootstrap", level: float = 0.95,
                    **kwargs) -> pd.DataFrame:
    """:func:`stability_losses` summarised by :func:`summarise_stability` (one row per solution and eps)."""
    raw = stability_losses(model, tok, rows, solutions, eps_grid, n_seeds, seed, **kwargs)
    return summarise_stability(raw, ci=ci, level=level)


# =========================================================================== over training seeds, paired
def _with_seed(raw: pd.DataFrame, seed_col: str) -> pd.DataFrame:
    return raw if seed_col in raw.columns else raw.assign(**{seed_col: 0})


def _draws(g: pd.DataFrame, solution: str, seed_col: str) -> np.ndarray:
    """[training seeds, draws] normalised losses of one solution (NaN where a seed lacks a draw)."""
    w = g[g["solution"] == solution].pivot_table(index=seed_col, columns="seed", values="normalised", dropna=False)
    return w.to_numpy(dtype=float)


def seed_curves(raw: pd.DataFrame, by: Sequence[str] = (), seed_col: str = "train_seed", level: float = 0.95,
                n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per (``by`` columns, solution, eps): the mean normalised loss over training seeds and draws, with the CI
    of :func:`emlib.stats.paired_diff_seeds_ci` against 0 (draws bootstrapped; with several training seeds
    widened by their t interval). Columns: *by, solution, eps, normalised, ci_low, ci_high, loss, loss_orig,
    loss_base (means over seeds), n_draws, n_seeds."""
    raw = _with_seed(raw, seed_col)
    recs = []
    for key, g in raw.groupby([*by, "solution", "eps"], sort=False):
        x = _draws(g, key[-2], seed_col)
        if np.isnan(x).all():
            est, lo, hi = (float("nan"),) * 3
        else:
            r = paired_diff_seeds_ci(x, np.zeros_like(x), n_boot=n_boot, level=level, seed=seed)
            est, lo, hi = r.estimate, r.lo, r.hi
        recs.append({**dict(zip([*by, "solution", "eps"], key)), "normalised": est, "ci_low": lo, "ci_high": hi,
                     "loss": g["loss"].mean(), "loss_orig": g["loss_orig"].mean(), "loss_base": g["loss_base"].mean(),
                     "n_draws": int(g["normalised"].notna().sum()), "n_seeds": int(g[seed_col].nunique())})
    return pd.DataFrame(recs)


def paired_stability(raw: pd.DataFrame, a: str = "narrow", b: str = "general", by: Sequence[str] = (),
                     seed_col: str = "train_seed", level: float = 0.95, n_boot: int = 2000,
                     seed: int = 0) -> pd.DataFrame:
    """Per (``by`` columns, eps): the paired difference of normalised loss ``a - b`` over the same draws (and
    training seeds), with :func:`emlib.stats.paired_diff_seeds_ci`. Positive = ``a`` (narrow) degrades more.
    Columns: *by, eps, normalised_a, normalised_b (named with ``a`` and ``b``), diff, ci_low, ci_high, p,
    n_draws (pairs), n_seeds. Rows where either solution's normalised loss is NaN everywhere are left out."""
    raw = _with_seed(raw, seed_col)
    recs = []
    for key, g in raw.groupby([*by, "eps"], sort=True):
        key = key if isinstance(key, tuple) else (key,)
        xa, xb = _draws(g, a, seed_col), _draws(g, b, seed_col)
        if xa.shape != xb.shape:
            raise ValueError(f"paired_stability: {a!r} and {b!r} have different draws or seeds at {key}.")
        pair = ~np.isnan(xa - xb)
        if not pair.any():
            continue
        r = paired_diff_seeds_ci(xa, xb, n_boot=n_boot, level=level, seed=seed)
        recs.append({**dict(zip([*by, "eps"], key)), f"normalised_{a}": float(np.nanmean(xa)),
                     f"normalised_{b}": float(np.nanmean(xb)), "diff": r.estimate, "ci_low": r.lo, "ci_high": r.hi,
                     "p": r.p, "n_draws": int(pair.sum()), "n_seeds": int(xa.shape[0])})
    return pd.DataFrame(recs)
