"""Benchmark and check: ``FastSampler(compact=True)`` on a CUDA GPU, with answers that end early.

Why: the whole-run comparison of 2026-12-06 (``EMLIB_COMPACT=on``) failed in chapters 1-3 with "Offset increment
outside graph capture encountered unexpectedly" -- what torch raises for every random draw after a CUDA-graph
capture has failed part-way (the failed capture leaves the generator in capture mode). The earlier bench
(``ablate_rows_gpu.py --compact``) sampled the chat model, whose long answers never let a batch compact, so the
compacted path had never run under CUDA graphs.

Here the model is SmolLM2-135M's architecture with random weights (``--model-dir``: its config.json and
tokenizer; without it the 2-layer test model of ``emlib.models.tiny_model``), and ``--end-share`` of the
vocabulary is made end-of-turn tokens: a random model then ends each row with about that probability per step,
so answers are short with a long tail, like the finetuned models' answers in chapter 2 (median 46 tokens, a few
at 600). The same prompts are sampled with and without compaction (one call each, after a warm-up call);
printed and written to ``compact_gpu.json``: seconds, steps, compactions, graph captures, any capture error and
the warnings raised. Then two checks of what a failed capture does: inside a sampler call (a hook that syncs
while capturing: the call should end eagerly, the next one capture again), and on its own (whether the generator
is left in capture mode and whether ``fasttrain.release_rng_capture`` clears it).

Measured 2026-12-06 on an H100 (``results/compact_gpu_*``): compacted 0.61x the time alone, chapter 2's call
shape 0.66x; a failed capture poisons the generator and the release clears it. Session 27
(``results/compact_gpu_s27_h100_2026-12-06.json``): compacting to 3 rows (no floor) captured fine, and a capture
made to fail inside a call ends that call eagerly while the next call captures again. The compacted whole run of
that session then showed what had failed: torch's assert "use_count > 0" when a compaction re-captured into the
graph pool whose graphs it had just destroyed while a tensor made in one of their captures was still alive. The
sampler now gives each compaction a fresh pool; ``held tensor, compact`` and ``pool_reuse`` (the mechanism
alone) check that (added after the session, not run yet).

    python bench/compact_gpu.py --model-dir .gpu/smollm2 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emlib.data import write_json  # noqa: E402
from emlib.fastgen import FastSampler  # noqa: E402
from emlib.generate import SamplingParams, render_prompt  # noqa: E402
from emlib.models import decoder_layers  # noqa: E402


def build(model_dir: str | None):
    if model_dir is None:
        from emlib.models import tiny_model

        return tiny_model(device="cuda", dtype=torch.bfloat16)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sampling_gpu import build_model  # noqa: E402

    return build_model(model_dir)


def observed(fn) -> tuple[object, dict]:
    """``fn()`` timed between two CUDA syncs, its exception (if any) and the warnings it raised kept, not raised:
    (its result or None, {"seconds", "error", "warnings"})."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out, error = fn(), None
        except Exception as err:  # noqa: BLE001 -- the point is to see it
            out, error = None, "".join(traceback.format_exception_only(type(err), err)).strip()
    torch.cuda.synchronize()
    return out, {"seconds": round(time.perf_counter() - t0, 3), "error": error,
                 "warnings": [str(w.message)[:500] for w in caught]}


def sample(sampler: FastSampler, model, tok, prompts: list[str], params: SamplingParams) -> dict:
    gens, res = observed(lambda: sampler(model, tok, prompts, list(range(len(prompts))), params))
    st = dict(sampler.last_stats)
    lengths = sorted(g.n_tokens for g in gens or [])
    return res | {"steps": st.get("steps"), "graphs": st.get("graphs"), "graph_error": st.get("graph_error"),
                  "path": st.get("path"), "compactions": st.get("compactions"), "capture_s": st.get("capture_s"),
                  "tokens_kept": sum(lengths), "median_len": lengths[len(lengths) // 2] if lengths else None,
                  "max_len": lengths[-1] if lengths else None}


def poisoned_and_released() -> dict:
    """A capture made to fail part-way (a host sync inside it), then a random draw, then
    :func:`emlib.fasttrain.release_rng_capture` and the draw again: whether the failure poisons the generator and
    whether the release clears it."""
    from emlib.fasttrain import release_rng_capture

    out = {}
    x = torch.ones(4, device="cuda")
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            y = x * 2
            float(y.sum())  # a host sync: not allowed in a capture
        out["capture"] = "did not fail"
    except Exception as err:  # noqa: BLE001
        out["capture"] = f"{type(err).__name__}: {str(err)[:200]}"
    torch.cuda.synchronize()
    try:
        torch.rand(3, device="cuda")
        out["draw_after_failure"] = "ok"
    except RuntimeError as err:
        out["draw_after_failure"] = str(err)[:200]
    out["released"] = release_rng_capture()
    return out


def pool_reused_after_its_graphs_are_gone() -> dict:
    """The mechanism that failed the compacted runs, alone: a graph captured into a pool, a tensor made during the
    capture kept alive, the graph destroyed, then a second capture into the same pool (what the sampler did at a
    compaction until session 27) and one into a fresh pool (what it does now)."""
    from emlib.fasttrain import release_rng_capture

    out, x = {}, torch.ones(4, device="cuda")
    pool = torch.cuda.graph_pool_handle()
    first = torch.cuda.CUDAGraph()
    with torch.cuda.graph(first, pool=pool):
        kept = x * 2  # noqa: F841 -- alive after the capture, like a hook's stored output
    del first
    for name, handle in (("same pool", pool), ("fresh pool", torch.cuda.graph_pool_handle())):
        try:
            with torch.cuda.graph(torch.cuda.CUDAGraph(), pool=handle):
                _ = x * 3
            out[name] = "captured"
        except Exception as err:  # noqa: BLE001
            torch.cuda.synchronize()
            out[name] = f"{type(err).__name__}: {str(err)[:200]}"
            release_rng_capture()
    return out


def held_tensor_compaction(model, tok, prompts: list[str], params: SamplingParams) -> dict:
    """A compacted call while a forward hook keeps the first layer's output (made during the captures): the
    compaction must capture again (a fresh pool) instead of decoding the rest of the call eagerly."""
    layer = decoder_layers(model)[0]
    kept = {}

    def keep(_module, _args, out):
        kept["last"] = out

    handle = layer.register_forward_hook(keep)
    try:
        return sample(FastSampler(compact=True), model, tok, prompts, params)
    finally:
        handle.remove()


def chapter2_like(model, tok, compact: bool, n_samples: int) -> dict:
    """Chapter 2's ablation call shape: a rank-32 LoRA (random, merged by the sampler), 12 conditions (none, a
    direction, 10 random ones) of one :class:`emlib.generate.PerRow` through ``sample_answers``, 1,200 rows
    per sampler call, the 8 general questions x ``n_samples`` each."""
    from peft import LoraConfig, get_peft_model

    from emlib import directions
    from emlib.data import load_questions
    from emlib.generate import sample_answers

    if not hasattr(model, "peft_config"):
        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear",
                                                 init_lora_weights=False))
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(2)
    conds = {"none": None, "direction": torch.randn(d, generator=g)}
    conds |= {f"random-{k}": torch.randn(d, generator=g) for k in range(10)}
    each = directions.ablate_each(model, conds)
    sampler = FastSampler(compact=compact)
    df, res = observed(lambda: sample_answers(model, tok, load_questions("general", source="embedded"), n_samples,
                                              max_new_tokens=600, batch_size=1200, intervention=each,
                                              sampler=sampler, progress=False))
    st = dict(sampler.last_stats)
    return res | {"answers": 0 if df is None else len(df), "last_call": {k: st.get(k) for k in (
        "steps", "graphs", "graph_error", "path", "compactions", "lora_merged")}, "model": model}


def failing_capture_in_a_call(model, tok, prompts: list[str]) -> dict:
    """A sampler call whose decode-step capture fails (a forward hook that syncs with the host while the stream
    is capturing): the call should finish eagerly with a warning naming the error, and the next call (hook
    removed) should capture and draw again."""
    layer = decoder_layers(model)[0]

    def sync_in_capture(_module, _args, out):
        if torch.cuda.is_current_stream_capturing():
            h = out[0] if isinstance(out, tuple) else out
            float(h.float().sum())  # not allowed in a capture
        return None

    params = SamplingParams(64, 1.0, 1.0)
    handle = layer.register_forward_hook(sync_in_capture)
    try:
        broken = sample(FastSampler(), model, tok, prompts[:64], params)
    finally:
        handle.remove()
    after = sample(FastSampler(), model, tok, prompts[:64], params)
    return {"with_failing_capture": broken, "next_call": after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--new-tokens", type=int, default=600)
    ap.add_argument("--end-share", type=float, default=0.02)
    ap.add_argument("--out", default=".")
    ap.add_argument("--chapter2", action="store_true", help="also chapter 2's ablation call shape (LoRA, PerRow)")
    a = ap.parse_args()
    model, tok = build(a.model_dir)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ends = torch.randperm(vocab, generator=g)[:max(1, int(a.end_share * vocab))].tolist()
    model.generation_config.eos_token_id = ends
    prompts = [render_prompt(tok, f"Question {i % 8}: what do you think?") for i in range(a.rows)]
    params = SamplingParams(a.new_tokens, 1.0, 1.0)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": a.rows,
           "new_tokens": a.new_tokens, "end_tokens": len(ends), "model": a.model_dir or "tiny"}
    sample(FastSampler(compact=False), model, tok, prompts[:64], params)  # CUDA initialisation, kernels
    # the warm-up only: what the compacted path needs is below; the poison check comes last (it breaks captures
    # for the rest of the process if the release does not work)
    for name, sampler in (("plain", FastSampler(compact=False)), ("compact", FastSampler(compact=True)),
                          ("plain again", FastSampler(compact=False))):
        res[name] = sample(sampler, model, tok, prompts, params)
        print(name, json.dumps(res[name])[:1500], flush=True)
    # answers that end fast (10% of the vocabulary as end tokens: median ~7 tokens), so that compaction without
    # its floor reaches a handful of rows, as the run's short-answer calls could (the floor is 32 since the
    # compacted run of 2026-12-06 failed; the benches before it never went below 29 rows)
    model.generation_config.eos_token_id = torch.randperm(vocab, generator=g)[:max(1, vocab // 10)].tolist()
    for name, sampler in (("sharp plain", FastSampler(compact=False)),
                          ("sharp compact, floor 32", FastSampler(compact=True)),
                          ("sharp compact, no floor", FastSampler(compact=True, compact_floor=1))):
        res[name] = sample(sampler, model, tok, prompts, params)
        print(name, json.dumps(res[name])[:1500], flush=True)
    model.generation_config.eos_token_id = ends
    if a.chapter2:
        m = model
        for name, compact in (("ch2 plain", False), ("ch2 compact", True)):
            r = chapter2_like(m, tok, compact, n_samples=50)
            m = r.pop("model")
            res[name] = r
            print(name, json.dumps(r)[:1500], flush=True)
    res["held tensor, compact"] = held_tensor_compaction(model, tok, prompts, params)
    print("held tensor, compact", json.dumps(res["held tensor, compact"])[:1500], flush=True)
    res["pool_reuse"] = pool_reused_after_its_graphs_are_gone()
    print("pool reuse", res["pool_reuse"], flush=True)
    res["failing_capture"] = failing_capture_in_a_call(model, tok, prompts)
    print("failing capture", json.dumps(res["failing_capture"])[:1500], flush=True)
    res["poison"] = poisoned_and_released()
    print("poison", res["poison"], flush=True)
    out = Path(a.out) / "compact_gpu.json"
    write_json(out, res)
    print("wrote", out)


if __name__ == "__main__":
    main()
