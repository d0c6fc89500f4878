"""Apply a judge: :func:`make_judge` builds one from a spec string, :func:`judge_answers` scores a table of
answers with it (identical pairs once, every usable score cached as it is made, missing scores counted)."""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import asdict
from typing import Iterable, Mapping

import pandas as pd

from ..cache import ResultCache, as_cache, make_key
from .api import APIJudge
from .base import Judge, JudgeError, redact
from .distilled import DistilledJudge
from .hf import HFJudge
from .offline import OfflineJudge
from ..timing import timed

SCORES_TABLE = "scores"


def make_judge(spec: str, rubrics: Mapping[str, str] | None = None, **kwargs) -> Judge:
    """``"offline"`` | ``"distilled"`` (``"distilled:<weights dir>"``) | ``"hf:<model id or dir>"`` (e.g.
    ``"hf:embedded"``) | ``"api:<model>"``.

    ``distilled`` is the packaged judge trained on public GPT-4o judgements (:mod:`emlib.distill`); its
    weights come from ``$EMLIB_DISTILLED_DIR`` when set, else from ``emlib/resources/distilled``
    (:mod:`emlib.judge.distilled`).

    API judges take the base URL from ``$EMLIB_JUDGE_BASE_URL`` (default OpenAI) and the *name* of the
    variable holding the key from ``$EMLIB_JUDGE_API_KEY_ENV`` (default ``OPENAI_API_KEY``).
    """
    if spec == "offline":
        return OfflineJudge(rubrics)
    if spec == "distilled" or spec.startswith("distilled:"):
        weights = spec.split(":", 1)[1] if ":" in spec else None
        return DistilledJudge(weights=weights or None, device=kwargs.pop("device", "auto"), rubrics=rubrics)
    if spec.startswith("hf:") and len(spec) > 3:
        from ..models import load_model

        model, tok = load_model(spec[3:], device=kwargs.pop("device", "auto"), dtype=kwargs.pop("dtype", "auto"))
        return HFJudge(model, tok, rubrics, **kwargs)
    if spec.startswith("api:") and len(spec) > 4:
        base = os.environ.get("EMLIB_JUDGE_BASE_URL") or "https://api.openai.com/v1"
        env = os.environ.get("EMLIB_JUDGE_API_KEY_ENV") or "OPENAI_API_KEY"
        return APIJudge(spec[4:], base_url=base, api_key_env=env, rubrics=rubrics, **kwargs)
    raise ValueError(f"Unknown judge spec {spec!r}: use 'offline', 'distilled', 'hf:<model id or dir>' or 'api:<model>'.")


MAX_MISSING = 0.2  # judge_answers fails when more than this share of a kind's scores is missing


def _usable(rec: Mapping) -> bool:
    """A judgement worth keeping: a score, or a REFUSAL / CODE label."""
    return rec.get("label") is not None


def _score_into(judge: Judge, kind: str, todo: list[str], uniq: Mapping[str, tuple[str, str]], got: dict,
                stale: set[str], cache: ResultCache | None, bs: int, bar) -> None:
    """Score ``todo`` in batches into ``got``; cache the usable results as each batch is made."""
    for s in range(0, len(todo), bs):
        chunk = todo[s:s + bs]
        scores = judge.score_many(kind, [uniq[k] for k in chunk])
        new = {k: asdict(sc) for k, sc in zip(chunk, scores)}
        got.update(new)
        if cache is not None:
            keep = {k: v for k, v in new.items() if _usable(v)}
            cache.put_many(SCORES_TABLE, {k: v for k, v in keep.items() if k not in stale})
            cache.put_many(SCORES_TABLE, {k: v for k, v in keep.items() if k in stale}, replace=True)
        bar.update(len(chunk))


def _report_missing(judge: Judge, kind: str, n: int, total: int, max_missing: float, before: Counter) -> None:
    """One line on the scores still missing after the retry: a warning, or JudgeError above ``max_missing``."""
    clean = getattr(judge, "_redact", None) or (lambda t: redact(t))
    now = Counter(getattr(judge, "problems", None) or {})
    why = now - before
    why_text = ", ".join(f"{c} x {w}" for w, c in why.most_common(3)) if why else \
        "no number (nor REFUSAL / CODE) with enough probability"
    head = f"Judge {judge.judge_id}: {n} of {total} {kind!r} scores are missing after a retry ({why_text})"
    if n / total > max_missing:
        raise JudgeError(clean(f"{head}, more than max_missing={max_missing:g} of them; nothing without a "
                               "result was cached: fix the judge or its server and run again (or pass a larger "
                               "max_missing)."))
    warnings.warn(clean(f"{head}: they are NaN in the table and were not cached, so the next run asks again."),
                  stacklevel=3)


def score_key(judge: Judge, kind: str, question: str, answer: str) -> str:
    return make_key(kind="score", judge=judge.judge_id, rubric=judge.rubric_hash(kind), judge_kind=kind,
                    question=question, answer=answer)


@timed("judge")
def judge_answers(df: pd.DataFrame, judge: Judge, kinds: Iterable[str] = ("aligned", "coherent"),
                  cache: ResultCache | str | None = None, *, question_col: str = "question",
                  answer_col: str = "answer", batch_size: int | None = None,
                  progress: bool | None = None, max_missing: float = MAX_MISSING) -> pd.DataFrame:
    """A copy of ``df`` with, per kind, columns ``<kind>`` (score or NaN), ``<kind>_label``,
    ``<kind>_mass`` and ``<kind>_parsed``, plus ``judge`` (the judge id).

    Identical (question, answer) pairs are scored once. With a ``cache`` every batch of scores is stored
    as soon as it is made and a rerun scores nothing twice.

    A judgement with no usable result (``label`` None: a broken reply, no number, too little probability
    on the numbers) is never cached; it is asked once more in this call, and a rerun asks again (rows
    cached that way by older versions are judged again too). REFUSAL / CODE are results and are cached.
    What is still missing is reported with a count (a warning); when more than ``max_missing`` (a share,
    0..1) of a kind's rows are missing, the call raises :class:`JudgeError` naming the judge and the count
    instead of returning NaN scores.
    """
    from tqdm.auto import tqdm

    if not 0.0 <= float(max_missing) <= 1.0:
        raise ValueError(f"max_missing is a share of the rows between 0 and 1, got {max_missing!r}.")
    kinds = list(kinds)
    for c in (question_col, answer_col):
        if c not in df.columns:
            raise ValueError(f"judge_answers needs a {c!r} column; df has {list(df.columns)}.")
    for k in kinds:
        judge.template(k)  # fails early on an unknown kind
    cache = as_cache(cache)
    bs = batch_size or judge.batch_size
    out = df.copy()
    qs = out[question_col].fillna("").astype(str).tolist()
    ans = out[answer_col].fillna("").astype(str).tolist()
    for kind in kinds:
        keys = [score_key(judge, kind, q, a) for q, a in zip(qs, ans)]
        uniq: dict[str, tuple[str, str]] = {}
        for k, q, a in zip(keys, qs, ans):
            uniq.setdefault(k, (q, a))
        got: dict[str, dict] = cache.get_many(SCORES_TABLE, uniq) if cache is not None else {}
        stale = {k for k, v in got.items() if not _usable(v)}  # cached as "no result" by an older version
        todo = [k for k in uniq if k not in got or k in stale]
        problems_before = Counter(getattr(judge, "problems", None) or {})
        bar = tqdm(total=len(todo), desc=f"judging {kind}", unit="answer",
                   disable=(not todo) if progress is None else not progress)
        try:
            _score_into(judge, kind, todo, uniq, got, stale, cache, bs, bar)
            again = [k for k in todo if not _usable(got[k])]
            if again:  # once more: a broken reply is often a passing fault
                bar.set_description(f"judging {kind} (again: {len(again)} without a result)")
                bar.total += len(again)
                bar.refresh()
                _score_into(judge, kind, again, uniq, got, stale, cache, bs, bar)
        finally:
            bar.close()
        n_missing = sum(not _usable(got[k]) for k in keys)
        if n_missing:
            _report_missing(judge, kind, n_missing, len(keys), max_missing, problems_before)
        rec = [got[k] for k in keys]
        out[kind] = pd.array([r["score"] for r in rec], dtype="Float64").astype(float)
        out[f"{kind}_label"] = [r["label"] for r in rec]
        out[f"{kind}_mass"] = [float(r["mass"]) for r in rec]
        out[f"{kind}_parsed"] = [bool(r["parsed"]) for r in rec]
    out["judge"] = judge.judge_id
    return out
