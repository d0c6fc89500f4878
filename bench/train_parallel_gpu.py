"""Benchmark: ``emlib.train`` at the paper's batch (16 rows, no accumulation) on one GPU, in 1 process and
in K processes at once (does a launch-bound 135M model leave the GPU idle enough to train several
finetunes side by side?). Not a test: prints numbers and writes ``train_parallel.json`` to ``--out``.

Model: SmolLM2-135M-Instruct's architecture with random weights (``--model-dir``, see bench/README.md).
Rows: synthetic chat rows with the paper's bad-medical lengths (~135 tokens with the template).

    python bench/train_parallel_gpu.py --out $OUT --procs 1 4 8
    python bench/train_parallel_gpu.py --out $OUT --mps --kinds rank32 --configs 1x16 8x16 1x64 1x128 2x64

``--configs PxB``: P processes at once, each at B rows per step (``--procs`` gives Px16). With ``--mps`` the
processes share the GPU through an MPS daemon (``emlib.runner.mps_daemon``), as a run of record's do. Each
configuration's steady throughput is each process's over the last two thirds of its steps (after the CUDA
graphs of most shapes are captured), summed; beside it the board power's mean over the configuration
(``bench/gpu_power.py`` gives the card's idle and saturated power). The question it answers: do 8 processes
of 16 rows reach what one process does with the same rows in one larger step (what training several
finetunes as one batch would give)? And at what energy per token (``steady_watts``, ``joules_per_token``: the
power over the window in which every process trained steadily): a run whose card is at its power limit (an H200,
bench/README "Session 30") is paid in joules, not in seconds of one process.
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


def worker(model_dir: str, kind: str, steps: int, seed: int, result: str, batch: int = 16) -> None:
    import torch

    import bench.train_gpu as tg
    from bench.train_gpu import build_model
    from emlib.train import train_lora, train_steering_vector
    from transformers import AutoTokenizer

    if not torch.cuda.is_available():  # a CPU check of the script itself
        tg.DEVICE, tg.SMOKE = "cpu", True
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = build_model(model_dir, seed)
    rows = chat_rows(batch * steps, seed)
    kl = chat_rows(256, seed + 1)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        if kind == "vector_kl":
            res = train_steering_vector(model, tok, rows, d, batch_size=batch, grad_accum=1, kl_rows=kl,
                                        kl_lambda=20.0, epochs=1, progress=False, checkpoint_every=10 ** 6)
        else:
            res = train_lora(model, tok, rows, d, kind, batch_size=batch, grad_accum=1, epochs=1, progress=False,
                             checkpoint_every=10 ** 6)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t_end = time.perf_counter()  # CLOCK_MONOTONIC: the parent's power log reads the same clock
        wall = t_end - t0
    log = res.log
    first = max(2, len(log) // 3)  # the last two thirds: most shapes' graphs are captured by then
    a, b = log.iloc[first], log.iloc[-1]
    span = b["seconds"] - a["seconds"]
    # the steady window on the shared clock, anchored at the end (the last row is timed after the GPU finished;
    # what follows it, writing the adapter, is under a second)
    out = {"kind": kind, "batch": batch, "steps": len(log), "wall_s": wall,
           "steady_steps_per_s": (len(log) - 1 - first) / span,
           "steady_tok_per_s": (b["input_tokens"] - a["input_tokens"]) / span,
           "steady_window": [t_end - span, t_end]}
    Path(result).write_text(json.dumps(out))


def steady_energy(per: list[dict], power, tok_per_s: float) -> dict:
    """Board power over the window in which every process of a configuration trained at its steady rate (the
    intersection of their ``steady_window``), and the energy per training token it gives (J/token, the card's
    idle draw included). ``mean_watts`` averages the configuration's last two thirds, start-up included: in
    session 29 (H100) one process of 128 rows read 203 W over 26 s of which its steady steps were about 4 s,
    which says little of what that step draws."""
    if not per or power is None:
        return {"steady_watts": None, "steady_window_s": None, "joules_per_token": None}
    lo, hi = max(p["steady_window"][0] for p in per), min(p["steady_window"][1] for p in per)
    watts = power.mean(lo, hi, skip=0.0) if hi > lo else None
    return {"steady_watts": watts, "steady_window_s": round(max(hi - lo, 0.0), 2),
            "joules_per_token": round(watts / tok_per_s, 6) if watts and tok_per_s else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=".gpu/smollm2")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--kinds", nargs="+", default=["rank32", "rank1", "vector_kl"])
    ap.add_argument("--configs", nargs="+", help="PxB: P processes of B rows per step (instead of --procs)")
    ap.add_argument("--mps", action="store_true", help="share the GPU through an MPS daemon")
    ap.add_argument("--worker", nargs=5)
    a = ap.parse_args()
    if a.worker:
        kind, steps, seed, result, batch = a.worker
        worker(a.model_dir, kind, int(steps), int(seed), result, int(batch))
        return
    from contextlib import ExitStack

    import torch

    from bench.gpu_power import PowerLog
    from emlib.runner import mps_daemon

    configs = [tuple(map(int, c.lower().split("x"))) for c in a.configs] if a.configs else [(k, 16) for k in a.procs]
    stack = ExitStack()
    mps = stack.enter_context(mps_daemon(a.mps))
    power = stack.enter_context(PowerLog(0.25)) if torch.cuda.is_available() else None

    results = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
               "mps": mps, "steps_at_16_rows": a.steps}
    tmp = Path(tempfile.mkdtemp())
    with stack:
        for kind in a.kinds:
            for k, batch in configs:
                steps = max(12, a.steps * 16 // batch)  # about the same rows per process whatever the batch
                t0 = time.perf_counter()
                procs = [subprocess.Popen([sys.executable, __file__, "--model-dir", a.model_dir, "--worker", kind,
                                           str(steps), str(i), str(tmp / f"{kind}-{k}x{batch}-{i}.json"), str(batch)])
                         for i in range(k)]
                codes = [p.wait() for p in procs]
                wall = time.perf_counter() - t0
                per = [json.loads((tmp / f"{kind}-{k}x{batch}-{i}.json").read_text()) for i in range(k) if codes[i] == 0]
                agg = {"procs": k, "batch": batch, "steps": steps, "ok": len(per), "wall_s_incl_start": wall,
                       "steps_per_s_each": [round(p["steady_steps_per_s"], 2) for p in per],
                       "total_steps_per_s": sum(p["steady_steps_per_s"] for p in per),
                       "total_tok_per_s": sum(p["steady_tok_per_s"] for p in per),
                       "mean_watts": power.mean(t0, t0 + wall, skip=wall / 3) if power else None}
                agg.update(steady_energy(per, power, agg["total_tok_per_s"]))
                results[f"{kind}_{k}x{batch}"] = agg
                print(kind, json.dumps(agg), flush=True)
                Path(a.out, "train_parallel.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
