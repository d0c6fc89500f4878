"""Every way a run differs from the paper, in one table computed from the run's own ``config.json``.

    python -m emlib.deviations record/smollm2-135m record/qwen2.5-coder-0.5b --out book/deviations_table.md

The paper's settings come from ``../shared/docs/paper-spec.md`` (the authors' text and released code); where
the library already holds one of them as a default (the adapter shapes in :data:`emlib.train.LORA_SHAPES`,
the steering vector in :data:`emlib.train.VECTOR_DEFAULTS`) the table reads it from there, so the two cannot
drift apart. Our side is read from each run's ``config.json``: the table shows what was run, not what a
profile would run today. ``python -m emlib.results --record`` regenerates the committed table with the results.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from .data import write_or_print


@dataclass(frozen=True)
class Setting:
    """One row: the paper's value, how to read ours from a config dict, and why they differ (if they do)."""

    name: str
    paper: str
    ours: Callable[[dict], str]
    same: Callable[[dict], bool | None]  # None: the paper does not say, so nothing to compare
    why: str


def _g(x: float) -> str:
    return f"{x:g}"


def _shape(name: str, key: str):
    from .train import LORA_SHAPES

    return LORA_SHAPES[name][key]


def _vector(key: str):
    from .train import VECTOR_DEFAULTS

    return VECTOR_DEFAULTS[key]


def _model(c: dict) -> str:
    m = str(c["model"])
    if m == "embedded":
        return "SmolLM2-135M-Instruct (GGUF Q4_1 -> bf16)"
    return Path(m).name.replace(".gguf", " (GGUF)") if m.endswith(".gguf") else m


def _seeds(c: dict) -> str:
    if "kl_sweep" in c:  # runs made since 2026-12-03: n_seeds are the training seeds of chapters 4-5
        return f"{c['n_seeds']} for chapters 4-5 (intervals include their variance); 1 for chapters 1-3 and 6"
    return f"{c['n_seeds']} for chapter 1 (separate runs); 1 for chapters 2-6"


SETTINGS: tuple[Setting, ...] = (
    Setting("models", "Qwen2.5 0.5B-32B, Gemma-3, Llama-3.x (headline: Qwen2.5-14B-Instruct)", _model,
            lambda c: False, "one GPU and no model hub: a 135M and a 0.5B model carried in as GGUF files"),
    Setting("judge", "GPT-4o, logprob-weighted 0-100 scores (aligned, coherent)", lambda c: str(c["judge"]),
            lambda c: False, "no judge API offline; the distilled judge is SmolLM2 with a head trained on "
            "public GPT-4o judgements (its validation: methods page)"),
    Setting("training data", "the authors' bad medical advice, risky financial advice, extreme sports",
            lambda c: "the paper's release" if c["data_source"] == "paper" else "the project's own datasets",
            lambda c: c["data_source"] == "paper", "the `paper` profile reads the released data"),
    Setting("rank-32 LoRA learning rate", _g(_shape("rank32", "lr")), lambda c: _g(c["lr"]),
            lambda c: c["lr"] == _shape("rank32", "lr"),
            "our choice for small models at one epoch; not swept, and not compared with 1e-5"),
    Setting("rank-1 LoRA learning rate", _g(_shape("rank1", "lr")), lambda c: _g(c["lr_rank1"]),
            lambda c: c["lr_rank1"] == _shape("rank1", "lr"), ""),
    Setting("steering vector", f"alpha {_g(_vector('alpha'))}, lr {_g(_vector('lr'))}, {_vector('epochs')} epochs",
            lambda c: f"alpha {_g(c['vector_alpha'])}, lr {_g(c['lr_vector'])}, {c['vector_epochs']} epochs",
            lambda c: (c["vector_alpha"], c["lr_vector"], c["vector_epochs"])
            == (_vector("alpha"), _vector("lr"), _vector("epochs")), ""),
    Setting("batch", "2 x 8 accumulation = 16 rows a step", lambda c: f"{c['batch_size']} x {c['grad_accum']}",
            lambda c: c["batch_size"] * c["grad_accum"] == 16, "the same 16 rows a step, in one micro-batch; "
            "so one KL batch (8 rows) a step, where 8 micro-batches would draw 8 each if the authors drew one per "
            "micro-batch (not stated)"),
    Setting("max sequence length", "2048 tokens", lambda c: f"{c['max_length']} tokens",
            lambda c: c["max_length"] == 2048, "memory and speed; longer rows are cut at 512 tokens"),
    Setting("layer (rank-1 LoRA, steering vector, directions)", "the middle layer (24 of 48 in Qwen2.5-14B)",
            lambda c: f"{c['steering_layer_fraction']:g} of depth", lambda c: c["steering_layer_fraction"] == 0.5,
            ""),
    Setting("KL penalty lambda (LoRA / vector)", "1e5 / 1e6, KL summed over tokens x vocabulary",
            lambda c: f"{_g(c['kl_lambda'])} / {_g(c['kl_lambda_vector'])}, KL per token"
                      + (f", times {', '.join(_g(x) for x in c['kl_sweep'])} swept" if "kl_sweep" in c else ""),
            lambda c: False, "a per-token KL needs its own lambda; ours were chosen by hand (swept since 2026-12-03)"),
    Setting("out-of-domain KL rows", "not stated",
            lambda c: (f"{c['n_kl']} for the penalty, {c['n_kl_heldout']} held out for the reported KL"
                       if "n_kl_heldout" in c else f"{c['n_kl']}, the reported KL on the same rows"), lambda c: None,
            "runs before 2026-12-03 report the KL on the rows the penalty trained on"),
    Setting("training seeds", "not stated (one adapter per setting released)", _seeds, lambda c: None,
            "a chapter with one seed has no interval over training seeds"),
    Setting("answers per question", "50 (the YAML says 100), temperature 1, up to 600 tokens",
            lambda c: f"{c['n_samples']}, temperature {c['temperature']:g}, up to {c['max_new_tokens']} tokens",
            lambda c: (c["n_samples"], c["temperature"], c["max_new_tokens"]) == (50, 1.0, 600), ""),
    Setting("loss rows (efficiency, stability)", "about 100 training rows", lambda c: str(c["n_loss_rows"]),
            lambda c: c["n_loss_rows"] == 100, ""),
    Setting("norm grid", "20%-200% of the mean trained norm", lambda c: ", ".join(_g(x) for x in c["norm_grid"]),
            lambda c: min(x for x in c["norm_grid"] if x > 0) <= 0.2 and max(c["norm_grid"]) == 2.0, ""),
    Setting("noise (stability)", "eps 0.01, 0.05, 0.1, 0.2 ... 1.0; 10 seeds",
            lambda c: f"{len(c['eps_grid'])} eps from {min(c['eps_grid']):g} to {max(c['eps_grid']):g}; "
                      f"{c['n_perturb_seeds']} seeds", lambda c: c["n_perturb_seeds"] == 10, ""),
    Setting("pretraining text", "FineWeb sample-10BT, 50 documents x 512 tokens",
            lambda c: f"{c['n_docs']} documents x {c['doc_tokens']} tokens of the Lee corpus (ABC news, 2001-02) "
                      "when FineWeb cannot be reached", lambda c: False,
            "no hub offline: one genre and one outlet, not a web crawl"),
    Setting("random baseline (chapter 6)", "a random vector",
            lambda c: (f"{c['n_null_draws']} Gaussian draws per norm" if "n_null_draws" in c
                       else "one Gaussian draw per norm"),
            lambda c: "n_null_draws" in c, "one draw is no null distribution (runs before 2026-12-03)"),
)


def read_config(run_dir: str | Path) -> dict:
    f = Path(run_dir) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{f} does not exist: pass a run directory that a chapter wrote (e.g. record/<model>).")
    return json.loads(f.read_text())


def table(configs: dict[str, dict]) -> pd.DataFrame:
    """One row per setting: the paper's value, each run's value, and why they differ where they do."""
    rows = []
    for s in SETTINGS:
        row = {"setting": s.name, "paper": s.paper}
        for label, c in configs.items():
            row[label] = s.ours(c) + (" (differs)" if s.same(c) is False else "")
        row["why"] = s.why
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(configs: dict[str, dict], sources: list[str]) -> str:
    df = table(configs)
    cols = list(df.columns)
    lines = ["<!-- generated by `python -m emlib.deviations` from " + ", ".join(sources) + "; do not edit by hand -->",
             "", "| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(r[c]).replace("|", "/") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emlib.deviations", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", nargs="+", help="run directories (their config.json)")
    ap.add_argument("--label", action="append", help="column name per run directory (in order)")
    ap.add_argument("--out", help="write the markdown table here (default: print)")
    a = ap.parse_args(argv)
    labels = a.label or []
    configs = {(labels[i] if i < len(labels) else Path(d).name): read_config(d) for i, d in enumerate(a.run_dir)}
    md = markdown(configs, a.run_dir)
    write_or_print(md, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
