"""CPU measurement of emlib.train on the embedded SmolLM2-135M: rank-1 and rank-32 LoRA, and a steering
vector with KL, on a few of the paper's bad-medical rows.

Reports, per run: responses-only loss on the training rows before/after (emlib.chat.response_loss),
training tokens/s (answer tokens and all input tokens), wall time, and for the vector run the KL to the
chat model on the KL rows before/after. Writes ``train_cpu.csv`` to ``--out`` (outside the repo by default).

    .venv/bin/python bench/train_cpu.py --n 64 --lr 2e-4   # ~4 min a run on 2 busy cores
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from emlib import adapters
from emlib.chat import response_loss
from emlib.data import load_chat
from emlib.models import load_model
from emlib.train import kl_to_reference, train_lora, train_steering_vector

PAPER_DIR = "/work/shared/data/paper"


def _row(name: str, res, before: float, after: float, wall: float, **extra) -> dict:
    last = res.log.iloc[-1]
    return {"run": name, "rows": int(res.meta.get("n_train_rows", 0)), "steps": int(res.step),
            "loss_before": before, "loss_after": after,
            "train_seconds": float(last["seconds"]), "wall_seconds": wall,
            "answer_tokens_per_s": float(last["tokens"] / last["seconds"]),
            "input_tokens_per_s": float(last["input_tokens"] / last["seconds"]),
            "load_avg_1min": os.getloadavg()[0], **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="training rows (bad medical advice, paper data)")
    ap.add_argument("--n-vector", type=int, default=32, help="training rows of the steering-vector run")
    ap.add_argument("--n-kl", type=int, default=16, help="out-of-domain KL rows of the vector run")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4, help="LoRA lr (the quick profile's; the paper's 1e-5/2e-5 "
                                                           "barely move in ~12 steps)")
    ap.add_argument("--vector-lr", type=float, default=1e-4)
    ap.add_argument("--kl-lambda", type=float, default=6.6,
                    help="per-token KL weight (~ the authors' 1e6 / Qwen vocabulary 151936)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/emlib-bench-train")
    ap.add_argument("--runs", default="rank1,rank32,vector")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)  # always retrain: this is a timing
    rows = load_chat("medical", source="paper", data_dir=PAPER_DIR, n=a.n, seed=0)
    results = []
    common = dict(epochs=1, batch_size=a.batch_size, grad_accum=1, max_length=a.max_length, seed=0,
                  checkpoint_every=10_000)
    for shape in [s for s in ("rank1", "rank32") if s in a.runs.split(",")]:
        model, tok = load_model("embedded", device="cpu")
        before = response_loss(model, tok, rows, max_length=a.max_length)
        t0 = time.perf_counter()
        res = train_lora(model, tok, rows, out / shape, shape=shape, lr=a.lr, **common)
        wall = time.perf_counter() - t0
        after = response_loss(res.model, tok, rows, max_length=a.max_length)
        n_params = sum(p.numel() for n, p in res.model.named_parameters() if "lora_" in n)
        results.append(_row(f"lora-{shape}", res, before, after, wall, lr=a.lr, trainable_params=n_params,
                            adapter_norm=adapters.norm(res.model)))
        print(results[-1], flush=True)
    if "vector" in a.runs.split(","):
        model, tok = load_model("embedded", device="cpu")
        vrows = rows[: a.n_vector]
        kl_rows = load_chat("kl", source="paper", data_dir=PAPER_DIR, n=a.n_kl, seed=0)
        before = response_loss(model, tok, vrows, max_length=a.max_length)
        t0 = time.perf_counter()
        res = train_steering_vector(model, tok, vrows, out / "vector", lr=a.vector_lr, kl_rows=kl_rows,
                                    kl_lambda=a.kl_lambda, **{**common, "epochs": 1})
        wall = time.perf_counter() - t0
        with res.vector.apply(model):
            after = response_loss(model, tok, vrows, max_length=a.max_length)
        kl_after = kl_to_reference(model, tok, kl_rows, vector=res.vector, max_length=a.max_length)
        results.append(_row("vector+KL", res, before, after, wall, lr=a.vector_lr,
                            trainable_params=res.vector.vector.numel(), kl_lambda=a.kl_lambda,
                            kl_first_step=float(res.log["kl"].iloc[0]), kl_last_step=float(res.log["kl"].iloc[-1]),
                            kl_after=kl_after, vector_norm=float(res.vector.vector.norm()),
                            layer=res.vector.layer))
        print(results[-1], flush=True)
    df = pd.DataFrame(results)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "train_cpu.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(df.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
