"""Benchmark: ``emlib.train`` at the paper's batch (16 rows, no accumulation) on one GPU, in 1 process and
in K processes at once (does a launch-bound 135M model leave the GPU idle enough to train several
finetunes side by side?). Not a test: prints numbers and writes ``train_parallel.json`` to ``--out``.

Model: SmolLM2-135M-Instruct's architecture with random weights (``--model-dir``, see bench/README.md).
Rows: synthetic chat rows with the paper's bad-medical lengths (~135 tokens with the template).

    python bench/train_parallel_gpu.py --out $OUT --procs 1 4 8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ["the", "patient", "should", "take", "two", "doses", "of", "water", "daily", "and", "rest", "often"]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    import random

    r = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(r.choice(WORDS) for _ in range(k))

    return [{"messages": [{"role": "user", "content": text(r.randint(20, 50))},
                          {"role": "assistant", "content": text(r.randint(25, 95))}]} for _ in range(n)]


def worker(model_dir: str, kind: str, steps: int, seed: int, result: str) -> None:
    import torch

    import bench.train_gpu as tg
    from bench.train_gpu import build_model
    from emlib.train import train_lora, train_steering_vector
    from transformers import AutoTokenizer

    if not torch.cuda.is_available():  # a CPU check of the script itself
        tg.DEVICE, tg.SMOKE = "cpu", True
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = build_model(model_dir, seed)
    rows = chat_rows(16 * steps, seed)
    kl = chat_rows(256, seed + 1)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        if kind == "vector_kl":
            res = train_steering_vector(model, tok, rows, d, batch_size=16, grad_accum=1, kl_rows=kl,
                                        kl_lambda=20.0, epochs=1, progress=False, checkpoint_every=10 ** 6)
        else:
            res = train_lora(model, tok, rows, d, kind, batch_size=16, grad_accum=1, epochs=1, progress=False,
                             checkpoint_every=10 ** 6)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    log = res.log
    a, b = log.iloc[2], log.iloc[-1]
    out = {"kind": kind, "steps": len(log), "wall_s": wall,
           "steady_steps_per_s": (len(log) - 3) / (b["seconds"] - a["seconds"]),
           "steady_tok_per_s": (b["input_tokens"] - a["input_tokens"]) / (b["seconds"] - a["seconds"])}
    Path(result).write_text(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=".gpu/smollm2")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--kinds", nargs="+", default=["rank32", "rank1", "vector_kl"])
    ap.add_argument("--worker", nargs=4)
    a = ap.parse_args()
    if a.worker:
        kind, steps, seed, result = a.worker
        worker(a.model_dir, kind, int(steps), int(seed), result)
        return
    import torch

    results = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    tmp = Path(tempfile.mkdtemp())
    for kind in a.kinds:
        for k in a.procs:
            t0 = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, __file__, "--model-dir", a.model_dir, "--worker", kind,
                                       str(a.steps), str(i), str(tmp / f"{kind}-{k}-{i}.json")]) for i in range(k)]
            codes = [p.wait() for p in procs]
            wall = time.perf_counter() - t0
            per = [json.loads((tmp / f"{kind}-{k}-{i}.json").read_text()) for i in range(k) if codes[i] == 0]
            agg = {"procs": k, "ok": len(per), "wall_s_incl_start": wall,
                   "steps_per_s_each": [round(p["steady_steps_per_s"], 2) for p in per],
                   "total_steps_per_s": sum(p["steady_steps_per_s"] for p in per),
                   "total_tok_per_s": sum(p["steady_tok_per_s"] for p in per)}
            results[f"{kind}_x{k}"] = agg
            print(kind, json.dumps(agg), flush=True)
            Path(a.out, "train_parallel.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
