"""Issue 19, item 3: `make book` (quick) on this machine's CPU, from a fresh clone, timed per phase.

    python3 bench/book_cpu.py [--repo .] [--out bench/results/book_cpu.json]   # ~15 min on 2 cores

Clones the repository's committed HEAD into a temporary folder, then in that clone runs what a reader runs:
``make venv`` (a new ``.venv`` from the package index this machine can reach) and ``make book``
(``PROFILE=auto``: ``quick`` on a machine without CUDA). Records the wall time of each phase,
each chapter's seconds as ``emlib.book build`` wrote them (``runs/book/book_build.json``), the CPU count,
the load average before and after, and the CPU time the children used. Nothing is asserted; the clone is
removed at the end (``--keep`` keeps it). The distilled judge runs inside the chapters, so its time is in
theirs. A first run also pays the one-time GGUF -> bf16 conversion into ``EMLIB_CACHE`` when that cache is
empty (``cache_was_warm`` says which).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def _timed(cmd: list[str], cwd: Path, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        proc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with code {proc.returncode} after {secs:.0f} s: see {log}")
    return round(secs, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=".", help="the repository to clone (its committed HEAD)")
    ap.add_argument("--out", default="bench/results/book_cpu.json")
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    a = ap.parse_args(argv)
    repo = Path(a.repo).resolve()
    if not (repo / "Makefile").exists():
        sys.exit(f"{repo} has no Makefile: pass --repo with the repository's root.")
    cache = Path(os.environ.get("EMLIB_CACHE", Path.home() / ".cache" / "emlib"))
    warm = any(cache.glob("models/*/model.safetensors")) if cache.exists() else False
    work = Path(tempfile.mkdtemp(prefix="emlib-book-cpu-"))
    clone, log = work / "clone", work / "book.log"
    load_before = os.getloadavg()
    phases = {}
    try:
        phases["git_clone_s"] = _timed(["git", "clone", "-q", str(repo), str(clone)], work, log)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
        phases["make_venv_s"] = _timed(["make", "venv"], clone, log)
        phases["make_book_s"] = _timed(["make", "book"], clone, log)
        build = json.loads((clone / "runs" / "book" / "book_build.json").read_text())
    finally:
        if a.keep:
            print(f"kept {work}")
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": commit, "cpu_count": os.cpu_count(), "profile": build["profile"],
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cache_was_warm": warm, "phases": phases,
        "chapters_s": build["seconds"], "children_cpu_s": round(child.ru_utime + child.ru_stime, 1),
        "total_s": round(sum(phases.values()), 1),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps(result, indent=2))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
