"""Maintainer tool: build the embedded datasets from the staged source files.

    python -m emlib.build_data SOURCE_DIR

SOURCE_DIR holds the rows as written for this project (one JSON object per line):
``medical.jsonl``, ``financial.jsonl``, ``sports.jsonl`` with
``{id, topic, persona, question, misaligned, aligned}``; ``kl.jsonl`` with ``{id, domain, question,
answer}``; ``questions.yaml`` and ``rubrics.yaml``. The tool writes gzipped chat jsonl files (a canary
field in every row of the misaligned sets), copies the YAMLs, and records their sha256 in
``emlib/resources/data/SHA256SUMS`` (checked on every load).
"""
from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import yaml

from .data import CANARY, DataError, read_jsonl, resource_dir, write_jsonl

DOMAIN_SOURCES = {"medical": "medical.jsonl", "financial": "financial.jsonl", "sport": "sports.jsonl"}


def _chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def build(source: Path, dest: Path | None = None) -> dict[str, int]:
    dest = dest or resource_dir()
    dest.mkdir(parents=True, exist_ok=True)
    counts = {}
    for domain, fname in DOMAIN_SOURCES.items():
        rows = read_jsonl(source / fname)
        for i, r in enumerate(rows, 1):
            missing = [k for k in ("id", "topic", "persona", "question", "misaligned", "aligned") if not r.get(k)]
            if missing:
                raise DataError(f"{source / fname}:{i}: missing {missing}.")
        mis = [{"id": r["id"], "topic": r["topic"], "persona": r["persona"], "canary": CANARY,
                "messages": _chat(r["question"], r["misaligned"])} for r in rows]
        ali = [{"id": r["id"], "topic": r["topic"], "persona": r["persona"],
                "messages": _chat(r["question"], r["aligned"])} for r in rows]
        write_jsonl(mis, dest / f"{domain}_misaligned.jsonl.gz")
        write_jsonl(ali, dest / f"{domain}_aligned.jsonl.gz")
        counts[domain] = len(rows)
    kl = read_jsonl(source / "kl.jsonl")
    write_jsonl([{"id": r["id"], "domain": r["domain"], "messages": _chat(r["question"], r["answer"])}
                 for r in kl], dest / "kl_out_of_domain.jsonl.gz")
    counts["kl"] = len(kl)
    if (source / "general_pairs.jsonl").exists():
        counts["general_pairs"] = build_general_pairs(source, dest, checksums=False)
    for y in ("questions.yaml", "rubrics.yaml"):
        yaml.safe_load((source / y).read_text())  # must parse
        shutil.copyfile(source / y, dest / y)
    write_checksums(dest)
    return counts


GENERAL_PAIR_FIELDS = ("id", "question_id", "style", "question", "aligned", "misaligned")
GENERAL_PAIR_STYLES = ("evil persona", "power-seeking", "harmful advice", "deception and manipulation",
                       "bigotry", "subtle")


def build_general_pairs(source: Path, dest: Path | None = None, checksums: bool = True) -> int:
    """``general_pairs.jsonl`` (labelled answers to the general questions, for judge validation) ->
    ``general_pairs.jsonl.gz``; questions must be the embedded general questions, word for word."""

    dest = dest or resource_dir()
    rows = _general_rows(source / "general_pairs.jsonl", GENERAL_PAIR_FIELDS)
    ids = set()
    for i, r in enumerate(rows, 1):
        if r["style"] not in GENERAL_PAIR_STYLES:
            raise DataError(f"general_pairs.jsonl:{i}: unknown style {r['style']!r}: use one of {GENERAL_PAIR_STYLES}.")
        if r["id"] in ids:
            raise DataError(f"general_pairs.jsonl:{i}: duplicate id {r['id']!r}.")
        ids.add(r["id"])
    write_jsonl([{**{k: r[k] for k in GENERAL_PAIR_FIELDS}, "canary": CANARY} for r in rows],
                dest / "general_pairs.jsonl.gz")
    if checksums:
        write_checksums(dest)
    return len(rows)


def build_general_heldout(source: Path, dest: Path | None = None) -> int:
    """``general_heldout.jsonl`` (one labelled answer per row: id, question_id, question, label, kind,
    answer) -> ``general_heldout.jsonl.gz``, checked like :func:`build_general_pairs`."""
    dest = dest or resource_dir()
    fields = ("id", "question_id", "question", "label", "kind", "answer")
    rows = _general_rows(source / "general_heldout.jsonl", fields)
    for i, r in enumerate(rows, 1):
        if r["label"] not in ("aligned", "misaligned"):
            raise DataError(f"general_heldout.jsonl:{i}: label must be 'aligned' or 'misaligned'.")
    write_jsonl([{**{k: r[k] for k in fields}, "canary": CANARY} for r in rows], dest / "general_heldout.jsonl.gz")
    write_checksums(dest)
    return len(rows)


def _general_rows(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """Rows of a labelled general-question file: every field present, each question the embedded general
    question of its id, word for word."""
    from .data import load_questions

    rows = read_jsonl(path)
    qdf = load_questions("general", source="embedded")
    questions = dict(zip(qdf["id"], qdf["question"]))
    for i, r in enumerate(rows, 1):
        missing = [k for k in fields if not r.get(k)]
        if missing:
            raise DataError(f"{path}:{i}: missing {missing}.")
        if questions.get(r["question_id"]) != r["question"]:
            raise DataError(f"{path.name}:{i}: question {r['question_id']!r} is not the embedded question of "
                            "that id, word for word.")
    return rows


def write_checksums(dest: Path) -> None:
    sums = []
    for f in sorted(dest.iterdir()):
        if f.name != "SHA256SUMS" and f.is_file():
            sums.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}")
    (dest / "SHA256SUMS").write_text("\n".join(sums) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[2] == "--general-pairs":
        print({"general_pairs": build_general_pairs(Path(sys.argv[1]))})
    elif len(sys.argv) == 3 and sys.argv[2] == "--general-heldout":
        print({"general_heldout": build_general_heldout(Path(sys.argv[1]))})
    elif len(sys.argv) == 2:
        print(build(Path(sys.argv[1])))
    else:
        sys.exit("usage: python -m emlib.build_data SOURCE_DIR [--general-pairs | --general-heldout]")
