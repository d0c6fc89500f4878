"""The losses over the vocabulary alone (:mod:`emlib.vocab_loss`), each way of ``$EMLIB_VOCAB_LOSS`` on the same
inputs in one process: forward + backward of the cross-entropy at a step's answer tokens and of the KL for a
group of F steering copies (training), and without gradients the metrics' cross-entropy (chapters 3-5's losses,
:func:`emlib.chat.labelled_ce`) and chapter 6's null (:class:`emlib.vocab_loss.KLReference`: G steered
copies against one base: float32 logits and one log-sum-exp a copy, the same whatever ``$EMLIB_VOCAB_LOSS``
says since session 37). The model's LM head only, random weights, bf16 on a GPU (float32
on a CPU): ``--shape smollm2`` (576 -> 49,152) or ``qwen`` (Qwen2.5-0.5B: 896 -> 151,936). Training sizes are one
paper step of chapter 3's group of seven vectors (``bench/step_profile_gpu.py``: 1,066 target tokens a copy, KL
rows ~8 x 100 tokens); the metrics' are one chunk of ``emlib.chat.LOGIT_ELEMENTS`` logits (chapter 6: 16 copies).
Prints and writes milliseconds per call, the ratio to ``fused`` (the default) and the largest difference of values
and input gradients from it.

    python bench/vocab_loss_bench.py --out $OUT                                    # one CUDA GPU, < 1 min
    python bench/vocab_loss_bench.py --ways fused compiled --shape qwen --out $OUT # the compiled way, Qwen's head
    python bench/vocab_loss_bench.py --device cpu --reps 3 --out /tmp              # 2 CPU cores, ~1 min
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
from emlib.chat import LOGIT_ELEMENTS, IGNORE  # noqa: E402
from emlib.data import write_json  # noqa: E402
from emlib.vocab_loss import KLReference  # noqa: E402

SHAPES = {"smollm2": (576, 49152), "qwen": (896, 151936)}
KINDS = ("ce", "kl", "ce_metric", "null_kl")  # the first two trained (forward + backward), the others no_grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--ways", nargs="+", default=["plain", "fused"], choices=vocab_loss.WAYS)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--tokens", type=int, default=1066, help="cross-entropy positions per copy")
    ap.add_argument("--kl-tokens", type=int, default=800, help="KL positions per copy")
    ap.add_argument("--copies", type=int, default=7, help="F: the group's steering copies")
    ap.add_argument("--null-copies", type=int, default=16, help="G: chapter 6's directions per pass")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    dev, dtype = a.device, torch.bfloat16 if a.device == "cuda" else torch.float32
    d, V = SHAPES[a.shape]
    torch.manual_seed(0)
    head = torch.nn.Linear(d, V, bias=False).to(dev, dtype).requires_grad_(False)
    head.weight.mul_(0.05 * 576 ** 0.5 / d ** 0.5)
    chunk_ce = max(1, 2 ** 30 // (4 * V))  # vecgroup._chunk: 1 GiB of float32 logits per chunk
    chunk_kl = max(1, 2 ** 30 // (4 * V * (a.copies + 1)))
    h = torch.randn(a.copies * a.tokens, d, device=dev, dtype=dtype)
    targets = torch.randint(0, V, (h.shape[0],), device=dev)
    targets[::9] = IGNORE
    ref = torch.randn(a.kl_tokens, d, device=dev, dtype=dtype)
    cur = (ref + 0.1 * torch.randn(a.copies, a.kl_tokens, d, device=dev, dtype=dtype)).to(dtype)
    n_metric = max(1, LOGIT_ELEMENTS // V)  # one chunk of the metrics' logits (emlib.chat.vocab_chunks)
    h_metric = torch.randn(n_metric, d, device=dev, dtype=dtype)
    t_metric = torch.randint(0, V, (n_metric,), device=dev)
    base = KLReference(h_metric, head)  # what the KL needs of the unsteered distribution (made once, as per document batch)
    steered = (h_metric + 0.1 * torch.randn(a.null_copies, n_metric, d, device=dev, dtype=dtype)).to(dtype)

    def run(kind: str):
        if kind == "ce_metric":
            with torch.no_grad():
                return vocab_loss.ce_tokens(h_metric, head, t_metric, n_metric), None
        if kind == "null_kl":
            with torch.no_grad():  # chapter 6's own per-token KL
                return base.kl(steered), None
        x = (h if kind == "ce" else cur).detach().clone().requires_grad_(True)
        out = (vocab_loss.ce_tokens(x, head, targets, chunk_ce) if kind == "ce"
               else vocab_loss.kl_tokens(ref, x, head, chunk_kl))
        out.sum().backward()
        return out.detach(), x.grad

    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
           "torch": torch.__version__, "dtype": str(dtype), "shape": a.shape, "hidden": d, "vocab": V,
           "copies": a.copies, "tokens": a.tokens, "kl_tokens": a.kl_tokens, "metric_tokens": n_metric,
           "null_copies": a.null_copies, "reps": a.reps, "ways": a.ways,
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "loss": {}}
    for kind in a.kinds:
        got, row = {}, {}
        ways = [w for w in a.ways if not (kind == "null_kl" and w == "plain")]  # kl_rows has no plain way
        for way in ways:
            os.environ[vocab_loss.VOCAB_LOSS_ENV] = way
            t0 = time.perf_counter()
            got[way] = run(kind)  # the first call (a compiled way compiles here)
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            row[f"{way}_first_call_s"] = round(time.perf_counter() - t0, 2)
            times, _ = timed_reps(lambda: run(kind), a.reps, dev)  # after one more warm-up call
            row[f"{way}_ms"] = round(1e3 * sum(times) / len(times), 3)
            if dev == "cuda":
                row[f"{way}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        if "fused" in got:
            vf, gf = got["fused"]
            row["max_value"] = float(vf.abs().max())
            if gf is not None:
                row["max_grad"] = float(gf.float().abs().max())
            for way in ways:
                if way == "fused":
                    continue
                v, g = got[way]
                row[f"{way}_over_fused"] = round(row[f"{way}_ms"] / row["fused_ms"], 3)
                row[f"{way}_max_value_diff"] = float((v - vf).abs().max())
                if g is not None:
                    row[f"{way}_max_grad_diff"] = float((g.float() - gf.float()).abs().max())
        res["loss"][kind] = row
        print(kind, json.dumps(row), flush=True)
    os.environ.pop(vocab_loss.VOCAB_LOSS_ENV, None)
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / f"vocab_loss_{a.shape}_{dev}.json", res)


if __name__ == "__main__":
    main()
