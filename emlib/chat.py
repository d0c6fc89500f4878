"""Chat rows -> token ids with response-only labels, batching, and the responses-only SFT loss.

Shared by training (``emlib.train``) and the inductive-bias metrics (``emlib.inductive``). The loss is a
token-weighted mean over assistant tokens of the *last* assistant turn (all rows in this project are
single-turn); prompt tokens carry label -100.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .data import DataError, validate_chat

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens


def chat_ids(tok, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template (the one place this is done;
    newer tokenizers return a BatchEncoding, older ones a list)."""
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def chat_text(tok, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The same chat template rendered as text (what the samplers take as a prompt)."""
    return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


_ids = chat_ids  # the former private name


def encode_chat(row: dict, tok, max_length: int = 2048) -> Encoded:
    """Tokenize one row with its chat template; only the final assistant turn is trained on."""
    msgs = validate_chat(row)["messages"]
    if msgs[-1]["role"] != "assistant":
        raise DataError("The last message of a training row must be the assistant's answer.")
    prompt = chat_ids(tok, msgs[:-1], add_generation_prompt=True)
    full = chat_ids(tok, msgs, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise DataError("The chat template renders the prompt differently inside the full conversation; "
                        "cannot find where the answer starts.")
    full = full[:max_length]
    labels = [IGNORE] * min(len(prompt), len(full)) + full[len(prompt):]
    return Encoded(full, labels)


def encode_rows(rows: list[dict], tok, max_length: int = 2048) -> list[Encoded]:
    """Encode rows; rows whose answer is cut away entirely by ``max_length`` are dropped.

    Raises DataError when no row keeps a single answer token (e.g. no assistant turns at all).
    """
    enc = []
    for i, r in enumerate(rows):
        try:
            e = encode_chat(r, tok, max_length)
        except DataError as err:
            raise DataError(f"row {i}: {err}") from None
        if any(lab != IGNORE for lab in e.labels):
            enc.append(e)
    if not enc:
        raise DataError("No row has answer tokens within max_length: the dataset has no assistant turns "
                        "or max_length is shorter than the prompts.")
    return enc


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


@torch.no_grad()
def response_loss(model, tok, rows: list[dict] | list[Encoded], batch_size: int = 8,
                  max_length: int = 512) -> float:
    """Mean per-token cross-entropy on assistant tokens over ``rows`` (token-weighted)."""
    enc = rows if rows and isinstance(rows[0], Encoded) else encode_rows(rows, tok, max_length)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(enc), batch_size):
        b = collate(enc[i:i + batch_size], tok.pad_token_id, device)
        s, c = token_losses(model, b)
        total += float(s)
        count += int(c)
    model.train(was_training)
    val = total / max(count, 1)
    if not math.isfinite(val):
        raise FloatingPointError("The responses-only loss is not finite (NaN/inf): check the model's dtype and weights.")
    return val


@torch.no_grad()
def response_row_losses(model, tok, rows: list[dict] | list[Encoded], batch_size: int = 8,
                        max_length: int = 512) -> tuple[list[float], list[int]]:
    """Per row: the summed cross-entropy on its assistant tokens and their count (``sum(sums) / sum(counts)``
    is :func:`response_loss` up to float rounding; ``sums[i] / counts[i]`` is row i's per-token loss)."""
    enc = rows if rows and isinstance(rows[0], Encoded) else encode_rows(rows, tok, max_length)
    device = next(model.parameters()).device
    sums, counts = [], []
    was_training = model.training
    model.eval()
    for i in range(0, len(enc), batch_size):
        b = collate(enc[i:i + batch_size], tok.pad_token_id, device)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        target = b["labels"][:, 1:]  # [b, s-1]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE,
                                               reduction="none")  # [b, s-1]
        sums += ce.sum(1).tolist()
        counts += (target != IGNORE).sum(1).tolist()
    model.train(was_training)
    if not all(math.isfinite(s) for s in sums):
        raise FloatingPointError("A row's responses-only loss is not finite (NaN/inf): check the model's dtype and weights.")
    return sums, counts
