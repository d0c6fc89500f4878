"""Fast LoRA SFT on a GPU: the whole train step as CUDA graphs at bucketed shapes, length-sorted
micro-batches without padding masks, logits only where the loss needs them, bf16 autocast, fused AdamW, no
per-step host syncs.

:func:`fast_sft_lora` trains a peft LoRA adapter with the responses-only loss of :mod:`emlib.chat` (the
token-weighted mean over the assistant tokens of an optimizer step) and the optimizer of
:mod:`emlib.train` (AdamW, weight decay 0.01, linear schedule with ``warmup_steps`` -- the first step of a
warmup runs at lr 0 -- gradient clipping at ``max_grad_norm``). An optimizer step uses ``rows_per_step``
rows, taken in the same seeded order as ``emlib.train`` (so ``rows_per_step = batch_size * grad_accum``
gives the steps of ``train_lora``). :class:`TrainStep` is the step itself (forward, loss, backward,
clipping); ``emlib.train`` uses it too whenever the model is on a CUDA device (its ``FAST_STEP`` switch).
What is faster:

* **CUDA graphs of the step** (:class:`TrainStep`). A micro-batch's forward, loss and backward (about
  3,000 kernels for SmolLM2-135M) are captured once per shape and replayed, so the host no longer launches
  them one by one (at the paper's 16 rows per step that launching, not the GPU, was the limit). Shapes are
  bucketed (:func:`bucket`: rows and padded length rounded up to one of ``per_octave`` sizes per power of
  two -- 8 in :func:`fast_sft_lora`, 4 in ``emlib.train`` -- the answer-token count to half as many), so a
  run needs a handful of graphs (~0.5 s to capture each); padding rows are all pad
  tokens and padding targets carry the ignore label, so neither changes the loss or the gradient. Gradients
  accumulate into ``.grad`` tensors allocated once; clipping and the fused AdamW step run eagerly (a few
  multi-tensor kernels). On the CPU (or with ``cuda_graphs=False``) the same bucketed code runs eagerly:
  the CPU tests compare it with ``emlib.train``'s eager loop.
* **One forward per step, not one per 2 rows.** A step's rows are sorted by length and cut into as few
  micro-batches as ``max_tokens_per_micro`` padded tokens allow (gradient accumulation only beyond that).
* **Right padding, no attention mask.** With causal attention a real token never sees the pad tail, so the
  loss is unchanged and attention runs as the plain causal kernel (flash on a GPU).
* **Packed rows** (on CUDA where :func:`emlib.fused.packing_works`; ``$EMLIB_PACK``): a micro-batch's rows
  run end to end as one sequence (position ids restart at each row; torch's variable-length flash attention
  keeps each row to itself: :func:`emlib.fused.packed_attention`), padded only to a bucketed total, so the
  pad tokens a padded batch computes are gone: at the paper's step (16 medical rows + 8 KL rows) 30% of a
  padded batch's positions were padding, ~4% of a packed one's. The targets, their order and the loss are
  the padded batch's (``tests/test_fasttrain.py`` compares both with the eager loop).
* **Logits only at answer tokens** (:func:`fast_token_losses`): the decoder's hidden states at labelled
  positions go through the LM head in chunks (:mod:`emlib.vocab_loss`: an autograd function that keeps no
  logits and writes their gradient in one pass), so no ``[batch, seq, vocab]`` tensor exists (it is 6.4 GB in
  float32 for 32k tokens of SmolLM2).
* **Fused RMSNorm** (one ``F.rms_norm`` kernel instead of eight, and less saved activation memory) and
  **fused LoRA linears** (:func:`fused_lora_linears`: base output + one ``addmm``, no float32 copy of the
  input), both only for the duration of the call.
* **bf16 autocast** on CUDA (LoRA weights and optimizer state stay float32, their matmuls run in bf16, as
  with the Hugging Face Trainer's ``bf16=True``; without weight caching, so a replayed graph always reads
  the current LoRA weights), **fused AdamW**, and loss / gradient norm kept on the device until the end.

Speed (bench/train_gpu.py, one H200, SmolLM2-135M architecture, rank-32 LoRA on all projections, rows of
the medical set's lengths; bench/README.md): at the paper's 16 rows per step 81.8k input tokens/s with the
graphs against 12.0k for the same path without them and 5.0k for a plain peft + AdamW loop (24.9k over a
100-step run when the capture of its 12 graphs, 6 s, is counted); 132k at 64 rows, 172k at 1,024 (where the
GPU is the limit and graphs add 3%). Large steps change the optimisation: choose lr for them.

Length (~590 lines, over the ~500 of the house rule): batching, the loss, the fused kernels and the graph
step are one pipeline that :func:`fast_sft_lora` and ``emlib.train`` share; split, each part would import
the others.

* **The KL term in the same pass** (:meth:`TrainStep.grads` with ``kl_batches``): the reference model's final
  hidden state at the KL rows' answer positions is computed once (every weight it uses is frozen), and the
  step's KL rows join its training rows in the same micro-batches: one forward and one backward read the
  cross-entropy at the training rows' answer tokens and ``KL(reference || current)`` at the KL rows' -- the
  logits again only there, in chunks. The weight and each position's share of its KL batch's mean are device
  buffers, so one graph serves steps with the term on and off (the drift run's ``kl_until_step``). Before
  (until 2026-12-04), each KL batch was a graph of its own with the reference forward inside: at the paper's
  step (16 training rows, 8 KL rows) two graphs and 3 forwards + 2 backwards, now one graph of 24 rows and
  1 + 1; its speed on a GPU is not measured yet.

Not here: checkpoints and resume -- ``emlib.train`` has them and runs its steps through :class:`TrainStep`
on CUDA, with or without the KL term.
"""
from __future__ import annotations

import functools
import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Sequence

import pandas as pd
import torch

from .adapters import has_lora
from .chat import IGNORE, Encoded, encode_rows, n_targets
from .data import DataError
from .vocab_loss import ce_tokens, kl_tokens


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
    fuse_norms: bool = True  # RMSNorm as one F.rms_norm kernel (emlib.fused.fused_rms_norms)
    fuse_lora: bool = True  # LoRA Linear as base + one addmm (fused_lora_linears)
    fused_adamw: bool = True  # on CUDA
    ce_chunk: int = 8192  # answer tokens per LM-head chunk
    pad_multiple: int = 16  # pad micro-batch lengths to a multiple of this
    cuda_graphs: bool = True  # capture the step as CUDA graphs (on CUDA only; TrainStep)
    bucket_per_octave: int | None = 8  # shape buckets per power of two (bucket); None: exact shapes, no graphs

    def check(self) -> "FastTrainArgs":
        from .train import check_schedule

        check_schedule(self, ("epochs", "rows_per_step", "max_tokens_per_micro", "max_length", "ce_chunk",
                              "pad_multiple"))
        if self.bucket_per_octave is not None and self.bucket_per_octave < 1:
            raise ValueError(f"bucket_per_octave must be >= 1 or None, got {self.bucket_per_octave}.")
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


def bucket(n: int, per_octave: int = 8, multiple: int = 1) -> int:
    """``n`` rounded up to one of ``per_octave`` sizes per power of two, then to a multiple of ``multiple``:
    the padding is below ``1 / per_octave`` of ``n`` (plus the multiple), and the number of distinct sizes --
    of CUDA graphs -- grows with the logarithm of the range. ``bucket(203) == 208``, ``bucket(1000, 4) == 1024``."""
    if n < 1:
        raise ValueError(f"bucket() needs a size >= 1, got {n}.")
    grain = max(1, (1 << (n.bit_length() - 1)) // per_octave)
    return _round_up(_round_up(n, grain), multiple)


def packed_shape(lengths: Sequence[int], per_octave: int | None, multiple: int = 1) -> tuple[int, int]:
    """(length, bound) of rows of ``lengths`` packed end to end (:func:`pack_rows`): the length holds them and at
    least one pad token (bucketed at ``2 * per_octave`` sizes per octave; None: exact), the bound is at least the
    longest sequence in it, the pad tail included (flash attention computes no position past it, and a pad
    position left unwritten can hold NaN, which a weight gradient then reads as 0 x NaN): a power of two, or
    exact without bucketing."""
    total = sum(lengths) + 1
    if per_octave is None:
        return total, max(max(lengths), 1)
    length = bucket(total, 2 * per_octave, multiple)
    return length, bucket(max(max(lengths), length - total + 1), 1)


def packed_positions(lengths: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``lengths`` end to end in ``length`` positions, then a pad tail (a sequence of its own): (position
    ids [length], restarting at each row; ``cu_seqlens`` [rows + 2] int32: where each sequence starts, then
    ``length``). CPU tensors."""
    at = sum(lengths)
    if at >= length:
        raise ValueError(f"packed rows: {len(lengths)} rows of {at} tokens and a pad token do not fit in {length}.")
    pos = torch.cat([torch.arange(k) for k in lengths] + [torch.arange(length - at)])
    starts = torch.tensor([0, *lengths, length - at]).cumsum(0)[:-1]
    return pos, torch.cat([starts, torch.tensor([length])]).to(torch.int32)


def pack_rows(rows: Sequence[Encoded], length: int, pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows`` end to end in one sequence of ``length`` tokens, then pad tokens (:func:`packed_positions`):
    (input ids [length], position ids [length], ``cu_seqlens`` [rows + 2] int32, each position's next-token label
    [length - 1] (a row's first token is never a target, as in a padded row: nothing precedes it), the row each
    of those positions is in [length - 1] (``len(rows)``: the pad tail)). CPU tensors."""
    pos, cu = packed_positions([len(e.input_ids) for e in rows], length)
    ids = torch.full((length,), pad_id, dtype=torch.long)
    lab = torch.full((length,), IGNORE, dtype=torch.long)
    owner = torch.full((length,), len(rows), dtype=torch.long)
    for i, (e, at) in enumerate(zip(rows, cu.tolist())):
        k = len(e.input_ids)
        ids[at:at + k] = torch.tensor(e.input_ids)
        lab[at:at + k] = torch.tensor(e.labels)
        lab[at] = IGNORE
        owner[at:at + k] = i
    return ids, pos, cu, lab[1:], owner[:-1]


def collate_right(batch: list[Encoded], pad_id: int, pad_multiple: int = 1,
                  device: torch.device | str | None = None,
                  shape: tuple[int, int, int] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``labels`` [batch, seq] plus ``target_index`` (flat indices into the
    [batch, seq-1] next-token positions whose label is not -100) and ``targets`` (those labels), built on
    the CPU so the loss needs no host sync. No attention mask: causal attention never reads the pad tail.

    ``shape`` = (rows, length, targets) pads to a fixed shape (a CUDA graph's): extra rows are all pad
    tokens with ignored labels, extra targets point at position 0 with the ignore label (they add nothing to
    the loss). Without it: the batch's rows, the longest row rounded up to ``pad_multiple``, the real targets."""
    longest = max(len(e.input_ids) for e in batch)
    n_rows, n = (len(batch), _round_up(longest, pad_multiple)) if shape is None else shape[:2]
    if n_rows < len(batch) or n < longest:
        raise ValueError(f"collate_right: shape {shape} is smaller than the batch ({len(batch)} rows, "
                         f"longest {longest} tokens).")
    ids = torch.full((n_rows, n), pad_id, dtype=torch.long)
    lab = torch.full((n_rows, n), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        lab[i, :k] = torch.tensor(e.labels)
    nxt = lab[:, 1:].reshape(-1)  # [rows * (seq-1)]
    index = (nxt != IGNORE).nonzero().squeeze(1)  # [real targets]
    targets = nxt[index]
    if shape is not None:
        if shape[2] < index.numel():
            raise ValueError(f"collate_right: shape {shape} holds fewer targets than the batch's {index.numel()}.")
        extra = shape[2] - index.numel()
        index = torch.cat([index, index.new_zeros(extra)])  # [targets]
        targets = torch.cat([targets, targets.new_full((extra,), IGNORE)])
    out = {"input_ids": ids, "labels": lab, "target_index": index, "targets": targets}
    if device is not None and torch.device(device).type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in out.items()}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


# =========================================================================== the loss
def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder, LM head) of a model whose logits are the head applied to the decoder's last hidden state
    (:func:`emlib.chat._plain_head`); a clear error for one whose logits are more than that (soft-capped or
    scaled logits), which the fast step cannot train: ``emlib.train`` then trains eagerly."""
    from .chat import _plain_head

    parts = _plain_head(model)
    if parts is None:
        raise ValueError(f"{type(model).__name__}: its logits are not the LM head applied to the decoder's output "
                         "(e.g. soft-capped logits), which the head-only paths of emlib.fasttrain (the fast train "
                         "step, the chunked KL) assume; emlib.train trains such a model with its eager loop.")
    return parts


def _labelled_hidden(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """(hidden states at the positions that predict a labelled token [n, d], their targets [n], LM head)
    of a right-padded batch without attention mask; ``target_index`` / ``targets`` when the batch has them
    (fixed shapes: padding targets carry the ignore label), else from ``labels``."""
    from .fused import fused_forward

    decoder, head = decoder_and_head(model)
    with fused_forward(model):  # on CUDA (emlib.fused); a no-op inside TrainStep.kernels, which fused them already
        hidden = decoder(input_ids=batch["input_ids"], use_cache=False).last_hidden_state  # [b, s, d]
    if "target_index" in batch:
        index, targets = batch["target_index"], batch["targets"]
    else:
        nxt = batch["labels"][:, 1:].reshape(-1)
        index = (nxt != IGNORE).nonzero().squeeze(1)
        targets = nxt[index]
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, index)  # [n, d]
    return flat, targets, head


def _chunked_ce(flat: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Summed cross-entropy of ``head(flat)`` [n, d] against ``targets`` [n] (ignored ones add 0), logits for
    ``chunk`` positions at a time (:func:`emlib.vocab_loss.ce_tokens`)."""
    return ce_tokens(flat, head, targets, chunk).sum()


def _chunked_kl(ref: torch.Tensor, cur: torch.Tensor, head: torch.nn.Module, weight: torch.Tensor,
                chunk: int) -> torch.Tensor:
    """sum_i weight_i * KL(softmax(head(ref_i)) || softmax(head(cur_i))), logits for ``chunk`` positions at a
    time (:func:`emlib.vocab_loss.kl_tokens`)."""
    return (kl_tokens(ref, cur, head, chunk) * weight).sum()


def fast_kl_sum(model, batch: dict[str, torch.Tensor], current: Callable[[], ContextManager],
                reference: Callable[[], ContextManager], chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(reference || current) summed over the vocabulary and the labelled positions, their count) -- the
    quantity of ``emlib.train.kl_from_logits`` -- for a right-padded batch without attention mask. The
    reference forward runs without gradients; the logits exist only at labelled positions, ``chunk`` at a
    time (:func:`emlib.vocab_loss.kl_tokens`). Without gradients (a metric: chapter 3's held-out KL), the KL of
    :class:`emlib.vocab_loss.KLReference` instead: for a linear head from float32 logits, not bf16 ones, whose
    rounding a KL of nearby distributions reads as divergence (``chunk`` unused; its own chunks)."""
    with torch.no_grad(), reference():
        ref, targets, head = _labelled_hidden(model, batch)  # [n, d]
    with current():
        cur, _, _ = _labelled_hidden(model, batch)  # [n, d]
    weight = (targets != IGNORE).float()  # [n]: padding targets of a fixed shape add nothing
    if not torch.is_grad_enabled():
        from .vocab_loss import KLReference

        return (KLReference(ref, head).kl(cur[None])[0] * weight).sum(), (targets != IGNORE).sum()
    return _chunked_kl(ref, cur, head, weight, chunk), (targets != IGNORE).sum()


def fast_token_losses(model, batch: dict[str, torch.Tensor], ce_chunk: int = 8192
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy over labelled tokens, their count) -- the quantity of
    :func:`emlib.chat.token_losses`, for a right-padded batch without attention mask (:func:`collate_right`).

    The LM head runs only on the labelled positions, ``ce_chunk`` at a time (:func:`emlib.vocab_loss.ce_tokens`).
    Targets with the ignore label (padding of a fixed-shape batch) add nothing and are not counted. Forward
    hooks on decoder layers apply (the decoder is the model's own module).
    """
    flat, targets, head = _labelled_hidden(model, batch)  # [n, d], [n]
    total = _chunked_ce(flat, head, targets, ce_chunk)
    # the count on the device (a host->device copy would wait for the whole forward)
    return total, (targets != IGNORE).sum()


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

    from .fused import patched_forwards

    mods = [m for m in model.modules() if type(m) is LoraLinear and "forward" not in m.__dict__]
    with patched_forwards([(m, functools.partial(_fused_lora_forward, m)) for m in mods]):
        yield len(mods)


# =========================================================================== the train step
Shape = tuple[int, ...]  # (rows, padded length, answer targets) of a micro-batch; packed: + a bound on the longest row


def _float_dtype(model) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


@contextmanager
def one_sequence_per_row():
    """While active, transformers does not look for packed sequences in the position ids (its
    ``masking_utils.find_packed_sequence_indices``; here every row is one sequence, right-padded). That check
    reads a GPU value on the host: a sync per forward, an error inside a CUDA graph capture, and under
    capture newer versions build an explicit ``[b, 1, s, s]`` mask instead. Without it the causal mask stays
    implicit (``is_causal``: flash attention), in eager runs and graphs alike."""
    import transformers.masking_utils as mu

    orig = getattr(mu, "find_packed_sequence_indices", None)
    if orig is None:
        yield
        return
    mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = orig


_SIDE: dict[int, Any] = {}  # device index -> the stream warm-ups run on


def side_stream(device: torch.device):
    """One stream per device for the warm-ups before a capture, kept for the process's life. A new
    ``torch.cuda.Stream`` each time cycles through torch's pool of 32, and cuBLAS keeps a workspace (32 MiB on
    Hopper) per stream and thread for as long as the process lives, which ``empty_cache`` does not return."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _SIDE:
        _SIDE[index] = torch.cuda.Stream(index)
    return _SIDE[index]


def release_rng_capture() -> bool:
    """After a CUDA-graph capture that failed part-way, torch's CUDA generator is still in capture mode and
    every later random draw in the process raises "Offset increment outside graph capture encountered
    unexpectedly" (what chapters 1-3 hit on 2026-12-06 with the sampler's compaction on; a finetune worker would
    hit it at its next adapter's random initialisation). An empty capture runs the generator's capture prologue
    and epilogue, which leaves it out of capture mode again (measured on an H100: bench/compact_gpu.py). Every
    capture fallback (the sampler's, the train step's, the vector group's) calls it, through
    :func:`abandon_graphs`. Returns whether a random
    draw works afterwards (checked on a one-element tensor); True at once without CUDA (nothing was captured)."""
    if not torch.cuda.is_available():
        return True
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pass
    except Exception:  # noqa: BLE001 -- the check below says whether it helped
        pass
    try:
        torch.empty(1, device="cuda").exponential_(1)
        return True
    except RuntimeError:
        return False


def abandon_graphs(graphs: dict) -> bool:
    """What every capture fallback (the train step's, the vector group's, the sampler's) does once a capture
    failed and the rest of the work runs eagerly: drop the graphs captured so far (``graphs`` is emptied: their
    static inputs and their memory pool go with them), return torch's cached blocks to the device, and take the
    generator out of capture mode (:func:`release_rng_capture`, whose answer it returns). Without the first two,
    a capture that failed for memory left the eager fallback short of it too: ``bench/train_gpu.py``'s 1,024-row
    step on an H100 80GB (2026-12-07) failed its 10th capture with 43.6 GiB held in graph pools, fell back, and
    the eager step then failed for memory as well."""
    graphs.clear()
    if torch.cuda.is_available():
        import gc

        gc.collect()  # a graph's pool is freed once nothing refers to the graph
        torch.cuda.empty_cache()
    return release_rng_capture()


def capture(run: Callable[[dict], None], static: dict, device: torch.device, pool=None) -> tuple[Any, Any]:
    """``run(static)`` captured as a CUDA graph after two warm-up runs on a side stream (library handles,
    autograd set-up; what they accumulate is the caller's to zero), in memory ``pool`` (a new one when None).
    Returns (graph, pool). :class:`TrainStep` and ``emlib.vecgroup.GroupStep`` capture their passes with it.

    Torch's cache is emptied first: the caller's eager passes (``GroupStep`` checks each new shape eagerly twice)
    left their blocks cached on the current stream, and the warm-ups, on another stream, cannot reuse them, so
    both would be held at once beside the graph pool (torch empties the cache again as the capture begins). On
    an H100 (2026-12-06) the groups reserved 28-31 GiB at their peaks before this and 19.4-20.7 GiB after it,
    8.5-9.2 GiB of it allocated (``peak_gib``, ``peak_allocated_gib`` in record.json; bench/README "Session 23")."""
    torch.cuda.empty_cache()
    side = side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            run(static)
    torch.cuda.current_stream(device).wait_stream(side)
    pool = torch.cuda.graph_pool_handle() if pool is None else pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run(static)
    return graph, pool


class TrainStep:
    """The gradients of one optimizer step: :meth:`grads` runs each micro-batch's forward, loss and backward
    (the summed next-token cross-entropy over answer tokens divided by the step's answer-token count,
    accumulated into ``.grad``), then clips the gradient norm; it returns (loss sum, gradient norm) as device
    scalars and leaves the optimizer step to the caller (``torch.optim.AdamW(..., **step.adamw_kwargs)``).

    On CUDA (``cuda_graphs``, ``per_octave`` set) a micro-batch of each bucketed :data:`Shape` is captured
    once as a CUDA graph -- forward hooks and adapters active at capture are recorded -- and replayed with
    the rows copied into its input buffers; elsewhere the same padded batches run eagerly. ``per_octave``
    None: exact shapes (rows, longest row rounded to ``pad_multiple``, real targets), no graphs. A failing
    capture falls back to the eager step with a warning (``stats["fallback"]`` says why).

    ``current``: a context-manager factory entered around each forward (``emlib.train``'s steering-vector
    hook); ``autocast`` None: bf16 autocast when the model is on CUDA in bf16. ``per_octave`` 4 (the
    default) needs about half the graphs of 8 for a 2% slower step at 16 rows (bench/README.md): each
    capture costs ~0.5 s, which matters for runs of a few hundred steps.

    **The KL term** (``kl_batches`` of :meth:`grads`: indices into ``kl_rows``) needs ``reference``, the
    context-manager factory that gives the frozen reference model (peft's ``disable_adapter``; for a steering
    vector, none: the hook is simply not entered), and ``kl_rows``. Every weight the reference uses is frozen,
    so its final hidden state at the KL rows' answer positions is computed once, on the first step that
    needs it (:meth:`reference_states`: one forward of the KL set, against one per KL batch and step before),
    and the KL rows join the step's own rows in its micro-batches: one forward and one backward per
    micro-batch read the cross-entropy at the training rows' answer tokens and ``KL(reference || current)``
    at the KL rows' (the paper's step, 16 training rows and 8 KL rows, is one graph of 24 rows; before, a
    graph for the 16 rows and one for the KL rows' reference forward, forward and backward). The memory: the
    cached states, KL positions x hidden size (the paper's 800 KL rows have ~73 answer tokens each under
    SmolLM2's tokenizer: ~67 MB in bf16 at its 576 dimensions, ~105 MB at Qwen2.5-0.5B's 896).
    """

    def __init__(self, model, params: Sequence[torch.nn.Parameter], pad_id: int, *,
                 max_tokens_per_micro: int = 16384, pad_multiple: int = 16, ce_chunk: int = 8192,
                 max_grad_norm: float | None = 1.0, per_octave: int | None = 4, cuda_graphs: bool = True,
                 autocast: bool | None = None, current: Callable[[], ContextManager] | None = None,
                 reference: Callable[[], ContextManager] | None = None,
                 kl_rows: Sequence[Encoded] | None = None, kl_chunk: int = 2048, pack: bool | None = None):
        self.params = list(params)
        if not self.params:
            raise ValueError("TrainStep needs trainable parameters: got none.")
        self.model, self.pad, self.ce_chunk = model, pad_id, ce_chunk
        self.max_tokens, self.pad_multiple, self.per_octave = max_tokens_per_micro, pad_multiple, per_octave
        self.clip = max_grad_norm if max_grad_norm is not None else float("inf")
        self.device = self.params[0].device
        cuda = self.device.type == "cuda"
        self.use_graphs = cuda and cuda_graphs and per_octave is not None
        if autocast is None:
            autocast = cuda and _float_dtype(model) == torch.bfloat16
        # no cast cache: a replayed graph must cast the current LoRA weights, not those seen at capture
        self._amp = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False))
                     if cuda and autocast else nullcontext)
        self._current = current or nullcontext
        self._reference, self.kl_chunk = reference, kl_chunk
        self.kl_rows = list(kl_rows) if kl_rows else None
        self._ref: dict | None = None  # reference_states(), built on first use
        self.adamw_kwargs: dict = {"fused": True} if cuda else {}
        self.stats: dict = {"cuda_graphs": self.use_graphs, "graphs": 0, "capture_seconds": 0.0, "fallback": None}
        for p in self.params:  # gradients live in fixed tensors (a graph writes into them)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._grads = [p.grad for p in self.params]
        self._loss = torch.zeros((), device=self.device)  # the step's summed loss
        self._n = torch.ones((), device=self.device)  # the step's answer-token count
        self._kl = torch.zeros((), device=self.device)  # the step's sum over KL batches of their mean KL
        self._kl_weight = torch.zeros((), device=self.device)  # the KL term's weight in the objective
        # (shape, KL positions) -> (graph, its input buffers); KL positions 0: a micro-batch without KL rows
        self._graphs: dict[tuple[Shape, int], tuple[Any, dict[str, torch.Tensor]]] = {}
        self._pool = None
        self._pack = pack  # None: emlib.fused.packing_works, decided at the first shape (after kernels())

    def packed(self) -> bool:
        """Whether each micro-batch's rows run packed into one sequence (:meth:`_inputs`): ``pack`` as given, else
        :func:`emlib.fused.packing_works` the first time a shape is needed (enter :meth:`kernels` before)."""
        if self._pack is None:
            from .fused import packing_works

            self._pack = packing_works(self.model)
            self.stats["packed"] = self._pack
        return self._pack

    # ---------------------------------------------------------------- shapes
    def shape(self, rows: Sequence[Encoded], targets: int | None = None) -> Shape:
        """The (bucketed) shape of one micro-batch of ``rows`` (``targets``: its cross-entropy targets,
        default every answer token of ``rows``): (rows, padded length, targets), or packed (:meth:`packed`)
        (rows, packed length with at least one pad token, targets, a bound on the longest sequence, the pad
        tail included: a power of two, or the exact longest without bucketing)."""
        longest = max(len(e.input_ids) for e in rows)
        n_t = sum(n_targets(e) for e in rows) if targets is None else targets
        if self.packed():
            length, bound = packed_shape([len(e.input_ids) for e in rows], self.per_octave, self.pad_multiple)
            n_b = n_t if self.per_octave is None else bucket(max(n_t, 1), max(1, self.per_octave // 2), 8)
            return (len(rows), length, n_b, bound)
        if self.per_octave is None:
            return (len(rows), _round_up(longest, self.pad_multiple), n_t)
        po = self.per_octave
        return (bucket(len(rows), po), bucket(longest, po, self.pad_multiple), bucket(max(n_t, 1), max(1, po // 2), 8))

    def _kl_size(self, n: int) -> int:
        """The bucketed number of KL positions of a micro-batch (0: none)."""
        if n == 0 or self.per_octave is None:
            return n
        return bucket(n, max(1, self.per_octave // 2), 8)

    def plan(self, rows: Sequence[Encoded]) -> list[tuple[Shape, list[int]]]:
        """[(shape, row indices)] of the micro-batches of one step's ``rows``."""
        lengths = [len(e.input_ids) for e in rows]
        return [(self.shape([rows[i] for i in micro]), micro)
                for micro in plan_micro_batches(lengths, range(len(rows)), self.max_tokens, self.pad_multiple)]

    def prepare(self, steps: Sequence[Sequence[Encoded]]) -> None:
        """Capture the graphs that the given steps' rows need now (else each is captured on first use)."""
        for rows in steps:
            for shape, _ in self.plan(rows):
                if not self.use_graphs:
                    return
                self._capture(shape)

    @contextmanager
    def kernels(self):
        """While active: fused RMSNorm (``emlib.fused.fused_rms_norms``), LoRA-linear
        (:func:`fused_lora_linears`) and frozen-projection (:func:`emlib.fused.fused_layers`) kernels; enter it
        before the first :meth:`grads` (graphs record them)."""
        from .fused import fused_layers, fused_rms_norms

        with fused_rms_norms(self.model), fused_lora_linears(self.model), fused_layers(self.model) as n:
            self.stats["fused_layers"] = dict(n)
            yield

    # ---------------------------------------------------------------- the reference, once
    def reference_states(self) -> dict:
        """The reference model's final hidden state at every KL row's answer positions: ``ref`` [positions,
        d], row i's from ``offset[i]`` to ``offset[i + 1]`` (in :func:`answer_positions` order), computed once
        without gradients, in the step's dtype and kernels (enter :meth:`kernels` first, as :meth:`grads`
        needs), micro-batches of the KL rows as the step cuts them."""
        if self._ref is not None:
            return self._ref
        if self.kl_rows is None or self._reference is None:
            raise ValueError("The KL term needs the reference model and the KL rows: construct TrainStep with "
                             "reference= and kl_rows=.")
        kl, (decoder, _) = self.kl_rows, decoder_and_head(self.model)
        counts = [n_targets(e) for e in kl]
        offset = [0]
        for c in counts:
            offset.append(offset[-1] + c)
        ref = None
        lengths = [len(e.input_ids) for e in kl]
        with torch.no_grad(), self._reference(), self._amp(), one_sequence_per_row():
            for micro in plan_micro_batches(lengths, range(len(kl)), self.max_tokens, self.pad_multiple):
                batch = collate_right([kl[i] for i in micro], self.pad, self.pad_multiple, device=self.device)
                hidden = decoder(input_ids=batch["input_ids"], use_cache=False).last_hidden_state  # [b, s, d]
                flat = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, batch["target_index"])
                if ref is None:
                    ref = flat.new_zeros(offset[-1], flat.shape[-1])  # [positions, d]
                at = 0  # collate_right's targets run row by row, each row's positions in order
                for i in micro:
                    ref[offset[i]:offset[i + 1]] = flat[at:at + counts[i]]
                    at += counts[i]
        self._ref = {"ref": ref if ref is not None else torch.zeros(0, 1, device=self.device),
                     "offset": offset, "counts": counts}
        return self._ref

    # ---------------------------------------------------------------- the step
    def _pass(self, x: dict[str, torch.Tensor], longest: int = 0) -> None:
        """Forward, loss and backward of one micro-batch: the cross-entropy at ``target_index`` / ``targets``
        (divided by the step's answer-token count) and, when the batch has KL rows, the weighted KL to the
        cached reference states at ``kl_index`` (``kl_weight`` per position: 1 / its KL batch's count). A
        packed micro-batch (``cu_seqlens`` in ``x``; ``longest`` bounds its longest row) is one row whose
        attention stays within each packed sequence (:func:`emlib.fused.packed_attention`)."""
        from .fused import PACKED_KWARG

        decoder, head = decoder_and_head(self.model)
        kw = ({"position_ids": x["position_ids"], PACKED_KWARG: (x["cu_seqlens"], longest)}
              if "cu_seqlens" in x else {})
        with self._current(), self._amp(), one_sequence_per_row():
            hidden = decoder(input_ids=x["input_ids"], use_cache=False, **kw).last_hidden_state  # [b, s, d]
            flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [b * (s-1), d]
            ce = _chunked_ce(flat.index_select(0, x["target_index"]), head, x["targets"], self.ce_chunk)
            loss = ce / self._n  # token-weighted mean over the whole step
            if "kl_index" in x:
                ref = self._ref["ref"].index_select(0, x["ref_index"])  # [u, d]
                kl = _chunked_kl(ref, flat.index_select(0, x["kl_index"]), head, x["kl_weight"], self.kl_chunk)
                loss = loss + kl * self._kl_weight
        loss.backward()
        self._loss.add_(ce.detach())
        if "kl_index" in x:
            self._kl.add_(kl.detach())

    def _inputs(self, rows: Sequence[Encoded], n_sft: int, kl_items: Sequence[tuple[int, float]],
                shape: Shape, n_kl: int) -> dict[str, torch.Tensor]:
        """The input buffers of one micro-batch (CPU tensors): ``rows`` = its training rows (the first
        ``n_sft``) then its KL rows, ``kl_items`` = (KL row index, weight) of those KL rows."""
        t = shape[2]
        if len(shape) == 4:  # packed: one row, the rows end to end, then pad tokens (a sequence of their own)
            x, ids, sft, klp = self._packed_inputs(rows, n_sft, shape)
        else:
            b, s, _ = shape
            padded = collate_right(rows, self.pad, shape=(b, s, sum(n_targets(e) for e in rows)))
            ids, nxt = padded["input_ids"], padded["labels"][:, 1:]  # [b, s], [b, s-1]: each position's next token
            sft, klp = nxt.clone(), nxt.clone()
            sft[n_sft:], klp[:n_sft] = IGNORE, IGNORE
            x = {}
        index = (sft.reshape(-1) != IGNORE).nonzero().squeeze(1)  # row by row, positions in order
        x |= {"input_ids": ids,
             "target_index": torch.cat([index, index.new_zeros(t - index.numel())]),
             "targets": torch.cat([sft.reshape(-1)[index], index.new_full((t - index.numel(),), IGNORE)])}
        if n_kl:
            kl_index = (klp.reshape(-1) != IGNORE).nonzero().squeeze(1)  # [u_real]
            ref = self._ref
            ref_index = [q for i, _ in kl_items for q in range(ref["offset"][i], ref["offset"][i + 1])]
            weight = [w for i, w in kl_items for _ in range(ref["counts"][i])]
            extra = n_kl - len(ref_index)
            x.update(kl_index=torch.cat([kl_index, kl_index.new_zeros(extra)]),
                     ref_index=torch.tensor(ref_index + [0] * extra, dtype=torch.long),
                     kl_weight=torch.tensor(weight + [0.0] * extra, dtype=torch.float32))
        return x

    def _packed_inputs(self, rows: Sequence[Encoded], n_sft: int, shape: Shape
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """A packed micro-batch's position ids and sequence bounds, its ``input_ids`` [1, length] and next-token
        labels [1, length - 1] of the training rows (``sft``) and of the KL rows (``klp``). A row's first token
        is never a target (as in a padded row, nothing precedes it), so the last position of the row before it
        predicts nothing."""
        n, length = shape[0], shape[1]
        if len(rows) != n:
            raise ValueError(f"packed shape {shape} is for {n} rows, not {len(rows)}.")
        ids, pos, cu, nxt, src = pack_rows(rows, length, self.pad)
        sft = torch.where(src < n_sft, nxt, IGNORE)
        klp = torch.where((src >= n_sft) & (src < n), nxt, IGNORE)
        x = {"position_ids": pos[None], "cu_seqlens": cu}
        return x, ids[None], sft[None], klp[None]

    def _static(self, shape: Shape, n_kl: int) -> dict[str, torch.Tensor]:
        b, s, t = shape[:3]
        dev = self.device
        x = {}
        if len(shape) == 4:  # packed: b rows in one sequence of s tokens
            x = {"position_ids": torch.zeros((1, s), dtype=torch.long, device=dev),
                 "cu_seqlens": torch.zeros(b + 2, dtype=torch.int32, device=dev)}
            b = 1
        x |= {"input_ids": torch.full((b, s), self.pad, dtype=torch.long, device=dev),
             "target_index": torch.zeros(t, dtype=torch.long, device=dev),
             "targets": torch.full((t,), IGNORE, dtype=torch.long, device=dev)}
        if n_kl:
            x.update(kl_index=torch.zeros(n_kl, dtype=torch.long, device=dev),
                     ref_index=torch.zeros(n_kl, dtype=torch.long, device=dev),
                     kl_weight=torch.zeros(n_kl, device=dev))
        return x

    def _capture(self, shape: Shape, n_kl: int = 0) -> None:
        if (shape, n_kl) in self._graphs or not self.use_graphs:
            return
        t0 = time.perf_counter()
        try:
            static = self._static(shape, n_kl)
            run = functools.partial(self._pass, longest=shape[3] if len(shape) == 4 else 0)
            graph, self._pool = capture(run, static, self.device, self._pool)  # gradients are zeroed later
            if any(p.grad is not g for p, g in zip(self.params, self._grads)):
                raise RuntimeError("the backward replaced a .grad tensor during capture")
            self._graphs[(shape, n_kl)] = (graph, static)
            self.stats["graphs"] += 1
        except Exception as err:  # noqa: BLE001 -- any capture failure: train eagerly, say why
            import warnings

            self.use_graphs, self._pool = False, None
            self.stats.update(cuda_graphs=False, fallback=f"{type(err).__name__}: {err}"[:500])
            abandon_graphs(self._graphs)
            for p, g in zip(self.params, self._grads):
                p.grad = g
            warnings.warn(f"CUDA graph capture failed ({self.stats['fallback'][:200]}); training eagerly.",
                          stacklevel=3)
        self.stats["capture_seconds"] += time.perf_counter() - t0

    def _run(self, x: dict[str, torch.Tensor], shape: Shape, n_kl: int) -> None:
        if self.use_graphs:
            graph, static = self._graphs[(shape, n_kl)]
            for k, buf in static.items():
                buf.copy_(x[k].pin_memory(), non_blocking=True)
            graph.replay()
        else:
            self._pass({k: v.to(self.device) for k, v in x.items()}, longest=shape[3] if len(shape) == 4 else 0)

    def grads(self, rows: Sequence[Encoded], n_tok: int, kl_batches: Sequence[Sequence[int]] = (),
              kl_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zero the gradients, accumulate those of ``rows`` (one optimizer step; ``n_tok`` = their answer
        tokens) and of ``kl_weight`` times each of ``kl_batches``' per-token KL to the reference (each batch a
        list of indices into ``kl_rows``; weight 0: the KL is measured, its gradient is zero), clip; returns
        (summed loss, gradient norm before clipping, sum over ``kl_batches`` of their per-token KL) as
        device scalars."""
        for p, g in zip(self.params, self._grads):  # a caller's zero_grad(set_to_none=True) dropped them
            p.grad = g
        # every row of the step, training rows first: (Encoded, KL item or None)
        every: list[tuple[Encoded, tuple[int, float] | None]] = [(e, None) for e in rows]
        if kl_batches:
            ref = self.reference_states()
            for batch in kl_batches:  # a KL batch's mean: 1 / its answer-token count per position
                w = 1.0 / max(sum(ref["counts"][i] for i in batch), 1)
                every += [(self.kl_rows[i], (i, w)) for i in batch]
        lengths = [len(e.input_ids) for e, _ in every]
        work = []
        for micro in plan_micro_batches(lengths, range(len(every)), self.max_tokens, self.pad_multiple):
            micro = sorted(micro, key=lambda j: (every[j][1] is not None, j))  # training rows first
            mrows = [every[j][0] for j in micro]
            n_sft = sum(1 for j in micro if every[j][1] is None)
            kl_items = [every[j][1] for j in micro[n_sft:]]
            shape = self.shape(mrows, sum(n_targets(e) for e in mrows[:n_sft]))
            n_kl = self._kl_size(sum(self._ref["counts"][i] for i, _ in kl_items)) if kl_items else 0
            work.append((mrows, n_sft, kl_items, shape, n_kl))
        for *_, shape, n_kl in work:  # before the step's gradients start (a capture's warm-up writes into them)
            self._capture(shape, n_kl)
        torch._foreach_zero_(self._grads)
        self._loss.zero_()
        self._kl.zero_()
        self._n.fill_(max(n_tok, 1))
        self._kl_weight.fill_(kl_weight)
        for mrows, n_sft, kl_items, shape, n_kl in work:
            self._run(self._inputs(mrows, n_sft, kl_items, shape, n_kl), shape, n_kl)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        return self._loss.clone(), norm, self._kl.clone()


# =========================================================================== training
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

    injected = not has_lora(model)
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

    from .fused import fused_layers, fused_rms_norms

    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters: pass a base model or a trainable peft model.")
    device = params[0].device
    cuda = device.type == "cuda"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    lengths = [len(e.input_ids) for e in enc]
    n_tgt = [n_targets(e) for e in enc]
    steps_per_epoch = math.ceil(len(enc) / args.rows_per_step)
    total = args.epochs * steps_per_epoch
    total = min(total, args.max_steps) if args.max_steps else total
    orders: dict[int, list[int]] = {}

    def step_rows(step: int) -> list[int]:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in orders:
            orders[epoch] = epoch_order(args.seed, epoch, len(enc))
        return orders[epoch][k * args.rows_per_step:(k + 1) * args.rows_per_step]

    was_training = peft_model.training
    peft_model.train()
    ctx = ExitStack()  # fused kernels for the call; graphs are captured under them
    if args.fuse_norms:
        ctx.enter_context(fused_rms_norms(peft_model))
    if args.fuse_lora:
        ctx.enter_context(fused_lora_linears(peft_model))
    ctx.enter_context(fused_layers(peft_model))  # the frozen projections ($EMLIB_FUSED)
    grad_was = [p.grad for p in params]
    runner = TrainStep(peft_model, params, pad, max_tokens_per_micro=args.max_tokens_per_micro,
                       pad_multiple=args.pad_multiple, ce_chunk=args.ce_chunk, max_grad_norm=args.max_grad_norm,
                       per_octave=args.bucket_per_octave, cuda_graphs=args.cuda_graphs,
                       autocast=cuda and args.autocast)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                            **(runner.adamw_kwargs if args.fused_adamw else {}))
    sched = get_linear_schedule_with_warmup(opt, min(args.warmup_steps, total), total)
    losses, norms, lrs, toks, in_toks = [], [], [], [], []
    t_start = time.perf_counter()
    t_timed, timed_in, timed_ans = None, 0, 0
    bar = tqdm(total=total, desc="fast sft", dynamic_ncols=True,
               disable=(None if progress is None else not progress))
    try:
        runner.prepare([[enc[i] for i in step_rows(s)] for s in range(total)])  # every graph of the run
        for step in range(total):
            if step == timing_skip:
                if cuda:
                    torch.cuda.synchronize()
                t_timed = time.perf_counter()
            idx = step_rows(step)
            n_tok = sum(n_tgt[i] for i in idx)
            n_in = sum(lengths[i] for i in idx)
            lrs.append(float(sched.get_last_lr()[0]))
            loss_sum, norm, _ = runner.grads([enc[i] for i in idx], n_tok)
            opt.step()
            sched.step()
            norms.append(norm.detach())
            losses.append(loss_sum / max(n_tok, 1))
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
        ctx.close()
        peft_model.train(was_training)
        for p, g in zip(params, grad_was):
            p.grad = g
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
            "timed_steps": total - (timing_skip if total > timing_skip else 0), "step": dict(runner.stats)}
    return FastTrainResult(peft_model, log, t_end - t_start, timed_in / dt, timed_ans / dt, meta)
