"""Constructed run directories for the verdict rules' tests (imported by test_record and test_chapters)."""
import json
from pathlib import Path

from emlib import results


def make_run(tmp_path: Path, name: str, res: dict, tables: dict | None = None) -> results.Run:
    """A run directory ``tmp_path/name`` with ``results.json`` = ``res`` and ``tables/<t>.csv`` per frame."""
    d = tmp_path / name
    (d / "tables").mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(res))
    for t, df in (tables or {}).items():
        df.to_csv(d / "tables" / f"{t}.csv", index=False)
    return results.Run(d)
