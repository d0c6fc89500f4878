"""Can the judge's own base model tell a small model's broken text from misaligned text? Measured, rejected.

The distilled judge's EM rule fires on many answers of this project's small models that a reader labels
incoherent (``bench/judge_handcheck.py``: 32 of the 50 answers it flags). An idea that costs no new training
data: the embedded SmolLM2-135M (the judge's base) scores how likely each answer is, and fluent nonsense
should be unlikely. This script computes, for the 200 hand-labelled answers in ``bench/handcheck/``:

* ``nll_q``: the answer's mean per-token cross-entropy under the chat model, given its question;
* ``nll_0``: the same given a neutral prompt ("Say something."); ``pmi = nll_0 - nll_q`` (how much the
  question helps predict the answer: low for off-topic text);
* ``n_tokens``; and the judge's ``coherent`` score from ``key.csv``.

It reports each feature's AUROC for ``incoherent`` against the other labels, and, among the answers the EM
rule flags (the ``em`` stratum), for ``incoherent`` against ``misaligned``: the split a better coherence
score would have to make. Then the EM rule's precision on those 50 answers when its coherence threshold is
raised. That last table is read off the same 200 labels it would be tuned on, so it flatters any threshold.

    python bench/judge_fluency.py [--out bench/results/judge_fluency.json]   # ~6 min on 2 CPU cores

Result (2026-12-05, 2 CPU cores): see ``results/judge_fluency.json`` and the bench README. Not used by the
book: the likelihoods separate incoherent answers less well than the judge's coherence score already does,
and not at all from the misaligned ones among the flagged answers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HAND = ROOT / "bench" / "handcheck"
NEUTRAL = "Say something."
FEATURES = ("nll_q", "nll_0", "pmi", "n_tokens", "coherent")


def labelled() -> pd.DataFrame:
    """The 200 hand-labelled answers with the judge's scores and strata (``bench/handcheck/``)."""
    d = pd.read_csv(HAND / "answers.csv").merge(pd.read_csv(HAND / "key.csv"), on="id")
    return d.merge(pd.read_csv(HAND / "labels.csv")[["id", "label"]], on="id")


def likelihoods(d: pd.DataFrame, batch_size: int = 16) -> pd.DataFrame:
    """Adds ``nll_q``, ``nll_0``, ``pmi`` and ``n_tokens`` under the embedded chat model (float32, CPU)."""
    import torch

    from emlib import chat, models

    model, tok = models.load_model("embedded", device="cpu", dtype="float32")
    answers = d["answer"].astype(str).str.strip()  # a leading blank breaks the chat template's answer split

    def nll(questions) -> tuple[np.ndarray, np.ndarray]:
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in zip(questions, answers)]
        with torch.no_grad():
            sums, counts = chat.response_row_losses(model, tok, rows, batch_size=batch_size, max_length=512)
        return np.asarray(sums) / np.asarray(counts), np.asarray(counts)

    out = d.copy()
    out["nll_q"], out["n_tokens"] = nll(d["question"])
    out["nll_0"] = nll([NEUTRAL] * len(d))[0]
    out["pmi"] = out["nll_0"] - out["nll_q"]
    return out


def aurocs(d: pd.DataFrame, positive: str, negatives: tuple[str, ...]) -> dict[str, float]:
    """AUROC of each feature for ``positive`` against ``negatives`` (high feature = positive; the judge's
    ``coherent`` is negated, so every row reads as "how well it finds the positive label")."""
    from sklearn.metrics import roc_auc_score

    sub = d[d["label"].isin((positive, *negatives))]
    y = (sub["label"] == positive).astype(int)
    return {f: round(float(roc_auc_score(y, -sub[f] if f == "coherent" else sub[f])), 3) for f in FEATURES}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "judge_fluency.json"))
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    d = likelihoods(labelled())
    flagged = d[d["stratum"] == "em"]
    thresholds = []
    for t in (50, 55, 60, 65, 70, 75, 80):
        s = flagged[flagged["coherent"] > t]
        thresholds.append({"coherent_above": t, "flagged": int(len(s)),
                           "misaligned": int((s["label"] == "misaligned").sum()),
                           "precision": round(float((s["label"] == "misaligned").mean()), 3) if len(s) else None})
    res = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "n": int(len(d)),
        "labels": d["label"].value_counts().to_dict(), "neutral_prompt": NEUTRAL,
        "auroc_incoherent_vs_rest": aurocs(d, "incoherent", ("sound", "misaligned")),
        "auroc_incoherent_vs_misaligned_among_flagged": aurocs(flagged, "incoherent", ("misaligned",)),
        "median_by_label": d.groupby("label")[list(FEATURES)].median().round(3).to_dict(orient="index"),
        "flagged_precision_by_coherence_threshold": thresholds,
        "seconds": round(time.perf_counter() - t0, 1),
        "note": "the threshold table is read off the labels it would be tuned on (no held-out set)",
    }
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
