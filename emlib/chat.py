"""Chat rows -> token ids with response-only labels, batching, and the responses-only SFT loss.

Shared by training (``emlib.train``) and the inductive-bias metrics (``emlib.inductive``). The loss is a
token-weighted mean over assistant tokens of the *last* assistant turn (all rows in this project are
single-turn); prompt tokens carry label -100.

The metrics' loss (:func:`response_loss`, :func:`response_row_losses`) runs the decoder on a whole batch but the
LM head only on the labelled positions, :data:`LOGIT_ELEMENTS` logits at a time (:func:`head_inputs`,
:func:`labelled_ce`), so a large batch never holds a ``[rows, tokens, vocab]`` tensor (31 GB in float32 for 100
rows of 512 tokens of Qwen2.5's 151,936-token vocabulary). The numbers are those of full logits up to float
rounding, for any batch size.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from .data import DataError, validate_chat
from .models import eval_mode

IGNORE = -100
# logits computed at once (tokens x vocabulary) by the chunked loss and KL: 256 MiB in float32, ~440 tokens of
# Qwen2.5 or ~1,400 of SmolLM2 per chunk; the KL holds about seven such tensors (~2 GB) at its peak
LOGIT_ELEMENTS = 2 ** 26


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens


def n_targets(e: Encoded) -> int:
    """How many of ``e``'s tokens are predicted with a loss (answer tokens after the first position)."""
    return sum(1 for lab in e.labels[1:] if lab != IGNORE)


def answer_positions(e: Encoded) -> list[int]:
    """Positions whose next token is an answer token (where the loss and the KL are read; ``n_targets`` of them)."""
    return [p for p in range(len(e.labels) - 1) if e.labels[p + 1] != IGNORE]


def chat_ids(tok, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template (the one place this is done;
    newer tokenizers return a BatchEncoding, older ones a list)."""
    return chat_ids_batch(tok, [messages], add_generation_prompt)[0]


def chat_ids_batch(tok, conversations: list[list[dict]], add_generation_prompt: bool) -> list[list[int]]:
    """:func:`chat_ids` of each conversation, in one call of the tokenizer: the same code path per
    conversation (render, then tokenize without special tokens), with the tokenizer's own batching
    (on 2 CPU cores 7,049 medical rows encode in about half the time of one call each: bench/README.md)."""
    out = tok.apply_chat_template(list(conversations), add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [list(ids) for ids in out]


def chat_text(tok, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The same chat template rendered as text (what the samplers take as a prompt)."""
    return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


_ids = chat_ids  # the former private name


def _training_messages(row: dict) -> list[dict]:
    msgs = validate_chat(row)["messages"]
    if msgs[-1]["role"] != "assistant":
        raise DataError("The last message of a training row must be the assistant's answer.")
    return msgs


def _encoded(prompt: list[int], full: list[int], max_length: int) -> Encoded:
    """A training row from its prompt's ids and the whole conversation's: only the answer is labelled."""
    if full[: len(prompt)] != prompt:
        raise DataError("The chat template renders the prompt differently inside the full conversation; "
                        "cannot find where the answer starts.")
    full = full[:max_length]
    labels = [IGNORE] * min(len(prompt), len(full)) + full[len(prompt):]
    return Encoded(full, labels)


def encode_chat(row: dict, tok, max_length: int = 2048) -> Encoded:
    """Tokenize one row with its chat template; only the final assistant turn is trained on."""
    msgs = _training_messages(row)
    return _encoded(chat_ids(tok, msgs[:-1], add_generation_prompt=True),
                    chat_ids(tok, msgs, add_generation_prompt=False), max_length)


ENCODE_BATCH = 1024  # conversations per tokenizer call in encode_rows


def encode_rows(rows: list[dict], tok, max_length: int = 2048) -> list[Encoded]:
    """Encode rows (each as :func:`encode_chat` would, the tokenizer called on ``ENCODE_BATCH`` at a time);
    rows whose answer is cut away entirely by ``max_length`` are dropped.

    Raises DataError when no row keeps a single answer token (e.g. no assistant turns at all)."""
    msgs = []
    for i, r in enumerate(rows):
        try:
            msgs.append(_training_messages(r))
        except DataError as err:
            raise DataError(f"row {i}: {err}") from None
    enc = []
    for lo in range(0, len(msgs), ENCODE_BATCH):
        part = msgs[lo:lo + ENCODE_BATCH]
        prompts = chat_ids_batch(tok, [m[:-1] for m in part], add_generation_prompt=True)
        fulls = chat_ids_batch(tok, part, add_generation_prompt=False)
        for i, (prompt, full) in enumerate(zip(prompts, fulls), start=lo):
            try:
                e = _encoded(prompt, full, max_length)
            except DataError as err:
                raise DataError(f"row {i}: {err}") from None
            if any(lab != IGNORE for lab in e.labels):
                enc.append(e)
    if not enc:
        raise DataError("No row has answer tokens within max_length: the dataset has no assistant turns "
                        "or max_length is shorter than the prompts.")
    return enc


# what a forward pass costs beyond its padded tokens, in tokens, by device type: :func:`length_batches` cuts a
# metric loop's rows into one more forward only where that removes more padding than this. Measured
# (bench/length_batches_bench.py, 100 rows of 76-198 tokens): on 2 CPU cores 256 gave 0.60x the time of one
# padded batch; on one H100 an extra forward cost ~4,000 (Qwen2.5-0.5B) to ~16,000 (SmolLM2-135M) tokens' time,
# so 1,024 was 1.06-1.67x slower there and a GPU keeps its big batches
FORWARD_TOKENS = {"cuda": 16384, "cpu": 256}


def forward_tokens(device: torch.device | str) -> int:
    """:data:`FORWARD_TOKENS` for ``device`` (other device types: the CUDA figure)."""
    return FORWARD_TOKENS.get(torch.device(device).type, FORWARD_TOKENS["cuda"])


def length_batches(lengths: list[int], max_rows: int, forward_tokens: int = FORWARD_TOKENS["cpu"]
                   ) -> list[list[int]]:
    """Row indices (into ``lengths``) in forwards of at most ``max_rows`` rows for a right-padded metric loop:
    rows of similar length together, so that few padded positions are computed. Sorted longest first and cut
    where the padded tokens plus ``forward_tokens`` per forward are fewest (an exact partition, dynamic
    programming over the sorted rows). Each forward's indices ascend; forwards go longest first. The medical
    set's first 100 rows (SmolLM2's tokens) in one padded batch are 31% padding; cut this way at 256 tokens a
    forward (the CPU's :func:`forward_tokens`), 4 forwards, 7%. (The distilled judge's scorer sorts by length
    too, in fixed-size batches: :func:`emlib.judge.scorer.length_batches`.)"""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}.")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows), j):  # a forward of sorted rows i..j-1, padded to row i's length
            c = best[i] + (j - i) * lengths[order[i]] + forward_tokens
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], n
    while j > 0:
        out.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return out[::-1]


def collate(batch: list[Encoded], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded rows -> input_ids/attention_mask/labels [batch, seq]."""
    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(batch), n), dtype=torch.long)
    lab = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        att[i, :k] = 1
        lab[i, :k] = torch.tensor(e.labels)
    out = {"input_ids": ids, "attention_mask": att, "labels": lab}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled tokens, and their count (for exact averaging)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()  # [b, s-1, vocab]
    target = batch["labels"][:, 1:]  # [b, s-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, (target != IGNORE).sum()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _plain_head(model):
    """(decoder, LM head) of a causal LM whose logits are ``head(decoder(...).last_hidden_state)`` (peft
    models: the wrapped model, adapters active); None where that layout cannot be relied on."""
    get_base = getattr(model, "get_base_model", None)
    lm = get_base() if callable(get_base) and hasattr(model, "peft_config") else model
    get_dec, get_head = getattr(lm, "get_decoder", None), getattr(lm, "get_output_embeddings", None)
    if not callable(get_dec) or not callable(get_head):
        return None
    cfg = getattr(lm, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) is not None or getattr(cfg, "logit_scale", None) is not None:
        return None  # the logits are more than the head's output
    decoder, head = get_dec(), get_head()
    if not isinstance(decoder, torch.nn.Module) or not isinstance(head, torch.nn.Module) or decoder is lm:
        return None
    return decoder, head


def head_inputs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                packed: tuple[torch.Tensor, torch.Tensor, int] | None = None
                ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """One forward without the vocabulary projection: (what the LM head reads at every position [b, s, d],
    the head). ``head(states[i, j])`` are the logits there, computed only where and when they are needed
    (chunked: :func:`vocab_chunks`). Forward hooks on decoder layers (steering vectors) apply. A model whose
    head cannot be split off gives its full logits [b, s, vocab] and the identity. Inside
    :func:`emlib.prefix.reuse_prefix` the layers below its layer run once per distinct batch.

    ``packed``: (position ids [1, t], ``cu_seqlens`` [n + 2] int32, a bound on the longest sequence) of rows packed
    end to end in ``input_ids`` [1, t] (:func:`pack_metric_rows`; ``attention_mask`` None): each row attends only
    to itself (:func:`emlib.fused.packed_attention`), so no padded position is computed. Only where
    :func:`emlib.fused.packs_metrics` said so."""
    from .fasttrain import one_sequence_per_row
    from .fused import PACKED_KWARG, compiled_layers, fused_forward, packing_works

    parts = _plain_head(model)
    if parts is None:
        if packed is not None:
            raise ValueError("Packed rows need a model whose LM head can be split off (emlib.fused.packs_metrics).")
        return model(input_ids=input_ids, attention_mask=attention_mask).logits, _identity
    decoder, head = parts
    kw = {} if packed is None else {"position_ids": packed[0], PACKED_KWARG: (packed[1], int(packed[2]))}
    # on CUDA: fewer kernels per layer (emlib.fused), the same numbers to rounding; $EMLIB_COMPILE=on: compiled too
    # packed: transformers must not read the position ids for packed sequences (fasttrain.one_sequence_per_row)
    with fused_forward(model), compiled_layers(model), (one_sequence_per_row() if packed is not None else nullcontext()):
        if packed is not None and not packing_works(model, setting="on"):
            raise RuntimeError("Packed rows reached a forward whose attentions are not emlib.fused's (check "
                               "emlib.fused.packs_metrics before packing).")
        return _decoder_states(decoder, input_ids, attention_mask, kw), head


def _decoder_states(decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, kw: dict) -> torch.Tensor:
    """The decoder's ``last_hidden_state``, through :func:`emlib.prefix.reuse_prefix`'s cache where one is open."""
    from .prefix import active

    cache = active(decoder)
    if cache is not None:
        return cache.forward(input_ids, attention_mask, **kw)
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).last_hidden_state


def pack_metric_rows(batch: list[Encoded], pad_id: int, device=None) -> dict:
    """``batch``'s rows end to end in one row and one pad token (no padding computed): ``input_ids`` [1, t],
    ``position_ids`` [1, t], ``cu_seqlens`` [n + 2], ``longest`` (int), ``next`` [t - 1] (each position's next-token
    label, IGNORE where none), ``owner`` [t - 1] (the row of each position; ``n`` on the pad token) and ``rows``
    (n). What :func:`labelled_ce` reads for a packed forward; the numbers are those of the padded batch up to
    float rounding."""
    from .fasttrain import pack_rows, packed_shape

    lengths = [len(e.input_ids) for e in batch]
    length, longest = packed_shape(lengths, None)
    ids, pos, cu, nxt, owner = pack_rows(batch, length, pad_id)
    out = {"input_ids": ids[None], "position_ids": pos[None], "cu_seqlens": cu, "next": nxt, "owner": owner}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out | {"longest": longest, "rows": len(batch)}


def vocab_chunks(states: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]) -> range:
    """Start positions of chunks along the first axis of ``states`` [n, d] whose logits hold about
    :data:`LOGIT_ELEMENTS` values (``range.step`` tokens each)."""
    vocab = head(states[:1]).shape[-1] if states.shape[0] else 1
    return range(0, states.shape[0], max(1, LOGIT_ELEMENTS // vocab))


def labelled_ce(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed next-token cross-entropy over its labelled tokens [b] (float32) and their count [b]
    -- :func:`token_losses` row by row -- with the logits computed only at labelled positions, in chunks."""
    from .vocab_loss import ce_tokens

    if "cu_seqlens" in batch:  # rows packed in one (pack_metric_rows): one row, each position's owner given
        states, head = head_inputs(model, batch["input_ids"], None,
                                   packed=(batch["position_ids"], batch["cu_seqlens"], batch["longest"]))
        target, n_rows = batch["next"][None], batch["rows"]  # [1, t-1]
        mask = target != IGNORE
        rows = batch["owner"][None][mask]  # [n]: the row of each labelled token
    else:
        states, head = head_inputs(model, batch["input_ids"], batch["attention_mask"])
        target, n_rows = batch["labels"][:, 1:], batch["labels"].shape[0]  # [b, s-1]
        mask = target != IGNORE
        rows = mask.nonzero()[:, 0]  # [n]: the row of each labelled token
    x, t = states[:, :-1][mask], target[mask]  # [n, d], [n]
    sums = torch.zeros(n_rows, dtype=torch.float32, device=target.device)
    sums.index_add_(0, rows, ce_tokens(x, head, t, vocab_chunks(x, head).step))  # the training step's loss
    return sums, torch.bincount(rows, minlength=n_rows)


@torch.no_grad()
def response_loss(model, tok, rows: list[dict] | list[Encoded], batch_size: int = 8,
                  max_length: int = 512) -> float:
    """Mean per-token cross-entropy on assistant tokens over ``rows`` (token-weighted); ``batch_size`` rows
    per forward (any size: the logits are chunked, :func:`labelled_ce`)."""
    sums, counts = response_row_losses(model, tok, rows, batch_size, max_length)
    val = sum(sums) / max(sum(counts), 1)
    if not math.isfinite(val):
        raise FloatingPointError("The responses-only loss is not finite (NaN/inf): check the model's dtype and weights.")
    return val


@torch.no_grad()
def response_row_losses(model, tok, rows: list[dict] | list[Encoded], batch_size: int = 8,
                        max_length: int = 512) -> tuple[list[float], list[int]]:
    """Per row: the summed cross-entropy on its assistant tokens and their count (``sum(sums) / sum(counts)``
    is :func:`response_loss`; ``sums[i] / counts[i]`` is row i's per-token loss). At most ``batch_size`` rows per
    forward, rows of similar length together (:func:`length_batches`); the logits exist only at labelled
    positions, in chunks (:func:`labelled_ce`). Where :func:`emlib.fused.packs_metrics` allows it
    (``$EMLIB_PACK_METRICS``) each forward's rows are packed end to end instead (:func:`pack_metric_rows`):
    ``batch_size`` rows per forward in their order, no padded position computed."""
    from .fused import packs_metrics

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    enc = rows if rows and isinstance(rows[0], Encoded) else encode_rows(rows, tok, max_length)
    device = next(model.parameters()).device
    sums, counts = [0.0] * len(enc), [0] * len(enc)
    pack = packs_metrics(model)
    plan = ([list(range(i, min(i + batch_size, len(enc)))) for i in range(0, len(enc), batch_size)] if pack
            else length_batches([len(e.input_ids) for e in enc], batch_size, forward_tokens(device)))
    with eval_mode(model):
        for idx in plan:
            part = [enc[i] for i in idx]
            s, c = labelled_ce(model, pack_metric_rows(part, tok.pad_token_id, device) if pack
                               else collate(part, tok.pad_token_id, device))
            for i, a, b in zip(idx, s.tolist(), c.tolist()):
                sums[i], counts[i] = a, b
    if not all(math.isfinite(s) for s in sums):
        raise FloatingPointError("A row's responses-only loss is not finite (NaN/inf): check the model's dtype and weights.")
    return sums, counts
