"""GPU measurement of the metric loops' batch size (Config.metric_batch_size): chapter 5's loss loop and chapter
6's null, before (full logits, 8 rows / 4 documents a forward) and after (logits chunked, many rows a forward).

Random-weight models of the two shapes the book runs (SmolLM2-135M and Qwen2.5-0.5B; no download) in bf16,
rows of random token ids of the paper profile's sizes: 100 loss rows of 150-512 tokens (the answer after 40
prompt tokens), 50 documents of 512 tokens. Reports seconds, the peak of GPU memory above the model's weights,
and the largest difference of the numbers between the two paths.

    python bench/metric_batch_gpu.py [--out bench/results/metric_batch_h200.json]
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import numpy as np
import torch

from emlib import chat
from emlib import inductive as ind
from emlib.chat import Encoded, collate, token_losses
from emlib.hooks import add_rows
from emlib.vectors import random_vector

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
}


class FakeTok:
    """What the metrics read of a tokenizer: documents are names of pre-drawn token ids."""

    name_or_path, chat_template, pad_token_id = "random", "", 0

    def __init__(self, docs: dict[str, list[int]], vocab: int):
        self.docs, self.vocab = docs, vocab

    def __len__(self):
        return self.vocab

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self.docs[text]}


def model_of(shape: str, device: str = "cuda"):
    """A random-weight model of ``shape``: bf16 on a GPU, float32 on a CPU."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    return model


def rows_of(vocab: int, n: int = 100, seed: int = 0, lengths: tuple[int, int] = (150, 512)) -> list[Encoded]:
    """``n`` rows of random token ids, lengths uniform in ``lengths`` (both ends included), labels after the
    first 40 tokens."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(g.integers(lengths[0], lengths[1] + 1))
        ids = g.integers(1, vocab, k).tolist()
        out.append(Encoded(ids, [chat.IGNORE] * 40 + ids[40:]))
    return out


@torch.no_grad()
def old_response_loss(model, tok, rows, batch_size: int = 8, max_length: int = 512) -> float:
    """emlib.chat.response_loss before the chunked head: full [rows, tokens, vocab] logits."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        s, c = token_losses(model, collate(rows[i:i + batch_size], tok.pad_token_id, device))
        total, count = total + float(s), count + int(c)
    return total / max(count, 1)


@torch.no_grad()
def old_null(model, docs: torch.Tensor, dirs: torch.Tensor, grid, layer: int, batch: int = 4, per_pass: int = 16):
    """emlib.inductive.random_null_kl's loop before: base log-probs kept [b, s, v], full steered logits."""
    sums = torch.zeros(dirs.shape[0], len(grid), dtype=torch.float64)
    groups = [list(range(k, min(k + per_pass, dirs.shape[0]))) for k in range(0, dirs.shape[0], per_pass)]
    for i in range(0, docs.shape[0], batch):
        inp = docs[i:i + batch]
        att = torch.ones_like(inp)
        logp = torch.log_softmax(model(input_ids=inp, attention_mask=att).logits.float(), -1)
        b = inp.shape[0]
        for g in groups:
            rep_inp, rep_att, rep_base = inp.repeat(len(g), 1), att.repeat(len(g), 1), logp.repeat(len(g), 1, 1)
            for j, t in enumerate(grid):
                with add_rows(model, layer, (dirs[g] * t).to(inp.device).repeat_interleave(b, 0)):
                    q = torch.log_softmax(model(input_ids=rep_inp, attention_mask=rep_att).logits.float(), -1)
                kl = (rep_base.exp() * (rep_base - q)).sum(-1).sum(1)
                sums[g, j] += kl.view(len(g), b).sum(1).double().cpu()
    return (sums / docs.numel()).numpy()


def timed(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t, (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def bench(shape: str, n_draws: int, old_kl: bool) -> dict:
    model = model_of(shape)
    vocab, d = model.config.vocab_size, model.config.hidden_size
    layer = model.config.num_hidden_layers // 2
    rows = rows_of(vocab)
    g = np.random.default_rng(1)
    names = [f"doc{i}" for i in range(50)]
    tok = FakeTok({n: g.integers(1, vocab, 512).tolist() for n in names}, vocab)
    sols = {"general": random_vector(d, 8.0, 1), "narrow": random_vector(d, 2.0, 2)}
    out = {"shape": shape, "vocab": vocab, "gpu": torch.cuda.get_device_name()}
    cache = tempfile.mkdtemp()
    # chapter 5: stability_losses, 2 solutions x (1 + 3 eps x 3 draws) + the base: 21 losses of 100 rows
    kw = dict(eps_grid=(0.0, 0.5, 1.0), n_seeds=3, layer=layer, cache_dir=cache, use_cache=False)
    frames = {}
    old_response_loss(model, tok, rows[:16])  # warm-up of both paths
    chat.response_loss(model, tok, rows[:16], 16)
    ind.stability.response_loss, new_loss = old_response_loss, ind.stability.response_loss
    try:
        frames["old_b8"], out["stability_old_b8_s"], out["stability_old_b8_peak_gib"] = timed(
            lambda: ind.stability_losses(model, tok, rows, sols, batch_size=8, **kw))
    finally:
        ind.stability.response_loss = new_loss
    for bs in (8, 128):
        frames[f"b{bs}"], out[f"stability_new_b{bs}_s"], out[f"stability_new_b{bs}_peak_gib"] = timed(
            lambda: ind.stability_losses(model, tok, rows, sols, batch_size=bs, **kw))
    out["stability_max_abs_loss_diff"] = max(float(np.abs(frames[k]["loss"] - frames["old_b8"]["loss"]).max())
                                             for k in ("b8", "b128"))
    out["loss_value"] = float(frames["b128"]["loss_base"].iloc[0])
    # chapter 6: random_null_kl, n_draws directions x 11 norms on 50 documents of 512 tokens
    grid = [0.5 * i for i in range(11)]
    new, out["null_new_s"], out["null_new_peak_gib"] = timed(lambda: ind.random_null_kl(
        model, tok, names, layer, grid, n_draws=n_draws, seed=0, batch_size=50, draws_per_pass=2,
        cache_dir=cache, use_cache=False))
    out["null_forwards_new"] = 11 * math.ceil(n_draws / 2)
    if old_kl:
        docs = torch.tensor([tok.docs[n] for n in names], device="cuda")
        dirs = torch.stack([random_vector(d, 1.0, 1 + k) for k in range(n_draws)])
        old, out["null_old_s"], out["null_old_peak_gib"] = timed(lambda: old_null(model, docs, dirs, grid, layer))
        out["null_forwards_old"] = 11 * math.ceil(n_draws / 16) * 13
        newk = new.pivot(index="draw", columns="norm", values="kl").to_numpy()
        out["null_max_rel_kl_diff"] = float(np.nanmax(np.abs(newk[:, 1:] - old[:, 1:]) / old[:, 1:]))
    out["n_draws"] = n_draws
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--draws", type=int, default=16)
    a = ap.parse_args()
    res = [bench("smollm2-135m", a.draws, old_kl=True), bench("qwen2.5-0.5b", a.draws, old_kl=False)]
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
