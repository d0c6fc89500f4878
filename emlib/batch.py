"""Parameter sweeps over chapters: every combination is one papermill run in its own folder.

(About 600 lines, kept as one module: the grid file, each combination's folder and markers, the backends,
the index and the command line are one idea, a sweep, and read top to bottom.)

    python -m emlib.batch examples/grid_smoke.yaml [--out DIR] [--workers N] [--gpus 0,1]
                                                   [--ray auto|local|ADDRESS] [--force] [--dry-run]

A grid file (YAML) names chapters and parameters::

    chapters: ["01"]               # numbers ("01" or 1), stems or paths of jupytext chapters
    out: runs/sweeps/smoke         # optional (the CLI's --out wins)
    parameters:                    # a list is an axis (cartesian product), a scalar is fixed;
      profile: smoke               # a list-valued parameter is a list of lists: [[medical], [sport]]
      seed: [0, 1]                 # config fields at top level: the runner puts them in the chapter's `config`
    combinations:                  # optional explicit groups, crossed with the axes above
      - {n_train: 4, lr: 0.001}
    results: ["ch1_em.*.em"]       # optional: which results.json leaves go into the index
    timeout: 3600                  # optional: seconds per cell
    cwd: .                         # optional: the kernels' working directory (default: repo root)

Layout of ``out``::

    <out>/<chapter-stem>/<slug>-<hash>/
        params.json                the combination's parameters and what papermill was given
        <chapter-stem>.ipynb       the executed (or partially executed) notebook
        run/                       the combination's run_dir (unless the grid sets run_dir)
        done.json                  finished marker, written atomically after success only
        failed.json                the last failure (error, failing cell, traceback)
        .lock                      held (flock) while a process runs the combination
    <out>/index.parquet, index.csv one row per combination: load with ``load_index(out)``

Chapters are selected, parameterised, checked and executed by :mod:`emlib.runner`; this module expands the
grid, keeps each combination's folder, markers and results, and writes the index.

A rerun skips combinations with a ``done.json`` (status ``skipped``) and retries failed or unfinished
ones. The folder is found again by the hash of the chapter and its parameters, so adding values to an
axis keeps the earlier folders. A parameter that no grid chapter takes is an error; one that only some
chapters take is passed to those only.

Backends: in-process (one worker), a process pool (``--workers N``; on a GPU machine one worker per
GPU with ``CUDA_VISIBLE_DEVICES`` set per worker) or Ray tasks (``--ray``; ``num_gpus`` per task
when the cluster has GPUs, ``num_cpus`` otherwise). Ray is optional and imported only when asked for.

A killed sweep leaves nothing running: local workers die with their parent (:mod:`emlib.lifeline`), and
their kernels with them, so none goes on with queued combinations; a restart finds the combinations that
were running unfinished and runs them again. One process at a time runs a combination (``.lock``).
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import hashlib
import io
import itertools
import json
import math
import re
import sys
import time
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from . import runner
from .cache import canonical_json
from .data import atomic_write_bytes, file_lock

GRID_KEYS = {"chapters", "parameters", "combinations", "out", "results", "timeout", "cwd",
             "workers", "gpus", "gpus_per_job", "cpus_per_job", "max_results"}
DONE, FAILED, PARAMS, LOCK = "done.json", "failed.json", "params.json", ".lock"
STATUSES = ("ok", "failed", "skipped", "pending")
MAX_RESULTS = 40  # results.json leaves per row when the grid names no patterns


@dataclass(frozen=True)
class Combination:
    """One chapter x one parameter combination: the runner's job and where the sweep keeps it."""

    job: runner.Job  # what papermill gets (config fields folded into ``config``), every path absolute
    params: dict  # the grid's values this chapter takes, flat (run_dir included): the index's columns
    key: str  # hash of chapter + parameters (run_dir excluded when it is the default)
    folder: str  # <out>/<chapter>/<slug>-<key>
    results: tuple[str, ...] | None = None
    max_results: int = MAX_RESULTS

    @property
    def chapter(self) -> str:  # the chapter's stem, e.g. "01_em_emerges"
        return self.job.chapter

    @property
    def notebook(self) -> Path:
        return Path(self.job.notebook)


# --------------------------------------------------------------------------------------------- grid
def load_grid(path: str | Path) -> dict:
    """Read and check a grid file; relative chapter paths are resolved against the file's folder."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No grid file {path}: pass the path of a YAML grid (see examples/grid_smoke.yaml).")
    try:
        grid = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: the grid file is not valid YAML ({e.problem or e.context or 'syntax error'}): "
                         "fix that line (see examples/grid_smoke.yaml for the format).") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: the grid file is not valid YAML ({' '.join(str(e).split())}).") from None
    try:
        grid = check_grid(grid)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    grid["_base"] = str(path.resolve().parent)
    return grid


def check_grid(grid: dict) -> dict:
    """Validate the grid's shape; one error message per mistake, saying what to write instead."""
    if not isinstance(grid, dict):
        raise ValueError("A grid is a mapping with at least 'chapters' and 'parameters'.")
    unknown = sorted(set(grid) - GRID_KEYS - {"_base"})
    if unknown:
        raise ValueError(f"Unknown grid key(s) {', '.join(unknown)}: valid keys are {', '.join(sorted(GRID_KEYS))}.")
    chapters = grid.get("chapters")
    if chapters is None or chapters == []:
        raise ValueError("The grid names no chapters: add e.g. `chapters: [\"01\"]`.")
    grid = dict(grid)
    grid["chapters"] = [chapters] if isinstance(chapters, (str, int)) else list(chapters)
    params = grid.get("parameters") or {}
    if not isinstance(params, dict):
        raise ValueError("'parameters' must be a mapping name -> value or list of values.")
    for name, value in params.items():
        if isinstance(value, list) and not value:
            raise ValueError(f"Parameter {name!r} has an empty list of values: give at least one.")
    grid["parameters"] = params
    combos = grid.get("combinations") or []
    if not isinstance(combos, list) or not all(isinstance(c, dict) for c in combos):
        raise ValueError("'combinations' must be a list of mappings, e.g. [{seed: 0, lr: 0.001}].")
    axes = {k for k, v in params.items() if isinstance(v, list)}
    for c in combos:
        both = sorted(axes & set(c))
        if both:
            raise ValueError(f"{', '.join(both)} is both an axis in 'parameters' and set in 'combinations': "
                             "keep it in one place.")
    grid["combinations"] = combos
    if grid.get("results") is not None and isinstance(grid["results"], str):
        grid["results"] = [grid["results"]]
    return grid


def expand(grid: dict) -> list[dict]:
    """All parameter combinations: the cartesian product of the list-valued parameters, with the
    scalars fixed, crossed with the explicit ``combinations`` (when given); duplicates dropped."""
    grid = check_grid(grid)
    params = grid["parameters"]
    fixed = {k: v for k, v in params.items() if not isinstance(v, list)}
    axes = {k: v for k, v in params.items() if isinstance(v, list)}
    groups = grid["combinations"] or [{}]
    out, seen = [], set()
    for values in itertools.product(*axes.values()):
        for group in groups:
            chosen = dict(zip(axes, values))
            combo = {**{k: chosen.get(k, fixed.get(k)) for k in params}, **group}  # the grid's order
            sig = _canonical(combo)
            if sig not in seen:
                seen.add(sig)
                out.append(combo)
    return out


def plan(grid: dict, out: str | Path) -> list[Combination]:
    """The combinations of ``grid`` under ``out``: one per chapter and combination of the parameters it takes,
    each checked (:func:`emlib.runner.chapter_parameters`) before any runs."""
    grid = check_grid(grid)
    out = Path(out).resolve()
    base = grid.get("_base")
    cwd = Path(grid["cwd"]) if grid.get("cwd") else runner.default_cwd(base)
    if not cwd.is_absolute():
        cwd = (Path(base) if base else Path.cwd()) / cwd
    cwd = cwd.resolve()
    combos = expand(grid)
    known = {src: runner.chapter_defaults(src) for src in runner.select(grid["chapters"], base)}
    runner.parameters_for(known, {k: None for c in combos for k in c})  # a name no chapter takes: an error
    results = tuple(grid["results"]) if grid.get("results") else None
    jobs, seen = [], set()
    varying = _varying(combos)
    for src, kn in known.items():
        stem = src.stem
        chapter_dir = out / stem
        for combo in combos:
            params = runner.taken(kn, combo)
            key = job_key(stem, params)
            if (stem, key) in seen:
                continue
            seen.add((stem, key))
            folder = _find_folder(chapter_dir, key) or chapter_dir / f"{slug(params, varying)}-{key}"
            if runner.takes(kn, "run_dir"):
                if params.get("run_dir") is None:
                    params["run_dir"] = str(folder / "run")
                else:
                    rd = str(params["run_dir"]).format(chapter=stem, key=key, out=out, **_fmt(params))
                    params["run_dir"] = str(Path(rd) if Path(rd).is_absolute() else (cwd / rd).resolve())
            job = runner.Job(source=str(src), parameters=runner.chapter_parameters(src, params, kn),
                             notebook=str(folder / f"{stem}.ipynb"), cwd=str(cwd), timeout=grid.get("timeout"))
            jobs.append(Combination(job=job, params=params, key=key, folder=str(folder), results=results,
                                    max_results=int(grid.get("max_results") or MAX_RESULTS)))
    return jobs


def _fmt(params: dict) -> dict:
    return {k: ("-".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in params.items()
            if k != "run_dir"}


def _canonical(obj) -> str:
    return canonical_json(obj, separators=(",", ":"))  # sets sorted: the same key in every process


def job_key(chapter: str, params: dict) -> str:
    """Stable 10-hex-digit identity of a chapter run (a default run_dir is not part of it)."""
    return hashlib.sha1(_canonical({"chapter": chapter, "params": params}).encode()).hexdigest()[:10]


def _varying(combos: list[dict]) -> list[str]:
    names = list(dict.fromkeys(k for c in combos for k in c))
    return [k for k in names if len({_canonical(c.get(k)) for c in combos}) > 1 and k != "run_dir"]


def slug(params: dict, names: Iterable[str], max_len: int = 60) -> str:
    """A readable folder name from the swept parameters, e.g. ``seed=0_datasets=medical``."""
    parts = []
    for k in names:
        if k not in params:
            continue
        v = params[k]
        v = "-".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        parts.append(f"{k}={v}")
    s = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts)).strip("-")
    return (s[:max_len].rstrip("-_") or "run") if s else "run"


def _find_folder(chapter_dir: Path, key: str) -> Path | None:
    if not chapter_dir.is_dir():
        return None
    for d in chapter_dir.iterdir():
        if d.is_dir() and (d.name == key or d.name.endswith("-" + key)):
            return d
    return None


# ---------------------------------------------------------------------------------------- one combination
def run_combination(c: Combination) -> dict:
    """Execute one combination (unless another process finished it meanwhile); returns its index row. Never
    raises for a failing notebook: the row says ``failed`` and ``failed.json`` keeps the error."""
    folder = Path(c.folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _job_lock(folder) as waited:
        if waited:  # another process ran this combination meanwhile: keep what it finished
            row = finished_row(c)
            if row is not None:
                return row
        return _run_locked(c, folder)


def _job_lock(folder: Path):
    """Hold ``<folder>/.lock`` while a combination runs, so that no two processes (two sweeps over one
    ``out``, a restart and a dying worker of the killed run) execute it at once (:func:`emlib.data.file_lock`:
    a killed run leaves no stale lock). Yields whether it had to wait for another holder."""
    return file_lock(folder / LOCK, f"[batch] {folder.name}: another process is running this combination; "
                                    "waiting for it")


def _run_locked(c: Combination, folder: Path) -> dict:
    _write_json(folder / PARAMS, {"chapter": c.chapter, "source": c.job.source, "key": c.key, "params": c.params,
                                  "papermill": c.job.parameters})
    if c.params.get("run_dir"):
        Path(c.params["run_dir"]).mkdir(parents=True, exist_ok=True)
    row = _base_row(c)
    row.update(runner.run_job(c.job))
    if row["status"] != "ok":
        _write_json(folder / FAILED, row)
        return row
    row["results"] = read_results(c.params.get("run_dir"), c.results, c.max_results)
    (folder / FAILED).unlink(missing_ok=True)
    _write_json(folder / DONE, row)  # the finished marker: only after success
    return row


def read_results(run_dir: str | Path | None, patterns: Iterable[str] | None = None,
                 limit: int = MAX_RESULTS) -> dict:
    """Scalar leaves of ``<run_dir>/results.json`` as ``{"a.b": value}`` (numbers and booleans; lists
    of records are keyed by their first text field, e.g. ``ch1_em[medical rank1].em``)."""
    if not run_dir:
        return {}
    path = Path(run_dir) / "results.json"
    if not path.exists():
        return {}
    try:
        flat = flatten(json.loads(path.read_text()))
    except (json.JSONDecodeError, OSError):
        return {}
    flat = {k: v for k, v in flat.items() if isinstance(v, (int, float, bool)) and not
            (isinstance(v, float) and math.isnan(v))}
    if patterns:
        return {k: v for k, v in flat.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    return dict(itertools.islice(flat.items(), limit))


def flatten(obj, prefix: str = "") -> dict:
    """Nested dicts/lists -> ``{"a.b[label].c": leaf}``."""
    out: dict = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        labels = _record_labels(obj)
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{labels[i] if labels else i}]"))
    else:
        out[prefix] = obj
    return out


def _record_labels(rows: list) -> list[str] | None:
    if not rows or not all(isinstance(r, dict) for r in rows):
        return None
    for k, v in rows[0].items():
        if isinstance(v, str):
            labels = [r.get(k) for r in rows]
            if all(isinstance(x, str) for x in labels) and len(set(labels)) == len(labels):
                return labels
    return None


def _base_row(c: Combination) -> dict:
    return {"chapter": c.chapter, "key": c.key, "params": dict(c.params), "status": "pending",
            "wall_s": None, "folder": c.folder, "notebook": str(c.notebook),
            "run_dir": c.params.get("run_dir"), "error": None, "error_cell": None, "error_source": None,
            "traceback": None, "results": {}, "finished": None}


def _failed_row(c: Combination, exc: BaseException) -> dict:
    """The row of a combination whose worker process died (or whose Ray task failed)."""
    return {**_base_row(c), "status": "failed", **runner.error_fields(exc), "finished": runner.now()}


def _write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode("utf-8"))


def finished_row(c: Combination) -> dict | None:
    """The row stored in the combination's finished marker (status ``skipped``), or None if not finished."""
    marker = Path(c.folder) / DONE
    if not marker.exists():
        return None
    try:
        row = json.loads(marker.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    if row.get("status") != "ok" or row.get("key") != c.key:
        return None
    return {**_base_row(c), **row, "status": "skipped"}


# ------------------------------------------------------------------------------------------ backends
def _run_local(todo: list[Combination], workers: int, gpu_of: list[str | None], threads: int | None,
               on_row: Callable[[dict], None]) -> None:
    if workers == 1 and gpu_of[0] is None:
        for c in todo:
            on_row(run_combination(c))
        return
    pool = runner.process_pool(workers, gpu_of, threads)
    try:
        futures = {pool.submit(run_combination, c): c for c in todo}
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except Exception as exc:  # the worker process itself died
                row = _failed_row(futures[fut], exc)
            on_row(row)
    except BaseException:  # Ctrl-C: drop the queued combinations instead of running them all
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _run_ray(todo: list[Combination], address: str, on_row: Callable[[dict], None], gpus_per_job: float = 1,
             cpus_per_job: float = 1) -> None:
    try:
        import ray
    except ImportError as e:
        raise ImportError("The Ray backend needs ray: `pip install 'ray[default]'` (or run without --ray).") from e
    started = False
    if not ray.is_initialized():
        kw = {"include_dashboard": False} if address == "local" else {}
        ray.init(address=address, logging_level="WARNING", **kw)
        started = True
    try:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        opts = {"num_gpus": gpus_per_job, "num_cpus": cpus_per_job} if use_gpu else {"num_cpus": cpus_per_job}
        remote = ray.remote(max_retries=0)(run_combination).options(**opts)
        pending = {remote.remote(c): c for c in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                c = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as exc:  # the task's worker died or Ray failed it
                    row = _failed_row(c, exc)
                on_row(row)
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------- driver
def run_grid(grid: dict | str | Path, out: str | Path | None = None, workers: int | None = None,
             gpus: list[str] | None = None, ray: str | None = None, force: bool = False,
             verbose: bool = True) -> pd.DataFrame:
    """Run every unfinished combination of ``grid`` (a dict or a YAML path); returns the index.

    ``workers``: local processes (default: one per GPU, else one per core); ``ray``: a Ray address
    ("auto" for a running cluster, "local" to start one here; an already initialised Ray is reused);
    ``force``: rerun finished combinations too. The index is rewritten after every finished job.
    """
    grid = load_grid(grid) if isinstance(grid, (str, Path)) else check_grid(copy.deepcopy(grid))
    out = Path(out or grid.get("out") or "runs/sweeps/grid").resolve()
    jobs = plan(grid, out)
    rows: dict[str, dict] = {}
    todo = []
    for c in jobs:
        row = None if force else finished_row(c)
        if row is None:
            todo.append(c)
            row = _base_row(c)
        rows[c.folder] = row
    t0 = time.perf_counter()
    if verbose:
        print(f"[batch] {len(jobs)} combinations, {len(jobs) - len(todo)} already finished, "
              f"{len(todo)} to run -> {out}", flush=True)
    write_index(list(rows.values()), out)

    def on_row(row: dict) -> None:
        rows[row["folder"]] = row
        write_index(list(rows.values()), out)
        if verbose:
            msg = f"  {row['error']}" if row["status"] == "failed" else ""
            print(f"[batch] {row['status']:6s} {Path(row['folder']).relative_to(out)} "
                  f"({row['wall_s']} s){msg}", flush=True)

    if todo:
        if ray:
            _run_ray(todo, ray, on_row, gpus_per_job=float(grid.get("gpus_per_job") or 1),
                     cpus_per_job=float(grid.get("cpus_per_job") or 1))
        else:
            gpus = gpus if gpus is not None else ([str(g) for g in grid["gpus"]] if grid.get("gpus") else None)
            n, gpu_of, threads = runner.worker_plan(len(todo), workers or grid.get("workers"), gpus)
            if verbose and n > 1:
                where = f"GPUs {','.join(map(str, gpu_of))}" if gpu_of[0] is not None else f"{threads} thread(s) each"
                print(f"[batch] {n} workers ({where})", flush=True)
            _run_local(todo, n, gpu_of, threads, on_row)
    index = write_index(list(rows.values()), out)
    if verbose:
        counts = index["status"].value_counts().to_dict()
        print(f"[batch] done in {time.perf_counter() - t0:.1f} s: {counts}; index {out / 'index.parquet'}",
              flush=True)
    return index


def index_frame(rows: list[dict]) -> pd.DataFrame:
    """Tidy index: chapter, one column per parameter, status, wall_s, paths, error, ``result.*``."""
    reserved = {"chapter", "key", "status", "wall_s", "folder", "notebook", "error", "error_cell",
                "error_source", "traceback", "finished"}
    param_names = list(dict.fromkeys(k for r in rows for k in r.get("params", {})))
    result_names = list(dict.fromkeys(k for r in rows for k in (r.get("results") or {})))
    records = []
    for r in rows:
        rec = {"chapter": r["chapter"]}
        for k in param_names:
            rec[f"param_{k}" if k in reserved else k] = r["params"].get(k)
        rec.update({k: r.get(k) for k in ("status", "wall_s", "folder", "notebook", "error", "error_cell",
                                          "traceback", "finished", "key")})
        rec["run_dir"] = r.get("run_dir")
        for k in result_names:
            rec[f"result.{k}"] = (r.get("results") or {}).get(k)
        records.append(rec)
    cols = ["chapter"] + [f"param_{k}" if k in reserved else k for k in param_names] + [
        "status", "wall_s", "folder", "notebook", "run_dir", "error", "error_cell", "traceback", "finished",
        "key"] + [f"result.{k}" for k in result_names]
    cols = list(dict.fromkeys(cols))
    return pd.DataFrame({c: _tidy_column(pd.Series([rec.get(c) for rec in records], dtype=object))
                         for c in cols}, columns=cols)


def _tidy_column(s: pd.Series) -> pd.Series:
    """Lists/dicts -> JSON text; a column mixing numbers and text -> text (parquet needs one type)."""
    vals = [v for v in s if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if any(isinstance(v, (list, tuple, dict)) for v in vals):
        return s.map(lambda v: None if v is None else json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v))
    kinds = {"num" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__ for v in vals}
    if len(kinds) > 1:
        return s.map(lambda v: None if v is None else str(v))
    if kinds == {"num"}:
        if all(isinstance(v, int) for v in vals):  # integers with gaps (e.g. error_cell) stay integers
            return s.astype("int64" if len(vals) == len(s) else "Int64")
        return pd.to_numeric(s).astype(float)
    return s.infer_objects()


def write_index(rows: list[dict], out: str | Path) -> pd.DataFrame:
    """Write ``index.parquet`` and ``index.csv`` under ``out`` (atomically); returns the frame."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = index_frame(rows)
    parquet = io.BytesIO()
    df.to_parquet(parquet, index=False)
    atomic_write_bytes(out / "index.parquet", parquet.getvalue())
    atomic_write_bytes(out / "index.csv", df.to_csv(index=False).encode("utf-8"))
    return df


def load_index(out: str | Path) -> pd.DataFrame:
    """The sweep's index (``<out>/index.parquet``, else ``index.csv``) as a DataFrame."""
    out = Path(out)
    if (out / "index.parquet").exists():
        return pd.read_parquet(out / "index.parquet")
    if (out / "index.csv").exists():
        return pd.read_csv(out / "index.csv")
    raise FileNotFoundError(f"No index in {out}: run `python -m emlib.batch GRID.yaml --out {out}` first.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emlib.batch", description=__doc__.split("\n\n")[0])
    ap.add_argument("grid", help="YAML grid file")
    ap.add_argument("--out", help="output folder (default: the grid's 'out', else runs/sweeps/grid)")
    ap.add_argument("--workers", type=int, help="local worker processes (default: one per GPU, else per core)")
    ap.add_argument("--gpus", help="comma-separated GPU ids to use (default: all visible)")
    ap.add_argument("--ray", metavar="ADDRESS",
                    help="run as Ray tasks: 'auto' (a running cluster), 'local' (start one here) or host:port")
    ap.add_argument("--force", action="store_true", help="rerun finished combinations too")
    ap.add_argument("--dry-run", action="store_true", help="list the combinations and their folders, run nothing")
    from .cli import add_debug_flag, run

    add_debug_flag(ap)
    a = ap.parse_args(argv)
    return run(lambda: _main(a), debug=a.debug)


def _main(a) -> int:
    gpus = [g for g in a.gpus.split(",") if g] if a.gpus else None
    if a.dry_run:
        grid = load_grid(a.grid)
        out = Path(a.out or grid.get("out") or "runs/sweeps/grid").resolve()
        jobs = plan(grid, out)
        with pd.option_context("display.width", 200, "display.max_colwidth", 80):
            print(pd.DataFrame([{"chapter": c.chapter, "finished": finished_row(c) is not None,
                                 "folder": c.folder, **{k: v for k, v in c.params.items() if k != "run_dir"}}
                                for c in jobs]).to_string(index=False))
        return 0
    from .config import ConfigError

    try:
        index = run_grid(a.grid, out=a.out, workers=a.workers, gpus=gpus, ray=a.ray, force=a.force)
    except ConfigError as e:  # checked before any combination ran: name the grid file too
        raise ConfigError(f"{a.grid}: {e}") from None
    failed = index[index["status"] == "failed"]
    if len(failed):
        from .cli import ChapterFailed

        first = failed.iloc[0]
        raise ChapterFailed(f"{len(failed)} of {len(index)} combinations failed; the first, {first['folder']}: "
                            f"{first['error']} (its failed.json and notebook show the cell). Fix the cause and run "
                            "the same command again: finished combinations are skipped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
