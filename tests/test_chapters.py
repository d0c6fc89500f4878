"""The chapter contract (emlib.chapters): needs, recorded keys, and each verdict rule producing each verdict."""
import json

import pandas as pd
import pytest
from run_tables import make_run

from emlib import chapters, record, results

DATASETS = ("medical", "financial", "sport")


_run = make_run


def test_every_claim_chapter_needs_planned_finetunes():
    planned = {f.name for f in chapters.finetunes(DATASETS)}
    for ch in chapters.CHAPTERS.values():
        need = chapters.finetunes_needed(ch.stem, DATASETS)
        assert need <= planned, ch.stem
        assert bool(need) == (ch.claim is not None), ch.stem  # every claim chapter trains something; 00 nothing
    assert chapters.finetunes_needed("02_one_direction", DATASETS) == {
        "lora-medical-rank32-general", "lora-financial-rank32-general", "lora-sport-rank32-general"}
    assert chapters.finetunes_needed("03_narrow_needs_kl", ("medical",)) == {
        "vector-medical-general", "vector-medical-narrow", "vector-medical-drift", "vector-medical-mixed",
        "lora-medical-rank1-general", "lora-medical-rank1-narrow"}
    # the run of record's planner is the contract's
    assert record.chapter_needs("04_efficiency", DATASETS) == chapters.finetunes_needed("04_efficiency", DATASETS)
    assert [f.name for f in chapters.finetunes(("medical",))][0] == "vector-medical-mixed"  # slowest first


def test_chapter_lookup_and_its_error():
    assert chapters.chapter(4).stem == "04_efficiency"
    assert chapters.chapter("notebooks/06_pretraining_influence.py").claim == 6
    assert chapters.by_claim(2).stem == "02_one_direction"
    with pytest.raises(KeyError, match="the chapters are 00_datasets"):
        chapters.chapter(9)
    assert chapters.CLAIMS == (1, 2, 3, 4, 5, 6)


@pytest.mark.parametrize("run_dir", ["record/smollm2-135m", "record/qwen2.5-coder-0.5b"])
def test_committed_records_hold_what_each_chapter_promises(root, run_dir):
    res = json.loads((root / run_dir / "results.json").read_text())
    problems = [p for ch in chapters.CHAPTERS.values() if ch.results for p in chapters.check_recorded(ch.stem, res)]
    assert problems == []
    for ch in chapters.CHAPTERS.values():
        for t in ch.tables:
            assert (root / run_dir / "tables" / f"{t}.csv").exists(), (ch.stem, t)


def test_check_recorded_names_a_missing_key_and_column():
    res = {"ch4_efficiency": [{"solution": "general", "kind": "grid"}]}
    assert chapters.check_recorded("04_efficiency", res) == ["04_efficiency: 'ch4_efficiency' lacks column(s) trained_loss",
                                                             "04_efficiency: results.json has no 'ch4_paired'"]
    assert chapters.check_recorded("05_stability", {}) == ["05_stability: results.json has no 'ch5_stability'",
                                                           "05_stability: results.json has no 'ch5_paired'"]
    old = {"timings": {"date_utc": "2026-11-30 10:00"}, "ch5_stability": [
        {"kind": "k", "solution": "s", "eps": 0.1, "normalised": 1, "ci_low": 0, "ci_high": 2}]}
    assert chapters.check_recorded("05_stability", old) == []  # a run made before ch5_paired existed


def test_verdicts_of_the_table_are_the_contracts(root):
    run = results.Run(root / "record" / "smollm2-135m")
    table = [v.verdict for v in results.verdicts(run)]
    assert table == [chapters.verdict(c, root / "record" / "smollm2-135m").verdict for c in chapters.CLAIMS]
    assert str(chapters.verdict(6, run)).startswith("Claim 6 (General matters more to pretraining), by the results")


# ------------------------------------------------------------------ claim 3's rule, every verdict
def _ch3(kl_general, kl_narrow, em_in, em_gen, drift=None, mixed=None):
    def row(cond, set_name, em, kl):
        return {"condition": cond, "set": set_name, "em": em, "ci_low": max(0.0, em - 0.02),
                "ci_high": min(1.0, em + 0.02), "n": 400, "out-of-domain KL": kl}
    rows = [row("vector general", s, 0.2, kl_general) for s in ("in_domain", "general")]
    rows += [row("vector narrow", "in_domain", em_in, kl_narrow), row("vector narrow", "general", em_gen, kl_narrow)]
    if drift is not None:
        rows += [row("vector drift", "general", 0.1, drift)]
    if mixed is not None:
        rows += [row("vector mixed", "general", 0.1, mixed)]
    return {"ch3_narrow_vs_general": rows}


def test_claim_narrow_rule_gives_each_verdict(tmp_path):
    v = results.claim_narrow(_run(tmp_path, "a", _ch3(1.0, 0.1, 0.30, 0.02, drift=0.8, mixed=0.9)))
    assert v.verdict == results.REPRODUCED
    assert v.checks == {"vector_kl": True, "vector_in_domain_em": True, "drift_to_general": True,
                        "mixed_not_narrow": True}
    # KL kept low, but the narrow solution is not misaligned in-domain more than on general questions
    assert results.claim_narrow(_run(tmp_path, "b", _ch3(1.0, 0.1, 0.02, 0.02))).verdict == results.PARTLY
    # in-domain EM, but the KL is not below a quarter of the general one's
    assert results.claim_narrow(_run(tmp_path, "c", _ch3(1.0, 0.5, 0.30, 0.02))).verdict == results.PARTLY
    assert results.claim_narrow(_run(tmp_path, "d", _ch3(1.0, 0.5, 0.02, 0.02))).verdict == results.NOT_REPRODUCED
    assert results.claim_narrow(_run(tmp_path, "e", {})).verdict == results.NOT_RUN
    # drift and mixing are reported, and they do not decide the verdict (issue 17 changes that)
    v = results.claim_narrow(_run(tmp_path, "f", _ch3(1.0, 0.1, 0.30, 0.02, drift=0.2, mixed=0.2)))
    assert v.verdict == results.REPRODUCED and v.checks["drift_to_general"] is False


def test_an_em_claim_verdict_passes_the_judge_gate(tmp_path):
    """chapters.verdict applies the gate to EM claims only: a judge with low recall voids a negative claim 1,
    never claim 4."""
    em = {"ch1_em": [{"condition": "chat model", "em": 0.0, "ci_low": 0.0, "ci_high": 0.01, "n": 400},
                     {"condition": "medical rank1", "em": 0.01, "ci_low": 0.0, "ci_high": 0.02, "n": 400}],
          "judge_agreement": [{"judge": "some-judge", "pairs": results.GENERAL_PAIRS, "auroc": 0.9, "n": 50,
                               "auroc_ci_low": 0.8, "auroc_ci_high": 1.0, "em_recall": 0.1,
                               "em_false_positive": 0.0}],
          "ch1_scores": [{"condition": "chat model", "mean_aligned": 90.0, "mean_coherent": 90.0}]}
    lv = pd.DataFrame({"kind": ["grid"] * 4, "solution": ["general", "narrow"] * 2, "norm": [1.0, 1.0, 2.0, 2.0],
                       "trained_norm": [5.0] * 4, "loss": [1.0, 2.0, 1.0, 2.0]})
    run = _run(tmp_path, "g", em, {"ch4_loss_vs_norm": lv})
    assert results.claim_em(run).verdict == results.NOT_REPRODUCED
    v1 = chapters.verdict(1, run)  # the judge catches 10% of EM: a negative verdict cannot stand
    assert v1.verdict == results.INCONCLUSIVE and v1.checks["rule_verdict"] == results.NOT_REPRODUCED
    assert chapters.verdict(4, run).verdict == results.claim_efficiency(run).verdict == results.PARTLY


def test_em_tables_group_as_the_contract_says():
    scored = pd.DataFrame({"scale": [0.0, 0.0, 1.0, 1.0], "aligned": [90.0, 80.0, 10.0, 90.0],
                           "coherent": [90.0, 90.0, 90.0, 90.0], "question_id": ["a", "b", "a", "b"]})
    t = chapters.em_tables("ch2_steering", scored)["ch2_steering"].set_index("scale")
    assert t.loc[1.0, "em"] == 0.5 and t.loc[0.0, "em"] == 0.0 and t.loc[1.0, "aligned"] == 50.0
    with pytest.raises(ValueError, match="finetune, ablated"):
        chapters.em_tables("ch2_ablation", scored)
    with pytest.raises(KeyError, match="the chapters store ch1"):
        chapters.em_tables("ch9", scored)


# ------------------------------------------------------------------ claim 2's rule, every verdict
def _rate(k, n=400, **extra):
    from emlib.stats import wilson

    lo, hi = wilson(k, n)
    return {"em": k / n, "ci_low": lo, "ci_high": hi, "n": n, "n_em": k, **extra}


def _ch2(steer_top=40, direction_em=4, random_em=(30, 35, 38), cosine=0.8, percentiles=(0.99, 0.99, 0.99)):
    steer = [_rate(2, scale=0.0), _rate(10, scale=0.1), _rate(steer_top, scale=0.3)]
    abl = []
    for ft in ("medical", "sport"):
        abl += [_rate(40, finetune=ft, ablated="none"), _rate(direction_em, finetune=ft, ablated="direction")]
        abl += [_rate(k, finetune=ft, ablated=f"random-{i}") for i, k in enumerate(random_em)]
    names = ("medical", "financial", "sport")
    cos = {a: {b: (1.0 if a == b else cosine) for b in names} for a in names}
    null = [{"pair": p, "cosine": cosine, "percentile": q, "n_draws": 200}
            for p, q in zip(("medical / financial", "medical / sport", "financial / sport"), percentiles)]
    info = [{"dataset": d, "n_judged": 1200, "n_misaligned": 60, "n_aligned": 700, "rounds": 3,
             "source": "mean-diff" if d != "sport" else "fallback: twin data"} for d in names]
    return {"ch2_steering": steer, "ch2_ablation": abl, "ch2_cosine": cos, "ch2_cosine_null": null,
            "ch2_directions": info}


def test_claim_direction_rule_gives_each_verdict(tmp_path):
    v = results.claim_direction(_run(tmp_path, "a", _ch2()))
    assert v.verdict == results.REPRODUCED, v.ours
    assert v.checks["fallbacks"] == ["sport"] and "twin-data fallback for sport" in v.ours
    assert "3 random: mean 8.6%" in v.ours and "3 of 3 pairs above the 95th percentile of 200" in v.ours
    # one pair inside its null: the cosine component fails although the mean cosine is 0.8
    v = results.claim_direction(_run(tmp_path, "b", _ch2(percentiles=(0.99, 0.90, 0.99))))
    assert v.verdict == results.PARTLY and v.checks["cosine"] is False and v.checks["ablation"] is True
    # a random direction removes as much EM as the direction: ablation fails; steering too weak: fails
    v = results.claim_direction(_run(tmp_path, "c", _ch2(steer_top=4, direction_em=4, random_em=(3, 30, 30),
                                                         cosine=0.2)))
    assert v.verdict == results.NOT_REPRODUCED, v.checks
    assert results.claim_direction(_run(tmp_path, "d", {})).verdict == results.NOT_RUN


def test_claim_direction_steering_is_holm_corrected(tmp_path):
    """6 of 400 vs 1 of 400 has Fisher p ~ 0.12 alone: no scale passes, with or without the correction;
    20 of 400 (p < 0.001) passes even after multiplying by the number of scales."""
    steer = [_rate(1, scale=0.0)] + [_rate(6, scale=s) for s in (0.1, 0.2, 0.3)]
    v = results.claim_direction(_run(tmp_path, "e", {"ch2_steering": steer}))
    assert v.checks["steering"] is False
    steer[-1] = _rate(20, scale=0.3)
    assert results.claim_direction(_run(tmp_path, "f", {"ch2_steering": steer})).checks["steering"] is True


def test_claim_direction_names_the_strongest_steering_above_scale_0(tmp_path):
    """Scale 0 is the unsteered model (chapter 2 reads it from chapter 1's answers): the text reports the highest
    EM among the scales above 0, also when scale 0 happened to draw more EM."""
    steer = [_rate(9, scale=0.0), _rate(4, scale=0.1), _rate(6, scale=0.3)]
    v = results.claim_direction(_run(tmp_path, "g", {"ch2_steering": steer}))
    assert "max EM 1.5% [0.7, 3.2] at 0.3x the residual norm vs 2.2% [1.2, 4.2] unsteered" in v.ours, v.ours
    steer = [_rate(9, scale=0.0), _rate(0, scale=0.1), _rate(0, scale=0.3)]
    v = results.claim_direction(_run(tmp_path, "h", {"ch2_steering": steer}))
    assert "0% EM at every scale above 0 up to 0.3x the residual norm vs 2.2%" in v.ours, v.ours


def test_the_lambda_sweep_is_planned_for_chapters_3_to_6():
    names = chapters.finetunes_needed("03_narrow_needs_kl", ("medical",), (0.5, 2.0))
    assert {"vector-medical-narrow-kl0.5", "vector-medical-narrow-kl2", "lora-medical-rank1-narrow-kl0.5",
            "vector-medical-narrow", "vector-medical-drift"} <= names
    # chapter 4 uses chapter 3's reported narrow solution, which the sweep decides: it waits for every lambda
    assert "lora-medical-rank1-narrow-kl2" in chapters.finetunes_needed("04_efficiency", ("medical",), (0.5, 2.0))
    plan = [f.name for f in chapters.finetunes(("medical", "sport"), (0.5, 2.0))]
    assert len(plan) == len(set(plan)) and names <= set(plan)


# ------------------------------------------------------------------ claim 3 with a lambda sweep, every verdict
def _sweep_run(learned=(0.9, 0.5), narrow_kl=0.05, em_in=120, drift_kl=0.8, drift_cos=0.9, mixed_kl=0.9,
               mixed_cos=0.95):
    recs = []
    for kind in ("steering vector", "rank-1 LoRA"):
        recs.append({"kind": kind, "solution": "general", "kl_scale": 1.0, "heldout_kl": 1.0, "train_kl": 1.0,
                     "loss": 1.0, "learned_share": 1.0, "chosen": False})
        for m, share in zip((1.0, 4.0), learned):
            recs.append({"kind": kind, "solution": "narrow", "kl_scale": m, "heldout_kl": narrow_kl * m,
                         "train_kl": narrow_kl * m / 2, "loss": 2.0 - share, "learned_share": share,
                         "chosen": share >= 0.8 and m == 1.0})
        if kind == "steering vector":
            recs += [{"kind": kind, "solution": s, "kl_scale": 1.0, "heldout_kl": k, "train_kl": k, "loss": 1.1,
                      "learned_share": 0.95, "chosen": False} for s, k in (("drift", drift_kl), ("mixed", mixed_kl))]
    table = []
    for short in ("vector", "rank-1"):
        table += [{"condition": f"{short} narrow", "set": "in_domain", **_rate(em_in)},
                  {"condition": f"{short} narrow", "set": "general", **_rate(4)}]
    cos = [{"kind": "steering vector", "solution": s, "kl_scale": 1.0, "cosine_with_general": c}
           for s, c in (("narrow", 0.3), ("drift", drift_cos), ("mixed", mixed_cos))]
    return {"ch3_lambda_sweep": recs, "ch3_narrow_vs_general": table, "ch3_cosines": cos}


def test_claim_narrow_sweep_rule_gives_each_verdict(tmp_path):
    v = results.claim_narrow(_run(tmp_path, "a", _sweep_run()))
    assert v.verdict == results.REPRODUCED, v.ours
    assert "narrow at lambda x1 keeps 90% of the loss reduction" in v.ours
    # no lambda learned the task: the narrow solution is a non-answer whatever its KL
    v = results.claim_narrow(_run(tmp_path, "b", _sweep_run(learned=(0.3, 0.2))))
    assert v.verdict in (results.PARTLY, results.NOT_REPRODUCED) and v.checks["vector_learned"] is False
    assert "no lambda keeps 80%" in v.ours
    # learned, narrow and misaligned in-domain, but drift does not move towards the general solution
    v = results.claim_narrow(_run(tmp_path, "c", _sweep_run(drift_cos=0.1)))
    assert v.verdict == results.PARTLY and v.checks["drift_to_general"] is False
    v = results.claim_narrow(_run(tmp_path, "d", _sweep_run(learned=(0.3, 0.2), drift_kl=0.01, drift_cos=0.1,
                                                            mixed_kl=0.01, mixed_cos=0.1)))
    assert v.verdict == results.NOT_REPRODUCED, v.checks


# ------------------------------------------------------------------ claim 6 with the random null, every verdict
def _ch6(percentiles=(0.99, 0.99, 0.99), narrow_gap=0.05):
    norms = (1.0, 2.0, 3.0)
    kl = [{"solution": s, "norm": n, "kl": k, "ci_low": k - 0.001, "ci_high": k + 0.001}
          for n in (0.0, *norms) for s, k in (("general", 0.1 * n), ("narrow", 0.1 * n - narrow_gap * (n > 0)))]
    null = [{"norm": n, "solution": "general", "kl": 0.1 * n, "n_draws": 200, "null_mean": 0.05 * n,
             "null_p95": 0.08 * n, "null_max": 0.09 * n, "percentile": q} for n, q in zip(norms, percentiles)]
    corpus = {"source": "offline", "name": "the Lee news corpus (ABC news articles of 2001-2002, not web text)",
              "n_docs": 50, "doc_tokens": 512}
    return {"ch6_pretraining_kl": kl, "ch6_random_null": null, "ch6_corpus": corpus}


def test_claim_pretraining_null_rule_gives_each_verdict(tmp_path):
    v = results.claim_pretraining(_run(tmp_path, "a", _ch6()))
    assert v.verdict == results.REPRODUCED and "not web text" in v.ours and "200 random directions at 3 of 3" in v.ours
    v = results.claim_pretraining(_run(tmp_path, "b", _ch6(percentiles=(0.99, 0.5, 0.99))))
    assert v.verdict == results.PARTLY and v.checks == {"random": 2 / 3, "narrow": 1.0}
    v = results.claim_pretraining(_run(tmp_path, "c", _ch6(percentiles=(0.5, 0.6, 0.99), narrow_gap=-0.05)))
    assert v.verdict == results.NOT_REPRODUCED, v.checks
    # an old record (one random vector, no null) keeps the old rule
    old = [r for r in _ch6()["ch6_pretraining_kl"]] + [{"solution": "random", "norm": n, "kl": 0.0, "ci_low": 0.0,
                                                          "ci_high": 0.001} for n in (0.0, 1.0, 2.0, 3.0)]
    assert results.claim_pretraining(_run(tmp_path, "d", {"ch6_pretraining_kl": old})).verdict == results.REPRODUCED


def test_claim_em_is_holm_corrected_over_the_finetunes(tmp_path):
    """11 of 400 vs 1 of 400: the Wilson intervals separate (Fisher p = 0.006); over 2 finetunes Holm keeps
    them, over 20 it does not (0.006 x 20 > 0.05): "some finetune is above the chat model" is any of K."""
    def run(name, k):
        rows = [{"condition": "chat model", **_rate(1)}] + [{"condition": f"ft{i}", **_rate(11)} for i in range(k)]
        return _run(tmp_path, name, {"ch1_em": rows})

    two, twenty = results.claim_em(run("a", 2)), results.claim_em(run("b", 20))
    assert len(two.checks["separated"]) == 2 and "Holm-corrected" in two.ours
    assert twenty.checks["separated"] == [] and twenty.verdict == results.NOT_REPRODUCED  # 2.8%: under 5%, not separated
    assert two.verdict == results.PARTLY  # separated but under 5%


def test_every_chapter_prints_its_own_claims_verdict_by_the_contract(root):
    """The chapter-6 printout once counted by its own rule ("6 of 10") where the table said "5 of 10": every
    claim chapter now prints exp.verdict(its claim), and nothing else calls a verdict."""
    import re

    for ch in chapters.CHAPTERS.values():
        src = (root / "notebooks" / f"{ch.stem}.py").read_text()
        calls = re.findall(r"exp\.verdict\((\d+)\)", src)
        assert calls == ([str(ch.claim)] if ch.claim else []), ch.stem


def test_a_chapter_stopped_part_way_is_not_run_not_judged_by_an_older_rule(tmp_path):
    """Chapter 6 killed after its KL table but before its null (a run of record that ran out of time): the
    contract sees the missing key and the verdict says so, instead of the one-random-vector rule judging it."""
    made = {"timings": {"date_utc": "2026-12-04 10:00"}}
    part = {**made, **{k: v for k, v in _ch6().items() if k != "ch6_random_null"}}
    v = chapters.verdict(6, _run(tmp_path, "part", part))
    assert v.verdict == results.NOT_RUN and "did not finish" in v.ours and "'ch6_random_null'" in v.ours
    assert chapters.verdict(6, _run(tmp_path, "whole", {**made, **_ch6()})).verdict == results.REPRODUCED
    assert chapters.verdict(6, _run(tmp_path, "none", made)).verdict == results.NOT_RUN  # never started


def test_a_finetune_is_read_back_from_its_name(tmp_path):
    """``Finetune.from_name`` inverts ``.name`` for every finetune of the paper profile's plan, chapter 3's possible
    follow-ups and speculative ones included; a name it cannot read is refused with an example."""
    plan = record.plan_run("paper", str(tmp_path / "rec"), speculate=False)
    jobs = set(plan.finetunes) | set(chapters.speculative(("medical",), (0.1, 0.3, 3.0, 10.0), (1, 2)))
    for stem in ("04_efficiency", "05_stability"):
        jobs |= chapters.followups(stem, ("medical",), (1, 2), {"steering vector": 0.3, "rank-1 LoRA": 10.0})
    assert len(jobs) > 20
    for job in jobs:
        assert chapters.Finetune.from_name(job.name) == job
    for bad in ("adapter-medical-rank1-general", "lora-medical-rank1", "vector-medical-narrow-seedX"):
        with pytest.raises(ValueError, match="Not a finetune name"):
            chapters.Finetune.from_name(bad)
