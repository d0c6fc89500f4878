"""Runs of record: every chapter of the book for one model, on one GPU, in one command.

    python -m emlib.record run --profile paper --model embedded --run-dir runs/record-smollm2 \\
        [--workers 12] [--chapters 01 03] [-p n_train 2000] [--pack OUT_DIR]

1. **Finetunes** (:func:`finetune_jobs`): every LoRA adapter and steering vector the chapters use, each in
   its own worker process. A 135M model leaves an H100 mostly idle at the paper's batch of 16 rows
   (``bench/train_parallel_gpu.py``: rank-32 LoRA 2.7 optimizer steps/s in one process, 17 steps/s summed
   over 8 processes), so training the finetunes side by side is several times faster than one after another.
   Each job calls the same :class:`~emlib.experiment.Experiment` method a chapter calls, so a chapter finds
   the finished run (same arguments, same hash) and loads it instead of training.
   A finetune that runs out of GPU memory (too many side by side: 11 Qwen-0.5B finetunes did not fit in
   80 GB) is retried once, alone, after the others have ended.
2. **Chapters**: each chapter is executed with papermill (its own kernel) as soon as the finetunes it needs
   are done, several at once; executed notebooks go to ``RUN_DIR/executed/``. A chapter whose finetune
   failed is not run (it would train the finetune itself, racing the other chapters that need it).
3. **Summary**: wall time of every job and chapter and the whole run in ``RUN_DIR/results.json``
   (key ``timings``) and ``RUN_DIR/record.json``; with ``--pack DIR`` the run's outputs (executed notebooks,
   results, tables, figures, vectors, directions, training logs, the answer cache) are packed into
   ``DIR/record.tar.gz`` and ``DIR/cache.tar.gz``.

A killed run resumes: finished finetunes and cached answers are reused, a chapter is re-executed.
Workers and chapter processes die with the run (:mod:`emlib.lifeline`): a restart never races a leftover.
On a CPU the same command runs (slowly); ``--profile smoke`` checks the whole pipeline in minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from . import book
from .config import get_config

from .chapters import Finetune as Job  # the finetune plan and each chapter's needs: emlib.chapters
from .chapters import finetunes as finetune_jobs
from .chapters import finetunes_needed as chapter_needs


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error (also as re-raised across a process pool, or cuBLAS failing to allocate)."""
    text = f"{type(err).__name__}: {err}"
    return "OutOfMemoryError" in text or "out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text


def log_says_out_of_memory(log: Path) -> bool:
    """Whether a chapter's log (papermill's traceback) ends in a CUDA out-of-memory error."""
    try:
        tail = log.read_text(errors="replace")[-20000:]
    except OSError:
        return False
    return "OutOfMemoryError" in tail or "CUDA out of memory" in tail or "CUBLAS_STATUS_ALLOC_FAILED" in tail


def _config_params(params: dict) -> dict:
    """The chapter parameters that are Config fields (chapters also take e.g. ``interactive``)."""
    from .config import FIELDS

    return {k: v for k, v in params.items() if k in FIELDS and k != "profile"}


def run_job(profile: str, params: dict, job: Job) -> dict:
    """Train (or find finished) one finetune in this process; returns its timing and summary."""
    from .experiment import Experiment
    from . import train

    t0 = time.time()
    exp = Experiment(get_config(profile, **_config_params(params)))
    if job.kind == "vector":
        res = exp.vector(job.dataset, job.solution)
    else:
        with exp.lora(job.dataset, job.shape, job.solution) as r:
            res = r
    meta = train.read_meta(res.out_dir) or {}
    return {"job": job.name, "seconds": round(time.time() - t0, 1), "steps": meta.get("steps"),
            "train_seconds": meta.get("seconds"), "final_loss": meta.get("final_loss"),
            "tokens": meta.get("tokens")}


def _run_chapter(src: Path, out: Path, params: dict, log: Path) -> subprocess.Popen:
    known = book.parameter_defaults(book.read_py_notebook(src))
    p = {k: v for k, v in params.items() if k in known}
    if "interactive" in known:
        p.setdefault("interactive", False)
    # through emlib.lifeline: the chapter (and its kernel) stops when this process dies
    cmd = [sys.executable, "-m", "emlib.lifeline", str(os.getpid()), "emlib.book", "run", str(src), str(out),
           "--debug"]  # the log keeps the traceback above the one-line error
    for k, v in p.items():
        cmd += ["-p", k, json.dumps(v)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(book.repo_root()))


def _pool(workers: int) -> ProcessPoolExecutor:
    """The finetune workers: one fresh process per job, each stopping when this process dies."""
    import multiprocessing as mp

    from . import lifeline

    return ProcessPoolExecutor(max_workers=max(1, workers), mp_context=mp.get_context("spawn"),
                               max_tasks_per_child=1, initializer=lifeline.die_with_parent,
                               initargs=(os.getpid(),))


def run(profile: str = "paper", run_dir: str = "runs/record", params: dict | None = None,
        workers: int = 8, chapters: list[str] | None = None, max_parallel_chapters: int = 6,
        pack: str | None = None, overrides: dict | None = None) -> dict:
    """Finetunes in parallel processes, then every chapter as soon as its finetunes exist.

    ``params`` are chapter parameters (papermill); ``overrides`` are any other config fields (e.g. a
    model-specific ``kl_lambda``), passed to workers and chapter kernels through ``$EMLIB_CONFIG_OVERRIDES``
    and saved with the run."""
    from .config import ENV_OVERRIDES, _check_keys

    previous = os.environ.get(ENV_OVERRIDES)
    if overrides:
        _check_keys(dict(overrides))
        os.environ[ENV_OVERRIDES] = json.dumps(overrides)
    try:
        return _run(profile, run_dir, params, workers, chapters, max_parallel_chapters, pack, overrides)
    finally:
        if previous is None:
            os.environ.pop(ENV_OVERRIDES, None)
        else:
            os.environ[ENV_OVERRIDES] = previous


def _run(profile, run_dir, params, workers, chapters, max_parallel_chapters, pack, overrides) -> dict:
    from . import experiment

    t_start = time.time()
    root = book.repo_root()
    run = Path(run_dir) if Path(run_dir).is_absolute() else root / run_dir
    params = dict(params or {}) | {"profile": profile, "run_dir": str(run)}
    cfg = get_config(profile, **_config_params(params))
    cfg.save()
    srcs = book.chapter_sources(root)
    allowed = set().union(*(book.parameter_defaults(book.read_py_notebook(s)) for s in srcs))
    extra = sorted(set(params) - allowed)
    if extra:  # finetunes and chapters must see the same configuration
        from .config import ConfigError

        raise ConfigError(f"Unknown chapter parameter(s) {', '.join(extra)}: the chapters take "
                          f"{', '.join(sorted(allowed))}.")
    if chapters:
        srcs = [s for s in srcs if s.name[:2] in chapters]
    needed = set().union(*(chapter_needs(s.stem, cfg.datasets) for s in srcs)) if srcs else set()
    jobs = [j for j in finetune_jobs(cfg.datasets) if j.name in needed]
    print(f"[record] {len(jobs)} finetunes, {len(srcs)} chapters, profile {profile}, run dir {run}", flush=True)

    # convert a GGUF once in the main process, so workers find the weights instead of racing to make them;
    # a hub id is loaded (downloaded) once here for the same reason
    from . import models

    t0 = time.time()
    if models.prepare_source(cfg.model) is None and cfg.model != models.TINY:
        models.load_model(cfg.model, device="cpu", seed=cfg.seed)
    timings: dict = {"model_load_s": round(time.time() - t0, 1), "jobs": {}, "chapters": {}}
    failures: dict = {}
    done: set[str] = set()
    job_failed: set[str] = set()  # final failures (an out-of-memory failure is retried once, alone)
    retry: list[Job] = []
    retried: set[str] = set()
    pending_chapters = list(srcs)
    by_stem = {src.stem: src for src in srcs}
    chapter_retry: list[Path] = []  # chapters that ran out of GPU memory: run again once, alone, at the end
    chapters_retried: set[str] = set()
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    pool = _pool(workers)
    futures: dict[Future, tuple[Job, float]] = {pool.submit(run_job, profile, params, j): (j, time.time())
                                                 for j in jobs}
    try:
        while futures or running or pending_chapters or retry or chapter_retry:
            if chapter_retry and not (futures or running or pending_chapters or retry):
                src = chapter_retry.pop(0)  # cached answers and checkpoints let it resume where it stopped
                chapters_retried.add(src.stem)
                log = run / "logs" / f"{src.stem}.log"
                log.replace(log.with_name(f"{src.stem}-out-of-memory.log"))
                print(f"[record] chapter {src.stem} starts again alone after running out of memory", flush=True)
                running[src.stem] = (_run_chapter(src, run / "executed" / f"{src.stem}.ipynb", params, log),
                                     time.time(), log)
            if not futures and retry:  # every other finetune has ended: retry one out-of-memory job alone
                job = retry.pop(0)
                retried.add(job.name)
                print(f"[record] retrying {job.name} alone after running out of memory", flush=True)
                futures[pool.submit(run_job, profile, params, job)] = (job, time.time())
            for src in list(pending_chapters):
                if len(running) >= max_parallel_chapters:
                    break
                need = chapter_needs(src.stem, cfg.datasets) & {j.name for j in jobs}
                if need & job_failed:  # never let a chapter train a failed finetune itself (runs would race)
                    failures[src.stem] = f"not run: finetune(s) {', '.join(sorted(need & job_failed))} failed"
                    print(f"[record] chapter {src.stem} NOT RUN: {failures[src.stem]}", flush=True)
                    pending_chapters.remove(src)
                    continue
                if need - done:
                    continue  # still training
                out = run / "executed" / f"{src.stem}.ipynb"
                log = run / "logs" / f"{src.stem}.log"
                print(f"[record] chapter {src.stem} starts ({time.time() - t_start:.0f} s)", flush=True)
                running[src.stem] = (_run_chapter(src, out, params, log), time.time(), log)
                pending_chapters.remove(src)
            if futures:
                finished, _ = wait(list(futures), timeout=5, return_when=FIRST_COMPLETED)
                for f in finished:
                    job, t = futures.pop(f)
                    try:
                        r = f.result()
                        timings["jobs"][job.name] = r
                        done.add(job.name)
                        failures.pop(job.name, None)
                        print(f"[record] finetune {job.name} done: {r}", flush=True)
                    except Exception as err:  # noqa: BLE001 - reported; chapters that need it are not run
                        failures[job.name] = f"{type(err).__name__}: {err}"
                        if is_out_of_memory(err) and job.name not in retried:
                            retry.append(job)
                            print(f"[record] finetune {job.name} ran out of memory: retried later", flush=True)
                        else:
                            job_failed.add(job.name)
                            print(f"[record] finetune {job.name} FAILED: {failures[job.name]}", flush=True)
            else:
                time.sleep(2)
            for stem, (proc, t, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                running.pop(stem)
                secs = round(time.time() - t, 1)
                prev = timings["chapters"].get(stem)  # an attempt that ran out of memory, if any
                timings["chapters"][stem] = {"seconds": secs, "returncode": proc.returncode} | (
                    {"out_of_memory_attempt_s": prev["seconds"]} if prev else {})
                if proc.returncode != 0:
                    failures[stem] = log.read_text()[-3000:]
                    if stem not in chapters_retried and log_says_out_of_memory(log):
                        chapter_retry.append(by_stem[stem])
                        print(f"[record] chapter {stem} ran out of GPU memory in {secs} s: retried alone at the "
                              "end", flush=True)
                        continue
                else:
                    failures.pop(stem, None)
                why = "" if proc.returncode == 0 else f": {_last_error_line(log)} (log: {log})"
                print(f"[record] chapter {stem} {'done' if proc.returncode == 0 else 'FAILED'} in {secs} s{why}",
                      flush=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for proc, _, _ in running.values():
            proc.kill()
    timings["total_s"] = round(time.time() - t_start, 1)
    import torch

    summary = {"profile": profile, "params": {k: v for k, v in params.items() if k != "run_dir"},
               "overrides": dict(overrides or {}),
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
               "workers": workers, "timings": timings, "failures": failures,
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    experiment.record_result(run / "results.json", "timings", summary)
    (run / "record.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"[record] finished in {timings['total_s']} s; failures: {sorted(failures) or 'none'}", flush=True)
    if pack:
        for p in pack_run(run, Path(pack)):
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
              "logs/*", "directions/*", "vectors/*/*", "adapters/*/train_log.csv", "adapters/*/train_meta.json",
              "adapters/*/adapter/*.json", "inductive/**/*")


def pack_run(run: Path, dest: Path, max_mib: float = 15.5) -> list[Path]:
    """``record.tar.gz`` (everything but the adapters' weights and the answer cache) and ``cache.tar.gz``
    (the SQLite answer cache), each written only if under ``max_mib`` (the transfer limit of one file)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    files = sorted({p for g in PACK_GLOBS for p in run.glob(g) if p.is_file()})
    for name, members in (("record.tar.gz", files), ("cache.tar.gz", sorted((run / "cache").glob("*")))):
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


MERGE_GLOBS = ("executed/*.ipynb", "tables/*", "figures/*", "logs/*", "directions/*", "vectors/*/*",
               "adapters/*/train_log.csv", "adapters/*/train_meta.json")


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
        fails: dict = {}
        for r in runs:  # a failure stays only if no later invocation did that job or chapter
            redone = set(r["timings"]["jobs"]) | {k for k, v in r["timings"]["chapters"].items()
                                                  if v.get("returncode") == 0}
            fails = {k: v for k, v in fails.items() if k not in redone} | dict(r.get("failures", {}))
        last["failures"] = fails
        merged["timings"] = last
        (dst / "record.json").write_text(json.dumps(last, indent=2, default=str))
    from .data import atomic_write_bytes

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
    r.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="a chapter parameter (papermill)")
    r.add_argument("-c", "--config", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="any other config field for every chapter and finetune (e.g. kl_lambda 0.66)")
    p = sub.add_parser("pack", help="pack an existing run directory")
    p.add_argument("run_dir")
    p.add_argument("dest")
    m = sub.add_parser("merge", help="fold a run of some chapters into a run of record")
    m.add_argument("src")
    m.add_argument("dst")
    from .cli import add_debug_flag, run as run_cli

    for sp in (r, p, m):
        add_debug_flag(sp)
    a = ap.parse_args(argv)
    return run_cli(lambda: _main(a), debug=a.debug)


def _main(a) -> int:
    if a.cmd == "merge":
        merge(a.src, a.dst)
        print(f"merged {a.src} into {a.dst}")
        return 0
    if a.cmd == "run":
        params = book._parse_params(a.param)
        if a.model:
            params["model"] = a.model
        summary = run(a.profile, a.run_dir, params, a.workers, a.chapters, a.parallel_chapters, a.pack,
                      book._parse_params(a.config))
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
