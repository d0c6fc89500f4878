"""The training losses over the vocabulary, from hidden states: per-token cross-entropy and
KL(reference || current), with logits only ``chunk`` positions at a time.

One home for both, used by the fast train step (:mod:`emlib.fasttrain`), the steering-vector groups
(:mod:`emlib.vecgroup`) and the metrics' forwards without gradients (:func:`emlib.chat.labelled_ce`; chapter 6's
KL where the LM head is not linear, :meth:`KLReference.kl`, through :func:`kl_rows`). Three ways to compute them, same values
to float32 rounding:

* **fused** (the default where the LM head is an ``nn.Linear`` that is not trained -- or any, without gradients;
  ``$EMLIB_VOCAB_LOSS=fused``): one autograd function per loss takes the hidden states and the head's weight and
  keeps nothing of size vocab. When a gradient is wanted, its forward computes it while a chunk's logits exist --
  ``softmax(x) - onehot(target)`` for the cross-entropy, ``softmax(x) - softmax(x_ref)`` for the KL, cast to the
  logits' dtype, times the head -- and keeps ``d loss / d h`` per position ([N, d]); the backward only scales it
  by the incoming gradient. So the head's matmul runs twice per position (logits, gradient), not three times as
  when the backward recomputed the logits (until 2026-12-07; for the KL also the reference's). The plain way's
  float32 copy of the logits, the log-softmax recomputed under checkpointing, its backward and the KL's broadcast
  over the copies of a steering group are gone. The KL's sum ``sum_v q_v (log q_v - log p_v)`` is a batched
  matrix product per position, so the reference distribution ``q`` is not repeated for the group's F copies.
* **plain** (``$EMLIB_VOCAB_LOSS=plain``, or a head that is not a frozen ``nn.Linear``): head, float32
  log-softmax and the loss under activation checkpointing per chunk, as autograd computes them.
* **compiled** (``$EMLIB_VOCAB_LOSS=compiled``; ``auto``, the default, takes it for tensors on a CUDA device where
  triton is there, the fused way elsewhere): the fused autograd functions, with each chunk's work over
  the vocabulary after the head's matmul -- the loss from the logits and, with a gradient, the logits' gradient --
  as small functions under ``torch.compile`` (:func:`_compiled`): the generated kernels read a chunk's logits a
  few times instead of writing float32 log-probabilities and reading them back (the eager fused way moves about 8
  bytes per element of a chunk for the loss and 14 more for its gradient, the KL's ``q`` and ``log q`` besides).
  Same formulas, same values to float32 rounding. Measured on one H100 (2026-12-07, session 38): a whole SmolLM2
  ``paper`` run of record 352.5 s against 402.1 s fused on the same machine, 180 against 200 kJ, no failure,
  every verdict the same; per call 0.34-0.50x (``bench/vocab_loss_bench.py --ways``). Each process compiles on
  its first calls (seconds; inductor's cache on disk serves the next). Under ``auto`` a compile that fails
  (no C compiler, an old GPU) warns once and the process goes on the fused way; ``compiled`` set by hand
  raises instead. On the CPU ``auto`` stays fused (compiling there was not measured to pay).

``tests/test_vocab_loss.py`` checks values and gradients of every way against each other and against
``torch.nn.functional.cross_entropy`` / ``kl_div`` on full logits.
"""
from __future__ import annotations

import functools
import warnings

from contextlib import contextmanager

import torch

from .chat import IGNORE, vocab_chunks
from .models import env_switch

VOCAB_LOSS_ENV = "EMLIB_VOCAB_LOSS"


WAYS = ("auto", "fused", "plain", "compiled")


def vocab_loss_setting() -> str:
    """``$EMLIB_VOCAB_LOSS``: ``auto`` (the default: compiled on CUDA, fused elsewhere), ``fused``, ``plain`` or
    ``compiled`` (see the module's docstring)."""
    return env_switch(VOCAB_LOSS_ENV, "auto", WAYS, "auto, fused, plain or compiled")


_COMPILE_FAILED: list[str] = []  # under auto: why this process's first compile failed (then fused from there on)


@functools.lru_cache(maxsize=None)
def _triton_ok() -> bool:
    """Whether torch.compile can generate GPU kernels here (the triton package and a GPU it supports)."""
    try:
        from torch.utils._triton import has_triton
        return bool(has_triton())
    except Exception:  # an old torch, a broken install: no compiled way
        return False


def _compile_on(cuda: bool) -> bool:
    """Whether the compiled way is taken for work on a CUDA device (``cuda``) or elsewhere, now."""
    way = vocab_loss_setting()
    return way == "compiled" or (way == "auto" and cuda and not _COMPILE_FAILED and _triton_ok())


def compiled_for(t: torch.Tensor) -> bool:
    """Whether the vocabulary work on ``t``'s device takes the compiled way now: ``compiled``, or ``auto`` with
    ``t`` on a CUDA device where triton is there and no compile of this process has failed."""
    return _compile_on(t.is_cuda)


def vocab_loss_way(device: str | torch.device) -> str:
    """The way the vocabulary losses take on ``device`` (what a run reports): fused, plain or compiled."""
    if vocab_loss_setting() == "plain":
        return "plain"
    return "compiled" if _compile_on(torch.device(device).type == "cuda") else "fused"


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


def _grad_wanted(h: torch.Tensor) -> bool:
    """Whether a loss of ``h`` will be differentiated with respect to it: gradients on and ``h`` requiring one
    (the fused functions then compute it in their forward; a metric's forward under ``no_grad`` does not)."""
    return torch.is_grad_enabled() and h.requires_grad


def _grad_h(grad_logits: torch.Tensor, weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """d loss / d h for logits = h W^T (+ b): grad_logits [..., V] @ W [V, d], in h's dtype."""
    return torch.matmul(grad_logits, weight.to(grad_logits.dtype)).to(h.dtype)


class _LinearCE(torch.autograd.Function):
    """Per-token cross-entropy of ``linear(h, W, b)`` against ``targets`` (IGNORE: 0, no gradient). With
    ``grad`` (a gradient for ``h`` is wanted), the forward also computes each position's ``d loss / d h`` while
    the chunk's logits exist, and the backward only scales it: no logits are computed twice."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk, grad):  # h [N, d], targets [N] -> [N] float32
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if grad else None  # [N, d]: d loss_i / d h_i
        compiled = compiled_for(h)
        for s in range(0, h.shape[0], chunk):
            hs, t = h[s:s + chunk], targets[s:s + chunk]
            logits = _logits(hs, weight, bias)  # [c, V]
            if compiled:
                if grad:
                    out[s:s + chunk], gl = _compiled(_ce_and_grad_math)(logits, t, logits.dtype)
                    dh[s:s + chunk] = _grad_h(gl, weight, hs)
                else:
                    out[s:s + chunk] = _compiled(_ce_math)(logits, t)
                continue
            logp = torch.log_softmax(logits, -1, dtype=torch.float32)  # [c, V]
            out[s:s + chunk] = torch.nn.functional.nll_loss(logp, t, ignore_index=IGNORE, reduction="none")
            if grad:
                p = logp.exp_()  # softmax, in place of the log-probabilities
                valid = (t != IGNORE).to(p.dtype)  # [c]
                p.scatter_add_(-1, t.clamp(min=0).unsqueeze(-1), -valid.unsqueeze(-1))  # p - onehot(target)
                dh[s:s + chunk] = _grad_h(_scaled_into(p, valid, logits.dtype), weight, hs)
        if grad:
            ctx.save_for_backward(dh)
        return out

    @staticmethod
    def backward(ctx, g):  # g [N]
        (dh,) = ctx.saved_tensors
        return (dh.float() * g.unsqueeze(-1)).to(dh.dtype), None, None, None, None, None


def kl_rows(q: torch.Tensor, log_q: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``sum_v q_v (log q_v - log p_v)`` per position, ``p = softmax(logits)``: the reference's probabilities and
    log-probabilities ``q``, ``log_q`` [c, V] float32 and the logits of F copies [F, c, V] (any float dtype) ->
    [F, c] float32. ``log p - log q`` is formed in the copies' float32 log-probabilities and summed against ``q``
    as one product per position (``q`` is not repeated for the copies; equal distributions give exactly 0).
    The compiled way (:func:`compiled_for`): the same sum as one generated reduction (:func:`_kl_rows_math`)."""
    if compiled_for(logits):
        return _compiled(_kl_rows_math)(q, log_q, logits)
    diff = torch.log_softmax(logits, -1, dtype=torch.float32).sub_(log_q)  # [F, c, V]: log p - log q
    with torch.autocast(logits.device.type, enabled=False), _float32_products():  # not a bf16 or TF32 product
        return -torch.bmm(diff.transpose(0, 1), q.unsqueeze(-1)).squeeze(-1).t()


@contextmanager
def _float32_products(precision: str = "highest"):
    """Float32 matmuls in full float32 while inside, whatever ``torch.set_float32_matmul_precision`` says (TF32
    would keep 10 bits of each term of a sum over the whole vocabulary). ``precision="high"`` (TF32) where every
    factor is a bf16 or fp16 value, which TF32 holds exactly."""
    before = torch.get_float32_matmul_precision()
    if before == precision:
        yield
        return
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class _LinearKL(torch.autograd.Function):
    """KL(softmax(linear(ref_h)) || softmax(linear(cur_h))) per position, for F copies of the current state.
    With ``grad``, the forward also computes ``d KL / d cur_h`` per position (as :class:`_LinearCE`)."""

    @staticmethod
    def forward(ctx, ref_h, cur_h, weight, bias, chunk, grad):  # ref_h [n, d], cur_h [F, n, d] -> [F, n] float32
        F, n = cur_h.shape[:2]
        out = torch.empty(F, n, dtype=torch.float32, device=cur_h.device)
        dh = torch.empty_like(cur_h) if grad else None  # [F, n, d]
        compiled = compiled_for(cur_h)
        for s in range(0, n, chunk):
            ref_logits = _logits(ref_h[s:s + chunk], weight, bias)  # [c, V]
            cs = cur_h[:, s:s + chunk]
            logits = _logits(cs, weight, bias)  # [F, c, V]
            if compiled:
                if grad:
                    out[:, s:s + chunk], gl = _compiled(_kl_and_grad_math)(ref_logits, logits, logits.dtype)
                    dh[:, s:s + chunk] = _grad_h(gl, weight, cs)
                else:
                    out[:, s:s + chunk] = _compiled(_kl_math)(ref_logits, logits)
                continue
            ref_logp = torch.log_softmax(ref_logits, -1, dtype=torch.float32)
            q = ref_logp.exp()
            out[:, s:s + chunk] = kl_rows(q, ref_logp, logits)
            if grad:
                p = torch.softmax(logits, -1, dtype=torch.float32).sub_(q)  # [F, c, V]: softmax(x) - softmax(x_ref)
                dh[:, s:s + chunk] = _grad_h(p.to(logits.dtype), weight, cs)
        if grad:
            ctx.save_for_backward(dh)
        return out

    @staticmethod
    def backward(ctx, g):  # g [F, n]
        (dh,) = ctx.saved_tensors
        return None, (dh.float() * g.unsqueeze(-1)).to(dh.dtype), None, None, None, None


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


def _ce_and_grad_math(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
    """:func:`_ce_math` and its gradient with respect to the logits, ``softmax(x) - onehot(t)`` (0 at IGNORE
    targets) in ``dtype``: ([c] float32, [c, V])."""
    x = logits.float()
    p = torch.softmax(x, -1)  # [c, V]
    hit = torch.arange(p.shape[-1], device=p.device) == targets.unsqueeze(-1)  # [c, V]; IGNORE hits nothing
    valid = (targets != IGNORE).unsqueeze(-1)  # [c, 1]
    return _ce_math(logits, targets), torch.where(valid, p - hit.float(), 0.0).to(dtype)


def _kl_math(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(x)) per position: ref [c, V], x [F, c, V] -> [F, c] float32."""
    log_q = torch.log_softmax(ref_logits.float(), -1)  # [c, V]
    return _kl_rows_math(log_q.exp(), log_q, logits)


def _kl_and_grad_math(ref_logits: torch.Tensor, logits: torch.Tensor, dtype: torch.dtype):
    """:func:`_kl_math` and its gradient with respect to ``x``, ``softmax(x) - softmax(ref)`` in ``dtype``:
    ([F, c] float32, [F, c, V])."""
    q = torch.softmax(ref_logits.float(), -1)  # [c, V]
    return _kl_math(ref_logits, logits), (torch.softmax(logits.float(), -1) - q).to(dtype)


def _kl_rows_math(q: torch.Tensor, log_q: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """:func:`kl_rows`' sum as one reduction: q, log_q [c, V] float32, logits [F, c, V] -> [F, c] float32."""
    return (q * (log_q - torch.log_softmax(logits.float(), -1))).sum(-1)


_COMPILED: dict = {}


def _compiled(fn):
    """``fn`` under ``torch.compile`` (made once per process; sizes that change between calls -- a last, shorter
    chunk -- are compiled once more as dynamic, torch's default). Under ``auto`` a call whose compile fails warns
    once, runs ``fn`` as it is, and :func:`compiled_for` says no from then on in this process."""
    if fn not in _COMPILED:
        _COMPILED[fn] = _with_fallback(torch.compile(fn), fn)
    return _COMPILED[fn]


def _capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (a failure then is the capture's to handle)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _with_fallback(compiled_fn, fn):
    """``compiled_fn`` (``fn`` under torch.compile), or ``fn`` itself once a compile failed under ``auto``."""
    def call(*args):
        if _COMPILE_FAILED:
            return fn(*args)
        try:
            return compiled_fn(*args)
        except torch.cuda.OutOfMemoryError:  # not the compiler's: the run's own retry-alone handles it
            raise
        except Exception as e:  # torch._dynamo / inductor errors have no common public base class
            if vocab_loss_setting() != "auto" or _capturing():
                raise
            _COMPILE_FAILED.append(f"{type(e).__name__}: {e}"[:300])
            warnings.warn(f"emlib.vocab_loss: torch.compile failed ({_COMPILE_FAILED[0]}); this process takes the "
                          f"fused way from now on (set ${VOCAB_LOSS_ENV}=fused to skip compiling).", RuntimeWarning)
            return fn(*args)
    return call


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
        return _LinearCE.apply(h, parts[0], parts[1], targets, chunk, _grad_wanted(h))
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
        out = _LinearKL.apply(ref_h, cur, parts[0], parts[1], chunk, _grad_wanted(cur))
    else:
        outs = [_checkpointed(_plain_kl, ref_h[s:s + chunk], cur[:, s:s + chunk], head)
                for s in range(0, cur.shape[1], chunk)]
        out = torch.cat(outs, dim=-1) if outs else cur.new_zeros(cur.shape[0], 0, dtype=torch.float32)
    return out[0] if single else out


# ------------------------------------------------------------------------------------------ the metrics' KL
@functools.lru_cache(maxsize=None)
def _mm_to_float32(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` inputs on this device type (CUDA
    with bf16/fp16: the products of the low-precision matrices accumulate and stay in float32)."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device_type)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`logits32` multiplies ``x`` by ``weight`` in their own (low) precision into float32 output."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and _mm_to_float32(x.device.type, x.dtype))


def logits32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             weight32: torch.Tensor | None = None) -> torch.Tensor:
    """The LM head's logits ``x W^T (+ b)`` [c, V] in float32 for ``x`` [c, d] in the model's dtype: never rounded
    to bf16 (a bf16 logit of magnitude 20 is off by up to 0.06, which the KL of two nearby distributions
    reads as divergence). On CUDA the bf16 product accumulates into float32 output (``torch.mm(...,
    out_dtype=float32)``, the bf16 matmul's speed); elsewhere a float32 product (``weight32``: ``weight`` in
    float32, when the caller keeps one), TF32 where ``x`` and ``weight`` are half precision (the same products)."""
    if _fast_path(x, weight):
        z = torch.mm(x, weight.t(), out_dtype=torch.float32)
    else:  # float32 products; TF32 ones where both factors are half-precision values (exact in TF32)
        w = weight32 if weight32 is not None else weight.float()
        half = (torch.bfloat16, torch.float16)
        with (torch.autocast(x.device.type, enabled=False),
              _float32_products("high" if x.dtype in half and weight.dtype in half else "highest")):
            z = x.float() @ w.t()
    return z + bias.float() if bias is not None else z


class KLReference:
    """A reference distribution at n positions, as the KL to other copies needs it, without gradients (the
    metrics: chapter 6's pretraining KL and its null, chapter 3's held-out KL through
    :func:`emlib.fasttrain.fast_kl_sum`).

    With a plain linear LM head ``z = W h (+ b)`` (:func:`_frozen_linear`; every model the book runs):
    ``KL(p || q)`` for ``p = softmax(z)``, ``q = softmax(z')`` is ``LSE(z') - LSE(z) - u . (h' - h)`` with
    ``u = W^T p``, so each position keeps its log-normaliser ``LSE(z)`` [n] and ``u`` [n, d] (float32, made once),
    and a copy costs its logits and one log-sum-exp: the reference's log-probabilities ([n, V], 15.6 GB for the
    paper's 50 x 512 tokens of Qwen2.5) are never kept or re-read. Every logit is float32 (:func:`logits32`); the
    difference ``h' - h`` is formed before the product, so no two large numbers cancel (SmolLM2-135M in bf16, 4 x
    256 tokens: mean KL within 1e-4 of the float64 KL of the same hidden states, where bf16 logits read 21% high
    at the paper grid's smallest norm; bench/README.md, session 37). Any other head: ``sum_v p (log p - log q)``
    (:func:`kl_rows`, the training KL's), the log-probabilities recomputed chunk by chunk for each copy."""

    @torch.no_grad()
    def __init__(self, states: torch.Tensor, head):
        self.states, self.head = states, head
        self.chunks = vocab_chunks(states, head)
        parts = _frozen_linear(head)  # under no_grad: any plain nn.Linear
        self.weight, self.bias = parts if parts is not None else (None, None)
        self.lse = self.u = self.weight32 = None
        self.logsumexp = _lse(states)  # one choice for the reference and every copy: equal logits give exactly 0
        if parts is not None:
            w32 = self.weight.float()  # [V, d] (the weight itself when float32)
            if not _fast_path(states, self.weight):
                self.weight32 = w32  # kept for the float32 products of every copy
            sums, u = [], []
            for s in self.chunks:
                z = self.logits(states[s:s + self.chunks.step])  # [c, V]
                m = self.logsumexp(z)  # [c]
                with _float32_products():
                    u.append(torch.exp(z.sub_(m[:, None])) @ w32)  # [c, d]: W^T p
                sums.append(m)
            d = states.shape[-1]
            self.lse = torch.cat(sums) if sums else states.new_zeros(0, dtype=torch.float32)
            self.u = torch.cat(u) if u else states.new_zeros((0, d), dtype=torch.float32)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[c, d] -> the head's float32 logits [c, V] (linear heads: :func:`logits32`)."""
        return logits32(x, self.weight, self.bias, self.weight32)

    @torch.no_grad()
    def kl(self, steered: torch.Tensor) -> torch.Tensor:
        """Per-position ``KL(reference || copy)`` over the vocabulary for G copies: ``steered`` [G, n, d] is what
        the LM head reads in each -> [G, n] float32. The logits exist one chunk of positions at a time
        (:func:`emlib.chat.vocab_chunks`), one [c, V] float32 tensor per copy (its log-sum-exp compiled where
        :func:`compiled_for` says so)."""
        out = torch.empty(steered.shape[:2], dtype=torch.float32, device=steered.device)
        step = self.chunks.step
        for s in self.chunks:
            e = s + step
            if self.u is None:  # not a linear head: through the log-probabilities
                logp = torch.log_softmax(self.head(self.states[s:e]), -1, dtype=torch.float32)  # [c, V]
                p = logp.exp()
                for g in range(steered.shape[0]):
                    out[g, s:e] = kl_rows(p, logp, self.head(steered[g:g + 1, s:e]))[0]  # [c]
                continue
            h = self.states[s:e].float()  # [c, d]
            for g in range(steered.shape[0]):
                x = steered[g, s:e]
                first = ((x.float() - h) * self.u[s:e]).sum(-1)  # [c]: u . (h' - h), summed in float32
                out[g, s:e] = self.logsumexp(self.logits(x)) - self.lse[s:e] - first
        return out


def _lse_math(z: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp over the last axis (the compiled way: one generated reduction)."""
    return torch.logsumexp(z, -1)


def _lse(t: torch.Tensor):
    """The log-sum-exp for tensors like ``t``: compiled where :func:`compiled_for` says so."""
    return _compiled(_lse_math) if compiled_for(t) else _lse_math
