"""Where a finetune's optimizer step spends its GPU time, at the paper's 16 rows: the finetunes are ~60% of a
``paper`` run's process-seconds, and on an H200 the run drew 570-670 W of the card's 692 W for most of its
length (bench/README "Session 30"), so a run under 300 s needs each step to cost less GPU work, not a better
order. This says which kernels that work is.

For each part, as ``emlib.train`` runs it on a GPU (``bench/fused_gpu.py``'s builders: fused layers on, random
weights of SmolLM2-135M's shape, synthetic rows of the medical set's lengths):

* ``rank1``: a rank-1 LoRA adapter with the KL term (16 training rows + 8 KL rows, lambda 2; chapter 3's sweep);
* ``rank32``: a rank-32 adapter on every projection, no KL (chapter 1's finetunes);
* ``group``: chapter 3's group of seven steering vectors (``vecgroup.GroupStep``).

Each part runs twice: with the step as CUDA graphs (what the runs use; seconds per step over ``--steps``) and
eagerly; after its timed steps, one more step runs under ``torch.profiler``: GPU kernel time by kind (optimizer,
attention, matmul, cross-entropy / head, copies, element-wise / norms, other: ``metric_profile_gpu.kind_of``),
its share of that step's wall time, the 15 longest kernels (eager: also the 15 operators that launched most kernel time). The eager step's kernels are the graph's kernels
(a graph replays what was captured); ``kernel_share_of_wall`` of the graphed step near 1 means the step is
bound by its kernels, and then only fewer or cheaper kernels make it faster.

    python bench/step_profile_gpu.py --out $OUT                    # one CUDA GPU, ~1-2 min (est.); carry nothing
    python bench/step_profile_gpu.py --device cpu --steps 1 --warmup 0 --n-kl 16 --out /tmp   # a check that it runs
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fused_gpu import group, lora  # noqa: E402
from kl_step_gpu import kl_rows_of  # noqa: E402
from metric_batch_gpu import SHAPES  # noqa: E402
from train_gpu import synthetic_rows  # noqa: E402

from emlib.data import write_json  # noqa: E402

PARTS = {"rank1": (functools.partial(lora, adapter="rank1"), True),
         "rank32": (functools.partial(lora, adapter="rank32"), False),
         "group": (group, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--n-kl", type=int, default=800, help="KL rows (the paper's 800; fewer on a CPU)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tag", default="", help="appended to the file name (e.g. _pack-off)")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("No CUDA device: pass --device cpu (with --steps 1 --warmup 0 --n-kl 16).")
    unknown = set(a.parts.split(",")) - set(PARTS)
    if unknown:
        sys.exit(f"unknown part(s) {sorted(unknown)}: choose from {', '.join(PARTS)}")
    vocab = SHAPES[a.shape]["vocab_size"]
    rows = synthetic_rows(16 * (a.steps + a.warmup + 1), vocab)
    kl_rows = kl_rows_of(a.n_kl, vocab)
    res = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
           "pack": os.environ.get("EMLIB_PACK", "auto"), "vocab_loss": os.environ.get("EMLIB_VOCAB_LOSS", "auto"),
           "shape": a.shape, "steps": a.steps, "warmup": a.warmup,
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "parts": {}}
    path = a.out / f"step_profile_{a.shape}_{a.device}{a.tag}.json"
    for name in a.parts.split(","):
        fn, with_kl = PARTS[name]
        res["parts"][name] = {}
        for graphs in ((True, False) if a.device == "cuda" else (False,)):  # on a CPU both would be eager
            prof: dict = {}
            got = fn(a.shape, a.device, True, rows, kl_rows if with_kl else None, a.steps, a.warmup,
                     graphs=graphs, profile=prof)
            case = "graphs" if graphs else "eager"
            res["parts"][name][case] = {"seconds_per_step": round(got["seconds_per_step"], 5),
                                        "graphs_captured": got["graphs"], "fallback": got["fallback"],
                                        "packed": got.get("packed"), "profile": prof, "loss_per_token": got["loss"]}
            print(name, case, json.dumps({k: v for k, v in res["parts"][name][case].items()
                                          if k not in ("profile", "loss_per_token")}),
                  json.dumps({k: prof.get(k) for k in ("kernel_ms", "kernel_share_of_wall", "ms_by_kind")}), flush=True)
            write_json(path, res)
    print("wrote", path)


if __name__ == "__main__":
    main()
