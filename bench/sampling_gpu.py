"""Benchmark: emlib.fastgen's fast sampler against Hugging Face ``generate`` (emlib.generate.hf_sampler),
in one run on one GPU. Not a test: it prints numbers and writes ``sampling.json``.

The model is SmolLM2-135M-Instruct's architecture (its config.json) with random weights, in bf16, plus its
real tokenizer: speed does not depend on weight values. With random weights the end-of-turn token is drawn
with probability ~1/49152 per token, so no batch ever ends early; both paths therefore generate exactly
``--new-tokens`` tokens per row (checked: the fast path reports its steps, generate's output width is
recorded), and tokens/s counts rows x steps for both.

    python bench/sampling_gpu.py --model-dir .gpu/smollm2 --out $OUT     # -> sampling_smollm2-135m.json
    python bench/sampling_gpu.py --arch qwen2.5-coder-0.5b --quick --out $OUT

``--arch qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct's architecture (QWEN_CODER_05B below: its
config.json's values -- hidden 896, 24 layers, 14 query / 2 KV heads with q/k/v biases, intermediate 4864,
vocabulary 151,936, tied embeddings, rope theta 1e6, no sliding window), random weights in bf16. The GPU
machine has no internet and carries no weights; tokens/s does not depend on weight values when every row
runs to the fixed length. The prompts are tokenized with ``--model-dir``'s tokenizer (SmolLM2's: its ids are
valid Qwen ids; the prompts are a few tokens shorter or longer than under Qwen's tokenizer).

Workload: the 8 general EM questions x 50 samples = 400 prompts, temperature 1, top_p 1. The generate
baseline runs one batch of ``--hf-batch`` of those prompts (its throughput per token does not improve with
more batches); the fast path runs all 400 prompts in one batch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emlib.data import atomic_write_bytes, load_questions  # noqa: E402
from emlib.fastgen import FastSampler, sample_from_logits  # noqa: E402
from emlib.generate import SamplingParams, hf_sampler, render_prompt  # noqa: E402
from emlib.models import prepare_tokenizer  # noqa: E402


DEVICE = "cuda"
SMOKE = False  # --cpu-smoke: a 2-layer model on the CPU, static path forced (checks the script, not speed)


def FS(**kw) -> FastSampler:
    return FastSampler(force=SMOKE, **kw)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# Qwen/Qwen2.5-Coder-0.5B-Instruct config.json (the fields that shape the computation)
QWEN_CODER_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                  "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
                  "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
                  "use_sliding_window": False, "sliding_window": None, "max_window_layers": 24,
                  "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645}
ARCHS = {"smollm2-135m": None, "qwen2.5-coder-0.5b": QWEN_CODER_05B}


def build_model(model_dir: str, seed: int = 0, arch: str = "smollm2-135m"):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    cfg = AutoConfig.from_pretrained(model_dir) if ARCHS[arch] is None else Qwen2Config(**ARCHS[arch])
    if SMOKE:
        cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = 16, 64, 128  # >= 16: hooks at L15
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, 16
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    prepare_tokenizer(tok, model)
    return model, tok


def prompts_400(tok, n_samples: int = 50) -> list[str]:
    q = load_questions("general", source="embedded")
    rendered = [render_prompt(tok, str(r.question), r.system if isinstance(r.system, str) else None)
                for r in q.itertuples()]
    return [p for p in rendered for _ in range(n_samples)]


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def run_generate(model, tok, prompts, params) -> dict:
    widths = []
    orig = model.generate

    def recording_generate(*a, **k):
        out = orig(*a, **k)
        widths.append(out.shape[1] - k["input_ids"].shape[1] if "input_ids" in k else None)
        return out

    model.generate = recording_generate
    try:
        gens, dt = timed(lambda: hf_sampler(model, tok, prompts, list(range(len(prompts))), params))
    finally:
        del model.generate
    steps = widths[0]
    return {"path": "generate", "batch": len(prompts), "new_tokens": params.max_new_tokens, "steps": steps,
            "seconds": dt, "tokens": len(prompts) * steps, "tokens_per_s": len(prompts) * steps / dt,
            "rows_finished": sum(g.finished for g in gens)}


def run_fast(sampler: FastSampler, model, tok, prompts, params, label: str, ctx=None) -> dict:
    from contextlib import nullcontext

    with (ctx() if ctx else nullcontext()):
        gens, dt = timed(lambda: sampler(model, tok, prompts, list(range(len(prompts))), params))
    st = dict(sampler.last_stats)
    steps = st.get("steps", params.max_new_tokens)
    out = {"label": label, "batch": len(prompts), "new_tokens": params.max_new_tokens, "seconds": dt,
           "tokens": len(prompts) * steps, "tokens_per_s": len(prompts) * steps / dt,
           "rows_finished": sum(g.finished for g in gens), "stats": st}
    print(f"  {label:<34} {out['tokens_per_s']:>10,.0f} tok/s  ({dt:.2f} s, steps {steps}, path {st.get('path')})",
          flush=True)
    return out


def checks(model, tok, prompts) -> dict:
    """Cheap correctness checks on the GPU (the CPU tests cover the rest)."""
    from emlib import hooks

    res = {}
    # the draw rule equals torch.multinomial for the same CUDA seed
    logits = torch.randn(400, model.config.vocab_size, device=DEVICE) * 2
    p = SamplingParams(1, 1.0, 1.0)
    torch.manual_seed(5)
    ref = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
    torch.manual_seed(5)
    got = sample_from_logits(logits, p)
    res["draw_equals_multinomial_cuda"] = bool(torch.equal(ref, got))
    # graph replay == eager static steps (greedy, so no randomness): the captured graph is the same computation
    sub, greedy = prompts[::50][:8] * 4, SamplingParams(48, 0.0, 1.0)
    seeds = list(range(len(sub)))
    g_graph = FS(bucket=16)(model, tok, sub, seeds, greedy)
    g_eager = FS(use_cuda_graphs=False, bucket=16)(model, tok, sub, seeds, greedy)
    res["greedy_graph_equals_eager"] = g_graph == g_eager
    # a steering hook is recorded into the graph: it changes the answers, identically in both paths
    v = torch.randn(model.config.hidden_size, device=DEVICE)
    with hooks.add_vector(model, 15, v / v.norm(), 8.0):
        h_graph = FS(bucket=16)(model, tok, sub, seeds, greedy)
        h_eager = FS(use_cuda_graphs=False, bucket=16)(model, tok, sub, seeds, greedy)
    res["hook_changes_answers"] = h_graph != g_graph
    res["hook_graph_equals_eager"] = h_graph == h_eager
    # greedy agreement with generate (bf16: eager-style attention vs sdpa rounding can flip near-ties)
    ref_g = hf_sampler(model, tok, sub, seeds, greedy)
    res["greedy_rows_equal_generate"] = sum(a == b for a, b in zip(ref_g, g_graph)) / len(sub)
    print("checks:", json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=".gpu/smollm2")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--new-tokens", type=int, default=600)
    ap.add_argument("--hf-batch", type=int, default=96)
    ap.add_argument("--hf-new-tokens", type=int, default=None, help="default: --new-tokens")
    ap.add_argument("--variant-tokens", type=int, default=300, help="new tokens for the LoRA / hook variants")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: exercise the script only")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="checks, generate, first and second fast call only")
    a = ap.parse_args()
    global DEVICE, SMOKE
    if a.cpu_smoke:
        DEVICE, SMOKE = "cpu", True
    import transformers

    model, tok = build_model(a.model_dir, arch=a.arch)
    prompts = prompts_400(tok)
    params = SamplingParams(a.new_tokens, 1.0, 1.0)
    info = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)", "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "n_prompts": len(prompts), "prompt_tokens_max": max(len(tok(p)["input_ids"]) for p in prompts),
            "arch": a.arch, "config": {k: getattr(model.config, k, None) for k in QWEN_CODER_05B},
            "rope_parameters": getattr(model.config, "rope_parameters", None),
            "n_params": sum(p.numel() for p in model.parameters()),
            "weights": f"random init, {a.arch} config, bf16", "tokenizer": a.model_dir}
    print(json.dumps(info), flush=True)
    result: dict = {"info": info}
    out_path = Path(a.out) / f"sampling_{a.arch}.json"

    def save():
        atomic_write_bytes(out_path, json.dumps(result, indent=2, default=str).encode())

    if not a.skip_checks:
        result["checks"] = checks(model, tok, prompts)
        save()

    hf_params = SamplingParams(a.hf_new_tokens or a.new_tokens, 1.0, 1.0)
    print(f"generate baseline: batch {a.hf_batch} x {hf_params.max_new_tokens} tokens ...", flush=True)
    base = run_generate(model, tok, prompts[:a.hf_batch], hf_params)
    print(f"  generate                           {base['tokens_per_s']:>10,.0f} tok/s  ({base['seconds']:.1f} s, "
          f"steps {base['steps']})", flush=True)
    result["generate"] = base
    save()

    fast = {}
    print(f"fast sampler: batch {len(prompts)} x {a.new_tokens} tokens", flush=True)
    fast["cold"] = run_fast(FS(), model, tok, prompts, params, "fast (first call, incl. capture)")
    fast["warm"] = run_fast(FS(), model, tok, prompts, params, "fast (second call)")
    if a.quick:
        result["fast"] = fast
        for k in ("cold", "warm"):
            result[f"ratio_fast_{k}_vs_generate"] = fast[k]["tokens_per_s"] / base["tokens_per_s"]
        save()
        print(f"RATIO fast/generate: cold {result['ratio_fast_cold_vs_generate']:.1f}x, warm "
              f"{result['ratio_fast_warm_vs_generate']:.1f}x (generate {base['tokens_per_s']:,.0f} tok/s at batch "
              f"{a.hf_batch})", flush=True)
        return
    fast["unfused"] = run_fast(FS(fuse_norms=False, attention="eager", bucket=64), model, tok, prompts, params,
                               "fast, HF norms + eager attn, bucket 64")
    fast["eager_static"] = run_fast(FS(use_cuda_graphs=False), model, tok, prompts,
                                    SamplingParams(min(150, a.new_tokens), 1.0, 1.0), "static cache, no graphs")
    result["fast"] = fast
    save()

    # variants at --variant-tokens: steering hook, LoRA rank 32 on all linear layers (merged / unmerged)
    from emlib import hooks
    from emlib.train import add_lora

    vp = SamplingParams(a.variant_tokens, 1.0, 1.0)
    v = torch.randn(model.config.hidden_size, device=DEVICE)
    var = {"plain": run_fast(FS(), model, tok, prompts, vp, f"plain ({a.variant_tokens})")}
    var["bucket64"] = run_fast(FS(bucket=64), model, tok, prompts, vp, f"bucket 64 ({a.variant_tokens})")
    var["no_fused_norms"] = run_fast(FS(fuse_norms=False), model, tok, prompts, vp, f"HF norms ({a.variant_tokens})")
    var["eager_attention"] = run_fast(FS(attention="eager"), model, tok, prompts, vp,
                                      f"eager attention ({a.variant_tokens})")
    var["steer"] = run_fast(FS(), model, tok, prompts, vp, f"add_vector L15 ({a.variant_tokens})",
                            ctx=lambda: hooks.add_vector(model, 15, v, 4.0))
    pm = add_lora(model, "rank32")
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    pm.eval()
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if "base_layer" in n}
    var["lora_merged"] = run_fast(FS(merge_lora=True), pm, tok, prompts, vp,
                                  f"LoRA r32 merged ({a.variant_tokens})")
    var["lora_unmerged"] = run_fast(FS(merge_lora=False), pm, tok, prompts, vp,
                                    f"LoRA r32 unmerged ({a.variant_tokens})")
    var["lora_weights_restored"] = all(torch.equal(p, before[n]) for n, p in pm.named_parameters() if n in before)
    var["lora_generate"] = run_generate(pm, tok, prompts[:a.hf_batch], SamplingParams(64, 1.0, 1.0))
    result["variants"] = var

    best = max(fast["cold"]["tokens_per_s"], fast["warm"]["tokens_per_s"])
    result["ratio_fast_cold_vs_generate"] = fast["cold"]["tokens_per_s"] / base["tokens_per_s"]
    result["ratio_fast_warm_vs_generate"] = fast["warm"]["tokens_per_s"] / base["tokens_per_s"]
    result["ratio_best"] = best / base["tokens_per_s"]
    save()
    print(f"RATIO fast/generate: cold {result['ratio_fast_cold_vs_generate']:.1f}x, "
          f"warm {result['ratio_fast_warm_vs_generate']:.1f}x "
          f"(generate {base['tokens_per_s']:,.0f} tok/s at batch {a.hf_batch}; fast {best:,.0f} tok/s at batch "
          f"{len(prompts)}); LoRA weights restored: {var['lora_weights_restored']}", flush=True)


if __name__ == "__main__":
    main()
