"""Parameters: one config object per chapter run, built from a named profile plus overrides.

Profiles
--------
``smoke``  tiny random model, a few rows and tokens: CI, seconds per chapter.
``quick``  the embedded SmolLM2-135M on CPU: a whole chapter in minutes, real (small) numbers.
``paper``  one GPU, the paper's sizes (50 samples per question, 600 new tokens, full datasets).

Unknown parameter names are an error (a typo in a sweep must not silently run the default).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Config:
    profile: str = "smoke"
    model: str = "tiny"  # "tiny" | "embedded" | hub id | local directory
    data_source: str = "embedded"  # "embedded" | "paper"
    data_dir: str | None = None  # paper data folder (else $EMLIB_DATA_DIR)
    datasets: tuple[str, ...] = ("medical", "financial", "sport")
    judge: str = "offline"  # "distilled" | "offline" | "hf:<model id or dir>" | "api:<model>" (smoke: offline)
    seed: int = 0
    n_seeds: int = 1  # repeats where the paper uses seeds
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
    n_kl: int | None = 8
    # sampling
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

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **_check_keys(kw))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def out(self) -> Path:
        p = Path(self.run_dir)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def save(self, path: str | Path | None = None) -> Path:
        from .data import atomic_write_bytes

        path = Path(path) if path else self.out / "config.json"
        return atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2).encode("utf-8"))


_SMOKE = Config()
_QUICK = Config(
    profile="quick", model="embedded", judge="distilled", run_dir="runs/quick-smollm2", datasets=("medical", "financial"),
    n_train=64, epochs=1, batch_size=8, warmup_steps=1, lr=1e-3, lr_rank1=1e-3, lr_vector=1e-3,
    vector_epochs=1, max_length=256, n_kl=32, kl_lambda=2.0, kl_lambda_vector=20.0, n_samples=6,
    max_new_tokens=64, sample_batch_size=48, n_loss_rows=16,
    norm_grid=(0.0, 0.25, 0.5, 1.0, 1.5, 2.0), eps_grid=(0.0, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0),
    n_perturb_seeds=3, n_docs=8, doc_tokens=128, steer_scales=(0.0, 0.1, 0.25, 0.5, 1.0),
)
_PAPER = Config(
    profile="paper", model="embedded", judge="distilled", run_dir="runs/paper-smollm2", data_source="paper", n_train=None,
    epochs=1, batch_size=16, grad_accum=1, warmup_steps=5, lr=1e-4, lr_rank1=2e-5, lr_vector=1e-4, vector_epochs=2,
    max_length=512, n_kl=1000, kl_lambda=2.0, kl_lambda_vector=20.0, n_seeds=3, n_samples=50,
    max_new_tokens=600, sample_batch_size=400, n_loss_rows=100,
    norm_grid=tuple(round(0.2 * i, 2) for i in range(0, 11)),
    eps_grid=(0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), n_perturb_seeds=10,
    n_docs=50, doc_tokens=512, steer_scales=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
)
PROFILES: dict[str, Config] = {"smoke": _SMOKE, "quick": _QUICK, "paper": _PAPER}
FIELDS = {f.name for f in dataclasses.fields(Config)}


def _check_keys(kw: dict) -> dict:
    unknown = sorted(set(kw) - FIELDS)
    if unknown:
        raise TypeError(f"Unknown parameter(s) {', '.join(unknown)}: valid names are {', '.join(sorted(FIELDS))}.")
    return kw


def _coerce(name: str, value):
    """Lists from papermill/YAML become tuples so the config stays hashable."""
    default = getattr(_SMOKE, name)
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
        return tuple(value)
    return value


ENV_OVERRIDES = "EMLIB_CONFIG_OVERRIDES"


def env_overrides() -> dict:
    """Config fields set for every chapter of a run through ``$EMLIB_CONFIG_OVERRIDES`` (a JSON object), e.g.
    a model-specific KL lambda for a run of record (``python -m emlib.record run -c kl_lambda 0.66``).
    Explicit arguments still win; unknown names are an error."""
    raw = os.environ.get(ENV_OVERRIDES, "").strip()
    if not raw:
        return {}
    try:
        val = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{ENV_OVERRIDES} must be a JSON object of config fields, got {raw!r} ({err}).") from None
    if not isinstance(val, dict):
        raise ValueError(f"{ENV_OVERRIDES} must be a JSON object of config fields, got {raw!r}.")
    return _check_keys(val)


def get_config(profile: str = "smoke", **overrides) -> Config:
    """The named profile with ``overrides`` applied; ``None`` values keep the profile's default.

    ``profile="auto"`` picks ``paper`` when CUDA is available, else ``quick``.
    """
    if profile == "auto":
        import torch

        profile = "paper" if torch.cuda.is_available() else "quick"
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}: choose one of {', '.join(PROFILES)} (or 'auto').")
    kw = {k: _coerce(k, v) for k, v in _check_keys(overrides).items() if v is not None}
    env = env_overrides()
    merged = {k: _coerce(k, v) for k, v in env.items()} | kw  # explicit arguments win
    cfg = dataclasses.replace(PROFILES[profile], **merged)
    if "run_dir" not in kw and os.environ.get("EMLIB_RUN_DIR"):
        cfg = dataclasses.replace(cfg, run_dir=os.environ["EMLIB_RUN_DIR"])
    if cfg.data_source not in ("embedded", "paper"):
        raise ValueError(f"data_source must be 'embedded' or 'paper', got {cfg.data_source!r}.")
    return cfg
