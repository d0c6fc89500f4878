"""Execute the chapters with papermill and build the Jupyter Book.

    python -m emlib.book build [--profile auto|smoke|quick|paper] [--run-dir runs/book] [--chapters 01 02]
    python -m emlib.book run notebooks/01_em_emerges.py OUT.ipynb -p profile smoke -p run_dir runs/x [--timeout S]
    python -m emlib.book pair          # rewrite notebooks/*.ipynb from the jupytext sources
    python -m emlib.book site --record record/smollm2-135m   # the published book: a run of record, rendered

The chapters live as jupytext ``py:percent`` files in ``notebooks/``. papermill cannot read ``.py``,
so each is turned into a notebook in memory (:func:`read_py_notebook`), parameterised and executed with the
``python3`` kernel by :mod:`emlib.runner`: a chapter takes ``profile`` and ``config`` (a dict of config fields);
``-p NAME VALUE`` with a config field (``-p n_train 64``, ``-p run_dir runs/x``) goes into ``config``, and an
unknown name or a bad value is an error before the kernel starts. ``build`` writes executed notebooks under ``RUN_DIR/executed/`` (never
over the committed results of record), stages a copy of the book sources with them in
``_build/site`` and renders it to ``_build/html`` with warnings as errors.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

KERNEL = "python3"
# the kernel's own log: errors only (ipykernel warns on every start that its local TCP sockets are not
# encrypted, a line on stderr that would bury a failed run's one-line message)
KERNEL_ARGS = ["--IPKernelApp.log_level=ERROR"]
BOOK_FILES = ("_config.yml", "_toc.yml", "references.bib")


def repo_root(start: Path | None = None) -> Path:
    p = (start or Path.cwd()).resolve()
    for q in (p, *p.parents):
        if (q / "_toc.yml").exists() and (q / "notebooks").is_dir():
            return q
    raise FileNotFoundError("Run this from the book's repository (a folder with _toc.yml and notebooks/).")


def chapter_sources(root: Path | None = None) -> list[Path]:
    root = root or repo_root()
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.py"))


def read_py_notebook(path: str | Path):
    """A jupytext ``py:percent`` file as an nbformat notebook with the python3 kernelspec."""
    import jupytext

    nb = jupytext.read(str(path))
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.metadata.setdefault("language_info", {"name": "python"})
    return nb


def parameter_defaults(nb) -> dict[str, str]:
    """Names assigned in the cell tagged ``parameters`` -> their default's source text."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            tree = ast.parse(cell.source)
            out = {}
            for node in tree.body:
                if isinstance(node, ast.Assign):
                    for t in node.targets:
                        if isinstance(t, ast.Name):
                            out[t.id] = ast.get_source_segment(cell.source, node.value)
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    out[node.target.id] = ast.get_source_segment(cell.source, node.value)
            return out
    raise ValueError("The notebook has no cell tagged 'parameters'.")


# Seconds a kernel may take to start (papermill's default is 60). A kernel imports torch and transformers
# from source when bytecode is not cached; four such starts at once on two cores (a sweep's workers) took
# over 60 s in CI, which failed a chapter that would have run.
KERNEL_START_TIMEOUT = 300


def pair(root: Path | None = None) -> list[Path]:
    """Write the unexecuted ``.ipynb`` twin of every chapter source (what Colab opens)."""
    import jupytext

    out = []
    for src in chapter_sources(root):
        nb = read_py_notebook(src)
        dst = src.with_suffix(".ipynb")
        jupytext.write(nb, str(dst), fmt="ipynb")
        out.append(dst)
    return out


def stage_site(root: Path, executed: dict[str, Path], site: Path) -> Path:
    """Copy the book sources and the executed chapters into ``site`` (replacing it)."""
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    for f in BOOK_FILES:
        if (root / f).exists():
            shutil.copy2(root / f, site / f)
    shutil.copytree(root / "book", site / "book")
    (site / "notebooks").mkdir()
    for stem, path in executed.items():
        _write_for_site(path, site / "notebooks" / f"{stem}.ipynb")
    return site


def _write_for_site(src: Path, dst: Path, note: str | None = None) -> None:
    """Copy an executed chapter, hiding papermill's injected-parameters cell (it holds local paths)
    and folding the parameters cell (readers see the defaults, the run's values are printed below).
    ``note``: markdown inserted after the first markdown cell (the title)."""
    import nbformat

    nb = nbformat.read(src, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
        elif "parameters" in tags and "hide-input" not in tags:
            tags.append("hide-input")
    if note is not None:
        first = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"), -1)
        nb.cells.insert(first + 1, nbformat.v4.new_markdown_cell(note))
    nbformat.write(nb, dst)


def render(site: Path, out_root: Path, warnings_as_errors: bool = True) -> Path:
    """``jupyter-book build`` (v1) of a staged site; returns the path of index.html."""
    exe = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(site), "--path-output",
           str(out_root), "--keep-going"]
    if warnings_as_errors:
        cmd += ["-W", "-n"]
    env = dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"jupyter-book build failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    index = out_root / "_build" / "html" / "index.html"
    if not index.exists():
        raise RuntimeError(f"jupyter-book reported success but wrote no {index}.")
    return index


def build(profile: str = "auto", run_dir: str = "runs/book", root: Path | None = None,
          chapters: list[str] | None = None, extra: dict | None = None,
          warnings_as_errors: bool = True) -> dict:
    """Execute every chapter (or those named in ``chapters``: numbers, stems or paths) one after another and
    render the book. ``extra``: more parameters (config fields such as ``n_train``, or a chapter's own); every
    chapter's parameters are checked before the first one starts (:mod:`emlib.runner`)."""
    from . import runner
    from .data import atomic_write_bytes

    root = root or repo_root()
    run = Path(run_dir) if Path(run_dir).is_absolute() else root / run_dir
    jobs = runner.chapter_jobs(runner.select(chapters, root=root), {"profile": profile, **(extra or {})}, run, root)
    timings, executed = {}, {}
    for job in jobs:
        print(f"[book] executing {Path(job.source).name} (profile={profile}) ...", flush=True)
        timings[job.chapter] = round(runner.run_job(job, raise_failure=True)["wall_s"], 1)
        executed[job.chapter] = Path(job.notebook)
        print(f"[book] {Path(job.source).name} done in {timings[job.chapter]} s", flush=True)
    t0 = time.perf_counter()
    site = stage_site(root, executed, root / "_build" / "site")
    index = render(site, root, warnings_as_errors)
    timings["render"] = round(time.perf_counter() - t0, 1)
    summary = {"profile": profile, "run_dir": str(run), "index": str(index), "seconds": timings}
    atomic_write_bytes(run / "book_build.json", json.dumps(summary, indent=2).encode("utf-8"))
    print(f"[book] built {index} ({timings})", flush=True)
    return summary


def site(record: str | Path = "record/smollm2-135m", root: Path | None = None,
         warnings_as_errors: bool = True, others: list[tuple[str, str | Path]] | None = None) -> Path:
    """Render the book from a run of record's executed notebooks (committed under ``record/``), executing
    nothing: the published book. Chapters missing from the record are an error.

    ``others``: (label, run dir) of further models' runs of record, each shown as an extra part of the
    book ("Second model: LABEL") with its executed chapters; default: the other models of
    :data:`emlib.results.RECORDS`. Pass ``[]`` for the main record alone."""
    root = root or repo_root()
    executed = _record_chapters(root, record)
    if others is None:
        from .results import RECORDS

        main = (Path(record) if Path(record).is_absolute() else root / record).resolve()
        others = [(label, d) for label, d, _ in RECORDS if (root / d).resolve() != main and (root / d).is_dir()]
    staged = stage_site(root, executed, root / "_build" / "site")
    for label, d in others:
        chapters = {k: v for k, v in _record_chapters(root, d).items() if not k.startswith("00")}
        _stage_second_model(staged, label, Path(d).name, chapters)
    return render(staged, root, warnings_as_errors)


def _record_chapters(root: Path, record: str | Path) -> dict[str, Path]:
    rec = Path(record) if Path(record).is_absolute() else root / record
    executed = {}
    for src in chapter_sources(root):
        nb = rec / "executed" / f"{src.stem}.ipynb"
        if not nb.exists():
            raise FileNotFoundError(f"{nb} is missing: a run of record must hold every chapter "
                                    "(python -m emlib.record run ...).")
        executed[src.stem] = nb
    return executed


def _stage_second_model(site: Path, label: str, name: str, executed: dict[str, Path]) -> None:
    """Add another model's executed chapters to a staged site as a part of its own (a folder one level
    deep, so the chapters' relative links such as ``../book/results`` still resolve)."""
    import re

    import yaml

    slug = "model_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")  # no dots in a document name
    (site / slug).mkdir()
    note = (f"```{{note}}\nThis page is the run of record of **{label}**: the same chapter as in the main "
            "part of the book, executed on that model (see the results page for its verdicts).\n```")
    files = []
    for stem, path in executed.items():
        _write_for_site(path, site / slug / f"{stem}.ipynb", note=note)
        files.append({"file": f"{slug}/{stem}"})
    toc_path = site / "_toc.yml"
    toc = yaml.safe_load(toc_path.read_text())
    toc["parts"].append({"caption": f"Second model: {label}", "chapters": files})
    toc_path.write_text(yaml.safe_dump(toc, sort_keys=False))


def executed_with(start_time: float | None = None, save: str | Path | None = None) -> "object":
    """The 'last executed with' table: package versions, device, date, the chapter's wall time and where it
    went (:mod:`emlib.timing`: seconds in each phase this process timed, and the rest). ``save``: also write
    the phases as JSON there (a run directory's ``logs/phases/<chapter>.json``, read by
    ``bench/record_phases.py``)."""
    import importlib.metadata as md

    import pandas as pd
    import torch

    from . import timing

    rows = {"date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "python": platform.python_version()}
    for pkg in ("emlib", "torch", "transformers", "peft", "nnsight", "pandas", "seaborn"):
        try:
            rows[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            rows[pkg] = "not installed"
    rows["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    wall = None if start_time is None else time.time() - start_time
    if wall is not None:
        rows["wall time (s)"] = f"{wall:.0f}"
    spent = timing.summary(wall)
    for name, secs in spent.items():
        if name != "wall" and secs >= 0.5:
            rows[f"  of which {name} (s)"] = f"{secs:.0f}"
    if save is not None:
        timing.save(save, wall)
    return pd.DataFrame({"value": rows}).rename_axis("what")


def _parse_params(pairs: list[list[str]] | None) -> dict:
    out = {}
    for k, v in pairs or []:
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emlib.book", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="execute all chapters and render the HTML book")
    b.add_argument("--profile", default="auto")
    b.add_argument("--run-dir", default="runs/book")
    b.add_argument("--chapters", nargs="*")
    b.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"))
    r = sub.add_parser("run", help="execute one chapter")
    r.add_argument("source")
    r.add_argument("output")
    r.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"))
    r.add_argument("--timeout", type=int, default=None, help="seconds a cell may run (default: no limit)")
    pa = sub.add_parser("pair", help="rewrite notebooks/*.ipynb from the .py sources")
    s = sub.add_parser("site", help="render the book from a run of record (no execution)")
    s.add_argument("--record", default="record/smollm2-135m")
    s.add_argument("--main-only", action="store_true", help="leave out the other models' runs of record")
    from .cli import add_debug_flag, run

    for p in (b, r, pa, s):
        add_debug_flag(p)
    a = ap.parse_args(argv)
    return run(lambda: _main(a), debug=a.debug)


def _main(a) -> int:
    if a.cmd == "build":
        build(a.profile, a.run_dir, chapters=a.chapters, extra=_parse_params(a.param))
    elif a.cmd == "run":
        from . import runner

        src = runner.resolve(a.source)
        job = runner.Job(source=str(src), parameters=runner.chapter_parameters(src, _parse_params(a.param)),
                         notebook=a.output, cwd=str(runner.default_cwd()), timeout=a.timeout)
        runner.run_job(job, raise_failure=True)
    elif a.cmd == "site":
        print(site(a.record, others=[] if a.main_only else None))
    elif a.cmd == "pair":
        for p in pair():
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
