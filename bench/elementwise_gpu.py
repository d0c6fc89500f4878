"""The rotary step and the MLP's gate/up product, forward and backward, in ways that launch different kernels.

``step_profile_gpu.py`` (H100, 2026-12-07) found the largest single kernel of the finetune steps to be PyTorch's
generic element-wise kernel (``elementwise_kernel<128, 4, ...>``: 27% of the rank-1 + KL step's GPU time, 23%
of the vector group's), the path an element-wise operation takes when an operand is broadcast or strided,
instead of the vectorised one. In ``emlib.fused`` two places feed it such operands on every layer:

* the rotary step ``x * cos + roll(x) * sin_signed`` on ``x`` = q and k sliced out of the fused q/k/v output
  (strided) with ``cos``/``sin`` broadcast over the heads;
* the MLP's ``silu(gate) * up`` on the two halves of the fused gate/up output (each strided).

This times each way on the shapes of a training step (``--tokens``: 24 rows x 208 positions, the paper's 16
rows + 8 KL rows; and the vector group's upper layers, 7 copies of 16 rows), forward + backward with a gradient
flowing into the input, bf16, median of ``--reps`` CUDA-event timings; and each way's largest difference from
the current one (forward output and input gradient):

rope:   ``current`` (emlib.fused.rope on the q/k slice, broadcast cos/sin), ``whole`` (the same three operations
        on the whole q/k/v tensor, contiguous, with cos/sin made full-size once per forward and 1 / 0 on the v
        heads), ``compiled`` (``torch.compile`` of ``current``, dynamic shapes);
swiglu: ``chunk`` (one matmul on the concatenated weights, halves of its output), ``two`` (two matmuls, as
        transformers' MLP), ``stacked`` (one batched matmul whose output is [2, tokens, inter]: both halves
        contiguous), ``compiled`` (``torch.compile`` of ``chunk``'s element-wise part);
head:   the LM head and float32 cross-entropy at a third of the positions (``head_cases``).

    python bench/elementwise_gpu.py --out $OUT        # one CUDA GPU, ~1 min with the compiles, carry nothing
    python bench/elementwise_gpu.py --device cpu --reps 2 --tokens 64 --out /tmp      # that it runs
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from emlib.data import write_json  # noqa: E402
from emlib.fused import _SignedSin, rope  # noqa: E402

SHAPE = {"hidden": 576, "inter": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64}  # SmolLM2-135M


def timed(fn, reps: int, device: str) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after two warm-ups."""
    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def rope_cases(b: int, s: int, device: str, dtype, reps: int) -> dict:
    h, kv, d = SHAPE["heads"], SHAPE["kv_heads"], SHAPE["head_dim"]
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv0 = torch.randn(b, s, h + 2 * kv, d, generator=g).to(device, dtype)
    ang = torch.randn(1, s, d, generator=g)
    cos, sin = ang.cos().to(device, dtype), ang.sin().to(device, dtype)
    signed = _SignedSin.signed(sin)
    grad = torch.randn(b, s, h + 2 * kv, d, generator=g).to(device, dtype)

    def current(qkv):
        qk = rope(qkv[:, :, :h + kv], cos.unsqueeze(2), signed.unsqueeze(2))
        return torch.cat((qk, qkv[:, :, h + kv:]), dim=2)  # the cat only so that all cases return one tensor

    def whole(qkv):  # cos/sin full-size, identity on v (made once per forward in a real pass: timed in here)
        c = torch.cat((cos.unsqueeze(2).expand(b, s, h + kv, d), torch.ones_like(cos).unsqueeze(2).expand(b, s, kv, d)), 2)
        sn = torch.cat((signed.unsqueeze(2).expand(b, s, h + kv, d), torch.zeros_like(sin).unsqueeze(2).expand(b, s, kv, d)), 2)
        return torch.addcmul(qkv * c, qkv.roll(d // 2, dims=-1), sn)

    compiled_rope = torch.compile(rope, dynamic=True, fullgraph=True)

    def compiled(qkv):
        qk = compiled_rope(qkv[:, :, :h + kv], cos.unsqueeze(2), signed.unsqueeze(2))
        return torch.cat((qk, qkv[:, :, h + kv:]), dim=2)

    return _run({"current": current, "whole": whole, "compiled": compiled}, qkv0, grad, reps)


def swiglu_cases(n: int, device: str, dtype, reps: int) -> dict:
    dm, i = SHAPE["hidden"], SHAPE["inter"]
    g = torch.Generator(device="cpu").manual_seed(1)
    x0 = torch.randn(n, dm, generator=g).to(device, dtype)
    w = (torch.randn(2 * i, dm, generator=g) / dm ** 0.5).to(device, dtype)
    grad = torch.randn(n, i, generator=g).to(device, dtype)
    silu = torch.nn.functional.silu

    def chunk(x):
        gate, up = torch.nn.functional.linear(x, w).chunk(2, dim=-1)
        return silu(gate) * up

    def two(x):
        return silu(torch.nn.functional.linear(x, w[:i])) * torch.nn.functional.linear(x, w[i:])

    w3 = w.view(2, i, dm)

    def stacked(x):
        gu = torch.matmul(x.unsqueeze(0), w3.transpose(1, 2))  # [2, n, i]
        return silu(gu[0]) * gu[1]

    glu = torch.compile(lambda gu: silu(gu[..., :i]) * gu[..., i:], dynamic=True, fullgraph=True)

    def compiled(x):
        return glu(torch.nn.functional.linear(x, w))

    return _run({"chunk": chunk, "two": two, "stacked": stacked, "compiled": compiled}, x0, grad, reps)


def head_cases(n: int, device: str, dtype, reps: int) -> dict:
    """Summed cross-entropy of ``n`` positions over SmolLM2's 49,152-token vocabulary, float32 as emlib.fasttrain
    computes it: ``current`` (the head's bf16 logits cast to float32), ``mm_fp32`` (the head's product written in
    float32 directly: ``torch.mm(..., out_dtype=torch.float32)``, one cast kernel less, no bf16 rounding)."""
    vocab, dm = 49152, SHAPE["hidden"]
    g = torch.Generator(device="cpu").manual_seed(2)
    h0 = torch.randn(n, dm, generator=g).to(device, dtype)
    w = (torch.randn(vocab, dm, generator=g) / dm ** 0.5).to(device, dtype)
    t = torch.randint(0, vocab, (n,), generator=g).to(device)
    ce = torch.nn.functional.cross_entropy

    def current(h):
        return ce(torch.nn.functional.linear(h, w).float(), t, reduction="sum")

    def mm_fp32(h):
        return ce(torch.mm(h, w.t(), out_dtype=torch.float32), t, reduction="sum")

    cases = {"current": current}
    try:
        mm_fp32(h0.clone().requires_grad_(True)).backward()
        cases["mm_fp32"] = mm_fp32
    except (RuntimeError, NotImplementedError, TypeError) as e:
        print("mm_fp32 unavailable:", str(e).splitlines()[0][:200])
    return _run(cases, h0, torch.ones((), device=device), reps)


def _run(cases: dict, x0: torch.Tensor, grad: torch.Tensor, reps: int) -> dict:
    out, ref = {}, None
    for name, fn in cases.items():
        x = x0.clone().requires_grad_(True)

        def one():
            x.grad = None
            fn(x).backward(grad)

        t0 = time.perf_counter()
        y = fn(x)
        y.backward(grad)
        first = time.perf_counter() - t0
        got = (y.detach(), x.grad.detach().clone())
        ref = ref or got
        out[name] = {"ms_fwd_bwd": round(timed(one, reps, x0.device.type), 4), "first_s": round(first, 3),
                     "out_rel_diff": rel(got[0], ref[0]), "grad_rel_diff": rel(got[1], ref[1])}
        print(name, json.dumps(out[name]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--tokens", default="24x208,112x208", help="rows x positions per case, comma-separated")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("No CUDA device: pass --device cpu (with small --reps and --tokens).")
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    res = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": str(dtype), "reps": a.reps, "shape": SHAPE,
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cases": {}}
    for spec in a.tokens.split(","):
        b, s = (int(v) for v in spec.lower().split("x")) if "x" in spec else (1, int(spec))
        print(f"== {b} x {s}", flush=True)
        res["cases"][f"{b}x{s}"] = {"rope": rope_cases(b, s, a.device, dtype, a.reps),
                                    "swiglu": swiglu_cases(b * s, a.device, dtype, a.reps),
                                    "head": head_cases(b * s // 3, a.device, dtype, a.reps)}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"elementwise_{a.device}.json"
    write_json(path, res)
    print("wrote", path)


if __name__ == "__main__":
    main()
