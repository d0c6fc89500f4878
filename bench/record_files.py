"""File a run of record that came back from a device call into bench/results, under the names bench/README.md
uses, and write its analyses, in one command.

    python bench/record_files.py /work/.device/9 --card h100 --tag s34_packon [--model smollm2] [--date 2026-12-07]
        [--extract /tmp/s34/on] [--scale bench/results/gpu_power_h100_2026-12-06.json] [--force]

PACK_DIR is what ``bash scripts/gpu_record.sh pack NAME RUN_DIR`` wrote: record.tar.gz, monitor-NAME.csv,
monitor-NAME-apps.csv and record-NAME.log. The run is extracted (into ``--extract``, else a new temporary
folder) and, as ``{kind}_{model}_{card}_{tag}_{date}``: record.json (``record_``), the monitors (``monitor_``,
``monitor_apps_``) and the log (``record_log_``, .txt) are copied, and ``record_phases.py``, ``record_cells.py``,
``record_timeline.py``, ``record_startup.py`` and, where the card has a power scale (``gpu_power_{card}_*.json``,
the newest, or ``--scale``), ``record_energy.py`` write theirs. Nothing is written if a name is taken (``--force``
replaces).
The last line printed is the extracted folder, for ``python -m emlib.results record/smollm2-135m DIR ...``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def pack_files(pack: Path) -> dict[str, Path]:
    """The pack's four files by role (``record``, ``monitor``, ``apps``, ``log``); one clear error if any is missing."""
    monitors = [p for p in pack.glob("monitor-*.csv") if not p.name.endswith("-apps.csv")]
    if len(monitors) != 1 or not (pack / "record.tar.gz").is_file():
        raise SystemExit(f"{pack}: expected record.tar.gz and one monitor-NAME.csv (what `gpu_record.sh pack NAME "
                         f"RUN_DIR` writes); found {sorted(p.name for p in pack.iterdir()) if pack.is_dir() else 'no folder'}")
    name = monitors[0].name[len("monitor-"):-len(".csv")]
    files = {"record": pack / "record.tar.gz", "monitor": monitors[0], "apps": pack / f"monitor-{name}-apps.csv",
             "log": pack / f"record-{name}.log"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"{pack}: missing {', '.join(missing)}")
    return files


def targets(model: str, card: str, tag: str, date: str, results: Path = RESULTS) -> dict[str, Path]:
    """Where each file and analysis goes: ``{kind}_{model}_{card}_{tag}_{date}.{ext}`` in ``results``."""
    stem = f"{model}_{card}_{tag}_{date}"
    return {"record": results / f"record_{stem}.json", "monitor": results / f"monitor_{stem}.csv",
            "apps": results / f"monitor_apps_{stem}.csv", "log": results / f"record_log_{stem}.txt",
            "phases": results / f"record_phases_{stem}.json", "cells": results / f"record_cells_{stem}.json",
            "timeline": results / f"record_timeline_{stem}.json", "energy": results / f"record_energy_{stem}.json",
            "startup": results / f"record_startup_{stem}.json"}


def power_scale(card: str, results: Path = RESULTS) -> Path | None:
    """The newest ``gpu_power_{card}_*.json`` (``bench/gpu_power.py``) in ``results``, else in bench/results, or None."""
    for folder in dict.fromkeys((results, RESULTS)):
        found = sorted(folder.glob(f"gpu_power_{card}_*.json"))
        if found:
            return found[-1]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pack", type=Path, help="the folder a device call's files came back in")
    ap.add_argument("--card", required=True, help="h100 or h200 (as in the file names)")
    ap.add_argument("--tag", required=True, help="session and variant, e.g. s34_packon")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d", time.gmtime()))
    ap.add_argument("--extract", type=Path, help="extract the run here (default: a new temporary folder)")
    ap.add_argument("--scale", type=Path, help="the card's power scale (default: the newest gpu_power_CARD_*.json)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--force", action="store_true", help="replace files of the same names")
    a = ap.parse_args(argv)
    files = pack_files(a.pack)
    out = targets(a.model, a.card, a.tag, a.date, a.results)
    taken = [p.name for p in out.values() if p.exists()]
    if taken and not a.force:
        raise SystemExit(f"already in {a.results}: {', '.join(taken)} (another --tag, or --force to replace)")
    scale = a.scale or power_scale(a.card, a.results)

    run = a.extract or Path(tempfile.mkdtemp(prefix=f"record-{a.tag}-"))
    run.mkdir(parents=True, exist_ok=True)
    with tarfile.open(files["record"]) as tar:
        tar.extractall(run, filter="data")
    if not (run / "record.json").is_file():
        raise SystemExit(f"{files['record']} holds no record.json: is it a pack of `gpu_record.sh pack`?")

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import record_cells
    import record_energy
    import record_phases
    import record_startup
    import record_timeline

    a.results.mkdir(parents=True, exist_ok=True)
    existed = {p for p in out.values() if p.exists()}  # only with --force: a failure leaves these be
    try:  # all or nothing: an analysis that fails takes the files this filing made with it
        shutil.copyfile(run / "record.json", out["record"])
        for role in ("monitor", "apps", "log"):
            shutil.copyfile(files[role], out[role])
        record_phases.main([str(run), "--out", str(out["phases"])])
        record_cells.main([str(run), "--out", str(out["cells"])])
        record_timeline.main([str(run), "--apps", str(out["apps"]), "--out", str(out["timeline"])])
        record_startup.main([str(run), "--monitor", str(out["monitor"]), "--out", str(out["startup"])])
        if scale is not None:
            record_energy.main([str(out["monitor"]), "--scale", str(scale), "--out", str(out["energy"])])
        else:
            print(f"no power scale for {a.card} in {a.results} (bench/gpu_power.py): no energy file")
    except BaseException:
        for p in set(out.values()) - existed:
            p.unlink(missing_ok=True)
        raise
    print("filed:", ", ".join(p.name for p in out.values() if p.exists()))
    print(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
