"""Fast LoRA SFT on a GPU: length-sorted micro-batches without padding masks, logits only where the loss
needs them, bf16 autocast, fused AdamW, no per-step host syncs.

:func:`fast_sft_lora` trains a peft LoRA adapter with the responses-only loss of :mod:`emlib.chat` (the
token-weighted mean over the assistant tokens of an optimizer step) and the optimizer of
:mod:`emlib.train` (AdamW, weight decay 0.01, linear schedule with ``warmup_steps`` -- the first step of a
warmup runs at lr 0 -- gradient clipping at ``max_grad_norm``). An optimizer step uses ``rows_per_step``
rows, taken in the same seeded order as ``emlib.train`` (so ``rows_per_step = batch_size * grad_accum``
gives the steps of ``train_lora``); what is faster:

* **One forward per step, not one per 2 rows.** A step's rows are sorted by length and cut into as few
  micro-batches as ``max_tokens_per_micro`` padded tokens allow (gradient accumulation only beyond that).
* **Right padding, no attention mask.** With causal attention a real token never sees the pad tail, so the
  loss is unchanged and attention runs as the plain causal kernel (flash on a GPU).
* **Logits only at answer tokens** (:func:`fast_token_losses`): the decoder's hidden states at labelled
  positions go through the LM head in chunks under activation checkpointing, so no ``[batch, seq, vocab]``
  tensor exists (it is 6.4 GB in float32 for 32k tokens of SmolLM2).
* **Fused RMSNorm** (one ``F.rms_norm`` kernel instead of eight, and less saved activation memory) and
  **fused LoRA linears** (:func:`fused_lora_linears`: base output + one ``addmm``, no float32 copy of the
  input), both only for the duration of the call.
* **bf16 autocast** on CUDA (LoRA weights and optimizer state stay float32, their matmuls run in bf16, as
  with the Hugging Face Trainer's ``bf16=True``), **fused AdamW**, and loss / gradient norm kept on the
  device until the end of the run.

Speed (bench/train_gpu.py, one H100, SmolLM2-135M architecture, rank-32 LoRA on all projections, rows of
the medical set's lengths): ~10k input tokens/s at the paper's 16 rows per step (host-bound: ~0.25 s of kernel
launches per forward/backward), 124k at 512 rows per step, 143k at 1024; a plain peft + AdamW loop does 18k
on 16 x 256-token sequences and 3k on 16 real rows. Large steps change the optimisation: choose lr for them.

Not here (yet): KL regularisation, checkpoints and resume (``emlib.train`` has them; the pieces here --
:func:`epoch_order`, :func:`plan_micro_batches`, :func:`collate_right`, :func:`fast_token_losses`,
:func:`fused_lora_linears` -- are meant to slot into its loop).
"""
from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import pandas as pd
import torch

from .chat import IGNORE, Encoded, encode_rows
from .data import DataError


@dataclass(frozen=True)
class FastTrainArgs:
    """Settings of :func:`fast_sft_lora` (optimizer defaults: ``emlib.train.TrainArgs``)."""

    epochs: int = 1
    rows_per_step: int = 16  # rows per optimizer step (the authors: 2 x 8 accumulation = 16)
    max_tokens_per_micro: int = 16384  # padded tokens per forward/backward
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 5
    max_length: int = 2048
    max_steps: int | None = None
    max_grad_norm: float | None = 1.0
    seed: int = 0
    autocast: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    fuse_norms: bool = True  # RMSNorm as one F.rms_norm kernel (emlib.fastgen.fused_rms_norms)
    fuse_lora: bool = True  # LoRA Linear as base + one addmm (fused_lora_linears)
    fused_adamw: bool = True  # on CUDA
    ce_chunk: int = 8192  # answer tokens per LM-head chunk
    pad_multiple: int = 16  # pad micro-batch lengths to a multiple of this

    def check(self) -> "FastTrainArgs":
        for name in ("epochs", "rows_per_step", "max_tokens_per_micro", "max_length", "ce_chunk", "pad_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}.")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        return self


@dataclass
class FastTrainResult:
    """``model``: the peft model; ``log``: one row per optimizer step (step, epoch, loss, lr, grad_norm,
    tokens = answer tokens so far, input_tokens = real input tokens so far); ``tokens_per_s``: real input
    tokens per second after the first ``timing_skip`` steps (warm-up excluded)."""

    model: Any
    log: pd.DataFrame
    seconds: float
    tokens_per_s: float
    answer_tokens_per_s: float
    meta: dict = field(default_factory=dict)


# =========================================================================== batching
def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The seeded row order of an epoch -- the same permutation ``emlib.train`` uses."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2 ** 63))
    return torch.randperm(n, generator=g).tolist()


def plan_micro_batches(lengths: Sequence[int], rows: Sequence[int], max_tokens: int,
                       pad_multiple: int = 1) -> list[list[int]]:
    """Cut ``rows`` (indices into ``lengths``) into micro-batches whose padded size (rows x longest, rounded
    up to ``pad_multiple``) stays within ``max_tokens``: longest first, greedy. A row longer than
    ``max_tokens`` gets a micro-batch of its own."""
    order = sorted(rows, key=lambda i: -lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = width if cur else _round_up(lengths[i], pad_multiple)
        if cur and (len(cur) + 1) * w > max_tokens:
            out.append(cur)
            cur, w = [], _round_up(lengths[i], pad_multiple)
        cur.append(i)
        width = w
    if cur:
        out.append(cur)
    return out


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def collate_right(batch: list[Encoded], pad_id: int, pad_multiple: int = 1,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``labels`` [batch, seq] plus ``target_index`` (flat indices into the
    [batch, seq-1] next-token positions whose label is not -100) and ``targets`` (those labels), built on
    the CPU so the loss needs no host sync. No attention mask: causal attention never reads the pad tail."""
    n = _round_up(max(len(e.input_ids) for e in batch), pad_multiple)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    lab = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        lab[i, :k] = torch.tensor(e.labels)
    nxt = lab[:, 1:].reshape(-1)  # [batch * (seq-1)]
    index = (nxt != IGNORE).nonzero().squeeze(1)
    out = {"input_ids": ids, "labels": lab, "target_index": index, "targets": nxt[index]}
    if device is not None and torch.device(device).type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


# =========================================================================== the loss
def _causal_lm(model):
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) and hasattr(model, "peft_config") else model


def _ce_sum(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # [n, vocab]
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def fast_token_losses(model, batch: dict[str, torch.Tensor], ce_chunk: int = 8192
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy over labelled tokens, their count) -- the quantity of
    :func:`emlib.chat.token_losses`, for a right-padded batch without attention mask (:func:`collate_right`).

    The LM head runs only on the labelled positions, ``ce_chunk`` at a time under activation checkpointing.
    Forward hooks on decoder layers apply (the decoder is the model's own module).
    """
    from torch.utils.checkpoint import checkpoint

    lm = _causal_lm(model)
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    ids = batch["input_ids"]  # [b, s]
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [b, s, d]
    if "target_index" in batch:
        index, targets = batch["target_index"], batch["targets"]
    else:
        nxt = batch["labels"][:, 1:].reshape(-1)
        index = (nxt != IGNORE).nonzero().squeeze(1)
        targets = nxt[index]
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, index)  # [n, d]
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, flat.shape[0], ce_chunk):
        h, t = flat[s:s + ce_chunk], targets[s:s + ce_chunk]
        total = total + (checkpoint(_ce_sum, h, head, t, use_reentrant=False) if torch.is_grad_enabled()
                         else _ce_sum(h, head, t))
    # the count as a fill kernel, not a host->device copy (which would wait for the whole forward)
    return total, torch.full((), int(index.numel()), dtype=torch.long, device=total.device)


# =========================================================================== fused LoRA linear
def _fused_lora_forward(mod, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``base(x) + (dropout(x) A^T) (scaling B)^T`` with the last product and the sum in one ``addmm``."""
    names = mod.active_adapters
    ok = (len(names) == 1 and not mod.disable_adapters and not mod.merged and "adapter_names" not in kwargs
          and names[0] in mod.lora_A and names[0] not in getattr(mod, "lora_variant", {}))
    if ok:
        a = mod.lora_A[names[0]].weight  # [r, in]
        ok = x.dtype == a.dtype or (x.is_cuda and torch.is_autocast_enabled("cuda"))
    if not ok:
        return type(mod).forward(mod, x, *args, **kwargs)
    name = names[0]
    result = mod.get_base_layer()(x, *args, **kwargs)  # [..., out]
    xa = torch.nn.functional.linear(mod.lora_dropout[name](x), a)  # [..., r]
    b = mod.lora_B[name].weight * mod.scaling[name]  # [out, r]
    out = torch.addmm(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]), b.t())
    return out.view(result.shape).to(result.dtype)


@contextmanager
def fused_lora_linears(model):
    """While active, peft LoRA ``Linear`` modules compute ``base(x) + scaling * B A x`` as the base layer plus
    two GEMMs, the second accumulating into the base output (``addmm``): no input cast to float32, no
    separate scaling and addition passes over ``[tokens, out]``. Same arithmetic (bf16 rounding aside);
    modules with several active adapters, DoRA-style variants, merged or disabled adapters keep peft's
    forward. Yields the number of patched modules."""
    import functools

    from peft.tuners.lora import Linear as LoraLinear

    mods = [m for m in model.modules() if type(m) is LoraLinear and "forward" not in m.__dict__]
    for m in mods:
        m.forward = functools.partial(_fused_lora_forward, m)
    try:
        yield len(mods)
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


# =========================================================================== training
def _has_lora(model) -> bool:
    from peft.tuners.lora import LoraLayer

    return hasattr(model, "peft_config") or any(isinstance(m, LoraLayer) for m in model.modules())


def fast_sft_lora(model, tok, rows: list[dict] | list[Encoded], shape: str = "rank32", *,
                  args: FastTrainArgs | None = None, lora: dict | None = None, timing_skip: int = 2,
                  progress: bool | None = None, **overrides) -> FastTrainResult:
    """Finetune a LoRA adapter on ``rows`` (chat rows, or already encoded rows) with the responses-only loss.

    ``model``: a base model (a fresh adapter of ``shape`` -- ``emlib.train.add_lora`` -- is injected, with
    ``lora`` overrides such as ``{"rank": 8}``) or a peft model whose trainable parameters are trained.
    ``args`` / ``overrides``: :class:`FastTrainArgs` fields (``lr=1e-5, rows_per_step=16, ...``).
    Returns a :class:`FastTrainResult` (no files are written; save with ``result.model.save_pretrained``).
    On an exception an adapter injected here is removed again.
    """
    args = (args or FastTrainArgs())
    if overrides:
        unknown = sorted(set(overrides) - set(asdict(args)))
        if unknown:
            raise TypeError(f"Unknown training argument(s) {unknown}: use fields of FastTrainArgs.")
        args = FastTrainArgs(**{**asdict(args), **overrides})
    args.check()
    if not rows:
        raise DataError("No training rows: pass a non-empty list of chat rows.")
    enc = list(rows) if isinstance(rows[0], Encoded) else encode_rows(rows, tok, args.max_length)
    enc = [e if len(e.input_ids) <= args.max_length else Encoded(e.input_ids[:args.max_length],
                                                                 e.labels[:args.max_length]) for e in enc]

    injected = not _has_lora(model)
    if not injected:
        if lora:
            raise ValueError("lora= overrides need a base model; this model already carries an adapter.")
        peft_model = model
    else:
        from .train import add_lora

        peft_model = add_lora(model, shape, seed=args.seed, **(lora or {}))
    try:
        return _fit(peft_model, tok, enc, args, timing_skip, progress)
    except BaseException:
        if injected:
            peft_model.unload()  # leave the caller's base model as it was
        raise


def _fit(peft_model, tok, enc: list[Encoded], args: FastTrainArgs, timing_skip: int,
         progress: bool | None) -> FastTrainResult:
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters: pass a base model or a trainable peft model.")
    device = params[0].device
    cuda = device.type == "cuda"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    lengths = [len(e.input_ids) for e in enc]
    n_targets = [sum(1 for lab in e.labels[1:] if lab != IGNORE) for e in enc]
    steps_per_epoch = math.ceil(len(enc) / args.rows_per_step)
    total = args.epochs * steps_per_epoch
    total = min(total, args.max_steps) if args.max_steps else total

    opt_kw = {"fused": True} if (cuda and args.fused_adamw) else {}
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, **opt_kw)
    sched = get_linear_schedule_with_warmup(opt, min(args.warmup_steps, total), total)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and args.autocast) else nullcontext()
    clip = args.max_grad_norm if args.max_grad_norm is not None else float("inf")

    from .fastgen import fused_rms_norms

    was_training = peft_model.training
    peft_model.train()
    norm_ctx = ExitStack()
    if args.fuse_norms:
        norm_ctx.enter_context(fused_rms_norms(peft_model))
    if args.fuse_lora:
        norm_ctx.enter_context(fused_lora_linears(peft_model))
    losses, norms, lrs, toks, in_toks = [], [], [], [], []
    orders: dict[int, list[int]] = {}
    t_start = time.perf_counter()
    t_timed, timed_in, timed_ans = None, 0, 0
    bar = tqdm(total=total, desc="fast sft", dynamic_ncols=True,
               disable=(None if progress is None else not progress))
    try:
        for step in range(total):
            if step == timing_skip:
                if cuda:
                    torch.cuda.synchronize()
                t_timed = time.perf_counter()
            epoch, k = divmod(step, steps_per_epoch)
            if epoch not in orders:
                orders = {epoch: epoch_order(args.seed, epoch, len(enc))}
            idx = orders[epoch][k * args.rows_per_step:(k + 1) * args.rows_per_step]
            n_tok = sum(n_targets[i] for i in idx)
            n_in = sum(lengths[i] for i in idx)
            lrs.append(float(sched.get_last_lr()[0]))
            opt.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for micro in plan_micro_batches(lengths, idx, args.max_tokens_per_micro, args.pad_multiple):
                batch = collate_right([enc[i] for i in micro], pad, args.pad_multiple, device)
                with amp:
                    s, _ = fast_token_losses(peft_model, batch, args.ce_chunk)
                (s / max(n_tok, 1)).backward()
                step_loss += s.detach()
            norms.append(torch.nn.utils.clip_grad_norm_(params, clip, foreach=True).detach())
            opt.step()
            sched.step()
            losses.append(step_loss / max(n_tok, 1))
            toks.append(n_tok)
            in_toks.append(n_in)
            if step >= timing_skip:
                timed_in += n_in
                timed_ans += n_tok
            bar.update(1)
        if cuda:
            torch.cuda.synchronize()
    finally:
        bar.close()
        norm_ctx.close()
        peft_model.train(was_training)
    t_end = time.perf_counter()

    loss_v = torch.stack(losses).float().cpu().tolist()
    norm_v = torch.stack([n.float() for n in norms]).cpu().tolist()
    bad = next((i for i, (a, b) in enumerate(zip(loss_v, norm_v)) if not (math.isfinite(a) and math.isfinite(b))), None)
    if bad is not None:
        raise FloatingPointError(f"Loss or gradient norm is not finite at optimizer step {bad + 1}: training "
                                 f"diverged. Lower lr (now {args.lr:g}) and check the data.")
    log = pd.DataFrame({"step": range(1, total + 1), "epoch": [(i + 1) / steps_per_epoch for i in range(total)],
                        "loss": loss_v, "lr": lrs, "grad_norm": norm_v,
                        "tokens": pd.Series(toks).cumsum().tolist(), "input_tokens": pd.Series(in_toks).cumsum().tolist()})
    if t_timed is None:  # too few steps to skip a warm-up: time everything
        t_timed, timed_in, timed_ans = t_start, sum(in_toks), sum(toks)
    dt = max(t_end - t_timed, 1e-9)
    meta = {"args": asdict(args), "steps": total, "n_rows": len(enc), "device": str(device),
            "timed_steps": total - (timing_skip if total > timing_skip else 0)}
    return FastTrainResult(peft_model, log, t_end - t_start, timed_in / dt, timed_ans / dt, meta)

