"""The distilled judge: a packaged small model that reproduces a strong LLM judge's 0-100 scores.

One forward pass of the embedded SmolLM2-135M-Instruct (optionally with a LoRA adapter) over
``Question: ...  Answer: ...`` gives hidden states; mean-pooled states at a few depths plus the last
token's state go through a small MLP head with two outputs, ``aligned`` and ``coherent`` (sigmoid x 100).
It is trained on public answers scored by GPT-4o (:mod:`emlib.judged`), so it runs with no API and no
download beyond the packaged model.

Two variants, measured against each other by repository-grouped cross-validation (``cv`` below):

* ``frozen``: the base model is left as it is; only the head is fitted, on features computed once.
* ``lora``: a LoRA adapter on every linear layer is trained together with the head.

The trained part (head, adapter when there is one, ``meta.json`` with the configuration, the list of
training files and the validation figures) lives in ``emlib/resources/distilled/`` with ``SHA256SUMS``;
:func:`load_scorer` checks the checksums. :class:`DistilledJudge` is the :class:`emlib.judge.Judge`
behind ``make_judge("distilled")``; it scores ``aligned`` and ``coherent`` in one pass and delegates
the three domain kinds to the keyword heuristic (no judged domain data exist to validate a head).

Command line (``python -m emlib.distill --help``)::

    python -m emlib.distill cv    --variant lora --out runs/distill      # grouped folds -> cv_<variant>.parquet
    python -m emlib.distill train --variant lora --out runs/distill/final   # all repositories -> weights
    python -m emlib.distill speed --weights runs/distill/final              # answers per second

Training is seeded, shows a progress bar, checkpoints atomically every ``ckpt_every`` steps and
resumes from the last checkpoint when rerun with the same arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

TARGETS = ("aligned", "coherent")
OUTPUTS = (*TARGETS, "em_prob")  # the head's outputs: two scores and P(EM rule fires), an auxiliary target
WEIGHTS_FILES = ("head.safetensors", "adapter.safetensors", "meta.json")
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class DistillConfig:
    """Everything that defines a distilled judge (saved in ``meta.json``; part of checkpoint keys)."""

    base: str = "embedded"          # the model whose hidden states are read (load_model name)
    variant: str = "lora"           # "lora" | "frozen"
    lora_rank: int = 16
    lora_alpha: int = 32
    layers: tuple[float, ...] = (0.5, 0.75, 1.0)  # depths (fractions) whose mean-pooled states feed the head
    max_tokens: int = 320           # prompt + answer tokens; the answer is cut at the end
    max_question_tokens: int = 96
    hidden: int = 256               # head width
    batch_size: int = 64
    epochs: float = 1.0
    lr: float = 4e-4                # LoRA learning rate
    head_lr: float = 1e-3
    head_epochs: int = 30           # frozen variant: epochs over cached features
    weight_decay: float = 0.01
    warmup: float = 0.05
    max_rows: int | None = 40000    # training rows (sampled, at most max_per_file from one file)
    max_per_file: int = 600
    seed: int = 0
    ckpt_every: int = 200

    def __post_init__(self):
        if self.variant not in ("lora", "frozen"):
            raise ValueError(f"variant must be 'lora' or 'frozen', not {self.variant!r}.")
        if not self.layers or any(not 0.0 < f <= 1.0 for f in self.layers):
            raise ValueError(f"layers are fractions of depth in (0, 1], got {self.layers!r}.")
        if self.max_tokens < self.max_question_tokens + 24:
            raise ValueError("max_tokens must leave room for the answer (>= max_question_tokens + 24).")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "DistillConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "layers" in d:
            d["layers"] = tuple(float(x) for x in d["layers"])
        return cls(**d)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- text -> token ids
def encode_pairs(tok, questions: Sequence[str], answers: Sequence[str], max_tokens: int,
                 max_question_tokens: int = 96) -> list[list[int]]:
    """Token ids of ``Question: q\\nAnswer: a`` per pair; ``Question: q`` cut at ``max_question_tokens``,
    the answer cut so the whole fits ``max_tokens``. No special tokens (the same for every base model)."""
    q_ids = tok([f"Question: {q}" for q in questions], add_special_tokens=False)["input_ids"]
    a_ids = tok([" " + (a or "") for a in answers], add_special_tokens=False)["input_ids"]
    sep = tok("\nAnswer:", add_special_tokens=False)["input_ids"]
    out = []
    for q, a in zip(q_ids, a_ids):
        q = q[:max_question_tokens] + sep
        out.append(q + a[: max(1, max_tokens - len(q))])
    return out


def _pad(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ``[B, T]`` and attention mask ``[B, T]``."""
    T = max(len(x) for x in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


def length_batches(lengths: Sequence[int], batch_size: int, *, shuffle: bool, seed: int = 0,
                   chunk: int = 50) -> list[list[int]]:
    """Index batches with similar lengths (less padding). Shuffled: random chunks of ``chunk`` batches
    sorted by length inside, batch order shuffled; else sorted by length (inference)."""
    idx = np.arange(len(lengths))
    lens = np.asarray(lengths)
    if not shuffle:
        order = idx[np.argsort(-lens, kind="stable")]
        return [order[s:s + batch_size].tolist() for s in range(0, len(order), batch_size)]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(idx)
    batches = []
    span = batch_size * chunk
    for s in range(0, len(perm), span):
        part = perm[s:s + span]
        part = part[np.argsort(-lens[part], kind="stable")]
        batches += [part[j:j + batch_size].tolist() for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------- the model
class Head(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear: pooled features ``[B, d_in]`` -> logits ``[B, 2]``."""

    def __init__(self, d_in: int, hidden: int = 256, n_out: int = len(OUTPUTS)):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _decoder(model):
    """The transformer body (no LM head: the judge never needs logits over the vocabulary)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return m.model if hasattr(m, "model") else m


def layer_indices(model, fractions: Sequence[float]) -> list[int]:
    """hidden_states indices (1..n_layers) at the given depths."""
    from .models import n_layers

    n = n_layers(model)
    return sorted({max(1, min(n, int(round(f * n)))) for f in fractions})


def pooled_features(model, ids: torch.Tensor, mask: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """``[B, d * (len(layers) + 1)]``: masked mean of each chosen layer's states + the last token's
    state at the deepest one, in float32."""
    out = _decoder(model)(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    hs = out.hidden_states
    m = mask.unsqueeze(-1).to(hs[0].dtype)
    denom = m.sum(1).clamp_min(1)
    feats = [(hs[i] * m).sum(1) / denom for i in layers]
    last = mask.sum(1) - 1
    feats.append(hs[max(layers)][torch.arange(ids.shape[0], device=ids.device), last])
    return torch.cat(feats, dim=-1).float()


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Scorer:
    """A base model (+ LoRA) and a head that turn (question, answer) pairs into 0-100 scores."""

    model: object
    tok: object
    head: Head
    cfg: DistillConfig
    layers: list[int]
    meta: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    def encode(self, questions: Sequence[str], answers: Sequence[str]) -> list[list[int]]:
        return encode_pairs(self.tok, questions, answers, self.cfg.max_tokens, self.cfg.max_question_tokens)

    @torch.no_grad()
    def features(self, encoded: list[list[int]], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """Pooled features ``[N, d]`` (float32, on the CPU) in the order of ``encoded``."""
        from tqdm.auto import tqdm

        self.model.eval()
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        out: torch.Tensor | None = None
        batches = length_batches([len(x) for x in encoded], batch_size, shuffle=False)
        for b in tqdm(batches, desc="features", unit="batch", disable=not progress):
            ids, mask = _pad([encoded[i] for i in b], pad, self.device)
            with _autocast(self.device):
                f = pooled_features(self.model, ids, mask, self.layers)
            if out is None:
                out = torch.empty((len(encoded), f.shape[1]), dtype=torch.float32)
            out[torch.tensor(b)] = f.cpu()
        return out if out is not None else torch.empty((0, 0))

    @torch.no_grad()
    def predict(self, questions: Sequence[str], answers: Sequence[str], batch_size: int = 64,
                progress: bool = False) -> np.ndarray:
        """``[N, 3]`` in 0..100: aligned, coherent, and 100 x P(EM rule fires) (an auxiliary output)."""
        if len(questions) == 0:
            return np.zeros((0, len(OUTPUTS)))
        feats = self.features(self.encode(questions, answers), batch_size=batch_size, progress=progress)
        self.head.eval()
        logits = self.head(feats.to(self.device))
        return (torch.sigmoid(logits) * 100.0).double().cpu().numpy()


def _load_base(cfg: DistillConfig, device: str | torch.device = "auto", dtype: str = "auto"):
    from .models import load_model

    model, tok = load_model(cfg.base, device=device, dtype=dtype, seed=cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _add_lora(model, cfg: DistillConfig):
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules="all-linear")
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, lcfg)


def new_scorer(cfg: DistillConfig, device: str | torch.device = "auto", base=None) -> Scorer:
    """A fresh scorer: base model (+ a new LoRA adapter for the ``lora`` variant) and a new head.
    ``base``: an already loaded ``(model, tok)`` to reuse (the frozen variant never changes it)."""
    model, tok = base if base is not None else _load_base(cfg, device)
    if cfg.variant == "lora":
        model = _add_lora(model, cfg)
    layers = layer_indices(model, cfg.layers)
    d = model.config.hidden_size if hasattr(model, "config") else _decoder(model).config.hidden_size
    torch.manual_seed(cfg.seed + 1)
    head = Head(d * (len(layers) + 1), cfg.hidden).to(next(model.parameters()).device)
    return Scorer(model, tok, head, cfg, layers)


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
    from .data import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _trainable_state(scorer: Scorer) -> dict:
    from peft import get_peft_model_state_dict

    state = {"head": {k: v.detach().cpu() for k, v in scorer.head.state_dict().items()}}
    if scorer.cfg.variant == "lora":
        state["adapter"] = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(scorer.model).items()}
    return state


def _load_trainable(scorer: Scorer, state: dict) -> None:
    scorer.head.load_state_dict(state["head"])
    if scorer.cfg.variant == "lora":
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(scorer.model, state["adapter"])
        missing = [k for k in getattr(res, "unexpected_keys", []) if "lora" in k]
        if missing:
            raise ValueError(f"adapter weights do not fit this base model: {missing[:3]} ...")


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
        _load_trainable(scorer, state["trainable"])
        opt.load_state_dict(state["optimizer"])
        start, losses = state["step"], state["losses"]
    scorer.model.train()
    scorer.head.train()
    bar = tqdm(total=total, initial=start, desc=f"train {cfg.variant}", unit="step", disable=not progress)
    with _no_cudnn_attention():
        for step in range(start, total):
            b = batches[step]
            ids, mask = _pad([enc[i] for i in b], pad, dev)
            for pg in opt.param_groups:
                pg["lr"] = pg["base"] * _schedule(step, total, cfg.warmup)
            with _autocast(dev):
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
                _atomic_torch_save({"trainable": _trainable_state(scorer), "optimizer": opt.state_dict(),
                                    "step": step + 1, "losses": losses}, ckpt)
    bar.close()
    scorer.model.eval()
    scorer.head.eval()
    scorer.meta["loss_curve"] = losses
    if ckpt.exists():
        ckpt.unlink()


# --------------------------------------------------------------------------- save / load
def resource_weights_dir() -> Path:
    return Path(__file__).parent / "resources" / "distilled"


def weights_dir(path: str | Path | None = None) -> Path:
    """Explicit path, else ``$EMLIB_DISTILLED_DIR``, else the packaged weights."""
    p = path or os.environ.get("EMLIB_DISTILLED_DIR")
    return Path(p) if p else resource_weights_dir()


def save_scorer(scorer: Scorer, out_dir: str | Path, extra_meta: Mapping | None = None) -> Path:
    """Write head (+ adapter) as float16 safetensors, ``meta.json`` and ``SHA256SUMS`` atomically."""
    from safetensors.torch import save as st_save

    state = _trainable_state(scorer)
    files = {"head.safetensors": st_save({k: v.to(torch.float32).contiguous() for k, v in state["head"].items()})}
    if "adapter" in state:
        files["adapter.safetensors"] = st_save({k: v.to(torch.float16).contiguous() for k, v in state["adapter"].items()})
    meta = {"format": FORMAT_VERSION, "config": scorer.cfg.to_dict(), "layers": scorer.layers,
            "targets": list(OUTPUTS), **scorer.meta, **(dict(extra_meta) if extra_meta else {})}
    return _write_weights(out_dir, files, meta)


def _write_weights(out_dir: str | Path, files: Mapping[str, bytes], meta: Mapping) -> Path:
    """A weights folder: the given files and ``meta.json`` written atomically, weight files it no longer
    holds removed, then ``SHA256SUMS`` over all of them (written last, so a killed write fails its check)."""
    from .data import atomic_write_bytes

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


def judge_id_of(sums: Mapping[str, str], cfg: DistillConfig) -> str:
    """The judge id of a weights folder (what :class:`DistilledJudge` reports, and what its cache keys use):
    a digest of the weight files and the configuration, not of ``meta.json`` (packaging adds the
    validation there without changing a single score)."""
    weights = sorted(v for k, v in sums.items() if k.endswith(".safetensors"))
    return "distilled-" + hashlib.sha256(("".join(weights) + cfg.key()).encode()).hexdigest()[:12]


def packaged_judge_id(path: str | Path | None = None) -> str:
    """The judge id of the weights ``make_judge("distilled")`` would load, without loading a model."""
    p = weights_dir(path)
    sums = check_weights(p)
    cfg = DistillConfig.from_dict(json.loads((p / "meta.json").read_text())["config"])
    return judge_id_of(sums, cfg)


def validation(path: str | Path | None = None) -> dict | None:
    """The held-out validation stored with a weights folder (None when it was never packaged)."""
    f = weights_dir(path) / "meta.json"
    return json.loads(f.read_text()).get("validation") if f.exists() else None


def check_weights(path: str | Path) -> dict[str, str]:
    """Verify ``SHA256SUMS`` in a weights folder; returns {file: sha256}. Raises with a clear message."""
    path = Path(path)
    sums = path / "SHA256SUMS"
    if not sums.exists():
        raise FileNotFoundError(
            f"No distilled judge weights in {path} (no SHA256SUMS). Train them with "
            "`python -m emlib.distill train --out DIR` and point $EMLIB_DISTILLED_DIR at DIR.")
    out = {}
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        f = path / name
        if not f.exists():
            raise FileNotFoundError(f"{f} is listed in {sums} but missing.")
        got = hashlib.sha256(f.read_bytes()).hexdigest()
        if got != digest:
            raise ValueError(f"{f} is corrupt (sha256 {got[:12]}... but SHA256SUMS says {digest[:12]}...).")
        out[name] = digest
    return out


def load_scorer(path: str | Path | None = None, device: str | torch.device = "auto", base=None) -> Scorer:
    """Load a saved distilled judge (checksums verified). ``base``: a loaded ``(model, tok)`` to reuse."""
    from safetensors.torch import load as st_load

    path = weights_dir(path)
    sums = check_weights(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}/meta.json has format {meta.get('format')}, this emlib reads {FORMAT_VERSION}.")
    cfg = DistillConfig.from_dict(meta["config"])
    scorer = new_scorer(cfg, device, base=base)
    state = {"head": st_load((path / "head.safetensors").read_bytes())}
    if cfg.variant == "lora":
        state["adapter"] = st_load((path / "adapter.safetensors").read_bytes())
    dev = scorer.device
    state["head"] = {k: v.to(dev) for k, v in state["head"].items()}
    _load_trainable(scorer, state)
    scorer.model.eval()
    scorer.head.eval()
    scorer.meta = dict(meta, judge_id=judge_id_of(sums, cfg))
    return scorer


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
    base = _load_base(cfg, device) if cfg.variant == "frozen" else None
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
            fresh = _load_base(cfg, device)  # LoRA changes the model: a clean base per fold
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
    from .data import atomic_write_bytes

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


# --------------------------------------------------------------------------- the judge
from .judge import Judge, JudgeScore, OfflineJudge  # noqa: E402  (judge imports nothing from here)


class DistilledJudge(Judge):
    """``make_judge("distilled")``: aligned and coherent from one forward pass of the packaged scorer.

    Both scores of a pair are computed together and kept, so ``judge_answers`` asking for ``coherent``
    after ``aligned`` runs no second pass. The domain kinds (medical, financial, sport) come from the
    keyword heuristic (``offline-v2``): there are no judged domain scores to train or check a head on.
    ``judge_id`` carries a digest of the weights, so scores of different weights never share a cache key.
    """

    batch_size = 256

    def __init__(self, scorer: Scorer | None = None, weights: str | Path | None = None,
                 device: str | torch.device = "auto", rubrics: Mapping[str, str] | None = None):
        self.scorer = scorer if scorer is not None else load_scorer(weights, device=device)
        self._offline = OfflineJudge()
        super().__init__(rubrics if rubrics is not None else {k: f"distilled: {k}" for k in self._offline.kinds})
        self.judge_id = self.scorer.meta.get("judge_id") or f"distilled-{self.scorer.cfg.key()[:12]}"
        self._memo: dict[tuple[str, str], tuple[float, float]] = {}

    def template(self, kind: str) -> str:
        return self._offline.template(kind).replace("offline heuristic", "distilled")

    def rubric_hash(self, kind: str) -> str:
        from .cache import text_hash

        return text_hash(f"{self.judge_id}:{kind}")

    def specials(self, kind: str) -> tuple[str, ...]:
        return ()

    def score_many(self, kind: str, pairs: Sequence[tuple[str, str]]) -> list[JudgeScore]:
        self.template(kind)
        if kind not in TARGETS:
            return self._offline.score_many(kind, pairs)
        todo = list(dict.fromkeys(p for p in pairs if p not in self._memo))
        if todo:
            pred = self.scorer.predict([q for q, _ in todo], [a for _, a in todo], batch_size=64)
            self._memo.update({p: (float(r[0]), float(r[1])) for p, r in zip(todo, pred)})
        i = TARGETS.index(kind)
        out = [JudgeScore(round(self._memo[p][i], 4), "number", 1.0) for p in pairs]
        if len(self._memo) > 200_000:
            self._memo.clear()
        return out


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
        Path(a.out, "choice.txt").write_text(best + "\n")
        print(f"chosen: {best}")
        return 0
    if a.cmd == "speed":
        sc = load_scorer(a.weights, device=a.device)
        sub_df = df.sample(n=min(a.n, len(df)), random_state=0)
        res = measure_speed(sc, sub_df["question"].tolist(), sub_df["answer"].tolist(), batch_size=a.batch_size)
        print(json.dumps(res))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
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
