"""How far chapter 6's per-token KL is from the exact KL of the same hidden states, computed two ways: from bf16
logits (``emlib.vocab_loss.kl_rows``, what chapter 6 did before session 37) and from float32 logits with
``LSE(z') - LSE(z) - u . (h' - h)`` (:class:`emlib.vocab_loss.KLReference`). The model in bf16 (as on a GPU; here on
the CPU), its hidden states at the steering layer's output moved by a random direction at two norms (0.2 and 1.0
of the SmolLM2 run of record's reference norm, 21.0), the exact KL in float64 from those same states.

    python bench/kl_precision.py --out bench/results          # the embedded SmolLM2-135M, 4 Lee documents x 256 tokens
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from emlib import corpus
from emlib.chat import head_inputs
from emlib.hooks import add_rows
from emlib.models import embedded_model_dir
from emlib.vectors import random_vector
from emlib.vocab_loss import KLReference, kl_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--norms", type=float, nargs="+", default=[4.2, 21.0])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    texts = corpus.load_texts(a.docs, a.tokens, tok, source="offline", seed=0)
    ids = [tok(t)["input_ids"][:a.tokens] for t in texts]
    n = max(len(x) for x in ids)
    inp = torch.tensor([x + [0] * (n - len(x)) for x in ids])  # [b, s] right-padded
    att = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
    real = att.bool()
    w = model.lm_head.weight.double()
    res = {"model": "SmolLM2-135M-Instruct (bf16, CPU)", "docs": a.docs, "tokens": int(real.sum()), "layer": a.layer,
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "norms": {}}
    with torch.no_grad():
        states, head = head_inputs(model, inp, att)
        h = states[real]  # [n, d] bf16
        lp = torch.log_softmax(h.double() @ w.t(), -1)
        ref = KLReference(h, head)
        for norm in a.norms:
            v = random_vector(model.config.hidden_size, norm, 1).to(torch.bfloat16)
            with add_rows(model, a.layer, v[None].repeat(inp.shape[0], 1)):
                h2 = head_inputs(model, inp, att)[0][real]
            lq = torch.log_softmax(h2.double() @ w.t(), -1)
            exact = (lp.exp() * (lp - lq)).sum(-1)  # [n] float64
            logp = torch.log_softmax(head(h), -1, dtype=torch.float32)
            ways = {"bf16 logits (before)": kl_rows(logp.exp(), logp, head(h2[None]))[0].double(),
                    "float32 logits, KLReference": ref.kl(h2[None])[0].double()}
            row = {"exact_mean": float(exact.mean())}
            for name, kl in ways.items():
                err = kl - exact
                row[name] = {"mean": float(kl.mean()), "rel_err_of_mean": float(err.mean() / exact.mean()),
                             "median_abs_err": float(err.abs().median()), "max_abs_err": float(err.abs().max())}
            res["norms"][str(norm)] = row
            print(norm, json.dumps(row), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "kl_precision_cpu.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
