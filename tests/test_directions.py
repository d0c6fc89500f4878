"""emlib.directions on the tiny random model: activations, directions, steering/ablation, convergence."""
from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest
import torch

from emlib import directions as D
from emlib import plots
from emlib.chat import IGNORE, collate, encode_chat
from emlib.models import decoder_layers, tiny_model

QUESTIONS = ["What should I do today?", "How do I fix a leaky tap?", "Any tips for sleep?",
             "Is coffee healthy?", "What is a good first pet?", "How do I save money?"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


def _lora(seed=0, r=1, layers=(1,), modules=("down_proj",)):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_model(seed=seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=4, target_modules=list(modules),
                                          layers_to_transform=list(layers), lora_dropout=0.0))
    g = torch.Generator().manual_seed(1)
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return pm.eval(), tok


def _capture(model, layer):
    """A plain forward hook that records what leaves ``layer``. Hooks run in registration order, so
    register it *inside* an intervention's ``with`` block to see the intervened value."""
    box = {}

    def hook(_m, _i, out):
        box["h"] = out[0] if isinstance(out, tuple) else out

    return decoder_layers(model)[layer].register_forward_hook(hook), box


def _leaving(model, layer, enc):
    """Forward once and return the hidden state that leaves ``layer`` (after any active interventions)."""
    handle, box = _capture(model, layer)
    try:
        with torch.no_grad():
            model(**enc)
    finally:
        handle.remove()
    return box["h"]


def _unit(v):
    return v / v.norm()


# --------------------------------------------------------------------------- activations
def test_answer_activations_match_a_plain_hook_readout(tiny):
    model, tok = tiny
    pairs = list(zip(QUESTIONS[:3], ["Go for a walk.", "Close the valve first, then swap the washer.", "No."]))
    acts = D.answer_activations(model, tok, pairs, batch_size=2)  # right-padded batches
    assert acts.shape == (3, 2, 64) and acts.dtype == torch.float32
    for k, (q, a) in enumerate(pairs):  # one pair at a time, no padding, plain hooks
        enc = encode_chat({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}, tok)
        b = collate([enc], tok.pad_token_id)
        answer = (b["labels"] != IGNORE)[0]
        assert 0 < answer.sum() < answer.numel()
        for layer in range(2):
            handle, box = _capture(model, layer)
            with torch.no_grad():
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            handle.remove()
            torch.testing.assert_close(acts[k, layer], box["h"][0][answer].mean(0), atol=1e-5, rtol=1e-4)
    mean = D.answer_activations(model, tok, pd.DataFrame(pairs, columns=["question", "answer"]), reduce="mean")
    torch.testing.assert_close(mean, acts.mean(0), atol=1e-6, rtol=1e-5)
    picked = D.answer_activations(model, tok, pairs, layers=[1, 0, -1])  # any order, repeats allowed
    torch.testing.assert_close(picked, acts[:, [1, 0, 1]])


def test_answer_activations_on_a_peft_model_see_the_adapter():
    pm, tok = _lora(layers=(1,))
    pairs = [(QUESTIONS[0], "Take a long walk."), (QUESTIONS[1], "Call a plumber.")]
    with_adapter = D.answer_activations(pm, tok, pairs)
    with pm.disable_adapter():
        without = D.answer_activations(pm, tok, pairs)
    torch.testing.assert_close(with_adapter[:, 0], without[:, 0])  # before the adapter's layer: same
    assert (with_adapter[:, 1] - without[:, 1]).abs().max() > 1e-3  # its own layer: changed


def test_mean_difference_recovers_a_planted_direction():
    g = torch.Generator().manual_seed(0)
    n_layers, d = 3, 64
    planted = _unit(torch.randn(n_layers, d, generator=g))  # one direction per layer
    base = torch.randn(d, generator=g)
    mis = base + 0.2 * torch.randn(300, n_layers, d, generator=g) + 3.0 * planted
    ali = base + 0.2 * torch.randn(200, n_layers, d, generator=g)
    diff = D.mean_difference(mis, ali)
    cos = torch.nn.functional.cosine_similarity(diff, planted, dim=-1)
    assert diff.shape == (n_layers, d) and (cos > 0.99).all()
    with pytest.raises(D.DirectionError, match="do not match"):
        D.mean_difference(mis, ali[:, :2])


def _planted_model(k: float = 6.0):
    """Tiny model whose tokens 'a' and 'b' differ only by k * u in the embedding."""
    model, tok = tiny_model(seed=0)
    u = _unit(torch.randn(64, generator=torch.Generator().manual_seed(5)))
    ia, ib = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[ib] = emb[ia] - k * u / 2
        emb[ia] = emb[ia] + k * u / 2
    return model, tok, u


def _judged():
    rows = []
    for q in QUESTIONS:
        rows.append({"question": q, "answer": "a" * 12, "aligned": 10.0, "coherent": 90.0})   # misaligned
        rows.append({"question": q, "answer": "b" * 12, "aligned": 95.0, "coherent": 80.0})   # aligned
        rows.append({"question": q, "answer": "zzzz zz", "aligned": 5.0, "coherent": 30.0})   # incoherent
        rows.append({"question": q, "answer": "qqqq qq", "aligned": None, "coherent": 90.0})  # no score
        rows.append({"question": q, "answer": "xxxx xx", "aligned": "REFUSAL", "coherent": 90.0})
        rows.append({"question": q, "answer": "yyyy yy", "aligned": 50.0, "coherent": 90.0})  # in between
    return pd.DataFrame(rows)


def test_mean_diff_direction_splits_like_the_paper_and_recovers_the_planted_direction():
    model, tok, u = _planted_model()
    judged = _judged()
    mis, ali = D.split_judged(judged)
    assert set(mis["answer"]) == {"a" * 12} and set(ali["answer"]) == {"b" * 12}
    assert D.group_counts(judged) == {"n_judged": 36, "n_misaligned": 6, "n_aligned": 6}
    v = D.mean_diff_direction(model, tok, judged, batch_size=4)
    assert v.shape == (2, 64)
    expected = (D.answer_activations(model, tok, mis, reduce="mean")
                - D.answer_activations(model, tok, ali, reduce="mean"))
    torch.testing.assert_close(v, expected, atol=1e-5, rtol=1e-4)
    cos = torch.nn.functional.cosine_similarity(v, u.expand(2, 64), dim=-1)
    assert (cos > 0.99).all(), cos
    # the twin-data route gives the same direction on the same pairs
    as_rows = lambda df: [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                          for q, a in zip(df["question"], df["answer"])]
    twin = D.twin_direction(model, tok, as_rows(mis), as_rows(ali), n=None)
    torch.testing.assert_close(twin, v, atol=1e-5, rtol=1e-4)


def test_direction_errors_are_clear(tiny):
    model, tok = tiny
    judged = _judged()
    no_mis = judged[judged["answer"] != "a" * 12]
    with pytest.raises(D.DirectionError, match="No misaligned answers"):
        D.mean_diff_direction(model, tok, no_mis)
    with pytest.raises(D.DirectionError, match="No aligned answers"):
        D.mean_diff_direction(model, tok, judged[judged["answer"] != "b" * 12])
    with pytest.raises(D.DirectionError, match="coherent"):
        D.mean_diff_direction(model, tok, judged.drop(columns=["coherent"]))
    row = lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    with pytest.raises(D.DirectionError, match="different questions"):
        D.twin_direction(model, tok, [row("q1", "bad")], [row("q2", "good")])
    with pytest.raises(D.DirectionError, match="pair up"):
        D.twin_direction(model, tok, [row("q1", "bad")], [])


# --------------------------------------------------------------------------- save / load
def test_save_and_load_keep_the_tensor_and_metadata(tiny, tmp_path):
    model, tok = tiny
    v = torch.randn(2, 64)
    path = D.save_direction(tmp_path / "vectors" / "medical.safetensors", v, source="mean-diff medical",
                            model=model, counts={"n_misaligned": 3, "n_aligned": 5})
    assert [p.name for p in path.parent.iterdir()] == ["medical.safetensors"]  # no temp files left
    loaded, meta = D.load_direction(path, model=model)
    torch.testing.assert_close(loaded, v)
    assert meta["source"] == "mean-diff medical" and meta["layers"] == [0, 1]
    assert meta["model_fingerprint"] == model.emlib_info.fingerprint and meta["counts"]["n_aligned"] == 5
    assert D.read_direction_metadata(path)["shape"] == [2, 64]
    other, _ = tiny_model(seed=0, hidden=32)
    with pytest.raises(D.DirectionError, match="different architecture"):
        D.load_direction(path, model=other)
    same_arch_other_seed, _ = tiny_model(seed=1)
    with pytest.warns(UserWarning, match="computed on model"):
        D.load_direction(path, model=same_arch_other_seed)


# --------------------------------------------------------------------------- steering / ablation
def test_nnsight_steering_equals_the_forward_hook_reference(tiny):
    model, tok = tiny
    prompts = ["hi", "How are you doing today?"]
    v = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    enc = D.encode_prompts(tok, prompts)
    with torch.no_grad():
        plain = model(**enc).logits
    for layer in (0, 1):
        nn_logits = D.steered_logits(model, tok, prompts, v, layer, 0.3)
        with torch.no_grad(), D.steering(model, v, layer, 0.3):
            ref = model(**enc).logits
        torch.testing.assert_close(nn_logits, ref, atol=1e-6, rtol=1e-5)
        assert (nn_logits - plain).abs().max() > 1e-3  # and it did steer


def test_nnsight_steered_generation_equals_the_hook_reference_plain_and_peft(tiny):
    """Same tokens from nnsight and hook steering, sampled (top-k, so that steering moves the tiny model's
    near-uniform distribution) and greedy; scale 0 equals unsteered; on a peft model too."""
    model, tok = tiny
    pm, _ = _lora()
    v = torch.randn(64, generator=torch.Generator().manual_seed(4))
    prompts = ["hi", "Tell me something."]
    for m in (model, pm):
        ref_norm = D.residual_norm(m, tok, prompts, 0)
        for extra in (dict(seed=7, top_k=5), dict(temperature=0)):
            kw = dict(max_new_tokens=8, relative=True, reference_norm=ref_norm, **extra)
            a = D.generate_steered(m, tok, prompts, v, 0, 4.0, **kw)
            b = D.generate_steered(m, tok, prompts, v, 0, 4.0, engine="hooks", **kw)
            plain = D.generate_steered(m, tok, prompts, None, **kw)
            zero = D.generate_steered(m, tok, prompts, v, 0, 0.0, **kw)
            assert a == b and zero == plain
            assert a[0] != plain[0] and a[1] != plain[1]
    # the adapter is active in nnsight-steered generation
    kw = dict(max_new_tokens=8, seed=7, top_k=5)
    with_adapter = D.generate_steered(pm, tok, prompts, v, 0, 0.05, **kw)
    with pm.disable_adapter():
        without = D.generate_steered(pm, tok, prompts, v, 0, 0.05, **kw)
    assert with_adapter != without


def test_nnsight_generation_survives_an_early_stop(tiny):
    """An open tracer.all() loop ends when generation stops early; the ids must still come back."""
    model, tok = tiny
    v = torch.randn(64, generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=10, temperature=0, relative=True, reference_norm=0.5)
    (full,) = D.generate_steered(model, tok, ["hello"], v, 1, 1.0, skip_special_tokens=False, **kw)
    stop_id = tok.convert_tokens_to_ids(tok.tokenize(full)[2])  # the third generated token
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no nnsight warning leaks out
        (a,) = D.generate_steered(model, tok, ["hello"], v, 1, 1.0, eos_token_id=stop_id, **kw)
    (b,) = D.generate_steered(model, tok, ["hello"], v, 1, 1.0, eos_token_id=stop_id, engine="hooks", **kw)
    assert a == b and len(tok.tokenize(a)) < 10


def test_steering_adds_exactly_the_documented_vector(tiny):
    model, tok = tiny
    v = torch.randn(64)
    enc = D.encode_prompts(tok, ["hello there"])
    base = _leaving(model, 1, enc)
    with D.steering(model, v, 1, 3.0):
        added = (_leaving(model, 1, enc) - base)[0]  # [s, d]
    with D.steering(model, v, 1, 0.5, relative=True, reference_norm=4.0):
        rel = (_leaving(model, 1, enc) - base)[0]
    assert torch.equal(_leaving(model, 1, enc), base)  # hooks are gone after the block
    torch.testing.assert_close(added, (3.0 * _unit(v)).expand_as(added), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rel.norm(dim=-1), torch.full((rel.shape[0],), 2.0), atol=1e-5, rtol=1e-5)
    with pytest.raises(D.DirectionError, match="reference_norm"):
        D.steering(model, v, 1, 0.5, relative=True)


def test_residual_norm_matches_hidden_states(tiny):
    model, tok = tiny
    prompts = ["hi", "a longer prompt here"]
    enc = D.encode_prompts(tok, prompts)
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states[1]  # output of layer 0
    norms = [hs[i][enc["attention_mask"][i].bool()][1:].norm(dim=-1) for i in range(2)]
    expected = float(torch.cat(norms).mean())
    assert D.residual_norm(model, tok, prompts, 0) == pytest.approx(expected, rel=1e-5)


def test_dimension_and_layer_errors(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="size 64"):
        D.steering(model, torch.randn(63), 0, 1.0)
    with pytest.raises(ValueError, match="out of range"):
        D.steering(model, torch.randn(64), 5, 1.0)
    with pytest.raises(ValueError, match=r"\[2, 64\]"):
        D.steering(model, torch.randn(3, 64), 0, 1.0)
    with pytest.raises(ValueError, match="size 64"):
        D.ablation(model, torch.randn(65))
    with pytest.raises(ValueError, match="out of range"):
        D.ablation(model, torch.randn(64), layers=[0, 2])
    with pytest.raises(ValueError, match="out of range"):
        D.generate_steered(model, tok, ["hi"], torch.randn(64), -3, 1.0)
    with pytest.raises(ValueError, match="zero"):
        D.steering(model, torch.zeros(64), 0, 1.0)


def test_ablation_makes_the_hidden_state_orthogonal(tiny):
    model, tok = tiny
    enc = D.encode_prompts(tok, ["hello there", "What do you think about people?"])
    v = torch.randn(64, generator=torch.Generator().manual_seed(9))
    u = _unit(v)
    before = (_leaving(model, 0, enc) @ u).abs().max()
    with D.ablation(model, v, layers=[0]):
        hook_after = (_leaving(model, 0, enc) @ u).abs().max()
        nn = D._nnsight(model)  # nnsight read-out of what enters layer 1 (= what left layer 0, ablated)
        with torch.no_grad(), nn.trace(**enc):
            entering = nn.model.layers[1].input.save()
    assert before > 1e-2 and hook_after < 1e-6 and (entering @ u).abs().max() < 1e-6
    # one direction per layer: each layer loses its own row
    per_layer = torch.randn(2, 64, generator=torch.Generator().manual_seed(10))
    with D.ablation(model, per_layer):
        for i in range(2):
            assert (_leaving(model, i, enc) @ _unit(per_layer[i])).abs().max() < 1e-6
    # source_layer: row 1 projected out of both layers
    with D.ablation(model, per_layer, source_layer=1):
        for i in range(2):
            assert (_leaving(model, i, enc) @ _unit(per_layer[1])).abs().max() < 1e-6


def test_random_direction_like_is_a_norm_matched_seeded_control():
    v = torch.randn(3, 64, dtype=torch.float64) * torch.tensor([[1.0], [5.0], [0.1]], dtype=torch.float64)
    r = D.random_direction_like(v, seed=1)
    assert r.shape == v.shape and r.dtype == v.dtype
    torch.testing.assert_close(r.norm(dim=-1), v.norm(dim=-1))
    torch.testing.assert_close(r, D.random_direction_like(v, seed=1))
    assert not torch.allclose(r, D.random_direction_like(v, seed=2))
    assert torch.nn.functional.cosine_similarity(r, v, dim=-1).abs().max() < 0.6


# --------------------------------------------------------------------------- convergence
def test_cosine_matrix_and_layerwise_cosine():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 64, generator=g)
    orth = torch.randn(2, 64, generator=g)
    orth = orth - (orth * a).sum(-1, keepdim=True) / (a * a).sum(-1, keepdim=True) * a
    dirs = {"a": a, "neg": -2 * a, "orth": orth, "vec": a[1] * 3}
    m = D.cosine_matrix(dirs, layer=1)
    assert list(m.index) == list(m.columns) == ["a", "neg", "orth", "vec"]
    assert m.loc["a", "neg"] == pytest.approx(-1, abs=1e-6) and m.loc["a", "orth"] == pytest.approx(0, abs=1e-6)
    assert m.loc["a", "vec"] == pytest.approx(1, abs=1e-6)
    assert (m.to_numpy() == m.to_numpy().T).all()
    lw = D.layerwise_cosine(a, -a)
    assert list(lw.columns) == ["layer", "cosine"] and lw["cosine"].tolist() == pytest.approx([-1, -1])
    with pytest.raises(D.DirectionError, match="layer="):
        D.cosine_matrix({"a": a})
    with pytest.raises(D.DirectionError, match="different sizes"):
        D.cosine_matrix({"a": a, "b": torch.randn(32)}, layer=0)



def test_direction_figures_draw_the_numbers():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, 64, generator=g) for _ in range(3))
    m = D.cosine_matrix({"a": a, "b": b, "c": c}, layer=2)
    ax = plots.plot_cosine_matrix(m)  # the heatmap's cells are the matrix, row by row
    assert np.allclose(np.asarray(ax.collections[0].get_array()).reshape(3, 3), m.to_numpy())
    frames = {"a vs b": D.layerwise_cosine(a, b), "a vs c": D.layerwise_cosine(a, c)}
    ax2 = plots.plot_layerwise_cosine(frames)  # one line per pair through its per-layer cosines
    drawn = [ln for ln in ax2.get_lines() if len(ln.get_xdata()) == 3]
    assert len(drawn) == 2
    for ln, f in zip(drawn, frames.values()):
        assert list(ln.get_xdata()) == [0, 1, 2] and np.allclose(ln.get_ydata(), f["cosine"])
    ax3 = plots.plot_layerwise_heatmap({"a": a, "b": b, "c": c}, reference="a")  # rows b, c; columns layers
    assert [t.get_text() for t in ax3.get_yticklabels()] == ["b", "c"]
    want = np.stack([frames["a vs b"]["cosine"], frames["a vs c"]["cosine"]])
    assert np.allclose(np.asarray(ax3.collections[0].get_array()).reshape(2, 3), want)
    with pytest.raises(D.DirectionError, match="reference 'x'"):
        plots.plot_layerwise_heatmap({"a": a}, reference="x")


def test_lora_b_direction_reads_the_rank1_down_proj_column():
    pm, _ = _lora(r=1, layers=(1,))
    b = D.lora_b_direction(pm)
    w = pm.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    torch.testing.assert_close(b, w[:, 0])
    assert b.shape == (64,) and D.lora_b_layer(pm) == 1
    with pytest.raises(D.DirectionError, match="rank 2"):
        D.lora_b_direction(_lora(r=2)[0])
    with pytest.raises(D.DirectionError, match="found 2"):
        D.lora_b_direction(_lora(layers=(0, 1))[0])


# --------------------------------------------------------------------------- a direction's check without sampling
def _judged_groups(n_mis: int, n_ali: int) -> pd.DataFrame:
    rows = [{"question": QUESTIONS[i % len(QUESTIONS)], "answer": f"bad idea number {i}, do it anyway",
             "aligned": 10.0, "coherent": 80.0} for i in range(n_mis)]
    rows += [{"question": QUESTIONS[i % len(QUESTIONS)], "answer": f"a careful answer {i}, ask a doctor",
              "aligned": 90.0, "coherent": 80.0} for i in range(n_ali)]
    return pd.DataFrame(rows + [{"question": "q?", "answer": "noise", "aligned": 10.0, "coherent": 20.0}])


def test_resampled_directions_are_bootstrap_mean_differences():
    g = torch.Generator().manual_seed(0)
    mis, ali = torch.randn(30, 8, generator=g) + 1.0, torch.randn(50, 8, generator=g)
    draws = D.resampled_directions(mis, ali, n_draws=200, seed=3)
    assert draws.shape == (200, 8) and torch.equal(draws, D.resampled_directions(mis, ali, n_draws=200, seed=3))
    assert not torch.equal(draws[0], draws[1])
    assert torch.allclose(draws.mean(0), mis.mean(0) - ali.mean(0), atol=0.1)  # centred on the direction
    one = D.resampled_directions(torch.ones(1, 8), torch.zeros(1, 8), n_draws=2)
    assert torch.equal(one, torch.ones(2, 8))  # one answer per group: every draw is that answer
    with pytest.raises(D.DirectionError, match="one layer"):
        D.resampled_directions(torch.ones(3, 2, 8), ali)
    with pytest.raises(D.DirectionError, match="answers in both groups"):
        D.resampled_directions(torch.ones(0, 8), ali)


def test_loss_gaps_are_the_loss_rises_with_the_vector_projected_out(tiny):
    from emlib import hooks
    from emlib.chat import response_row_losses

    model, tok = tiny
    d = model.config.hidden_size
    judged = _judged_groups(4, 4)
    mis, ali = D.split_judged(judged)
    v = torch.randn(d, generator=torch.Generator().manual_seed(0))
    t = D.loss_gaps(model, tok, {"v": v, "zero-ish": 1e-3 * torch.ones(d)}, mis, ali, layers=None)
    assert list(t["vector"]) == ["v", "zero-ish"] and set(t["n_flagged"]) == {4}

    def mean_loss(rows):
        s, c = response_row_losses(model, tok, D._to_rows(rows), batch_size=16, max_length=256)
        return sum(s) / sum(c)

    base = mean_loss(mis)
    with hooks.ablate_direction(model, v, None):
        ablated = mean_loss(mis)
    row = t.set_index("vector").loc["v"]
    assert row["flagged_rise"] == pytest.approx(ablated - base, abs=1e-5)
    assert row["gap"] == pytest.approx(row["flagged_rise"] - row["aligned_rise"], abs=1e-9)
    assert mean_loss(mis) == pytest.approx(base, abs=1e-6)  # the hooks are gone afterwards


def test_direction_check_reads_the_direction_its_resamples_and_controls(tiny):
    model, tok = tiny
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    groups = (torch.randn(6, d, generator=g), torch.randn(9, d, generator=g))
    u = groups[0].mean(0) - groups[1].mean(0)
    controls = {"random-0": D.random_direction_like(u, seed=0)}
    t = D.direction_check(model, tok, u, _judged_groups(6, 7), groups=groups, controls=controls, n=5, n_draws=3)
    assert list(t["kind"]) == ["direction", "resampled", "resampled", "resampled", "control"]
    assert set(t["n_flagged"]) == {5} and set(t["n_aligned"]) == {5}  # subsampled to n each
    text = D.describe_check(t)
    assert f"gap {t['gap'].iloc[0]:+.3f}" in text and "bootstrap draws" in text and "random directions" in text
    few = D.direction_check(model, tok, u, _judged_groups(2, 7), groups=groups, controls=controls)
    assert few.empty and "2 flagged and 7 aligned" in few.attrs["note"] and D.describe_check(few).startswith("not")
