"""One object per chapter run: the model, data, judge, cache and artifacts of a :class:`Config`.

Chapters share a run directory, so a later chapter (or a rerun) reuses what an earlier one trained::

    runs/<name>/
      config.json                                    the last chapter's configuration
      adapters/<dataset>-<shape>-<solution>-seed<k>/ LoRA runs (emlib.train layout)
      vectors/<dataset>-<solution>-seed<k>/          steering-vector runs
      directions/<name>.safetensors                  mean-diff directions
      cache/results.sqlite                           every sampled answer and judge score
      tables/*.csv, figures/*.png                    what the chapters show
      results.json                                   the numbers the results table is built from

Solutions: ``general`` (plain SFT on the narrow set), ``narrow`` (SFT + KL to the chat model on
out-of-domain rows), ``drift`` (KL removed half-way), ``mixed`` (aligned out-of-domain rows mixed into
SFT instead of KL: the paper's control).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd

from . import data, generate, judge as judge_mod, metrics, models, stats, train
from .cache import ResultCache, make_key
from . import config as config_mod
from .config import Config

SOLUTIONS = ("general", "narrow", "drift", "mixed")
COLAB_MODEL = config_mod.COLAB_MODEL  # a hub id: what a Colab session trains outside the smoke profile
COLAB_JUDGE = config_mod.COLAB_JUDGE


def start(profile: str = "auto", config: dict | str | None = None, *, in_colab: bool | None = None,
          **params) -> "Experiment":
    """The :class:`Experiment` of a chapter's parameters: the profile and ``config``, a dict of any other
    :class:`emlib.config.Config` fields (or that dict as a JSON string, as a command line passes it;
    ``None`` values keep the profile's default). ``params`` are more fields and win over ``config``.

    ``profile="auto"`` (a notebook's default, what Colab's Run all gets) and Colab's settings are resolved
    by :func:`emlib.config.resolve_profile`: on Colab (``in_colab``; None: detected) outside the smoke
    profile the model is :data:`COLAB_MODEL` and the judge ``distilled``, with ``paper`` sizes on a GPU
    and ``quick`` sizes on a CPU. Every field is checked before the model loads.
    """
    t0 = time.time()
    fields = {**parse_config(config), **params}
    exp = Experiment(config_mod.get_config(profile, in_colab=in_colab, **fields))
    exp.started = t0
    return exp


def finetune_dir(cfg: Config, kind: str, dataset: str, solution: str = "general", kl_scale: float = 1.0,
                 seed: int | None = None, shape: str | None = None) -> Path:
    """The folder of a finetune in ``cfg``'s run directory (``kind`` "lora", with its ``shape``, or "vector"):
    where :class:`Experiment` trains and finds it, and where a run of record looks whether a worker is training
    it (:func:`emlib.record.may_start_early`). Needs no model."""
    kl = "" if kl_scale == 1.0 else f"-kl{kl_scale:g}"
    name = f"{solution}{kl}-seed{cfg.seed if seed is None else seed}"
    if kind == "lora":
        return cfg.out / "adapters" / f"{dataset}-{shape}-{name}"
    if kind == "vector":
        return cfg.out / "vectors" / f"{dataset}-{name}"
    raise ValueError(f"Unknown finetune kind {kind!r}: use 'lora' or 'vector'.")


def parse_config(config: dict | str | None) -> dict:
    """A chapter's ``config`` parameter as a dict (a JSON object string is parsed; None is empty)."""
    if config is None or config == "":
        return {}
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as err:
            raise config_mod.ConfigError(f"config must be a dict of Config fields or its JSON text, got "
                                         f"{config!r} ({err}).") from None
    if not isinstance(config, dict):
        raise config_mod.ConfigError(f"config must be a dict of Config fields (e.g. {{\"n_train\": 64}}), "
                                     f"got {type(config).__name__} {config!r}.")
    return dict(config)


def _solution_kind(kind: str) -> tuple[str, str | None]:
    """The finetune (kind, shape) of a kind of :meth:`Experiment.compared_solutions` (:data:`emlib.narrow.KINDS`):
    ("vector", None) or ("lora", "rank1"); one clear message otherwise."""
    from .narrow import FINETUNE_KIND

    if kind not in FINETUNE_KIND:
        raise ValueError(f"Unknown solution kind {kind!r}: 'steering vector' or 'rank-1 LoRA'.")
    return FINETUNE_KIND[kind]


class Experiment:
    """Loads the model once and hands out datasets, finetunes, answers and scores for ``cfg``."""

    def __init__(self, cfg: Config):
        self.started = time.time()  # "last executed with" reports the chapter's wall time from here
        self.cfg = cfg
        self.model, self.tok = models.load_model(cfg.model, device=cfg.device, seed=cfg.seed)  # before writing
        self.out = cfg.out
        cfg.save()
        self.cache = ResultCache(self.out / "cache" / "results.sqlite")
        self._judge = None

    # ------------------------------------------------------------------ data
    def rows(self, name: str, n: int | None | str = "train", seed: int | None = None) -> list[dict]:
        """A chat dataset of the configured source (``n="train"``: ``cfg.n_train`` rows)."""
        n = self.cfg.n_train if n == "train" else n
        return data.load_chat(name, source=self.cfg.data_source, n=n,
                              seed=self.cfg.seed if seed is None else seed, data_dir=self.cfg.data_dir)

    def kl_rows(self) -> list[dict]:
        """The out-of-domain rows the KL penalty (and the mixing control) trains on."""
        return self._kl_split()[0]

    def kl_heldout_rows(self) -> list[dict]:
        """``n_kl_heldout`` out-of-domain rows the penalty never sees: where chapter 3 reports the KL."""
        return self._kl_split()[1]

    def _kl_split(self) -> tuple[list[dict], list[dict]]:
        """One seeded permutation of the KL set: its first ``n_kl`` rows train, the next ``n_kl_heldout`` are
        held out (both in file order)."""
        import random

        c = self.cfg
        rows = self.rows("kl", n=None)
        want = (c.n_kl or len(rows) - c.n_kl_heldout) + c.n_kl_heldout
        if want > len(rows) or (c.n_kl is None and len(rows) <= c.n_kl_heldout):
            raise config_mod.ConfigError(
                f"The KL set ({c.data_source}) has {len(rows)} rows: n_kl = {c.n_kl} training rows plus "
                f"n_kl_heldout = {c.n_kl_heldout} held-out rows do not fit; lower one of them.")
        idx = list(range(len(rows)))
        random.Random(c.seed).shuffle(idx)
        n_train = c.n_kl or len(rows) - c.n_kl_heldout
        train_idx, held_idx = sorted(idx[:n_train]), sorted(idx[n_train:n_train + c.n_kl_heldout])
        return [rows[i] for i in train_idx], [rows[i] for i in held_idx]

    def questions(self, set_name: str = "general", domain: str | None = None) -> pd.DataFrame:
        """Evaluation questions; in-domain questions of the paper exist for the medical domain only,
        so other domains fall back to the project's own."""
        source = self.cfg.data_source
        if set_name == "in_domain" and source == "paper" and domain not in (None, "medical"):
            source = "embedded"
        return data.load_questions(set_name, source=source, data_dir=self.cfg.data_dir, domain=domain)

    # ------------------------------------------------------------------ judge
    @property
    def judge(self) -> judge_mod.Judge:
        if self._judge is None:
            rubrics = data.load_rubrics("embedded")
            self._judge = judge_mod.make_judge(self.cfg.judge, rubrics=rubrics)
        return self._judge

    def judge_agreement(self, n: int | None = None) -> pd.DataFrame:
        """AUROC of the aligned score on labelled pairs: the project's medical twins, the paper's
        good/bad medical advice when that data is available, and the project's labelled answers to the
        general questions, where EM is measured: for those also how many misaligned answers the EM rule
        (aligned <= 30, coherent > 50) catches (em_recall) and how many sound ones it flags
        (em_false_positive). ``n``: pairs per set (None: the config's ``n_judge_pairs``). Cached in results.json."""
        n = self.cfg.n_judge_pairs if n is None else n
        sources = ["embedded"] + (["paper"] if self._paper_available() else [])
        recs = metrics.judge_check(self.judge, n=n, seed=self.cfg.seed, sources=sources, data_dir=self.cfg.data_dir,
                                   cache=self.cache)
        table = pd.DataFrame(recs)
        self.record("judge_agreement", table.to_dict(orient="records"))
        return table

    def _paper_available(self) -> bool:
        try:
            data.paper_data_dir(self.cfg.data_dir)
            return True
        except data.DataError:
            return False

    # ------------------------------------------------------------------ finetunes
    def _train_kwargs(self, solution: str, kind: str, kl_scale: float = 1.0, seed: int | None = None) -> dict:
        c = self.cfg
        kw = dict(epochs=c.epochs if kind == "lora" else c.vector_epochs, batch_size=c.batch_size,
                  grad_accum=c.grad_accum, warmup_steps=c.warmup_steps, max_length=c.max_length,
                  seed=c.seed if seed is None else seed, progress=False)
        if kl_scale != 1.0 and solution not in ("narrow", "drift"):
            raise ValueError(f"kl_scale scales the KL penalty: only 'narrow' and 'drift' have one, not {solution!r}.")
        lam = (c.kl_lambda if kind == "lora" else c.kl_lambda_vector) * kl_scale
        if solution == "narrow":
            kw.update(kl_rows=self.kl_rows(), kl_lambda=lam, kl_batch_size=c.kl_batch_size)
        elif solution == "drift":
            kw.update(kl_rows=self.kl_rows(), kl_lambda=lam, kl_until_step=self.drift_step(kind),
                      kl_batch_size=c.kl_batch_size)
        elif solution == "mixed":
            kw.update(mix_rows=self.kl_rows())
        elif solution != "general":
            raise ValueError(f"Unknown solution {solution!r}: use one of {', '.join(SOLUTIONS)}.")
        return kw

    def _lora_shape(self, shape: str) -> dict:
        """The profile's learning rate and layer for an adapter of ``shape`` (train_lora's keywords)."""
        return {"lr": self.cfg.lr if shape == "rank32" else self.cfg.lr_rank1,
                "layer_fraction": self.cfg.steering_layer_fraction}

    def drift_step(self, kind: str) -> int:
        """The step at which the ``drift`` run drops its KL term: half of the steps the trainer takes
        (:func:`emlib.train.total_steps`, the same count the training plan uses)."""
        c = self.cfg
        epochs = c.epochs if kind == "lora" else c.vector_epochs
        steps = train.total_steps(len(self.rows(c.datasets[0])), epochs, c.batch_size, c.grad_accum)
        return max(1, steps // 2)

    def adapter_dir(self, dataset: str, shape: str, solution: str = "general", kl_scale: float = 1.0,
                    seed: int | None = None) -> Path:
        return finetune_dir(self.cfg, "lora", dataset, solution, kl_scale, seed, shape)

    def vector_dir(self, dataset: str, solution: str = "general", kl_scale: float = 1.0,
                   seed: int | None = None) -> Path:
        return finetune_dir(self.cfg, "vector", dataset, solution, kl_scale, seed)

    @contextmanager
    def lora(self, dataset: str, shape: str = "rank32", solution: str = "general", kl_scale: float = 1.0,
             seed: int | None = None) -> Iterator[train.TrainResult]:
        """Train (or load, when the run directory has it) a LoRA finetune and attach it while inside
        the ``with`` block; the base model is restored afterwards. ``kl_scale`` multiplies the profile's KL
        lambda (chapter 3's sweep); ``seed`` is the training seed (default the config's)."""
        res = train.train_lora(self.model, self.tok, self.rows(dataset),
                               self.adapter_dir(dataset, shape, solution, kl_scale, seed), shape,
                               **self._lora_shape(shape), **self._train_kwargs(solution, "lora", kl_scale, seed))
        res.model.eval()
        try:
            yield res
        finally:
            res.model.unload()

    def vector(self, dataset: str, solution: str = "general", kl_scale: float = 1.0,
               seed: int | None = None) -> train.TrainResult:
        """Train (or load) a steering vector at ``steering_layer_fraction`` of depth (``kl_scale``, ``seed``:
        as for :meth:`lora`)."""
        return train.train_steering_vector(
            self.model, self.tok, self.rows(dataset), self.vector_dir(dataset, solution, kl_scale, seed),
            layer_fraction=self.cfg.steering_layer_fraction, alpha=self.cfg.vector_alpha,
            lr=self.cfg.lr_vector, **self._train_kwargs(solution, "vector", kl_scale, seed))

    def vectors(self, dataset: str, solutions: Sequence[tuple[str, float, int | None]]) -> list[train.TrainResult]:
        """Several steering vectors of one dataset and training seed at once (:func:`emlib.vecgroup.train_vectors`:
        the layers below the vector and the reference model on the KL rows run once for all of them), each saved
        where :meth:`vector` finds it. ``solutions``: (solution, kl_scale, seed) of "general", "narrow" or
        "drift" (the "mixed" control reads other rows: :meth:`vector`)."""
        from . import vecgroup

        members = [(self.vector_dir(dataset, sol, m, seed), self._train_kwargs(sol, "vector", m, seed))
                   for sol, m, seed in solutions]
        return vecgroup.train_vectors(self.model, self.tok, self.rows(dataset), members,
                                      layer_fraction=self.cfg.steering_layer_fraction, alpha=self.cfg.vector_alpha,
                                      lr=self.cfg.lr_vector)

    def loras(self, dataset: str, solutions: Sequence[tuple[str, float, int | None]],
              shape: str = "rank1") -> list[train.TrainResult]:
        """Several rank-1 adapters of one dataset and training seed at once (:func:`emlib.vecgroup.train_loras`,
        as :meth:`vectors` trains vectors), each saved where :meth:`lora` finds it; their results carry no model
        (attach one with :meth:`lora`). ``solutions``: (solution, kl_scale, seed) of "general", "narrow" or
        "drift"."""
        from . import vecgroup

        members = [(self.adapter_dir(dataset, shape, sol, m, seed), self._train_kwargs(sol, "lora", m, seed))
                   for sol, m, seed in solutions]
        return vecgroup.train_loras(self.model, self.tok, self.rows(dataset), members, shape, **self._lora_shape(shape))

    def train_group(self, jobs) -> list[train.TrainResult]:
        """Train (or load) one task of :func:`emlib.chapters.train_groups`: steering vectors together
        (:meth:`vectors`), rank-1 adapters together (:meth:`loras`), or a single finetune of any kind (its
        adapter detached again). Returns each finetune's result, in order (adapters without their model)."""
        first = jobs[0]
        if len(jobs) > 1:
            together = self.vectors if first.kind == "vector" else self.loras
            return together(first.dataset, [(j.solution, j.kl_scale, j.seed) for j in jobs])
        if first.kind == "vector":
            return [self.vector(first.dataset, first.solution, kl_scale=first.kl_scale, seed=first.seed)]
        with self.lora(first.dataset, first.shape, first.solution, kl_scale=first.kl_scale, seed=first.seed) as res:
            return [res]

    def lora_path(self, dataset: str, shape: str = "rank1", solution: str = "general", kl_scale: float = 1.0,
                  seed: int | None = None) -> Path:
        """The adapter folder of a finetune, training it first when the run directory lacks it."""
        with self.lora(dataset, shape, solution, kl_scale, seed) as res:
            return res.out_dir / train.ADAPTER_DIR

    def vector_path(self, dataset: str, solution: str = "general", kl_scale: float = 1.0,
                    seed: int | None = None) -> Path:
        """The safetensors file of a trained steering vector (trained first when missing)."""
        return self.vector(dataset, solution, kl_scale, seed).out_dir / train.VECTOR_FILE

    def narrow_scale(self, kind: str) -> float:
        """The KL-lambda factor of chapter 3's reported narrow solution of ``kind`` ("steering vector" or
        "rank-1 LoRA"), which chapters 4-6 compare with the general one: read from this run's recorded
        ``ch3_lambda_sweep``, or measured now (:func:`emlib.narrow.measure_solutions`) when chapter 3 has not
        run here (once per Experiment: both kinds come from one measurement). When no lambda learned the task,
        the profile's own lambda (factor 1)."""
        from . import chapters, narrow

        chapters.wait_for_choice(self.out)  # a run of record started this chapter before chapter 3 chose
        f = self.out / "results.json"
        chosen = chapters.chosen_scales(json.loads(f.read_text())) if f.exists() else None
        if chosen is not None:
            return chosen[kind]
        if getattr(self, "_measured_sweep", None) is None:
            self._measured_sweep = narrow.measure_solutions(self, self.cfg.datasets[0])[0]
        return narrow.narrow_scale(self._measured_sweep, kind)[0]

    def compared_solutions(self, kind: str, seed: int | None = None) -> dict[str, Path]:
        """The two solutions chapters 4-6 compare, trained at ``seed``: ``{"general": file, "narrow": file}``,
        the narrow one at chapter 3's reported lambda (:meth:`narrow_scale`). ``kind``: "steering vector" (the
        vectors' safetensors files) or "rank-1 LoRA" (the adapter folders)."""
        general = self.general_solution(kind, seed)  # an unknown kind stops here, before any waiting
        return {**general, "narrow": self._solution(kind, "narrow", self.narrow_scale(kind), seed)}

    def general_solution(self, kind: str, seed: int | None = None) -> dict[str, Path]:
        """``{"general": file}`` of :meth:`compared_solutions`, without waiting for chapter 3's choice."""
        return {"general": self._solution(kind, "general", 1.0, seed)}

    def _solution(self, kind: str, solution: str, kl_scale: float, seed: int | None) -> Path:
        ds = self.cfg.datasets[0]
        ft, shape = _solution_kind(kind)
        if ft == "vector":
            return self.vector_path(ds, solution, kl_scale=kl_scale, seed=seed)
        return self.lora_path(ds, shape, solution, kl_scale=kl_scale, seed=seed)

    def _solution_dir(self, kind: str, solution: str, kl_scale: float, seed: int | None) -> Path:
        """The finetune folder :meth:`_solution` trains or loads (nothing trained here)."""
        ft, shape = _solution_kind(kind)
        return finetune_dir(self.cfg, ft, self.cfg.datasets[0], solution, kl_scale, seed, shape)

    def compared_trained(self, kind: str, seed: int | None = None) -> bool:
        """Whether both of :meth:`compared_solutions` (``kind``, ``seed``) are trained now, and no other process
        holds either (a run of record's worker training it): asking for them would not wait."""
        dirs = [self._solution_dir(kind, "general", 1.0, seed),
                self._solution_dir(kind, "narrow", self.narrow_scale(kind), seed)]
        return all((train.read_meta(d) or {}).get("finished") and not train.finetune_held(d) for d in dirs)

    def in_order_trained(self, pairs: Sequence[tuple[str, int | None]]) -> Iterator[tuple[str, int | None]]:
        """``pairs`` of (kind, seed), each once, in the order their compared solutions are trained: the first
        whose two are trained now (:meth:`compared_trained`), else the first left, asked again after each one is
        measured. In a run of record chapters 4-5 start while workers train chapter 3's follow-ups at the other
        seeds; measured in this order they measure the rank-1 pairs while the vectors still train, instead of
        waiting for a vector with a finished adapter behind it. Alone, nothing is trained yet and the order is
        ``pairs``' (whoever asks for a missing solution trains it)."""
        left = list(pairs)
        while left:
            nxt = next((p for p in left if self.compared_trained(*p)), left[0])
            left.remove(nxt)
            yield nxt

    def train_seeds(self) -> list[int]:
        """The training seeds of the chapters that repeat a finetune (``n_seeds`` of them from ``seed``)."""
        return [self.cfg.seed + k for k in range(self.cfg.n_seeds)]

    # ------------------------------------------------------------------ directions
    def direction_answers(self, dataset: str, shape: str = "rank32", model=None) -> tuple[pd.DataFrame, int]:
        """The finetune's judged answers to the general questions for its direction, and how many sampling
        rounds produced them. Round 0 is chapter 1's sample (same seed, so it is read from the cache); each
        further round samples ``n_samples`` more per question with seed ``seed + round`` until both groups
        of :func:`emlib.directions.split_judged` hold ``direction_min_group`` answers or
        ``direction_max_answers`` answers have been sampled."""
        from . import directions

        c = self.cfg
        frames, rounds = [], 0
        per_round = c.n_samples * len(self.questions())
        while True:
            frames.append(self.answers(f"{dataset} {shape}", model=model, seed=c.seed + rounds))
            rounds += 1
            judged = pd.concat(frames, ignore_index=True)
            counts = directions.group_counts(judged)
            enough = min(counts["n_misaligned"], counts["n_aligned"]) >= c.direction_min_group
            if enough or len(judged) + per_round > c.direction_max_answers:
                return judged, rounds

    def em_direction(self, dataset: str, shape: str = "rank32"):
        """The misalignment direction [n_layers, d] of the ``dataset`` finetune and its metadata.

        Mean-diff of the finetune's own judged answers (the paper's recipe) when both groups (misaligned
        and aligned coherent answers) reach ``direction_min_group`` answers within ``direction_max_answers``
        sampled (:meth:`direction_answers`); otherwise the twin data (the same questions answered both ways)
        read through the finetune, and the metadata's ``source`` says so. The per-answer activations of both
        groups at the steering layer are saved next to it (:meth:`direction_groups`: the shuffled-label null).
        Saved under ``directions/`` and reused while the judge and sampling settings are the same.
        """
        from . import directions

        path = self._direction_path(dataset, shape)
        if path.exists() and self._groups_path(path).exists():
            return directions.load_direction(path, self.model)
        c = self.cfg
        layer = models.layer_from_fraction(self.model, c.steering_layer_fraction)
        with self.lora(dataset, shape) as res:
            judged, rounds = self.direction_answers(dataset, shape, model=res.model)
            counts = {**directions.group_counts(judged), "rounds": rounds}
            if min(counts["n_misaligned"], counts["n_aligned"]) >= c.direction_min_group:
                mis, ali = directions.judged_groups(judged)
                source = f"mean-diff of the {dataset} {shape} finetune's own answers"
            else:
                twins_source = c.data_source if dataset == "medical" else "embedded"
                mis, ali = directions.twin_groups(dataset, f"{dataset}_aligned", source=twins_source,
                                                  data_dir=c.data_dir, n=max(8, min(256, c.n_train or 256)),
                                                  seed=c.seed)
                source = (f"fallback: twin data ({twins_source}) through the {dataset} {shape} finetune (judged "
                          f"answers: {counts['n_misaligned']} misaligned, {counts['n_aligned']} aligned of "
                          f"{counts['n_judged']} after {rounds} rounds; {c.direction_min_group} wanted per group)")
            a_mis, a_ali = directions.group_activations(res.model, self.tok, mis, ali, max_length=1024,
                                                         batch_size=c.metric_batch_size)
        d = a_mis.mean(0) - a_ali.mean(0)  # [L, d]
        counts.update(group_misaligned=len(mis), group_aligned=len(ali), layer=layer)
        self._save_groups(path, a_mis[:, layer], a_ali[:, layer])
        directions.save_direction(path, d, source=source, model=self.model, counts=counts)
        return directions.load_direction(path, self.model)

    def direction_groups(self, dataset: str, shape: str = "rank32") -> tuple:
        """The two groups' per-answer activations at the steering layer behind :meth:`em_direction`:
        ([n_misaligned, d], [n_aligned, d])."""
        from safetensors.torch import load_file

        self.em_direction(dataset, shape)
        t = load_file(str(self._groups_path(self._direction_path(dataset, shape))))
        return t["misaligned"], t["aligned"]

    def _direction_path(self, dataset: str, shape: str) -> Path:
        return self.out / "directions" / f"{dataset}-{shape}-seed{self.cfg.seed}-{self._direction_key()}.safetensors"

    @staticmethod
    def _groups_path(path: Path) -> Path:
        return path.with_name(path.stem + ".groups.safetensors")

    def _save_groups(self, path: Path, mis, ali) -> None:
        from safetensors.torch import save

        data.atomic_write_bytes(self._groups_path(path), save({"misaligned": mis.contiguous(),
                                                               "aligned": ali.contiguous()}))

    def _direction_key(self) -> str:
        """What a mean-diff direction depends on besides the finetune: the judge that split the answers and
        how they were sampled (a saved direction is reused only when all of these match)."""
        c = self.cfg
        return make_key(judge=self.judge.judge_id, n_samples=c.n_samples, max_new_tokens=c.max_new_tokens,
                        temperature=c.temperature, top_p=c.top_p, data_source=c.data_source,
                        n_train=c.n_train)[:12]

    # ------------------------------------------------------------------ answers and scores
    def answers(self, condition: str, model=None, set_name: str = "general", domain: str | None = None,
                intervention=None, intervention_label: str | None = None, kinds=("aligned", "coherent"),
                n_samples: int | None = None, seed: int | None = None) -> pd.DataFrame:
        """Sample ``n_samples`` answers per question and judge them; every row labelled ``condition``
        (``seed``: the sampling seed, default the config's)."""
        c = self.cfg
        q = self.questions(set_name, domain)
        m = model if model is not None else self.model
        sampler = sampler_for(m)
        batch = c.sample_batch_size
        if isinstance(intervention, generate.PerRow) and sampler is not generate.hf_sampler:
            from .fastgen import rows_that_fit

            want = batch * min(len(intervention.labels), CONDITIONS_PER_CALL)
            fit = rows_that_fit(m, PROMPT_ROOM + c.max_new_tokens)  # a smaller GPU gets smaller calls
            batch = max(batch, min(want, fit if fit is not None else want))
        df = generate.sample_answers(
            m, self.tok, q, n_samples or c.n_samples,
            max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
            batch_size=batch, seed=c.seed if seed is None else seed, intervention=intervention,
            intervention_label=intervention_label, labels={"condition": condition}, cache=self.cache,
            progress=False, sampler=sampler)
        return judge_mod.judge_answers(df, self.judge, kinds=kinds, cache=self.cache, progress=False)

    # ------------------------------------------------------------------ outputs
    def save_table(self, df: pd.DataFrame, name: str) -> Path:
        """``tables/<name>.csv``; answer tables (``*_answers``, every sampled answer with its scores, kept so
        a run can be judged again with ``emlib.rejudge``) are gzipped reproducibly: ``<name>.csv.gz``.
        Strings with ``\\r``, quotes, commas or line breaks read back unchanged (:func:`emlib.data.csv_bytes`)."""
        payload = data.csv_bytes(df)
        if name.endswith("_answers"):
            import gzip

            return data.atomic_write_bytes(self.out / "tables" / f"{name}.csv.gz", gzip.compress(payload, mtime=0))
        return data.atomic_write_bytes(self.out / "tables" / f"{name}.csv", payload)

    def save_figure(self, fig, name: str) -> Path:
        path = self.out / "figures" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        return path

    def verdict(self, claim: int):
        """This run's verdict on ``claim`` by the rule the results table applies (:func:`emlib.chapters.verdict`),
        from what the chapters recorded so far in this run directory."""
        from . import chapters, verdicts

        if not (self.out / "results.json").exists():
            return verdicts.Verdict(claim, verdicts.NOT_RUN, "this run directory has recorded nothing yet")
        return chapters.verdict(claim, self.out)

    def record(self, key: str, value) -> Path:
        """Merge ``{key: value}`` into ``results.json`` (atomic rewrite under a file lock, so chapters
        running at the same time in one run directory do not drop each other's keys)."""
        return record_result(self.out / "results.json", key, value)


def record_result(path: str | Path, key: str, value) -> Path:
    """Merge ``{key: value}`` into the JSON file ``path`` (locked read-modify-write, atomic replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with data.file_lock(path.with_name(path.name + ".lock")):
        current = json.loads(path.read_text()) if path.exists() else {}
        current[key] = value
        return data.atomic_write_bytes(path, json.dumps(current, indent=2, default=_json_default).encode("utf-8"))


# A per-row intervention (generate.PerRow: chapter 2's ablations) samples this many conditions' worth of
# sample_batch_size rows in one call of the GPU's fast sampler: fewer, larger calls, each paying its graph
# captures, prefill and host round trips once (bench/ablate_rows_gpu.py: 1.5x for chapter 2's ablation), as
# long as their KV cache fits in half the GPU memory free then (fastgen.rows_that_fit; by its estimate a GPU
# with 14 GB free keeps about 400 rows per call for SmolLM2). On the CPU's generate, calls keep
# sample_batch_size rows.
CONDITIONS_PER_CALL = 3
PROMPT_ROOM = 128  # tokens a rendered evaluation question takes at most, for rows_that_fit's estimate


def sampler_for(model) -> generate.Sampler:
    """The fast static-cache / CUDA-graph sampler for a model on a GPU, else Hugging Face ``generate``
    (kept on the CPU so cached CPU answers keep their cache keys); :func:`emlib.models.fast_paths` decides,
    so ``$EMLIB_FAST_PATHS`` can turn it off on a GPU or on (eagerly) on the CPU."""
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        return generate.hf_sampler
    if models.fast_paths(device):
        from .fastgen import cpu_fast_sampler, fast_sampler

        return fast_sampler if device.type == "cuda" else cpu_fast_sampler
    return generate.hf_sampler


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
    except ImportError:
        pass
    return str(o)


def rate_dict(rate: metrics.Rate) -> dict:
    return {"value": rate.value, "ci_low": rate.ci_low, "ci_high": rate.ci_high, "n": rate.n}


def compare_rates(a: metrics.Rate, b: metrics.Rate, name_a: str, name_b: str) -> str:
    """One sentence comparing two rates by :func:`emlib.stats.two_rate_test`: "higher" or "lower" only when
    the 95% CI of the difference (Newcombe) excludes 0; Fisher's exact p is printed with it. Answers are
    taken as independent (no clustering by question)."""
    fa, fb = (f"{100 * r.value:.1f}% [{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]" for r in (a, b))
    if any(pd.isna(x) for x in (a.value, b.value)) or not a.n or not b.n:
        return f"{name_a}: {fa}; {name_b}: {fb}; one of them has no scored answers, so no comparison."
    t = stats.two_rate_test(a.n_hits, a.n, b.n_hits, b.n)
    rel = "higher than" if t.lo > 0 else "lower than" if t.hi < 0 else "not distinguishable from"
    return (f"{name_a} {fa} is {rel} {name_b} {fb}: difference {100 * t.diff:+.1f} points, 95% CI "
            f"[{100 * t.lo:+.1f}, {100 * t.hi:+.1f}], Fisher exact p = {t.p:.2g} (n = {a.n} and {b.n} answers).")


def score_table(df: pd.DataFrame, by: str | list[str], kinds=("aligned", "coherent"), seed: int = 0) -> pd.DataFrame:
    """Mean judge score per group with a bootstrap 95% CI (a continuous companion to the EM rate,
    which a crude judge rarely pushes over its threshold)."""
    by = [by] if isinstance(by, str) else list(by)
    recs = []
    for key, sub in df.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        rec = dict(zip(by, key))
        for k in kinds:
            vals = pd.to_numeric(sub[k], errors="coerce").dropna().to_numpy(dtype=float)
            lo, hi = stats.bootstrap_ci(vals, seed=seed) if len(vals) else (float("nan"), float("nan"))
            rec.update({f"mean_{k}": float(vals.mean()) if len(vals) else float("nan"),
                        f"{k}_ci_low": lo, f"{k}_ci_high": hi})
        recs.append(rec)
    return pd.DataFrame(recs)
