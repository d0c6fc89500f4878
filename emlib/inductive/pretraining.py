"""Pretraining influence (claim 6): how much each steering vector moves predictions on natural text.

:func:`pretraining_kl` adds each vector (and a random one), rescaled to a shared norm grid, at the steering
layer at every position of natural text (:mod:`emlib.corpus`) and measures ``KL(base || steered)`` per
token, averaged over tokens, with a bootstrap CI over documents (:func:`emlib.stats.ratio_ci`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..cache import text_hash
from ..chat import head_inputs
from ..hooks import add_rows
from ..models import check_layer
from ..prefix import reuse_prefix
from ..stats import ratio_ci
from ..vectors import SteeringVector, random_vector
from .common import PAPER_NORM_FRACTIONS, base_key_parts, cached, key_parts, load_solution, progress_bar
from ..timing import timed
from ..vocab_loss import KLReference


def _token_batches(tok, texts: Sequence[str], max_tokens: int | None, batch_size: int, pad_id: int):
    ids = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    ids = [list(x[:max_tokens]) if max_tokens else list(x) for x in ids]
    ids = [x for x in ids if len(x) >= 2]
    if not ids:
        raise ValueError("No text has at least 2 tokens: pass non-empty documents.")
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        n = max(len(x) for x in chunk)
        inp = torch.full((len(chunk), n), pad_id, dtype=torch.long)  # [b, s] right-padded
        att = torch.zeros((len(chunk), n), dtype=torch.long)
        for j, x in enumerate(chunk):
            inp[j, :len(x)] = torch.tensor(x)
            att[j, :len(x)] = 1
        yield i, inp, att


def _base_batches(model, tok, texts: Sequence[str], max_tokens: int | None, batch_size: int):
    """The number of document batches, and a generator of them on the model's device with the unsteered model
    at their real tokens: (inp [b, s], att [b, s], base), ``base`` holding what its LM head reads there
    ([n, d], ``n`` real tokens in row order; :func:`emlib.chat.head_inputs`) and what the KL needs of its
    distribution (:class:`emlib.vocab_loss.KLReference`): no ``[b, s, vocab]`` tensor is kept; no gradients, eval
    mode (restored afterwards)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = list(_token_batches(tok, texts, max_tokens, batch_size, pad))

    def passes():
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for _, inp, att in batches:
                    inp, att = inp.to(device), att.to(device)
                    states, head = head_inputs(model, inp, att)
                    yield inp, att, KLReference(states[att.bool()], head)
        finally:
            model.train(was_training)

    return len(batches), passes()


def _doc_sums(kl: torch.Tensor, att: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL [n] at the real tokens of ``att`` [b, s] (row order) -> summed per document [b], token
    counts [b]."""
    rows = att.bool().nonzero()[:, 0]
    s = torch.zeros(att.shape[0], dtype=kl.dtype, device=kl.device).index_add_(0, rows, kl)
    return s, att.sum(1).to(kl.dtype)


def _steered_sums(model, passes, sols: Mapping, grid: Sequence[float], bar) -> dict:
    """(solution, norm) -> [(summed KL, tokens) per document] over the document batches of ``passes``."""
    per_doc: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for inp, att, base in passes:
        bar.update()
        real = att.bool()
        for name, sol in sols.items():
            for target in grid:
                with torch.no_grad(), sol.rescaled(target).apply(model):
                    states, head = head_inputs(model, inp, att)
                    s, c = _doc_sums(base.kl(states[real][None])[0], att)
                per_doc.setdefault((name, target), []).extend(zip(s.tolist(), c.tolist()))
                bar.update()
    return per_doc


@timed("metrics")
def pretraining_kl(model, tok, texts: Sequence[str], vector, layer: int | None = None,
                   norms: Sequence[float] | None = None, fractions: Sequence[float] | None = PAPER_NORM_FRACTIONS,
                   include_random: bool = True, random_seed: int = 0, max_tokens: int | None = None,
                   batch_size: int = 4, cache_dir: str | Path | None = None, use_cache: bool = True,
                   progress: bool | None = None) -> pd.DataFrame:
    """Mean per-token ``KL(base || steered)`` on ``texts`` with a vector added at ``layer`` (all positions).

    ``vector``: one vector (named "vector") or a mapping name -> vector / file / SteeringVector. Each is
    rescaled to every norm of the grid: ``norms`` (absolute) or ``fractions`` of the mean norm of the given
    vectors. ``include_random`` adds a Gaussian "random" direction (``random_seed``) on the same grid.
    Returns one row per (solution, norm): kl (token-weighted mean), ci_low/ci_high (bootstrap over
    documents), scale, n_docs, n_tokens. The base forward pass is computed once per batch of ``batch_size``
    documents (any size: the logits are chunked, :class:`emlib.vocab_loss.KLReference`).
    """
    vecs = dict(vector) if isinstance(vector, Mapping) else {"vector": vector}
    sols = {k: load_solution(v, layer=layer) for k, v in vecs.items()}
    if any(not isinstance(s, SteeringVector) for s in sols.values()):
        raise ValueError("pretraining_kl takes steering vectors (tensors or vector files), not adapters.")
    layers = {s.layer for s in sols.values()}
    if len(layers) != 1:
        raise ValueError(f"The vectors were trained at different layers {sorted(layers)}: pass layer=... "
                         "to add them all at one layer.")
    at = check_layer(model, layers.pop())
    ref = float(np.mean([s.norm for s in sols.values()]))
    if include_random:
        if "random" in sols:
            raise ValueError("A vector is already named 'random': rename it or pass include_random=False.")
        d = next(iter(sols.values())).vector.shape[0]
        sols["random"] = SteeringVector(random_vector(d, max(ref, 1.0), random_seed), at)
    if norms is None and fractions is None:
        raise ValueError("Pass a grid: fractions of the mean vector norm, or absolute norms.")
    grid = [float(n) for n in norms] if norms is not None else [float(f) * ref for f in fractions]
    if any(n < 0 for n in grid):
        raise ValueError("Norms must be >= 0.")
    texts = list(texts)
    key = {**key_parts(model, tok, sols), "texts": text_hash("\x00".join(texts)), "layer": at, "grid": grid,
           "max_tokens": max_tokens, "batch_size": batch_size}

    def compute() -> pd.DataFrame:
        n_batches, passes = _base_batches(model, tok, texts, max_tokens, batch_size)
        bar = progress_bar(n_batches * (1 + len(sols) * len(grid)), "pretraining KL", progress)
        with reuse_prefix(model, at):  # every vector sits at layer `at`: the layers below run once per batch
            per_doc = _steered_sums(model, passes, sols, grid, bar)
        bar.close()
        recs = []
        rng = np.random.default_rng(0)  # one generator for all (solution, norm) pairs, in order
        for (name, target), docs in per_doc.items():
            s = np.array([d[0] for d in docs])
            c = np.array([d[1] for d in docs])
            lo, hi = ratio_ci(s, c, n_boot=1000, level=0.95, seed=rng)
            recs.append({"solution": name, "norm": target, "scale": target / ref if ref > 0 else float("nan"),
                         "kl": float(s.sum() / c.sum()), "ci_low": lo, "ci_high": hi, "n_docs": len(docs),
                         "n_tokens": int(c.sum()), "reference_norm": ref})
        return pd.DataFrame(recs)

    return cached("pretraining_kl", key, compute, cache_dir, use_cache)


@timed("metrics")
def random_null_kl(model, tok, texts: Sequence[str], layer: int, norms: Sequence[float], n_draws: int = 100,
                   seed: int = 0, max_tokens: int | None = None, batch_size: int = 4, draws_per_pass: int = 16,
                   cache_dir: str | Path | None = None, use_cache: bool = True,
                   progress: bool | None = None) -> pd.DataFrame:
    """The null of the pretraining metric: mean per-token ``KL(base || steered)`` on ``texts`` for ``n_draws``
    Gaussian directions (draw ``k`` uses seed ``seed + 1 + k``; ``seed`` itself is :func:`pretraining_kl`'s one
    "random" vector), each rescaled to every norm of ``norms``, added at ``layer``. ``draws_per_pass``
    directions share one forward pass (the documents repeated, one direction per copy: :func:`emlib.hooks.add_rows`),
    so a forward holds ``batch_size x draws_per_pass`` rows; neither changes the numbers beyond float rounding.
    Returns one row per (draw, norm): kl (token-weighted mean over the documents)."""
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}.")
    at = check_layer(model, layer)
    grid = [float(n) for n in norms]
    texts = list(texts)
    key = {**base_key_parts(model, tok),
           "texts": text_hash("\x00".join(texts)), "layer": at, "grid": grid, "n_draws": n_draws, "seed": seed,
           "max_tokens": max_tokens, "batch_size": batch_size}

    def compute() -> pd.DataFrame:
        d = model.config.hidden_size
        dirs = torch.stack([random_vector(d, 1.0, seed + 1 + k) for k in range(n_draws)])  # [K, d] unit
        sums = torch.zeros(n_draws, len(grid), dtype=torch.float64)  # summed KL over every token
        count = 0.0
        groups = [list(range(k, min(k + draws_per_pass, n_draws))) for k in range(0, n_draws, draws_per_pass)]
        n_batches, passes = _base_batches(model, tok, texts, max_tokens, batch_size)
        bar = progress_bar(n_batches * len(groups) * len(grid), "random null KL", progress)
        with reuse_prefix(model, at):  # the directions sit at layer `at`: the layers below run once per batch
            for inp, att, base in passes:
                count += float(att.sum())
                b, real = inp.shape[0], att.bool()
                for g in groups:
                    rep_inp, rep_att = inp.repeat(len(g), 1), att.repeat(len(g), 1)  # [G*b, s]
                    for j, target in enumerate(grid):
                        if target == 0.0:  # nothing is added: the KL is 0 by definition, no forward needed
                            bar.update()
                            continue
                        vecs = (dirs[g] * target).to(inp.device).repeat_interleave(b, 0)  # [G*b, d]
                        with torch.no_grad(), add_rows(model, at, vecs):
                            states, head = head_inputs(model, rep_inp, rep_att)  # [G*b, s, d]
                            steered = states.view(len(g), b, *states.shape[1:])[:, real]  # [G, n, d]
                            kl = base.kl(steered)  # [G, n]
                        sums[g, j] += kl.sum(1).double().cpu()
                        bar.update()
        bar.close()
        kl = (sums / count).numpy()
        return pd.DataFrame([{"draw": k, "norm": n, "kl": float(kl[k, j])} for k in range(n_draws)
                             for j, n in enumerate(grid)])

    return cached("random_null_kl", key, compute, cache_dir, use_cache)


def null_summary(frame: pd.DataFrame, null: pd.DataFrame, solution: str = "general") -> pd.DataFrame:
    """Per non-zero norm: where ``solution``'s KL (a :func:`pretraining_kl` frame) falls among the random
    directions' (a :func:`random_null_kl` frame): the null's mean and 95th percentile, and the percentile of
    the solution's KL (:func:`emlib.stats.null_percentile`)."""
    from ..stats import null_percentile

    own = frame[frame["solution"] == solution].set_index("norm")["kl"]
    recs = []
    for norm, g in null[null["norm"] > 0].groupby("norm"):
        match = own[np.isclose(own.index.to_numpy(dtype=float), norm)]
        if match.empty:
            continue
        v = float(match.iloc[0])
        recs.append({"norm": float(norm), "solution": solution, "kl": v, "n_draws": len(g),
                     "null_mean": float(g["kl"].mean()), "null_p95": float(g["kl"].quantile(0.95)),
                     "null_max": float(g["kl"].max()), "percentile": null_percentile(v, g["kl"].tolist())})
    return pd.DataFrame(recs)
