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
def _edit_output(model, layers: int | Iterable[int] | None, edit):
    """While active, the output hidden state ``h`` of the given decoder layers (:func:`layer_indices`: one,
    several, or ``None`` for every layer) becomes ``edit(h)``."""
    def hook(_mod, _inp, output):
        return _replace(output, edit(_hidden(output)))

    blocks = decoder_layers(model)
    handles = [blocks[i].register_forward_hook(hook) for i in layer_indices(model, layers)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def add_vector(model, layer: int, vector: torch.Tensor, scale: float | torch.Tensor = 1.0):
    """While active, ``hidden += scale * vector`` at the output of decoder layer ``layer`` (all positions).

    ``vector`` may be a trainable Parameter: gradients flow through the hook.
    """
    _check_dim(model, vector)
    return _edit_output(model, layer, lambda h: h + (scale * vector).to(h.dtype))


# ------------------------------------------------------------------------- per-row interventions
# A per-row intervention holds one vector per row of the batch it was made for. Code that runs such a batch in
# pieces (the fast sampler prefills row chunks, and splits large calls) says which rows a forward carries with
# ``row_window``; the interventions then use the matching rows of their table.
# Each window: (start, stop) in the rows of the outermost batch, or a [n] tensor of those rows' indices (a
# sampler that drops finished rows from its batch).
_WINDOWS: list = []


@contextmanager
def row_window(rows: "slice | torch.Tensor"):
    """While active, per-row interventions (:func:`add_rows`, :func:`ablate_rows`) apply their rows ``rows``
    of the current window's rows: a step-1 slice, or a tensor of row indices [n] (any subset, in the order
    the forward passes inside carry them)."""
    outer = _WINDOWS[-1] if _WINDOWS else (0, None)
    if isinstance(rows, torch.Tensor):
        idx = rows.long()
        if isinstance(outer, tuple):
            window = idx + outer[0]
        else:
            window = outer[idx.to(outer.device)]
    elif rows.step not in (None, 1):
        raise ValueError(f"row_window takes a contiguous slice or a tensor of row indices, got {rows}.")
    elif isinstance(outer, tuple):
        start0, stop0 = outer
        window = (start0 + (rows.start or 0), start0 + rows.stop if rows.stop is not None else stop0)
    else:
        window = outer[rows]
    _WINDOWS.append(window)
    try:
        yield
    finally:
        _WINDOWS.pop()


def _rows_for(per_row: torch.Tensor, h: torch.Tensor, name: str) -> torch.Tensor:
    """The rows of ``per_row`` [B, ...] that the batch ``h`` [b, ...] carries (the current row window)."""
    window = _WINDOWS[-1] if _WINDOWS else (0, None)
    if isinstance(window, tuple):
        rows = per_row[window[0]:window[1]]
    else:
        rows = per_row.index_select(0, window.to(per_row.device))
    if rows.shape[0] != h.shape[0]:
        raise ValueError(f"{name} has {rows.shape[0]} row(s) for a batch of {h.shape[0]}: one per row of the "
                         "batch it was made for (a caller that runs the batch in pieces must say which rows "
                         "each piece carries with emlib.hooks.row_window).")
    return rows


def _check_rows(model, per_row: torch.Tensor, name: str) -> None:
    d = model.config.hidden_size if hasattr(model, "config") else None
    if per_row.ndim != 2 or (d is not None and per_row.shape[1] != d):
        raise ValueError(f"{name} takes one vector per batch row, [b, {d}]; got {tuple(per_row.shape)}.")


def add_rows(model, layer: int, vectors: torch.Tensor):
    """While active, ``hidden[i] += vectors[i]`` at the output of decoder layer ``layer`` (all positions): one
    vector per row of the batch, ``vectors`` [b, d] (many directions evaluated in one forward pass)."""
    _check_rows(model, vectors, "add_rows")

    def edit(h: torch.Tensor) -> torch.Tensor:  # [b, s, d]
        return h + _rows_for(vectors, h, "add_rows")[:, None, :].to(h.dtype)

    return _edit_output(model, layer, edit)


@contextmanager
def ablate_rows(model, vectors: torch.Tensor, layers: int | Iterable[int] | None = None):
    """While active, row i of the batch loses its component along ``vectors[i]`` ([b, d]) at the output of the
    given layers (``None``: every layer): :func:`ablate_direction` with one direction per row, so several
    ablations are sampled in one batch. A zero row leaves its row unchanged (the no-ablation condition)."""
    _check_rows(model, vectors, "ablate_rows")
    norms = vectors.float().norm(dim=-1, keepdim=True)  # [b, 1]
    units = torch.where(norms > 0, vectors.float() / norms.clamp_min(1e-12), 0.0)  # [b, d]

    def edit(h: torch.Tensor) -> torch.Tensor:  # [b, s, d]
        u = _rows_for(units, h, "ablate_rows").to(device=h.device, dtype=h.dtype)[:, None, :]  # [b, 1, d]
        return h - (h @ u.transpose(1, 2)) * u  # [b, s, 1] * [b, 1, d], as ablate_direction

    with _edit_output(model, layers, edit):
        yield model


def layer_indices(model, layers: int | Iterable[int] | None) -> list[int]:
    """The checked decoder-layer indices of ``layers``: one index, several, or ``None`` for every layer."""
    if layers is None:
        return list(range(len(decoder_layers(model))))
    if isinstance(layers, int):
        return [check_layer(model, layers)]
    return [check_layer(model, i) for i in layers]


@contextmanager
def ablate_direction(model, vector: torch.Tensor, layers: int | Iterable[int] | None = None):
    """While active, remove the component along ``vector`` from the output of the given layers
    (``None``: every layer): ``h -= (h . v_hat) v_hat``."""
    _check_dim(model, vector)
    unit = vector / vector.norm().clamp_min(1e-12)

    def edit(h: torch.Tensor) -> torch.Tensor:
        u = unit.to(device=h.device, dtype=h.dtype)
        return h - (h @ u).unsqueeze(-1) * u

    with _edit_output(model, layers, edit):
        yield model


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
