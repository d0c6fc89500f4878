"""Runs of record: every chapter of the book for one model, on one GPU, in one command.

    python -m emlib.record run --profile paper --model embedded --run-dir runs/record-smollm2 \\
        [--workers 12] [--chapters 01 03] [-p n_train 2000] [--pack OUT_DIR]

1. **Finetunes** (:func:`finetune_jobs`): every LoRA adapter and steering vector the chapters use, each in
   its own worker process. A 135M model leaves an H100 mostly idle at the paper's batch of 16 rows
   (``bench/train_parallel_gpu.py``: rank-32 LoRA 2.7 optimizer steps/s in one process, 17 steps/s summed
   over 8 processes), so training the finetunes side by side is several times faster than one after another.
   Each job calls the same :class:`~emlib.experiment.Experiment` method a chapter calls, so a chapter finds
   the finished run (same arguments, same hash) and loads it instead of training. The steering vectors of one
   dataset and seed, and the rank-1 adapters, train as one task each (:func:`pool_tasks`, emlib.vecgroup).
   A finetune that runs out of GPU memory (too many side by side: 11 Qwen-0.5B finetunes did not fit in
   80 GB) is retried once, alone, after the others have ended. Chapters 4-5 repeat chapter 3's chosen narrow
   solutions at extra seeds, trained once chapter 3 has chosen (``--speculate on``: the steering vectors at
   every lambda up front instead, in one group per seed; slower on an H100; ``--speculate record``: the
   follow-ups at the lambdas the committed run of record of the same setup chose, up front, each in one group
   with its seed's general solution; a wrong guess costs work, never a result). Each process gets
   ``cores // (workers + parallel chapters)`` CPU threads (at least 2 with a GPU, 1 without;
   ``OMP_NUM_THREADS`` set by the user wins).
2. **Chapters**: each chapter is executed with papermill (:func:`emlib.runner.spawn`: its own process and
   kernel, its output in ``RUN_DIR/logs/``) as soon as the finetunes it needs are done, several at once;
   executed notebooks go to ``RUN_DIR/executed/``. A chapter whose finetune
   failed is not run (it would train the finetune again itself). Chapter 5 may start before chapter 3 has
   chosen its narrow solutions (``--early-choice``, :func:`release_choice`): it measures the general ones first.
3. **Summary**: wall time of every job and chapter and the whole run in ``RUN_DIR/results.json``
   (key ``timings``) and ``RUN_DIR/record.json``; with ``--pack DIR`` the run's outputs (executed notebooks,
   results, tables, figures, vectors, directions, training logs, the answer cache) are packed into
   ``DIR/record.tar.gz``, ``DIR/cache.tar.gz`` and ``DIR/adapters.tar.gz`` (rank-1 weights).

``-p`` / ``-c`` values are config fields: each finetune worker gets them as arguments and each chapter inside its
``config`` parameter (nothing travels through the environment); all are checked before anything runs. The
steps (:func:`plan_run`, :func:`run_all` with its :class:`RunState`, :func:`write_summary`) are small functions.

A killed run resumes: finished finetunes and cached answers are reused, a chapter is re-executed.
Workers and chapter processes die with the run (:mod:`emlib.lifeline`): a restart never races a leftover.
On a CPU the same command runs (slowly); ``--profile smoke`` checks the whole pipeline in minutes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import book, models, runner
from .config import Config, _check_keys, get_config
from .data import atomic_write_bytes

from .chapters import Finetune as Job  # the finetune plan and each chapter's needs: emlib.chapters
from .chapters import (EARLY_FOR_CHOICE, FOLLOW_CHAPTER_3, READS_CHAPTER_3, chosen_scales, clear_choice_pending,
                       extra_seeds, followups, mark_choice_pending, prior_followups, recorded_choice, speculative,
                       why_no_recorded_choice)
from .chapters import train_groups
from .chapters import finetunes as finetune_jobs
from .chapters import finetunes_needed as chapter_needs


# what a CUDA out-of-memory error says: torch's OutOfMemoryError, the driver's "CUDA error: out of memory" (an
# AcceleratorError, e.g. in a kernel launch or a CUDA graph; chapters 2 and 6 on an H100, 2026-12-05), cuBLAS
# failing to allocate its workspace
OUT_OF_MEMORY_SIGNS = ("OutOfMemoryError", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation")


def says_out_of_memory(text: str) -> bool:
    """Whether ``text`` (an error, or the end of a chapter's log) is a CUDA out-of-memory error."""
    return any(sign in text for sign in OUT_OF_MEMORY_SIGNS)


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error (also as re-raised across a process pool, or cuBLAS failing to allocate)."""
    return says_out_of_memory(f"{type(err).__name__}: {err}")


def log_says_out_of_memory(log: Path) -> bool:
    """Whether a chapter's log (papermill's traceback) ends in a CUDA out-of-memory error."""
    try:
        tail = log.read_text(errors="replace")[-20000:]
    except OSError:
        return False
    return says_out_of_memory(tail)


# ------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Plan:
    """A run of record, checked before anything runs: its configuration, chapters and finetunes."""

    profile: str
    run: Path  # the run directory (absolute)
    cfg: Config  # what every finetune and chapter resolves to
    config: dict  # the config fields every finetune gets as arguments (chapters get them inside `config`)
    params: dict  # -p NAME VALUE as given (record.json keeps them)
    overrides: dict  # -c NAME VALUE as given
    chapters: tuple[runner.Job, ...]  # each chapter's papermill job, its notebook in executed/, its log in logs/
    finetunes: tuple[Job, ...]  # the finetunes the chapters use, slowest first
    needs: dict[str, frozenset[str]]  # chapter stem -> the finetunes it waits for
    after: dict[str, frozenset[str]] = field(default_factory=dict)  # chapter stem -> chapters it waits for
    seeds: tuple[int, ...] = ()  # chapters 4-5's extra training seeds
    speculative: tuple[str, ...] = ()  # trained before chapter 3 chooses; the ones it does not choose go unused
    speculative_from: str = ""  # with speculate="record": the run of record whose choice was guessed, or why none

    def chapter(self, stem: str) -> runner.Job:
        return next(j for j in self.chapters if j.chapter == stem)


def plan_run(profile: str = "paper", run_dir: str = "runs/record", params: dict | None = None,
             overrides: dict | None = None, chapters: list[str] | None = None,
             speculate: bool | None | str = False) -> Plan:
    """Check every value and name (an error here writes nothing) and plan the finetunes the chapters need.
    ``params`` (``-p``) and ``overrides`` (``-c``) are both config fields (``params`` may also hold a chapter's
    own parameter, e.g. ``interactive``); ``params`` win where both set a field. ``speculate``: when chapters
    4-5 follow chapter 3 in this run, train the narrow steering vectors at the extra seeds at every lambda
    up front (:func:`emlib.chapters.speculative`); None: when this machine has a GPU (``nvidia-smi``, which
    leaves CUDA untouched before the MPS daemon starts). Off by default: on one H100 the same run took 635 s
    with it and 598 s without (SmolLM2-135M `paper`, 2026-12-06, bench/README "Session 23").
    ``speculate="record"``: instead, train up front chapters 4-5's follow-ups at the lambdas the committed run of
    record of the same setup chose (:func:`emlib.chapters.recorded_choice` over ``emlib.results.RECORDS``; 34 of
    34 SmolLM2 runs and 4 of 4 Qwen runs chose the same, bench/README "Session 42"): each trains in one group with
    its seed's general solution, and nothing trains twice when chapter 3 chooses the same; when it chooses
    otherwise, its own follow-ups train after the choice as without speculation and the guessed ones go unused.
    A guess decides when finetunes train, never what a chapter measures."""
    from .config import FIELDS

    root = book.repo_root()
    run = Path(run_dir) if Path(run_dir).is_absolute() else root / run_dir
    params, overrides = dict(params or {}), dict(overrides or {})
    _check_keys(dict(overrides))  # -c takes config fields only
    given = {**overrides, **params}
    config = {k: v for k, v in given.items() if k in FIELDS and k != "profile"} | {"run_dir": str(run)}
    cfg = get_config(profile, **config)
    jobs = runner.chapter_jobs(runner.select(chapters, root=root), {"profile": profile, **given}, run, root,
                               logs=True)
    seeds = tuple(extra_seeds(cfg.seed, cfg.n_seeds))  # chapters 4-5 repeat their solutions at these seeds
    needed = set().union(*(chapter_needs(j.chapter, cfg.datasets, cfg.kl_sweep, seeds) for j in jobs))
    planned = [f for f in finetune_jobs(cfg.datasets, cfg.kl_sweep, seeds) if f.name in needed]
    needs = {j.chapter: set(chapter_needs(j.chapter, cfg.datasets, cfg.kl_sweep, seeds)) & {f.name for f in planned}
             for j in jobs}
    stems = [j.chapter for j in jobs]
    after: dict[str, frozenset[str]] = {}
    ahead: tuple[str, ...] = ()
    ahead_from = ""
    follow = [st for st in stems if st in FOLLOW_CHAPTER_3] if seeds else []
    ch3 = next((st for st in stems if st.startswith("03")), None)
    recorded = chosen_scales(_results_of(run)) if follow and ch3 is None else None
    if ch3 is not None:  # the extra seeds' narrow solutions follow chapter 3's choice (plan_followups)
        after = {st: frozenset({ch3}) for st in follow}
        # chapter 6 reads the same choice: it waits for chapter 3's sweep instead of measuring it a second time
        after |= {st: frozenset({ch3}) for st in stems if st in READS_CHAPTER_3}
        have = {f.name for f in planned}
        if follow and speculate == SPECULATE_RECORD:
            from .results import RECORDS

            dirs = [root / d for _, d, _ in RECORDS]
            found = recorded_choice(cfg, dirs)
            extra = [f for f in prior_followups(follow, cfg.datasets, seeds, found[0])
                     if f.name not in have] if found else []
            ahead_from = (f"{found[1].relative_to(root) if found[1].is_relative_to(root) else found[1]} chose "
                          f"{found[0]}" if found else "no run of record of this setup, nothing trained ahead ("
                          + why_no_recorded_choice(cfg, dirs) + ")")
        elif follow and (bool(runner.visible_gpus()) if speculate is None else speculate):
            extra = [f for f in speculative(cfg.datasets, cfg.kl_sweep, seeds) if f.name not in have]
        else:
            extra = []
        planned += extra
        ahead = tuple(f.name for f in extra)
    elif recorded is not None:  # chapter 3 ran before in this run directory: its choice is known now
        for st in follow:
            extra = [f for f in followups(st, cfg.datasets, seeds, recorded) if f.name not in needs[st]]
            planned += [f for f in extra if f.name not in {p.name for p in planned}]
            needs[st] |= {f.name for f in extra}
    elif len(follow) == 2:  # both chapters would measure chapter 3 and train the same finetunes: one at a time
        after = {follow[1]: frozenset({follow[0]})}
    return Plan(profile=profile, run=run, cfg=cfg, config=config, params=params, overrides=overrides,
                chapters=tuple(jobs), finetunes=tuple(planned), needs={k: frozenset(v) for k, v in needs.items()},
                after=after, seeds=seeds, speculative=ahead, speculative_from=ahead_from)


def _results_of(run: Path) -> dict:
    f = run / "results.json"
    return json.loads(f.read_text()) if f.exists() else {}


def prepare_model(cfg: Config) -> float:
    """Convert a GGUF once in this process, so workers find the weights instead of racing to make them; a hub
    id is loaded (downloaded) once here for the same reason. Returns the seconds it took."""
    from . import models

    t0 = time.time()
    if models.prepare_source(cfg.model) is None and cfg.model != models.TINY:
        models.load_model(cfg.model, device="cpu", seed=cfg.seed)
    return round(time.time() - t0, 1)


# ------------------------------------------------------------------------------------ GPU memory admission
# What one process of the run (a finetune worker at work, or a chapter) may come to hold on the GPU. Measured
# on one H100 80GB (2026-12-05, SmolLM2-135M, `paper`): at the moments processes ran out of memory they held
# 6-17 GiB each, most 11-13 GiB (bench/README.md). A rough figure, not a bound: --gib-per-process changes it.
GIB_PER_PROCESS = 14.0
RAMP_S = 45.0  # a process started this recently is counted as holding GIB_PER_PROCESS already
# Chapters counted for less than GIB_PER_PROCESS (a share of it, so --gib-per-process scales them too). On one H100
# 80GB (2026-12-06, session 25, SmolLM2-135M `paper`; nvidia-smi's memory per process, bench/results/
# record_timeline_smollm2_h100_s25_*) chapters 4 and 5 held at most 2.4-2.5 GiB and chapter 0 none; counted at 14 GiB,
# chapter 5 (ready at 259 s, a path that ended the run) started at 342 s. At 0.25 (3.5 GiB) the samples say it had
# room at 259 s (31.7 GiB free less the two follow-ups just started) or, at the latest, 294 s (not measured). The
# others stay whole: chapters 1 and 6 held 8.8-8.9 GiB, chapters 2 and 3 23-24 (more than counted: the probe sees it
# once ``ramp_s`` has passed; counting it would delay the two chapters on the run's longest paths), a finetune alone
# 2.7-7.8 and a group 19.4-20.7 (torch's peak), and chapters 2-3 were still growing 60 s after they started, which a
# smaller count for the finetunes would not have left room for.
# Chapter 6 since: on one H100 (2026-12-07, session 41; nvidia-smi's memory per process every 5 s, bench/results/
# monitor_apps_*_h100_s41_*) it held 3.1 GiB on SmolLM2-135M and 6.5 GiB on Qwen2.5-Coder-0.5B (the KL's logits in
# chunks), not the 8.8-8.9 of session 25; counted at 14 GiB it waited 52-62 s (SmolLM2) and 81 s (Qwen, whose run
# it then ended) for room it did not need. At 0.6 (8.4 GiB) it covers both models' measured peaks.
NEED_SHARE = {"00": 0.25, "04": 0.25, "05": 0.25, "06": 0.6}


def need_share(stem: str | None) -> float:
    """The share of ``gib_per_process`` the process ``stem`` (a chapter's file stem; None: a finetune task) is
    counted for by :class:`Admission` (:data:`NEED_SHARE`; 1 when not listed)."""
    return NEED_SHARE.get(stem[:2], 1.0) if stem else 1.0


# A finetune task of one member is counted, once a task of its kind (:func:`finetune_kind`) has ended in the run,
# for LEARN_FACTOR x the largest peak that kind reached (torch's reserved memory, ``peak_gib``) + CONTEXT_GIB (its
# CUDA context), capped at ``need_gib``. Chapter 3's follow-ups (single narrow vectors and rank-1 adapters, with a
# KL term) come after the general ones of their kind have ended, and reserve more: on one H100 (2026-12-07,
# session 41, `record_timeline_*_h100_s41_*`) SmolLM2-135M's general vectors 2.5 GiB and rank-1 adapters 2.6,
# the narrow follow-ups 3.5-3.6 (x1.4); Qwen2.5-Coder-0.5B's 6.3 and 6.6-6.8, follow-ups 7.9-8.3 (x1.25). Counted
# at 14 GiB each, SmolLM2's four follow-ups started 168-210 s (each waiting out the others' ``ramp_s``), the last
# one a path chapter 5 ended the run on; at 2.5 x 1.5 + 0.5 = 4.25 GiB they fit at once.
LEARN_FACTOR = 1.5
CONTEXT_GIB = 0.5


def finetune_kind(task) -> str | None:
    """What :class:`Admission` learns a finetune task's memory under: "vector", "lora-rank1", "lora-rank32", ...
    for a task of one finetune; None for a group (emlib.vecgroup: its memory grows with its members)."""
    jobs = task if isinstance(task, tuple) else (task,)
    if len(jobs) != 1:
        return None
    return "-".join(x for x in (jobs[0].kind, jobs[0].shape) if x)


@dataclass
class Admission:
    """Starts a finetune task or a chapter only while the GPU has room for it: the free memory ``probe`` reads
    (GiB; None: no GPU, no limit) less what each process started in the last ``ramp_s`` seconds is counted for
    (they have not reached their peak yet) must leave what the new one is counted for: ``need_gib`` times its
    ``share`` (:func:`need_share`). With none of the run's processes at work, one may always start (memory held
    by others must not stall the run). ``need_gib`` 0: no limit. On an H200 (139 GiB) eight workers and the
    chapters fit (peak 116 GiB); on an H100 (80 GB) the same run ran out of memory in every process at once
    (2026-12-05): this keeps it inside the card."""

    probe: object = None  # () -> float | None, e.g. runner.gpu_free_gib
    need_gib: float = GIB_PER_PROCESS
    ramp_s: float = RAMP_S
    started: list = field(default_factory=list)  # (when, GiB counted, key) of each admitted process (time.time())
    deferred: int = 0  # checks that found no room (the run looks again every few seconds while something waits)
    learned: dict = field(default_factory=dict)  # finetune_kind -> the largest peak GiB a finished task reached

    def learn(self, kind: str | None, peak_gib: float | None) -> None:
        """A finetune task of ``kind`` (:func:`finetune_kind`) ended having reserved ``peak_gib`` at its peak."""
        if kind is not None and peak_gib is not None and peak_gib > 0:
            self.learned[kind] = max(self.learned.get(kind, 0.0), float(peak_gib))

    def finetune_share(self, task) -> float:
        """The share of ``need_gib`` a finetune task is counted for: :data:`LEARN_FACTOR` x the peak its kind
        reached in this run + :data:`CONTEXT_GIB` once one has ended (at most 1), else 1."""
        peak = self.learned.get(finetune_kind(task))
        if peak is None or self.need_gib <= 0:
            return 1.0
        return min(1.0, (LEARN_FACTOR * peak + CONTEXT_GIB) / self.need_gib)

    def room(self, running: int, now: float | None = None, share: float = 1.0) -> bool:
        if running == 0 or self.probe is None or self.need_gib <= 0:
            return True
        free = self.probe()
        if free is None:
            return True
        now = time.time() if now is None else now
        recent = sum(gib for when, gib, _key in self.started if now - when < self.ramp_s)
        if free - recent >= self.need_gib * share:
            return True
        self.deferred += 1
        return False

    def note_start(self, now: float | None = None, share: float = 1.0, key: str | None = None) -> None:
        """A process started: counted for ``need_gib * share`` for ``ramp_s`` seconds, or until
        :meth:`note_end` of its ``key``."""
        self.started.append((time.time() if now is None else now, self.need_gib * share, key))

    def note_end(self, key: str) -> None:
        """The process started under ``key`` has ended: it is no longer growing, and what it still holds (or
        gave back) is what the probe reads. (On an H100, 2026-12-06, three finetunes that had ended at 179-186 s
        were still counted as 42 GiB about to be taken, and chapters 1 and 3 waited until 200 s.)"""
        self.started = [(when, gib, k) for when, gib, k in self.started if k != key]


# Chapters ready at the same moment start longest first, so the GPU's room goes to the run's longest path.
# Each chapter's wall time beside the others, SmolLM2-135M `paper` on one H100 (2026-12-06, `--speculate off`,
# bench/README "Session 23"): chapter 2 was ready with chapter 1 at 207 s and, started second, waited 33 s for
# room while chapter 1 (75 s) ran. A chapter not listed goes last.
CHAPTER_SECONDS = {"00": 15, "01": 75, "02": 350, "03": 261, "04": 220, "05": 340, "06": 169}


def longest_first(stems: list[str]) -> list[str]:
    """``stems`` (chapter file stems, e.g. ``02_one_direction``) by :data:`CHAPTER_SECONDS`, longest first;
    ties keep their order."""
    return sorted(stems, key=lambda st: -CHAPTER_SECONDS.get(st[:2], 0))


# Chapters with slack: in the `--speculate off` run (H100, session 23) chapters 0 and 1 ended at 37 and 283 s,
# chapters 2 and 5 at 590 and 598 s. With ``--low-priority`` (under MPS) their processes are MPS clients of
# BELOW_NORMAL priority, which MPS's scheduler treats as advice: the GPU's time should go first to the chapters
# and finetunes on the run's longest paths. Chapter 4 is not among them: it may train a follow-up finetune chapter
# 5 waits for. Chapter 6 was, until its one run (H100, session 24: 558 s against 565 s without the flag): it waits
# for chapter 3's sweep, and at low priority it took 190 s instead of 158 s and ended the run 48 s after chapters
# 2 and 5, so it is no longer slack once chapter 3's follow-ups go first. Without it: not measured.
SLACK_CHAPTERS = ("00", "01")
MPS_BELOW_NORMAL = (("CUDA_MPS_CLIENT_PRIORITY", "1"),)  # 0: NORMAL (MPS's default), 1: BELOW_NORMAL


def low_chapter(chapter: str, low_priority: bool, favour: Sequence[str] = ()) -> bool:
    """Whether a run of record starts ``chapter`` (a stem or its number) as an MPS client of BELOW_NORMAL
    priority: with ``favour`` (chapter numbers), every chapter not in it; else, with ``low_priority``, the
    chapters of :data:`SLACK_CHAPTERS`. The one rule :func:`chapter_job` and ``record.json`` follow."""
    if favour:
        return chapter[:2] not in favour
    return low_priority and chapter[:2] in SLACK_CHAPTERS


def chapter_job(job: runner.Job, low_priority: bool, favour: Sequence[str] = ()) -> runner.Job:
    """``job`` as a run of record starts it: a chapter :func:`low_chapter` names gets :data:`MPS_BELOW_NORMAL`
    in its environment (without an MPS daemon the variable does nothing)."""
    if low_chapter(job.chapter, low_priority, favour):
        return dataclasses.replace(job, env=job.env + MPS_BELOW_NORMAL)
    return job


def auto_favour(plan_chapters: Sequence[str], mps_on: bool, low_priority: bool) -> tuple[str, ...]:
    """What a run favours when ``--favour`` is not given (``auto``): with an MPS daemon on and without
    ``low_priority``, the run's longest chapter by :data:`CHAPTER_SECONDS` (chapter 2 in a whole run); else
    nothing. One H100, SmolLM2-135M `paper` (bench/README "Session 35"): 464.4 s without a favoured chapter,
    427.8 s with chapters 2 and 5, 423.6 s with chapter 2 alone (on a second machine of the same kind)."""
    if not mps_on or low_priority or not plan_chapters:
        return ()
    first = longest_first(list(plan_chapters))[0]
    return (first[:2],) if CHAPTER_SECONDS.get(first[:2], 0) > 0 else ()


def check_favour(favour: Sequence[str], plan_chapters: Sequence[str], low_priority: bool) -> tuple[str, ...]:
    """``favour`` as chapter numbers ("2" -> "02"), checked against the run's chapters (stems); one clear
    message for a number the run does not have or for ``favour`` with ``low_priority`` (two rules for one
    setting: choose one)."""
    if not favour:
        return ()
    if low_priority:
        raise ValueError("--favour and --low-priority both set which processes run at BELOW_NORMAL priority: "
                         "pass one of them.")
    numbers = {c[:2] for c in plan_chapters}
    out = tuple(dict.fromkeys(str(f).strip().zfill(2)[:2] for f in favour))
    unknown = [f for f in out if f not in numbers]
    if unknown:
        raise ValueError(f"--favour {' '.join(unknown)}: not a chapter of this run (its chapters: "
                         f"{', '.join(sorted(numbers))}).")
    return out


# ------------------------------------------------------------------------------------------------ state
WAITING, RUNNING, DONE, FAILED, RETRY = "waiting", "running", "done", "failed", "retry"


@dataclass
class RunState:
    """Where a run of record stands. Each finetune (by name) and chapter (by stem) has a status: waiting ->
    running -> done | failed, or retry (it ran out of GPU memory: once more, alone, after everything else; a
    group is split instead: :func:`split_group`)."""

    finetunes: dict[str, str]
    chapters: dict[str, str]
    attempts: dict[str, int] = field(default_factory=dict)  # starts per finetune / chapter
    timings: dict = field(default_factory=lambda: {"model_load_s": 0.0, "jobs": {}, "chapters": {}})
    failures: dict[str, str] = field(default_factory=dict)  # name or stem -> why (a chapter: its log's tail)
    mps: str = "off (not asked for)"  # runner.mps_daemon's status
    threads: int | None = None  # CPU threads of each finetune's and chapter's torch (runner.threads_per_process)
    low_priority: bool = False  # SLACK_CHAPTERS as MPS clients of BELOW_NORMAL priority (chapter_job)
    favour: tuple[str, ...] = ()  # else these chapters NORMAL, the other chapters and the workers BELOW_NORMAL
    favour_auto: bool = False  # ``favour`` was chosen by auto_favour (no --favour given)
    futures: dict[Future, tuple[Job, ...]] = field(default_factory=dict)  # finetunes in the pool (a task each)
    groups: dict[str, tuple[Job, ...]] = field(default_factory=dict)  # name -> the vectors it trains with
    processes: dict[str, tuple[subprocess.Popen, float]] = field(default_factory=dict)  # chapters running
    extra: dict[str, Job] = field(default_factory=dict)  # finetunes planned once chapter 3 had chosen
    # chapter stem -> the follow-ups it uses; it does not wait for them here but in its own process
    # (train.finetune_lock: a finetune a worker is training is waited for, then loaded)
    extra_needs: dict[str, set[str]] = field(default_factory=dict)
    followed: bool = False  # chapter 3's follow-ups planned
    sweep_ready: bool = False  # this run's chapter 3 has recorded its lambda sweep (or ended)
    sweep_before: object = None  # results.json's ch3_lambda_sweep when chapter 3 started (an earlier run's)
    t0: float = field(default_factory=time.time)  # the run's start: total_s, started_s and ended_s count from it
    queue: list = field(default_factory=list)  # finetune tasks not in the pool yet, in the order they go (Admission)
    admit: Admission = field(default_factory=Admission)  # room on the GPU for one more process (default: no limit)
    ready: dict[str, float] = field(default_factory=dict)  # chapter stem -> when it could first start (time.time())
    early: bool = False  # start a chapter while workers still train its finetunes (start_ready_chapters)
    started_early: set = field(default_factory=set)  # chapters started early whose finetunes are not all done yet
    early_choice: bool = False  # start chapters.EARLY_FOR_CHOICE while chapter 3 still chooses (before_choice)
    before_choice: dict = field(default_factory=dict)  # chapter stem -> when it started before chapter 3 chose (s)
    choice_marked: bool = False  # chapters.CHOICE_PENDING is in the run directory (this process wrote it)

    @classmethod
    def of(cls, plan: Plan) -> "RunState":
        return cls(finetunes=dict.fromkeys((f.name for f in plan.finetunes), WAITING),
                   chapters=dict.fromkeys((j.chapter for j in plan.chapters), WAITING))

    @staticmethod
    def having(table: dict[str, str], status: str) -> list[str]:
        return [k for k, v in table.items() if v == status]

    def unfinished(self) -> bool:
        return any(v in (WAITING, RUNNING, RETRY) for t in (self.finetunes, self.chapters) for v in t.values())

    def quiet(self, plan: Plan) -> bool:
        """Nothing running or waiting (what a chapter's retry alone waits for); a chapter waiting for a chapter
        that is to be retried does not count (it waits for that retry: chapters 4-6 for chapter 3)."""
        waiting = [st for st in self.having(self.chapters, WAITING)
                   if not any(self.chapters.get(a) == RETRY for a in plan.after.get(st, ()))]
        return not (self.futures or self.processes or self.queue or waiting)

    def busy(self) -> int:
        """Processes of the run at work on the GPU: finetune tasks in the pool and chapters."""
        return len(self.futures) + len(self.processes)


# ------------------------------------------------------------------------------------------------ steps
_WORKER: dict = {}  # a pool worker's Experiment, kept between its finetunes ("key": profile and config)


@contextmanager
def worker_experiment(profile: str, config: dict):
    """The :class:`~emlib.experiment.Experiment` of ``profile`` and ``config`` in this process, made once and
    kept for the worker's next finetunes: the model loads once per worker, not once per finetune (each paid
    12-20 s of start-up and loading in the 594 s run of record). Training leaves the base model as it was (a
    LoRA adapter is unloaded, a vector's hook removed; on an exception too), and each finetune seeds its own
    initialisation and row order, so a finetune does not depend on what the worker trained before
    (``tests/test_record.py``). A finetune that raises drops the Experiment (the next one loads the model
    again); after each, what it allocated on the GPU goes back to the driver."""
    from . import timing
    from .experiment import Experiment

    timing.reset()  # a finetune's tally is its own (the worker's first includes loading the model)
    models.gpu_peak_gib(reset=True)  # and so is its peak GPU memory (_process_summary)
    key = (profile, json.dumps(config, sort_keys=True, default=str))
    if _WORKER.get("key") != key:
        _WORKER.clear()
        _WORKER.update(key=key, exp=Experiment(get_config(profile, **config)))
    try:
        yield _WORKER["exp"]
    except BaseException:
        _WORKER.clear()
        raise
    finally:
        models.give_back_gpu_memory()  # a finished step's CUDA graphs and buffers


def _train_task(profile: str, config: dict, jobs: tuple[Job, ...]) -> list[dict]:
    """Train (or find finished) ``jobs`` as one pool task in this process (a pool worker;
    :func:`worker_experiment`): each one's timing and summary, with what the task's torch still holds on the
    GPU once it has given back what it allocated (``held_gib``)."""
    t0 = time.time()
    with worker_experiment(profile, config) as exp:
        results = exp.train_group(jobs)
        task = _process_summary(t0)
        out = [_job_summary(job, res.out_dir, task) for job, res in zip(jobs, results)]
    held = models.gpu_held_gib()  # after the give-back
    return [o | {"held_gib": held} for o in out]


def finetune(profile: str, config: dict, job: Job) -> dict:
    """Train (or find finished) one finetune in this process; ``config``: its config fields. Returns its timing
    and summary."""
    # alone: emlib.train's graph step (3x faster than a group of one: bench/README.md)
    return _train_task(profile, config, (job,))[0]


def _process_summary(t0: float) -> dict:
    """The pool task's wall time, phase tally and peak GPU memory since ``t0``: read once per task, so the
    members of a group carry the same numbers (``emlib.timing.run_table`` counts them once)."""
    from . import timing

    wall = time.time() - t0
    return {"seconds": round(wall, 1), "phases": timing.summary(wall), "peak_gib": models.gpu_peak_gib(),
            "peak_allocated_gib": models.gpu_peak_gib(allocated=True)}


def _job_summary(job: Job, out_dir: Path, task: dict) -> dict:
    """A finished finetune's timing and summary (from its train_meta.json), as record.json keeps it; ``task``:
    its pool task's :func:`_process_summary`."""
    from . import train

    meta = train.read_meta(out_dir) or {}
    return {"job": job.name, "seconds": task["seconds"], "steps": meta.get("steps"),
            "train_seconds": meta.get("seconds"), "final_loss": meta.get("final_loss"),
            "tokens": meta.get("tokens"), "phases": task["phases"], "peak_gib": task["peak_gib"],
            "peak_allocated_gib": task["peak_allocated_gib"]}


def finetune_group(profile: str, config: dict, jobs: tuple[Job, ...]) -> list[dict]:
    """Train (or find finished) steering vectors, or rank-1 adapters, of one dataset and seed together in this
    process (a pool worker; :meth:`emlib.experiment.Experiment.vectors` / ``loras``). Returns each one's timing
    and summary."""
    return [o | {"group": len(jobs)} for o in _train_task(profile, config, jobs)]


def gates_chapters_1_2(task: tuple[Job, ...]) -> bool:
    """A rank-32 adapter: chapters 1-2 (chapter 2 is the longest) wait for these, so they go first. Chapter 2
    waits for nothing else; chapter 1 also for each dataset's rank-1 general adapter, which a head start does
    not include (on an H100 chapter 2 then started at 41 s, chapter 1 at 260 s: bench/README.md)."""
    return task[0].shape == "rank32"


def pool_tasks(jobs, first: set[str] = frozenset()) -> list[tuple[Job, ...]]:
    """The finetunes as pool tasks (:func:`emlib.chapters.train_groups`: the solutions of one dataset and seed
    that read the same rows form one task, trained at once by emlib.vecgroup). In the pool's order: the
    rank-32 adapters (chapters 1-2, the longest chapter, wait for them), then the groups at the config's seed,
    then the other tasks whose finetunes are all in ``first`` (chapter 3's: its lambda sweep decides what
    chapters 4-6 use), then the other groups, then the rest, each in the planned order."""
    out = train_groups(jobs)

    def rank(t: tuple[Job, ...]) -> int:
        if gates_chapters_1_2(t):
            return 0
        if len(t) > 1 and t[0].seed is None:
            return 1
        return 2 if all(j.name in first for j in t) else 3 if len(t) > 1 else 4

    return sorted(out, key=rank)


def chapter_3_needs(plan: Plan) -> set[str]:
    """The finetunes chapter 3 waits for (none when it is not in the run)."""
    return set(next((v for k, v in plan.needs.items() if k.startswith("03")), ()))


def _run_chapter(job: runner.Job, threads: int | None = None) -> subprocess.Popen:
    """A chapter in its own process (:func:`emlib.runner.spawn`; tests replace this)."""
    return runner.spawn(job, threads)


def submit_finetune(plan: Plan, state: RunState, pool, job: Job | tuple[Job, ...]) -> None:
    """One finetune, or a group of steering vectors (:func:`pool_tasks`) as one task."""
    jobs = job if isinstance(job, tuple) else (job,)
    for j in jobs:
        state.finetunes[j.name] = RUNNING
        state.attempts[j.name] = state.attempts.get(j.name, 0) + 1
        if len(jobs) > 1:
            state.groups[j.name] = jobs
    fut = (pool.submit(finetune_group, plan.profile, plan.config, jobs) if len(jobs) > 1
           else pool.submit(finetune, plan.profile, plan.config, jobs[0]))
    state.futures[fut] = jobs


def start_chapter(plan: Plan, state: RunState, stem: str) -> None:
    if stem.startswith("03"):  # what a sweep of an earlier run left, so plan_followups waits for this one's
        state.sweep_before = _results_of(plan.run).get("ch3_lambda_sweep")
    state.chapters[stem] = RUNNING
    state.attempts[stem] = state.attempts.get(stem, 0) + 1
    job = chapter_job(plan.chapter(stem), state.low_priority, state.favour)
    state.processes[stem] = (_run_chapter(job, state.threads), time.time())


def retry_alone(plan: Plan, state: RunState, pool) -> None:
    """Once everything else has ended, run one finetune, then one chapter, that ran out of memory again alone
    (cached answers and checkpoints let a chapter resume where it stopped). A finetune waits for the running
    chapters too: on an H100 a retry beside four chapters ran out of memory again (2026-12-05); a chapter
    that needs it meanwhile trains it itself or waits (``train.finetune_lock``)."""
    ft = state.having(state.finetunes, RETRY)
    if ft and not state.futures and not state.processes and not state.queue:
        job = next(f for f in (*plan.finetunes, *state.extra.values()) if f.name == ft[0])
        task = state.groups.get(job.name, job)
        print(f"[record] retrying {job.name} alone after running out of memory", flush=True)
        submit_finetune(plan, state, pool, task)
    ch = state.having(state.chapters, RETRY)
    if ch and state.quiet(plan) and not ft:
        log = Path(plan.chapter(ch[0]).log)
        log.replace(log.with_name(f"{ch[0]}-out-of-memory.log"))
        print(f"[record] chapter {ch[0]} starts again alone after running out of memory", flush=True)
        start_chapter(plan, state, ch[0])


def note_sweep(plan: Plan, state: RunState) -> None:
    """``state.sweep_ready`` once this run's chapter 3 has recorded its lambda sweep (while it still runs: it
    writes the sweep before its answers and figures) or has ended: what chapters 4-6 wait for."""
    ch3 = next((st for st in state.chapters if st.startswith("03")), None)
    if state.sweep_ready or ch3 is None:
        return
    if state.chapters[ch3] == RUNNING:
        sweep = _results_of(plan.run).get("ch3_lambda_sweep")
        state.sweep_ready = bool(sweep) and sweep != state.sweep_before  # not an earlier run's
    else:
        state.sweep_ready = state.chapters[ch3] == DONE


def plan_followups(plan: Plan, state: RunState) -> None:
    """Once chapter 3 has recorded its lambda sweep or is done (:func:`note_sweep`), queue chapters 4-5's
    narrow solutions at the extra seeds, at the lambda it chose (not at every lambda of the sweep; the ones
    trained ahead, ``plan.speculative``, are not queued again), before the other waiting tasks
    (:func:`submit_queued`). Chapters 4-5 start without waiting for them: each asks for them when it gets
    there (chapter 5 does the steering vectors first), waits for a worker training one
    (:func:`emlib.train.finetune_lock`) and trains one itself that no worker has started."""
    if not followups_may_come(plan, state):
        return
    note_sweep(plan, state)
    if not state.sweep_ready:
        return
    results = _results_of(plan.run)
    state.followed = True
    follow: list[tuple[Job, ...]] = []
    chosen = chosen_scales(results)
    if chosen is None:
        return  # chapter 3 recorded no sweep: chapters 4-5 measure it themselves (one after the other)
    for stem in state.chapters:
        jobs = [f for f in followups(stem, plan.cfg.datasets, plan.seeds, chosen)]
        state.extra_needs[stem] = {f.name for f in jobs}
        for job in jobs:
            if job.name not in state.finetunes:
                state.extra[job.name] = job
                state.finetunes[job.name] = WAITING
                follow.append((job,))
    state.queue[:0] = follow  # before the other waiting tasks: chapters 4-5 are running and ask for these
    ahead = sorted(set().union(*state.extra_needs.values()) & set(plan.speculative))
    print(f"[record] chapter 3 chose {chosen}: {len(state.extra)} follow-up finetunes"
          + (f"; trained ahead: {', '.join(ahead)}" if ahead else ""), flush=True)


def start_ready_chapters(plan: Plan, state: RunState, max_parallel: int) -> None:
    """Start each waiting chapter whose finetunes and earlier chapters are done (at most ``max_parallel`` at
    once); a chapter whose planned finetune or earlier chapter failed is not run (it would train the finetune
    again itself). Chapters 4-6 wait for chapter 3's recorded lambda sweep, not for its end (:func:`note_sweep`),
    and not for chapter 3's follow-up finetunes (:func:`plan_followups`); chapter 6 runs even when chapter 3
    failed (it measures the sweep itself). Chapters ready together start longest first (:func:`longest_first`)."""
    note_sweep(plan, state)
    for stem in longest_first(state.having(state.chapters, WAITING)):
        if len(state.processes) >= max_parallel:
            return
        needs = plan.needs[stem]  # not the follow-ups: a chapter waits for those itself (plan_followups)

        def settled(a: str) -> bool:  # an earlier chapter this one need not wait for any more
            return state.chapters.get(a) == DONE or (a.startswith("03") and (
                state.sweep_ready or (stem in READS_CHAPTER_3 and state.chapters.get(a) == FAILED)
                or before_choice(a)))

        def before_choice(a: str) -> bool:  # it may start now and wait for the choice itself (release_choice)
            return (state.early_choice and stem in EARLY_FOR_CHOICE and not state.sweep_ready
                    and state.chapters.get(a) == RUNNING and state.attempts.get(a, 1) <= 1)  # not its retry alone

        failed_ft = sorted(n for n in needs if state.finetunes[n] == FAILED)
        failed_ch = sorted(a for a in plan.after.get(stem, ()) if state.chapters.get(a) == FAILED and not settled(a))
        waiting = [a for a in plan.after.get(stem, ()) if not settled(a)]
        if failed_ft or failed_ch:
            state.chapters[stem] = FAILED
            state.failures[stem] = "not run: " + "; ".join(
                ([f"finetune(s) {', '.join(failed_ft)} failed"] if failed_ft else [])
                + ([f"chapter(s) {', '.join(failed_ch)} failed"] if failed_ch else []))
            print(f"[record] chapter {stem} NOT RUN: {state.failures[stem]}", flush=True)
        elif not waiting and ((done := all(state.finetunes[n] == DONE for n in needs))
                              or may_start_early(plan, state, stem)):
            if done:
                state.ready.setdefault(stem, time.time())  # from here on it waits only for room on the GPU
            share = need_share(stem)
            if not state.admit.room(state.busy(), share=share):
                return  # no room on the GPU: the next pass looks again
            early = "" if done else ", early: workers are still training what it needs"
            ch3 = [a for a in plan.after.get(stem, ()) if before_choice(a)]
            if ch3:  # the marker first: the chapter must find it (Experiment.narrow_scale waits while it is there)
                mark_choice_pending(plan.run)
                state.choice_marked = True
                state.before_choice[stem] = round(time.time() - state.t0, 1)
                early += ", before chapter 3 has chosen: it measures the general solutions meanwhile"
            print(f"[record] chapter {stem} starts ({time.time() - state.t0:.0f} s{early})", flush=True)
            start_chapter(plan, state, stem)
            state.admit.note_start(share=share, key=stem)
            if not done:
                state.started_early.add(stem)


def stop_chapter(state: RunState, stem: str) -> None:
    """Kill a running chapter's process and forget it (its status is the caller's to set)."""
    proc, _ = state.processes.pop(stem)
    proc.kill()
    proc.wait()
    state.admit.note_end(stem)
    state.started_early.discard(stem)


def release_choice(plan: Plan, state: RunState) -> None:
    """Once chapter 3 has recorded its sweep or has ended (:func:`note_sweep`), remove the run directory's
    :data:`~emlib.chapters.CHOICE_PENDING`, so a chapter started before the choice (``state.before_choice``) reads
    it. If chapter 3 failed before recording a sweep, such a chapter is stopped and not run, as a chapter that
    had waited for it is not (it would measure the sweep again itself). If chapter 3 ran out of memory first, such
    a chapter is stopped and waits again (chapter 3's retry runs alone, once nothing else runs: a chapter waiting
    for it would hold it back for ever), and starts once chapter 3 has chosen."""
    if not state.choice_marked:
        return
    ch3 = next(st for st in state.chapters if st.startswith("03"))
    note_sweep(plan, state)
    status = state.chapters[ch3]
    if not state.sweep_ready and status not in (FAILED, RETRY):
        return
    if not state.sweep_ready:
        for stem in [st for st in state.before_choice if st in state.processes]:
            stop_chapter(state, stem)
            if status == FAILED:
                state.chapters[stem] = FAILED
                state.failures[stem] = f"not run: chapter(s) {ch3} failed"
                print(f"[record] chapter {stem} stopped, NOT RUN: {state.failures[stem]}", flush=True)
            else:  # chapter 3 runs again alone once nothing else runs (retry_alone): this one must not wait for it
                state.chapters[stem] = WAITING
                state.attempts[stem] -= 1
                del state.before_choice[stem]
                print(f"[record] chapter {stem} stopped: chapter 3 ran out of GPU memory before choosing; it "
                      "starts again once chapter 3 has chosen", flush=True)
    clear_choice_pending(plan.run)
    state.choice_marked = False


# A chapter's first 10-16 s are start-up (its kernel, imports, the model and the judge: `record_cells`), which
# in the runs of 2026-12-06 on an H100 came after its finetunes ended, with the GPU at 0% for 15-25 s as the
# finetunes gave way to chapters 1-3 (the monitor's samples at 202-228 s). Until 2026-12-07 a chapter started
# early only once no finetune was queued: the short finetunes go last, so the queue emptied a few seconds before
# the long ones ended, and the card still sat near idle for 15-18 s as chapters 1-3 started up (SmolLM2, H100,
# session 35: 117-166 W from 160 to 175 s; Qwen2.5-Coder-0.5B, session 36: 127-236 W at 331-336 s). Now it
# may start as soon as workers hold its finetunes; since that can be long before they end, the admission rule
# counts it again from when they are done (recall_early), when chapters 2-3 start to grow (to 24-27 GB on an H100).
def may_start_early(plan: Plan, state: RunState, stem: str) -> bool:
    """Whether ``stem`` may start before its finetunes are done (``state.early``): each of the chapter's that is
    not done is in a worker and held by it (:func:`emlib.train.finetune_held`), whatever else is still queued:
    the chapter then waits for it where it asks for it, and loads it (``train.finetune_lock``), instead of
    training it a second time. :func:`recall_early` stops it again if one of them fails."""
    if not state.early:
        return False
    from . import train
    from .experiment import finetune_dir

    jobs = {f.name: f for f in plan.finetunes} | state.extra
    pending = [jobs[n] for n in plan.needs[stem] if state.finetunes[n] != DONE]
    return all(state.finetunes[j.name] == RUNNING for j in pending) and all(
        train.finetune_held(finetune_dir(plan.cfg, j.kind, j.dataset, j.solution, j.kl_scale, j.seed, j.shape))
        for j in pending)


def recall_early(plan: Plan, state: RunState) -> None:
    """Each chapter started early (:func:`may_start_early`): ready once its finetunes are done (``ready_s``), and
    from then on counted again by the admission rule for ``ramp_s`` (it grows only now); stopped and waiting
    again when one of them failed, ran out of memory or went back to the queue (its group split): it would
    otherwise train that finetune itself, beside everything else.
    :func:`start_ready_chapters` then does with it what it does with a chapter that was waiting."""
    for stem in sorted(state.started_early):
        status = [state.finetunes[n] for n in plan.needs[stem]]
        if all(v == DONE for v in status):
            ended = [state.timings["jobs"].get(n, {}).get("ended_s") for n in plan.needs[stem]]
            known = [e for e in ended if e is not None]  # when the run saw each end (collect_finetunes)
            state.ready.setdefault(stem, state.t0 + max(known) if known else time.time())
            state.started_early.discard(stem)
            state.admit.note_end(stem)  # counted again from now on: it starts to grow (see may_start_early)
            state.admit.note_start(share=need_share(stem), key=stem)
        elif any(v not in (DONE, RUNNING) for v in status):
            stop_chapter(state, stem)
            state.chapters[stem] = WAITING
            state.attempts[stem] -= 1
            print(f"[record] chapter {stem} stopped: a finetune it needs is not training any more; it starts "
                  "again once that is settled", flush=True)


def split_group(state: RunState, jobs: tuple[Job, ...]) -> None:
    """A group that ran out of GPU memory goes back to the front of the queue as two halves, each started once
    the GPU has room (:class:`Admission`), instead of waiting, whole, for everything else to end: a group
    trains each member as it would alone (``tests/test_vecgroup.py``), and its memory grows with its size (on
    an H100, 2026-12-06, a group of six vectors ran out of memory at about 120 s beside seven other processes;
    its retry alone began at 508 s, once every chapter had ended, and chapters 4-5 waited for it until 574 s).
    A half that runs out again is halved again; a single finetune is retried alone at the end
    (:func:`retry_alone`). The failed attempt does not count as one of its members' two."""
    half = (len(jobs) + 1) // 2
    parts = [jobs[:half], jobs[half:]]
    for job in jobs:
        state.finetunes[job.name] = WAITING
        state.attempts[job.name] -= 1
        state.groups.pop(job.name, None)
    state.queue[:0] = parts
    print(f"[record] a group of {len(jobs)} ({jobs[0].name}, ...) ran out of GPU memory: split into "
          f"{len(parts[0])} + {len(parts[1])}, queued first", flush=True)


def collect_finetunes(state: RunState, timeout: float = 5) -> None:
    """Wait up to ``timeout`` seconds for finetunes to end and record each (out of memory: retried later)."""
    finished, _ = wait(list(state.futures), timeout=timeout, return_when=FIRST_COMPLETED)
    for f in finished:
        jobs = state.futures.pop(f)
        state.admit.note_end(admission_key(jobs))
        try:
            r = f.result()
        except Exception as err:  # noqa: BLE001 - reported; chapters that need it are not run
            if is_out_of_memory(err) and len(jobs) > 1:
                split_group(state, jobs)
                continue
            for job in jobs:
                state.failures[job.name] = f"{type(err).__name__}: {err}"
                if is_out_of_memory(err) and state.attempts[job.name] < 2:
                    state.finetunes[job.name] = RETRY
                    print(f"[record] finetune {job.name} ran out of memory: retried later", flush=True)
                else:
                    state.finetunes[job.name] = FAILED
                    print(f"[record] finetune {job.name} FAILED: {state.failures[job.name]}", flush=True)
            continue
        ended = round(time.time() - state.t0, 1)  # when the runner saw it end (it polls every few seconds)
        results = r if isinstance(r, list) else [r]
        state.admit.learn(finetune_kind(jobs), results[0].get("peak_gib") if results else None)
        for job, res in zip(jobs, results):
            state.finetunes[job.name] = DONE
            state.timings["jobs"][job.name] = res | {"ended_s": ended}
            state.failures.pop(job.name, None)
            print(f"[record] finetune {job.name} done at {ended} s: {res}", flush=True)


def collect_chapters(plan: Plan, state: RunState) -> None:
    """Record each chapter process that has ended: its wall time, and done, failed or (out of GPU memory, the
    first time) retry."""
    for stem, (proc, t) in list(state.processes.items()):
        if proc.poll() is None:
            continue
        del state.processes[stem]
        state.admit.note_end(stem)
        secs = round(time.time() - t, 1)
        prev = state.timings["chapters"].get(stem)  # an attempt that ran out of memory, if any
        began = round(t - state.t0, 1)  # seconds from the run's start
        ready_at = state.ready.get(stem, t)
        ready = round(min(ready_at, t) - state.t0, 1)  # waited for room from ready_s to started_s
        state.timings["chapters"][stem] = {"seconds": secs, "returncode": proc.returncode, "ready_s": ready,
                                           "started_s": began, "ended_s": round(began + secs, 1)} | (
            {"out_of_memory_attempt_s": prev["seconds"]} if prev else {}) | (
            # started early (may_start_early): when its finetunes were all done
            {"finetunes_done_s": round(ready_at - state.t0, 1)} if ready_at > t else {})
        state.started_early.discard(stem)
        log = Path(plan.chapter(stem).log)
        if proc.returncode == 0:
            state.chapters[stem] = DONE
            state.failures.pop(stem, None)
            print(f"[record] chapter {stem} done in {secs} s", flush=True)
            continue
        state.failures[stem] = log.read_text()[-3000:]
        if state.attempts[stem] < 2 and log_says_out_of_memory(log):
            state.chapters[stem] = RETRY
            print(f"[record] chapter {stem} ran out of GPU memory in {secs} s: retried alone at the end", flush=True)
            continue
        state.chapters[stem] = FAILED
        print(f"[record] chapter {stem} FAILED in {secs} s: {_last_error_line(log)} (log: {log})", flush=True)


def head_and_rest(tasks: list[tuple[Job, ...]], head_start: bool) -> tuple[list, list]:
    """With ``head_start``, the rank-32 adapters (chapters 1-2 wait for them: the longest path of a run) go
    first with the GPU to themselves, and the other tasks once they have ended; without it, all at once."""
    if not head_start:
        return tasks, []
    head = [t for t in tasks if gates_chapters_1_2(t)]
    return head, [t for t in tasks if t not in head]


def admission_key(task) -> str:
    """What :class:`Admission` knows a finetune task by (its first job's name): the key of its start and end."""
    jobs = task if isinstance(task, tuple) else (task,)
    return "finetune " + jobs[0].name


def submit_queued(plan: Plan, state: RunState, pool, workers: int) -> None:
    """Hand the queue's tasks to the pool in order while a worker is free and the GPU has room
    (:class:`Admission`): a task in the pool's own queue would start whenever a worker frees, room or not."""
    while (state.queue and len(state.futures) < workers
           and state.admit.room(state.busy(), share=(share := state.admit.finetune_share(state.queue[0])))):
        task = state.queue.pop(0)
        submit_finetune(plan, state, pool, task)
        state.admit.note_start(share=share, key=admission_key(task))


def warm_worker() -> None:
    """A finetune worker's start-up that needs no model: the package's imports (torch, transformers, peft) and,
    with a GPU, its CUDA context. :func:`run` starts the workers with it before it converts the model, so
    this overlaps the conversion instead of following it (on an H100, 2026-12-06: the model converted in
    20 s, then each worker's first finetune spent 9.5-11 s loading before it trained; with the package's
    imports warmed still 7.7-11 s, while 8 warmed processes loaded the model in about 1 s each once
    transformers' lazy imports were done: bench/README "Session 24")."""
    import torch
    import transformers

    from . import experiment, fasttrain, vecgroup  # noqa: F401 - imported for their import time

    # transformers imports lazily: what the first load_model reaches (2 CPU cores: the first load after the
    # package's imports 2.1 s, a second one 1.3 s), for the book's two architectures (SmolLM2: Llama; Qwen2.5)
    transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast  # noqa: B018
    for arch in ("llama", "qwen2"):
        getattr(getattr(transformers.models, arch), f"{arch.capitalize()}ForCausalLM", None)
    if torch.cuda.is_available():
        x = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)  # the context (through the MPS daemon when
        (x @ x).sum().item()  # there is one) and cuBLAS's first handle
        del x
        models.give_back_gpu_memory()


def finetune_pool(workers: int, threads: int | None, gpu: bool, low: bool = False):
    """The run's pool of long-lived finetune workers (each loads the model once: :func:`worker_experiment`),
    started at once with :func:`warm_worker` where ``gpu`` (the machine has one; on a CPU their imports would
    only slow the conversion down by sharing its cores). ``low``: each worker an MPS client of BELOW_NORMAL
    priority (``--favour``)."""
    pool = runner.process_pool(workers, threads=threads, warm=warm_worker if gpu else None,
                               env=dict(MPS_BELOW_NORMAL) if low else None)
    if gpu:
        runner.start_workers(pool, workers)
    return pool


def run_all(plan: Plan, state: RunState, workers: int, max_parallel_chapters: int,
            head_start: bool = False, pool=None) -> None:
    """Every finetune in a pool of long-lived worker processes (``pool``: one made already, e.g. by
    :func:`finetune_pool`), each chapter as soon as its finetunes exist (``head_start``: :func:`head_and_rest`),
    each of them once the GPU has room (``state.admit``)."""
    if pool is None:
        pool = runner.process_pool(workers, threads=state.threads)
    ended = 0
    head, rest = head_and_rest(pool_tasks(plan.finetunes, first=chapter_3_needs(plan)), head_start)
    state.queue = list(head)
    try:
        while state.unfinished():
            if rest and all(state.finetunes[j.name] not in (WAITING, RUNNING) for t in head for j in t):
                print(f"[record] head start over at {time.time() - state.t0:.0f} s: {len(rest)} more tasks", flush=True)
                state.queue += rest
                rest = []
            plan_followups(plan, state)
            release_choice(plan, state)
            retry_alone(plan, state, pool)
            # the queue before the chapters: a queued finetune is what a chapter waits for (chapters 4-5 wait for
            # chapter 3's follow-ups: on an H100, 2026-12-06, chapters 4-6 took the room as chapter 3 chose, and
            # the follow-ups started 55-136 s later); a ready chapter has what it needs
            submit_queued(plan, state, pool, workers)
            recall_early(plan, state)
            start_ready_chapters(plan, state, max_parallel_chapters)
            if state.futures:
                collect_finetunes(state)
            else:
                time.sleep(2)
            if pool is not None and no_more_finetunes(plan, state):
                pool.shutdown(wait=True)  # idle workers hold a model and a CUDA context each: free them for
                pool = None  # the chapters still running
            collect_chapters(plan, state)
            now = len(state.timings["jobs"]) + len(state.timings["chapters"])
            if now != ended:  # a killed run still says what it finished, and when
                ended = now
                write_summary(plan, state, workers, final=False)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for proc, _ in state.processes.values():
            proc.kill()
        if state.choice_marked:
            clear_choice_pending(plan.run)


def no_more_finetunes(plan: Plan, state: RunState) -> bool:
    """No finetune is queued, training or to be retried, and none can be added: chapter 3's follow-ups are
    planned, or this run has no chapter 3 (or no extra seeds) to plan them."""
    pending = any(v in (WAITING, RUNNING, RETRY) for v in state.finetunes.values())
    return not state.futures and not state.queue and not pending and not followups_may_come(plan, state)


def followups_may_come(plan: Plan, state: RunState) -> bool:
    """Chapter 3's follow-up finetunes are still to be planned: this run has chapter 3 and extra seeds, and
    :func:`plan_followups` has not planned them yet."""
    return not state.followed and bool(plan.seeds) and any(st.startswith("03") for st in state.chapters)


def write_summary(plan: Plan, state: RunState, workers: int, final: bool = True) -> dict:
    """``record.json`` and the ``timings`` key of ``results.json``: the configuration, the device, every
    finetune's and chapter's wall time (``timings.chapters[stem].seconds``), the total and the failures.

    ``final`` False (written whenever a finetune or chapter ends): ``record.json`` only, with
    ``in_progress`` true and ``unfinished`` (each finetune or chapter not done yet and its status), so a run
    that is killed -- a lent machine taken back -- still records the wall times of what it finished."""
    import torch

    from . import experiment, fastgen, fused, models, vocab_loss

    state.timings["total_s"] = round(time.time() - state.t0, 1)
    state.timings["t0_unix"] = round(state.t0, 3)  # the chapters' phase spans (logs/phases/*.events.json) are unix times
    summary = {"profile": plan.profile, "params": {k: v for k, v in plan.params.items() if k != "run_dir"}
               | {"profile": plan.profile}, "overrides": plan.overrides,
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
               "workers": workers, "mps": state.mps, "threads_per_process": state.threads,
               "low_priority": [j.chapter for j in plan.chapters
                                if chapter_job(j, state.low_priority, state.favour).env],
               "favour": {"chapters": list(state.favour), "workers_low_priority": True,
                          "auto": state.favour_auto} if state.favour else None,
               "early_chapters": state.early,
               "early_choice": {"on": state.early_choice, "started_s": dict(state.before_choice)},
               "fast_paths": models.fast_paths_setting(),
               "compact": fastgen.compact_default(),
               "fused": fused.fused_setting(),
               "compile": fused.compile_setting(),
               "pack": fused.pack_setting(),
               "pack_metrics": fused.metric_pack_setting(),
               "vocab_loss": vocab_loss.vocab_loss_way("cuda" if torch.cuda.is_available() else "cpu"),
               "speculative": list(plan.speculative),
               "speculative_from": plan.speculative_from,
               "admission": {"gib_per_process": state.admit.need_gib if state.admit.probe else None,
                             "chapter_shares": NEED_SHARE,
                             "ramp_s": state.admit.ramp_s, "deferred": state.admit.deferred,
                             # the peaks finished single finetunes reached, by kind: what later ones counted for
                             "learned_peak_gib": state.admit.learned, "learn_factor": LEARN_FACTOR,
                             "context_gib": CONTEXT_GIB},
               "timings": state.timings, "failures": state.failures,
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if not final:
        summary |= {"in_progress": True, "unfinished": {k: v for t in (state.finetunes, state.chapters)
                                                        for k, v in t.items() if v != DONE}}
        atomic_write_bytes(plan.run / "record.json", json.dumps(summary, indent=2, default=str).encode("utf-8"))
        return summary
    experiment.record_result(plan.run / "results.json", "timings", summary)
    atomic_write_bytes(plan.run / "record.json", json.dumps(summary, indent=2, default=str).encode("utf-8"))
    return summary


def threads_for(processes: int, cores: int | None = None) -> int:
    """CPU threads of each of a run's ``processes``: a share of the cores, at least 2 on a machine with a GPU
    (each process needs a core free to launch its kernels) and at least 1 without one (there, two threads per
    process on fewer cores than threads wait for each other at every operation: bench/README.md)."""
    return runner.threads_per_process(processes, cores, floor=2 if runner.visible_gpus() else 1)


def run(profile: str = "paper", run_dir: str = "runs/record", params: dict | None = None,
        workers: int = 8, chapters: list[str] | None = None, max_parallel_chapters: int = 6,
        pack: str | None = None, overrides: dict | None = None, mps: bool = False,
        speculate: bool | None | str = False, head_start: bool = False,
        gib_per_process: float = GIB_PER_PROCESS, low_priority: bool = False,
        early_chapters: bool | None = None, favour: Sequence[str] | None = None,
        early_choice: bool | None = None) -> dict:
    """Finetunes in parallel processes, then every chapter as soon as its finetunes exist.

    ``mps``: serve the GPU through an MPS daemon of the run's own (:func:`emlib.runner.mps_daemon`), so the
    processes' kernels run side by side; ``record.json``'s ``mps`` says whether it was on. ``head_start``: the
    rank-32 adapters train before anything else (:func:`head_and_rest`; ``timings.head_start``).
    ``gib_per_process``: GPU memory a finetune or chapter process may come to hold; one starts only while the
    GPU has room for it (:class:`Admission`, on a machine with a GPU; 0: no limit; ``record.json``'s
    ``admission``). ``low_priority``: the chapters with slack run as MPS clients of lower priority
    (:func:`chapter_job`; ``record.json``'s ``low_priority`` lists them). ``favour`` (chapter numbers, instead of
    ``low_priority``): those chapters keep MPS's NORMAL priority and every other process of the run, the other
    chapters and the finetune workers, runs at BELOW_NORMAL (``record.json``'s ``favour``); None (the default):
    :func:`auto_favour` once the MPS daemon is known to be on (the longest chapter), () to favour none.
    ``early_chapters``: a chapter may start while workers still train its finetunes (:func:`may_start_early`;
    None: on a machine with a GPU; ``record.json``'s ``early_chapters``, and ``finetunes_done_s`` for each chapter
    that did). ``early_choice``: chapter 5 (:data:`~emlib.chapters.EARLY_FOR_CHOICE`) may start while chapter 3
    still chooses its narrow solutions; it measures the general ones meanwhile and waits for the choice where it
    needs it (:func:`release_choice`; None: as ``early_chapters``; ``record.json``'s ``early_choice``).

    ``params`` (``-p``) and ``overrides`` (``-c``) are config fields (``params`` also a chapter's own
    parameter): every finetune gets them as arguments, every chapter inside its ``config`` parameter, and
    ``record.json`` keeps both. Everything is checked before anything runs or is written."""
    t_start = time.time()
    plan = plan_run(profile, run_dir, params, overrides, chapters, speculate)
    stems = [j.chapter for j in plan.chapters]
    asked = favour is not None  # None: auto_favour, once the MPS daemon is known to be on
    favour = check_favour(favour, stems, low_priority) if asked else ()
    plan.cfg.save()
    print(f"[record] {len(plan.finetunes)} finetunes, {len(plan.chapters)} chapters, profile {profile}, "
          f"run dir {plan.run}", flush=True)
    if plan.speculative_from:
        print(f"[record] speculating: {plan.speculative_from}"
              + (f"; trained ahead: {', '.join(plan.speculative)}" if plan.speculative else ""), flush=True)
    state = RunState.of(plan)
    state.t0 = t_start
    state.threads = threads_for(workers + max_parallel_chapters)
    state.low_priority, state.favour, state.favour_auto = low_priority, favour, not asked
    gpu = bool(runner.visible_gpus())  # nvidia-smi: CUDA stays untouched in this process
    state.early = gpu if early_chapters is None else early_chapters
    state.early_choice = state.early if early_choice is None else early_choice
    clear_choice_pending(plan.run)  # one a killed run left: no process of this run wrote it
    if (low_priority or favour) and not mps:
        print(f"[record] --{'favour' if favour else 'low-priority'} acts only through an MPS daemon: add --mps "
              "(without it every process shares the GPU by time slices, and the setting does nothing)", flush=True)
    if gpu:
        state.admit = Admission(runner.gpu_free_gib, gib_per_process)
    with models.shared_gpu(), runner.mps_daemon(mps) as state.mps:
        print(f"[record] MPS {state.mps}", flush=True)
        if state.favour_auto:
            state.favour = auto_favour(stems, state.mps == "on", low_priority)
            if state.favour:
                print(f"[record] favouring chapter(s) {' '.join(state.favour)} (the longest path; --favour none: "
                      "no chapter)", flush=True)
        # the workers start (imports, CUDA context) while this process converts the model
        pool = finetune_pool(workers, state.threads, gpu, low=bool(state.favour)) if plan.finetunes else None
        try:
            state.timings["model_load_s"] = prepare_model(plan.cfg)
            if models.LAST_CONVERSION:  # converted here: where its seconds went (models.LAST_CONVERSION)
                state.timings["model_conversion"] = dict(models.LAST_CONVERSION)
        except BaseException:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            raise
        state.timings["head_start"] = head_start
        run_all(plan, state, workers, max_parallel_chapters, head_start, pool=pool)
        summary = write_summary(plan, state, workers)
    print(f"[record] finished in {state.timings['total_s']} s; failures: {sorted(state.failures) or 'none'}",
          flush=True)
    if pack:
        for p in pack_run(plan.run, Path(pack)):
            print(f"[record] packed {p} ({p.stat().st_size / 2 ** 20:.1f} MiB)", flush=True)
    return summary


def _last_error_line(log: Path) -> str:
    """The one-line ``error: ...`` that ``emlib.book run`` ends a failed chapter's log with (else its last line)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if ln.startswith("error: ")]
    return (errors[-1][len("error: "):] if errors else lines[-1] if lines else "empty log")[:500]


PACK_GLOBS = ("executed/*.ipynb", "results.json", "record.json", "config.json", "tables/*", "figures/*",
              "logs/*", "logs/phases/*", "directions/*", "vectors/*/*", "adapters/*/train_log.csv",
              "adapters/*/train_meta.json", "adapters/*/adapter/*.json", "inductive/**/*")


# rank-1 adapters' weights (about 1 MiB each for SmolLM2-135M); rank-32 ones (tens of MiB) stay behind
PACK_WEIGHT_GLOBS = ("adapters/*rank1*/adapter/*.safetensors",)


def pack_run(run: Path, dest: Path, max_mib: float = 15.5) -> list[Path]:
    """``record.tar.gz`` (everything but the adapters' weights and the answer cache), ``cache.tar.gz``
    (the SQLite answer cache) and ``adapters.tar.gz`` (the weights of the small adapters,
    :data:`PACK_WEIGHT_GLOBS`: what a later invocation needs to continue the run without training them again),
    each written only if under ``max_mib`` (the transfer limit of one file)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    files = sorted({p for g in PACK_GLOBS for p in run.glob(g) if p.is_file()})
    weights = sorted({p for g in PACK_WEIGHT_GLOBS for p in run.glob(g) if p.is_file()})
    for name, members in (("record.tar.gz", files), ("cache.tar.gz", sorted((run / "cache").glob("*"))),
                          ("adapters.tar.gz", weights)):
        if not members and name == "adapters.tar.gz":
            continue
        path = dest / name
        with tarfile.open(path, "w:gz") as tar:
            for f in members:
                tar.add(f, arcname=str(f.relative_to(run)))
        if path.stat().st_size > max_mib * 2 ** 20:
            print(f"[record] {name} is {path.stat().st_size / 2 ** 20:.1f} MiB, over {max_mib}: removed", flush=True)
            path.unlink()
            continue
        out.append(path)
    return out


MERGE_GLOBS = ("executed/*.ipynb", "tables/*", "figures/*", "logs/*", "logs/phases/*", "directions/*", "vectors/*/*",
               "adapters/*/train_log.csv", "adapters/*/train_meta.json", "adapters/*/adapter/*.json",
               *PACK_WEIGHT_GLOBS)


_LOG_JOB = re.compile(r"^\[record\] finetune (\S+) done: (\{.*\})\s*$")
_LOG_START = re.compile(r"^\[record\] chapter (\S+) starts \((\d+) s\)")
_LOG_DONE = re.compile(r"^\[record\] chapter (\S+) done in ([0-9.]+) s")
_LOG_HEAD = re.compile(r"^\[record\] \d+ finetunes, \d+ chapters, profile (\S+), run dir")
_LOG_FAILED = re.compile(r"^\[record\] (?:finetune|chapter) (\S+) (?:FAILED(?: in ([0-9.]+) s)?|NOT RUN): (.*)$")


def summary_from_log(log: str | Path, device: str) -> dict:
    """The ``record.json`` summary of an invocation that was killed before it wrote one (a lent machine taken
    back), rebuilt from the lines ``run`` prints (its log): each finished finetune's summary, each finished
    chapter's wall time, and as failures what the log says failed (with its reason) and the chapters that
    started and did not end (``killed``). Its
    ``total_s`` is the last end the log shows (a lower bound: ``total_s_is_lower_bound``); the model's load time
    is unknown and left out. ``device``: what the run ran on (the log does not say)."""
    import ast

    jobs, starts, chapters, failed, profile = {}, {}, {}, {}, None
    for line in Path(log).read_text(errors="replace").splitlines():
        line = line.strip()
        if m := _LOG_HEAD.match(line):
            profile = m.group(1)
        elif m := _LOG_FAILED.match(line):  # a finetune or chapter that failed (or was not run) says why
            failed[m.group(1)] = m.group(3)
            if m.group(2) is not None:
                chapters[m.group(1)] = {"seconds": float(m.group(2)), "returncode": 1}
        elif m := _LOG_JOB.match(line):
            jobs[m.group(1)] = ast.literal_eval(m.group(2))
        elif m := _LOG_START.match(line):
            starts[m.group(1)] = int(m.group(2))
        elif m := _LOG_DONE.match(line):
            chapters[m.group(1)] = {"seconds": float(m.group(2)), "returncode": 0}
    if profile is None:
        raise ValueError(f"{log} is not the log of `python -m emlib.record run` (no '[record] N finetunes, ...' "
                         "line): give the log the run printed.")
    ends = [starts[k] + v["seconds"] for k, v in chapters.items() if k in starts]
    killed = {k: f"killed after {k} started at {t} s: the log ends before it did" for k, t in starts.items()
              if k not in chapters and k not in failed}
    return {"profile": profile, "device": device, "rebuilt_from_log": Path(log).name, "in_progress": True,
            "timings": {"jobs": jobs, "chapters": chapters, "total_s": round(max(ends, default=0.0), 1),
                        "total_s_is_lower_bound": True},
            "failures": failed | killed, "unfinished": {k: "killed" for k in killed}}


def adopt_log_summary(run_dir: str | Path, log: str | Path, device: str) -> dict:
    """Give a killed run directory the summary :func:`summary_from_log` rebuilds: ``record.json`` and the
    ``timings`` key of ``results.json`` (so that :func:`merge` keeps it as the first invocation). Refuses a run
    that has its own summary already."""
    from . import experiment

    run = Path(run_dir)
    res = json.loads((run / "results.json").read_text())
    if "timings" in res:
        raise ValueError(f"{run} has its own summary already (results.json key 'timings'): nothing to rebuild.")
    summary = summary_from_log(log, device)
    experiment.record_result(run / "results.json", "timings", summary)
    atomic_write_bytes(run / "record.json", json.dumps(summary, indent=2, default=str).encode("utf-8"))
    return summary


def merge(src: str | Path, dst: str | Path) -> dict:
    """Fold a later run of some chapters (``src``) into a run of record (``dst``) of the same model.

    Chapter outputs of ``src`` (executed notebooks, tables, figures, logs, vectors, training logs) replace
    those of ``dst``; every ``results.json`` key of ``src`` replaces the same key in ``dst``, except
    ``timings``, which keeps both invocations (``invocations``: one summary per run, ``timings.chapters``
    and ``timings.jobs`` merged, ``total_s`` their sum). The runs must share the profile and model."""
    import shutil

    src, dst = Path(src), Path(dst)
    a, b = (json.loads((p / "results.json").read_text()) for p in (src, dst))
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (src, dst))
    for key in ("profile", "model", "data_source", "seed"):
        if ca.get(key) != cb.get(key):
            raise ValueError(f"{src} and {dst} differ in {key} ({ca.get(key)!r} vs {cb.get(key)!r}): "
                             "only runs of the same configuration can be merged.")
    for g in MERGE_GLOBS:
        for f in src.glob(g):
            if f.is_file():
                out = dst / f.relative_to(src)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)
    ta, tb = a.pop("timings", None), b.get("timings")
    merged = dict(b) | a
    runs = [t for t in ((tb or {}).get("invocations") or ([tb] if tb else [])) + ([ta] if ta else [])]
    if runs:
        last = dict(runs[-1])
        last["invocations"] = runs
        last["timings"] = {"model_load_s": sum(r["timings"].get("model_load_s", 0) for r in runs),
                           "jobs": {k: v for r in runs for k, v in r["timings"]["jobs"].items()},
                           "chapters": {k: v for r in runs for k, v in r["timings"]["chapters"].items()},
                           "total_s": round(sum(r["timings"]["total_s"] for r in runs), 1)}
        if any(r["timings"].get("total_s_is_lower_bound") for r in runs):  # a killed invocation's time
            last["timings"]["total_s_is_lower_bound"] = True
        fails: dict = {}
        for r in runs:  # a failure stays only if no later invocation did that job or chapter
            redone = set(r["timings"]["jobs"]) | {k for k, v in r["timings"]["chapters"].items()
                                                  if v.get("returncode") == 0}
            fails = {k: v for k, v in fails.items() if k not in redone} | dict(r.get("failures", {}))
        last["failures"] = fails
        merged["timings"] = last
        atomic_write_bytes(dst / "record.json", json.dumps(last, indent=2, default=str).encode("utf-8"))
    atomic_write_bytes(dst / "results.json", json.dumps(merged, indent=2, default=str).encode("utf-8"))
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emlib.record", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="finetunes in parallel, then every chapter")
    r.add_argument("--profile", default="paper")
    r.add_argument("--model", default=None, help="embedded | hub id | local folder (default: the profile's)")
    r.add_argument("--run-dir", default="runs/record")
    r.add_argument("--workers", type=int, default=8)
    r.add_argument("--parallel-chapters", type=int, default=6)
    r.add_argument("--chapters", nargs="*")
    r.add_argument("--pack", default=None, help="folder for record.tar.gz / cache.tar.gz")
    r.add_argument("--mps", action="store_true",
                   help="serve the GPU through an NVIDIA MPS daemon of this run's own (processes' kernels side by side)")
    r.add_argument("--speculate", choices=(*AUTO_ON_OFF, SPECULATE_RECORD), default="off",
                   help="train chapter 4-5's narrow steering vectors at every lambda before chapter 3 chooses "
                        "(auto: on a GPU; off by default: slower on an H100, bench/README 'Session 23'); record: "
                        "train chapters 4-5's follow-ups up front at the lambdas the committed run of record of "
                        "the same setup chose (nothing when none matches)")
    r.add_argument("--head-start", choices=("on", "off"), default="off",
                   help="train the rank-32 adapters (all chapter 2 waits for) before the other finetunes")
    r.add_argument("--low-priority", action="store_true",
                   help=f"with --mps: chapters {', '.join(SLACK_CHAPTERS)} (slack in the measured runs) as MPS clients "
                        "of BELOW_NORMAL priority, so the GPU's time goes first to the longest paths (one H100 run, "
                        "chapter 6 low too: 558 s against 565 s without, bench/README 'Session 24')")
    r.add_argument("--favour", nargs="+", metavar="CHAPTER", default=["auto"],
                   help="with --mps: these chapters (numbers, e.g. 02) keep NORMAL priority; every other chapter and "
                        "the finetune workers run as MPS clients of BELOW_NORMAL priority (not with --low-priority). "
                        "auto (the default): the run's longest chapter, 02 in a whole run, when MPS is on and "
                        "--low-priority is not set; none: no chapter. One H100: 464 s without, 424-428 s with "
                        "(bench/README 'Session 35')")
    r.add_argument("--early-chapters", choices=("auto", "on", "off"), default="auto",
                   help="start a chapter while workers still train its finetunes (once workers hold them all), so "
                        "its start-up overlaps their training; it waits for them where it asks for them (auto: on "
                        "a GPU)")
    r.add_argument("--early-choice", choices=("auto", "on", "off"), default="auto",
                   help="start chapter 5 while chapter 3 still chooses its narrow solutions: it measures the "
                        "general solutions meanwhile and waits for the choice where it needs it (auto: as "
                        "--early-chapters)")
    r.add_argument("--gib-per-process", type=float, default=GIB_PER_PROCESS,
                   help="GPU memory one finetune or chapter process may reach: a process starts only while the "
                        f"GPU has room for it (default {GIB_PER_PROCESS:g}, measured for SmolLM2-135M; chapters "
                        "0, 4 and 5 count a quarter of it; 0: no limit)")
    r.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="a config field (into each chapter's config) or a chapter's own parameter")
    r.add_argument("-c", "--config", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="a config field for every chapter and finetune (e.g. kl_lambda 0.66)")
    p = sub.add_parser("pack", help="pack an existing run directory")
    p.add_argument("run_dir")
    p.add_argument("dest")
    m = sub.add_parser("merge", help="fold a run of some chapters into a run of record")
    m.add_argument("src")
    m.add_argument("dst")
    f = sub.add_parser("from-log", help="a killed run's summary (record.json, timings) rebuilt from its log")
    f.add_argument("run_dir")
    f.add_argument("log")
    f.add_argument("--device", required=True, help="what the run ran on, e.g. 'NVIDIA H200' (the log does not say)")
    from .cli import add_debug_flag, run as run_cli

    for sp in (r, p, m, f):
        add_debug_flag(sp)
    a = ap.parse_args(argv)
    return run_cli(lambda: _main(a), debug=a.debug)


def favour_arg(words: Sequence[str]) -> tuple[str, ...] | None:
    """``--favour``'s words as :func:`run` takes them: ``auto`` -> None (:func:`auto_favour`), ``none`` -> (),
    else the chapter numbers (checked by :func:`check_favour`); auto or none beside a number is one clear error."""
    low = [w.strip().lower() for w in words]
    if low in (["auto"], ["none"]):
        return None if low == ["auto"] else ()
    if {"auto", "none"} & set(low):
        raise ValueError(f"--favour {' '.join(words)}: auto and none stand alone; give chapter numbers, auto or none.")
    return tuple(words)


# an --auto/on/off flag as run() takes it: None (decided where it runs), True, False
AUTO_ON_OFF = {"auto": None, "on": True, "off": False}
SPECULATE_RECORD = "record"  # --speculate record: train ahead at the choice of the committed run of record


def _main(a) -> int:
    if a.cmd == "from-log":
        summary = adopt_log_summary(a.run_dir, a.log, a.device)
        print(f"{a.run_dir}: {len(summary['timings']['jobs'])} finetunes, {len(summary['timings']['chapters'])} "
              f"chapters from {a.log}; failed or killed: {sorted(summary['failures']) or 'none'}")
        return 0
    if a.cmd == "merge":
        merge(a.src, a.dst)
        print(f"merged {a.src} into {a.dst}")
        return 0
    if a.cmd == "run":
        params = book._parse_params(a.param)
        if a.model:
            params["model"] = a.model
        summary = run(a.profile, a.run_dir, params, a.workers, a.chapters, a.parallel_chapters, a.pack,
                      book._parse_params(a.config), mps=a.mps,
                      speculate=AUTO_ON_OFF.get(a.speculate, a.speculate),
                      head_start=a.head_start == "on", gib_per_process=a.gib_per_process,
                      low_priority=a.low_priority, favour=favour_arg(a.favour),
                      early_chapters=AUTO_ON_OFF[a.early_chapters],
                      early_choice=AUTO_ON_OFF[a.early_choice])
        if summary["failures"]:
            from .cli import ChapterFailed

            name, why = next(iter(summary["failures"].items()))
            run_dir = Path(a.run_dir) if Path(a.run_dir).is_absolute() else book.repo_root() / a.run_dir
            log = run_dir / "logs" / f"{name}.log"
            why = _last_error_line(log) if log.exists() and not why.startswith("not run") else why
            raise ChapterFailed(f"{len(summary['failures'])} finetune(s)/chapter(s) failed ({', '.join(summary['failures'])}); "
                                f"the first, {name}: {why}. Logs are in {run_dir / 'logs'}; run the same "
                                "command again to resume (finished finetunes and cached answers are reused).")
        return 0
    for path in pack_run(Path(a.run_dir), Path(a.dest)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
