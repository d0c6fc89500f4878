"""How each finetune task of a run of record got going: when its worker took it, the model load, the time before
its training loop (rows encoded, the step built, the KL reference), its CUDA graph captures and when its first
steps were read back -- the part of a run before the GPU is busy.

    python bench/record_startup.py RUN_DIR [--monitor monitor.csv] [--out startup.json]

Reads ``record.json`` (each task's wall time, load phase and loop seconds), each finetune's ``train_meta.json``
(``fast_step``: graphs captured and their seconds, inside the loop) and ``train_log.csv`` (the loop's seconds at
its first logged step). The members of a group (``emlib.vecgroup``) share one task: it is listed once, under its
first member. With ``--monitor`` (``gpu_record.sh``'s CSV) it also says when the card first reached 100%
utilisation and 400 W. Run seconds are from the run's start, as ``record.json``'s ``ended_s``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emlib.chapters import Finetune  # noqa: E402
from emlib.config import Config  # noqa: E402
from emlib.experiment import finetune_dir as _finetune_dir  # noqa: E402


def finetune_dir(run: Path, name: str, seed: int) -> Path:
    """The folder of the finetune ``name`` (``emlib.chapters.Finetune.name``: ``lora-medical-rank1-narrow-kl0.3``,
    ``-seedN`` only for a seed other than the run's) in ``run``: where ``emlib.experiment.finetune_dir`` puts it."""
    f = Finetune.from_name(name)
    return _finetune_dir(Config(run_dir=str(run), seed=seed), f.kind, f.dataset, f.solution, f.kl_scale, f.seed, f.shape)


def first_read_s(folder: Path) -> float | None:
    """The training loop's seconds when its first steps were read back (``train_log.csv``'s first row)."""
    try:
        with open(folder / "train_log.csv", newline="") as f:
            row = next(csv.DictReader(f), None)
    except OSError:
        return None
    return round(float(row["seconds"]), 2) if row and row.get("seconds") not in (None, "") else None


def tasks(run: Path) -> list[dict]:
    """One row per finetune task, by start: its first job's name, members, start and end (run seconds), load,
    before the loop, the loop's first read, graphs and their capture seconds, and the run seconds at which its
    first steps were read back (``first_steps_s``)."""
    rec = json.loads((run / "record.json").read_text())
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    seed = int(cfg.get("seed", 0))
    seen: dict[tuple, dict] = {}
    for name, j in rec.get("timings", {}).get("jobs", {}).items():
        if j.get("ended_s") is None or j.get("seconds") is None:
            continue
        key = (j["ended_s"], j["seconds"], j.get("train_seconds"), j.get("group"))
        if key in seen:
            seen[key]["members"] += 1
            continue
        folder = finetune_dir(run, name, seed)
        meta = {}
        if (folder / "train_meta.json").exists():
            meta = json.loads((folder / "train_meta.json").read_text())
        fast = meta.get("fast_step") or {}
        load = float((j.get("phases") or {}).get("load") or 0.0)
        loop = j.get("train_seconds")
        start = round(j["ended_s"] - j["seconds"], 1)
        before = None if loop is None else round(j["seconds"] - load - float(loop), 1)
        first = first_read_s(folder)
        at = None if before is None or first is None else round(start + load + before + first, 1)
        seen[key] = {"task": name, "members": 1, "start_s": start, "end_s": j["ended_s"], "load_s": round(load, 1),
                     "before_loop_s": before, "graphs": fast.get("graphs"),
                     "capture_s": None if fast.get("capture_seconds") is None else round(fast["capture_seconds"], 1),
                     "first_read_s": first, "first_steps_s": at}
    return sorted(seen.values(), key=lambda r: r["start_s"])


def card_busy(monitor: Path) -> dict:
    """Run seconds at which the card first showed 100% utilisation and first drew 400 W or more."""
    util = watts = None
    with open(monitor, newline="") as f:
        for row in csv.DictReader(f):
            t = float(row["t_s"])
            if util is None and float(row.get("gpu_util_pct") or 0) >= 100:
                util = t
            if watts is None and float(row.get("gpu_power_w") or 0) >= 400:
                watts = t
    return {"util_100_s": util, "power_400w_s": watts}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--monitor", type=Path, help="gpu_record.sh's monitor CSV of the same run")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if not (a.run_dir / "record.json").is_file():
        raise SystemExit(f"{a.run_dir} has no record.json: pass the folder of a run of record")
    rows = tasks(a.run_dir)
    cols = ["task", "members", "start_s", "load_s", "before_loop_s", "graphs", "capture_s", "first_read_s",
            "first_steps_s", "end_s"]
    print("| " + " | ".join(cols) + " |")
    print("| --- |" + " ---: |" * (len(cols) - 1))
    for r in rows:
        print("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |")
    busy = card_busy(a.monitor) if a.monitor else None
    captured = [r["capture_s"] for r in rows if r["capture_s"] is not None]
    summary = {"tasks": len(rows), "capture_s_total": round(sum(captured), 1) if captured else None, "card": busy}
    print(json.dumps(summary))
    if a.out:
        a.out.write_text(json.dumps({"run_dir": str(a.run_dir), "summary": summary, "tasks": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
