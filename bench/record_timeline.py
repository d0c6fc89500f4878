"""A run of record's processes on one timeline (:func:`emlib.timing.run_timeline`): each finetune task (a group
once) and chapter, when it could start, started and ended, and the GPU memory a finetune task's torch reserved
and allocated at its peak and held after it; with ``--apps`` (``monitor-NAME-apps.csv`` from
``scripts/gpu_record.sh start``) also each process's largest GPU memory as ``nvidia-smi`` listed it.

    python bench/record_timeline.py RUN_DIR [--apps monitor-s-apps.csv] [--out timeline.json]

With the chapters' phase spans (runs from 2026-12-06 on: :func:`emlib.timing.phase_spans`), the JSON also holds
``spans`` (each chapter's outermost load / sample / judge / ... calls on the run's clock) and ``busy``: per
5-second bin, how many chapters were inside a phase (what a GPU monitor's idle samples can be set against).

A chapter's ``waited_s`` is the time from ``ready_s`` (its finetunes and earlier chapters done) to its start:
the wait for room on the GPU (``emlib.record.Admission``). Runs before 2026-12-06 have no ``ready_s``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from emlib import timing


def processes(apps_csv: str | Path) -> pd.DataFrame:
    """Per process of a ``monitor-NAME-apps.csv``: first and last time seen (s), largest GPU memory (MiB), and
    what it was (``worker``: a finetune pool worker; ``chapter``: a papermill kernel; ``mps``: the MPS server)."""
    frame = pd.read_csv(apps_csv)
    if frame.empty:
        return pd.DataFrame(columns=["pid", "what", "first_s", "last_s", "max_mib"])

    def what(cmd: str) -> str:
        cmd = str(cmd)
        return ("chapter" if "ipykernel" in cmd else "worker" if "multiprocessing" in cmd
                else "mps" if "mps" in cmd else "other")

    out = frame.groupby("pid").agg(first_s=("t_s", "min"), last_s=("t_s", "max"), max_mib=("used_mib", "max"),
                                   command=("command", "first")).reset_index()
    out.insert(1, "what", out.pop("command").map(what))
    return out.sort_values(["first_s", "pid"]).reset_index(drop=True)


def busy_bins(spans: pd.DataFrame, width: float = 5.0) -> list[dict]:
    """Per ``width``-second bin of the run: the chapters inside a phase at any time in it, by phase."""
    if spans.empty:
        return []
    out = []
    t, end = 0.0, float(spans["end_s"].max())
    while t < end:
        inside = spans[(spans["start_s"] < t + width) & (spans["end_s"] > t)]
        out.append({"t_s": t, "phases": {f"{r.chapter[:2]}": r.phase for r in inside.itertuples()}})
        t += width
    return out


def _markdown(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join("" if pd.isna(v) else f"{v:g}" if isinstance(v, float) else str(v)
                                       for v in row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--apps", help="monitor-NAME-apps.csv of the same run")
    ap.add_argument("--out", help="write the tables as JSON here")
    ap.add_argument("--label", help="what the run was (command, machine, date), kept in the JSON")
    a = ap.parse_args(argv)
    try:
        t = timing.run_timeline(a.run_dir)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    t["waited_s"] = (t["started_s"] - t["ready_s"]).round(1)
    print(_markdown(t))
    out = {"run_dir": a.run_dir, "label": a.label, "timeline": json.loads(t.to_json(orient="records"))}
    spans = timing.phase_spans(a.run_dir)
    if len(spans):
        out["spans"] = json.loads(spans.to_json(orient="records"))
        out["busy"] = busy_bins(spans)
    if a.apps:
        p = processes(a.apps)
        print()
        print(_markdown(p))
        out["processes"] = json.loads(p.to_json(orient="records"))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
