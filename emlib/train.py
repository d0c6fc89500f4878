"""Finetuning: LoRA adapters and trained steering vectors, with an optional KL term to the chat model.

(About 820 lines, kept as one module: both solution types run through one resumable training loop, its plan,
checkpoints and log; the solution types themselves live in :mod:`emlib.adapters` and :mod:`emlib.vectors`.)

Two entry points share one resumable training loop:

* :func:`train_lora` -- supervised finetuning (loss on assistant tokens only, :mod:`emlib.chat`) of a peft
  LoRA adapter in one of the paper's two shapes: ``"rank1"`` (r 1 on one layer's ``down_proj``, alpha 256,
  layer at ``layer_fraction`` of depth, default 0.5 = the paper's 24/48) or ``"rank32"`` (r 32 on all seven
  linear projections of every layer, rsLoRA, alpha 64, dropout 0).
* :func:`train_steering_vector` -- one learnable vector ``v`` (zero init) added as ``alpha * v`` to the
  residual stream after one decoder layer (:func:`emlib.hooks.add_vector`); every model weight is frozen.

KL regularisation and its normalisation
---------------------------------------
With ``kl_rows`` (out-of-domain chat rows, ``emlib.data.load_chat("kl")``) and ``kl_lambda > 0`` the
objective of a step is ``L = L_SFT + kl_lambda * KL(reference || current)``. The reference is the frozen
chat model: the LoRA model under ``peft_model.disable_adapter()``, or the model without the vector hook,
run under ``no_grad``. **This module normalises KL per token**: the KL divergence between the two
next-token distributions is *summed over the vocabulary* and *averaged over the answer (assistant) tokens*
of the KL rows in the batch::

    KL_ours = (1 / T) * sum_t sum_v p_ref(v | t) * (log p_ref(v | t) - log p_cur(v | t))

The authors divide the same double sum by ``T * V`` (tokens x vocabulary size), so
``KL_theirs = KL_ours / V`` and an equal penalty needs ``lambda_theirs ~= lambda_ours * V``. With Qwen2.5's
vocabulary (V ~ 1.5e5) their lambda 1e5 (LoRA) and 1e6 (steering vector) correspond to ours of roughly
0.7 and 7; for SmolLM2 (V = 49152) the same conversion gives ~2 and ~20 (approximate: the authors' exact
token mask is not documented). :func:`kl_to_reference` measures the same quantity for a trained model.
``kl_until_step`` drops the term from that optimizer step on (the paper's drift experiment; KL is still
logged), and ``mix_rows`` adds rows (e.g. aligned out-of-domain answers) to the SFT data instead (the
paper's control). Passing ``kl_rows`` with ``kl_lambda=0`` only monitors KL.

Steps, checkpoints, resume
--------------------------
An optimizer step consumes ``batch_size * grad_accum`` rows; the SFT loss of a step is the token-weighted
mean over all its answer tokens; AdamW, weight decay 0.01, linear schedule with ``warmup_steps`` (5),
gradient clipping at ``max_grad_norm`` (1.0, the Hugging Face Trainer default); as in transformers, the
first step of a warmup runs at lr 0. The row order of every
epoch and the KL batches are a function of ``seed`` and the step alone, so a run restarted with the same
arguments and ``out_dir`` resumes from the last checkpoint (trainable weights + optimizer + scheduler + RNG
state + log, written atomically every ``checkpoint_every`` steps) and ends with the same weights as an
uninterrupted run. A finished run with the same arguments returns the saved result without training.

``out_dir`` layout: ``adapter/`` (peft ``save_pretrained`` + ``emlib_train.json``) or ``vector.safetensors``;
``train_log.csv`` and ``train_log.parquet``; ``train_meta.json`` (written last: marks the run finished);
``checkpoints/step-XXXXXXXX/`` while training (removed at the end unless ``keep_checkpoints``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import pandas as pd
import torch

from . import adapters
from .adapters import ADAPTER_DIR, has_lora, load_lora
from .cache import canonical_json, json_default
from .chat import IGNORE, collate, encode_rows, forward_tokens, length_batches, n_targets, token_losses
from .data import DataError, atomic_write_bytes, dataset_hash, file_lock, lock_held
from .hooks import add_vector, nothing
from .models import check_layer, fast_paths, layer_from_fraction, n_layers
from . import timing
from .timing import timed
from .vectors import VECTOR_FILE, SteeringVector, load_vector, save_vector

LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The paper's two adapter shapes (rank-32 with KL used alpha 256 and lr 2e-5: pass them explicitly).
LORA_SHAPES: dict[str, dict[str, Any]] = {
    "rank1": {"rank": 1, "alpha": 256.0, "targets": ("down_proj",), "all_layers": False, "lr": 2e-5},
    "rank32": {"rank": 32, "alpha": 64.0, "targets": LORA_TARGETS, "all_layers": True, "lr": 1e-5},
}
VECTOR_DEFAULTS: dict[str, Any] = {"alpha": 256.0, "lr": 1e-4, "epochs": 2}

META_FILE = "train_meta.json"
LOG_NAME = "train_log"
CKPT_DIR = "checkpoints"

# The one switch for emlib.fasttrain.TrainStep (each step's micro-batches as CUDA graphs at bucketed shapes,
# fused RMSNorm / LoRA kernels, bf16 autocast, fused AdamW; the KL rows in the same pass): None =
# emlib.models.fast_paths (on a CUDA device, or as $EMLIB_FAST_PATHS says); True / False force it (True on the
# CPU runs the same bucketed step eagerly: tests/test_fasttrain.py compares it with the eager loop).
FAST_STEP: bool | None = None
# With the fast step, a step's loss, KL, gradient and parameter norms stay on the device and are read (one
# host sync) every this many steps, at a checkpoint, a pause and the end: the host queues the next steps while
# the GPU runs (a sync per step left the GPU idle while the host prepared each step). Each step is still
# checked and logged; a divergence names its step. Every step is read at once with early_stop_loss or on_step.
SYNC_EVERY = 25


# =========================================================================== arguments and results
@dataclass(frozen=True)
class TrainArgs:
    """Loop settings shared by LoRA and vector training (defaults: the authors' LoRA runs)."""

    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 8
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 5
    max_length: int = 2048
    max_steps: int | None = None  # caps the run (and the schedule's length)
    max_grad_norm: float | None = 1.0
    seed: int = 0
    kl_lambda: float = 0.0
    kl_batch_size: int = 8
    kl_until_step: int | None = None  # KL in the loss for optimizer steps < this (0-based); None: always
    early_stop_loss: float | None = None  # the authors: stop once loss < 0.01 for more than 5 steps
    early_stop_patience: int = 5

    def check(self) -> "TrainArgs":
        check_schedule(self, ("epochs", "batch_size", "grad_accum", "max_length", "kl_batch_size"))
        if self.kl_lambda < 0 or not math.isfinite(self.kl_lambda):
            raise ValueError(f"kl_lambda must be >= 0, got {self.kl_lambda}.")
        return self


def check_schedule(args, at_least_one: Sequence[str]) -> None:
    """The checks every training loop's arguments share (:class:`TrainArgs`, ``emlib.fasttrain.FastTrainArgs``):
    the fields named in ``at_least_one`` >= 1, ``lr`` positive and finite, ``max_steps`` >= 1 or None,
    ``warmup_steps`` >= 0; one ValueError naming the field."""
    for name in at_least_one:
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}.")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"lr must be a positive finite number, got {args.lr}.")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {args.max_steps}.")
    if args.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {args.warmup_steps}.")


@dataclass
class TrainResult:
    """What a training call returns. ``model``: the peft model (LoRA) or the unchanged base model
    (vector); ``vector``: the trained :class:`SteeringVector` (vector runs only)."""

    kind: str  # "lora" | "vector"
    model: Any
    vector: SteeringVector | None
    log: pd.DataFrame
    out_dir: Path
    finished: bool  # False after ``stop_after``: call again with the same arguments to go on
    step: int  # optimizer steps done
    meta: dict = field(default_factory=dict)


# =========================================================================== LoRA construction and inspection
def lora_config(model, shape: str = "rank32", *, rank: int | None = None, alpha: float | None = None,
                layers: int | Sequence[int] | None = None, layer_fraction: float = 0.5,
                targets: Sequence[str] | None = None, dropout: float = 0.0, rslora: bool = True):
    """A peft ``LoraConfig`` for one of the paper's shapes; any field can be overridden.

    ``rank1``: r 1, alpha 256, ``down_proj`` of the layer at ``layer_fraction`` of depth (or ``layers``,
    e.g. nine of them). ``rank32``: r 32, alpha 64, all seven projections of all layers (or ``layers``).
    """
    from peft import LoraConfig

    if shape not in LORA_SHAPES:
        raise ValueError(f"Unknown LoRA shape {shape!r}: use one of {', '.join(LORA_SHAPES)}.")
    spec = LORA_SHAPES[shape]
    rank = spec["rank"] if rank is None else int(rank)
    alpha = spec["alpha"] if alpha is None else float(alpha)
    targets = tuple(spec["targets"] if targets is None else targets)
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
    if layers is None:
        layer_list = None if spec["all_layers"] else [layer_from_fraction(model, layer_fraction)]
    else:
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        layer_list = sorted({check_layer(model, int(i)) for i in layer_list})
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"The model has no linear modules named {missing}: its projections are "
                         f"{sorted(names)}; pass targets= with names it has.")
    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, use_rslora=rslora,
        bias="none", task_type="CAUSAL_LM", layers_to_transform=layer_list,
        layers_pattern="layers" if layer_list is not None else None)


def add_lora(model, shape: str = "rank32", *, seed: int = 0, **overrides):
    """Wrap ``model`` in a fresh peft LoRA of ``shape`` (B = 0, so it computes the base model exactly).

    peft injects the LoRA layers into ``model`` in place; ``peft_model.unload()`` removes them again.
    """
    from peft import get_peft_model

    if has_lora(model):
        raise ValueError("This model already carries LoRA layers: pass the base model "
                         "(e.g. `peft_model.unload()`, or load it again).")
    cfg = lora_config(model, shape, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
    return peft_model


# =========================================================================== KL to the reference model
def kl_from_logits(ref_logits: torch.Tensor, cur_logits: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(ref || cur) of the next-token distributions, summed over the vocabulary and over the positions
    that predict a labelled token (``labels != -100``, shifted as in the LM loss), and that count.

    ref_logits, cur_logits: [batch, seq, vocab]; labels: [batch, seq]. Divide the sum by the count for
    this module's per-token normalisation.
    """
    mask = labels[:, 1:] != IGNORE  # [b, s-1]
    ref = ref_logits[:, :-1][mask].float().log_softmax(-1)  # [n, vocab]
    cur = cur_logits[:, :-1][mask].float().log_softmax(-1)  # [n, vocab]
    kl = torch.nn.functional.kl_div(cur, ref, log_target=True, reduction="sum")
    return kl, mask.sum()


def _forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _batch_kl(model, batch: dict[str, torch.Tensor], current: Callable[[], ContextManager],
              reference: Callable[[], ContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of KL(reference || current) on a batch; gradients flow through ``current`` only."""
    with torch.no_grad(), reference():
        ref = _forward_logits(model, batch)  # [b, s, vocab]
    with current():
        cur = _forward_logits(model, batch)
    return kl_from_logits(ref, cur, batch["labels"])


def _contexts(model, vector: SteeringVector | None):
    """(current, reference) context factories for a peft model or a model + steering vector."""
    if vector is not None:
        return (lambda: vector.apply(model)), nothing
    if hasattr(model, "disable_adapter") and hasattr(model, "peft_config"):
        return nothing, model.disable_adapter
    raise ValueError("Nothing to compare with the reference: pass a peft (LoRA) model or vector=.")


@torch.no_grad()
def kl_to_reference(model, tok, rows: list[dict], *, vector: SteeringVector | None = None,
                    batch_size: int = 8, max_length: int = 512) -> float:
    """Per-token KL(reference || current) on the assistant tokens of ``rows`` (summed over the vocabulary,
    averaged over answer tokens; see the module docstring for how this relates to the authors' lambda).

    Reference = the chat model: ``model`` with its LoRA adapter disabled, or ``model`` without ``vector``.
    Rows of similar length share a forward (:func:`emlib.chat.length_batches`, at most ``batch_size``), right-padded
    without attention mask, and the LM head runs only at answer positions, a chunk of
    them at a time (:func:`emlib.fasttrain.fast_kl_sum`), so ``batch_size`` can be a GPU's worth of rows: no
    ``[rows, tokens, vocabulary]`` tensor is built. A model whose logits are more than its LM head's output
    (e.g. Gemma-2's soft-capping: :func:`emlib.chat._plain_head`) goes through its own forward instead, with
    the full logits of each batch (:func:`_batch_kl`, what the eager training loop uses).
    """
    from .chat import _plain_head
    from .fasttrain import collate_right, fast_kl_sum, one_sequence_per_row

    current, reference = _contexts(model, vector)
    enc = encode_rows(rows, tok, max_length)
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    plain = _plain_head(model) is not None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with one_sequence_per_row() if plain else contextlib.nullcontext():
            for idx in length_batches([len(e.input_ids) for e in enc], batch_size, forward_tokens(device)):
                batch = [enc[i] for i in idx]
                if plain:
                    s, c = fast_kl_sum(model, collate_right(batch, pad, device=device), current, reference)
                else:
                    s, c = _batch_kl(model, collate(batch, pad, device), current, reference)
                total, count = total + float(s), count + int(c)
    finally:
        model.train(was_training)
    return total / max(count, 1)


def fast_step_fits(model) -> bool:
    """Whether :class:`emlib.fasttrain.TrainStep` computes this model's loss: its logits must be the LM head
    applied to the decoder's output (:func:`emlib.chat._plain_head`; not, e.g., Gemma-2's soft-capped logits).
    Where it does not, the loop trains eagerly, with a warning."""
    from .chat import _plain_head

    if _plain_head(model) is not None:
        return True
    warnings.warn(f"{type(model).__name__}'s logits are more than its LM head's output (soft-capped or scaled): "
                  "training with the eager loop, not the fast step.", stacklevel=3)
    return False


# =========================================================================== the training loop
@dataclass
class _Job:
    """What the loop trains: named Parameters, and how to run the current / reference model."""

    kind: str
    model: Any  # called for every forward (the peft model, or the base model with a hook)
    params: dict[str, torch.nn.Parameter]
    current: Callable[[], ContextManager]
    reference: Callable[[], ContextManager]
    spec: dict  # kind-specific settings (part of the run's identity)
    save_result: Callable[[Path, dict], None]  # writes the final artifact into out_dir
    load_result: Callable[[Path], tuple[Any, SteeringVector | None]]


@contextlib.contextmanager
def training_mode(model):
    """The model in train mode with its KV cache off for the block (both loops: this module's and
    ``emlib.vecgroup``'s); its mode and ``config.use_cache`` are restored after."""
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.train()
    if use_cache is not None:
        model.config.use_cache = False
    try:
        yield
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache


@contextlib.contextmanager
def _no_cudnn_attention():
    """Training forwards/backwards run with PyTorch's cuDNN SDPA backend switched off (restored after).

    With an explicit attention mask (every padded batch), torch 2.11's default cuDNN attention on
    H100/H200 returns NaN in the query gradient when the sequence length is 64 mod 128 and a query row's
    log-sum-exp is below -ln(FLT_MAX) ~ -88.7 -- which Qwen2.5's attention-sink heads reach in layers
    0-8 (pytorch/pytorch#196678). The forward is fine, so the loss stays finite while the gradient norm is
    NaN. The memory-efficient (or flash / math) kernel then runs instead; on the CPU nothing changes.
    """
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def _order(seed: int, salt: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed((seed * 1_000_003 + salt) % (2 ** 63))
    return torch.randperm(n, generator=g).tolist()


def steps_per_epoch(n_rows: int, batch_size: int, grad_accum: int = 1) -> int:
    """Optimizer steps per epoch: a last, shorter micro-batch and a last, shorter accumulation both count."""
    return math.ceil(math.ceil(n_rows / batch_size) / grad_accum)


def total_steps(n_rows: int, epochs: int, batch_size: int, grad_accum: int = 1, max_steps: int | None = None) -> int:
    """The optimizer steps a training run takes (what the trainer's plan runs; ``max_steps`` caps it)."""
    total = epochs * steps_per_epoch(n_rows, batch_size, grad_accum)
    return min(total, max_steps) if max_steps else total


class _Plan:
    """Which rows each optimizer step (and each of its micro-batches) uses; a pure function of the seed."""

    def __init__(self, n_rows: int, n_kl: int, args: TrainArgs):
        self.n, self.n_kl, self.a = n_rows, n_kl, args
        self.n_micro = math.ceil(n_rows / args.batch_size)  # micro-batches per epoch
        self.steps_per_epoch = steps_per_epoch(n_rows, args.batch_size, args.grad_accum)
        self.total = total_steps(n_rows, args.epochs, args.batch_size, args.grad_accum, args.max_steps)
        self._orders: dict[int, list[int]] = {}
        self._kl_orders: dict[int, list[int]] = {}

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders[epoch] = _order(self.a.seed, epoch, self.n)
        return self._orders[epoch]

    def micro_batches(self, step: int) -> list[tuple[int, list[int]]]:
        """[(global micro-batch index, row indices)] of optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order, bs = self._epoch_order(epoch), self.a.batch_size
        first, last = k * self.a.grad_accum, min((k + 1) * self.a.grad_accum, self.n_micro)
        return [(epoch * self.n_micro + j, order[j * bs:(j + 1) * bs]) for j in range(first, last)]

    def kl_rows(self, micro: int) -> list[int]:
        """KL rows for a global micro-batch: consecutive slices of seeded permutations of the KL set."""
        out = []
        for pos in range(micro * self.a.kl_batch_size, (micro + 1) * self.a.kl_batch_size):
            rnd, i = divmod(pos, self.n_kl)
            if rnd not in self._kl_orders:
                self._kl_orders[rnd] = _order(self.a.seed, 7_919_000 + rnd, self.n_kl)
            out.append(self._kl_orders[rnd][i])
        return out


def _write_log(log: pd.DataFrame, out_dir: Path) -> None:
    atomic_write_bytes(out_dir / f"{LOG_NAME}.csv", log.to_csv(index=False).encode())
    atomic_write_bytes(out_dir / f"{LOG_NAME}.parquet", log.to_parquet(index=False))


def read_log(out_dir: str | Path) -> pd.DataFrame:
    """The training log of a run directory (parquet, else csv)."""
    out_dir = Path(out_dir)
    pq = out_dir / f"{LOG_NAME}.parquet"
    return pd.read_parquet(pq) if pq.exists() else pd.read_csv(out_dir / f"{LOG_NAME}.csv")


@contextlib.contextmanager
def finetune_lock(*out_dirs: str | Path):
    """Hold the lock of each finetune folder (:func:`emlib.data.file_lock` on a file named by the folder's path
    in the system's temporary folder: nothing is written beside the finetune) for the block, taken in sorted
    order so that two processes never wait on each other. A process asking for a
    finetune that another one is training (a chapter beside a run of record's worker, two notebooks of a
    papermill sweep) waits for it and then loads the finished run instead of training it a second time.
    Re-entrant within a process (a group that loads its members through train_steering_vector)."""
    with contextlib.ExitStack() as stack:
        for d in sorted({Path(x).resolve() for x in out_dirs} - _HELD):
            with timing.phase("train"):  # waiting for another process's training
                stack.enter_context(file_lock(_lock_file(d),
                                              f"[train] {d.name}: another process is training it; waiting for it"))
            _HELD.add(d)
            stack.callback(_HELD.discard, d)
        yield


def _lock_file(out_dir: Path) -> Path:
    """The lock file of a finetune folder (already resolved): named by its path's digest."""
    return _LOCKS / f"{hashlib.sha256(str(out_dir).encode()).hexdigest()[:24]}.lock"


def finetune_held(out_dir: str | Path) -> bool:
    """Whether another process holds :func:`finetune_lock` on ``out_dir`` now (is training it, or loading it
    once another finished): a process that asks for it waits and then loads it, and does not train it a
    second time. False where locks do not exist (no ``fcntl``) or nobody holds it (:func:`emlib.data.lock_held`)."""
    return lock_held(_lock_file(Path(out_dir).resolve()))


_HELD: set[Path] = set()  # finetune folders whose lock this process holds (finetune_lock)
# one folder per user: another user's folder in a shared /tmp is not writable
_LOCKS = Path(tempfile.gettempdir()) / f"emlib-locks-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def finetune_locked(dirs_of: Callable[[dict], Sequence[str | Path]]):
    """Decorator: the function holds :func:`finetune_lock` on ``dirs_of(arguments)`` (its arguments by name)."""
    import functools
    import inspect

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with finetune_lock(*dirs_of(sig.bind(*args, **kwargs).arguments)):
                return fn(*args, **kwargs)
        return inner
    return wrap


def finished_run(out_dir: str | Path, identity: dict) -> dict | None:
    """The meta of the finished run in ``out_dir`` when it was trained with ``identity`` (:func:`_identity`),
    None when ``out_dir`` holds no finished run; a finished run with other arguments is an error that names
    them."""
    meta = read_meta(out_dir)
    if meta is not None and meta.get("run_hash") != _hash(identity):
        raise ValueError(f"{out_dir} holds a finished run with other arguments "
                         f"({_changes(meta.get('identity', {}), identity) or 'unknown'}): "
                         "use another out_dir, or pass overwrite=True to replace it.")
    return meta


def read_meta(out_dir: str | Path) -> dict | None:
    """``train_meta.json`` of a finished run, or None."""
    p = Path(out_dir) / META_FILE
    return json.loads(p.read_text()) if p.exists() else None


def _fingerprint(model) -> str:
    info = getattr(model, "emlib_info", None)
    if info is not None:
        return info.fingerprint
    cfg = getattr(model, "config", None)
    return "unknown:" + str(getattr(cfg, "_name_or_path", "") or type(model).__name__)


def _identity(job_kind: str, spec: dict, args: TrainArgs, model, rows, kl_rows, mix_rows) -> dict:
    return {"kind": job_kind, "spec": spec, "args": dataclasses.asdict(args),
            "model": _fingerprint(model), "data": dataset_hash(rows), "n_rows": len(rows),
            "kl_data": dataset_hash(kl_rows) if kl_rows else None,
            "mix_data": dataset_hash(mix_rows) if mix_rows else None}


def _hash(identity: dict) -> str:
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


def _changes(old: dict, identity: dict) -> str:
    """What differs between a stored run's identity and ``identity`` (:func:`_identity`), as one line."""
    return "; ".join(_diff(old, json.loads(json.dumps(identity, default=json_default))))


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _checkpoints(out_dir: Path) -> list[Path]:
    root = out_dir / CKPT_DIR
    if not root.is_dir():
        return []
    ck = [p for p in root.iterdir() if re.fullmatch(r"step-\d{8}", p.name) and (p / "state.pt").exists()]
    return sorted(ck, key=lambda p: int(p.name[5:]))


def _clear_run(out_dir: Path) -> None:
    """Remove what a training run wrote (only those names: out_dir may hold other things)."""
    for name in (ADAPTER_DIR, CKPT_DIR):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in (VECTOR_FILE, META_FILE, f"{LOG_NAME}.csv", f"{LOG_NAME}.parquet"):
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _save_checkpoint(out_dir: Path, step: int, job: _Job, opt, sched, log_rows: list[dict],
                     seconds: float, run_hash: str, identity: dict) -> Path:
    from safetensors.torch import save_file

    root = out_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=root))
    try:
        save_file({k: p.detach().to("cpu").contiguous() for k, p in job.params.items()},
                  str(tmp / "trainable.safetensors"))
        torch.save({"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "rng": _rng_state(), "log": log_rows, "seconds": seconds, "run_hash": run_hash,
                    "identity": json.dumps(identity, default=json_default)}, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in _checkpoints(out_dir):  # keep the newest only
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, job: _Job, opt, sched) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / "trainable.safetensors"))
    except SafetensorError as e:
        from .data import unreadable_safetensors

        raise unreadable_safetensors(path / "trainable.safetensors", e,
                                     f"delete the checkpoint folder {path} and run again (the training starts "
                                     "anew)") from None
    if set(tensors) != set(job.params):
        raise RuntimeError(f"Checkpoint {path} holds parameters {sorted(tensors)[:4]}..., but this run "
                           f"trains {sorted(job.params)[:4]}...: delete the folder or pass overwrite=True.")
    with torch.no_grad():
        for k, p in job.params.items():
            p.copy_(tensors[k].to(p.device, p.dtype))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state


def _param_norm(params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
    """The trained parameters' global norm, a device scalar (float64; reading it is the caller's sync)."""
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()]).double()  # 3 kernels, not 3 per tensor
    return flat.pow(2).sum().sqrt()


def _diverged(what: str, value: float, step: int, epoch: int, args: TrainArgs, out_dir: Path) -> FloatingPointError:
    ck = _checkpoints(out_dir)
    where = f"the last checkpoint ({ck[-1].name}) is kept in {ck[-1].parent}" if ck else "no checkpoint was written"
    return FloatingPointError(
        f"The {what} is {value} at optimizer step {step + 1} (epoch {epoch + 1}): training diverged. Lower lr "
        f"(now {args.lr:g}) or kl_lambda, use bf16/fp32 rather than fp16, and check the data; {where}.")


def _fit(job: _Job, tok, rows: list[dict], out_dir: str | Path, args: TrainArgs, *,
         kl_rows: list[dict] | None, mix_rows: list[dict] | None, checkpoint_every: int,
         keep_checkpoints: bool, stop_after: int | None, overwrite: bool, progress: bool | None,
         on_step: Callable[[dict], None] | None, base_model) -> TrainResult:
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}.")
    with timing.phase("load"):  # recognising a finished run (and loading it) is not training
        identity = _identity(job.kind, job.spec, args, base_model, rows, kl_rows, mix_rows)
        run_hash = _hash(identity)
        if overwrite:
            _clear_run(out_dir)

        # ---- a finished run with the same arguments: return it
        meta = finished_run(out_dir, identity)
        if meta is not None:
            model, vec = job.load_result(out_dir)
            return TrainResult(job.kind, model, vec, read_log(out_dir), out_dir, True, meta["steps"], meta)

    # ---- data
    if kl_rows is not None and not kl_rows:
        raise DataError("kl_rows is empty: pass out-of-domain chat rows (emlib.data.load_chat('kl')) or None.")
    if args.kl_lambda > 0 and not kl_rows:
        raise ValueError("kl_lambda > 0 needs kl_rows (out-of-domain chat rows, emlib.data.load_chat('kl')).")
    train_rows = list(rows) + list(mix_rows or [])
    enc = encode_rows(train_rows, tok, args.max_length)
    kl_enc = encode_rows(kl_rows, tok, args.max_length) if kl_rows else None
    targets = [n_targets(e) for e in enc]
    plan = _Plan(len(enc), len(kl_enc) if kl_enc else 0, args)
    device = next(job.model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # ---- optimizer, schedule, resume
    params = list(job.params.values())
    fast = None
    if (FAST_STEP if FAST_STEP is not None else fast_paths(device)) and fast_step_fits(job.model):
        from .fasttrain import TrainStep

        fast = TrainStep(job.model, params, pad, max_grad_norm=args.max_grad_norm, current=job.current,
                         reference=job.reference, kl_rows=kl_enc)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, **(fast.adamw_kwargs if fast else {}))
    sched = get_linear_schedule_with_warmup(opt, min(args.warmup_steps, plan.total), plan.total)
    start, log_rows, seconds = 0, [], 0.0
    ck = _checkpoints(out_dir)
    if ck:
        state = torch.load(ck[-1] / "state.pt", map_location="cpu", weights_only=True)
        if state["run_hash"] != run_hash:
            changes = _changes(json.loads(state["identity"]), identity)
            raise ValueError(f"{out_dir} holds checkpoints of a run with other arguments ({changes}): use "
                             "another out_dir, or pass overwrite=True to start over.")
        state = _load_checkpoint(ck[-1], job, opt, sched)
        start, log_rows, seconds = int(state["step"]), list(state["log"]), float(state["seconds"])

    # ---- loop
    model = job.model
    last = start
    below = 0  # consecutive steps with loss under early_stop_loss (recounted from the log on resume)
    if args.early_stop_loss is not None:
        for r in reversed(log_rows):
            if r["loss"] >= args.early_stop_loss:
                break
            below += 1
    tokens = int(log_rows[-1]["tokens"]) if log_rows else 0
    in_tokens = int(log_rows[-1]["input_tokens"]) if log_rows else 0
    stopped_early = False
    bar = tqdm(total=plan.total, initial=start, desc=f"train {job.kind}", dynamic_ncols=True,
               disable=(None if progress is None else not progress))
    # steps whose numbers are not read yet: (step, n_tok, kl_on, n_kl, lr, host fields, values) where values
    # are [SFT loss sum, gradient norm, KL sum, parameter norm] (a device tensor on the fast path)
    pending: list[tuple] = []
    each_step = fast is None or args.early_stop_loss is not None or on_step is not None
    t_loop = time.perf_counter() - seconds  # seconds so far (a resumed run's included)

    def read(pending: list[tuple]) -> list[dict]:
        """The pending steps' log rows (one host sync for all), each checked in order: the first value that
        is not finite raises the divergence error naming its step."""
        nonlocal tokens
        vals = torch.stack([v for *_, v in pending]).cpu().tolist() if fast is not None else \
            [v for *_, v in pending]
        now = time.perf_counter() - t_loop
        rows = []
        for (step, n_tok, kl_on, n_kl, lr_now, host, _), (sft_sum, grad_norm, kl_total, p_norm) in zip(pending, vals):
            epoch = step // plan.steps_per_epoch
            if not math.isfinite(sft_sum):
                raise _diverged("SFT loss", sft_sum, step, epoch, args, out_dir)
            if n_kl and not math.isfinite(kl_total):
                raise _diverged("KL term", kl_total, step, epoch, args, out_dir)
            if not math.isfinite(grad_norm):
                raise _diverged("gradient norm", grad_norm, step, epoch, args, out_dir)
            tokens += n_tok
            sft = sft_sum / max(n_tok, 1)
            kl = kl_total / n_kl if n_kl else float("nan")  # the mean over KL batches of their per-token KL
            rows.append({"step": step + 1, "epoch": (step + 1) / plan.steps_per_epoch, "loss": sft, "kl": kl,
                         "kl_active": bool(kl_on), "objective": sft + (args.kl_lambda * kl if kl_on else 0.0),
                         "lr": lr_now, "grad_norm": grad_norm, "param_norm": p_norm, "tokens": tokens,
                         "input_tokens": host["input_tokens"], "seconds": host["seconds"]})
        rows[-1]["seconds"] = now  # the steps before were timed when queued; this one after the GPU finished
        pending.clear()
        return rows

    attention = contextlib.ExitStack()
    try:
        attention.enter_context(training_mode(model))
        attention.enter_context(_no_cudnn_attention())  # NaN query gradients on H100 (see there)
        if fast is not None:
            attention.enter_context(fast.kernels())
        for step in range(start, plan.total):
            micro = plan.micro_batches(step)
            n_tok = sum(targets[i] for _, idx in micro for i in idx)
            kl_on = kl_enc is not None and args.kl_lambda > 0 and (
                args.kl_until_step is None or step < args.kl_until_step)
            lr_now = float(sched.get_last_lr()[0])
            opt.zero_grad(set_to_none=True)
            n_kl = 0
            if fast is not None:  # all micro-batches, the KL rows and the clipping in one call (graphs on CUDA)
                rows_now = [enc[i] for _, idx in micro for i in idx]
                kl_now = [plan.kl_rows(m) for m, _ in micro] if kl_enc is not None else []
                s_t, norm_t, kl_t = fast.grads(rows_now, n_tok, kl_now,
                                               args.kl_lambda / len(micro) if kl_on else 0.0)
                in_tokens += sum(len(e.input_ids) for e in rows_now)
                n_kl = len(kl_now)
                opt.step()
                values = torch.stack([s_t.double(), norm_t.double(), kl_t.double(), _param_norm(job.params)])
            else:
                sft_sum, kl_vals = 0.0, []
                for m, idx in micro:
                    batch = collate([enc[i] for i in idx], pad, device)
                    in_tokens += int(batch["attention_mask"].sum())
                    with job.current():
                        s, _ = token_losses(model, batch)  # summed over the micro-batch's answer tokens
                    if not math.isfinite(float(s.detach())):
                        raise _diverged("SFT loss", float(s.detach()), step, step // plan.steps_per_epoch,
                                        args, out_dir)
                    (s / max(n_tok, 1)).backward()  # token-weighted mean over the whole step
                    sft_sum += float(s.detach())
                    if kl_enc is not None:  # separate backward: only one graph in memory at a time
                        kb = collate([kl_enc[i] for i in plan.kl_rows(m)], pad, device)
                        with contextlib.nullcontext() if kl_on else torch.no_grad():
                            ks, kc = _batch_kl(model, kb, job.current, job.reference)
                            kl_mean = ks / kc.clamp_min(1)
                        kl_val = float(kl_mean.detach())
                        if not math.isfinite(kl_val):
                            raise _diverged("KL term", kl_val, step, step // plan.steps_per_epoch, args, out_dir)
                        kl_vals.append(kl_val)
                        if kl_on:
                            (args.kl_lambda * kl_mean / len(micro)).backward()
                clip = args.max_grad_norm if args.max_grad_norm is not None else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
                if math.isfinite(grad_norm):
                    opt.step()
                n_kl = len(kl_vals)
                values = [sft_sum, grad_norm, sum(kl_vals), float(_param_norm(job.params))]
            sched.step()
            host = {"input_tokens": in_tokens, "seconds": time.perf_counter() - t_loop}
            pending.append((step, n_tok, kl_on, n_kl, lr_now, host, values))
            last = step + 1
            pause = stop_after is not None and last >= stop_after and last < plan.total
            at_checkpoint = last % checkpoint_every == 0 and last < plan.total
            if not (each_step or pause or at_checkpoint or last == plan.total or len(pending) >= SYNC_EVERY):
                continue
            new_rows = read(pending)
            for row in new_rows:
                log_rows.append(row)
                if args.early_stop_loss is not None:
                    below = below + 1 if row["loss"] < args.early_stop_loss else 0
                    stopped_early = below > args.early_stop_patience
            bar.update(len(new_rows))
            row = new_rows[-1]
            bar.set_postfix(loss=f"{row['loss']:.3f}", **({"kl": f"{row['kl']:.3g}"} if n_kl else {}))
            seconds = row["seconds"]
            pause = pause and not stopped_early
            t_out = time.perf_counter()  # checkpoints and callbacks are not training time
            if (at_checkpoint and not stopped_early) or pause:
                _save_checkpoint(out_dir, last, job, opt, sched, log_rows, seconds, run_hash, identity)
            if on_step is not None:
                on_step(dict(row))
            t_loop += time.perf_counter() - t_out
            if stopped_early or pause:
                break
    finally:
        attention.close()
        bar.close()

    log = pd.DataFrame(log_rows)
    if last < plan.total and not stopped_early:  # paused by stop_after
        return TrainResult(job.kind, job.model, _current_vector(job), log, out_dir, False, last,
                           {"run_hash": run_hash, "identity": identity})

    # ---- finished: artifact, log, then the meta file that marks the run done
    import peft
    import transformers

    meta = {"kind": job.kind, "run_hash": run_hash, "identity": identity, "finished": True,
            "steps": last, "planned_steps": plan.total, "stopped_early": stopped_early,
            "seconds": seconds, "tokens": tokens, "input_tokens": in_tokens,
            "final_loss": log_rows[-1]["loss"] if log_rows else None,
            "n_train_rows": len(enc), "n_dropped_rows": len(train_rows) - len(enc),
            "n_mix_rows": len(mix_rows or []), "n_kl_rows": len(kl_enc) if kl_enc else 0,
            "model": getattr(getattr(base_model, "emlib_info", None), "name", None),
            "fast_step": dict(fast.stats) if fast is not None else None,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__}}
    meta = json.loads(json.dumps(meta, default=str))
    job.save_result(out_dir, meta)
    _write_log(log, out_dir)
    atomic_write_bytes(out_dir / META_FILE, json.dumps(meta, indent=2).encode())
    if not keep_checkpoints:
        shutil.rmtree(out_dir / CKPT_DIR, ignore_errors=True)
    vec = _current_vector(job)
    if vec is not None:
        vec.meta = meta
    return TrainResult(job.kind, job.model, vec, log, out_dir, True, last, meta)


def _current_vector(job: _Job) -> SteeringVector | None:
    if job.kind != "vector":
        return None
    return SteeringVector(job.params["vector"].detach().clone(), job.spec["layer"], job.spec["alpha"],
                          {"spec": job.spec})


def _args(defaults: dict, **kw) -> TrainArgs:
    vals = {k: (defaults.get(k) if v is None and k in defaults else v) for k, v in kw.items()}
    vals = {k: v for k, v in vals.items() if v is not None or k in ("max_steps", "kl_until_step",
                                                                   "max_grad_norm", "early_stop_loss")}
    return TrainArgs(**vals).check()


# The loop's arguments (TrainArgs) as keywords of train_lora, train_steering_vector and emlib.vecgroup's members
LOOP_ARG_NAMES = ("lr", "epochs", "batch_size", "grad_accum", "weight_decay", "warmup_steps", "max_length",
                  "max_steps", "max_grad_norm", "seed", "kl_lambda", "kl_batch_size", "kl_until_step",
                  "early_stop_loss", "early_stop_patience")


def lora_setup(model, shape: str = "rank32", *, rank: int | None = None, alpha: float | None = None,
               layers: int | Sequence[int] | None = None, layer_fraction: float = 0.5,
               targets: Sequence[str] | None = None, dropout: float = 0.0, rslora: bool = True,
               lr: float | None = None, epochs: int = 1, batch_size: int = 2, grad_accum: int = 8,
               weight_decay: float = 0.01, warmup_steps: int = 5, max_length: int = 2048,
               max_steps: int | None = None, max_grad_norm: float | None = 1.0, seed: int = 0,
               kl_lambda: float = 0.0, kl_batch_size: int = 8, kl_until_step: int | None = None,
               early_stop_loss: float | None = None, early_stop_patience: int = 5):
    """(peft ``LoraConfig``, loop arguments, spec) of a LoRA run: the one home of its defaults and identity,
    which :func:`train_lora` and ``emlib.vecgroup.train_loras`` (several adapters at once) share."""
    if shape not in LORA_SHAPES:
        raise ValueError(f"Unknown LoRA shape {shape!r}: use one of {', '.join(LORA_SHAPES)}.")
    args = _args({"lr": LORA_SHAPES[shape]["lr"]}, lr=lr, epochs=epochs, batch_size=batch_size,
                 grad_accum=grad_accum, weight_decay=weight_decay, warmup_steps=warmup_steps,
                 max_length=max_length, max_steps=max_steps, max_grad_norm=max_grad_norm, seed=seed,
                 kl_lambda=kl_lambda, kl_batch_size=kl_batch_size, kl_until_step=kl_until_step,
                 early_stop_loss=early_stop_loss, early_stop_patience=early_stop_patience)
    cfg = lora_config(model, shape, rank=rank, alpha=alpha, layers=layers, layer_fraction=layer_fraction,
                      targets=targets, dropout=dropout, rslora=rslora)
    spec = {"shape": shape, "rank": cfg.r, "alpha": cfg.lora_alpha, "targets": sorted(cfg.target_modules),
            "layers": cfg.layers_to_transform, "dropout": cfg.lora_dropout, "rslora": cfg.use_rslora}
    return cfg, args, spec


# =========================================================================== public training entry points
@timed("train")
@finetune_locked(lambda a: [a["out_dir"]])
def train_lora(model, tok, rows: list[dict], out_dir: str | Path, shape: str = "rank32", *,
               rank: int | None = None, alpha: float | None = None,
               layers: int | Sequence[int] | None = None, layer_fraction: float = 0.5,
               targets: Sequence[str] | None = None, dropout: float = 0.0, rslora: bool = True,
               lr: float | None = None, epochs: int = 1, batch_size: int = 2, grad_accum: int = 8,
               weight_decay: float = 0.01, warmup_steps: int = 5, max_length: int = 2048,
               max_steps: int | None = None, max_grad_norm: float | None = 1.0, seed: int = 0,
               kl_rows: list[dict] | None = None, kl_lambda: float = 0.0, kl_batch_size: int = 8,
               kl_until_step: int | None = None, mix_rows: list[dict] | None = None,
               early_stop_loss: float | None = None, early_stop_patience: int = 5,
               checkpoint_every: int = 50, keep_checkpoints: bool = False, stop_after: int | None = None,
               overwrite: bool = False, progress: bool | None = None,
               on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Finetune a LoRA adapter of ``shape`` ("rank1" | "rank32") on ``rows`` (loss on assistant tokens).

    Defaults are the authors' (module docstring; ``lr`` None -> 2e-5 for rank1, 1e-5 for rank32).
    ``kl_rows`` + ``kl_lambda`` add the per-token KL to the frozen chat model; ``kl_until_step`` drops it
    from that step on; ``mix_rows`` are extra SFT rows. ``stop_after`` pauses after that many steps (a
    later identical call resumes). ``model`` is the base model: peft injects the adapter into it in place
    (on an exception the injection is undone). Returns a :class:`TrainResult` whose ``model`` is the peft
    model; a finished run in ``out_dir`` with the same arguments is loaded instead of retrained.
    """
    if not rows:
        raise DataError("No training rows: pass a non-empty list of chat rows.")
    if has_lora(model):
        raise ValueError("This model already carries LoRA layers: pass the base model "
                         "(`result.model.unload()` gives it back, or load it again).")
    cfg, args, spec = lora_setup(model, shape, rank=rank, alpha=alpha, layers=layers, layer_fraction=layer_fraction,
                                 targets=targets, dropout=dropout, rslora=rslora, lr=lr, epochs=epochs,
                                 batch_size=batch_size, grad_accum=grad_accum, weight_decay=weight_decay,
                                 warmup_steps=warmup_steps, max_length=max_length, max_steps=max_steps,
                                 max_grad_norm=max_grad_norm, seed=seed, kl_lambda=kl_lambda,
                                 kl_batch_size=kl_batch_size, kl_until_step=kl_until_step,
                                 early_stop_loss=early_stop_loss, early_stop_patience=early_stop_patience)

    def load_result(out: Path):
        return load_lora(model, out), None

    def save_result(out: Path, meta: dict) -> None:
        adapters.save(peft_model, out / ADAPTER_DIR, meta)

    meta = read_meta(out_dir) if not overwrite else None
    if meta is not None and meta.get("kind") == "lora":  # finished: load, no injection needed
        job = _Job("lora", model, {}, nothing, nothing, spec, save_result, load_result)
        return _fit(job, tok, rows, out_dir, args, kl_rows=kl_rows, mix_rows=mix_rows,
                    checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                    stop_after=stop_after, overwrite=False, progress=progress, on_step=on_step,
                    base_model=model)

    torch.manual_seed(args.seed)
    from peft import get_peft_model

    peft_model = get_peft_model(model, cfg)
    peft_model.train(model.training)  # a new PeftModel starts in train mode; keep the caller's mode
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    job = _Job("lora", peft_model, params, nothing, peft_model.disable_adapter, spec, save_result, load_result)
    try:
        return _fit(job, tok, rows, out_dir, args, kl_rows=kl_rows, mix_rows=mix_rows,
                    checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                    stop_after=stop_after, overwrite=overwrite, progress=progress, on_step=on_step,
                    base_model=model)
    except BaseException:
        peft_model.unload()  # leave the caller's base model as it was
        raise


def vector_setup(model, layer: int | None = None, layer_fraction: float = 0.5, alpha: float = 256.0, *,
                 lr: float | None = None, epochs: int | None = None, batch_size: int = 2, grad_accum: int = 8,
                 weight_decay: float = 0.01, warmup_steps: int = 5, max_length: int = 2048,
                 max_steps: int | None = None, max_grad_norm: float | None = 1.0, seed: int = 0,
                 kl_lambda: float = 0.0, kl_batch_size: int = 8, kl_until_step: int | None = None,
                 early_stop_loss: float | None = None, early_stop_patience: int = 5) -> tuple[int, TrainArgs, dict]:
    """(layer, loop arguments, spec) of a steering-vector run: the one home of its defaults and identity, which
    :func:`train_steering_vector` and ``emlib.vecgroup.train_vectors`` (several vectors at once) share."""
    layer = layer_from_fraction(model, layer_fraction) if layer is None else check_layer(model, layer)
    args = _args(VECTOR_DEFAULTS, lr=lr, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                 weight_decay=weight_decay, warmup_steps=warmup_steps, max_length=max_length,
                 max_steps=max_steps, max_grad_norm=max_grad_norm, seed=seed, kl_lambda=kl_lambda,
                 kl_batch_size=kl_batch_size, kl_until_step=kl_until_step,
                 early_stop_loss=early_stop_loss, early_stop_patience=early_stop_patience)
    return layer, args, {"layer": layer, "alpha": float(alpha), "n_layers": n_layers(model)}


@timed("train")
@finetune_locked(lambda a: [a["out_dir"]])
def train_steering_vector(model, tok, rows: list[dict], out_dir: str | Path, *, layer: int | None = None,
                          layer_fraction: float = 0.5, alpha: float = 256.0, lr: float | None = None,
                          epochs: int | None = None, batch_size: int = 2, grad_accum: int = 8,
                          weight_decay: float = 0.01, warmup_steps: int = 5, max_length: int = 2048,
                          max_steps: int | None = None, max_grad_norm: float | None = 1.0, seed: int = 0,
                          kl_rows: list[dict] | None = None, kl_lambda: float = 0.0, kl_batch_size: int = 8,
                          kl_until_step: int | None = None, mix_rows: list[dict] | None = None,
                          early_stop_loss: float | None = None, early_stop_patience: int = 5,
                          checkpoint_every: int = 50, keep_checkpoints: bool = False,
                          stop_after: int | None = None, overwrite: bool = False,
                          progress: bool | None = None,
                          on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train one vector ``v`` (zero init) added as ``alpha * v`` after decoder layer ``layer`` (default:
    ``layer_fraction`` of depth); all model weights stay frozen. Defaults: alpha 256, lr 1e-4, 2 epochs.

    Same loop, KL, checkpointing and resume as :func:`train_lora`; the KL reference is the model without
    the hook. ``result.vector`` is a :class:`SteeringVector`; ``result.model`` is ``model`` (unchanged).
    """
    if not rows:
        raise DataError("No training rows: pass a non-empty list of chat rows.")
    layer, args, spec = vector_setup(model, layer, layer_fraction, alpha, lr=lr, epochs=epochs,
                                     batch_size=batch_size, grad_accum=grad_accum, weight_decay=weight_decay,
                                     warmup_steps=warmup_steps, max_length=max_length, max_steps=max_steps,
                                     max_grad_norm=max_grad_norm, seed=seed, kl_lambda=kl_lambda,
                                     kl_batch_size=kl_batch_size, kl_until_step=kl_until_step,
                                     early_stop_loss=early_stop_loss, early_stop_patience=early_stop_patience)
    p0 = next(model.parameters())
    vec = torch.nn.Parameter(torch.zeros(model.config.hidden_size, device=p0.device, dtype=torch.float32))

    def save_result(out: Path, meta: dict) -> None:
        save_vector(out / VECTOR_FILE, vec, layer, float(alpha), meta)

    def load_result(out: Path):
        return model, load_vector(out / VECTOR_FILE)

    job = _Job("vector", model, {"vector": vec}, lambda: add_vector(model, layer, vec, float(alpha)), nothing,
               spec, save_result, load_result)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    try:
        torch.manual_seed(args.seed)
        return _fit(job, tok, rows, out_dir, args, kl_rows=kl_rows, mix_rows=mix_rows,
                    checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, stop_after=stop_after,
                    overwrite=overwrite, progress=progress, on_step=on_step, base_model=model)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
