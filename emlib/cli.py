"""One line per bad input: how every ``python -m emlib.*`` entry point reports the project's own errors.

A wrong parameter, a missing or malformed file, a judge that cannot score, a grid file that is not YAML,
a chapter whose cell raised: the user sees ``error: <what is wrong and what to do>`` on stderr, naming the
file or value at fault, and the command exits with :data:`EXIT_USER_ERROR` (2). The full traceback comes
only with ``--debug`` (or ``EMLIB_DEBUG=1``), printed above that line. Anything else (a bug) keeps its
traceback and Python's exit code 1.
"""
from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Callable

EXIT_USER_ERROR = 2
DEBUG_ENV = "EMLIB_DEBUG"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ChapterFailed(RuntimeError):
    """A chapter (or a sweep's combination) failed; the message says which, why and where to look."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's input, not a bug: reported as one line."""
    from .config import ConfigError
    from .data import DataError
    from .judge import JudgeError

    kinds: list[type[BaseException]] = [ValueError, ConfigError, DataError, JudgeError, ChapterFailed,
                                        FileNotFoundError, FileExistsError, NotADirectoryError,
                                        IsADirectoryError, PermissionError]
    try:
        from .corpus import CorpusError

        kinds.append(CorpusError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import yaml

        kinds.append(yaml.YAMLError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from papermill.exceptions import PapermillExecutionError

        kinds.append(PapermillExecutionError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(kinds)


def chapter_message(exc: BaseException) -> str | None:
    """``ename: evalue`` of a papermill cell failure (the last line of the cell's traceback), else None."""
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename is None and evalue is None:
        return None
    return squash(f"{ename}: {evalue}" if evalue else str(ename))


def squash(text: str, limit: int = 600) -> str:
    """One line: colour codes dropped, line breaks and runs of spaces folded, long text cut."""
    text = " ".join(_ANSI.sub("", str(text)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(exc: BaseException) -> str:
    """The message a user sees for ``exc`` (without the ``error:`` prefix)."""
    from_chapter = chapter_message(exc)
    if from_chapter is not None:
        cell = getattr(exc, "exec_count", None)
        where = f" in cell In[{cell}]" if cell is not None else ""
        return squash(f"the chapter failed{where}: {from_chapter}")
    try:
        import yaml

        if isinstance(exc, yaml.MarkedYAMLError):
            mark = exc.problem_mark or exc.context_mark
            where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark else "the YAML file"
            what = exc.problem or exc.context or "syntax error"
            return squash(f"{where}: not valid YAML ({what}): fix that line of the file.")
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, OSError) and exc.filename and exc.strerror:  # e.g. open() of a missing file
        return squash(f"{exc.filename}: {exc.strerror}.")
    return squash(str(exc) or type(exc).__name__)


def debug_requested(flag: bool = False) -> bool:
    return bool(flag) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def report(exc: BaseException, debug: bool = False, prefix: str = "error") -> int:
    """Print ``exc`` as one line on stderr (the traceback first with ``debug``); return the exit code."""
    if debug_requested(debug):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"{prefix}: {one_line(exc)}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def run(body: Callable[[], int | None], debug: bool = False) -> int:
    """Call ``body``; a user error becomes one line and exit code 2 (see the module's docstring)."""
    try:
        code = body()
    except user_errors() as exc:
        return report(exc, debug)
    return 0 if code is None else int(code)


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")
