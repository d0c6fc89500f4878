"""Where a run of record spends its time, from its executed notebooks: papermill stores each cell's wall time
(``metadata.papermill.duration``), so the slowest cells of every chapter are read back without running anything.

    python bench/record_cells.py record/smollm2-135m [--min-seconds 3] [--out bench/results/record_cells_smollm2.json]

Prints a markdown table (chapter, seconds, share of the chapter, the cell's first code line) and writes the same
rows as JSON. The chapters of a run of record run in parallel on one GPU, so a cell's time includes waiting for
the GPU while other chapters use it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def cell_times(run_dir: str | Path, min_seconds: float = 3.0) -> list[dict]:
    """One row per code cell of at least ``min_seconds``: chapter, seconds, share (of the chapter's cells), line."""
    rows = []
    for nb in sorted(Path(run_dir, "executed").glob("*.ipynb")):
        cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        times = [float(c.get("metadata", {}).get("papermill", {}).get("duration") or 0.0) for c in cells]
        total = sum(times)
        for c, t in zip(cells, times):
            if t >= min_seconds:
                src = "".join(c["source"]).strip().splitlines()
                line = next((ln for ln in src if ln.strip() and not ln.lstrip().startswith("#")), "")
                rows.append({"chapter": nb.stem, "seconds": round(t, 1), "share": round(t / total, 3) if total else 0.0,
                             "chapter_cells_s": round(total, 1), "first_line": line[:120]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    rows = cell_times(a.run_dir, a.min_seconds)
    if not rows:
        raise SystemExit(f"{a.run_dir}/executed/ has no notebook with papermill cell times: pass a run directory "
                         "that `python -m emlib.record run` or `make book` wrote.")
    print("| chapter | s | share | cell |\n| --- | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['chapter']} | {r['seconds']:.0f} | {100 * r['share']:.0f}% | `{r['first_line'].replace('|', '/')}` |")
    if a.out:
        Path(a.out).write_text(json.dumps({"run_dir": a.run_dir, "cells": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
