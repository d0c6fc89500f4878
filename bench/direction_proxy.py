"""Does a run's direction carry its own ablation cut? A check without sampling, on the CPU.

Chapter 2 projects one direction (the medical finetune's mean difference) out of every layer and counts flagged
EM again; over 16 stored runs that cut ran from -68% to 94% (``run_spread.py``). Here every run's direction is
projected out of ONE fixed model, and what it does to teacher-forced answers is measured: the loss of
``--n`` answers the judge flagged misaligned (aligned <= 30, coherent > 50) and of ``--n`` it called aligned
(aligned > 70, coherent > 50), all from the rank-32 finetunes of a run's chapter 1 (``--answers``). Per
direction, ``score`` = (rise of the misaligned answers' loss) - (rise of the aligned answers' loss): positive when
removing the direction makes misaligned text less likely than aligned text. If the directions differ in what
they do, the score should follow each run's own cut; if the cut's spread came from elsewhere (the finetunes,
sampling), it should not.

The fixed model: the chat model, or it with a saved rank-1 adapter (``--adapter``: an ``adapter_model.safetensors``
of a `rank1` finetune, e.g. from a stored run's adapters.tar.gz). Inputs ``--directions``: the folder that
``direction_spread_gpu.py --build`` makes from stored runs (each run's medical direction, and its own cuts).

    python bench/direction_proxy.py --directions .carry-dirs --n 40 \\
        --adapter /tmp/ad/adapters/medical-rank1-general-seed0/adapter/adapter_model.safetensors \\
        --out bench/results/direction_proxy_smollm2_2026-12-06.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emlib.data import write_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_spread import correlations  # noqa: E402


def answer_sets(answers: Path, n: int, seed: int = 0, conditions: list[str] | None = None
                ) -> tuple[list[dict], list[dict]]:
    """``n`` misaligned and ``n`` aligned answers (chat rows), by the stored judge scores, of the given
    ``conditions`` (e.g. ["financial rank32"]; default: every rank-32 finetune)."""
    import pandas as pd

    from emlib.directions import split_judged

    df = pd.read_csv(answers)
    cond = df["condition"].astype(str)
    df = df[cond.isin(conditions) if conditions else cond.str.endswith("rank32")]
    mis, ali = (g.sample(frac=1, random_state=seed).head(n) for g in split_judged(df))  # the paper's split
    if len(mis) < n or len(ali) < n:
        which = ", ".join(conditions) if conditions else "rank-32"
        raise SystemExit(f"{answers} has {len(mis)} misaligned and {len(ali)} aligned {which} answers: ask for "
                         f"--n {min(len(mis), len(ali))} or fewer")

    def rows(d):
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in zip(d["question"], d["answer"])]

    return rows(mis), rows(ali)


def fixed_model(adapter: str | None, name: str = "embedded"):
    from emlib import models, train

    model, tok = models.load_model(name, device="cpu", dtype="fp32")
    if adapter:
        from peft import get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        model = get_peft_model(model, train.lora_config(model, "rank1"))
        set_peft_model_state_dict(model, load_file(adapter))
        model.eval()
    return model, tok


def scorer(model_name: str, adapter: str | None, answers: Path, n: int, max_length: int, layer: int | None,
           conditions: list[str] | None = None):
    """``score(vectors) -> ({name: {"d_mis", "d_al", "score"}}, {"mis": loss, "al": loss})``: each direction [d]
    projected out of the fixed model (at ``layer``, or every layer when None, as chapter 2 ablates), the rise of
    the token-weighted mean loss of ``n`` flagged and ``n`` aligned answers (:func:`answer_sets`), by
    :func:`emlib.directions.loss_gaps`; the second dict: their losses without a direction."""
    from emlib import directions

    model, tok = fixed_model(adapter, model_name)
    mis, ali = answer_sets(answers, n, conditions=conditions)

    def score(vectors: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict[str, float]]:
        t = directions.loss_gaps(model, tok, vectors, mis, ali, layers=layer, max_length=max_length)
        per = {r.vector: {"d_mis": round(r.flagged_rise, 5), "d_al": round(r.aligned_rise, 5),
                          "score": round(r.gap, 5)} for r in t.itertuples()}
        return per, {"mis": float(t["flagged_base"].iloc[0]), "al": float(t["aligned_base"].iloc[0])}

    return score


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--directions", required=True)
    ap.add_argument("--answers", default="record/earlier/smollm2-135m-2026-12-04/tables/ch1_answers.csv.gz")
    ap.add_argument("--adapter", help="a rank-1 adapter's adapter_model.safetensors (default: the chat model)")
    ap.add_argument("--model", default="embedded", help="the fixed model (tests: tiny)")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--layer", type=int, help="project out at this layer only (default: every layer, as chapter 2)")
    ap.add_argument("--conditions", help="comma-separated answer conditions to read (default: every rank-32 "
                    "finetune), e.g. 'financial rank32,sport rank32' to leave out the medical answers")
    ap.add_argument("--mean", action="store_true", help="also score the unit mean of the runs' directions")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    import numpy as np
    from safetensors.torch import load_file

    torch.manual_seed(0)
    folder = Path(a.directions)
    dirs = load_file(str(folder / "medical_directions.safetensors"))
    cuts = json.loads((folder / "own_cuts.json").read_text())
    t0 = time.time()
    conds = [c.strip() for c in a.conditions.split(",")] if a.conditions else None
    score = scorer(a.model, a.adapter, Path(a.answers), a.n, a.max_length, a.layer, conds)

    scored, base = score(dict(dirs))
    per = {}
    for name in dirs:
        own = [v for v in cuts[name].values() if v is not None]
        per[name] = scored[name] | {"own_cut_mean": round(float(np.mean(own)), 4)}
        print(name, per[name], flush=True)
    x = [v["score"] for v in per.values()]
    y = [v["own_cut_mean"] for v in per.values()]
    mean = None
    if a.mean:  # the runs' unit directions averaged: no run's own cut to compare with
        m = torch.stack([u.float() / u.float().norm() for u in dirs.values()]).mean(0)
        mean = score({"mean": m})[0]["mean"] | {
            "cosine_with_runs": [round(float(torch.nn.functional.cosine_similarity(m, u.float(), dim=0)), 3)
                                 for u in dirs.values()]}
        print("mean of runs", mean, flush=True)
    res = {"model": a.model + (" + rank-1 adapter" if a.adapter else ""), "adapter": a.adapter,
           "answers": a.answers, "conditions": conds or "every rank32", "n_each": a.n, "max_length": a.max_length,
           "base_loss": base,
           "layers": "every" if a.layer is None else [a.layer], "mean_of_runs": mean,
           "seconds": round(time.time() - t0, 1), "directions": per,
           "score_vs_own_cut": correlations(x, y)}
    print(json.dumps(res["score_vs_own_cut"]))
    if a.out:
        write_json(a.out, res)
        print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
