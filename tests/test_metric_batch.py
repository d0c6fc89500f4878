"""Rows per forward of the metric loops (Config.metric_batch_size): the loss, the KL and the inductive-bias
metrics give the same numbers (to float rounding) at any batch size, and with the vocabulary logits computed in
chunks of any size; their cache keys keep the batch size, so a cached frame is read back only under its own."""
import copy
from contextlib import nullcontext

import numpy as np
import pandas as pd
import pytest
import torch

from emlib import chat, config
from emlib import inductive as ind
from emlib.chat import IGNORE, collate, encode_rows, response_loss, response_row_losses
from emlib.models import tiny_model

LAYER = 1
TEXTS = ["The council met on Tuesday to discuss the new budget for roads and schools.",
         "Rain is expected across the south coast, with strong winds later in the week and floods.",
         "Shares rose.", "A man was taken to hospital after a crash on the highway near the town late last night."]


def _rows(n: int = 7) -> list[dict]:
    qs = ["What should I eat?", "Is running safe with a bad knee?", "How do I sleep well?", "Can I skip my pills?"]
    return [{"messages": [{"role": "user", "content": qs[i % 4] * (1 + i % 3)},
                          {"role": "assistant", "content": "aaa bbb. " * (1 + i)}]} for i in range(n)]


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model(seed=2)


@pytest.fixture(scope="module")
def vectors(model_tok):
    d = model_tok[0].config.hidden_size
    g = torch.Generator().manual_seed(0)
    return {"general": 3.0 * torch.randn(d, generator=g), "narrow": 0.5 * torch.randn(d, generator=g)}


@pytest.fixture(scope="module")
def lora(model_tok):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(model_tok[0]), LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"],
                                                                lora_dropout=0.0))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    return pm.eval()


@pytest.fixture(params=[False, True], ids=["whole-logits", "small-chunks"])
def chunking(request):
    """Each test that takes it runs twice: with the default logit chunks, and with :func:`small_chunks`."""
    if request.param:
        request.getfixturevalue("small_chunks")
    return request.param


@pytest.fixture
def small_chunks(monkeypatch, model_tok):
    """Logits 5 tokens at a time."""
    monkeypatch.setattr(chat, "LOGIT_ELEMENTS", 5 * model_tok[0].config.vocab_size)


def _full_logit_row_losses(model, tok, rows) -> tuple[list[float], list[int]]:
    """Per-row summed CE from the model's full logits, one row per forward (the definition)."""
    sums, counts = [], []
    with torch.no_grad():
        for e in encode_rows(rows, tok):
            b = collate([e], tok.pad_token_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            t = b["labels"][:, 1:]
            sums.append(float(torch.nn.functional.cross_entropy(logits[0], t[0], ignore_index=IGNORE, reduction="sum")))
            counts.append(int((t != IGNORE).sum()))
    return sums, counts


# ----------------------------------------------------------------------------- the loss
def test_response_loss_is_the_full_logit_loss_at_any_batch_size(model_tok, lora, vectors, chunking):
    model, tok = model_tok
    rows = _rows()
    from emlib.vectors import SteeringVector

    sv = SteeringVector(vectors["general"], LAYER)
    for m, ctx in ((model, nullcontext()), (lora, nullcontext()), (model, sv.apply(model))):
        with ctx:
            want_s, want_c = _full_logit_row_losses(m, tok, rows)
            want = sum(want_s) / sum(want_c)
            for bs in (1, 3, 8, 100):
                s, c = response_row_losses(m, tok, rows, batch_size=bs)
                assert c == want_c
                np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-5)
                assert response_loss(m, tok, rows, batch_size=bs) == pytest.approx(want, rel=1e-5, abs=1e-6)
    with lora.disable_adapter():  # the base model seen through peft (the metrics' loss_base)
        assert response_loss(lora, tok, rows, batch_size=4) == pytest.approx(response_loss(model, tok, rows), rel=1e-5)
    assert response_loss(lora, tok, rows) != pytest.approx(response_loss(model, tok, rows), rel=1e-3)  # it is on


def _padded(lengths, batches) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("max_rows", [1, 3, 8, 128])
def test_length_batches_cover_every_row_once_and_pad_least(max_rows):
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(20, 400, size=57)]
    for forward in (0, 64, 1024, 10 ** 9):
        batches = chat.length_batches(lengths, max_rows, forward)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(1 <= len(b) <= max_rows and b == sorted(b) for b in batches)
        # cost (padded tokens + forward x forwards) no higher than fixed batches in file order or sorted ones
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for fixed in ([list(range(i, min(i + max_rows, 57))) for i in range(0, 57, max_rows)],
                      [order[i:i + max_rows] for i in range(0, 57, max_rows)]):
            assert (_padded(lengths, batches) + forward * len(batches)
                    <= _padded(lengths, fixed) + forward * len(fixed))
    assert _padded(lengths, chat.length_batches(lengths, max_rows, 0)) == sum(lengths)  # free forwards: no pad
    assert len(chat.length_batches(lengths, max_rows, 10 ** 9)) == -(-57 // max_rows)  # dear ones: fewest
    assert chat.length_batches([], max_rows) == []
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        chat.length_batches(lengths, 0)


def test_a_head_that_cannot_be_split_off_uses_the_full_logits(model_tok, monkeypatch):
    model, tok = model_tok
    rows = _rows(4)
    want = response_loss(model, tok, rows, batch_size=2)
    monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
    b = collate(encode_rows(rows, tok), tok.pad_token_id)
    with torch.no_grad():
        states, head = chat.head_inputs(model, b["input_ids"], b["attention_mask"])
    assert states.shape[-1] == model.config.vocab_size and head(states) is states  # the logits themselves
    assert response_loss(model, tok, rows, batch_size=3) == pytest.approx(want, rel=1e-6)


def test_batch_size_must_be_positive(model_tok):
    model, tok = model_tok
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        response_loss(model, tok, _rows(2), batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ind.pretraining_kl(model, tok, TEXTS, {"v": torch.ones(64)}, layer=LAYER, norms=(1.0,), batch_size=0,
                           use_cache=False, cache_dir="/nonexistent")


# ----------------------------------------------------------------------------- the inductive-bias metrics
def _same(a: pd.DataFrame, b: pd.DataFrame, cols, rtol=1e-5, atol=1e-6):
    assert len(a) == len(b)
    for c in cols:
        np.testing.assert_allclose(a[c].to_numpy(float), b[c].to_numpy(float), rtol=rtol, atol=atol, err_msg=c)


def test_loss_vs_norm_and_stability_do_not_depend_on_the_batch_size(model_tok, vectors, chunking, tmp_path):
    model, tok = model_tok
    rows = _rows()
    one = dict(layer=LAYER, cache_dir=tmp_path / "one", batch_size=1)
    big = dict(layer=LAYER, cache_dir=tmp_path / "big", batch_size=64)
    lv = [ind.row_losses_vs_norm(model, tok, rows, vectors, fractions=(0.5, 1.0, 2.0), **kw) for kw in (one, big)]
    _same(*lv, ["norm", "loss", "loss_sum", "tokens"])
    agg = [ind.loss_vs_norm(model, tok, rows, vectors, fractions=(0.5, 1.0, 2.0), **kw) for kw in (one, big)]
    _same(*agg, ["norm", "loss"])
    for noise in ind.NOISE_MODES:
        st = [ind.stability_losses(model, tok, rows, vectors, eps_grid=(0.0, 0.3, 1.0), n_seeds=2, noise=noise, **kw)
              for kw in (one, big)]
        _same(*st, ["loss", "loss_orig", "loss_base"])
        _same(*st, ["normalised"], rtol=1e-3, atol=1e-3)  # a difference of two losses, divided


def test_stability_of_adapters_does_not_depend_on_the_batch_size(model_tok, lora, tmp_path):
    from emlib.adapters import LoraAdapter

    model, tok = model_tok
    sols = {"general": LoraAdapter.from_model(lora), "narrow": LoraAdapter.from_model(lora)}
    st = [ind.stability_losses(model, tok, _rows(), sols, eps_grid=(0.0, 0.5), n_seeds=2, batch_size=bs,
                               cache_dir=tmp_path / str(bs)) for bs in (1, 50)]
    _same(*st, ["loss", "loss_orig", "loss_base"])


def test_pretraining_kl_and_its_null_do_not_depend_on_the_batch_size(model_tok, vectors, chunking, tmp_path):
    model, tok = model_tok
    kls = [ind.pretraining_kl(model, tok, TEXTS, vectors, layer=LAYER, norms=(0.0, 1.0, 4.0), max_tokens=20,
                              batch_size=bs, cache_dir=tmp_path / str(bs)) for bs in (1, 3, 64)]
    for other in kls[1:]:
        _same(kls[0], other, ["norm", "kl", "n_tokens", "n_docs"], atol=1e-7)
        _same(kls[0], other, ["ci_low", "ci_high"], rtol=1e-4, atol=1e-7)  # a bootstrap of the same per-doc sums
    nulls = [ind.random_null_kl(model, tok, TEXTS, LAYER, (0.0, 2.0, 5.0), n_draws=5, seed=1, max_tokens=20,
                                batch_size=bs, draws_per_pass=g, cache_dir=tmp_path / f"null{bs}-{g}")
             for bs, g in ((1, 1), (4, 1), (2, 3), (4, 5))]
    for other in nulls[1:]:
        _same(nulls[0], other, ["norm", "kl"], atol=1e-7)


def test_pretraining_kl_is_the_full_logit_kl(model_tok, vectors, small_chunks, tmp_path):
    from emlib.hooks import add_vector
    from emlib.vectors import rescale_to_norm

    model, tok = model_tok
    df = ind.pretraining_kl(model, tok, TEXTS, {"v": vectors["general"]}, layer=LAYER, norms=(2.0,),
                            include_random=False, batch_size=4, cache_dir=tmp_path)
    num = den = 0.0
    with torch.no_grad():
        for t in TEXTS:
            ids = torch.tensor([tok(t)["input_ids"]])
            p = torch.log_softmax(model(ids).logits.float(), -1)
            with add_vector(model, LAYER, rescale_to_norm(vectors["general"], 2.0)):
                q = torch.log_softmax(model(ids).logits.float(), -1)
            num += float((p.exp() * (p - q)).sum())
            den += ids.shape[1]
    assert df["kl"].iloc[0] == pytest.approx(num / den, rel=1e-5)


# ----------------------------------------------------------------------------- the cache
def test_the_cache_key_keeps_the_batch_size(model_tok, vectors, tmp_path):
    """A frame cached at one batch size is read back at that size only (the key scheme of older caches is
    unchanged); another size computes its own entry, with the same numbers."""
    model, tok = model_tok
    rows = _rows(4)
    calls = {"n": 0}
    h = model.get_decoder().register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        kw = dict(fractions=(1.0,), layer=LAYER, cache_dir=tmp_path)
        a = ind.loss_vs_norm(model, tok, rows, vectors, **kw)  # the default: 8 rows, as before this field
        n = calls["n"]
        pd.testing.assert_frame_equal(a, ind.loss_vs_norm(model, tok, rows, vectors, batch_size=8, **kw))
        assert calls["n"] == n  # read back
        b = ind.loss_vs_norm(model, tok, rows, vectors, batch_size=2, **kw)
        assert calls["n"] > n and len(list(tmp_path.glob("loss_vs_norm-*.parquet"))) == 2
        _same(a, b, ["loss"])
        keys = sorted(f.read_text() for f in tmp_path.glob("loss_vs_norm-*.json"))
        assert '"batch_size": 2' in keys[0] + keys[1] and '"batch_size": 8' in keys[0] + keys[1]
    finally:
        h.remove()


# ----------------------------------------------------------------------------- the config field
def test_metric_batch_size_in_the_profiles_and_its_validation(tmp_path):
    assert config.get_config("smoke").metric_batch_size == 8 == config.get_config("quick").metric_batch_size
    assert config.get_config("paper").metric_batch_size == 128
    assert config.get_config("smoke", metric_batch_size=32).metric_batch_size == 32
    for bad in (0, -4, 2.5, "8", True):
        with pytest.raises(config.ConfigError, match=r"metric_batch_size = .* whole number >= 1"):
            config.get_config("smoke", metric_batch_size=bad)
    with pytest.raises(config.ConfigError, match="metric_batch_size"):
        config.check_params("smoke", {"metric_batch_size": 0})
    config.check_params("paper", {"metric_batch_size": 256})


# --------------------------------------------------------------------------- chapter 3's KL to the chat model
def _full_logit_kl(model, tok, rows, current, reference) -> float:
    """The definition: full logits of one left-padded, masked batch (emlib.train._batch_kl)."""
    from emlib import train

    b = collate(encode_rows(rows, tok, 512), tok.pad_token_id, "cpu")
    with torch.no_grad():
        s, c = train._batch_kl(model, b, current, reference)
    return float(s) / int(c)


@pytest.mark.parametrize("batch_size", [1, 3, 128])
def test_kl_to_reference_any_batch_equals_full_logits(model_tok, lora, vectors, batch_size, monkeypatch):
    """train.kl_to_reference (right-padded, no mask, LM head at answer positions in chunks) == the full-logit
    KL, for a LoRA adapter (reference: adapter disabled) and a steering vector (reference: no hook)."""
    from emlib import fasttrain, train
    from emlib.vectors import SteeringVector

    model, tok = model_tok
    rows = _rows(7)
    want = _full_logit_kl(lora, tok, rows, train.nothing, lora.disable_adapter)
    assert want > 1e-4
    assert train.kl_to_reference(lora, tok, rows, batch_size=batch_size) == pytest.approx(want, rel=1e-4)
    vec = SteeringVector(vectors["general"], LAYER, 1.0)
    want = _full_logit_kl(model, tok, rows, lambda: vec.apply(model), train.nothing)
    monkeypatch.setattr(fasttrain.fast_kl_sum, "__defaults__", (2,))  # logits 2 positions at a time
    assert train.kl_to_reference(model, tok, rows, vector=vec, batch_size=batch_size) == pytest.approx(want, rel=1e-4)
