"""One runner for chapters: which chapters, with which parameters, executed by papermill into which notebook,
with its log and wall time; and the pool of worker processes (one per core or GPU) that sweeps share.

``emlib.book build`` (every chapter, one after another), ``emlib.batch`` (a grid of parameters, a pool of
workers) and ``emlib.record`` (finetunes in a pool, then each chapter in its own process) are thin callers:

* :func:`select` / :func:`resolve`: chapters by number (``"01"``, ``1``), stem (``"01_em_emerges"``) or path;
  a name that is none of these is one clear error listing the chapters there are.
* :func:`chapter_parameters`: what papermill gets. A chapter takes ``profile``, ``config`` (a dict of any
  :class:`emlib.config.Config` field) and maybe a few of its own (``interactive``); the callers pass config
  fields at top level (a grid file's ``seed: [0, 1]``, ``-p n_train 64``, a run directory) and they are folded
  into ``config``. Every name and value is checked before any kernel starts (an unknown name, a wrong type or
  value: one :class:`~emlib.config.ConfigError` naming the chapter and the value). Nothing goes through the
  environment: a kernel, a worker and a finetune get their whole configuration as arguments.
* :class:`Job` (a chapter, its papermill parameters, its output notebook, its log) and :func:`run_job`
  (papermill with :data:`emlib.book.KERNEL_START_TIMEOUT`, the wall time, a failure as fields and as one line).
* :func:`spawn`: a job in a process of its own that dies with this one (:mod:`emlib.lifeline`), its output
  in the job's log. :func:`process_pool` / :func:`worker_plan`: worker processes that die with this one, each
  with its GPU (``CUDA_VISIBLE_DEVICES``) or its share of the cores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import book, lifeline

CONFIG = "config"  # the chapter parameter that holds every Config field as a dict
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# --------------------------------------------------------------------------------------- selection
def resolve(name: str | int | Path, base: str | Path | None = None, root: Path | None = None) -> Path:
    """A chapter number (``"01"``, ``1``), stem (``"01_em_emerges"``) or file path -> the chapter source file.

    Numbers and stems are looked up in the book's ``notebooks/`` (``root``; default: the repository of the
    current folder, else of ``base``); a relative path is tried from the current folder, ``base`` and ``root``."""
    text = f"{name:02d}" if isinstance(name, int) else str(name)
    if re.fullmatch(r"\d{1,2}|\d\d_\w+", text):  # a number or a stem (a file name has a dot)
        root = root or _find_root(base)
        sources = book.chapter_sources(root)
        hits = [p for p in sources if p.name[:2] == text.zfill(2)] if text.isdigit() else \
            [p for p in sources if p.stem == text]
        if not hits:
            have = ", ".join(p.stem for p in sources)
            raise FileNotFoundError(f"No chapter {text!r} in {root / 'notebooks'}: give a number, a stem or a path "
                                    f"(the chapters are {have}).")
        return hits[0]
    p = Path(text).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + [Path(b) / p for b in (base, root) if b]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise FileNotFoundError(f"{text}: no such chapter file (looked at {', '.join(map(str, candidates))}): give a "
                            "notebooks/NN_*.py path (or an .ipynb), or a chapter number like \"01\".")


def select(names: Iterable[str | int | Path] | None = None, base: str | Path | None = None,
           root: Path | None = None) -> list[Path]:
    """The chapters named (in that order, each once), or every chapter of the book when ``names`` is empty."""
    names = list(names or [])
    if not names:
        return book.chapter_sources(root or _find_root(base))
    return list(dict.fromkeys(resolve(n, base, root) for n in names))


def _find_root(base: str | Path | None = None) -> Path:
    """The book's repository: from the current folder, else from ``base`` (e.g. a grid file's folder)."""
    try:
        return book.repo_root()
    except FileNotFoundError as err:
        if base is not None:
            try:
                return book.repo_root(Path(base))
            except FileNotFoundError:
                pass
        raise FileNotFoundError(f"A chapter given by number or stem needs the book's repository: {err}") from None


def default_cwd(base: str | Path | None = None) -> Path:
    """Where kernels run: the book's repository (from here, else from ``base``), else the current folder."""
    try:
        return _find_root(base)
    except FileNotFoundError:
        return Path.cwd()


# --------------------------------------------------------------------------------------- parameters
def chapter_defaults(source: str | Path) -> dict[str, str]:
    """The chapter's parameters -> their default's source text (its cell tagged ``parameters``)."""
    source = Path(source)
    if source.suffix == ".py":
        return book.parameter_defaults(book.read_py_notebook(source))
    import nbformat

    return book.parameter_defaults(nbformat.read(source, as_version=4))


def takes(known: dict[str, str], name: str) -> bool:
    """Whether a chapter with parameters ``known`` takes ``name``: as its own parameter, or inside ``config``."""
    from .config import FIELDS

    return name in known or (CONFIG in known and name in FIELDS and name != "profile")


def taken(known: dict[str, str], params: dict) -> dict:
    """The part of ``params`` a chapter takes, with ``interactive=False`` where it has that parameter (runs
    from a script show the static version of a widget)."""
    out = {k: v for k, v in params.items() if takes(known, k)}
    if "interactive" in known:
        out.setdefault("interactive", False)
    return out


def chapter_parameters(source: str | Path, params: dict, known: dict[str, str] | None = None) -> dict:
    """papermill's parameters for one chapter, checked: config fields given at top level go into ``config``
    (a ``config`` given as well is the base they are laid over); a name the chapter does not take, an unknown
    config field or a bad value is a :class:`~emlib.config.ConfigError` naming the chapter file.

    ``params``: e.g. ``{"profile": "smoke", "seed": 1, "run_dir": "runs/x"}`` ->
    ``{"profile": "smoke", "config": {"seed": 1, "run_dir": "runs/x"}}``."""
    from .config import FIELDS, ConfigError, check_params

    source = Path(source)
    known = chapter_defaults(source) if known is None else known
    unknown = sorted(k for k in params if not takes(known, k))
    if unknown:
        inside = f", and inside {CONFIG} any of {', '.join(sorted(FIELDS - {'profile'}))}" if CONFIG in known else ""
        raise ConfigError(f"{source.name}: unknown parameter(s) {', '.join(unknown)}; this chapter takes "
                          f"{', '.join(sorted(known))}{inside}.")
    direct = {k: v for k, v in params.items() if k in known and k != CONFIG}
    if CONFIG in known:
        fields = {**_config_dict(params.get(CONFIG)), **{k: v for k, v in params.items() if k not in known}}
        bad = sorted(set(fields) - FIELDS - {"profile"}) + (["profile"] if "profile" in fields else [])
        if bad:
            raise ConfigError(f"{source.name}: unknown config field(s) {', '.join(bad)} in {CONFIG} (profile is a "
                              f"parameter of its own); the fields are {', '.join(sorted(FIELDS - {'profile'}))}.")
        direct[CONFIG] = _plain(fields)
    if "profile" in known:
        profile = direct.get("profile", _literal(known["profile"], "auto"))
        try:
            check_params(profile, {**direct.get(CONFIG, {}), **{k: v for k, v in direct.items() if k in FIELDS}})
        except ConfigError as e:
            raise ConfigError(f"{source.name}: {e}") from None
    return {k: _plain(v) for k, v in direct.items()}


def _config_dict(value) -> dict:
    """A ``config`` parameter as given (a dict, its JSON text or None) -> a dict."""
    if value is None or isinstance(value, dict):
        return dict(value or {})
    from .experiment import parse_config  # the chapters' own reading of it (a JSON text, or an error)

    return parse_config(value)


def _plain(value):
    """What papermill can write into a notebook: tuples -> lists, paths -> text (JSON types only)."""
    return json.loads(json.dumps(value, default=str))


def _literal(text: str, fallback):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return fallback


def parameters_for(known: dict[Path, dict[str, str]], params: dict) -> dict[Path, dict]:
    """Each chapter's share of ``params`` (:func:`taken`; ``known``: chapter -> its parameters), unchecked; a
    name that no chapter takes is an error (one that only some take goes to those)."""
    nowhere = sorted(k for k in params if not any(takes(kn, k) for kn in known.values()))
    if nowhere:
        from .config import ConfigError

        have = sorted(set().union(*known.values())) if known else []
        raise ConfigError(f"Parameter(s) {', '.join(nowhere)} are taken by none of the chapters "
                          f"({', '.join(s.name for s in known)}); they take {', '.join(have)}"
                          + (f" (and any config field inside {CONFIG})" if CONFIG in have else "") + ".")
    return {src: taken(kn, params) for src, kn in known.items()}


# --------------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    """One chapter run: the source, papermill's (checked) parameters, the executed notebook, and optionally
    the log its process writes (:func:`spawn`), a time limit per cell (seconds) and the kernel's folder."""

    source: str
    parameters: dict
    notebook: str
    cwd: str
    log: str | None = None
    timeout: int | None = None
    env: tuple[tuple[str, str], ...] = ()  # environment variables its process gets on top of this one's (spawn)

    @property
    def chapter(self) -> str:
        return Path(self.source).stem


def chapter_jobs(sources: Sequence[Path], params: dict, run_dir: Path, cwd: Path, logs: bool = False,
                 timeout: int | None = None) -> list[Job]:
    """One job per chapter, all checked before any runs: ``params`` (profile, config fields, the chapters' own
    parameters) with ``run_dir`` in every chapter's config, notebooks in ``run_dir/executed/``, logs (with
    ``logs``) in ``run_dir/logs/``."""
    known = {src: chapter_defaults(src) for src in sources}
    share = parameters_for(known, {**params, "run_dir": str(run_dir)})
    return [Job(source=str(src), parameters=chapter_parameters(src, p, known[src]), cwd=str(cwd), timeout=timeout,
                notebook=str(run_dir / "executed" / f"{src.stem}.ipynb"),
                log=str(run_dir / "logs" / f"{src.stem}.log") if logs else None)
            for src, p in share.items()]


def execute(job: Job):
    """Run the job's chapter with papermill (raises papermill's ``PapermillExecutionError`` for a failing cell,
    its own errors for a dead kernel or a timeout)."""
    import nbformat
    import papermill as pm

    source = Path(job.source)
    nb = book.read_py_notebook(source) if source.suffix == ".py" else nbformat.read(source, as_version=4)
    Path(job.notebook).parent.mkdir(parents=True, exist_ok=True)
    return pm.execute_notebook(nb, str(job.notebook), parameters=dict(job.parameters), kernel_name=book.KERNEL,
                               cwd=job.cwd, progress_bar=False, log_output=False, execution_timeout=job.timeout,
                               start_timeout=book.KERNEL_START_TIMEOUT, extra_arguments=book.KERNEL_ARGS)


def run_job(job: Job, raise_failure: bool = False) -> dict:
    """Execute ``job``; returns ``status`` ("ok" | "failed"), ``wall_s``, ``finished`` and the error fields of
    :func:`error_fields` (None when it ran). With ``raise_failure`` a failure is raised instead, as a
    :class:`emlib.cli.ChapterFailed` of one line (:func:`failure_message`) whose cause is papermill's error."""
    t0 = time.perf_counter()
    fields = dict.fromkeys(("error", "error_cell", "error_source", "traceback"))
    try:
        execute(job)
        status = "ok"
    except Exception as exc:  # a failing cell, a timeout, a dead kernel
        if raise_failure:
            from .cli import ChapterFailed

            raise ChapterFailed(failure_message(job, exc)) from exc
        status, fields = "failed", error_fields(exc)
    return {"status": status, "wall_s": round(time.perf_counter() - t0, 2), **fields, "finished": now()}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def error_fields(exc: BaseException) -> dict:
    """``error`` (one line), ``error_cell`` (the failing cell's execution count: ``In [n]`` in the executed
    notebook, ``Cell In[n]`` in the traceback), ``error_source`` and ``traceback`` of a failure."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        tb = _ANSI.sub("", "\n".join(exc.traceback or []))
        return {"error": f"{exc.ename}: {exc.evalue}"[:500], "error_cell": exc.exec_count,
                "error_source": exc.source, "traceback": tb}
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"error": f"{type(exc).__name__}: {exc}"[:500], "error_cell": None, "error_source": None,
            "traceback": _ANSI.sub("", tb)}


def failure_message(job: Job, exc: BaseException) -> str:
    """A failed chapter in one line: the chapter, the cell, the chapter's own message (the last line of the
    cell's traceback) and where the partly executed notebook is."""
    from .cli import chapter_message, squash

    msg = chapter_message(exc)
    if msg is None:  # a dead kernel, a timeout: papermill's own message
        msg = squash(str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
    cell = getattr(exc, "exec_count", None)
    where = f" in cell In[{cell}]" if cell is not None else ""
    return (f"{Path(job.source).name} failed{where}: {msg} (the executed notebook {job.notebook} shows the cell; "
            "fix the cause and run again, or add --debug for the traceback)")


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what sets torch's (and BLAS's) CPU threads at import


def thread_env(threads: int | None, env: dict | None = None) -> dict:
    """``env`` (default: this process's) with ``threads`` CPU threads for a child's torch and BLAS, unless the
    environment already sets them (a user's choice wins). None: ``env`` unchanged."""
    env = dict(os.environ if env is None else env)
    if threads:
        for var in THREAD_VARS:
            env.setdefault(var, str(threads))
    return env


def threads_per_process(processes: int, cores: int | None = None, floor: int = 2) -> int:
    """CPU threads for each of ``processes`` GPU processes sharing this machine's cores: ``cores // processes``,
    at least ``floor``. By default each torch process starts a thread per core, so a dozen GPU processes on
    16 cores would keep ~200 threads for the moments they compute on the CPU, while each needs one core free to
    launch its kernels."""
    cores = cores or os.cpu_count() or 1
    return max(floor, cores // max(1, processes))


def spawn(job: Job, threads: int | None = None) -> subprocess.Popen:
    """Start ``job`` in a process of its own (``python -m emlib.book run``, with ``--debug`` so that the log
    keeps the traceback above the one-line error), its output in ``job.log``. The process and its kernel stop
    when this process dies (:mod:`emlib.lifeline`). ``threads``: CPU threads of its torch (:func:`thread_env`);
    ``job.env``'s variables are added to this process's environment."""
    if not job.log:
        raise ValueError(f"{job.chapter}: a spawned chapter needs a log file (Job.log).")
    cmd = [sys.executable, "-m", "emlib.lifeline", str(os.getpid()), "emlib.book", "run", job.source, job.notebook,
           "--debug"]
    for k, v in job.parameters.items():
        cmd += ["-p", k, json.dumps(v)]
    if job.timeout:
        cmd += ["--timeout", str(job.timeout)]
    log = Path(job.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=job.cwd,
                                env=thread_env(threads, {**os.environ, **dict(job.env)}))


# ---------------------------------------------------------------------------------------------- pool
def _nvidia_smi(fields: str) -> str | None:
    """``nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits``'s table, or None (no ``nvidia-smi``,
    or it failed)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    table = _nvidia_smi("index") or ""
    return [line.strip() for line in table.splitlines() if line.strip().isdigit()]


def gpu_free_gib() -> float | None:
    """Free memory (GiB) of the fullest GPU this process may use, from ``nvidia-smi`` (None: no GPU, or it
    cannot tell). Other processes' memory counts too: what a new process could still allocate."""
    table = _nvidia_smi("index,uuid,memory.total,memory.used")
    return None if table is None else free_gib_of(table, os.environ.get("CUDA_VISIBLE_DEVICES"))


def free_gib_of(table: str, visible: str | None = None) -> float | None:
    """The least free memory (GiB) among the GPUs of ``nvidia-smi --query-gpu=index,uuid,memory.total,
    memory.used --format=csv,noheader,nounits`` (MiB) that ``visible`` (``CUDA_VISIBLE_DEVICES``: indices or
    UUIDs, also shortened ones) lets this process use; None when none is listed."""
    want = None if visible is None else [g.strip() for g in visible.split(",") if g.strip()]
    free = []
    for line in table.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) != 4 or not all(x.replace(".", "", 1).isdigit() for x in (parts[0], *parts[2:])):
            continue
        index, uuid, total, used = parts
        if want is None or any(w == index or (w.startswith("GPU-") and uuid.startswith(w)) for w in want):
            free.append((float(total) - float(used)) / 1024)
    return min(free) if free else None


def worker_plan(n_jobs: int, workers: int | None = None, gpus: list[str] | None = None,
                cores: int | None = None) -> tuple[int, list[str | None], int | None]:
    """(number of workers, the GPU each worker sees (None: no GPU), threads per worker (None: leave)).

    With GPUs: one worker per GPU by default (more workers share GPUs round-robin). Without: one worker per
    core at most (default: as many as cores), each with ``cores // workers`` threads."""
    cores = cores or os.cpu_count() or 1
    gpus = visible_gpus() if gpus is None else list(gpus)
    if gpus:
        n = max(1, min(workers or len(gpus), n_jobs))
        return n, [gpus[i % len(gpus)] for i in range(n)], None
    n = workers or cores
    if n > cores:
        print(f"[runner] {n} workers asked for on {cores} cores: using {cores} (CPU jobs are core-bound).",
              file=sys.stderr)
        n = cores
    n = max(1, min(n, n_jobs))
    return n, [None] * n, max(1, cores // n)


def process_pool(workers: int, gpu_of: Sequence[str | None] | None = None,
                 threads: int | None = None, warm: Callable[[], object] | None = None,
                 env: dict[str, str] | None = None) -> ProcessPoolExecutor:
    """``workers`` spawned, long-lived processes that die with this one (:func:`emlib.lifeline.die_with_parent`:
    a killed parent leaves no worker running queued jobs). ``gpu_of``: the GPU each worker sees
    (``worker_plan``); ``threads``: OMP/MKL threads per worker; ``warm``: a module-level function each worker
    calls once as it starts (imports, a CUDA context: :func:`start_workers` starts them all before any job);
    ``env``: variables each worker sets before ``warm`` (so before its CUDA context: e.g. an MPS priority).
    A job that holds GPU memory gives it back itself (``emlib.record.worker_experiment``)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork after CUDA / threads in the parent
    gpus = [g for g in (gpu_of or []) if g is not None]
    slots = None
    if gpus:
        slots = ctx.Queue()
        for g in gpus:
            slots.put(g)
    return ProcessPoolExecutor(max(1, workers), mp_context=ctx, initializer=_init_worker,
                               initargs=(os.getpid(), slots, threads, warm, dict(env or {})))


def _init_worker(parent: int, slots, threads: int | None, warm: Callable[[], object] | None = None,
                 env: dict[str, str] | None = None) -> None:
    lifeline.die_with_parent(parent)
    if slots is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(slots.get())
    os.environ.update(thread_env(threads))
    os.environ.update(env or {})
    if warm is not None:
        warm()


def start_workers(pool: ProcessPoolExecutor, workers: int) -> None:
    """Start ``pool``'s ``workers`` processes now rather than at their first jobs (a spawn-context pool starts
    one per submitted job, as it is needed): one empty job each, not waited for. Their start-up (the
    interpreter, imports, ``process_pool``'s ``warm``) then overlaps whatever the parent does next."""
    for _ in range(max(1, workers)):
        pool.submit(int)  # int() -> 0: picklable, does nothing


# ---------------------------------------------------------------------------------------------- MPS
MPS_CONTROL = "nvidia-cuda-mps-control"


@contextmanager
def environ(values: dict[str, str]):
    """While active, ``values`` are set in ``os.environ`` (so every process started meanwhile inherits them);
    on the way out each name is restored as it was, or removed where it was not set."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def mps_daemon(enabled: bool = True):
    """While active, an NVIDIA MPS control daemon of this run's own serves the GPU, so the kernels of the
    run's processes (finetune workers, chapters) run side by side instead of taking turns on the GPU. Without
    MPS, processes sharing one GPU are time-sliced: each small-model process leaves most of the GPU idle while
    it holds it. The daemon's pipe and log folders are a fresh temporary folder, exported to every child
    through ``CUDA_MPS_PIPE_DIRECTORY`` / ``CUDA_MPS_LOG_DIRECTORY``; it is stopped (``quit``) on the way out,
    and nothing else about the GPU changes. Yields a short status: "on", or why it is off (no
    ``nvidia-cuda-mps-control`` on PATH, the daemon would not start, not asked for). Enter it before this
    process touches CUDA."""
    import tempfile

    if not enabled:
        yield "off (not asked for)"
        return
    exe = shutil.which(MPS_CONTROL)
    if exe is None:
        yield f"off ({MPS_CONTROL} is not on PATH)"
        return
    folder = tempfile.mkdtemp(prefix="emlib-mps-")
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(Path(folder) / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(Path(folder) / "log")}
    for d in env.values():
        Path(d).mkdir(parents=True, exist_ok=True)
    started = subprocess.run([exe, "-d"], env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        yield f"off (the daemon did not start: {(started.stderr or started.stdout).strip()[:200]})"
        return
    with environ(env):
        try:
            yield "on"
        finally:
            # "quit" waits for the daemon's clients to go; this process is one once it has touched CUDA, so the
            # daemon may only stop when this process exits: ask, wait a little, and leave its folder if it is busy
            quit_ = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env={**os.environ, **env}, text=True)
            try:
                quit_.communicate("quit\n", timeout=10)
                shutil.rmtree(folder, ignore_errors=True)
            except subprocess.TimeoutExpired:
                pass  # the request stands; the daemon stops when this process's CUDA context goes
