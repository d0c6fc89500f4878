"""Inductive-bias metrics: why the *general* solution wins over the *narrow* one (claims 4, 5 and 6).

Every metric reads *saved* solutions (a steering vector or a LoRA adapter; paths or loaded objects) and
never trains. Three measurements, each returning a tidy DataFrame and cached on disk:

* **Efficiency** (:func:`loss_vs_norm`): rescale each solution to a grid of norms shared by all
  solutions (fractions of their mean trained norm) and measure the responses-only SFT loss
  (:func:`emlib.chat.response_loss`) on a fixed sample of training rows. The statistic
  ``efficiency = loss / norm**2`` is a column; :func:`efficiency_summary` gives it at each solution's
  own trained norm.
* **Stability** (:func:`stability_curve`): perturb the parameters orthogonally,
  ``x' = sqrt(1 - eps^2) x + eps y`` with ``y`` random, orthogonal to ``x`` and ``||y|| = ||x||``
  (:func:`orthogonal_perturbation`; every LoRA ``A`` and ``B`` matrix separately, or the vector), and
  report ``(L_pert - L_orig) / (L_base - L_orig) * 100`` with a CI over perturbation seeds
  (0 % = unperturbed, 100 % = as bad as the base model).
* **Pretraining influence** (:func:`pretraining_kl`): add each vector (and a random one), rescaled to a
  shared norm grid, at the steering layer at every position of natural text (:mod:`emlib.corpus`) and
  measure ``KL(base || steered)`` per token, averaged over tokens.

Norm conventions
----------------
* A steering vector's norm is the L2 norm of exactly what is added to the residual stream
  (any training-time scale such as ``alpha`` already multiplied in).
* A LoRA module's norm is ``||scaling * B @ A||_F``: the Frobenius norm of the weight update the module
  really applies (``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA). The scaling is
  included because the paper's general and narrow adapters use different ``lora_alpha`` (64 vs 256), so
  ``||B A||`` alone would not compare the updates the two solutions make.
* Rescaling an adapter multiplies ``B`` only. ``per="module"`` (the paper) sets every module's norm to the
  target and the grid coordinate is that per-module norm (a solution's own "trained norm" is then the mean
  over its modules); ``per="adapter"`` scales all modules by one factor so that the adapter's total norm
  ``sqrt(sum_m ||dW_m||^2)`` hits the target. For a single-module adapter (the paper's rank-1 case) the two
  coincide.

Rescaling and perturbing are applied on copies (vectors) or in place and undone on exit (LoRA weights,
:func:`rescaled_lora`, :func:`perturbed_lora`), so a saved or loaded solution is never changed.

Caching
-------
Results are written as parquet under ``cache_dir`` (default ``emlib.models.cache_root() / "metrics"``),
keyed by a hash of everything that determines them: the base model's fingerprint, the tokenizer, the rows
or texts, the solutions' tensors, the grids, seeds, batch and length settings. A rerun with the same
inputs reads the file instead of recomputing; ``use_cache=False`` forces a recomputation (and rewrites).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .cache import canonical_json
from .chat import Encoded, encode_rows, response_loss
from .hooks import add_vector
from .models import cache_root, check_layer

METRIC_VERSION = 1  # bump when a metric's definition changes: old cache entries are then ignored
PAPER_NORM_FRACTIONS: tuple[float, ...] = tuple(round(0.2 * i, 2) for i in range(0, 11))  # 0 %, 20 %..200 %
PAPER_EPS_GRID: tuple[float, ...] = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


# =========================================================================== solutions
@dataclass(frozen=True, eq=False)
class VectorSolution:
    """A steering vector: ``vector`` [d_model] is exactly what is added at the output of ``layer``."""

    vector: torch.Tensor
    layer: int | None = None

    @property
    def norm(self) -> float:
        return float(self.vector.detach().float().norm())

    def fingerprint(self) -> str:
        return _tensor_hash({"vector": self.vector}, extra={"layer": self.layer})


@dataclass(frozen=True, eq=False)
class LoraSolution:
    """A LoRA adapter held in memory: peft's state dict (keys without adapter names) and its LoraConfig."""

    state: dict[str, torch.Tensor]
    config: object  # peft.LoraConfig
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "LoraSolution":
        """Read an adapter directory written by peft's ``save_pretrained``."""
        from peft import PeftConfig
        from peft.utils import load_peft_weights

        path = Path(path)
        if (path / "adapter" / "adapter_config.json").exists():  # an emlib.train run's out_dir
            path = path / "adapter"
        if not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"{path} has no adapter_config.json: pass a folder written by "
                                    "peft's save_pretrained, a LoRA training run's folder, or a loaded PeftModel.")
        config = PeftConfig.from_pretrained(str(path))
        _check_lora_config(config, str(path))
        state = load_peft_weights(str(path), device="cpu")
        return cls({k: v.detach().clone() for k, v in state.items()}, config, str(path))

    @classmethod
    def from_model(cls, model, adapter_name: str | None = None) -> "LoraSolution":
        """Copy one adapter out of a loaded PeftModel (the active one by default)."""
        from peft import get_peft_model_state_dict

        name = adapter_name or _active_adapter(model)
        if name not in getattr(model, "peft_config", {}):
            raise ValueError(f"The model has no adapter {name!r}: it has {list(getattr(model, 'peft_config', {}))}.")
        config = copy.deepcopy(model.peft_config[name])
        _check_lora_config(config, f"adapter {name!r}")
        state = get_peft_model_state_dict(model, adapter_name=name)
        return cls({k: v.detach().cpu().clone() for k, v in state.items()}, config, f"model:{name}")

    def fingerprint(self) -> str:
        cfg = self.config
        extra = {"r": cfg.r, "alpha": cfg.lora_alpha, "rslora": bool(getattr(cfg, "use_rslora", False)),
                 "alpha_pattern": dict(getattr(cfg, "alpha_pattern", {}) or {}),
                 "rank_pattern": dict(getattr(cfg, "rank_pattern", {}) or {})}
        return _tensor_hash(self.state, extra=extra)


Solution = VectorSolution | LoraSolution


def _check_lora_config(config, where: str) -> None:
    if type(config).__name__ != "LoraConfig":
        raise ValueError(f"{where} is a {type(config).__name__}, not a LoRA adapter: these metrics "
                         "handle LoRA adapters and steering vectors.")
    if getattr(config, "use_dora", False):
        raise ValueError(f"{where} uses DoRA: its norm is not ||scaling * B A||; rescaling is not defined here.")


def _active_adapter(model) -> str:
    name = getattr(model, "active_adapter", "default")
    return name[0] if isinstance(name, (list, tuple)) else name


def load_vector_file(path: str | Path) -> VectorSolution:
    """A steering vector from a file (or a vector training run's folder): ``emlib.train.load_vector`` when
    that module provides it, else a ``.safetensors`` / ``.pt`` file holding one tensor (or a tensor named
    ``vector``; metadata ``layer``, ``alpha`` and ``scale`` are honoured). The solution holds the
    *effective* vector (``alpha * v``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "vector.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such vector file.")
    try:
        from . import train as _train  # written by another module; optional here
    except ImportError:
        _train = None
    if _train is not None and hasattr(_train, "load_vector"):
        return _vector_from_loaded(_train.load_vector(path), str(path))
    meta: dict = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        tensors = obj if isinstance(obj, dict) else {"vector": obj}
    return _vector_from_loaded((tensors, meta), str(path))


def _vector_from_loaded(obj, where: str) -> VectorSolution:
    """Accept what a loader returned: a tensor, (tensor, metadata), a dict of tensors, or an object with
    ``.vector`` (and optionally ``.layer`` / ``.scale``)."""
    meta: dict = {}
    if isinstance(obj, VectorSolution):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[1], Mapping):
        obj, meta = obj[0], dict(obj[1])
    if hasattr(obj, "vector") and not isinstance(obj, (dict, torch.Tensor)):  # e.g. emlib.train.SteeringVector
        meta = {**{k: getattr(obj, k) for k in ("layer", "alpha", "scale") if getattr(obj, k, None) is not None},
                **meta}
        obj = obj.vector
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if "vector" in tensors:
            obj = tensors["vector"]
        elif len(tensors) == 1:
            obj = next(iter(tensors.values()))
        else:
            raise ValueError(f"{where}: holds tensors {sorted(tensors)}; name the steering vector 'vector'.")
    if not isinstance(obj, torch.Tensor) or obj.ndim != 1:
        raise ValueError(f"{where}: expected a 1-d steering vector, got {type(obj).__name__} "
                         f"{tuple(getattr(obj, 'shape', ()))}.")
    scale = float(meta.get("alpha", 1.0)) * float(meta.get("scale", 1.0))  # the effective vector
    layer = meta.get("layer")
    return VectorSolution(obj.detach().float().cpu() * scale, int(layer) if layer is not None else None)


def load_solution(src, layer: int | None = None, adapter_name: str | None = None) -> Solution:
    """Turn a path or a loaded object into a :class:`VectorSolution` or :class:`LoraSolution`.

    ``src``: a 1-d tensor (a vector; ``layer`` required), an adapter directory or LoRA run folder, a vector
    file or vector run folder, an ``emlib.train.SteeringVector`` (its ``alpha * vector`` is used), a loaded
    PeftModel (its ``adapter_name`` or active adapter is copied), or a solution object. ``layer`` gives
    the steering layer of a vector that does not carry one (a conflicting layer is an error).
    """
    if isinstance(src, LoraSolution):
        return src
    if isinstance(src, VectorSolution):
        sol = src
    elif isinstance(src, torch.Tensor):
        sol = _vector_from_loaded(src, "tensor")
    elif isinstance(src, (str, Path)):
        p = Path(src)
        if p.is_dir() and not (p / "vector.safetensors").exists():
            return LoraSolution.load(p)
        sol = load_vector_file(p)
    elif hasattr(src, "peft_config"):
        return LoraSolution.from_model(src, adapter_name)
    else:
        sol = _vector_from_loaded(src, type(src).__name__)
    if layer is not None and sol.layer is not None and sol.layer != layer:
        raise ValueError(f"This vector was trained at layer {sol.layer}, not {layer}: drop layer=... or pass "
                         "the vector as a plain tensor to add it elsewhere.")
    if layer is not None:
        sol = VectorSolution(sol.vector, layer)
    if sol.layer is None:
        raise ValueError("A steering vector needs its layer: pass layer=... (the layer it was trained at).")
    return sol


def _as_solutions(solutions, layer: int | None) -> dict[str, Solution]:
    if not isinstance(solutions, Mapping) or not solutions:
        raise ValueError("Pass solutions as a non-empty mapping name -> solution, e.g. "
                         "{'general': path_or_vector, 'narrow': path_or_vector}.")
    out = {str(k): load_solution(v, layer=layer) for k, v in solutions.items()}
    kinds = {type(s) for s in out.values()}
    if len(kinds) > 1:
        raise ValueError("Mixing steering vectors and LoRA adapters in one comparison: their norms are not "
                         "comparable. Run the metric once per kind.")
    return out


# =========================================================================== vectors: rescale, perturb
def rescale_to_norm(x: torch.Tensor, target: float) -> torch.Tensor:
    """A copy of ``x`` with L2 (Frobenius) norm ``target`` (same direction)."""
    if target < 0:
        raise ValueError(f"A norm must be >= 0, got {target}.")
    n = x.detach().double().norm()
    if target == 0:
        return torch.zeros_like(x)
    if n == 0:
        raise ValueError("Cannot rescale a zero tensor to a non-zero norm: it has no direction.")
    return (x.detach().double() * (target / n)).to(x.dtype)


def orthogonal_perturbation(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``sqrt(1 - eps^2) x + eps y`` with ``y`` Gaussian, orthogonal to ``x`` and ``||y|| = ||x||``.

    Treats ``x`` as one flat vector (a LoRA matrix is perturbed as a whole). The result keeps the norm of
    ``x`` and has cosine ``sqrt(1 - eps^2)`` with it. ``eps`` in [0, 1]; a zero ``x`` is returned unchanged.
    ``generator`` is a CPU ``torch.Generator`` (seed it for reproducible draws).
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps}.")
    xf = x.detach().double().reshape(-1)  # [n]
    nx = xf.norm()
    if nx == 0 or eps == 0:
        return x.detach().clone()
    y = torch.randn(xf.shape, generator=generator, dtype=torch.float64, device="cpu").to(xf.device)
    unit = xf / nx
    y = y - (y @ unit) * unit
    y = y * (nx / y.norm().clamp_min(1e-300))
    out = math.sqrt(1.0 - eps * eps) * xf + eps * y
    return out.reshape(x.shape).to(x.dtype)


def random_vector(dim: int, norm: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A Gaussian direction in R^dim with the given norm (the control vector of the pretraining metric)."""
    g = torch.Generator().manual_seed(seed)
    return rescale_to_norm(torch.randn(dim, generator=g), norm)


# =========================================================================== LoRA: norms, rescale, perturb
def lora_layers(model, adapter: str | None = None) -> dict[str, object]:
    """LoRA-wrapped modules holding ``adapter`` (default: the active one), by module name."""
    from peft.tuners.lora import LoraLayer

    name = adapter or _active_adapter(model)
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and name in getattr(mod, "lora_A", {}):
            out[mod_name] = mod
        elif isinstance(mod, LoraLayer) and name in getattr(mod, "lora_embedding_A", {}):
            raise ValueError(f"{mod_name}: LoRA on embeddings is not supported by these metrics.")
    if not out:
        raise ValueError(f"The model has no LoRA module for adapter {name!r}.")
    return out


def _delta_norm(mod, adapter: str) -> float:
    """||scaling * B A||_F computed from r x r Gram matrices (exact, cheap)."""
    a = mod.lora_A[adapter].weight.detach().double()  # [r, in]
    b = mod.lora_B[adapter].weight.detach().double()  # [out, r]
    sq = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0)  # trace(A^T B^T B A)
    return float(abs(mod.scaling[adapter]) * sq.sqrt())


def lora_delta_norms(model, adapter: str | None = None) -> dict[str, float]:
    """Per module: ``||scaling * B @ A||_F``, the norm of the weight update the module applies."""
    name = adapter or _active_adapter(model)
    return {k: _delta_norm(m, name) for k, m in lora_layers(model, name).items()}


def adapter_norm(model, adapter: str | None = None, per: str = "module") -> float:
    """The adapter's norm on the grid's axis: mean module norm (``per="module"``) or
    ``sqrt(sum ||dW_m||^2)`` (``per="adapter"``)."""
    norms = np.array(list(lora_delta_norms(model, adapter).values()))
    return float(norms.mean() if _check_per(per) == "module" else np.sqrt((norms ** 2).sum()))


def _check_per(per: str) -> str:
    if per not in ("module", "adapter"):
        raise ValueError(f"per must be 'module' or 'adapter', got {per!r}.")
    return per


@contextmanager
def _restoring(params: list[torch.Tensor]):
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@contextmanager
def rescaled_lora(model, target: float, adapter: str | None = None, per: str = "module"):
    """While active, each LoRA ``B`` of ``adapter`` is scaled so the norm hits ``target`` (see module doc);
    the original weights are restored on exit."""
    name = adapter or _active_adapter(model)
    _check_per(per)
    if target < 0:
        raise ValueError(f"A norm must be >= 0, got {target}.")
    mods = lora_layers(model, name)
    norms = {k: _delta_norm(m, name) for k, m in mods.items()}
    total = math.sqrt(sum(v * v for v in norms.values()))
    bs = [m.lora_B[name].weight for m in mods.values()]
    with _restoring(bs), torch.no_grad():
        for k, m in mods.items():
            base = norms[k] if per == "module" else total
            if base == 0 and target > 0:
                raise ValueError(f"{k}: the LoRA update is zero (B = 0?), so it has no direction to rescale.")
            w = m.lora_B[name].weight
            w.copy_((w.double() * (target / base if base > 0 else 0.0)).to(w.dtype))
        yield model


@contextmanager
def perturbed_lora(model, eps: float, generator: torch.Generator, adapter: str | None = None):
    """While active, every ``A`` and ``B`` of ``adapter`` is replaced by its orthogonal perturbation
    (independent draws, in module-name order); the original weights are restored on exit."""
    name = adapter or _active_adapter(model)
    mods = lora_layers(model, name)
    ws = [w for k in sorted(mods) for w in (mods[k].lora_A[name].weight, mods[k].lora_B[name].weight)]
    with _restoring(ws), torch.no_grad():
        for w in ws:
            w.copy_(orthogonal_perturbation(w, eps, generator))
        yield model


def _adapter_slug(key: str) -> str:
    return "emlib_" + re.sub(r"\W", "_", key)


@contextmanager
def attach_adapters(model, loras: Mapping[str, LoraSolution]):
    """Yield ``(peft_model, {key: adapter_name})`` with each LoRA solution loaded as its own adapter.

    A plain model is wrapped and unwrapped again on exit (its ``requires_grad`` flags restored); on a
    PeftModel the adapters are added and deleted again, and its active adapter restored.
    """
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    created = not isinstance(model, PeftModel)
    prev_active = None if created else _active_adapter(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    names = {k: _adapter_slug(k) for k in loras}
    pm = None if created else model
    added: list[str] = []
    try:
        for key, sol in loras.items():
            cfg = copy.deepcopy(sol.config)
            cfg.inference_mode = True
            if pm is None:
                pm = get_peft_model(model, cfg, adapter_name=names[key])
            else:
                if names[key] in pm.peft_config:
                    raise ValueError(f"The model already has an adapter named {names[key]!r}.")
                pm.add_adapter(names[key], cfg)
            added.append(names[key])
            res = set_peft_model_state_dict(pm, sol.state, adapter_name=names[key])
            bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
            if bad:
                raise ValueError(f"Adapter {key!r} ({sol.source}) does not fit this model: e.g. {bad[0]!r} has no "
                                 "matching module. Load the base model it was trained on.")
        pm.eval()
        yield pm, names
    finally:
        if pm is not None:
            if created:
                base = pm.unload()
                for n, p in base.named_parameters():
                    if n in grads:
                        p.requires_grad_(grads[n])
            else:
                for n in added:
                    pm.delete_adapter(n)
                if prev_active in pm.peft_config:
                    pm.set_adapter(prev_active)


@contextmanager
def _session(model, sols: Mapping[str, Solution]):
    """The model to evaluate on, with LoRA solutions attached; yields (model, adapter names)."""
    loras = {k: s for k, s in sols.items() if isinstance(s, LoraSolution)}
    if not loras:
        yield model, {}
        return
    with attach_adapters(model, loras) as (pm, names):
        yield pm, names


@contextmanager
def _applied(model, sol: Solution, adapter: str | None, *, target: float | None = None, per: str = "module",
             eps: float | None = None, generator: torch.Generator | None = None):
    """The solution switched on, optionally rescaled to ``target`` and/or perturbed with ``eps``."""
    if isinstance(sol, VectorSolution):
        v = sol.vector
        if target is not None:
            v = rescale_to_norm(v, target)
        if eps is not None:
            v = orthogonal_perturbation(v, eps, generator)
        device = next(model.parameters()).device
        with add_vector(model, sol.layer, v.to(device)):
            yield
        return
    model.set_adapter(adapter, inference_mode=True)
    resc = rescaled_lora(model, target, adapter, per) if target is not None else nullcontext()
    pert = perturbed_lora(model, eps, generator, adapter) if eps is not None else nullcontext()
    with resc, pert:
        yield


def _base(model, sols: Mapping[str, Solution]):
    """The base model: adapters disabled (LoRA) or no hook (vectors)."""
    if any(isinstance(s, LoraSolution) for s in sols.values()):
        return model.disable_adapter()
    return nullcontext()


def solution_norm(model, sol: Solution, adapter: str | None, per: str = "module") -> float:
    return sol.norm if isinstance(sol, VectorSolution) else adapter_norm(model, adapter, per)


# =========================================================================== caching
def _tensor_hash(tensors: Mapping[str, torch.Tensor], extra: dict | None = None) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu", torch.float32).contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    h.update(canonical_json(extra or {}).encode())
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """``model.emlib_info.fingerprint`` when loaded through emlib, else a hash of the config and of the
    first and last parameter tensors."""
    info = getattr(model, "emlib_info", None)
    if info is not None:
        fp = info.fingerprint
    else:
        params = list(model.parameters())
        cfg = model.config.to_json_string() if hasattr(model, "config") else type(model).__name__
        fp = _tensor_hash({"first": params[0], "last": params[-1]}, extra={"config": cfg})
    if hasattr(model, "peft_config"):  # a PeftModel passed as the model: its own adapters count too
        from peft import get_peft_model_state_dict

        adapters = {n: _tensor_hash(get_peft_model_state_dict(model, adapter_name=n)) for n in model.peft_config}
        fp = hashlib.sha256(json.dumps([fp, adapters, str(_active_adapter(model))], sort_keys=True)
                            .encode()).hexdigest()[:16]
    return fp


def _tok_fingerprint(tok) -> str:
    return hashlib.sha256(f"{getattr(tok, 'name_or_path', '')}:{len(tok)}:{getattr(tok, 'chat_template', '')}"
                          .encode()).hexdigest()[:16]


def _rows_fingerprint(enc: Sequence[Encoded]) -> str:
    h = hashlib.sha256()
    for e in enc:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return cache_root() / "metrics"


def _cached(kind: str, key: dict, compute: Callable[[], pd.DataFrame], cache_dir: str | Path | None,
            use_cache: bool) -> pd.DataFrame:
    """Read ``<cache_dir>/<kind>-<hash>.parquet`` if present, else compute and write it atomically."""
    key = {"metric": kind, "version": METRIC_VERSION, **key}
    digest = hashlib.sha256(canonical_json(key).encode()).hexdigest()[:20]
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = d / f"{kind}-{digest}.parquet"
    if use_cache and path.exists():
        return pd.read_parquet(path)
    df = compute()
    d.mkdir(parents=True, exist_ok=True)
    for target, write in ((path, lambda p: df.to_parquet(p, index=False)),
                          (path.with_suffix(".json"), lambda p: Path(p).write_text(json.dumps(key, indent=1, default=str)))):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache is meant to be shared
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return pd.read_parquet(path)  # the same frame a rerun will read


def _progress(total: int, desc: str, progress: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=(None if progress is None else not progress), leave=False)


def _encode(rows, tok, max_length: int) -> list[Encoded]:
    if not rows:
        raise ValueError("No rows to measure the loss on: pass a non-empty list of chat rows.")
    return list(rows) if isinstance(rows[0], Encoded) else encode_rows(list(rows), tok, max_length)


# =========================================================================== 1. efficiency
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
    _check_per(per)
    sols = _as_solutions(solutions, layer)
    enc = _encode(rows, tok, max_length)
    if norms is None and fractions is None:
        raise ValueError("Pass a grid: fractions of the mean trained norm, or absolute norms.")
    if norms is not None and any(n < 0 for n in norms) or fractions is not None and any(f < 0 for f in fractions):
        raise ValueError("Norms and fractions must be >= 0.")
    key = {"model": model_fingerprint(model), "tok": _tok_fingerprint(tok), "rows": _rows_fingerprint(enc),
           "solutions": {k: s.fingerprint() for k, s in sols.items()}, "fractions": fractions, "norms": norms,
           "layer": layer, "per": per, "batch_size": batch_size, "max_length": max_length}

    def compute() -> pd.DataFrame:
        with _session(model, sols) as (m, adapters):
            ref = reference_norm(m, sols, adapters, per)
            grid = [float(n) for n in norms] if norms is not None else [float(f) * ref for f in fractions]
            recs = []
            bar = _progress(len(sols) * (len(grid) + 1), "loss vs norm", progress)
            for name, sol in sols.items():
                own = solution_norm(m, sol, adapters.get(name), per)
                with _applied(m, sol, adapters.get(name)):
                    recs.append(_rec(name, "trained", own, ref, response_loss(m, tok, enc, batch_size), own))
                bar.update()
                for target in grid:
                    with _applied(m, sol, adapters.get(name), target=target, per=per):
                        recs.append(_rec(name, "grid", target, ref, response_loss(m, tok, enc, batch_size), own))
                    bar.update()
            bar.close()
        return pd.DataFrame(recs)

    return _cached("loss_vs_norm", key, compute, cache_dir, use_cache)


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


# =========================================================================== 2. stability
def stability_losses(model, tok, rows, solutions: Mapping, eps_grid: Sequence[float] = PAPER_EPS_GRID,
                     n_seeds: int = 10, seed: int = 0, layer: int | None = None, batch_size: int = 8,
                     max_length: int = 512, cache_dir: str | Path | None = None, use_cache: bool = True,
                     progress: bool | None = None) -> pd.DataFrame:
    """Loss under orthogonal perturbations, one row per (solution, eps, seed).

    Seed ``seed + k`` drives draw ``k`` for every solution (paired comparison). Columns: solution, eps,
    seed, loss, loss_orig (unperturbed), loss_base (base model), normalised
    ``(loss - loss_orig) / (loss_base - loss_orig) * 100`` (NaN when the solution does not lower the loss).
    """
    sols = _as_solutions(solutions, layer)
    enc = _encode(rows, tok, max_length)
    if n_seeds < 1:
        raise ValueError("n_seeds must be >= 1.")
    if any(not 0 <= e <= 1 for e in eps_grid):
        raise ValueError(f"Every eps must be in [0, 1], got {list(eps_grid)}.")
    key = {"model": model_fingerprint(model), "tok": _tok_fingerprint(tok), "rows": _rows_fingerprint(enc),
           "solutions": {k: s.fingerprint() for k, s in sols.items()}, "eps": list(eps_grid), "n_seeds": n_seeds,
           "seed": seed, "layer": layer, "batch_size": batch_size, "max_length": max_length}

    def compute() -> pd.DataFrame:
        recs = []
        with _session(model, sols) as (m, adapters):
            with _base(m, sols):
                base = response_loss(m, tok, enc, batch_size)
            bar = _progress(len(sols) * (1 + len(eps_grid) * n_seeds), "stability", progress)
            for name, sol in sols.items():
                with _applied(m, sol, adapters.get(name)):
                    orig = response_loss(m, tok, enc, batch_size)
                bar.update()
                den = base - orig
                for eps in eps_grid:
                    for k in range(n_seeds):
                        g = torch.Generator().manual_seed(seed + k)
                        with _applied(m, sol, adapters.get(name), eps=float(eps), generator=g):
                            loss = response_loss(m, tok, enc, batch_size)
                        norm = (loss - orig) / den * 100 if abs(den) > 1e-9 and den > 0 else float("nan")
                        recs.append({"solution": name, "eps": float(eps), "seed": seed + k, "loss": loss,
                                     "loss_orig": orig, "loss_base": base, "normalised": norm})
                        bar.update()
            bar.close()
        return pd.DataFrame(recs)

    return _cached("stability", key, compute, cache_dir, use_cache)


def t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t (numerical integration of the density; no scipy needed)."""
    if not 0 < q < 1 or df < 1:
        raise ValueError("t_quantile needs 0 < q < 1 and df >= 1.")
    if q < 0.5:
        return -t_quantile(1 - q, df)
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:
        xs = np.linspace(0.0, t, 4001)
        ys = np.exp(logc - (df + 1) / 2 * np.log1p(xs ** 2 / df))
        h = xs[1] - xs[0]
        return 0.5 + h / 3 * (ys[0] + ys[-1] + 4 * ys[1:-1:2].sum() + 2 * ys[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], ci: str = "bootstrap", level: float = 0.95, n_boot: int = 2000,
            seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of ``values`` (NaNs dropped): percentile bootstrap or Student t interval."""
    x = np.asarray([v for v in values if v == v], dtype=float)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(x.mean())
    if x.size == 1:
        return m, float("nan"), float("nan")
    if ci == "t":
        half = t_quantile(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
        return m, m - half, m + half
    if ci != "bootstrap":
        raise ValueError(f"ci must be 'bootstrap' or 't', got {ci!r}.")
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return m, float(lo), float(hi)


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


# =========================================================================== 3. pretraining influence
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


def _kl_per_doc(logp_base: torch.Tensor, logits: torch.Tensor, att: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL(base || steered) over a document's tokens [b], and the token counts [b]."""
    logq = torch.log_softmax(logits.float(), dim=-1)  # [b, s, v]
    kl = (logp_base.exp() * (logp_base - logq)).sum(-1)  # [b, s]
    mask = att.to(kl.dtype)
    return (kl * mask).sum(1), mask.sum(1)


def pretraining_kl(model, tok, texts: Sequence[str], vector, layer: int | None = None,
                   norms: Sequence[float] | None = None, fractions: Sequence[float] | None = PAPER_NORM_FRACTIONS,
                   include_random: bool = True, random_seed: int = 0, max_tokens: int | None = None,
                   batch_size: int = 4, cache_dir: str | Path | None = None, use_cache: bool = True,
                   progress: bool | None = None) -> pd.DataFrame:
    """Mean per-token ``KL(base || steered)`` on ``texts`` with a vector added at ``layer`` (all positions).

    ``vector``: one vector (named "vector") or a mapping name -> vector / file / VectorSolution. Each is
    rescaled to every norm of the grid: ``norms`` (absolute) or ``fractions`` of the mean norm of the given
    vectors. ``include_random`` adds a Gaussian "random" direction (``random_seed``) on the same grid.
    Returns one row per (solution, norm): kl (token-weighted mean), ci_low/ci_high (bootstrap over
    documents), scale, n_docs, n_tokens. The base forward pass is computed once per batch.
    """
    vecs = dict(vector) if isinstance(vector, Mapping) else {"vector": vector}
    sols = {k: load_solution(v, layer=layer) for k, v in vecs.items()}
    if any(not isinstance(s, VectorSolution) for s in sols.values()):
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
        sols["random"] = VectorSolution(random_vector(d, max(ref, 1.0), random_seed), at)
    if norms is None and fractions is None:
        raise ValueError("Pass a grid: fractions of the mean vector norm, or absolute norms.")
    grid = [float(n) for n in norms] if norms is not None else [float(f) * ref for f in fractions]
    if any(n < 0 for n in grid):
        raise ValueError("Norms must be >= 0.")
    texts = list(texts)
    key = {"model": model_fingerprint(model), "tok": _tok_fingerprint(tok),
           "texts": hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16],
           "vectors": {k: s.fingerprint() for k, s in sols.items()}, "layer": at, "grid": grid,
           "max_tokens": max_tokens, "batch_size": batch_size}

    def compute() -> pd.DataFrame:
        device = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        per_doc: dict[tuple[str, float], list[tuple[float, float]]] = {}
        batches = list(_token_batches(tok, texts, max_tokens, batch_size, pad))
        bar = _progress(len(batches) * (1 + len(sols) * len(grid)), "pretraining KL", progress)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for _, inp, att in batches:
                inp, att = inp.to(device), att.to(device)
                logp_base = torch.log_softmax(model(input_ids=inp, attention_mask=att).logits.float(), dim=-1)
                bar.update()
                for name, sol in sols.items():
                    for target in grid:
                        v = rescale_to_norm(sol.vector, target).to(device)
                        with add_vector(model, at, v):
                            logits = model(input_ids=inp, attention_mask=att).logits
                        s, c = _kl_per_doc(logp_base, logits, att)
                        per_doc.setdefault((name, target), []).extend(zip(s.tolist(), c.tolist()))
                        bar.update()
                del logp_base
        model.train(was_training)
        bar.close()
        recs = []
        rng = np.random.default_rng(0)
        for (name, target), docs in per_doc.items():
            s = np.array([d[0] for d in docs])
            c = np.array([d[1] for d in docs])
            idx = rng.integers(0, len(docs), size=(1000, len(docs)))
            boots = s[idx].sum(1) / c[idx].sum(1)
            recs.append({"solution": name, "norm": target, "scale": target / ref if ref > 0 else float("nan"),
                         "kl": float(s.sum() / c.sum()), "ci_low": float(np.quantile(boots, 0.025)),
                         "ci_high": float(np.quantile(boots, 0.975)), "n_docs": len(docs),
                         "n_tokens": int(c.sum()), "reference_norm": ref})
        return pd.DataFrame(recs)

    return _cached("pretraining_kl", key, compute, cache_dir, use_cache)


# =========================================================================== plots
def plot_loss_vs_norm(frame: pd.DataFrame, ax=None):
    """Loss vs norm for each solution (lines: shared grid; stars: each solution at its trained norm)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    ax = ax or plt.subplots(figsize=(5.5, 3.8))[1]
    grid = frame[frame["kind"] == "grid"]
    sns.lineplot(data=grid, x="norm", y="loss", hue="solution", marker="o", ax=ax)
    trained = frame[frame["kind"] == "trained"]
    sns.scatterplot(data=trained, x="norm", y="loss", hue="solution", marker="*", s=250, ax=ax, legend=False,
                    edgecolor="black")
    ax.set(xlabel="parameter norm (shared grid)", ylabel="responses-only SFT loss",
           title="Efficiency: loss at equal norm")
    return ax


def plot_stability(summary: pd.DataFrame, ax=None):
    """Normalised loss increase (%) vs perturbation size eps, with CI bands."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    ax = ax or plt.subplots(figsize=(5.5, 3.8))[1]
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


def plot_pretraining_kl(frame: pd.DataFrame, ax=None):
    """KL(base || steered) per token vs vector norm, one line per vector."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    ax = ax or plt.subplots(figsize=(5.5, 3.8))[1]
    sns.lineplot(data=frame, x="norm", y="kl", hue="solution", marker="o", ax=ax)
    ax.set(xlabel="vector norm", ylabel="KL(base || steered) per token", title="Influence on pretraining text")
    return ax
