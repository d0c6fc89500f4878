"""A results cache that never loses work: every answer and every judge score is written as it is made.

Storage is one SQLite file in WAL mode. Each *table* (``answers``, ``scores``, ...) maps a content key
to a JSON value; rows are only ever inserted (``INSERT OR IGNORE``), never updated (except on purpose,
``put_many(..., replace=True)``, to repair a row that holds no result), and each batch is
written in one transaction, so a process killed at any moment leaves every finished batch on disk and
no half-written row. A rerun looks its keys up first and computes only what is missing.

Keys are hashes of everything that determines a result (see :func:`make_key`), serialised canonically
(:func:`canonical_json`: sorted dict keys, sets as sorted text) so that every process builds the same key. For models that is
:func:`model_fingerprint` (base weights + a digest of the current weights + the active adapters),
for judges the judge id and a hash of the rubric text. Values carry no secrets: callers must never
put an API key into a key part or a value (the judges in :mod:`emlib.judge` read keys from the
environment at request time and store nothing of them).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd


def cache_root() -> Path:
    """The user cache for converted models, fetched data and parsed judged answers: ``$EMLIB_CACHE`` or
    ``~/.cache/emlib`` (also ``emlib.models.cache_root``; here so that modules without torch can use it)."""
    root = os.environ.get("EMLIB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "emlib")
    return Path(root)

_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_CHUNK = 500  # keys per SELECT (SQLite limits the number of bound parameters)


# --------------------------------------------------------------------------- hashing helpers
def _set_text(s: set | frozenset) -> str:
    """A set written like ``str(s)`` but with its elements sorted (by their own canonical text).

    ``str()`` of a set follows the process's hash seed (``PYTHONHASHSEED``): three processes, three
    orders. Sorted, the text is the same everywhere, and equals ``str(s)`` for sets of zero or one element,
    so keys that were already stable (a one-module adapter) keep their old values."""
    items = sorted((_set_text(x) if isinstance(x, (set, frozenset)) else repr(x)) for x in s)
    name = "frozenset" if isinstance(s, frozenset) else "set"
    if not items:
        return f"{name}()"
    body = "{" + ", ".join(items) + "}"
    return f"frozenset({body})" if name == "frozenset" else body


def json_default(obj: Any) -> Any:
    """``default=`` for :func:`json.dumps` in every cache key: sets as sorted text, anything else ``str``.

    Use it (with ``sort_keys=True``) wherever a key or fingerprint is hashed from JSON, so that no key
    depends on the order of a set or of a dict."""
    if isinstance(obj, (set, frozenset)):
        return _set_text(obj)
    return str(obj)


def canonical_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps(obj, sort_keys=True, default=json_default, **kwargs)``: the same text in every process."""
    return json.dumps(obj, sort_keys=True, default=json_default, **kwargs)


def _canonical(obj: Any) -> str:
    return canonical_json(obj, ensure_ascii=False, separators=(",", ":"))


def make_key(**parts: Any) -> str:
    """A stable 64-hex key from named parts (order-independent; values JSON-encoded, floats by repr)."""
    return hashlib.sha256(_canonical(parts).encode("utf-8")).hexdigest()


def text_hash(text: str, n: int = 16) -> str:
    """Short sha256 of a string (rubric texts, prompts)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def _tensor_bytes(t) -> bytes:
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: view the raw bits
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def tensor_hash(tensors: Mapping[str, Any], n: int = 16) -> str:
    """Short sha256 of named tensors: each name, shape, dtype and raw bytes, in name order (the solution
    fingerprints of :mod:`emlib.vectors` and :mod:`emlib.adapters`)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:n]


def adapter_hash(model) -> str | None:
    """Hash of the *active* peft adapter(s): their weights and configs. None for a plain model.

    Two adapters with equal weights hash equal wherever they were saved; switching the active adapter
    changes the hash.
    """
    if not hasattr(model, "peft_config"):
        return None
    from peft import get_peft_model_state_dict

    active = getattr(model, "active_adapters", None)
    if callable(active):
        active = active()
    if active is None:
        active = [getattr(model, "active_adapter", "default")]
    if isinstance(active, str):
        active = [active]
    h = hashlib.sha256()
    for name in sorted(active):
        cfg = model.peft_config[name].to_dict()
        cfg = {k: v for k, v in cfg.items() if k not in ("base_model_name_or_path", "revision",
                                                            "inference_mode", "peft_version")}
        h.update(_canonical({"adapter": name, "config": cfg}).encode())
        sd = get_peft_model_state_dict(model, adapter_name=name)
        for k in sorted(sd):
            h.update(k.encode())
            h.update(str(tuple(sd[k].shape)).encode())
            h.update(_tensor_bytes(sd[k]))
    return h.hexdigest()[:16]


def weights_digest(model) -> str:
    """A cheap digest of all current parameter values (sum and sum of squares per tensor, float64).

    Catches in-place changes that the load-time fingerprint cannot see (a merged adapter, a full
    finetune, a perturbation). Computed on the parameters' own device, one pass over memory.
    """
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            s = p.detach().sum(dtype=torch.float64)
            q = p.detach().float().square().sum(dtype=torch.float64)
            h.update(f"{name}:{tuple(p.shape)}:{float(s)!r}:{float(q)!r};".encode())
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """Identity of a model as it is *now*: load-time fingerprint + weights digest + active adapters.

    Uses ``model.emlib_info.fingerprint`` (from :func:`emlib.models.load_model`) when present, else the
    config and ``name_or_path``; the weights digest makes the result safe for models changed in place.
    """
    info = getattr(model, "emlib_info", None)
    base = info.fingerprint if info is not None else None
    if base is None:
        cfg = getattr(model, "config", None)
        src = cfg.to_json_string() if cfg is not None else type(model).__name__
        base = text_hash(f"{getattr(cfg, 'name_or_path', '')}:{src}")
    return text_hash(f"{base}:{weights_digest(model)}:{adapter_hash(model)}")


# --------------------------------------------------------------------------- the cache
class ResultCache:
    """Append-only key -> JSON store in one SQLite file (WAL, one transaction per batch).

    ``path``: the database file, or a directory (then ``<dir>/results.sqlite``). Safe to share
    between threads of one process and between processes (SQLite locking; writers wait up to
    ``timeout`` seconds).
    """

    def __init__(self, path: str | Path, timeout: float = 60.0):
        path = Path(path)
        if path.is_dir() or (not path.suffix and not path.exists()):
            path = path / "results.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._tables: set[str] = set()
        self._con = None
        try:
            with self._named_errors():
                self._con = sqlite3.connect(str(path), timeout=timeout, isolation_level=None,
                                            check_same_thread=False)
                mode = self._wal(timeout)
                if str(mode).lower() != "wal":
                    raise RuntimeError(f"{path}: SQLite refused WAL mode (got {mode!r}); put the cache on a local "
                                       "disk, not a network file system.")
                self._con.execute("PRAGMA synchronous=FULL")
                self._con.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
                self._con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # a damaged file fails here
        except BaseException:
            if self._con is not None:
                self._con.close()
            raise

    @contextmanager
    def _named_errors(self):
        """SQLite's errors name no file ("file is not a database"): say which cache, and what to do."""
        try:
            yield
        except sqlite3.DatabaseError as err:
            if isinstance(err, sqlite3.OperationalError) and ("locked" in str(err) or "busy" in str(err)):
                raise
            from .data import DataError

            raise DataError(f"{self.path}: the SQLite cache cannot be used ({err}). If the file is damaged, move "
                            "it away (or delete it) and run again: the answers and scores it held are computed "
                            "again.") from None

    def _wal(self, timeout: float) -> str:
        """Switch to WAL. SQLite answers "database is locked" at once, without its busy handler, when
        another process is switching the same new file at the same moment (two workers opening a run's
        cache together): retry until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __repr__(self) -> str:
        return f"ResultCache({str(self.path)!r})"

    @classmethod
    def for_run(cls, run_dir: str | Path) -> "ResultCache":
        """The cache of a run directory: ``<run_dir>/cache/results.sqlite``."""
        return cls(Path(run_dir) / "cache" / "results.sqlite")

    def _table(self, table: str) -> str:
        if not _TABLE_RE.match(table):
            raise ValueError(f"Bad cache table name {table!r}: use letters, digits and underscores.")
        if table not in self._tables:
            self._con.execute(f'CREATE TABLE IF NOT EXISTS "{table}" (key TEXT PRIMARY KEY, '
                              "value TEXT NOT NULL, created REAL NOT NULL) WITHOUT ROWID")
            self._tables.add(table)
        return table

    def get_many(self, table: str, keys: Iterable[str]) -> dict[str, Any]:
        """The stored values of those ``keys`` that exist (missing keys are simply absent)."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, Any] = {}
        with self._lock, self._named_errors():
            t = self._table(table)
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                q = f'SELECT key, value FROM "{t}" WHERE key IN ({",".join("?" * len(chunk))})'
                for k, v in self._con.execute(q, chunk):
                    out[k] = json.loads(v)
        return out

    def get(self, table: str, key: str, default: Any = None) -> Any:
        return self.get_many(table, [key]).get(key, default)

    def put_many(self, table: str, items: Mapping[str, Any], replace: bool = False) -> int:
        """Insert ``{key: value}`` in one transaction; existing keys keep their first value.

        Returns the number of new rows. Values must be JSON-serialisable. ``replace=True`` overwrites
        existing keys instead (only for repairing a row that holds no result, e.g. a judge score that an
        older version cached from a broken reply); it returns the number of rows written.
        """
        now = time.time()
        rows = [(k, json.dumps(v, ensure_ascii=False, allow_nan=True), now) for k, v in items.items()]
        if not rows:
            return 0
        with self._lock, self._named_errors():
            t = self._table(table)
            cur = self._con.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                before = self._con.total_changes
                verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
                cur.executemany(f'{verb} INTO "{t}" (key, value, created) VALUES (?, ?, ?)', rows)
                added = self._con.total_changes - before
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return added

    def put(self, table: str, key: str, value: Any) -> int:
        return self.put_many(table, {key: value})

    def count(self, table: str) -> int:
        with self._lock, self._named_errors():
            return self._con.execute(f'SELECT COUNT(*) FROM "{self._table(table)}"').fetchone()[0]

    def tables(self) -> list[str]:
        with self._lock, self._named_errors():
            rows = self._con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        return sorted(r[0] for r in rows)

    def frame(self, table: str) -> pd.DataFrame:
        """All rows of a table as a DataFrame (key, created, and the value's fields as columns)."""
        with self._lock, self._named_errors():
            rows = self._con.execute(f'SELECT key, value, created FROM "{self._table(table)}" '
                                     "ORDER BY created, key").fetchall()
        recs = []
        for k, v, c in rows:
            val = json.loads(v)
            rec = {"key": k, "created": c}
            rec.update(val if isinstance(val, dict) else {"value": val})
            recs.append(rec)
        return pd.DataFrame(recs)

    def integrity_ok(self) -> bool:
        with self._lock:
            return self._con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def close(self) -> None:
        with self._lock:
            try:
                self._con.close()
            except sqlite3.ProgrammingError:
                pass

    def __enter__(self) -> "ResultCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):  # a connection cannot be pickled: reopen by path
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])


def as_cache(cache: "ResultCache | str | os.PathLike | None") -> ResultCache | None:
    """Accept a ResultCache, a path, or None."""
    if cache is None or isinstance(cache, ResultCache):
        return cache
    return ResultCache(cache)


# --------------------------------------------------------------------------- work claims
def _started(pid: int) -> str:
    """When process ``pid`` started (Linux: ``/proc/PID/stat``'s start time), so that a claim outlives no
    process whose number was given to another; "" where that cannot be read (the number alone then)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:].split()[19]  # field 22; the name in parentheses may hold spaces


def _alive(pid: int, started: str) -> bool:
    """Whether the process that made a claim still runs (same number and, where known, same start time)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return not started or _started(pid) == started


class Claims:
    """Which process is computing which keys of one cache right now, so that processes sharing a cache (the
    chapters of a run of record) compute each missing result once: a key claimed by a live process is left to
    it and read from the cache once written (:func:`emlib.generate.sample_answers`).

    A small SQLite file of its own in the temporary folder, named by the cache's path: the cache itself
    holds results only. A claim names its owner (one per :class:`Claims` object) and process; the claim of a
    process that has died is taken over, so a killed process holds nothing up. Not on Windows (:meth:`of`),
    where no signal asks whether a process lives: there every process samples what it misses."""

    def __init__(self, cache: "ResultCache"):
        where = Path(tempfile.gettempdir()) / "emlib-claims-v2"
        where.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(str(Path(cache.path).resolve()).encode()).hexdigest()[:24]
        self.path = where / f"{name}.sqlite"
        self.owner, self.pid = uuid.uuid4().hex, os.getpid()
        self.started = _started(self.pid)
        self._con = sqlite3.connect(str(self.path), timeout=60, isolation_level=None, check_same_thread=False)
        self._con.execute("PRAGMA busy_timeout=60000")
        self._con.execute("CREATE TABLE IF NOT EXISTS claims (key TEXT PRIMARY KEY, owner TEXT NOT NULL, "
                          "pid INTEGER NOT NULL, started TEXT NOT NULL) WITHOUT ROWID")

    @classmethod
    def of(cls, cache: "ResultCache | None") -> "Claims | None":
        """Claims on ``cache``'s keys; None without a cache or on Windows."""
        return cls(cache) if cache is not None and os.name != "nt" else None

    def claim(self, keys: Iterable[str]) -> set[str]:
        """Claim those ``keys`` that no live process holds; returns the keys this owner holds now."""
        keys = list(dict.fromkeys(keys))
        mine: set[str] = set()
        cur = self._con.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                held = cur.execute(f"SELECT key, owner, pid, started FROM claims WHERE key IN "
                                   f"({','.join('?' * len(chunk))})", chunk).fetchall()
                dead = [k for k, o, p, t in held if o != self.owner and not _alive(p, t)]
                cur.executemany("DELETE FROM claims WHERE key = ?", [(k,) for k in dead])
                taken = {k for k, o, p, t in held if k not in dead and o != self.owner}
                cur.executemany("INSERT OR IGNORE INTO claims (key, owner, pid, started) VALUES (?, ?, ?, ?)",
                                [(k, self.owner, self.pid, self.started) for k in chunk if k not in taken])
                mine |= {k for k in chunk if k not in taken}
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return mine

    def release(self) -> None:
        """Drop every claim of this owner (its results are written, or it gave up on them)."""
        self._con.execute("DELETE FROM claims WHERE owner = ?", (self.owner,))

    def close(self) -> None:
        self.release()
        self._con.close()
