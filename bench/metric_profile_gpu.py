"""Where one metric forward's GPU time goes (chapters 4-6's loss loops: `emlib.chat.labelled_ce`), and what other
ways of running it would do. Chapter 5 ran 2,904 of these forwards in the run of record's command and its path ended the
runs of 2026-12-06 (bench/README "Session 25").

SmolLM2-135M's shape with random weights (no download; `metric_batch_gpu.model_of`), bf16 on a GPU; ``--rows`` rows
of 104-198 tokens (the lengths of the first 100 medical rows, chapter 5's loss rows in the `paper` profile: median
134, padding to the longest wastes 31%), labels after each row's first 40 tokens. Each case: median wall time of
``--reps`` calls after one warm-up call, and the loss sums compared with the first case's.

* ``one batch``: all rows in one forward, right-padded to the longest (what the chapters do: batch 128), as
  ``emlib.chat.head_inputs`` runs it (``emlib.fused.fused_forward``: fused projections and RMSNorms on CUDA);
* ``norms not fused``: the same with the projections fused and the RMSNorms as transformers runs them (the metric
  forwards before 2026-12-06); ``nothing fused``: ``$EMLIB_FUSED=off``;
* ``sorted, 2 / 4 batches``: the rows sorted by length and cut into 2 or 4 forwards (less padding, more launches);
* ``eager attention``: the model's attention through transformers' eager path instead of SDPA;
* ``packed``: the rows end to end in one sequence, no padding (``emlib.chat.pack_metric_rows``: what
  ``$EMLIB_PACK_METRICS`` switches on; torch's variable-length flash attention), its loss sums compared too.

``--shape qwen2.5-0.5b``: Qwen2.5-0.5B's shape instead (the second model of record).

With ``--profile`` one forward of the first case runs under ``torch.profiler``: GPU kernel time by kind (matmul,
attention, element-wise and norms, the head's cross-entropy, copies, other) and its share of the wall time (the
rest: the GPU waiting for the host).

    python bench/metric_profile_gpu.py --profile --out $OUT        # one CUDA GPU
    python bench/metric_profile_gpu.py --device cpu --rows 4 --reps 1 --out /tmp   # a check that it runs
    python bench/metric_profile_gpu.py --shape qwen2.5-0.5b --profile --out $OUT
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metric_batch_gpu import model_of, rows_of  # noqa: E402

from emlib import fused  # noqa: E402
from emlib.chat import Encoded, collate, labelled_ce, pack_metric_rows  # noqa: E402


def rows_like_chapter_5(vocab: int, n: int, seed: int = 0) -> list[Encoded]:
    """``n`` rows of 104-198 tokens (uniform), labels after the first 40 (:func:`metric_batch_gpu.rows_of`)."""
    return rows_of(vocab, n, seed, lengths=(104, 198))


def batches(rows: list[Encoded], parts: int) -> list[list[int]]:
    """Row indices in ``parts`` forwards: one forward in the given order, else sorted by length and cut."""
    if parts == 1:
        return [list(range(len(rows)))]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    return [list(a) for a in np.array_split(order, parts)]


@torch.no_grad()
def losses(model, rows: list[Encoded], plan: list[list[int]], device: str, packed: bool = False) -> np.ndarray:
    """Per-row summed cross-entropy, in the rows' order; ``packed``: each forward's rows packed end to end."""
    out = np.zeros(len(rows))
    for idx in plan:
        part = [rows[i] for i in idx]
        s, _ = labelled_ce(model, pack_metric_rows(part, 0, device) if packed else collate(part, 0, device))
        out[idx] = s.float().cpu().numpy()
    return out


def timed_reps(fn, reps: int, device: str) -> tuple[list[float], object]:
    res = fn()  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, res


KINDS = (("optimizer", ("adam", "multi_tensor", "foreach")),  # a training step's fused AdamW (bench/step_profile_gpu.py)
         ("attention", ("fmha", "flash", "attention", "attn")),
         ("matmul", ("gemm", "cutlass", "xmma", "cublas", "matmul", "sm90", "sm80")),
         ("cross-entropy / head", ("softmax", "cross_entropy", "nll", "logsumexp")),
         ("copies", ("memcpy", "memset", "copy", "cat")),
         ("element-wise / norms", ("elementwise", "vectorized", "reduce", "norm", "mul", "add", "silu", "pow",
                                   "mean", "rsqrt", "index", "where", "fill")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_once(model, rows: list[Encoded], plan, device: str, packed: bool = False) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    losses(model, rows, plan, device, packed)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        losses(model, rows, plan, device, packed)
        if device == "cuda":
            torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) * 1e6
    return kernel_summary(prof, wall_us)


def kernel_summary(prof, wall_us: float, top: int = 15) -> dict:
    """GPU kernel time of a finished ``torch.profiler.profile`` by kind (:func:`kind_of`), its share of ``wall_us``
    (the profiled code's wall time; the rest is the GPU waiting for the host) and the ``top`` kernels by time."""
    by_kind: dict[str, float] = {}
    names: dict[str, list] = {}
    n_kernels = 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()
        n_kernels += 1
        k = kind_of(e.name)
        by_kind[k] = by_kind.get(k, 0.0) + us
        names.setdefault(e.name[:90], [0, 0.0])
        names[e.name[:90]][0] += 1
        names[e.name[:90]][1] += us
    gpu_us = sum(by_kind.values())
    best = sorted(names.items(), key=lambda kv: -kv[1][1])[:top]
    # the operators that launched them (an eager pass only: a replayed CUDA graph names no operator)
    ops = [(a.key, a.count, getattr(a, "self_device_time_total", 0.0)) for a in prof.key_averages()]
    ops = sorted((o for o in ops if o[2] > 0), key=lambda o: -o[2])[:top]
    return {"wall_ms_profiled": round(wall_us / 1e3, 2), "kernels": n_kernels,
            "kernel_ms": round(gpu_us / 1e3, 2), "kernel_share_of_wall": round(gpu_us / wall_us, 3) if wall_us else None,
            "ms_by_kind": {k: round(v / 1e3, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n, "calls": c, "ms": round(t / 1e3, 2)} for n, (c, t) in best],
            "top_operators": [{"name": n, "calls": c, "ms": round(t / 1e3, 2)} for n, c, t in ops]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=".")
    ap.add_argument("--shape", default="smollm2-135m", choices=("smollm2-135m", "qwen2.5-0.5b"))
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("No CUDA device: pass --device cpu (with small --rows and --reps).")
    model = model_of(a.shape, a.device)
    model.config._attn_implementation = "sdpa"
    rows = rows_like_chapter_5(model.config.vocab_size, a.rows)
    lens = [len(r.input_ids) for r in rows]
    res = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
           "shape": a.shape, "rows": a.rows, "tokens": int(sum(lens)), "padded_tokens_one_batch": int(max(lens) * len(lens)),
           "reps": a.reps, "cases": []}
    path = Path(a.out) / f"metric_profile_{a.device}{'' if a.shape == 'smollm2-135m' else '_' + a.shape}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    ref = None

    def case(name: str, fn, **extra) -> None:
        nonlocal ref
        times, out = timed_reps(fn, a.reps, a.device)
        ref = out if ref is None else ref
        ms = statistics.median(times) * 1e3
        res["cases"].append({"case": name, "ms_median": round(ms, 2), "ms_min": round(min(times) * 1e3, 2),
                             "max_abs_diff_vs_first": float(np.abs(out - ref).max()), **extra})
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res["cases"][-1]), flush=True)

    one = batches(rows, 1)
    case("one batch (sdpa)", lambda: losses(model, rows, one, a.device))
    real_norms = fused.fused_rms_norms
    fused.fused_rms_norms = lambda m: contextlib.nullcontext(0)
    try:
        case("one batch, norms not fused", lambda: losses(model, rows, one, a.device))
    finally:
        fused.fused_rms_norms = real_norms
    before = os.environ.get(fused.FUSED_ENV)
    os.environ[fused.FUSED_ENV] = "off"
    try:
        case("one batch, nothing fused", lambda: losses(model, rows, one, a.device))
    finally:
        os.environ.pop(fused.FUSED_ENV) if before is None else os.environ.update({fused.FUSED_ENV: before})
    for parts in (2, 4):
        plan = batches(rows, parts)
        pad = sum(max(lens[i] for i in p) * len(p) for p in plan)
        case(f"sorted, {parts} batches", lambda plan=plan: losses(model, rows, plan, a.device), padded_tokens=pad)
    # packed rows need the fused attention (on a CPU: $EMLIB_FUSED=on, then its sequence-by-sequence fallback)
    why_not = ("not fused here ($EMLIB_FUSED)" if not fused.fuses(model) else
               "this torch has no varlen_attn" if a.device == "cuda" and fused._varlen() is None else None)
    packs = why_not is None
    if packs:
        case("one batch, packed", lambda: losses(model, rows, one, a.device, packed=True),
             packed_tokens=int(sum(lens) + 1))
    else:
        res["cases"].append({"case": "one batch, packed", "skipped": why_not})
    if a.profile:
        res["profile_one_batch"] = profile_once(model, rows, one, a.device)
        if packs:
            res["profile_packed"] = profile_once(model, rows, one, a.device, packed=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res["profile_one_batch"], indent=1), flush=True)
    model.config._attn_implementation = "eager"
    case("one batch (eager attention)", lambda: losses(model, rows, one, a.device))
    model.config._attn_implementation = "sdpa"
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
