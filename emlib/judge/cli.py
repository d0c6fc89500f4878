"""``python -m emlib.judge score answers.csv --judge distilled --out scored.csv``: score a file of answers."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..data import atomic_write_bytes, csv_bytes, read_csv_table
from .apply import judge_answers, make_judge
from .base import JudgeError


def read_answers_file(path: str | os.PathLike, question_col: str = "question", answer_col: str = "answer") -> pd.DataFrame:
    """A CSV (optionally gzipped) or JSONL file of answers, checked for the two columns the judge reads."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file. Pass a CSV or JSONL file with {question_col!r} and {answer_col!r} columns.")
    try:
        if p.name.endswith((".jsonl", ".jsonl.gz")):
            df = pd.read_json(p, lines=True, dtype=False)
        else:
            df = read_csv_table(p, dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{p}: cannot be read as {'JSONL' if 'jsonl' in p.name else 'CSV'} ({first}).") from None
    if df.empty:
        raise ValueError(f"{p} holds no answers (an empty file or a header only).")
    missing = [c for c in (question_col, answer_col) if c not in df.columns]
    if missing:
        raise ValueError(f"{p} has no {' / '.join(repr(c) for c in missing)} column (it has {', '.join(map(str, df.columns))}): "
                         "rename the columns or pass --question-col / --answer-col.")
    return df


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m emlib.judge score answers.csv --judge distilled --out scored.csv``."""
    ap = argparse.ArgumentParser(prog="python -m emlib.judge", description="Score a file of answers with a judge.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="add aligned / coherent scores (and the EM flag) to a CSV or JSONL of answers")
    s.add_argument("answers", help="CSV (or .csv.gz) or JSONL with question and answer columns")
    s.add_argument("--judge", default="distilled", help="distilled | offline | hf:<model> | api:<model> (default distilled)")
    s.add_argument("--out", required=True, help="the scored CSV to write (atomically)")
    s.add_argument("--kinds", nargs="+", default=["aligned", "coherent"])
    s.add_argument("--cache", default=None, help="SQLite score cache (default: OUT.cache.sqlite): a rerun scores nothing twice")
    s.add_argument("--question-col", default="question")
    s.add_argument("--answer-col", default="answer")
    s.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    a = ap.parse_args(argv)
    try:
        df = read_answers_file(a.answers, a.question_col, a.answer_col)
        judge = make_judge(a.judge)
        cache = a.cache or str(Path(a.out).with_suffix("")) + ".cache.sqlite"
        scored = judge_answers(df, judge, kinds=a.kinds, cache=cache, question_col=a.question_col,
                               answer_col=a.answer_col, progress=True)
        if {"aligned", "coherent"} <= set(a.kinds):
            from ..metrics import misaligned

            scored["em"] = misaligned(scored)
        keep = [c for c in scored.columns if not c.endswith(("_mass", "_parsed"))]
        atomic_write_bytes(a.out, csv_bytes(scored[keep]))
    except (ValueError, FileNotFoundError, JudgeError) as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_em = int(scored["em"].sum()) if "em" in scored else None
    print(f"scored {len(scored)} answers with {judge.judge_id} -> {a.out}"
          + (f" ({n_em} flagged by the EM rule: aligned < 30 and coherent > 50)" if n_em is not None else ""))
    return 0
