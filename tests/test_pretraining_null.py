"""Chapter 6's null: many random directions in one forward pass give what one direction at a time gives."""
import numpy as np
import pandas as pd
import torch

from emlib import hooks, inductive
from emlib.vectors import random_vector

TEXTS = ["The council met on Tuesday to discuss the new bridge over the river.",
         "Rain is expected across the south coast, with strong winds later in the week.",
         "Shares rose after the bank reported higher profits for the quarter."]


def test_random_null_matches_one_direction_at_a_time(tiny, tmp_path):
    model, tok = tiny
    layer, norms = 1, [0.0, 2.0, 5.0]
    null = inductive.random_null_kl(model, tok, TEXTS, layer, norms, n_draws=5, seed=3, batch_size=2,
                                    draws_per_pass=2, cache_dir=tmp_path)
    assert len(null) == 15 and (null[null["norm"] == 0]["kl"].abs() < 1e-6).all()
    d = model.config.hidden_size
    for k in (0, 4):
        v = random_vector(d, 5.0, 3 + 1 + k)
        one = inductive.pretraining_kl(model, tok, TEXTS, {"v": v}, layer=layer, norms=[5.0], include_random=False,
                                       batch_size=2, cache_dir=tmp_path)
        got = null[(null["draw"] == k) & (null["norm"] == 5.0)]["kl"].iloc[0]
        assert np.isclose(got, one["kl"].iloc[0], rtol=1e-4, atol=1e-7), (k, got, one["kl"].iloc[0])


def test_null_summary_places_the_general_vector_among_the_draws():
    null = pd.DataFrame({"draw": list(range(20)) * 2, "norm": [1.0] * 20 + [2.0] * 20,
                         "kl": list(np.arange(20) / 100) + list(np.arange(20) / 10)})
    frame = pd.DataFrame({"solution": ["general", "general", "narrow"], "norm": [1.0, 2.0, 1.0], "kl": [0.5, 0.55, 0.9]})
    s = inductive.null_summary(frame, null).set_index("norm")
    assert s.loc[1.0, "percentile"] == 20 / 21 and s.loc[2.0, "percentile"] == 6 / 21
    assert s.loc[1.0, "n_draws"] == 20 and np.isclose(s.loc[2.0, "null_mean"], 0.95)


def test_add_rows_needs_one_vector_per_row(tiny):
    model, _ = tiny
    import pytest

    with pytest.raises(ValueError, match="one vector per batch row"):
        with hooks.add_rows(model, 0, torch.zeros(model.config.hidden_size)):
            pass


def _exact_kl(h: torch.Tensor, h2: torch.Tensor, head) -> torch.Tensor:
    """KL(softmax(head(h)) || softmax(head(h2))) per token in float64 from the same hidden states [n, d]."""
    w = head.weight.double()
    b = head.bias.double() if head.bias is not None else 0.0
    lp, lq = torch.log_softmax(h.double() @ w.t() + b, -1), torch.log_softmax(h2.double() @ w.t() + b, -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def test_kl_reference_of_bf16_states_is_the_exact_kl_of_those_states():
    """A bf16 model's hidden states: the KL from float32 logits and u . (h' - h) is the float64 KL of the same
    states to 1e-3 of its mean, where a KL over bf16-rounded logits is biased (the reason it changed)."""
    from emlib.vocab_loss import KLReference
    from emlib.vocab_loss import kl_rows

    g = torch.Generator().manual_seed(0)
    n, d, vocab = 300, 64, 2000
    head = torch.nn.Linear(d, vocab, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, d, generator=g) * 0.6)
        head.bias.copy_(torch.randn(vocab, generator=g))
    h = (torch.randn(n, d, generator=g) * 2).to(torch.bfloat16)
    steered = torch.stack([(h.float() + s * torch.randn(n, d, generator=g)).to(torch.bfloat16)
                           for s in (0.02, 0.2)])  # [2, n, d]
    with torch.no_grad():
        got = KLReference(h, head).kl(steered)  # [2, n]
        for i in range(2):
            want = _exact_kl(h, steered[i], head)
            assert abs(got[i].double().mean() / want.mean() - 1) < 1e-3, (i, got[i].mean(), want.mean())
            assert torch.allclose(got[i].double(), want, rtol=1e-2, atol=1e-5)
        # the same states through bf16 logits (the earlier way): off by more at the small step
        lp = torch.log_softmax(head(h), -1, dtype=torch.float32)
        old = kl_rows(lp.exp(), lp, head(steered[:1]))[0].double()
        want = _exact_kl(h, steered[0], head)
        assert abs(old.mean() / want.mean() - 1) > abs(got[0].double().mean() / want.mean() - 1)
        assert (KLReference(h, head).kl(h[None]) == 0).all()  # the unsteered states: exactly 0


def test_kl_reference_with_a_head_that_is_not_linear_uses_the_log_probabilities():
    from emlib.vocab_loss import KLReference

    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(16, 50, bias=False)
    head = torch.nn.Sequential(lin)  # not an nn.Linear: the log-probabilities' path
    h = torch.randn(40, 16, generator=g)
    steered = (h + 0.3 * torch.randn(40, 16, generator=g))[None]
    with torch.no_grad():
        base = KLReference(h, head)
        assert base.u is None
        got = base.kl(steered)[0].double()
        assert torch.allclose(got, _exact_kl(h, steered[0], lin), rtol=1e-4, atol=1e-7)
        assert torch.allclose(got.float(), KLReference(h, lin).kl(steered)[0], rtol=1e-4, atol=1e-7)


def test_kl_reference_compiled_log_sum_exp_gives_the_same_numbers(monkeypatch):
    from emlib.vocab_loss import KLReference

    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(16, 300, bias=False)
    h = torch.randn(30, 16, generator=g)
    steered = torch.stack([h + 0.2 * torch.randn(30, 16, generator=g) for _ in range(2)])
    eager = KLReference(h, head).kl(steered)
    monkeypatch.setenv("EMLIB_VOCAB_LOSS", "compiled")
    compiled = KLReference(h, head)
    assert torch.allclose(compiled.kl(steered), eager, rtol=1e-3, atol=1e-6)
    assert (compiled.kl(h[None]) == 0).all()
