"""The distilled judge: a packaged weights folder (checked against ``SHA256SUMS``) loaded into a
:class:`~emlib.judge.scorer.Scorer`, and :class:`DistilledJudge`, the judge behind ``make_judge("distilled")``.

The trained part (head, adapter when there is one, ``meta.json`` with the configuration, the list of training
files and the validation figures) lives in ``emlib/resources/distilled/`` with ``SHA256SUMS``. Training,
cross-validation and packaging are in :mod:`emlib.distill`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..cache import text_hash
from .base import Judge, JudgeScore
from .offline import OfflineJudge
from .scorer import TARGETS, DistillConfig, Scorer, load_trainable, new_scorer

WEIGHTS_FILES = ("head.safetensors", "adapter.safetensors", "meta.json")
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- weights folders
def resource_weights_dir() -> Path:
    return Path(__file__).parents[1] / "resources" / "distilled"


def weights_dir(path: str | Path | None = None) -> Path:
    """Explicit path, else ``$EMLIB_DISTILLED_DIR``, else the packaged weights."""
    p = path or os.environ.get("EMLIB_DISTILLED_DIR")
    return Path(p) if p else resource_weights_dir()


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
    load_trainable(scorer, state)
    scorer.model.eval()
    scorer.head.eval()
    scorer.meta = dict(meta, judge_id=judge_id_of(sums, cfg))
    return scorer


# --------------------------------------------------------------------------- the judge
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
