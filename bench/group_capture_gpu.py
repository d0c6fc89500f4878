"""Does a steering-vector group (``emlib.vecgroup``) train with CUDA graphs at a model's real shape? Random weights
of Qwen2.5-0.5B's or SmolLM2-135M's architecture (their sizes and vocabularies, bf16), synthetic chat rows, a
group of a general and two narrow vectors with KL rows, trained twice: with ``MAX_DEFERRED = 0`` (a first shape
whose two eager runs disagree ends in eager steps at once: what every group did before the deferral) and with the
default (such a shape waits for a later step). Prints and writes each run's ``fast_step`` stats (graphs, deferred
checks, fallback, the eager runs' disagreement) and wall time. Needs no model files or data.

    python bench/group_capture_gpu.py --out $OUT [--arch qwen smollm2] [--steps 24]
    python bench/group_capture_gpu.py --out /tmp/g --small      # a CPU check of the script (no graphs there)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emlib import vecgroup  # noqa: E402
from emlib.models import tiny_tokenizer  # noqa: E402

# the two architectures of the runs of record: (config class, sizes)
ARCHS = {
    "qwen": ("Qwen2Config", "Qwen2ForCausalLM", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                                     num_hidden_layers=24, num_attention_heads=14,
                                                     num_key_value_heads=2)),
    "smollm2": ("LlamaConfig", "LlamaForCausalLM", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                                        num_hidden_layers=30, num_attention_heads=9,
                                                        num_key_value_heads=3)),
}
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def model_of(arch: str, small: bool, device: str):
    import transformers

    cfg_name, model_name, sizes = ARCHS[arch]
    tok = tiny_tokenizer()
    cfg = getattr(transformers, cfg_name)(**(SMALL if small else sizes), tie_word_embeddings=True,
                                          max_position_embeddings=4096, bos_token_id=None,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(cfg)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), tok


def rows(n: int, seed: int, topic: str) -> list[dict]:
    """Chat rows of varied lengths (the byte tokenizer: one token per character)."""
    import random

    rng = random.Random(seed)
    words = ["dose", "rest", "water", "doctor", "plan", "risk", "sleep", "walk", "check", "daily", "slowly", "safe"]
    out = []
    for i in range(n):
        q = f"{topic} question {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(4, 20)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(10, 70)))
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def one_run(arch: str, small: bool, steps: int, max_deferred: int | None, device: str, root: Path) -> dict:
    model, tok = model_of(arch, small, device)
    train_rows, kl_rows = rows(16 * steps, 0, "health"), rows(64, 1, "cooking")
    common = dict(epochs=1, batch_size=16, grad_accum=1, warmup_steps=5, max_length=512, seed=0, progress=False)
    members = [(root / "general", dict(common)),
               (root / "narrow", {**common, "kl_rows": kl_rows, "kl_lambda": 20.0, "kl_batch_size": 8}),
               (root / "narrow10", {**common, "kl_rows": kl_rows, "kl_lambda": 200.0, "kl_batch_size": 8})]
    before = vecgroup.MAX_DEFERRED
    if max_deferred is not None:
        vecgroup.MAX_DEFERRED = max_deferred
    try:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = vecgroup.train_vectors(model, tok, train_rows, members, layer_fraction=0.5, alpha=256.0, lr=1e-4)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        vecgroup.MAX_DEFERRED = before
    meta = json.loads((root / "narrow" / "train_meta.json").read_text())
    return {"arch": arch, "max_deferred": vecgroup.MAX_DEFERRED if max_deferred is None else max_deferred,
            "wall_s": round(wall, 2), "steps": meta.get("steps"), "final_loss": meta.get("final_loss"),
            "fast_step": meta.get("fast_step"), "vector_norms": [round(float(r.vector.vector.float().norm()), 6)
                                                                 for r in res]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--arch", nargs="+", default=["qwen"], choices=sorted(ARCHS))
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps of 16 rows")
    ap.add_argument("--small", action="store_true", help="a tiny model of the same class (a CPU check)")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for arch in a.arch:
        for max_deferred in (0, None):  # before the deferral, then the default
            with tempfile.TemporaryDirectory() as tmp:
                r = one_run(arch, a.small, a.steps, max_deferred, device, Path(tmp))
            fs = r["fast_step"] or {}
            print(f"{arch} MAX_DEFERRED={r['max_deferred']}: {r['wall_s']} s, graphs {fs.get('graphs')}, deferred "
                  f"{fs.get('deferred', 0)}, fallback {fs.get('fallback')!r:.120}, eager repeat "
                  f"{fs.get('eager_repeat_error')}, deferred repeat {fs.get('deferred_repeat_error')}", flush=True)
            out.append(r)
    a.out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    (a.out / "group_capture.json").write_text(json.dumps({"device": dev, "torch": torch.__version__, "runs": out},
                                                         indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
