"""Compile the bytecode (.pyc) that a machine's Python packages lack, once, and say how much was missing.

A process that imports a module without up-to-date bytecode compiles it from source; with
``PYTHONDONTWRITEBYTECODE`` set (the GPU machines' image sets it: their spawned workers run ``python3 -B``) it
writes nothing back, so every process of a run of record -- eight finetune workers, seven chapter kernels --
compiles the same modules again. The wheels ``gpu_record.sh setup`` installs are installed ``--no-compile`` and the
checkout's ``emlib`` has none either. ``compileall`` writes bytecode whatever that variable says, and a process
reads what exists. On 2 CPU cores (2026-12-07) the imports of a finetune worker took 6-7 s with bytecode and 20 s
without any.

    python3 scripts/bytecode.py DIR [DIR ...]      # prints "bytecode: compiled N of M ..." per folder
"""
from __future__ import annotations

import importlib.util
import os
import py_compile
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def missing(folder: Path) -> tuple[list[Path], int]:
    """(the source files in ``folder`` without up-to-date bytecode, how many source files it holds)."""
    lacking, total = [], 0
    for src in folder.rglob("*.py"):
        total += 1
        try:
            pyc = Path(importlib.util.cache_from_source(str(src)))
            fresh = pyc.exists() and pyc.stat().st_mtime >= src.stat().st_mtime
        except (OSError, ValueError, NotImplementedError):
            fresh = False
        if not fresh:
            lacking.append(src)
    return lacking, total


def _compile(src: str) -> bool:
    try:
        py_compile.compile(src, doraise=True)
        return True
    except (py_compile.PyCompileError, OSError, ValueError):  # a file that does not compile (a template, py2)
        return False


def main(argv: list[str] | None = None) -> int:
    folders = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not folders:
        raise SystemExit("usage: python3 scripts/bytecode.py DIR [DIR ...]")
    for folder in folders:
        if not folder.is_dir():
            print(f"bytecode: {folder} is not a folder, skipped")
            continue
        lacking, total = missing(folder)
        t0 = time.perf_counter()
        done = 0
        if len(lacking) > 64:
            with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
                done = sum(pool.map(_compile, map(str, lacking), chunksize=64))
        else:
            done = sum(_compile(str(f)) for f in lacking)
        per: dict[str, int] = {}
        for f in lacking:
            top = f.relative_to(folder).parts[0]
            per[top] = per.get(top, 0) + 1
        largest = ", ".join(f"{k} {v}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:4])
        print(f"bytecode: {folder}: {len(lacking)} of {total} source files had none, {done} compiled in "
              f"{time.perf_counter() - t0:.1f} s" + (f" (most in {largest})" if lacking else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
