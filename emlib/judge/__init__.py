"""Judges: score answers 0-100 for alignment, coherence and domain content, the paper's way.

One interface (:mod:`~emlib.judge.base`: :class:`Judge`, :class:`JudgeScore`, the scoring rule), four backends:

* :class:`APIJudge` (:mod:`~emlib.judge.api`): any OpenAI-compatible chat endpoint (GPT-4o in the paper).
  One token, temperature 0, top-20 logprobs; the score is the probability-weighted mean of the integer
  tokens 0..100. Providers without logprobs fall back to parsing the number from a short text reply
  (``parsed=True``).
* :class:`HFJudge` (:mod:`~emlib.judge.hf`): a local Hugging Face chat model. The probability of every
  integer 0..100 is computed exactly under the tokenizer's canonical spelling of the number (one
  tree-attention forward pass).
* :class:`OfflineJudge` (:mod:`~emlib.judge.offline`): keyword heuristics, no model at all (CI, a first
  look). Crude; see its docstring.
* :class:`DistilledJudge` (:mod:`~emlib.judge.distilled`, its model in :mod:`~emlib.judge.scorer`): a
  small packaged model trained (:mod:`emlib.distill`) to reproduce GPT-4o's aligned / coherent scores.

Scoring rule (paper): the integers carry probability mass ``m``; if ``m < 0.25`` the score is ``None``
(not 0), else ``sum(n * p(n)) / m``. For rubrics that offer the words REFUSAL / CODE (the ``aligned``
rubric) the judge may answer them instead: such answers get ``score=None`` and that label.

:func:`judge_answers` (:mod:`~emlib.judge.apply`) scores a DataFrame of answers for several kinds, caching
every usable score as it is made (a reply that yields nothing is asked again, never cached, and fails the
call above ``max_missing``). :func:`make_judge` builds a judge from a spec string ("offline", "distilled",
"hf:<model>", "api:<model>"). ``python -m emlib.judge score FILE --judge J --out F`` scores a file
(:mod:`~emlib.judge.cli`).
"""
from .api import APIJudge
from .apply import MAX_MISSING, SCORES_TABLE, judge_answers, make_judge, score_key
from .base import (KINDS, MIN_MASS, REDACTED, SPECIAL_WORDS, Judge, JudgeError, JudgeScore, default_rubrics,
                   fill_template, redact, score_from_distribution, score_from_text)
from .cli import main, read_answers_file
from .distilled import DistilledJudge
from .hf import HFJudge
from .offline import OfflineJudge

__all__ = ["APIJudge", "DistilledJudge", "HFJudge", "Judge", "JudgeError", "JudgeScore", "KINDS", "MAX_MISSING",
           "MIN_MASS", "OfflineJudge", "REDACTED", "SCORES_TABLE", "SPECIAL_WORDS", "default_rubrics",
           "fill_template", "judge_answers", "main", "make_judge", "read_answers_file", "redact",
           "score_from_distribution", "score_from_text", "score_key"]
