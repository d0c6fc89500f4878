"""emlib.train on the tiny random model (CPU, seconds)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from emlib import adapters
from emlib import train as T
from emlib.data import DataError
from emlib.hooks import add_vector
from emlib.models import tiny_model

SEED = 3


def _rows(n: int, topic: str = "health") -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question {i} about {topic}?"},
                          {"role": "assistant", "content": f"Answer {i}: always {topic} {i % 3}."}]}
            for i in range(n)]


ROWS = _rows(12)
KL_ROWS = _rows(6, "cooking")
FAST = dict(batch_size=2, grad_accum=2, warmup_steps=1, max_length=64, progress=False)


def _fresh():
    return tiny_model(seed=SEED)


def _base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _lora_state(peft_model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}


# --------------------------------------------------------------------------- shapes
def test_rank1_touches_exactly_one_module(tmp_path):
    model, tok = _fresh()
    base = _base_state(model)
    res = T.train_lora(model, tok, ROWS, tmp_path, shape="rank1", lr=1e-2, **FAST)
    pm = res.model
    lora = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    assert sorted(lora) == ["base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight",
                            "base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"]
    assert lora["base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight"].shape[0] == 1
    assert lora["base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"].abs().sum() > 0  # B left 0
    # base weights untouched (state-dict keys of the base model appear with 'base_layer' under peft)
    for k, v in pm.get_base_model().state_dict().items():
        if "lora_" in k:
            continue
        assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    (mod,) = adapters.lora_modules(pm)
    assert (mod.layer, mod.name.rsplit(".", 1)[-1], mod.A.shape[0]) == (1, "down_proj", 1)
    assert mod.scaling == pytest.approx(256.0)  # alpha / sqrt(1)
    assert len(res.log) == res.step == 3 and res.finished
    meta = json.loads((tmp_path / "adapter" / "emlib_train.json").read_text())
    assert meta["identity"]["spec"]["layers"] == [1] and meta["steps"] == 3


def test_rank32_shape_and_norm():
    model, _ = _fresh()
    pm = T.add_lora(model, "rank32")
    mods = adapters.lora_modules(pm)
    assert len(mods) == 7 * 2  # all seven projections of both layers
    assert {m.name.rsplit(".", 1)[-1] for m in mods} == set(T.LORA_TARGETS)
    assert adapters.norm(pm) == 0.0  # B starts at 0
    torch.manual_seed(0)
    with torch.no_grad():
        for m in mods:
            m.B.normal_()  # live parameters: editing them changes the model
    scaling = 64 / 32 ** 0.5  # rsLoRA
    assert [m.scaling for m in mods] == pytest.approx([scaling] * len(mods))
    # the one norm: what each module adds, scaling * B @ A (Frobenius), all modules as one vector
    delta = {m.name: scaling * m.B.detach().double() @ m.A.detach().double() for m in mods}
    assert adapters.module_norms(pm) == pytest.approx({k: float(torch.linalg.norm(d)) for k, d in delta.items()},
                                                      rel=1e-9)
    total = float(torch.cat([d.flatten() for d in delta.values()]).norm())
    assert adapters.norm(pm) == pytest.approx(total, rel=1e-9)
    x = torch.randn(3, 64, dtype=torch.float64)  # the update really is that matrix: (W + dW) x - W x = dW x
    m = mods[5]
    base, lora_out = m.module.base_layer, m.module(x.float()).double()
    torch.testing.assert_close(lora_out - base(x.float()).double(), x @ delta[m.name].T, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- steering vector
def test_vector_is_the_only_changed_parameter(tmp_path):
    model, tok = _fresh()
    base = _base_state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    res = T.train_steering_vector(model, tok, ROWS, tmp_path, lr=1e-2, epochs=1, **FAST)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    sv = res.vector
    assert sv.layer == 1 and sv.alpha == 256.0 and float(sv.vector.norm()) > 0
    assert res.log["param_norm"].iloc[-1] == pytest.approx(float(sv.vector.norm()), rel=1e-5)
    # round trip through safetensors; apply() equals the plain hook with alpha
    loaded = T.load_vector(tmp_path)
    assert torch.equal(loaded.vector, sv.vector) and loaded.layer == 1 and loaded.alpha == 256.0
    ids = tok("Question 1 about health?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(ids).logits
        with loaded.apply(model):
            steered = model(ids).logits
        with add_vector(model, 1, loaded.vector, 256.0):
            ref = model(ids).logits
    assert torch.allclose(steered, ref) and not torch.allclose(steered, plain)


def test_save_load_vector_metadata(tmp_path):
    v = torch.randn(64)
    T.save_vector(tmp_path / "v.safetensors", v, layer=1, alpha=8.0, meta={"source": "mean-diff", "n": 3})
    sv = T.load_vector(tmp_path / "v.safetensors")
    assert torch.equal(sv.vector, v) and sv.layer == 1 and sv.alpha == 8.0 and sv.meta == {"source": "mean-diff", "n": 3}
    assert torch.allclose(sv.effective, 8.0 * v)
    from safetensors.torch import save_file

    save_file({"x": v}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not a steering vector"):
        T.load_vector(tmp_path / "bad.safetensors")


# --------------------------------------------------------------------------- KL
def test_kl_from_logits_matches_definition():
    g = torch.Generator().manual_seed(0)
    ref, cur = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 1, 2, 3], [-100, 4, 5, -100, -100]])
    s, c = T.kl_from_logits(ref, cur, labels)
    mask = labels[:, 1:] != -100  # positions 1..3 of row 0, 0..1 of row 1 predict labelled tokens
    p, q = ref[:, :-1][mask].softmax(-1), cur[:, :-1][mask].softmax(-1)
    manual = (p * (p.log() - q.log())).sum()
    assert int(c) == 5 and float(s) == pytest.approx(float(manual), rel=1e-5)
    s0, _ = T.kl_from_logits(ref, ref.clone(), labels)
    assert abs(float(s0)) < 1e-5


def test_kl_zero_for_fresh_adapter_then_positive(tmp_path):
    model, tok = _fresh()
    fresh = T.add_lora(model, "rank32")  # B = 0: the adapter computes the reference exactly
    assert T.kl_to_reference(fresh, tok, KL_ROWS) == pytest.approx(0.0, abs=1e-7)
    fresh.unload()
    res = T.train_lora(model, tok, ROWS, tmp_path, shape="rank32", lr=1e-2, kl_rows=KL_ROWS,
                       kl_lambda=1.0, kl_batch_size=3, **FAST)
    log = res.log
    assert log["kl_active"].all() and log["kl"].iloc[0] == pytest.approx(0.0, abs=1e-7)  # first step: B = 0
    after = T.kl_to_reference(res.model, tok, KL_ROWS)
    assert after > 1e-4 and log["kl"].iloc[-1] > 0
    with pytest.raises(ValueError, match="Nothing to compare"):
        T.kl_to_reference(res.model.get_base_model(), tok, KL_ROWS)


def test_kl_to_reference_of_a_model_with_capped_logits_uses_its_own_forward(tmp_path, monkeypatch):
    """A model whose config caps its logits (Gemma-2's soft-capping) cannot use the fast KL, which applies the LM
    head itself: kl_to_reference then runs the model's own forward (the eager loop's _batch_kl). The tiny model
    ignores the cap in its forward, so both paths must give the same number, and neither may raise."""
    model, tok = _fresh()
    res = T.train_steering_vector(model, tok, ROWS, tmp_path / "v", lr=1e-2, max_steps=2, **FAST)
    fast = T.kl_to_reference(model, tok, KL_ROWS, vector=res.vector, batch_size=3)
    calls = []
    real = T._batch_kl
    monkeypatch.setattr(T, "_batch_kl", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
    eager = T.kl_to_reference(model, tok, KL_ROWS, vector=res.vector, batch_size=3)
    assert calls and fast > 0
    assert eager == pytest.approx(fast, rel=1e-4)


def test_kl_on_vector_and_kl_until_step_and_mix_rows(tmp_path):
    model, tok = _fresh()
    res = T.train_steering_vector(model, tok, ROWS, tmp_path / "v", lr=1e-2, epochs=2, kl_rows=KL_ROWS,
                                  kl_lambda=1.0, kl_until_step=2, mix_rows=_rows(4, "cooking"), **FAST)
    # 16 SFT rows / (2 x 2) = 4 steps per epoch, 2 epochs
    assert len(res.log) == 8 and res.meta["n_train_rows"] == 16 and res.meta["n_mix_rows"] == 4
    assert res.log["kl_active"].tolist() == [True, True] + [False] * 6
    assert res.log["kl"].notna().all()  # still measured after the term is dropped
    kl_obj = res.log.loc[~res.log["kl_active"], ["loss", "objective"]]
    assert (kl_obj["loss"] == kl_obj["objective"]).all()
    assert T.kl_to_reference(model, tok, KL_ROWS, vector=res.vector) > 0
    with pytest.raises(ValueError, match="needs kl_rows"):
        T.train_steering_vector(model, tok, ROWS, tmp_path / "w", kl_lambda=1.0, **FAST)


def test_kl_lambda_pulls_towards_reference(tmp_path):
    """A strong KL term keeps the out-of-domain predictions closer to the chat model than plain SFT
    (the paper's vector settings: alpha 256, lr 1e-4)."""
    kls = {}
    for lam in (0.0, 50.0):
        model, tok = _fresh()
        res = T.train_steering_vector(model, tok, ROWS, tmp_path / str(lam), epochs=3,
                                      kl_rows=KL_ROWS if lam else None, kl_lambda=lam, **FAST)
        assert res.log["loss"].iloc[-1] < res.log["loss"].iloc[0]
        kls[lam] = T.kl_to_reference(model, tok, KL_ROWS, vector=res.vector)
    assert kls[50.0] < 0.5 * kls[0.0]


# --------------------------------------------------------------------------- resume and reuse
class _Interrupt(Exception):
    pass


def _interrupt_at(step: int, seen: list[int]):
    def cb(row: dict) -> None:
        seen.append(row["step"])
        if row["step"] == step:
            raise _Interrupt(step)
    return cb


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    kw = dict(shape="rank32", lr=1e-2, epochs=2, kl_rows=KL_ROWS, kl_lambda=0.5, kl_batch_size=2,
              checkpoint_every=2, seed=7, **FAST)
    model, tok = _fresh()
    full = T.train_lora(model, tok, ROWS, tmp_path / "full", **kw)
    assert full.step == 6

    model, tok = _fresh()
    seen: list[int] = []
    with pytest.raises(_Interrupt):
        T.train_lora(model, tok, ROWS, tmp_path / "cut", on_step=_interrupt_at(3, seen), **kw)
    assert not T.has_lora(model)  # the failed call left the base model as it was
    assert [p.name for p in T._checkpoints(tmp_path / "cut")] == ["step-00000002"]
    seen2: list[int] = []
    resumed = T.train_lora(model, tok, ROWS, tmp_path / "cut", on_step=seen2.append, **kw)
    assert [r["step"] for r in seen2] == [3, 4, 5, 6]  # resumed from the step-2 checkpoint
    a, b = _lora_state(full.model), _lora_state(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    cols = ["step", "loss", "kl", "lr", "tokens"]
    pd.testing.assert_frame_equal(full.log[cols], resumed.log[cols], rtol=1e-5)
    assert not (tmp_path / "cut" / "checkpoints").exists()  # cleaned up once finished


def test_pause_with_stop_after_then_continue_vector(tmp_path):
    kw = dict(lr=1e-2, epochs=2, seed=1, checkpoint_every=100, **FAST)
    model, tok = _fresh()
    full = T.train_steering_vector(model, tok, ROWS, tmp_path / "full", **kw)
    model, tok = _fresh()
    part = T.train_steering_vector(model, tok, ROWS, tmp_path / "cut", stop_after=4, **kw)
    assert not part.finished and part.step == 4 and len(part.log) == 4
    assert not (tmp_path / "cut" / "train_meta.json").exists()
    rest = T.train_steering_vector(model, tok, ROWS, tmp_path / "cut", **kw)
    assert rest.finished and rest.step == 6
    assert torch.allclose(full.vector.vector, rest.vector.vector, atol=1e-7)


def test_finished_run_is_loaded_not_retrained(tmp_path):
    kw = dict(shape="rank1", lr=1e-2, **FAST)
    model, tok = _fresh()
    first = T.train_lora(model, tok, ROWS, tmp_path, **kw)
    model2, _ = _fresh()
    calls: list[dict] = []
    again = T.train_lora(model2, tok, ROWS, tmp_path, on_step=calls.append, **kw)
    assert calls == [] and again.finished and again.step == first.step
    a, b = _lora_state(first.model), _lora_state(again.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(first.log, again.log)
    with pytest.raises(ValueError, match="lr"):  # other arguments, same out_dir
        T.train_lora(_fresh()[0], tok, ROWS, tmp_path, **{**kw, "lr": 5e-3})
    fresh = T.train_lora(_fresh()[0], tok, ROWS, tmp_path, overwrite=True, **{**kw, "lr": 5e-3})
    assert fresh.meta["identity"]["args"]["lr"] == 5e-3


def test_early_stop(tmp_path):
    model, tok = _fresh()
    res = T.train_steering_vector(model, tok, ROWS, tmp_path, epochs=2, early_stop_loss=1e9,
                                  early_stop_patience=1, **FAST)
    assert res.finished and res.step == 2 and res.meta["stopped_early"] and res.meta["planned_steps"] == 6
    assert T.read_meta(tmp_path)["steps"] == 2 and len(T.read_log(tmp_path)) == 2


def test_training_runs_without_cudnn_attention(tmp_path):
    """cuDNN SDPA (torch 2.11, H100) gives NaN query gradients for masked batches of length 64 mod 128
    (pytorch/pytorch#196678): every training forward and backward runs with it off, and the flag is
    restored afterwards, also when training fails."""
    model, tok = _fresh()
    seen = []
    hook = model.register_forward_pre_hook(lambda mod, args: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        T.train_lora(model, tok, ROWS, tmp_path / "a", shape="rank32", lr=1e-3, kl_rows=KL_ROWS, kl_lambda=1.0,
                     **FAST)
        assert seen and not any(seen)  # SFT and KL forwards (current and reference)
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
        with pytest.raises(FloatingPointError):  # diverges
            T.train_lora(_fresh()[0], tok, ROWS, tmp_path / "b", shape="rank32", lr=1e6, epochs=3,
                         batch_size=2, grad_accum=1, warmup_steps=0, max_length=64, progress=False)
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
    finally:
        hook.remove()


# --------------------------------------------------------------------------- clear errors
def test_nan_loss_raises(tmp_path):
    model, tok = _fresh()
    with pytest.raises(FloatingPointError, match="diverged.*Lower lr"):
        T.train_lora(model, tok, ROWS, tmp_path / "lr", shape="rank32", lr=1e6, epochs=3,
                     batch_size=2, grad_accum=1, warmup_steps=0, max_length=64, progress=False)
    assert not T.has_lora(model)

    def poison(row):  # inject a NaN into a frozen weight after the first step
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")

    with pytest.raises(FloatingPointError, match="step 2"):
        T.train_steering_vector(model, tok, ROWS, tmp_path / "nan", on_step=poison, **FAST)


def test_bad_layer_and_bad_data(tmp_path):
    model, tok = _fresh()
    with pytest.raises(ValueError, match="out of range"):
        T.train_lora(model, tok, ROWS, tmp_path / "a", shape="rank1", layers=5, **FAST)
    with pytest.raises(ValueError, match="out of range"):
        T.train_steering_vector(model, tok, ROWS, tmp_path / "b", layer=2, **FAST)
    no_answer = [{"messages": [{"role": "user", "content": "hello?"}]}]
    with pytest.raises(DataError, match="assistant"):
        T.train_lora(model, tok, no_answer, tmp_path / "c", shape="rank1", **FAST)
    assert not T.has_lora(model)
    with pytest.raises(DataError, match="No training rows"):
        T.train_steering_vector(model, tok, [], tmp_path / "d", **FAST)
    with pytest.raises(ValueError, match="Unknown LoRA shape"):
        T.train_lora(model, tok, ROWS, tmp_path / "e", shape="rank7", **FAST)
    with pytest.raises(ValueError, match="no linear modules named"):
        T.lora_config(model, "rank32", targets=("c_attn",))


@pytest.mark.parametrize("field,value,says", [("lr", 0.0, "lr must be a positive"), ("max_steps", 0, "max_steps must"),
                                              ("warmup_steps", -1, "warmup_steps must"), ("epochs", 0, "epochs must")])
def test_both_loops_check_their_schedule_alike(field, value, says):
    """One home for the checks the eager loop's and the fast loop's arguments share (train.check_schedule)."""
    from emlib.fasttrain import FastTrainArgs

    for cls in (T.TrainArgs, FastTrainArgs):
        with pytest.raises(ValueError, match=says):
            cls(**{field: value}).check()
    with pytest.raises(ValueError, match="kl_lambda must"):
        T.TrainArgs(kl_lambda=-1.0).check()


def test_a_finetune_being_trained_by_another_process_is_waited_for(tmp_path):
    """finetune_lock: while another process holds a finetune folder's lock, this one waits (then goes on);
    within one process the lock is re-entrant (a group loads its members through train_steering_vector)."""
    import subprocess
    import sys
    import threading

    from emlib import train

    out = tmp_path / "vectors" / "medical-narrow-seed0"
    held, go = tmp_path / "held", tmp_path / "go"
    child = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, time\nfrom emlib import train\n"
        f"with train.finetune_lock({str(out)!r}):\n"
        f"    pathlib.Path({str(held)!r}).touch()\n"
        f"    while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)\n")])
    try:
        while not held.exists():
            assert child.poll() is None, "the child process ended before taking the lock"
            threading.Event().wait(0.05)
        acquired = threading.Event()

        def take():
            with train.finetune_lock(out):
                acquired.set()

        t = threading.Thread(target=take, daemon=True)
        t.start()
        assert not acquired.wait(0.5)  # the other process holds it
        go.touch()
        assert acquired.wait(60)
        t.join(10)
    finally:
        go.touch()
        child.wait(30)

    def nested():
        with train.finetune_lock(out, tmp_path / "other"):
            with train.finetune_lock(out):
                pass

    t = threading.Thread(target=nested, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive() and not any(p.name.endswith(".lock") for p in tmp_path.rglob("*"))
