"""Benchmark: several processes sharing one GPU, time-sliced (the default) against served by an MPS daemon
(``emlib.runner.mps_daemon``, what ``python -m emlib.record run --mps`` does). Not a test.

Each worker process builds a random-weight model of SmolLM2-135M's shape in bf16 (no download) and runs two
loads that stand for what a run of record's processes do:

* ``train``: a steering vector's step, eager: a forward and backward of 16 rows x 160 tokens with a vector
  added at the middle layer (kernel launches bound it, as the chapters' 16-row steps);
* ``decode``: one forward of 400 rows x 1 token captured as a CUDA graph and replayed (a sampler's decode
  step at the paper's 400 answers per call).

The parent starts ``K`` workers at once for each of K in ``--procs`` (MPS off, then on) and reports the wall
time until all have finished and each worker's own seconds per load; the work per worker is the same, so
perfect sharing would keep the wall time flat as K grows.

    python bench/mps_gpu.py --out $OUT [--procs 1,4,8] [--train-steps 60] [--decode-steps 600]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(train_steps: int, decode_steps: int) -> dict:
    import torch

    from emlib import hooks

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from metric_batch_gpu import model_of

    model = model_of("smollm2-135m")
    for p in model.parameters():
        p.requires_grad_(False)
    vocab, d = model.config.vocab_size, model.config.hidden_size
    g = torch.Generator(device="cuda").manual_seed(0)
    out = {}

    vec = torch.nn.Parameter(torch.zeros(d, device="cuda"))
    opt = torch.optim.AdamW([vec], lr=1e-3)
    ids = torch.randint(0, vocab, (16, 160), device="cuda", generator=g)
    with hooks.add_vector(model, 15, vec):
        for i in range(train_steps + 3):
            if i == 3:  # after warm-up
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
    out["train_s"] = time.perf_counter() - t0

    x = torch.randint(0, vocab, (400, 1), device="cuda", generator=g)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(input_ids=x, use_cache=False, logits_to_keep=1)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(input_ids=x, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(decode_steps):
            graph.replay()
        torch.cuda.synchronize()
    out["decode_s"] = time.perf_counter() - t0
    return out


def launch(k: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--train-steps", str(args.train_steps),
           "--decode-steps", str(args.decode_steps)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker failed (return codes {[p.returncode for p in procs]})")
    per = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    return {"procs": k, "wall_s": round(wall, 2),
            "train_s": [round(p["train_s"], 2) for p in per], "decode_s": [round(p["decode_s"], 2) for p in per]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--procs", default="1,4,8")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--decode-steps", type=int, default=600)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.train_steps, args.decode_steps)))
        return
    import torch

    from emlib.data import atomic_write_bytes
    from emlib.runner import mps_daemon

    result = {"device": None, "torch": torch.__version__, "python": platform.python_version(),
              "train_steps": args.train_steps, "decode_steps": args.decode_steps, "runs": []}
    path = Path(args.out) / "mps_smollm2.json"
    for mps in (False, True):
        with mps_daemon(mps) as status:
            print(f"MPS {status}", flush=True)
            for k in [int(x) for x in args.procs.split(",")]:
                r = {"mps": status, **launch(k, args)}
                print(json.dumps(r), flush=True)
                result["runs"].append(r)
                atomic_write_bytes(path, json.dumps(result, indent=2).encode())
    result["device"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                      capture_output=True, text=True).stdout.strip()
    atomic_write_bytes(path, json.dumps(result, indent=2).encode())
    print(path)


if __name__ == "__main__":
    main()
