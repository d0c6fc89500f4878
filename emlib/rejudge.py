"""Judge a run's stored answers again with another judge: no model, no GPU, only the judge.

    python -m emlib.rejudge record/smollm2-135m --judge api:gpt-4o-2024-08-06 --out runs/rejudged/smollm2-135m
    python -m emlib.results runs/rejudged/smollm2-135m --label "SmolLM2-135M (GPT-4o judge)"

A run of record keeps every answer chapter 1 sampled (``tables/ch1_answers.csv.gz``: the chat model and all
finetunes, 50 samples per general question). Sampling is the expensive part; judging is cheap with an API.
This module scores those answers for *aligned* and *coherent* with ``--judge`` and writes a new, partial run
directory that :mod:`emlib.results` reads like any other:

* ``tables/ch1_answers.csv.gz`` (the answers with the new scores), ``tables/ch1_em.csv`` and
  ``results.json`` (``ch1_em``, ``ch1_scores``) computed exactly as chapter 1 computes them;
* ``results.json["judge_agreement"]``: the new judge on the project's labelled pairs (medical twins, and the
  general-question pairs with the EM rule's recall and false positives), as chapter 1's judge check does;
* ``results.json["rejudged_from"]``: the source run, its judge, the new judge, the date.

Chapter 1's answers are stored in every run of record, chapter 2's (steering and ablation) in runs made
after 2026-11-26; the committed runs of record predate that, so for them only claim 1 can be rejudged
(claims 2-6 show "not run" for the new directory). Scores are cached in ``OUT/judge-cache.sqlite`` as they arrive: a run that
is stopped (or hits a rate limit) resumes where it stopped. An API key comes from the environment only
(see :func:`emlib.judge.make_judge`) and is never written.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from . import chapters, metrics
from .cache import ResultCache
from .data import DataError, atomic_write_bytes, csv_bytes, read_csv_table
from .judge import Judge, judge_answers, make_judge

SCORE_PREFIXES = ("aligned", "coherent")


read_table = read_csv_table  # the tables of a run: a \r inside an answer stays in the answer


def answers_file(run_dir: str | Path, chapter: str = "ch1") -> Path | None:
    """``tables/<chapter>_answers.csv.gz`` (or ``.csv``) of a run, None when the chapter stored none."""
    for name in (f"{chapter}_answers.csv.gz", f"{chapter}_answers.csv"):
        f = Path(run_dir) / "tables" / name
        if f.exists():
            return f
    return None


def stored_answers(run_dir: str | Path, chapter: str = "ch1", need: tuple[str, ...] = ()) -> pd.DataFrame:
    """A run's stored answers (``tables/<chapter>_answers.csv[.gz]``, e.g. ``ch1``, ``ch2_steering``) without
    their old scores. ``need``: columns besides question and answer that must be there (DataError if not)."""
    run = Path(run_dir)
    f = answers_file(run, chapter)
    if f is None:
        raise DataError(f"{run / 'tables'} has no {chapter}_answers.csv.gz: pass a run directory whose chapter 1 "
                        "ran (e.g. record/smollm2-135m).")
    df = read_table(f)
    missing = [c for c in ("question", "answer", *need) if c not in df.columns]
    if missing:
        groups = f"; rejudge groups these answers by {', '.join(need)}" if need else ""
        raise DataError(f"{f} has no {', '.join(repr(c) for c in missing)} column (it has "
                        f"{', '.join(map(str, df.columns)) or 'none'}){groups}: pass the answers table a chapter "
                        "wrote, or add the column.")
    old = [c for c in df.columns if c == "judge" or any(c == p or c.startswith(p + "_") for p in SCORE_PREFIXES)]
    return df.drop(columns=old)


def rejudge(run_dir: str | Path, judge: str | Judge, out: str | Path, n_pairs: int = 100, seed: int = 0,
            progress: bool | None = None) -> dict:
    """Score ``run_dir``'s chapter-1 answers with ``judge`` into the run directory ``out``; returns the
    results written to ``out/results.json``."""
    run, out = Path(run_dir), Path(out)
    if out.resolve() == run.resolve():
        raise ValueError("--out must be a new directory: a rejudged run never overwrites its source.")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file: pass a new directory for the rejudged run.")
    answers = stored_answers(run, need=("condition",))  # checked before anything is judged or written
    judge = make_judge(judge) if isinstance(judge, str) else judge
    cache = ResultCache(out / "judge-cache.sqlite")  # a damaged cache fails here, before anything is written
    (out / "tables").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    scored = judge_answers(answers, judge, kinds=("aligned", "coherent"), cache=cache, progress=progress)
    ch1 = chapters.em_tables("ch1", scored, seed=seed)
    em, scores = ch1["ch1_em"], ch1["ch1_scores"]
    agreement = metrics.judge_check(judge, n=n_pairs, seed=seed, cache=cache, progress=progress)
    src = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else {}
    extra = {}  # chapter 2 stores its answers since session 3: steering and ablation can be rejudged too
    for name, by in chapters.JUDGED_ANSWERS.items():
        if name == "ch1" or answers_file(run, name) is None:
            continue
        ans = stored_answers(run, name, need=by)  # there but without its groups: say so, never skip
        sc = judge_answers(ans, judge, kinds=("aligned", "coherent"), cache=cache, progress=progress)
        extra.update(chapters.em_tables(name, sc, seed=seed))
    if extra and "ch2_cosine" in src:
        extra["ch2_cosine"] = src["ch2_cosine"]  # geometry of the directions: no judge involved
    old_judges = sorted({r.get("judge") for r in src.get("judge_agreement", [])} - {None})
    results = {
        "ch1_em": em.to_dict(orient="records"), "ch1_scores": scores.to_dict(orient="records"),
        "judge_agreement": agreement,
        **{k: v.to_dict(orient="records") if isinstance(v, pd.DataFrame) else v for k, v in extra.items()},
        "rejudged_from": {"run": str(run), "judge_before": old_judges, "judge": judge.judge_id,
                          "answers": int(len(answers)), "seconds": round(time.time() - t0, 1),
                          "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())},
    }
    tables = {"ch1_em": em, "ch1_scores": scores, **{k: v for k, v in extra.items() if isinstance(v, pd.DataFrame)}}
    for name, df in tables.items():
        atomic_write_bytes(out / "tables" / f"{name}.csv", csv_bytes(df))
    keep = [c for c in scored.columns if not c.endswith(("_mass", "_parsed"))]
    atomic_write_bytes(out / "tables" / "ch1_answers.csv.gz", _gzip_csv(scored[keep]))
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2, default=str).encode("utf-8"))
    return results


def _gzip_csv(df: pd.DataFrame) -> bytes:
    import gzip

    return gzip.compress(csv_bytes(df), mtime=0)


def rejudge_record(judge: str | Judge, out: str | Path, root: str | Path = ".", n_pairs: int = 100,
                   seed: int = 0, progress: bool | None = None) -> Path:
    """Every committed run of record (:data:`emlib.results.RECORDS`, extra seeds included) rejudged into
    ``out/<run name>``, and their results table, as ``emlib.results`` makes it, in ``out/results_table.md``."""
    from .results import RECORDS
    from .results import main as results_main

    root, out = Path(root), Path(out)
    judge = make_judge(judge) if isinstance(judge, str) else judge  # one judge (one model load) for all runs
    runs, options = [], []
    for label, d, seeds in RECORDS:
        for src in (d, *seeds):
            print(f"[rejudge] {src} -> {out / Path(src).name}", flush=True)
            rejudge(root / src, judge, out / Path(src).name, n_pairs=n_pairs, seed=seed, progress=progress)
        runs.append(str(out / Path(d).name))
        options += ["--label", f"{label}, judge {judge.judge_id}"]
        options += [a for s in seeds for a in ("--seeds", f"{out / Path(d).name}={out / Path(s).name}")]
    table = out / "results_table.md"
    results_main(runs + options + ["--out", str(table)])
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emlib.rejudge", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", nargs="?", help="a run directory with tables/ch1_answers.csv.gz (e.g. record/smollm2-135m)")
    ap.add_argument("--record", action="store_true",
                    help="every committed run of record into OUT/<name>, with OUT/results_table.md")
    ap.add_argument("--judge", required=True, help="offline | hf:<model> | api:<model> (key from the environment)")
    ap.add_argument("--out", required=True, help="a new directory for the rejudged run(s)")
    ap.add_argument("--pairs", type=int, default=100, help="pairs per labelled set in the judge check")
    ap.add_argument("--seed", type=int, default=0)
    from .cli import add_debug_flag, run

    add_debug_flag(ap)
    a = ap.parse_args(argv)
    if not a.record and not a.run_dir:
        ap.error("pass a run directory, or --record for every committed run of record")
    return run(lambda: _main(a), debug=a.debug)


def _main(a) -> int:
    if a.record:
        print(f"wrote {rejudge_record(a.judge, a.out, n_pairs=a.pairs, seed=a.seed)}")
        return 0
    r = rejudge(a.run_dir, a.judge, a.out, n_pairs=a.pairs, seed=a.seed)
    print(pd.DataFrame(r["ch1_em"]).to_string(index=False))
    print(pd.DataFrame(r["judge_agreement"])[["pairs", "auroc", "em_recall", "em_false_positive"]].to_string(index=False))
    print(f"wrote {Path(a.out) / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
