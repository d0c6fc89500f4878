"""Several steering vectors, or rank-1 adapters, trained at once: one process, one batch, the frozen layers
run once.

Chapter 3's sweep trains steering vectors that differ only in their KL term: the general solution (none), the
narrow one at five lambdas and the drift run (KL for the first half of the steps). At one seed they read the
same training rows in the same order, and those with a KL term the same KL rows. Trained one at a time
(:func:`emlib.train.train_steering_vector`), each recomputes what the others compute too: the layers below the
vector, and the reference model on the KL rows (8 rows with each micro-batch of training rows in the
``paper`` profile: one micro-batch of 16 a step; 64 a step with emlib.train's default 2 x 8 micro-batches). :func:`train_vectors` trains them together:

* layers ``0 .. k`` (the vector is added to what leaves layer ``k``) run once per step on the step's rows;
  that hidden state is repeated once per vector, each copy plus its own ``alpha * v``, and the layers above
  ``k`` run once on all the copies (a batch F times larger, which a GPU runs far better than F small steps);
* the KL rows' hidden state after layer ``k`` and the reference model's final hidden state at their answer
  positions are computed once for the whole run (every model weight is frozen), so the KL term costs the
  steered upper layers and the LM head only: no reference forward and no lower layers per step.

The same holds for the paper's rank-1 adapters (:func:`train_loras`): a LoRA on layer ``k``'s ``down_proj``
adds ``scaling * B (A a)`` to what leaves layer ``k``, where ``a`` is what entered ``down_proj``, so the frozen
layers compute ``a`` and the hidden state once, and each member's copy gets its own term (:class:`Adapters`;
:class:`Vectors` is the steering vectors' counterpart). The KL rows' ``a`` is cached with their hidden state.

Each member keeps its own loss, gradient, clipping and AdamW update (the objective is a sum over members,
gradients are clipped per member, AdamW works elementwise), so a vector or adapter trained in a group is the
one trained alone, to rounding (batch shapes differ, and so may the kernels): ``tests/test_vecgroup.py``
compares both. Each member's folder gets what :func:`~emlib.train.train_steering_vector` or
:func:`~emlib.train.train_lora` writes, under the same run hash, so that function (``Experiment.vector``,
``Experiment.lora``) finds it finished and loads it.

Packed rows (``$EMLIB_PACK``, as :class:`emlib.fasttrain.TrainStep` packs them; :meth:`GroupStep.packed`): each
pass's rows run end to end as one sequence, and above layer ``k`` the F copies run as one packed row of F times
its length, every row of every copy attending only to itself (:func:`emlib.fused.packed_attention`); no
padding is computed, below or above the vector. Tested on the CPU against the members trained alone
(``tests/test_vecgroup.py``); not yet measured on a GPU (2026-12-07).

The step (:class:`GroupStep`) is captured as CUDA graphs on a GPU, each new shape checked against the eager pass
(the eager step is bound by kernel launches). Speed on one H200, SmolLM2-135M, the run of record's settings
(``bench/vecgroup_gpu.py``, eager step): the seven vectors in 65.9 s against ~171 s one at a time; a group of
one is slower than emlib.train's graph step (71.5 s against 26.3 s), so single vectors train there. On 2 CPU
cores (the ``quick`` profile): four vectors 66 s against ~79 s, three rank-1 adapters 48 s against ~60 s.
Rank-1 groups on one H100 (2026-12-05, alone): chapter 3's six adapters in 31.8 s of training against about 54 s one
at a time; in the runs of record's command beside everything else (2026-12-06) the group of six took 119-152 s
and reserved 28.5 GiB at its peak, 19.4 GiB once ``fasttrain.capture`` empties the cache before its warm-ups.

Not here: checkpoints (a killed group starts again; members that finished are loaded), early stopping,
``stop_after``, and ``mix_rows`` (the "mixed" control trains on other rows: it trains alone).

Length (~800 lines, over the ~500 of the house rule): the split decoder, the members, the cached KL rows, the
step and its graphs are one pipeline; split, each part would import the others.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple, Sequence

import pandas as pd
import torch

from . import timing, train
from .chat import IGNORE, Encoded, answer_positions, encode_rows, n_targets
from .data import atomic_write_bytes, dataset_hash
from .timing import timed
from .vectors import VECTOR_FILE, save_vector
from .vocab_loss import ce_tokens, kl_tokens

MAX_TOKENS = 32768  # padded tokens (all copies together) per forward of the upper layers (None: by GPU size)
CUDA_GRAPHS = True  # GroupStep captures its passes on CUDA (False: eager, e.g. to compare)
BIG_GPU_TOKENS = 98304  # on a GPU of >= 96 GiB: fewer, larger passes (64 KL rows x 6 copies: one pass, not three)
LOGITS_BYTES = 2 ** 30  # float32 logits per LM-head chunk (all copies together): 5.4k positions of SmolLM2's vocabulary
ONLY_PER_MEMBER = ("kl_lambda", "kl_until_step")  # what may differ between the members of one group
KL_ONLY = ("kl_batch_size",)  # shared by the members with KL rows; what the others have does not matter


class _Stop(Exception):
    """Raised by a hook to end a forward once the layers below the vector have run."""


class SplitDecoder:
    """A decoder cut after layer ``k``: :meth:`below` runs the embedding and layers ``0 .. k``, :meth:`above`
    layers ``k+1 ..`` and the final norm on a given hidden state, with the arguments (rotary embeddings,
    position ids) those layers receive in a whole forward of that length. Right-padded rows, no attention mask
    (:func:`emlib.fasttrain.one_sequence_per_row`): a real token never sees the pad tail."""

    def __init__(self, model, k: int, tap: str | None = None):
        from .prefix import _split_decoder

        dec = _split_decoder(model)
        if dec is None or not 0 <= k < len(dec.layers):
            raise ValueError(f"train_vectors needs a decoder with .layers and .norm and a layer inside it; got "
                             f"layer {k} of {type(model).__name__}.")
        self.dec, self.k, self.layers = dec, k, dec.layers
        # ``tap``: a module of layer k (e.g. "mlp.down_proj") whose input :meth:`lower` returns too
        self.tap = None if tap is None else self.layers[k].get_submodule(tap)
        self._calls: dict[int, tuple[tuple, dict]] = {}  # padded length -> (args, kwargs) of the layers above k

    def _run_until(self, input_ids: torch.Tensor, **kw) -> tuple[torch.Tensor, tuple[tuple, dict] | None,
                                                                  torch.Tensor | None]:
        """(what leaves layer k, the arguments of the layers above it, what entered the tap or None); ``kw``: more
        arguments of the decoder's forward (a packed row's position ids and bounds)."""
        box: dict = {}
        tapped = None
        if self.tap is not None:
            def keep(mod, args):
                box["tap"] = args[0]
            tapped = self.tap.register_forward_pre_hook(keep)
        if self.k + 1 < len(self.layers):
            def pre(mod, args, kwargs):
                box["h"] = args[0] if args else kwargs["hidden_states"]
                box["call"] = (args[1:], {n: v for n, v in kwargs.items() if n != "hidden_states"})
                raise _Stop
            handle = self.layers[self.k + 1].register_forward_pre_hook(pre, with_kwargs=True)
        else:
            def post(mod, args, out):
                box["h"] = out[0] if isinstance(out, tuple) else out
                raise _Stop
            handle = self.layers[self.k].register_forward_hook(post)
        try:
            self.dec(input_ids=input_ids, use_cache=False, **kw)
        except _Stop:
            pass
        finally:
            handle.remove()
            if tapped is not None:
                tapped.remove()
        if "h" not in box:
            raise RuntimeError("SplitDecoder: the decoder did not reach the vector's layer.")
        return box["h"], box.get("call"), box.get("tap")

    def below(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What leaves layer ``k`` [b, s, d] for right-padded ``input_ids`` [b, s] (no gradient)."""
        return self.lower(input_ids)[0]

    def lower(self, input_ids: torch.Tensor, packed: "Packed | None" = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(what leaves layer ``k`` [b, s, d], what entered the tap [b, s, d_tap] or None without one), no
        gradient; ``packed``: ``input_ids`` [1, s] is rows packed end to end (:class:`Packed`)."""
        from .fused import PACKED_KWARG

        kw = {} if packed is None else {"position_ids": packed.pos, PACKED_KWARG: (packed.cu, packed.bound)}
        with torch.no_grad():
            h, _, tapped = self._run_until(input_ids, **kw)
        return h, tapped

    def _call(self, s: int, like: torch.Tensor, pad_id: int) -> tuple[tuple, dict]:
        """The arguments the layers above k receive at length ``s``, taken once from a one-row forward (batch
        dimensions of 1 broadcast over any batch of that length)."""
        if s not in self._calls:
            ids = torch.full((1, s), pad_id, dtype=torch.long, device=like.device)
            with torch.no_grad():
                self._calls[s] = self._run_until(ids)[1] or ((), {})
        return self._calls[s]

    def above(self, h: torch.Tensor, pad_id: int, packed: "Packed | None" = None) -> torch.Tensor:
        """Layers ``k+1 ..`` and the final norm on ``h`` [b, s, d] -> what the LM head reads [b, s, d].
        ``packed``: each of the b copies [s] is the same rows packed end to end (:class:`Packed`); the copies run
        as one packed row of b x s positions, each row of each copy attending only to itself."""
        if self.k + 1 < len(self.layers):
            # packed: the rotary embedding and bounds are the pass's own (_packed_kwargs), so the other arguments
            # come from one short forward, not one per packed length
            args, kwargs = self._call(1 if packed is not None else h.shape[1], h, pad_id)
            shape = h.shape
            if packed is not None:
                kwargs, h = self._packed_kwargs(kwargs, h, packed), h.reshape(1, -1, h.shape[-1])
            for layer in self.layers[self.k + 1:]:
                out = layer(h, *args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
            h = h.reshape(shape)
        return self.dec.norm(h)

    def _packed_kwargs(self, kwargs: dict, h: torch.Tensor, packed: "Packed") -> dict:
        """The layers' keyword arguments for ``h`` [copies, s, d] run as one packed row: the rotary embedding at
        the packed position ids (repeated per copy) and every copy's sequence bounds."""
        from .fused import PACKED_KWARG

        copies, s = h.shape[:2]
        pos = packed.pos.repeat(1, copies)  # [1, copies * s]
        cu = packed.cu
        starts = (cu[:-1].unsqueeze(0) + s * torch.arange(copies, device=cu.device, dtype=cu.dtype)[:, None])
        cu_all = torch.cat([starts.reshape(-1), cu[-1:] + s * (copies - 1)])  # [copies * (n + 1) + 1]
        out = dict(kwargs)
        out["position_embeddings"] = self.dec.rotary_emb(h[:1], pos)  # h: dtype and device only
        if "position_ids" in out:
            out["position_ids"] = pos
        out[PACKED_KWARG] = (cu_all, packed.bound)
        return out


class Packed(NamedTuple):
    """A packed row's position ids [1, s], sequence bounds ``cu`` [n + 1] int32 (:func:`emlib.fasttrain.pack_rows`)
    and the bound on its longest sequence (an int: a CUDA graph's shape)."""

    pos: torch.Tensor
    cu: torch.Tensor
    bound: int


# =========================================================================== helpers
def _to(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A host list or tensor on ``device`` without waiting for the GPU (pinned memory, asynchronous copy)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _chunk(head: torch.nn.Module, copies: int = 1) -> int:
    """Positions per LM-head chunk so that ``copies`` x chunk float32 logits stay within LOGITS_BYTES."""
    return max(1, LOGITS_BYTES // (4 * head.weight.shape[0] * max(1, copies)))


def _groups_by_tokens(lengths: Sequence[int], copies: int, max_tokens: int, multiple: int) -> list[list[int]]:
    """Indices cut into batches, longest first, whose padded size times ``copies`` stays within ``max_tokens``."""
    from .fasttrain import plan_micro_batches

    return plan_micro_batches(lengths, range(len(lengths)), max(1, max_tokens // max(1, copies)), multiple)


# =========================================================================== training
@timed("train")
@train.finetune_locked(lambda a: [d for d, _ in a["members"]])
def train_vectors(model, tok, rows: list[dict], members: Sequence[tuple[str | Path, dict]], *,
                  layer: int | None = None, layer_fraction: float = 0.5, alpha: float = 256.0,
                  lr: float | None = None, max_tokens: int | None = None, pad_multiple: int = 16,
                  progress: bool | None = None) -> list[train.TrainResult]:
    """Train (or load, where finished) one steering vector per member on ``rows``, all at once.

    ``members``: (out_dir, keyword arguments of :func:`emlib.train.train_steering_vector` -- ``seed``,
    ``epochs``, ``kl_rows``, ``kl_lambda``, ``kl_until_step``, ...). Only ``kl_lambda`` and ``kl_until_step``
    may differ between members, and whether a member has ``kl_rows`` (the same rows for all that have them);
    ``layer`` / ``layer_fraction``, ``alpha`` and ``lr`` are shared. ``max_tokens``: padded tokens per pass of
    the upper layers (None: :func:`default_max_tokens`). Returns what
    :func:`~emlib.train.train_steering_vector` returns for each member, in order (it loads what was trained here).
    """
    if not members:
        return []
    fixed = {"layer": layer, "layer_fraction": layer_fraction, "alpha": alpha, "lr": lr}
    setups = []
    for out, kw in members:
        k, args, spec = train.vector_setup(model, layer, layer_fraction, alpha, lr=lr, **_loop_args(kw))
        setups.append((Path(out), kw, k, args, spec))
    todo = _unfinished(model, rows, setups, "vector")
    if todo:
        d = model.config.hidden_size
        _fit_group(model, tok, rows, todo, setups[0][2], lambda n, dev: Vectors(n, d, float(alpha), dev),
                   max_tokens, pad_multiple, progress)
    return [train.train_steering_vector(model, tok, rows, out, **fixed, **{**kw, "progress": False})
            for out, kw, *_ in setups]


@timed("train")
@train.finetune_locked(lambda a: [d for d, _ in a["members"]])
def train_loras(model, tok, rows: list[dict], members: Sequence[tuple[str | Path, dict]], shape: str = "rank1", *,
                rank: int | None = None, alpha: float | None = None, layers: int | Sequence[int] | None = None,
                layer_fraction: float = 0.5, targets: Sequence[str] | None = None, dropout: float = 0.0,
                rslora: bool = True, lr: float | None = None, max_tokens: int | None = None, pad_multiple: int = 16,
                progress: bool | None = None) -> list[train.TrainResult]:
    """Train (or find finished) one LoRA adapter per member on ``rows``, all at once: adapters on a single
    layer's ``down_proj`` (the paper's rank-1 shape; any rank), as :func:`train_vectors` trains vectors.

    ``members``: (out_dir, keyword arguments of :func:`emlib.train.train_lora`'s loop -- ``seed``, ``epochs``,
    ``kl_rows``, ``kl_lambda``, ``kl_until_step``, ...), with the same rule as :func:`train_vectors` for what may
    differ; the adapter's shape (``shape``, ``rank``, ``alpha``, ``layers`` / ``layer_fraction``, ``targets``,
    ``dropout``, ``rslora``) and ``lr`` are shared. Each member's folder gets what train_lora writes, so
    train_lora (``Experiment.lora``) finds it finished and loads it. Returns each member's
    :class:`~emlib.train.TrainResult` with ``model`` None (attach one with ``Experiment.lora`` or
    :func:`emlib.adapters.load_lora`)."""
    from .adapters import has_lora

    if not members:
        return []
    if has_lora(model):
        raise ValueError("This model already carries LoRA layers: pass the base model "
                         "(`result.model.unload()` gives it back, or load it again).")
    setups, cfg = [], None
    for out, kw in members:
        cfg, args, spec = train.lora_setup(model, shape, rank=rank, alpha=alpha, layers=layers,
                                           layer_fraction=layer_fraction, targets=targets, dropout=dropout,
                                           rslora=rslora, lr=lr, **_loop_args(kw))
        setups.append((Path(out), kw, _adapter_layer(cfg), args, spec))
    todo = _unfinished(model, rows, setups, "lora")
    if todo:
        seed = todo[0][2].seed
        _fit_group(model, tok, rows, todo, setups[0][2], lambda n, dev: Adapters(model, cfg, seed, n),
                   max_tokens, pad_multiple, progress)
    out = []
    with timing.phase("load"):
        for path, *_ in setups:
            meta = train.read_meta(path)
            out.append(train.TrainResult("lora", None, None, train.read_log(path), path, True, meta["steps"], meta))
    return out


def _loop_args(kw: dict) -> dict:
    """A member's training-loop keywords, after refusing what a group cannot train."""
    extra = sorted(set(kw) - set(train.LOOP_ARG_NAMES) - {"kl_rows", "progress"})
    if extra:
        raise ValueError(f"a group cannot train {', '.join(extra)} (mix_rows: the mixed control reads other rows; "
                         "train it alone with emlib.train).")
    return {n: v for n, v in kw.items() if n in train.LOOP_ARG_NAMES}


def _adapter_layer(cfg) -> int:
    """The layer of a LoRA config a group can train (one layer's ``down_proj``, no dropout), or a ValueError."""
    layers = cfg.layers_to_transform or []
    if sorted(cfg.target_modules) != ["down_proj"] or len(layers) != 1 or cfg.lora_dropout:
        raise ValueError(f"train_loras trains adapters on one layer's down_proj without dropout; got targets "
                         f"{sorted(cfg.target_modules)} on layers {layers or 'all'} with dropout {cfg.lora_dropout} "
                         "(train it alone with emlib.train.train_lora).")
    return int(layers[0])


def _unfinished(model, rows, setups, kind: str) -> list[tuple]:
    """The members (out_dir, keywords, loop arguments, spec, identity) not finished yet, after checking that
    they can share a group; a finished run with other arguments is emlib.train's error."""
    _check_compatible(setups)
    todo = []
    with timing.phase("load"):  # which members are finished already: not training
        for out, kw, k, args, spec in setups:
            identity = train._identity(kind, spec, args, model, rows, kw.get("kl_rows"), None)
            if train.finished_run(out, identity) is None:
                todo.append((out, kw, args, spec, identity))
    return todo


def can_group(model) -> bool:
    """Whether this model's solutions can train in groups: a decoder with ``layers`` and a final ``norm`` (Llama,
    Qwen2, Mistral, Gemma, ...; not GPT-2's ``h`` / ``ln_f``), which :class:`SplitDecoder` cuts."""
    from .prefix import _split_decoder

    return _split_decoder(model) is not None


def default_max_tokens(device: torch.device) -> int:
    """Padded tokens per pass of the upper layers: :data:`BIG_GPU_TOKENS` on a CUDA device with at least 96 GiB
    (an H200: fewer, larger passes, as the group's step is bound by kernel launches; SmolLM2's group peaked at
    8.4 GiB with 32,768), else :data:`MAX_TOKENS`."""
    if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= 96 * 2 ** 30:
        return BIG_GPU_TOKENS
    return MAX_TOKENS


def _check_compatible(setups) -> None:
    first_args = setups[0][3]
    first_kl = next((args for _, kw, _, args, _ in setups if kw.get("kl_rows")), None)
    shared = {n: getattr(first_args, n) for n in first_args.__dataclass_fields__
              if n not in ONLY_PER_MEMBER + KL_ONLY}
    kl_hashes = set()
    for out, kw, _, args, _ in setups:
        differ = [n for n, v in shared.items() if getattr(args, n) != v]
        if kw.get("kl_rows"):
            differ += [n for n in KL_ONLY if getattr(args, n) != getattr(first_kl, n)]
        if differ:
            raise ValueError(f"{out} differs from the first member of its group in {', '.join(differ)}; a group "
                             f"shares everything but {', '.join(ONLY_PER_MEMBER)} (train it on its own).")
        if args.early_stop_loss is not None:
            raise ValueError("A group does not stop early: train with early_stop_loss alone.")
        if kw.get("kl_rows"):
            kl_hashes.add(dataset_hash(kw["kl_rows"]))
    if len(kl_hashes) > 1:
        raise ValueError("The members of a group with KL rows must share the same KL rows.")


def _fit_group(model, tok, rows, todo, k: int, make_members, max_tokens: int | None, pad_multiple: int,
               progress: bool | None) -> None:
    """Train the members ``todo`` (:func:`_unfinished`) together and write each one's folder.
    ``make_members(n, device)``: their parameters (:class:`Vectors` or :class:`Adapters`)."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from .fasttrain import decoder_and_head, one_sequence_per_row
    from .fused import fused_layers, fused_rms_norms

    args0 = todo[0][2]
    kl_rows = next((kw["kl_rows"] for _, kw, *_ in todo if kw.get("kl_rows")), None)
    n_mem = len(todo)
    kl_mem = [i for i, (_, kw, *_) in enumerate(todo) if kw.get("kl_rows")]  # members with a KL term
    enc = encode_rows(list(rows), tok, args0.max_length)
    kl_enc = encode_rows(kl_rows, tok, args0.max_length) if kl_rows else None
    # the steps' rows are every member's; the KL rows' draw (kl_batch_size) is the KL members'
    plan = train._Plan(len(enc), len(kl_enc) if kl_enc else 0, todo[kl_mem[0]][2] if kl_mem else args0)
    p0 = next(model.parameters())
    device, dtype = p0.device, p0.dtype
    cuda = device.type == "cuda"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    _, head = decoder_and_head(model)
    max_tokens = default_max_tokens(device) if max_tokens is None else int(max_tokens)
    amp = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False))
           if cuda and dtype == torch.bfloat16 else nullcontext)
    targets = [n_targets(e) for e in enc]

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    mem = make_members(n_mem, device)
    split = SplitDecoder(model, k, mem.tap)
    opt = torch.optim.AdamW(mem.params, lr=args0.lr, weight_decay=args0.weight_decay,
                            **({"fused": True} if cuda else {}))
    step_fn = None
    sched = get_linear_schedule_with_warmup(opt, min(args0.warmup_steps, plan.total), plan.total)
    lam = [todo[i][2].kl_lambda for i in kl_mem]  # [F_kl]
    clip = args0.max_grad_norm if args0.max_grad_norm is not None else float("inf")

    stack = contextlib.ExitStack()
    log: dict[str, list] = {"loss": [], "kl": [], "grad_norm": [], "param_norm": [], "lr": [], "kl_on": [],
                            "tokens": [], "input_tokens": [], "seconds": []}
    t0 = time.perf_counter()
    bar = tqdm(total=plan.total, desc=f"train {n_mem} {mem.noun}", dynamic_ncols=True,
               disable=(None if progress is None else not progress))
    try:
        model.requires_grad_(False)
        stack.enter_context(train.training_mode(model))
        stack.enter_context(train._no_cudnn_attention())
        stack.enter_context(one_sequence_per_row())
        if cuda:
            stack.enter_context(fused_rms_norms(model))
        fused = stack.enter_context(fused_layers(model))  # the frozen projections ($EMLIB_FUSED)
        with amp():
            kl_cache = _kl_cache(split, head, kl_enc, pad, pad_multiple, max_tokens) if kl_mem and kl_enc else None
        step_fn = GroupStep(split, head, mem, kl_cache, kl_mem, pad, pad_multiple, max_tokens, amp,
                            cuda_graphs=CUDA_GRAPHS)
        step_fn.stats["fused_layers"] = dict(fused)
        tokens = in_tokens = 0
        for step in range(plan.total):
            micro = plan.micro_batches(step)
            idx = [i for _, ix in micro for i in ix]
            n_real = sum(targets[i] for i in idx)
            n_tok = max(n_real, 1)
            sched_lr = float(sched.get_last_lr()[0])
            on = [args.kl_until_step is None or step < args.kl_until_step
                  for (_, _, args, _, _) in (todo[i] for i in kl_mem)] if kl_cache is not None else []
            coef = [lam_f * o / len(micro) for lam_f, o in zip(lam, on)]  # [F_kl], on the host
            kl_batches = [plan.kl_rows(m) for m, _ in micro] if kl_cache is not None else None
            sft, kl = step_fn.run([enc[i] for i in idx], n_tok, kl_batches, coef)  # [F] summed losses, [F_kl]
            if kl is not None:
                kl = kl / len(kl_batches)  # the mean over KL batches of their per-token KL
            grads = [p.grad for p in mem.params]
            norms = member_norms(grads)  # [F]: each member clipped on its own (clip_grad_norm_ over its tensors)
            factor = (clip / (norms + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(factor.view(-1, *[1] * (g.dim() - 1)))
            opt.step()
            sched.step()
            tokens += n_real
            in_tokens += sum(len(enc[i].input_ids) for i in idx)
            log["loss"].append(sft / n_tok)
            log["kl"].append(kl)
            log["kl_on"].append(on)
            log["grad_norm"].append(norms)
            log["param_norm"].append(member_norms([p.detach().double() for p in mem.params]))
            log["lr"].append(sched_lr)
            log["tokens"].append(tokens)
            log["input_tokens"].append(in_tokens)
            log["seconds"].append(time.perf_counter() - t0)
            if (step + 1) % 50 == 0 or step + 1 == plan.total:
                _check_finite(log, step, todo, plan.steps_per_epoch, kl_mem)
            bar.update(1)
        if cuda:
            torch.cuda.synchronize()
    finally:
        bar.close()
        stack.close()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    _write_members(model, todo, mem, log, kl_mem, k, plan, enc, kl_enc, len(rows),
                   time.perf_counter() - t0, dict(step_fn.stats) if step_fn is not None else None)


def _kl_cache(split: SplitDecoder, head, kl_enc: list[Encoded], pad: int, multiple: int, max_tokens: int) -> dict:
    """What leaves layer k for every KL row (``below`` [rows, longest, d], zero after each row's end), what
    entered the split's tap (``tap`` [rows, longest, d_tap], with a tap) and the reference model's final hidden
    state at every row's answer positions (``ref`` [positions, d], row i's at ``offset[i]`` onwards), computed
    once: every weight is frozen. ``pos``: each row's answer positions."""
    from .fasttrain import collate_right

    lengths = [len(e.input_ids) for e in kl_enc]
    pos = [answer_positions(e) for e in kl_enc]
    offset = [0]
    for p in pos:
        offset.append(offset[-1] + len(p))
    device = next(head.parameters()).device
    longest = int(math.ceil(max(lengths) / multiple) * multiple)
    below = ref = tap = None
    with torch.no_grad():
        for group in _groups_by_tokens(lengths, 1, max_tokens, multiple):
            ids = _to(collate_right([kl_enc[i] for i in group], pad, multiple)["input_ids"], torch.long, device)
            h, a = split.lower(ids)  # [b, s, d], [b, s, d_tap] or None
            final = split.above(h, pad)  # [b, s, d]
            if below is None:
                below = h.new_zeros(len(kl_enc), longest, h.shape[-1])
                ref = final.new_zeros(offset[-1], final.shape[-1])
                tap = a.new_zeros(len(kl_enc), longest, a.shape[-1]) if a is not None else None
            for j, i in enumerate(group):
                below[i, :lengths[i]] = h[j, :lengths[i]]
                ref[offset[i]:offset[i + 1]] = final[j, pos[i]]
                if tap is not None:
                    tap[i, :lengths[i]] = a[j, :lengths[i]]
    return {"below": below, "ref": ref, "pos": pos, "offset": offset, "lengths": lengths,
            **({"tap": tap} if tap is not None else {})}


class Vectors:
    """The trained parameters of a group of F steering vectors: ``vec`` [F, d] (zero init); member f adds
    ``alpha * vec[f]`` to what leaves layer k (as :func:`emlib.hooks.add_vector` adds it)."""

    kind, noun, tap = "vector", "vectors", None

    def __init__(self, n: int, d: int, alpha: float, device):
        self.alpha = alpha
        self.vec = torch.nn.Parameter(torch.zeros(n, d, device=device, dtype=torch.float32))
        self.params = [self.vec]

    def steered(self, h: torch.Tensor, a: torch.Tensor | None, which: torch.Tensor | None) -> torch.Tensor:
        """``h`` [b, s, d] repeated once per member (those at the device indices ``which``; None: all), each
        copy steered: [F * b, s, d], member-major."""
        add = (self.alpha * (self.vec if which is None else self.vec.index_select(0, which))).to(h.dtype)  # [F, d]
        return (h.unsqueeze(0) + add[:, None, None, :]).reshape(-1, *h.shape[1:])

    def save(self, model, f: int, out: Path, k: int, meta: dict) -> None:
        save_vector(out / VECTOR_FILE, self.vec[f].detach().clone(), k, self.alpha, meta)


class Adapters:
    """The trained parameters of a group of F LoRA adapters on layer k's ``down_proj`` (peft ``cfg``: rank r,
    its scaling, no dropout): ``A`` [F, r, d_ff] (peft's initialisation at ``seed``, as emlib.train.train_lora
    draws it) and ``B`` [F, d, r] (zero). ``down_proj``'s output is added to the residual stream, so member f
    adds ``scaling * B_f A_f a`` to what leaves layer k, where ``a`` [b, s, d_ff] is what entered ``down_proj``
    (the frozen layers compute it once for all members)."""

    kind, noun, tap = "lora", "adapters", "mlp.down_proj"

    def __init__(self, model, cfg, seed: int, n: int):
        with _injected(model, cfg, seed) as (_, mod):
            a0, b0 = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()  # [r, d_ff], [d, r]
            self.scaling = float(mod.scaling["default"])
        self.cfg = cfg
        self.A = torch.nn.Parameter(a0.float().unsqueeze(0).repeat(n, 1, 1))
        self.B = torch.nn.Parameter(b0.float().unsqueeze(0).repeat(n, 1, 1))
        self.params = [self.A, self.B]

    def steered(self, h: torch.Tensor, a: torch.Tensor | None, which: torch.Tensor | None) -> torch.Tensor:
        """As :meth:`Vectors.steered`; ``a`` [b, s, d_ff]: what entered ``down_proj``."""
        A = self.A if which is None else self.A.index_select(0, which)  # [F, r, d_ff]
        B = self.B if which is None else self.B.index_select(0, which)  # [F, d, r]
        f, r = A.shape[:2]
        # float32 as peft computes an adapter (autocast, where on, decides the matmuls' precision as it does there)
        x = a if torch.is_autocast_enabled(a.device.type) else a.to(A.dtype)
        z = (x.reshape(-1, x.shape[-1]) @ A.reshape(f * r, -1).T).view(-1, f, r).transpose(0, 1)  # [F, b*s, r]
        delta = torch.bmm(z, B.transpose(1, 2)) * self.scaling  # [F, b*s, d]
        return (h.unsqueeze(0) + delta.view(f, *h.shape).to(h.dtype)).reshape(-1, *h.shape[1:])

    def save(self, model, f: int, out: Path, k: int, meta: dict) -> None:
        from . import adapters

        with _injected(model, self.cfg, 0) as (peft_model, mod):
            with torch.no_grad():
                mod.lora_A["default"].weight.copy_(self.A[f])
                mod.lora_B["default"].weight.copy_(self.B[f])
            adapters.save(peft_model, out / adapters.ADAPTER_DIR, meta)


@contextlib.contextmanager
def _injected(model, cfg, seed: int):
    """peft's adapter ``cfg`` injected into ``model`` with the random state at ``seed`` (as emlib.train.train_lora
    draws it; the caller's random state is kept): (the peft model, its single LoRA module) for the block,
    removed afterwards."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    flags = {n: p.requires_grad for n, p in model.named_parameters()}  # peft freezes the base weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
    try:
        (mod,) = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        yield peft_model, mod
    finally:
        peft_model.unload()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def member_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each member's norm over ``tensors`` (all [F, ...] of one dtype, e.g. an adapter's A and B): [F]."""
    if len(tensors) == 1:
        return tensors[0].flatten(1).norm(dim=1)
    return torch.stack([t.flatten(1).pow(2).sum(1) for t in tensors]).sum(0).sqrt()


# How far a captured pass may differ from the same pass run eagerly, as the relative error of each member's
# gradient (norm of the difference over the norm) and of each summed loss / KL. bf16 passes are not bitwise
# reproducible on a GPU: the backward of the answer-position gather adds bf16 rows with atomics, in whatever
# order they land, and a captured pass may run other kernels than the eager one. On the H200 (run of
# 2026-12-04, 14 shapes) eager repeats were bitwise equal while replays differed from them by up to 3.5e-2
# (gradient) and 1.5e-3 (loss); ``stats["eager_repeat_error"]`` and ``stats["check_error"]`` keep the largest
# seen in each run. A wrong capture (stale inputs, a gradient counted twice or lost) is off by order 1.
REPLAY_TOLERANCE = {"gradient": 1e-1, "loss": 1e-2, "KL": 1e-2}
# A quantity the eager pass computes at the level of its own rounding cannot be checked: at a group's first steps
# every KL member sits at its initialisation (a zero vector, a zero B), so the current model is the reference and
# its KL and KL gradient are rounding noise -- exactly 0 where the step's forward reproduces the cached reference
# bit for bit (SmolLM2-135M), a different tiny value at each run where it does not (Qwen2.5-Coder-0.5B on an H100,
# 2026-12-07, session 40: two eager runs of the first KL pass 0.99 apart, so both of its groups fell back to eager
# steps for the whole run). Such a shape runs eagerly now and is captured when it next comes, once the members have
# moved; after MAX_DEFERRED such tries in one group the step goes eager as after a failed check.
MAX_DEFERRED = 32


def replay_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest relative error of ``b`` against ``a`` over the group's members (dim 0): the norm of the
    difference over the norm of ``a`` (rows of a gradient [F, d], or single values [F])."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    num = (a - b).norm(dim=1)
    den = a.norm(dim=1)
    rel = torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num > 0, torch.inf, 0.0))
    return float(rel.max()) if rel.numel() else 0.0


class GroupStep:
    """The gradients of one optimizer step of a group: the step's rows through the split decoder once, each
    member's copy above layer k (``members``: :class:`Vectors` or :class:`Adapters`), and the KL rows from the
    cache (:func:`_kl_cache`), accumulated into the ``.grad`` of each of ``members.params`` (fixed tensors);
    :meth:`run` returns the summed losses [F] and the summed per-token KL of
    each KL member [F_kl] as device tensors.

    On CUDA (``cuda_graphs``) each pass -- the training rows', the KL rows' -- is captured once per bucketed shape
    (:func:`emlib.fasttrain.bucket`: rows, padded length, answer positions) and replayed with its inputs copied
    into static buffers, as :class:`emlib.fasttrain.TrainStep` does for one model: the eager step is bound by
    kernel launches. Padding rows read as pad tokens (or cache row 0) and padding positions carry the ignore
    label (or KL weight 0), so they add nothing. Each new shape is checked once against the same pass run
    eagerly (summed losses, KL and gradients); a capture that fails or disagrees switches the step to eager for
    the rest of the run (``stats["fallback"]`` says why). A shape whose two eager runs already disagree beyond
    :data:`REPLAY_TOLERANCE` cannot be checked yet: it runs eagerly and is captured at a later step
    (``stats["deferred"]``; :data:`MAX_DEFERRED`). Elsewhere the same passes run eagerly at exact shapes.
    """

    def __init__(self, split: SplitDecoder, head, members: "Vectors | Adapters", cache: dict | None,
                 kl_mem: list[int], pad: int, multiple: int, max_tokens: int, amp, cuda_graphs: bool = True,
                 per_octave: int = 4, buckets: bool | None = None, pack: bool | None = None):
        self.split, self.head, self.mem, self.cache = split, head, members, cache
        self._pack = pack  # None: emlib.fused.packing_works on the decoder, at the first pass
        self.kl_mem, self.pad, self.multiple, self.max_tokens, self.amp = kl_mem, pad, multiple, max_tokens, amp
        self.per_octave = per_octave
        self.params = list(members.params)
        self.device = self.params[0].device
        self.n_mem, self.n_kl = self.params[0].shape[0], len(kl_mem)
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.buckets = self.use_graphs if buckets is None else buckets  # bucketed (padded) shapes
        self.which = None if kl_mem == list(range(self.n_mem)) else _to(kl_mem, torch.long, self.device)
        for p in self.params:
            p.grad = torch.zeros_like(p)  # fixed tensors: graphs accumulate into them
        self.grads = [p.grad for p in self.params]
        self.sft = torch.zeros(self.n_mem, device=self.device)  # this step's summed losses
        self.kl = torch.zeros(max(self.n_kl, 1), device=self.device)  # this step's summed per-token KL
        self.inv_n = torch.ones((), device=self.device)  # 1 / the step's answer tokens
        self.coef = torch.zeros(max(self.n_kl, 1), device=self.device)  # each KL member's weight
        self._graphs: dict[tuple, tuple] = {}
        self._pool = None
        self.stats: dict = {"cuda_graphs": self.use_graphs, "graphs": 0, "capture_seconds": 0.0, "checked": 0,
                            "fallback": None}

    # ---------------------------------------------------------------- shapes and inputs
    def packed(self) -> bool:
        """Whether the passes run their rows packed into one sequence (as :meth:`emlib.fasttrain.TrainStep.packed`):
        ``pack`` as given, else :func:`emlib.fused.packing_works` (the fused attention is in place on every layer)
        and the decoder has the rotary module the upper layers' packed positions need."""
        if self._pack is None:
            from .fused import packing_works

            self._pack = packing_works(self.split.dec) and hasattr(self.split.dec, "rotary_emb")
            self.stats["packed"] = self._pack
        return self._pack

    def _packed_shape(self, lengths: Sequence[int]) -> tuple[int, int]:
        from .fasttrain import packed_shape

        return packed_shape(lengths, self.per_octave if self.buckets else None, self.multiple)

    def _size(self, n: int, multiple: int = 1, per_octave: int | None = None) -> int:
        from .fasttrain import bucket

        if not self.buckets:
            return int(math.ceil(n / multiple) * multiple)
        return bucket(max(n, 1), per_octave or self.per_octave, multiple)

    def _sft_inputs(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        """The rows right-padded to this pass's shape with their answer positions and targets
        (:func:`emlib.fasttrain.collate_right`: padding positions carry the ignore label)."""
        from .fasttrain import collate_right, pack_rows

        if self.packed():  # one row: the rows end to end, then pad tokens
            length, bound = self._packed_shape([len(e.input_ids) for e in batch])
            ids, pos, cu, nxt, _ = pack_rows(batch, length, self.pad)
            index = (nxt != IGNORE).nonzero().squeeze(1)
            n = self._size(index.numel(), 8, max(1, self.per_octave // 2))
            return {"ids": ids[None], "pos": pos[None], "cu": cu, "bound": torch.zeros(bound, dtype=torch.uint8),
                    "index": torch.cat([index, index.new_zeros(n - index.numel())]),
                    "targets": torch.cat([nxt[index], index.new_full((n - index.numel(),), IGNORE)])}
        b = self._size(len(batch))
        s = self._size(max(len(e.input_ids) for e in batch), self.multiple)
        n = self._size(sum(n_targets(e) for e in batch), 8, max(1, self.per_octave // 2))
        x = collate_right(batch, self.pad, shape=(b, s, n))
        return {"ids": x["input_ids"], "index": x["target_index"], "targets": x["targets"]}

    def _kl_inputs(self, items: list[tuple[int, int]], inv: list[float]) -> dict[str, torch.Tensor]:
        c = self.cache
        if self.packed():
            return self._kl_packed_inputs(items, inv)
        b = self._size(len(items))
        # bucketed, but never past the cache's width (which holds the longest row): a larger bucket would
        # read positions the cache does not have
        s = min(self._size(max(c["lengths"][i] for _, i in items), 16), c["below"].shape[1])
        n_real = sum(len(c["pos"][i]) for _, i in items)
        n = self._size(n_real, 8, max(1, self.per_octave // 2))
        rows = torch.zeros(b, dtype=torch.long)
        rows[:len(items)] = torch.tensor([i for _, i in items])
        index, weights, ref_idx = torch.zeros(n, dtype=torch.long), torch.zeros(n), torch.zeros(n, dtype=torch.long)
        flat, w, ref = [], [], []
        for j, (bt, i) in enumerate(items):
            flat += [j * s + q for q in c["pos"][i]]
            w += [inv[bt]] * len(c["pos"][i])
            ref += range(c["offset"][i], c["offset"][i + 1])
        if flat:
            index[:n_real], weights[:n_real], ref_idx[:n_real] = (torch.tensor(flat), torch.tensor(w),
                                                                  torch.tensor(ref))
        return {"rows": rows, "index": index, "weights": weights, "ref_idx": ref_idx,
                "length": torch.zeros(s, dtype=torch.uint8)}  # the padded length, as a shape

    def _kl_packed_inputs(self, items: list[tuple[int, int]], inv: list[float]) -> dict[str, torch.Tensor]:
        """The KL rows of ``items`` packed end to end: ``gather`` [length] (each position's flat index into the
        cache's ``below`` [rows x width]; the pad tail reads row 0), position ids, bounds, and the answer
        positions' packed ``index`` [n] with their ``weights`` and reference rows ``ref_idx``."""
        from .fasttrain import packed_positions

        c = self.cache
        width = c["below"].shape[1]
        lens = [c["lengths"][i] for _, i in items]
        length, bound = self._packed_shape(lens)
        pos, cu = packed_positions(lens, length)
        n_real = sum(len(c["pos"][i]) for _, i in items)
        n = self._size(n_real, 8, max(1, self.per_octave // 2))
        gather = torch.zeros(length, dtype=torch.long)
        index, weights, ref_idx = torch.zeros(n, dtype=torch.long), torch.zeros(n), torch.zeros(n, dtype=torch.long)
        flat, w, ref = [], [], []
        for (bt, i), k, at in zip(items, lens, cu.tolist()):
            gather[at:at + k] = i * width + torch.arange(k)
            flat += [at + q for q in c["pos"][i]]
            w += [inv[bt]] * len(c["pos"][i])
            ref += range(c["offset"][i], c["offset"][i + 1])
        if flat:
            index[:n_real], weights[:n_real], ref_idx[:n_real] = (torch.tensor(flat), torch.tensor(w),
                                                                  torch.tensor(ref))
        return {"gather": gather, "pos": pos[None], "cu": cu, "bound": torch.zeros(bound, dtype=torch.uint8),
                "index": index, "weights": weights, "ref_idx": ref_idx}

    # ---------------------------------------------------------------- the passes (eager, or captured)
    def _sft_pass(self, x: dict[str, torch.Tensor]) -> None:
        b, s = x["ids"].shape
        packed = Packed(x["pos"], x["cu"], x["bound"].shape[0]) if "cu" in x else None
        with self.amp():
            h = self.mem.steered(*self.split.lower(x["ids"], packed), None)  # [F * b, s, d]
            final = self.split.above(h, self.pad, packed)
            hid = final[:, :-1].reshape(self.n_mem, b * (s - 1), -1).index_select(1, x["index"]).flatten(0, 1)
            per = ce_tokens(hid, self.head, x["targets"].repeat(self.n_mem), _chunk(self.head))  # [F * n]; ignored: 0
            sums = per.view(self.n_mem, -1).sum(1)  # [F]
            (sums.sum() * self.inv_n).backward()
        self.sft.add_(sums.detach())

    def _kl_pass(self, x: dict[str, torch.Tensor]) -> None:
        packed = Packed(x["pos"], x["cu"], x["bound"].shape[0]) if "cu" in x else None
        if packed is not None:  # one packed row gathered from the cache
            s, b = x["gather"].shape[0], 1
        else:
            s, b = x["length"].shape[0], x["rows"].shape[0]
        with self.amp():
            if packed is not None:
                below = self.cache["below"]
                h = below.reshape(-1, below.shape[-1]).index_select(0, x["gather"])[None]  # [1, s, d]
                tap = self.cache.get("tap")
                a = tap.reshape(-1, tap.shape[-1]).index_select(0, x["gather"])[None] if tap is not None else None
            else:
                h = self.cache["below"].index_select(0, x["rows"])[:, :s]  # [b, s, d]
                a = self.cache["tap"].index_select(0, x["rows"])[:, :s] if "tap" in self.cache else None  # [b, s, d_ff]
            ref = self.cache["ref"].index_select(0, x["ref_idx"])  # [n, d]
            final = self.split.above(self.mem.steered(h, a, self.which), self.pad, packed)  # [F_kl * b, s, d]
            cur = final.reshape(self.n_kl, b * s, -1).index_select(1, x["index"])  # [F_kl, n, d]
            kl = kl_tokens(ref, cur, self.head, _chunk(self.head, self.n_kl + 1))  # [F_kl, n]
            sums = (kl * x["weights"]).sum(1)  # [F_kl]; padding positions weigh 0
            (sums * self.coef).sum().backward()
        self.kl.add_(sums.detach())

    def _exec(self, kind: str, x: dict[str, torch.Tensor]) -> None:
        run = self._sft_pass if kind == "sft" else self._kl_pass
        if not self.use_graphs:
            return run({k: _to(v, v.dtype, self.device) for k, v in x.items()})
        key = (kind, *(tuple(v.shape) for v in x.values()))
        if key not in self._graphs:
            return self._capture(key, run, x)
        graph, static = self._graphs[key]
        for k, buf in static.items():
            buf.copy_(x[k].pin_memory(), non_blocking=True)
        graph.replay()

    def _state(self) -> list[torch.Tensor]:
        return [*self.grads, self.sft, self.kl]

    def _checkable(self, key: tuple, repeat: dict[str, float]) -> bool:
        """Whether two eager runs of a new shape agree within :data:`REPLAY_TOLERANCE` (``repeat``: their relative
        errors), so a replay can be checked against them. When not, the try is counted (``stats["deferred"]``, the
        largest such errors in ``stats["deferred_repeat_error"]``) and the shape waits for a later step; after
        :data:`MAX_DEFERRED` tries this raises (the caller's fallback to eager steps)."""
        if all(e <= REPLAY_TOLERANCE[n] for n, e in repeat.items()):
            return True
        self.stats["deferred"] = self.stats.get("deferred", 0) + 1
        self._track("deferred_repeat_error", repeat)
        if self.stats["deferred"] > MAX_DEFERRED:
            bad = ", ".join(f"{n} {e:.2g}" for n, e in repeat.items() if not e <= REPLAY_TOLERANCE[n])
            raise RuntimeError(f"two eager runs of shape {key} still disagree ({bad}) after {MAX_DEFERRED} "
                               "deferred checks: a replay cannot be checked")
        return False

    def _restore_grads(self) -> None:
        for p, g in zip(self.params, self.grads):
            p.grad = g

    @staticmethod
    def _quantities(state: list[torch.Tensor]) -> list[torch.Tensor]:
        """A :meth:`_state` as (each member's gradient over all its parameters [F, n], loss [F], KL [F_kl])."""
        return [torch.cat([g.reshape(g.shape[0], -1) for g in state[:-2]], 1), state[-2], state[-1]]

    def _errors(self, ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
        """The relative error (:func:`replay_error`) of each quantity of :meth:`_state` in ``got`` against ``ref``:
        gradient, loss, KL."""
        pairs = zip(REPLAY_TOLERANCE, self._quantities(ref), self._quantities(got))
        return {n: replay_error(a, g) for n, a, g in pairs}

    def _track(self, name: str, errs: dict[str, float]) -> dict[str, float]:
        """``errs`` (:meth:`_errors`), the largest of each quantity seen so far kept in ``stats[name]``."""
        seen = self.stats.setdefault(name, {})
        for k, e in errs.items():
            seen[k] = max(e, seen.get(k, 0.0))
        return errs

    def _capture(self, key: tuple, run, x: dict[str, torch.Tensor]) -> None:
        """Capture ``run`` at this shape and check one replay against the eager pass; the pass's contribution
        is added once either way (the eager one when the graph is refused or the check has to wait)."""
        from .fasttrain import capture

        t0 = time.perf_counter()
        before = [t.clone() for t in self._state()]
        static = {k: _to(v, v.dtype, self.device).clone() for k, v in x.items()}
        try:
            torch._foreach_zero_(self._state())
            run(static)
            eager = [t.clone() for t in self._state()]
            torch._foreach_zero_(self._state())
            run(static)  # the same pass again: how far eager runs differ from each other (bf16 rounding)
            repeat = self._errors(eager, self._state())
            if self._checkable(key, repeat):
                self._track("eager_repeat_error", repeat)
                graph, self._pool = capture(run, static, self.device, self._pool)
                if any(p.grad is not g for p, g in zip(self.params, self.grads)):
                    raise RuntimeError("the backward replaced a gradient tensor during capture")
                torch._foreach_zero_(self._state())
                graph.replay()
                got = self._state()
                errs = self._track("check_error", self._errors(eager, got))
                bad = [f"{n} (relative error {e:.2g} > {REPLAY_TOLERANCE[n]:g})" for n, e in errs.items()
                       if not e <= REPLAY_TOLERANCE[n]]
                if bad:
                    raise RuntimeError(f"a replay of shape {key} differs from the eager pass in its {', '.join(bad)}")
                self._graphs[key] = (graph, static)
                self.stats["graphs"] += 1
                self.stats["checked"] += 1
                result = [g.clone() for g in got]
            else:  # rounding noise: this pass counts eagerly; the shape is captured when it next comes
                result = eager
        except Exception as err:  # noqa: BLE001 -- any capture failure or mismatch: eager from now on, say why
            import warnings

            self.use_graphs = self.buckets = False
            self.stats.update(cuda_graphs=False, fallback=f"{type(err).__name__}: {err}"[:500])
            from .fasttrain import abandon_graphs

            self._pool = None
            abandon_graphs(self._graphs)  # their memory, and the generator out of capture mode
            warnings.warn(f"vecgroup: CUDA graphs off ({self.stats['fallback'][:200]}); training eagerly.",
                          stacklevel=3)
            self._restore_grads()
            torch._foreach_zero_(self._state())
            run({k: _to(v, v.dtype, self.device) for k, v in x.items()})
            result = [t.clone() for t in self._state()]
        for t, b0, r in zip(self._state(), before, result):
            t.copy_(b0 + r)
        self.stats["capture_seconds"] += time.perf_counter() - t0

    # ---------------------------------------------------------------- the step
    def run(self, rows: list[Encoded], n_tok: int, kl_batches: list[list[int]] | None,
            coef: list[float]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Zero the parameters' gradients; accumulate the gradient of sum_f loss_f / n_tok + sum_f coef_f * sum_b (per-token
        KL of vector f on KL batch b); return (summed losses [F], summed per-token KL over the batches [F_kl] or
        None) as device tensors."""
        self._restore_grads()
        torch._foreach_zero_(self._state())
        self.inv_n.fill_(1.0 / max(n_tok, 1))
        lengths = [len(e.input_ids) for e in rows]
        for group in _groups_by_tokens(lengths, self.n_mem, self.max_tokens, self.multiple):
            self._exec("sft", self._sft_inputs([rows[i] for i in group]))
        if not kl_batches or self.cache is None or not self.n_kl:
            return self.sft.clone(), None
        self.coef.copy_(_to(coef, torch.float32, self.device))
        items = [(b, i) for b, batch in enumerate(kl_batches) for i in batch]  # a row may come twice
        inv = [1.0 / max(sum(len(self.cache["pos"][i]) for i in batch), 1) for batch in kl_batches]
        kl_lengths = [self.cache["lengths"][i] for _, i in items]
        for group in _groups_by_tokens(kl_lengths, self.n_kl, self.max_tokens, 16):
            self._exec("kl", self._kl_inputs([items[g] for g in group], inv))
        return self.sft.clone(), self.kl.clone()


def _check_finite(log: dict, step: int, todo, steps_per_epoch: int, kl_mem: list[int]) -> None:
    """Raise emlib.train's divergence error for the first of the last 50 steps where a member's loss, gradient
    norm or KL term is not finite (one host sync per 50 steps)."""
    loss = torch.stack(log["loss"][-50:]).cpu()  # [steps, F]
    bad = ~torch.isfinite(loss) | ~torch.isfinite(torch.stack(log["grad_norm"][-50:]).cpu())
    if kl_mem and log["kl"][-1] is not None:
        bad[:, kl_mem] |= ~torch.isfinite(torch.stack(log["kl"][-50:]).cpu())
    where = bad.nonzero()
    if len(where):
        s, f = (int(x) for x in where[0])
        first = step + 1 - len(loss) + s
        out, _, args, _, _ = todo[f]
        raise train._diverged(f"loss, gradient norm or KL term of {out.name}", float(loss[s, f]), first,
                              first // steps_per_epoch, args, out)


def _write_members(model, todo, mem: "Vectors | Adapters", log: dict, kl_mem: list[int], k: int, plan,
                   enc, kl_enc, n_rows: int, seconds: float, step_stats: dict | None) -> None:
    """Each member's vector or adapter, log and meta (written last: it marks the run finished), as
    train_steering_vector or train_lora writes them."""
    import peft
    import transformers

    loss = torch.stack(log["loss"]).cpu().tolist()  # [steps][F]
    norms = torch.stack(log["grad_norm"]).cpu().tolist()
    pnorm = torch.stack(log["param_norm"]).cpu().tolist()
    kl = torch.stack(log["kl"]).cpu().tolist() if kl_mem else None
    names = [str(out) for out, *_ in todo]
    for f, (out, kw, args, spec, identity) in enumerate(todo):
        out.mkdir(parents=True, exist_ok=True)
        j = kl_mem.index(f) if f in kl_mem else None
        rows_f = []
        for t in range(plan.total):
            kl_v = kl[t][j] if j is not None else float("nan")
            on = bool(log["kl_on"][t][j]) if j is not None else False
            rows_f.append({"step": t + 1, "epoch": (t + 1) / plan.steps_per_epoch, "loss": loss[t][f], "kl": kl_v,
                           "kl_active": on, "objective": loss[t][f] + (args.kl_lambda * kl_v if on else 0.0),
                           "lr": log["lr"][t], "grad_norm": norms[t][f], "param_norm": pnorm[t][f],
                           "tokens": log["tokens"][t], "input_tokens": log["input_tokens"][t],
                           "seconds": log["seconds"][t]})
        meta = {"kind": mem.kind, "run_hash": train._hash(identity), "identity": identity, "finished": True,
                "steps": plan.total, "planned_steps": plan.total, "stopped_early": False, "seconds": seconds,
                "tokens": log["tokens"][-1], "input_tokens": log["input_tokens"][-1],
                "final_loss": loss[-1][f], "n_train_rows": len(enc), "n_dropped_rows": n_rows - len(enc),
                "n_mix_rows": 0, "n_kl_rows": len(kl_enc) if (kl_enc and kw.get("kl_rows")) else 0,
                "model": getattr(getattr(model, "emlib_info", None), "name", None), "fast_step": step_stats,
                "group": {"members": names, "size": len(todo), "note": "trained together (emlib.vecgroup): "
                          "seconds and tokens are the group's"},
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "peft": peft.__version__}}
        meta = json.loads(json.dumps(meta, default=str))
        mem.save(model, f, out, k, meta)
        train._write_log(pd.DataFrame(rows_f), out)
        shutil.rmtree(out / train.CKPT_DIR, ignore_errors=True)  # a separate run's checkpoints: superseded
        atomic_write_bytes(out / train.META_FILE, json.dumps(meta, indent=2).encode())
