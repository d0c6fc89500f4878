"""What the three inductive-bias metrics share: solutions as input, switching them on, the on-disk cache.

* :func:`load_solution` turns a path, a tensor or a loaded object into a
  :class:`emlib.vectors.SteeringVector` or an :class:`emlib.adapters.LoraAdapter`.
* :func:`session` attaches LoRA solutions to the model (each as its own adapter); :func:`applied` switches
  one solution on, optionally rescaled and/or perturbed; :func:`base` is the model without any.
* :func:`cached` reads a metric's frame from ``<cache_dir>/<metric>-<key>.parquet`` or computes and writes
  it. The key (:func:`emlib.cache.make_key`) holds everything that determines the result: the base model
  (:func:`emlib.cache.model_fingerprint`), the tokenizer, the rows or texts, the solutions' fingerprints,
  the grids, seeds, batch and length settings.
"""
from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd
import torch

from .. import adapters
from ..adapters import LoraAdapter
from ..cache import canonical_json, make_key, model_fingerprint, text_hash
from ..chat import Encoded, encode_rows
from ..data import atomic_write_bytes
from ..models import cache_root
from ..vectors import VECTOR_FILE, SteeringVector, as_steering_vector, orthogonal_noise

METRIC_VERSION = 2  # bump when a metric's definition changes: old cache entries are then ignored
PAPER_NORM_FRACTIONS: tuple[float, ...] = tuple(round(0.2 * i, 2) for i in range(0, 11))  # 0 %, 20 %..200 %
PAPER_EPS_GRID: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

Solution = SteeringVector | LoraAdapter


# =========================================================================== solutions as input
def load_solution(src, layer: int | None = None, adapter_name: str | None = None) -> Solution:
    """A :class:`~emlib.vectors.SteeringVector` or :class:`~emlib.adapters.LoraAdapter` from ``src``.

    ``src``: an adapter folder or LoRA run folder, a vector file or vector run folder, a 1-d tensor (a
    vector; ``layer`` required), a loaded PeftModel (its ``adapter_name`` or active adapter is copied), or a
    solution object. ``layer`` gives the steering layer of a plain tensor; for a vector that carries one
    it must agree.
    """
    if isinstance(src, LoraAdapter):
        return src
    if isinstance(src, (str, Path)) and Path(src).is_dir() and not (Path(src) / VECTOR_FILE).exists():
        return LoraAdapter.load(src)
    if hasattr(src, "peft_config"):
        return LoraAdapter.from_model(src, adapter_name)
    return as_steering_vector(src, layer)


def as_solutions(solutions, layer: int | None) -> dict[str, Solution]:
    """name -> solution, all of one type (norms of vectors and adapters are not comparable)."""
    if not isinstance(solutions, Mapping) or not solutions:
        raise ValueError("Pass solutions as a non-empty mapping name -> solution, e.g. "
                         "{'general': path_or_vector, 'narrow': path_or_vector}.")
    out = {str(k): load_solution(v, layer=layer) for k, v in solutions.items()}
    if len({type(s) for s in out.values()}) > 1:
        raise ValueError("Mixing steering vectors and LoRA adapters in one comparison: their norms are not "
                         "comparable. Run the metric once per kind.")
    return out


# =========================================================================== switching solutions on
@contextmanager
def session(model, sols: Mapping[str, Solution]):
    """The model to evaluate on, with LoRA solutions attached; yields (model, {name: adapter name})."""
    loras = {k: s for k, s in sols.items() if isinstance(s, LoraAdapter)}
    if not loras:
        yield model, {}
        return
    with adapters.attached(model, loras) as (pm, names):
        yield pm, names


@contextmanager
def reused_below(model, sols: Mapping[str, Solution]):
    """Within: the decoder layers below the lowest one the solutions change run once per batch of rows
    (:func:`emlib.prefix.reuse_prefix`); ``model`` is the one :func:`session` yields (adapters attached)."""
    from ..prefix import lowest_layer, reuse_prefix

    layers = [s.layer for s in sols.values() if isinstance(s, SteeringVector)]
    with reuse_prefix(model, lowest_layer(model, layers)) as cache:
        yield cache


@contextmanager
def applied(model, sol: Solution, adapter: str | None, *, target: float | None = None, per: str = "module",
            eps: float | None = None, generator: torch.Generator | None = None,
            noise: float | Mapping[str, float] | None = None):
    """The solution switched on, optionally rescaled to norm ``target`` and/or perturbed with ``eps``, or with
    orthogonal noise of absolute norm ``noise`` added (a float for a vector; for an adapter, per matrix as
    :func:`emlib.adapters.matrix_norms`; see :func:`noise_scale`)."""
    if eps is not None and noise is not None:
        raise ValueError("Pass eps (relative perturbation) or noise (absolute noise norms), not both.")
    if isinstance(sol, SteeringVector):
        sv = sol.rescaled(target) if target is not None else sol
        sv = sv.perturbed(eps, generator) if eps is not None else sv
        if noise is not None:
            sv = SteeringVector(orthogonal_noise(sv.effective, float(noise), generator), sv.layer, 1.0, dict(sv.meta))
        with sv.apply(model):
            yield
        return
    model.set_adapter(adapter, inference_mode=True)
    resc = adapters.rescaled(model, target, adapter, per) if target is not None else nullcontext()
    pert = adapters.perturbed(model, eps, generator, adapter) if eps is not None else nullcontext()
    nois = adapters.noised(model, noise, generator, adapter) if noise is not None else nullcontext()
    with resc, pert, nois:
        yield


def noise_scale(model, sol: Solution, adapter: str | None) -> float | dict[str, float]:
    """A solution's own noise scale at eps = 1 (what :func:`applied`'s ``noise`` takes, times eps): its norm
    (vector), or the norms of its LoRA matrices (:func:`emlib.adapters.matrix_norms`)."""
    return sol.norm if isinstance(sol, SteeringVector) else adapters.matrix_norms(model, adapter)


def base(model, sols: Mapping[str, Solution]):
    """The base model: adapters disabled (LoRA) or no hook (vectors)."""
    if any(isinstance(s, LoraAdapter) for s in sols.values()):
        return model.disable_adapter()
    return nullcontext()


def solution_norm(model, sol: Solution, adapter: str | None, per: str = "module") -> float:
    """A solution's norm on the grid's axis: :attr:`SteeringVector.norm`, or :func:`emlib.adapters.grid_norm`."""
    return sol.norm if isinstance(sol, SteeringVector) else adapters.grid_norm(model, adapter, per)


# =========================================================================== inputs and the cache
def encode(rows, tok, max_length: int) -> list[Encoded]:
    if not rows:
        raise ValueError("No rows to measure the loss on: pass a non-empty list of chat rows.")
    return list(rows) if isinstance(rows[0], Encoded) else encode_rows(list(rows), tok, max_length)


def tok_fingerprint(tok) -> str:
    return text_hash(f"{getattr(tok, 'name_or_path', '')}:{len(tok)}:{getattr(tok, 'chat_template', '')}")


def rows_fingerprint(enc: Sequence[Encoded]) -> str:
    return text_hash(json.dumps([[e.input_ids, e.labels] for e in enc]))


def base_key_parts(model, tok) -> dict:
    """The cache-key parts of the base model and tokenizer (a metric that keys each solution apart adds its own)."""
    return {"model": model_fingerprint(model), "tok": tok_fingerprint(tok)}


def key_parts(model, tok, sols: Mapping[str, Solution]) -> dict:
    """The cache-key parts every metric has: base model, tokenizer, solutions."""
    return {**base_key_parts(model, tok), "solutions": {k: s.fingerprint() for k, s in sols.items()}}


def default_cache_dir() -> Path:
    return cache_root() / "metrics"


def cache_path(metric: str, key: dict, cache_dir: str | Path | None) -> Path:
    """Where :func:`cached` keeps the frame of ``metric`` under ``key``."""
    full = {"metric": metric, "version": METRIC_VERSION, **key}
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return d / f"{metric}-{make_key(**full)[:20]}.parquet"


def cached(metric: str, key: dict, compute: Callable[[], pd.DataFrame], cache_dir: str | Path | None,
           use_cache: bool) -> pd.DataFrame:
    """Read ``<cache_dir>/<metric>-<key>.parquet`` if present, else compute it and write it atomically (with
    the key parts as JSON beside it). ``use_cache=False`` recomputes and rewrites."""
    path = cache_path(metric, key, cache_dir)
    key = {"metric": metric, "version": METRIC_VERSION, **key}
    if use_cache and path.exists():
        return pd.read_parquet(path)
    df = compute()
    atomic_write_bytes(path.with_suffix(".json"), canonical_json(key, indent=1).encode())
    atomic_write_bytes(path, df.to_parquet(index=False))
    return pd.read_parquet(path)  # the same frame a rerun will read


def progress_bar(total: int, desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=(None if progress is None else not progress), leave=False)
