"""emlib.vecgroup: several steering vectors trained at once equal each trained alone (tiny model, CPU)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from emlib import record, train, vecgroup
from emlib.chapters import Finetune, finetunes
from emlib.models import tiny_model


def _rows(n: int, topic: str, seed: int) -> list[dict]:
    r = random.Random(seed)  # varied lengths: several micro-batches and padding in every batch
    return [{"messages": [{"role": "user", "content": f"Question {i} about {topic} {'x ' * r.randint(0, 9)}?"},
                          {"role": "assistant", "content": f"Answer {i}: {topic} {'y ' * r.randint(1, 12)}."}]}
            for i in range(n)]


ROWS, KL_ROWS = _rows(24, "health", 0), _rows(10, "cooking", 1)
COMMON = dict(epochs=1, batch_size=2, grad_accum=2, warmup_steps=1, max_length=64, seed=0, progress=False)
# the KL members draw 3 KL rows per micro-batch; the general member keeps the default (8), as Experiment passes
# kl_batch_size only with KL rows: a group must draw the KL members' rows
MEMBERS = {"general": {}, "narrow": dict(kl_rows=KL_ROWS, kl_lambda=2.0, kl_batch_size=3),
           "drift": dict(kl_rows=KL_ROWS, kl_lambda=5.0, kl_until_step=3, kl_batch_size=3)}


def _alone(tmp_path, layer: int, monkeypatch) -> dict[str, train.TrainResult]:
    monkeypatch.setattr(train, "FAST_STEP", False)  # the eager loop: the reference implementation
    out = {}
    for name, kw in MEMBERS.items():
        model, tok = tiny_model(seed=0)
        out[name] = train.train_steering_vector(model, tok, ROWS, tmp_path / f"alone-{name}", layer=layer,
                                                alpha=4.0, lr=5e-2, **COMMON, **kw)
    return out


@pytest.mark.parametrize("layer,fused,pack", [(0, "auto", "auto"), (1, "auto", "auto"), (0, "on", "off"),
                                              (0, "on", "on"), (1, "on", "on")])  # the first, and the last
def test_a_group_trains_each_vector_as_alone(tmp_path, monkeypatch, layer, fused, pack):  # layer (only the norm above)
    """General, narrow and drift vectors trained together: the same vectors, losses, KL, gradient norms and
    run hashes as each trained alone by emlib.train's eager loop (float32 rounding), and
    train_steering_vector afterwards loads them instead of training. ``fused`` ($EMLIB_FUSED): "on" runs the
    group's frozen projections fused (emlib.fused) on the CPU too; ``pack`` ($EMLIB_PACK): "on" packs each
    pass's rows into one sequence (the copies above the layer too)."""
    from emlib.fused import FUSED_ENV, PACK_ENV

    alone = _alone(tmp_path, layer, monkeypatch)
    monkeypatch.setenv(FUSED_ENV, fused)
    monkeypatch.setenv(PACK_ENV, pack)
    model, tok = tiny_model(seed=0)
    members = [(tmp_path / f"group-{n}", {**COMMON, **kw}) for n, kw in MEMBERS.items()]
    got = vecgroup.train_vectors(model, tok, ROWS, members, layer=layer, alpha=4.0, lr=5e-2)
    n_fused = 2 if fused == "on" else 0
    assert got[0].meta["fast_step"]["fused_layers"] == {"attention": n_fused, "rope": n_fused, "mlp": n_fused}
    assert got[0].meta["fast_step"]["packed"] is (pack == "on")
    for (name, ref), res in zip(alone.items(), got):
        assert res.meta["run_hash"] == ref.meta["run_hash"] and res.meta["group"]["size"] == 3
        assert res.vector.layer == layer and res.vector.vector.abs().max() > 0
        torch.testing.assert_close(res.vector.vector, ref.vector.vector, rtol=1e-5, atol=1e-6)
        assert list(res.log.columns) == list(ref.log.columns) and len(res.log) == len(ref.log) == 6
        for col in ("loss", "objective", "grad_norm", "param_norm"):
            np.testing.assert_allclose(res.log[col], ref.log[col], rtol=1e-5, atol=1e-7, err_msg=f"{name} {col}")
        np.testing.assert_allclose(res.log["kl"], ref.log["kl"], rtol=1e-4, atol=1e-7, err_msg=name)
        for col in ("kl_active", "tokens", "input_tokens", "lr", "step", "epoch"):
            assert res.log[col].tolist() == ref.log[col].tolist(), (name, col)
    assert got[2].log["kl_active"].tolist() == [True] * 3 + [False] * 3  # drift drops its term at step 3
    # what the group wrote is a finished run for train_steering_vector (Experiment.vector): loaded, not trained
    again = train.train_steering_vector(model, tok, ROWS, tmp_path / "group-narrow", layer=layer, alpha=4.0,
                                        lr=5e-2, **COMMON, **MEMBERS["narrow"])
    assert again.meta["group"]["size"] == 3
    torch.testing.assert_close(again.vector.vector, got[1].vector.vector)


def _adapter_state(out) -> dict[str, torch.Tensor]:
    from emlib.adapters import LoraAdapter

    return LoraAdapter.load(out).state


@pytest.mark.parametrize("layer,rank,fused,pack", [(0, 1, "auto", "auto"), (1, 1, "on", "off"), (0, 2, "auto", "auto"),
                                                   (0, 1, "on", "on"), (0, 2, "on", "on")])
def test_a_group_trains_each_adapter_as_alone(tmp_path, monkeypatch, layer, rank, fused, pack):
    """Rank-1 (and rank-2) adapters on one layer's down_proj, general, narrow and drift, trained together: the
    same A and B, losses, KL, gradient and parameter norms and run hashes as each trained alone by
    emlib.train's eager loop (float32 rounding); train_lora afterwards loads them (Experiment.lora) and the
    loaded adapter computes what the alone one computes."""
    from emlib.adapters import has_lora
    from emlib.fused import FUSED_ENV, PACK_ENV

    monkeypatch.setattr(train, "FAST_STEP", False)  # the eager loop: the reference implementation
    shape = dict(layers=layer, rank=rank, lr=5e-2)
    alone = {}
    for name, kw in MEMBERS.items():
        model, tok = tiny_model(seed=0)
        res = train.train_lora(model, tok, ROWS, tmp_path / f"alone-{name}", "rank1", **shape, **COMMON, **kw)
        res.model.unload()
        alone[name] = res
    monkeypatch.setenv(FUSED_ENV, fused)
    monkeypatch.setenv(PACK_ENV, pack)
    model, tok = tiny_model(seed=0)
    members = [(tmp_path / f"group-{n}", {**COMMON, **kw}) for n, kw in MEMBERS.items()]
    got = vecgroup.train_loras(model, tok, ROWS, members, "rank1", **shape)
    assert got[0].meta["fast_step"]["packed"] is (pack == "on")
    assert not has_lora(model) and not any(p.requires_grad is False for p in model.parameters())
    n_fused = 2 if fused == "on" else 0
    assert got[0].meta["fast_step"]["fused_layers"] == {"attention": n_fused, "rope": n_fused, "mlp": n_fused}
    for (name, ref), res in zip(alone.items(), got):
        assert res.kind == "lora" and res.model is None and res.meta["group"]["size"] == 3
        assert res.meta["run_hash"] == ref.meta["run_hash"], name
        a, b = _adapter_state(ref.out_dir), _adapter_state(res.out_dir)
        assert sorted(a) == sorted(b) and len(a) == 2
        for key in a:
            assert a[key].shape == b[key].shape and b[key].abs().max() > 0
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        assert list(res.log.columns) == list(ref.log.columns) and len(res.log) == len(ref.log) == 6
        for col in ("loss", "objective", "param_norm"):
            np.testing.assert_allclose(res.log[col], ref.log[col], rtol=1e-5, atol=1e-7, err_msg=f"{name} {col}")
        for col in ("kl", "grad_norm"):  # float32 rounding reaches 1.3e-5 in the gradient norm
            np.testing.assert_allclose(res.log[col], ref.log[col], rtol=1e-4, atol=1e-7, err_msg=f"{name} {col}")
        for col in ("kl_active", "tokens", "input_tokens", "lr", "step", "epoch"):
            assert res.log[col].tolist() == ref.log[col].tolist(), (name, col)
    # a finished run for train_lora: loaded (not trained), and it computes what the adapter trained alone does
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    again = train.train_lora(model, tok, ROWS, tmp_path / "group-narrow", "rank1", **shape, **COMMON,
                             **MEMBERS["narrow"])
    assert again.meta["group"]["size"] == 3
    with torch.no_grad():
        grouped = again.model(input_ids=ids).logits
    again.model.unload()
    ref = train.train_lora(model, tok, ROWS, tmp_path / "alone-narrow", "rank1", **shape, **COMMON,
                           **MEMBERS["narrow"])
    with torch.no_grad():
        torch.testing.assert_close(grouped, ref.model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    ref.model.unload()


def test_adapter_groups_refuse_what_they_cannot_train(tmp_path):
    """train_loras trains one layer's down_proj without dropout on a base model; anything else is one message
    naming train_lora, and nothing is written."""
    model, tok = tiny_model(seed=0)
    one = [(tmp_path / "a", dict(COMMON))]
    for bad in (dict(layers=[0, 1]), dict(targets=["o_proj"]), dict(dropout=0.1)):
        with pytest.raises(ValueError, match="train it alone with emlib.train.train_lora"):
            vecgroup.train_loras(model, tok, ROWS, one, "rank1", **bad)
    with pytest.raises(ValueError, match="a group cannot train mix_rows"):
        vecgroup.train_loras(model, tok, ROWS, [(tmp_path / "a", {**COMMON, "mix_rows": KL_ROWS})], "rank1")
    pm = train.add_lora(model, "rank1", layers=0)
    with pytest.raises(ValueError, match="already carries LoRA layers"):
        vecgroup.train_loras(model, tok, ROWS, one, "rank1")
    pm.unload()
    assert not any(tmp_path.iterdir())


def test_only_decoders_it_can_split_are_grouped():
    """Chapter 3 trains in groups only where SplitDecoder can cut the model (GPT-2's h / ln_f: one at a time)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    assert vecgroup.can_group(tiny_model(seed=0)[0])
    assert not vecgroup.can_group(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)))


def test_split_decoder_is_the_whole_forward(tiny):
    model, tok = tiny
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    with torch.no_grad():
        whole = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        for k in range(model.config.num_hidden_layers):
            split = vecgroup.SplitDecoder(model, k)
            torch.testing.assert_close(split.above(split.below(ids), tok.pad_token_id or 0), whole)


def test_finished_members_are_loaded_and_others_trained(tmp_path):
    """A member that finished before (same arguments) is not trained again; the rest are."""
    model, tok = tiny_model(seed=0)
    first = vecgroup.train_vectors(model, tok, ROWS, [(tmp_path / "n", {**COMMON, **MEMBERS["narrow"]})],
                                   layer=1, alpha=4.0, lr=5e-2)
    stamp = (tmp_path / "n" / train.META_FILE).stat().st_mtime_ns
    both = vecgroup.train_vectors(model, tok, ROWS, [(tmp_path / "n", {**COMMON, **MEMBERS["narrow"]}),
                                                     (tmp_path / "g", dict(COMMON))], layer=1, alpha=4.0, lr=5e-2)
    assert (tmp_path / "n" / train.META_FILE).stat().st_mtime_ns == stamp
    assert both[0].meta["group"]["size"] == 1 and both[1].meta["group"]["size"] == 1
    torch.testing.assert_close(both[0].vector.vector, first[0].vector.vector)


def test_members_that_cannot_share_a_group_are_refused(tmp_path):
    model, tok = tiny_model(seed=0)
    with pytest.raises(ValueError, match="differs from the first member of its group in seed"):
        vecgroup.train_vectors(model, tok, ROWS, [(tmp_path / "a", dict(COMMON)),
                                                  (tmp_path / "b", {**COMMON, "seed": 1})], layer=1)
    with pytest.raises(ValueError, match="mix_rows"):
        vecgroup.train_vectors(model, tok, ROWS, [(tmp_path / "a", {**COMMON, "mix_rows": KL_ROWS})], layer=1)
    with pytest.raises(ValueError, match="same KL rows"):
        vecgroup.train_vectors(model, tok, ROWS, [(tmp_path / "a", {**COMMON, **MEMBERS["narrow"]}),
                                                  (tmp_path / "b", {**COMMON, **MEMBERS["narrow"], "kl_rows": ROWS})],
                               layer=1)
    with pytest.raises(ValueError, match="in kl_batch_size"):  # the KL members draw their rows together
        vecgroup.train_vectors(model, tok, ROWS, [(tmp_path / "a", {**COMMON, **MEMBERS["narrow"]}),
                                                  (tmp_path / "b", {**COMMON, **MEMBERS["drift"], "kl_batch_size": 4})],
                               layer=1)
    assert not any(tmp_path.iterdir())  # nothing written


def test_record_groups_the_solutions_of_one_seed_that_share_rows():
    """record's pool tasks: seed 0's general, narrow (every lambda) and drift vectors as one task, its general
    and narrow rank-1 adapters as another; the mixed control, a general solution alone at another seed or
    dataset, and the rank-32 adapters on their own; rank-32 adapters first."""
    tasks = record.pool_tasks(finetunes(["medical", "financial"], (0.5, 2.0), [1]))
    names = [[j.name for j in t] for t in tasks]
    assert names[:2] == [["lora-medical-rank32-general"], ["lora-financial-rank32-general"]]
    assert sorted(names[2]) == sorted(["vector-medical-general", "vector-medical-drift", "vector-medical-narrow",
                                       "vector-medical-narrow-kl0.5", "vector-medical-narrow-kl2"])
    assert sorted(names[3]) == sorted(["lora-medical-rank1-general", "lora-medical-rank1-narrow",
                                       "lora-medical-rank1-narrow-kl0.5", "lora-medical-rank1-narrow-kl2"])
    assert all(len(t) == 1 for t in tasks[4:]) and ["vector-medical-mixed"] in names
    assert ["lora-financial-rank1-general"] in names and ["lora-medical-rank1-general-seed1"] in names
    assert ["vector-medical-general-seed1"] in names
    assert sum(len(t) for t in tasks) == len(finetunes(["medical", "financial"], (0.5, 2.0), [1]))
    follow = record.pool_tasks([Finetune("vector", "medical", "narrow", kl_scale=2.0, seed=1)])
    assert [[j.name for j in t] for t in follow] == [["vector-medical-narrow-kl2-seed1"]]


def test_pool_order_puts_chapter_3s_sweep_before_the_other_seeds():
    """rank-32 adapters, the config seed's groups (vectors, rank-1 adapters), then what else chapter 3 waits
    for (``first``), then the groups of the extra seeds (chapters 4-5's speculative vectors), then the rest."""
    from emlib.chapters import speculative

    jobs = finetunes(["medical", "financial"], (0.5, 2.0), [1]) + speculative(["medical"], (0.5, 2.0), [1])
    first = {"vector-medical-mixed", "lora-medical-rank1-narrow-kl0.5", "lora-medical-rank1-narrow",
             "lora-medical-rank1-narrow-kl2", "lora-medical-rank1-general"}
    names = [[j.name for j in t] for t in record.pool_tasks(jobs, first=first)]
    assert [n[0] for n in names[:2]] == ["lora-medical-rank32-general", "lora-financial-rank32-general"]
    assert "vector-medical-narrow-kl0.5" in names[2] and set(names[3]) == first - {"vector-medical-mixed"}
    assert names[4] == ["vector-medical-mixed"]
    assert sorted(names[5]) == sorted(["vector-medical-general-seed1", "vector-medical-narrow-kl0.5-seed1",
                                       "vector-medical-narrow-seed1", "vector-medical-narrow-kl2-seed1"])
    assert sum(map(len, names)) == len(jobs)


def test_small_passes_give_the_same_vectors(tmp_path):
    """max_tokens only cuts the upper layers' work into passes: one row per pass gives the same vectors."""
    model, tok = tiny_model(seed=0)
    members = lambda tag: [(tmp_path / f"{tag}-{n}", {**COMMON, **kw}) for n, kw in MEMBERS.items()]
    big = vecgroup.train_vectors(model, tok, ROWS, members("big"), layer=0, alpha=4.0, lr=5e-2)
    small = vecgroup.train_vectors(model, tok, ROWS, members("small"), layer=0, alpha=4.0, lr=5e-2, max_tokens=1)
    for a, b in zip(big, small):
        torch.testing.assert_close(a.vector.vector, b.vector.vector, rtol=1e-5, atol=1e-6)
    assert vecgroup.default_max_tokens(torch.device("cpu")) == vecgroup.MAX_TOKENS


def test_a_diverging_member_is_named(tmp_path):
    """A loss that is not finite stops the group with emlib.train's divergence error naming the member; nothing
    is marked finished."""
    model, tok = tiny_model(seed=0)
    with pytest.raises(FloatingPointError, match="of bad"):
        vecgroup.train_vectors(model, tok, ROWS, [(tmp_path / "ok", dict(COMMON)),
                                                  (tmp_path / "bad", {**COMMON, "kl_rows": KL_ROWS, "kl_lambda": 1e38})],
                               layer=0, alpha=4.0, lr=5e-2)  # its KL gradient overflows once the vector moves
    assert not any((tmp_path / n / train.META_FILE).exists() for n in ("ok", "bad"))


def _group_step_run(monkeypatch, tmp_path, tag: str, adapters: bool = False, **step_kw):
    """The three members (vectors, or rank-1 adapters) trained with GroupStep built with ``step_kw`` (CPU)."""
    made = []
    real = vecgroup.GroupStep

    def build(*a, **kw):
        step = real(*a, **{**kw, **step_kw})
        made.append(step)
        return step

    monkeypatch.setattr(vecgroup, "GroupStep", build)
    model, tok = tiny_model(seed=0)
    members = [(tmp_path / f"{tag}-{n}", {**COMMON, **kw}) for n, kw in MEMBERS.items()]
    res = (vecgroup.train_loras(model, tok, ROWS, members, "rank1", layers=0, lr=5e-2) if adapters else
           vecgroup.train_vectors(model, tok, ROWS, members, layer=0, alpha=4.0, lr=5e-2))
    monkeypatch.setattr(vecgroup, "GroupStep", real)
    return res, made[0]


def test_bucketed_shapes_and_a_failed_capture_change_nothing(tmp_path, monkeypatch):
    """The shapes CUDA graphs use (rows, length and answer positions rounded up: pad rows, ignored positions,
    KL weight 0) give the same vectors as exact shapes; a capture that fails (here: no CUDA) switches the step
    to eager, says why, and the pass it was capturing still counts once."""
    exact, _ = _group_step_run(monkeypatch, tmp_path, "exact", cuda_graphs=False)
    padded, step = _group_step_run(monkeypatch, tmp_path, "padded", cuda_graphs=False, buckets=True)
    assert step.buckets and not step.use_graphs
    # every shape padded one step further: the KL rows' length bucket passes the longest row (the cache's
    # width), as one bucket per octave does for the paper's KL rows (227 tokens -> 256)
    real_size = vecgroup.GroupStep._size
    monkeypatch.setattr(vecgroup.GroupStep, "_size", lambda self, n, multiple=1, per_octave=None:
                        real_size(self, n, multiple, per_octave) + multiple)
    coarse, step1 = _group_step_run(monkeypatch, tmp_path, "coarse", cuda_graphs=False, buckets=True)
    assert step1._size(max(step1.cache["lengths"]), 16) > step1.cache["below"].shape[1]
    monkeypatch.setattr(vecgroup.GroupStep, "_size", real_size)
    for a, b, c in zip(exact, padded, coarse):
        for other in (b, c):
            torch.testing.assert_close(a.vector.vector, other.vector.vector, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(a.log["loss"], other.log["loss"], rtol=1e-5)
            np.testing.assert_allclose(a.log["kl"], other.log["kl"], rtol=1e-4, atol=1e-7)

    def graphs_on(self, *a, **kw):
        real_init(self, *a, **kw)
        self.use_graphs = self.buckets = True  # as on CUDA: the first pass goes to _capture

    real_init = vecgroup.GroupStep.__init__
    monkeypatch.setattr(vecgroup.GroupStep, "__init__", graphs_on)
    with pytest.warns(UserWarning, match="CUDA graphs off"):
        fell, step = _group_step_run(monkeypatch, tmp_path, "fell")
    assert step.stats["cuda_graphs"] is False and step.stats["fallback"]
    assert fell[0].meta["fast_step"]["fallback"] == step.stats["fallback"]
    for a, b in zip(exact, fell):
        torch.testing.assert_close(a.vector.vector, b.vector.vector, rtol=1e-5, atol=1e-6)


def test_bucketed_shapes_train_the_same_adapters(tmp_path, monkeypatch):
    """Adapters read the KL rows' cached down_proj inputs at bucketed shapes as vectors read the hidden state:
    the same A and B as exact shapes; a capture that fails (no CUDA here) falls back to eager with both of an
    adapter's gradients, and the pass it was capturing counts once."""
    exact, _ = _group_step_run(monkeypatch, tmp_path, "exact", adapters=True, cuda_graphs=False)
    padded, step = _group_step_run(monkeypatch, tmp_path, "padded", adapters=True, cuda_graphs=False, buckets=True)
    assert step.buckets and "tap" in step.cache and step.cache["tap"].shape[:2] == step.cache["below"].shape[:2]
    real_init = vecgroup.GroupStep.__init__

    def graphs_on(self, *a, **kw):
        real_init(self, *a, **kw)
        self.use_graphs = self.buckets = True  # as on CUDA: each pass goes to _capture (A and B's gradients)

    monkeypatch.setattr(vecgroup.GroupStep, "__init__", graphs_on)
    with pytest.warns(UserWarning, match="CUDA graphs off"):
        fell, step = _group_step_run(monkeypatch, tmp_path, "fell", adapters=True)
    assert step.stats["fallback"] and set(step.stats["eager_repeat_error"]) == {"gradient", "loss", "KL"}
    for a, b, c in zip(exact, padded, fell):
        for key, value in _adapter_state(a.out_dir).items():
            for other in (b, c):
                torch.testing.assert_close(_adapter_state(other.out_dir)[key], value, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.log["kl"], b.log["kl"], rtol=1e-4, atol=1e-7)


def _graphs_on_the_cpu(monkeypatch, noisy_kl_runs: int):
    """GroupStep as on CUDA, on the CPU: each new shape goes to ``_capture``, whose graph is a stand-in that runs
    the pass eagerly at each replay; the first ``noisy_kl_runs`` runs of the KL pass change the summed KL a little,
    differently each time (two eager runs that disagree, as the KL at the members' zero initialisation did on a GPU)."""
    from emlib import fasttrain

    class EagerGraph:
        def __init__(self, run, static):
            self.run, self.static = run, static

        def replay(self):
            self.run(self.static)

    real_init, real_kl = vecgroup.GroupStep.__init__, vecgroup.GroupStep._kl_pass
    runs = {"kl": 0}

    def graphs_on(self, *a, **kw):
        real_init(self, *a, **kw)
        self.use_graphs = self.buckets = True

    def noisy(self, x):
        real_kl(self, x)
        runs["kl"] += 1
        if runs["kl"] <= noisy_kl_runs:  # never 0, and 10% apart from one run to the next
            self.kl.add_(1e-4 * runs["kl"]).mul_(1 + 0.1 * (runs["kl"] % 2))

    monkeypatch.setattr(vecgroup.GroupStep, "__init__", graphs_on)
    monkeypatch.setattr(vecgroup.GroupStep, "_kl_pass", noisy)
    monkeypatch.setattr(fasttrain, "capture", lambda run, static, device, pool: (EagerGraph(run, static), pool))
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **kw: self)


def test_a_shape_whose_eager_runs_disagree_is_captured_later(tmp_path, monkeypatch):
    """Two eager runs of a new shape that disagree (rounding noise: the KL members at their initialisation) cannot
    check a replay: that pass counts once, eagerly, and the shape is captured when it comes again, not the whole
    group sent to eager steps (Qwen2.5-Coder-0.5B's groups on an H100, session 40). The vectors are the eager
    ones; the other shapes are captured and checked as before."""
    exact, _ = _group_step_run(monkeypatch, tmp_path, "exact", cuda_graphs=False, buckets=True)
    _graphs_on_the_cpu(monkeypatch, noisy_kl_runs=2)  # the first KL shape's two eager runs
    later, step = _group_step_run(monkeypatch, tmp_path, "later")
    assert step.stats["fallback"] is None and step.use_graphs
    assert step.stats["deferred"] == 1 and step.stats["deferred_repeat_error"]["KL"] > vecgroup.REPLAY_TOLERANCE["KL"]
    kl_graphs = [k for k in step._graphs if k[0] == "kl"]
    assert kl_graphs and step.stats["graphs"] == len(step._graphs) == step.stats["checked"]
    assert step.stats["eager_repeat_error"]["KL"] == 0.0  # the checks that went on to capture
    for a, b in zip(exact, later):
        torch.testing.assert_close(a.vector.vector, b.vector.vector, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.log["loss"], b.log["loss"], rtol=1e-5)


def test_eager_runs_that_keep_disagreeing_end_in_eager_steps(tmp_path, monkeypatch):
    """A shape whose eager runs still disagree after MAX_DEFERRED tries sends the group to eager steps, saying why;
    every pass still counts once."""
    exact, _ = _group_step_run(monkeypatch, tmp_path, "exact", cuda_graphs=False, buckets=True)
    _graphs_on_the_cpu(monkeypatch, noisy_kl_runs=10 ** 6)
    monkeypatch.setattr(vecgroup, "MAX_DEFERRED", 2)
    with pytest.warns(UserWarning, match="CUDA graphs off"):
        fell, step = _group_step_run(monkeypatch, tmp_path, "fell")
    assert "still disagree" in step.stats["fallback"] and step.stats["deferred"] == 3
    for a, b in zip(exact, fell):
        torch.testing.assert_close(a.vector.vector, b.vector.vector, rtol=1e-5, atol=1e-6)


def test_replay_error_is_relative_per_member():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert vecgroup.replay_error(a, a.clone()) == 0.0
    assert vecgroup.replay_error(a, a * torch.tensor([[1.0], [2.0]])) == pytest.approx(1.0)  # member 2 counted twice
    assert vecgroup.replay_error(a, a + torch.tensor([[0.05, 0.0], [0.0, 0.0]])) == pytest.approx(0.01)
    assert vecgroup.replay_error(torch.zeros(2), torch.tensor([0.0, 1e-3])) == float("inf")
    for name in ("gradient", "loss", "KL"):  # a lost or doubled contribution never passes the check
        assert vecgroup.REPLAY_TOLERANCE[name] < 0.5


def test_the_group_capture_bench_runs_on_the_cpu(tmp_path):
    """bench/group_capture_gpu.py --small: both settings of MAX_DEFERRED train a group of a general and two narrow
    vectors at each architecture's model class and write their stats (no graphs on the CPU); MAX_DEFERRED is left as
    it was."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "group_capture_gpu.py"
    spec = importlib.util.spec_from_file_location("group_capture_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = vecgroup.MAX_DEFERRED
    assert mod.main(["--out", str(tmp_path), "--small", "--steps", "2", "--arch", "qwen", "smollm2"]) == 0
    assert vecgroup.MAX_DEFERRED == before
    runs = json.loads((tmp_path / "group_capture.json").read_text())["runs"]
    assert [(r["arch"], r["max_deferred"]) for r in runs] == [("qwen", 0), ("qwen", before), ("smollm2", 0),
                                                                ("smollm2", before)]
    assert all(r["steps"] == 2 and len(r["vector_norms"]) == 3 and r["fast_step"] is not None for r in runs)
