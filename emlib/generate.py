"""Sampling answers to evaluation questions: batched, seeded, optionally steered, cached per answer.

:func:`sample_answers` is the entry point. It renders each question with the tokenizer's chat template
(with the question's ``system`` prompt when the frame has one), looks every (prompt, sample index) up in
the cache, and sends only the missing ones to a *sampler* in batches, writing each batch to the cache as
soon as it is done. The sampler is a plain function (:data:`Sampler`); :func:`hf_sampler` uses
Hugging Face ``generate`` with left padding. A faster GPU sampler can replace it without touching the
rest (its ``sampler_id`` goes into the cache key).

Seeds: every answer gets its own seed derived from ``(seed, prompt, sample index, ...)``. The HF sampler
cannot seed rows of a batch separately, so it seeds the whole batch from its rows' seeds: a call is
exactly reproducible for a seed and batch size, and a resumed run is a valid, seeded sample too.
"""
from __future__ import annotations

import hashlib
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Protocol, Sequence

import pandas as pd
import torch

from .chat import chat_text
from .cache import Claims, ResultCache, adapter_hash, as_cache, make_key, model_fingerprint
from .timing import timed

ANSWERS_TABLE = "answers"
RESERVED = ("question_id", "question", "sample", "answer", "n_tokens", "finished", "model", "adapter",
            "intervention", "seed")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 600
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0


@dataclass(frozen=True)
class Generation:
    text: str
    n_tokens: int  # generated tokens before the end-of-turn token
    finished: bool  # True when the model ended its turn within max_new_tokens


class Sampler(Protocol):
    """``sampler(model, tok, prompts, seeds, params) -> generations`` (one per prompt, same order).

    ``prompts`` are fully rendered chat strings (template applied, generation prompt appended);
    ``seeds`` one int per prompt. Set a ``sampler_id`` attribute: it is part of the cache key.
    """

    def __call__(self, model, tok, prompts: list[str], seeds: list[int],
                 params: SamplingParams) -> list[Generation]: ...


@dataclass(frozen=True)
class Intervention:
    """A labelled intervention: ``make()`` returns a context manager entered around generation.

    Example: ``Intervention("add L10 x8 general", lambda: hooks.add_vector(model, 10, v, 8.0))``.
    The label goes into the cache key, so it must change whenever the intervention does.
    """

    label: str
    make: Callable[[], ContextManager]

    def __call__(self) -> ContextManager:
        return self.make()


@dataclass(frozen=True)
class PerRow:
    """Several labelled interventions sampled in the same batches, one per row: ``make(conditions)`` returns
    the context manager for a batch whose row j belongs to condition ``conditions[j]`` (an index into
    ``labels``), e.g. :func:`emlib.hooks.ablate_rows` with row j's direction. Each condition's answers keep the
    cache key that the same intervention alone gets (its label), so either way of sampling finds the other's
    answers; ``names`` (optional, same order) are what a caller shows for each label.

    Built by :func:`emlib.directions.ablate_each`; :func:`sample_answers` returns every condition's rows, the
    ``intervention`` column saying which."""

    labels: tuple[str, ...]
    make: Callable[[list[int]], ContextManager]
    names: tuple[str, ...] | None = None

    def __post_init__(self):
        if not self.labels or any(not lab for lab in self.labels):
            raise ValueError("PerRow needs at least one condition, each with a non-empty label.")
        if self.names is not None and len(self.names) != len(self.labels):
            raise ValueError(f"PerRow got {len(self.names)} names for {len(self.labels)} labels.")
        if len(set(self.labels)) != len(self.labels):
            again = next(i for i, lab in enumerate(self.labels) if lab in self.labels[:i])  # its second coming
            first = self.labels.index(self.labels[again])
            msg = f"PerRow's labels must differ (they are cache keys): {self.labels[first]!r} comes twice."
            if self.names is not None:  # the *_each builders' conditions: say which two, and what to do
                msg += (f" {self.names[first]!r} and {self.names[again]!r} are the same intervention: pass it once "
                        "and give its answers to both names.")
            raise ValueError(msg)

    def name_of(self) -> dict[str, str]:
        """label -> name (the label itself where no names were given)."""
        return dict(zip(self.labels, self.names or self.labels))


# --------------------------------------------------------------------------- the HF sampler
def end_token_ids(model, tok) -> list[int]:
    """Token ids that end an assistant turn: the generation config's eos, the tokenizer's eos, <|im_end|>."""
    ids: list[int] = []
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    ids += list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tok.unk_token_id and im_end >= 0:
        ids.append(im_end)
    return sorted(set(ids))


def _batch_seed(seeds: Sequence[int]) -> int:
    return int(hashlib.sha256(",".join(map(str, seeds)).encode()).hexdigest()[:15], 16)


@torch.no_grad()
def hf_sampler(model, tok, prompts: list[str], seeds: list[int], params: SamplingParams) -> list[Generation]:
    """Sample with ``model.generate`` on one left-padded batch.

    Pure sampling at ``params.temperature`` / ``top_p``: top-k and repetition penalties from the model's
    generation config are switched off; temperature 0 means greedy decoding.
    """
    device = next(model.parameters()).device
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tok.padding_side = old_side
    ends = end_token_ids(model, tok)
    kwargs = dict(max_new_tokens=params.max_new_tokens, eos_token_id=ends,
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else ends[0])
    # pure sampling as in the paper: override top_k / repetition_penalty that a model's own
    # generation_config may set (Qwen2.5-Instruct ships top_k=20, repetition_penalty=1.05)
    kwargs["repetition_penalty"] = 1.0
    if params.temperature > 0:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(_batch_seed(seeds))
        out = model.generate(**enc, **kwargs)  # [batch, prompt_len + new]
    new = out[:, enc["input_ids"].shape[1]:]
    ends_t = torch.tensor(ends, device=new.device)
    gens = []
    for row in new:
        is_end = torch.isin(row, ends_t)
        n = int(is_end.nonzero()[0, 0]) if bool(is_end.any()) else row.shape[0]
        gens.append(Generation(tok.decode(row[:n], skip_special_tokens=True), n, bool(is_end.any())))
    return gens


hf_sampler.sampler_id = "hf-generate-v2"


# --------------------------------------------------------------------------- rendering
def render_prompt(tok, question: str, system: str | None = None) -> str:
    """The chat-template string the model sees for a question (generation prompt appended)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return chat_text(tok, msgs)


def _question_frame(questions_df: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(questions_df, pd.DataFrame) or "question" not in questions_df.columns:
        raise ValueError("questions_df must be a DataFrame with a 'question' column (and 'id' or "
                         "'question_id'): use emlib.data.load_questions(...).")
    q = questions_df.reset_index(drop=True).copy()
    if "question_id" not in q.columns:
        q = q.rename(columns={"id": "question_id"}) if "id" in q.columns else q.assign(
            question_id=[f"q{i}" for i in range(len(q))])
    if q["question_id"].duplicated().any():
        dup = q.loc[q["question_id"].duplicated(), "question_id"].iloc[0]
        raise ValueError(f"questions_df has duplicate question ids (e.g. {dup!r}): ids must be unique.")
    if "system" not in q.columns:
        q["system"] = None
    return q


NO_INTERVENTION = "none"  # the label (a cache key part) of answers sampled without an intervention, and of any
# intervention that changes nothing (a zero steering scale, a zero ablation row): they share those answers


def _intervention_label(intervention, intervention_label: str | None) -> str:
    if intervention is None:
        if intervention_label not in (None, NO_INTERVENTION):
            raise ValueError("intervention_label was given without an intervention.")
        return NO_INTERVENTION
    label = intervention_label or getattr(intervention, "label", None)
    if not label:
        raise ValueError("An intervention needs a label (it goes into the cache key): pass "
                         "intervention_label='...' or use emlib.generate.Intervention(label, make).")
    if not callable(intervention):
        raise TypeError("intervention must be a zero-argument callable returning a context manager, e.g. "
                        "lambda: emlib.hooks.add_vector(model, layer, v, 8.0).")
    return str(label)


def _model_name(model) -> str:
    info = getattr(model, "emlib_info", None)
    if info is not None:
        return info.name
    cfg = getattr(model, "config", None)
    return getattr(cfg, "name_or_path", None) or type(model).__name__


# --------------------------------------------------------------------------- entry point
CLAIM_POLL_S = 0.5  # how often answers another process is sampling are looked for in the cache


@timed("sample")
def sample_answers(model, tok, questions_df: pd.DataFrame, n_samples: int, *, max_new_tokens: int = 600,
                   temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 32, seed: int = 0,
                   intervention: Callable[[], ContextManager] | None = None,
                   intervention_label: str | None = None, labels: dict | None = None,
                   cache: ResultCache | str | None = None, sampler: Sampler = hf_sampler,
                   progress: bool | None = None) -> pd.DataFrame:
    """``n_samples`` answers per question -> a tidy DataFrame, one row per answer.

    Columns: question_id, question, sample, answer, n_tokens, finished, model, adapter, intervention,
    seed, the other columns of ``questions_df`` (set, domain, system, ...), then ``labels`` as
    constant columns (labels describe the run; they are not part of the cache key).

    ``intervention``: a zero-argument callable returning a context manager entered around each batch's
    generation (e.g. ``lambda: emlib.hooks.add_vector(model, 10, v, 8.0)``), labelled by
    ``intervention_label`` (or an :class:`Intervention`); or a :class:`PerRow`: every one of its conditions
    is sampled (``n_samples`` per question each), in batches that mix them, one row per condition's
    intervention. ``cache``: a :class:`ResultCache` or path; answers already there are reused, new ones are
    written after every batch, and answers another process is sampling into the same cache at that moment are
    waited for and read, not sampled again (:class:`emlib.cache.Claims`; in a run of record chapters 1-3 ask
    for some of the same answers at once).
    """
    from tqdm.auto import tqdm

    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1 (got {n_samples}, {batch_size}).")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    labels = dict(labels or {})
    q = _question_frame(questions_df)
    clash = sorted((set(labels) & (set(RESERVED) | set(q.columns))) | (set(RESERVED[2:]) & set(q.columns)))
    if clash:
        raise ValueError(f"Column name(s) {clash} of labels/questions_df clash with answer columns: rename them.")
    per_row = isinstance(intervention, PerRow)
    if per_row and intervention_label is not None:
        raise ValueError("A PerRow intervention carries its own labels: leave intervention_label out.")
    labels_of = list(intervention.labels) if per_row else [_intervention_label(intervention, intervention_label)]
    cache = as_cache(cache)
    params = SamplingParams(int(max_new_tokens), float(temperature), float(top_p))
    fingerprint = model_fingerprint(model)
    adapter = adapter_hash(model) or "none"
    sampler_id = getattr(sampler, "sampler_id", getattr(sampler, "__name__", type(sampler).__name__))

    prompts = {}
    for i, row in q.iterrows():
        system = row["system"] if isinstance(row["system"], str) and row["system"] else None
        prompts[i] = render_prompt(tok, str(row["question"]), system)
    items = []  # one per (condition, question, sample)
    for c, label in enumerate(labels_of):
        for i, prompt in prompts.items():
            for k in range(n_samples):
                key = make_key(kind="answer", model=fingerprint, prompt=prompt,
                               max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                               top_p=params.top_p, seed=int(seed), sample=k, intervention=label, sampler=sampler_id)
                items.append({"c": c, "i": i, "sample": k, "prompt": prompt, "key": key,
                              "item_seed": int(key[:15], 16)})

    found = cache.get_many(ANSWERS_TABLE, [it["key"] for it in items]) if cache is not None else {}
    results: dict[str, dict] = dict(found)
    todo = [it for it in items if it["key"] not in results]
    bar = tqdm(total=len(todo), desc="sampling", unit="answer",
               disable=(not todo) if progress is None else not progress)
    ctx = intervention if intervention is not None else nullcontext

    def sample(part: list[dict]) -> None:
        for s in range(0, len(part), batch_size):
            batch = part[s:s + batch_size]
            with intervention.make([b["c"] for b in batch]) if per_row else ctx():
                gens = sampler(model, tok, [b["prompt"] for b in batch], [b["item_seed"] for b in batch], params)
            if len(gens) != len(batch):
                raise RuntimeError(f"The sampler returned {len(gens)} generations for {len(batch)} prompts.")
            new = {b["key"]: {"answer": g.text, "n_tokens": int(g.n_tokens), "finished": bool(g.finished),
                              "question_id": str(q.at[b["i"], "question_id"]), "sample": b["sample"],
                              "model": fingerprint, "intervention": labels_of[b["c"]], "seed": int(seed)}
                   for b, g in zip(batch, gens)}
            if cache is not None:
                cache.put_many(ANSWERS_TABLE, new)
            results.update(new)
            bar.update(len(batch))

    was_training = model.training
    model.eval()
    claims = Claims.of(cache) if todo else None
    try:
        while todo:  # what another process is sampling into the same cache is waited for, then read
            mine = claims.claim(it["key"] for it in todo) if claims else {it["key"] for it in todo}
            sample([it for it in todo if it["key"] in mine])
            if claims:
                claims.release()
            todo = [it for it in todo if it["key"] not in results]
            if todo:
                time.sleep(CLAIM_POLL_S)
                done = cache.get_many(ANSWERS_TABLE, [it["key"] for it in todo])
                results.update(done)
                bar.update(len(done))
                todo = [it for it in todo if it["key"] not in results]
    finally:
        bar.close()
        model.train(was_training)
        if claims:
            claims.close()

    name = _model_name(model)
    recs = []
    extra = [c for c in q.columns if c not in ("question_id", "question")]
    for it in items:
        r = results[it["key"]]
        row = q.loc[it["i"]]
        rec = {"question_id": row["question_id"], "question": row["question"], "sample": it["sample"],
               "answer": r["answer"], "n_tokens": r["n_tokens"], "finished": r["finished"], "model": name,
               "adapter": adapter, "intervention": labels_of[it["c"]], "seed": int(seed)}
        rec.update({c: row[c] for c in extra})
        rec.update(labels)
        recs.append(rec)
    return pd.DataFrame(recs)
