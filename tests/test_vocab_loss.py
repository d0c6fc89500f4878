"""The vocabulary losses (emlib.vocab_loss): the fused autograd functions against the plain way and against
torch's own cross_entropy / kl_div on full logits, values and gradients."""
import warnings

import pytest
import torch

from emlib import vocab_loss
from emlib.chat import IGNORE

V, D = 97, 16


def _head(bias: bool = False, dtype=torch.float32) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(D, V, bias=bias).to(dtype)
    head.requires_grad_(False)
    return head


def _targets(n: int) -> torch.Tensor:
    t = torch.randint(0, V, (n,))
    t[::4] = IGNORE  # padding targets of a fixed shape
    return t


def _ce(setting, monkeypatch, h, head, t, chunk):
    monkeypatch.setenv(vocab_loss.VOCAB_LOSS_ENV, setting)
    h = h.clone().requires_grad_(True)
    out = vocab_loss.ce_tokens(h, head, t, chunk)
    (out * torch.linspace(0.5, 1.5, out.shape[0])).sum().backward()
    return out.detach(), h.grad


def _kl(setting, monkeypatch, ref, cur, head, chunk):
    monkeypatch.setenv(vocab_loss.VOCAB_LOSS_ENV, setting)
    cur = cur.clone().requires_grad_(True)
    out = vocab_loss.kl_tokens(ref, cur, head, chunk)
    (out * torch.linspace(0.5, 1.5, out.shape[-1])).sum().backward()
    return out.detach(), cur.grad


def _uncompiled(monkeypatch):
    """The compiled way's formulas called as they are (no compiler): what they compute, checked fast."""
    monkeypatch.setattr(vocab_loss, "_compiled", lambda fn: fn)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [5, 1000])
def test_fused_cross_entropy_is_torchs(monkeypatch, bias, chunk):
    torch.manual_seed(1)
    head = _head(bias)
    h, t = torch.randn(23, D), _targets(23)
    fused, g_fused = _ce("fused", monkeypatch, h, head, t, chunk)
    plain, g_plain = _ce("plain", monkeypatch, h, head, t, chunk)
    ref_h = h.clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(head(ref_h), t, ignore_index=IGNORE, reduction="none")
    (ref * torch.linspace(0.5, 1.5, 23)).sum().backward()
    assert fused.dtype == torch.float32 and fused.shape == (23,)
    assert (fused[t == IGNORE] == 0).all() and (g_fused[t == IGNORE] == 0).all()
    torch.testing.assert_close(fused, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, ref_h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_plain, ref_h.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("copies", [None, 1, 3])
@pytest.mark.parametrize("chunk", [4, 1000])
def test_fused_kl_is_torchs(monkeypatch, copies, chunk):
    head = _head(bias=True)
    torch.manual_seed(2)
    n = 19
    ref = torch.randn(n, D)
    cur = ref + 0.3 * torch.randn(n, D) if copies is None else ref + 0.3 * torch.randn(copies, n, D)
    fused, g_fused = _kl("fused", monkeypatch, ref, cur, head, chunk)
    plain, g_plain = _kl("plain", monkeypatch, ref, cur, head, chunk)
    c = cur.clone().requires_grad_(True)
    logq = head(ref).log_softmax(-1)
    want = torch.nn.functional.kl_div(head(c).log_softmax(-1), logq.expand(*c.shape[:-1], V), log_target=True,
                                      reduction="none").sum(-1)
    (want * torch.linspace(0.5, 1.5, n)).sum().backward()
    assert fused.shape == want.shape
    torch.testing.assert_close(fused, want.detach(), rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(plain, want.detach(), rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(g_fused, c.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_plain, c.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("other", ["plain", "compiled"])
def test_fused_losses_in_bf16_match_the_other_ways(monkeypatch, other):
    """bf16 hidden states and head (the GPU's dtype): the logits are rounded to bf16 every way; the fused and
    compiled gradients are written in bf16 as autograd writes the plain way's through the float32 cast."""
    if other == "compiled":
        _uncompiled(monkeypatch)
    head = _head(dtype=torch.bfloat16)
    torch.manual_seed(3)
    h, t = torch.randn(17, D, dtype=torch.bfloat16), _targets(17)
    fused, g_fused = _ce("fused", monkeypatch, h, head, t, 8)
    plain, g_plain = _ce(other, monkeypatch, h, head, t, 8)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert g_fused.dtype == g_plain.dtype == torch.bfloat16
    torch.testing.assert_close(g_fused, g_plain, rtol=2e-2, atol=1e-3)
    ref, cur = h[:9], (h[:9].float() + 0.2 * torch.randn(2, 9, D)).to(torch.bfloat16)
    kf, gkf = _kl("fused", monkeypatch, ref, cur, head, 4)
    kp, gkp = _kl(other, monkeypatch, ref, cur, head, 4)
    torch.testing.assert_close(kf, kp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gkf, gkp, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("other", ["plain", "compiled"])
def test_fused_losses_under_autocast_match_the_other_ways(monkeypatch, other):
    """float32 weights under bf16 autocast (how the fast step trains): the head's matmul runs in bf16 in the
    forward and again in the fused (and compiled) backward's recomputation, as in the plain way."""
    if other == "compiled":
        _uncompiled(monkeypatch)
    head = _head()
    torch.manual_seed(4)
    h, t = torch.randn(21, D), _targets(21)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, g_fused = _ce("fused", monkeypatch, h, head, t, 6)
        plain, g_plain = _ce(other, monkeypatch, h, head, t, 6)
        kf, gkf = _kl("fused", monkeypatch, h[:10], h[:10] + 0.2 * torch.randn(3, 10, D), head, 4)
        kp, gkp = _kl(other, monkeypatch, h[:10], h[:10] + 0.2 * torch.randn(3, 10, D), head, 4)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, g_plain, rtol=2e-2, atol=1e-3)
    assert kf.shape == kp.shape == (3, 10)
    # the KL inputs above differ (fresh noise each); the same inputs:
    cur = h[:10] + 0.2 * torch.randn(3, 10, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kf, gkf = _kl("fused", monkeypatch, h[:10], cur, head, 4)
        kp, gkp = _kl(other, monkeypatch, h[:10], cur, head, 4)
    torch.testing.assert_close(kf, kp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gkf, gkp, rtol=2e-2, atol=1e-3)


def test_a_trained_or_wrapped_head_takes_the_plain_way(monkeypatch):
    monkeypatch.delenv(vocab_loss.VOCAB_LOSS_ENV, raising=False)
    head = _head()
    assert vocab_loss.fused_applies(head)
    head.weight.requires_grad_(True)  # a trained head: the fused functions give no weight gradient
    assert not vocab_loss.fused_applies(head)
    h, t = torch.randn(7, D), _targets(7)
    vocab_loss.ce_tokens(h, head, t, 4).sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    with torch.no_grad():  # a metric's forward: no gradient to give, so the fused way serves a trainable head too
        assert vocab_loss.fused_applies(head)
    assert not vocab_loss.fused_applies(torch.nn.Sequential(_head()))  # not a plain nn.Linear
    monkeypatch.setenv(vocab_loss.VOCAB_LOSS_ENV, "plain")
    assert not vocab_loss.fused_applies(_head())


def test_bad_settings_and_inputs_say_what_to_do(monkeypatch):
    monkeypatch.setenv(vocab_loss.VOCAB_LOSS_ENV, "fast")
    with pytest.raises(ValueError, match="fused, plain or compiled"):
        vocab_loss.vocab_loss_setting()
    monkeypatch.delenv(vocab_loss.VOCAB_LOSS_ENV)
    ref = torch.randn(3, D, requires_grad=True)
    with pytest.raises(ValueError, match="no_grad"):
        vocab_loss.kl_tokens(ref, torch.randn(3, D), _head(), 2)


def test_no_positions_give_empty_losses(monkeypatch):
    for setting in vocab_loss.WAYS:
        monkeypatch.setenv(vocab_loss.VOCAB_LOSS_ENV, setting)
        assert vocab_loss.ce_tokens(torch.randn(0, D), _head(), torch.zeros(0, dtype=torch.long), 4).shape == (0,)
        assert vocab_loss.kl_tokens(torch.randn(0, D), torch.randn(2, 0, D), _head(), 4).shape == (2, 0)


def test_the_kl_sum_is_a_full_float32_product_whatever_the_matmul_precision(monkeypatch):
    """kl_rows' product over the vocabulary runs at "highest" even where a notebook allowed TF32, and the
    setting is given back."""
    seen = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: (seen.append(torch.get_float32_matmul_precision()), real_bmm(*a))[1])
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        logq = torch.randn(4, V).log_softmax(-1)
        out = vocab_loss.kl_rows(logq.exp(), logq, torch.randn(2, 4, V))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen == ["highest"] and out.shape == (2, 4) and (out >= 0).all()



@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [5, 1000])
def test_the_compiled_ways_formulas_give_the_fused_values_and_gradients(monkeypatch, bias, chunk):
    _uncompiled(monkeypatch)
    head = _head(bias)
    torch.manual_seed(5)
    h, t = torch.randn(23, D), _targets(23)
    got, g_got = _ce("compiled", monkeypatch, h, head, t, chunk)
    want, g_want = _ce("fused", monkeypatch, h, head, t, chunk)
    assert (got[t == IGNORE] == 0).all() and (g_got[t == IGNORE] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
    ref = torch.randn(19, D)
    for cur in (ref + 0.3 * torch.randn(19, D), ref + 0.3 * torch.randn(3, 19, D)):
        got, g_got = _kl("compiled", monkeypatch, ref, cur, head, chunk)
        want, g_want = _kl("fused", monkeypatch, ref, cur, head, chunk)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6)
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
    same, _ = _kl("compiled", monkeypatch, ref, ref.clone(), head, chunk)
    assert (same == 0).all()  # equal distributions: exactly 0, as the fused way


def test_the_compiled_kl_rows_is_the_fused_ones(monkeypatch):
    """Chapter 6's per-token KL against kept base log-probabilities, bf16 steered logits."""
    _uncompiled(monkeypatch)
    torch.manual_seed(6)
    logq = torch.randn(4, V).log_softmax(-1)
    x = torch.randn(2, 4, V, dtype=torch.bfloat16)
    monkeypatch.setenv(vocab_loss.VOCAB_LOSS_ENV, "compiled")
    got = vocab_loss.kl_rows(logq.exp(), logq, x)
    monkeypatch.setenv(vocab_loss.VOCAB_LOSS_ENV, "fused")
    torch.testing.assert_close(got, vocab_loss.kl_rows(logq.exp(), logq, x), rtol=1e-5, atol=1e-6)


def test_the_compiled_way_under_torch_compile_matches_the_fused_way(monkeypatch):
    """The real thing, once: the formulas through torch.compile (inductor's C++ kernels on the CPU; Triton on a
    GPU), values and gradients of both losses and kl_rows, a last shorter chunk included."""
    head = _head(bias=True)
    torch.manual_seed(7)
    h, t = torch.randn(13, D), _targets(13)
    got, g_got = _ce("compiled", monkeypatch, h, head, t, 8)
    want, g_want = _ce("fused", monkeypatch, h, head, t, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
    ref = torch.randn(9, D)
    cur = ref + 0.3 * torch.randn(2, 9, D)
    got, g_got = _kl("compiled", monkeypatch, ref, cur, head, 8)
    want, g_want = _kl("fused", monkeypatch, ref, cur, head, 8)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
    assert vocab_loss._COMPILED  # the compiled functions were made, not bypassed


@pytest.mark.parametrize("way", ["fused", "compiled"])
def test_the_head_runs_twice_per_position_with_a_gradient_and_once_without(monkeypatch, way):
    """The gradient is computed in the forward while a chunk's logits exist: with a backward, the head's matmul
    runs once for the logits (twice for the KL: the reference's too) and once for the gradient per chunk, none in
    the backward; a metric's forward under no_grad computes no gradient at all."""
    _uncompiled(monkeypatch)
    monkeypatch.setenv(vocab_loss.VOCAB_LOSS_ENV, way)
    calls = {"logits": 0, "grad": 0}
    real_logits, real_grad = vocab_loss._logits, vocab_loss._grad_h
    monkeypatch.setattr(vocab_loss, "_logits", lambda *a: (calls.__setitem__("logits", calls["logits"] + 1),
                                                          real_logits(*a))[1])
    monkeypatch.setattr(vocab_loss, "_grad_h", lambda *a: (calls.__setitem__("grad", calls["grad"] + 1),
                                                          real_grad(*a))[1])
    head = _head()
    h, t = torch.randn(10, D, requires_grad=True), _targets(10)
    out = vocab_loss.ce_tokens(h, head, t, 4)  # 3 chunks
    assert calls == {"logits": 3, "grad": 3}
    out.sum().backward()
    assert calls == {"logits": 3, "grad": 3} and h.grad is not None  # the backward computed no logits
    cur = torch.randn(2, 10, D, requires_grad=True)
    calls.update(logits=0, grad=0)
    vocab_loss.kl_tokens(torch.randn(10, D), cur, head, 4).sum().backward()
    assert calls == {"logits": 6, "grad": 3}  # the reference's and the copies' logits per chunk
    calls.update(logits=0, grad=0)
    with torch.no_grad():
        vocab_loss.ce_tokens(h, head, t, 4)
        vocab_loss.kl_tokens(torch.randn(10, D), cur, head, 4)
    assert calls == {"logits": 9, "grad": 0}


class _Cudaish:
    """Stands for a tensor on a CUDA device (what :func:`vocab_loss.compiled_for` reads of it)."""
    is_cuda = True


def test_auto_compiles_on_cuda_with_triton_only(monkeypatch):
    """``auto`` (the default): the compiled way for tensors on a CUDA device where triton is there, fused on the
    CPU or without triton; the explicit settings do what they say on either device."""
    monkeypatch.delenv(vocab_loss.VOCAB_LOSS_ENV, raising=False)
    monkeypatch.setattr(vocab_loss, "_COMPILE_FAILED", [])
    assert vocab_loss.vocab_loss_setting() == "auto"
    monkeypatch.setattr(vocab_loss, "_triton_ok", lambda: True)
    assert vocab_loss.compiled_for(_Cudaish()) and not vocab_loss.compiled_for(torch.zeros(1))
    assert (vocab_loss.vocab_loss_way("cuda"), vocab_loss.vocab_loss_way("cpu")) == ("compiled", "fused")
    monkeypatch.setattr(vocab_loss, "_triton_ok", lambda: False)
    assert not vocab_loss.compiled_for(_Cudaish()) and vocab_loss.vocab_loss_way("cuda") == "fused"
    monkeypatch.setenv(vocab_loss.VOCAB_LOSS_ENV, "compiled")
    assert vocab_loss.compiled_for(torch.zeros(1)) and vocab_loss.vocab_loss_way("cpu") == "compiled"
    monkeypatch.setenv(vocab_loss.VOCAB_LOSS_ENV, "fused")
    assert not vocab_loss.compiled_for(_Cudaish()) and vocab_loss.vocab_loss_way("cuda") == "fused"


def test_a_failed_compile_under_auto_warns_once_and_goes_on_fused(monkeypatch):
    """Under ``auto`` a compile that fails (here: a stand-in for torch.compile that raises) warns, returns the
    formula's value computed as it is, and turns the compiled way off for the process; a hand-set ``compiled``
    raises instead."""
    monkeypatch.setattr(vocab_loss, "_COMPILE_FAILED", [])
    monkeypatch.setattr(vocab_loss, "_COMPILED", {})

    def broken(fn):
        def call(*a):
            raise RuntimeError("no C compiler")
        return call

    monkeypatch.setattr(vocab_loss.torch, "compile", broken)
    z = torch.randn(3, 11)
    monkeypatch.setenv(vocab_loss.VOCAB_LOSS_ENV, "compiled")
    with pytest.raises(RuntimeError, match="no C compiler"):
        vocab_loss._compiled(vocab_loss._lse_math)(z)
    assert vocab_loss._COMPILE_FAILED == []
    monkeypatch.setenv(vocab_loss.VOCAB_LOSS_ENV, "auto")
    monkeypatch.setattr(vocab_loss, "_triton_ok", lambda: True)
    assert vocab_loss.compiled_for(_Cudaish())
    with pytest.warns(RuntimeWarning, match="no C compiler.*fused way"):
        got = vocab_loss._compiled(vocab_loss._lse_math)(z)
    torch.testing.assert_close(got, torch.logsumexp(z, -1))
    assert not vocab_loss.compiled_for(_Cudaish()) and vocab_loss.vocab_loss_way("cuda") == "fused"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later calls run the formula quietly
        torch.testing.assert_close(vocab_loss._compiled(vocab_loss._lse_math)(z), torch.logsumexp(z, -1))
    monkeypatch.setattr(vocab_loss, "_COMPILE_FAILED", [])
    monkeypatch.setattr(vocab_loss, "_COMPILED", {})

    def out_of_memory(fn):
        def call(*a):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return call

    monkeypatch.setattr(vocab_loss.torch, "compile", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # not a compile failure: raised, the compiled way stays on
        vocab_loss._compiled(vocab_loss._lse_math)(z)
    assert vocab_loss.compiled_for(_Cudaish())
