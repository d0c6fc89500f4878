"""Where a finetune worker's first 'load' goes: N spawned processes at once (as the run of record's pool), each
warmed first (emlib.record.warm_worker: imports, CUDA context), then timing the parts of loading the model.

    python bench/worker_load.py --workers 8 --model embedded --out bench/results/worker_load.json
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor


def _load(model: str, t_start: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emlib import models

    out = {"queued_s": round(time.time() - t_start, 2)}
    path = models.prepare_source(model)
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    out["tokenizer_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    out["from_pretrained_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    m.to("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out["to_device_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    models.load_model(model)
    out["load_model_again_s"] = round(time.perf_counter() - t, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import multiprocessing as mp

    from emlib import models, record, runner

    t0 = time.time()
    models.prepare_source(a.model)
    prep = round(time.time() - t0, 2)
    pool = ProcessPoolExecutor(a.workers, mp_context=mp.get_context("spawn"), initializer=record.warm_worker)
    runner.start_workers(pool, a.workers)
    time.sleep(20)  # the run of record converts the model meanwhile (18-20 s on an H100)
    t1 = time.time()
    rows = list(pool.map(_load, [a.model] * a.workers, [t1] * a.workers))
    res = {"workers": a.workers, "prepare_s": prep, "all_loaded_s": round(time.time() - t1, 2), "rows": rows}
    pool.shutdown()
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
