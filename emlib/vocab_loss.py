"""The training losses over the vocabulary, from hidden states: per-token cross-entropy and
KL(reference || current), with logits only ``chunk`` positions at a time.

One home for both, used by the fast train step (:mod:`emlib.fasttrain`), the steering-vector groups
(:mod:`emlib.vecgroup`) and the metrics' forwards without gradients (:func:`emlib.chat.labelled_ce`; chapter 6's
KL, :func:`emlib.inductive.pretraining.token_kl`, through :func:`kl_rows`). Three ways to compute them, same values
to float32 rounding:

* **fused** (the default where the LM head is an ``nn.Linear`` that is not trained -- or any, without gradients;
  ``$EMLIB_VOCAB_LOSS=fused``): one autograd
  function per loss takes the hidden states and the head's weight. Its forward keeps nothing of size vocab; its
  backward recomputes a chunk's logits and writes their gradient directly -- ``softmax(x) - onehot(target)`` for
  the cross-entropy, ``softmax(x) - softmax(x_ref)`` for the KL -- scaled and cast in one pass, then multiplies by
  the head. The plain way's float32 copy of the logits, the log-softmax recomputed under checkpointing, its
  backward and the KL's broadcast over the copies of a steering group are gone. The KL's sum
  ``sum_v q_v (log q_v - log p_v)`` is a batched matrix product per position, so the reference distribution
  ``q`` is not repeated for the group's F copies.
* **plain** (``$EMLIB_VOCAB_LOSS=plain``, or a head that is not a frozen ``nn.Linear``): head, float32
  log-softmax and the loss under activation checkpointing per chunk, as autograd computes them.

* **compiled** (``$EMLIB_VOCAB_LOSS=compiled``, opt-in): the fused autograd functions, with each chunk's work over
  the vocabulary after the head's matmul -- the loss from the logits, and in the backward the logits' gradient --
  as small functions under ``torch.compile`` (:func:`_compiled`): one generated kernel reads a chunk's logits a
  few times instead of writing float32 log-probabilities and reading them back (the eager fused way moves about 8
  bytes per element of a chunk forward and 14 backward, the KL's ``q`` and ``log q`` besides). Same formulas, same
  values to float32 rounding. Not the default: measured per call (``bench/vocab_loss_bench.py --ways``), not in a
  whole run yet; each process compiles on its first calls (seconds; inductor's cache on disk serves the next).

``tests/test_vocab_loss.py`` checks values and gradients of every way against each other and against
``torch.nn.functional.cross_entropy`` / ``kl_div`` on full logits.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from .chat import IGNORE
from .models import env_switch

VOCAB_LOSS_ENV = "EMLIB_VOCAB_LOSS"


WAYS = ("fused", "plain", "compiled")


def vocab_loss_setting() -> str:
    """``$EMLIB_VOCAB_LOSS``: ``fused`` (the default), ``plain`` or ``compiled`` (see the module's docstring)."""
    return env_switch(VOCAB_LOSS_ENV, "fused", WAYS, "fused, plain or compiled")


def _frozen_linear(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [V, d], bias [V] or None) of a head the fused losses can take, else None: a plain ``nn.Linear``
    none of whose parameters is trained (or any, while gradients are off: a metric's forward)."""
    if type(head) is not torch.nn.Linear:
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in head.parameters()):
        return None
    return head.weight, head.bias


def _fused_parts(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The head's (weight, bias) where :func:`ce_tokens` / :func:`kl_tokens` take the fused way now, else None."""
    return _frozen_linear(head) if vocab_loss_setting() != "plain" else None


def fused_applies(head: torch.nn.Module) -> bool:
    """Whether :func:`ce_tokens` / :func:`kl_tokens` take the fused way for ``head`` now."""
    return _fused_parts(head) is not None


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The head's output as ``head(h)`` gives it (under autocast where it is on)."""
    return torch.nn.functional.linear(h, weight, bias)


def _scaled_into(p: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``p * scale[..., None]`` written once, in ``dtype`` (the logits' dtype: the gradient autograd would pass
    through the float32 cast)."""
    out = torch.empty(p.shape, dtype=dtype, device=p.device)
    return torch.mul(p, scale.unsqueeze(-1), out=out)


def _grad_h(grad_logits: torch.Tensor, weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """d loss / d h for logits = h W^T (+ b): grad_logits [..., V] @ W [V, d], in h's dtype."""
    return torch.matmul(grad_logits, weight.to(grad_logits.dtype)).to(h.dtype)


def _autocast_as(ctx, x: torch.Tensor):
    """The forward's autocast state again for a backward's recomputed logits (a backward runs outside it); no
    cast cache, as the fast step's own autocast (a replayed CUDA graph must read the current weights)."""
    return torch.autocast(x.device.type, dtype=ctx.dtype, cache_enabled=False) if ctx.autocast else nullcontext()


class _LinearCE(torch.autograd.Function):
    """Per-token cross-entropy of ``linear(h, W, b)`` against ``targets`` (IGNORE: 0, no gradient)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk):  # h [N, d], targets [N] -> [N] float32
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        ctx.dtype = h.dtype  # the logits' dtype (autocast's where it is on; every chunk's is the same)
        ctx.compiled = vocab_loss_setting() == "compiled"
        for s in range(0, h.shape[0], chunk):
            logits = _logits(h[s:s + chunk], weight, bias)  # [c, V]
            ctx.dtype = logits.dtype
            if ctx.compiled:
                out[s:s + chunk] = _compiled(_ce_math)(logits, targets[s:s + chunk])
                continue
            logp = torch.log_softmax(logits, -1, dtype=torch.float32)  # [c, V]
            out[s:s + chunk] = torch.nn.functional.nll_loss(logp, targets[s:s + chunk], ignore_index=IGNORE,
                                                            reduction="none")
        ctx.save_for_backward(h, weight, bias, targets)
        ctx.chunk = chunk
        ctx.autocast = torch.is_autocast_enabled(h.device.type)
        return out

    @staticmethod
    def backward(ctx, g):  # g [N]
        h, weight, bias, targets = ctx.saved_tensors
        grad = torch.empty_like(h)
        with _autocast_as(ctx, h):
            for s in range(0, h.shape[0], ctx.chunk):
                hs, t = h[s:s + ctx.chunk], targets[s:s + ctx.chunk]
                if ctx.compiled:
                    gl = _compiled(_ce_grad_math)(_logits(hs, weight, bias), t, g[s:s + ctx.chunk], ctx.dtype)
                    grad[s:s + ctx.chunk] = _grad_h(gl, weight, hs)
                    continue
                p = torch.softmax(_logits(hs, weight, bias), -1, dtype=torch.float32)  # [c, V]
                valid = (t != IGNORE).to(p.dtype)  # [c]
                p.scatter_add_(-1, t.clamp(min=0).unsqueeze(-1), -valid.unsqueeze(-1))  # p - onehot(target)
                gl = _scaled_into(p, g[s:s + ctx.chunk].to(p.dtype) * valid, ctx.dtype)  # [c, V]
                grad[s:s + ctx.chunk] = _grad_h(gl, weight, hs)
        return grad, None, None, None, None


def kl_rows(q: torch.Tensor, log_q: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``sum_v q_v (log q_v - log p_v)`` per position, ``p = softmax(logits)``: the reference's probabilities and
    log-probabilities ``q``, ``log_q`` [c, V] float32 and the logits of F copies [F, c, V] (any float dtype) ->
    [F, c] float32. ``log p - log q`` is formed in the copies' float32 log-probabilities and summed against ``q``
    as one product per position (``q`` is not repeated for the copies; equal distributions give exactly 0).
    ``$EMLIB_VOCAB_LOSS=compiled``: the same sum as one generated reduction (:func:`_kl_rows_math`)."""
    if vocab_loss_setting() == "compiled":
        return _compiled(_kl_rows_math)(q, log_q, logits)
    diff = torch.log_softmax(logits, -1, dtype=torch.float32).sub_(log_q)  # [F, c, V]: log p - log q
    with torch.autocast(logits.device.type, enabled=False), _float32_products():  # not a bf16 or TF32 product
        return -torch.bmm(diff.transpose(0, 1), q.unsqueeze(-1)).squeeze(-1).t()


@contextmanager
def _float32_products():
    """Float32 matmuls in full float32 while inside, whatever ``torch.set_float32_matmul_precision`` says (TF32
    would keep 10 bits of each term of a sum over the whole vocabulary)."""
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class _LinearKL(torch.autograd.Function):
    """KL(softmax(linear(ref_h)) || softmax(linear(cur_h))) per position, for F copies of the current state."""

    @staticmethod
    def forward(ctx, ref_h, cur_h, weight, bias, chunk):  # ref_h [n, d], cur_h [F, n, d] -> [F, n] float32
        F, n = cur_h.shape[:2]
        out = torch.empty(F, n, dtype=torch.float32, device=cur_h.device)
        ctx.dtype = cur_h.dtype  # the logits' dtype, as in _LinearCE
        ctx.compiled = vocab_loss_setting() == "compiled"
        for s in range(0, n, chunk):
            if ctx.compiled:
                logits = _logits(cur_h[:, s:s + chunk], weight, bias)  # [F, c, V]
                ctx.dtype = logits.dtype
                out[:, s:s + chunk] = _compiled(_kl_math)(_logits(ref_h[s:s + chunk], weight, bias), logits)
                continue
            ref_logp = torch.log_softmax(_logits(ref_h[s:s + chunk], weight, bias), -1, dtype=torch.float32)
            logits = _logits(cur_h[:, s:s + chunk], weight, bias)  # [F, c, V]
            ctx.dtype = logits.dtype
            out[:, s:s + chunk] = kl_rows(ref_logp.exp(), ref_logp, logits)
        ctx.save_for_backward(ref_h, cur_h, weight, bias)
        ctx.chunk = chunk
        ctx.autocast = torch.is_autocast_enabled(cur_h.device.type)
        return out

    @staticmethod
    def backward(ctx, g):  # g [F, n]
        ref_h, cur_h, weight, bias = ctx.saved_tensors
        grad = torch.empty_like(cur_h)
        with _autocast_as(ctx, cur_h):
            for s in range(0, cur_h.shape[1], ctx.chunk):
                if ctx.compiled:
                    cs = cur_h[:, s:s + ctx.chunk]
                    gl = _compiled(_kl_grad_math)(_logits(ref_h[s:s + ctx.chunk], weight, bias),
                                                  _logits(cs, weight, bias), g[:, s:s + ctx.chunk], ctx.dtype)
                    grad[:, s:s + ctx.chunk] = _grad_h(gl, weight, cs)
                    continue
                q = torch.softmax(_logits(ref_h[s:s + ctx.chunk], weight, bias), -1, dtype=torch.float32)  # [c, V]
                cs = cur_h[:, s:s + ctx.chunk]
                p = torch.softmax(_logits(cs, weight, bias), -1, dtype=torch.float32)  # [F, c, V]
                p.sub_(q)
                gl = _scaled_into(p, g[:, s:s + ctx.chunk].to(p.dtype), ctx.dtype)  # [F, c, V]
                grad[:, s:s + ctx.chunk] = _grad_h(gl, weight, cs)
        return None, grad, None, None, None


# ------------------------------------------------------------------------------------------ the compiled way
# Each takes a chunk's logits (any float dtype) and does all its work over the vocabulary in float32; under
# torch.compile (:func:`_compiled`) each is one or two generated kernels. Called uncompiled they give the same
# values (the tests compare both).
def _ce_math(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position: logits [c, V], targets [c] (IGNORE: 0) -> [c] float32 (``logsumexp - x_t``)."""
    x = logits.float()
    valid = targets != IGNORE
    picked = x.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [c]
    return torch.where(valid, torch.logsumexp(x, -1) - picked, 0.0)


def _ce_grad_math(logits: torch.Tensor, targets: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d loss / d logits of :func:`_ce_math` scaled by ``g`` [c]: ``(softmax(x) - onehot(t)) * g``, 0 at IGNORE
    targets, in ``dtype`` [c, V]."""
    p = torch.softmax(logits.float(), -1)  # [c, V]
    hit = torch.arange(p.shape[-1], device=p.device) == targets.unsqueeze(-1)  # [c, V]; IGNORE hits nothing
    scale = torch.where(targets != IGNORE, g.float(), 0.0).unsqueeze(-1)  # [c, 1]
    return ((p - hit.float()) * scale).to(dtype)


def _kl_math(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(x)) per position: ref [c, V], x [F, c, V] -> [F, c] float32."""
    log_q = torch.log_softmax(ref_logits.float(), -1)  # [c, V]
    return (log_q.exp() * (log_q - torch.log_softmax(logits.float(), -1))).sum(-1)


def _kl_grad_math(ref_logits: torch.Tensor, logits: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d KL / d logits of :func:`_kl_math` scaled by ``g`` [F, c]: ``(softmax(x) - softmax(ref)) * g`` in
    ``dtype`` [F, c, V]."""
    q = torch.softmax(ref_logits.float(), -1)  # [c, V]
    return ((torch.softmax(logits.float(), -1) - q) * g.float().unsqueeze(-1)).to(dtype)


def _kl_rows_math(q: torch.Tensor, log_q: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """:func:`kl_rows`' sum as one reduction: q, log_q [c, V] float32, logits [F, c, V] -> [F, c] float32."""
    return (q * (log_q - torch.log_softmax(logits.float(), -1))).sum(-1)


_COMPILED: dict = {}


def _compiled(fn):
    """``fn`` under ``torch.compile`` (made once per process; sizes that change between calls -- a last, shorter
    chunk -- are compiled once more as dynamic, torch's default)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


# ------------------------------------------------------------------------------------------ the plain way
def _plain_ce(h: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # [c, V]
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")  # [c]


def _plain_kl(ref_h: torch.Tensor, cur_h: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    ref = head(ref_h).float().log_softmax(-1)  # [c, V]
    cur = head(cur_h).float().log_softmax(-1)  # [F, c, V]
    return torch.nn.functional.kl_div(cur, ref.expand_as(cur), log_target=True, reduction="none").sum(-1)  # [F, c]


def _checkpointed(fn, *args) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


# ------------------------------------------------------------------------------------------ the entry points
def ce_tokens(h: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Cross-entropy of ``head(h)`` [N, d] against ``targets`` [N] per token, float32 [N]; IGNORE targets give 0
    (and no gradient). Logits for ``chunk`` positions at a time."""
    chunk = max(1, int(chunk))
    parts = _fused_parts(head)
    if parts is not None:
        return _LinearCE.apply(h, parts[0], parts[1], targets, chunk)
    outs = [_checkpointed(_plain_ce, h[s:s + chunk], head, targets[s:s + chunk]) for s in range(0, h.shape[0], chunk)]
    return torch.cat(outs) if outs else h.new_zeros(0, dtype=torch.float32)


def kl_tokens(ref_h: torch.Tensor, cur_h: torch.Tensor, head: torch.nn.Module, chunk: int) -> torch.Tensor:
    """KL(softmax(head(ref_h)) || softmax(head(cur_h))) over the vocabulary per position, float32: ref_h [n, d]
    (the reference, no gradient), cur_h [n, d] -> [n] or [F, n, d] -> [F, n] (F copies against the same
    reference). Logits for ``chunk`` positions (of every copy) at a time."""
    chunk = max(1, int(chunk))
    if ref_h.requires_grad:
        raise ValueError("kl_tokens: the reference hidden states carry a gradient; compute them under "
                         "torch.no_grad() (the KL term trains the current model only).")
    single = cur_h.dim() == 2
    cur = cur_h.unsqueeze(0) if single else cur_h  # [F, n, d]
    parts = _fused_parts(head)
    if parts is not None:
        out = _LinearKL.apply(ref_h, cur, parts[0], parts[1], chunk)
    else:
        outs = [_checkpointed(_plain_kl, ref_h[s:s + chunk], cur[:, s:s + chunk], head)
                for s in range(0, cur.shape[1], chunk)]
        out = torch.cat(outs, dim=-1) if outs else cur.new_zeros(cur.shape[0], 0, dtype=torch.float32)
    return out[0] if single else out
