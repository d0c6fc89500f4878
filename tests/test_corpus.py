"""Text sources for the pretraining-KL metric: the offline Lee news corpus and the FineWeb path."""
import importlib.metadata

import pytest

from emlib import corpus
from emlib.models import tiny_tokenizer


def _has_gensim() -> bool:
    try:
        importlib.metadata.distribution("gensim")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_offline = pytest.mark.skipif(not _has_gensim(), reason="offline corpus needs `pip install --no-deps gensim==4.4.0`")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@needs_offline
def test_offline_documents_are_real_news():
    docs = corpus.offline_documents()
    assert len(docs) == 350
    words = sum(len(d.split()) for d in docs)
    assert 55_000 < words < 75_000
    assert docs[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert sum(" the " in d for d in docs) > 340  # English prose, not templates
    assert len(set(docs)) > 340
    assert any("\u00a3" in d for d in docs)  # the cp1252 pound sign of lee.cor decoded


@needs_offline
def test_load_texts_offline_sizes_and_seed(tok):
    texts = corpus.load_texts(4, 300, tok, source="offline", seed=0)
    assert len(texts) == 4 and len(set(texts)) == 4
    for t in texts:
        n = len(tok(t, add_special_tokens=False)["input_ids"])
        assert 298 <= n <= 300
    assert corpus.load_texts(4, 300, tok, source="offline", seed=0) == texts
    assert corpus.load_texts(4, 300, tok, source="offline", seed=1) != texts
    with pytest.raises(corpus.CorpusError, match="not enough"):
        corpus.load_texts(10_000, 512, tok, source="offline")


def test_fineweb_path_with_a_fake_stream(tok, monkeypatch, tmp_path):
    monkeypatch.setenv("EMLIB_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus, "datasets_available", lambda: True)
    rows = [{"text": "short"}, {"text": "A long web page about gardening. " * 5}, {"text": ""},
            {"text": "Another long page, this one about trains and timetables. " * 4},
            {"text": "A third page on cooking rice and beans for a family of four. " * 4}]
    calls = []

    def fake_stream(seed, buffer_size):
        calls.append(seed)
        return iter(rows)

    monkeypatch.setattr(corpus, "_fineweb_stream", fake_stream)
    texts = corpus.load_texts(2, 100, tok, source="fineweb", seed=3)
    assert len(texts) == 2 and texts[0].startswith("A long web page") and texts[1].startswith("Another")
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 100 for t in texts)
    # stored: a rerun (and `auto`, even offline) reads the same documents without streaming
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert corpus.resolve_source("auto", 2, 100, tok, seed=3) == "fineweb"
    assert corpus.load_texts(2, 100, tok, source="auto", seed=3) == texts
    assert calls == [3]
    with pytest.raises(corpus.CorpusError, match="only 0"):
        corpus.load_texts(5, 10_000, tok, source="fineweb", seed=4)


def test_source_resolution_and_errors(tok, monkeypatch, tmp_path):
    monkeypatch.setenv("EMLIB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert corpus.is_online() is False
    assert corpus.resolve_source("auto", 2, 64, tok) == "offline"
    assert corpus.resolve_source("offline") == "offline"
    with pytest.raises(ValueError, match="Unknown text source"):
        corpus.load_texts(2, 64, tok, source="web")
    with pytest.raises(ValueError, match="tokenizer"):
        corpus.load_texts(2, 64, None)
    monkeypatch.setattr(corpus, "datasets_available", lambda: False)
    with pytest.raises(corpus.CorpusError, match="pip install datasets"):
        corpus.load_texts(2, 64, tok, source="fineweb")


def test_missing_offline_package_says_what_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(corpus.importlib.metadata, "distribution", missing)
    with pytest.raises(corpus.CorpusError, match="pip install --no-deps gensim==4.4.0"):
        corpus.offline_documents()
