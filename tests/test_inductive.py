"""Inductive-bias metrics on the tiny model: rescaling, perturbation, loss-vs-norm, stability, KL, cache,
their figures, and chapter 4's table as the results table reads it."""
import json
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import to_rgba

from emlib import adapters as A
from emlib import plots, results
from emlib import vectors as V
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


def _series(ax) -> dict[str, tuple[list[float], list[float]]]:
    """What seaborn drew per hue: {legend label: (x, y) of the data line in that legend entry's colour}."""
    legend = {ln.get_label(): to_rgba(ln.get_color()) for ln in ax.lines if len(ln.get_xdata()) == 0}
    drawn = [ln for ln in ax.lines if len(ln.get_xdata()) > 0]
    return {lab: next((list(map(float, ln.get_xdata())), list(map(float, ln.get_ydata())))
                      for ln in drawn if to_rgba(ln.get_color()) == c) for lab, c in legend.items()}


def _assert_drawn(ax, frame: pd.DataFrame, x: str, y: str) -> None:
    """One line per solution, through exactly the frame's (x, y) points of that solution."""
    got = _series(ax)
    assert sorted(got) == sorted(frame["solution"].unique())
    for name, g in frame.groupby("solution"):
        g = g.sort_values(x)
        assert np.allclose(got[name][0], g[x]) and np.allclose(got[name][1], g[y]), name


# ----------------------------------------------------------------------------- rescaling
def test_rescale_vector_hits_target_on_a_copy():
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    for target in (0.3, 1.0, 7.5, 123.0):
        y = V.rescale_to_norm(x, target)
        assert abs(float(y.norm()) - target) <= 1e-5 * target
        assert torch.nn.functional.cosine_similarity(x, y, dim=0) > 1 - 1e-6
    assert float(V.rescale_to_norm(x, 0.0).norm()) == 0.0
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="zero tensor"):
        V.rescale_to_norm(torch.zeros(4), 1.0)


def test_rescaled_lora_hits_target_and_restores(adapters):
    _, models = adapters
    pm = models["general"]
    orig = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    norms = A.module_norms(pm)
    assert len(norms) == 4 and all(v > 0 for v in norms.values())
    # the norm really is ||scaling * B A||_F
    mod = A.lora_modules(pm)[0]
    assert math.isclose(float((mod.scaling * mod.B @ mod.A).detach().norm()), norms[mod.name], rel_tol=1e-5)
    assert math.isclose(A.norm(pm), math.sqrt(sum(v * v for v in norms.values())), rel_tol=1e-12)
    assert math.isclose(A.mean_module_norm(pm), sum(norms.values()) / 4, rel_tol=1e-12)
    for target in (0.01, 0.5, 3.0):
        with A.rescaled(pm, target):
            got = A.module_norms(pm)
            assert all(abs(v - target) <= 1e-5 * target for v in got.values())
        with A.rescaled(pm, target, per="adapter"):
            assert abs(A.norm(pm) - target) <= 1e-5 * target
    for n, p in pm.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, orig[n])


# ----------------------------------------------------------------------------- perturbation
@pytest.mark.parametrize("shape", [(64,), (8, 16)])
def test_orthogonal_perturbation_keeps_norm_and_angle(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    for eps in (0.01, 0.1, 0.5, 0.9, 1.0):
        y = V.orthogonal_perturbation(x, eps, torch.Generator().manual_seed(7))
        assert y.shape == x.shape
        assert abs(float(y.norm()) - float(x.norm())) <= 1e-5 * float(x.norm())
        cos = float((x.flatten() @ y.flatten()) / (x.norm() * y.norm()))
        assert abs(cos - math.sqrt(1 - eps ** 2)) <= 1e-5
    assert torch.equal(V.orthogonal_perturbation(x, 0.0, torch.Generator().manual_seed(1)), x)
    a = V.orthogonal_perturbation(x, 0.5, torch.Generator().manual_seed(5))
    b = V.orthogonal_perturbation(x, 0.5, torch.Generator().manual_seed(5))
    c = V.orthogonal_perturbation(x, 0.5, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        V.orthogonal_perturbation(x, 1.5)


def test_perturbed_lora_each_matrix_and_restores(adapters):
    _, models = adapters
    pm = models["narrow"]
    mods = A.lora_modules(pm)
    before = [(m.A.clone(), m.B.clone()) for m in mods]
    with A.perturbed(pm, 0.3, torch.Generator().manual_seed(0)):
        for m, old_ab in zip(mods, before):
            for new, old in zip((m.A, m.B), old_ab):
                assert abs(float(new.norm()) - float(old.norm())) <= 1e-5 * float(old.norm())
                cos = float((new.flatten() @ old.flatten()) / (new.norm() * old.norm()))
                assert abs(cos - math.sqrt(1 - 0.09)) < 1e-5
    for m, (a, b) in zip(mods, before):
        assert torch.equal(m.A, a) and torch.equal(m.B, b)


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
    # the figure: one line per solution through its grid points, a star at each trained point
    ax = plots.plot_loss_vs_norm(df)
    _assert_drawn(ax, df[df.kind == "grid"], "norm", "loss")
    stars = ax.collections[-1].get_offsets()
    assert np.allclose(stars, df[df.kind == "trained"][["norm", "loss"]].to_numpy())


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
    assert math.isclose(trained.loc["narrow", "norm"], A.mean_module_norm(models["narrow"]), rel_tol=1e-6)
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
    # the figure: one line per solution through its mean, its band from ci_low to ci_high, the 100 % line
    ax = plots.plot_stability(summ)
    _assert_drawn(ax, summ, "eps", "normalised")
    bands = [c for c in ax.collections if len(c.get_paths()) and abs(c.get_alpha() or 0) == 0.15]
    assert len(bands) == 2
    for band, (_, g) in zip(bands, summ.groupby("solution")):
        pts = {(round(float(x), 9), round(float(y), 9)) for x, y in band.get_paths()[0].vertices}
        want = {(round(e, 9), round(v, 9)) for e, lo, hi in zip(g.eps, g.ci_low, g.ci_high) for v in (lo, hi)}
        assert want <= pts
    assert any(list(ln.get_ydata()) == [100, 100] for ln in ax.lines)


def test_stability_lora_eps0(model_tok, rows, adapters, tmp_path):
    model, tok = model_tok
    raw = ind.stability_losses(model, tok, rows, adapters[0], eps_grid=(0.0, 1.0), n_seeds=2, cache_dir=tmp_path)
    e0 = raw[raw.eps == 0.0]
    assert (e0["loss"] == e0["loss_orig"]).all()
    assert (raw[raw.eps == 1.0]["loss"] != raw[raw.eps == 1.0]["loss_orig"]).all()


def test_stability_eps0_takes_no_forward_pass(model_tok, rows, vectors, tmp_path, monkeypatch):
    """At eps = 0 neither mode changes the solution, so its draws are the unperturbed loss without a forward pass:
    one pass for the base model, one per solution unperturbed, one per (solution, eps > 0, draw)."""
    from emlib.inductive import stability

    model, tok = model_tok
    calls = []
    real = stability.response_loss
    monkeypatch.setattr(stability, "response_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    for noise in stability.NOISE_MODES:
        calls.clear()
        raw = ind.stability_losses(model, tok, rows, vectors, eps_grid=(0.0, 0.5, 1.0), n_seeds=3, layer=LAYER,
                                   noise=noise, cache_dir=tmp_path)
        assert len(calls) == 1 + 2 * (1 + 2 * 3)
        e0 = raw[raw.eps == 0.0]
        assert len(e0) == 2 * 3 and (e0["loss"] == e0["loss_orig"]).all() and (e0["normalised"] == 0).all()


@pytest.mark.parametrize("kind", ["vectors", "adapters"])
@pytest.mark.parametrize("noise", ["relative", "matched"])
def test_stability_keeps_each_solution_apart(model_tok, rows, vectors, adapters, kind, noise, tmp_path, monkeypatch):
    """One cache entry per solution: the general solution measured alone (chapter 5 does so before chapter 3
    has chosen the narrow one) is read, not measured again, when the pair is asked for, and the pair's frame is
    the one measured in one go."""
    from emlib.inductive import stability

    model, tok = model_tok
    sols = vectors if kind == "vectors" else adapters[0]
    kw = dict(eps_grid=(0.0, 0.5), n_seeds=2, noise=noise, **({"layer": LAYER} if kind == "vectors" else {}))
    whole = ind.stability_losses(model, tok, rows, sols, cache_dir=tmp_path / "whole", **kw)
    calls = []
    real = stability.response_loss
    monkeypatch.setattr(stability, "response_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    alone = ind.stability_losses(model, tok, rows, {"general": sols["general"]}, cache_dir=tmp_path, **kw)
    assert len(calls) == 1 + 1 + 2  # the base model, the solution, its two draws at eps 0.5
    pd.testing.assert_frame_equal(alone, whole[whole.solution == "general"].reset_index(drop=True))
    calls.clear()
    pair = ind.stability_losses(model, tok, rows, sols, cache_dir=tmp_path, **kw)
    assert len(calls) == 1 + 1 + 2  # the narrow solution only
    pd.testing.assert_frame_equal(pair, whole)
    calls.clear()
    renamed = ind.stability_losses(model, tok, rows, {"a": sols["general"]}, cache_dir=tmp_path,
                                   **{**kw, "reference": "a"})
    assert not calls and (renamed.solution == "a").all()  # the same solution under another name: read


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
    _assert_drawn(plots.plot_pretraining_kl(df), df, "norm", "kl")


def test_pretraining_kl_matches_direct_computation(model_tok, vectors, tmp_path):
    model, tok = model_tok
    v = vectors["narrow"]
    df = ind.pretraining_kl(model, tok, TEXTS[:1], v, layer=LAYER, norms=(3.0,), include_random=False,
                            cache_dir=tmp_path)
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        p = torch.log_softmax(model(ids).logits, -1)
        with add_vector(model, LAYER, V.rescale_to_norm(v, 3.0)):
            q = torch.log_softmax(model(ids).logits, -1)
    direct = float((p.exp() * (p - q)).sum(-1).mean())
    assert math.isclose(df["kl"].iloc[0], direct, rel_tol=1e-5)


# ----------------------------------------------------------------------------- cache
def test_cache_returns_same_frame_without_recomputation(model_tok, rows, vectors, tmp_path):
    model, tok = model_tok
    calls = {"n": 0}
    # the decoder runs in every forward (the metrics call it directly and apply the LM head themselves)
    h = model.get_decoder().register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
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


def test_vector_files_as_solutions(tmp_path):
    v = torch.randn(64, generator=torch.Generator().manual_seed(2))
    V.save_vector(tmp_path / "run" / "vector.safetensors", v, layer=1, alpha=4.0)
    for src in (tmp_path / "run" / "vector.safetensors", tmp_path / "run",
                V.load_vector(tmp_path / "run")):
        sol = ind.load_solution(src)
        assert sol.layer == 1 and torch.allclose(sol.effective, 4.0 * v)  # what is added: alpha * v
    with pytest.raises(ValueError, match="trained at layer 1"):
        ind.load_solution(tmp_path / "run", layer=0)


# ----------------------------------------------------------------------------- chapter 4's table and its verdict
def _frame(losses: dict[str, list[float]], trained: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """A loss_vs_norm-shaped frame on the grid norms 0, 1, 2, 3 (trained: solution -> (norm, loss))."""
    recs = [{"solution": s, "kind": "grid", "norm": float(n), "loss": l, "trained_norm": trained[s][0]}
            for s, ls in losses.items() for n, l in enumerate(ls)]
    recs += [{"solution": s, "kind": "trained", "norm": n, "loss": l, "trained_norm": n} for s, (n, l) in trained.items()]
    return pd.DataFrame(recs)


def _run(tmp_path, table: pd.DataFrame) -> results.Run:
    (tmp_path / "tables").mkdir(parents=True, exist_ok=True)
    (tmp_path / "results.json").write_text(json.dumps({}))
    table.to_csv(tmp_path / "tables" / "ch4_loss_vs_norm.csv", index=False)
    return results.Run(tmp_path)


def test_ch4_table_keeps_kind_and_the_verdict_reads_it(tmp_path):
    # the narrow vector's trained norm is exactly the grid norm 2: still a grid point, and counted
    vec = _frame({"general": [3.0, 2.0, 1.5, 1.2], "narrow": [3.0, 2.5, 2.2, 2.0]},
                 {"general": (1.5, 1.8), "narrow": (2.0, 2.1)})
    lora = _frame({"general": [3.0, 2.0, 2.6, 1.2], "narrow": [3.0, 2.5, 2.2, 2.0]},
                  {"general": (1.4, 1.9), "narrow": (0.7, 2.8)})
    table = ind.by_family({"steering vector": vec, "rank-1 LoRA": lora})
    assert set(table["kind"]) == {"grid", "trained"}  # not overwritten by the family
    assert table.groupby("family")["kind"].value_counts().to_dict() == {
        ("rank-1 LoRA", "grid"): 8, ("rank-1 LoRA", "trained"): 2,
        ("steering vector", "grid"): 8, ("steering vector", "trained"): 2}
    v = results.claim_efficiency(_run(tmp_path, table))
    assert v.checks == {"rank-1 LoRA": pytest.approx(2 / 3), "steering vector": 1.0}
    assert "steering vector: general lower at 3 of 3 norms" in v.ours and v.verdict == results.PARTLY
    with pytest.raises(ValueError, match="family"):
        ind.by_family({"steering vector": table})


def test_ch4_tables_of_old_runs_still_read(tmp_path):
    """Tables written before the family column held the family in ``kind``; trained rows are then told by norm
    (so the grid norm equal to the narrow vector's trained norm is left out, as the rule did then)."""
    vec = _frame({"general": [3.0, 2.0, 1.5, 1.2], "narrow": [3.0, 2.5, 2.2, 2.0]},
                 {"general": (1.5, 1.8), "narrow": (2.0, 2.1)})
    old = vec.assign(kind="steering vector")
    v = results.claim_efficiency(_run(tmp_path, old))
    assert v.checks == {"steering vector": 1.0}
    assert "general lower at 2 of 2 norms" in v.ours
