"""Whether a run of record drops ended rows from its sampling batches (``EMLIB_COMPACT``). Two rules, each
stated before its measurement; prints ``on`` or ``off`` and why (to stderr).

1. From ``ablate_rows_gpu.py --compact``'s JSON (rule of 2026-12-05): ``on`` iff the compacted call took at most
   0.85x the uncompacted call's seconds and its pooled EM rate lies in the uncompacted call's Wilson 95%
   interval. That bench samples the chat model, whose answers run long (it said ``off``: 0.96x).
2. From two whole ``paper`` runs on one machine (rule of 2026-12-06, written before those runs): the run of
   record's own sampling is mostly finetuned models' short answers (chapter 2's ablation: median 46 tokens, 99%
   under 120, yet every call decodes 600 steps). ``on`` iff the run with ``EMLIB_COMPACT=on`` took at most
   0.95x the default run's ``total_s`` (record.json; 0.95 is about 3x the run-to-run spread seen so far, ~10 s
   of ~570) and every claim's verdict equals the default run's. Measured 2026-12-06 on one H100 (session 28):
   compacted 475.6 s, default 504.4 s, compacted again 472.9 s (0.943x, 0.938x; verdicts equal): ``on``, and
   ``$EMLIB_COMPACT`` defaults to ``on`` since.

    EMLIB_COMPACT=$(python bench/compact_rule.py ablate_rows_embedded.json) python -m emlib.record run ...
    python bench/compact_rule.py --runs DEFAULT_RUN_DIR COMPACT_RUN_DIR
    python bench/compact_rule.py --switch compile --runs PLAIN_RUN_DIR COMPILED_RUN_DIR   # $EMLIB_COMPILE, rule 2
"""
from __future__ import annotations

import json
import sys

MAX_TIME_RATIO = 0.85
MAX_RUN_RATIO = 0.95  # rule 2: whole runs


def decide(result: dict) -> tuple[bool, str]:
    if "compact" not in result:
        return False, "no compacted call in the JSON (run the bench with --compact)"
    ratio = result["compact"]["seconds"] / result["together"]["seconds"]
    lo, hi = result["em_pooled"]["together"]["wilson"]
    em = result["compact"]["em_pooled"]["value"]
    fast, same = ratio <= MAX_TIME_RATIO, lo <= em <= hi
    return fast and same, (f"time ratio {ratio:.2f} (rule <= {MAX_TIME_RATIO}), pooled EM {em:.4f} against "
                           f"[{lo:.4f}, {hi:.4f}]")


def _on(value) -> bool:
    """A switch as record.json writes it: ``compact`` true/false, ``compile`` "on"/"off"."""
    return value is True or value == "on"


def decide_runs(default_dir, compact_dir, switch: str = "compact") -> tuple[bool, str]:
    """Rule 2: two run directories (each with record.json and results.json) of the same profile and model, the
    first run with ``switch`` off and the second with it on (record.json's key of that name). The same rule
    decides ``$EMLIB_COMPILE`` (``--switch compile``; stated 2026-12-06, session 29, before any such run)."""
    from pathlib import Path

    from emlib import chapters

    rec = {k: json.loads((Path(d) / "record.json").read_text()) for k, d in
           (("default", default_dir), ("compact", compact_dir))}
    if _on(rec["default"].get(switch)) or not _on(rec["compact"].get(switch)):
        return False, (f"the first run must have run with {switch} off and the second with it on (record.json's "
                       f"{switch!r}: {rec['default'].get(switch)} and {rec['compact'].get(switch)})")
    ratio = rec["compact"]["timings"]["total_s"] / rec["default"]["timings"]["total_s"]
    differ = []
    for claim in chapters.CLAIMS:
        a, b = chapters.verdict(claim, default_dir).verdict, chapters.verdict(claim, compact_dir).verdict
        if a != b:
            differ.append(f"claim {claim}: {a} -> {b}")
    fast = ratio <= MAX_RUN_RATIO
    return fast and not differ, (f"wall ratio {ratio:.3f} (rule <= {MAX_RUN_RATIO}); verdicts "
                                 + ("all equal" if not differ else "differ: " + "; ".join(differ)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    switch = "compact"
    if len(argv) >= 2 and argv[0] == "--switch":
        switch, argv = argv[1], argv[2:]
    if len(argv) == 3 and argv[0] == "--runs":
        on, why = decide_runs(argv[1], argv[2], switch)
    elif len(argv) == 1:
        with open(argv[0]) as f:
            on, why = decide(json.load(f))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print("on" if on else "off")
    print(f"{switch} {'on' if on else 'off'}: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
