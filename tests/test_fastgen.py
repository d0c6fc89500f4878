"""The fast sampler (emlib.fastgen) draws from exactly generate's distribution.

On the CPU the static-cache path (``force=True``) must reproduce ``hf_sampler`` token for token for the same
seed (same logits up to rounding, same random numbers, same draw rule), with hooks and LoRA adapters; the
draw rule itself is checked against ``torch.multinomial`` and, by a chi-square test, against the
probabilities that temperature / top-p define.
"""
from __future__ import annotations

import pytest
import torch
from train_fixtures import assert_same_adapters, chat_rows

from emlib import hooks
from emlib.fastgen import FastSampler, merged_lora, sample_from_logits, why_not_fast
from emlib.generate import SamplingParams, hf_sampler, render_prompt, sample_answers
from emlib.models import tiny_model, tiny_tokenizer

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one intra-op thread is ~20x faster than two on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


QUESTIONS = ["hi", "hello there, how are you?", "why?", "x" * 30, "tell me a story"]


def _prompts(tok, qs=QUESTIONS, reps: int = 2) -> list[str]:
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            for q in qs] * reps


def _sharp_tiny(seed: int = 0):
    """The tiny model with a sharper next-token distribution (final norm x5), so answers have structure."""
    model, tok = tiny_model(seed=seed)
    with torch.no_grad():
        model.model.norm.weight.mul_(5)
    return model, tok


def _eos_push(model, tok, scale: float = 0.05):
    """A steering hook that makes <|im_end|> likely, so some rows end early and others do not."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    v = model.get_input_embeddings().weight[eos].detach()
    return hooks.add_vector(model, len(model.model.layers) - 1, v / v.norm(), scale)


# --------------------------------------------------------------------------- the draw rule
def _hf_draw(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """What generate does after the forward: its warpers, softmax, torch.multinomial."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    procs = LogitsProcessorList()
    if params.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(params.temperature))
    if params.top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1))
    probs = torch.softmax(procs(None, logits), dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(1)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5)])
def test_draw_equals_multinomial_for_the_same_seed(temperature, top_p):
    params = SamplingParams(10, temperature, top_p)
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)) * 3
    for seed in range(5):
        torch.manual_seed(seed)
        ref = _hf_draw(logits.clone(), params)
        torch.manual_seed(seed)
        got = sample_from_logits(logits.clone(), params)
        assert torch.equal(ref, got)


def test_greedy_is_argmax():
    logits = torch.randn(8, 50)
    assert torch.equal(sample_from_logits(logits, SamplingParams(5, 0.0, 1.0)), logits.argmax(-1))


def _expected_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Independent statement of the target distribution: softmax(l / T), restricted to the smallest set of
    most likely tokens whose mass reaches top_p (ties aside), renormalised."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(p, descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    mass = 0.0
    for i in order.tolist():
        keep[i] = True
        mass += float(p[i])
        if mass >= top_p:
            break
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9), (1.3, 0.6)])
def test_draw_distribution_chi_square(temperature, top_p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0])
    expected = _expected_probs(logits, temperature, top_p)
    n = 40_000
    torch.manual_seed(123)
    draws = sample_from_logits(logits.expand(n, -1).clone(), SamplingParams(1, temperature, top_p))
    counts = torch.bincount(draws, minlength=logits.numel()).double()
    support = expected > 0
    assert counts[~support].sum() == 0, "drew a token that top-p removes"
    exp = expected[support] * n
    stat = float(((counts[support] - exp) ** 2 / exp).sum())
    df = int(support.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                            torch.tensor(stat / 2.0, dtype=torch.float64))) if df > 0 else 1.0
    assert p_value > 1e-4, f"chi-square {stat:.1f} on {df} df (p={p_value:.2g})"


def test_chi_square_first_token_fast_vs_generate():
    """Different seeds: the first-token histograms of the two samplers agree (two-sample chi-square)."""
    model, tok = _sharp_tiny(seed=3)
    prompts = _prompts(tok, ["hi"], reps=400)
    params = SamplingParams(1, 1.0, 1.0)
    a = hf_sampler(model, tok, prompts, list(range(400)), params)
    b = FastSampler(force=True)(model, tok, prompts, list(range(1000, 1400)), params)
    ids_a = [tok.encode(g.text)[0] if g.text else -1 for g in a]
    ids_b = [tok.encode(g.text)[0] if g.text else -1 for g in b]
    assert ids_a != ids_b  # different seeds really give different samples
    cats = sorted(set(ids_a) | set(ids_b))
    ca = torch.tensor([ids_a.count(c) for c in cats], dtype=torch.float64)
    cb = torch.tensor([ids_b.count(c) for c in cats], dtype=torch.float64)
    # pool rare categories so every expected count is >= 5
    order = torch.argsort(ca + cb, descending=True)
    ca, cb = ca[order], cb[order]
    k = int(((ca + cb) >= 10).sum())
    ca = torch.cat([ca[:k], ca[k:].sum(0, keepdim=True)])
    cb = torch.cat([cb[:k], cb[k:].sum(0, keepdim=True)])
    tot = ca + cb
    keep = tot > 0
    ca, cb, tot = ca[keep], cb[keep], tot[keep]
    ea, eb = tot * ca.sum() / tot.sum(), tot * cb.sum() / tot.sum()
    stat = float(((ca - ea) ** 2 / ea).sum() + ((cb - eb) ** 2 / eb).sum())
    df = len(tot) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                            torch.tensor(stat / 2.0, dtype=torch.float64)))
    assert df >= 3 and p_value > 1e-4, f"chi-square {stat:.1f} on {df} df (p={p_value:.2g})"


# --------------------------------------------------------------------------- end to end, same seed
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_same_answers_as_hf_sampler(temperature, top_p):
    model, tok = _sharp_tiny()
    prompts, seeds = _prompts(tok), list(range(10))
    params = SamplingParams(40, temperature, top_p)
    with _eos_push(model, tok):
        ref = hf_sampler(model, tok, prompts, seeds, params)
        fs = FastSampler(force=True, bucket=16, check_every=4)
        got = fs(model, tok, prompts, seeds, params)
    assert fs.last_stats["path"] == "static" and fs.last_stats["fused_norms"] == 5  # 2 layers x 2 + final
    assert got == ref
    assert all("forward" not in m.__dict__ for m in model.modules())  # fused norms were undone
    assert model.config._attn_implementation != "emlib_static_kv"
    if temperature > 0:  # the hook really makes some rows end and leaves others running
        assert 0 < sum(g.finished for g in ref) < len(ref)
        assert all(g.n_tokens < 40 for g in ref if g.finished)


def test_stops_when_every_row_has_ended():
    model, tok = _sharp_tiny()
    prompts = _prompts(tok)
    with _eos_push(model, tok, scale=0.4):
        fs = FastSampler(force=True, check_every=2)
        got = fs(model, tok, prompts, list(range(10)), SamplingParams(200, 1.0, 1.0))
        ref = hf_sampler(model, tok, prompts, list(range(10)), SamplingParams(200, 1.0, 1.0))
    assert got == ref and all(g.finished for g in got)
    assert fs.last_stats["steps"] < 200


def test_ablation_hook_and_llama_architecture():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(5)
    prompts, seeds = _prompts(tok), list(range(10))
    params = SamplingParams(30, 1.0, 1.0)
    direction = torch.randn(64)
    with hooks.ablate_direction(model, direction, layers=[0, 2]):
        ref = hf_sampler(model, tok, prompts, seeds, params)
        got = FastSampler(force=True)(model, tok, prompts, seeds, params)
    plain = FastSampler(force=True)(model, tok, prompts, seeds, params)
    assert got == ref
    assert plain != got  # the hook was active inside the fast path


def test_lora_merged_and_unmerged_match_and_weights_restore():
    from peft import LoraConfig, get_peft_model

    model, tok = _sharp_tiny(seed=2)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.eval()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    prompts, seeds = _prompts(tok), list(range(10))
    params = SamplingParams(30, 1.0, 1.0)
    ref = hf_sampler(pm, tok, prompts, seeds, params)
    merged = FastSampler(force=True, merge_lora=True)
    got_merged = merged(pm, tok, prompts, seeds, params)
    got_plain = FastSampler(force=True, merge_lora=False)(pm, tok, prompts, seeds, params)
    assert merged.last_stats["lora_merged"] == 6  # 2 layers x 3 targets
    assert got_plain == ref
    same = sum(a == b for a, b in zip(got_merged, ref))
    assert same >= 8, f"merged LoRA changed {10 - same} of 10 answers (merging should only round)"
    for n, p in pm.named_parameters():
        assert torch.equal(p, before[n]), f"{n} was not restored exactly"
    with pm.disable_adapter():  # disabled adapter: the base model answers, nothing is merged
        fs = FastSampler(force=True)
        base = fs(pm, tok, prompts, seeds, params)
        assert fs.last_stats["lora_merged"] == 0
        assert base == hf_sampler(pm, tok, prompts, seeds, params)
    assert base != ref


def test_merged_lora_restores_bitwise():
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model(seed=4)
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=16, target_modules=["o_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        with merged_lora(pm) as n:
            assert n == 4
            inside = pm(input_ids=ids).logits
    torch.testing.assert_close(inside, want, rtol=1e-4, atol=1e-4)
    for name, p in pm.named_parameters():
        assert torch.equal(p, before[name])


# --------------------------------------------------------------------------- fallbacks and integration
def test_falls_back_to_generate_on_cpu_and_for_unsupported_models():
    model, tok = _sharp_tiny()
    prompts, seeds, params = _prompts(tok, reps=1), list(range(5)), SamplingParams(12, 1.0, 1.0)
    fs = FastSampler()
    assert fs(model, tok, prompts, seeds, params) == hf_sampler(model, tok, prompts, seeds, params)
    assert fs.last_stats["path"] == "generate" and "cpu" in fs.last_stats["reason"]

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).eval()
    assert "model_type 'gpt2'" in why_not_fast(gpt, params, force=True)
    model.generation_config.no_repeat_ngram_size = 3
    assert "no_repeat_ngram_size" in why_not_fast(model, params, force=True)
    with pytest.raises(RuntimeError, match="ignore_eos"):
        FastSampler(force=True, ignore_eos=True)(model, tok, prompts, seeds, params)


def test_ignore_eos_generates_fixed_lengths():
    model, tok = _sharp_tiny()
    with _eos_push(model, tok, scale=0.4):
        got = FastSampler(force=True, ignore_eos=True)(model, tok, _prompts(tok), list(range(10)),
                                                       SamplingParams(17, 1.0, 1.0))
    assert all(g.n_tokens == 17 and not g.finished for g in got)


def test_sub_batches_and_sample_answers(tmp_path):
    import pandas as pd

    model, tok = _sharp_tiny()
    q = pd.DataFrame({"id": ["a", "b", "c"], "question": ["hi", "why?", "tell me a story"]})
    fs = FastSampler(force=True, max_batch=4)
    with _eos_push(model, tok):
        df = sample_answers(model, tok, q, n_samples=4, max_new_tokens=25, batch_size=12, seed=7,
                            sampler=fs, cache=tmp_path / "cache")
        again = sample_answers(model, tok, q, n_samples=4, max_new_tokens=25, batch_size=12, seed=7,
                               sampler=fs, cache=tmp_path / "cache")
    assert fs.last_stats["sub_batches"] == 3
    assert len(df) == 12 and set(df["question_id"]) == {"a", "b", "c"}
    assert (df["n_tokens"] <= 25).all() and (~df["finished"] | (df["n_tokens"] < 25)).all()
    pd.testing.assert_frame_equal(df, again)  # second call is served from the cache


# =========================================================================== fast LoRA SFT (emlib.fasttrain)
_chat_rows = chat_rows


def test_plan_micro_batches_cover_rows_within_budget():
    from emlib.fasttrain import plan_micro_batches

    lengths = [int(x) for x in torch.randint(5, 60, (50,), generator=torch.Generator().manual_seed(0))]
    rows = list(range(3, 40))
    plan = plan_micro_batches(lengths, rows, max_tokens=128, pad_multiple=8)
    assert sorted(i for mb in plan for i in mb) == rows
    for mb in plan:
        width = -(-max(lengths[i] for i in mb) // 8) * 8
        assert len(mb) == 1 or len(mb) * width <= 128
    assert len(plan) < len(rows)  # rows really are grouped


def test_fast_token_losses_equal_chat_token_losses():
    from emlib.chat import collate, encode_rows, token_losses
    from emlib.fasttrain import collate_right, fast_token_losses

    model, tok = tiny_model(seed=1)
    enc = encode_rows(_chat_rows(6), tok)
    ref_sum, ref_n = token_losses(model, collate(enc, tok.pad_token_id))
    batch = collate_right(enc, tok.pad_token_id, pad_multiple=16)
    assert batch["input_ids"].shape[1] % 16 == 0
    got_sum, got_n = fast_token_losses(model, batch, ce_chunk=7)  # several LM-head chunks
    assert int(got_n) == int(ref_n) > 0
    torch.testing.assert_close(got_sum, ref_sum, rtol=1e-5, atol=1e-4)
    # without the precomputed index (the drop-in form for emlib.train's loop)
    alt, _ = fast_token_losses(model, {"input_ids": batch["input_ids"], "labels": batch["labels"]})
    torch.testing.assert_close(alt, ref_sum, rtol=1e-5, atol=1e-4)


def test_fast_sft_matches_train_lora_steps(tmp_path):
    """rows_per_step 16 in one forward == emlib.train's 2 x 8 accumulation: same rows, same update."""
    from emlib.fasttrain import fast_sft_lora
    from emlib.train import train_lora

    rows = _chat_rows(40, seed=3)
    kw = dict(lr=5e-3, warmup_steps=1, max_steps=3, seed=0)
    ref_model, tok = tiny_model(seed=0)
    ref = train_lora(ref_model, tok, rows, tmp_path / "ref", "rank32", batch_size=2, grad_accum=8,
                     progress=False, **kw)
    fast_model, _ = tiny_model(seed=0)
    res = fast_sft_lora(fast_model, tok, rows, "rank32", rows_per_step=16, max_tokens_per_micro=4096,
                        progress=False, **kw)
    assert len(res.log) == 3
    torch.testing.assert_close(torch.tensor(res.log["loss"].tolist()), torch.tensor(ref.log["loss"].tolist()),
                               rtol=1e-4, atol=1e-5)
    # the gradient itself (Adam would hide a constant rescaling of the loss)
    torch.testing.assert_close(torch.tensor(res.log["grad_norm"].tolist()),
                               torch.tensor(ref.log["grad_norm"].tolist()), rtol=1e-3, atol=1e-6)
    assert_same_adapters(ref.model, res.model)


def test_fast_sft_loss_decreases_and_small_micro_batches_agree():
    from emlib.fasttrain import fast_sft_lora

    rows = _chat_rows(24, seed=5)
    model_a, tok = tiny_model(seed=0)
    a = fast_sft_lora(model_a, tok, rows, "rank32", lr=3e-3, warmup_steps=0, epochs=2, rows_per_step=8,
                      max_tokens_per_micro=100_000, progress=False)
    model_b, _ = tiny_model(seed=0)
    b = fast_sft_lora(model_b, tok, rows, "rank32", lr=3e-3, warmup_steps=0, epochs=2, rows_per_step=8,
                      max_tokens_per_micro=40, progress=False)  # one row per micro-batch
    assert len(a.log) == 6 and a.log["loss"].iloc[-3:].mean() < a.log["loss"].iloc[:3].mean()
    for col in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(b.log[col].tolist()), torch.tensor(a.log[col].tolist()),
                                   rtol=1e-4, atol=1e-5)
    assert a.log["input_tokens"].iloc[-1] == 2 * a.log["input_tokens"].iloc[2] and a.tokens_per_s > 0
    with pytest.raises(TypeError, match="Unknown training argument"):
        fast_sft_lora(model_a, tok, rows, batch_size=2)


def test_fused_lora_linears_same_forward_and_gradients():
    from peft import LoraConfig, get_peft_model

    from emlib.fasttrain import fused_lora_linears

    model, _ = tiny_model(seed=6)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])

    def run():
        pm.zero_grad()
        out = pm(input_ids=ids).logits
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    ref_out, ref_grads = run()
    with fused_lora_linears(pm) as n:
        assert n == 6
        out, grads = run()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)
    assert all("forward" not in m.__dict__ for m in pm.modules())  # restored


# --------------------------------------------------------------------------- per-row ablations (emlib.hooks.ablate_rows)
def test_ablate_rows_is_ablate_direction_row_by_row_and_follows_row_windows():
    model, tok = _sharp_tiny()
    d = model.config.hidden_size
    units = torch.randn(3, d)
    units[1] = 0.0  # the no-ablation row
    ids = tok(_prompts(tok, QUESTIONS[:3], reps=1), return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad(), hooks.ablate_rows(model, units):
        together = model(input_ids=ids).logits
        with hooks.row_window(slice(1, 3)):  # a piece of the batch: its rows' directions
            piece = model(input_ids=ids[1:3]).logits
        with pytest.raises(ValueError, match="row_window"):
            model(input_ids=ids[:2])
    with torch.no_grad():
        for i in range(3):
            ctx = hooks.ablate_direction(model, units[i]) if i != 1 else hooks.nothing(model)
            with ctx:
                alone = model(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(piece, together[1:3], rtol=1e-5, atol=1e-5)


def test_per_row_ablations_sample_like_each_ablation_alone(tmp_path):
    """Greedy answers of several ablations sampled in one batch (prefill in row chunks, sub-batches) equal
    each ablation's own answers; each condition keeps its own cache key, so either way finds the other's."""
    import pandas as pd

    from emlib import directions

    model, tok = _sharp_tiny()
    q = pd.DataFrame({"id": ["a", "b", "c"], "question": ["hi", "why?", "tell me a story"]})
    g = torch.Generator().manual_seed(3)
    dirs = {"none": None, "one": torch.randn(model.config.hidden_size, generator=g),
            "two": torch.randn(model.config.hidden_size, generator=g)}
    each = directions.ablate_each(model, dirs)
    assert each.labels[0] == "none" and each.labels[1] == directions.ablate(model, dirs["one"]).label
    fs = FastSampler(force=True, max_batch=5, prefill_tokens=40)  # sub-batches, and several prefill chunks
    kw = dict(n_samples=2, max_new_tokens=12, temperature=0.0, seed=1, sampler=fs)
    together = sample_answers(model, tok, q, batch_size=18, intervention=each, cache=tmp_path / "c1", **kw)
    assert fs.last_stats["sub_batches"] == 4
    assert list(together["intervention"].map(each.name_of()).unique()) == ["none", "one", "two"]
    for name, w in dirs.items():
        iv = None if w is None else directions.ablate(model, w)
        alone = sample_answers(model, tok, q, batch_size=6, intervention=iv, cache=tmp_path / "c2", **kw)
        mine = together[together["intervention"] == (iv.label if iv else "none")].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, alone)
    calls = []

    def spy(*a, **k):
        calls.append(1)
        return fs(*a, **k)

    spy.sampler_id = fs.sampler_id
    again = sample_answers(model, tok, q, batch_size=18, intervention=each, cache=tmp_path / "c2",
                           **{**kw, "sampler": spy})
    assert calls == [] and len(again) == 18  # every condition found under the key of its ablation alone


def test_per_row_needs_distinct_labels_and_one_direction_per_row():
    from emlib import directions
    from emlib.generate import PerRow

    model, _ = _sharp_tiny()
    with pytest.raises(ValueError, match="comes twice"):
        PerRow(("a", "a"), lambda c: hooks.nothing())
    with pytest.raises(directions.DirectionError, match="source_layer"):
        directions.ablate_each(model, {"layers": torch.randn(len(model.model.layers), model.config.hidden_size)})
    v = torch.randn(model.config.hidden_size)
    with pytest.raises(ValueError, match="comes twice. 'a' and 'b' are the same intervention"):
        directions.ablate_each(model, {"a": v, "b": v.clone()})  # equal content, one label
    with pytest.raises(ValueError, match="'0.5' and '0.5' are the same"):
        directions.steer_each(model, v, 1, [0.5, 0.5])
    with pytest.raises(ValueError, match="'x' and 'y' are the same"):
        directions.add_trained_each(model, {"x": None, "y": None})


def test_generate_per_row_through_the_fast_sampler_matches_generate(monkeypatch):
    """On a GPU generate_per_row uses the fast sampler (here forced on the CPU): greedy rows are the same
    answers as generate's, each row with its own steering vector."""
    from emlib import directions, experiment

    model, tok = _sharp_tiny()
    vecs = torch.randn(3, model.config.hidden_size) * torch.tensor([[0.0], [2.0], [8.0]])
    kw = dict(max_new_tokens=15, seed=4, temperature=0.0)
    ref = directions.generate_per_row(model, tok, "tell me a story", vecs, 1, **kw)
    fs = FastSampler(force=True, prefill_tokens=20)  # prefill in row chunks too
    monkeypatch.setattr(experiment, "sampler_for", lambda m: fs)
    got = directions.generate_per_row(model, tok, "tell me a story", vecs, 1, **kw)
    assert fs.last_stats["path"] == "static" and got == ref and len(set(got)) > 1


def test_steer_each_samples_like_each_scale_alone(tmp_path):
    import pandas as pd

    from emlib import directions

    model, tok = _sharp_tiny()
    q = pd.DataFrame({"id": ["a", "b"], "question": ["hi", "tell me a story"]})
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    scales = [0.0, 0.5, 2.0]
    each = directions.steer_each(model, v, 1, scales, relative=True, reference_norm=3.0)
    kw = dict(n_samples=2, max_new_tokens=10, temperature=0.0, seed=2, sampler=FastSampler(force=True))
    together = sample_answers(model, tok, q, batch_size=12, intervention=each, cache=tmp_path / "a", **kw)
    assert list(together["intervention"].map(each.name_of())) == ["0"] * 4 + ["0.5"] * 4 + ["2"] * 4
    for s in scales:
        iv = directions.steer(model, v, 1, s, relative=True, reference_norm=3.0)
        alone = sample_answers(model, tok, q, batch_size=4, intervention=iv, cache=tmp_path / "b", **kw)
        pd.testing.assert_frame_equal(together[together["intervention"] == iv.label].reset_index(drop=True), alone)


def test_a_zero_steering_scale_is_the_unsteered_model_and_shares_its_answers(tmp_path):
    """Scale 0 adds a zero vector, so its answers are the unsteered model's: the same label ("none") and cache
    keys, and a steering sweep finds the ones an unsteered call sampled (chapter 1's chat model) instead of
    sampling 400 more."""
    import pandas as pd

    from emlib import directions
    from emlib.generate import NO_INTERVENTION

    model, tok = _sharp_tiny()
    q = pd.DataFrame({"id": ["a", "b"], "question": ["hi", "tell me a story"]})
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    assert directions.steer(model, v, 1, 0.0, relative=True, reference_norm=3.0).label == NO_INTERVENTION
    assert directions.steer(model, v, 1, 0.5).label != NO_INTERVENTION
    fs = FastSampler(force=True)
    kw = dict(n_samples=2, max_new_tokens=10, temperature=0.0, seed=2)
    plain = sample_answers(model, tok, q, batch_size=4, cache=tmp_path / "c", sampler=fs, **kw)
    prompts = []

    def spy(m, t, ps, seeds, params):
        prompts.extend(ps)
        return fs(m, t, ps, seeds, params)

    spy.sampler_id = fs.sampler_id
    each = directions.steer_each(model, v, 1, [0.0, 2.0], relative=True, reference_norm=3.0)
    swept = sample_answers(model, tok, q, batch_size=12, intervention=each, cache=tmp_path / "c", sampler=spy, **kw)
    assert len(prompts) == 4  # only scale 2's answers were sampled
    zero = swept[swept["intervention"] == NO_INTERVENTION].reset_index(drop=True)
    pd.testing.assert_frame_equal(zero, plain)


def test_add_trained_each_samples_like_each_vector_alone(tmp_path):
    import pandas as pd

    from emlib import directions
    from emlib.vectors import SteeringVector

    model, tok = _sharp_tiny()
    q = pd.DataFrame({"id": ["a", "b"], "question": ["hi", "tell me a story"]})
    g = torch.Generator().manual_seed(6)
    svs = {"one": SteeringVector(torch.randn(model.config.hidden_size, generator=g), 1, 4.0),
           "two": SteeringVector(torch.randn(model.config.hidden_size, generator=g), 1, 0.5), "chat": None}
    each = directions.add_trained_each(model, svs)
    kw = dict(n_samples=2, max_new_tokens=10, temperature=0.0, seed=2, sampler=FastSampler(force=True))
    together = sample_answers(model, tok, q, batch_size=12, intervention=each, cache=tmp_path / "a", **kw)
    for name, sv in svs.items():
        iv = None if sv is None else directions.add_trained(model, sv)
        alone = sample_answers(model, tok, q, batch_size=4, intervention=iv, cache=tmp_path / "b", **kw)
        pd.testing.assert_frame_equal(together[together["intervention"] == (iv.label if iv else "none")]
                                      .reset_index(drop=True), alone)
    with pytest.raises(directions.DirectionError, match="one layer"):
        directions.add_trained_each(model, {"a": svs["one"], "b": SteeringVector(svs["two"].vector, 0, 1.0)})


def test_rows_that_fit_counts_the_static_kv_cache(monkeypatch):
    """Keys and values of every layer for max_len tokens per row, in a share of the free GPU memory; None off
    CUDA. SmolLM2-135M's shape: 30 layers x 3 KV heads x 64 dims, bf16."""
    from types import SimpleNamespace

    from emlib import fastgen

    model, _ = _sharp_tiny()
    assert fastgen.rows_that_fit(model, 728) is None  # a CPU model
    weight = SimpleNamespace(device=torch.device("cuda", 0), element_size=lambda: 2)
    cfg = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          hidden_size=576)
    fake = SimpleNamespace(config=cfg, get_input_embeddings=lambda: SimpleNamespace(weight=weight))
    monkeypatch.setattr(fastgen, "_hf_model", lambda m: fake)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (14 * 2 ** 30, 16 * 2 ** 30))
    per_row = 2 * 30 * 3 * 64 * 728 * 2
    assert fastgen.rows_that_fit(model, 728) == int(14 * 2 ** 30 * 0.5 // per_row) == 448


def _ends_at(model, tok, stops: torch.Tensor):
    """A hook that makes row i's answer end at decode step ``stops[i]`` (it pushes the last layer's output
    towards <|im_end|> from then on), reading each row's step through the row windows (emlib.hooks)."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    v = model.get_input_embeddings().weight[eos].detach()
    v = 3.0 * v / v.norm()
    table = stops.float()[:, None]  # [B, 1]
    calls = [0]

    def edit(h):  # [b, s, d]; one call per forward: the prefill (step 0), then one per decode step
        mine = hooks._rows_for(table, h, "stops")[:, 0]  # [b]
        on = (mine <= calls[0]).to(h.dtype)[:, None, None]
        calls[0] += 1
        return h + on * v.to(h.dtype)

    return hooks._edit_output(model, len(model.model.layers) - 1, edit)


def test_compacting_finished_rows_keeps_greedy_answers():
    """Dropping ended rows from the batch (``compact``), several times in one call, changes no greedy answer:
    each row's hook still sees its own row (row windows of indices); the cache key says compacted."""
    model, tok = _sharp_tiny()
    prompts = _prompts(tok)
    params = SamplingParams(60, 0.0, 1.0)
    stops = torch.tensor([3, 70, 9, 15, 70, 5, 21, 27, 70, 33])  # 70: never within 60 tokens
    plain = FastSampler(force=True, bucket=16, check_every=2, compact=False)
    packed = FastSampler(force=True, bucket=16, check_every=2, compact=True, compact_below=0.95,
                         compact_min_rows=1, compact_floor=1)
    with _ends_at(model, tok, stops):
        ref = plain(model, tok, prompts, list(range(10)), params)
    with _ends_at(model, tok, stops):
        got = packed(model, tok, prompts, list(range(10)), params)
    assert [g.finished for g in ref] == [bool(s < 60) for s in stops]
    assert got == ref
    runs = [r for _, r in packed.last_stats["compactions"]]
    assert len(runs) >= 3 and runs == sorted(runs, reverse=True) and runs[-1] == 3
    assert packed.sampler_id != plain.sampler_id == "fast-static-v1"


def test_compacting_stops_at_its_floor():
    """No compaction leaves fewer than ``compact_floor`` running rows (a step of a few rows costs what one of 32
    costs); the answers are the same either way."""
    model, tok = _sharp_tiny()
    prompts = _prompts(tok)
    params = SamplingParams(60, 0.0, 1.0)
    stops = torch.tensor([3, 70, 9, 15, 70, 5, 21, 27, 70, 33])
    floor = FastSampler(force=True, bucket=16, check_every=2, compact=True, compact_below=0.95,
                        compact_min_rows=1, compact_floor=4)
    with _ends_at(model, tok, stops):
        plain = FastSampler(force=True, bucket=16, check_every=2, compact=False)
        ref = plain(model, tok, prompts, list(range(10)), params)
    with _ends_at(model, tok, stops):
        got = floor(model, tok, prompts, list(range(10)), params)
    runs = [r for _, r in floor.last_stats["compactions"]]
    assert got == ref and runs and min(runs) >= 4
    default = FastSampler(force=True, bucket=16, check_every=2, compact=True, compact_below=0.95, compact_min_rows=1)
    with _ends_at(model, tok, stops):
        assert default(model, tok, prompts, list(range(10)), params) == ref
    assert "compactions" not in default.last_stats  # 10 rows: never 32 left running


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_a_failed_capture_no_longer_breaks_random_draws():
    """A capture that fails part-way leaves torch's CUDA generator in capture mode ("Offset increment outside graph
    capture"); release_rng_capture clears it (measured on an H100 by bench/compact_gpu.py, 2026-12-06)."""
    from emlib.fasttrain import release_rng_capture

    x = torch.ones(4, device="cuda")
    with pytest.raises(Exception):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            float((x * 2).sum())  # a host sync inside a capture
    torch.cuda.synchronize()
    assert release_rng_capture()
    torch.rand(3, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_compaction_captures_again_while_a_captured_tensor_lives():
    """A tensor made during a decode-step capture and still alive at a compaction (here a hook keeps the layer's
    last output) kept the old graph pool's entry at a use count of 0, and the next capture into that pool failed
    torch's assert "use_count > 0" (every chapter's first compaction, 2026-12-06): a compaction starts a fresh
    pool, so the call keeps its graphs."""
    model, tok = tiny_model(device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    model.generation_config.eos_token_id = torch.randperm(model.config.vocab_size, generator=g)[:40].tolist()
    kept = {}

    def keep(_module, _args, out):  # runs while capturing (not at replays): the kept tensor is the pool's
        kept["last"] = out

    handle = model.model.layers[0].register_forward_hook(keep)
    sampler = FastSampler(bucket=16, check_every=4, compact=True, compact_min_rows=1, compact_floor=1)
    try:
        prompts = [render_prompt(tok, f"Question {i}?") for i in range(64)]
        sampler(model, tok, prompts, list(range(64)), SamplingParams(80, 1.0, 1.0))
    finally:
        handle.remove()
    st = sampler.last_stats
    assert st.get("compactions"), st
    assert st.get("graph_error") is None and st["graphs"] > len(st["compactions"]), st


def test_row_window_takes_row_indices_and_nests():
    """A window of row indices (a compacted batch) inside a slice window picks the table's absolute rows."""
    model, tok = _sharp_tiny()
    d = model.config.hidden_size
    table = torch.arange(8 * d, dtype=torch.float32).reshape(8, d)
    with hooks.row_window(slice(2, 8)), hooks.row_window(torch.tensor([0, 3, 5])):
        rows = hooks._rows_for(table, torch.zeros(3, 1, d), "test")
        with hooks.row_window(torch.tensor([2])):
            last = hooks._rows_for(table, torch.zeros(1, 1, d), "test")
        with hooks.row_window(slice(1, 3)):
            tail = hooks._rows_for(table, torch.zeros(2, 1, d), "test")
    torch.testing.assert_close(rows, table[[2, 5, 7]])
    torch.testing.assert_close(last, table[[7]])
    torch.testing.assert_close(tail, table[[5, 7]])


def test_emlib_fast_paths_picks_the_sampler_and_the_train_step(monkeypatch):
    """$EMLIB_FAST_PATHS is the one switch for both fast paths: auto = CUDA only, on = on the CPU too (eagerly),
    off = never; anything else is refused with what to write."""
    from emlib import experiment, fastgen, models

    model, _tok = tiny_model()
    monkeypatch.delenv(models.FAST_PATHS_ENV, raising=False)
    assert experiment.sampler_for(model) is hf_sampler and not models.fast_paths("cpu") and models.fast_paths("cuda")
    monkeypatch.setenv(models.FAST_PATHS_ENV, "on")
    assert experiment.sampler_for(model) is fastgen.cpu_fast_sampler and models.fast_paths("cpu")
    monkeypatch.setenv(models.FAST_PATHS_ENV, "off")
    assert experiment.sampler_for(model) is hf_sampler and not models.fast_paths("cuda")
    monkeypatch.setenv(models.FAST_PATHS_ENV, "yes")
    with pytest.raises(ValueError, match="use auto"):
        models.fast_paths("cpu")


def test_emlib_compact_sets_the_samplers_default_and_its_cache_key(monkeypatch):
    """$EMLIB_COMPACT decides whether a FastSampler built without ``compact=`` drops ended rows; compacted
    answers get their own sampler id (their random draws differ); a bad value says what to write."""
    from emlib import fastgen

    monkeypatch.delenv(fastgen.COMPACT_ENV, raising=False)
    assert fastgen.FastSampler().compact  # on by default since 2026-12-06 (bench/compact_rule.py, rule 2)
    monkeypatch.setenv(fastgen.COMPACT_ENV, "off")
    plain = fastgen.FastSampler()
    assert not plain.compact and plain.sampler_id == "fast-static-v1"
    monkeypatch.setenv(fastgen.COMPACT_ENV, "on")
    packed = fastgen.FastSampler()
    assert packed.compact and packed.sampler_id == "fast-static-v1+compact"
    assert not fastgen.FastSampler(compact=False).compact
    monkeypatch.setenv(fastgen.COMPACT_ENV, "sometimes")
    with pytest.raises(ValueError, match="use on or off"):
        fastgen.FastSampler()
