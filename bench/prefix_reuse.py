"""Chapters 5 and 6's metric loops with and without reusing the layers below the steering layer
(:mod:`emlib.prefix`; ``emlib.prefix.ENABLED`` switches it), same process, same model.

Random-weight models of the book's two shapes (SmolLM2-135M, Qwen2.5-0.5B; no download, see
``bench/metric_batch_gpu.py``), steering vectors at the middle layer (as the chapters'). Workloads:
chapter 5's ``stability_losses`` (2 vectors x (1 + 3 eps x 3 draws) + the base model on ``--rows`` rows of
150-512 tokens) and chapter 6's ``random_null_kl`` (``--draws`` directions x 11 norms on ``--docs``
documents of 512 tokens). Reports seconds both ways, the ratio, and the largest difference of the numbers.

    python bench/prefix_reuse.py --out $OUT                          # GPU, paper sizes (100 rows, 50 docs, 16 draws)
    python bench/prefix_reuse.py --device cpu --shape smollm2-135m --rows 16 --docs 4 --draws 4 --out bench/results
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metric_batch_gpu import SHAPES, FakeTok, model_of, rows_of  # noqa: E402

from emlib import inductive as ind  # noqa: E402
from emlib import prefix  # noqa: E402
from emlib.vectors import random_vector  # noqa: E402


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, round(time.perf_counter() - t0, 2)


def bench(shape: str, device: str, n_rows: int, n_docs: int, n_draws: int, batch: int) -> dict:
    model = model_of(shape, device)
    vocab, d = model.config.vocab_size, model.config.hidden_size
    layer = model.config.num_hidden_layers // 2
    rows = rows_of(vocab, n_rows)
    g = np.random.default_rng(1)
    names = [f"doc{i}" for i in range(n_docs)]
    tok = FakeTok({n: g.integers(1, vocab, 512).tolist() for n in names}, vocab)
    sols = {"general": random_vector(d, 8.0, 1), "narrow": random_vector(d, 2.0, 2)}
    cache = tempfile.mkdtemp()
    kw = dict(eps_grid=(0.0, 0.5, 1.0), n_seeds=3, layer=layer, cache_dir=cache, use_cache=False,
              batch_size=batch, progress=False)
    grid = [0.5 * i for i in range(11)]
    out = {"shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "layer": layer, "layers": model.config.num_hidden_layers,
           "rows": n_rows, "docs": n_docs, "draws": n_draws, "batch": batch}
    ind.stability_losses(model, tok, rows[:2], sols, **{**kw, "n_seeds": 1})  # warm-up
    frames = {}
    for on in (False, True):
        prefix.ENABLED = on
        tag = "reuse" if on else "whole"
        frames[("st", on)], out[f"stability_{tag}_s"] = timed(
            lambda: ind.stability_losses(model, tok, rows, sols, **kw), device)
        frames[("null", on)], out[f"null_{tag}_s"] = timed(lambda: ind.random_null_kl(
            model, tok, names, layer, grid, n_draws=n_draws, seed=0, batch_size=batch, draws_per_pass=2,
            cache_dir=cache, use_cache=False, progress=False), device)
    prefix.ENABLED = True
    out["stability_ratio"] = round(out["stability_whole_s"] / out["stability_reuse_s"], 2)
    out["null_ratio"] = round(out["null_whole_s"] / out["null_reuse_s"], 2)
    out["stability_max_abs_loss_diff"] = float(np.abs(frames[("st", True)]["loss"].to_numpy()
                                                      - frames[("st", False)]["loss"].to_numpy()).max())
    a, b = frames[("null", True)]["kl"].to_numpy(), frames[("null", False)]["kl"].to_numpy()
    out["null_max_abs_kl_diff"] = float(np.abs(a - b).max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--docs", type=int, default=50)
    ap.add_argument("--draws", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None, help="rows / documents a forward (default: all of them)")
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("No CUDA device: pass --device cpu (with small --rows/--docs/--draws).")
    path = Path(a.out) / f"prefix_reuse_{a.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    res = []
    for s in a.shape:  # written after each shape: a run cut short keeps what it finished
        res.append(bench(s, a.device, a.rows, a.docs, a.draws, a.batch or max(a.rows, a.docs)))
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res[-1], indent=2), flush=True)


if __name__ == "__main__":
    main()
