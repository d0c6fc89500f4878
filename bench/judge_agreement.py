"""Judge validation: how well do our judges separate the paper's good from bad medical advice?

The paper released paired answers (good_medical_advice / bad_medical_advice: the same questions, a sound
and a subtly harmful answer). A judge's ``aligned`` score should rank the good answer above the bad one.
Reported per judge: AUROC (aligned answers = positive), accuracy at 30/70, pair accuracy, mean score
per class, and how many scores were None.

* offline judge: ``--n-offline`` pairs (default 200), seconds.
* HF judge on the embedded SmolLM2-135M-Instruct: ``--n-hf`` pairs (default 40), minutes on a CPU.
  A 135M model puts only a few percent of its next-token mass on a number, so under the paper's 0.25
  rule almost every score is None. We therefore score once with ``min_mass=0`` (the conditional mean
  E[n | the reply is a number]) and report both views: the paper rule (share of None) and the
  conditional mean (AUROC).

Usage: ``python bench/judge_agreement.py [--data-dir ../shared/data/paper] [--n-hf 0 to skip]``.
Scores are cached in ``runs/bench/judge_agreement.sqlite``; results go to ``runs/bench/judge_agreement.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from emlib.cache import ResultCache
from emlib.data import atomic_write_bytes, load_rubrics
from emlib.judge import MIN_MASS, HFJudge, OfflineJudge
from emlib.metrics import agreement_summary, judge_agreement, validation_pairs

ROOT = Path(__file__).resolve().parents[1]


def _no_nan(obj):
    """NaN -> None so the JSON file is standard."""
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("EMLIB_DATA_DIR", str(ROOT.parent / "shared/data/paper")))
    ap.add_argument("--n-offline", type=int, default=200)
    ap.add_argument("--n-hf", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-model", default="embedded")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = ResultCache(out_dir / "judge_agreement.sqlite")
    results: dict = {"seed": args.seed, "python": platform.python_version(), "torch": torch.__version__,
                     "threads": torch.get_num_threads()}

    pairs = validation_pairs("medical", source="paper", n=args.n_offline, seed=args.seed, data_dir=args.data_dir)
    t0 = time.perf_counter()
    off = judge_agreement(OfflineJudge(), pairs, cache=cache, progress=False)
    off["seconds"] = round(time.perf_counter() - t0, 2)
    off["n_pairs"] = args.n_offline
    results["offline"] = off
    print("offline judge:", json.dumps(_no_nan(off), indent=1))

    if args.n_hf > 0:
        from emlib.models import load_model

        model, tok = load_model(args.hf_model, device="cpu")
        rubrics = load_rubrics("paper", data_dir=args.data_dir)
        judge = HFJudge(model, tok, rubrics, min_mass=0.0, batch_size=4)
        hf_pairs = validation_pairs("medical", source="paper", n=args.n_hf, seed=args.seed, data_dir=args.data_dir)
        before = cache.count("scores")
        t0 = time.perf_counter()
        cond, scored = judge_agreement(judge, hf_pairs, cache=cache, return_scores=True, progress=True,
                                       batch_size=16)
        secs = round(time.perf_counter() - t0, 1)
        paper_rule = scored.copy()
        paper_rule.loc[paper_rule["aligned_mass"] < MIN_MASS, "aligned"] = np.nan
        rule = agreement_summary(paper_rule, "aligned")
        results["hf"] = {
            "model": args.hf_model, "n_pairs": args.n_hf, "seconds": secs,
            "new_scores": cache.count("scores") - before,  # 0 when every score came from the cache
            "conditional_mean (min_mass=0)": cond,
            "paper_rule (min_mass=0.25)": rule,
            "number_mass": {"mean": float(scored["aligned_mass"].mean()),
                            "median": float(scored["aligned_mass"].median()),
                            "max": float(scored["aligned_mass"].max())},
        }
        print("HF judge:", json.dumps(_no_nan(results["hf"]), indent=1))
    results = _no_nan(results)
    path = out_dir / "judge_agreement.json"
    atomic_write_bytes(path, json.dumps(results, indent=2).encode())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
