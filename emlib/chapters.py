"""The chapter contract: what each chapter needs, what it writes, and the rule that turns that into a verdict.

One table, :data:`CHAPTERS`, says per chapter

* the **finetunes** it uses (:func:`finetunes_needed`; :func:`finetunes` is the whole plan, slowest first, that
  ``emlib.record`` trains in parallel before the chapters run),
* the **result keys** it records in ``results.json`` (``Experiment.record``) and the columns each key's records
  carry, and the **tables** (``tables/<name>.csv``) its verdict reads,
* its **claim** and the **verdict rule** (a function of :mod:`emlib.verdicts` taking a :class:`verdicts.Run`).

The notebooks print their verdict with :func:`verdict` (the same rule the results table applies), ``emlib.record``
waits for :func:`finetunes_needed`, ``emlib.rejudge`` rebuilds the judge-dependent tables with :func:`em_tables`,
and a test checks every chapter's ``results.json`` against :func:`check_recorded` after a smoke run.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

SOLUTIONS = ("general", "narrow", "drift", "mixed")  # chapter 3's four trainings (see emlib.experiment)


@dataclass(frozen=True)
class Finetune:
    """One finetune: ``kind`` "lora" (dataset, shape, solution) or "vector" (dataset, solution)."""

    kind: str
    dataset: str
    solution: str
    shape: str | None = None
    kl_scale: float = 1.0  # multiplier of the profile's KL lambda (chapter 3's sweep)
    seed: int | None = None  # training seed; None: the config's (chapters 4-5 repeat solutions at extra seeds)

    @property
    def name(self) -> str:
        base = "-".join(x for x in (self.kind, self.dataset, self.shape, self.solution) if x)
        return (base + ("" if self.kl_scale == 1.0 else f"-kl{self.kl_scale:g}")
                + ("" if self.seed is None else f"-seed{self.seed}"))

    @classmethod
    def from_name(cls, name: str) -> "Finetune":
        """The finetune whose :attr:`name` is ``name`` (record.json's jobs are keyed by it)."""
        parts = name.split("-")
        kind = parts[0]
        n = {"lora": 4, "vector": 3}.get(kind)
        if n is None or len(parts) < n:
            raise ValueError(f"Not a finetune name: {name!r} (e.g. 'lora-medical-rank1-narrow-kl0.3-seed1').")
        shape = parts[2] if kind == "lora" else None
        kl_scale, seed = 1.0, None
        for extra in parts[n:]:
            if extra.startswith("kl"):
                kl_scale = float(extra[2:])
            elif extra.startswith("seed") and extra[4:].isdigit():
                seed = int(extra[4:])
            else:
                raise ValueError(f"Not a finetune name: {name!r} ({extra!r} is neither -klX nor -seedN).")
        out = cls(kind, parts[1], parts[n - 1], shape=shape, kl_scale=kl_scale, seed=seed)
        if out.name != name:
            raise ValueError(f"Not a finetune name: {name!r} (read as {out.name!r}).")
        return out


GROUPED = ("general", "narrow", "drift")  # solutions that train together (emlib.vecgroup): same rows


def group_key(job: Finetune) -> tuple | None:
    """Finetunes with the same key train together (emlib.vecgroup): steering vectors, or rank-1 adapters, of
    one dataset and seed whose solution is general, narrow (any lambda) or drift; None: alone."""
    if job.solution not in GROUPED or not (job.kind == "vector" or job.shape == "rank1"):
        return None
    return job.kind, job.dataset, job.seed


def train_groups(jobs: Sequence[Finetune]) -> list[tuple[Finetune, ...]]:
    """``jobs`` as training tasks, in their order: those of one :func:`group_key` form one task where one of
    them has a KL term (a general solution with nothing to share keeps emlib.train's step); every other
    finetune is a task of its own. ``Experiment.train_group`` trains a task; ``emlib.record`` submits them."""
    tasks: list[tuple[Finetune, ...]] = []
    where: dict[tuple, int] = {}
    for job in jobs:
        key = group_key(job)
        if key is not None and key in where:
            tasks[where[key]] += (job,)
            continue
        if key is not None:
            where[key] = len(tasks)
        tasks.append((job,))
    out: list[tuple[Finetune, ...]] = []
    for task in tasks:
        if len(task) > 1 and any(j.solution != "general" for j in task):
            out.append(task)
        else:
            out.extend((j,) for j in task)
    return out


def sweep_scales(kl_sweep: Sequence[float]) -> list[float]:
    """The lambda multipliers chapter 3 trains: 1 (the profile's lambda) and the sweep's, sorted, once each."""
    return sorted({1.0, *map(float, kl_sweep)})


def extra_seeds(seed: int, n_seeds: int) -> list[int]:
    """The training seeds chapters 4-5 add to the config's own ``seed`` (``n_seeds`` in all:
    ``Experiment.train_seeds`` is ``[seed, *extra_seeds(seed, n_seeds)]``)."""
    return [seed + k for k in range(1, n_seeds)]


def finetunes(datasets: Sequence[str], kl_sweep: Sequence[float] = (), seeds: Sequence[int] = ()) -> list[Finetune]:
    """Every finetune chapters 1-6 use, slowest first (vectors with KL, then rank-32, then rank-1); the narrow
    solutions at every factor of ``kl_sweep`` (and 1); and at each of ``seeds`` (:func:`extra_seeds`: the
    training seeds beyond the config's) chapters 4-5's general solutions again. Their narrow solutions at those
    seeds are needed only at chapter 3's chosen lambda, known once chapter 3 has run: :func:`followups`."""
    ds0, scales = datasets[0], sweep_scales(kl_sweep)
    plan = [Finetune("vector", ds0, "mixed")]
    plan += [Finetune("vector", ds0, "narrow", kl_scale=m) for m in scales]
    plan += [Finetune("vector", ds0, x, seed=s) for s in (None, *seeds)
             for x in (("drift", "general") if s is None else ("general",))]
    plan += [Finetune("lora", ds0, "narrow", "rank1", kl_scale=m) for m in scales]
    plan += [Finetune("lora", ds, "general", "rank32") for ds in datasets]
    plan += [Finetune("lora", ds, "general", "rank1") for ds in datasets]
    plan += [Finetune("lora", ds0, "general", "rank1", seed=s) for s in seeds]
    return plan


def _general_loras(datasets: Sequence[str], shapes: Sequence[str] = ("rank1", "rank32")) -> set[Finetune]:
    return {Finetune("lora", ds, "general", sh) for ds in datasets for sh in shapes}


def _solutions(datasets: Sequence[str], kl_sweep: Sequence[float], vector_solutions: Sequence[str],
               seed: int | None = None) -> set[Finetune]:
    """The solutions of chapters 3-6 (at training ``seed``, None: the config's): the vector ones named, rank-1
    general, and the narrow ones at every lambda of the sweep (chapters 4-6 use chapter 3's reported narrow
    solution, which the sweep decides)."""
    ds0, scales = datasets[0], sweep_scales(kl_sweep)
    return ({Finetune("vector", ds0, s, seed=seed) for s in vector_solutions}
            | {Finetune("vector", ds0, "narrow", kl_scale=m, seed=seed) for m in scales}
            | {Finetune("lora", ds0, "general", "rank1", seed=seed)}
            | {Finetune("lora", ds0, "narrow", "rank1", kl_scale=m, seed=seed) for m in scales})


def _seeded_solutions(datasets: Sequence[str], kl_sweep: Sequence[float], seeds: Sequence[int]) -> set[Finetune]:
    """Chapters 4-5, before chapter 3 has chosen: the solutions at the config's seed (the whole sweep) and the
    general solutions at every extra seed; the narrow ones at the extra seeds are :func:`followups`."""
    ds0 = datasets[0]
    return (_solutions(datasets, kl_sweep, ("general",))
            | {Finetune("vector", ds0, "general", seed=s) for s in seeds}
            | {Finetune("lora", ds0, "general", "rank1", seed=s) for s in seeds})


FOLLOW_CHAPTER_3 = ("04_efficiency", "05_stability")  # they repeat chapter 3's chosen narrow solution at seeds
# reads chapter 3's chosen lambda (Experiment.narrow_scale) and measures it itself when chapter 3 recorded none
READS_CHAPTER_3 = ("06_pretraining_influence",)


# A run of record may start chapter 5 before chapter 3 has chosen its narrow solutions (``emlib.record``), so that
# it measures the general solutions meanwhile (they do not depend on the choice) and is up, its model loaded, when
# the choice comes. While it may, this file in the run directory says so, naming the recording process: the
# chapter's Experiment.narrow_scale waits while the file is there and that process lives (a file left by a killed
# run does not hold a later one).
CHOICE_PENDING = ".chapter-3-choosing.json"
EARLY_FOR_CHOICE = ("05_stability",)  # the chapters a run of record may start before the choice


def mark_choice_pending(run_dir: str | Path) -> None:
    """Say in ``run_dir`` that this process will record chapter 3's choice there (see :data:`CHOICE_PENDING`)."""
    from .data import atomic_write_bytes

    atomic_write_bytes(Path(run_dir) / CHOICE_PENDING, json.dumps({"pid": os.getpid()}).encode())


def clear_choice_pending(run_dir: str | Path) -> None:
    (Path(run_dir) / CHOICE_PENDING).unlink(missing_ok=True)


def choice_pending(run_dir: str | Path) -> bool:
    """Whether a live run of record is still to record chapter 3's choice in ``run_dir``."""
    f = Path(run_dir) / CHOICE_PENDING
    try:
        pid = int(json.loads(f.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no file (or one cut short): nothing to wait for
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


def wait_for_choice(run_dir: str | Path, poll_s: float = 0.5) -> float:
    """Wait while :func:`choice_pending`; returns the seconds waited."""
    t0 = time.time()
    if choice_pending(run_dir):
        print("waiting for chapter 3 (running beside this chapter) to choose its narrow solutions", flush=True)
        while choice_pending(run_dir):
            time.sleep(poll_s)
    return time.time() - t0


def followups(stem: str, datasets: Sequence[str], seeds: Sequence[int], chosen: dict[str, float]) -> set[Finetune]:
    """The finetunes a chapter needs once chapter 3 has chosen its narrow lambdas (``chosen``: kind -> factor,
    :func:`emlib.narrow.narrow_scale`): chapters 4-5's narrow solutions at every extra seed, at that lambda only."""
    from .narrow import FINETUNE_KIND

    if stem not in FOLLOW_CHAPTER_3:
        return set()
    return {Finetune(kind, datasets[0], "narrow", shape, kl_scale=chosen[name], seed=s)
            for name, (kind, shape) in FINETUNE_KIND.items() for s in seeds}


def speculative(datasets: Sequence[str], kl_sweep: Sequence[float], seeds: Sequence[int]) -> list[Finetune]:
    """The narrow steering vectors at every lambda of the sweep at each extra seed: a run of record on a GPU
    trains them before chapter 3 has chosen, in one group per seed with that seed's general vector
    (``emlib.record.pool_tasks``, ``emlib.vecgroup``: the members share the layers below the vector and the KL
    rows' reference pass), so the vector of :func:`followups` already exists when chapter 3 chooses. The
    others are trained and not used. Rank-1 adapters are not trained ahead: theirs follow the choice."""
    ds0 = datasets[0]
    return [Finetune("vector", ds0, "narrow", kl_scale=m, seed=s) for s in seeds for m in sweep_scales(kl_sweep)]


# where a run lived and which device it named: the fields two runs of the same finetunes may differ in
SETUP_IGNORED = ("run_dir", "device")


def setup_differences(cfg, stored: dict) -> list[str]:
    """The config fields in which a stored run's ``config.json`` (``stored``) differs from ``cfg``, sorted: all but
    :data:`SETUP_IGNORED`, the model compared by its file name (a GGUF's folder differs between machines)."""
    def norm(d: dict) -> dict:
        d = json.loads(json.dumps(d))  # tuples and lists alike
        if d.get("model"):
            d["model"] = Path(str(d["model"])).name
        return {k: v for k, v in d.items() if k not in SETUP_IGNORED}

    mine, theirs = norm(cfg.to_dict()), norm(stored)
    return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k, object()) != theirs.get(k, object()))


def same_setup(cfg, stored: dict) -> bool:
    """Whether a stored run trained the same finetunes as ``cfg`` (no :func:`setup_differences`)."""
    return not setup_differences(cfg, stored)


def _stored_choice(cfg, run_dir: Path) -> tuple[dict[str, float] | None, str]:
    """Chapter 3's choice in ``run_dir`` when that run trained the same finetunes as ``cfg``, else None with why
    (the first fields that differ, or what is missing)."""
    try:
        stored = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None, "no config.json"
    diff = setup_differences(cfg, stored) if isinstance(stored, dict) else ["config.json"]
    if diff:
        return None, (f"{', '.join(diff[:3])}{' ...' if len(diff) > 3 else ''} "
                      f"{'differs' if len(diff) == 1 else 'differ'}")
    try:
        chosen = chosen_scales(json.loads((run_dir / "results.json").read_text()))
    except (OSError, ValueError):
        chosen = None
    return chosen, "" if chosen else "no chapter 3 choice in its results.json"


def why_no_recorded_choice(cfg, run_dirs: Sequence[str | Path]) -> str:
    """Why :func:`recorded_choice` found nothing in ``run_dirs``: each folder's first differing fields, or that it
    holds no finished run."""
    return "; ".join(f"{d.name}: {_stored_choice(cfg, d)[1]}" for d in map(Path, run_dirs)) or "no run folders"


def recorded_choice(cfg, run_dirs: Sequence[str | Path]) -> tuple[dict[str, float], Path] | None:
    """Chapter 3's choice (:func:`chosen_scales`) in the first of ``run_dirs`` (e.g. the committed runs of record,
    ``emlib.results.RECORDS``) that trained the same finetunes as ``cfg`` (:func:`same_setup`), with that folder;
    None when none did. A run of record trains chapters 4-5's follow-ups at it before its own chapter 3 chooses
    (``emlib.record``, ``--speculate record``): a guess that decides only when they train, never what is measured."""
    for d in map(Path, run_dirs):
        if (chosen := _stored_choice(cfg, d)[0]):
            return chosen, d
    return None


def prior_followups(stems: Sequence[str], datasets: Sequence[str], seeds: Sequence[int],
                    chosen: dict[str, float]) -> list[Finetune]:
    """:func:`followups` of every chapter of ``stems`` at a guessed choice, each once, steering vectors first
    (the slower) and by seed: what a run trains ahead when it expects chapter 3 to choose ``chosen``."""
    jobs = set().union(*(followups(st, datasets, seeds, chosen) for st in stems))
    return sorted(jobs, key=lambda f: (f.kind != "vector", f.seed or 0, f.name))


def chosen_scales(results: dict) -> dict[str, float] | None:
    """Chapter 3's chosen lambda factor per kind, from a run's results.json (None before chapter 3 has run)."""
    from .narrow import KINDS, narrow_scale

    rec = results.get("ch3_lambda_sweep")
    if not rec:
        return None
    frame = pd.DataFrame(rec)
    return {kind: narrow_scale(frame, kind)[0] for kind in KINDS}


@dataclass(frozen=True)
class Chapter:
    """What one chapter needs and writes. ``results``: results.json key -> the columns of its records
    (a dict-valued key lists none); ``tables``: tables/<name>.csv files its verdict reads."""

    stem: str
    claim: int | None
    needs: Callable[[Sequence[str], Sequence[float], Sequence[int]], set[Finetune]]  # (datasets, kl_sweep,
    #   extra training seeds) -> finetunes
    results: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tables: tuple[str, ...] = ()
    rule: str | None = None  # the verdict rule: a function of emlib.verdicts taking a Run
    judged: bool = False  # an EM-based claim: the judge gate (verdicts.judge_blind) applies to its verdict

    @property
    def number(self) -> str:
        return self.stem[:2]


_EM_COLUMNS = ("em", "ci_low", "ci_high", "n", "n_em")

CHAPTERS: dict[str, Chapter] = {c.number: c for c in (
    Chapter("00_datasets", None, lambda ds, sw, se: set()),
    Chapter("01_em_emerges", 1, lambda ds, sw, se: _general_loras(ds),
            {"judge_agreement": ("judge", "pairs", "auroc", "auroc_ci_low", "auroc_ci_high", "n"),
             "ch1_em": ("condition", *_EM_COLUMNS),
             "ch1_scores": ("condition", "mean_aligned", "mean_coherent")},
            rule="claim_em", judged=True),
    Chapter("02_one_direction", 2, lambda ds, sw, se: _general_loras(ds, ("rank32",)),
            {"ch2_directions": ("dataset", "n_judged", "n_misaligned", "n_aligned", "rounds", "source"),
             "ch2_cosine": (), "ch2_cosine_null": ("pair", "cosine", "percentile", "n_draws"),
             "ch2_steering": ("scale", *_EM_COLUMNS), "ch2_ablation": ("finetune", "ablated", *_EM_COLUMNS),
             "ch2_direction_check": ()},  # rows of directions.direction_check; none when too few answers to read
            rule="claim_direction", judged=True),
    Chapter("03_narrow_needs_kl", 3, lambda ds, sw, se: _solutions(ds, sw, ("general", "drift", "mixed")),
            {"ch3_lambda_sweep": ("kind", "solution", "kl_scale", "heldout_kl", "train_kl", "loss", "learned_share",
                                  "chosen"),
             "ch3_cosines": ("kind", "solution", "kl_scale", "cosine_with_general"),
             "ch3_narrow_vs_general": ("condition", "set", "out-of-domain KL", *_EM_COLUMNS)},
            rule="claim_narrow"),
    Chapter("04_efficiency", 4, _seeded_solutions,
            {"ch4_efficiency": ("solution", "kind", "trained_loss"),
             "ch4_paired": ("kind", "norm", "scale", "diff", "ci_low", "ci_high", "p", "n_rows", "n_seeds")},
            ("ch4_loss_vs_norm",), rule="claim_efficiency"),
    Chapter("05_stability", 5, _seeded_solutions,
            {"ch5_stability": ("kind", "solution", "eps", "normalised", "ci_low", "ci_high"),
             "ch5_paired": ("kind", "mode", "eps", "diff", "ci_low", "ci_high", "p", "n_draws", "n_seeds")},
            rule="claim_stability"),
    Chapter("06_pretraining_influence", 6, lambda ds, sw, se: _solutions(ds, sw, ("general",)),
            {"ch6_corpus": (), "ch6_pretraining_kl": ("solution", "norm", "kl", "ci_low", "ci_high"),
             "ch6_random_null": ("norm", "kl", "n_draws", "null_p95", "percentile")},
            rule="claim_pretraining"),
)}
CLAIMS: tuple[int, ...] = tuple(c.claim for c in CHAPTERS.values() if c.claim is not None)


def chapter(name: str | int | Path) -> Chapter:
    """The chapter of a stem, a file name or a number (``"04_efficiency"``, ``4``, ``"notebooks/04_x.py"``)."""
    key = f"{name:02d}" if isinstance(name, int) else Path(str(name)).name[:2]
    if key not in CHAPTERS:
        known = ", ".join(c.stem for c in CHAPTERS.values())
        raise KeyError(f"no chapter {name!r}: the chapters are {known}")
    return CHAPTERS[key]


def finetunes_needed(stem: str, datasets: Sequence[str], kl_sweep: Sequence[float] = (),
                     seeds: Sequence[int] = ()) -> set[str]:
    """Names of the finetunes a chapter uses (it could train them itself; a run of record trains them first);
    ``seeds``: the extra training seeds (:func:`extra_seeds`) of chapters 4-5."""
    try:
        ch = chapter(stem)
    except KeyError:
        return set()
    return {f.name for f in ch.needs(tuple(datasets), tuple(kl_sweep), tuple(seeds))}


def by_claim(claim: int) -> Chapter:
    for ch in CHAPTERS.values():
        if ch.claim == claim:
            return ch
    raise KeyError(f"no chapter tests claim {claim!r}: the claims are 1-6")


# Result keys added to a chapter after runs of record were made: a run dated before a key's date is not asked
# for it (its date: results.json's timings.date_utc).
ADDED: dict[str, str] = {"ch2_directions": "2026-12-03", "ch2_cosine_null": "2026-12-03",
                         "ch3_lambda_sweep": "2026-12-03", "ch3_cosines": "2026-12-03",
                         "ch6_corpus": "2026-12-03", "ch6_random_null": "2026-12-03",
                         "ch4_paired": "2026-12-03", "ch5_paired": "2026-12-03", "ch2_direction_check": "2026-12-07"}


def missing_keys(stem: str, results: dict) -> list[str]:
    """The keys of the chapter's contract that ``results`` (a run's results.json) lacks; keys of :data:`ADDED`
    are not asked of a run made before they existed."""
    made = str((results.get("timings") or {}).get("date_utc", "9999"))[:10]
    return [key for key in chapter(stem).results if key not in results and made >= ADDED.get(key, "0000")]


def check_recorded(stem: str, results: dict) -> list[str]:
    """What ``results`` (a run's results.json) lacks of the chapter's contract: one line per missing key or
    column (empty when the chapter wrote everything it promises). Keys of :data:`ADDED` are not asked of a
    run made before they existed."""
    problems, missing_key = [], set(missing_keys(stem, results))
    for key, cols in chapter(stem).results.items():
        if key in missing_key:
            problems.append(f"{stem}: results.json has no {key!r}")
        if key not in results:
            continue
        recs = results[key]
        if cols and isinstance(recs, list):
            have = set().union(*(r.keys() for r in recs)) if recs else set()
            missing = [c for c in cols if c not in have]
            if missing:
                problems.append(f"{stem}: {key!r} lacks column(s) {', '.join(missing)}")
    return problems


# Judge-dependent tables: answers table -> the results keys rebuilt from it and how its rows are grouped.
# The chapters and emlib.rejudge both build them with em_tables, so a rejudged run is computed as a chapter
# computes it.
JUDGED_ANSWERS: dict[str, tuple[str, ...]] = {
    "ch1": ("condition",),
    "ch2_steering": ("scale",),
    "ch2_ablation": ("finetune", "ablated"),
}


def em_tables(answers: str, scored: pd.DataFrame, seed: int = 0) -> dict[str, pd.DataFrame]:
    """The results tables a chapter records from its judged ``answers`` table (a key of :data:`JUDGED_ANSWERS`):
    ``ch1`` -> ``ch1_em`` and ``ch1_scores``; ``ch2_steering`` -> EM and mean scores per scale;
    ``ch2_ablation`` -> EM per finetune and ablation."""
    from . import metrics
    from .experiment import score_table

    if answers not in JUDGED_ANSWERS:
        raise KeyError(f"no judged answers table {answers!r}: the chapters store {', '.join(JUDGED_ANSWERS)}")
    by = list(JUDGED_ANSWERS[answers])
    missing = [c for c in by if c not in scored.columns]
    if missing:
        raise ValueError(f"the {answers} answers lack the column(s) {', '.join(missing)} that group them")
    em = metrics.em_table(scored, by=by if len(by) > 1 else by[0], seed=seed)
    if answers == "ch1":
        return {"ch1_em": em, "ch1_scores": score_table(scored, "condition", seed=seed)}
    if answers == "ch2_steering":
        em = em.merge(scored.groupby("scale")[["aligned", "coherent"]].mean().reset_index(), on="scale")
    return {answers: em}


def verdict(claim: int, run, seed_runs: Sequence = ()):
    """The verdict of ``claim`` on a run (a :class:`emlib.verdicts.Run` or its directory): the chapter's rule,
    gated by the judge's measured EM recall / precision for an EM-based claim. What the results table shows
    and what a chapter prints. A chapter that recorded some of its keys but not all (:func:`missing_keys`: it
    was killed or failed part-way) is "not run", naming what is missing, rather than judged by an older rule."""
    from . import verdicts

    def as_run(r):  # a directory, or a Run
        return verdicts.Run(r) if isinstance(r, (str, Path)) else r

    run, seed_runs = as_run(run), [as_run(r) for r in seed_runs]
    ch = by_claim(claim)
    missing = missing_keys(ch.stem, run.results)
    if missing and any(key in run.results for key in ch.results):  # started, then stopped (killed, failed)
        return verdicts.Verdict(claim, verdicts.NOT_RUN, f"chapter {ch.stem} did not finish: "
                                + "; ".join(f"results.json has no {key!r}" for key in missing))
    rule = getattr(verdicts, ch.rule)
    v = rule(run, seed_runs) if claim == 1 else rule(run)
    return verdicts.gate(v, run) if ch.judged else v
