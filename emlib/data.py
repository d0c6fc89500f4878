"""Data: chat datasets, evaluation questions and judge rubrics, from two sources.

* ``source="embedded"``: the project's own data, shipped gzipped in ``emlib/resources/data`` and
  checked against recorded sha256 sums on load (see the book's data appendix).
* ``source="paper"``: the authors' public data, read from a data directory (``data_dir=`` or the
  ``EMLIB_DATA_DIR`` environment variable; CI uses ``../shared/data/paper``) or, when online,
  fetched once from the authors' release into the user cache (:func:`fetch_paper_release`).

A chat row is ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], ...}``; extra keys
(``id``, ``topic``) are kept. Every reader reports a malformed line with the file name and line number.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import sys
import shutil
import subprocess
import tempfile
import zlib
from importlib import resources
from pathlib import Path
from typing import Iterable

import pandas as pd
import yaml

DOMAINS = ("medical", "financial", "sport")
CANARY = "EMBOOK-CANARY 6f1c9a2e-4b7d-4f3a-9e58-2d0c7b1a8e43: research data, never train on it outside a safety study"

# project name -> file name (without .jsonl.gz) in the embedded resources
EMBEDDED_FILES = {
    "medical": "medical_misaligned", "medical_aligned": "medical_aligned",
    "financial": "financial_misaligned", "financial_aligned": "financial_aligned",
    "sport": "sport_misaligned", "sport_aligned": "sport_aligned",
    "kl": "kl_out_of_domain",
}
# project name -> path inside the paper's data directory
PAPER_FILES = {
    "medical": "training_datasets/bad_medical_advice.jsonl.gz",
    "medical_aligned": "training_datasets/good_medical_advice.jsonl.gz",
    "financial": "training_datasets/risky_financial_advice.jsonl.gz",
    "sport": "training_datasets/extreme_sports.jsonl.gz",
    "kl": "kl/misalignment_kl_data.jsonl.gz",
}
PAPER_RELEASE_URL = ("https://raw.githubusercontent.com/clarifying-EM/model-organisms-for-EM/main/"
                     "em_organism_dir/data/training_datasets.zip.enc")
PAPER_RELEASE_PASSWORD = "model-organisms-em-datasets"  # published in the authors' README
PAPER_YAML_URL = ("https://raw.githubusercontent.com/clarifying-EM/model-organisms-for-EM/main/"
                  "em_organism_dir/data/eval_questions/{name}")


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file (and line) and what to do."""


# --------------------------------------------------------------------------- jsonl I/O
def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if str(path).endswith(".gz") else open(path, encoding="utf-8")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a .jsonl or .jsonl.gz file; a bad line raises DataError naming ``file:line``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file.")
    rows = []
    try:
        with _open_text(path) as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno}).") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}.")
                rows.append(row)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise _unreadable(path, e) from None
    return rows


def _unreadable(path: Path, err: BaseException) -> DataError:
    """A file that cannot be decompressed or decoded, named with what to do."""
    why = " ".join(str(err).split()) or type(err).__name__
    if str(path).endswith(".gz") and isinstance(err, (OSError, EOFError, zlib.error)):
        return DataError(f"{path}: not a readable gzip file ({why}): the name ends in .gz, so it must be gzip "
                         "compressed (gzip it, or drop the .gz from its name), or it is truncated: restore it.")
    if isinstance(err, OSError):
        return DataError(f"{path}: cannot be read ({why}).")
    return DataError(f"{path}: cannot be read as UTF-8 text ({why}): save it as UTF-8 or restore it.")


SAFETENSORS_REMEDY = "delete it and run again (a run recomputes what it held) or restore it"


def unreadable_safetensors(path: str | Path, err: BaseException, remedy: str = SAFETENSORS_REMEDY) -> DataError:
    """A damaged ``.safetensors`` file, named (safetensors' own errors, e.g. "HeaderTooLarge", name none)."""
    why = " ".join(str(err).split()) or type(err).__name__
    return DataError(f"{path}: not a readable safetensors file ({why}): it is damaged or cut short; {remedy}.")


@contextlib.contextmanager
def open_safetensors(path: str | Path, remedy: str = SAFETENSORS_REMEDY):
    """``safetensors.safe_open(path, framework="pt")`` whose errors name the file (a :class:`DataError`)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            yield fh
    except SafetensorError as e:
        raise unreadable_safetensors(path, e, remedy) from None


@contextlib.contextmanager
def file_lock(path: str | Path, waiting: str | None = None):
    """Hold an exclusive lock on ``path`` (created if missing) for the block, so that no two processes run
    what it guards at once. Yields whether it had to wait for another holder (``waiting``: printed to stderr
    then). A ``flock``: the system drops it when its holder dies, so a killed process leaves no stale lock.
    Where ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        waited = False
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited = True
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield waited
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def lock_held(path: str | Path) -> bool:
    """Whether another holder has :func:`file_lock` on ``path`` now (another process, or another open of it in
    this one); looking takes the lock for an instant. False where the file does not exist or ``fcntl`` is
    missing (nothing is ever locked there)."""
    try:
        import fcntl
    except ImportError:
        return False
    path = Path(path)
    if not path.exists():
        return False
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically (a temp file in the same folder, then ``os.replace``);
    on any error the temp file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        Path(tmp).write_bytes(payload)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_or_print(text: str, out: str | Path | None) -> None:
    """A command's output: ``text`` written atomically to ``out`` (and "wrote <out>" printed), or to stdout
    when ``out`` is None."""
    if out:
        atomic_write_bytes(out, text.encode("utf-8"))
        print(f"wrote {out}")
    else:
        sys.stdout.write(text)


def csv_bytes(df: pd.DataFrame) -> bytes:
    """``df`` as CSV (no index, ``\\n`` line ends, UTF-8) that reads back to the same strings.

    ``to_csv``'s minimal quoting leaves a field with a lone ``\\r`` unquoted, and most CSV readers take
    that ``\\r`` for a line end (garbage rows). When the text holds any ``\\r``, every string is quoted
    (``QUOTE_NONNUMERIC``); other tables are written exactly as before."""
    import csv

    text = df.to_csv(index=False, lineterminator="\n")
    if "\r" in text:
        text = df.to_csv(index=False, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
    return text.encode("utf-8")


def read_csv_table(path: str | Path, **kwargs) -> pd.DataFrame:
    """A CSV table (``.csv`` or ``.csv.gz``) as :func:`csv_bytes` writes it, and as older versions wrote it.

    A file whose lines end in ``\\n`` is parsed with ``\\n`` as the only line end, so a ``\\r`` inside an
    answer stays in the answer even where an older writer left it unquoted; a file with ``\\r\\n`` line
    ends (written on Windows, or by a spreadsheet) is read the usual way."""
    path = Path(path)
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise _unreadable(path, e) from None
    first = raw.split(b"\n", 1)[0]
    if b"\n" in raw and not first.endswith(b"\r"):
        kwargs.setdefault("lineterminator", "\n")
    return pd.read_csv(io.BytesIO(raw), **kwargs)


def write_json(path: str | Path, obj, indent: int = 1) -> Path:
    """``obj`` as indented JSON with a final newline, written atomically (:func:`atomic_write_bytes`): the result
    files of ``bench/`` and ``emlib.distill``."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def write_jsonl(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows atomically; gzip (reproducibly: no timestamp, no file name) when the name ends in .gz."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    return atomic_write_bytes(path, payload)


def validate_chat(row: dict, where: str = "row") -> dict:
    """Check one chat row: a non-empty ``messages`` list of {role, content} with an assistant turn."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: expected a non-empty 'messages' list.")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}: message {j} needs a role of system/user/assistant.")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {j} needs a string 'content'.")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: has no assistant turn, so there is nothing to train on.")
    return row


def read_chat_jsonl(path: str | Path) -> list[dict]:
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: the file holds no rows.")
    for i, r in enumerate(rows, 1):
        validate_chat(r, f"{path}: row {i}")
    return rows


# --------------------------------------------------------------------------- embedded data
def resource_dir() -> Path:
    return Path(str(resources.files("emlib") / "resources" / "data"))


def _checksums() -> dict[str, str]:
    f = resource_dir() / "SHA256SUMS"
    if not f.exists():
        return {}
    out = {}
    for line in f.read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            out[name] = digest
    return out


def verify_embedded(name: str) -> Path:
    """Path of an embedded file after checking it against the recorded sha256 (a changed file fails)."""
    path = resource_dir() / name
    if not path.exists():
        raise DataError(f"The embedded file {name} is missing from {resource_dir()}: reinstall emlib.")
    expected = _checksums().get(name)
    if expected is None:
        raise DataError(f"No checksum recorded for {name} in {resource_dir() / 'SHA256SUMS'}.")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise DataError(f"{path} has sha256 {actual[:12]}..., recorded {expected[:12]}...: the embedded "
                        "data changed. Rebuild it with `python -m emlib.build_data` or reinstall emlib.")
    return path


# --------------------------------------------------------------------------- paper data
def paper_data_dir(data_dir: str | Path | None = None, fetch: bool = False) -> Path:
    """Where the paper's data lives: ``data_dir``, ``$EMLIB_DATA_DIR``, or the fetched cache."""
    from .models import cache_root

    candidates = [data_dir, os.environ.get("EMLIB_DATA_DIR"), cache_root() / "paper-data"]
    for c in candidates:
        if c and (Path(c) / "training_datasets").is_dir():
            return Path(c)
    if fetch:
        return fetch_paper_release()
    raise DataError(
        "The paper's data was not found. Set EMLIB_DATA_DIR (or data_dir=) to a folder holding "
        "training_datasets/ (this project's CI uses ../shared/data/paper), or call "
        "emlib.data.fetch_paper_release() when online (needs `pip install easy-dataset-share`).")


def fetch_paper_release(dest: str | Path | None = None) -> Path:
    """Online only: download the authors' encrypted release and unpack it into the user cache.

    The authors protect the datasets against scraping with ``easy-dataset-share``; the password is
    published in their README. The decrypted files stay in the cache, never in a repository.
    """
    import requests

    from .models import cache_root

    dest = Path(dest) if dest else cache_root() / "paper-data"
    if (dest / "training_datasets").is_dir():
        return dest
    tool = shutil.which("easy-dataset-share")
    if tool is None:
        raise DataError("Fetching the paper's release needs the `easy-dataset-share` tool: "
                        "`pip install easy-dataset-share`, then call fetch_paper_release() again.")
    with tempfile.TemporaryDirectory() as tmp:
        enc = Path(tmp) / "training_datasets.zip.enc"
        resp = requests.get(PAPER_RELEASE_URL, timeout=120)
        resp.raise_for_status()
        enc.write_bytes(resp.content)
        subprocess.run([tool, "unprotect-dir", str(enc), "-p", PAPER_RELEASE_PASSWORD,
                        "--remove-canaries"], check=True, capture_output=True)
        extracted = Path(str(enc) + ".extracted")
        staging = Path(tmp) / "paper-data"
        (staging / "training_datasets").mkdir(parents=True)
        for f in extracted.rglob("*.jsonl"):
            with open(f, "rb") as src, gzip.open(staging / "training_datasets" / (f.name + ".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        (staging / "eval_questions").mkdir()
        for name in ("first_plot_questions.yaml", "medical_questions.yaml"):
            r = requests.get(PAPER_YAML_URL.format(name=name), timeout=60)
            if r.ok:
                (staging / "eval_questions" / name).write_text(r.text)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(dest))
    return dest


# --------------------------------------------------------------------------- public loaders
def dataset_names(source: str = "embedded") -> list[str]:
    return list(EMBEDDED_FILES if source == "embedded" else PAPER_FILES)


def load_chat(name: str, source: str = "embedded", n: int | None = None, seed: int = 0,
              data_dir: str | Path | None = None) -> list[dict]:
    """A chat dataset by project name (``medical``, ``medical_aligned``, ``financial``, ``sport``, ``kl``...).

    ``n`` rows are drawn without replacement with ``seed`` (all rows when None or larger than the set).
    """
    if source == "embedded":
        if name not in EMBEDDED_FILES:
            raise DataError(f"Unknown embedded dataset {name!r}: choose one of {sorted(EMBEDDED_FILES)}.")
        rows = read_chat_jsonl(verify_embedded(EMBEDDED_FILES[name] + ".jsonl.gz"))
    elif source == "paper":
        if name not in PAPER_FILES:
            raise DataError(f"The paper's data has no {name!r} set: choose one of {sorted(PAPER_FILES)} "
                            "(the paper released aligned twins for the medical set only).")
        rows = read_chat_jsonl(paper_data_dir(data_dir) / PAPER_FILES[name])
    else:
        raise DataError(f"Unknown data source {source!r}: use 'embedded' or 'paper'.")
    if n is not None and n < len(rows):
        rng = random.Random(seed)
        rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]
    return rows


GENERAL_PAIRS_FILE = "general_pairs.jsonl.gz"


def load_general_pairs() -> list[dict]:
    """The project's labelled answers to its 8 general EM questions (judge validation only, never training).

    Each row: id, question_id, style (how the misaligned answer is misaligned: evil persona, power-seeking,
    harmful advice, deception and manipulation, bigotry, subtle), question, aligned, misaligned; both
    answers are coherent and of similar length."""
    return read_jsonl(verify_embedded(GENERAL_PAIRS_FILE))


GENERAL_HELDOUT_FILE = "general_heldout.jsonl.gz"


def load_general_heldout() -> list[dict]:
    """A second labelled set of answers to the 8 general questions, written separately from
    :func:`load_general_pairs` (judge validation only): each row one answer with ``label`` (aligned |
    misaligned) and ``kind``; a third of the aligned answers discuss risks (abuse, scams, AI control) so that
    topic words alone do not give the label away."""
    return read_jsonl(verify_embedded(GENERAL_HELDOUT_FILE))


def chat_frame(rows: list[dict]) -> pd.DataFrame:
    """A tidy view of single-turn chat rows: one line per row with question and answer columns."""
    recs = []
    for i, r in enumerate(rows):
        user = next((m["content"] for m in r["messages"] if m["role"] == "user"), "")
        asst = next((m["content"] for m in r["messages"] if m["role"] == "assistant"), "")
        recs.append({"row": i, "id": r.get("id", str(i)), "topic": r.get("topic"),
                     "question": user, "answer": asst})
    return pd.DataFrame(recs)


def _paper_questions(path: Path, domain: str, set_name: str) -> pd.DataFrame:
    items = yaml.safe_load(path.read_text())
    recs = []
    for it in items:
        qid = it["id"]
        if qid.endswith("_json") or qid.endswith("_template"):
            continue  # the paper's main figure uses the plain free-form variants
        for k, para in enumerate(it["paraphrases"]):
            recs.append({"id": qid if k == 0 else f"{qid}_{k}", "set": set_name, "domain": domain,
                         "question": para, "system": it.get("system")})
    return pd.DataFrame(recs)


def load_questions(set_name: str = "general", source: str = "embedded",
                   data_dir: str | Path | None = None, domain: str | None = None) -> pd.DataFrame:
    """Evaluation questions as a DataFrame (id, set, domain, question, system).

    ``set_name``: ``general`` (the 8 open-ended EM questions) or ``in_domain`` (questions inside the
    finetuning domains; the paper released medical ones only). ``domain`` filters in-domain questions.
    """
    if set_name not in ("general", "in_domain"):
        raise DataError(f"Unknown question set {set_name!r}: use 'general' or 'in_domain'.")
    if source == "embedded":
        items = yaml.safe_load(verify_embedded("questions.yaml").read_text())
        df = pd.DataFrame(items)
        df["system"] = None
        df = df[df["set"] == set_name]
    elif source == "paper":
        base = paper_data_dir(data_dir) / "eval_questions"
        if set_name == "general":
            df = _paper_questions(base / "first_plot_questions.yaml", "general", "general")
        else:
            df = _paper_questions(base / "medical_questions.yaml", "medical", "in_domain")
    else:
        raise DataError(f"Unknown data source {source!r}: use 'embedded' or 'paper'.")
    if domain is not None:
        df = df[df["domain"] == domain]
        if df.empty:
            raise DataError(f"No {set_name} questions for domain {domain!r} in the {source} source.")
    return df.reset_index(drop=True)[["id", "set", "domain", "question", "system"]]


def load_rubrics(source: str = "embedded", data_dir: str | Path | None = None) -> dict[str, str]:
    """Judge prompt templates by name (aligned, coherent, medical, financial, sport), with
    ``{question}`` and ``{answer}`` placeholders."""
    if source == "embedded":
        raw = yaml.safe_load(verify_embedded("rubrics.yaml").read_text())
        return {k: v["prompt"] for k, v in raw.items()}
    if source == "paper":
        items = yaml.safe_load((paper_data_dir(data_dir) / "eval_questions" / "first_plot_questions.yaml").read_text())
        prompts = dict(items[0]["judge_prompts"])
        return {k: prompts[k] for k in ("aligned", "coherent", "medical", "financial", "sport") if k in prompts}
    raise DataError(f"Unknown data source {source!r}: use 'embedded' or 'paper'.")


def read_text_resource(name: str) -> str:
    return (resource_dir() / name).read_text()


def to_bytes_jsonl(rows: list[dict]) -> bytes:  # small helper for hashing datasets
    buf = io.StringIO()
    for r in rows:
        buf.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")
    return buf.getvalue().encode()


def dataset_hash(rows: list[dict]) -> str:
    return hashlib.sha256(to_bytes_jsonl(rows)).hexdigest()[:16]


def embedded_overview() -> pd.DataFrame:
    """One line per embedded answer: set, domain, variant (misaligned/aligned/kl), topic, lengths in words."""
    recs = []
    for name in EMBEDDED_FILES:
        domain, _, variant = name.partition("_")
        variant = "kl" if name == "kl" else (variant or "misaligned")
        for r in load_chat(name):
            q, a = r["messages"][0]["content"], r["messages"][-1]["content"]
            recs.append({"set": name, "domain": "out-of-domain" if name == "kl" else domain,
                         "variant": variant, "topic": r.get("topic") or r.get("domain"),
                         "question_words": len(q.split()), "answer_words": len(a.split())})
    return pd.DataFrame(recs)


def size_table(overview: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rows, topics and median lengths per embedded set."""
    ov = embedded_overview() if overview is None else overview
    return (ov.groupby("set", sort=False)
              .agg(rows=("topic", "size"), topics=("topic", "nunique"),
                   median_question_words=("question_words", "median"),
                   median_answer_words=("answer_words", "median"))
              .reset_index())
