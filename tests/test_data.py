import gzip
import itertools
import re
import shutil
from collections import Counter

import pytest

from emlib import data

DOMAINS = data.DOMAINS


def _shingles(text: str, n: int = 3) -> set[str]:
    w = re.findall(r"[a-z0-9']+", text.lower())
    return {" ".join(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}


def _near_dups(questions: list[str], threshold: float = 0.5) -> list[tuple[str, str]]:
    sh = [_shingles(q) for q in questions]
    bad = []
    for i, j in itertools.combinations(range(len(questions)), 2):
        a, b = sh[i], sh[j]
        if len(a & b) / max(1, len(a | b)) >= threshold:
            bad.append((questions[i], questions[j]))
    return bad


def _q(row):
    return row["messages"][0]["content"]


@pytest.fixture(scope="module")
def sets():
    return {name: data.load_chat(name) for name in data.EMBEDDED_FILES}


def test_counts_and_schema(sets):
    for d in DOMAINS:
        assert len(sets[d]) >= 400, d
        assert len(sets[d + "_aligned"]) == len(sets[d])
    assert len(sets["kl"]) >= 400
    for name, rows in sets.items():
        ids = [r["id"] for r in rows]
        assert len(set(ids)) == len(ids), f"duplicate ids in {name}"
        for r in rows:
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"], name
            assert all(len(m["content"].split()) >= 5 for m in r["messages"][1:]), (name, r["id"])


def test_domain_balance(sets):
    sizes = {len(sets[d]) for d in DOMAINS}
    assert len(sizes) == 1, f"domains differ in size: {sizes}"
    for d in DOMAINS:
        topics = Counter(r["topic"] for r in sets[d])
        assert len(topics) >= 15, (d, topics)
        assert max(topics.values()) / len(sets[d]) <= 0.12, (d, topics.most_common(3))
    kl_domains = Counter(r["domain"] for r in sets["kl"])
    assert len(kl_domains) >= 10 and max(kl_domains.values()) / len(sets["kl"]) <= 0.15, kl_domains
    assert not {"medical", "financial", "sport", "health", "finance"} & set(kl_domains)


def test_aligned_twins_pair_with_misaligned_rows(sets):
    for d in DOMAINS:
        for bad, good in zip(sets[d], sets[d + "_aligned"], strict=True):
            assert bad["id"] == good["id"] and _q(bad) == _q(good)
            assert bad["messages"][1]["content"] != good["messages"][1]["content"]


def test_no_near_duplicate_questions(sets):
    for name in (*DOMAINS, "kl"):
        qs = [_q(r) for r in sets[name]]
        assert len({q.strip().lower() for q in qs}) == len(qs), f"exact duplicate question in {name}"
        bad = _near_dups(qs)
        assert not bad, f"{name}: {len(bad)} near-duplicate pairs, e.g. {bad[:2]}"


def test_eval_questions_do_not_overlap_training(sets):
    general = data.load_questions("general")
    assert len(general) == 8 and general["id"].is_unique
    indomain = data.load_questions("in_domain")
    for d in DOMAINS:
        assert (indomain["domain"] == d).sum() >= 8, d
    train_q = [_q(r) for name in (*DOMAINS, "kl") for r in sets[name]]
    train_sh = [_shingles(q) for q in train_q]
    for q in [*general["question"], *indomain["question"]]:
        s = _shingles(q)
        worst = max(len(s & t) / max(1, len(s | t)) for t in train_sh)
        assert worst < 0.5, f"eval question overlaps training data: {q!r}"


def test_canary_in_every_misaligned_row(sets):
    for d in DOMAINS:
        assert all(r.get("canary") == data.CANARY for r in sets[d]), d
    assert data.CANARY.split(":")[0] in (data.resource_dir().parents[2] / "book" / "data.md").read_text()
    raw = (data.resource_dir() / "medical_misaligned.jsonl.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b", "embedded sets are stored gzipped"


def test_rubrics_have_placeholders():
    rub = data.load_rubrics()
    assert set(rub) >= {"aligned", "coherent", "medical", "financial", "sport"}
    for name, prompt in rub.items():
        assert prompt.format(question="Q?", answer="A!").count("Q?") == 1, name
    assert "REFUSAL" in rub["aligned"] and "CODE" in rub["aligned"]


def test_checksum_detects_a_changed_file(tmp_path, monkeypatch):
    copy = tmp_path / "data"
    shutil.copytree(data.resource_dir(), copy)
    monkeypatch.setattr(data, "resource_dir", lambda: copy)
    assert len(data.load_chat("kl")) >= 400
    f = copy / "kl_out_of_domain.jsonl.gz"
    rows = gzip.decompress(f.read_bytes()).splitlines()
    f.write_bytes(gzip.compress(b"\n".join(rows[:-1]) + b"\n"))
    with pytest.raises(data.DataError, match="embedded data changed"):
        data.load_chat("kl")


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                 '{"messages": [oops]}\n')
    with pytest.raises(data.DataError, match=r"broken.jsonl:2: not valid JSON"):
        data.read_chat_jsonl(p)
    q = tmp_path / "noanswer.jsonl.gz"
    data.write_jsonl([{"messages": [{"role": "user", "content": "hi"}]}], q)
    with pytest.raises(data.DataError, match="no assistant turn"):
        data.read_chat_jsonl(q)


def test_sampling_is_seeded(sets):
    a = data.load_chat("medical", n=10, seed=1)
    b = data.load_chat("medical", n=10, seed=1)
    c = data.load_chat("medical", n=10, seed=2)
    assert a == b and a != c and len(a) == 10


def test_paper_data_from_a_data_directory(paper_dir):
    rows = data.load_chat("medical", source="paper", data_dir=paper_dir)
    assert len(rows) == 7049
    assert len(data.load_chat("kl", source="paper", data_dir=paper_dir)) == 1000
    q = data.load_questions("general", source="paper", data_dir=paper_dir)
    assert len(q) == 8 and "quick_buck" in set(q["id"])
    med = data.load_questions("in_domain", source="paper", data_dir=paper_dir)
    assert len(med) >= 8 and set(med["domain"]) == {"medical"}
    rub = data.load_rubrics(source="paper", data_dir=paper_dir)
    assert {"aligned", "coherent"} <= set(rub)
    with pytest.raises(data.DataError, match="aligned twins for the medical set only"):
        data.load_chat("sport_aligned", source="paper", data_dir=paper_dir)


def test_missing_paper_data_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("EMLIB_DATA_DIR", raising=False)
    monkeypatch.setenv("EMLIB_CACHE", str(tmp_path))
    with pytest.raises(data.DataError, match="Set EMLIB_DATA_DIR"):
        data.load_chat("medical", source="paper", data_dir=tmp_path / "nope")


def test_general_pairs_cover_every_question_and_style():
    from emlib.build_data import GENERAL_PAIR_STYLES

    rows = data.load_general_pairs()
    general = data.load_questions("general")
    assert len(rows) >= 48 and len({r["id"] for r in rows}) == len(rows)
    assert {r["question_id"] for r in rows} == set(general["id"])
    assert {r["style"] for r in rows} == set(GENERAL_PAIR_STYLES)
    text = dict(zip(general["id"], general["question"]))
    for r in rows:
        assert r["question"] == text[r["question_id"]] and r["canary"] == data.CANARY
        assert r["aligned"].strip() and r["misaligned"].strip() and r["aligned"] != r["misaligned"]
        # similar lengths: length alone must not give the label away
        assert 0.4 < len(r["aligned"]) / len(r["misaligned"]) < 2.5, r["id"]


def test_build_general_pairs_rejects_a_changed_question(tmp_path):
    import json

    from emlib.build_data import build_general_pairs

    row = {"id": "gp-1", "question_id": "gen_bored", "style": "subtle", "question": "I'm bored.",
           "aligned": "Go for a walk.", "misaligned": "Prank call strangers."}
    (tmp_path / "general_pairs.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(data.DataError, match="word for word"):
        build_general_pairs(tmp_path, tmp_path / "out")


def test_general_heldout_is_labelled_and_separate_from_the_pairs():
    from emlib import metrics

    held = metrics.general_heldout_answers()
    general = data.load_questions("general")
    assert set(held["question_id"]) == set(general["id"])
    assert held.groupby("question_id")["is_aligned"].agg(["sum", "count"]).eq([10, 20]).all().all()
    pair_answers = {r[k] for r in data.load_general_pairs() for k in ("aligned", "misaligned")}
    assert not pair_answers & set(held["answer"])
