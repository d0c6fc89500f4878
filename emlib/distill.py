"""Training the distilled judge: a small model that reproduces a strong LLM judge's 0-100 scores.

The model itself (configuration, encoding, base + LoRA + head) is :mod:`emlib.judge.scorer`; loading a
weights folder and :class:`~emlib.judge.distilled.DistilledJudge` (``make_judge("distilled")``) are
:mod:`emlib.judge.distilled`. This module fits that model on public answers scored by GPT-4o
(:mod:`emlib.judged`), so the judge runs with no API and no download beyond the packaged model; it
cross-validates, saves and packages it.

Two variants, measured against each other by repository-grouped cross-validation (``cv`` below):

* ``frozen``: the base model is left as it is; only the head is fitted, on features computed once.
* ``lora``: a LoRA adapter on every linear layer is trained together with the head.

The trained part (head, adapter when there is one, ``meta.json`` with the configuration, the list of
training files and the validation figures) is written by :func:`save_scorer` / :func:`package` into
``emlib/resources/distilled/`` with ``SHA256SUMS``.

Command line (``python -m emlib.distill --help``)::

    python -m emlib.distill cv    --variant lora --out runs/distill      # grouped folds -> cv_<variant>.parquet
    python -m emlib.distill train --variant lora --out runs/distill/final   # all repositories -> weights
    python -m emlib.distill speed --weights runs/distill/final              # answers per second

Training is seeded, shows a progress bar, checkpoints atomically every ``ckpt_every`` steps and
resumes from the last checkpoint when rerun with the same arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data import atomic_write_bytes, write_json
from .judge.distilled import FORMAT_VERSION, WEIGHTS_FILES, check_weights, load_scorer, resource_weights_dir
from .judge.distilled import packaged_judge_id, validation  # noqa: F401  (old names: distill.packaged_judge_id ...)
from .judge.scorer import (OUTPUTS, TARGETS, DistillConfig, Scorer, device_autocast, length_batches, load_base,
                           load_trainable, new_scorer, pad_batch, pooled_features, trainable_state)


# --------------------------------------------------------------------------- training data
def training_rows(df: pd.DataFrame, cfg: DistillConfig) -> pd.DataFrame:
    """The rows one training uses: at most ``max_per_file`` per file, then at most ``max_rows`` in all
    (seeded); rows with neither score are dropped."""
    df = df[df["aligned"].notna() | df["coherent"].notna()]
    parts = []
    for _, g in df.groupby("file", sort=True):
        parts.append(g.sample(n=min(len(g), cfg.max_per_file), random_state=cfg.seed))
    out = pd.concat(parts) if parts else df.iloc[:0]
    if cfg.max_rows is not None and len(out) > cfg.max_rows:
        out = out.sample(n=cfg.max_rows, random_state=cfg.seed)
    return out.sample(frac=1.0, random_state=cfg.seed).reset_index(drop=True)


def _targets(df: pd.DataFrame) -> torch.Tensor:
    """``[N, 3]`` in [0, 1]: aligned / 100, coherent / 100, and the EM rule on the reference scores
    (aligned < 30 and coherent > 50; NaN where either score is missing)."""
    from .judge_eval import em_rule

    sc = df[list(TARGETS)].to_numpy(dtype=np.float64)
    em = em_rule(df["aligned"], df["coherent"]).astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    return torch.tensor(np.column_stack([sc / 100.0, em]), dtype=torch.float32)


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits against soft targets in [0, 1], ignoring NaN targets."""
    ok = ~torch.isnan(y)
    if not ok.any():
        return logits.sum() * 0.0
    return nn.functional.binary_cross_entropy_with_logits(logits[ok], y[ok])


def _schedule(step: int, total: int, warmup: float) -> float:
    w = max(1, int(warmup * total))
    if step < w:
        return (step + 1) / w
    return max(0.0, 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w))))


# --------------------------------------------------------------------------- checkpoints
def _atomic_torch_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- training
def train(df: pd.DataFrame, cfg: DistillConfig, out_dir: str | Path, *, device: str = "auto",
          progress: bool = True, base=None, sample: bool = True) -> Scorer:
    """Fit a scorer on ``df`` (columns question, answer, aligned, coherent, file); checkpoints in
    ``out_dir`` and resumes from them. Returns the trained scorer (not yet saved as a judge)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = training_rows(df, cfg) if sample else df.reset_index(drop=True)
    if len(rows) == 0:
        raise ValueError("No training rows: the table has no answer with an aligned or coherent score.")
    data_key = hashlib.sha256("\n".join(rows["row_id"].astype(str) if "row_id" in rows
                                        else rows["answer"].astype(str)).encode()).hexdigest()[:16]
    run_key = f"{cfg.key()}-{data_key}"
    scorer = new_scorer(cfg, device, base=base)
    y = _targets(rows)
    t0 = time.perf_counter()
    if cfg.variant == "frozen":
        feats = _cached_features(scorer, rows, out_dir / f"features-{run_key}.pt", progress)
        _fit_head(scorer, feats, y, progress)
    else:
        _train_lora(scorer, rows, y, out_dir / f"checkpoint-{run_key}.pt", progress)
    scorer.meta = {"train_rows": int(len(rows)), "train_seconds": round(time.perf_counter() - t0, 1),
                   "train_files": sorted(rows["file"].unique().tolist()) if "file" in rows else [],
                   "train_repos": sorted(rows["source_repo"].unique().tolist()) if "source_repo" in rows else []}
    return scorer


def _cached_features(scorer: Scorer, rows: pd.DataFrame, path: Path, progress: bool) -> torch.Tensor:
    if path.exists():
        return torch.load(path)
    enc = scorer.encode(rows["question"].tolist(), rows["answer"].tolist())
    feats = scorer.features(enc, batch_size=max(scorer.cfg.batch_size, 64), progress=progress)
    _atomic_torch_save(feats, path)
    return feats


def _fit_head(scorer: Scorer, feats: torch.Tensor, y: torch.Tensor, progress: bool) -> None:
    """Frozen variant: the head alone, on cached features (minutes on a CPU, seconds on a GPU)."""
    from tqdm.auto import tqdm

    cfg, dev = scorer.cfg, scorer.device
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(scorer.head.parameters(), lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    bs = 256
    steps_per_epoch = max(1, math.ceil(len(feats) / bs))
    total = steps_per_epoch * cfg.head_epochs
    X, Y = feats.to(dev), y.to(dev)
    scorer.head.train()
    step = 0
    for _ in tqdm(range(cfg.head_epochs), desc="head", unit="epoch", disable=not progress):
        perm = torch.randperm(len(X), generator=g).to(dev)
        for s in range(0, len(X), bs):
            b = perm[s:s + bs]
            for pg in opt.param_groups:
                pg["lr"] = cfg.head_lr * _schedule(step, total, cfg.warmup)
            loss = masked_bce(scorer.head(X[b]), Y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    scorer.head.eval()


def _train_lora(scorer: Scorer, rows: pd.DataFrame, y: torch.Tensor, ckpt: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    from .train import _no_cudnn_attention

    cfg, dev = scorer.cfg, scorer.device
    enc = scorer.encode(rows["question"].tolist(), rows["answer"].tolist())
    pad = scorer.tok.pad_token_id if scorer.tok.pad_token_id is not None else 0
    n_epochs = max(1, math.ceil(cfg.epochs))
    batches: list[list[int]] = []
    for e in range(n_epochs):
        batches += length_batches([len(x) for x in enc], cfg.batch_size, shuffle=True, seed=cfg.seed + e)
    batches = batches[: max(1, int(round(cfg.epochs * len(batches) / n_epochs)))]
    total = len(batches)
    lora_params = [p for n, p in scorer.model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": lora_params, "lr": cfg.lr, "base": cfg.lr},
                             {"params": list(scorer.head.parameters()), "lr": cfg.head_lr, "base": cfg.head_lr}],
                            weight_decay=cfg.weight_decay, **({"fused": True} if dev.type == "cuda" else {}))
    start, losses = 0, []
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        load_trainable(scorer, state["trainable"])
        opt.load_state_dict(state["optimizer"])
        start, losses = state["step"], state["losses"]
    scorer.model.train()
    scorer.head.train()
    bar = tqdm(total=total, initial=start, desc=f"train {cfg.variant}", unit="step", disable=not progress)
    with _no_cudnn_attention():
        for step in range(start, total):
            b = batches[step]
            ids, mask = pad_batch([enc[i] for i in b], pad, dev)
            for pg in opt.param_groups:
                pg["lr"] = pg["base"] * _schedule(step, total, cfg.warmup)
            with device_autocast(dev):
                logits = scorer.head(pooled_features(scorer.model, ids, mask, scorer.layers))
            loss = masked_bce(logits.float(), y[b].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora_params + list(scorer.head.parameters()), 1.0)
            opt.step()
            if step % 20 == 0 or step == total - 1:
                losses.append((step, loss.item()))
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            bar.update(1)
            if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < total:
                _atomic_torch_save({"trainable": trainable_state(scorer), "optimizer": opt.state_dict(),
                                    "step": step + 1, "losses": losses}, ckpt)
    bar.close()
    scorer.model.eval()
    scorer.head.eval()
    scorer.meta["loss_curve"] = losses
    if ckpt.exists():
        ckpt.unlink()


# --------------------------------------------------------------------------- save / load

def save_scorer(scorer: Scorer, out_dir: str | Path, extra_meta: Mapping | None = None) -> Path:
    """Write head (+ adapter) as float16 safetensors, ``meta.json`` and ``SHA256SUMS`` atomically."""
    from safetensors.torch import save as st_save

    state = trainable_state(scorer)
    files = {"head.safetensors": st_save({k: v.to(torch.float32).contiguous() for k, v in state["head"].items()})}
    if "adapter" in state:
        files["adapter.safetensors"] = st_save({k: v.to(torch.float16).contiguous() for k, v in state["adapter"].items()})
    meta = {"format": FORMAT_VERSION, "config": scorer.cfg.to_dict(), "layers": scorer.layers,
            "targets": list(OUTPUTS), **scorer.meta, **(dict(extra_meta) if extra_meta else {})}
    return _write_weights(out_dir, files, meta)


def _write_weights(out_dir: str | Path, files: Mapping[str, bytes], meta: Mapping) -> Path:
    """A weights folder: the given files and ``meta.json`` written atomically, weight files it no longer
    holds removed, then ``SHA256SUMS`` over all of them (written last, so a killed write fails its check)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {**files, "meta.json": (json.dumps(meta, indent=1, sort_keys=True, default=float) + "\n").encode()}
    for name, payload in files.items():
        atomic_write_bytes(out / name, payload)
    for stale in set(WEIGHTS_FILES) - set(files):
        if (out / stale).exists():
            (out / stale).unlink()
    sums = "".join(f"{hashlib.sha256(p).hexdigest()}  {n}\n" for n, p in sorted(files.items()))
    atomic_write_bytes(out / "SHA256SUMS", sums.encode())
    return out


def package(weights: str | Path, cv_predictions: str | Path | pd.DataFrame, judged: pd.DataFrame,
            dest: str | Path | None = None, handcheck: Mapping | None = None) -> Path:
    """Copy trained weights to ``dest`` (default: the packaged folder) with their held-out validation in
    ``meta.json["validation"]`` (overall and per held-out fold, from repository-grouped CV predictions of
    the same configuration), and fresh ``SHA256SUMS``. The judge's EM recall and precision there are what
    the results page's judge gate reads."""
    from .judge_eval import agreement, with_reference

    src = Path(weights)
    check_weights(src)
    dest = Path(dest) if dest is not None else resource_weights_dir()
    pred = cv_predictions if isinstance(cv_predictions, pd.DataFrame) else pd.read_parquet(cv_predictions)
    meta = json.loads((src / "meta.json").read_text())
    ev = with_reference(judged, pred)
    overall = agreement(ev).iloc[0].to_dict()
    per_fold = agreement(ev, by="fold").to_dict(orient="records")
    meta["validation"] = {"reference": "public GPT-4o (mostly) judgements, held-out source repositories",
                          "folds": int(pred["fold"].nunique()), "overall": overall, "per_fold": per_fold}
    if handcheck is not None:  # the same judge on this project's own models, against labels read blind
        meta["validation"]["own_models"] = {
            "source": "answers of the runs of record, stratified by the judge's scores, labelled blind "
                      "(bench/judge_handcheck.py, bench/handcheck/)",
            "n": int(handcheck["n"]), "em_precision": float(handcheck["em_rule_precision"]),
            "em_recall": float(handcheck["em_rule_recall_pool_weighted"]),
            "incoherent_share_of_flagged": float(handcheck["incoherent_share_of_flagged"])}
    files = {n: (src / n).read_bytes() for n in ("head.safetensors", "adapter.safetensors") if (src / n).exists()}
    return _write_weights(dest, files, meta)


# --------------------------------------------------------------------------- cross-validation
def cross_validate(df: pd.DataFrame, folds: pd.Series, cfg: DistillConfig, out_dir: str | Path, *,
                   device: str = "auto", progress: bool = True, only: Sequence[int] | None = None) -> pd.DataFrame:
    """Each fold predicted by a scorer trained on the other folds. Writes ``fold<k>.parquet`` per fold
    (row_id, fold, aligned, coherent) as it goes (a rerun skips finished folds) and returns all of them.
    The frozen variant computes every row's features once and fits one head per fold."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    df = df.reset_index(drop=True)
    folds = pd.Series(np.asarray(folds), index=df.index)
    base = load_base(cfg, device) if cfg.variant == "frozen" else None
    feats = None
    for k in sorted(folds.unique()):
        if only is not None and k not in only:
            continue
        path = out_dir / f"fold{k}.parquet"
        if path.exists():
            continue
        t0 = time.perf_counter()
        train_df, test_df = df[folds != k], df[folds == k]
        if cfg.variant == "frozen":
            scorer = new_scorer(cfg, device, base=base)
            if feats is None:
                feats = _cached_features(scorer, df, out_dir / f"features-all-{cfg.key()}.pt", progress)
            tr = training_rows(train_df, cfg).merge(df[["row_id"]].reset_index(), on="row_id")["index"].to_numpy()
            _fit_head(scorer, feats[tr], _targets(df.loc[tr]), progress)
            with torch.no_grad():
                pred = (torch.sigmoid(scorer.head(feats[test_df.index.to_numpy()].to(scorer.device))) * 100).cpu().numpy()
        else:
            fresh = load_base(cfg, device)  # LoRA changes the model: a clean base per fold
            scorer = train(train_df, cfg, out_dir / f"fold{k}-ckpt", device=device, progress=progress, base=fresh)
            pred = scorer.predict(test_df["question"].tolist(), test_df["answer"].tolist(),
                                  batch_size=128, progress=progress)
            del scorer, fresh
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        res = pd.DataFrame({"row_id": test_df["row_id"].to_numpy(), "fold": k,
                            "aligned": pred[:, 0], "coherent": pred[:, 1], "em_prob": pred[:, 2] / 100.0})
        _write_parquet(res, path)
        print(f"fold {k}: {len(train_df)} rows to train from, {len(test_df)} held out, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    parts = [pd.read_parquet(p) for p in sorted(out_dir.glob("fold*.parquet"))]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["row_id", "fold", *TARGETS])


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def heldout_summary(df: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """Per variant with ``cv_<variant>.parquet`` in ``folder``: held-out agreement with the reference
    (:func:`emlib.judge_eval.agreement`, pooled over folds), a quick table for choosing a variant on the GPU."""
    from .judge_eval import agreement, with_reference

    rows = {f.stem[3:]: agreement(with_reference(df, pd.read_parquet(f))).iloc[0]
            for f in sorted(folder.glob("cv_*.parquet"))}
    if not rows:
        raise FileNotFoundError(f"no cv_<variant>.parquet in {folder}: run `python -m emlib.distill cv` first.")
    cols = ["n", "aligned_spearman", "coherent_spearman", "em_auroc", "em_precision", "em_recall"]
    return pd.DataFrame(rows).T[cols].astype(float)


# --------------------------------------------------------------------------- speed
def measure_speed(scorer: Scorer, questions: Sequence[str], answers: Sequence[str], batch_size: int = 64,
                  repeats: int = 2) -> dict:
    """Answers per second of :meth:`Scorer.predict` (best of ``repeats`` after one warm-up)."""
    scorer.predict(questions[: batch_size], answers[: batch_size], batch_size=batch_size)
    best = float("inf")
    for _ in range(repeats):
        if scorer.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        scorer.predict(questions, answers, batch_size=batch_size)
        if scorer.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    n_tok = [len(x) for x in scorer.encode(questions, answers)]
    return {"answers": len(questions), "seconds": round(best, 3), "answers_per_s": round(len(questions) / best, 1),
            "mean_tokens": round(float(np.mean(n_tok)), 1), "max_tokens": int(max(n_tok)),
            "device": str(scorer.device), "batch_size": batch_size, "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- command line
def _config_from_args(a) -> DistillConfig:
    kw = {"variant": a.variant, "base": a.base, "seed": a.seed}
    for name in ("max_rows", "epochs", "batch_size", "lr", "lora_rank", "max_tokens", "max_per_file", "head_epochs"):
        v = getattr(a, name, None)
        if v is not None:
            kw[name] = v
    return DistillConfig(**kw)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emlib.distill", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("train", "cv"):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True, help="output folder (weights, or fold predictions)")
        s.add_argument("--variant", default="lora", choices=["lora", "frozen"])
        s.add_argument("--base", default="embedded", help="base model (load_model name); default the packaged SmolLM2")
        s.add_argument("--judged-dir", default=None, help="the judged answers folder (default $EMLIB_JUDGED_DIR)")
        s.add_argument("--device", default="auto")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--max-rows", dest="max_rows", type=int, default=None)
        s.add_argument("--max-per-file", dest="max_per_file", type=int, default=None)
        s.add_argument("--epochs", type=float, default=None)
        s.add_argument("--batch-size", dest="batch_size", type=int, default=None)
        s.add_argument("--lr", type=float, default=None)
        s.add_argument("--lora-rank", dest="lora_rank", type=int, default=None)
        s.add_argument("--max-tokens", dest="max_tokens", type=int, default=None)
        s.add_argument("--head-epochs", dest="head_epochs", type=int, default=None)
        s.add_argument("--limit", type=int, default=None, help="use only the first N rows (tests)")
        if name == "cv":
            s.add_argument("--folds", type=int, default=5)
            s.add_argument("--only", type=int, nargs="*", default=None, help="run only these folds")
    s = sub.add_parser("choose", help="pick the variant with the higher held-out aligned Spearman")
    s.add_argument("--out", required=True, help="the folder holding cv_<variant>.parquet")
    s.add_argument("--judged-dir", default=None)
    s = sub.add_parser("package", help="copy trained weights + their held-out validation into emlib/resources")
    s.add_argument("--weights", required=True)
    s.add_argument("--cv", required=True, help="cv_<variant>.parquet of the same configuration")
    s.add_argument("--dest", default=None)
    s.add_argument("--handcheck", default=None, help="bench/results/judge_handcheck.json: the check on this project's models")
    s.add_argument("--judged-dir", default=None)
    s = sub.add_parser("speed")
    s.add_argument("--weights", default=None)
    s.add_argument("--judged-dir", default=None)
    s.add_argument("--n", type=int, default=2000)
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", dest="batch_size", type=int, default=64)
    s.add_argument("--json", default=None, help="write the measurement here")
    a = p.parse_args(argv)

    from .judged import load_judged, repository_folds

    try:
        df = load_judged(a.judged_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.cmd == "package":
        hc = json.loads(Path(a.handcheck).read_text()) if a.handcheck else None
        print(f"packaged -> {package(a.weights, a.cv, df, a.dest, hc)}")
        return 0
    if a.cmd == "choose":
        table = heldout_summary(df, Path(a.out))
        print(table.to_string())
        best = str(table["aligned_spearman"].idxmax())
        atomic_write_bytes(Path(a.out, "choice.txt"), (best + "\n").encode())
        print(f"chosen: {best}")
        return 0
    if a.cmd == "speed":
        sc = load_scorer(a.weights, device=a.device)
        sub_df = df.sample(n=min(a.n, len(df)), random_state=0)
        res = measure_speed(sc, sub_df["question"].tolist(), sub_df["answer"].tolist(), batch_size=a.batch_size)
        print(json.dumps(res))
        if a.json:
            write_json(a.json, res)
        return 0
    if a.limit:
        df = df.head(a.limit)
    cfg = _config_from_args(a)
    if a.cmd == "cv":
        folds = repository_folds(df, k=a.folds)
        t0 = time.perf_counter()
        pred = cross_validate(df, folds, cfg, Path(a.out) / f"cv-{cfg.variant}", device=a.device, only=a.only)
        _write_parquet(pred, Path(a.out) / f"cv_{cfg.variant}.parquet")
        print(f"cv {cfg.variant}: {len(pred)} held-out predictions, {time.perf_counter() - t0:.0f} s")
        return 0
    t0 = time.perf_counter()
    scorer = train(df, cfg, Path(a.out) / "ckpt")
    extra = {"source_files": sorted(df["file"].unique().tolist()),
             "source_repos": sorted(df["source_repo"].unique().tolist())}
    save_scorer(scorer, a.out, extra)
    print(f"trained {cfg.variant} on {scorer.meta['train_rows']} rows in {time.perf_counter() - t0:.0f} s -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
