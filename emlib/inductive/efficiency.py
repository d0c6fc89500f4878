"""Efficiency (claim 4): the loss each solution reaches at equal norm.

:func:`loss_vs_norm` rescales each solution to a grid of norms shared by all solutions (fractions of
their mean trained norm) and measures the responses-only SFT loss (:func:`emlib.chat.response_loss`) on a
fixed sample of training rows. Norms are those of :mod:`emlib.vectors` (``||alpha * v||``) and
:mod:`emlib.adapters` (``||scaling * B @ A||_F`` per module; with ``per="module"`` every module is
rescaled to the grid norm and a solution's trained norm is the mean over its modules). The statistic
``efficiency = loss / norm**2`` is a column; :func:`efficiency_summary` gives it at each solution's own
trained norm. :func:`by_family` stacks the frames of the two solution families for a chapter's table.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from ..adapters import check_per
from ..chat import response_loss
from .common import (PAPER_NORM_FRACTIONS, Solution, applied, as_solutions, cached, encode, key_parts,
                     progress_bar, rows_fingerprint, session, solution_norm)


def reference_norm(model, sols: Mapping[str, Solution], adapters: Mapping[str, str], per: str = "module") -> float:
    """The mean trained norm over all solutions (the 100 % point of the shared grid)."""
    return float(np.mean([solution_norm(model, s, adapters.get(k), per) for k, s in sols.items()]))


def loss_vs_norm(model, tok, rows, solutions: Mapping, fractions: Sequence[float] | None = PAPER_NORM_FRACTIONS,
                 norms: Sequence[float] | None = None, layer: int | None = None, per: str = "module",
                 batch_size: int = 8, max_length: int = 512, cache_dir: str | Path | None = None,
                 use_cache: bool = True, progress: bool | None = None) -> pd.DataFrame:
    """Responses-only SFT loss of each solution rescaled to a shared grid of norms.

    ``solutions``: name -> vector / vector file / adapter dir / PeftModel / solution object (all of one
    kind). The grid is ``norms`` (absolute) or ``fractions`` of the mean trained norm of all solutions.
    Returns one row per (solution, grid point) with ``kind="grid"``, plus one ``kind="trained"`` row at
    each solution's own parameters. Columns: solution, kind, norm, scale (norm / mean trained norm), loss,
    efficiency (loss / norm^2; NaN at norm 0), trained_norm, reference_norm.
    """
    check_per(per)
    sols = as_solutions(solutions, layer)
    enc = encode(rows, tok, max_length)
    if norms is None and fractions is None:
        raise ValueError("Pass a grid: fractions of the mean trained norm, or absolute norms.")
    if norms is not None and any(n < 0 for n in norms) or fractions is not None and any(f < 0 for f in fractions):
        raise ValueError("Norms and fractions must be >= 0.")
    key = {**key_parts(model, tok, sols), "rows": rows_fingerprint(enc), "fractions": fractions, "norms": norms,
           "layer": layer, "per": per, "batch_size": batch_size, "max_length": max_length}

    def compute() -> pd.DataFrame:
        with session(model, sols) as (m, adapters):
            ref = reference_norm(m, sols, adapters, per)
            grid = [float(n) for n in norms] if norms is not None else [float(f) * ref for f in fractions]
            recs = []
            bar = progress_bar(len(sols) * (len(grid) + 1), "loss vs norm", progress)
            for name, sol in sols.items():
                own = solution_norm(m, sol, adapters.get(name), per)
                with applied(m, sol, adapters.get(name)):
                    recs.append(_rec(name, "trained", own, ref, response_loss(m, tok, enc, batch_size), own))
                bar.update()
                for target in grid:
                    with applied(m, sol, adapters.get(name), target=target, per=per):
                        recs.append(_rec(name, "grid", target, ref, response_loss(m, tok, enc, batch_size), own))
                    bar.update()
            bar.close()
        return pd.DataFrame(recs)

    return cached("loss_vs_norm", key, compute, cache_dir, use_cache)


def _rec(name: str, kind: str, norm: float, ref: float, loss: float, own: float) -> dict:
    return {"solution": name, "kind": kind, "norm": norm, "scale": norm / ref if ref > 0 else float("nan"),
            "loss": loss, "efficiency": loss / norm ** 2 if norm > 0 else float("nan"),
            "trained_norm": own, "reference_norm": ref}


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
