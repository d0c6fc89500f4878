"""Stability (claim 5): how fast each solution's loss degrades under orthogonal noise.

The parameters are perturbed orthogonally, ``x' = sqrt(1 - eps^2) x + eps y`` with ``y`` random,
orthogonal to ``x`` and ``||y|| = ||x||`` (:func:`emlib.vectors.orthogonal_perturbation`; every LoRA
``A`` and ``B`` matrix separately, or the vector), and :func:`stability_curve` reports
``(L_pert - L_orig) / (L_base - L_orig) * 100`` with a CI over perturbation seeds (0 % = unperturbed,
100 % = as bad as the base model).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch

from ..chat import response_loss
from ..stats import mean_ci
from .common import (PAPER_EPS_GRID, applied, as_solutions, base, cached, encode, key_parts, progress_bar,
                     rows_fingerprint, session)


def stability_losses(model, tok, rows, solutions: Mapping, eps_grid: Sequence[float] = PAPER_EPS_GRID,
                     n_seeds: int = 10, seed: int = 0, layer: int | None = None, batch_size: int = 8,
                     max_length: int = 512, cache_dir: str | Path | None = None, use_cache: bool = True,
                     progress: bool | None = None) -> pd.DataFrame:
    """Loss under orthogonal perturbations, one row per (solution, eps, seed).

    Seed ``seed + k`` drives draw ``k`` for every solution (paired comparison). Columns: solution, eps,
    seed, loss, loss_orig (unperturbed), loss_base (base model), normalised
    ``(loss - loss_orig) / (loss_base - loss_orig) * 100`` (NaN when the solution does not lower the loss).
    """
    sols = as_solutions(solutions, layer)
    enc = encode(rows, tok, max_length)
    if n_seeds < 1:
        raise ValueError("n_seeds must be >= 1.")
    if any(not 0 <= e <= 1 for e in eps_grid):
        raise ValueError(f"Every eps must be in [0, 1], got {list(eps_grid)}.")
    key = {**key_parts(model, tok, sols), "rows": rows_fingerprint(enc), "eps": list(eps_grid),
           "n_seeds": n_seeds, "seed": seed, "layer": layer, "batch_size": batch_size, "max_length": max_length}

    def compute() -> pd.DataFrame:
        recs = []
        with session(model, sols) as (m, adapters):
            with base(m, sols):
                loss_base = response_loss(m, tok, enc, batch_size)
            bar = progress_bar(len(sols) * (1 + len(eps_grid) * n_seeds), "stability", progress)
            for name, sol in sols.items():
                with applied(m, sol, adapters.get(name)):
                    orig = response_loss(m, tok, enc, batch_size)
                bar.update()
                den = loss_base - orig
                for eps in eps_grid:
                    for k in range(n_seeds):
                        g = torch.Generator().manual_seed(seed + k)
                        with applied(m, sol, adapters.get(name), eps=float(eps), generator=g):
                            loss = response_loss(m, tok, enc, batch_size)
                        norm = (loss - orig) / den * 100 if abs(den) > 1e-9 and den > 0 else float("nan")
                        recs.append({"solution": name, "eps": float(eps), "seed": seed + k, "loss": loss,
                                     "loss_orig": orig, "loss_base": loss_base, "normalised": norm})
                        bar.update()
            bar.close()
        return pd.DataFrame(recs)

    return cached("stability", key, compute, cache_dir, use_cache)


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
