"""A LoRA-adapter solution: its modules, its norm, rescaling and perturbation, load and save.

A peft LoRA adapter is live inside a model (its modules: :func:`lora_modules`) or held in memory without a
model (:class:`LoraAdapter`: peft's state dict and ``LoraConfig``, from a folder or copied out of a model).

Norm
----
LoRA module ``m`` adds ``dW_m = scaling_m * B_m @ A_m`` to its base weight (``scaling = lora_alpha / r``,
or ``lora_alpha / sqrt(r)`` with rsLoRA). Its norm (:attr:`LoraModule.norm`, :func:`module_norms`) is
``||dW_m||_F``, the Frobenius norm of the weight update the module really applies. The scaling is included
because the paper's general and narrow adapters use different ``lora_alpha`` (64 vs 256), so ``||B A||``
alone would not compare the updates the two solutions make.

An adapter's norm (:func:`norm`) takes all its updates together as one vector:
``sqrt(sum_m ||dW_m||_F^2)``. The paper's efficiency grid instead rescales every module to the same norm;
that grid's coordinate is the mean over modules, :func:`mean_module_norm`. For a single-module adapter
(the paper's rank-1 case) the two are equal.

Rescale and perturb
-------------------
:func:`rescaled` multiplies ``B`` only: ``per="module"`` (the paper) sets every module's norm to the
target; ``per="adapter"`` scales all modules by one factor so that :func:`norm` hits it. :func:`perturbed`
replaces every ``A`` and ``B`` by its orthogonal perturbation (:func:`emlib.vectors.orthogonal_perturbation`);
:func:`noised` adds orthogonal noise of given norms instead (chapter 5's matched-noise mode).
Both act in place inside a ``with`` block and restore the weights on exit.

On disk
-------
A folder written by peft's ``save_pretrained`` (:func:`save` writes one atomically, with an optional
``emlib_train.json``); a LoRA training run keeps it in ``<out_dir>/adapter/``. :func:`load_lora` attaches
one to a base model, :meth:`LoraAdapter.load` reads it without a model.
"""
from __future__ import annotations

import copy
import json
import math
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .cache import make_key, tensor_hash
from .timing import timed
from .vectors import orthogonal_perturbation

ADAPTER_DIR = "adapter"  # in a LoRA training run's folder
META_NAME = "emlib_train.json"  # the training run's metadata, written beside the adapter
PER = ("module", "adapter")


# =========================================================================== modules
@dataclass(frozen=True, eq=False)
class LoraModule:
    """One LoRA-wrapped module of one adapter. ``A`` and ``B`` are the live Parameters (edit them in
    place to change the model)."""

    name: str  # module path without peft's "base_model.model." prefix
    adapter: str
    module: torch.nn.Module  # the peft LoraLayer

    @property
    def A(self) -> torch.nn.Parameter:  # [r, in]
        return self.module.lora_A[self.adapter].weight

    @property
    def B(self) -> torch.nn.Parameter:  # [out, r]
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def layer(self) -> int:
        """Decoder layer index read from the module path (-1 when the path names none)."""
        m = re.search(r"layers\.(\d+)\.", self.name)
        return int(m.group(1)) if m else -1

    @property
    def norm(self) -> float:
        """``||scaling * B @ A||_F``, computed exactly from r x r Gram matrices."""
        a = self.A.detach().double()  # [r, in]
        b = self.B.detach().double()  # [out, r]
        sq = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0)  # trace(A^T B^T B A)
        return float(abs(self.module.scaling[self.adapter]) * sq.sqrt())


def _short_name(name: str) -> str:
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def active_adapter(model) -> str:
    """The name of ``model``'s active adapter (the first one when several are active)."""
    name = getattr(model, "active_adapter", "default")
    return name[0] if isinstance(name, (list, tuple)) else name


def lora_modules(model, adapter: str | None = None) -> list[LoraModule]:
    """Every LoRA module of ``adapter`` (None: each module's active adapters), in model order."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        for ad in ([adapter] if adapter is not None else list(mod.active_adapters)):
            if ad in mod.lora_A:
                out.append(LoraModule(_short_name(name), ad, mod))
            elif ad in getattr(mod, "lora_embedding_A", {}):
                raise ValueError(f"{name}: LoRA on embeddings is not supported here.")
    if not out:
        which = f"adapter {adapter!r}" if adapter is not None else "an active adapter"
        raise ValueError(f"The model has no LoRA module of {which}: pass a peft model with a LoRA adapter.")
    return out


# =========================================================================== norm
def module_norms(model, adapter: str | None = None) -> dict[str, float]:
    """Per module name: ``||scaling * B @ A||_F``, the norm of the weight update the module applies."""
    return {m.name: m.norm for m in lora_modules(model, adapter)}


def norm(model, adapter: str | None = None) -> float:
    """The adapter's norm: ``sqrt(sum_m ||scaling_m * B_m @ A_m||_F^2)``, all module updates as one vector."""
    return math.sqrt(sum(v * v for v in module_norms(model, adapter).values()))


def mean_module_norm(model, adapter: str | None = None) -> float:
    """The mean over modules of ``||scaling * B @ A||_F``: the axis of a grid that rescales every module
    to the same norm (``rescaled(per="module")``)."""
    return float(np.mean(list(module_norms(model, adapter).values())))


def check_per(per: str) -> str:
    if per not in PER:
        raise ValueError(f"per must be 'module' or 'adapter', got {per!r}.")
    return per


def grid_norm(model, adapter: str | None = None, per: str = "module") -> float:
    """The norm on the axis that :func:`rescaled` with ``per`` sets: :func:`mean_module_norm` or :func:`norm`."""
    return mean_module_norm(model, adapter) if check_per(per) == "module" else norm(model, adapter)


# =========================================================================== rescale, perturb (in place, undone)
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
def rescaled(model, target: float, adapter: str | None = None, per: str = "module"):
    """While active, each LoRA ``B`` of ``adapter`` is scaled so the norm hits ``target`` (see the module
    doc for ``per``); the original weights are restored on exit."""
    check_per(per)
    if target < 0:
        raise ValueError(f"A norm must be >= 0, got {target}.")
    mods = lora_modules(model, adapter)
    norms = [m.norm for m in mods]
    total = math.sqrt(sum(v * v for v in norms))
    with _restoring([m.B for m in mods]), torch.no_grad():
        for m, own in zip(mods, norms):
            base = own if per == "module" else total
            if base == 0 and target > 0:
                raise ValueError(f"{m.name}: the LoRA update is zero (B = 0?), so it has no direction to rescale.")
            w = m.B
            w.copy_((w.double() * (target / base if base > 0 else 0.0)).to(w.dtype))
        yield model


@contextmanager
def perturbed(model, eps: float, generator: torch.Generator, adapter: str | None = None):
    """While active, every ``A`` and ``B`` of ``adapter`` is replaced by its orthogonal perturbation
    (independent draws, in module-name order); the original weights are restored on exit."""
    mods = sorted(lora_modules(model, adapter), key=lambda m: m.name)
    ws = [w for m in mods for w in (m.A, m.B)]
    with _restoring(ws), torch.no_grad():
        for w in ws:
            w.copy_(orthogonal_perturbation(w, eps, generator))
        yield model


def matrix_norms(model, adapter: str | None = None) -> dict[str, float]:
    """``"<module>.A"`` -> ``||A||_F`` and ``"<module>.B"`` -> ``||scaling * B||_F`` (the noise scale of
    :func:`noised`; the scaling is included so adapters of different ``lora_alpha`` get the same update noise)."""
    out = {}
    for m in lora_modules(model, adapter):
        out[f"{m.name}.A"] = float(m.A.detach().double().norm())
        out[f"{m.name}.B"] = abs(m.scaling) * float(m.B.detach().double().norm())
    return out


@contextmanager
def noised(model, norms: Mapping[str, float], generator: torch.Generator, adapter: str | None = None):
    """While active, every ``A`` and ``B`` of ``adapter`` gets noise added: ``W + n`` with ``n`` orthogonal to
    ``W`` and ``||n|| = norms[name]`` (names as :func:`matrix_norms`; ``B``'s noise is divided by its scaling,
    so ``scaling * n`` has that norm). The draws are :func:`perturbed`'s at ``eps = 1`` (same generator, same
    order), rescaled; a zero matrix gets none. The original weights are restored on exit."""
    mods = sorted(lora_modules(model, adapter), key=lambda m: m.name)
    missing = [f"{m.name}.{x}" for m in mods for x in "AB" if f"{m.name}.{x}" not in norms]
    if missing:
        raise KeyError(f"noised: no noise norm for {', '.join(missing)} (pass matrix_norms of an adapter on the "
                       "same modules).")
    ws = [(w, norms[f"{m.name}.{x}"] / (abs(m.scaling) if x == "B" else 1.0)) for m in mods
          for x, w in (("A", m.A), ("B", m.B))]
    with _restoring([w for w, _ in ws]), torch.no_grad():
        for w, target in ws:
            own = float(w.detach().double().norm())
            y = orthogonal_perturbation(w, 1.0, generator)  # orthogonal to w, ||y|| = ||w||
            if own > 0:
                w.copy_((w.double() + y.double() * (target / own)).to(w.dtype))
        yield model


# =========================================================================== an adapter in memory
def adapter_dir(path: str | Path) -> Path:
    """The folder holding ``adapter_config.json``: ``path`` itself or a training run's ``adapter/``."""
    path = Path(path)
    if (path / ADAPTER_DIR / "adapter_config.json").exists():
        path = path / ADAPTER_DIR
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path} holds no adapter_config.json: pass a LoRA training run's folder or an "
                                "adapter folder written by peft's save_pretrained.")
    return path


def _check_lora_config(config, where: str) -> None:
    if type(config).__name__ != "LoraConfig":
        raise ValueError(f"{where} is a {type(config).__name__}, not a LoRA adapter: only LoRA adapters and "
                         "steering vectors are handled here.")
    if getattr(config, "use_dora", False):
        raise ValueError(f"{where} uses DoRA: its norm is not ||scaling * B A||; rescaling is not defined here.")


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A LoRA adapter held in memory: peft's state dict (keys without adapter names) and its LoraConfig."""

    state: dict[str, torch.Tensor]
    config: object  # peft.LoraConfig
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "LoraAdapter":
        """Read an adapter folder written by peft's ``save_pretrained`` (or a LoRA training run's folder)."""
        from peft import PeftConfig
        from peft.utils import load_peft_weights

        path = adapter_dir(path)
        config = PeftConfig.from_pretrained(str(path))
        _check_lora_config(config, str(path))
        state = load_peft_weights(str(path), device="cpu")
        return cls({k: v.detach().clone() for k, v in state.items()}, config, str(path))

    @classmethod
    def from_model(cls, model, adapter_name: str | None = None) -> "LoraAdapter":
        """Copy one adapter out of a loaded PeftModel (the active one by default)."""
        from peft import get_peft_model_state_dict

        name = adapter_name or active_adapter(model)
        if name not in getattr(model, "peft_config", {}):
            raise ValueError(f"The model has no adapter {name!r}: it has {list(getattr(model, 'peft_config', {}))}.")
        config = copy.deepcopy(model.peft_config[name])
        _check_lora_config(config, f"adapter {name!r}")
        state = get_peft_model_state_dict(model, adapter_name=name)
        return cls({k: v.detach().cpu().clone() for k, v in state.items()}, config, f"model:{name}")

    def fingerprint(self) -> str:
        """Hash of the weights and of what sets the scaling (r, alpha, rsLoRA, per-module patterns)."""
        cfg = self.config
        return make_key(weights=tensor_hash({k: v.float() for k, v in self.state.items()}),
                        r=cfg.r, alpha=cfg.lora_alpha, rslora=bool(getattr(cfg, "use_rslora", False)),
                        alpha_pattern=dict(getattr(cfg, "alpha_pattern", {}) or {}),
                        rank_pattern=dict(getattr(cfg, "rank_pattern", {}) or {}))[:16]


def _adapter_slug(key: str) -> str:
    return "emlib_" + re.sub(r"\W", "_", key)


@contextmanager
def attached(model, loras: Mapping[str, LoraAdapter]):
    """Yield ``(peft_model, {key: adapter_name})`` with each adapter loaded under its own name.

    A plain model is wrapped and unwrapped again on exit (its ``requires_grad`` flags restored); on a
    PeftModel the adapters are added and deleted again, and its active adapter restored.
    """
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict

    created = not isinstance(model, PeftModel)
    prev_active = None if created else active_adapter(model)
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


# =========================================================================== on disk
def has_lora(model) -> bool:
    """Whether ``model`` is a peft model or already carries LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return hasattr(model, "peft_config") or any(isinstance(m, LoraLayer) for m in model.modules())


def save(peft_model, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``peft_model``'s adapter to the folder ``path`` (peft ``save_pretrained``, plus ``meta`` as
    ``emlib_train.json``), atomically: written beside it, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=path.parent))
    try:
        peft_model.save_pretrained(str(tmp))
        if meta is not None:
            (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@timed("load")
def load_lora(model, path: str | Path, trainable: bool = False):
    """Attach a saved adapter (a run's ``out_dir`` or its ``adapter/`` folder) to a base model."""
    from peft import PeftModel

    from .data import open_safetensors

    path = adapter_dir(path)
    if has_lora(model):
        raise ValueError("This model already carries LoRA layers: pass the base model.")
    remedy = (f"delete {path.parent if path.name == ADAPTER_DIR else path} and run again to train the adapter "
              "anew, or restore the file")
    for weights in sorted(path.glob("*.safetensors")):  # checked before peft injects layers into the model
        with open_safetensors(weights, remedy) as fh:
            fh.keys()
    pm = PeftModel.from_pretrained(model, str(path), is_trainable=trainable)
    return pm if trainable else pm.eval()
