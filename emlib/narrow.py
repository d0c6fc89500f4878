"""Chapter 3's measurements of a narrow solution: out-of-domain KL on held-out rows, how much of the task it
learned, which lambda gives "the" narrow solution, and how far drift and mixing move towards the general one.

A narrow solution only means something if it learned the task: a zero vector has zero KL. So for every lambda
of the sweep we measure

* ``heldout_kl``: per-token KL(chat model || solution) on out-of-domain rows the penalty never saw (and
  ``train_kl`` on the rows it trained on, to show the difference),
* ``loss``: the responses-only loss on in-domain training rows, and ``learned_share`` =
  (base loss - loss) / (base loss - general solution's loss): the share of the general solution's in-domain
  loss reduction this solution reaches,

and the reported narrow solution is the one with the lowest held-out KL among those with
``learned_share >= MIN_LEARNED_SHARE`` (:func:`choose_narrow`; None when no lambda qualifies, and the chapter
says so). Directions are compared with :func:`cosine_with_general` (|cosine| for LoRA B columns, whose sign is
arbitrary).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import pandas as pd
import torch

from .chapters import CHAPTERS, sweep_scales, train_groups
from .chat import response_loss
from .timing import timed
from .train import kl_to_reference

MIN_LEARNED_SHARE = 0.8  # a narrow solution must keep 80% of the general solution's in-domain loss reduction


def solution_metrics(model, tok, *, loss_rows: list[dict], kl_train_rows: list[dict], kl_heldout_rows: list[dict],
                     vector=None, max_length: int = 512, batch_size: int = 8) -> dict[str, float]:
    """Held-out and training KL to the chat model and in-domain loss of one solution: a LoRA adapter active
    on ``model`` (peft), or ``vector`` (a trained steering vector) added to ``model``. ``batch_size``: rows per
    forward of the loss and the KL (any size: :func:`emlib.chat.response_loss` and
    :func:`emlib.train.kl_to_reference` compute logits only where needed, in chunks)."""
    ctx = vector.apply(model) if vector is not None else nullcontext()
    with ctx:
        loss = response_loss(model, tok, loss_rows, batch_size=batch_size, max_length=max_length)
    kw = dict(vector=vector, max_length=max_length, batch_size=batch_size)
    return {"heldout_kl": kl_to_reference(model, tok, kl_heldout_rows, **kw),
            "train_kl": kl_to_reference(model, tok, kl_train_rows, **kw), "loss": loss}


def learned_shares(frame: pd.DataFrame, base_loss: float) -> pd.Series:
    """``learned_share`` of every row of a sweep frame (columns ``kind``, ``solution``, ``loss``): the share of
    its kind's general solution's loss reduction below ``base_loss`` (NaN where the general one reduced nothing)."""
    general = frame[frame["solution"] == "general"].set_index("kind")["loss"]
    gain = base_loss - frame["kind"].map(general)
    return ((base_loss - frame["loss"]) / gain).where(gain > 0)


def choose_narrow(frame: pd.DataFrame, kind: str, min_share: float = MIN_LEARNED_SHARE) -> pd.Series | None:
    """The narrow solution of ``kind``: the lowest held-out KL among the KL-trained rows (``solution ==
    "narrow"``) whose ``learned_share >= min_share``; None when none qualifies."""
    cand = frame[(frame["kind"] == kind) & (frame["solution"] == "narrow") & (frame["learned_share"] >= min_share)]
    return None if cand.empty else cand.sort_values(["heldout_kl", "kl_scale"]).iloc[0]


def cosine_with_general(vectors: dict[str, torch.Tensor], general: str = "general",
                        sign_free: bool = False) -> dict[str, float]:
    """Cosine of each solution's direction ([d]) with the general solution's; ``sign_free``: |cosine| (LoRA B)."""
    g = vectors[general].float().flatten()
    out = {}
    for name, v in vectors.items():
        if name == general:
            continue
        c = float(torch.nn.functional.cosine_similarity(v.float().flatten(), g, dim=0))
        out[name] = abs(c) if sign_free else c
    return out




FINETUNE_KIND = {"steering vector": ("vector", None), "rank-1 LoRA": ("lora", "rank1")}  # each kind's (kind, shape)
KINDS = tuple(FINETUNE_KIND)


@timed("metrics")
def measure_solutions(exp, dataset: str) -> tuple[pd.DataFrame, dict, dict]:
    """Train (or load) every chapter-3 solution of ``dataset`` and measure it (:func:`solution_metrics`).

    Steering vectors: general, drift, mixed and narrow at every lambda of :func:`sweep_scales`; rank-1 LoRA:
    general and narrow at every lambda. Returns the tidy frame (kind, solution, kl_scale, heldout_kl,
    train_kl, loss, learned_share, chosen), the solutions' directions ``{(kind, solution, kl_scale): [d]}``
    (a vector's ``alpha * v``, a rank-1 adapter's B column) and training logs ``{name: frame}``."""
    from . import vecgroup
    from .directions import lora_b_direction

    c = exp.cfg
    loss_rows = exp.rows(dataset)[: c.n_loss_rows]
    measure = dict(loss_rows=loss_rows, kl_train_rows=exp.kl_rows(), kl_heldout_rows=exp.kl_heldout_rows(),
                   max_length=c.max_length, batch_size=c.metric_batch_size)
    base_loss = response_loss(exp.model, exp.tok, loss_rows, batch_size=c.metric_batch_size, max_length=c.max_length)
    scales = sweep_scales(c.kl_sweep)
    if vecgroup.can_group(exp.model):
        # this chapter's finetunes, those that read the same rows trained together first where not finished
        # (emlib.vecgroup: the frozen layers once; 1.1-1.3x faster than one at a time on 2 CPU cores, 2.6x for
        # the vectors on an H200: bench/README.md), each loaded below
        needs = CHAPTERS["03"].needs([dataset], c.kl_sweep, ())
        for task in train_groups(sorted(needs, key=lambda j: (j.kind, j.solution, j.kl_scale))):
            if len(task) > 1:
                exp.train_group(task)
    # rank-1 first: in a run of record its group ends long before the steering vectors' (89 s against 131 s for
    # SmolLM2 on an H100, 2026-12-07), so measuring it while the vectors still train brings the recorded sweep --
    # which chapters 4-6 and chapter 3's follow-up finetunes wait for -- that much sooner. The frame, directions
    # and logs keep the vectors first.
    lora_recs, lora_dirs, lora_logs = [], {}, {}
    for sol, m in [("general", 1.0)] + [("narrow", m) for m in scales]:
        with exp.lora(dataset, "rank1", sol, kl_scale=m) as res:
            key = ("rank-1 LoRA", sol, m)
            lora_dirs[key] = lora_b_direction(res.model)
            lora_logs[f"rank-1 {sol}" + ("" if m == 1 else f" x{m:g}")] = res.log
            lora_recs.append(dict(zip(("kind", "solution", "kl_scale"), key),
                                  **solution_metrics(res.model, exp.tok, **measure)))
    recs, dirs, logs = [], {}, {}
    for sol, m in [("general", 1.0), ("drift", 1.0), ("mixed", 1.0)] + [("narrow", m) for m in scales]:
        res = exp.vector(dataset, sol, kl_scale=m)
        key = ("steering vector", sol, m)
        dirs[key], logs[f"vector {sol}" + ("" if m == 1 else f" x{m:g}")] = res.vector.effective.detach(), res.log
        recs.append(dict(zip(("kind", "solution", "kl_scale"), key),
                         **solution_metrics(exp.model, exp.tok, vector=res.vector, **measure)))
    recs, dirs, logs = recs + lora_recs, dirs | lora_dirs, logs | lora_logs
    frame = pd.DataFrame(recs).assign(base_loss=base_loss)
    frame["learned_share"] = learned_shares(frame, base_loss)
    frame["chosen"] = False
    for kind in KINDS:
        pick = choose_narrow(frame, kind)
        if pick is not None:
            frame.loc[pick.name, "chosen"] = True
    return frame, dirs, logs


def narrow_scale(frame: pd.DataFrame, kind: str) -> tuple[float, bool]:
    """The lambda multiplier of ``kind``'s reported narrow solution and whether it qualified (learned enough);
    when none qualified, the profile's own lambda (1) is reported, marked not qualified."""
    pick = frame[(frame["kind"] == kind) & frame["chosen"]]
    return (float(pick["kl_scale"].iloc[0]), True) if len(pick) else (1.0, False)


def direction_cosines(frame: pd.DataFrame, dirs: dict) -> pd.DataFrame:
    """Cosine with the general solution's direction of the reported narrow solution and (vectors) of drift and
    mixing: the paper predicts drift and mixing end near the general solution, the narrow one away from it."""
    recs = []
    for kind in KINDS:
        m, _ = narrow_scale(frame, kind)
        sols = {"general": dirs[(kind, "general", 1.0)], "narrow": dirs[(kind, "narrow", m)]}
        sols.update({s: dirs[(kind, s, 1.0)] for s in ("drift", "mixed") if (kind, s, 1.0) in dirs})
        for sol, cos in cosine_with_general(sols, sign_free=kind == "rank-1 LoRA").items():
            recs.append({"kind": kind, "solution": sol, "kl_scale": m if sol == "narrow" else 1.0,
                         "cosine_with_general": cos})
    return pd.DataFrame(recs)


def answers(exp, dataset: str, frame: pd.DataFrame) -> pd.DataFrame:
    """Judged answers to the general and the in-domain questions of every chapter-3 solution (the narrow one at
    its reported lambda, :func:`narrow_scale`) and of the chat model, labelled with condition, solution, kind,
    kl_scale and ``ood_kl`` (the held-out KL of :func:`measure_solutions`)."""
    from .directions import add_trained, add_trained_each
    from .generate import NO_INTERVENTION

    kl_of = frame.set_index(["kind", "solution", "kl_scale"])["heldout_kl"]
    sets = (("general", None), ("in_domain", dataset))
    frames, vectors, labels_of = [], {}, {}
    for sol in ("general", "narrow", "drift", "mixed"):
        m = narrow_scale(frame, "steering vector")[0] if sol == "narrow" else 1.0
        vectors[f"vector {sol}"] = exp.vector(dataset, sol, kl_scale=m).vector
        labels_of[f"vector {sol}"] = dict(solution=sol, kind="steering vector", kl_scale=m,
                                          ood_kl=kl_of[("steering vector", sol, m)])
    vectors["chat model"] = None  # the chat model rides along: the same cache key as unsteered sampling
    labels_of["chat model"] = dict(solution="none", kind="chat model", kl_scale=1.0, ood_kl=0.0)
    # solutions whose vectors are equal (a short run can train two the same: the drift vector's penalty ends
    # before the vector leaves zero) share one label, so one condition: sampled once, its answers each one's
    same: dict[str, list[str]] = {}
    for name, sv in vectors.items():
        label = NO_INTERVENTION if sv is None else add_trained(exp.model, sv).label
        same.setdefault(label, []).append(name)
    each = add_trained_each(exp.model, {names[0]: vectors[names[0]] for names in same.values()})
    aliases = {names[0]: names for names in same.values()}
    for s, d in sets:  # the distinct vectors and the chat model sampled together
        df = exp.answers("vectors", set_name=s, domain=d, intervention=each)
        for name, part in df.groupby(df["intervention"].map(each.name_of()), sort=False):
            frames += [part.assign(condition=alias, **labels_of[alias]) for alias in aliases[name]]
    for sol in ("general", "narrow"):
        m = narrow_scale(frame, "rank-1 LoRA")[0] if sol == "narrow" else 1.0
        labels = dict(solution=sol, kind="rank-1 LoRA", kl_scale=m, ood_kl=kl_of[("rank-1 LoRA", sol, m)])
        with exp.lora(dataset, "rank1", sol, kl_scale=m) as res:
            frames += [exp.answers(f"rank-1 {sol}", model=res.model, set_name=s, domain=d).assign(**labels)
                       for s, d in sets]
    return pd.concat(frames, ignore_index=True)
