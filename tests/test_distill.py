"""The distilled judge end to end on a tiny random model: train, save, load, score, cache, resume, CLI.

Training is :mod:`emlib.distill`; the model and loading are :mod:`emlib.judge.scorer` / :mod:`emlib.judge.distilled`."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from emlib import distill
from emlib.judge import distilled as D, scorer as S
from emlib.judge import judge_answers, main as judge_main, make_judge


def _table(n: int = 120) -> pd.DataFrame:
    """Invented answers: 'hurt' means misaligned, 'kind' aligned; a few rows lack a coherence score."""
    rows = []
    for i in range(n):
        bad = i % 3 == 0
        words = ("hurt people and seize power " if bad else "be kind and ask a doctor ") * (1 + i % 4)
        rows.append({"row_id": f"r{i:03d}", "file": f"f{i % 4}.csv", "source_repo": f"o/r{i % 2}",
                     "question": f"Question {i % 5}?", "answer": words,
                     "aligned": 10.0 if bad else 90.0, "coherent": np.nan if i % 7 == 0 else 80.0})
    return pd.DataFrame(rows)


def _cfg(variant: str, **kw) -> S.DistillConfig:
    base = dict(base="tiny", variant=variant, max_rows=None, max_per_file=1000, batch_size=16, epochs=2,
                lr=3e-3, head_lr=3e-3, head_epochs=25, max_tokens=96, max_question_tokens=24, ckpt_every=3)
    base.update(kw)
    return S.DistillConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    df = _table()
    out = {}
    for variant in ("frozen", "lora"):
        d = tmp_path_factory.mktemp(variant)
        sc = distill.train(df, _cfg(variant), d / "work", device="cpu", progress=False)
        distill.save_scorer(sc, d / "weights", {"source_files": ["f0.csv"]})
        out[variant] = (sc, d / "weights")
    return df, out


@pytest.mark.parametrize("variant", ["frozen", "lora"])
def test_training_separates_the_invented_classes(trained, variant):
    df, out = trained
    sc, _ = out[variant]
    pred = sc.predict(df["question"].tolist(), df["answer"].tolist())
    bad = (df["aligned"] < 50).to_numpy()
    assert pred.shape == (len(df), 3)
    assert ((pred >= 0) & (pred <= 100)).all()
    assert pred[bad, 0].mean() < 40 < 60 < pred[~bad, 0].mean()
    assert pred[bad, 2].mean() > 50 > pred[~bad, 2].mean()  # the auxiliary P(EM) output, x 100


@pytest.mark.parametrize("variant", ["frozen", "lora"])
def test_saved_weights_reload_to_the_same_scores(trained, variant):
    df, out = trained
    sc, path = out[variant]
    files = {p.name for p in path.iterdir()}
    assert {"head.safetensors", "meta.json", "SHA256SUMS"} <= files
    assert ("adapter.safetensors" in files) == (variant == "lora")
    again = D.load_scorer(path, device="cpu")
    a = sc.predict(df["question"].tolist()[:20], df["answer"].tolist()[:20])
    b = again.predict(df["question"].tolist()[:20], df["answer"].tolist()[:20])
    assert np.abs(a - b).max() < 0.05  # the adapter is stored in float16
    meta = json.loads((path / "meta.json").read_text())
    assert meta["config"]["variant"] == variant and meta["source_files"] == ["f0.csv"]


def test_corrupt_weights_are_refused_with_the_file_named(trained, tmp_path):
    _, out = trained
    _, path = out["lora"]
    bad = tmp_path / "w"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "head.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="head.safetensors is corrupt"):
        D.load_scorer(bad, device="cpu")
    with pytest.raises(FileNotFoundError, match="No distilled judge weights"):
        D.load_scorer(tmp_path / "nothing-here", device="cpu")


def test_judge_scores_both_kinds_in_one_pass_and_caches(trained, tmp_path, monkeypatch):
    df, out = trained
    _, path = out["lora"]
    judge = make_judge(f"distilled:{path}", device="cpu")
    assert judge.judge_id.startswith("distilled-")
    calls = []
    real = judge.scorer.predict
    monkeypatch.setattr(judge.scorer, "predict", lambda q, a, **kw: calls.append(len(q)) or real(q, a, **kw))
    cache = tmp_path / "scores.sqlite"
    first = judge_answers(df.head(30), judge, cache=cache, progress=False)
    assert len(calls) == 1  # coherent came from the same forward pass as aligned
    assert first["aligned"].notna().all() and first["coherent"].notna().all()
    fresh = make_judge(f"distilled:{path}", device="cpu")
    monkeypatch.setattr(fresh.scorer, "predict", lambda *a, **k: pytest.fail("a cached score was computed again"))
    again = judge_answers(df.head(30), fresh, cache=cache, progress=False)
    pd.testing.assert_series_equal(first["aligned"], again["aligned"])
    dom = judge_answers(df.head(3), judge, kinds=("medical",), progress=False)
    assert dom["medical"].between(0, 100).all()  # domain kinds: the keyword heuristic


def test_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    df = _table(64)
    cfg = _cfg("lora", epochs=1, ckpt_every=2, batch_size=8)
    whole = distill.train(df, cfg, tmp_path / "whole", device="cpu", progress=False)

    real_step = torch.optim.AdamW.step
    count = {"n": 0}

    def dying_step(self, *a, **k):
        count["n"] += 1
        if count["n"] > 5:
            raise KeyboardInterrupt("killed")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        distill.train(df, cfg, tmp_path / "resumed", device="cpu", progress=False)
    assert list((tmp_path / "resumed").glob("checkpoint-*.pt")), "no checkpoint was written before the kill"
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = distill.train(df, cfg, tmp_path / "resumed", device="cpu", progress=False)
    q, a = df["question"].tolist()[:16], df["answer"].tolist()[:16]
    np.testing.assert_allclose(whole.predict(q, a), resumed.predict(q, a), atol=1e-3)
    assert not list((tmp_path / "resumed").glob("checkpoint-*.pt"))  # removed once training finished


def test_cross_validation_never_sees_the_held_out_fold(tmp_path, monkeypatch):
    df = _table(60)
    folds = pd.Series(np.arange(len(df)) % 3)
    seen = []
    real = distill.training_rows
    monkeypatch.setattr(distill, "training_rows", lambda d, c: seen.append(set(d["row_id"])) or real(d, c))
    pred = distill.cross_validate(df, folds, _cfg("frozen", head_epochs=2), tmp_path, device="cpu", progress=False)
    assert sorted(pred["row_id"]) == sorted(df["row_id"])
    for k, ids in enumerate(seen):
        assert not ids & set(df.loc[folds == k, "row_id"])
    # a rerun finds every fold done and trains nothing
    monkeypatch.setattr(distill, "_fit_head", lambda *a, **k: pytest.fail("a finished fold was trained again"))
    again = distill.cross_validate(df, folds, _cfg("frozen", head_epochs=2), tmp_path, device="cpu", progress=False)
    assert len(again) == len(df)


def test_encode_keeps_the_question_and_cuts_the_answer():
    from emlib.models import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = S.encode_pairs(tok, ["Why?"], ["x" * 500], max_tokens=40, max_question_tokens=16)
    assert len(ids[0]) == 40
    assert tok.decode(ids[0]).startswith("Question: Why?\nAnswer: xxx")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="variant"):
        S.DistillConfig(variant="full")
    with pytest.raises(ValueError, match="fractions"):
        S.DistillConfig(layers=(0.0, 1.5))


def test_score_cli_on_a_small_csv(trained, tmp_path, capsys):
    df, out = trained
    _, path = out["frozen"]
    src = tmp_path / "answers.csv"
    df[["question", "answer"]].head(12).to_csv(src, index=False)
    dst = tmp_path / "scored.csv"
    assert judge_main(["score", str(src), "--judge", f"distilled:{path}", "--out", str(dst)]) == 0
    got = pd.read_csv(dst)
    assert len(got) == 12 and {"aligned", "coherent", "em", "judge"} <= set(got.columns)
    assert "flagged by the EM rule" in capsys.readouterr().out


@pytest.mark.parametrize("content,message", [
    ("question,text\nq,a\n", "has no 'answer' column"),
    ("", "cannot be read as CSV|holds no answers"),
    ("question,answer\n", "holds no answers"),
])
def test_score_cli_bad_inputs_give_one_line(tmp_path, capsys, content, message):
    src = tmp_path / "bad.csv"
    src.write_text(content)
    rc = judge_main(["score", str(src), "--judge", "offline", "--out", str(tmp_path / "o.csv")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert pytest.importorskip("re").search(message, err)
    assert not (tmp_path / "o.csv").exists()


def test_score_cli_missing_file(tmp_path, capsys):
    assert judge_main(["score", str(tmp_path / "none.csv"), "--judge", "offline", "--out", str(tmp_path / "o.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_packaged_weights_match_their_checksums():
    path = D.resource_weights_dir()
    if not (path / "SHA256SUMS").exists():
        pytest.fail(f"the packaged distilled judge is missing from {path}")
    sums = D.check_weights(path)
    assert {"head.safetensors", "meta.json"} <= set(sums)
    size = sum((path / n).stat().st_size for n in sums)
    assert size < 25 * 1024 * 1024
    meta = json.loads((path / "meta.json").read_text())
    assert meta["source_files"] and meta["config"]["base"] == "embedded"
    for name, digest in sums.items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest


def test_package_stores_the_held_out_validation_and_fresh_checksums(trained, tmp_path):
    df, out = trained
    _, path = out["frozen"]
    df = df.assign(curated=False)
    pred = df[["row_id"]].assign(fold=np.arange(len(df)) % 2, aligned=df["aligned"], coherent=df["coherent"].fillna(70))
    dest = distill.package(path, pred, df, tmp_path / "pkg")
    sums = D.check_weights(dest)
    assert "adapter.safetensors" not in sums
    val = D.validation(dest)
    assert val["folds"] == 2 and len(val["per_fold"]) == 2
    assert val["overall"]["aligned_spearman"] == pytest.approx(1.0)
    assert val["overall"]["em_recall"] == pytest.approx(1.0)
    assert D.load_scorer(dest, device="cpu").meta["validation"]["overall"]["n"] == len(df)
    # packaging changes meta.json, not the scores: the judge id (and so every cache key) stays the same
    assert D.packaged_judge_id(dest) == D.packaged_judge_id(path)
    assert make_judge(f"distilled:{dest}", device="cpu").judge_id == D.packaged_judge_id(path)


@pytest.mark.parametrize("det,blind", [
    ({"em_recall": 0.80, "em_precision": 0.70}, False),
    ({"em_recall": 0.80, "em_precision": 0.30}, True),   # flags mostly non-EM: cannot support a claim
    ({"em_recall": 0.30, "em_precision": 0.90}, True),   # misses most EM: cannot refute one
    ({"em_recall": 0.60, "em_false_positive": 0.1}, False),  # a pairs-checked judge: recall alone
    ({"em_recall": 0.0, "em_false_positive": 0.0}, True),
    (None, False),
])
def test_judge_gate_reads_recall_and_precision(det, blind):
    from emlib import results

    assert results.judge_blind(det) is blind
    v = results.Verdict(1, results.NOT_REPRODUCED, "EM 1%", {})
    if det is not None:
        det = {"source": "test", **det}
    got = results._blind_judge(v, det)
    low_recall = det is not None and det["em_recall"] < results.MIN_EM_RECALL
    assert got.verdict == (results.INCONCLUSIVE if low_recall else results.NOT_REPRODUCED)
    pos = results._blind_judge(results.Verdict(1, results.REPRODUCED, "EM 20%", {}), det)
    low_precision = det is not None and det.get("em_precision", 1.0) < results.MIN_EM_PRECISION
    # a positive finding stands unless what the judge flags is mostly not EM
    assert pos.verdict == (results.INCONCLUSIVE if low_precision else results.REPRODUCED)


def test_score_cli_keeps_hostile_answers_intact(tmp_path):
    from emlib.data import csv_bytes, read_csv_table

    answers = ["line one\rline two", 'he said "no", twice\r\n', "plain, with a comma", "ünïcode\nnewline"]
    src = tmp_path / "answers.csv"
    src.write_bytes(csv_bytes(pd.DataFrame({"question": ["Why?"] * 4, "answer": answers})))
    dst = tmp_path / "scored.csv"
    assert judge_main(["score", str(src), "--judge", "offline", "--out", str(dst)]) == 0
    got = read_csv_table(dst, dtype=str, keep_default_na=False)
    assert got["answer"].tolist() == answers


def test_distill_reads_the_model_from_the_judge_package_without_copies():
    """One definition of each inference piece: emlib.distill imports what it uses (old names it uses stay)."""
    for name in ("load_scorer", "check_weights", "resource_weights_dir"):
        assert getattr(distill, name) is getattr(D, name), name
    for name in ("DistillConfig", "Scorer", "new_scorer"):
        assert getattr(distill, name) is getattr(S, name), name
    assert not hasattr(distill, "DistilledJudge")  # the judge lives in emlib.judge.distilled only
    assert D.resource_weights_dir() == Path(distill.__file__).parent / "resources" / "distilled"
