"""Benchmark: the KL finetunes' optimizer step, as ``emlib.train`` runs it on a GPU (``fasttrain.TrainStep``),
before and after the KL rows joined the training rows' pass (2026-12-04).

* ``before``: each step's KL batch is a pass of its own -- the reference forward (adapter off), the current
  forward and the backward on the 8 KL rows -- after the pass of the 16 training rows: 2 CUDA graphs a step,
  3 forwards and 2 backwards. Re-created here (:class:`BeforeStep`) from the code of commit 9821bbe.
* ``after``: the reference model's states at the KL rows' answer positions are computed once, and the 8 KL
  rows join the 16 training rows: 1 graph of 24 rows a step, 1 forward and 1 backward.
* ``general``: the same step without KL rows (the general solution's finetune), the floor.

Paper settings: a rank-1 LoRA on the middle layer's ``down_proj`` (``train.add_lora(model, "rank1")``),
16 training rows of the bad-medical set's lengths per step, KL batch 8 rows out of 800 of the KL set's lengths
(prompt 55-89 tokens, answer 40-109; the paper's KL rows under SmolLM2's tokenizer: 144 tokens on average,
73 of them answer, at most 227), lambda 2. Random weights of SmolLM2-135M's shape (``--shape``), bf16
on a GPU. Reports seconds per step after the capture (``--steps`` timed steps after ``--warmup``), the ratio,
aten operations per step counted on one eager step (what a graph replays, kernel for kernel on a GPU),
and the largest differences between before and after (loss, KL, gradient norm per step: bf16 rounding of
other batch shapes, not asserted). Not a test.

    python bench/kl_step_gpu.py --out $OUT                                   # one GPU
    python bench/kl_step_gpu.py --device cpu --steps 3 --warmup 1 --out /tmp  # the CPU (eager, float32)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metric_batch_gpu import SHAPES, model_of  # noqa: E402
from train_gpu import synthetic_rows  # noqa: E402

from emlib import train  # noqa: E402
from emlib.chat import IGNORE, Encoded  # noqa: E402
from emlib.data import atomic_write_bytes  # noqa: E402
from emlib.chat import n_targets  # noqa: E402
from emlib.fasttrain import TrainStep, collate_right, fast_kl_sum, one_sequence_per_row  # noqa: E402


class BeforeStep(TrainStep):
    """TrainStep's KL term as it was until commit 9821bbe: each KL batch its own pass (and graph), with the
    reference forward inside it."""

    def _kl_pass(self, x: dict[str, torch.Tensor]) -> None:
        with self._amp(), one_sequence_per_row():
            s, _ = fast_kl_sum(self.model, x, self._current, self._reference, self.kl_chunk)
        mean = s * x["inv_count"]
        (mean * self._kl_weight).backward()
        self._kl.add_(mean.detach())

    def _kl_capture(self, shape) -> None:
        from emlib.fasttrain import capture

        key = ("kl", shape)
        if key in self._graphs or not self.use_graphs:
            return
        b, n, t = shape
        static = {"input_ids": torch.full((b, n), self.pad, dtype=torch.long, device=self.device),
                  "target_index": torch.zeros(t, dtype=torch.long, device=self.device),
                  "targets": torch.full((t,), IGNORE, dtype=torch.long, device=self.device),
                  "inv_count": torch.ones((), device=self.device)}
        graph, self._pool = capture(self._kl_pass, static, self.device, self._pool)
        self._graphs[key] = (graph, static)
        self.stats["graphs"] += 1

    def grads(self, rows, n_tok, kl_batches=(), kl_weight=0.0):
        for p, g in zip(self.params, self._grads):
            p.grad = g
        plan = self.plan(rows)
        kl_plan = [(self.shape([self.kl_rows[i] for i in b]), [self.kl_rows[i] for i in b]) for b in kl_batches]
        for shape, _ in plan:
            self._capture(shape, 0)
        for shape, _ in kl_plan:
            self._kl_capture(shape)
        torch._foreach_zero_(self._grads)
        self._loss.zero_()
        self._kl.zero_()
        self._n.fill_(max(n_tok, 1))
        self._kl_weight.fill_(kl_weight)
        for shape, micro in plan:
            mrows = [rows[i] for i in micro]
            self._run(self._inputs(mrows, len(mrows), [], shape, 0), shape, 0)
        for shape, kl_rows in kl_plan:
            batch = collate_right(kl_rows, self.pad, self.pad_multiple, shape=shape)
            x = {k: batch[k] for k in ("input_ids", "target_index", "targets")}
            x["inv_count"] = torch.tensor(1.0 / max(sum(n_targets(e) for e in kl_rows), 1))
            if self.use_graphs:
                graph, static = self._graphs[("kl", shape)]
                for k, buf in static.items():
                    buf.copy_(x[k].pin_memory(), non_blocking=True)
                graph.replay()
            else:
                self._kl_pass({k: v.to(self.device) for k, v in x.items()})
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        return self._loss.clone(), norm, self._kl.clone()


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def kl_rows_of(n: int, vocab: int, seed: int = 1) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, a = int(torch.randint(55, 90, (1,), generator=g)), int(torch.randint(40, 110, (1,), generator=g))
        ids = torch.randint(100, vocab - 1, (p + a,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE] * p + ids[p:]))
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_steps(one_step, opt, rows, kl_rows, steps: int, warmup: int, device: str, count: bool, kl_batch: int = 8,
              profile: dict | None = None) -> tuple[float, list, Counter | None]:
    """``warmup + steps`` optimizer steps: ``one_step(batch, n_tok, kl_batches)`` on 16 training rows (and
    ``kl_batch`` KL rows when ``kl_rows``), then ``opt.step()``. Returns (seconds per timed step, [(what
    one_step returned, n_tok)] per step, the aten operations of the last step's ``one_step`` when ``count``).
    ``profile``, a dict: one more step after the timed ones runs under ``torch.profiler`` and the dict gets its
    GPU kernel time by kind (``metric_profile_gpu.kernel_summary``) and the step's tokens."""
    out, ops, t0 = [], None, None

    def batch_of(s: int):
        batch = rows[(16 * s) % len(rows):(16 * s) % len(rows) + 16]
        kl = [[(kl_batch * s + i) % len(kl_rows) for i in range(kl_batch)]] if kl_rows else []
        return batch, sum(n_targets(e) for e in batch), kl

    for s in range(warmup + steps):
        if s == warmup:
            sync(device)
            t0 = time.perf_counter()
        batch, n_tok, kl = batch_of(s)
        if count and s == warmup + steps - 1:
            with OpCounter() as c:
                got = one_step(batch, n_tok, kl)
            ops = c.ops
        else:
            got = one_step(batch, n_tok, kl)
        opt.step()
        out.append((got, n_tok))
    sync(device)
    per_step = (time.perf_counter() - t0) / steps
    if profile is not None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        from metric_profile_gpu import kernel_summary

        batch, n_tok, kl = batch_of(warmup + steps)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        t1 = time.perf_counter()
        with profiler(activities=acts) as prof:
            one_step(batch, n_tok, kl)
            opt.step()
            sync(device)
        profile.update(kernel_summary(prof, (time.perf_counter() - t1) * 1e6),
                       train_tokens=int(sum(len(e.input_ids) for e in batch)), target_tokens=int(n_tok))
    return per_step, out, ops


def run(variant: str, shape: str, device: str, rows, kl_rows, steps: int, warmup: int, kl_batch: int,
        lam: float, graphs: bool = True, count_ops: bool = False) -> dict:
    model = train.add_lora(model_of(shape, device), "rank1", seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:  # B != 0: the current model differs from the reference from the first step
            p.normal_(0, 0.02)
    cls = BeforeStep if variant == "before" else TrainStep
    kw = {} if variant == "general" else {"reference": model.disable_adapter, "kl_rows": kl_rows}
    step = cls(model, params, 0, cuda_graphs=graphs, **kw)
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01, **step.adamw_kwargs)
    with step.kernels():
        if variant == "after":  # the one forward of the KL set, timed on its own
            sync(device)
            t_ref = time.perf_counter()
            step.reference_states()
            sync(device)
            t_ref = time.perf_counter() - t_ref
        per_step, out, counted = run_steps(lambda b, n, kl: step.grads(b, n, kl, lam), opt, rows,
                                           None if variant == "general" else kl_rows, steps, warmup, device,
                                           count_ops, kl_batch)
    vals = torch.stack([torch.stack([loss / max(n_tok, 1), norm.float(), kl_sum])
                        for (loss, norm, kl_sum), n_tok in out]).float().cpu()
    ops = sum(counted.values()) if counted is not None else None
    return {"variant": variant, "seconds_per_step": per_step, "steps": steps, "graphs": step.stats["graphs"],
            "cuda_graphs": step.stats["cuda_graphs"], "fallback": step.stats["fallback"],
            "reference_once_s": t_ref if variant == "after" else None, "aten_ops_per_step": ops,
            "loss": vals[:, 0].tolist(), "grad_norm": vals[:, 1].tolist(), "kl": vals[:, 2].tolist()}


def max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--n-kl", type=int, default=800)
    ap.add_argument("--kl-batch", type=int, default=8)
    ap.add_argument("--lam", type=float, default=2.0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    vocab = SHAPES[a.shape]["vocab_size"]
    rows = synthetic_rows(16 * (a.steps + a.warmup), vocab)
    kl_rows = kl_rows_of(a.n_kl, vocab)
    res = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "shape": a.shape,
           "torch": torch.__version__, "args": {k: str(v) for k, v in vars(a).items()}, "runs": {}}
    for v in ("general", "before", "after"):
        res["runs"][v] = run(v, a.shape, a.device, rows, kl_rows, a.steps, a.warmup, a.kl_batch, a.lam)
        eager = run(v, a.shape, a.device, rows, kl_rows, 1, 1, a.kl_batch, a.lam, graphs=False, count_ops=True)
        res["runs"][v]["aten_ops_per_step"] = eager["aten_ops_per_step"]
        r = res["runs"][v]
        print(f"{v:8s} {r['seconds_per_step'] * 1e3:8.2f} ms/step  graphs {r['graphs']}  "
              f"aten ops/step {r['aten_ops_per_step']}", flush=True)
    b, af = res["runs"]["before"], res["runs"]["after"]
    res["speedup_after_vs_before"] = b["seconds_per_step"] / af["seconds_per_step"]
    res["after_vs_general"] = af["seconds_per_step"] / res["runs"]["general"]["seconds_per_step"]
    res["max_rel_diff_after_vs_before"] = {k: max_rel(af[k], b[k]) for k in ("loss", "grad_norm", "kl")}
    print(f"after / before: {res['speedup_after_vs_before']:.2f}x faster; after / general "
          f"{res['after_vs_general']:.2f}; max relative differences {res['max_rel_diff_after_vs_before']}")
    a.out.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name().split()[-1].lower() if a.device == "cuda" else "cpu"
    name = f"kl_step_{a.shape}_{where}.json"
    atomic_write_bytes(a.out / name, json.dumps(res, indent=1).encode())
    print("wrote", a.out / name)


if __name__ == "__main__":
    main()
