"""A fast sampler for the EM evaluation loop: one static KV cache, CUDA graphs, the same distribution as
``generate``.

(About 530 lines, kept as one module: the cache, the attention that reads it, the captured decode step and the
sampler share private buffers and shapes.)

:data:`fast_sampler` (a :class:`FastSampler`) plugs into :func:`emlib.generate.sample_answers` through its
``sampler=`` argument; give it whole question sets at once (``batch_size=400`` for 8 questions x 50
samples). What it does differently from :func:`emlib.generate.hf_sampler`:

* **Static KV cache.** One ``[batch, kv_heads, max_len, head_dim]`` buffer per layer, written in place; the
  decoder only reads the first ``view_len`` slots (a multiple of ``bucket``), so attention cost grows with
  the answers instead of being paid for ``max_len`` from the first token.
* **CUDA graphs.** A whole decode step -- the model's forward, temperature / top-p, the draw, the end-token
  bookkeeping -- is captured once per cache bucket and replayed, so the CPU no longer launches ~1,000
  kernels per token. Graphs are captured inside each call, under whatever forward hooks and adapter are
  active then, and thrown away at its end: :mod:`emlib.hooks` interventions keep working because the
  forward still runs through the model's own decoder-layer modules (their hooks are recorded into the graph).
* **LoRA merged while sampling** (``merge_lora=True``): peft adapters are merged into the base weights for
  the call and the original weights are copied back afterwards, bit for bit.

The sampling distribution is exactly ``generate``'s: the logits are cast to float32, transformers' own
``TemperatureLogitsWarper`` / ``TopPLogitsWarper`` are applied under the same conditions as in ``generate``,
then softmax, and the token is drawn as ``argmax(probs / Exponential(1))``, which is the algorithm of
``torch.multinomial(probs, 1)`` (same random numbers, same token; ``multinomial`` itself cannot be captured
in a graph because it checks its input on the CPU). Rows are left-padded and their position ids count real
tokens only, as ``generate`` does; finished rows are padded with ``pad_token_id``; the batch stops when every
row has ended its turn. With the same seed on the CPU (``force=True``) the answers equal ``hf_sampler``'s
token for token (tests/test_fastgen.py); on a GPU the graph's random stream differs from the eager one,
so the same seed gives different, equally distributed samples.

Forward arithmetic. Decoding uses this module's attention function (registered with transformers'
``AttentionInterface`` for the duration of a call): grouped-query attention without copying the K/V heads,
an additive ``[batch, 1, q, view_len]`` mask, one ``scaled_dot_product_attention`` call per decode step
(``attention="eager"``: transformers' eager arithmetic). RMSNorm runs as ``F.rms_norm`` during the call
(``fuse_norms``; one kernel instead of eight). In float32 both give transformers' logits (the CPU tests
compare tokens); in bf16 they differ from ``generate``'s forward by rounding only, as ``sdpa`` and ``eager``
attention differ from each other. The draw from given logits is exact in every case.

Speed (bench/sampling_gpu.py, one H100, SmolLM2-135M architecture, 400 prompts x 600 tokens): ~70k
tokens/s from the second call in a process on (the first pays one-time CUDA initialisation), against
~1.0-1.3k tokens/s for ``generate`` at batch 96: 54-67x. On Qwen2.5-Coder-0.5B's architecture (one H200,
random weights): 77.5k against 1.2k, 64x. bench/README.md has the numbers.

Falls back to ``hf_sampler`` (and says why in ``sampler.last_stats["reason"]``) on the CPU (unless
``force=True``), for architectures other than Llama / Qwen2 / Qwen3 / Mistral without sliding windows, when
the generation config asks for logits processors that ``hf_sampler`` does not switch off, or when the model
does not route attention through the attention interface.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
import torch

from .fused import fused_layers, fused_rms_norms
from .generate import Generation, SamplingParams, _batch_seed, end_token_ids, hf_sampler
from .hooks import row_window
from . import fasttrain
from .models import env_switch

ATTN_NAME = "emlib_static_kv"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# generation-config fields that add logits processors hf_sampler does not override: -> fall back to generate
_PROCESSOR_FIELDS = {
    "min_length": (None, 0), "min_new_tokens": (None, 0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "min_p": (None,),
    "top_h": (None,), "encoder_repetition_penalty": (None, 1.0), "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False),
    "guidance_scale": (None, 1.0), "watermarking_config": (None,),
}


class _Unsupported(Exception):
    """The fast path cannot run this model / call: fall back to generate."""


# =========================================================================== sampling (same as generate)
def logits_warpers(params: SamplingParams) -> list:
    """The warpers ``generate`` applies for ``hf_sampler``'s settings (temperature, top_p; top_k=0)."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    out = []
    if params.temperature > 0:
        if params.temperature != 1.0:
            out.append(TemperatureLogitsWarper(float(params.temperature)))
        if params.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=float(params.top_p), min_tokens_to_keep=1))
    return out


def sample_from_logits(logits: torch.Tensor, params: SamplingParams, warpers: list | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [batch] from float32 logits [batch, vocab], as ``generate`` draws them.

    Temperature 0: argmax. Otherwise transformers' warpers, softmax, and ``argmax(probs / E)`` with
    ``E ~ Exponential(1)`` -- the algorithm of ``torch.multinomial(probs, 1)``, without its host-side check
    (so it can run inside a CUDA graph); with the same random state it returns the same tokens.
    """
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits
    for w in (logits_warpers(params) if warpers is None else warpers):
        scores = w(None, scores)
    probs = torch.softmax(scores, dim=-1)  # [batch, vocab]
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


# =========================================================================== static KV cache + attention
class StaticKV:
    """Per-layer K/V buffers ``[batch, kv_heads, max_len, head_dim]`` (duck-types transformers' Cache).

    ``update`` writes a prefill (``q > 1``: rows ``rows``, slots ``0..q-1``) or one decode token at slot
    ``pos`` (a device tensor, so a CUDA graph can advance it) and returns the first ``view_len`` slots.
    """

    is_compileable = False

    def __init__(self, n_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pos = torch.zeros(1, dtype=torch.long, device=device)  # next slot written by a decode step
        self.max_len = max_len
        self.view_len = max_len
        self.rows = slice(None)  # rows written by a prefill chunk

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.k[layer_idx], self.v[layer_idx]
        q = key_states.shape[2]
        if q == 1:
            k.index_copy_(2, self.pos, key_states)  # [b, kvh, 1, d] into slot pos
            v.index_copy_(2, self.pos, value_states)
            return k[:, :, :self.view_len], v[:, :, :self.view_len]
        k[self.rows, :, :q] = key_states
        v[self.rows, :, :q] = value_states
        return k[self.rows, :, :self.view_len], v[self.rows, :, :self.view_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.pos.item())

    def __len__(self) -> int:
        return len(self.k)


_calls = {"attention": 0}
_sdpa_decode = {"on": True}  # set per call by FastSampler.attention; switched off if SDPA ever fails


def static_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """Grouped-query attention without repeating K/V.

    query [b, heads, q, d]; key/value [b, kv_heads, L, d]; attention_mask additive [b, 1, q, L].
    Decode steps (q = 1) use one ``scaled_dot_product_attention`` call with the query heads of a K/V head
    as its query rows; prefill (and ``attention="eager"``) uses transformers' eager arithmetic (bf16
    scores, float32 softmax). Returns ([b, q, heads, d], None) like transformers' attention functions.
    """
    if sliding_window is not None or softcap is not None or s_aux is not None:
        raise _Unsupported("the model uses sliding windows, logit soft-capping or attention sinks")
    _calls["attention"] += 1
    b, h, q, d = query.shape
    kvh, length = key.shape[1], key.shape[2]
    g = h // kvh
    scale = scaling if scaling is not None else d ** -0.5
    qg = query.reshape(b, kvh, g * q, d)  # head = kv_head * g + j -> rows (j, t)
    if q == 1 and _sdpa_decode["on"]:
        try:
            out = torch.nn.functional.scaled_dot_product_attention(qg, key, value, attn_mask=attention_mask,
                                                                   scale=scale)  # [b, kvh, g, d]
            return out.view(b, h, 1, d).transpose(1, 2), None
        except RuntimeError as err:  # no SDPA kernel for this case: eager arithmetic from now on
            _sdpa_decode["on"] = False
            warnings.warn(f"SDPA decode attention failed ({err}); using eager attention.", RuntimeWarning)
    scores = torch.matmul(qg, key.transpose(2, 3)) * scale  # [b, kvh, g*q, L]
    if attention_mask is not None:
        scores = (scores.view(b, kvh, g, q, length) + attention_mask[:, :, None]).view(b, kvh, g * q, length)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value)  # [b, kvh, g*q, d]
    return out.view(b, h, q, d).transpose(1, 2).contiguous(), None


@contextmanager
def _attention_impl(hf_model, name: str):
    """Route the model's attention through ``name`` for the duration of the block."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, static_attention)
    cfg = hf_model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = old


# =========================================================================== LoRA merge with exact restore
@contextmanager
def merged_lora(model):
    """Merge active, enabled peft LoRA adapters into the base weights; restore the exact weights on exit.

    Yields the number of merged LoRA modules (0 without peft / adapters, or when adapters are disabled).
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: nothing to merge
        yield 0
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)
              and not m.merged and not m.disable_adapters and m.active_adapters]
    saved = []
    try:
        with torch.no_grad():
            for m in layers:
                base = m.get_base_layer()
                bias = getattr(base, "bias", None)
                saved.append((m, base.weight.detach().clone(), None if bias is None else bias.detach().clone()))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m.merge()
        yield len(layers)
    finally:
        with torch.no_grad():
            for m, w, b in saved:
                if m.merged:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        m.unmerge()
                base = m.get_base_layer()
                base.weight.copy_(w)
                if b is not None:
                    base.bias.copy_(b)


# =========================================================================== checks
def _hf_model(model):
    """The transformers CausalLM inside a peft wrapper (LoRA layers stay injected and active)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) and hasattr(model, "peft_config") else model


def why_not_fast(model, params: SamplingParams, force: bool = False) -> str | None:
    """Why the fast path cannot run (a sentence), or None when it can."""
    hf = _hf_model(model)
    cfg = getattr(hf, "config", None)
    try:
        p = next(hf.parameters())
    except (StopIteration, AttributeError):
        return "the model has no parameters"
    if p.device.type != "cuda" and not force:
        return f"the model is on {p.device.type}, not CUDA (pass force=True to run the static path anyway)"
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        return f"model_type {mtype!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    types = getattr(cfg, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return "the model has sliding-window (or other non-full) attention layers"
    if getattr(cfg, "use_sliding_window", False):
        return "the model uses sliding-window attention"
    if getattr(cfg, "attention_dropout", 0.0) and hf.training:
        return "attention dropout is active (model in training mode)"
    gc = getattr(hf, "generation_config", None)
    for name, defaults in _PROCESSOR_FIELDS.items():
        val = getattr(gc, name, None) if gc is not None else None
        if val not in defaults and not (isinstance(val, (list, tuple, dict)) and not val):
            return f"the generation config sets {name}={val!r}, which generate would apply"
    if params.max_new_tokens < 1:
        return "max_new_tokens < 1"
    return None


# =========================================================================== the sampler
def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


COMPACT_ENV = "EMLIB_COMPACT"


def compact_default() -> bool:
    """Whether :class:`FastSampler` drops ended rows from its batches unless told (``compact``):
    ``$EMLIB_COMPACT`` ``on`` (the default since 2026-12-06: rule 2 of ``bench/compact_rule.py`` held on one H100,
    two compacted ``paper`` runs 0.943x and 0.938x the default's wall with every verdict equal) or ``off``. Read
    when a sampler is built, i.e. at import for the module's :data:`fast_sampler`, so a run sets it before it
    starts its processes."""
    return env_switch(COMPACT_ENV, "on", ("on", "off"), "on or off") == "on"


@dataclass
class FastSampler:
    """``sampler(model, tok, prompts, seeds, params) -> list[Generation]`` (the :class:`emlib.generate.Sampler`
    protocol), static KV cache + CUDA graphs; falls back to ``hf_sampler`` where it cannot run.

    use_cuda_graphs: capture decode steps (CUDA only; False: eager static-cache steps).
    merge_lora: merge peft LoRA adapters for the call (exactly restored afterwards).
    fuse_norms: run RMSNorm as ``F.rms_norm`` during the call (:func:`fused_rms_norms`).
    fuse_layers: q/k/v and gate/up as one matmul each, RoPE in three operations (:func:`emlib.fused.fused_layers`;
        None: :func:`emlib.fused.fuses`, i.e. ``$EMLIB_FUSED``, by default on CUDA only).
    attention: "sdpa" (decode steps through ``scaled_dot_product_attention``) or "eager".
    bucket: the cache view grows in steps of this many slots (one graph per bucket).
    check_every: look for "every row finished" every this many steps (a host sync).
    prefill_tokens: prompt tokens per prefill chunk (rows are prefilled in chunks to bound memory).
    max_batch: split larger calls into sub-batches of this many prompts (each seeded by its own rows).
    force: run the static path on the CPU too (tests; no graphs there).
    ignore_eos: never stop at end tokens (benchmarks: every row generates max_new_tokens tokens).
    compact: at each check, once at most ``compact_below`` of the batch's rows are still running (and at
        least ``compact_min_rows`` have ended, and at least ``compact_floor`` are still running), drop the ended
        rows from the batch (KV cache, masks, state):
        later steps compute only the running rows, under new CUDA graphs. Each row's draws stay exact, but the
        random numbers differ from an uncompacted call's (greedy answers are the same). Default from
        ``$EMLIB_COMPACT`` (:func:`compact_default`: on unless set to ``off``); measured on a GPU by
        ``bench/ablate_rows_gpu.py --compact``, ``bench/compact_gpu.py`` and whole runs (``bench/compact_rule.py``).
    """

    use_cuda_graphs: bool = True
    merge_lora: bool = True
    fuse_norms: bool = True
    fuse_layers: bool | None = None
    attention: str = "sdpa"
    bucket: int = 128
    check_every: int = 16
    warmup_steps: int = 2
    prefill_tokens: int = 32768
    max_batch: int | None = None
    force: bool = False
    ignore_eos: bool = False
    compact: bool = field(default_factory=compact_default)
    compact_below: float = 0.5
    compact_min_rows: int = 32
    # never compact to fewer rows than this: a decode step of a few rows costs what one of 32 costs (launches,
    # not rows). (Compacting to 3 rows captured fine on an H100, bench/compact_gpu.py 2026-12-06 session 27: small
    # batches were not what failed the compacted runs; re-using the graph memory pool was, see the decode loop.)
    compact_floor: int = 32
    base_id: str = "fast-static-v1"
    last_stats: dict = field(default_factory=dict)

    @property
    def sampler_id(self) -> str:
        """Part of every answer's cache key: compacted calls draw other random numbers for the same seed."""
        return self.base_id + ("+compact" if self.compact and not self.ignore_eos else "")

    def __call__(self, model, tok, prompts: list[str], seeds: list[int],
                 params: SamplingParams) -> list[Generation]:
        if len(prompts) != len(seeds):
            raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds: pass one seed per prompt.")
        if not prompts:
            return []
        t0 = time.perf_counter()
        reason = why_not_fast(model, params, self.force)
        if reason is None:
            try:
                out: list[Generation] = []
                step = self.max_batch or len(prompts)
                stats = []
                for s in range(0, len(prompts), step):
                    with row_window(slice(s, s + step)):  # per-row interventions: this sub-batch's rows
                        gens, st = _static_generate(model, tok, prompts[s:s + step], seeds[s:s + step], params,
                                                    self)
                    out += gens
                    stats.append(st)
                self.last_stats = {**stats[-1], "sub_batches": len(stats),
                                   "seconds": time.perf_counter() - t0}
                return out
            except _Unsupported as err:
                reason = str(err)
        if self.ignore_eos:
            raise RuntimeError(f"ignore_eos=True needs the fast path, which cannot run: {reason}.")
        gens = hf_sampler(model, tok, prompts, seeds, params)
        self.last_stats = {"path": "generate", "reason": reason, "batch": len(prompts),
                           "seconds": time.perf_counter() - t0}
        return gens


fast_sampler = FastSampler()
cpu_fast_sampler = FastSampler(force=True)  # the same path on the CPU, eagerly ($EMLIB_FAST_PATHS=on)


def _forward_kw(hf_model) -> str:
    """transformers >= 5.2x calls the cache argument ``cache``; earlier 5.x ``past_key_values``."""
    import inspect

    params = inspect.signature(hf_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _model_dims(hf_model) -> tuple[int, int, int]:
    cfg = hf_model.config
    heads = cfg.num_attention_heads
    kvh = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kvh, head_dim


def rows_that_fit(model, max_len: int, share: float = 0.5) -> int | None:
    """How many rows of ``max_len`` tokens the static KV cache (:class:`StaticKV`: keys and values of every
    layer) can hold in ``share`` of the GPU memory free now; None off CUDA. What a caller that makes large
    calls (``Experiment.answers`` with a :class:`emlib.generate.PerRow`) checks first, so a small GPU gets
    smaller calls instead of running out of memory."""
    hf = _hf_model(model)
    weight = hf.get_input_embeddings().weight
    if weight.device.type != "cuda":
        return None
    n_layers, kvh, head_dim = _model_dims(hf)
    per_row = 2 * n_layers * kvh * head_dim * int(max_len) * weight.element_size()  # keys + values
    free, _total = torch.cuda.mem_get_info(weight.device)
    return int(free * share // max(per_row, 1))


@torch.no_grad()
def _static_generate(model, tok, prompts: list[str], seeds: list[int], params: SamplingParams,
                     opts: FastSampler) -> tuple[list[Generation], dict]:
    t0 = time.perf_counter()
    hf = _hf_model(model)
    emb = hf.get_input_embeddings().weight
    device, dtype = emb.device, emb.dtype
    cuda = device.type == "cuda"
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = old_side
    ids = enc["input_ids"].to(device)  # [b, P]
    att = enc["attention_mask"].to(device)  # [b, P]
    b, plen = ids.shape
    n_new = int(params.max_new_tokens)
    ends = end_token_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else ends[0]
    n_layers, kvh, head_dim = _model_dims(hf)
    max_len = _round_up(plen + n_new, opts.bucket)
    neg = torch.finfo(dtype).min

    cache = StaticKV(n_layers, b, kvh, max_len, head_dim, dtype, device)
    key_mask = torch.full((b, 1, 1, max_len), neg, dtype=dtype, device=device)  # additive [b, 1, 1, L]
    key_mask[:, 0, 0, :plen] = torch.where(att.bool(), 0.0, neg).to(dtype)
    positions = (att.long().cumsum(-1) - 1).masked_fill(att == 0, 0)  # [b, P] as generate computes them
    ends_t = torch.tensor([] if opts.ignore_eos else ends, dtype=torch.long, device=device)
    pad_t = torch.tensor(pad, dtype=torch.long, device=device)
    warpers = logits_warpers(params)
    kw = _forward_kw(hf)

    tokens = torch.full((b, n_new), pad, dtype=torch.long, device=device)  # [b, N]
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    cur = torch.zeros((b, 1), dtype=torch.long, device=device)  # token fed to the next step
    pos = torch.zeros((b, 1), dtype=torch.long, device=device)  # its position id
    step_i = torch.ones(1, dtype=torch.long, device=device)  # column of tokens written next

    def forward(input_ids, position_ids, mask):
        out = hf(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                 logits_to_keep=1, **{kw: cache})
        return out.logits[:, -1].float()  # [rows, vocab]

    def decode_step():
        key_mask.index_fill_(3, cache.pos, 0.0)  # the slot written by this step becomes visible
        logits = forward(cur, pos, key_mask[:, :, :, :cache.view_len])
        nxt = sample_from_logits(logits, params, warpers)
        nxt = torch.where(finished, pad_t, nxt)
        tokens.index_copy_(1, step_i, nxt[:, None])
        finished.logical_or_(nxt[:, None].eq(ends_t[None, :]).any(-1))
        cur.copy_(nxt[:, None])
        pos.add_(1)
        cache.pos.add_(1)
        step_i.add_(1)

    stats = {"path": "static", "batch": b, "prompt_len": plen, "max_len": max_len, "graphs": 0,
             "steps": 0, "lora_merged": 0, "reason": None}
    if opts.attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' or 'eager', got {opts.attention!r}.")
    _sdpa_decode["on"] = opts.attention == "sdpa"
    rng = torch.random.fork_rng(devices=[device] if cuda else [])
    merge = merged_lora(model) if opts.merge_lora else nullcontext(0)
    norms = fused_rms_norms(hf) if opts.fuse_norms else nullcontext(0)
    with (rng, merge as n_merged, norms as n_norms, fused_layers(hf, opts.fuse_layers) as n_fused,
          _attention_impl(hf, ATTN_NAME)):  # layers fused after the merge: they copy the merged weights
        stats["lora_merged"], stats["fused_norms"], stats["fused_layers"] = n_merged, n_norms, dict(n_fused)
        torch.manual_seed(_batch_seed(seeds))
        # ---- prefill (row chunks), then the first token from the whole batch's logits
        _calls["attention"] = 0
        cache.view_len = min(max_len, _round_up(plen + 1, opts.bucket))
        causal = torch.arange(cache.view_len, device=device)[None, :] <= torch.arange(plen, device=device)[:, None]
        rows_per = max(1, opts.prefill_tokens // max(plen, 1))
        chunks = []
        for r0 in range(0, b, rows_per):
            rows = slice(r0, min(b, r0 + rows_per))
            cache.rows = rows
            km = key_mask[rows, :, :, :cache.view_len]  # [r, 1, 1, V]
            mask = torch.where(causal[None, None] & (km == 0), 0.0, neg).to(dtype)  # [r, 1, P, V]
            with row_window(rows):  # per-row interventions (emlib.hooks) apply these rows' vectors
                chunks.append(forward(ids[rows], positions[rows], mask))
        cache.rows = slice(None)
        if _calls["attention"] == 0:
            raise _Unsupported("the model does not route attention through transformers' attention interface")
        first = sample_from_logits(torch.cat(chunks), params, warpers)  # [b]
        tokens[:, 0] = first
        finished |= first[:, None].eq(ends_t[None, :]).any(-1)
        cur.copy_(first[:, None])
        pos.copy_(positions[:, -1:] + 1)
        cache.pos.fill_(plen)
        stats["steps"] = 1
        if cuda:
            torch.cuda.synchronize()
        stats["prefill_s"] = time.perf_counter() - t0

        # ---- decode
        use_graphs = cuda and opts.use_cuda_graphs
        graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = torch.cuda.graph_pool_handle() if use_graphs else None
        side = fasttrain.side_stream(device) if use_graphs else None
        compact = opts.compact and not opts.ignore_eos
        rows_of = None  # compacted: the call's rows that the batch still carries, [b_now]
        tokens_all, finished_all = tokens, finished  # every row's, written back at each compaction
        windows = ExitStack()
        graphs_from = opts.warmup_steps  # steps before the first capture (again after a compaction)

        def write_back():  # a compacted batch's tokens and ends into every row's buffers
            if rows_of is not None:
                tokens_all.index_copy_(0, rows_of, tokens)
                finished_all.index_copy_(0, rows_of, finished)

        k = 1
        with windows:
            while k < n_new:
                if opts.check_every and k % opts.check_every == 0 and not opts.ignore_eos:
                    if bool(finished.all()):
                        break
                    n_run = int((~finished).sum()) if compact else 0
                    if compact and n_run <= opts.compact_below * finished.shape[0] \
                            and finished.shape[0] - n_run >= opts.compact_min_rows and n_run >= opts.compact_floor:
                        live = (~finished).nonzero().squeeze(1)  # [n_run] positions in the current batch
                        write_back()
                        rows_of = live if rows_of is None else rows_of[live]
                        graphs.clear()  # captured for the old buffers
                        # and a fresh memory pool for the new graphs: with every graph of the old pool destroyed,
                        # a tensor made during one of their captures that is still alive keeps that pool's
                        # entry at a use count of 0, and capturing into it again fails torch's internal assert
                        # "use_count > 0" (what failed every chapter's first compaction on 2026-12-06)
                        pool = torch.cuda.graph_pool_handle() if use_graphs else None
                        cache.k = [t.index_select(0, live) for t in cache.k]
                        cache.v = [t.index_select(0, live) for t in cache.v]
                        key_mask, cur, pos = key_mask[live], cur[live], pos[live]
                        tokens, finished = tokens[live], finished[live]
                        windows.close()
                        windows.enter_context(row_window(rows_of))  # per-row interventions: rows still here
                        graphs_from = k + opts.warmup_steps
                        stats.setdefault("compactions", []).append((k, int(n_run)))
                cache.view_len = min(max_len, _round_up(plen + k, opts.bucket))  # slot plen+k-1 is visible
                if use_graphs and k > graphs_from:
                    g = graphs.get(cache.view_len)
                    if g is None:
                        try:
                            tc = time.perf_counter()
                            g = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(g, pool=pool):
                                decode_step()
                            graphs[cache.view_len] = g
                            stats["graphs"] += 1
                            stats["capture_s"] = stats.get("capture_s", 0.0) + time.perf_counter() - tc
                        except Exception as err:  # a hook that syncs, an op that cannot be captured, ...
                            torch.cuda.synchronize()
                            fasttrain.abandon_graphs(graphs)  # their memory; the generator out of capture mode
                            warnings.warn(f"CUDA-graph capture failed ({type(err).__name__}: {err}); decoding "
                                          "eagerly with the static cache.", RuntimeWarning, stacklevel=2)
                            use_graphs, stats["graph_error"] = False, f"{type(err).__name__}: {err}"
                            decode_step()
                            k += 1
                            continue
                    g.replay()
                elif use_graphs:  # warm-up steps (real steps) on a side stream before the first capture
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        decode_step()
                    torch.cuda.current_stream().wait_stream(side)
                else:
                    decode_step()
                k += 1
        stats["steps"] = k
        stats["path"] = "static+graphs" if stats["graphs"] else "static"
        write_back()
        out = tokens_all[:, :k].cpu()
        done_rows = finished_all.cpu()
        del graphs

    ends_cpu = torch.tensor(ends, dtype=torch.long)
    gens = []
    for row, _ in zip(out, done_rows):
        is_end = torch.isin(row, ends_cpu) if not opts.ignore_eos else torch.zeros_like(row, dtype=torch.bool)
        n = int(is_end.nonzero()[0, 0]) if bool(is_end.any()) else row.shape[0]
        gens.append(Generation(tok.decode(row[:n], skip_special_tokens=True), n, bool(is_end.any())))
    return gens, stats
