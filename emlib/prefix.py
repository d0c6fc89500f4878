"""Reusing the layers a metric loop does not change.

The inductive metrics run the same documents or rows through the model many times, changing only what sits at
one layer: a steering vector added at layer ``k`` (chapter 6's 200 random directions x 11 norms), a rank-1
adapter or a noisy vector there (chapters 4-5). Layers ``0 .. k-1`` compute the same thing every time. Inside
``with reuse_prefix(decoder_model, k):`` :func:`emlib.chat.head_inputs` runs the whole decoder once per distinct
batch, keeps what enters layer ``k`` (and the keyword arguments every later layer received: attention masks,
rotary embeddings), and from then on runs only layers ``k ..`` and the final norm. The numbers are those of the
full forward: the same modules run on the same inputs.

What may change between calls is checked, not assumed: a forward hook on a layer below ``k``, a LoRA module
there, or a parameter below ``k`` replaced or modified in place (``Tensor._version``) makes :func:`head_inputs`
raise or recompute; a decoder this cannot handle (no ``layers`` or ``norm``) runs whole.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from .adapters import has_lora

MAX_BATCHES = 4  # distinct batches kept at once (each: what enters layer k, [rows, tokens, hidden])
ENABLED = True  # False: every reuse_prefix block changes nothing (benchmarks compare both ways)


class PrefixCache:
    """What enters layer ``k`` of ``decoder`` for up to :data:`MAX_BATCHES` batches, and each later layer's
    keyword arguments."""

    def __init__(self, decoder: torch.nn.Module, k: int):
        layers = getattr(decoder, "layers", None)
        if layers is None or not hasattr(decoder, "norm") or not 0 <= k < len(layers):
            raise ValueError(f"reuse_prefix needs a decoder with .layers and .norm and 0 <= layer < its depth; "
                             f"got layer {k} of {type(decoder).__name__}.")
        self.decoder, self.k, self.layers = decoder, k, layers
        self.fixed = [p for n, p in decoder.named_parameters() if not self._in_suffix(n)]
        self.stamp = self._stamp()
        self.entries: list[dict] = []
        self.hits = self.misses = 0

    def _in_suffix(self, name: str) -> bool:
        parts = name.split(".")
        return (parts[0] == "layers" and int(parts[1]) >= self.k) or parts[0] == "norm"

    def _stamp(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.fixed)

    def _check(self) -> None:
        for i, layer in enumerate(self.layers[:self.k]):
            if has_lora(layer):
                raise RuntimeError(f"reuse_prefix(layer={self.k}): layer {i} has a LoRA module: reuse from the "
                                   "adapter's first layer or lower.")
            for name, mod in layer.named_modules():
                if mod._forward_hooks or mod._forward_pre_hooks:
                    raise RuntimeError(f"reuse_prefix(layer={self.k}): layer {i} ({name or 'itself'}) has a forward "
                                       "hook, so its output can change between calls: reuse from that layer or lower.")
        stamp = self._stamp()
        if stamp != self.stamp:  # a weight below k changed: nothing kept is valid any more
            self.entries, self.stamp = [], stamp

    def _find(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, kw: dict) -> dict | None:
        for e in self.entries:
            if (e["ids"].shape == input_ids.shape and torch.equal(e["ids"], input_ids)
                    and _same(e["mask"], attention_mask) and e["kw"].keys() == kw.keys()
                    and all(_same(e["kw"][n], v) for n, v in kw.items())):
                return e
        return None

    def _capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, kw: dict) -> torch.Tensor:
        """One full forward, keeping what enters layer k and every later layer's other arguments; returns the
        forward's ``last_hidden_state``. ``kw``: the decoder's other arguments (packed rows' position ids and
        bounds: :func:`emlib.chat.head_inputs`), part of the entry's key."""
        seen: dict[int, tuple] = {}

        def grab(i):
            def hook(mod, args, kwargs):
                seen[i] = (args[0] if args else kwargs["hidden_states"], args[1:],
                           {n: v for n, v in kwargs.items() if n != "hidden_states"})
            return hook

        handles = [self.layers[i].register_forward_pre_hook(grab(i), with_kwargs=True)
                   for i in range(self.k, len(self.layers))]
        try:
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
        finally:
            for h in handles:
                h.remove()
        if len(seen) != len(self.layers) - self.k:
            raise RuntimeError("reuse_prefix: the decoder did not call each of its layers once.")
        entry = {"ids": input_ids.clone(), "mask": _copy(attention_mask), "kw": {n: _copy(v) for n, v in kw.items()},
                 "hidden": seen[self.k][0],
                 "calls": [(a, kw) for _, a, kw in (seen[i] for i in range(self.k, len(self.layers)))]}
        self.entries = (self.entries + [entry])[-MAX_BATCHES:]
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kw) -> torch.Tensor:
        """What the decoder's forward returns as ``last_hidden_state`` [b, s, d]."""
        self._check()
        entry = self._find(input_ids, attention_mask, kw)
        if entry is None:
            self.misses += 1
            return self._capture(input_ids, attention_mask, kw)
        self.hits += 1
        h = entry["hidden"]
        for layer, (args, kwargs) in zip(self.layers[self.k:], entry["calls"]):
            out = layer(h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return self.decoder.norm(h)


def _copy(v):
    """A key part kept by value: tensors cloned (inside tuples too), the rest as it is."""
    if isinstance(v, torch.Tensor):
        return v.clone()
    return tuple(_copy(x) for x in v) if isinstance(v, tuple) else v


def _same(a, b) -> bool:
    """Whether two key parts (None, tensors, tuples of them, plain values) are equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.device == b.device and torch.equal(a, b))
    if isinstance(a, tuple) or isinstance(b, tuple):
        return (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b)))
    return a == b


_ACTIVE: dict[int, PrefixCache] = {}  # id(decoder) -> its cache, while a reuse_prefix block is open


@contextlib.contextmanager
def reuse_prefix(model, layer: int | None) -> Iterator[PrefixCache | None]:
    """Within the block, :func:`emlib.chat.head_inputs` on ``model`` (a causal LM or a peft model) reuses what its
    layers below ``layer`` computed for a batch it has seen. ``layer`` None or 0, or a model whose decoder cannot
    be split (:func:`emlib.chat._plain_head`), changes nothing. Yields the cache (None when unused)."""
    decoder = _split_decoder(model) if layer and ENABLED else None
    if decoder is None:
        yield None
        return
    if id(decoder) in _ACTIVE:
        raise RuntimeError("reuse_prefix blocks on one model do not nest.")
    cache = PrefixCache(decoder, int(layer))
    _ACTIVE[id(decoder)] = cache
    try:
        yield cache
    finally:
        del _ACTIVE[id(decoder)]


def _split_decoder(model) -> torch.nn.Module | None:
    """``model``'s decoder (:func:`emlib.chat._plain_head`) when it has ``layers`` and a final ``norm``."""
    from .chat import _plain_head

    parts = _plain_head(model)
    decoder = parts[0] if parts is not None else None
    if decoder is None or getattr(decoder, "layers", None) is None or not hasattr(decoder, "norm"):
        return None
    return decoder


def lowest_layer(model, vector_layers: Iterable[int] = ()) -> int | None:
    """The lowest decoder layer that a set of solutions changes: each steering vector's layer and every layer
    that holds a LoRA module (a rank-32 adapter on all layers gives 0: nothing to reuse). None where the
    decoder cannot be split."""
    decoder = _split_decoder(model)
    if decoder is None:
        return None
    found = [int(i) for i in vector_layers]
    found += [i for i, layer in enumerate(decoder.layers) if has_lora(layer)]
    return min(found) if found else None


def active(decoder: torch.nn.Module) -> PrefixCache | None:
    return _ACTIVE.get(id(decoder))
