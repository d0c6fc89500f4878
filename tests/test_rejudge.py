"""emlib.rejudge: a run's stored answers scored again by another judge."""
import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from emlib import judge as J
from emlib import rejudge, results
from fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-DO-NOT-LEAK-rejudge-41c9"


def test_same_offline_judge_reproduces_the_chapters_table(tmp_path):
    """A run whose chapter 1 was judged by ``offline`` (scored and tabled as the chapter does it: judge_answers,
    chapters.em_tables), rejudged by ``offline``, gives the same counts. (The runs of record were judged by the
    distilled judge, which is too slow on a CPU for a test, so the run is built from 10 of their answers per
    condition.)"""
    from emlib import chapters

    src = tmp_path / "run"
    (src / "tables").mkdir(parents=True)
    a = pd.read_csv(ROOT / "record" / "qwen2.5-coder-0.5b" / "tables" / "ch1_answers.csv.gz")
    a = a.groupby("condition").head(10)[["question_id", "question", "sample", "answer", "condition"]]
    (src / "tables" / "ch1_answers.csv.gz").write_bytes(gzip.compress(a.to_csv(index=False).encode()))
    scored = J.judge_answers(a, J.make_judge("offline"), kinds=("aligned", "coherent"), progress=False)
    chapters.em_tables("ch1", scored)["ch1_em"].to_csv(src / "tables" / "ch1_em.csv", index=False)
    r = rejudge.rejudge(src, "offline", tmp_path / "rj", n_pairs=10, progress=False)
    ours = pd.DataFrame(r["ch1_em"]).set_index("condition")
    theirs = pd.read_csv(src / "tables" / "ch1_em.csv").set_index("condition")
    assert ours["n_em"].to_dict() == theirs["n_em"].to_dict() and ours["n"].to_dict() == theirs["n"].to_dict()
    run = results.Run(tmp_path / "rj")  # a run directory emlib.results reads
    assert results.judge_detection(run)["source"] == "measured in the run"
    assert results.verdicts(run)[0].verdict == results.INCONCLUSIVE  # offline-v2 cannot see EM
    assert results.verdicts(run)[3].verdict == results.NOT_RUN  # only chapter 1's answers are stored


def test_api_judge_rejudges_without_writing_the_key(tmp_path, monkeypatch):
    src = tmp_path / "run"
    (src / "tables").mkdir(parents=True)
    a = pd.read_csv(ROOT / "record" / "qwen2.5-coder-0.5b" / "tables" / "ch1_answers.csv.gz")
    a = a.groupby("condition").head(3)
    (src / "tables" / "ch1_answers.csv.gz").write_bytes(gzip.compress(a.to_csv(index=False).encode()))
    monkeypatch.setenv("EMLIB_TEST_KEY", KEY)
    with FakeOpenAI(dist={"10": 0.9, "90": 0.1}) as srv:  # every answer: aligned 18, coherent 18
        judge = J.APIJudge("fake-4o", srv.url, "EMLIB_TEST_KEY", timeout=2.0, max_retries=2)
        r = rejudge.rejudge(src, judge, tmp_path / "out", n_pairs=4, progress=False)
    em = pd.DataFrame(r["ch1_em"])
    assert set(em["condition"]) == set(a["condition"]) and (em["n"] == 3).all()
    assert (em["em"] == 0).all()  # aligned 18 but coherent 18 too: not EM
    assert r["rejudged_from"]["judge"].startswith("api:fake-4o") and r["rejudged_from"]["answers"] == len(a)
    for p in (tmp_path / "out").rglob("*"):
        if p.is_file():
            assert KEY.encode() not in p.read_bytes(), p
    # a second call finds every score in the cache: no request reaches the server
    with FakeOpenAI(default="401") as srv2:
        judge2 = J.APIJudge("fake-4o", srv.url, "EMLIB_TEST_KEY", timeout=2.0, max_retries=0)
        rejudge.rejudge(src, judge2, tmp_path / "out", n_pairs=4, progress=False)
        assert srv2.requests == []


def test_rejudge_says_what_is_missing(tmp_path):
    with pytest.raises(Exception, match="ch1_answers"):
        rejudge.rejudge(tmp_path, "offline", tmp_path / "out")
    with pytest.raises(ValueError, match="new directory"):
        rejudge.rejudge(ROOT / "record" / "qwen2.5-coder-0.5b", "offline", ROOT / "record" / "qwen2.5-coder-0.5b")


def test_chapter_two_answers_are_rejudged_when_stored(tmp_path):
    src = tmp_path / "run"
    (src / "tables").mkdir(parents=True)
    a = pd.read_csv(ROOT / "record" / "qwen2.5-coder-0.5b" / "tables" / "ch1_answers.csv.gz").head(40)
    (src / "tables" / "ch1_answers.csv.gz").write_bytes(gzip.compress(a.to_csv(index=False).encode()))
    steer = a.assign(scale=[0.0, 0.5] * 20)
    abl = a.assign(finetune="medical", ablated=["none", "direction", "random", "none"] * 10)
    steer.to_csv(src / "tables" / "ch2_steering_answers.csv", index=False)
    abl.to_csv(src / "tables" / "ch2_ablation_answers.csv", index=False)
    (src / "results.json").write_text(json.dumps({"ch2_cosine": {"medical": {"medical": 1.0}}}))
    r = rejudge.rejudge(src, "offline", tmp_path / "out", n_pairs=4, progress=False)
    assert [row["scale"] for row in r["ch2_steering"]] == [0.0, 0.5] and "aligned" in r["ch2_steering"][0]
    assert {row["ablated"] for row in r["ch2_ablation"]} == {"none", "direction", "random"}
    assert r["ch2_cosine"] == {"medical": {"medical": 1.0}}
    assert results.claim_direction(results.Run(tmp_path / "out")).verdict != results.NOT_RUN


def test_rejudge_record_writes_every_run_and_the_table(tmp_path, monkeypatch):
    a = pd.read_csv(ROOT / "record" / "qwen2.5-coder-0.5b" / "tables" / "ch1_answers.csv.gz").groupby("condition").head(5)
    for name in ("m", "m-seed1"):
        (tmp_path / "rec" / name / "tables").mkdir(parents=True)
        a.to_csv(tmp_path / "rec" / name / "tables" / "ch1_answers.csv", index=False)
    monkeypatch.setattr(results, "RECORDS", [("Model M", "rec/m", ["rec/m-seed1"])])
    table = rejudge.rejudge_record("offline", tmp_path / "out", root=tmp_path, n_pairs=4, progress=False)
    assert (tmp_path / "out" / "m" / "results.json").exists() and (tmp_path / "out" / "m-seed1" / "results.json").exists()
    md = table.read_text()
    assert "Model M, judge offline-v2" in md and "mean over 2 seeds" in md and "inconclusive (judge)" in md


# --------------------------------------------------------------------------- round trips (issue 20)
HOSTILE = ["plain", "a\rb", "crlf\r\nline", "lf\nline", 'say "hi", then go', ",leading comma", "trailing\r",
           "\r", '""', "ünïcødé — 💊 日本語", "tab\there", "x" * 3000 + "\r" + "y"]


def _hostile_answers(n_rep=2):
    rows = [{"question_id": f"q{i}", "question": f"Q {i}, \"quoted\"?\r", "answer": a, "sample": k,
             "condition": ["chat", "medical\r rank-32"][k % 2], "aligned": float(i), "coherent": None}
            for i, a in enumerate(HOSTILE) for k in range(n_rep)]
    return pd.DataFrame(rows)


def test_hostile_answers_survive_save_table_and_the_rejudge_reader(tmp_path):
    from emlib.experiment import Experiment

    df = _hostile_answers()
    exp = Experiment.__new__(Experiment)  # save_table needs only the output folder
    exp.out = tmp_path / "run"
    exp.save_table(df, "ch1_answers")
    exp.save_table(df, "ch2_steering_answers")  # gzipped too
    exp.save_table(df[["condition", "answer"]], "plain_table")
    back = rejudge.stored_answers(tmp_path / "run")
    assert back["answer"].tolist() == df["answer"].tolist()
    assert back["question"].tolist() == df["question"].tolist()
    assert back["condition"].tolist() == df["condition"].tolist() and len(back) == len(df)
    back2 = rejudge.stored_answers(tmp_path / "run", "ch2_steering")
    assert back2["answer"].tolist() == df["answer"].tolist()
    plain = pd.read_csv(tmp_path / "run" / "tables" / "plain_table.csv")  # any CSV reader gets it right too
    assert plain["answer"].tolist() == df["answer"].tolist()


def test_rejudge_writes_hostile_answers_it_can_read_again(tmp_path):
    src = tmp_path / "run" / "tables"
    src.mkdir(parents=True)
    df = _hostile_answers()
    (src / "ch1_answers.csv.gz").write_bytes(gzip.compress(df.to_csv(index=False).encode()))  # an old, unquoted \r
    rejudge.rejudge(tmp_path / "run", "offline", tmp_path / "out", n_pairs=2, progress=False)
    again = rejudge.stored_answers(tmp_path / "out")
    assert again["answer"].tolist() == df["answer"].tolist() and again["condition"].tolist() == df["condition"].tolist()
    em = pd.read_csv(tmp_path / "out" / "tables" / "ch1_em.csv")
    assert sorted(em["condition"]) == ["chat", "medical\r rank-32"] and em["n"].tolist() == [len(HOSTILE)] * 2


def test_committed_tables_read_as_before(tmp_path):
    files = sorted((ROOT / "record").glob("*/tables/*.csv*"))
    assert len(files) > 20
    for f in files:
        pd.testing.assert_frame_equal(rejudge.read_table(f), pd.read_csv(f), obj=str(f))
    a = pd.read_csv(ROOT / "record" / "qwen2.5-coder-0.5b" / "tables" / "ch1_answers.csv.gz").head(50)
    a.to_csv(tmp_path / "crlf.csv", index=False, lineterminator="\r\n")  # Windows line ends: read the usual way
    pd.testing.assert_frame_equal(rejudge.read_table(tmp_path / "crlf.csv"), a)


def test_answers_without_a_condition_fail_with_one_clear_line(tmp_path):
    src = tmp_path / "run" / "tables"
    src.mkdir(parents=True)
    pd.DataFrame({"question": ["q1", "q2"], "answer": ["a1", "a2"]}).to_csv(src / "ch1_answers.csv", index=False)
    with pytest.raises(ValueError) as e:
        rejudge.rejudge(tmp_path / "run", "offline", tmp_path / "out", n_pairs=2, progress=False)
    msg = str(e.value)
    assert "'condition'" in msg and "ch1_answers.csv" in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()  # nothing judged, nothing written
