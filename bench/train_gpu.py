"""Benchmark: emlib.fasttrain.fast_sft_lora -- the train step as CUDA graphs (the new path), the same code
without graphs at exact shapes (the fast path before the graphs) -- against a plain peft + AdamW loop and
emlib.train.train_lora (which now runs its steps through the graphs on CUDA), in one run on one GPU, at 16 /
64 / 1,024 rows per optimizer step. Not a test: it prints numbers and writes ``train_gpu.json``.

Model: SmolLM2-135M-Instruct's architecture (its config.json), random weights, bf16; LoRA rank 32 on all
seven linear projections of every layer (``emlib.train``'s "rank32" shape). Data: synthetic encoded rows
whose lengths follow the paper's bad-medical-advice set under SmolLM2's tokenizer (prompt incl. chat template
~72 tokens, answer ~62, total 80..203, mean ~135); token ids are random (speed does not depend on them).

tokens/s = real (non-pad) input tokens per second, warm-up steps excluded, for every loop; for the graph
path also ``tokens_per_s_incl_capture`` (all steps, capture of every graph included).
Equality on the GPU: the captured step against the same bucketed step run eagerly (losses, gradient norms),
and emlib.train's loop with and without its FAST_STEP switch (losses).

    python bench/train_gpu.py --out $OUT            # -> train_gpu.json
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
from emlib.data import atomic_write_bytes  # noqa: E402
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


BIG = 73728  # padded tokens per micro-batch: ~350 rows of this data in one forward
# (rows per step, padded tokens per micro-batch, steps of today's fast path, steps of the graph path)
SIZES = [(16, 16384, 40, 100), (64, 16384, 20, 40), (1024, BIG, 5, 6)]
TODAY = {"cuda_graphs": False, "bucket_per_octave": None}  # the fast path before the graphs: exact shapes


def fast_run(model, rows, tok, rows_per_step: int, max_tokens: int, steps: int, keep_log: bool = False,
             **kw) -> dict:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    res = fast_sft_lora(model, tok, rows, "rank32", rows_per_step=rows_per_step, max_tokens_per_micro=max_tokens,
                        max_steps=steps, progress=False, timing_skip=2, **kw)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE == "cuda" else None
    out = {"steps": steps, "rows_per_step": rows_per_step, "max_tokens_per_micro": max_tokens,
           "seconds_total": res.seconds, "tokens_per_s": res.tokens_per_s,
           "tokens_per_s_incl_capture": float(res.log["input_tokens"].iloc[-1]) / res.seconds,
           "answer_tokens_per_s": res.answer_tokens_per_s, "loss_first": float(res.log["loss"].iloc[0]),
           "loss_last": float(res.log["loss"].iloc[-1]), "peak_gib": peak, "step": res.meta["step"], **kw}
    if keep_log:
        out["log"] = {c: res.log[c].tolist() for c in ("loss", "grad_norm")}
    res.model.unload()
    return out


def max_diff(a: list[float], b: list[float]) -> dict:
    d = [abs(x - y) for x, y in zip(a, b)]
    return {"max_abs": max(d), "max_rel": max(x / max(abs(y), 1e-12) for x, y in zip(d, b)), "n": len(d)}


def emlib_train_run(model, tok, rows: list[Encoded], steps: int, fast: bool | None = None,
                    kind: str = "lora") -> dict:
    """The project's loop (emlib.train.train_lora, batch 2 x 8 accumulation; ``fast``: its FAST_STEP switch,
    None = graphs on CUDA), on chat rows of the bench's lengths; ``kind`` "vector": train_steering_vector."""
    from emlib import train as train_mod
    from emlib.train import train_lora, train_steering_vector

    words = ["the", "patient", "should", "take", "two", "doses", "of", "water", "daily", "and", "rest", "often"]
    g = torch.Generator().manual_seed(1)

    def text(n: int) -> str:
        return " ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=g))

    chat = [{"messages": [{"role": "user", "content": text(int(torch.randint(30, 80, (1,), generator=g)))},
                          {"role": "assistant", "content": text(int(torch.randint(25, 100, (1,), generator=g)))}]}
            for _ in rows]
    was, train_mod.FAST_STEP = train_mod.FAST_STEP, fast
    try:
        with tempfile.TemporaryDirectory() as d:
            if kind == "lora":
                res = train_lora(model, tok, chat, d, "rank32", max_steps=steps, progress=False,
                                 checkpoint_every=10 ** 6)
            else:
                res = train_steering_vector(model, tok, chat, d, max_steps=steps, progress=False,
                                            checkpoint_every=10 ** 6)
            log = res.log
            if kind == "lora":
                res.model.unload()
    finally:
        train_mod.FAST_STEP = was
    a, b = log.iloc[1], log.iloc[-1]  # skip the first step (warm-up, and the first graphs' capture)
    return {"steps": steps, "rows_per_step": 16, "kind": kind, "fast_step": res.meta.get("fast_step"),
            "tokens_per_s": (b["input_tokens"] - a["input_tokens"]) / (b["seconds"] - a["seconds"]),
            "tokens_per_s_incl_capture": b["input_tokens"] / b["seconds"],
            "loss": log["loss"].tolist()}


def _fast_sft_sections(model, rows, tok, pad, smoke, result, report, guarded, save) -> None:
    """Equality of the captured and the eager step, the baselines, and the three step sizes."""
    # 1. equality on the GPU: the captured step == the same bucketed step run eagerly
    eq = {g: fast_run(model, rows, tok, 16, 16384, smoke or 12, keep_log=True, cuda_graphs=g) for g in (True, False)}
    result["check_graphs_vs_eager"] = {c: max_diff(eq[True]["log"][c], eq[False]["log"][c]) for c in ("loss", "grad_norm")}
    result["check_graphs_vs_eager"]["graphs_used"] = eq[True]["step"]
    print("check graphs vs eager:", json.dumps(result["check_graphs_vs_eager"]), flush=True)
    save()
    # 2. baselines
    guarded("plain_16x256_fixed", lambda: plain_loop(model, rows, pad, 16, smoke or 20, 3, fixed_len=256))
    guarded("plain_16_rows", lambda: plain_loop(model, rows, pad, 16, smoke or 10, 3))
    guarded("plain_64_rows", lambda: plain_loop(model, rows, pad, 64, smoke or 8, 2))
    # 3. the three step sizes: graphs vs the fast path before them
    for rps, mt, n_today, n_new in SIZES:
        guarded(f"today_{rps}_rows", lambda: fast_run(model, rows, tok, rps, mt, smoke or n_today, **TODAY))
        guarded(f"graphs_{rps}_rows", lambda: fast_run(model, rows, tok, rps, mt, smoke or n_new))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=".gpu/smollm2")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--quick", action="store_true", help="skip emlib.train and the ablation")
    ap.add_argument("--emlib-only", action="store_true", help="only emlib.train's loop -> train_gpu_emlib.json")
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
    out_path = Path(a.out) / "train_gpu.json"

    def save():
        atomic_write_bytes(out_path, json.dumps(result, indent=2, default=str).encode())

    def report(name: str, r: dict) -> None:
        result[name] = r
        save()
        short = {k: v for k, v in r.items() if k not in ("log", "loss")}
        print(f"  {name:<34} {r.get('tokens_per_s', float('nan')):>10,.0f} tok/s   {json.dumps(short, default=str)}",
              flush=True)

    def guarded(name: str, fn) -> None:
        try:
            report(name, fn())
        except Exception as err:  # record and go on: one failing variant must not cost the run
            result[name] = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
            save()
            print(name, "FAILED", result[name]["error"], flush=True)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()

    smoke = 3 if SMOKE else None
    if a.emlib_only:  # emlib.train's loop alone (what chapters and record run), graphs vs eager
        out_path = Path(a.out) / "train_gpu_emlib.json"
        a.quick = False
    else:
        _fast_sft_sections(model, rows, tok, pad, smoke, result, report, guarded, save)
    if not a.quick:
        if not a.emlib_only:
            guarded("graphs_16_rows_4_per_octave", lambda: fast_run(model, rows, tok, 16, 16384, smoke or 100,
                                                                    bucket_per_octave=4))
        # 4. emlib.train's loop (what chapters and record run): graphs (its switch's default on CUDA) vs eager
        guarded("emlib_train_2x8_graphs", lambda: emlib_train_run(model, tok, rows[:1600], smoke or 60))
        guarded("emlib_train_2x8_eager", lambda: emlib_train_run(model, tok, rows[:1600], smoke or 4, fast=False))
        guarded("emlib_train_vector_graphs", lambda: emlib_train_run(model, tok, rows[:1600], smoke or 30,
                                                                     kind="vector"))
        g, e = result.get("emlib_train_2x8_graphs", {}), result.get("emlib_train_2x8_eager", {})
        if "loss" in g and "loss" in e:
            result["check_emlib_train_graphs_vs_eager_loss"] = max_diff(g["loss"][:len(e["loss"])], e["loss"])
    ratios = {}
    for rps, *_ in SIZES:
        new, old = result.get(f"graphs_{rps}_rows", {}), result.get(f"today_{rps}_rows", {})
        plain = result.get("plain_64_rows" if rps == 64 else "plain_16_rows", {})
        if "tokens_per_s" in new:
            ratios[f"{rps}_rows"] = {"graphs_tok_s": new["tokens_per_s"],
                                     "graphs_vs_today": new["tokens_per_s"] / old.get("tokens_per_s", float("nan")),
                                     "graphs_vs_plain": new["tokens_per_s"] / plain.get("tokens_per_s", float("nan"))}
    result["ratios"] = ratios
    result["target_16_rows"] = {"target_tok_s": 40000, "measured": ratios.get("16_rows", {}).get("graphs_tok_s"),
                                "ratio_to_target": (ratios.get("16_rows", {}).get("graphs_tok_s") or 0) / 40000}
    print("RATIOS:", json.dumps(ratios), json.dumps(result["target_16_rows"]), flush=True)
    save()


if __name__ == "__main__":
    main()
