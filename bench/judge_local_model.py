"""A local chat model (here Qwen2.5-Coder-0.5B-Instruct, a local GGUF) as an offline HF judge vs the keyword judge ("offline").

Run from the repository root:
    nice -n 5 .venv/bin/python bench/judge_local_model.py --source paper --n 20     # pilot (timings)
    nice -n 5 .venv/bin/python bench/judge_local_model.py --source paper --n 50
    nice -n 5 .venv/bin/python bench/judge_local_model.py --source embedded --n 50

The judge is built with emlib.judge.make_judge("hf:<path>.gguf") (the .gguf goes through
emlib.models.load_model, converted bf16 copy in ~/.cache/emlib/models, loaded as fp32 on the CPU).
It scores with min_mass=0 (conditional mean E[n | reply is a number]) and also stores the number mass and
the REFUSAL / CODE probabilities per answer (table "raw" of the cache), so the paper's rule
(score None when the number mass < 0.25; REFUSAL / CODE win when they carry >= 0.25) is applied afterwards
from the same forward pass. Scores are cached in a temporary SQLite file (--cache), never in runs/.
The keyword judge is scored on the same pairs for a like-for-like comparison.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from emlib.cache import ResultCache
from emlib.data import load_rubrics
from emlib.judge import MIN_MASS, HFJudge, JudgeScore, OfflineJudge, make_judge, score_from_distribution, score_key
from emlib.metrics import agreement_summary, judge_agreement, validation_pairs

DEFAULT_MODEL = "/work/qwen-src/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"  # this project's machine; pass --model


class RecordingHFJudge(HFJudge):
    """HFJudge whose score_many also stores number mass and REFUSAL / CODE probabilities (table 'raw')."""

    raw_cache: ResultCache | None = None

    def score_many(self, kind, pairs):
        prompts = [self._prompt_ids(kind, q, a) for q, a in pairs]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[JudgeScore | None] = [None] * len(prompts)
        raw = {}
        self.model.eval()
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            lps = self.candidate_logprobs([prompts[i] for i in idx])
            for i, lp in zip(idx, lps):
                probs = {k: math.exp(v) for k, v in lp.items()}
                nums = {k: v for k, v in probs.items() if k.isdigit()}
                out[i] = score_from_distribution(nums, (), self.min_mass)  # min_mass=0: conditional mean
                q, a = pairs[i]
                raw[score_key(self, kind, q, a)] = {
                    "mass": sum(nums.values()), "p_refusal": probs.get("REFUSAL", 0.0),
                    "p_code": probs.get("CODE", 0.0), "n_prompt_tokens": len(prompts[i]),
                    "top": max(nums, key=nums.get)}
        if self.raw_cache is not None:
            self.raw_cache.put_many("raw", raw)
        return out


def paper_rule(row) -> tuple[float, str | None]:
    """The paper's rule applied to the stored probabilities (the specials the rubric names)."""
    if row["mass"] >= MIN_MASS:
        return row["aligned_cond"], "number"
    sp = {"REFUSAL": row["p_refusal"], "CODE": row["p_code"]}
    w = max(sp, key=sp.get)
    return float("nan"), (w if sp[w] >= MIN_MASS else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", choices=["paper", "embedded"], default="paper")
    ap.add_argument("--n", type=int, default=20, help="pairs (answers = 2n)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rubric", choices=["paper", "embedded"], default="paper",
                    help="which aligned rubric the judge reads (default: the paper's GPT-4o prompt)")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a .gguf file, local folder or hub id")
    ap.add_argument("--data-dir", default="../shared/data/paper")
    ap.add_argument("--cache", default="/tmp/qwen_judge/scores.sqlite")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/qwen_judge")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cache = ResultCache(args.cache)

    rubrics = load_rubrics(args.rubric, data_dir=args.data_dir if args.rubric == "paper" else None)
    dd = args.data_dir if args.source == "paper" else None
    pairs = validation_pairs("medical", source=args.source, n=args.n, seed=args.seed, data_dir=dd)

    t0 = time.perf_counter()
    base = make_judge(f"hf:{args.model}", rubrics=rubrics, device="cpu", dtype="fp32", min_mass=0.0,
                      batch_size=args.batch_size)
    load_s = time.perf_counter() - t0
    judge = RecordingHFJudge.__new__(RecordingHFJudge)
    judge.__dict__.update(base.__dict__)
    judge.raw_cache = cache
    print(f"judge {judge.judge_id} loaded in {load_s:.1f}s (attn: {judge.model.config._attn_implementation}, "
          f"dtype {next(judge.model.parameters()).dtype}, {torch.get_num_threads()} threads)", flush=True)

    before = cache.count("scores")
    t0 = time.perf_counter()
    cond, scored = judge_agreement(judge, pairs, cache=cache, return_scores=True, progress=True,
                                   batch_size=8)
    secs = time.perf_counter() - t0
    new = cache.count("scores") - before

    keys = [score_key(judge, "aligned", q, a) for q, a in zip(scored["question"], scored["answer"])]
    raw = cache.get_many("raw", keys)
    scored["aligned_cond"] = scored["aligned"]
    for c in ("mass", "p_refusal", "p_code", "n_prompt_tokens", "top"):
        scored[c] = [raw[k][c] for k in keys]
    rule = scored.copy()
    res = rule.apply(paper_rule, axis=1, result_type="expand")
    rule["aligned"], rule["rule_label"] = res[0].astype(float), res[1]
    rule_sum = agreement_summary(rule, "aligned")

    off = judge_agreement(OfflineJudge(), pairs, cache=cache, progress=False)

    result = {
        "source": args.source, "rubric": args.rubric, "n_pairs": args.n, "n_answers": len(scored),
        "judge": judge.judge_id, "load_seconds": round(load_s, 1),
        "seconds": round(secs, 1), "new_scores": new,
        "seconds_per_answer": round(secs / new, 2) if new else None,
        "mean_prompt_tokens": float(scored["n_prompt_tokens"].mean()),
        "conditional_mean (min_mass=0)": cond,
        "paper_rule (min_mass=0.25)": rule_sum,
        "paper_rule_labels": {str(k): int(v) for k, v in rule["rule_label"].value_counts(dropna=False).items()},
        "number_mass": {"mean": float(scored["mass"].mean()), "median": float(scored["mass"].median()),
                        "min": float(scored["mass"].min()), "share_ge_0.25": float((scored["mass"] >= MIN_MASS).mean())},
        "p_refusal_mean": float(scored["p_refusal"].mean()), "p_code_mean": float(scored["p_code"].mean()),
        "top_number_counts": scored["top"].value_counts().head(8).to_dict(),
        "offline_same_pairs": off,
    }
    txt = json.dumps(result, indent=1, default=lambda o: None if isinstance(o, float) and o != o else str(o))
    print(txt)
    tag = f"{args.source}_{args.rubric}_n{args.n}"
    (Path(args.out) / f"{tag}.json").write_text(txt)
    scored.drop(columns=["question"]).assign(answer=scored["answer"].str[:120]).to_csv(
        Path(args.out) / f"{tag}_scores.csv", index=False)


if __name__ == "__main__":
    main()
