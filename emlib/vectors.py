"""A steering-vector solution: one vector added to the residual stream after one decoder layer.

:class:`SteeringVector` is the one type for it, whether trained (:func:`emlib.train.train_steering_vector`),
read from disk (:func:`load_vector`) or built from a tensor (:func:`as_steering_vector`). While
:meth:`SteeringVector.apply` is active, ``hidden[layer] += scale * alpha * vector`` at every position.

Norm
----
A steering vector's norm (:attr:`SteeringVector.norm`) is the L2 norm of exactly what is added to the
residual stream, ``||alpha * vector||``: the training-time ``alpha`` is multiplied in, so a vector trained
with alpha 256 and one built from a plain tensor compare on the same axis.

Rescale and perturb
-------------------
:meth:`SteeringVector.rescaled` (same direction, a target norm) and :meth:`SteeringVector.perturbed`
(:func:`orthogonal_perturbation`) return new vectors holding the changed ``alpha * vector`` (alpha 1);
the original is never changed. :func:`rescale_to_norm` and :func:`orthogonal_perturbation` act on any
tensor as one flat vector (:mod:`emlib.adapters` uses them on LoRA matrices).

On disk
-------
``vector.safetensors``: one float32 tensor ``vector`` [d], and ``layer``, ``alpha`` and ``meta`` (JSON)
in the header (:func:`save_vector`, written atomically; :func:`load_vector`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager

import torch

from .cache import make_key, tensor_hash
from .data import atomic_write_bytes, open_safetensors
from .hooks import add_vector
from .timing import timed

VECTOR_FILE = "vector.safetensors"  # in a vector training run's folder


# =========================================================================== tensor maths
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


def orthogonal_noise(x: torch.Tensor, norm: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + n`` with ``n`` orthogonal to ``x`` and ``||n|| = norm``: the draw of :func:`orthogonal_perturbation`
    at ``eps = 1`` (same generator, same direction), rescaled. A zero ``x`` is returned unchanged."""
    if norm < 0:
        raise ValueError(f"A noise norm must be >= 0, got {norm}.")
    nx = float(x.detach().double().norm())
    if nx == 0:
        return x.detach().clone()
    y = orthogonal_perturbation(x, 1.0, generator).double()
    return (x.detach().double() + y * (norm / nx)).to(x.dtype)


def random_vector(dim: int, norm: float = 1.0, seed: int = 0) -> torch.Tensor:
    """A Gaussian direction in R^dim with the given norm (the control vector of the pretraining metric)."""
    g = torch.Generator().manual_seed(seed)
    return rescale_to_norm(torch.randn(dim, generator=g), norm)


# =========================================================================== the solution type
@dataclass
class SteeringVector:
    """A steering vector with where and how strongly it is added: ``hidden[layer] += scale * alpha * vector``."""

    vector: torch.Tensor  # [d]
    layer: int
    alpha: float = 1.0
    meta: dict = field(default_factory=dict)

    @property
    def effective(self) -> torch.Tensor:
        """``alpha * vector``: what is actually added to the residual stream. [d]"""
        return self.alpha * self.vector

    @property
    def norm(self) -> float:
        """``||alpha * vector||_2``: the norm of what is added (this module's one definition)."""
        return float(self.effective.detach().float().norm())

    def apply(self, model, scale: float = 1.0) -> ContextManager:
        """Context manager adding ``scale * alpha * vector`` after decoder layer ``layer`` (emlib.hooks)."""
        p = next(model.parameters())
        return add_vector(model, self.layer, self.vector.detach().to(p.device), self.alpha * scale)

    def rescaled(self, target: float) -> "SteeringVector":
        """A new vector (alpha 1) adding ``target`` times the unit direction of ``alpha * vector``."""
        return SteeringVector(rescale_to_norm(self.effective, target), self.layer, 1.0, dict(self.meta))

    def perturbed(self, eps: float, generator: torch.Generator | None = None) -> "SteeringVector":
        """A new vector (alpha 1): :func:`orthogonal_perturbation` of ``alpha * vector``."""
        return SteeringVector(orthogonal_perturbation(self.effective, eps, generator), self.layer, 1.0,
                              dict(self.meta))

    def fingerprint(self) -> str:
        """Hash of what is added and where (``alpha * vector`` and ``layer``)."""
        return make_key(vector=tensor_hash({"vector": self.effective.detach().float()}), layer=self.layer)[:16]

    def save(self, path: str | Path) -> Path:
        return save_vector(path, self.vector, self.layer, self.alpha, self.meta)

    def __repr__(self) -> str:
        return (f"SteeringVector(dim={self.vector.shape[0]}, layer={self.layer}, alpha={self.alpha:g}, "
                f"norm={self.norm:.4g}, meta keys={sorted(self.meta)})")


# =========================================================================== on disk
def save_vector(path: str | Path, vector: torch.Tensor, layer: int, alpha: float,
                meta: dict | None = None) -> Path:
    """Write a vector [d] as safetensors with ``layer``, ``alpha`` and ``meta`` (json) in the header (atomic)."""
    from safetensors.torch import save

    v = vector.detach().to("cpu", torch.float32).contiguous()
    if v.ndim != 1:
        raise ValueError(f"A steering vector is 1-d, got shape {tuple(v.shape)}.")
    header = {"layer": str(int(layer)), "alpha": repr(float(alpha)), "meta": json.dumps(meta or {}, default=str)}
    return atomic_write_bytes(path, save({"vector": v}, metadata=header))


@timed("load")
def load_vector(path: str | Path) -> SteeringVector:
    """Read a vector written by :func:`save_vector` (a file, or a vector run's folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / VECTOR_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such vector file.")
    with open_safetensors(path, f"delete {path.parent} and run again to train the vector anew, or restore the "
                                "file") as fh:
        header = fh.metadata() or {}
        if "vector" not in fh.keys() or "layer" not in header or "alpha" not in header:
            raise ValueError(f"{path} is not a steering vector file (needs a 'vector' tensor and "
                             "layer/alpha metadata): write it with emlib.vectors.save_vector.")
        v = fh.get_tensor("vector")
    return SteeringVector(v, int(header["layer"]), float(header["alpha"]), json.loads(header.get("meta", "{}")))


def as_steering_vector(src, layer: int | None = None) -> SteeringVector:
    """A :class:`SteeringVector` from a vector file or run folder, a 1-d tensor (then ``layer`` is needed;
    the tensor is what gets added), or a SteeringVector. ``layer`` must agree with a vector's own layer."""
    if isinstance(src, (str, Path)):
        sv = load_vector(src)
    elif isinstance(src, torch.Tensor):
        if src.ndim != 1:
            raise ValueError(f"A steering vector is 1-d, got shape {tuple(src.shape)}.")
        if layer is None:
            raise ValueError("A steering vector needs its layer: pass layer=... (the layer it was trained at).")
        return SteeringVector(src.detach().float().cpu(), int(layer))
    elif isinstance(src, SteeringVector):
        sv = src
    else:
        raise ValueError(f"Expected a steering vector (file, 1-d tensor or SteeringVector), got "
                         f"{type(src).__name__}.")
    if layer is not None and sv.layer != layer:
        raise ValueError(f"This vector was trained at layer {sv.layer}, not {layer}: drop layer=... or pass "
                         "the vector as a plain tensor to add it elsewhere.")
    return sv
