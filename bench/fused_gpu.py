"""Benchmark: ``emlib.fused`` (q/k/v and gate/up as one matmul each, the rotary embedding of q and k in three
operations) on and off, in one process, for the three places that use it:

* ``decode``: the fast sampler (``FastSampler``), 400 prompts (the 8 general EM questions x 50) x
  ``--new-tokens`` tokens, every row running to the end (``ignore_eos``): tokens/s;
* ``rank1``: ``fasttrain.TrainStep`` for a rank-1 KL adapter at the paper's step (16 training rows of the
  medical set's lengths, 8 KL rows, lambda 2; ``bench/kl_step_gpu.py``'s setting): seconds per step;
* ``rank32``: the same for a rank-32 adapter on every projection without KL (chapter 1's finetunes): its
  projections are LoRA layers being trained, so only the rotary embedding is fused;
* ``group``: ``vecgroup.GroupStep`` for chapter 3's group of seven steering vectors (general, five KL members,
  drift), 16 training rows and 8 KL rows a step: seconds per step;
* ``metric``: ``chat.response_loss`` on 128 rows of 150-512 tokens in one forward (``metric_batch_size``, the
  loss loops of chapters 3-6; ``bench/metric_batch_gpu.py``'s rows): seconds per call.

Each part alternates off and on ``--reps`` times and reports the median. Aten operations per step are counted on
one eager step on the CPU (what a CUDA graph replays, kernel for kernel, view operations included;
``kernel_ops`` leaves out those that launch no kernel): always with ``--device cpu``, with ``--count`` on a GPU
machine (slow there too, and the same numbers). Random weights of SmolLM2-135M's shape (bench/metric_batch_gpu.py's
``model_of``: bf16 on a GPU, float32 on the CPU), the tokenizer of ``--model-dir``. Agreement: the largest
relative difference of the training parts' losses between off and on (bf16 rounding on a GPU). Not a test.

    python bench/fused_gpu.py --model-dir .gpu/smollm2 --out $OUT             # one GPU, ~3 min (est.)
    python bench/fused_gpu.py --device cpu --steps 2 --warmup 1 --reps 1 --new-tokens 4 --prompts 8 --n-kl 16 \\
        --model-dir DIR --out /tmp                                          # the CPU: operation counts
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kl_step_gpu import OpCounter, kl_rows_of, run_steps, sync  # noqa: E402
from metric_batch_gpu import SHAPES, model_of, rows_of  # noqa: E402
from sampling_gpu import prompts_400  # noqa: E402
from train_gpu import synthetic_rows  # noqa: E402

from emlib import train  # noqa: E402
from emlib.chat import n_targets  # noqa: E402
from emlib.data import atomic_write_bytes  # noqa: E402
from emlib.fused import FUSED_ENV  # noqa: E402

# operations that only make a new view of a tensor: no kernel on a GPU
VIEWS = {"view", "_unsafe_view", "t", "transpose", "slice", "select", "unsqueeze", "squeeze", "alias", "expand",
         "split", "chunk", "reshape", "permute", "as_strided", "narrow", "detach", "lift_fresh", "unbind"}


def counts(c: Counter, scale: float = 1.0) -> dict:
    """Totals of an operation counter (keys ``aten.mm`` or ``mm``), all and those that launch a kernel."""
    c = Counter({k.split(".")[-1]: v for k, v in c.items()})
    return {"aten_ops": sum(c.values()) * scale,
            "kernel_ops": sum(v for k, v in c.items() if k not in VIEWS) * scale,
            "by_op": {k: v * scale for k, v in sorted(c.items(), key=lambda kv: -kv[1]) if v}}


def per_token(out: list) -> list:
    """Per-token losses from ``run_steps``' [(summed loss(es), n_tok)]."""
    return torch.stack([loss / max(n_tok, 1) for loss, n_tok in out]).float().cpu().tolist()


def fused(on: bool) -> None:
    os.environ[FUSED_ENV] = "on" if on else "off"


# ---------------------------------------------------------------------------------------------------- decode
def prompts_of(tok, n: int) -> list[str]:
    """``n`` prompts of the 8 general EM questions (``sampling_gpu.prompts_400``, question by question: 400 is
    8 x 50), each question as often as ``n`` allows."""
    return prompts_400(tok, n_samples=math.ceil(n / 8))[:n]


def decode(model, tok, device: str, on: bool, new_tokens: int, n_prompts: int) -> dict:
    from emlib.fastgen import FastSampler
    from emlib.generate import SamplingParams

    prompts = prompts_of(tok, n_prompts)
    seeds = list(range(n_prompts))
    fs = FastSampler(fuse_layers=on, ignore_eos=True, force=device == "cpu")
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0)
    sync(device)
    t0 = time.perf_counter()
    fs(model, tok, prompts, seeds, params)
    sync(device)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tokens_per_s": n_prompts * new_tokens / dt, "steps": fs.last_stats.get("steps"),
            "fused_layers": fs.last_stats.get("fused_layers"), "path": fs.last_stats.get("path")}


def greedy_agreement(model, tok, n_prompts: int = 64, new_tokens: int = 64) -> float:
    """The share of greedy answer tokens that fused and unfused sampling agree on, position by position."""
    from emlib.fastgen import FastSampler
    from emlib.generate import SamplingParams

    prompts = prompts_of(tok, n_prompts)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, top_p=1.0)
    cpu = next(model.parameters()).device.type == "cpu"
    a, b = (FastSampler(fuse_layers=v, ignore_eos=True, force=cpu)(model, tok, prompts, list(range(n_prompts)), params)
            for v in (False, True))
    same = total = 0
    for x, y in zip(a, b):
        tx, ty = tok(x.text)["input_ids"], tok(y.text)["input_ids"]
        total += max(len(tx), len(ty))
        same += sum(p == q for p, q in zip(tx, ty))
    return same / max(total, 1)


def decode_ops(model, tok, on: bool) -> dict:
    """Aten operations of one decode step: (a call of n + 2 tokens - a call of n) / 2, eager (CPU)."""
    out = []
    for n in (3, 5):
        with OpCounter() as c:
            decode(model, tok, "cpu", on, n, 4)
        out.append(c.ops)
    diff = Counter({k: out[1][k] - out[0][k] for k in out[1] if out[1][k] != out[0][k]})
    return counts(diff, 0.5)


# ---------------------------------------------------------------------------------------------------- rank-1
def lora(shape: str, device: str, on: bool, rows, kl_rows, steps: int, warmup: int, graphs: bool = True,
         count: bool = False, adapter: str = "rank1", profile: dict | None = None) -> dict:
    """TrainStep for a LoRA adapter of ``adapter`` shape; with KL rows (8 a step, lambda 2) when given.
    ``profile``: filled by ``kl_step_gpu.run_steps`` (one more step under the profiler)."""
    from emlib.fasttrain import TrainStep

    fused(on)
    model = train.add_lora(model_of(shape, device), adapter, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)
    kw = {"reference": model.disable_adapter, "kl_rows": kl_rows} if kl_rows else {}
    step = TrainStep(model, params, 0, cuda_graphs=graphs, **kw)
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01, **step.adamw_kwargs)
    with step.kernels():
        if kl_rows:
            step.reference_states()
        per_step, out, ops = run_steps(lambda b, n, kl: step.grads(b, n, kl, 2.0)[0], opt, rows, kl_rows, steps,
                                       warmup, device, count, profile=profile)
    return {"seconds_per_step": per_step, "graphs": step.stats["graphs"], "fallback": step.stats["fallback"],
            "fused_layers": step.stats.get("fused_layers"), "packed": step.stats.get("packed"),
            "loss": per_token(out), "ops": ops and counts(ops)}


# ---------------------------------------------------------------------------------------------------- group
def group(shape: str, device: str, on: bool, rows, kl_rows, steps: int, warmup: int, graphs: bool = True,
          count: bool = False, profile: dict | None = None) -> dict:
    import contextlib
    from contextlib import nullcontext

    from emlib import vecgroup
    from emlib.fasttrain import decoder_and_head, one_sequence_per_row
    from emlib.fused import fused_layers, fused_rms_norms

    fused(on)
    model = model_of(shape, device)
    model.requires_grad_(False)
    cuda = device == "cuda"
    k = model.config.num_hidden_layers // 2
    n_mem, kl_mem = 7, [1, 2, 3, 4, 5, 6]
    _, head = decoder_and_head(model)
    split = vecgroup.SplitDecoder(model, k)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)) if cuda else nullcontext
    vecs = vecgroup.Vectors(n_mem, model.config.hidden_size, 256.0, device)
    opt = torch.optim.AdamW(vecs.params, lr=1e-4, **({"fused": True} if cuda else {}))
    with contextlib.ExitStack() as stack:
        stack.enter_context(train.training_mode(model))
        stack.enter_context(one_sequence_per_row())
        if cuda:
            stack.enter_context(fused_rms_norms(model))
        n_fused = stack.enter_context(fused_layers(model))
        with amp():
            cache = vecgroup._kl_cache(split, head, kl_rows, 0, 16, vecgroup.default_max_tokens(torch.device(device)))
        step = vecgroup.GroupStep(split, head, vecs, cache, kl_mem, 0, 16,
                                  vecgroup.default_max_tokens(torch.device(device)), amp, cuda_graphs=graphs)
        coef = [2.0 * m for m in (0.1, 0.3, 1.0, 3.0, 10.0, 1.0)]

        per_step, out, ops = run_steps(lambda b, n, kl: step.run(b, n, kl, coef)[0], opt, rows, kl_rows, steps,
                                       warmup, device, count, profile=profile)
    return {"seconds_per_step": per_step, "graphs": step.stats["graphs"], "fallback": step.stats["fallback"],
            "fused_layers": dict(n_fused), "packed": step.stats.get("packed"), "loss": per_token(out),
            "ops": ops and counts(ops)}


def metric(shape: str, device: str, on: bool, rows, calls: int, count: bool = False) -> dict:
    """``chat.response_loss`` over ``rows`` in one batch, ``calls`` times (the first untimed)."""
    from types import SimpleNamespace

    from emlib.chat import response_loss

    fused(on)
    model = model_of(shape, device)
    tok = SimpleNamespace(pad_token_id=0)
    loss = response_loss(model, tok, rows, batch_size=len(rows))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        loss = response_loss(model, tok, rows, batch_size=len(rows))
    sync(device)
    per_call = (time.perf_counter() - t0) / max(calls, 1)
    ops = None
    if count:
        with OpCounter() as c:
            response_loss(model, tok, rows, batch_size=len(rows))
        ops = counts(c.ops)
    return {"seconds_per_call": per_call, "loss": [loss], "ops": ops}


def max_rel(a: list, b: list) -> float:
    fa, fb = torch.tensor(a).flatten(), torch.tensor(b).flatten()
    return float(((fa - fb).abs() / fb.abs().clamp_min(1e-12)).max())


def main() -> None:
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    ap.add_argument("--model-dir", default=".gpu/smollm2", help="where the tokenizer is")
    ap.add_argument("--parts", default="decode,rank1,rank32,group,metric")
    ap.add_argument("--reps", type=int, default=3, help="timed runs each way (0: count operations only)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=600)
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--n-kl", type=int, default=800, help="KL rows (the paper's 800; fewer on a CPU)")
    ap.add_argument("--count", action="store_true", help="with --device cuda: also count operations on the CPU "
                    "(slow; the CPU's counts are in results/fused_smollm2-135m_cpu.json)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    dev = a.device
    parts = a.parts.split(",")
    count = dev == "cpu" or a.count
    vocab = SHAPES[a.shape]["vocab_size"]
    rows = synthetic_rows(16 * (a.steps + a.warmup), vocab)
    kl_rows = kl_rows_of(a.n_kl, vocab)
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({platform.processor() or 'x86'})",
           "shape": a.shape, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(a).items()},
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "parts": {}}
    if dev == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    if "decode" in parts:
        tok = AutoTokenizer.from_pretrained(a.model_dir)
        model = model_of(a.shape, dev)
        part = {"off": [], "on": []}
        for _ in range(a.reps):
            for v in ("off", "on"):
                part[v].append(decode(model, tok, dev, v == "on", a.new_tokens, a.prompts))
        if dev == "cuda":  # how far fused greedy answers stay from the others' (bf16 rounding)
            part["greedy_same_tokens"] = greedy_agreement(model, tok)
        for v in ("off", "on") if count else ():
            cpu_model = model_of(a.shape, "cpu") if dev == "cuda" else model
            part[f"ops_{v}"] = decode_ops(cpu_model, tok, v == "on")
        res["parts"]["decode"] = part
    import functools

    steps = {"rank1": (functools.partial(lora, adapter="rank1"), kl_rows),
             "rank32": (functools.partial(lora, adapter="rank32"), None), "group": (group, kl_rows)}
    for name, (fn, kl) in steps.items():
        if name not in parts:
            continue
        part = {"off": [], "on": []}
        for _ in range(a.reps):
            for v in ("off", "on"):
                part[v].append(fn(a.shape, dev, v == "on", rows, kl, a.steps, a.warmup))
        for v in ("off", "on") if count else ():  # one eager step on the CPU, counted
            counted = fn(a.shape, "cpu", v == "on", rows, kl[:16] if kl else None, 2, 0, graphs=False, count=True)
            part[f"ops_{v}"], part[f"loss_{v}_cpu"] = counted["ops"], counted["loss"]
            part["fused_layers_cpu"] = counted["fused_layers"]
        if count:
            part["cpu_loss_max_rel_diff"] = max_rel(part["loss_on_cpu"], part["loss_off_cpu"])
        if a.reps:
            part["loss_max_rel_diff"] = max_rel(part["on"][0]["loss"], part["off"][0]["loss"])
        res["parts"][name] = part
    if "metric" in parts:
        m_rows = rows_of(vocab, 128 if dev == "cuda" else 8)
        part = {"off": [], "on": []}
        for _ in range(a.reps):
            for v in ("off", "on"):
                part[v].append(metric(a.shape, dev, v == "on", m_rows, 5))
        for v in ("off", "on") if count else ():
            counted = metric(a.shape, "cpu", v == "on", m_rows[:8], 0, count=True)
            part[f"ops_{v}"], part[f"loss_{v}_cpu"] = counted["ops"], counted["loss"]
        if count:
            part["cpu_loss_max_rel_diff"] = max_rel(part["loss_on_cpu"], part["loss_off_cpu"])
        if a.reps:
            part["loss_max_rel_diff"] = max_rel(part["on"][0]["loss"], part["off"][0]["loss"])
        res["parts"]["metric"] = part
    os.environ.pop(FUSED_ENV, None)
    summary = {}
    for name, part in res["parts"].items():
        key = {"decode": "tokens_per_s", "metric": "seconds_per_call"}.get(name, "seconds_per_step")
        summary[name] = {}
        if "ops_off" in part:
            summary[name] = {"kernel_ops_off": part["ops_off"]["kernel_ops"],
                             "kernel_ops_on": part["ops_on"]["kernel_ops"],
                             "aten_ops_off": part["ops_off"]["aten_ops"], "aten_ops_on": part["ops_on"]["aten_ops"]}
        line = ""
        if part["off"]:
            off = statistics.median(r[key] for r in part["off"])
            on = statistics.median(r[key] for r in part["on"])
            speedup = on / off if name == "decode" else off / on
            summary[name].update({f"off_{key}": off, f"on_{key}": on, "speedup": speedup})
            line = f"off {off:10.4g}  on {on:10.4g}  {key}  speedup {speedup:.3f}x  "
        if "ops_off" in part:
            line += f"kernel ops/step {part['ops_off']['kernel_ops']:g} -> {part['ops_on']['kernel_ops']:g}"
        print(f"{name:7s} {line}", flush=True)
    res["summary"] = summary
    a.out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if dev == "cpu" else torch.cuda.get_device_name().split()[-1].lower()
    atomic_write_bytes(a.out / f"fused_{a.shape}_{tag}.json", json.dumps(res, indent=1).encode())


if __name__ == "__main__":
    main()
