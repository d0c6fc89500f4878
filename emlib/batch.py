"""Parameter sweeps over chapters: every combination is one papermill run in its own folder.

    python -m emlib.batch examples/grid_smoke.yaml [--out DIR] [--workers N] [--gpus 0,1]
                                                   [--ray auto|local|ADDRESS] [--force] [--dry-run]

A grid file (YAML) names chapters and parameters::

    chapters: ["01"]               # numbers ("01" or 1) or paths of jupytext chapters
    out: runs/sweeps/smoke         # optional (the CLI's --out wins)
    parameters:                    # a list is an axis (cartesian product), a scalar is fixed;
      profile: smoke               # a list-valued parameter is a list of lists: [[medical], [sport]]
      seed: [0, 1]
    combinations:                  # optional explicit groups, crossed with the axes above
      - {n_train: 4, lr: 0.001}
    results: ["ch1_em.*.em"]       # optional: which results.json leaves go into the index
    timeout: 3600                  # optional: seconds per cell
    cwd: .                         # optional: the kernels' working directory (default: repo root)

Layout of ``out``::

    <out>/<chapter-stem>/<slug>-<hash>/
        params.json                what papermill was given
        <chapter-stem>.ipynb       the executed (or partially executed) notebook
        run/                       the combination's run_dir (unless the grid sets run_dir)
        done.json                  finished marker, written atomically after success only
        failed.json                the last failure (error, failing cell, traceback)
        .lock                      held (flock) while a process runs the combination
    <out>/index.parquet, index.csv one row per combination: load with ``load_index(out)``

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
import contextlib
import copy
import fnmatch
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from . import book, lifeline
from .cache import canonical_json

GRID_KEYS = {"chapters", "parameters", "combinations", "out", "results", "timeout", "cwd",
             "workers", "gpus", "gpus_per_job", "cpus_per_job", "max_results"}
DONE, FAILED, PARAMS, LOCK = "done.json", "failed.json", "params.json", ".lock"
STATUSES = ("ok", "failed", "skipped", "pending")
MAX_RESULTS = 40  # results.json leaves per row when the grid names no patterns
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class Job:
    """One chapter x one parameter combination, with every path absolute."""

    chapter: str  # the chapter's stem, e.g. "01_em_emerges"
    source: str  # the jupytext .py (or .ipynb) file
    params: dict  # what papermill gets (run_dir included when the chapter takes one)
    key: str  # hash of chapter + parameters (run_dir excluded when it is the default)
    folder: str  # <out>/<chapter>/<slug>-<key>
    cwd: str
    timeout: int | None = None
    results: tuple[str, ...] | None = None
    max_results: int = MAX_RESULTS

    @property
    def notebook(self) -> Path:
        return Path(self.folder) / f"{self.chapter}.ipynb"


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


def resolve_chapter(name: str | int | Path, base: str | Path | None = None, root: Path | None = None) -> Path:
    """A chapter number ("01", 1) or a file path -> the chapter source file."""
    if isinstance(name, int):
        name = f"{name:02d}"
    name = str(name)
    if re.fullmatch(r"\d{1,2}", name):
        for start in (None, base):  # the current folder's repository, else the grid file's
            try:
                root = root or book.repo_root(Path(start) if start else None)
            except FileNotFoundError as e:
                err = e
        if root is None:
            raise FileNotFoundError(f"Chapter {name!r} is a number, which needs the book's repository: {err}")
        hits = [p for p in book.chapter_sources(root) if p.name[:2] == name.zfill(2)]
        if not hits:
            have = ", ".join(p.name for p in book.chapter_sources(root))
            raise FileNotFoundError(f"No chapter numbered {name!r} in {root / 'notebooks'} (have: {have}).")
        return hits[0]
    p = Path(name).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + ([Path(base) / p] if base else [])
    if root is not None and not p.is_absolute():
        candidates.append(root / p)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise FileNotFoundError(f"Chapter file {name!r} not found (looked at {', '.join(map(str, candidates))}); "
                            "give a path or a chapter number like \"01\".")


def _default_cwd(base: str | None = None) -> Path:
    """The book's repository (found from the current folder, else the grid file's), else here."""
    for start in (None, base):
        try:
            return book.repo_root(Path(start) if start else None)
        except FileNotFoundError:
            pass
    return Path.cwd()


def plan(grid: dict, out: str | Path) -> list[Job]:
    """The jobs of ``grid`` under ``out``: one per chapter and combination of the parameters it takes."""
    grid = check_grid(grid)
    out = Path(out).resolve()
    base = grid.get("_base")
    cwd = Path(grid["cwd"]) if grid.get("cwd") else _default_cwd(base)
    if not cwd.is_absolute():
        cwd = (Path(base) if base else Path.cwd()) / cwd
    cwd = cwd.resolve()
    combos = expand(grid)
    sources = [resolve_chapter(c, base) for c in grid["chapters"]]
    known = {src: book.parameter_defaults(book.read_py_notebook(src) if src.suffix == ".py" else _read_ipynb(src))
             for src in sources}
    names = set().union(*(set(c) for c in combos)) if combos else set()
    taken = set().union(*(set(k) for k in known.values()))
    nowhere = sorted(names - taken)
    if nowhere:
        from .config import ConfigError

        raise ConfigError(f"Parameter(s) {', '.join(nowhere)} are taken by none of the grid's chapters "
                          f"({', '.join(s.name for s in sources)}); they take {', '.join(sorted(taken))}.")
    results = tuple(grid["results"]) if grid.get("results") else None
    jobs, seen = [], set()
    varying = _varying(combos)
    for src in sources:
        stem = src.stem
        chapter_dir = out / stem
        for combo in combos:
            params = {k: v for k, v in combo.items() if k in known[src]}
            book.check_parameters(src, known[src], params)  # a bad value stops the sweep before any job runs
            if "interactive" in known[src]:  # batch runs get the static version, as in `make book`
                params.setdefault("interactive", False)
            key = job_key(stem, params)
            if (stem, key) in seen:
                continue
            seen.add((stem, key))
            folder = _find_folder(chapter_dir, key) or chapter_dir / f"{slug(params, varying)}-{key}"
            if "run_dir" in known[src]:
                if params.get("run_dir") is None:
                    params["run_dir"] = str(folder / "run")
                else:
                    rd = str(params["run_dir"]).format(chapter=stem, key=key, out=out, **_fmt(params))
                    params["run_dir"] = str(Path(rd) if Path(rd).is_absolute() else (cwd / rd).resolve())
            jobs.append(Job(chapter=stem, source=str(src), params=params, key=key, folder=str(folder),
                            cwd=str(cwd), timeout=grid.get("timeout"), results=results,
                            max_results=int(grid.get("max_results") or MAX_RESULTS)))
    return jobs


def _read_ipynb(path: Path):
    import nbformat

    return nbformat.read(path, as_version=4)


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


# ------------------------------------------------------------------------------------------ one job
def run_job(job: Job | dict) -> dict:
    """Execute one combination; returns its index row. Never raises for a failing notebook."""
    if isinstance(job, dict):
        job = Job(**job)
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _job_lock(folder) as waited:
        if waited:  # another process ran this combination meanwhile: keep what it finished
            row = finished_row(job)
            if row is not None:
                return row
        return _run_job_locked(job, folder)


@contextlib.contextmanager
def _job_lock(folder: Path):
    """Hold ``<folder>/.lock`` while a combination runs, so that no two processes (two sweeps over one
    ``out``, a restart and a dying worker of the killed run) execute it at once. Yields whether it had to
    wait for another holder. An exclusive ``flock``: the system drops it when its holder dies, so a killed
    run leaves no stale lock. Where ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(folder / LOCK, "a") as fh:
        waited = False
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited = True
            print(f"[batch] {folder.name}: another process is running this combination; waiting for it",
                  file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield waited
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_job_locked(job: Job, folder: Path) -> dict:
    _atomic_json(folder / PARAMS, {"chapter": job.chapter, "source": job.source, "key": job.key,
                                   "params": job.params})
    if job.params.get("run_dir"):
        Path(job.params["run_dir"]).mkdir(parents=True, exist_ok=True)
    row = _base_row(job)
    t0 = time.perf_counter()
    try:
        book.execute(job.source, job.notebook, job.params, cwd=job.cwd, timeout=job.timeout)
    except Exception as exc:  # a failing cell, a timeout, a dead kernel, a bad parameter
        row.update(status="failed", wall_s=round(time.perf_counter() - t0, 2), **error_fields(exc),
                   finished=_now())
        _atomic_json(folder / FAILED, row)
        return row
    row.update(status="ok", wall_s=round(time.perf_counter() - t0, 2), finished=_now(),
               results=read_results(job.params.get("run_dir"), job.results, job.max_results))
    (folder / FAILED).unlink(missing_ok=True)
    _atomic_json(folder / DONE, row)  # the finished marker: only after success
    return row


def error_fields(exc: BaseException) -> dict:
    """``error`` (one line), ``error_cell`` (the failing cell's execution count: ``In [n]`` in the
    executed notebook, ``Cell In[n]`` in the traceback), ``error_source`` and ``traceback``."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        tb = _ANSI.sub("", "\n".join(exc.traceback or []))
        return {"error": f"{exc.ename}: {exc.evalue}"[:500], "error_cell": exc.exec_count,
                "error_source": exc.source, "traceback": tb}
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"error": f"{type(exc).__name__}: {exc}"[:500], "error_cell": None, "error_source": None,
            "traceback": _ANSI.sub("", tb)}


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


def _base_row(job: Job) -> dict:
    return {"chapter": job.chapter, "key": job.key, "params": dict(job.params), "status": "pending",
            "wall_s": None, "folder": job.folder, "notebook": str(job.notebook),
            "run_dir": job.params.get("run_dir"), "error": None, "error_cell": None, "error_source": None,
            "traceback": None, "results": {}, "finished": None}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, default=str)
    os.replace(tmp, path)


def finished_row(job: Job) -> dict | None:
    """The row stored in the job's finished marker (status ``skipped``), or None if not finished."""
    marker = Path(job.folder) / DONE
    if not marker.exists():
        return None
    try:
        row = json.loads(marker.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    if row.get("status") != "ok" or row.get("key") != job.key:
        return None
    return {**_base_row(job), **row, "status": "skipped"}


# ------------------------------------------------------------------------------------------ backends
def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()] if out.returncode == 0 else []


def worker_plan(n_jobs: int, workers: int | None = None, gpus: list[str] | None = None,
                cores: int | None = None) -> tuple[int, list[str | None], int | None]:
    """(number of workers, the GPU each worker sees (None: no GPU), threads per worker (None: leave)).

    With GPUs: one worker per GPU by default (more workers share GPUs round-robin). Without: one
    worker per core at most (default: as many as cores), each with ``cores // workers`` threads.
    """
    cores = cores or os.cpu_count() or 1
    gpus = visible_gpus() if gpus is None else list(gpus)
    if gpus:
        n = workers or len(gpus)
        n = max(1, min(n, n_jobs))
        return n, [gpus[i % len(gpus)] for i in range(n)], None
    n = workers or cores
    if n > cores:
        print(f"[batch] {n} workers asked for on {cores} cores: using {cores} (CPU jobs are core-bound).",
              file=sys.stderr)
        n = cores
    n = max(1, min(n, n_jobs))
    return n, [None] * n, max(1, cores // n)


def _init_worker(slots, threads: int | None, parent: int | None = None) -> None:
    lifeline.die_with_parent(parent)  # a killed sweep leaves no worker running its queued jobs
    gpu = slots.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))


def _run_local(jobs: list[Job], workers: int, gpu_of: list[str | None], threads: int | None,
               on_row: Callable[[dict], None]) -> None:
    if workers == 1 and gpu_of[0] is None:
        for job in jobs:
            on_row(run_job(job))
        return
    ctx = mp.get_context("spawn")  # no fork after CUDA / threads in the parent
    slots = ctx.Queue()
    for g in gpu_of:
        slots.put(g)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(slots, threads, os.getpid()))
    try:
        futures = {pool.submit(run_job, asdict(job)): job for job in jobs}
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except Exception as exc:  # the worker process itself died
                row = {**_base_row(futures[fut]), "status": "failed", **error_fields(exc), "finished": _now()}
            on_row(row)
    except BaseException:  # Ctrl-C: drop the queued combinations instead of running them all
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _run_ray(jobs: list[Job], address: str, on_row: Callable[[dict], None], gpus_per_job: float = 1,
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
        remote = ray.remote(max_retries=0)(run_job).options(**opts)
        pending = {remote.remote(asdict(job)): job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as exc:  # the task's worker died or Ray failed it
                    row = {**_base_row(job), "status": "failed", **error_fields(exc), "finished": _now()}
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
    for job in jobs:
        row = None if force else finished_row(job)
        if row is None:
            todo.append(job)
            row = _base_row(job)
        rows[job.folder] = row
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
            n, gpu_of, threads = worker_plan(len(todo), workers or grid.get("workers"), gpus)
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
    for name, writer in (("index.parquet", lambda p: df.to_parquet(p, index=False)),
                         ("index.csv", lambda p: df.to_csv(p, index=False))):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out)
        os.close(fd)
        writer(tmp)
        os.replace(tmp, out / name)
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
            print(pd.DataFrame([{"chapter": j.chapter, "finished": finished_row(j) is not None,
                                 "folder": j.folder, **{k: v for k, v in j.params.items() if k != "run_dir"}}
                                for j in jobs]).to_string(index=False))
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
