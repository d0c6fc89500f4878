"""Execute the chapters with papermill and build the Jupyter Book.

    python -m emlib.book build [--profile auto|smoke|quick|paper] [--run-dir runs/book] [--chapters 01 02]
    python -m emlib.book run notebooks/01_em_emerges.py OUT.ipynb -p profile smoke -p run_dir runs/x
    python -m emlib.book pair          # rewrite notebooks/*.ipynb from the jupytext sources
    python -m emlib.book site --record record/smollm2-135m   # the published book: a run of record, rendered

The chapters live as jupytext ``py:percent`` files in ``notebooks/``. papermill cannot read ``.py``,
so each is turned into a notebook in memory, parameterised (unknown names are an error) and executed
with the ``python3`` kernel. ``build`` writes executed notebooks under ``RUN_DIR/executed/`` (never
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


def execute(source: str | Path, output: str | Path, parameters: dict | None = None,
            cwd: str | Path | None = None, timeout: int | None = None, log_output: bool = False):
    """Execute a chapter (``.py`` or ``.ipynb``) with papermill.

    Checked before the kernel starts (nothing is written then): the file exists, every parameter is one the
    chapter takes, and the config fields among them have valid types and values (:func:`check_parameters`);
    each is a :class:`~emlib.config.ConfigError` (a TypeError and a ValueError) naming the value at fault.
    A failing cell raises papermill's ``PapermillExecutionError`` (``ename``, ``evalue``, ``exec_count``)."""
    import nbformat
    import papermill as pm

    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such chapter file: pass a notebooks/NN_*.py source (or an .ipynb).")
    nb = read_py_notebook(source) if source.suffix == ".py" else nbformat.read(source, as_version=4)
    parameters = dict(parameters or {})
    known = parameter_defaults(nb)
    check_parameters(source, known, parameters)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    return pm.execute_notebook(nb, str(output), parameters=parameters, kernel_name=KERNEL,
                               cwd=str(cwd) if cwd else None, progress_bar=False,
                               log_output=log_output, execution_timeout=timeout,
                               start_timeout=KERNEL_START_TIMEOUT, extra_arguments=KERNEL_ARGS)


# Seconds a kernel may take to start (papermill's default is 60). A kernel imports torch and transformers
# from source when bytecode is not cached; four such starts at once on two cores (a sweep's workers) took
# over 60 s in CI, which failed a chapter that would have run.
KERNEL_START_TIMEOUT = 300


def check_parameters(source: Path, known: dict[str, str], parameters: dict) -> None:
    """Unknown names, and (for a chapter that takes ``profile``) the config fields' types and values."""
    from .config import ConfigError, check_params

    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise ConfigError(f"{source.name}: unknown parameter(s) {', '.join(unknown)}; "
                          f"this chapter takes {', '.join(sorted(known))}.")
    if "profile" not in known:
        return
    profile = parameters.get("profile")
    if profile is None:
        try:
            profile = ast.literal_eval(known["profile"])
        except (ValueError, SyntaxError):
            profile = "auto"
    try:
        check_params(profile, parameters)
    except ConfigError as e:
        raise ConfigError(f"{source.name}: {e}") from None


def chapter_failed(source: str | Path, output: str | Path, exc: BaseException) -> Exception:
    """A papermill cell failure as one readable error: the chapter, the cell, the chapter's own message (the
    last line of the cell's traceback) and where the partly executed notebook is."""
    from .cli import ChapterFailed, chapter_message

    msg = chapter_message(exc)
    if msg is None:  # a dead kernel, a timeout: papermill's own message
        from .cli import squash

        msg = squash(str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
    cell = getattr(exc, "exec_count", None)
    where = f" in cell In[{cell}]" if cell is not None else ""
    return ChapterFailed(f"{Path(source).name} failed{where}: {msg} (the executed notebook {output} shows the cell; "
                         "fix the cause and run again, or add --debug for the traceback)")


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
    """Execute every chapter (or those whose number is in ``chapters``) and render the book."""
    root = root or repo_root()
    run = Path(run_dir) if Path(run_dir).is_absolute() else root / run_dir
    timings, executed = {}, {}
    for src in chapter_sources(root):
        if chapters and src.name[:2] not in chapters:
            continue
        out = run / "executed" / f"{src.stem}.ipynb"
        t0 = time.perf_counter()
        print(f"[book] executing {src.name} (profile={profile}) ...", flush=True)
        known = parameter_defaults(read_py_notebook(src))
        params = {"profile": profile, "run_dir": str(run)} | (extra or {})
        if "interactive" in known:  # batch runs show the static sweep, not a live widget
            params.setdefault("interactive", False)
        try:
            execute(src, out, params, cwd=root)
        except Exception as exc:
            if getattr(exc, "ename", None) is None:
                raise
            raise chapter_failed(src, out, exc) from exc
        timings[src.stem] = round(time.perf_counter() - t0, 1)
        executed[src.stem] = out
        print(f"[book] {src.name} done in {timings[src.stem]} s", flush=True)
    t0 = time.perf_counter()
    site = stage_site(root, executed, root / "_build" / "site")
    index = render(site, root, warnings_as_errors)
    timings["render"] = round(time.perf_counter() - t0, 1)
    summary = {"profile": profile, "run_dir": str(run), "index": str(index), "seconds": timings}
    (run / "book_build.json").write_text(json.dumps(summary, indent=2))
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


def executed_with(start_time: float | None = None) -> "object":
    """The 'last executed with' table: package versions, device, date and the chapter's wall time."""
    import importlib.metadata as md

    import pandas as pd
    import torch

    rows = {"date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "python": platform.python_version()}
    for pkg in ("emlib", "torch", "transformers", "peft", "nnsight", "pandas", "seaborn"):
        try:
            rows[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            rows[pkg] = "not installed"
    rows["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    if start_time is not None:
        rows["wall time (s)"] = f"{time.time() - start_time:.0f}"
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
        try:
            execute(a.source, a.output, _parse_params(a.param), cwd=repo_root())
        except Exception as exc:
            if getattr(exc, "ename", None) is None:  # not a failing cell
                raise
            raise chapter_failed(a.source, a.output, exc) from exc
    elif a.cmd == "site":
        print(site(a.record, others=[] if a.main_only else None))
    elif a.cmd == "pair":
        for p in pair():
            print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
