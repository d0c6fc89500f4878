"""emlib.fasttrain.TrainStep -- the train step that runs as CUDA graphs on a GPU -- against the eager loop.

On the CPU the capture is skipped but the same bucketing, padding and loss code runs, so these tests check
that code against ``emlib.train``'s eager step; the CUDA test (skipped without a GPU) checks the captured
graphs against the same step run eagerly.
"""
from __future__ import annotations

from contextlib import nullcontext

import pandas as pd
import pytest
import torch
from train_fixtures import assert_same_adapters, chat_rows

from emlib import train
from emlib.adapters import lora_modules
from emlib.chat import IGNORE, Encoded, collate, encode_rows, token_losses
from emlib.fasttrain import TrainStep, bucket, collate_right, fast_sft_lora, fast_token_losses
from emlib.models import tiny_model


_chat_rows = chat_rows


# =========================================================================== shapes
def test_bucket_values_and_padding_bound():
    assert [bucket(n) for n in (1, 7, 8, 13, 16, 17, 190, 192, 193, 203)] == [1, 7, 8, 13, 16, 18, 192, 192,
                                                                              208, 208]
    assert bucket(1000, 4) == 1024 and bucket(1025, 4) == 1280 and bucket(5, 8, 16) == 16
    sizes = set()
    for n in range(1, 5000):
        b = bucket(n)
        assert n <= b < n * (1 + 1 / 8) + 1  # under 1/8 padding
        sizes.add(b)
    assert len(sizes) < 120  # few distinct shapes (graphs) over a wide range
    with pytest.raises(ValueError, match="size >= 1"):
        bucket(0)


def test_fixed_shape_batch_pads_rows_and_targets_without_changing_the_loss():
    model, tok = tiny_model(seed=1)
    enc = encode_rows(_chat_rows(5), tok)
    ref_sum, ref_n = token_losses(model, collate(enc, tok.pad_token_id))
    n_t = int(ref_n)
    longest = max(len(e.input_ids) for e in enc)
    batch = collate_right(enc, tok.pad_token_id, shape=(8, longest + 9, n_t + 13))
    assert batch["input_ids"].shape == (8, longest + 9) and batch["target_index"].shape == (n_t + 13,)
    assert (batch["input_ids"][5:] == tok.pad_token_id).all() and (batch["targets"][n_t:] == IGNORE).all()
    got_sum, got_n = fast_token_losses(model, batch, ce_chunk=7)
    assert int(got_n) == n_t  # padding targets are not counted
    torch.testing.assert_close(got_sum, ref_sum, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="smaller than the batch"):
        collate_right(enc, tok.pad_token_id, shape=(4, longest, n_t))
    with pytest.raises(ValueError, match="fewer targets"):
        collate_right(enc, tok.pad_token_id, shape=(5, longest, n_t - 1))


def test_train_step_plan_buckets_and_needs_parameters():
    model, tok = tiny_model(seed=0)
    rows = [Encoded(list(range(3, 3 + n)), [IGNORE] * 2 + list(range(5, 3 + n))) for n in (40, 33, 21, 9)]
    params = [p for p in model.parameters()][:2]
    step = TrainStep(model, params, tok.pad_token_id, max_tokens_per_micro=10_000, pad_multiple=16)
    assert not step.use_graphs  # the CPU never captures
    [(shape, micro)] = step.plan(rows)
    n_t = sum(n - 2 for n in (40, 33, 21, 9))
    assert sorted(micro) == [0, 1, 2, 3] and shape == (4, 48, bucket(n_t, step.per_octave // 2, 8)) and n_t <= shape[2]
    exact = TrainStep(model, params, tok.pad_token_id, per_octave=None, pad_multiple=1)
    assert exact.plan(rows)[0][0] == (4, 40, sum(n - 2 for n in (40, 33, 21, 9)))
    with pytest.raises(ValueError, match="needs trainable parameters"):
        TrainStep(model, [], tok.pad_token_id)


def test_one_sequence_per_row_skips_the_packing_check_and_restores_it():
    import transformers.masking_utils as mu

    from emlib.fasttrain import one_sequence_per_row

    orig = mu.find_packed_sequence_indices
    packed = torch.tensor([[0, 1, 0, 1]])  # two sequences packed in one row
    assert orig(packed) is not None
    with one_sequence_per_row():
        assert mu.find_packed_sequence_indices(packed) is None
    assert mu.find_packed_sequence_indices is orig


def test_graphs_are_captured_with_the_fixed_gradient_tensors(monkeypatch):
    """emlib.train calls zero_grad(set_to_none=True) before each step: the step must give the parameters
    their fixed .grad tensors back before it captures (else the backward allocates new ones in the graph)."""
    model, tok = tiny_model(seed=0)
    params = [p for p in model.parameters()][:3]
    step = TrainStep(model, params, tok.pad_token_id)
    seen = []

    def capture(shape, n_kl=0):  # what the CUDA capture would see; then train eagerly
        seen.append(all(p.grad is g for p, g in zip(step.params, step._grads)))
        step.use_graphs = False

    monkeypatch.setattr(step, "_capture", capture)
    step.use_graphs = True
    for p in params:
        p.grad = None  # the caller's zero_grad(set_to_none=True)
    rows = encode_rows(_chat_rows(4), tok)
    step.grads(rows, sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in rows))
    assert seen == [True] and all(p.grad is g for p, g in zip(params, step._grads))


def test_a_failed_capture_lets_go_of_the_graphs_captured_before_it(monkeypatch):
    """A capture that fails (on an H100, for memory: 43.6 GiB held in graph pools at the 1,024-row step) turns
    the step eager and drops the graphs captured before it, their static inputs and pool, so the eager steps
    have that memory; the step's gradients are then those of a step that never tried graphs."""
    from emlib import fasttrain

    model, tok = tiny_model(seed=0)
    params = [p for p in model.parameters()][:3]
    rows = encode_rows(_chat_rows(12, seed=1), tok)
    steps = [rows[:4], rows[4:12]]  # two shapes: the first captures, the second fails
    n_tok = [sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in s) for s in steps]

    def grads(step):
        return [[g.clone() for g in (step.grads(s, n)[0], *step._grads)] for s, n in zip(steps, n_tok)]

    ref = grads(TrainStep(model, params, tok.pad_token_id, max_tokens_per_micro=100_000))
    calls = []

    def capture(run, static, device, pool=None):  # the first capture works, the second runs out of memory
        calls.append(static)
        if len(calls) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return object(), "pool"

    monkeypatch.setattr(fasttrain, "capture", capture)
    step = TrainStep(model, params, tok.pad_token_id, max_tokens_per_micro=100_000)
    step.use_graphs = True
    with pytest.warns(UserWarning, match="capture failed .*OutOfMemoryError"):
        step.prepare(steps)
    assert len(calls) == 2 and step.stats["graphs"] == 1 and "OutOfMemoryError" in step.stats["fallback"]
    assert step._graphs == {} and step._pool is None and not step.use_graphs
    for a, b in zip(ref, grads(step)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)


# =========================================================================== the step against the eager loop
def _train(tmp_path, name: str, fast: bool | None, monkeypatch, kind: str = "lora", **kw):
    monkeypatch.setattr(train, "FAST_STEP", fast)
    model, tok = tiny_model(seed=0)
    rows = _chat_rows(40, seed=3)
    common = dict(max_steps=kw.pop("max_steps", 3), warmup_steps=1, seed=0, progress=False)
    if kind in ("lora", "rank1"):
        shape = "rank32" if kind == "lora" else "rank1"
        return train.train_lora(model, tok, rows, tmp_path / name, shape, lr=5e-3, **common, **kw)
    return train.train_steering_vector(model, tok, rows, tmp_path / name, layer=1, alpha=4.0, lr=5e-2,
                                       **common, **kw)


def _close(a, b, col: str, rtol: float):
    torch.testing.assert_close(torch.tensor(a.log[col].tolist()), torch.tensor(b.log[col].tolist()),
                               rtol=rtol, atol=1e-6)


def test_train_lora_fast_step_equals_eager_loop(tmp_path, monkeypatch):
    """emlib.train with FAST_STEP (bucketed, padded, one micro-batch of 16 rows, fused kernels) == its eager
    2 x 8 accumulation: losses, gradient norms and the trained adapter agree to rounding."""
    ref = _train(tmp_path, "eager", False, monkeypatch)
    got = _train(tmp_path, "fast", True, monkeypatch)
    assert ref.meta["fast_step"] is None and got.meta["fast_step"]["cuda_graphs"] is False
    assert len(got.log) == len(ref.log) == 3
    _close(got, ref, "loss", 1e-5)
    _close(got, ref, "grad_norm", 1e-4)  # the gradient itself (Adam hides a rescaled loss)
    _close(got, ref, "param_norm", 1e-5)
    assert got.log["input_tokens"].tolist() == ref.log["input_tokens"].tolist()
    assert got.log["tokens"].tolist() == ref.log["tokens"].tolist()
    assert_same_adapters(ref.model, got.model)


def test_a_model_with_capped_logits_trains_eagerly(tmp_path, monkeypatch):
    """The fast step computes the loss from the LM head's output; a model whose logits are more (Gemma-2's
    soft-capping, read from its config) is trained by the eager loop instead, with a warning, and the fast
    step's head lookup refuses it (one home for the lookup: emlib.chat._plain_head)."""
    from emlib.fasttrain import decoder_and_head

    model, tok = tiny_model(seed=0)
    decoder, head = decoder_and_head(model)
    assert head is model.get_output_embeddings() and decoder is model.get_decoder()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-capped"):
        decoder_and_head(model)
    monkeypatch.setattr(train, "FAST_STEP", True)
    with pytest.warns(UserWarning, match="eager loop"):
        res = train.train_lora(model, tok, _chat_rows(8, seed=3), tmp_path / "capped", "rank32", lr=5e-3,
                               max_steps=1, warmup_steps=0, seed=0, progress=False)
    assert res.meta["fast_step"] is None and len(res.log) == 1


def test_train_vector_fast_step_equals_eager_loop(tmp_path, monkeypatch):
    ref = _train(tmp_path, "eager", False, monkeypatch, kind="vector")
    got = _train(tmp_path, "fast", True, monkeypatch, kind="vector")
    _close(got, ref, "loss", 1e-5)
    _close(got, ref, "grad_norm", 1e-4)
    assert float(got.vector.vector.abs().sum()) > 0
    torch.testing.assert_close(got.vector.vector, ref.vector.vector, rtol=1e-3, atol=1e-5)


def test_fast_step_resumes_like_an_uninterrupted_run(tmp_path, monkeypatch):
    whole = _train(tmp_path, "whole", True, monkeypatch)
    first = _train(tmp_path, "paused", True, monkeypatch, stop_after=2)
    assert not first.finished and len(first.log) == 2
    rest = _train(tmp_path, "paused", True, monkeypatch)
    _close(rest, whole, "loss", 1e-6)
    for m1, m2 in zip(lora_modules(whole.model), lora_modules(rest.model)):
        torch.testing.assert_close(m2.B, m1.B, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind,fused,pack", [("lora", "auto", "auto"), ("vector", "auto", "auto"),
                                             ("lora", "on", "off"), ("rank1", "on", "off"), ("vector", "on", "off"),
                                             ("lora", "on", "on"), ("rank1", "on", "on"), ("vector", "on", "on")])
def test_kl_fast_step_equals_eager_loop(tmp_path, monkeypatch, kind, fused, pack):
    """With the KL term (8 KL batches a step, each its own micro-batch) the fast step gives the eager loop's
    losses, KL values, gradient norms and weights; the KL is what moved them (lambda 0 differs). ``fused``
    ($EMLIB_FUSED): "on" runs the step's frozen projections fused (emlib.fused) on the CPU too; ``pack``
    ($EMLIB_PACK): "on" packs each micro-batch's rows into one sequence (the CPU fallback of
    ``emlib.fused.packed_attention`` on the CPU)."""
    from emlib.fused import FUSED_ENV, PACK_ENV

    monkeypatch.setenv(FUSED_ENV, fused)
    monkeypatch.setenv(PACK_ENV, pack)
    kw = dict(kl_rows=_chat_rows(12, seed=9), kl_lambda=50.0, kind=kind)
    ref = _train(tmp_path, "eager", False, monkeypatch, **kw)
    got = _train(tmp_path, "fast", True, monkeypatch, **kw)
    assert ref.meta["fast_step"] is None and got.meta["fast_step"]["cuda_graphs"] is False
    assert got.meta["fast_step"]["packed"] is (pack == "on")
    n_fused = {"lora": 0, "rank1": 2, "vector": 2}[kind] if fused == "on" else 0  # rank-32 wraps every projection
    assert got.meta["fast_step"]["fused_layers"] == {"attention": n_fused, "rope": 2 if fused == "on" else 0,
                                                     "mlp": n_fused}
    assert ref.log["kl"].iloc[-1] > 0 and got.log["kl_active"].all()  # LoRA: B = 0 until the 2nd update
    for col, rtol in (("loss", 1e-5), ("kl", 1e-4), ("grad_norm", 1e-4), ("objective", 1e-5)):
        _close(got, ref, col, rtol)
    free = _train(tmp_path, "no-kl", True, monkeypatch, kind=kind)
    assert not torch.allclose(torch.tensor(free.log["grad_norm"].tolist()), torch.tensor(got.log["grad_norm"].tolist()),
                              rtol=1e-3)
    if kind != "vector":
        assert_same_adapters(ref.model, got.model)
    else:
        torch.testing.assert_close(got.vector.vector, ref.vector.vector, rtol=1e-3, atol=1e-5)


def test_kl_until_step_measures_the_kl_without_its_gradient(tmp_path, monkeypatch):
    """The drift run: KL in the objective for the first step only, then measured with weight 0 -- the same
    log as the eager loop, which computes it under no_grad."""
    kw = dict(kl_rows=_chat_rows(12, seed=9), kl_lambda=50.0, kl_until_step=1)
    ref = _train(tmp_path, "eager", False, monkeypatch, **kw)
    got = _train(tmp_path, "fast", True, monkeypatch, **kw)
    assert got.log["kl_active"].tolist() == [True, False, False] == ref.log["kl_active"].tolist()
    for col, rtol in (("loss", 1e-5), ("kl", 1e-4), ("grad_norm", 1e-4)):
        _close(got, ref, col, rtol)


def test_kl_batches_need_a_reference_and_the_kl_rows():
    model, tok = tiny_model(seed=0)
    rows = encode_rows(_chat_rows(2), tok)
    params = [p for p in model.parameters()][:2]
    for kw in ({}, {"kl_rows": rows}, {"reference": nullcontext}):
        step = TrainStep(model, params, tok.pad_token_id, **kw)
        with pytest.raises(ValueError, match="reference= and kl_rows="):
            step.grads(rows, 5, [[0, 1]], 1.0)


def test_bucketing_does_not_change_fast_sft():
    rows = _chat_rows(24, seed=5)
    kw = dict(lr=3e-3, warmup_steps=0, max_steps=3, rows_per_step=8, progress=False)
    model_a, tok = tiny_model(seed=0)
    a = fast_sft_lora(model_a, tok, rows, "rank32", bucket_per_octave=None, **kw)  # exact shapes
    model_b, _ = tiny_model(seed=0)
    b = fast_sft_lora(model_b, tok, rows, "rank32", bucket_per_octave=1, **kw)  # up to 2x padding
    assert b.meta["step"]["cuda_graphs"] is False
    for col in ("loss", "grad_norm"):
        _close(b, a, col, 1e-5)


# =========================================================================== on a GPU: graphs == eager
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_step_equals_eager_step():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(64):
        p, a = int(torch.randint(10, 40, (1,), generator=g)), int(torch.randint(5, 40, (1,), generator=g))
        ids = torch.randint(3, 500, (p + a,), generator=g).tolist()
        rows.append(Encoded(ids, [IGNORE] * p + ids[p:]))
    logs = {}
    for graphs in (True, False):
        torch.manual_seed(0)  # the same weights for both runs
        model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
        res = fast_sft_lora(model, _Tok(), rows, "rank32", rows_per_step=16, max_steps=8,
                            lr=1e-3, warmup_steps=0, cuda_graphs=graphs, progress=False)
        assert res.meta["step"]["cuda_graphs"] is graphs and res.meta["step"]["fallback"] is None
        logs[graphs] = res.log
    for col in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(logs[True][col].tolist()), torch.tensor(logs[False][col].tolist()),
                                   rtol=2e-3, atol=1e-4)


class _Tok:
    pad_token_id = 0
    eos_token_id = 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_kl_step_equals_eager_step():
    """The KL graphs (reference forward with the adapter disabled, current forward, weighted backward)
    replayed over several steps == the same TrainStep run eagerly: loss, KL and gradient norm per step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    g = torch.Generator().manual_seed(2)

    def rows(n):
        out = []
        for _ in range(n):
            p, a = int(torch.randint(10, 40, (1,), generator=g)), int(torch.randint(5, 40, (1,), generator=g))
            ids = torch.randint(3, 500, (p + a,), generator=g).tolist()
            out.append(Encoded(ids, [IGNORE] * p + ids[p:]))
        return out

    train_rows, kl_rows = rows(48), rows(24)
    logs = {}
    for graphs in (True, False):
        torch.manual_seed(0)
        model = train.add_lora(LlamaForCausalLM(cfg).to("cuda", torch.bfloat16), "rank32")
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in params:  # B != 0, so the current model differs from the reference from the start
                p.normal_(0, 0.02)
        step = TrainStep(model, params, 0, cuda_graphs=graphs, reference=model.disable_adapter, kl_rows=kl_rows)
        opt = torch.optim.AdamW(params, lr=1e-3, **step.adamw_kwargs)
        out = []
        with step.kernels():
            for i in range(6):
                batch = train_rows[8 * i:8 * i + 8]
                n_tok = sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in batch)
                kl = [list(range((4 * i) % 24, (4 * i) % 24 + 4)), list(range((4 * i + 8) % 24, (4 * i + 8) % 24 + 4))]
                loss, norm, kl_sum = step.grads(batch, n_tok, kl, 2.0 if i < 4 else 0.0)
                opt.step()
                out.append([float(loss), float(norm), float(kl_sum)])
        assert step.stats["cuda_graphs"] is graphs and step.stats["fallback"] is None
        logs[graphs] = torch.tensor(out)
    assert bool((logs[False][:, 2] > 0).all())
    # bf16 rounding: measured on an H200, the largest difference is a gradient norm off by 0.21% (step 4)
    torch.testing.assert_close(logs[True], logs[False], rtol=5e-3, atol=1e-4)


def test_kl_step_reads_the_reference_computed_once_from_a_trained_adapter():
    """The KL rows join the training rows in one pass and read the reference model's states, computed once:
    with an adapter that already differs from the base model, the step's loss, KL and gradient are those of
    the eager computation (training rows' loss / count + weight x each KL batch's mean KL, the reference
    forward under peft's disable_adapter), and the states are the base model's, not the adapted one's."""
    model, tok = tiny_model(seed=0)
    model = train.add_lora(model, "rank32")
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:  # B != 0: current and reference differ before any step
            p.normal_(0, 0.05)
    rows, kl_rows = encode_rows(_chat_rows(6, seed=3), tok), encode_rows(_chat_rows(7, seed=9), tok)
    kl_batches, weight = [[0, 3, 5], [6, 1], [3]], 3.0  # a row in two batches, batches of other sizes
    n_tok = sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in rows)
    pad = tok.pad_token_id

    for p in params:
        p.grad = None
    s, _ = token_losses(model, collate(rows, pad))
    kl_means = []
    for b in kl_batches:
        ks, kc = train._batch_kl(model, collate([kl_rows[i] for i in b], pad), nullcontext, model.disable_adapter)
        kl_means.append(ks / kc)
    (s / n_tok + weight * sum(kl_means)).backward()
    want_grads = [p.grad.clone() for p in params]

    step = TrainStep(model, params, pad, reference=model.disable_adapter, kl_rows=kl_rows, max_grad_norm=None)
    loss, norm, kl = step.grads(rows, n_tok, kl_batches, weight)
    torch.testing.assert_close(loss, s.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, sum(kl_means).detach(), rtol=1e-5, atol=1e-6)
    assert float(kl) > 1e-4  # the adapter moved the model: a reference taken from it would give 0
    for p, g in zip(params, want_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(torch.stack([g.norm() for g in want_grads])),
                               rtol=1e-5, atol=1e-6)
    with model.disable_adapter():  # the cached states are the base model's final hidden states
        base = model.get_decoder()(input_ids=torch.tensor([kl_rows[6].input_ids])).last_hidden_state[0]
    ref = step.reference_states()
    got = ref["ref"][ref["offset"][6]:ref["offset"][7]]
    from emlib.chat import answer_positions

    torch.testing.assert_close(got, base[answer_positions(kl_rows[6])], rtol=1e-5, atol=1e-5)


def test_steps_read_in_blocks_log_what_steps_read_one_by_one_would(tmp_path, monkeypatch):
    """With the fast step, emlib.train reads a step's numbers from the device every SYNC_EVERY steps, not after
    each: the log (loss, KL, norms, tokens) is the one of reading every step, with and without the KL term."""
    kw = dict(kl_rows=_chat_rows(12, seed=9), kl_lambda=5.0, max_steps=5, epochs=2)
    logs = {}
    for every in (1, 2, 25):
        monkeypatch.setattr(train, "SYNC_EVERY", every)
        res = _train(tmp_path, f"every{every}", True, monkeypatch, **kw)
        assert res.finished and len(res.log) == 5
        logs[every] = res.log.drop(columns=["seconds"])
    pd.testing.assert_frame_equal(logs[2], logs[1])
    pd.testing.assert_frame_equal(logs[25], logs[1])
    assert logs[1]["kl"].notna().all() and logs[1]["param_norm"].gt(0).all()


def test_a_divergence_read_in_a_block_names_its_step(tmp_path, monkeypatch):
    """A loss that stops being finite between two reads raises the divergence error for the step where it
    happened, as when every step is read, and the base model gets its weights back."""
    msgs = {}
    for every in (1, 25):
        monkeypatch.setattr(train, "SYNC_EVERY", every)
        model, tok = tiny_model(seed=0)
        monkeypatch.setattr(train, "FAST_STEP", True)
        with pytest.raises(FloatingPointError, match="training diverged") as err:
            train.train_lora(model, tok, _chat_rows(40, seed=3), tmp_path / f"nan{every}", "rank32", lr=1e6,
                             epochs=3, batch_size=2, grad_accum=1, warmup_steps=0, max_length=64, progress=False)
        assert not train.has_lora(model)
        msgs[every] = str(err.value).split(":")[0]
    assert msgs[25] == msgs[1] and "step 1 " not in msgs[1]


def test_the_graph_path_copies_every_input_of_a_kl_step(monkeypatch):
    """The CUDA-graph path on the CPU, with a stand-in graph (its capture keeps the static buffers, its replay
    runs the pass on them): each step's inputs, the KL rows' included, are copied into buffers of the right
    names, shapes and dtypes, and two steps give what the eager path gives."""
    from emlib import fasttrain

    class Graph:
        def __init__(self, run, static):
            self.run, self.static = run, static

        def replay(self):
            self.run(self.static)

    monkeypatch.setattr(fasttrain, "capture", lambda run, static, device, pool=None: (Graph(run, static), pool))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)  # no pinned memory on a CPU
    model, tok = tiny_model(seed=0)
    model = train.add_lora(model, "rank32")
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    rows, kl_rows = encode_rows(_chat_rows(8, seed=3), tok), encode_rows(_chat_rows(6, seed=9), tok)
    out = {}
    for graphs in (False, True):
        step = TrainStep(model, params, tok.pad_token_id, reference=model.disable_adapter, kl_rows=kl_rows)
        step.use_graphs = graphs
        got = []
        for part, kl in ((rows[:4], [[0, 1, 2]]), (rows[4:], [[3, 4], [5, 0]])):
            n_tok = sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in part)
            loss, norm, kl_sum = step.grads(part, n_tok, kl, 2.0)
            got.append(torch.stack([loss, norm, kl_sum]))
        out[graphs] = torch.stack(got)
        if graphs:
            assert step._graphs and all(n_kl > 0 for _, n_kl in step._graphs)
            for _, static in step._graphs.values():
                assert {"kl_index", "ref_index", "kl_weight"} <= set(static)
    torch.testing.assert_close(out[True], out[False], rtol=1e-6, atol=1e-7)


def test_encode_rows_in_batches_equals_each_row_alone(monkeypatch):
    """encode_rows calls the tokenizer on many conversations at once; each row comes out as encode_chat makes it
    alone (a multi-turn row, a row cut by max_length, batches that split the rows), and a bad row is named."""
    from emlib import chat
    from emlib.data import DataError

    _, tok = tiny_model()
    rows = chat_rows(7, seed=5)
    rows.insert(2, {"messages": [{"role": "user", "content": "pain rest"}, {"role": "assistant", "content": "water"},
                                 {"role": "user", "content": "dose"}, {"role": "assistant", "content": "sleep daily"}]})
    monkeypatch.setattr(chat, "ENCODE_BATCH", 3)
    lengths = sorted(len(chat.encode_chat(r, tok).input_ids) for r in rows)
    for max_length in (2048, lengths[len(lengths) // 2]):  # the second cuts half of the rows
        alone = [chat.encode_chat(r, tok, max_length) for r in rows]
        alone = [e for e in alone if any(lab != IGNORE for lab in e.labels)]
        got = encode_rows(rows, tok, max_length)
        assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in alone]
    bad = rows[:4] + [{"messages": [{"role": "user", "content": "pain"}]}]
    with pytest.raises(DataError, match="row 4:"):
        encode_rows(bad, tok)


def test_a_packed_shape_bounds_the_pad_tail_too(monkeypatch):
    """The bound a packed shape gives the attention covers every sequence of the packed row, the pad tail
    included: a tail longer than any row (short rows, a bucketed length) was left partly uncomputed by flash
    attention on a GPU, and the NaN there reached the weight gradients (2026-12-07, H100, 64 rows a step)."""
    from emlib.fused import PACK_ENV

    monkeypatch.setenv(PACK_ENV, "on")
    model, tok = tiny_model(seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    step = TrainStep(model, params, 0, pad_multiple=16, pack=True)
    for lens in ([3, 3], [5] * 7, [40, 2, 9], [130] * 16):
        rows = [Encoded(list(range(1, k + 1)), [IGNORE] + list(range(2, k + 1))) for k in lens]
        n, length, _, bound = step.shape(rows)
        assert n == len(lens) and length > sum(lens)
        assert bound >= max(max(lens), length - sum(lens)), (lens, length, bound)
