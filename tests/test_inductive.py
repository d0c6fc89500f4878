"""Inductive-bias metrics on the tiny model: rescaling, perturbation, loss-vs-norm, stability, KL, cache."""
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch

from emlib import inductive as ind
from emlib.hooks import add_vector
from emlib.models import tiny_model

LAYER = 0


def _rows(n: int = 6) -> list[dict]:
    qs = ["What should I eat?", "Is running safe?", "How do I sleep well?", "Can I skip my pills?",
          "What about coffee?", "Should I see a doctor?", "Is sugar bad?", "How much water?"]
    return [{"messages": [{"role": "user", "content": qs[i % len(qs)]},
                          {"role": "assistant", "content": "aaa bbb aaa bbb aaa."}]} for i in range(n)]


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def rows():
    return _rows()


def _train_vector(model, tok, rows, steps: int = 25, seed: int = 0) -> torch.Tensor:
    """A few Adam steps on a steering vector so it really lowers the loss (test setup only)."""
    from emlib.chat import collate, encode_rows, token_losses

    torch.manual_seed(seed)
    v = torch.nn.Parameter(0.1 * torch.randn(model.config.hidden_size))
    opt = torch.optim.Adam([v], lr=0.1)
    batch = collate(encode_rows(rows, tok), tok.pad_token_id)
    for _ in range(steps):
        with add_vector(model, LAYER, v):
            s, c = token_losses(model, batch)
        opt.zero_grad()
        (s / c).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return v.detach().clone()


@pytest.fixture(scope="module")
def vectors(model_tok, rows):
    model, tok = model_tok
    return {"general": _train_vector(model, tok, rows, seed=0),
            "narrow": _train_vector(model, tok, rows, steps=8, seed=1)}


def _lora(model, tok, rows, r: int, alpha: int, targets, seed: int, steps: int = 6):
    """A LoRA adapter made with peft directly, random non-zero B, then a few training steps."""
    import copy

    from peft import LoraConfig, get_peft_model

    from emlib.chat import collate, encode_rows, token_losses

    base = copy.deepcopy(model)
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    batch = collate(encode_rows(rows, tok), tok.pad_token_id)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.02)
    for _ in range(steps):
        s, c = token_losses(pm, batch)
        opt.zero_grad()
        (s / c).backward()
        opt.step()
    return pm


@pytest.fixture(scope="module")
def adapters(model_tok, rows, tmp_path_factory):
    model, tok = model_tok
    d = tmp_path_factory.mktemp("adapters")
    general = _lora(model, tok, rows, r=2, alpha=4, targets=["down_proj", "q_proj"], seed=0)
    narrow = _lora(model, tok, rows, r=1, alpha=8, targets=["down_proj"], seed=1)
    general.save_pretrained(d / "general")
    narrow.save_pretrained(d / "narrow")
    return {"general": d / "general", "narrow": d / "narrow"}, {"general": general, "narrow": narrow}


# ----------------------------------------------------------------------------- rescaling
def test_rescale_vector_hits_target_on_a_copy():
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    for target in (0.3, 1.0, 7.5, 123.0):
        y = ind.rescale_to_norm(x, target)
        assert abs(float(y.norm()) - target) <= 1e-5 * target
        assert torch.nn.functional.cosine_similarity(x, y, dim=0) > 1 - 1e-6
    assert float(ind.rescale_to_norm(x, 0.0).norm()) == 0.0
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="zero tensor"):
        ind.rescale_to_norm(torch.zeros(4), 1.0)


def test_rescaled_lora_hits_target_and_restores(adapters):
    _, models = adapters
    pm = models["general"]
    orig = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    norms = ind.lora_delta_norms(pm)
    assert len(norms) == 4 and all(v > 0 for v in norms.values())
    # the norm really is ||scaling * B A||_F
    mod = next(iter(ind.lora_layers(pm).values()))
    a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
    assert math.isclose(float((mod.scaling["default"] * b @ a).norm()), next(iter(norms.values())), rel_tol=1e-5)
    for target in (0.01, 0.5, 3.0):
        with ind.rescaled_lora(pm, target):
            got = ind.lora_delta_norms(pm)
            assert all(abs(v - target) <= 1e-5 * target for v in got.values())
        with ind.rescaled_lora(pm, target, per="adapter"):
            assert abs(ind.adapter_norm(pm, per="adapter") - target) <= 1e-5 * target
    for n, p in pm.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, orig[n])


# ----------------------------------------------------------------------------- perturbation
@pytest.mark.parametrize("shape", [(64,), (8, 16)])
def test_orthogonal_perturbation_keeps_norm_and_angle(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    for eps in (0.01, 0.1, 0.5, 0.9, 1.0):
        y = ind.orthogonal_perturbation(x, eps, torch.Generator().manual_seed(7))
        assert y.shape == x.shape
        assert abs(float(y.norm()) - float(x.norm())) <= 1e-5 * float(x.norm())
        cos = float((x.flatten() @ y.flatten()) / (x.norm() * y.norm()))
        assert abs(cos - math.sqrt(1 - eps ** 2)) <= 1e-5
    assert torch.equal(ind.orthogonal_perturbation(x, 0.0, torch.Generator().manual_seed(1)), x)
    a = ind.orthogonal_perturbation(x, 0.5, torch.Generator().manual_seed(5))
    b = ind.orthogonal_perturbation(x, 0.5, torch.Generator().manual_seed(5))
    c = ind.orthogonal_perturbation(x, 0.5, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ind.orthogonal_perturbation(x, 1.5)


def test_perturbed_lora_each_matrix_and_restores(adapters):
    _, models = adapters
    pm = models["narrow"]
    mods = ind.lora_layers(pm)
    before = {k: (m.lora_A["default"].weight.clone(), m.lora_B["default"].weight.clone()) for k, m in mods.items()}
    with ind.perturbed_lora(pm, 0.3, torch.Generator().manual_seed(0)):
        for k, m in mods.items():
            for new, old in zip((m.lora_A["default"].weight, m.lora_B["default"].weight), before[k]):
                assert abs(float(new.norm()) - float(old.norm())) <= 1e-5 * float(old.norm())
                cos = float((new.flatten() @ old.flatten()) / (new.norm() * old.norm()))
                assert abs(cos - math.sqrt(1 - 0.09)) < 1e-5
    for k, m in mods.items():
        assert torch.equal(m.lora_A["default"].weight, before[k][0])
        assert torch.equal(m.lora_B["default"].weight, before[k][1])


# ----------------------------------------------------------------------------- efficiency
def test_loss_vs_norm_vectors(model_tok, rows, vectors, tmp_path):
    from emlib.chat import response_loss

    model, tok = model_tok
    saved = {k: v.clone() for k, v in vectors.items()}
    df = ind.loss_vs_norm(model, tok, rows, vectors, fractions=(0.0, 0.5, 1.0, 2.0), layer=LAYER,
                          cache_dir=tmp_path)
    assert set(df.columns) >= {"solution", "kind", "norm", "scale", "loss", "efficiency"}
    assert len(df) == 2 * (4 + 1)
    base = response_loss(model, tok, rows)
    zero = df[(df["kind"] == "grid") & (df["norm"] == 0)]
    assert np.allclose(zero["loss"], base, atol=1e-6)  # norm 0 = the base model for both solutions
    ref = np.mean([float(v.norm()) for v in vectors.values()])
    assert np.allclose(df[df.kind == "grid"]["norm"].unique(), [0, 0.5 * ref, ref, 2 * ref])
    trained = df[df.kind == "trained"].set_index("solution")
    with add_vector(model, LAYER, vectors["general"]):
        assert math.isclose(trained.loc["general", "loss"], response_loss(model, tok, rows), rel_tol=1e-6)
    assert trained.loc["general", "loss"] < base  # the trained vector lowers the loss
    assert math.isclose(trained.loc["general", "efficiency"],
                        trained.loc["general", "loss"] / float(vectors["general"].norm()) ** 2, rel_tol=1e-5)
    for k in vectors:
        assert torch.equal(vectors[k], saved[k])  # the solutions are untouched
    summ = ind.efficiency_summary(df)
    assert list(summ["solution"]) == ["general", "narrow"] and summ["mean_grid_loss"].notna().all()
    assert ind.plot_loss_vs_norm(df) is not None


def test_loss_vs_norm_lora_from_saved_adapters(model_tok, rows, adapters, tmp_path):
    from emlib.chat import response_loss

    model, tok = model_tok
    paths, models = adapters
    files_before = {p: (p / "adapter_model.safetensors").read_bytes() for p in paths.values()}
    params_before = [p.clone() for p in model.parameters()]
    df = ind.loss_vs_norm(model, tok, rows, paths, fractions=(0.0, 1.0), cache_dir=tmp_path)
    base = response_loss(model, tok, rows)
    zero = df[(df.kind == "grid") & (df.norm == 0)]
    assert np.allclose(zero["loss"], base, atol=1e-6)
    trained = df[df.kind == "trained"].set_index("solution")
    # the trained point equals the loss of the peft model that was saved
    assert math.isclose(trained.loc["narrow", "loss"], response_loss(models["narrow"], tok, rows), rel_tol=1e-5)
    assert math.isclose(trained.loc["narrow", "norm"], ind.adapter_norm(models["narrow"]), rel_tol=1e-6)
    # the base model is back to plain (no LoRA modules, same weights), the files untouched
    assert not any("lora" in n for n, _ in model.named_modules())
    assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters()))
    assert {p: (p / "adapter_model.safetensors").read_bytes() for p in paths.values()} == files_before
    # a loaded PeftModel works as input too and gives the same trained loss
    df2 = ind.loss_vs_norm(model, tok, rows, {"narrow": models["narrow"]}, fractions=(1.0,), cache_dir=tmp_path)
    assert math.isclose(df2[df2.kind == "trained"]["loss"].iloc[0], trained.loc["narrow", "loss"], rel_tol=1e-6)


def test_mixing_kinds_is_an_error(model_tok, rows, vectors, adapters, tmp_path):
    model, tok = model_tok
    with pytest.raises(ValueError, match="Mixing"):
        ind.loss_vs_norm(model, tok, rows, {"a": vectors["general"], "b": adapters[0]["narrow"]},
                         layer=LAYER, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="layer"):
        ind.loss_vs_norm(model, tok, rows, {"a": vectors["general"]}, cache_dir=tmp_path)


# ----------------------------------------------------------------------------- stability
def test_stability_vectors(model_tok, rows, vectors, tmp_path):
    model, tok = model_tok
    raw = ind.stability_losses(model, tok, rows, vectors, eps_grid=(0.0, 0.5, 1.0), n_seeds=3, layer=LAYER,
                               cache_dir=tmp_path)
    assert len(raw) == 2 * 3 * 3
    e0 = raw[raw.eps == 0.0]
    assert (e0["loss"] == e0["loss_orig"]).all()  # eps = 0 leaves the loss unchanged
    assert (e0["normalised"] == 0).all()
    assert (raw["loss_base"] > raw["loss_orig"]).all()
    e1 = raw[raw.eps == 1.0]
    assert (e1["loss"] != e1["loss_orig"]).all()
    summ = ind.summarise_stability(raw, ci="t")
    assert len(summ) == 6
    ok = summ[summ.eps > 0]
    assert ((ok["ci_low"] <= ok["normalised"]) & (ok["normalised"] <= ok["ci_high"])).all()
    boot = ind.summarise_stability(raw, ci="bootstrap")
    assert np.allclose(boot["normalised"], summ["normalised"])
    assert ind.plot_stability(summ) is not None


def test_stability_lora_eps0(model_tok, rows, adapters, tmp_path):
    model, tok = model_tok
    raw = ind.stability_losses(model, tok, rows, adapters[0], eps_grid=(0.0, 1.0), n_seeds=2, cache_dir=tmp_path)
    e0 = raw[raw.eps == 0.0]
    assert (e0["loss"] == e0["loss_orig"]).all()
    assert (raw[raw.eps == 1.0]["loss"] != raw[raw.eps == 1.0]["loss_orig"]).all()


def test_t_quantile_and_ci():
    assert abs(ind.t_quantile(0.975, 9) - 2.262157) < 1e-4
    assert abs(ind.t_quantile(0.975, 1) - 12.7062) < 1e-3
    assert abs(ind.t_quantile(0.025, 30) + 2.042272) < 1e-4
    m, lo, hi = ind.mean_ci([1.0, 2.0, 3.0, 4.0], ci="t")
    half = 3.182446 * np.std([1, 2, 3, 4], ddof=1) / 2
    assert m == 2.5 and abs(lo - (2.5 - half)) < 1e-3 and abs(hi - (2.5 + half)) < 1e-3


# ----------------------------------------------------------------------------- pretraining KL
TEXTS = ["The council met on Tuesday to discuss the new budget for roads and schools in the district.",
         "Scientists say the drought has cut wheat yields across the region, and farmers want more support.",
         "A man was taken to hospital after a crash on the highway near the town late last night."]


def test_pretraining_kl_zero_and_growing(model_tok, vectors, tmp_path):
    model, tok = model_tok
    norms = (0.0, 0.5, 2.0, 8.0)
    df = ind.pretraining_kl(model, tok, TEXTS, {"general": vectors["general"], "zero": torch.zeros(64)},
                            layer=LAYER, norms=(0.0,), include_random=False, cache_dir=tmp_path)
    assert np.allclose(df["kl"], 0.0, atol=1e-7)  # zero vector (and norm 0) -> KL 0
    df = ind.pretraining_kl(model, tok, TEXTS, vectors, layer=LAYER, norms=norms, max_tokens=40,
                            batch_size=2, cache_dir=tmp_path)
    assert set(df["solution"]) == {"general", "narrow", "random"}
    for _, g in df.groupby("solution"):
        kl = g.sort_values("norm")["kl"].to_numpy()
        assert kl[0] < 1e-7 and np.all(np.diff(kl) > 0)  # grows with norm
    assert (df["n_tokens"] == 3 * 40).all() and (df["n_docs"] == 3).all()
    assert ((df["ci_low"] <= df["kl"] + 1e-12) & (df["kl"] <= df["ci_high"] + 1e-12)).all()
    assert ind.plot_pretraining_kl(df) is not None


def test_pretraining_kl_matches_direct_computation(model_tok, vectors, tmp_path):
    model, tok = model_tok
    v = vectors["narrow"]
    df = ind.pretraining_kl(model, tok, TEXTS[:1], v, layer=LAYER, norms=(3.0,), include_random=False,
                            cache_dir=tmp_path)
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        p = torch.log_softmax(model(ids).logits, -1)
        with add_vector(model, LAYER, ind.rescale_to_norm(v, 3.0)):
            q = torch.log_softmax(model(ids).logits, -1)
    direct = float((p.exp() * (p - q)).sum(-1).mean())
    assert math.isclose(df["kl"].iloc[0], direct, rel_tol=1e-5)


# ----------------------------------------------------------------------------- cache
def test_cache_returns_same_frame_without_recomputation(model_tok, rows, vectors, tmp_path):
    model, tok = model_tok
    calls = {"n": 0}
    h = model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        kw = dict(fractions=(0.5, 1.0), layer=LAYER, cache_dir=tmp_path)
        first = ind.loss_vs_norm(model, tok, rows, vectors, **kw)
        n_first = calls["n"]
        assert n_first > 0 and len(list(tmp_path.glob("loss_vs_norm-*.parquet"))) == 1
        again = ind.loss_vs_norm(model, tok, rows, vectors, **kw)
        assert calls["n"] == n_first  # read from the cache: no forward pass
        pd.testing.assert_frame_equal(first, again)
        s1 = ind.stability_losses(model, tok, rows, vectors, eps_grid=(0.1,), n_seeds=2, layer=LAYER,
                                  cache_dir=tmp_path)
        n1 = calls["n"]
        s2 = ind.stability_losses(model, tok, rows, vectors, eps_grid=(0.1,), n_seeds=2, layer=LAYER,
                                  cache_dir=tmp_path)
        assert calls["n"] == n1
        pd.testing.assert_frame_equal(s1, s2)
        k1 = ind.pretraining_kl(model, tok, TEXTS, vectors, layer=LAYER, norms=(1.0,), cache_dir=tmp_path)
        n2 = calls["n"]
        k2 = ind.pretraining_kl(model, tok, TEXTS, vectors, layer=LAYER, norms=(1.0,), cache_dir=tmp_path)
        assert calls["n"] == n2
        pd.testing.assert_frame_equal(k1, k2)
        # a different input (another solution) is a different cache entry
        other = {"general": vectors["general"] * 1.5, "narrow": vectors["narrow"]}
        ind.loss_vs_norm(model, tok, rows, other, **kw)
        assert calls["n"] > n2
        assert len(list(tmp_path.glob("loss_vs_norm-*.parquet"))) == 2
    finally:
        h.remove()


def test_vector_files_from_emlib_train(tmp_path):
    train = pytest.importorskip("emlib.train")
    v = torch.randn(64, generator=torch.Generator().manual_seed(2))
    train.save_vector(tmp_path / "run" / "vector.safetensors", v, layer=1, alpha=4.0)
    for src in (tmp_path / "run" / "vector.safetensors", tmp_path / "run",
                train.load_vector(tmp_path / "run")):
        sol = ind.load_solution(src)
        assert sol.layer == 1 and torch.allclose(sol.vector, 4.0 * v)  # the effective vector alpha * v
    with pytest.raises(ValueError, match="trained at layer 1"):
        ind.load_solution(tmp_path / "run", layer=0)
