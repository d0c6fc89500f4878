"""Benchmark: steering vectors (``--kind vector``) or rank-1 adapters (``--kind lora``) trained together
(emlib.vecgroup) against one at a time (emlib.train), on the run of record's model, data and settings (the
``paper`` profile), alone on one GPU (or any device). Not a test: it prints numbers and writes
``vecgroup_<model>.json`` (``vecgroup_lora_<model>.json`` for adapters).

1. chapter 3's seed-0 solutions of that kind as one group: general and narrow at every lambda of the sweep,
   and drift for vectors (``Experiment.vectors`` / ``Experiment.loras``, what ``emlib.record`` runs as one pool
   task);
2. the narrow solution (default lambda) and the general one each alone, as ``Experiment.vector`` /
   ``Experiment.lora`` train them (emlib.train with its CUDA-graph step on a GPU), in fresh run directories;
3. the narrow one alone through the group trainer (a group of one), in another fresh run directory.

The "one at a time" total for the group is estimated from 2.: (number of KL members) x narrow + general.
Agreement: each solution trained alone against the same one from the group (cosine of the vector, or of the
adapter's A and B together; relative difference; final training loss).

    python bench/vecgroup_gpu.py --out $OUT [--kind lora] [--model embedded] [-c kl_lambda_vector 6.58] [--parts group,one]
    python bench/vecgroup_gpu.py --out DIR --kind lora --profile quick     # 2 CPU cores: the quick book's groups
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emlib.chapters import sweep_scales  # noqa: E402
from emlib.config import get_config  # noqa: E402
from emlib.data import atomic_write_bytes  # noqa: E402
from emlib.experiment import Experiment  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, round(time.perf_counter() - t0, 2)


def _alone(exp: Experiment, ds: str, sol: str, lora: bool):
    """One solution trained alone, as a chapter trains it (the adapter detached again)."""
    if not lora:
        return exp.vector(ds, sol)
    with exp.lora(ds, "rank1", sol) as res:
        return res


def _flat(res, lora: bool) -> torch.Tensor:
    """A trained solution as one float32 vector: the steering vector, or the adapter's A and B together."""
    if not lora:
        return res.vector.vector.float().cpu()
    from emlib.adapters import LoraAdapter

    state = LoraAdapter.load(res.out_dir).state
    return torch.cat([state[k].float().flatten() for k in sorted(state)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--profile", default="paper")
    ap.add_argument("-c", nargs=2, action="append", default=[], metavar=("FIELD", "VALUE"))
    ap.add_argument("--parts", default="group,alone,one", help="which of: group, alone, one (comma-separated)")
    ap.add_argument("--kind", default="vector", choices=["vector", "lora"])
    a = ap.parse_args()
    over = {k: json.loads(v) if v[:1] in "0123456789-[{" else v for k, v in a.c}
    tmp = Path(tempfile.mkdtemp(prefix="vecgroup-"))
    result: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
                    "torch": torch.__version__, "model": a.model, "profile": a.profile, "overrides": over}
    result["kind"] = a.kind
    lora = a.kind == "lora"
    out = Path(a.out) / f"vecgroup_{'lora_' if lora else ''}{Path(a.model).stem.lower()}.json"

    def save():
        atomic_write_bytes(out, json.dumps(result, indent=2).encode())
        print(json.dumps(result, indent=2), flush=True)

    def exp_in(name: str) -> Experiment:
        return Experiment(get_config(a.profile, model=a.model, run_dir=str(tmp / name), **over))

    exp = exp_in("group")
    ds = exp.cfg.datasets[0]
    members = ([("general", 1.0, None)] + ([] if lora else [("drift", 1.0, None)])
               + [("narrow", m, None) for m in sweep_scales(exp.cfg.kl_sweep)])
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    together = (lambda e, ms: e.loras(ds, ms)) if lora else (lambda e, ms: e.vectors(ds, ms))
    group, t_group = _timed(lambda: together(exp, members))
    result["group"] = {"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                       if torch.cuda.is_available() else None,"members": [f"{s}-kl{m:g}" for s, m, _ in members], "seconds": t_group,
                       "train_seconds": group[0].meta["seconds"], "steps": group[0].meta["steps"],
                       "step": group[0].meta.get("fast_step"),  # CUDA graphs captured, or why not
                       "final_loss": {f"{s}-kl{m:g}": r.meta["final_loss"] for (s, m, _), r in zip(members, group)}}
    save()
    parts = set(a.parts.split(","))
    alone: dict = {}
    for sol in ("narrow", "general") if "alone" in parts else ():
        e = exp_in(f"alone-{sol}")
        e.model = exp.model  # the same weights, no second load
        res, secs = _timed(lambda: _alone(e, ds, sol, lora))
        ref = group[[m[0] for m in members].index(sol) if sol == "general" else
                    members.index(("narrow", 1.0, None))]
        v, w = _flat(res, lora), _flat(ref, lora)
        alone[sol] = {"seconds": secs, "train_seconds": res.meta["seconds"], "final_loss": res.meta["final_loss"],
                      "group_final_loss": ref.meta["final_loss"],
                      "cosine_with_group": float(torch.nn.functional.cosine_similarity(v, w, dim=0)),
                      "relative_difference": float((v - w).norm() / w.norm()),
                      "fast_step": res.meta.get("fast_step")}
        result["alone"] = alone
        save()
    if "one" not in parts:
        return
    e = exp_in("group-of-one")
    e.model = exp.model
    one, secs = _timed(lambda: together(e, [("narrow", 1.0, None)]))
    result["group_of_one_narrow"] = {"seconds": secs, "train_seconds": one[0].meta["seconds"],
                                     "step": one[0].meta.get("fast_step"),
                                     "final_loss": one[0].meta["final_loss"]}
    save()
    if "alone" not in parts:
        return
    n_kl = sum(1 for s, _, _ in members if s != "general")
    est = n_kl * alone["narrow"]["train_seconds"] + alone["general"]["train_seconds"]
    result["summary"] = {"one_at_a_time_estimate_s": round(est, 1), "group_s": result["group"]["train_seconds"],
                         "speedup": round(est / result["group"]["train_seconds"], 2),
                         "kl_solution_alone_s": alone["narrow"]["train_seconds"],
                         "kl_solution_group_of_one_s": one[0].meta["seconds"],
                         "group_of_one_speedup": round(alone["narrow"]["train_seconds"] / one[0].meta["seconds"], 2)}
    save()


if __name__ == "__main__":
    main()
