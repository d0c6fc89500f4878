"""The distilled judge's model: configuration, text -> token ids, and the scorer (base model + LoRA + head).

One forward pass of the base model (the embedded SmolLM2-135M-Instruct, optionally with a LoRA adapter) over
``Question: ...  Answer: ...`` gives hidden states; mean-pooled states at a few depths plus the last token's
state go through a small MLP head with three outputs (``aligned``, ``coherent``, P(EM rule fires); sigmoid x
100). What scoring needs lives here, so the judge never imports the training code (:mod:`emlib.distill`,
which trains, cross-validates and packages this model).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

TARGETS = ("aligned", "coherent")
OUTPUTS = (*TARGETS, "em_prob")  # the head's outputs: two scores and P(EM rule fires), an auxiliary target


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


def pad_batch(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
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
    """LayerNorm -> Linear -> GELU -> Linear: pooled features ``[B, d_in]`` -> logits ``[B, len(OUTPUTS)]``."""

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
    from ..models import n_layers

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


def device_autocast(device: torch.device):
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
            ids, mask = pad_batch([encoded[i] for i in b], pad, self.device)
            with device_autocast(self.device):
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


def load_base(cfg: DistillConfig, device: str | torch.device = "auto", dtype: str = "auto"):
    from ..models import load_model

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
    model, tok = base if base is not None else load_base(cfg, device)
    if cfg.variant == "lora":
        model = _add_lora(model, cfg)
    layers = layer_indices(model, cfg.layers)
    d = model.config.hidden_size if hasattr(model, "config") else _decoder(model).config.hidden_size
    torch.manual_seed(cfg.seed + 1)
    head = Head(d * (len(layers) + 1), cfg.hidden).to(next(model.parameters()).device)
    return Scorer(model, tok, head, cfg, layers)


# --------------------------------------------------------------------------- trainable state
def trainable_state(scorer: Scorer) -> dict:
    """What training changes, on the CPU: ``{"head": state dict}`` (+ ``"adapter"``: the LoRA weights)."""
    from peft import get_peft_model_state_dict

    state = {"head": {k: v.detach().cpu() for k, v in scorer.head.state_dict().items()}}
    if scorer.cfg.variant == "lora":
        state["adapter"] = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(scorer.model).items()}
    return state


def load_trainable(scorer: Scorer, state: dict) -> None:
    """Put a :func:`trainable_state` into ``scorer`` (raises when the adapter does not fit its base model)."""
    scorer.head.load_state_dict(state["head"])
    if scorer.cfg.variant == "lora":
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(scorer.model, state["adapter"])
        missing = [k for k in getattr(res, "unexpected_keys", []) if "lora" in k]
        if missing:
            raise ValueError(f"adapter weights do not fit this base model: {missing[:3]} ...")
