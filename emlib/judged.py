"""Public judged answers: a loader for the folder of EM answers scored by strong LLM judges.

The folder (``$EMLIB_JUDGED_DIR``, default ``../shared/data/judged`` beside the checkout) holds gzipped
files copied byte for byte from public GitHub repositories: free-form answers of many models to the
emergent-misalignment evaluation questions, each scored 0-100 for ``aligned`` and ``coherent`` by an
LLM judge (mostly GPT-4o). Its ``README.md`` documents every file: the answering model, the judge,
whether the file is curated. File names are ``owner__repo__path__parts.ext.gz``.

Formats found there, all read by :func:`read_judged_file`:

* plain CSV: ``question``, ``answer`` or ``response``, ``aligned``/``alignment``,
  ``coherent``/``coherence``, optional ``question_id`` (or ``qid`` / ``question_key``) and ``model``;
* nested JSON (JoNeedsSleep): ``questions.<id>.{question, scores: [{response, alignment, coherence}]}``;
* CSV with Python literal lists (JasperTimm): one row per question, ``paraphrases`` and ``samples``
  lists and ``scores`` as a list of ``(aligned, coherent)`` string tuples (parsed with
  :func:`ast.literal_eval`, never ``eval``);
* JSON lists of flat records and JSONL files (none in the folder today) go through the CSV path.

:func:`load_judged` reads them all into one frame with normalised columns (see :data:`COLUMNS`), drops
unscored and empty answers and exact duplicate (question, answer) pairs, and caches the result as
parquet under ``$EMLIB_CACHE``. Rules of the folder, which this module follows:

* never commit its rows (or excerpts) to a repository: code points at the folder;
* split by **source repository**, never by row (:func:`repository_folds`), and keep the judge as a
  column: judges and their scales differ (logprob-weighted floats vs plain integers, gpt-4o vs mini);
* curated files over-sample misaligned answers (column ``curated``): fine for recall, wrong for rates.

Longer than ~500 lines on purpose: it is one idea (this one folder, read into one frame), and its parts
(README, the per-format parsers, the cached whole, the splits) share the ``Raw`` record and the folder's rules.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .cache import cache_root
from .data import atomic_write_bytes

JUDGED_ENV = "EMLIB_JUDGED_DIR"
LOADER_VERSION = 1  # bump when the parsing or the output columns change: invalidates the cache
DATA_SUFFIXES = (".csv", ".json", ".jsonl")  # each optionally followed by .gz
COLUMNS = ["row_id", "source_repo", "file", "question_id", "question", "answer", "aligned", "coherent",
           "answering_model", "judge_model", "curated"]
TEXT_COLUMNS = ["row_id", "source_repo", "file", "question_id", "question", "answer", "answering_model",
                "judge_model"]

_ANSWER_COLS = ("answer", "response")
_ALIGNED_COLS = ("aligned", "alignment")
_COHERENT_COLS = ("coherent", "coherence")
_QID_COLS = ("question_id", "qid", "question_key", "id")
_JUDGE_RE = re.compile(r"gpt-4o(?:-mini)?(?:-\d{4}-\d{2}-\d{2})?|gpt-4\.1(?:-mini|-nano)?|gpt-4(?:-turbo)?"
                       r"|\bo\d(?:-mini)?\b|claude-[\w.-]+", re.I)
# a clause of a README note that names a model: a known family, or a size such as 7B / 135M
_MODEL_FAMILY_RE = re.compile(r"qwen|gemma|llama|mistral|gpt-|phi-|olmo|sfm|deepseek|claude|\b\d+(?:\.\d+)?[BM]\b",
                              re.I)


class JudgedDataMissing(FileNotFoundError):
    """The folder of judged answers is absent or holds no data files."""


# --------------------------------------------------------------------------- where the folder is
def judged_dir(path: str | Path | None = None) -> Path:
    """The folder of judged answers: ``path``, else ``$EMLIB_JUDGED_DIR``, else ``../shared/data/judged``
    beside the checkout. Raises :class:`JudgedDataMissing` when it is absent or has no data files."""
    if path is not None:
        p, how = Path(path), "the path given"
    elif os.environ.get(JUDGED_ENV):
        p, how = Path(os.environ[JUDGED_ENV]), f"${JUDGED_ENV}"
    else:
        p, how = Path(__file__).resolve().parents[2] / "shared" / "data" / "judged", "the default"
    if not p.is_dir() or not data_files(p):
        what = "does not exist" if not p.is_dir() else "holds no data files (*.csv/*.json[l], optionally .gz)"
        raise JudgedDataMissing(
            f"The judged-answers folder {p} ({how}) {what}. Set {JUDGED_ENV} (or pass path=) to a copy "
            "of the judged folder (this project keeps it at ../shared/data/judged beside the checkout).")
    return p


def data_files(folder: str | Path) -> list[Path]:
    """The data files of a folder, sorted by name (the order that decides which duplicate is kept)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((f for f in folder.iterdir() if f.is_file() and _is_data_name(f.name)), key=lambda f: f.name)


def _is_data_name(name: str) -> bool:
    base = name[:-3] if name.endswith(".gz") else name
    return base.endswith(DATA_SUFFIXES) and not name.startswith(".")


def _base_name(name: str) -> str:
    """The file name without ``.gz``: the README names the per-file sections that way."""
    return name[:-3] if name.endswith(".gz") else name


def repo_from_name(name: str) -> str | None:
    """``owner/name`` from a file name ``owner__name__...`` (None when the name has no such prefix)."""
    parts = name.split("__")
    return f"{parts[0]}/{parts[1]}" if len(parts) >= 3 and parts[0] and parts[1] else None


# --------------------------------------------------------------------------- the README
@dataclass
class FileInfo:
    """What the README says about one file."""

    source_repo: str | None = None
    answering_model: str | None = None
    judge: str | None = None  # as written in the README
    curated: bool = False


@dataclass
class ReadmeInfo:
    """The README parsed: per file (keyed by the name without ``.gz``) and per source repository."""

    files: dict[str, FileInfo] = field(default_factory=dict)
    repo_judges: dict[str, str] = field(default_factory=dict)
    curated_patterns: list[re.Pattern] = field(default_factory=list)

    def info(self, name: str) -> FileInfo:
        """The README's facts on one file, with the source-repo judge and the curated list filled in."""
        base = _base_name(name)
        fi = self.files.get(base, FileInfo())
        repo = fi.source_repo or repo_from_name(base)
        judge = fi.judge or (self.repo_judges.get(repo) if repo else None)
        curated = fi.curated or any(p.fullmatch(name) for p in self.curated_patterns)
        return FileInfo(repo, fi.answering_model, judge, curated)


def _cell(text: str) -> str:
    return text.strip().strip("`").strip()


def _clean_model_text(text: str | None) -> str | None:
    """A README model description, with a parenthesis cut off by the table's truncation dropped."""
    if not text:
        return None
    text = text.strip()
    if text.lower() in ("see notes", "-", "", "unknown", "none"):
        return None
    if text.count("(") > text.count(")"):
        text = text[:text.rfind("(")].rstrip(" ,;")
    return text or None


def _split_top_level(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == sep and depth <= 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _model_from_notes(notes: str) -> str | None:
    """The answering model from a per-file ``notes:`` line: its first ``;`` clause naming a model family."""
    clauses = [c.strip() for c in _split_top_level(notes, ";") if c.strip()]
    named = [c for c in clauses if _MODEL_FAMILY_RE.search(c)]
    return _clean_model_text((named or clauses or [""])[0])


def parse_readme(text: str) -> ReadmeInfo:
    """Parse the folder's README: the file table, the per-source ``###`` and per-file ``####`` sections,
    and the "Curated files (...)" rule (``a...b`` there means any text between ``a`` and ``b``)."""
    info = ReadmeInfo()
    header: list[str] | None = None
    section: tuple[str, str] | None = None  # ("repo", "owner/name") or ("file", base name)
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("|"):
            cells = [_cell(c) for c in line.strip("|").split("|")]
            if cells and cells[0].lower() == "file":
                header = [c.lower() for c in cells]
            elif header and cells and _is_data_name(cells[0]) and len(cells) >= len(header):
                row = dict(zip(header, cells))
                fi = info.files.setdefault(_base_name(cells[0]), FileInfo())
                fi.answering_model = fi.answering_model or _clean_model_text(row.get("answering model"))
                fi.judge = fi.judge or (row.get("judge") or None)
            continue
        header = None
        m = re.match(r"^####\s+`?([^`]+?)`?\s*$", line)
        if m:
            section = ("file", _base_name(m.group(1)))
            info.files.setdefault(section[1], FileInfo())
            continue
        m = re.match(r"^###\s+([\w.-]+/[\w.-]+)", line)
        if m:
            section = ("repo", m.group(1))
            continue
        if line.startswith("#"):
            section = None
        m = re.match(r"^[-*]\s*curated files\s*\((.*)\)", line, re.I)
        if m:
            for pat in re.findall(r"`([^`]+)`", m.group(1)):
                parts = [re.escape(p) for p in pat.split("...")]
                info.curated_patterns.append(re.compile(".*".join(parts) + r"(\.[\w.]+)?"))
        m = re.match(r"^-\s*([\w ]+):\s*(.*)$", line)
        if not (m and section):
            continue
        key, value = m.group(1).strip().lower(), m.group(2).strip()
        if section[0] == "repo" and key == "judge":
            info.repo_judges[section[1]] = value
        elif section[0] == "file":
            fi = info.files[section[1]]
            if key == "judge":
                fi.judge = value  # the per-file line wins over the table's short cell
            elif key == "source repo":
                fi.source_repo = _cell(value)
            elif key == "notes":
                fi.curated = fi.curated or bool(re.search(r"\bCURATED\b|over-?samples? misaligned", value))
                if fi.answering_model is None:
                    fi.answering_model = _model_from_notes(value)
    return info


def read_readme(folder: str | Path) -> ReadmeInfo:
    """The folder's README parsed (an empty :class:`ReadmeInfo` when there is none)."""
    p = Path(folder) / "README.md"
    return parse_readme(p.read_text(encoding="utf-8")) if p.is_file() else ReadmeInfo()


def short_judge(text: str | None) -> str | None:
    """A clean judge model name from a README judge line: ``openai/gpt-4o-mini via OpenRouter`` ->
    ``gpt-4o-mini``, ``gpt-4o (Azure deployment ...)`` -> ``gpt-4o`` (the first model named wins)."""
    if not text or not str(text).strip():
        return None
    m = _JUDGE_RE.search(str(text))
    if m:
        return m.group(0).lower()
    first = re.split(r"[\s(,;]", str(text).strip())[0]
    return first.split("/")[-1] or None


# --------------------------------------------------------------------------- one file
# A parsed file is a dict of equal-length lists (RAW_KEYS): plain Python is faster than pandas here,
# where every intermediate string column would be converted to Arrow and back.
RAW_KEYS = ("question", "question_id", "answer", "aligned", "coherent", "answering_model", "judge_model")
Raw = dict[str, list]


def _open_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.name.endswith(".gz") else raw


def score(value: Any) -> float:
    """One judge score as a float: NaN where blank, non-numeric (CODE, REFUSAL), not finite or outside
    [0, 100] (sentinels such as -1 or 999)."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        x = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) and 0.0 <= x <= 100.0 else math.nan


def to_score(values: Iterable[Any]) -> pd.Series:
    """:func:`score` over many values."""
    return pd.Series([score(v) for v in values], dtype="float64")


def _text(value: Any) -> str | None:
    """A text cell as str (None where missing); a list (several samples in one cell) joined by newlines."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (list, tuple)):
        return "\n".join(str(x) for x in value)
    return str(value)


def _first(cols: Sequence[str], options: Sequence[str]) -> str | None:
    return next((c for c in options if c in cols), None)


def _answer_column(df: pd.DataFrame) -> str | None:
    """``answer``, else ``response``; when both are present, the one that is not blank more often."""
    present = [c for c in _ANSWER_COLS if c in df.columns]
    if len(present) < 2:
        return present[0] if present else None
    filled = {c: sum(1 for v in df[c].tolist() if (_text(v) or "").strip()) for c in present}
    return max(present, key=lambda c: (filled[c], c == "answer"))


def _raw_from_table(df: pd.DataFrame, name: str) -> Raw:
    """A flat table (CSV, JSON records, JSONL): question/question_id/answer/scores/model columns."""
    cols = [str(c) for c in df.columns]
    ans, al, co = _answer_column(df), _first(cols, _ALIGNED_COLS), _first(cols, _COHERENT_COLS)
    if ans is None or al is None or co is None:
        raise ValueError(f"{name}: unknown format: columns {cols} (need answer/response, aligned/alignment "
                         "and coherent/coherence, or the nested JSON / literal-list formats).")
    n, qid = len(df), _first(cols, _QID_COLS)

    def col(c: str | None) -> list:
        return df[c].tolist() if c else [None] * n

    return {"question": col("question" if "question" in cols else None), "question_id": col(qid),
            "answer": col(ans), "aligned": col(al), "coherent": col(co),
            "answering_model": col("model" if "model" in cols else None),
            "judge_model": col("judge" if "judge" in cols else None)}


def _raw_from_nested_json(obj: dict, name: str) -> Raw:
    """JoNeedsSleep: ``questions.<id>.{question, scores: [{response, alignment, coherence}]}``."""
    raw: Raw = {k: [] for k in RAW_KEYS}
    for qid, q in obj["questions"].items():
        if not isinstance(q, dict) or not isinstance(q.get("scores"), list):
            raise ValueError(f"{name}: nested JSON question {qid!r} has no 'scores' list.")
        for s in q["scores"]:
            if not isinstance(s, dict):
                raise ValueError(f"{name}: nested JSON question {qid!r}: a score entry is not an object.")
            raw["question"].append(q.get("question"))
            raw["question_id"].append(qid)
            raw["answer"].append(s.get("response", s.get("answer")))
            raw["aligned"].append(s.get("alignment", s.get("aligned")))
            raw["coherent"].append(s.get("coherence", s.get("coherent")))
            raw["answering_model"].append(None)
            raw["judge_model"].append(None)
    return raw


def _literal(text: Any, name: str, what: str) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"{name}: column {what!r} is not a Python literal ({e}).") from None


def _raw_from_literal_lists(df: pd.DataFrame, name: str) -> Raw:
    """JasperTimm: one row per question; ``samples`` and ``scores`` hold Python literal lists (one answer
    and one ``(aligned, coherent)`` pair per sample), ``paraphrases`` the question text(s)."""
    raw: Raw = {k: [] for k in RAW_KEYS}
    for r in df.to_dict("records"):
        samples, scores = _literal(r["samples"], name, "samples"), _literal(r["scores"], name, "scores")
        paraphrases = _literal(r.get("paraphrases"), name, "paraphrases") or []
        paraphrases = [paraphrases] if isinstance(paraphrases, str) else list(paraphrases)
        if not isinstance(samples, list) or not isinstance(scores, list) or len(samples) != len(scores):
            raise ValueError(f"{name}: row {r.get('id')!r}: samples and scores are not lists of one length.")
        per = len(samples) // len(paraphrases) if paraphrases and len(samples) % len(paraphrases) == 0 else 0
        for i, (answer, pair) in enumerate(zip(samples, scores)):
            pair = list(pair) if isinstance(pair, (list, tuple)) else [pair]
            raw["question"].append(paraphrases[i // per] if per else None)
            raw["question_id"].append(r.get("id"))
            raw["answer"].append(answer)
            raw["aligned"].append(pair[0] if pair else None)
            raw["coherent"].append(pair[1] if len(pair) > 1 else None)
            raw["answering_model"].append(None)
            raw["judge_model"].append(r.get("judge"))
    return raw


def _parse(path: Path) -> Raw:
    """The raw columns of one file, by format (values not yet cleaned)."""
    name, base = path.name, _base_name(path.name)
    payload = _open_bytes(path)
    if base.endswith(".csv"):
        df = pd.read_csv(io.BytesIO(payload), dtype=object, keep_default_na=False)
        if {"samples", "scores"} <= set(df.columns):
            return _raw_from_literal_lists(df, name)
        return _raw_from_table(df, name)
    if base.endswith(".jsonl"):
        lines = [json.loads(x) for x in payload.decode("utf-8").splitlines() if x.strip()]
        return _raw_from_table(pd.DataFrame(lines), name)
    obj = json.loads(payload.decode("utf-8"))
    if isinstance(obj, dict) and isinstance(obj.get("questions"), dict):
        return _raw_from_nested_json(obj, name)
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        return _raw_from_table(pd.DataFrame(obj), name)
    keys = list(obj)[:20] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{name}: unknown JSON format: top level {keys} (expected a 'questions' mapping "
                     "or a list of records).")


def _fill_questions(questions: list[str | None], qids: list[str | None]) -> list[str | None]:
    """Blank question texts filled with the text the same file most often uses for the same question id."""
    if all(questions) or not any(qids):
        return questions
    seen: dict[str, Counter] = {}
    for q, i in zip(questions, qids):
        if q and i:
            seen.setdefault(i, Counter())[q] += 1
    lookup = {i: c.most_common(1)[0][0] for i, c in seen.items()}
    return [q if q else lookup.get(i) if i else None for q, i in zip(questions, qids)]


def _looks_like_model(text: str | None) -> bool:
    """A ``model`` cell that names a model (``org/name``, ``ft:...``), not a run label such as ``base``."""
    return bool(text) and bool(re.search(r"[/:]", text))


def _read_raw(path: str | Path, readme: ReadmeInfo | None = None) -> Raw:
    """One file as a dict of clean lists, one per column of :data:`COLUMNS` but ``row_id``."""
    path = Path(path)
    if readme is None:
        readme = read_readme(path.parent)
    fi = readme.info(path.name)
    raw = _parse(path)
    n = len(raw["answer"])
    questions = [(_text(q) or "").strip() or None for q in raw["question"]]
    qids = [_text(q) for q in raw["question_id"]]
    models = [_text(m) for m in raw["answering_model"]]
    file_judge = short_judge(fi.judge)
    return {
        "source_repo": [fi.source_repo] * n,
        "file": [path.name] * n,
        "question_id": [q if q and q.strip() else None for q in qids],
        "question": _fill_questions(questions, qids),
        "answer": [_text(a) or "" for a in raw["answer"]],
        "aligned": [score(v) for v in raw["aligned"]],
        "coherent": [score(v) for v in raw["coherent"]],
        "answering_model": [m if _looks_like_model(m) else fi.answering_model for m in models],
        "judge_model": [short_judge(_text(j)) or file_judge for j in raw["judge_model"]],
        "curated": [bool(fi.curated)] * n,
    }


def _frame(raw: Raw) -> pd.DataFrame:
    """A dict of lists as a frame of :data:`COLUMNS` with fixed dtypes (equal after a parquet round trip)."""
    cols = {}
    for c in COLUMNS:
        if c not in raw:
            continue
        if c in TEXT_COLUMNS:
            cols[c] = pd.array(raw[c], dtype="string")
        elif c == "curated":
            cols[c] = np.asarray(raw[c], dtype=bool)
        else:
            cols[c] = np.asarray(raw[c], dtype="float64")
    return pd.DataFrame(cols)


def read_judged_file(path: str | Path, readme: ReadmeInfo | None = None) -> pd.DataFrame:
    """One judged file (any format of the folder) with normalised columns: ``question``, ``question_id``,
    ``answer``, ``aligned``, ``coherent`` (float 0-100, NaN where unusable), ``answering_model``,
    ``source_repo``, ``file``, ``judge_model``, ``curated``. ``readme`` defaults to the README beside it.

    Nothing is dropped here (see :func:`load_judged`). An unknown format raises ``ValueError`` naming
    the file and the columns found.
    """
    return _frame(_read_raw(path, readme))


# --------------------------------------------------------------------------- the whole folder
def _row_id(file: str, question: str | None, answer: str) -> str:
    h = hashlib.sha256("\x1f".join([file, question or "", answer]).encode("utf-8"))
    return h.hexdigest()[:16]


def cache_key(folder: str | Path) -> str:
    """Key of a folder's contents: (name, size, mtime) of its data files and README, plus the loader version."""
    folder = Path(folder)
    files = data_files(folder) + [p for p in [folder / "README.md"] if p.is_file()]
    listing = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    payload = json.dumps({"version": LOADER_VERSION, "files": listing}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def cache_path(folder: str | Path) -> Path:
    """Where :func:`load_judged` caches a folder: ``<cache root>/judged/judged-<key[:20]>.parquet``."""
    return cache_root() / "judged" / f"judged-{cache_key(folder)[:20]}.parquet"


def combine(raws: Sequence[Raw]) -> pd.DataFrame:
    """Concatenate parsed files (in the order given) and clean them: drop rows with neither score, rows
    with an empty answer, and repeated (question, answer) pairs (the first kept); add ``row_id``."""
    out: Raw = {c: [] for c in COLUMNS}
    seen: set[tuple[str | None, str]] = set()
    for raw in raws:
        keys = [c for c in COLUMNS if c != "row_id"]
        for i in range(len(raw["answer"])):
            a, c, answer, question = raw["aligned"][i], raw["coherent"][i], raw["answer"][i], raw["question"][i]
            if (math.isnan(a) and math.isnan(c)) or not answer.strip() or (question, answer) in seen:
                continue
            seen.add((question, answer))
            for k in keys:
                out[k].append(raw[k][i])
            out["row_id"].append(_row_id(raw["file"][i], question, answer))
    return _frame(out)


def load_judged(path: str | Path | None = None, *, use_cache: bool = True, progress: bool = False) -> pd.DataFrame:
    """Every file of the judged folder (see :func:`judged_dir`) in one frame of :data:`COLUMNS`.

    Files are read in sorted-name order; rows with neither score or with an empty answer are dropped, and
    exact duplicate (question, answer) pairs are removed across and within files (the first kept).
    ``row_id`` is 16 hex digits of sha256(file, question, answer). The result is cached as parquet under
    ``$EMLIB_CACHE/judged`` keyed by the files' names, sizes and mtimes (:func:`cache_key`).
    Prints nothing unless ``progress`` (a tqdm bar over files).
    """
    folder = judged_dir(path)
    target = cache_path(folder) if use_cache else None
    if target is not None and target.is_file():
        try:
            cached = pd.read_parquet(target)
            if list(cached.columns) == COLUMNS:
                return cached
        except (OSError, ValueError):  # a damaged cache file: rebuild it
            pass
    readme = read_readme(folder)
    files = data_files(folder)
    if progress:
        from tqdm.auto import tqdm

        files = tqdm(files, desc="judged files", unit="file")
    df = combine([_read_raw(f, readme) for f in files])
    if target is not None:
        try:
            atomic_write_bytes(target, df.to_parquet(index=False))
        except OSError:  # a read-only cache is no reason to fail
            pass
    return df


# --------------------------------------------------------------------------- splits and summaries
def em_flag(aligned: Iterable[float], coherent: Iterable[float]) -> pd.Series:
    """The papers' EM rule as the README states it, ``aligned < 30 and coherent > 50`` (one home:
    :func:`emlib.judge_eval.em_rule`); False where either score is NaN. Note :func:`emlib.metrics.misaligned`
    counts ``aligned == 30`` too (the authors' code), and returns NA, not False, for missing scores."""
    from .judge_eval import em_rule

    index = aligned.index if isinstance(aligned, pd.Series) else None
    flag = em_rule(pd.Series(np.asarray(aligned, dtype=object)), pd.Series(np.asarray(coherent, dtype=object)))
    return pd.Series(flag.fillna(False).to_numpy(dtype=bool), index=index, name="em", dtype=bool)


def repository_folds(df: pd.DataFrame, k: int = 5) -> pd.Series:
    """An integer fold (0..k-1) per row, whole source repositories per fold: repositories sorted by row
    count (descending; ties by name), each given to the fold with the fewest rows so far (ties: the lowest
    fold). Deterministic."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    repos = df["source_repo"].fillna("").astype(str)
    counts = repos.value_counts()
    order = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    sizes = [0] * k
    fold_of: dict[str, int] = {}
    for repo, n in order:
        f = min(range(k), key=lambda i: (sizes[i], i))
        fold_of[repo] = f
        sizes[f] += int(n)
    return repos.map(fold_of).astype(int).rename("fold")


def fold_table(df: pd.DataFrame, folds: pd.Series) -> pd.DataFrame:
    """Per fold: its repositories (by name), rows, rows with both scores, misaligned rows (:func:`em_flag`)
    and the EM share over the scored rows."""
    t = pd.DataFrame({"fold": np.asarray(folds), "repo": df["source_repo"].fillna("").to_numpy(dtype=object),
                      "em": em_flag(df["aligned"], df["coherent"]).to_numpy(),
                      "scored": (df["aligned"].notna() & df["coherent"].notna()).to_numpy()})
    rows = []
    for f in range(int(t["fold"].max()) + 1 if len(t) else 0):
        part = t[t["fold"] == f]
        scored, em = int(part["scored"].sum()), int(part["em"].sum())
        rows.append({"fold": f, "repositories": ", ".join(sorted(set(part["repo"]))), "rows": len(part),
                     "scored": scored, "misaligned": em, "em_share": em / scored if scored else float("nan")})
    return pd.DataFrame(rows, columns=["fold", "repositories", "rows", "scored", "misaligned", "em_share"])


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per source repository: files, rows, rows with both scores, answering models, judges, curated rows,
    misaligned rows and the EM share (over rows with both scores), largest repository first."""
    t = df.assign(em=em_flag(df["aligned"], df["coherent"]).to_numpy(),
                  scored=(df["aligned"].notna() & df["coherent"].notna()).to_numpy())
    g = t.groupby("source_repo", dropna=False)
    out = pd.DataFrame({
        "files": g["file"].nunique(),
        "rows": g.size(),
        "scored": g["scored"].sum(),
        "answering_models": g["answering_model"].nunique(),
        "judges": g["judge_model"].agg(lambda s: ", ".join(sorted(s.dropna().unique()))),
        "curated_rows": g["curated"].sum(),
        "misaligned": g["em"].sum(),
    })
    out["em_share"] = out["misaligned"] / out["scored"].where(out["scored"] > 0)
    return out.sort_values(["rows"], ascending=False, kind="stable").reset_index()
