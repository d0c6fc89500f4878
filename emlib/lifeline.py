"""Worker processes that die with their parent.

A sweep (:mod:`emlib.batch`) or a run of record (:mod:`emlib.record`) starts worker processes
(:func:`emlib.runner.process_pool`) and chapter processes (:func:`emlib.runner.spawn`); when the
parent is killed (SIGKILL, an OOM kill, a closed SSH session) the workers used to live on: they kept running
queued jobs, wrote finished markers the parent never recorded, then idled forever, and a restart raced them.

:func:`die_with_parent` (a worker's first call, e.g. a process pool's ``initializer``) starts a daemon
thread that watches the parent: as soon as the process is no longer the child of ``parent_pid`` (POSIX: the
parent pid changes when the parent dies), it kills its own children's process groups (papermill kernels run
in their own sessions) and exits at once. Other processes are run through the same check with

    python -m emlib.lifeline PARENT_PID MODULE [ARGS...]     # runs `python -m MODULE ARGS...`

:func:`processes` reads the process table from ``/proc`` (Linux): what the tests use to check that nothing
outlives a killed parent.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

POLL_S = 0.25  # how often a worker checks that its parent is alive


def die_with_parent(parent_pid: int | None = None, interval: float = POLL_S) -> threading.Thread | None:
    """Exit this process (killing its children first) as soon as ``parent_pid`` stops being its parent.

    ``parent_pid`` defaults to the current parent; pass the parent's ``os.getpid()`` from the parent (a pool's
    ``initargs``) so that a parent that died before the worker got here is noticed too. Returns the watching
    thread (None where the platform gives no way to watch: not POSIX and not a multiprocessing child).
    """
    parent = os.getppid() if parent_pid is None else int(parent_pid)
    if os.name == "posix":
        if os.getppid() != parent:
            _die(parent)
        target, args = _poll_parent, (parent, interval)
    else:  # Windows: a multiprocessing child can wait on its parent's sentinel
        import multiprocessing as mp

        proc = mp.parent_process()
        if proc is None or proc.pid != parent:
            return None
        target, args = _wait_sentinel, (proc, parent)
    t = threading.Thread(target=target, args=args, name="emlib-lifeline", daemon=True)
    t.start()
    return t


def _poll_parent(parent: int, interval: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    _die(parent)


def _wait_sentinel(proc, parent: int) -> None:
    proc.join()
    _die(parent)


def _die(parent: int) -> None:
    try:
        print(f"[emlib] parent process {parent} is gone: stopping worker {os.getpid()} and its children",
              file=sys.stderr, flush=True)
    except (OSError, ValueError):  # the parent's terminal or pipe is gone too
        pass
    kill_children()
    os._exit(1)


def processes() -> list[dict]:
    """Every process as ``{"pid", "ppid", "pgid", "sid", "cmd"}`` (Linux ``/proc``; empty elsewhere)."""
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # it ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if fields[0] == "Z":  # a zombie has ended; only its parent's wait is missing
            continue
        out.append({"pid": int(name), "ppid": int(fields[1]), "pgid": int(fields[2]), "sid": int(fields[3]),
                    "cmd": cmd})
    return out


def descendants(pid: int, table: list[dict] | None = None) -> list[dict]:
    """The living descendants of ``pid`` (children, their children, ...)."""
    table = processes() if table is None else table
    found, seen, frontier = [], {pid}, {pid}
    while frontier:
        kids = [p for p in table if p["ppid"] in frontier and p["pid"] not in seen]
        found += kids
        frontier = {p["pid"] for p in kids}
        seen |= frontier
    return found


def session_tree(sid: int) -> list[dict]:
    """The living processes of session ``sid`` and all their descendants (a kernel starts its own session,
    and an orphan is re-parented, so neither is found from the session's leader alone)."""
    table = processes()
    members = [p for p in table if p["sid"] == sid]
    out = {p["pid"]: p for p in members}
    for p in members:
        out.update({d["pid"]: d for d in descendants(p["pid"], table)})
    return list(out.values())


def kill_children() -> None:
    """SIGKILL this process's children: a child that leads its own process group (a kernel started in a new
    session) is killed with its whole group."""
    me = os.getpid()
    for p in processes():
        if p["ppid"] != me:
            continue
        try:
            if p["pgid"] == p["pid"]:
                os.killpg(p["pid"], signal.SIGKILL)
            else:
                os.kill(p["pid"], signal.SIGKILL)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    """``python -m emlib.lifeline PARENT_PID MODULE [ARGS...]``: run a module as ``__main__`` while watching
    the parent."""
    import runpy

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python -m emlib.lifeline PARENT_PID MODULE [ARGS...]", file=sys.stderr)
        return 2
    die_with_parent(int(argv[0]))
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
