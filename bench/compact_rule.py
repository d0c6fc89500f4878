"""Whether a run of record drops ended rows from its sampling batches (``EMLIB_COMPACT``), from
``ablate_rows_gpu.py --compact``'s JSON, by the rule stated on 2026-12-05 before that bench ran: ``on`` iff the
compacted call took at most 0.85x the uncompacted call's seconds and its pooled EM rate lies in the uncompacted
call's Wilson 95% interval; else ``off``. Prints ``on`` or ``off`` and why (to stderr).

    EMLIB_COMPACT=$(python bench/compact_rule.py ablate_rows_embedded.json) python -m emlib.record run ...
"""
from __future__ import annotations

import json
import sys

MAX_TIME_RATIO = 0.85


def decide(result: dict) -> tuple[bool, str]:
    if "compact" not in result:
        return False, "no compacted call in the JSON (run the bench with --compact)"
    ratio = result["compact"]["seconds"] / result["together"]["seconds"]
    lo, hi = result["em_pooled"]["together"]["wilson"]
    em = result["compact"]["em_pooled"]["value"]
    fast, same = ratio <= MAX_TIME_RATIO, lo <= em <= hi
    return fast and same, (f"time ratio {ratio:.2f} (rule <= {MAX_TIME_RATIO}), pooled EM {em:.4f} against "
                           f"[{lo:.4f}, {hi:.4f}]")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        on, why = decide(json.load(f))
    print("on" if on else "off")
    print(f"compact {'on' if on else 'off'}: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
