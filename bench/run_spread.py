"""How much the claims move between runs of the same profile: each run's verdicts (the results table's rules,
judge gate included), what each rule's components said, and claim 2's ablation numbers per finetune.

Why: the H100 runs of 2026-12-06 (same `paper` profile, SmolLM2-135M, code changed only in speed and scheduling
between them) gave chapter 2's ablation anywhere from "projecting the direction out changes nothing" to "it cuts
EM by 90%". A single run of record cannot say which; this script puts every stored run side by side.

    python bench/run_spread.py --runs record/smollm2-135m runs/*/x runs/*/final/x \
        --out bench/results/run_spread_smollm2_2026-12-06.json

Writes the JSON (one entry per run, plus per-finetune summaries across runs) and prints a markdown table.
The runs themselves stay where they are (runs/ is git-ignored); the JSON keeps the numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emlib.data import write_json  # noqa: E402
from emlib.results import verdicts  # noqa: E402
from emlib.verdicts import Run, rate_ci  # noqa: E402


def ablation_rows(run: Run) -> list[dict]:
    """Claim 2's ablation per finetune: EM with nothing ablated, with the direction, and with the random
    directions (mean, lowest, highest), as shares; ``cut`` = 1 - direction / none."""
    abl = run.frame("ch2_ablation")
    if abl is None:
        return []
    out = []
    for ft, g in abl.groupby("finetune"):
        r = g.set_index("ablated")
        rnd = [rate_ci(r.loc[a])[0] for a in r.index if str(a).startswith("random")]
        none, d = rate_ci(r.loc["none"])[0], rate_ci(r.loc["direction"])[0]
        out.append({"finetune": ft, "none": round(none, 4), "direction": round(d, 4),
                    "random_mean": round(sum(rnd) / len(rnd), 4) if rnd else None,
                    "random_min": round(min(rnd), 4) if rnd else None,
                    "random_max": round(max(rnd), 4) if rnd else None,
                    "cut": round(1 - d / none, 3) if none > 0 else None,
                    "below_every_random": bool(rnd) and d < min(rnd)})
    return out


def directions_of(path: Path) -> dict:
    """The run's chapter-2 directions {dataset: [layers, d]} (``directions/<dataset>-*.safetensors``), at the
    steering layer of its config (``steering_layer_fraction``, 0.5 when the run did not write it): {dataset: [d]}."""
    from safetensors.torch import load_file

    cfg = path / "config.json"
    frac = json.loads(cfg.read_text()).get("steering_layer_fraction", 0.5) if cfg.exists() else 0.5
    out = {}
    for f in sorted((path / "directions").glob("*.safetensors")):
        if f.name.endswith(".groups.safetensors"):
            continue
        d = load_file(str(f))["direction"]  # [layers, d]
        out[f.name.split("-")[0]] = d[min(int(round(frac * d.shape[0])), d.shape[0] - 1)].float()
    return out


def cosines_to(ref: dict, dirs: dict) -> dict:
    """Cosine of each dataset's direction with the reference run's, where both have it."""
    import torch

    return {ds: round(float(torch.nn.functional.cosine_similarity(ref[ds], v, dim=0)), 3)
            for ds, v in dirs.items() if ds in ref}


def ablated_scores(run: Run) -> list[dict]:
    """Mean judge scores of chapter 2's ablation answers per finetune and condition (each random direction on
    its own: the same vectors in every run), where the run kept them (``tables/ch2_ablation_answers.csv.gz``;
    the runs of record do not)."""
    import pandas as pd

    f = next((run.path / "tables" / n for n in ("ch2_ablation_answers.csv.gz", "ch2_ablation_answers.csv")
              if (run.path / "tables" / n).exists()), None)
    if f is None:
        return []
    df = pd.read_csv(f)
    df["condition"] = df["ablated"]
    g = df.groupby(["finetune", "condition"]).agg(n=("aligned", "size"), aligned=("aligned", "mean"),
                                                  coherent=("coherent", "mean"))
    return g.round(2).reset_index().to_dict(orient="records")


def one_run(path: str) -> dict:
    run = Run(path)
    rec = run.path / "record.json"
    meta = json.loads(rec.read_text()) if rec.exists() else {}
    vs = verdicts(run)
    return {"run": path, "device": meta.get("device"), "date_utc": meta.get("date_utc"),
            "compact": meta.get("compact"),
            "verdicts": {v.claim: v.checks.get("rule_verdict", v.verdict) for v in vs},
            "claim2_checks": {k: v for k, v in next(v for v in vs if v.claim == 2).checks.items()
                              if k in ("steering", "ablation", "cosine", "cosine_above_null")},
            "ablation": ablation_rows(run), "ablated_scores": ablated_scores(run)}


def summary(runs: list[dict]) -> dict:
    """Per finetune across the runs: the cut's median, lowest and highest; how many runs pass claim 2's ablation
    check; each claim's rule verdicts (before the judge gate) counted."""
    by_ft: dict[str, list[float]] = {}
    for r in runs:
        for a in r["ablation"]:
            if a["cut"] is not None:
                by_ft.setdefault(a["finetune"], []).append(a["cut"])
    cuts = {ft: {"runs": len(v), "median": round(statistics.median(v), 3), "min": min(v), "max": max(v)}
            for ft, v in sorted(by_ft.items())}
    claims: dict[int, dict[str, int]] = {}
    for r in runs:
        for c, v in r["verdicts"].items():
            claims.setdefault(c, {})[v] = claims.setdefault(c, {}).get(v, 0) + 1
    components = {k: sum(bool(r["claim2_checks"].get(k)) for r in runs)
                  for k in ("steering", "ablation", "cosine", "cosine_above_null")}
    return {"runs": len(runs), "ablation_cut": cuts, "ablation_check_passed": components["ablation"],
            "claim2_components_passed": components,
            "rule_verdicts": {str(c): v for c, v in sorted(claims.items())}}


def correlations(xs: list[float], ys: list[float]) -> dict:
    """Pearson and Spearman correlations of two equal-length lists, rounded ({} with fewer than 3 points)."""
    from scipy import stats

    if len(xs) < 3:
        return {}
    return {"pearson": round(float(stats.pearsonr(xs, ys)[0]), 3),
            "spearman": round(float(stats.spearmanr(xs, ys)[0]), 3), "n": len(xs)}


def cosine_to_mean_vs_cut(runs: list[dict], dirs: dict, dataset: str = "medical") -> dict:
    """Whether a run's direction being close to the runs' mean direction goes with a larger ablation cut: each
    run's ``dataset`` direction (the one chapter 2 projects out of every finetune) against the unit mean of
    all runs', and the Pearson correlation of that cosine with the run's mean cut over its finetunes."""
    import numpy as np
    import torch

    have = [r for r in runs if dataset in dirs[r["run"]] and r["ablation"]]
    if len(have) < 3:
        return {}
    units = torch.stack([dirs[r["run"]][dataset] / dirs[r["run"]][dataset].norm() for r in have])
    mean = units.mean(0)
    cos = (units @ (mean / mean.norm())).numpy()
    cut = np.array([np.mean([a["cut"] for a in r["ablation"] if a["cut"] is not None]) for r in have])
    return {"dataset": dataset, "runs": len(have), "cosine_min": round(float(cos.min()), 3),
            "cosine_max": round(float(cos.max()), 3), "pearson_r": round(float(np.corrcoef(cos, cut)[0, 1]), 3)}


def score_spread(runs: list[dict]) -> dict:
    """Per finetune and condition, the standard deviation across runs of the mean aligned score: whether an
    ablation whose direction is the same in every run (the random ones: fixed seeds) gives the same scores
    from run to run, against the direction (estimated anew in every run) and no ablation."""
    import statistics as st

    cells: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        for a in r["ablated_scores"]:
            cells.setdefault((a["finetune"], a["condition"]), []).append(a["aligned"])
    out: dict[str, dict] = {}
    for (ft, cond), v in sorted(cells.items()):
        if len(v) >= 3:
            out.setdefault(ft, {})[cond] = {"runs": len(v), "mean": round(st.mean(v), 2), "sd": round(st.stdev(v), 2)}
    for ft, conds in out.items():
        rnd = [c["sd"] for k, c in conds.items() if k.startswith("random")]
        conds["random_sd_mean"] = round(sum(rnd) / len(rnd), 2) if rnd else None
    return out


def markdown(runs: list[dict]) -> str:
    lines = ["| run | device | claim 2 checks (steering / ablation / cosine) | ablation: EM none -> direction "
             "(random mean), per finetune | direction's cosine with the first run's |", "| --- | --- | --- | --- | --- |"]
    for r in runs:
        ch = r["claim2_checks"]
        checks = " / ".join("yes" if ch.get(k) else "no" for k in ("steering", "ablation", "cosine"))
        abl = "; ".join(f"{a['finetune']} {100 * a['none']:.1f}% -> {100 * a['direction']:.1f}% "
                        f"({100 * a['random_mean']:.1f}%)" for a in r["ablation"] if a["random_mean"] is not None)
        cos = ", ".join(f"{ds} {c:.2f}" for ds, c in r.get("direction_cosine_to_first", {}).items())
        lines.append(f"| {r['run']} | {r['device']} | {checks} | {abl} | {cos} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run directories (results.json + tables/)")
    ap.add_argument("--out", help="write the JSON here")
    a = ap.parse_args(argv)
    missing = [p for p in a.runs if not (Path(p) / "results.json").exists()]
    if missing:
        ap.error("no results.json in " + ", ".join(missing) + ": pass run directories the chapters wrote")
    runs = [one_run(p) for p in a.runs]
    ref = directions_of(Path(a.runs[0]))
    dirs = {r["run"]: directions_of(Path(r["run"])) for r in runs}
    for r in runs:  # how far each run's directions are from the first run's (the run of record, when first)
        r["direction_cosine_to_first"] = cosines_to(ref, dirs[r["run"]])
    res = {"runs": runs, "summary": summary(runs) | {"cosine_to_mean_vs_cut": cosine_to_mean_vs_cut(runs, dirs),
                                                    "aligned_score_spread": score_spread(runs)}}
    print(markdown(runs))
    print(json.dumps(res["summary"], indent=1))
    if a.out:
        write_json(a.out, res)
        print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
