"""The metric loops' rows per forward: fixed batches in file order (before) against rows of similar length
together (:func:`emlib.chat.length_batches`, at several per-forward costs), same process, same model.

Random-weight models of the book's two shapes (``bench/metric_batch_gpu.py``), 100 rows whose lengths are drawn
uniformly from 76-198 tokens (the paper's first 100 medical rows in SmolLM2's tokens: mean 137, longest 198),
one forward of at most 128 rows (the paper profile's ``metric_batch_size``), the loss on all but a 40-token
prompt. Reports seconds per :func:`emlib.chat.response_row_losses` call, padded tokens, and the largest
difference of the per-row losses.

    python bench/length_batches_bench.py --out $OUT                # GPU, both shapes
    python bench/length_batches_bench.py --device cpu --shapes smollm2-135m --reps 1 --out bench/results
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metric_batch_gpu import SHAPES, FakeTok, model_of, rows_of  # noqa: E402

from emlib import chat  # noqa: E402


def fixed(lengths, max_rows, forward_tokens=0):
    """Before: file order, ``max_rows`` rows a forward."""
    return [list(range(i, min(i + max_rows, len(lengths)))) for i in range(0, len(lengths), max_rows)]


def run(model, tok, enc, device, batches, forward_tokens, batch_size, reps):
    orig = chat.length_batches
    chat.length_batches = lambda lengths, max_rows, _cost=None: batches(lengths, max_rows, forward_tokens)
    try:
        out = chat.response_row_losses(model, tok, enc, batch_size)  # warm-up (and the numbers)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            chat.response_row_losses(model, tok, enc, batch_size)
        if device == "cuda":
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / reps
    finally:
        chat.length_batches = orig
    lengths = [len(e.input_ids) for e in enc]
    cut = batches(lengths, batch_size, forward_tokens)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in cut)
    return out, {"seconds": round(sec, 4), "forwards": len(cut), "padded_tokens": padded,
                 "padded_over_real": round(padded / sum(lengths), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--shapes", nargs="+", default=sorted(SHAPES), choices=sorted(SHAPES))
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--forward-tokens", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
           "rows": a.rows, "batch_size": a.batch_size, "reps": a.reps,
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "shapes": {}}
    for shape in a.shapes:
        model = model_of(shape, a.device)
        tok = FakeTok({}, SHAPES[shape]["vocab_size"])
        enc = rows_of(SHAPES[shape]["vocab_size"], a.rows, lengths=(76, 198))
        (want, _), r = run(model, tok, enc, a.device, fixed, 0, a.batch_size, a.reps)
        out = {"fixed": r}
        for ft in a.forward_tokens:
            (got, _), r = run(model, tok, enc, a.device, chat.length_batches, ft, a.batch_size, a.reps)
            r["max_rel_diff"] = float(np.max(np.abs(np.array(got) - np.array(want)) / np.abs(np.array(want))))
            r["over_fixed"] = round(r["seconds"] / out["fixed"]["seconds"], 3)
            out[f"length_{ft}"] = r
        res["shapes"][shape] = out
        print(shape, json.dumps(out), flush=True)
        del model
    a.out.mkdir(parents=True, exist_ok=True)
    dev = "cpu" if a.device == "cpu" else torch.cuda.get_device_name().split()[1].lower()
    path = a.out / f"length_batches_{dev}.json"
    path.write_text(json.dumps(res, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
