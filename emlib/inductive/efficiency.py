"""Efficiency (claim 4): the loss each solution reaches at equal norm.

:func:`loss_vs_norm` rescales each solution to a grid of norms shared by all solutions (fractions of
their mean trained norm) and measures the responses-only SFT loss (:func:`emlib.chat.response_loss`) on a
fixed sample of training rows. Norms are those of :mod:`emlib.vectors` (``||alpha * v||``) and
:mod:`emlib.adapters` (``||scaling * B @ A||_F`` per module; with ``per="module"`` every module is
rescaled to the grid norm and a solution's trained norm is the mean over its modules). The statistic
``efficiency = loss / norm**2`` is a column; :func:`efficiency_summary` gives it at each solution's own
trained norm. :func:`by_family` stacks the frames of the two solution families for a chapter's table.

Paired comparison: :func:`row_losses_vs_norm` measures the same grid row by row, :func:`paired_gaps` gives per
grid norm the mean per-row loss difference narrow - general (same rows, same norm) with its bootstrap CI (and,
over several training seeds, an interval that includes their variance), :func:`norm_summary` the per-norm frame.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..adapters import check_per
from ..chat import response_loss, response_row_losses
from ..stats import paired_diff_seeds_ci
from .common import (PAPER_NORM_FRACTIONS, Solution, applied, as_solutions, cached, encode, key_parts,
                     progress_bar, reused_below, rows_fingerprint, session, solution_norm)
from ..timing import timed


def reference_norm(model, sols: Mapping[str, Solution], adapters: Mapping[str, str], per: str = "module") -> float:
    """The mean trained norm over all solutions (the 100 % point of the shared grid)."""
    return float(np.mean([solution_norm(model, s, adapters.get(k), per) for k, s in sols.items()]))


def _check_grid(fractions, norms, reference) -> None:
    if norms is None and fractions is None:
        raise ValueError("Pass a grid: fractions of the mean trained norm, or absolute norms.")
    if norms is not None and any(n < 0 for n in norms) or fractions is not None and any(f < 0 for f in fractions):
        raise ValueError("Norms and fractions must be >= 0.")
    if reference is not None and not reference > 0:
        raise ValueError(f"reference (the 100 % point of the grid) must be a norm > 0, got {reference}.")


def _sweep(model, tok, enc, sols, fractions, norms, reference, per, batch_size, progress,
           measure: Callable[..., list[dict]]) -> list[dict]:
    """Every solution at its trained norm and at each grid norm: ``measure(model, name, kind, norm, ref, own)``
    gives the records of one point (``ref``: the grid's 100 % point, ``own``: the solution's trained norm)."""
    recs = []
    with session(model, sols) as (m, adapters), reused_below(m, sols):
        ref = reference if reference is not None else reference_norm(m, sols, adapters, per)
        grid = [float(n) for n in norms] if norms is not None else [float(f) * ref for f in fractions]
        bar = progress_bar(len(sols) * (len(grid) + 1), "loss vs norm", progress)
        for name, sol in sols.items():
            own = solution_norm(m, sol, adapters.get(name), per)
            with applied(m, sol, adapters.get(name)):
                recs += measure(m, name, "trained", own, ref, own)
            bar.update()
            for target in grid:
                with applied(m, sol, adapters.get(name), target=target, per=per):
                    recs += measure(m, name, "grid", target, ref, own)
                bar.update()
        bar.close()
    return recs


@timed("metrics")
def loss_vs_norm(model, tok, rows, solutions: Mapping, fractions: Sequence[float] | None = PAPER_NORM_FRACTIONS,
                 norms: Sequence[float] | None = None, layer: int | None = None, per: str = "module",
                 batch_size: int = 8, max_length: int = 512, cache_dir: str | Path | None = None,
                 use_cache: bool = True, progress: bool | None = None,
                 reference: float | None = None) -> pd.DataFrame:
    """Responses-only SFT loss of each solution rescaled to a shared grid of norms.

    ``solutions``: name -> vector / vector file / adapter dir / PeftModel / solution object (all of one
    kind). The grid is ``norms`` (absolute) or ``fractions`` of ``reference`` (default: the mean trained norm
    of all solutions; pass one to share a grid between calls, e.g. over training seeds).
    Returns one row per (solution, grid point) with ``kind="grid"``, plus one ``kind="trained"`` row at
    each solution's own parameters. Columns: solution, kind, norm, scale (norm / reference), loss,
    efficiency (loss / norm^2; NaN at norm 0), trained_norm, reference_norm.
    """
    check_per(per)
    sols = as_solutions(solutions, layer)
    enc = encode(rows, tok, max_length)
    _check_grid(fractions, norms, reference)
    key = {**key_parts(model, tok, sols), "rows": rows_fingerprint(enc), "fractions": fractions, "norms": norms,
           "layer": layer, "per": per, "batch_size": batch_size, "max_length": max_length,
           **({"reference": reference} if reference is not None else {})}

    def measure(m, name, kind, norm, ref, own) -> list[dict]:
        return [_rec(name, kind, norm, ref, response_loss(m, tok, enc, batch_size), own)]

    def compute() -> pd.DataFrame:
        return pd.DataFrame(_sweep(model, tok, enc, sols, fractions, norms, reference, per, batch_size, progress,
                                   measure))

    return cached("loss_vs_norm", key, compute, cache_dir, use_cache)


@timed("metrics")
def row_losses_vs_norm(model, tok, rows, solutions: Mapping,
                       fractions: Sequence[float] | None = PAPER_NORM_FRACTIONS,
                       norms: Sequence[float] | None = None, layer: int | None = None, per: str = "module",
                       batch_size: int = 8, max_length: int = 512, cache_dir: str | Path | None = None,
                       use_cache: bool = True, progress: bool | None = None,
                       reference: float | None = None) -> pd.DataFrame:
    """:func:`loss_vs_norm` per row: one record per (solution, grid point or trained, row), so that two
    solutions can be compared row by row at each norm (:func:`paired_gaps`).

    Columns: solution, kind, norm, scale, row (its index in ``rows``), loss (the row's per-token loss),
    loss_sum, tokens, trained_norm, reference_norm. :func:`norm_summary` turns it into
    :func:`loss_vs_norm`'s frame (token-weighted, equal up to float rounding).
    """
    check_per(per)
    sols = as_solutions(solutions, layer)
    enc = encode(rows, tok, max_length)
    _check_grid(fractions, norms, reference)
    key = {**key_parts(model, tok, sols), "rows": rows_fingerprint(enc), "fractions": fractions, "norms": norms,
           "layer": layer, "per": per, "batch_size": batch_size, "max_length": max_length, "reference": reference}

    def measure(m, name, kind, norm, ref, own) -> list[dict]:
        sums, counts = response_row_losses(m, tok, enc, batch_size)
        return [{"solution": name, "kind": kind, "norm": norm, "scale": norm / ref if ref > 0 else float("nan"),
                 "row": i, "loss": s / c if c else float("nan"), "loss_sum": s, "tokens": c,
                 "trained_norm": own, "reference_norm": ref} for i, (s, c) in enumerate(zip(sums, counts))]

    def compute() -> pd.DataFrame:
        return pd.DataFrame(_sweep(model, tok, enc, sols, fractions, norms, reference, per, batch_size, progress,
                                   measure))

    return cached("row_losses_vs_norm", key, compute, cache_dir, use_cache)


def _rec(name: str, kind: str, norm: float, ref: float, loss: float, own: float) -> dict:
    return {"solution": name, "kind": kind, "norm": norm, "scale": norm / ref if ref > 0 else float("nan"),
            "loss": loss, "efficiency": loss / norm ** 2 if norm > 0 else float("nan"),
            "trained_norm": own, "reference_norm": ref}


def norm_summary(row_frame: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """:func:`row_losses_vs_norm`'s rows summed into :func:`loss_vs_norm`'s frame (loss token-weighted over
    the rows), one per (``by`` columns, e.g. ``("seed",)``, solution, kind, norm)."""
    keys = [*by, "solution", "kind", "norm"]
    g = row_frame.groupby(keys, sort=False)
    out = g[["loss_sum", "tokens"]].sum().join(g[["scale", "trained_norm", "reference_norm"]].first()).reset_index()
    loss = out["loss_sum"] / out["tokens"]
    eff = (loss / out["norm"] ** 2).where(out["norm"] > 0)
    return out.assign(loss=loss, efficiency=eff)[[*by, "solution", "kind", "norm", "scale", "loss", "efficiency",
                                                  "trained_norm", "reference_norm"]]


def paired_gaps(row_frame: pd.DataFrame, a: str = "narrow", b: str = "general", seed_col: str | None = "seed",
                n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per grid norm: the per-row loss difference ``a - b`` (same rows, same norm, same training seed) with
    :func:`emlib.stats.paired_diff_seeds_ci` (rows bootstrapped; over several training seeds, ``seed_col``,
    the t interval over the seeds' mean differences widened to cover that bootstrap).

    Positive = ``b`` (the general solution) lower. Columns: norm, scale, loss_a, loss_b (mean per-row losses),
    diff, ci_low, ci_high, p, n_rows, n_seeds (named with ``a`` and ``b`` where it says a / b).
    """
    grid = row_frame[row_frame["kind"] == "grid"]
    seeds = grid[seed_col] if seed_col is not None and seed_col in grid.columns else pd.Series(0, grid.index)
    recs = []
    for norm, g in grid.assign(_seed=seeds).groupby("norm", sort=True):
        w = g.pivot_table(index=["_seed", "row"], columns="solution", values="loss")  # [seeds x rows, solutions]
        if not {a, b} <= set(w.columns):
            raise ValueError(f"paired_gaps needs solutions {a!r} and {b!r} at every norm; at {norm:g} it has "
                             f"{sorted(w.columns)}.")
        sa = w[a].unstack("row").to_numpy()  # [seeds, rows]
        sb = w[b].unstack("row").to_numpy()
        r = paired_diff_seeds_ci(sa, sb, n_boot=n_boot, level=level, seed=seed)
        recs.append({"norm": float(norm), "scale": float(g["scale"].iloc[0]), f"loss_{a}": float(np.nanmean(sa)),
                     f"loss_{b}": float(np.nanmean(sb)), "diff": r.estimate, "ci_low": r.lo, "ci_high": r.hi,
                     "p": r.p, "n_rows": r.n, "n_seeds": int(sa.shape[0])})
    return pd.DataFrame(recs)


def efficiency_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per solution: trained norm, its loss and ``efficiency = loss / norm^2`` there, and the mean loss
    over the shared grid points with norm > 0 (lower = more efficient at equal norm)."""
    trained = frame[frame["kind"] == "trained"].set_index("solution")
    grid = frame[(frame["kind"] == "grid") & (frame["norm"] > 0)]
    out = pd.DataFrame({"trained_norm": trained["norm"], "trained_loss": trained["loss"],
                        "efficiency": trained["efficiency"],
                        "mean_grid_loss": grid.groupby("solution")["loss"].mean()})
    return out.reset_index().rename(columns={"index": "solution"})


def by_family(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """:func:`loss_vs_norm` frames of several solution families (e.g. ``{"steering vector": ..., "rank-1
    LoRA": ...}``) stacked, with the family in its own ``family`` column (``kind`` stays grid / trained)."""
    if not frames:
        raise ValueError("Pass at least one family: {'steering vector': frame, ...}.")
    clash = [f for f, df in frames.items() if "family" in df.columns]
    if clash:
        raise ValueError(f"The frame(s) of {clash} already have a 'family' column: pass loss_vs_norm's frames.")
    return pd.concat([df.assign(family=f) for f, df in frames.items()], ignore_index=True)
