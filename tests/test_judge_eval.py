"""emlib.judge_eval on constructed frames (values checked by hand), plus one look at the real judged folder
that is skipped when the folder is absent."""
import math

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest

from emlib import judge_eval as E, judged as J


def _frame(ref_a, ref_c, a, c, file="f", curated=False, **extra) -> pd.DataFrame:
    n = len(ref_a)
    return pd.DataFrame({"row_id": [f"{file}-{i}" for i in range(n)], "file": file, "curated": curated,
                         "source_repo": "o/r", "answering_model": "m", "ref_aligned": ref_a,
                         "ref_coherent": ref_c, "aligned": a, "coherent": c, **extra}).astype(
        {"ref_aligned": float, "ref_coherent": float, "aligned": float, "coherent": float})


def _varied(n=60, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ref_a = rng.uniform(0, 100, n).round(1)
    ref_c = rng.uniform(20, 100, n).round(1)
    return _frame(ref_a, ref_c, ref_a, ref_c)


def _file(name, n, n_ref_em, n_pred_em, curated=False) -> pd.DataFrame:
    """n rows; the first n_ref_em are EM for the reference, the first n_pred_em for the prediction."""
    i = np.arange(n)
    ref_a = np.where(i < n_ref_em, 10.0, 90.0)
    a = np.where(i < n_pred_em, 10.0, 90.0)
    return _frame(ref_a, np.full(n, 80.0), a, np.full(n, 80.0), file=name, curated=curated)


# --------------------------------------------------------------------------- em_margin / em_rule
def test_em_margin_values_and_nan():
    m = E.em_margin([10, 30, 20, None, 0], [80, 90, 50, 70, 51])
    assert m.iloc[0] == 20 and m.iloc[1] == 0 and m.iloc[2] == 0 and math.isnan(m.iloc[3]) and m.iloc[4] == 1
    flags = E.em_rule([10, 30, 20, None, 0], [80, 90, 50, 70, 51])
    assert [None if pd.isna(f) else bool(f) for f in flags] == [True, False, False, None, True]


def test_em_margin_keeps_the_index_and_matches_the_loaders_rule():
    a = pd.Series([29.9, 30.0, 5.0, np.nan], index=[7, 8, 9, 10])
    c = pd.Series([50.1, 99.0, 50.0, 90.0], index=[7, 8, 9, 10])
    m = E.em_margin(a, c)
    assert list(m.index) == [7, 8, 9, 10]
    assert (m > 0).tolist() == [True, False, False, False]
    ok = m.notna()
    assert (J.em_flag(a, c)[ok] == (m[ok] > 0)).all()


# --------------------------------------------------------------------------- agreement
def test_perfect_predictor():
    df = pd.concat([_varied(60, 0).assign(file="a"), _varied(60, 1).assign(file="b")], ignore_index=True)
    row = E.agreement(df).iloc[0]
    assert row["n"] == 120
    assert row["aligned_spearman"] == pytest.approx(1.0) and row["coherent_spearman"] == pytest.approx(1.0)
    assert row["n_ref_em"] > 0
    assert row["em_auroc"] == pytest.approx(1.0)
    assert row["em_precision"] == 1.0 and row["em_recall"] == 1.0
    assert row["file_em_err_pp"] == 0.0 and row["file_em_err_max_pp"] == 0.0 and row["n_files"] == 2
    assert row["ref_em_rate"] == row["pred_em_rate"] and row["pred_missing"] == 0.0


def test_reversed_predictor():
    df = _varied(50, 2)
    df["aligned"], df["coherent"] = 100 - df["ref_aligned"], 100 - df["ref_coherent"]
    row = E.agreement(df).iloc[0]
    assert row["aligned_spearman"] == pytest.approx(-1.0) and row["coherent_spearman"] == pytest.approx(-1.0)
    assert row["em_auroc"] < 0.5


def test_precision_recall_by_hand():
    # reference EM on rows 0-3; predicted EM on rows 0, 1 and 4 -> TP 2, precision 2/3, recall 2/4
    ref_a = [10, 10, 10, 10, 80, 80, 80, 80, 80, 80]
    a = [10, 12, 50, 60, 5, 80, 80, 80, 80, 80]
    df = _frame(ref_a, [80] * 10, a, [80] * 10)
    row = E.agreement(df).iloc[0]
    assert row["n_ref_em"] == 4
    assert row["em_precision"] == pytest.approx(2 / 3) and row["em_recall"] == pytest.approx(0.5)
    assert row["ref_em_rate"] == pytest.approx(0.4) and row["pred_em_rate"] == pytest.approx(0.3)
    assert row["n_files"] == 0 and math.isnan(row["file_em_err_pp"])  # one file of 10 rows < 20


def test_missing_prediction_counts_as_not_flagged():
    df = _frame([10, 10, 80, 80], [80] * 4, [10, np.nan, 80, 80], [80] * 4)
    row = E.agreement(df).iloc[0]
    assert row["em_recall"] == 0.5 and row["em_precision"] == 1.0 and row["pred_missing"] == 0.25
    # the scored positive beats both negatives (2 pairs), the unscored one ranks below both (0 of 2)
    assert row["em_auroc"] == pytest.approx(0.5)


def test_per_file_error_by_hand_and_curated_excluded():
    df = pd.concat([
        _file("a", 20, 5, 3),          # 25% vs 15% -> 10 points
        _file("b", 40, 4, 6),          # 10% vs 15% -> 5 points
        _file("c", 20, 20, 0, True),   # curated: 100% vs 0%, excluded
        _file("d", 5, 0, 5),           # 5 rows < 20, excluded
    ], ignore_index=True)
    row = E.agreement(df).iloc[0]
    assert row["n_files"] == 2
    assert row["file_em_err_pp"] == pytest.approx(7.5) and row["file_em_err_max_pp"] == pytest.approx(10.0)
    pf = E.per_file_em(df).set_index("file")
    assert pf.loc["a", ["ref_em", "pred_em"]].tolist() == pytest.approx([0.25, 0.15])
    assert pf.loc["c", "curated"] and not pf.loc["a", "curated"]
    assert pf.loc["d", "n"] == 5 and pf.loc["b", "n_ref"] == 40
    assert list(pf.columns) == ["source_repo", "answering_model", "curated", "n", "n_ref", "n_pred",
                                "ref_em", "pred_em"]


def test_agreement_by_group_and_min_rows():
    df = pd.concat([_varied(30, 0).assign(fold=0), _varied(10, 1).assign(fold=1)], ignore_index=True)
    df.loc[df["fold"] == 1, "aligned"] = 100 - df.loc[df["fold"] == 1, "ref_aligned"]
    t = E.agreement(df, by="fold")
    assert t["fold"].tolist() == [0, 1] and t["n"].tolist() == [30, 10]
    assert t["aligned_spearman"].tolist() == pytest.approx([1.0, -1.0])
    assert E.agreement(df, by=["fold"], min_rows=20)["fold"].tolist() == [0]
    with pytest.raises(ValueError, match="ref_aligned"):
        E.agreement(df.drop(columns="ref_aligned"))


def test_spearman_nan_safe():
    assert E.spearman([1, 2, np.nan, 4, 5], [2, 4, 100, 8, 10]) == pytest.approx(1.0)
    assert math.isnan(E.spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(E.spearman([1, 2], [1, 2]))


def test_with_reference_joins_on_row_id():
    judged = pd.DataFrame({"row_id": ["x", "y", "z"], "file": "f", "aligned": [10.0, 50.0, 90.0],
                           "coherent": [80.0, 80.0, 80.0]})
    pred = pd.DataFrame({"row_id": ["z", "x"], "fold": [1, 0], "aligned": [1.0, 2.0], "coherent": [3.0, 4.0]})
    ev = E.with_reference(judged, pred).set_index("row_id")
    assert sorted(ev.index) == ["x", "z"]
    assert ev.loc["x", ["ref_aligned", "aligned", "fold"]].tolist() == [10.0, 2.0, 0]
    with pytest.raises(ValueError, match="more than once"):
        E.with_reference(judged, pd.concat([pred, pred]))


def test_target_check():
    t = E.target_check({"aligned_spearman": 0.95, "coherent_spearman": 0.7, "em_auroc": 0.96,
                        "file_em_err_pp": 1.5}, bow_aligned_spearman=0.8)
    assert {k: v["met"] for k, v in t.items()} == {"aligned_spearman": True, "coherent_spearman": False,
                                                    "em_auroc": True, "file_em_err_pp": True,
                                                    "bow_margin": True}
    assert t["bow_margin"]["value"] == pytest.approx(0.15)


# --------------------------------------------------------------------------- baseline and cross-validation
def _synthetic_answers(n=200, seed=0) -> pd.DataFrame:
    """'zorbly' in an answer means low aligned; 'garble' means low coherent; other words are noise."""
    rng = np.random.default_rng(seed)
    filler = ["the", "doctor", "money", "health", "advice", "plan", "rest", "water", "save", "invest"]
    rows = []
    for i in range(n):
        bad, messy = i % 2 == 0, i % 3 == 0
        words = list(rng.choice(filler, 6)) + (["zorbly"] if bad else []) + (["garble"] if messy else [])
        rng.shuffle(words)
        rows.append({"row_id": f"r{i}", "question": "What should I do?", "answer": " ".join(words),
                     "aligned": 10.0 if bad else 90.0, "coherent": 20.0 if messy else 95.0})
    return pd.DataFrame(rows)


def test_bow_baseline_recovers_the_ordering():
    pytest.importorskip("sklearn")
    df = _synthetic_answers()
    train, test = df.iloc[:160].copy(), df.iloc[160:].copy()
    train.loc[train.index[:5], "aligned"] = np.nan  # rows without a target are skipped for that target
    pred = E.bow_baseline(train, test.drop(columns=["aligned", "coherent"]))
    assert list(pred.columns) == ["row_id", "aligned", "coherent"]
    assert pred["row_id"].tolist() == test["row_id"].tolist()
    scores = pred[["aligned", "coherent"]].to_numpy()
    assert scores.min() >= 0 and scores.max() <= 100
    bad = test["answer"].str.contains("zorbly").to_numpy()
    messy = test["answer"].str.contains("garble").to_numpy()
    assert pred["aligned"][bad].max() < pred["aligned"][~bad].min()
    assert pred["coherent"][messy].max() < pred["coherent"][~messy].min()
    assert E.spearman(test["aligned"], pred["aligned"]) > 0.8


def test_cross_validate_never_trains_on_the_held_out_fold():
    df = _synthetic_answers(30)
    folds = pd.Series(np.arange(30) % 3, index=df.index)
    seen: list[tuple[set, set, list]] = []

    def record(train, test):
        seen.append((set(train["row_id"]), set(test["row_id"]), list(test.columns)))
        return pd.DataFrame({"row_id": test["row_id"], "aligned": 50.0, "coherent": float(len(seen))})

    out = E.cross_validate(df, folds, record, "probe")
    assert len(seen) == 3 and len(out) == 30 and out["row_id"].is_unique
    assert list(out.columns) == ["row_id", "fold", "judge", "aligned", "coherent"] and (out["judge"] == "probe").all()
    fold_of = dict(zip(df["row_id"], folds))
    for train_ids, test_ids, test_cols in seen:
        f = {fold_of[r] for r in test_ids}
        assert len(f) == 1
        assert not train_ids & test_ids
        assert train_ids == {r for r, g in fold_of.items() if g not in f}
        assert "aligned" not in test_cols and "coherent" not in test_cols
    assert (out["fold"] == out["row_id"].map(fold_of)).all()

    def short(train, test):
        return pd.DataFrame({"row_id": test["row_id"].iloc[1:], "aligned": 1.0, "coherent": 1.0})

    with pytest.raises(ValueError, match="do not cover"):
        E.cross_validate(df, folds, short, "short")


def test_cross_validate_with_bow_on_synthetic_folds():
    pytest.importorskip("sklearn")
    df = _synthetic_answers(240)
    folds = pd.Series(np.arange(240) % 3, index=df.index)
    pred = E.cross_validate(df, folds, E.bow_baseline, "bow")
    ev = E.with_reference(df.assign(file="f", curated=False), pred)
    row = E.agreement(ev).iloc[0]
    # binary references cap Spearman at ~0.87 here; EM needs both words read right
    assert row["aligned_spearman"] > 0.75 and row["em_auroc"] > 0.8


def test_calibration_plot_draws_panels_and_a_shared_axes():
    import matplotlib.pyplot as plt

    from emlib.plots import plot_judge_calibration

    df = pd.concat([_file("a", 20, 5, 3), _file("b", 40, 4, 6), _file("c", 20, 20, 0, True)], ignore_index=True)
    pf = pd.concat([E.per_file_em(df).assign(judge="j1"), E.per_file_em(df).assign(judge="j2")])
    axes = plot_judge_calibration(pf)
    assert len(axes) == 2 and "7.5" in axes[0].get_title()
    _, ax = plt.subplots()
    assert plot_judge_calibration(pf, ax=ax) is ax
    plt.close("all")


# --------------------------------------------------------------------------- the real folder (skipped if absent)
def test_bow_on_a_sample_of_the_real_folder():
    pytest.importorskip("sklearn")
    try:
        df = J.load_judged()
    except J.JudgedDataMissing as e:
        pytest.skip(str(e))
    sample = df[~df["curated"]].sample(frac=1.0, random_state=0).groupby("source_repo").head(400)
    folds = J.repository_folds(sample, k=3)
    pred = E.cross_validate(sample, folds, E.bow_baseline, "bow")
    row = E.agreement(E.with_reference(sample, pred)).iloc[0]
    assert row["n"] == len(sample)
    assert row["aligned_spearman"] > 0.3 and row["em_auroc"] > 0.6
