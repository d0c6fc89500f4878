"""Where a run's processes spend their time, by phase (load, train, sample, judge, activations, metrics): the
tallies the chapters write to ``RUN_DIR/logs/phases/`` and the finetunes' in ``record.json``
(:func:`emlib.timing.run_table`), as a markdown table of process-seconds.

    python bench/record_phases.py record/smollm2-135m [--out bench/results/record_phases_smollm2_h200.json]

The processes of a run of record run side by side on one GPU, so a phase's seconds include waiting for the GPU
while other processes use it, and the columns add up to more than the run's wall time.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from emlib import timing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out")
    ap.add_argument("--label", help="what the run was (command, machine, date), kept in the JSON")
    a = ap.parse_args(argv)
    try:
        frame = timing.run_table(a.run_dir)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    cols = list(frame.columns)
    print("| phase | " + " | ".join(c[:2] if c[:2].isdigit() else c for c in cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for phase, row in frame.iterrows():
        print(f"| {phase} | " + " | ".join(f"{v:.0f}" for v in row) + " |")
    if a.out:
        rec = Path(a.run_dir) / "record.json"
        total = json.loads(rec.read_text()).get("timings", {}).get("total_s") if rec.exists() else None
        out = {"run_dir": a.run_dir, "label": a.label, "total_s": total, "seconds": frame.to_dict()}
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
