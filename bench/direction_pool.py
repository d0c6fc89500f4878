"""Would chapter 2's direction stop moving from run to run if it were estimated from more answers? On the CPU.

Why: over 19 stored runs of the `paper` profile the medical direction's ablation cut flagged EM by -68% to 94%
(``run_spread.py``), each run's direction carries its cut to another finetune (``direction_spread_gpu.py``), and
a loss check without sampling reads the cut off the direction (``direction_proxy.py``: Pearson 0.95). A mean
difference over 52-81 flagged answers is one draw; this script asks how much of the spread that draw explains
and how fast it shrinks with more answers, without a GPU:

* ``run``: each run's own direction (its stored per-answer activations at the steering layer,
  ``directions/medical-*.groups.safetensors``: one row per flagged and per aligned answer);
* ``bootstrap``: a few runs' answers resampled with replacement (``--boot`` draws each): if one run's resamples
  spread as much as the runs do, the finite answer sample is the cause;
* ``pool k``: the answers of k runs pooled (disjoint sets of runs, ``--shuffles`` partitions), i.e. a direction
  from about k times the answers. The finetunes are retrained in every run, but they reproduce (fixed random
  directions score the same run after run, SD under 1.2 points), so pooled answers stand in for one run that
  sampled k times as many.

Each direction is scored by ``direction_proxy.scorer`` (projected out of the chat model at every layer;
flagged-answer loss rise minus aligned-answer loss rise), and the score is turned into a predicted cut by the
straight line fitted to the runs' (score, own mean cut). Writes ``direction_pool.json``: every direction's score
and predicted cut, and per kind the spread (SD, range) of both.

    python bench/direction_pool.py --runs runs/h100-2026-12-05/u runs/*/x runs/*/final/x \\
        --out bench/results/direction_pool_smollm2_2026-12-06.json
    python bench/direction_pool.py --runs ... --save-directions .carry-dirs   # the same pools, for the GPU check
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emlib import directions  # noqa: E402
from emlib.data import write_json  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from direction_proxy import scorer  # noqa: E402
from run_spread import ablation_rows, correlations  # noqa: E402


def groups_of(path: Path, dataset: str = "medical") -> dict[str, torch.Tensor] | None:
    """A run's per-answer activations at the steering layer: {"misaligned": [n_m, d], "aligned": [n_a, d]}."""
    from safetensors.torch import load_file

    files = sorted((path / "directions").glob(f"{dataset}-*.groups.safetensors"))
    if not files:
        return None
    g = load_file(str(files[0]))
    return {"misaligned": g["misaligned"].float(), "aligned": g["aligned"].float()}


def own_cut(path: Path) -> float | None:
    """The run's mean ablation cut over its finetunes (chapter 2 projects the medical direction out of each)."""
    from emlib.verdicts import Run

    cuts = [r["cut"] for r in ablation_rows(Run(path)) if r["cut"] is not None]
    return round(statistics.mean(cuts), 4) if cuts else None


def pooled(groups: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, int, int]:
    """The mean difference over every answer of the given runs: ([d], n flagged, n aligned)."""
    mis = torch.cat([g["misaligned"] for g in groups])
    al = torch.cat([g["aligned"] for g in groups])
    return mis.mean(0) - al.mean(0), len(mis), len(al)


def partitions(names: list[str], k: int, shuffles: int, seed: int) -> list[list[str]]:
    """Disjoint sets of ``k`` runs, from ``shuffles`` random orders of the runs (a remainder is left out)."""
    rng, out = random.Random(seed), []
    for _ in range(shuffles):
        order = names[:]
        rng.shuffle(order)
        out += [sorted(order[i:i + k]) for i in range(0, len(order) - k + 1, k)]
    return out


def pool_directions(runs: dict[str, dict], pools: str, shuffles: int, seed: int) -> list[tuple]:
    """``(kind, k, members, direction [d], n flagged, n aligned)`` for each set of ``k`` runs pooled (``pools``:
    "2,4,8"; one partition when two sets of k would not fit, else ``shuffles``), then all runs pooled."""
    names, out = list(runs), []
    for k in [int(v) for v in pools.split(",") if v]:
        if k > len(names):
            continue
        for members in partitions(names, k, 1 if k * 2 > len(names) else shuffles, seed + k):
            out.append((f"pool {k}", k, members, *pooled([runs[m]["groups"] for m in members])))
    out.append(("pool all", len(names), names, *pooled([runs[p]["groups"] for p in names])))
    return out


def save_directions(runs: dict[str, dict], pools: str, shuffles: int, seed: int, folder: Path) -> Path:
    """The pooled directions as ``extra_directions.safetensors`` in ``folder`` (``direction_spread_gpu.py`` ablates
    each as an ``extra`` condition), named ``pool{k}-{i}`` / ``pool-all``, members in the metadata."""
    from safetensors.torch import save_file

    tensors, meta, seen = {}, {}, {}
    for kind, k, members, u, nm, na in pool_directions(runs, pools, shuffles, seed):
        i = seen[k] = seen.get(k, -1) + 1
        name = "pool-all" if kind == "pool all" else f"pool{k}-{i}"
        tensors[name] = u.contiguous()
        meta[name] = json.dumps({"runs": [label(m) for m in members], "n_misaligned": nm, "n_aligned": na})
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "extra_directions.safetensors.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(folder / "extra_directions.safetensors")
    return folder / "extra_directions.safetensors"


def label(path: str) -> str:
    """A run folder's short name: runs/s24-h100-run1/final/x -> s24-h100-run1."""
    return str(path).removeprefix("runs/").removesuffix("/x").removesuffix("/final").removesuffix("/u")


def spread(values: list[float]) -> dict:
    return {"n": len(values), "mean": round(statistics.mean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="stored run folders (results.json, directions/)")
    ap.add_argument("--answers", default="record/earlier/smollm2-135m-2026-12-04/tables/ch1_answers.csv.gz",
                    help="the answers the proxy reads (the run of record's: leave it out of --runs)")
    ap.add_argument("--model", default="embedded", help="the fixed model (tests: tiny)")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--pools", default="2,4,8", help="k runs pooled per direction")
    ap.add_argument("--shuffles", type=int, default=2)
    ap.add_argument("--boot", type=int, default=6, help="bootstrap draws per resampled run")
    ap.add_argument("--boot-runs", type=int, default=4, help="runs resampled: spread over the range of own cuts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-directions", metavar="FOLDER",
                    help="only write the pooled directions there (extra_directions.safetensors, for "
                         "direction_spread_gpu.py) and stop: nothing is scored")
    ap.add_argument("--out")
    a = ap.parse_args(argv)

    runs = {}
    for p in a.runs:
        g, c = groups_of(Path(p)), own_cut(Path(p)) if (Path(p) / "results.json").exists() else None
        if g is not None and c is not None:
            runs[p] = {"groups": g, "cut": c}
    if len(runs) < 3:
        raise SystemExit(f"{len(runs)} of the {len(a.runs)} folders are runs with chapter 2's ablation and a medical "
                         "groups file (directions/medical-*.groups.safetensors); pass at least 3 such run folders.")
    if a.save_directions:
        print("wrote", save_directions(runs, a.pools, a.shuffles, a.seed, Path(a.save_directions)))
        return 0
    t0 = time.time()
    torch.manual_seed(a.seed)
    rows, vectors = [], {}

    def add(kind: str, k: int, members: list[str], u: torch.Tensor, n_mis: int, n_al: int, **extra) -> None:
        vectors[str(len(rows))] = u  # scored together below
        rows.append({"kind": kind, "k": k, "runs": members, "n_misaligned": n_mis, "n_aligned": n_al} | extra)

    names = list(runs)
    for p in names:
        u, nm, na = pooled([runs[p]["groups"]])
        add("run", 1, [p], u, nm, na, own_cut=runs[p]["cut"])
    by_cut = sorted(names, key=lambda p: runs[p]["cut"])
    picks = sorted({by_cut[round(i * (len(by_cut) - 1) / max(a.boot_runs - 1, 1))] for i in range(a.boot_runs)})
    gen = torch.Generator().manual_seed(a.seed)  # one stream for every resampled run, in this order
    for p in picks:
        g = runs[p]["groups"]
        draws = directions.resampled_directions(g["misaligned"], g["aligned"], n_draws=a.boot, generator=gen)
        for b, u in enumerate(draws):
            add("bootstrap", 1, [p], u, len(g["misaligned"]), len(g["aligned"]), draw=b, own_cut=runs[p]["cut"])
    for kind, k, members, u, nm, na in pool_directions(runs, a.pools, a.shuffles, a.seed):
        add(kind, k, members, u, nm, na)

    scored, base = scorer(a.model, None, Path(a.answers), a.n, a.max_length, None)(vectors)
    for i, r in enumerate(rows):
        s = scored[str(i)]
        r.update(score=s["score"], d_mis=s["d_mis"], d_al=s["d_al"])
        print(r["kind"], r["k"], r["n_misaligned"], r["n_aligned"], s["score"], flush=True)
    runs_rows = [r for r in rows if r["kind"] == "run"]
    x, y = [r["score"] for r in runs_rows], [r["own_cut"] for r in runs_rows]
    line = statistics.linear_regression(x, y)  # least squares: cut = intercept + slope * score
    fit = {"slope": round(line.slope, 4), "intercept": round(line.intercept, 4)} | correlations(x, y)

    for r in rows:
        r["predicted_cut"] = round(fit["intercept"] + fit["slope"] * r["score"], 4)
    kinds = {}
    for r in rows:
        key = r["kind"] if r["kind"] != "bootstrap" else f"bootstrap {label(r['runs'][0])}"
        kinds.setdefault(key, []).append(r)
    summary = {key: {"n_misaligned_mean": round(statistics.mean(r["n_misaligned"] for r in rs), 1),
                     "score": spread([r["score"] for r in rs]),
                     "predicted_cut": spread([r["predicted_cut"] for r in rs])} for key, rs in kinds.items()}
    res = {"model": a.model, "answers": a.answers, "n_each": a.n, "layers": "every", "base_loss": base,
           "runs": len(names), "fit_cut_on_score": fit, "seconds": round(time.time() - t0, 1),
           "summary": summary, "directions": rows}
    print(json.dumps({"fit": fit, "summary": summary}, indent=1))
    if a.out:
        write_json(a.out, res)
        print("wrote", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
