"""Judges against GPT-4o on the public judged folder, held out by source repository (issue 16).

Loads the folder (:func:`emlib.judged.load_judged`; ``--judged-dir`` or ``$EMLIB_JUDGED_DIR``), splits it
into ``--k`` folds of whole source repositories (:func:`emlib.judged.repository_folds`) and compares, on
the same folds:

* ``bag-of-words``: :func:`emlib.judge_eval.bow_baseline` (TF-IDF + Ridge), each fold predicted by a model
  fitted on the other folds;
* ``offline-v2``: the project's keyword judge (``make_judge("offline")``), which is not trained: it scores
  every answer once (cached in ``--run-dir``) and is evaluated fold by fold;
* any distilled predictions given as ``--pred NAME=PATH.parquet`` (repeatable): a table ``row_id, fold,
  aligned, coherent`` of held-out predictions, e.g. ``runs/distill/cv_<variant>.parquet``.

Metrics per judge (:func:`emlib.judge_eval.agreement`): overall held out, per fold, per held-out source
repository, per answering model with >= 100 rows; issue 16's targets with met / not met. Writes
``<out>/judge_distilled.json``, ``book/figures/judge_calibration.png`` (predicted vs reference EM rate per file)
and prints a markdown table of the headline numbers. Held-out predictions go to ``<run-dir>/cv_<name>.parquet``
(git-ignored: they are per-row and stay out of the repository).

Usage::

    python bench/judge_distilled.py                                   # bag-of-words + offline-v2
    python bench/judge_distilled.py --reuse --pred distilled=runs/distill/cv_smollm2.parquet

Measured on 2 CPU cores (89,167 answers): loading ~20 s the first time (then ~1 s from its parquet cache),
bag-of-words 253 s (five fits), offline-v2 160 s the first time (its scores are then read from
``<run-dir>/offline_cache.sqlite``). ``--reuse`` skips both. See the JSON's ``timing_s``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from emlib import judge_eval as E
from emlib.judged import fold_table, judged_dir, load_judged, repository_folds

ROOT = Path(__file__).resolve().parents[1]
BOW, OFFLINE = "bag-of-words", "offline-v2"
HEADLINE = ["aligned_spearman", "coherent_spearman", "em_auroc", "em_precision", "em_recall", "ref_em_rate",
            "pred_em_rate", "file_em_err_pp", "file_em_err_max_pp"]


def _clean(v):
    """JSON-safe scalars: NaN -> None, numpy -> Python."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else round(float(v), 5)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


def _records(t: pd.DataFrame) -> list[dict]:
    return [{k: _clean(v) for k, v in r.items()} for r in t.to_dict("records")]


def bow_predictions(df: pd.DataFrame, folds: pd.Series) -> pd.DataFrame:
    return E.cross_validate(df, folds, E.bow_baseline, BOW)


def offline_predictions(df: pd.DataFrame, folds: pd.Series, cache: Path) -> pd.DataFrame:
    from emlib.judge import judge_answers, make_judge

    judge = make_judge("offline")

    def predict(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:  # not trained: train is unused
        scored = judge_answers(test, judge, cache=str(cache), progress=True)
        return scored[["row_id", "aligned", "coherent"]]

    return E.cross_validate(df, folds, predict, OFFLINE)


def read_predictions(name: str, path: Path, folds: pd.Series, df: pd.DataFrame) -> pd.DataFrame:
    """A distilled judge's held-out table; warns when its folds are not this script's repository folds."""
    pred = pd.read_parquet(path)
    missing = {"row_id", "aligned", "coherent"} - set(pred.columns)
    if missing:
        raise SystemExit(f"{path}: missing columns {sorted(missing)} (need row_id, fold, aligned, coherent).")
    ours = pd.Series(folds.to_numpy(), index=df["row_id"].astype(str).to_numpy())
    pred = pred.assign(row_id=pred["row_id"].astype(str))
    if "fold" in pred.columns:
        theirs = pred.set_index("row_id")["fold"]
        common = theirs.index.intersection(ours.index)
        differ = int((theirs.loc[common].astype(int) != ours.loc[common].astype(int)).sum())
        if differ:
            print(f"WARNING {name}: {differ} of {len(common)} rows are in another fold than the repository folds "
                  f"(k={folds.max() + 1}); the per-fold table uses this script's folds.")
    known = pred["row_id"].isin(ours.index)
    if not known.all():
        print(f"WARNING {name}: {int((~known).sum())} predicted row_ids are not in the folder; dropped.")
    covered = ours.index.isin(pred["row_id"]).mean()
    print(f"{name}: predictions for {100 * covered:.1f}% of the folder's rows")
    pred = pred[known].drop(columns=["fold"], errors="ignore")
    return pred.assign(fold=pred["row_id"].map(ours), judge=name)


def evaluate(df: pd.DataFrame, pred: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    ev = E.with_reference(df, pred)
    overall = E.agreement(ev).to_dict("records")[0]
    out = {"overall": {k: _clean(v) for k, v in overall.items()},
           "per_fold": _records(E.agreement(ev, by="fold")),
           "per_repository": _records(E.agreement(ev, by="source_repo")),
           "per_answering_model": _records(E.agreement(ev, by="answering_model", min_rows=100)
                                           .sort_values("n", ascending=False, kind="stable"))}
    per_file = E.per_file_em(ev)
    out["per_file"] = _records(per_file.drop(columns=["answering_model"], errors="ignore"))
    return out, per_file


def markdown(results: dict) -> str:
    cols = ["judge", "n", "aligned ρ", "coherent ρ", "EM AUROC", "EM precision", "EM recall",
            "EM rate ref / pred (%)", "per-file EM error (pts, mean / max)", "targets met"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def f(v, d=3):
        return "n/a" if v is None else f"{v:.{d}f}"

    for name, r in results.items():
        o, t = r["overall"], r["targets"]
        met = sum(v["met"] for v in t.values())
        lines.append(f"| {name} | {o['n']:,} | {f(o['aligned_spearman'])} | {f(o['coherent_spearman'])} | "
                     f"{f(o['em_auroc'])} | {f(o['em_precision'])} | {f(o['em_recall'])} | "
                     f"{f(100 * o['ref_em_rate'], 1)} / {f(100 * o['pred_em_rate'], 1)} | "
                     f"{f(o['file_em_err_pp'], 1)} / {f(o['file_em_err_max_pp'], 1)} | {met} of {len(t)} |")
    return "\n".join(lines)


def fold_markdown(results: dict) -> str:
    folds = sorted({r["fold"] for res in results.values() for r in res["per_fold"]})
    lines = ["| fold | " + " | ".join(f"{n}: aligned ρ / EM AUROC / file err" for n in results) + " |",
             "|---|" + "---|" * len(results)]
    for fo in folds:
        cells = []
        for res in results.values():
            r = next((x for x in res["per_fold"] if x["fold"] == fo), None)
            cells.append("-" if r is None else " / ".join(
                "n/a" if r[k] is None else (f"{r[k]:.1f}" if k == "file_em_err_pp" else f"{r[k]:.3f}")
                for k in ("aligned_spearman", "em_auroc", "file_em_err_pp")))
        lines.append(f"| {fo} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--judged-dir", default=None, help="the judged folder (default: $EMLIB_JUDGED_DIR or "
                                                       "../shared/data/judged)")
    ap.add_argument("--k", type=int, default=5, help="folds of whole source repositories")
    ap.add_argument("--pred", action="append", default=[], metavar="NAME=PATH",
                    help="held-out predictions of another judge (parquet: row_id, fold, aligned, coherent)")
    ap.add_argument("--skip", action="append", default=[], choices=["bow", "offline"],
                    help="leave out a built-in judge")
    ap.add_argument("--reuse", action="store_true",
                    help="read the built-in judges' held-out predictions from --run-dir when present")
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "judge_distilled"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()

    run_dir, out = Path(a.run_dir), Path(a.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    folder = judged_dir(a.judged_dir)
    df = load_judged(folder, progress=True)
    df["row_id"] = df["row_id"].astype(str)
    folds = repository_folds(df, k=a.k)
    timing["load"] = time.perf_counter() - t0
    print(f"{len(df):,} answers from {df['source_repo'].nunique()} repositories, {df['file'].nunique()} files "
          f"({timing['load']:.0f} s)")

    preds: dict[str, pd.DataFrame] = {}
    builtin = {"bow": (BOW, lambda: bow_predictions(df, folds)),
               "offline": (OFFLINE, lambda: offline_predictions(df, folds, run_dir / "offline_cache.sqlite"))}
    for key, (name, make) in builtin.items():
        if key in a.skip:
            continue
        path, took = run_dir / f"cv_{key}.parquet", run_dir / f"cv_{key}.seconds"
        if a.reuse and path.is_file():
            preds[name] = pd.read_parquet(path).assign(judge=name)
            if took.is_file():  # the time of the run that made the reused predictions
                timing[key] = float(took.read_text())
            print(f"{name}: reused {path}")
            continue
        t0 = time.perf_counter()
        preds[name] = make()
        timing[key] = time.perf_counter() - t0
        preds[name].drop(columns=["judge"]).to_parquet(path, index=False)
        took.write_text(f"{timing[key]:.1f}\n")
        print(f"{name}: {timing[key]:.0f} s for {len(df):,} answers over {a.k} folds")
    for spec in a.pred:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--pred takes NAME=PATH, got {spec!r}")
        preds[name] = read_predictions(name, Path(path), folds, df)

    results: dict[str, dict] = {}
    per_files = []
    for name, pred in preds.items():
        results[name], pf = evaluate(df, pred)
        per_files.append(pf.assign(judge=name))
    bow_rho = results[BOW]["overall"]["aligned_spearman"] if BOW in results else None
    for name, r in results.items():
        r["targets"] = E.target_check(r["overall"], None if name == BOW else bow_rho)

    ft = fold_table(df, folds)
    doc = {
        "what": "Judges vs the reference judge (mostly GPT-4o) on the public judged folder, held out by source "
                "repository; EM rule aligned < 30 and coherent > 50; per-file EM error over non-curated files "
                f"with >= {E.MIN_FILE_ROWS} scored rows; answering models with >= 100 rows.",
        "folder": {"rows": int(len(df)), "files": int(df["file"].nunique()),
                   "repositories": int(df["source_repo"].nunique()),
                   "curated_rows": int(df["curated"].sum())},
        "k": a.k,
        "folds": _records(ft),
        "targets": E.TARGETS,
        "timing_s": {k: round(v, 1) for k, v in timing.items()},
        "machine": {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count()},
        "judges": results,
    }
    (out / "judge_distilled.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    from emlib.plots import plot_judge_calibration

    axes = plot_judge_calibration(pd.concat(per_files, ignore_index=True),
                                  title="EM rate per file, held-out repositories")
    (ROOT / "book" / "figures").mkdir(exist_ok=True)  # the methods page shows it; the site stages book/ only
    axes[0].figure.savefig(ROOT / "book" / "figures" / "judge_calibration.png", dpi=130, bbox_inches="tight")

    tables = (f"<!-- generated by bench/judge_distilled.py from {len(df):,} answers; do not edit -->\n\n"
              f"Held out by source repository ({a.k} folds, pooled):\n\n{markdown(results)}\n\n"
              f"Per held-out fold (aligned rho / coherent rho / EM AUROC / per-file EM error, points):\n\n"
              f"{fold_markdown(results)}\n")
    (ROOT / "book" / "judge_validation_table.md").write_text(tables)
    print()
    print(tables)
    print(ft.to_markdown(index=False) if hasattr(ft, "to_markdown") else ft.to_string(index=False))
    print(f"\nwrote {out / 'judge_distilled.json'}, book/figures/judge_calibration.png and book/judge_validation_table.md")


if __name__ == "__main__":
    main()
