"""Is it the direction? Chapter 2's ablation with many runs' directions on ONE finetune, in one sampling call.

Why: over 16 stored runs of the `paper` profile (``run_spread.py``) projecting the medical direction out cut
flagged EM by anything from -68% to 94%, while fixed random directions gave the same scores run after run. If
the direction is the cause, each run's direction ablated from the same finetune should reproduce its own run's
cut (high where it was high), and the mean of the runs' directions should tell whether averaging gives a
stable direction. If the cuts here do not follow the runs' own, the cause lies elsewhere (the finetunes, or
how the run applied the ablation).

Inputs (``--directions``, a git-ignored carry folder built from stored runs by ``--build``:
``python bench/direction_spread_gpu.py --directions .carry-dirs --build record/smollm2-135m runs/*/x
runs/*/final/x``): ``medical_directions.safetensors`` ({run name: [d] the medical direction at the steering
layer}) and ``own_cuts.json`` ({run name: {finetune: cut in its own run}}), and optionally
``extra_directions.safetensors`` ({name: [d]}, directions with no run of their own: ``direction_pool.py
--save-directions`` writes the pooled ones there). The finetune (``--finetune``, default financial, rank 32)
is trained as chapter 2's, in a run directory of its own (``--run-dir``); every condition (no ablation, each
run's direction, their unit mean, each extra direction, ``--random`` random directions of the same seeds as
chapter 2's) is sampled in the same calls, one condition per row, and judged by the profile's judge. Writes
``direction_spread.json`` under ``--out``: EM per condition, the cut of each run's direction here against its
cut in its own run (Pearson and Spearman correlations), and the mean direction's and extra directions' cuts.

    python bench/direction_spread_gpu.py --directions .carry-dirs --out $OUT            # on the GPU (paper)
    python bench/direction_spread_gpu.py --directions .carry-dirs --profile quick --out /tmp/ds \
        --config '{"n_train": 16, "n_samples": 1, "max_new_tokens": 8}'                   # a CPU check
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
from run_spread import ablation_rows, correlations, directions_of  # noqa: E402


def load_directions(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, torch.Tensor]]:
    """The runs' directions, their own cuts, and ``extra_directions.safetensors`` where the folder has it (named
    directions with no run of their own, e.g. ``direction_pool.py --save-directions``'s pooled ones: ablated as
    ``extra NAME`` conditions, left out of the runs' mean and of the correlation)."""
    from safetensors.torch import load_file

    f, cuts = folder / "medical_directions.safetensors", folder / "own_cuts.json"
    if not f.exists() or not cuts.exists():
        raise SystemExit(f"{folder} needs medical_directions.safetensors and own_cuts.json (see this script's "
                         "docstring for how they are built from stored runs).")
    extra = folder / "extra_directions.safetensors"
    return load_file(str(f)), json.loads(cuts.read_text()), (load_file(str(extra)) if extra.exists() else {})


def build(runs: list[str], folder: Path) -> None:
    """The two input files from stored run directories (results.json, tables/, directions/): each run's medical
    direction at its steering layer and its own ablation cuts, named by the run's path."""
    from safetensors.torch import save_file

    from emlib.verdicts import Run

    vecs, cuts = {}, {}
    for path in runs:
        name = path.rstrip("/").replace("/final/x", "").replace("/x", "").replace("runs/", "").replace("/", "-")
        vecs[name] = directions_of(Path(path))["medical"].contiguous()
        cuts[name] = {a["finetune"]: a["cut"] for a in ablation_rows(Run(path))}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(vecs, str(folder / "medical_directions.safetensors"))
    write_json(folder / "own_cuts.json", cuts)
    print(f"wrote {len(vecs)} directions to {folder}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--directions", required=True, help="folder with medical_directions.safetensors, own_cuts.json")
    ap.add_argument("--finetune", default="financial")
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--random", type=int, default=3, help="random directions (chapter 2's seeds) as controls")
    ap.add_argument("--run-dir", default="runs/direction-spread")
    ap.add_argument("--config", default="{}", help="more Config fields as JSON (a CPU check: small sizes)")
    ap.add_argument("--out", default=".")
    ap.add_argument("--build", nargs="+", metavar="RUN_DIR",
                    help="make the --directions folder from these stored runs instead (on the CPU, before carrying)")
    a = ap.parse_args(argv)
    if a.build:
        build(a.build, Path(a.directions))
        return 0
    dirs, own, extra = load_directions(Path(a.directions))

    from emlib import chapters, directions, experiment

    t0 = time.time()
    exp = experiment.start(a.profile, {**json.loads(a.config), "run_dir": a.run_dir, "datasets": [a.finetune]})
    cfg = exp.cfg
    d = exp.model.config.hidden_size
    if any(v.shape != (d,) for v in [*dirs.values(), *extra.values()]):
        raise SystemExit(f"the directions are not [{d}]: they belong to another model than {cfg.model}")
    units = {name: v.float() / v.float().norm() for name, v in dirs.items()}
    mean = torch.stack(list(units.values())).mean(0)
    conds: dict[str, torch.Tensor | None] = {"none": None, "mean of runs": mean}
    conds |= {f"run {name}": v for name, v in units.items()}
    conds |= {f"extra {name}": v.float() / v.float().norm() for name, v in extra.items()}
    ref = next(iter(units.values()))
    conds |= {f"random-{k}": directions.random_direction_like(ref, seed=cfg.seed + k) for k in range(a.random)}
    timings = {"setup_s": round(time.time() - t0, 1)}
    t1 = time.time()
    with exp.lora(a.finetune, "rank32") as res:
        timings["finetune_s"] = round(time.time() - t1, 1)
        t2 = time.time()
        each = directions.ablate_each(res.model, conds)
        df = exp.answers(f"{a.finetune} rank32", model=res.model, intervention=each)
        timings["sample_judge_s"] = round(time.time() - t2, 1)
    df = df.assign(finetune=a.finetune, ablated=df["intervention"].map(each.name_of()))
    table = chapters.em_tables("ch2_ablation", df, seed=cfg.seed)["ch2_ablation"]
    em = dict(zip(table["ablated"], table["em"]))
    base = em["none"]
    cut = {k: (1 - v / base) if base > 0 else None for k, v in em.items()}
    runs = [name for name in units if cut.get(f"run {name}") is not None and a.finetune in own.get(name, {})]
    here = [cut[f"run {name}"] for name in runs]
    there = [own[name][a.finetune] for name in runs]
    res = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "profile": a.profile, "model": cfg.model, "finetune": a.finetune, "layer_of_directions": "steering layer",
           "n_per_condition": int(df.groupby("ablated").size().min()), "timings": timings,
           "em": {k: round(float(v), 4) for k, v in em.items()},
           "cut_here": {k: None if v is None else round(float(v), 3) for k, v in cut.items()},
           "cut_in_own_run": {name: own[name][a.finetune] for name in runs},
           "own_vs_here": correlations(there, here)}
    print(table.to_string())
    print(json.dumps({k: res[k] for k in ("em", "own_vs_here", "timings")}, indent=1))
    out = Path(a.out) / "direction_spread.json"
    write_json(out, res)
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
