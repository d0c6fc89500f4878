"""Claims 4 and 5 made sound: training seeds in the plan, paired per-row / per-draw differences with intervals
that include training-seed variance, the matched-noise mode, and the verdict rules saying each verdict."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from run_tables import make_run

from emlib import adapters as A
from emlib import chapters, results, stats
from emlib import inductive as ind
from emlib import vectors as V
from emlib.models import tiny_model

SV, LORA = "steering vector", "rank-1 LoRA"


_run = make_run


# ----------------------------------------------------------------------------- the plan: training seeds
def test_finetunes_at_extra_seeds_are_planned_for_chapters_4_and_5_only():
    assert chapters.extra_seeds(42, 3) == [43, 44] and chapters.extra_seeds(42, 1) == []
    assert chapters.Finetune("vector", "medical", "narrow", kl_scale=2.0, seed=43).name == "vector-medical-narrow-kl2-seed43"
    assert chapters.Finetune("lora", "medical", "general", "rank1").name == "lora-medical-rank1-general"
    ds, sw = ("medical", "sport"), (0.5, 2.0)
    plain = [f.name for f in chapters.finetunes(ds, sw)]
    seeded = [f.name for f in chapters.finetunes(ds, sw, [43])]
    extra = [n for n in seeded if n not in plain]
    assert [n for n in seeded if n in plain] == plain  # the config seed's plan is unchanged, in order
    # up front only the general solutions; the narrow ones follow chapter 3's choice (chapters.followups)
    assert sorted(extra) == ["lora-medical-rank1-general-seed43", "vector-medical-general-seed43"]
    assert seeded.index("vector-medical-general-seed43") < seeded.index("lora-medical-rank1-narrow")  # slowest first
    follow = chapters.followups("04_efficiency", ds, [43], {"steering vector": 2.0, "rank-1 LoRA": 0.5})
    assert sorted(f.name for f in follow) == ["lora-medical-rank1-narrow-kl0.5-seed43",
                                             "vector-medical-narrow-kl2-seed43"]
    assert chapters.followups("06_pretraining_influence", ds, [43], {"steering vector": 2.0, "rank-1 LoRA": 0.5}) == set()
    for stem in ("04_efficiency", "05_stability"):
        need = chapters.finetunes_needed(stem, ds, sw, [43])
        assert set(extra) <= need <= set(seeded), stem
        assert chapters.finetunes_needed(stem, ds, sw) == need - set(extra)
    for stem in ("03_narrow_needs_kl", "06_pretraining_influence"):
        assert not any(n.endswith("seed43") for n in chapters.finetunes_needed(stem, ds, sw, [43])), stem


# ----------------------------------------------------------------------------- statistics over seeds
def test_paired_diff_seeds_ci_one_seed_is_the_row_bootstrap():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 30), rng.normal(0.0, 1.0, 30)
    one = stats.paired_diff_seeds_ci(a, b, seed=3)
    assert one == stats.paired_diff_ci(a, b, seed=3)
    assert one.lo < one.estimate < one.hi and one.n == 30


def test_paired_diff_seeds_ci_includes_the_seed_variance():
    # rows agree perfectly within a seed, seeds disagree: the row bootstrap alone would be a point at 2
    a = np.array([[1.0] * 5, [2.0] * 5, [3.0] * 5])  # [3 seeds, 5 rows]
    r = stats.paired_diff_seeds_ci(a, np.zeros_like(a))
    half = stats.t_quantile(0.975, 2) * 1.0 / math.sqrt(3)  # sd of the seed means (1, 2, 3) is 1
    assert r.estimate == pytest.approx(2.0)
    assert (r.lo, r.hi) == pytest.approx((2 - half, 2 + half))
    assert r.lo < 0 < r.hi and r.p > 0.05  # 3 seeds of 1, 2, 3 do not establish a positive mean
    # seeds agree, rows vary: the row bootstrap of the seed-averaged differences is the wider part
    rows = np.array([0.5, 1.5, -0.5, 2.5, 1.0])
    b = stats.paired_diff_seeds_ci(np.stack([rows, rows]), np.zeros((2, 5)), seed=1)
    boot = stats.paired_diff_ci(rows, np.zeros(5), seed=1)
    assert (b.lo, b.hi) == pytest.approx((boot.lo, boot.hi)) and b.p == boot.p
    with pytest.raises(ValueError, match="one shape"):
        stats.paired_diff_seeds_ci(np.zeros((2, 3)), np.zeros((3, 2)))


def test_paired_gaps_compare_rows_at_each_norm_within_each_seed():
    recs = []
    for seed, gap in ((0, 0.1), (1, 0.3)):
        for norm in (0.0, 1.0, 2.0):
            for row in range(6):
                base = 2.0 + 0.1 * row - 0.2 * norm
                for sol, loss in (("general", base), ("narrow", base + (gap if norm > 0 else 0.0))):
                    recs.append({"solution": sol, "kind": "grid", "norm": norm, "scale": norm / 2, "row": row,
                                 "loss": loss, "loss_sum": loss * 10, "tokens": 10, "trained_norm": 2.0,
                                 "reference_norm": 2.0, "seed": seed})
    frame = pd.DataFrame(recs)
    g = ind.paired_gaps(frame).set_index("norm")
    assert list(g.index) == [0.0, 1.0, 2.0] and (g["n_seeds"] == 2).all() and (g["n_rows"] == 6).all()
    assert g.loc[0.0, "diff"] == pytest.approx(0.0) and g.loc[2.0, "diff"] == pytest.approx(0.2)
    half = stats.t_quantile(0.975, 1) * np.std([0.1, 0.3], ddof=1) / math.sqrt(2)
    assert (g.loc[2.0, "ci_low"], g.loc[2.0, "ci_high"]) == pytest.approx((0.2 - half, 0.2 + half))
    one = ind.paired_gaps(frame[frame["seed"] == 1]).set_index("norm")
    assert one.loc[1.0, "diff"] == pytest.approx(0.3) and one.loc[1.0, "ci_low"] == pytest.approx(0.3)
    summ = ind.norm_summary(frame, by=("seed",))
    assert len(summ) == 2 * 3 * 2 and summ["loss"].iloc[0] == pytest.approx(np.mean([2.0 + 0.1 * r for r in range(6)]))
    with pytest.raises(ValueError, match="'narrow' and 'general'"):
        ind.paired_gaps(frame[frame["solution"] == "general"])


# ----------------------------------------------------------------------------- on the tiny model
@pytest.fixture(scope="module")
def model_tok():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def rows():
    qs = ["What should I eat?", "Is running safe?", "How do I sleep well?", "Can I skip my pills?"]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "aaa bbb aaa bbb."}]}
            for q in qs]


def _trained_vector(model, tok, rows, steps: int, seed: int) -> V.SteeringVector:
    """A few Adam steps on a steering vector at layer 0, so that it lowers the loss (test setup only)."""
    from emlib.chat import collate, encode_rows, token_losses
    from emlib.hooks import add_vector

    torch.manual_seed(seed)
    v = torch.nn.Parameter(0.1 * torch.randn(model.config.hidden_size))
    opt = torch.optim.Adam([v], lr=0.1)
    batch = collate(encode_rows(rows, tok), tok.pad_token_id)
    for _ in range(steps):
        with add_vector(model, 0, v):
            s, c = token_losses(model, batch)
        opt.zero_grad()
        (s / c).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return V.SteeringVector(v.detach().clone(), 0)


@pytest.fixture(scope="module")
def vecs(model_tok, rows):
    model, tok = model_tok
    return {"general": _trained_vector(model, tok, rows, 25, 0), "narrow": _trained_vector(model, tok, rows, 8, 1)}


def test_row_losses_sum_to_the_loss_vs_norm_frame(model_tok, rows, vecs, tmp_path):
    model, tok = model_tok
    kw = dict(fractions=(0.0, 1.0, 2.0), cache_dir=tmp_path)
    per_row = ind.row_losses_vs_norm(model, tok, rows, vecs, **kw)
    assert len(per_row) == 2 * 4 * len(rows) and set(per_row["row"]) == set(range(len(rows)))
    mean = ind.loss_vs_norm(model, tok, rows, vecs, **kw)
    summ = ind.norm_summary(per_row)
    cols = ["solution", "kind", "norm", "scale", "loss", "efficiency", "trained_norm", "reference_norm"]
    pd.testing.assert_frame_equal(summ[cols], mean[cols], rtol=1e-5)
    # a shared reference: the grid is fractions of it, whatever the solutions' own norms
    shared = ind.row_losses_vs_norm(model, tok, rows, vecs, reference=10.0, **kw)
    assert sorted(set(shared[shared["kind"] == "grid"]["norm"])) == pytest.approx([0.0, 10.0, 20.0])
    assert (ind.loss_vs_norm(model, tok, rows, vecs, reference=10.0, **kw)["reference_norm"] == 10.0).all()
    with pytest.raises(ValueError, match="reference"):
        ind.loss_vs_norm(model, tok, rows, vecs, reference=0.0, **kw)


def test_orthogonal_noise_is_the_relative_draw_without_the_shrink():
    x = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 0.6
    noised = V.orthogonal_noise(x, eps * float(x.norm()), torch.Generator().manual_seed(5))
    rel = V.orthogonal_perturbation(x, eps, torch.Generator().manual_seed(5))
    assert torch.allclose(noised - rel, (1 - math.sqrt(1 - eps ** 2)) * x, atol=1e-10)
    n = V.orthogonal_noise(x, 3.0, torch.Generator().manual_seed(1)) - x
    assert float(n.norm()) == pytest.approx(3.0) and abs(float(n @ x)) < 1e-8


def test_noised_lora_adds_orthogonal_noise_of_the_given_norms_and_restores(model_tok):
    import copy

    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(model_tok[0]), LoraConfig(r=1, lora_alpha=4, target_modules=["down_proj"]))
    torch.manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    mods = A.lora_modules(pm)
    before = {m.name: (m.A.detach().clone(), m.B.detach().clone()) for m in mods}
    targets = {k: 0.5 + i for i, k in enumerate(A.matrix_norms(pm))}
    with A.noised(pm, targets, torch.Generator().manual_seed(3)):
        for m in mods:
            a0, b0 = before[m.name]
            na, nb = m.A.detach() - a0, m.B.detach() - b0
            assert float(na.norm()) == pytest.approx(targets[f"{m.name}.A"], rel=1e-4)
            assert m.scaling * float(nb.norm()) == pytest.approx(targets[f"{m.name}.B"], rel=1e-4)
            assert abs(float((na * a0).sum())) < 1e-4 * float(a0.norm()) * float(na.norm())
    for m in mods:
        assert torch.equal(m.A.detach(), before[m.name][0]) and torch.equal(m.B.detach(), before[m.name][1])
    with pytest.raises(KeyError, match="no noise norm"):
        with A.noised(pm, {}, torch.Generator()):
            pass


def test_matched_noise_gives_both_solutions_the_general_ones_norm(model_tok, rows, vecs, tmp_path):
    model, tok = model_tok
    kw = dict(eps_grid=(0.0, 0.5), n_seeds=3, cache_dir=tmp_path)
    rel = ind.stability_losses(model, tok, rows, vecs, **kw)
    assert rel.equals(ind.stability_losses(model, tok, rows, vecs, noise="relative", **kw))  # the default
    matched = ind.stability_losses(model, tok, rows, vecs, noise="matched", **kw)
    e0 = matched[matched["eps"] == 0]
    assert (e0["loss"] == e0["loss_orig"]).all()
    assert vecs["general"].norm > 1.2 * vecs["narrow"].norm  # so the two modes differ for the narrow vector
    m5, r5 = (f[(f["eps"] == 0.5) & (f["solution"] == "narrow")] for f in (matched, rel))
    assert (m5["loss"].to_numpy() != r5["loss"].to_numpy()).all()
    g = torch.Generator().manual_seed(0)  # draw k = 0 of the narrow vector in the matched mode, by hand
    by_hand = V.SteeringVector(V.orthogonal_noise(vecs["narrow"].effective, 0.5 * vecs["general"].norm, g), 0)
    with by_hand.apply(model):
        from emlib.chat import response_loss

        want = response_loss(model, tok, rows)
    assert float(m5[m5["seed"] == 0]["loss"].iloc[0]) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="reference solution 'base'"):
        ind.stability_losses(model, tok, rows, vecs, noise="matched", reference="base", **kw)
    with pytest.raises(ValueError, match="noise must be one of"):
        ind.stability_losses(model, tok, rows, vecs, noise="absolute", **kw)
    # over training seeds: the curves and the paired difference
    raw = pd.concat([rel.assign(train_seed=0, kind=SV, mode="relative"),
                     matched.assign(train_seed=0, kind=SV, mode="matched")], ignore_index=True)
    curves = ind.seed_curves(raw, by=("kind", "mode"))
    paired = ind.paired_stability(raw, by=("kind", "mode"))
    assert len(curves) == 2 * 2 * 2 and set(paired["mode"]) == {"relative", "matched"}
    p = paired.set_index(["mode", "eps"])
    for mode, f in (("relative", rel), ("matched", matched)):
        w = f[f["eps"] == 0.5].pivot_table(index="seed", columns="solution", values="normalised")
        assert p.loc[(mode, 0.5), "diff"] == pytest.approx(float((w["narrow"] - w["general"]).mean()))
        assert p.loc[(mode, 0.5), "n_draws"] == 3


# ----------------------------------------------------------------------------- claim 4's rule, every verdict
def _ch4(lows: dict[str, list[float]], n_seeds: int = 3) -> list[dict]:
    """ch4_paired records: per kind, one norm per value of ``lows`` (the CI's lower end), norm 0 first."""
    recs = []
    for kind, lo in lows.items():
        for i, low in enumerate([-0.01, *lo]):
            recs.append({"kind": kind, "norm": float(i), "scale": i / 2, "diff": low + 0.02, "ci_low": low,
                         "ci_high": low + 0.04, "p": 0.01 if low > 0 else 0.4, "n_rows": 100, "n_seeds": n_seeds})
    return recs


def test_claim_efficiency_paired_says_each_verdict(tmp_path):
    yes, no = [0.01] * 4, [-0.01] * 4
    v = results.claim_efficiency(_run(tmp_path, "a", {"ch4_paired": _ch4({SV: yes, LORA: yes})}))
    assert v.verdict == results.REPRODUCED and v.checks == {SV: 1.0, LORA: 1.0}
    assert "general lower (paired 95% CI of narrow - general above 0) at 4 of 4 non-zero grid norms" in v.ours
    assert "3 training seeds" in v.ours
    # one norm of one kind not separated: no longer every norm -> partly
    v = results.claim_efficiency(_run(tmp_path, "b", {"ch4_paired": _ch4({SV: yes, LORA: [0.01, 0.01, 0.01, -0.01]})}))
    assert v.verdict == results.PARTLY and v.checks[LORA] == 0.75
    v = results.claim_efficiency(_run(tmp_path, "c", {"ch4_paired": _ch4({SV: [0.01, 0.01, 0.01, -0.01], LORA: no})}))
    assert v.verdict == results.PARTLY
    v = results.claim_efficiency(_run(tmp_path, "d", {"ch4_paired": _ch4({SV: [0.01, 0.01, -0.01, -0.01], LORA: no})}))
    assert v.verdict == results.NOT_REPRODUCED  # half the norms is not "most"
    v = results.claim_efficiency(_run(tmp_path, "e", {"ch4_paired": _ch4({SV: yes})}))
    assert v.verdict == results.PARTLY  # one kind only can never reproduce
    v = results.claim_efficiency(_run(tmp_path, "f", {"ch4_paired": [r for r in _ch4({SV: yes}) if r["norm"] == 0]}))
    assert v.verdict == results.NOT_RUN
    # the norm-0 point (the base model for both) never counts, whatever its numbers
    recs = _ch4({SV: yes, LORA: yes})
    recs[0].update(ci_low=-1.0, ci_high=-0.5)
    assert results.claim_efficiency(_run(tmp_path, "g", {"ch4_paired": recs})).verdict == results.REPRODUCED


def test_claim_efficiency_without_paired_rows_keeps_the_old_rule(tmp_path):
    rows = [{"solution": s, "family": SV, "kind": "grid", "norm": n, "loss": 3 - (0.3 if s == "general" else 0.1) * n,
             "trained_norm": 9.0} for s in ("general", "narrow") for n in (0.0, 1.0, 2.0)]
    v = results.claim_efficiency(_run(tmp_path, "a", {}, {"ch4_loss_vs_norm": pd.DataFrame(rows)}))
    assert v.verdict == results.PARTLY and "general lower at 2 of 2 norms" in v.ours
    assert results.claim_efficiency(_run(tmp_path, "b", {})).verdict == results.NOT_RUN


# ----------------------------------------------------------------------------- claim 5's rule, every verdict
EPS = (0.0, 0.2, 0.5, 1.0)


def _ch5(p: dict, diff: dict | None = None, still: tuple = ()) -> dict:
    """ch5_paired and ch5_stability for both kinds and modes. ``p[(kind, mode)]``: p-values at EPS (eps 0
    included); ``diff`` the sign of the difference (default +1); ``still``: (kind, mode, eps) where neither
    solution's curve moves beyond its noise."""
    paired, curves = [], []
    for kind in (SV, LORA):
        for mode in ("relative", "matched"):
            ps = p.get((kind, mode), [1.0] * len(EPS))
            sign = (diff or {}).get((kind, mode), 1.0)
            for e, pv in zip(EPS, ps):
                d = sign * (5.0 if pv < 0.05 else 1.0)
                paired.append({"kind": kind, "mode": mode, "eps": e, "diff": d, "ci_low": d - 2, "ci_high": d + 2,
                               "p": pv, "n_draws": 30, "n_seeds": 3})
                for sol in ("general", "narrow"):
                    lo = -1.0 if (kind, mode, e) in still or e == 0 else 1.0
                    curves.append({"kind": kind, "mode": mode, "solution": sol, "eps": e, "normalised": lo + 1,
                                   "ci_low": lo, "ci_high": lo + 2})
    return {"ch5_paired": paired, "ch5_stability": curves}


ALL = [(k, m) for k in (SV, LORA) for m in ("relative", "matched")]
SIG = [1.0, 0.001, 0.001, 1.0]  # significant at eps 0.2 and 0.5


def test_claim_stability_paired_says_each_verdict(tmp_path):
    v = results.claim_stability(_run(tmp_path, "a", _ch5({km: SIG for km in ALL})))
    assert v.verdict == results.REPRODUCED and set(v.checks.values()) == {"supports"} and len(v.checks) == 4
    # the relative mode supports it, the matched mode shows no difference -> partly
    v = results.claim_stability(_run(tmp_path, "b", _ch5({(SV, "relative"): SIG, (LORA, "relative"): SIG})))
    assert v.verdict == results.PARTLY and v.checks[f"{SV} / matched"] == "no difference"
    # significant in the wrong direction -> opposite, and nothing supports -> not reproduced
    v = results.claim_stability(_run(tmp_path, "c", _ch5({km: SIG for km in ALL}, diff={km: -1.0 for km in ALL})))
    assert v.verdict == results.NOT_REPRODUCED and set(v.checks.values()) == {"opposite"}
    # above at one eps but significantly below at another: opposite, not support
    v = results.claim_stability(_run(tmp_path, "d", _ch5({(SV, "relative"): SIG}, diff={})))
    assert v.verdict == results.PARTLY
    mixed = _ch5({(SV, "relative"): SIG})
    next(r for r in mixed["ch5_paired"] if (r["kind"], r["mode"], r["eps"]) == (SV, "relative", 0.5)).update(diff=-5.0)
    v = results.claim_stability(_run(tmp_path, "e", mixed))
    assert v.checks[f"{SV} / relative"] == "opposite" and v.verdict == results.NOT_REPRODUCED
    assert results.claim_stability(_run(tmp_path, "f", {})).verdict == results.NOT_RUN
    v = results.claim_stability(_run(tmp_path, "g", {"ch5_paired": [], "ch5_stability": []}))
    assert v.verdict == results.NOT_REPRODUCED and "undefined" in v.ours  # no solution lowered the loss


def test_claim_stability_ignores_eps_where_nothing_moves_and_corrects_for_many(tmp_path):
    # the only significant eps is one where neither solution's loss moves beyond its noise: ignored
    still = tuple((k, m, e) for k, m in ALL for e in (0.2, 0.5))
    v = results.claim_stability(_run(tmp_path, "a", _ch5({km: SIG for km in ALL}, still=still)))
    assert v.verdict == results.NOT_REPRODUCED
    assert v.checks == {f"{SV} / relative": "no signal", f"{SV} / matched": "no difference",  # eps 1 counts there
                        f"{LORA} / relative": "no signal", f"{LORA} / matched": "no difference"}
    v = results.claim_stability(_run(tmp_path, "b", _ch5({km: SIG for km in ALL}, still=still[:1])))
    assert v.verdict == results.REPRODUCED  # eps 0.5 still counts
    # Holm over the remaining eps: p = 0.03 at two eps is not significant (0.06 in the relative mode, 0.09 over
    # the matched mode's three eps); p = 0.015 at one of them is (0.03 and 0.045)
    v = results.claim_stability(_run(tmp_path, "c", _ch5({km: [1.0, 0.03, 0.03, 1.0] for km in ALL})))
    assert set(v.checks.values()) == {"no difference"} and v.verdict == results.NOT_REPRODUCED
    v = results.claim_stability(_run(tmp_path, "d", _ch5({km: [1.0, 0.015, 0.9, 0.9] for km in ALL})))
    assert v.verdict == results.REPRODUCED
    v = results.claim_stability(_run(tmp_path, "d2", _ch5({km: [1.0, 0.02, 0.9, 0.9] for km in ALL})))
    assert v.verdict == results.PARTLY  # 0.02 x 3 = 0.06 over the matched mode's eps
    # eps = 1 leaves nothing of the solution in the relative mode: it does not count there, it does when matched
    at1 = [1.0, 0.9, 0.9, 0.001]
    v = results.claim_stability(_run(tmp_path, "e", _ch5({km: at1 for km in ALL})))
    assert {k: s for k, s in v.checks.items()} == {f"{SV} / relative": "no difference", f"{SV} / matched": "supports",
                                                   f"{LORA} / relative": "no difference",
                                                   f"{LORA} / matched": "supports"}
    assert v.verdict == results.PARTLY


def test_claim_stability_without_paired_rows_keeps_the_old_rule(tmp_path):
    curve = [{"solution": s, "kind": SV, "eps": e, "normalised": 10 * e + (5 if s == "narrow" else 0),
              "ci_low": 10 * e + (5 if s == "narrow" else 0) - 1, "ci_high": 10 * e + (5 if s == "narrow" else 0) + 1}
             for s in ("general", "narrow") for e in (0.0, 0.5, 1.0)]
    v = results.claim_stability(_run(tmp_path, "a", {"ch5_stability": curve}))
    assert v.checks == {SV: "supports"} and v.verdict == results.PARTLY
