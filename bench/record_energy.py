"""A run's GPU energy, from its monitor (``scripts/gpu_record.sh`` logs ``gpu_power_w`` every ~5 s), against the
card's scale (``bench/gpu_power.py``: idle and matmul-bound board power): how long the same energy would last at
the card's full draw. That is a lower bound on the wall of any run doing the same GPU work with the same kernels,
whatever the order of its finetunes and chapters (rough: a kernel's joules are not exactly the same at every
draw). Counted two ways: all the energy at the full draw, and the energy above idle at the full draw's margin
over idle.

    python bench/record_energy.py bench/results/monitor_smollm2_h200_s30a_2026-12-06.csv \\
        --scale bench/results/gpu_power_h200_2026-12-06.json [--out F]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from emlib.data import write_json  # noqa: E402


def energy(t_s: np.ndarray, watts: np.ndarray, idle_w: float, full_w: float, above: float = 0.8) -> dict:
    """Trapezoid integrals of the board power samples ``watts`` at times ``t_s`` (seconds): joules in all and above
    ``idle_w``, the seconds each would last at ``full_w`` (the latter at ``full_w - idle_w``), and the seconds
    spent at or above ``above`` x ``full_w``."""
    t_s, watts = np.asarray(t_s, float), np.asarray(watts, float)
    if len(t_s) < 2 or np.any(np.diff(t_s) <= 0):
        raise ValueError("need at least two power samples at increasing times")
    dt = np.diff(t_s)
    span = float(t_s[-1] - t_s[0])
    mid = (watts[1:] + watts[:-1]) / 2
    joules = float(np.sum(dt * mid))
    above_idle = float(np.sum(dt * np.clip(mid - idle_w, 0, None)))
    return {"span_s": span, "energy_kj": round(joules / 1e3, 1),
            "above_idle_kj": round(above_idle / 1e3, 1), "mean_w": round(joules / span, 1),
            "seconds_at_full_draw": round(joules / full_w, 1),
            "seconds_at_full_draw_above_idle": round(above_idle / (full_w - idle_w), 1),
            f"seconds_at_or_above_{above:g}_full": round(float(np.sum(dt[mid >= above * full_w])), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("monitors", nargs="+", help="monitor-NAME.csv files (t_s, ..., gpu_power_w, ...)")
    ap.add_argument("--scale", required=True, help="bench/gpu_power.py's JSON for the same kind of card")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    scale = json.loads(Path(a.scale).read_text())
    idle, full = scale["phases"]["idle"]["watts"], scale["phases"]["matmul"]["watts"]
    res = {"scale": {"file": a.scale, "device": scale.get("device"), "idle_w": idle, "full_w": full}, "runs": {}}
    for m in a.monitors:
        frame = pd.read_csv(m)
        if "gpu_power_w" not in frame:
            raise SystemExit(f"{m} has no gpu_power_w column (monitors since 2026-12-06 log it)")
        frame = frame.dropna(subset=["gpu_power_w"])
        res["runs"][m] = energy(frame["t_s"].to_numpy(), frame["gpu_power_w"].to_numpy(), idle, full)
        print(Path(m).name, json.dumps(res["runs"][m]))
    if a.out:
        write_json(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
