"""Where a process spends its time, by phase: load, train, sample, judge, activations, metrics.

The package's entry points for each phase carry :func:`timed` (``models.load_model`` is "load",
``generate.sample_answers`` "sample", ``judge.apply.judge_answers`` "judge", and so on: :data:`PHASES`). Phases
nest exclusively: time inside a nested phase counts for that phase only (the judge called inside an answers
call is "judge", the rest of the call "sample"), so the phases of one process add up to at most its wall time.
Times are the host's wall clock: GPU work is counted where the host waits for it (every timed function
returns tensors on the CPU or numbers, which waits).

A chapter's last cell shows the tally next to "last executed with" and writes it to the run directory
(:func:`emlib.book.executed_with` with ``save=``); ``bench/record_phases.py`` sums a run of record's chapters and
finetunes into one table.
"""
from __future__ import annotations

import functools
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

PHASES: dict[str, str] = {
    "load": "loading or converting a model, an adapter or a steering vector",
    "train": "training a LoRA adapter or steering vectors",
    "sample": "sampling answers",
    "judge": "scoring answers with the judge",
    "activations": "reading hidden states (directions, residual norms)",
    "metrics": "losses and KL under interventions (chapters 3-6's inductive metrics)",
}

SHARED_GPU = "EMLIB_SHARED_GPU"  # "1": this process shares its GPU with others (emlib.models.shared_gpu)

_totals: dict[str, float] = dict.fromkeys(PHASES, 0.0)
_stack: list[list] = []  # [phase, time it (re)started] for each open phase, innermost last
# each outermost phase's span: [phase, start, end] on the wall clock (time.time(), comparable across processes
# and with record.json's t0), so a run's timeline shows what each chapter did when (the GPU idle at 200-230 s
# in the runs of 2026-12-06 fell inside chapter 2's sampling cell). Bounded: the first MAX_EVENTS only.
_events: list[list] = []
MAX_EVENTS = 20000

F = TypeVar("F", bound=Callable)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the time inside this block for phase ``name`` (one of :data:`PHASES`), not for the phase around
    it."""
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}: the phases are {', '.join(PHASES)}")
    now = time.perf_counter()
    if _stack:  # pause the enclosing phase
        outer = _stack[-1]
        _totals[outer[0]] += now - outer[1]
    outermost = not _stack
    wall0 = time.time() if outermost else None  # a nested phase's span is inside its outermost one's
    _stack.append([name, now])
    try:
        yield
    finally:
        now = time.perf_counter()
        inner = _stack.pop()
        _totals[inner[0]] += now - inner[1]
        if outermost and len(_events) < MAX_EVENTS:
            _events.append([name, round(wall0, 3), round(time.time(), 3)])
        if _stack:  # the enclosing phase goes on from here
            _stack[-1][1] = now
        elif os.environ.get(SHARED_GPU) == "1":
            _between_phases()


def _between_phases() -> None:
    """Out of every phase, in a process that shares its GPU (``emlib.models.shared_gpu``): what torch keeps
    cached on the GPU goes back to the driver (not counted in any phase)."""
    from .models import give_back_gpu_memory

    give_back_gpu_memory(collect=False)


def timed(name: str) -> Callable[[F], F]:
    """Decorator: every call of the function is phase ``name``."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)
        return inner  # type: ignore[return-value]
    return wrap


def tally() -> dict[str, float]:
    """Seconds per phase so far in this process (phases still open count up to now)."""
    out = dict(_totals)
    if _stack:
        out[_stack[-1][0]] += time.perf_counter() - _stack[-1][1]
    return {k: round(v, 3) for k, v in out.items()}


def reset() -> None:
    """Start the tally again (tests; a process that times several things one after another)."""
    for k in _totals:
        _totals[k] = 0.0
    _events.clear()


def events() -> list[list]:
    """Each outermost phase so far: ``[phase, start, end]`` (``time.time()`` seconds; nested phases are inside
    their outermost one's span)."""
    return [list(e) for e in _events]


def summary(wall: float | None = None) -> dict[str, float]:
    """:func:`tally` plus, given this process's ``wall`` seconds, ``wall`` and ``other`` (the rest: Python,
    tables, plots, imports, waiting)."""
    out = tally()
    if wall is not None:
        out["other"] = round(max(0.0, wall - sum(out.values())), 3)
        out["wall"] = round(wall, 3)
    return out


def save(path: str | Path, wall: float | None = None) -> Path:
    """Write :func:`summary` as JSON (atomically: never a partial file), and :func:`events` beside it as
    ``<stem>.events.json`` (a list of ``[phase, start, end]``, which :func:`run_table` does not count)."""
    from .data import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path.with_name(path.stem + EVENTS_SUFFIX), json.dumps(events()).encode("utf-8"))
    return atomic_write_bytes(path, json.dumps(summary(wall), indent=1).encode("utf-8"))


EVENTS_SUFFIX = ".events.json"


def _tasks(jobs: dict) -> list[tuple[dict, list[str]]]:
    """record.json's finetunes once per pool task, each with the names of its members: a group's members
    (trained together in one process) share their timing, so they are counted once."""
    tasks: dict[str, tuple[dict, list[str]]] = {}
    for name, job in jobs.items():
        # the members of a group end together and share their training time; before 2026-12-06 each member's
        # phase tally and seconds were read separately and could differ in the last digit
        key = (f"group {job['group']} {job.get('ended_s', job.get('seconds'))} {job.get('train_seconds')}"
               if job.get("group") else name)
        tasks.setdefault(key, (job, []))[1].append(name)
    return list(tasks.values())


def run_timeline(run_dir: str | Path) -> "object":
    """A run of record's processes on one timeline, from its ``record.json``: one row per finetune task (a
    group once, ``members``) and per chapter, with when it could start (``ready_s``: chapters only), started
    and ended (seconds from the run's start), and the GPU memory a finetune task's torch reserved at its peak,
    allocated at its peak and still held after the task (GiB; None on a CPU or where the run predates them).
    Sorted by start."""
    import pandas as pd

    rec = Path(run_dir) / "record.json"
    if not rec.exists():
        raise FileNotFoundError(f"{rec} does not exist: pass a run directory written by `python -m emlib.record run`.")
    timings = json.loads(rec.read_text()).get("timings", {})
    rows = []
    for job, members in _tasks(timings.get("jobs", {})):
        end, secs = job.get("ended_s"), job.get("seconds")
        rows.append({"kind": "finetune", "name": members[0] + (f" (+{len(members) - 1})" if len(members) > 1 else ""),
                     "members": len(members), "ready_s": None,
                     "started_s": round(end - secs, 1) if end is not None and secs is not None else None,
                     "ended_s": end, "seconds": secs, "peak_gib": job.get("peak_gib"),
                     "peak_allocated_gib": job.get("peak_allocated_gib"),
                     "held_gib": (job.get("held_gib") or {}).get("reserved")})
    for stem, ch in timings.get("chapters", {}).items():
        rows.append({"kind": "chapter", "name": stem, "members": 1, "ready_s": ch.get("ready_s"),
                     "started_s": ch.get("started_s"), "ended_s": ch.get("ended_s"), "seconds": ch.get("seconds"),
                     "peak_gib": None, "peak_allocated_gib": None, "held_gib": None})
    frame = pd.DataFrame(rows, columns=["kind", "name", "members", "ready_s", "started_s", "ended_s", "seconds",
                                        "peak_gib", "peak_allocated_gib", "held_gib"])
    return frame.sort_values("started_s", kind="stable", na_position="last").reset_index(drop=True)


def phase_spans(run_dir: str | Path) -> "object":
    """Each chapter's outermost phases on the run's clock: one row per span (chapter, phase, start_s, end_s,
    seconds from the run's start), from ``logs/phases/<chapter>.events.json`` and ``record.json``'s
    ``t0_unix`` (runs from 2026-12-06 on; empty where either is missing)."""
    import pandas as pd

    run = Path(run_dir)
    rec = run / "record.json"
    t0 = json.loads(rec.read_text()).get("timings", {}).get("t0_unix") if rec.exists() else None
    rows = []
    for f in sorted((run / "logs" / "phases").glob("*" + EVENTS_SUFFIX)) if t0 is not None else []:
        for name, start, end in json.loads(f.read_text()):
            rows.append({"chapter": f.name[:-len(EVENTS_SUFFIX)], "phase": name, "start_s": round(start - t0, 2),
                         "end_s": round(end - t0, 2)})
    frame = pd.DataFrame(rows, columns=["chapter", "phase", "start_s", "end_s"])
    return frame.sort_values(["start_s", "chapter"], kind="stable").reset_index(drop=True)


def run_table(run_dir: str | Path) -> "object":
    """A run directory's time by phase, in process-seconds: one column per chapter that wrote
    ``logs/phases/<chapter>.json`` (:func:`emlib.book.executed_with`) and one, ``finetunes``, summing every
    finetune process of ``record.json`` (its ``phases``; a finetune recorded without them counts its
    ``train_seconds`` as train and the rest as other). Rows: :data:`PHASES`, ``other`` and ``wall``. Processes
    of a run of record overlap, so the columns add up to more than the run's wall time."""
    import pandas as pd

    run = Path(run_dir)
    cols: dict[str, dict[str, float]] = {}
    for f in sorted((run / "logs" / "phases").glob("*.json")):
        if not f.name.endswith(EVENTS_SUFFIX):  # a chapter's phase spans (save), not its totals
            cols[f.stem] = json.loads(f.read_text())
    rec = run / "record.json"
    jobs = json.loads(rec.read_text()).get("timings", {}).get("jobs", {}) if rec.exists() else {}
    if jobs:
        total: dict[str, float] = {}
        for job, _members in _tasks(jobs):
            ph = job.get("phases")
            if not ph:
                train = float(job.get("train_seconds") or 0.0)
                ph = {"train": train, "other": max(0.0, float(job.get("seconds") or 0.0) - train),
                      "wall": float(job.get("seconds") or 0.0)}
            for k, v in ph.items():
                total[k] = total.get(k, 0.0) + float(v)
        cols["finetunes"] = total
    if not cols:
        raise FileNotFoundError(f"{run} has neither logs/phases/*.json nor finetunes in record.json: pass a run "
                                "directory written by `python -m emlib.record run` or `make book` with this code.")
    rows = [*PHASES, "other", "wall"]
    frame = pd.DataFrame({c: [round(v.get(r, 0.0), 1) for r in rows] for c, v in cols.items()}, index=rows)
    frame["all processes"] = frame.sum(axis=1)
    return frame.rename_axis("phase")
