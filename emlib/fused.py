"""Fewer kernels per decoder layer: q, k and v in one matmul, gate and up in one, the rotary embedding of q and
k together in three operations.

A 135M-0.5B model at this book's batch sizes leaves a GPU's arithmetic units mostly idle: a decode step, a
16-row training step or a metric forward is one small kernel after another, and its time follows their number
more than their size (``bench/README.md``). Per layer, transformers' Llama / Qwen2 / Mistral code runs three
projections for q, k and v; ten element-wise operations for the rotary embedding (``rotate_half``: a negation
and a concatenation, then two products and a sum, once for q and once for k); and two projections for the
MLP's gate and up. While :func:`fused_layers` is active:

* every attention rotates q and k together as ``x * cos + roll(x, d/2) * sin_signed`` (one product, one roll,
  one ``addcmul``; ``sin_signed`` is ``sin`` with its first half negated, made once per forward);
* an attention whose q, k and v projections qualify computes them with one matmul on their concatenated
  weights (otherwise it calls the three modules, e.g. a rank-32 LoRA being trained, and concatenates q and k);
* an MLP whose gate and up projections qualify computes both with one matmul.

A projection qualifies when it is a plain ``nn.Linear``, or a peft LoRA layer whose adapters are merged into
its base layer (as :func:`emlib.fastgen.merged_lora` does while sampling), with no hooks of its own. Everything
else runs as before: the o and down projections (a LoRA adapter there keeps training), the attention function
the model is configured with, the norms, hooks on decoder layers (:mod:`emlib.hooks`). A forward through
which a gradient would reach a fused projection's weight (grad mode on and the weight requiring it), or after
its adapter was unmerged or disabled, calls the projection modules instead: the concatenated weights are
copies made on entry, carry no gradient and do not follow later changes (SmolLM2-135M: 70M parameters, 140 MB
in bf16).

The arithmetic is the same up to rounding: each output of a concatenated matmul is the same dot product (a GPU
library may pick another kernel for the wider matrix, so bf16 results can differ in the last bit), and
``addcmul`` rounds once where transformers rounds two products and a sum. In float32 on the CPU the logits and
gradients agree with transformers' to ~1e-6 (``tests/test_fused.py``).

:func:`fused_rms_norms` (each RMSNorm as one ``F.rms_norm`` kernel) lives here too: the fast paths enter both, and
the metric loops' forwards enter both through :func:`fused_forward`.

Used by the fast sampler (:mod:`emlib.fastgen`), the steering-vector group (:mod:`emlib.vecgroup`), the fast
training step (:mod:`emlib.fasttrain`) and the metric loops' forwards (:func:`emlib.chat.head_inputs` and the
KL's labelled forward: chapters 3-6's losses and KL), each for the duration of its call, so the copies never
outlive a weight change of the model's own (a LoRA merge, a training step). ``$EMLIB_FUSED``: ``auto`` (the default) fuses on a CUDA device only
(on a CPU it was 8% slower), ``on`` on the CPU too, ``off`` nowhere (:func:`fused_setting`);
:func:`fused_layers` yields how many attentions and MLPs it fused.
"""
from __future__ import annotations

import functools
import sys
from contextlib import contextmanager, nullcontext
from typing import Callable, Sequence

import torch

from .models import env_switch, switched_on

FUSED_ENV = "EMLIB_FUSED"
ATTENTION_CLASSES = ("LlamaAttention", "Qwen2Attention", "MistralAttention")
MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "MistralMLP")


def fused_setting() -> str:
    """``$EMLIB_FUSED``: ``auto`` (the default: fuse on a CUDA device only), ``on`` (on the CPU too) or ``off``."""
    return env_switch(FUSED_ENV, "auto", ("auto", "on", "off"), "auto (CUDA only), on or off")


def fuses(model) -> bool:
    """Whether :func:`fused_layers` fuses ``model``'s layers by default (:func:`fused_setting`). ``auto`` leaves
    the CPU alone: there the arithmetic, not the number of kernels, sets the time, and SmolLM2-135M's forward
    of 8 x 128 tokens on 2 cores took 1.23 s fused against 1.14 s not (medians of 8)."""
    p = next(model.parameters(), None)
    return switched_on(fused_setting(), p.device if p is not None else "cpu")


def _clean(m) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) and "forward" not in m.__dict__


def _linear(m) -> torch.nn.Linear | None:
    """The plain ``nn.Linear`` that computes ``m``'s output: ``m`` itself, or the base layer of a peft LoRA layer
    whose adapters are merged into it (its forward is then the base layer's); None for anything else (hooks on
    either, unmerged or disabled adapters, other module types)."""
    if type(m) is torch.nn.Linear:
        return m if _clean(m) else None
    base = getattr(m, "base_layer", None)
    if (type(base) is torch.nn.Linear and getattr(m, "merged", False) and not getattr(m, "disable_adapters", True)
            and _clean(m) and _clean(base)):
        return base
    return None


def _usable(*mods) -> bool:
    """Whether the fused copies of ``mods`` still stand for them now: each still computes through the same
    plain linear (an adapter was not unmerged or disabled since), and no gradient would reach those linears'
    weights (grad mode on and a weight requiring it: the copies carry no gradient)."""
    lins = [_linear(m) for m in mods]
    if any(x is None for x in lins):
        return False
    return not (torch.is_grad_enabled() and any(p.requires_grad for x in lins for p in x.parameters()))


def _cat_linear(*mods) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights [sum out, in] (and biases, zeros where a module has none) of the linears computing ``mods``
    (:func:`_linear`), stacked in order."""
    mods = [_linear(m) for m in mods]
    w = torch.cat([m.weight.detach() for m in mods])
    if all(m.bias is None for m in mods):
        return w, None
    b = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in mods])
    return w, b


class _SignedSin:
    """``sin`` with its first half negated, for the rotary step of :func:`rope`: computed once per ``sin`` tensor
    (every layer of a forward receives the same object) and kept exactly as long as that tensor lives.

    Kept per tensor, not just for the last one: a caller may hold its rotary tensors across passes (the vector
    group's split decoder keeps one per padded length) and capture a CUDA graph that reads the signed copy made
    before the capture; had a later length replaced that copy, its memory could be reused while the graph still
    reads it."""

    def __init__(self):
        from torch.utils.weak import WeakIdKeyDictionary

        self._of = WeakIdKeyDictionary()  # sin tensor (by identity) -> its signed copy

    def __call__(self, sin: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced (EMLIB_COMPILE): computed inline, fused by inductor; a lookup
            return self.signed(sin)        # by identity would split every layer's graph in three
        out = self._of.get(sin)
        if out is None:
            out = self._of[sin] = self.signed(sin)
        return out

    @staticmethod
    def signed(sin: torch.Tensor) -> torch.Tensor:
        half = sin.shape[-1] // 2
        return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [..., d] as transformers' ``apply_rotary_pos_emb`` computes it (``x * cos +
    rotate_half(x) * sin``): ``rotate_half(x) * sin == roll(x, d/2) * sin_signed``; ``cos`` and ``sin_signed``
    broadcast against ``x``."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


def _attention_fn(mod):
    """The attention function ``mod``'s config selects, resolved as transformers' attention modules do."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = mod.config._attn_implementation
    eager = sys.modules[type(mod).__module__].eager_attention_forward
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    return eager if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]


def _attention_forward(mod, w: torch.Tensor | None, b: torch.Tensor | None, signed: _SignedSin,
                       hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                       past_key_values=None, cache=None, **kwargs):
    """A Llama / Qwen2 / Mistral attention's forward with q and k rotated together, and q, k, v from one matmul
    on the concatenated weights ``w`` (and biases ``b``) where those still stand for the projections."""
    cache = cache if cache is not None else past_key_values
    packed = kwargs.pop(PACKED_KWARG, None)  # (cu_seqlens, longest): rows packed into one (emlib.fasttrain)
    bsz, s = hidden_states.shape[:2]
    d, n_q, n_kv = mod.head_dim, mod.config.num_attention_heads, mod.config.num_key_value_heads
    if w is not None and _usable(mod.q_proj, mod.k_proj, mod.v_proj):
        qkv = torch.nn.functional.linear(hidden_states, w, b).view(bsz, s, n_q + 2 * n_kv, d)  # [b, s, heads, d]
        qk, v = qkv[:, :, :n_q + n_kv], qkv[:, :, n_q + n_kv:]
    else:  # through the modules (LoRA adapters, hooks, gradients to their weights); q and k still rotated together
        qk = torch.cat((mod.q_proj(hidden_states), mod.k_proj(hidden_states)), dim=-1).view(bsz, s, n_q + n_kv, d)
        v = mod.v_proj(hidden_states).view(bsz, s, n_kv, d)
    cos, sin = position_embeddings  # [b, s, d]
    qk = rope(qk, cos.unsqueeze(2), signed(sin).unsqueeze(2))  # [b, s, n_q + n_kv, d]
    if packed is not None:
        if bsz != 1 or cache is not None or (mod.training and mod.attention_dropout):
            raise ValueError("packed rows need one packed row, no cache and no attention dropout")
        out = packed_attention(qk[0, :, :n_q], qk[0, :, n_q:], v[0], packed[0], packed[1], mod.scaling)  # [s, n_q, d]
        return mod.o_proj(out.reshape(1, s, -1)), None
    q = qk[:, :, :n_q].transpose(1, 2)  # [b, n_q, s, d]
    k = qk[:, :, n_q:].transpose(1, 2)
    v = v.transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, mod.layer_idx)
    out, weights = _attention_fn(mod)(mod, q, k, v, attention_mask,
                                      dropout=0.0 if not mod.training else mod.attention_dropout,
                                      scaling=mod.scaling, **kwargs)
    return mod.o_proj(out.reshape(bsz, s, -1).contiguous()), weights


# ------------------------------------------------------------------------------------------ packed rows
PACKED_KWARG = "emlib_packed"  # the decoder kwarg that carries (cu_seqlens, longest row) to a fused attention
PACK_ENV = "EMLIB_PACK"


def pack_setting() -> str:
    """``$EMLIB_PACK``: ``auto`` (the default: packed training rows where :func:`packing_works`), ``on`` (also on
    a CPU, through the sequence-by-sequence fallback of :func:`packed_attention`: for tests) or ``off``."""
    return env_switch(PACK_ENV, "auto", ("auto", "on", "off"), "auto (CUDA only), on or off")


@functools.lru_cache(maxsize=None)
def _varlen():
    """(torch's variable-length flash attention, whether it takes ``window_size``) or None where torch lacks it."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, "window_size" in inspect.signature(varlen_attn).parameters


def _packs(model, setting: str, attention_ok: Callable[[torch.nn.Module], bool]) -> bool:
    """The rule both packings follow (:func:`packing_works`, :func:`packs_metrics`): the switch is not off, the
    model has decoder attentions and each passes ``attention_ok``, and on a GPU torch has variable-length flash
    attention; on a CPU only with the switch ``on``."""
    if setting == "off":
        return False
    attn = [m for m in model.modules() if type(m).__name__ in ATTENTION_CLASSES]
    if not attn or not all(attention_ok(m) for m in attn):
        return False
    if next(model.parameters()).device.type == "cuda":
        return _varlen() is not None
    return setting == "on"


def packing_works(model, setting: str | None = None) -> bool:
    """Whether a training step may pack its rows into one sequence for ``model`` now: the switch allows it, every
    decoder attention runs :func:`fused_layers`' forward (which reads the packed rows' bounds; enter it first),
    and on a GPU torch has variable-length flash attention (``torch.nn.attention.varlen``). ``setting``: the
    switch's value (None: :func:`pack_setting`; the metric forwards pass their own, :func:`packs_metrics`)."""
    return _packs(model, pack_setting() if setting is None else setting,
                  lambda m: getattr(m.__dict__.get("forward"), "func", None) is _attention_forward)


METRIC_PACK_ENV = "EMLIB_PACK_METRICS"


def metric_pack_setting() -> str:
    """``$EMLIB_PACK_METRICS``: whether the metric loops' forwards (:func:`emlib.chat.response_row_losses`) pack
    their rows into one sequence instead of right-padding them: ``off`` (the default until a GPU run measures it),
    ``auto`` (on a CUDA device with torch's variable-length flash attention) or ``on`` (also on a CPU, through
    :func:`packed_attention`'s sequence-by-sequence fallback: for tests)."""
    return env_switch(METRIC_PACK_ENV, "off", ("auto", "on", "off"), "off (the default), auto (CUDA only) or on")


def packs_metrics(model) -> bool:
    """Whether a metric forward of ``model`` packs its rows now (:func:`metric_pack_setting`): the setting allows
    it, :func:`fused_layers` would run every decoder attention (it fuses on this device: :func:`fuses`; each
    attention qualifies: :func:`_patchable_attention`), the logits are the LM head on the decoder's output
    (:func:`emlib.chat._plain_head`), and on a GPU torch has variable-length flash attention. Checked before the
    batch is built; :func:`emlib.chat.head_inputs` checks :func:`packing_works` again once inside."""
    from .chat import _plain_head

    setting = metric_pack_setting()
    if setting == "off" or not fuses(model) or _plain_head(model) is None:
        return False
    return _packs(model, setting, _patchable_attention)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, longest: int,
                     scale: float) -> torch.Tensor:
    """Causal attention within each of the sequences packed end to end in q [t, n_q, d], k and v [t, n_kv, d]
    (``cu_seqlens`` [n + 1] int32: where each starts, then the total; ``longest``: at least the longest's length).
    On CUDA torch's variable-length flash attention (no padding computed); elsewhere causal ``sdpa`` on each
    sequence in turn (the same numbers, for tests and CPUs). Returns [t, n_q, d]."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:  # grouped query heads repeated: torch 2.11's varlen_attn has no enable_gqa, and sdpa's takes its
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # math path (every score kept)
    fn = _varlen() if q.is_cuda else None
    if fn is not None:
        varlen_attn, windowed = fn
        causal = {"window_size": (-1, 0)} if windowed else {"is_causal": True}
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest, scale=scale, **causal)
    bounds = cu_seqlens.tolist()  # on the host: this path is for CPUs (a GPU's packing needs varlen_attn)
    parts = [torch.nn.functional.scaled_dot_product_attention(
        q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True, scale=scale
    ).transpose(0, 1) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]  # [len, n_q, d]
    return torch.cat(parts) if parts else q.new_zeros(q.shape)


def _mlp_forward(mod, w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if not _usable(mod.gate_proj, mod.up_proj):
        return type(mod).forward(mod, x)
    gate, up = torch.nn.functional.linear(x, w, b).chunk(2, dim=-1)
    return mod.down_proj(mod.act_fn(gate) * up)


def _usable_at_entry(*mods) -> bool:
    return all(_linear(x) is not None for x in mods)


def _patchable_attention(m) -> bool:
    """A Llama / Qwen2 / Mistral attention without a sliding window or a forward of its own: its rotary
    embedding can run fused (its projections too where :func:`_usable_at_entry`)."""
    return (type(m).__name__ in ATTENTION_CLASSES and "forward" not in m.__dict__
            and getattr(m, "sliding_window", None) is None
            and all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling",
                                             "layer_idx", "config"))
            and all(hasattr(m.config, a) for a in ("num_attention_heads", "num_key_value_heads")))


def _fusable_mlp(m) -> bool:
    return (type(m).__name__ in MLP_CLASSES and "forward" not in m.__dict__
            and all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
            and _usable_at_entry(m.gate_proj, m.up_proj))


@contextmanager
def fused_layers(model, enabled: bool | None = None):
    """While active, the qualifying attentions and MLPs of ``model`` run fused (module docstring). ``enabled``:
    None as :func:`fuses` says (``$EMLIB_FUSED``; by default on a CUDA device only). Yields ``{"attention": n,
    "rope": n, "mlp": n}``: the attentions whose projections are fused, those whose rotary embedding is, the MLPs
    fused. The modules stay in place: their forward is an instance attribute while the block runs."""
    on = fuses(model) if enabled is None else enabled
    patches: list = []
    counts = {"attention": 0, "rope": 0, "mlp": 0}
    if on:
        signed = _SignedSin()
        for m in model.modules():
            if _patchable_attention(m):
                fuse = _usable_at_entry(m.q_proj, m.k_proj, m.v_proj)
                w, b = _cat_linear(m.q_proj, m.k_proj, m.v_proj) if fuse else (None, None)
                patches.append((m, functools.partial(_attention_forward, m, w, b, signed)))
                counts["rope"] += 1
                counts["attention"] += int(fuse)
            elif _fusable_mlp(m):
                patches.append((m, functools.partial(_mlp_forward, m, *_cat_linear(m.gate_proj, m.up_proj))))
                counts["mlp"] += 1
    with patched_forwards(patches):
        yield counts


@contextmanager
def patched_forwards(patches: Sequence[tuple[torch.nn.Module, Callable]]):
    """While active, each module of ``patches`` runs its function as its forward (an instance attribute: the module
    stays in place and its hooks still fire); the class's forward is back on exit. One home for the fast paths'
    patched modules (:func:`fused_layers`, :func:`fused_rms_norms`, ``emlib.fasttrain.fused_lora_linears``)."""
    for m, fn in patches:
        m.forward = fn
    try:
        yield
    finally:
        for m, _ in patches:
            m.__dict__.pop("forward", None)


# --------------------------------------------------------------------------------------------------- RMSNorm
_NORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")


def _fused_rms_forward(mod, x: torch.Tensor) -> torch.Tensor:
    if mod.weight.dtype != x.dtype:  # mixed dtypes: the module's own arithmetic
        return type(mod).forward(mod, x)
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), mod.weight, mod.variance_epsilon)


@contextmanager
def fused_rms_norms(model):
    """While active, the model's Llama/Qwen/Mistral RMSNorm modules run ``F.rms_norm`` (one fused kernel on
    CUDA instead of eight; float32 arithmetic inside, one rounding at the end instead of two: the result
    differs from transformers' by bf16 rounding only, and not at all in float32). The modules stay in place
    (hooks on them still fire). Yields the number of patched modules."""
    mods = [m for m in model.modules() if type(m).__name__ in _NORM_CLASSES and "forward" not in m.__dict__
            and hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None and m.weight.ndim == 1]
    with patched_forwards([(m, functools.partial(_fused_rms_forward, m)) for m in mods]):
        yield len(mods)


@contextmanager
def fused_forward(model, enabled: bool | None = None):
    """The metric loops' forwards (:func:`emlib.chat.head_inputs`, the KL's labelled forward in
    :mod:`emlib.fasttrain`): :func:`fused_layers` and :func:`fused_rms_norms` together, by the same switch
    (``enabled`` None: :func:`fuses`). On an H100 (2026-12-06, ``bench/metric_profile_gpu.py``) a forward of 100
    chapter-5 rows spent 18 of its 42 ms of GPU time in element-wise kernels, most of them the RMSNorms' eight
    each. Yields :func:`fused_layers`' counts and ``"norms"``, the RMSNorms patched."""
    on = fuses(model) if enabled is None else enabled
    with fused_layers(model, on) as counts, (fused_rms_norms(model) if on else nullcontext(0)) as norms:
        yield {**counts, "norms": norms}


# ------------------------------------------------------------------------------ torch.compile (opt-in)
COMPILE_ENV = "EMLIB_COMPILE"


def compile_setting() -> str:
    """``$EMLIB_COMPILE``: ``off`` (the default) or ``on`` (:func:`compiled_layers` in the metric forwards).
    Opt-in until a whole run has measured it: on one H100 (2026-12-06, ``bench/compile_gpu.py``) a compiled
    forward of 100 chapter-5 rows took 18.6 ms against 36.2 ms as one CUDA graph, after 36 s of compiling; on an
    H200 the same day, before :class:`_SignedSin` computed inline under tracing, the chapters' fused path ran at
    0.21-0.24x eager's speed (graph breaks in every attention). Not measured on a GPU since that fix."""
    return env_switch(COMPILE_ENV, "off", ("off", "on"), "off or on")


def _compilable(model) -> list[torch.nn.Module]:
    """Each decoder layer's attention and MLP (Llama / Qwen2 / Mistral classes), in layer order."""
    return [m for m in model.modules() if type(m).__name__ in ATTENTION_CLASSES + MLP_CLASSES]


@contextmanager
def compiled_layers(model, enabled: bool | None = None):
    """While active, every decoder layer's attention and MLP runs through ``torch.compile`` (inductor fuses the
    element-wise kernels that a 135M model's forward mostly consists of). On the way out the modules run their
    plain forward again, so the fast sampler's and the training step's own CUDA graphs never capture compiled
    code. Hooks on the decoder layers (steering vectors, ablations: :mod:`emlib.hooks`) stay outside what is
    compiled, so a new vector does not recompile. Shapes start static and turn dynamic at the first new one (dynamo's default). What dynamo
    compiled stays cached with the code it compiled, so a later block compiles nothing again (the wrappers made
    here are dropped on the way out: nothing of them outlives the block or keeps a model alive). ``enabled``
    None: :func:`compile_setting`. Yields how many modules run compiled. The numbers are the eager ones up to
    rounding (float32 on the CPU: ``tests/test_fused.py``; bf16 on a GPU: 8e-5 relative for a forward's loss)."""
    on = compile_setting() == "on" if enabled is None else enabled
    mods = _compilable(model) if on else []
    if not mods:
        yield 0
        return
    for m in mods:
        m._compiled_call_impl = torch.compile(m._call_impl)
    try:
        yield len(mods)
    finally:
        for m in mods:
            m._compiled_call_impl = None
