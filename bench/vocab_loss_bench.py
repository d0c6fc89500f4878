"""The training losses over the vocabulary alone (:mod:`emlib.vocab_loss`): forward + backward of the
cross-entropy at a step's answer tokens and of the KL for a group of F steering copies, the ``fused`` way
against the ``plain`` way (head, float32 log-softmax, loss under activation checkpointing), same inputs, same
process. SmolLM2-135M's head (576 -> 49,152, bf16 on a GPU, float32 on a CPU) with random weights; the token
counts of one paper step of chapter 3's group of seven vectors (``bench/step_profile_gpu.py``: 1,066 target
tokens, KL rows ~8 x 100 tokens). Prints and writes seconds per call, the ratio, and the largest difference of
values and input gradients between the ways.

    python bench/vocab_loss_bench.py --out $OUT                       # one CUDA GPU, < 1 min
    python bench/vocab_loss_bench.py --device cpu --reps 3 --out /tmp # 2 CPU cores, ~1 min
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metric_profile_gpu import timed_reps  # noqa: E402

from emlib import vocab_loss  # noqa: E402
from emlib.data import write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tokens", type=int, default=1066, help="cross-entropy positions per copy")
    ap.add_argument("--kl-tokens", type=int, default=800, help="KL positions per copy")
    ap.add_argument("--copies", type=int, default=7, help="F: the group's steering copies")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    dev, dtype = a.device, torch.bfloat16 if a.device == "cuda" else torch.float32
    torch.manual_seed(0)
    head = torch.nn.Linear(576, 49152, bias=False).to(dev, dtype).requires_grad_(False)
    V = head.weight.shape[0]
    chunk_ce = max(1, 2 ** 30 // (4 * V))  # vecgroup._chunk: 1 GiB of float32 logits per chunk
    chunk_kl = max(1, 2 ** 30 // (4 * V * (a.copies + 1)))
    h = torch.randn(a.copies * a.tokens, 576, device=dev, dtype=dtype)
    targets = torch.randint(0, V, (h.shape[0],), device=dev)
    ref = torch.randn(a.kl_tokens, 576, device=dev, dtype=dtype)
    cur = (ref + 0.1 * torch.randn(a.copies, a.kl_tokens, 576, device=dev, dtype=dtype)).to(dtype)

    def run(kind: str):
        x = (h if kind == "ce" else cur).detach().clone().requires_grad_(True)
        out = (vocab_loss.ce_tokens(x, head, targets, chunk_ce) if kind == "ce"
               else vocab_loss.kl_tokens(ref, x, head, chunk_kl))
        out.sum().backward()
        return out.detach(), x.grad

    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
           "torch": torch.__version__, "dtype": str(dtype), "vocab": V, "copies": a.copies, "tokens": a.tokens,
           "kl_tokens": a.kl_tokens, "reps": a.reps, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "loss": {}}
    for kind in ("ce", "kl"):
        got, row = {}, {}
        for way in ("plain", "fused"):
            os.environ[vocab_loss.VOCAB_LOSS_ENV] = way
            got[way] = run(kind)
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times, _ = timed_reps(lambda: run(kind), a.reps, dev)  # after one warm-up call
            row[f"{way}_ms"] = round(1e3 * sum(times) / len(times), 3)
            if dev == "cuda":
                row[f"{way}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        (vp, gp), (vf, gf) = got["plain"], got["fused"]
        row["fused_over_plain"] = round(row["fused_ms"] / row["plain_ms"], 3)
        row["max_value_diff"] = float((vp - vf).abs().max())
        row["max_value"] = float(vp.abs().max())
        row["max_grad_diff"] = float((gp.float() - gf.float()).abs().max())
        row["max_grad"] = float(gp.float().abs().max())
        res["loss"][kind] = row
        print(kind, json.dumps(row))
    os.environ.pop(vocab_loss.VOCAB_LOSS_ENV, None)
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / f"vocab_loss_{dev}.json", res)


if __name__ == "__main__":
    main()
