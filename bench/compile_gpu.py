"""Would ``torch.compile`` make the run of record's passes faster on a 135M model? Not tried in a run yet.

A profile of one metric forward (bench/README "Session 25": 1,397 kernels, 42.5 ms, of which element-wise
kernels 18.2 ms and copies 9.1 ms against 7.4 ms of matmuls) says SmolLM2-135M's passes are bound by many small
memory-bound kernels, which CUDA graphs (what the project uses) launch faster but do not merge. Inductor fuses
them. This bench times, in one process on SmolLM2-135M's shape with random weights (no download):

* ``forward``: the decoder body (embedding, layers, final norm: the bulk of chapter 5's metric forward) on
  ``--rows`` rows of 104-198 tokens, right-padded, no gradients;
* ``train``: one training pass of a rank-32 LoRA on all seven projections (peft; the paper's rank-32 shape) on
  16 such rows: forward, cross-entropy on the labelled tokens (transformers' loss), backward (no optimizer step);

* ``steer``: chapters 5-6's own path (``emlib.chat.head_inputs``, fused projections and norms on CUDA) under a
  steering hook whose vector changes every call, eager against compiled (the body; each layer's attention and
  MLP, as ``$EMLIB_COMPILE=on`` runs it: ``emlib.fused.compiled_layers``): whether the hook makes a compiled model recompile, and what is left of the gain then;

the first two each as ``eager``, ``eager + graph`` (one CUDA graph of the pass, as ``emlib.fasttrain`` and ``emlib.fastgen``
capture theirs), ``compile`` (the decoder body compiled in place, ``nn.Module.compile``, default mode: a
compiled top module that helpers bypass by calling ``model.model`` compiles nothing, which an earlier attempt
ran into) and ``compile + graphs`` (``mode="reduce-overhead"``: inductor's kernels inside its own CUDA graphs). Per case: the first call (with the
compilation), the median of ``--reps`` calls after it, and the loss's (and for ``train`` the gradient's)
largest difference from ``eager``.

    python bench/compile_gpu.py --out $OUT                       # one CUDA GPU, ~6 min (mostly compiling)
    python bench/compile_gpu.py --parts steer --out $OUT         # the chapters' path only, ~2 min
    python bench/compile_gpu.py --device cpu --rows 4 --reps 1 --parts forward --out /tmp   # that it runs
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metric_batch_gpu import model_of  # noqa: E402
from metric_profile_gpu import rows_like_chapter_5  # noqa: E402

from emlib.chat import collate  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, reps: int, device: str) -> tuple[float, float, object]:
    """(first call s, median of ``reps`` later calls s, the last result)."""
    _sync(device)
    t0 = time.perf_counter()
    res = fn()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        res = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times) if times else first, res


def _graphed(fn, device: str):
    """``fn`` (no arguments, fixed input tensors) captured once as a CUDA graph by ``emlib.fasttrain.capture`` (what
    the training step captures with); the returned function replays it and returns the captured outputs (the same
    tensors each call)."""
    from emlib.fasttrain import capture

    box = {}
    graph, _ = capture(lambda _static: box.update(out=fn()), {}, torch.device(device))

    def replay():
        graph.replay()
        return box["out"]

    return replay


def _body(model):
    """The decoder body (embedding, layers, final norm) under any peft wrapping."""
    m = model
    for name in ("base_model", "model"):
        while hasattr(m, name) and not hasattr(m, "layers"):
            m = getattr(m, name)
    if not hasattr(m, "layers"):
        raise ValueError(f"no decoder body with .layers in {type(model).__name__}")
    return m


def _compile_body(model, mode: str | None) -> None:
    """Compile the decoder body in place (``nn.Module.compile``): every caller of the model runs it compiled."""
    torch._dynamo.reset()
    _body(model).compile(mode=mode, dynamic=False)


def _uncompile(model) -> None:
    _body(model)._compiled_call_impl = None
    torch._dynamo.reset()


def _cases(device: str, modes: list[str]) -> list[tuple[str, str | None, bool]]:
    """(name, compile mode or "eager", capture a graph) per case asked for."""
    out = []
    if device == "cuda" and "graph" in modes:
        out.append(("eager + graph", "eager", True))
    if "compile" in modes:
        out.append(("compile", None, False))
    if device == "cuda" and "compile-graphs" in modes:
        out.append(("compile + graphs", "reduce-overhead", False))
    return out


def run_cases(model, make_fn, reps: int, device: str, modes: list[str], grads=None) -> dict:
    """``make_fn()`` -> a function of no arguments returning the loss tensor; ``grads()`` -> the flat gradient."""
    out = {}
    fn = make_fn()
    first, med, ref = _time(fn, reps, device)
    ref = ref.detach().float().clone()
    ref_grad = grads().clone() if grads else None
    out["eager"] = {"first_s": round(first, 3), "median_ms": round(1000 * med, 2)}
    print("eager", json.dumps(out["eager"]), flush=True)
    for name, mode, graph in _cases(device, modes):
        try:
            t0 = time.perf_counter()
            if mode != "eager":
                _compile_body(model, mode)
            fn = make_fn()
            if graph:
                fn = _graphed(fn, device)
            built = time.perf_counter() - t0
            first, med, got = _time(fn, reps, device)
            got = got.detach().float()
            out[name] = {"first_s": round(built + first, 3), "median_ms": round(1000 * med, 2),
                         "speedup_vs_eager": round(out["eager"]["median_ms"] / (1000 * med), 2),
                         "loss_max_rel_diff": float(((got - ref).abs() / ref.abs().clamp_min(1e-6)).max())}
            if grads:
                g = grads()
                out[name]["grad_rel_diff"] = float((g - ref_grad).norm() / ref_grad.norm().clamp_min(1e-12))
        except Exception as err:  # noqa: BLE001 -- a bench: report what failed and go on
            out[name] = {"error": f"{type(err).__name__}: {err}"[:400]}
        finally:
            _uncompile(model)
        print(name, json.dumps(out[name]), flush=True)
    return out


def forward_part(model, ids: torch.Tensor, reps: int, device: str, modes: list[str]) -> dict:
    """The decoder body on right-padded rows (no mask: a real token never sees the pad tail), no gradients."""
    def make():
        @torch.no_grad()
        def fn():
            return model.model(input_ids=ids).last_hidden_state.float().pow(2).mean(dim=(1, 2))  # [b]
        return fn

    return run_cases(model, make, reps, device, modes)


def steer_part(model, ids: torch.Tensor, reps: int, device: str, n_vectors: int = 6,
               cases: tuple[str, ...] = ("body", "layers")) -> dict:
    """Chapters 5-6's forward as they run it: ``emlib.chat.head_inputs`` (on CUDA with ``emlib.fused``'s fused
    projections and RMSNorms) under a steering hook on the middle layer that a new vector replaces before every
    call (``emlib.hooks.add_vector``), eager against the decoder body compiled and against each layer's attention
    and MLP compiled. Per case: the first call, the median over ``n_vectors`` new vectors after it (a compile that
    traces the hook recompiles or falls back when the vector changes: this says which), and dynamo's count of
    frames compiled."""
    from emlib import hooks
    from emlib.chat import head_inputs
    from emlib.fused import compiled_layers

    k = len(_body(model).layers) // 2
    d = model.config.hidden_size
    g = torch.Generator(device="cpu").manual_seed(0)
    vectors = [torch.randn(d, generator=g).to(device=device, dtype=next(model.parameters()).dtype)
               for _ in range(n_vectors + 2)]
    mask = torch.ones_like(ids)

    lib = {"on": False}  # the library's own switch: emlib.fused.compiled_layers (what $EMLIB_COMPILE=on runs)

    @torch.no_grad()
    def call(i: int) -> torch.Tensor:
        with hooks.add_vector(model, k, vectors[i], 1.0), compiled_layers(model, lib["on"]):
            states, _ = head_inputs(model, ids, mask)
            return states.float().pow(2).mean(dim=(1, 2))

    def measure() -> dict:
        from torch._dynamo.utils import counters

        counters.clear()
        _sync(device)
        t0 = time.perf_counter()
        ref = call(0)
        _sync(device)
        first = time.perf_counter() - t0
        times = []
        for i in range(1, n_vectors + 1):
            t0 = time.perf_counter()
            call(i)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return {"first_s": round(first, 3), "median_ms": round(1000 * statistics.median(times), 2),
                "max_ms": round(1000 * max(times), 2), "frames_compiled": int(counters["stats"]["unique_graphs"]),
                "_ref": ref}

    out = {}
    base = measure()
    ref = base.pop("_ref")
    out["chapters' path (eager, fused)"] = base
    print("steer eager", json.dumps(base), flush=True)
    for key, name, on, off in (("body", "compile body", lambda: _compile_body(model, None), lambda: _uncompile(model)),
                               ("layers", "compile attention + MLP (emlib.fused.compiled_layers)",
                                lambda: lib.update(on=True) or torch._dynamo.reset(),
                                lambda: lib.update(on=False) or torch._dynamo.reset())):
        if key not in cases:
            continue
        try:
            on()
            r = measure()
            got = r.pop("_ref")
            r["speedup_vs_eager"] = round(base["median_ms"] / r["median_ms"], 2)
            r["first_max_rel_diff"] = float(((got - ref).abs() / ref.abs().clamp_min(1e-6)).max())
            out[name] = r
        except Exception as err:  # noqa: BLE001
            out[name] = {"error": f"{type(err).__name__}: {err}"[:400]}
        finally:
            off()
        print("steer", name, json.dumps(out[name]), flush=True)
    return out


def train_part(model, ids: torch.Tensor, labels: torch.Tensor, reps: int, device: str, modes: list[str]) -> dict:
    """A rank-32 LoRA's forward, cross-entropy on the labelled tokens and backward (fixed gradient tensors, so a
    graph can accumulate into them)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=32, lora_alpha=64, use_rslora=True, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(0)
    pm = get_peft_model(model, cfg)
    for n, p in pm.named_parameters():
        if "lora_B" in n:  # nonzero B, so gradients reach A too
            torch.nn.init.normal_(p, std=1e-3)
    params = [p for p in pm.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)

    def make():
        def fn():
            for p in params:
                p.grad.zero_()
            loss = pm(input_ids=ids, labels=labels).loss
            loss.backward()
            return loss.detach()
        return fn

    def grads():
        return torch.cat([p.grad.flatten().float() for p in params])

    return run_cases(pm, make, reps, device, modes, grads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=100, help="rows of the metric forward")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--parts", default="forward,steer,train")
    ap.add_argument("--modes", default="graph,compile,compile-graphs")
    ap.add_argument("--steer-cases", default="body,layers",
                    help="steer part: which compiled cases after eager (body, layers), each in this process")
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: pass --device cpu for a check that the script runs")
    modes = a.modes.split(",")
    res = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
           "shape": a.shape, "rows": a.rows, "reps": a.reps, "parts": {}}
    model = model_of(a.shape, a.device)
    vocab = model.config.vocab_size
    if "forward" in a.parts:
        batch = collate(rows_like_chapter_5(vocab, a.rows), 0, a.device)
        res["parts"]["forward"] = forward_part(model, batch["input_ids"], a.reps, a.device, modes)
    if "steer" in a.parts:
        batch = collate(rows_like_chapter_5(vocab, a.rows), 0, a.device)
        res["parts"]["steer"] = steer_part(model, batch["input_ids"], a.reps, a.device,
                                           cases=tuple(a.steer_cases.split(",")))
    if "train" in a.parts:
        batch = collate(rows_like_chapter_5(vocab, 16, seed=1), 0, a.device)
        res["parts"]["train"] = train_part(model, batch["input_ids"], batch["labels"], a.reps, a.device, modes)
    path = Path(a.out) / f"compile_{a.shape}.json"
    path.write_text(json.dumps(res, indent=2))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
