"""Plain PyTorch forward hooks on decoder layers: add a vector, or project a direction out.

These are the interventions used inside batched sampling (``emlib.generate``), training of steering
vectors (``emlib.train``) and the pretraining-KL metric. ``emlib.directions`` has the nnsight versions
used for inspection and tests them against these.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterable

import torch

from .models import check_layer, decoder_layers


def _hidden(output):
    """transformers 5: a decoder layer returns the hidden-state tensor; older: a tuple."""
    return output[0] if isinstance(output, tuple) else output


def _replace(output, hidden):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def _check_dim(model, vector: torch.Tensor) -> None:
    d = model.config.hidden_size if hasattr(model, "config") else None
    if vector.ndim != 1 or (d is not None and vector.shape[0] != d):
        raise ValueError(f"Vector has shape {tuple(vector.shape)}, but the model's residual stream has "
                         f"size {d}: pass a 1-d vector of length {d}.")


@contextmanager
def _edit_output(model, layer: int, edit):
    """While active, the output hidden state ``h`` of decoder layer ``layer`` becomes ``edit(h)``."""
    block = decoder_layers(model)[check_layer(model, layer)]

    def hook(_mod, _inp, output):
        return _replace(output, edit(_hidden(output)))

    handle = block.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def add_vector(model, layer: int, vector: torch.Tensor, scale: float | torch.Tensor = 1.0):
    """While active, ``hidden += scale * vector`` at the output of decoder layer ``layer`` (all positions).

    ``vector`` may be a trainable Parameter: gradients flow through the hook.
    """
    _check_dim(model, vector)
    return _edit_output(model, layer, lambda h: h + (scale * vector).to(h.dtype))


def add_rows(model, layer: int, vectors: torch.Tensor):
    """While active, ``hidden[i] += vectors[i]`` at the output of decoder layer ``layer`` (all positions): one
    vector per row of the batch, ``vectors`` [b, d] (many directions evaluated in one forward pass)."""
    d = model.config.hidden_size if hasattr(model, "config") else None
    if vectors.ndim != 2 or (d is not None and vectors.shape[1] != d):
        raise ValueError(f"add_rows takes one vector per batch row, [b, {d}]; got {tuple(vectors.shape)}.")

    def edit(h: torch.Tensor) -> torch.Tensor:  # [b, s, d]
        if h.shape[0] != vectors.shape[0]:
            raise ValueError(f"add_rows got {vectors.shape[0]} vectors for a batch of {h.shape[0]} rows.")
        return h + vectors[:, None, :].to(h.dtype)

    return _edit_output(model, layer, edit)


@contextmanager
def ablate_direction(model, vector: torch.Tensor, layers: int | Iterable[int] | None = None):
    """While active, remove the component along ``vector`` from the output of the given layers
    (``None``: every layer): ``h -= (h . v_hat) v_hat``."""
    _check_dim(model, vector)
    n = len(decoder_layers(model))
    if layers is None:
        idxs = list(range(n))
    elif isinstance(layers, int):
        idxs = [check_layer(model, layers)]
    else:
        idxs = [check_layer(model, i) for i in layers]
    unit = vector / vector.norm().clamp_min(1e-12)

    def hook(_mod, _inp, output):
        h = _hidden(output)
        u = unit.to(device=h.device, dtype=h.dtype)
        return _replace(output, h - (h @ u).unsqueeze(-1) * u)

    handles = [decoder_layers(model)[i].register_forward_hook(hook) for i in idxs]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@contextmanager
def nothing(model=None):
    """The null intervention (so callers can always write ``with intervention(model):``)."""
    yield model


@contextmanager
def combine(*managers):
    """Enter several interventions at once."""
    with ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield
