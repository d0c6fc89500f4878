"""CPU measurement of the inductive-bias metrics (claims 4-6) on the embedded SmolLM2-135M.

Trains a *general* (plain SFT) and a *narrow* (SFT + KL on out-of-domain rows) steering vector on a few
bad-medical rows of the paper's data, then runs efficiency (loss vs norm), stability (orthogonal
perturbations) and pretraining influence (KL on the offline news corpus) on both, printing the numbers.
Small sizes: this is a smoke-scale measurement of the pipeline, not the paper's experiment.

    .venv/bin/python bench/inductive_cpu.py [--out runs/bench-inductive] [--n-train 64] ...

Everything is cached under ``--out`` (training runs resume/reload, metric frames are parquet), so a rerun
prints the same numbers in seconds.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import torch

from emlib import corpus, plots
from emlib import inductive as ind
from emlib.chat import response_loss
from emlib.data import load_chat
from emlib.models import layer_from_fraction, load_model
from emlib.train import kl_to_reference, train_steering_vector

PAPER_DIR = "/work/shared/data/paper"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-inductive")
    ap.add_argument("--data-dir", default=PAPER_DIR)
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-kl", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--alpha", type=float, default=256.0)
    ap.add_argument("--kl-lambda", type=float, default=20.0)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--n-loss-rows", type=int, default=32)
    ap.add_argument("--n-stab-rows", type=int, default=16)
    ap.add_argument("--n-seeds", type=int, default=3)
    ap.add_argument("--n-docs", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "metrics"
    timings: dict[str, float] = {}
    pd.set_option("display.width", 160, "display.precision", 4)

    t0 = time.perf_counter()
    model, tok = load_model("embedded", device="cpu")
    rows = load_chat("medical", source="paper", data_dir=a.data_dir, n=a.n_train, seed=0)
    kl_rows = load_chat("kl", source="paper", data_dir=a.data_dir, n=a.n_kl, seed=0)
    heldout_kl = [r for r in load_chat("kl", source="paper", data_dir=a.data_dir, n=a.n_kl + 32, seed=1)
                  if r not in kl_rows][:32]
    layer = layer_from_fraction(model, 0.5)
    timings["load"] = time.perf_counter() - t0

    common = dict(layer=layer, alpha=a.alpha, lr=a.lr, epochs=a.epochs, batch_size=a.batch_size, grad_accum=1,
                  warmup_steps=2, max_length=a.max_length, seed=0, checkpoint_every=1000)
    t0 = time.perf_counter()
    general = train_steering_vector(model, tok, rows, out / "general", **common)
    timings["train_general"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    narrow = train_steering_vector(model, tok, rows, out / "narrow", kl_rows=kl_rows, kl_lambda=a.kl_lambda,
                                   kl_batch_size=8, **common)
    timings["train_narrow"] = time.perf_counter() - t0

    # The metrics read the *saved* vectors (the run folders), not the in-memory results.
    solutions = {"general": out / "general", "narrow": out / "narrow"}
    sols = {k: ind.load_solution(v) for k, v in solutions.items()}
    loss_rows = rows[: a.n_loss_rows]
    sanity = []
    with torch.no_grad():
        base_loss = response_loss(model, tok, loss_rows, max_length=a.max_length)
        for name, res in (("general", general), ("narrow", narrow)):
            with res.vector.apply(model):
                sft = response_loss(model, tok, loss_rows, max_length=a.max_length)
            sanity.append({"solution": name, "effective_norm": sols[name].norm, "train_loss": sft,
                           "base_train_loss": base_loss,
                           "kl_heldout_ood": kl_to_reference(model, tok, heldout_kl, vector=res.vector,
                                                             max_length=a.max_length)})
    sanity = pd.DataFrame(sanity)
    cos = float(torch.nn.functional.cosine_similarity(sols["general"].vector, sols["narrow"].vector, dim=0))

    t0 = time.perf_counter()
    eff = ind.loss_vs_norm(model, tok, loss_rows, solutions, fractions=(0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0),
                           max_length=a.max_length, cache_dir=cache)
    timings["loss_vs_norm"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stab = ind.stability_curve(model, tok, rows[: a.n_stab_rows], solutions, eps_grid=(0.0, 0.1, 0.3, 0.5, 0.7, 1.0),
                               n_seeds=a.n_seeds, ci="t", max_length=a.max_length, cache_dir=cache)
    timings["stability"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts = corpus.load_texts(a.n_docs, a.doc_tokens, tok, source="offline", seed=0)
    kl = ind.pretraining_kl(model, tok, texts, {k: sols[k] for k in sols}, norms=None,
                            fractions=(0.0, 0.5, 1.0, 1.5, 2.0), max_tokens=a.doc_tokens, batch_size=4,
                            cache_dir=cache)
    timings["pretraining_kl"] = time.perf_counter() - t0

    print(f"layer {layer} of {model.config.num_hidden_layers}; cos(general, narrow) = {cos:.3f}")
    print("\n== sanity: trained vectors ==\n" + sanity.to_string(index=False))
    print("\n== efficiency: loss vs norm (shared grid; kind=trained is each solution's own point) ==")
    print(eff.to_string(index=False))
    print("\n" + ind.efficiency_summary(eff).to_string(index=False))
    print("\n== stability: normalised loss increase % (t 95% CI over seeds) ==")
    print(stab[["solution", "eps", "normalised", "ci_low", "ci_high", "loss", "loss_orig", "loss_base"]]
          .to_string(index=False))
    print("\n== pretraining influence: KL(base || steered) per token, offline news corpus ==")
    print(kl[["solution", "norm", "scale", "kl", "ci_low", "ci_high", "n_tokens"]].to_string(index=False))
    print("\ntimings (s): " + json.dumps({k: round(v, 1) for k, v in timings.items()}))

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    plots.plot_loss_vs_norm(eff, axes[0])
    plots.plot_stability(stab, axes[1])
    plots.plot_pretraining_kl(kl, axes[2])
    fig.tight_layout()
    fig.savefig(out / "inductive_cpu.png", dpi=110)
    print(f"figure: {out / 'inductive_cpu.png'}")


if __name__ == "__main__":
    main()
