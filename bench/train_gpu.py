"""Benchmark: emlib.fasttrain.fast_sft_lora against a plain peft + AdamW loop (and emlib.train.train_lora),
in one run on one GPU. Not a test: it prints numbers and writes ``train.json``.

Model: SmolLM2-135M-Instruct's architecture (its config.json), random weights, bf16; LoRA rank 32 on all
seven linear projections of every layer (``emlib.train``'s "rank32" shape). Data: synthetic encoded rows
whose lengths follow the paper's bad-medical-advice set under SmolLM2's tokenizer (prompt incl. chat template
~72 tokens, answer ~62, total 80..203, mean ~135); token ids are random (speed does not depend on them).

tokens/s = real (non-pad) input tokens per second, warm-up steps excluded, for every loop.

    python bench/train_gpu.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emlib.chat import IGNORE, Encoded, collate  # noqa: E402
from emlib.fasttrain import fast_sft_lora  # noqa: E402
from emlib.train import add_lora  # noqa: E402

DEVICE = "cuda"
SMOKE = False


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(model_dir: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    if SMOKE:
        cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = 2, 64, 128
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 16
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    return model


def synthetic_rows(n: int, vocab: int, seed: int = 0) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p = int(torch.randint(45, 100, (1,), generator=g))  # prompt incl. template
        a = int(torch.randint(25, 100, (1,), generator=g))  # answer incl. end token
        ids = torch.randint(100, vocab - 1, (p + a,), generator=g).tolist()
        rows.append(Encoded(ids, [IGNORE] * p + ids[p:]))
    return rows


def plain_loop(model, rows: list[Encoded], pad_id: int, batch: int, steps: int, warmup: int,
               fixed_len: int | None = None) -> dict:
    """peft LoRA + torch AdamW (defaults), HF forward with labels, one batch of ``batch`` rows per step."""
    pm = add_lora(model, "rank32")
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    real = 0
    t0 = None
    for s in range(warmup + steps):
        if s == warmup:
            sync()
            t0 = time.perf_counter()
        chunk = [rows[(s * batch + i) % len(rows)] for i in range(batch)]
        if fixed_len:
            ids = torch.randint(100, model.config.vocab_size - 1, (batch, fixed_len), device=DEVICE)
            b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        else:
            b = collate(chunk, pad_id, DEVICE)
        loss = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s >= warmup:
            real += int(b["attention_mask"].sum()) if fixed_len is None else batch * fixed_len
    sync()
    dt = time.perf_counter() - t0
    pm.unload()
    return {"steps": steps, "rows_per_step": batch, "seconds": dt, "tokens": real, "tokens_per_s": real / dt,
            "loss_last": float(loss.detach())}


def fast_run(model, rows, tok, rows_per_step: int, max_tokens: int, steps: int, **kw) -> dict:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    res = fast_sft_lora(model, tok, rows, "rank32", rows_per_step=rows_per_step, max_tokens_per_micro=max_tokens,
                        max_steps=steps, progress=False, timing_skip=2, **kw)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE == "cuda" else None
    out = {"steps": steps, "rows_per_step": rows_per_step, "max_tokens_per_micro": max_tokens,
           "seconds_total": res.seconds, "tokens_per_s": res.tokens_per_s,
           "answer_tokens_per_s": res.answer_tokens_per_s, "loss_first": float(res.log["loss"].iloc[0]),
           "loss_last": float(res.log["loss"].iloc[-1]), "peak_gib": peak, **kw}
    res.model.unload()
    return out


def emlib_train_run(model, tok, rows: list[Encoded], steps: int) -> dict:
    """The project's current loop (emlib.train.train_lora, batch 2 x 8 accumulation), for reference."""
    from emlib.train import train_lora

    words = ["the", "patient", "should", "take", "two", "doses", "of", "water", "daily", "and", "rest", "often"]
    g = torch.Generator().manual_seed(1)

    def text(n: int) -> str:
        return " ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=g))

    chat = [{"messages": [{"role": "user", "content": text(int(torch.randint(30, 80, (1,), generator=g)))},
                          {"role": "assistant", "content": text(int(torch.randint(25, 100, (1,), generator=g)))}]}
            for _ in rows]
    with tempfile.TemporaryDirectory() as d:
        res = train_lora(model, tok, chat, d, "rank32", max_steps=steps, progress=False, checkpoint_every=10 ** 6)
        log = res.log
        res.model.unload()
    a, b = log.iloc[1], log.iloc[-1]  # skip the first step (warm-up)
    return {"steps": steps, "rows_per_step": 16, "tokens_per_s": (b["input_tokens"] - a["input_tokens"]) /
            (b["seconds"] - a["seconds"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=".gpu/smollm2")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--quick", action="store_true", help="skip emlib.train and the ablations")
    ap.add_argument("--big-steps", action="store_true",
                    help="only the baselines and optimizer steps of 1024-2048 rows (how far step size carries)")
    a = ap.parse_args()
    global DEVICE, SMOKE
    if a.cpu_smoke:
        DEVICE, SMOKE = "cpu", True
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = build_model(a.model_dir)
    rows = synthetic_rows(a.rows, model.config.vocab_size)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    info = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "rows": len(rows),
            "mean_row_tokens": sum(len(r.input_ids) for r in rows) / len(rows),
            "weights": "random init, SmolLM2-135M-Instruct config, bf16", "lora": "rank32 (r 32, all 7 projections)"}
    print(json.dumps(info), flush=True)
    result: dict = {"info": info}
    out_path = Path(a.out) / "train.json"

    def save():
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str))
        os.replace(tmp, out_path)

    def report(name: str, r: dict) -> None:
        result[name] = r
        save()
        print(f"  {name:<34} {r['tokens_per_s']:>10,.0f} tok/s   {json.dumps(r, default=str)}", flush=True)

    n = 3 if SMOKE else 20
    report("plain_16x256_fixed", plain_loop(model, rows, pad, 16, n, 3, fixed_len=256))
    report("plain_16_rows", plain_loop(model, rows, pad, 16, 3 if SMOKE else 10, 3))
    if not (a.quick or a.big_steps):
        try:
            report("emlib_train_2x8", emlib_train_run(model, tok, rows[:400], 3 if SMOKE else 4))
        except Exception as err:  # the reference loop is someone else's and may be mid-change
            result["emlib_train_2x8_error"] = f"{type(err).__name__}: {err}"
            print("emlib.train run failed:", result["emlib_train_2x8_error"], flush=True)
    big = 73728  # padded tokens per micro-batch: 512 rows of this data in one forward
    configs = [("fast_16_rows", 16, 16384, 20, {}), ("fast_64_rows", 64, 16384, 15, {}),
               ("fast_512_rows_1micro", 512, big, 12, {}), ("fast_1024_rows_2micro", 1024, big, 8, {}),
               ("fast_512_rows_peft_lora_forward", 512, big, 8, {"fuse_lora": False}),
               ("fast_512_rows_hf_norms", 512, big, 8, {"fuse_norms": False}),
               ("fast_512_rows_4micro", 512, 20480, 8, {})]
    if a.quick:
        configs = [c for c in configs if c[4] == {} and c[0] != "fast_512_rows_4micro"]
    if a.big_steps:  # micro-batches of ~1.5x / 2x the 512-row one (peak ~70 / ~94 GB; OOM is recorded)
        configs = [("fast_1024_rows_2micro", 1024, big, 8, {}), ("fast_2048_rows_4micro", 2048, big, 6, {}),
                   ("fast_1536_rows_2micro", 1536, big * 3 // 2, 6, {}),
                   ("fast_2048_rows_2micro", 2048, big * 2, 6, {})]
    for name, rps, mt, steps, kw in configs:
        try:
            report(name, fast_run(model, rows, tok, rps, mt, 6 if SMOKE else steps, **kw))
        except torch.cuda.OutOfMemoryError as err:
            result[name] = {"error": f"OOM: {str(err)[:200]}"}
            print(name, "OOM", flush=True)
            torch.cuda.empty_cache()
    for ref in ("plain_16_rows", "plain_16x256_fixed"):
        base = result[ref]["tokens_per_s"]
        result[f"ratios_vs_{ref}"] = {k: v["tokens_per_s"] / base for k, v in result.items()
                                      if isinstance(v, dict) and "tokens_per_s" in v}
        print(f"RATIOS vs {ref}:", json.dumps({k: round(v, 2) for k, v in result[f"ratios_vs_{ref}"].items()}),
              flush=True)
    save()


if __name__ == "__main__":
    main()
