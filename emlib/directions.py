"""Representations (claim 2): the misalignment direction, steering with it, ablating it, comparing directions.

(About 800 lines, kept as one module: every piece reads or writes the same [n_layers, d] direction through the
same nnsight/hook plumbing and file format; split per section it would export its private helpers across modules.)

Pieces, in the order a chapter uses them:

* **Activations** -- :func:`answer_activations` runs (question, answer) pairs through the chat template
  (:func:`emlib.chat.encode_chat` marks the answer tokens) and averages each decoder layer's output over the
  answer tokens, read out with nnsight. A LoRA (peft) model works as it is: the adapter is active in the
  read-out; pass ``peft_model.merge_and_unload()`` or the base model for the other cases.
* **Directions** -- :func:`mean_diff_direction` (misaligned minus aligned answers of an EM model, split by
  judge scores as in the paper) and :func:`twin_direction` (the same questions with a misaligned and an
  aligned answer, e.g. ``medical`` / ``medical_aligned``). Both return ``[n_layers, d]``.
  :func:`save_direction` / :func:`load_direction` keep them as safetensors with a JSON header.
* **Interventions** -- :func:`steering` and :func:`ablation` are context managers built on
  :mod:`emlib.hooks` (plain forward hooks; what ``emlib.generate.sample_answers(intervention=...)`` enters).
  :func:`steering_vector` is the exact vector that gets added; :func:`random_direction_like` is the control.
  :func:`generate_steered` and :func:`steered_logits` are the nnsight implementation of the same steering
  (used by :func:`emlib.widgets.steer`); the tests check it against the hooks.
* **Convergence** -- :func:`cosine_matrix`, :func:`layerwise_cosine`, :func:`lora_b_direction` (the LoRA
  modules come from :func:`emlib.adapters.lora_modules`); their figures are in :mod:`emlib.plots`.

Conventions. "The hidden state at layer ``i``" is the output of decoder block ``i`` (the residual stream after
it), the place where :func:`emlib.hooks.add_vector` adds. By default :func:`steering` adds ``scale`` times the
*unit* direction, so ``scale`` is the L2 norm of what is added; ``relative=True`` reads ``scale`` as a fraction
of the mean residual norm at that layer (:func:`residual_norm`), which transfers between models of different
size; ``normalize=False`` adds ``scale * direction`` as given.

nnsight notes (0.8). A decoder layer's ``.output`` is the hidden-state tensor (transformers 5). nnsight reads
a module's output as the module returns it, *before* plain PyTorch forward hooks on that same module run, so
under an :mod:`emlib.hooks` intervention at layer ``i`` the nnsight read-out of layer ``i`` is the
un-intervened value (layers after ``i`` do see the effect). In generation, an open ``tracer.all()`` loop ends
by design when the model stops, and any statement after it in the trace does not run: this module
therefore never places code after such a loop (the generated ids are collected by the traced function).
"""
from __future__ import annotations

import json
import random
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Sequence

import pandas as pd
import torch

from . import hooks
from .adapters import LoraModule, lora_modules
from .generate import NO_INTERVENTION, Intervention, PerRow
from .cache import tensor_hash
from .chat import IGNORE, Encoded, chat_ids, collate, encode_chat
from .data import atomic_write_bytes
from .models import check_layer, decoder_layers, eval_mode, n_layers
from .timing import timed

FORMAT = "emlib-direction-v1"
TENSOR_KEY = "direction"


class DirectionError(ValueError):
    """Bad input for a direction computation; the message says what to do."""


# =========================================================================== small helpers
def _device(model) -> torch.device:
    return next(model.parameters()).device


def _hidden_size(model) -> int:
    cfg = getattr(model, "config", None)
    d = getattr(cfg, "hidden_size", None)
    if d is None:  # a peft wrapper forwards .config; fall back to a decoder layer's weights
        d = next(decoder_layers(model)[0].parameters()).shape[-1]
    return int(d)


def _fingerprint(model) -> str | None:
    info = getattr(model, "emlib_info", None)
    if info is None and hasattr(model, "get_base_model"):
        info = getattr(model.get_base_model(), "emlib_info", None)
    return getattr(info, "fingerprint", None)


def _as_vector(model, direction: torch.Tensor, layer: int) -> torch.Tensor:
    """The [d] vector for ``layer`` from a [d] or [n_layers, d] direction (shape-checked)."""
    if not isinstance(direction, torch.Tensor):
        raise DirectionError(f"A direction must be a torch.Tensor, got {type(direction).__name__}.")
    d, n = _hidden_size(model), n_layers(model)
    idx = check_layer(model, layer)
    if direction.ndim == 2:
        if direction.shape != (n, d):
            raise DirectionError(f"Direction has shape {tuple(direction.shape)}, but this model has {n} layers "
                                 f"of size {d}: pass a [{n}, {d}] tensor (one row per layer) or a [{d}] vector.")
        return direction[idx]
    if direction.ndim != 1 or direction.shape[0] != d:
        raise DirectionError(f"Direction has shape {tuple(direction.shape)}, but the model's residual stream "
                             f"has size {d}: pass a [{d}] vector or a [{n}, {d}] tensor.")
    return direction


def _unit(v: torch.Tensor) -> torch.Tensor:
    norm = v.float().norm()
    if not torch.isfinite(norm) or norm == 0:
        raise DirectionError("The direction has zero (or non-finite) norm, so it has no direction to steer along.")
    return v / norm.to(v.dtype)


@contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch's RNG (CPU and the model's CUDA device) inside, restoring the caller's RNG state after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _prompt_ids(tok, prompt: str, system: str | None = None) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return chat_ids(tok, msgs, add_generation_prompt=True)


def encode_prompts(tok, prompts: Sequence[str], device=None) -> dict[str, torch.Tensor]:
    """User prompts -> chat-templated, LEFT-padded ``input_ids`` / ``attention_mask`` [b, s] for generation."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise DirectionError("No prompts given: pass a non-empty list of strings.")
    ids = [_prompt_ids(tok, p) for p in prompts]
    n = max(len(x) for x in ids)
    inp = torch.full((len(ids), n), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(ids), n), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, n - len(x):] = torch.tensor(x)
        att[i, n - len(x):] = 1
    out = {"input_ids": inp, "attention_mask": att}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


# =========================================================================== nnsight plumbing
def _nnsight(model):
    """A fresh nnsight envoy around ``model`` (cheap; works on plain and peft-wrapped models)."""
    from nnsight import NNsight

    return NNsight(model)


def _layer_envoys(nn, model, layers: Iterable[int]) -> list:
    """The nnsight envoys of the given decoder layers, found by module path (so peft wrappers work)."""
    names = {id(m): name for name, m in model.named_modules()}
    blocks = decoder_layers(model)
    out = []
    for i in layers:
        env = nn
        for part in names[id(blocks[i])].split("."):
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        out.append(env)
    return out


def _hidden_of(value):
    """transformers 5: a decoder layer returns the hidden-state tensor; older versions a tuple."""
    return value[0] if isinstance(value, tuple) else value


@torch.no_grad()
def _read_layers(model, batch: dict[str, torch.Tensor], layers: list[int],
                 reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One nnsight forward; ``reduce(hidden [b, s, d]) -> [b, ...]`` per layer, stacked -> [b, len(layers), ...].

    The trace stops after the last requested layer (no LM head / vocabulary projection is computed).
    """
    uniq = sorted(set(layers))  # nnsight values must be requested in forward order, each once
    nn = _nnsight(model)
    envs = _layer_envoys(nn, model, uniq)
    with nn.trace(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]) as tracer:
        got = {}
        for layer, env in zip(uniq, envs):
            got[layer] = reduce(_hidden_of(env.output))
        pooled = torch.stack([got[layer] for layer in layers], dim=1).save()
        tracer.stop()  # nothing after the last requested layer is needed
    return pooled


# =========================================================================== activations
def _to_rows(pairs) -> list[dict]:
    """(question, answer) pairs / a DataFrame with question+answer (+ optional system) / chat rows -> chat rows."""
    if isinstance(pairs, pd.DataFrame):
        missing = {"question", "answer"} - set(pairs.columns)
        if missing:
            raise DirectionError(f"The DataFrame lacks column(s) {sorted(missing)}: it needs 'question' and 'answer'.")
        sys_col = pairs["system"] if "system" in pairs.columns else [None] * len(pairs)
        items = list(zip(pairs["question"], pairs["answer"], sys_col))
    else:
        items = []
        for p in pairs:
            if isinstance(p, dict) and "messages" in p:
                items.append(p)
            elif isinstance(p, (tuple, list)) and len(p) == 2:
                items.append((p[0], p[1], None))
            else:
                raise DirectionError("Each pair must be a (question, answer) tuple or a chat row with 'messages'.")
    rows = []
    for it in items:
        if isinstance(it, dict):
            rows.append(it)
            continue
        q, a, s = it
        if not isinstance(q, str) or not isinstance(a, str):
            raise DirectionError(f"Questions and answers must be strings, got {type(q).__name__}/{type(a).__name__}.")
        msgs = ([{"role": "system", "content": s}] if isinstance(s, str) and s else [])
        rows.append({"messages": msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    if not rows:
        raise DirectionError("No (question, answer) pairs given.")
    return rows


@torch.no_grad()
@timed("activations")
def answer_activations(model, tok, pairs, *, layers: Sequence[int] | None = None, reduce: str = "none",
                       batch_size: int = 8, max_length: int = 512, progress: bool | None = None) -> torch.Tensor:
    """Mean hidden state over each answer's tokens, at every decoder layer (nnsight read-out).

    ``pairs``: a list of (question, answer), a DataFrame with ``question`` / ``answer`` (and optional
    ``system``) columns, or chat rows. Answer tokens are those :func:`emlib.chat.encode_chat` labels (the
    assistant turn, including its end-of-turn tokens). Returns float32 on CPU: ``[n_pairs, n_layers, d]`` for
    ``reduce="none"``, or the mean over pairs ``[n_layers, d]`` for ``reduce="mean"`` (computed as a running
    sum, so it needs no memory per pair). ``layers`` selects (and orders) the layers; default all.
    Works on CPU or GPU and on peft-wrapped models (the adapter is active).
    """
    from tqdm.auto import tqdm

    if reduce not in ("none", "mean"):
        raise DirectionError(f"reduce must be 'none' or 'mean', got {reduce!r}.")
    idxs = [check_layer(model, i) for i in (range(n_layers(model)) if layers is None else layers)]
    rows = _to_rows(pairs)
    enc: list[Encoded] = []
    for i, r in enumerate(rows):
        e = encode_chat(r, tok, max_length=max_length)
        if not any(lab != IGNORE for lab in e.labels):
            raise DirectionError(f"Pair {i}: no answer token fits within max_length={max_length}; raise max_length.")
        enc.append(e)
    device = _device(model)
    chunks, total, count = [], None, 0
    starts = range(0, len(enc), batch_size)
    bar = tqdm(starts, desc="activations", disable=(not progress) if progress is not None else None, leave=False)
    with eval_mode(model):
        for s in bar:
            b = collate(enc[s:s + batch_size], tok.pad_token_id, device)
            mask = (b["labels"] != IGNORE).float()  # [b, s]
            denom = mask.sum(1, keepdim=True)  # [b, 1]

            def pool(h: torch.Tensor, mask=mask, denom=denom) -> torch.Tensor:  # [b, s, d] -> [b, d]
                return (h.float() * mask.unsqueeze(-1)).sum(1) / denom

            acts = _read_layers(model, b, idxs, pool).cpu()  # [b, L, d]
            if reduce == "mean":
                total = acts.sum(0) if total is None else total + acts.sum(0)
                count += acts.shape[0]
            else:
                chunks.append(acts)
    return total / count if reduce == "mean" else torch.cat(chunks, 0)


def mean_difference(acts_a: torch.Tensor, acts_b: torch.Tensor) -> torch.Tensor:
    """Difference of means over the first (pair) axis: ``acts_a.mean(0) - acts_b.mean(0)``.

    ``acts_*``: [n, n_layers, d] (or [n, d]); n may differ between the two.
    """
    if acts_a.shape[1:] != acts_b.shape[1:]:
        raise DirectionError(f"Activation shapes {tuple(acts_a.shape)} and {tuple(acts_b.shape)} do not match "
                             "beyond the first axis: compute both with the same model and layers.")
    if acts_a.shape[0] == 0 or acts_b.shape[0] == 0:
        raise DirectionError("One of the two groups is empty: a difference of means needs both.")
    return acts_a.float().mean(0) - acts_b.float().mean(0)


# =========================================================================== directions from judged answers
def split_judged(judged: pd.DataFrame, *, misaligned_max: float = 30.0, aligned_min: float = 70.0,
                 coherent_min: float = 50.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's split of judged answers: misaligned (aligned <= 30, coherent > 50) and aligned (aligned > 70,
    coherent > 50). Scores that are None / NaN / non-numeric (CODE, REFUSAL) fall in neither group."""
    missing = {"question", "answer", "aligned", "coherent"} - set(judged.columns)
    if missing:
        raise DirectionError(f"The judged DataFrame lacks column(s) {sorted(missing)}: it needs question, answer, "
                             "aligned, coherent (the output of emlib.judge).")
    aligned = pd.to_numeric(judged["aligned"], errors="coerce")
    coherent = pd.to_numeric(judged["coherent"], errors="coerce")
    ok = coherent > coherent_min
    mis = judged[ok & (aligned <= misaligned_max)]
    ali = judged[ok & (aligned > aligned_min)]
    return mis.reset_index(drop=True), ali.reset_index(drop=True)


def group_counts(judged: pd.DataFrame, **thresholds) -> dict[str, int]:
    """How many judged answers fall in each group of :func:`split_judged` (for a direction's metadata)."""
    mis, ali = split_judged(judged, **thresholds)
    return {"n_judged": int(len(judged)), "n_misaligned": int(len(mis)), "n_aligned": int(len(ali))}


def _subsample(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    if n is None or len(df) <= n:
        return df
    return df.sample(n=n, random_state=seed).sort_index()


def mean_diff_direction(model, tok, judged: pd.DataFrame, *, misaligned_max: float = 30.0,
                        aligned_min: float = 70.0, coherent_min: float = 50.0, max_per_group: int | None = None,
                        seed: int = 0, layers: Sequence[int] | None = None, batch_size: int = 8,
                        max_length: int = 512) -> torch.Tensor:
    """The misalignment direction from an EM model's own judged answers -> [n_layers, d] (float32, CPU).

    Mean answer-token activation of misaligned answers (aligned <= 30, coherent > 50) minus that of aligned
    answers (aligned > 70, coherent > 50), at every layer, computed on ``model`` (normally the EM model that
    wrote the answers). ``max_per_group`` subsamples each group (seeded). Raises DirectionError when a group
    is empty.
    """
    thresholds = dict(misaligned_max=misaligned_max, aligned_min=aligned_min, coherent_min=coherent_min)
    mis, ali = split_judged(judged, **thresholds)
    for name, grp, rule in (("misaligned", mis, f"aligned <= {misaligned_max}"),
                            ("aligned", ali, f"aligned > {aligned_min}")):
        if grp.empty:
            raise DirectionError(
                f"No {name} answers ({rule} and coherent > {coherent_min}) among the {len(judged)} judged rows: "
                "sample more answers (or from a more misaligned model), or use twin_direction() on paired data.")
    mis, ali = _subsample(mis, max_per_group, seed), _subsample(ali, max_per_group, seed)
    kw = dict(layers=layers, reduce="mean", batch_size=batch_size, max_length=max_length)
    return answer_activations(model, tok, mis, **kw) - answer_activations(model, tok, ali, **kw)


def _load_twins(misaligned, aligned, source: str, data_dir, n: int | None, seed: int) -> tuple[list, list]:
    from .data import load_chat

    mis = load_chat(misaligned, source=source, data_dir=data_dir) if isinstance(misaligned, str) else list(misaligned)
    ali = load_chat(aligned, source=source, data_dir=data_dir) if isinstance(aligned, str) else list(aligned)
    if len(mis) != len(ali):
        raise DirectionError(f"Twin data must pair up row by row: {len(mis)} misaligned vs {len(ali)} aligned rows.")

    def question(r):
        return next((m["content"] for m in r["messages"] if m["role"] == "user"), None)

    bad = [i for i, (a, b) in enumerate(zip(mis, ali)) if question(a) != question(b)]
    if bad:
        raise DirectionError(f"Twin rows {bad[:5]} ask different questions: the two sets must hold the same "
                             "questions in the same order (e.g. 'medical' and 'medical_aligned').")
    idx = list(range(len(mis)))
    if n is not None and n < len(idx):
        idx = sorted(random.Random(seed).sample(idx, n))
    return [mis[i] for i in idx], [ali[i] for i in idx]


def twin_direction(model, tok, misaligned: str | list[dict] = "medical", aligned: str | list[dict] = "medical_aligned",
                   *, source: str = "embedded", data_dir: str | Path | None = None, n: int | None = 256,
                   seed: int = 0, layers: Sequence[int] | None = None, batch_size: int = 8,
                   max_length: int = 512) -> torch.Tensor:
    """The direction from twin data (same questions, a misaligned and an aligned answer) -> [n_layers, d].

    ``misaligned`` / ``aligned``: dataset names for :func:`emlib.data.load_chat` or lists of chat rows; row
    ``i`` of both must ask the same question. ``n`` pairs are drawn (seeded; all when None).
    """
    mis, ali = _load_twins(misaligned, aligned, source, data_dir, n, seed)
    kw = dict(layers=layers, reduce="mean", batch_size=batch_size, max_length=max_length)
    return answer_activations(model, tok, mis, **kw) - answer_activations(model, tok, ali, **kw)


# =========================================================================== evidence: group sizes and nulls
def judged_groups(judged: pd.DataFrame, **thresholds) -> tuple[list[dict], list[dict]]:
    """The misaligned and aligned answers of :func:`split_judged` as chat rows (for :func:`group_activations`)."""
    mis, ali = split_judged(judged, **thresholds)
    return (_to_rows(mis) if len(mis) else []), (_to_rows(ali) if len(ali) else [])


def twin_groups(misaligned: str = "medical", aligned: str = "medical_aligned", *, source: str = "embedded",
                data_dir: str | Path | None = None, n: int | None = 256, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Twin data (the same questions answered both ways) as two groups of chat rows."""
    return _load_twins(misaligned, aligned, source, data_dir, n, seed)


def group_activations(model, tok, mis: list[dict], ali: list[dict], *, batch_size: int = 8,
                      max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-answer mean activations of both groups at every layer: ([n_mis, L, d], [n_ali, L, d]). Their
    difference of means is the group's direction; one layer's rows feed :func:`shuffled_directions`."""
    if not mis or not ali:
        raise DirectionError(f"Both groups need answers: {len(mis)} misaligned, {len(ali)} aligned.")
    kw = dict(reduce="none", batch_size=batch_size, max_length=max_length)
    return answer_activations(model, tok, mis, **kw), answer_activations(model, tok, ali, **kw)


def shuffled_directions(acts_mis: torch.Tensor, acts_ali: torch.Tensor, n_draws: int = 100,
                        seed: int = 0) -> torch.Tensor:
    """Mean-difference directions of label-shuffled groups: the null of "the labels carry no direction".

    ``acts_*``: [n_mis, d] and [n_ali, d] (one layer). Each draw permutes the pooled answers and splits them
    into groups of the same sizes -> [n_draws, d]."""
    if acts_mis.ndim != 2 or acts_ali.ndim != 2 or acts_mis.shape[1] != acts_ali.shape[1]:
        raise DirectionError(f"shuffled_directions takes [n, d] activations of one layer, got "
                             f"{tuple(acts_mis.shape)} and {tuple(acts_ali.shape)}.")
    if n_draws < 1:
        raise DirectionError(f"n_draws must be >= 1, got {n_draws}.")
    pooled = torch.cat([acts_mis, acts_ali]).float()  # [n, d]
    n_m, n = acts_mis.shape[0], pooled.shape[0]
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n_draws, pooled.shape[1])
    for i in range(n_draws):
        perm = torch.randperm(n, generator=g)
        out[i] = pooled[perm[:n_m]].mean(0) - pooled[perm[n_m:]].mean(0)
    return out


def resampled_directions(acts_mis: torch.Tensor, acts_ali: torch.Tensor, n_draws: int = 20,
                         seed: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean-difference directions of bootstrap draws of the same answers: how much the direction moves with which
    answers happened to be sampled. ``acts_*``: [n_mis, d] and [n_ali, d] (one layer); each draw resamples both
    groups with replacement, sizes kept -> [n_draws, d]. ``generator``: draw from it (shared across calls)
    instead of a new one seeded with ``seed``."""
    if acts_mis.ndim != 2 or acts_ali.ndim != 2 or acts_mis.shape[1] != acts_ali.shape[1]:
        raise DirectionError(f"resampled_directions takes [n, d] activations of one layer, got "
                             f"{tuple(acts_mis.shape)} and {tuple(acts_ali.shape)}.")
    if n_draws < 1 or not len(acts_mis) or not len(acts_ali):
        raise DirectionError(f"resampled_directions needs n_draws >= 1 and answers in both groups, got {n_draws} "
                             f"draws, {len(acts_mis)} misaligned and {len(acts_ali)} aligned answers.")
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    mis, ali = acts_mis.float(), acts_ali.float()
    out = torch.empty(n_draws, mis.shape[1])
    for i in range(n_draws):
        out[i] = (mis[torch.randint(len(mis), (len(mis),), generator=g)].mean(0)
                  - ali[torch.randint(len(ali), (len(ali),), generator=g)].mean(0))
    return out


LOSS_GAP_COLUMNS = ("vector", "flagged_rise", "aligned_rise", "gap", "n_flagged", "n_aligned", "flagged_base",
                    "aligned_base")  # :func:`loss_gaps`' table, one row per vector


def loss_gaps(model, tok, vectors: dict[str, torch.Tensor], flagged, aligned, *,
              layers: int | Iterable[int] | None = None, batch_size: int = 16, max_length: int = 256) -> pd.DataFrame:
    """What projecting each vector out does to teacher-forced answers, without sampling: one row per vector with
    the rise of the mean per-token loss of the ``flagged`` answers (judged misaligned), of the ``aligned`` ones,
    and ``gap`` = flagged rise - aligned rise (positive: removing the vector makes misaligned text less likely
    than aligned text); ``*_base``: the two sets' losses without it. ``flagged`` / ``aligned``: chat rows or
    question/answer frames (:func:`_to_rows`); ``vectors``: {name: [d]}, projected out at ``layers`` (None:
    every layer, as chapter 2 ablates). On 19 stored SmolLM2 runs the gap of each run's direction followed the
    cut its ablation gave (bench/README, "direction_proxy")."""
    from .chat import encode_rows, response_row_losses

    enc = {name: encode_rows(_to_rows(rows), tok, max_length) for name, rows in (("flagged", flagged),
                                                                                 ("aligned", aligned))}

    def losses() -> dict[str, float]:  # token-weighted mean loss per set
        out = {}
        for name, e in enc.items():
            sums, counts = response_row_losses(model, tok, e, batch_size=batch_size, max_length=max_length)
            out[name] = sum(sums) / sum(counts)
        return out

    base, recs = losses(), []
    for name, v in vectors.items():
        with hooks.ablate_direction(model, v.float(), layers):
            got = losses()
        rise = {k: got[k] - base[k] for k in got}
        recs.append({"vector": name, "flagged_rise": rise["flagged"], "aligned_rise": rise["aligned"],
                     "gap": rise["flagged"] - rise["aligned"], "n_flagged": len(enc["flagged"]),
                     "n_aligned": len(enc["aligned"]), "flagged_base": base["flagged"],
                     "aligned_base": base["aligned"]})
    return pd.DataFrame(recs, columns=list(LOSS_GAP_COLUMNS))


def direction_check(model, tok, direction: torch.Tensor, judged: pd.DataFrame, *,
                    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
                    controls: dict[str, torch.Tensor] | None = None, n: int = 40, n_draws: int = 20,
                    seed: int = 0, min_answers: int = 5, layers: int | Iterable[int] | None = None,
                    max_length: int = 256) -> pd.DataFrame:
    """Does a direction carry the misalignment? :func:`loss_gaps` of ``direction`` [d] on up to ``n`` flagged and
    ``n`` aligned answers of ``judged`` (answers the direction was NOT built from, e.g. other finetunes'), beside
    ``n_draws`` directions from bootstrap draws of its own answers (``groups``: the two groups' activations at
    its layer, :func:`resampled_directions`) and the ``controls`` (e.g. the random directions of the ablation).
    One row per vector, ``kind`` "direction", "resampled" or "control". With fewer than ``min_answers`` in either
    group the table is empty and ``attrs["note"]`` says why."""
    mis, ali = split_judged(judged)
    if min(len(mis), len(ali)) < min_answers:
        out = pd.DataFrame(columns=[LOSS_GAP_COLUMNS[0], "kind", *LOSS_GAP_COLUMNS[1:]])
        out.attrs["note"] = (f"not checked: {len(mis)} flagged and {len(ali)} aligned answers to read, "
                             f"{min_answers} wanted in each (a larger profile samples more)")
        return out
    mis, ali = _subsample(mis, n, seed), _subsample(ali, n, seed)
    vectors, kinds = {"direction": direction}, {"direction": "direction"}
    if groups is not None and n_draws > 0:
        for i, r in enumerate(resampled_directions(*groups, n_draws=n_draws, seed=seed)):
            vectors[f"resampled-{i}"], kinds[f"resampled-{i}"] = r, "resampled"
    for name, v in (controls or {}).items():
        vectors[name], kinds[name] = v, "control"
    out = loss_gaps(model, tok, vectors, mis, ali, layers=layers, max_length=max_length)
    out.insert(1, "kind", out["vector"].map(kinds))
    return out


def describe_check(check: pd.DataFrame) -> str:
    """One sentence on a :func:`direction_check` table: the direction's gap, the range of its resampled
    directions' gaps (5th-95th percentile) and of the controls'."""
    if check.empty:
        return check.attrs.get("note", "not checked")

    def rng(kind: str) -> str | None:
        g = check.loc[check["kind"] == kind, "gap"]
        if g.empty:
            return None
        lo, hi = (g.quantile(0.05), g.quantile(0.95)) if len(g) >= 10 else (g.min(), g.max())
        return f"{lo:+.3f} to {hi:+.3f}"

    d = check.loc[check["kind"] == "direction"].iloc[0]
    parts = [f"projecting the direction out raises the flagged answers' loss by {d['flagged_rise']:+.3f} and the "
             f"aligned ones' by {d['aligned_rise']:+.3f} nats per token (gap {d['gap']:+.3f}; {d['n_flagged']} "
             f"and {d['n_aligned']} answers)"]
    if (r := rng("resampled")) is not None:
        parts.append(f"directions from bootstrap draws of its own answers: gap {r}")
    if (c := rng("control")) is not None:
        parts.append(f"random directions: gap {c}")
    return "; ".join(parts)


def cosine_null_table(observed: dict[str, torch.Tensor], nulls: dict[str, torch.Tensor]) -> pd.DataFrame:
    """For every pair of datasets: the cosine of their directions ([d] each), where it falls among the cosines
    of their label-shuffled directions ([n_draws, d] each, draw i against draw i), and the null's 95th percentile."""
    from .stats import null_percentile

    names = list(observed)
    recs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            null = torch.nn.functional.cosine_similarity(nulls[a].float(), nulls[b].float(), dim=1)  # [n_draws]
            cos = _cos(observed[a], observed[b])
            draws = null.tolist()
            recs.append({"pair": f"{a} / {b}", "cosine": cos, "null_mean": float(null.mean()),
                         "null_p95": float(torch.quantile(null, 0.95)), "percentile": null_percentile(cos, draws),
                         "n_draws": len(draws)})
    return pd.DataFrame(recs)


# =========================================================================== save / load
def save_direction(path: str | Path, direction: torch.Tensor, *, source: str, model=None,
                   layers: Sequence[int] | None = None, counts: dict | None = None,
                   extra: dict | None = None) -> Path:
    """Write a direction ([n_layers, d] or [d]) as safetensors, metadata as JSON in the header (atomic).

    Metadata: format, source (free text, e.g. "mean-diff medical rank-1 seed0"), model fingerprint and name
    (from ``model.emlib_info``), shape, layers (which layer each row belongs to), counts, created, extra.
    """
    from safetensors.torch import save

    from . import __version__

    path = Path(path)
    t = direction.detach().to("cpu", torch.float32).contiguous()
    if t.ndim not in (1, 2):
        raise DirectionError(f"A direction is [d] or [n_layers, d], got shape {tuple(t.shape)}.")
    if layers is None and t.ndim == 2:
        layers = list(range(t.shape[0]))
    if t.ndim == 2 and len(layers) != t.shape[0]:
        raise DirectionError(f"{len(layers)} layers given for a direction with {t.shape[0]} rows.")
    info = getattr(model, "emlib_info", None) if model is not None else None
    meta = {
        "format": FORMAT, "source": source,
        "model_fingerprint": _fingerprint(model) if model is not None else None,
        "model_name": getattr(info, "name", None),
        "shape": list(t.shape), "layers": [int(i) for i in layers] if layers is not None else None,
        "counts": counts or {}, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "emlib_version": __version__, "extra": extra or {},
    }
    return atomic_write_bytes(path, save({TENSOR_KEY: t}, metadata={"emlib": json.dumps(meta, default=str)}))


_DIRECTION_REMEDY = "delete it and run again (the chapter computes the direction anew) or restore it"


def read_direction_metadata(path: str | Path) -> dict:
    """The JSON metadata of a direction file, without reading the tensor."""
    from .data import open_safetensors

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such direction file.")
    with open_safetensors(path, _DIRECTION_REMEDY) as fh:
        header = fh.metadata() or {}
    if "emlib" not in header:
        raise DirectionError(f"{path} has no emlib metadata: write it with emlib.directions.save_direction.")
    return json.loads(header["emlib"])


def load_direction(path: str | Path, model=None) -> tuple[torch.Tensor, dict]:
    """Read a direction written by :func:`save_direction` -> (tensor float32 CPU, metadata).

    With ``model``: a size mismatch is an error; a different model fingerprint is a warning (a direction
    from one model applied to another is sometimes the point, but rarely by accident).
    """
    from .data import open_safetensors

    meta = read_direction_metadata(path)
    with open_safetensors(path, _DIRECTION_REMEDY) as fh:
        if TENSOR_KEY not in fh.keys():
            raise DirectionError(f"{path} holds no '{TENSOR_KEY}' tensor.")
        t = fh.get_tensor(TENSOR_KEY)
    if model is not None:
        d, n = _hidden_size(model), n_layers(model)
        if t.shape[-1] != d or (t.ndim == 2 and t.shape[0] != n):
            raise DirectionError(f"{path} holds a direction of shape {tuple(t.shape)}, but the model has {n} "
                                 f"layers of size {d}: it was computed on a different architecture.")
        fp = _fingerprint(model)
        if meta.get("model_fingerprint") and fp and meta["model_fingerprint"] != fp:
            warnings.warn(f"{path} was computed on model {meta['model_fingerprint']} "
                          f"({meta.get('model_name')}), not on this one ({fp}).", stacklevel=2)
    return t, meta


# =========================================================================== steering and ablation
def steering_vector(model, direction: torch.Tensor, layer: int, scale: float, *, relative: bool = False,
                    reference_norm: float | None = None, normalize: bool = True) -> torch.Tensor:
    """Exactly the [d] vector :func:`steering` adds at ``layer`` (float32, on the model's device).

    ``normalize`` (default): ``scale * unit(direction)``, so ``scale`` is the added L2 norm. ``relative``:
    ``scale`` is a fraction of ``reference_norm`` (the mean residual norm at ``layer``, from
    :func:`residual_norm`). ``normalize=False``: ``scale * direction`` as given.
    """
    v = _as_vector(model, direction, layer).detach().float()
    if relative:
        if reference_norm is None:
            raise DirectionError("relative=True needs reference_norm=residual_norm(model, tok, prompts, layer).")
        if not normalize:
            raise DirectionError("relative=True sets the added norm, so it needs normalize=True.")
        scale = float(scale) * float(reference_norm)
    v = _unit(v) if normalize else v
    return (float(scale) * v).to(_device(model))


def steering(model, direction: torch.Tensor, layer: int, scale: float, relative: bool = False, *,
             reference_norm: float | None = None, normalize: bool = True) -> ContextManager:
    """``with steering(model, v, layer, scale): ...`` adds :func:`steering_vector` to the output of ``layer``
    at every position (prompt and generated tokens), via :func:`emlib.hooks.add_vector`.

    ``direction``: [d] or [n_layers, d] (the row at ``layer`` is used). Works on peft models. For
    ``emlib.generate.sample_answers`` pass ``intervention=lambda: steering(...)`` (a fresh one per batch).
    """
    vec = steering_vector(model, direction, layer, scale, relative=relative, reference_norm=reference_norm,
                          normalize=normalize)
    return hooks.add_vector(model, layer, vec, 1.0)


def steer_each(model, direction: torch.Tensor, layer: int, scales: Sequence[float], *, relative: bool = False,
               reference_norm: float | None = None, normalize: bool = True) -> PerRow:
    """:func:`steer` at every scale, sampled together: one :class:`emlib.generate.PerRow` whose row j gets its
    condition's :func:`steering_vector` added at ``layer`` (:func:`emlib.hooks.add_rows`, the same sum as
    :func:`emlib.hooks.add_vector`). Labels are :func:`steer`'s, so answers are cached under the same keys;
    ``names`` are the scales (``f"{scale:g}"``)."""
    idx = check_layer(model, layer)
    kw = dict(relative=relative, reference_norm=reference_norm, normalize=normalize)
    labels = [steer(model, direction, layer, float(s), **kw).label for s in scales]
    table = torch.stack([steering_vector(model, direction, idx, float(s), **kw) for s in scales])  # [scales, d]
    return _per_row(labels, [f"{float(s):g}" for s in scales], table, lambda rows: hooks.add_rows(model, idx, rows))


def _per_row(labels: Sequence[str], names: Sequence[str], table: torch.Tensor,
             enter: Callable[[torch.Tensor], ContextManager]) -> PerRow:
    """A :class:`emlib.generate.PerRow` whose batch gets ``enter(rows)``: ``rows`` [b, d] holds, for each row of
    the batch, the row of ``table`` [conditions, d] of that row's condition (the ``*_each`` builders). Two
    conditions with one label (the same direction, scale or vector under two names) are refused by
    :class:`emlib.generate.PerRow`, which names both."""
    def make(conditions: list[int]) -> ContextManager:
        return enter(table[torch.tensor(conditions, device=table.device)])

    return PerRow(tuple(labels), make, tuple(names))


def ablation(model, direction: torch.Tensor, layers: int | Iterable[int] | None = None, *,
             source_layer: int | None = None) -> ContextManager:
    """``with ablation(model, v): ...`` projects the direction out of the output of ``layers`` (None: all).

    ``direction`` [d]: the same direction at every listed layer. [n_layers, d]: each layer loses its own row,
    or, with ``source_layer``, the row of that layer everywhere (the paper ablates one layer's direction).
    Built on :func:`emlib.hooks.ablate_direction`.
    """
    idxs = hooks.layer_indices(model, layers)
    if direction.ndim == 1 or source_layer is not None:
        v = _as_vector(model, direction, source_layer if source_layer is not None else 0)
        _unit(v)  # a zero vector is an error, not a silent no-op
        return hooks.ablate_direction(model, v.float().to(_device(model)), idxs)
    _as_vector(model, direction, 0)  # shape check
    for i in idxs:
        _unit(direction[i])
    return hooks.combine(*[hooks.ablate_direction(model, direction[i].float().to(_device(model)), [i])
                           for i in idxs])


def tensor_tag(v: torch.Tensor) -> str:
    """A short content hash of a tensor (:func:`emlib.cache.tensor_hash`): the part of an intervention's label
    that changes whenever the direction does."""
    return tensor_hash({"v": v.detach()}, 10)


def steer(model, direction: torch.Tensor, layer: int, scale: float, *, relative: bool = False,
          reference_norm: float | None = None, normalize: bool = True) -> Intervention:
    """:func:`steering` as a labelled :class:`emlib.generate.Intervention` for ``sample_answers`` /
    ``Experiment.answers``: the label (a cache key part) names the direction's content, the layer and the
    scale, so no notebook builds a key by hand."""
    kind = "rel" if relative else ("x" if normalize else "raw")
    label = f"steer-{tensor_tag(direction)}-L{layer}-{kind}{scale:g}"
    if relative and reference_norm is not None:
        label += f"-ref{reference_norm:.6g}"
    if scale == 0:  # adds a zero vector: the unsteered model's answers (chapter 1's chat model), not new ones
        label = NO_INTERVENTION
    return Intervention(label, lambda: steering(model, direction, layer, scale, relative=relative,
                                                reference_norm=reference_norm, normalize=normalize))


def add_trained(model, sv) -> Intervention:
    """A trained steering vector (:class:`emlib.vectors.SteeringVector`) added to ``model`` as a labelled
    :class:`emlib.generate.Intervention` (label: the vector's content, layer and alpha)."""
    return Intervention(f"vector-{tensor_tag(sv.vector)}-L{sv.layer}-a{sv.alpha:g}", lambda: sv.apply(model))


def add_trained_each(model, vectors: dict[str, object]) -> PerRow:
    """Trained steering vectors (:class:`emlib.vectors.SteeringVector`, all at one layer) sampled together:
    one :class:`emlib.generate.PerRow` whose row j gets its condition's ``alpha * vector`` added
    (:func:`emlib.hooks.add_rows`, the same sum as ``SteeringVector.apply``), labelled as :func:`add_trained`
    labels each (the same cache keys). ``None`` is the unsteered model (label ``"none"``)."""
    layers = {sv.layer for sv in vectors.values() if sv is not None}
    if len(layers) > 1:
        raise DirectionError(f"add_trained_each adds every vector at one layer; these sit at layers {sorted(layers)}.")
    layer = layers.pop() if layers else 0
    d, dev = _hidden_size(model), _device(model)
    labels, rows = [], []
    for sv in vectors.values():
        labels.append(NO_INTERVENTION if sv is None else add_trained(model, sv).label)
        rows.append(torch.zeros(d, device=dev) if sv is None else
                    sv.effective.detach().to(dev).float())  # alpha * vector: what SteeringVector.apply adds
    return _per_row(labels, list(vectors), torch.stack(rows), lambda rows: hooks.add_rows(model, layer, rows))


def ablate(model, direction: torch.Tensor, layers: int | Iterable[int] | None = None, *,
           source_layer: int | None = None) -> Intervention:
    """:func:`ablation` as a labelled :class:`emlib.generate.Intervention` (label: the direction's content,
    the layers, the source layer)."""
    where = "all" if layers is None else (str(layers) if isinstance(layers, int) else ",".join(map(str, layers)))
    label = f"ablate-{tensor_tag(direction)}-L{where}" + (f"-src{source_layer}" if source_layer is not None else "")
    return Intervention(label, lambda: ablation(model, direction, layers, source_layer=source_layer))


def ablate_each(model, directions: dict[str, torch.Tensor | None], layers: int | Iterable[int] | None = None, *,
                source_layer: int | None = None) -> PerRow:
    """Every named direction ablated, as :func:`ablate` would (same labels, so the same cached answers), but
    sampled together: one :class:`emlib.generate.PerRow` whose batches mix the conditions, each row losing
    its own direction (:func:`emlib.hooks.ablate_rows`). ``None`` is the no-ablation condition (label
    ``"none"``, as an answer sampled without intervention). A direction is [d], or [n_layers, d] with
    ``source_layer`` (the row ablated at every layer); names are kept for display (``PerRow.names``)."""
    idxs = hooks.layer_indices(model, layers)
    labels, units = [], []
    for name, direction in directions.items():
        if direction is None:
            labels.append(NO_INTERVENTION)
            units.append(torch.zeros(_hidden_size(model)))
            continue
        if direction.ndim == 2 and source_layer is None:
            raise DirectionError(f"ablate_each: {name!r} has one row per layer; pass a [d] direction or "
                                 "source_layer=... (one direction per condition and row of the batch).")
        units.append(_unit(_as_vector(model, direction, source_layer if source_layer is not None else 0)).float().cpu())
        labels.append(ablate(model, direction, layers, source_layer=source_layer).label)
    table = torch.stack(units).to(_device(model))  # [conditions, d]
    return _per_row(labels, list(directions), table, lambda rows: hooks.ablate_rows(model, rows, idxs))


def random_direction_like(v: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A Gaussian random direction with the same shape and norm as ``v`` (per row for [n_layers, d]): the
    control for steering and ablation. Same dtype and device as ``v``; deterministic for a seed."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    r = torch.randn(tuple(v.shape), generator=g, dtype=torch.float32)
    target = v.detach().float().cpu().norm(dim=-1, keepdim=True)
    r = r / r.norm(dim=-1, keepdim=True) * target
    return r.to(device=v.device, dtype=v.dtype)


@torch.no_grad()
@timed("activations")
def residual_norm(model, tok, prompts: Sequence[str], layer: int, *, batch_size: int = 8,
                  skip_first: bool = True) -> float:
    """Mean L2 norm of the hidden state at the output of ``layer`` over the tokens of chat-templated
    ``prompts`` (the scale that ``relative=True`` steering is a fraction of).

    ``skip_first`` leaves out each prompt's first token, whose norm is often an outlier ("attention sink").
    """
    idx = check_layer(model, layer)
    if isinstance(prompts, str):
        prompts = [prompts]
    device = _device(model)
    total, count = 0.0, 0
    for s in range(0, len(prompts), batch_size):
        enc = encode_prompts(tok, prompts[s:s + batch_size], device)
        mask = enc["attention_mask"].float()  # [b, s], left-padded
        if skip_first:
            first = mask.argmax(dim=1)  # index of each row's first real token
            mask[torch.arange(mask.shape[0], device=device), first] = 0.0

        def norms(h: torch.Tensor, mask=mask) -> torch.Tensor:  # [b, s, d] -> [b]
            return (h.float().norm(dim=-1) * mask).sum(1)

        total += float(_read_layers(model, enc, [idx], norms).sum())
        count += int(mask.sum())
    if count == 0:
        raise DirectionError("No tokens to measure: the prompts are empty (or only one token with skip_first).")
    return total / count


# =========================================================================== nnsight steering
@torch.no_grad()
def steered_logits(model, tok, prompts: Sequence[str], direction: torch.Tensor | None, layer: int,
                   scale: float, *, relative: bool = False, reference_norm: float | None = None,
                   normalize: bool = True) -> torch.Tensor:
    """Logits [b, s, vocab] of the chat-templated prompts with the steering vector added at ``layer``,
    implemented with nnsight (the reference implementation is :func:`steering` + a plain forward)."""
    idx = check_layer(model, layer)
    enc = encode_prompts(tok, prompts, _device(model))
    vec = None if direction is None else steering_vector(
        model, direction, idx, scale, relative=relative, reference_norm=reference_norm, normalize=normalize)
    nn = _nnsight(model)
    (env,) = _layer_envoys(nn, model, [idx])
    with nn.trace(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]):
        if vec is not None:
            h = _hidden_of(env.output)
            h[:] += vec.to(device=h.device, dtype=h.dtype)
        logits = nn.output.logits.save()
    return logits


def _generation_kwargs(tok, max_new_tokens: int, temperature: float, top_p: float, extra: dict) -> dict:
    kw = dict(max_new_tokens=int(max_new_tokens), pad_token_id=tok.pad_token_id)
    if temperature and temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    kw.update(extra)
    return kw


@torch.no_grad()
def _generate_ids(model, enc: dict, vec: torch.Tensor | None, layer: int, seed: int, gen: dict,
                  engine: str) -> torch.Tensor:
    """Generated ids [b, s + new] with ``vec`` added at ``layer`` on every forward (None: unsteered); ``vec``
    [b, d] adds row i's vector to row i (``engine="hooks"`` only: :func:`emlib.hooks.add_rows`)."""
    with eval_mode(model), _seeded(seed, _device(model)):
        if vec is None:
            return model.generate(**enc, **gen)
        if engine == "hooks":
            steer = hooks.add_rows(model, layer, vec) if vec.ndim == 2 else hooks.add_vector(model, layer, vec, 1.0)
            with steer:
                return model.generate(**enc, **gen)
        if engine != "nnsight":
            raise DirectionError(f"engine must be 'nnsight' or 'hooks', got {engine!r}.")
        box: dict = {}

        def run(**kw):  # the traced call keeps its own output: nothing needs to follow the open loop
            box["ids"] = model.generate(**kw)
            return box["ids"]

        nn = _nnsight(model)
        (env,) = _layer_envoys(nn, model, [layer])
        with warnings.catch_warnings():
            # the open loop below ends when generation does; nnsight reports the step it waited for
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with nn.trace(fn=run, **enc, **gen) as tracer:
                for _step in tracer.all():  # prompt forward, then one forward per new token
                    h = _hidden_of(env.output)
                    h[:] += vec.to(device=h.device, dtype=h.dtype)
        return box["ids"]


@timed("sample")
def generate_steered(model, tok, prompts: Sequence[str], direction: torch.Tensor | None = None, layer: int = 0,
                     scale: float = 0.0, *, max_new_tokens: int = 64, seed: int = 0, temperature: float = 1.0,
                     top_p: float = 1.0, relative: bool = False, reference_norm: float | None = None,
                     normalize: bool = True, engine: str = "nnsight", skip_special_tokens: bool = True,
                     **generate_kwargs) -> list[str]:
    """Sample answers to chat-templated ``prompts`` with the steering vector added at ``layer`` on every
    forward of the generation (prompt and new tokens); ``direction=None`` generates unsteered.

    ``engine="nnsight"`` (default) steers inside an nnsight trace of ``model.generate``; ``engine="hooks"``
    uses :func:`steering` (plain forward hooks). Both give identical tokens for the same seed. The RNG is
    seeded with ``seed`` for the call (the caller's RNG state is restored). ``temperature=0`` is greedy.
    """
    idx = check_layer(model, layer)
    enc = encode_prompts(tok, prompts, _device(model))
    vec = None if direction is None else steering_vector(
        model, direction, idx, scale, relative=relative, reference_norm=reference_norm, normalize=normalize)
    gen = _generation_kwargs(tok, max_new_tokens, temperature, top_p, generate_kwargs)
    ids = _generate_ids(model, enc, vec, idx, seed, gen, engine)
    new = ids[:, enc["input_ids"].shape[1]:]
    return [tok.decode(row, skip_special_tokens=skip_special_tokens) for row in new]


@timed("sample")
def generate_per_row(model, tok, prompt: str, vectors: torch.Tensor, layer: int, *, max_new_tokens: int = 64,
                     seed: int = 0, temperature: float = 1.0, top_p: float = 1.0, skip_special_tokens: bool = True,
                     **generate_kwargs) -> list[str]:
    """One prompt answered once per steering vector, all in one batch of generation: row i has ``vectors[i]``
    ([n, d], e.g. :func:`steering_vector` at several scales) added at the output of ``layer`` on every forward
    (:func:`emlib.hooks.add_rows`). One generation instead of n: the rows share one seeded random stream, so a
    sampled row is not the answer :func:`generate_steered` gives for that vector alone (greedy rows are).

    On a GPU (and with no extra ``generate`` arguments) the rows go through the fast sampler
    (:mod:`emlib.fastgen`: static KV cache, CUDA graphs, the same sampling distribution), which answers a few
    rows of 600 tokens in seconds where ``generate`` is bound by kernel launches; elsewhere ``generate``."""
    idx = check_layer(model, layer)
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise DirectionError(f"generate_per_row takes vectors [n, d] with n >= 1; got {tuple(vectors.shape)}.")
    from .experiment import sampler_for
    from .generate import SamplingParams, hf_sampler, render_prompt

    sampler = sampler_for(model)
    if sampler is not hf_sampler and not generate_kwargs and skip_special_tokens:
        with eval_mode(model), hooks.add_rows(model, idx, vectors.to(_device(model))):
            gens = sampler(model, tok, [render_prompt(tok, prompt)] * vectors.shape[0],
                           [int(seed) + i for i in range(vectors.shape[0])],
                           SamplingParams(int(max_new_tokens), float(temperature or 0.0), float(top_p)))
        return [g.text for g in gens]
    enc = encode_prompts(tok, [prompt] * vectors.shape[0], _device(model))
    gen = _generation_kwargs(tok, max_new_tokens, temperature, top_p, generate_kwargs)
    ids = _generate_ids(model, enc, vectors.to(_device(model)), idx, seed, gen, "hooks")
    new = ids[:, enc["input_ids"].shape[1]:]
    return [tok.decode(row, skip_special_tokens=skip_special_tokens) for row in new]


# =========================================================================== convergence
def _layer_row(v: torch.Tensor, layer: int | None, name: str) -> torch.Tensor:
    if v.ndim == 1:
        return v.float().cpu()
    if v.ndim != 2:
        raise DirectionError(f"{name}: expected [d] or [n_layers, d], got shape {tuple(v.shape)}.")
    if layer is None:
        raise DirectionError(f"{name} has one row per layer: pass layer=... to cosine_matrix.")
    if not -v.shape[0] <= layer < v.shape[0]:
        raise DirectionError(f"Layer {layer} is out of range for {name}, which has {v.shape[0]} layers.")
    return v[layer].float().cpu()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1))


def cosine_matrix(directions: dict[str, torch.Tensor], layer: int | None = None) -> pd.DataFrame:
    """Pairwise cosine similarity of named directions at ``layer`` -> square DataFrame (names x names).

    Each direction is [n_layers, d] (its row at ``layer`` is used) or [d] (used as is, e.g. a LoRA B column
    or a trained steering vector). The sign of a LoRA B column is arbitrary (A can flip with it).
    """
    if not directions:
        raise DirectionError("No directions given.")
    rows = {k: _layer_row(v, layer, k) for k, v in directions.items()}
    dims = {k: r.shape[0] for k, r in rows.items()}
    if len(set(dims.values())) > 1:
        raise DirectionError(f"Directions have different sizes {dims}: they come from different models.")
    names = list(rows)
    mat = [[_cos(rows[a], rows[b]) for b in names] for a in names]
    return pd.DataFrame(mat, index=pd.Index(names, name="a"), columns=pd.Index(names, name="b"))


def layerwise_cosine(a: torch.Tensor, b: torch.Tensor) -> pd.DataFrame:
    """Cosine similarity of two [n_layers, d] directions layer by layer -> DataFrame(layer, cosine)."""
    if a.ndim != 2 or a.shape != b.shape:
        raise DirectionError(f"layerwise_cosine needs two [n_layers, d] tensors of the same shape, got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}.")
    cos = torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1)  # [n_layers]
    return pd.DataFrame({"layer": range(a.shape[0]), "cosine": cos.tolist()})


def _single_lora_b(peft_model, module: str) -> LoraModule:
    """The one LoRA module (of the active adapters) on modules called ``module``; it must be rank 1."""
    found = [m for m in lora_modules(peft_model) if m.name.split(".")[-1] == module]
    if len(found) != 1:
        names = [f"{m.name}[{m.adapter}]" for m in found]
        raise DirectionError(f"Expected exactly one LoRA on a '{module}' module, found {len(found)}"
                             f"{': ' + ', '.join(names[:6]) if names else ''}. lora_b_direction reads rank-1 "
                             "single-module adapters (the paper's layer-24 down_proj adapter).")
    w = found[0].B
    if w.ndim != 2 or w.shape[1] != 1:
        raise DirectionError(f"{found[0].name} has rank {w.shape[1]}, not 1: a rank-r adapter writes an "
                             "r-dimensional subspace, not one direction.")
    return found[0]


def lora_b_direction(peft_model, module: str = "down_proj") -> torch.Tensor:
    """The B column of the single rank-1 LoRA on ``module`` -> [d] (float32, CPU): the direction a rank-1
    down_proj adapter writes into the residual stream (at the output of its layer). Errors unless exactly
    one such rank-1 module exists. Its sign is arbitrary (A and B can flip together)."""
    return _single_lora_b(peft_model, module).B[:, 0].detach().float().cpu()


def lora_b_layer(peft_model, module: str = "down_proj") -> int:
    """The decoder layer index of the single LoRA that :func:`lora_b_direction` reads."""
    target = _single_lora_b(peft_model, module).module
    for i, blk in enumerate(decoder_layers(peft_model)):
        if any(sub is target for sub in blk.modules()):
            return i
    raise DirectionError("The LoRA module sits outside the decoder layers.")


__all__ = [
    "DirectionError", "encode_prompts", "answer_activations", "mean_difference", "split_judged", "group_counts",
    "mean_diff_direction", "twin_direction", "save_direction", "load_direction", "read_direction_metadata",
    "steering_vector", "steering", "ablation", "random_direction_like", "residual_norm", "steered_logits",
    "generate_steered", "cosine_matrix", "layerwise_cosine", "lora_b_direction", "lora_b_layer",
]
