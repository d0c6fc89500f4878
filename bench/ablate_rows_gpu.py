"""Benchmark: chapter 2's ablation answers sampled condition by condition (one ``Experiment.answers`` call per
ablated direction, as the chapter did until 2026-12-04) against all conditions in one call
(``directions.ablate_each``: one direction per row, ``experiment.CONDITIONS_PER_CALL`` conditions per sampler
call), on the run of record's model and settings (``paper`` profile: 8 questions x 50 samples per condition),
alone on one GPU. Not a test.

The conditions are chapter 2's: no ablation, a direction, ``n_random_directions`` random directions of the
same norm (here the direction is itself random: the timing does not depend on which it is). The chat model
is sampled (no finetune needed); each approach writes into a fresh run directory, so neither finds the
other's answers. Reports the seconds of sampling and judging, and the fast sampler's stats of the last call.

    python bench/ablate_rows_gpu.py --out $OUT [--model embedded] [--conditions 12] [--compact]

``--compact`` also samples the together call with the fast sampler's ``compact`` (ended rows dropped from the
batch as answers end), in a third run directory: its seconds, its compactions and its EM rates.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from emlib import directions, stats  # noqa: E402
from emlib.config import get_config  # noqa: E402
from emlib.data import atomic_write_bytes  # noqa: E402
from emlib.experiment import CONDITIONS_PER_CALL, Experiment  # noqa: E402
from emlib.fastgen import fast_sampler  # noqa: E402
from emlib.metrics import em_rate  # noqa: E402
from vecgroup_gpu import _timed  # noqa: E402  (synchronised wall time of a call)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--conditions", type=int, default=None, help="default: 2 + the profile's n_random_directions")
    ap.add_argument("--compact", action="store_true", help="also the together call with FastSampler.compact")
    ap.add_argument("--no-one-by-one", action="store_true",
                    help="skip the one-condition-per-call baseline (measured 2026-12-04: 61 s)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ablate-rows-"))
    out = Path(a.out) / f"ablate_rows_{Path(a.model).stem.lower()}.json"
    exp = Experiment(get_config(a.profile, model=a.model, run_dir=str(tmp / "one-by-one")))
    n = a.conditions or 2 + exp.cfg.n_random_directions
    d = exp.model.config.hidden_size
    u = directions.random_direction_like(torch.ones(d), seed=99)
    dirs = {"none": None, "direction": u,
            **{f"random-{k}": directions.random_direction_like(u, seed=k) for k in range(n - 2)}}
    result: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
                    "torch": torch.__version__, "model": a.model, "profile": a.profile, "conditions": n,
                    "answers_per_condition": len(exp.questions()) * exp.cfg.n_samples,
                    "sample_batch_size": exp.cfg.sample_batch_size, "conditions_per_call": CONDITIONS_PER_CALL}

    def save():
        atomic_write_bytes(out, json.dumps(result, indent=2).encode())
        print(json.dumps(result, indent=2), flush=True)

    exp.answers("warm-up", n_samples=1)  # CUDA, the judge and the sampler's first call, paid by neither

    def one_by_one():
        return [exp.answers("chat", intervention=None if w is None else directions.ablate(exp.model, w))
                for w in dirs.values()]

    frames = None
    if not a.no_one_by_one:
        frames, secs = _timed(one_by_one)
        result["one_by_one"] = {"seconds": secs, "calls": n, "answers": sum(len(f) for f in frames),
                                "last_call": dict(fast_sampler.last_stats)}
        save()
    together = Experiment(get_config(a.profile, model=a.model, run_dir=str(tmp / "together")))
    together.model = exp.model  # the same weights and judge, no second load
    together._judge = exp.judge
    each = directions.ablate_each(exp.model, dirs)
    df, secs = _timed(lambda: together.answers("chat", intervention=each))
    result["together"] = {"seconds": secs, "answers": len(df), "last_call": dict(fast_sampler.last_stats)}
    def by_condition(frame) -> dict:  # a together call's EM rate per condition
        named = frame.assign(name=frame["intervention"].map(each.name_of()))
        return {name: round(em_rate(named[named["name"] == name], n_boot=1).value, 4) for name in dirs}

    result["em_rate"] = {"together": by_condition(df)}  # the same distribution as one by one: rates agree to noise
    result["em_pooled"] = {"together": _pooled(df)}
    if frames is not None:
        result["em_rate"]["one_by_one"] = {name: round(em_rate(f, n_boot=1).value, 4) for name, f in zip(dirs, frames)}
        result["speedup"] = round(result["one_by_one"]["seconds"] / secs, 2)
    save()
    if a.compact:
        packed = Experiment(get_config(a.profile, model=a.model, run_dir=str(tmp / "compact")))
        packed.model, packed._judge = exp.model, exp.judge
        fast_sampler.compact = True
        try:
            dfc, secs_c = _timed(lambda: packed.answers("chat", intervention=each))
        finally:
            fast_sampler.compact = False
        result["compact"] = {"seconds": secs_c, "answers": len(dfc), "last_call": dict(fast_sampler.last_stats),
                             "em_rate": by_condition(dfc),
                             "em_pooled": _pooled(dfc), "speedup_over_together": round(secs / secs_c, 2)}
        save()


def _pooled(df) -> dict:
    """The EM rate over every answer of a call, with its Wilson 95% interval."""
    r = em_rate(df, n_boot=1)
    return {"value": round(r.value, 4), "wilson": [round(x, 4) for x in stats.wilson(r.n_hits, r.n)],
            "n": r.n}


if __name__ == "__main__":
    main()
