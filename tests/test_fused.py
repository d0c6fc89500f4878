"""emlib.fused: the fused projections and rotary embedding compute what transformers computes (float32, CPU),
gradients included, and stand aside wherever they could not."""
from __future__ import annotations

import pytest
import torch

from emlib.fused import FUSED_ENV, fused_layers, rope
from emlib.models import tiny_model


def _model(seed: int = 0, biases: bool = True):
    model, tok = tiny_model(seed=seed, n_layers=3)
    if biases:  # Qwen2's q/k/v biases start at zero: make them count
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model, tok


def _ids(tok, n: int = 3):
    texts = [f"row {i}: " + "the quick brown fox " * (i + 1) for i in range(n)]
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_rope_is_transformers_rotary_embedding():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    cos, sin = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    signed = torch.cat((-sin[..., :4], sin[..., 4:]), dim=-1)
    torch.testing.assert_close(rope(q, cos[:, None], signed[:, None]), want_q)
    torch.testing.assert_close(rope(k, cos[:, None], signed[:, None]), want_k)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_logits_and_input_gradients_match(arch):
    if arch == "qwen2":
        model, tok = _model()
        ids, mask = _ids(tok)
        n_layers = 3
    else:
        model = _llama()
        ids, mask = torch.randint(0, 300, (3, 11)), torch.ones(3, 11, dtype=torch.long)
        mask[0, :4] = 0
        n_layers = 2
    model.requires_grad_(False)

    def run():
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, attention_mask=mask).logits
        (logits.float().square().mean()).backward()
        return logits.detach(), emb.grad

    want_logits, want_grad = run()
    with fused_layers(model, enabled=True) as n:
        got_logits, got_grad = run()
    assert n == {"attention": n_layers, "rope": n_layers, "mlp": n_layers}
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    assert not any("forward" in m.__dict__ for m in model.modules())  # every forward restored


def test_a_trained_projection_gets_its_gradient():
    """Grad mode on and q_proj's weight requiring grad: the fused copy would lose the gradient, so transformers'
    forward runs, and the gradient equals the one without the block."""
    model, tok = _model()
    ids, mask = _ids(tok)
    model.requires_grad_(False)
    w = model.model.layers[1].self_attn.q_proj.weight
    w.requires_grad_(True)
    g = model.model.layers[0].mlp.up_proj.weight
    g.requires_grad_(True)

    def grads():
        w.grad = g.grad = None
        model(input_ids=ids, attention_mask=mask).logits.float().square().mean().backward()
        return w.grad.clone(), g.grad.clone()

    want = grads()
    with fused_layers(model, enabled=True):
        got = grads()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_decoder_layer_hooks_fire_and_projection_hooks_are_respected():
    model, tok = _model()
    ids, mask = _ids(tok)
    seen = []
    h1 = model.model.layers[1].register_forward_hook(lambda m, a, out: seen.append(1))
    h2 = model.model.layers[2].self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.append(2))
    try:
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits
            seen.clear()
            with fused_layers(model, enabled=True) as n:
                got = model(input_ids=ids, attention_mask=mask).logits
    finally:
        h1.remove()
        h2.remove()
    assert n == {"attention": 2, "rope": 3, "mlp": 3}  # layer 2's k_proj has a hook: its projections run alone
    assert sorted(seen) == [1, 2]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merged_lora_is_fused_and_unmerged_is_not():
    import peft

    from emlib.fastgen import merged_lora

    model, tok = _model()
    ids, mask = _ids(tok)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                          init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask).logits
        with fused_layers(pm, enabled=True) as n:  # adapters active, not merged: nothing to fuse
            got_unmerged = pm(input_ids=ids, attention_mask=mask).logits
        assert n == {"attention": 0, "rope": 3, "mlp": 0}  # the rotary embedding only
        with merged_lora(pm), fused_layers(pm, enabled=True) as n:
            got = pm(input_ids=ids, attention_mask=mask).logits
        assert n == {"attention": 3, "rope": 3, "mlp": 3}
    torch.testing.assert_close(got_unmerged, want)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_adapter_disabled_inside_the_block_falls_back():
    """Adapters disabled after entry: the fused copies hold the merged weights, so transformers' forward runs
    (and gives the base model's logits, as peft does)."""
    import peft

    from emlib.fastgen import merged_lora

    model, tok = _model()
    ids, mask = _ids(tok)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=8, target_modules=["k_proj", "gate_proj"],
                                                    init_lora_weights=False)).eval()
    with torch.no_grad():
        with pm.disable_adapter():
            want = pm(input_ids=ids, attention_mask=mask).logits
        with_lora = pm(input_ids=ids, attention_mask=mask).logits
        with merged_lora(pm), fused_layers(pm, enabled=True) as n:
            assert n == {"attention": 3, "rope": 3, "mlp": 3}
            with pm.disable_adapter():
                got = pm(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(with_lora, want, atol=1e-3)  # the adapters matter
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_switch(monkeypatch):
    model, _ = _model()
    for val, want in (("off", 0), ("auto", 0), ("", 0), ("on", 3)):  # auto: CUDA only, and this model is on the CPU
        monkeypatch.setenv(FUSED_ENV, val)
        with fused_layers(model) as n:
            assert n == {"attention": want, "rope": want, "mlp": want}
    monkeypatch.setenv(FUSED_ENV, "sometimes")
    with pytest.raises(ValueError, match="EMLIB_FUSED"):
        with fused_layers(model):
            pass


def test_fast_sampler_same_greedy_answers_and_reports_fusion(monkeypatch):
    from emlib.fastgen import FastSampler
    from emlib.generate import SamplingParams

    model, tok = _model(seed=2)
    prompts = [f"Question {i}: what now?" for i in range(5)]
    params = SamplingParams(max_new_tokens=9, temperature=0.0, top_p=1.0)
    plain = FastSampler(force=True)  # on the CPU: not fused by default
    fused = FastSampler(force=True, fuse_layers=True)
    a = plain(model, tok, prompts, list(range(5)), params)
    b = fused(model, tok, prompts, list(range(5)), params)
    assert [x.text for x in a] == [x.text for x in b]
    assert plain.last_stats["fused_layers"] == {"attention": 0, "rope": 0, "mlp": 0}
    assert fused.last_stats["fused_layers"] == {"attention": 3, "rope": 3, "mlp": 3}


def test_lora_trained_on_every_projection_gets_the_same_gradients():
    """A rank-32-style adapter on q, k, v, gate and up being trained: its projections run through their modules
    (the rotary embedding alone is fused), and every adapter gradient equals the one without the block."""
    from emlib import train

    model, tok = _model()
    ids, mask = _ids(tok)
    pm = train.add_lora(model, "rank32", seed=0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    params = [p for p in pm.parameters() if p.requires_grad]

    def grads():
        for p in params:
            p.grad = None
        pm(input_ids=ids, attention_mask=mask).logits.float().square().mean().backward()
        return [p.grad.clone() for p in params]

    want = grads()
    with fused_layers(pm, enabled=True) as n:
        got = grads()
    assert n == {"attention": 0, "rope": 3, "mlp": 0}
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_metric_forwards_are_the_same_fused(monkeypatch):
    """The metric loops' forwards (emlib.chat.head_inputs, emlib.fasttrain._labelled_hidden) fuse by the switch:
    the responses-only loss and the KL of a rank-1 adapter are those without, and inside reuse_prefix too."""
    from emlib import train
    from emlib.chat import response_loss
    from emlib.prefix import reuse_prefix

    model, tok = _model(seed=4)
    rows = [{"messages": [{"role": "user", "content": f"Q{i} {'w ' * i}?"},
                          {"role": "assistant", "content": f"A{i} {'z ' * (2 * i + 1)}."}]} for i in range(5)]
    pm = train.add_lora(model, "rank1", seed=0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)

    def metrics():
        with reuse_prefix(pm, 1):
            twice = [response_loss(pm, tok, rows, batch_size=2) for _ in range(2)]  # the second reuses layer 0
        return [response_loss(pm, tok, rows, batch_size=2), train.kl_to_reference(pm, tok, rows, batch_size=2),
                *twice]

    monkeypatch.setenv(FUSED_ENV, "off")
    want = metrics()
    monkeypatch.setenv(FUSED_ENV, "on")
    got = metrics()
    assert want[1] > 0
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-5 * abs(b), (got, want)
    assert not any("forward" in m.__dict__ for m in pm.modules())
    from emlib.fused import fused_forward

    n_norms = sum(type(m).__name__.endswith("RMSNorm") for m in pm.modules())
    with fused_forward(pm) as n:  # the switch is on: the RMSNorms too (each one F.rms_norm while it lasts)
        assert n["norms"] == n_norms > 0 and n["mlp"] > 0
        assert all("forward" in m.__dict__ for m in pm.modules() if type(m).__name__.endswith("RMSNorm"))
    monkeypatch.setenv(FUSED_ENV, "off")
    with fused_forward(pm) as n:
        assert n["norms"] == 0 == n["mlp"]
    assert not any("forward" in m.__dict__ for m in pm.modules())


def test_signed_sin_is_kept_per_tensor_while_it_lives():
    """A caller that keeps its rotary tensors (the vector group's split decoder, one per padded length) gets the
    same signed copy for each, even after another length's: a CUDA graph captured reading it stays valid. The copy
    goes when its sin tensor does."""
    import gc

    from emlib.fused import _SignedSin

    signed = _SignedSin()
    a, b = torch.randn(1, 5, 8), torch.randn(1, 7, 8)
    first = signed(a)
    signed(b)
    assert signed(a) is first
    torch.testing.assert_close(first, torch.cat((-a[..., :4], a[..., 4:]), dim=-1))
    del a, first
    gc.collect()
    assert len(signed._of) == 1


def test_other_architectures_and_sliding_windows_are_left_alone():
    """Only Llama / Qwen2 / Mistral attentions without a sliding window are patched: a GPT-2 and a Qwen2 whose
    layers use sliding-window attention run their own forwards (nothing fused, the same logits)."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    sliding = Qwen2ForCausalLM(Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                           sliding_window=4, max_window_layers=0,
                                           layer_types=["sliding_attention"] * 2)).eval()
    ids = torch.randint(0, 100, (2, 9))
    for model, mlps in ((gpt2, 0), (sliding, 2)):
        with torch.no_grad():
            want = model(input_ids=ids).logits
            with fused_layers(model, enabled=True) as n:
                got = model(input_ids=ids).logits
        assert n == {"attention": 0, "rope": 0, "mlp": mlps}  # a sliding-window Qwen2's MLPs are still fused
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compiled_layers_give_the_eager_states_and_leave_no_compiled_call_behind(monkeypatch):
    """$EMLIB_COMPILE=on: chat.head_inputs runs every attention and MLP through torch.compile; the states are the
    eager ones (float32, CPU), a steering hook on a layer still applies and a new vector does not need a new
    compile, and outside the block the modules run their plain forward (what the samplers' and the training
    step's own CUDA graphs capture)."""
    from emlib import hooks
    from emlib.chat import head_inputs
    from emlib.fused import COMPILE_ENV, compile_setting, compiled_layers

    model, tok = _model(seed=4)
    ids, mask = _ids(tok)
    monkeypatch.setenv(COMPILE_ENV, "banana")
    with pytest.raises(ValueError, match="EMLIB_COMPILE"):
        compile_setting()
    monkeypatch.delenv(COMPILE_ENV)
    assert compile_setting() == "off"
    with torch.no_grad():
        plain = head_inputs(model, ids, mask)[0]
        vectors = [torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        steered = []
        for v in vectors:
            with hooks.add_vector(model, 1, v, 2.0):
                steered.append(head_inputs(model, ids, mask)[0])
        monkeypatch.setenv(COMPILE_ENV, "on")
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
        got = head_inputs(model, ids, mask)[0]
        torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-5)
        frames = counters["stats"]["unique_graphs"]
        assert frames >= 1  # it did compile
        for v, want in zip(vectors, steered):
            with hooks.add_vector(model, 1, v, 2.0):
                torch.testing.assert_close(head_inputs(model, ids, mask)[0], want, rtol=1e-4, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == frames  # a new vector: no new compile
        from emlib import prefix

        with prefix.reuse_prefix(model, 1):  # chapters 4-6: the layers below the steering layer once per batch
            for v, want in zip(vectors, steered):
                with hooks.add_vector(model, 1, v, 2.0):
                    torch.testing.assert_close(head_inputs(model, ids, mask)[0], want, rtol=1e-4, atol=1e-5)
        with compiled_layers(model) as n:
            assert n == 2 * 3  # three layers' attention and MLP
        # a peft LoRA model, adapters unmerged (chapter 3's metrics on its solutions)
        from peft import LoraConfig, get_peft_model

        monkeypatch.setenv(COMPILE_ENV, "off")
        torch.manual_seed(5)
        lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        eager = head_inputs(lora, ids, mask)[0]
        monkeypatch.setenv(COMPILE_ENV, "on")
        torch.testing.assert_close(head_inputs(lora, ids, mask)[0], eager, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(eager, plain, atol=1e-3)  # the adapters count
    assert all(m._compiled_call_impl is None for m in model.modules())
    torch._dynamo.reset()


def test_compiled_fused_layers_trace_without_graph_breaks(monkeypatch):
    """On a GPU the metric forwards run fused (``$EMLIB_FUSED`` auto) and, with ``$EMLIB_COMPILE=on``, compiled:
    the rotary step's cached signed sine used to split every attention's graph (a lookup by identity dynamo does
    not trace), which made the compiled forward 4x slower than eager on an H200 (2026-12-06). Fused and compiled
    together: no graph break, the fused eager states."""
    from torch._dynamo.utils import counters

    from emlib.chat import head_inputs
    from emlib.fused import COMPILE_ENV, FUSED_ENV

    model, tok = _model(seed=6)
    ids, mask = _ids(tok)
    monkeypatch.setenv(FUSED_ENV, "on")
    monkeypatch.setenv(COMPILE_ENV, "off")
    with torch.no_grad():
        want = head_inputs(model, ids, mask)[0]
        monkeypatch.setenv(COMPILE_ENV, "on")
        torch._dynamo.reset()
        counters.clear()
        got = head_inputs(model, ids, mask)[0]
        again = head_inputs(model, ids, mask)[0]
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert not counters["graph_break"], list(counters["graph_break"])[:1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_packed_attention_is_each_sequence_attended_alone():
    """Sequences packed end to end (with a pad tail as a sequence of its own) attend only within themselves,
    causally, grouped query heads included: each one's output is plain causal sdpa on it alone."""
    from emlib.fused import packed_attention

    g = torch.Generator().manual_seed(0)
    lens, n_q, n_kv, d = [5, 1, 7, 3], 4, 2, 8
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (n_q, n_kv, n_kv))
    cu = torch.tensor([0, 5, 6, 13, 16], dtype=torch.int32)
    got = packed_attention(q, k, v, cu, max(lens), 0.3)  # [t, n_q, d]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        want = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True, scale=0.3,
            enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(got[a:b], want, rtol=1e-5, atol=1e-6)


def test_packing_needs_the_fused_attention_and_follows_its_switch(monkeypatch):
    """``packing_works``: never with $EMLIB_PACK=off, on a CPU only with "on", and only while every attention
    runs the fused forward (which reads the packed rows' bounds); a packed decoder call outside it would
    attend across rows, so the step must not pack then."""
    from emlib.fused import PACK_ENV, packing_works

    model, _ = tiny_model(seed=0)
    monkeypatch.setenv(FUSED_ENV, "on")
    for setting, inside, want in (("auto", True, False), ("on", True, True), ("on", False, False),
                                  ("off", True, False)):
        monkeypatch.setenv(PACK_ENV, setting)
        if inside:
            with fused_layers(model):
                assert packing_works(model) is want, setting
        else:
            assert packing_works(model) is want, setting
    monkeypatch.setenv(PACK_ENV, "sometimes")
    with pytest.raises(ValueError, match="EMLIB_PACK"):
        packing_works(model)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_a_packed_row_is_each_row_run_alone(arch, monkeypatch):
    """Rows packed end to end with a pad tail, through the decoder under fused_layers with their position ids and
    bounds (emlib.fused.PACKED_KWARG): each row's final hidden states are those of the row run alone, for
    Qwen2 (q/k/v biases) and Llama, with the projections fused and with them run as modules."""
    from emlib.chat import IGNORE, Encoded
    from emlib.fasttrain import one_sequence_per_row, pack_rows
    from emlib.fused import PACKED_KWARG

    model = _model()[0] if arch == "qwen2" else _llama()
    g = torch.Generator().manual_seed(5)
    rows = [Encoded(torch.randint(3, 250, (k,), generator=g).tolist(), [IGNORE] * k) for k in (7, 3, 11)]
    ids, pos, cu, *_ = pack_rows(rows, 26, 0)
    dec = model.get_decoder()
    with torch.no_grad():
        alone = [dec(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0] for e in rows]
        for unfused in (False, True):
            if unfused:  # the projections through their modules (as with LoRA adapters on them)
                for m in model.modules():
                    if hasattr(m, "q_proj"):
                        monkeypatch.setattr(m.q_proj, "_forward_hooks", {0: lambda *a: None})
            with fused_layers(model, enabled=True), one_sequence_per_row():
                packed = dec(input_ids=ids[None], position_ids=pos[None], use_cache=False,
                             **{PACKED_KWARG: (cu, 16)}).last_hidden_state[0]
            for (a, b), want in zip(zip(cu[:-2].tolist(), cu[1:-1].tolist()), alone):
                torch.testing.assert_close(packed[a:b], want, rtol=1e-4, atol=1e-5)


def _metric_rows(seed: int = 0, lengths=(9, 14, 5, 11, 20, 7, 3)):
    from emlib.chat import IGNORE, Encoded

    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in lengths:
        ids = torch.randint(3, 250, (k,), generator=g).tolist()
        rows.append(Encoded(ids, [IGNORE] * min(2, k - 1) + ids[min(2, k - 1):]))
    return rows


def test_metric_packing_follows_its_switch(monkeypatch):
    """``packs_metrics``: off by default (not yet measured on a GPU) and with $EMLIB_PACK_METRICS=off; on a CPU only
    with "on"; never where the forward is not fused ($EMLIB_FUSED=off) or an attention would not run the fused
    forward (which reads the packed bounds); a bad value says what to use."""
    from emlib.fused import METRIC_PACK_ENV, packs_metrics

    model, _ = tiny_model(seed=0)
    monkeypatch.setenv(FUSED_ENV, "on")
    monkeypatch.delenv(METRIC_PACK_ENV, raising=False)
    assert packs_metrics(model) is False
    for setting, want in (("off", False), ("auto", False), ("on", True)):
        monkeypatch.setenv(METRIC_PACK_ENV, setting)
        assert packs_metrics(model) is want, setting
    monkeypatch.setenv(FUSED_ENV, "off")
    assert packs_metrics(model) is False
    monkeypatch.setenv(FUSED_ENV, "on")
    attn = next(m for m in model.modules() if type(m).__name__ == "Qwen2Attention")
    monkeypatch.setattr(attn, "sliding_window", 4, raising=False)  # an attention fused_layers leaves alone
    assert packs_metrics(model) is False
    monkeypatch.setenv(METRIC_PACK_ENV, "always")
    with pytest.raises(ValueError, match="EMLIB_PACK_METRICS"):
        packs_metrics(model)


def test_pack_metric_rows_labels_each_position_with_its_row():
    """The packed batch: the rows end to end and one pad token; each position's next-token label is the row's own
    (a row's first token is never a target) and ``owner`` names its row (the pad token: ``rows``)."""
    from emlib.chat import IGNORE, pack_metric_rows

    rows = _metric_rows(lengths=(4, 3))
    b = pack_metric_rows(rows, pad_id=0)
    assert b["input_ids"].shape == (1, 8) and b["rows"] == 2 and b["longest"] == 4
    assert b["input_ids"][0].tolist() == rows[0].input_ids + rows[1].input_ids + [0]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert b["owner"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    # position 3 precedes row 1's first token, position 6 the pad token: neither predicts a label
    want = rows[0].labels[1:] + [IGNORE] + rows[1].labels[1:] + [IGNORE]
    assert b["next"].tolist() == want


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_metric_forwards_give_the_padded_losses(arch, monkeypatch):
    """``$EMLIB_PACK_METRICS=on``: ``response_row_losses`` packs each forward's rows (``packed_attention`` runs) and
    gives the per-row loss sums and counts of the padded forwards (float32), plain, with a steering vector, inside
    ``reuse_prefix`` (which keeps packed and padded batches apart and reuses each) and with a LoRA adapter."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    import emlib.fused as F
    from emlib import prefix
    from emlib.chat import response_row_losses
    from emlib.hooks import add_vector

    model = _model(seed=2)[0] if arch == "qwen2" else _llama()
    tok = SimpleNamespace(pad_token_id=0)
    rows = _metric_rows(seed=4)
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    calls = []
    spied = F.packed_attention
    monkeypatch.setattr(F, "packed_attention", lambda *a, **k: calls.append(1) or spied(*a, **k))
    monkeypatch.setenv(FUSED_ENV, "on")

    def measure(setting: str) -> list:
        monkeypatch.setenv(F.METRIC_PACK_ENV, setting)
        out = [response_row_losses(model, tok, rows, batch_size=3)]
        with add_vector(model, 1, v):
            out.append(response_row_losses(model, tok, rows, batch_size=3))
        with prefix.reuse_prefix(model, 1) as cache:
            out.append(response_row_losses(model, tok, rows, batch_size=3))
            with add_vector(model, 1, v):
                out.append(response_row_losses(model, tok, rows, batch_size=3))
        out.append((cache.misses, cache.hits))
        return out

    with torch.no_grad():
        padded = measure("off")
        assert not calls
        packed = measure("on")
        assert calls
        pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                              lora_dropout=0.0))
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(7))
        lora = {s: (monkeypatch.setenv(F.METRIC_PACK_ENV, s), response_row_losses(pm, tok, rows, batch_size=3))[1]
                for s in ("off", "on")}
    assert packed[-1] == padded[-1] == (3, 3)  # 3 batches a pass (7 rows, 3 a forward): computed once, reused once
    for (s_pad, c_pad), (s_pack, c_pack) in [*zip(padded[:-1], packed[:-1]), (lora["off"], lora["on"])]:
        assert c_pack == c_pad and all(c > 0 for c in c_pad)
        torch.testing.assert_close(torch.tensor(s_pack), torch.tensor(s_pad), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(torch.tensor(padded[1][0]), torch.tensor(padded[0][0]))  # the vector counts
    assert not torch.allclose(torch.tensor(lora["off"][0]), torch.tensor(padded[0][0]))  # the adapter counts
