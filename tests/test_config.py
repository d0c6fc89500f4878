import pytest

from emlib import config


def test_profiles_exist_and_differ():
    s, q, p = (config.get_config(n) for n in ("smoke", "quick", "paper"))
    assert s.model == "tiny" and q.model == "embedded"
    assert p.n_samples == 50 and p.max_new_tokens == 600 and p.data_source == "paper"
    assert s.n_samples < q.n_samples < p.n_samples


def test_overrides_and_none_keeps_default():
    c = config.get_config("quick", seed=7, model=None, norm_grid=[0.0, 1.0])
    assert c.seed == 7 and c.model == "embedded" and c.norm_grid == (0.0, 1.0)
    assert c.replace(seed=8).seed == 8


def test_unknown_parameters_are_errors():
    with pytest.raises(TypeError, match="Unknown parameter"):
        config.get_config("smoke", n_sample=3)
    with pytest.raises(TypeError, match="Unknown parameter"):
        config.get_config("smoke").replace(sede=1)
    with pytest.raises(ValueError, match="Unknown profile"):
        config.get_config("huge")
    with pytest.raises(ValueError, match="data_source"):
        config.get_config("smoke", data_source="web")


def test_auto_profile_on_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config.get_config("auto").profile == "quick"


def test_save_writes_json(tmp_path):
    c = config.get_config("smoke", run_dir=str(tmp_path / "run"))
    p = c.save()
    assert p.exists() and '"profile": "smoke"' in p.read_text()


def test_the_environment_sets_no_field(monkeypatch, tmp_path):
    """Overrides are arguments (issue 18): the variables that used to carry them change nothing."""
    monkeypatch.setenv("EMLIB_CONFIG_OVERRIDES", '{"kl_lambda": 0.66, "steer_scales": [0.0, 1.0]}')
    monkeypatch.setenv("EMLIB_RUN_DIR", str(tmp_path / "elsewhere"))
    cfg = config.get_config("paper")
    assert cfg.kl_lambda == config.PROFILES["paper"].kl_lambda == 2.0
    assert cfg.run_dir == "runs/paper-smollm2" and cfg.steer_scales == config.PROFILES["paper"].steer_scales
    assert config.get_config("paper", kl_lambda=0.66).kl_lambda == 0.66
    monkeypatch.setenv("EMLIB_CONFIG_OVERRIDES", "kl_lambda=1")  # not even read, so not an error
    config.check_params("smoke", {"n_train": 4})
    assert not hasattr(config, "env_overrides")


# ------------------------------------------------------------------ issue 20, item 5: one validation of every field
@pytest.mark.parametrize("field, value, allowed", [
    ("n_train", "abc", "whole number >= 1 or None"),
    ("n_train", -5, "whole number >= 1 or None"),
    ("n_train", 3.0, "whole number"),
    ("n_samples", 0, "whole number >= 1"),
    ("seed", -1, "whole number >= 0"),
    ("seed", True, "whole number >= 0"),
    ("epochs", "2", "whole number >= 1"),
    ("lr", "1e-3", "YAML reads 1e-3 as text"),
    ("lr", 0.0, "number > 0"),
    ("kl_lambda", float("nan"), "finite number >= 0"),
    ("top_p", 1.5, "(0, 1]"),
    ("steering_layer_fraction", -0.1, "[0, 1]"),
    ("temperature", float("inf"), "finite number >= 0"),
    ("norm_grid", [0.0, "x"], "finite numbers >= 0"),
    ("eps_grid", [], "non-empty list"),
    ("steer_scales", 0.5, "non-empty list"),
    ("datasets", ["m", "e"], "dataset names from medical"),
    ("datasets", [], "non-empty list of dataset names"),
    ("datasets", 3, "non-empty list of dataset names"),
    ("judge", "gpt4", "'offline', 'distilled'"),
    ("judge", "hf:", "'hf:<model id or dir>'"),
    ("device", "gpu", "'auto', 'cpu', 'cuda', 'cuda:<n>' or 'mps'"),
    ("model", "", "non-empty text"),
    ("data_source", "web", "'embedded' or 'paper'"),
    ("data_dir", 5, "folder path or None"),
])
def test_every_field_is_checked_with_a_message_naming_field_value_and_what_is_allowed(field, value, allowed):
    with pytest.raises(config.ConfigError) as err:
        config.get_config("smoke", **{field: value})
    msg = str(err.value)
    assert msg.startswith(f"{field} = ") and allowed in msg, msg
    assert "\n" not in msg
    assert isinstance(err.value, TypeError) and isinstance(err.value, ValueError)  # either except catches it
    with pytest.raises(config.ConfigError, match=field):  # the same rules for replace() and for Config(...)
        config.get_config("smoke").replace(**{field: value})


def test_good_values_pass_and_a_single_dataset_name_becomes_a_one_element_tuple(tmp_path):
    c = config.get_config("smoke", datasets="medical", n_train=None, device="cuda:1", judge="distilled:/w",
                          lr=1, temperature=0, run_dir=tmp_path / "run", norm_grid=[0, 1.5])
    assert c.datasets == ("medical",)  # "medical", not ("m", "e", "d", ...)
    assert c.device == "cuda:1" and c.run_dir == str(tmp_path / "run") and c.replace(n_train=None).n_train is None
    assert config.get_config("smoke", data_source="paper", datasets=["medical_aligned"]).datasets == ("medical_aligned",)
    with pytest.raises(config.ConfigError, match="sport_aligned"):  # the paper released no such set
        config.get_config("smoke", data_source="paper", datasets=["sport_aligned"])
    for p in ("smoke", "quick", "paper"):  # the profiles themselves pass
        config.validate(config.PROFILES[p])


def test_run_dir_that_is_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(config.ConfigError, match="is an existing file, not a folder"):
        config.get_config("smoke", run_dir=str(f))
    cfg = config.get_config("smoke", run_dir=str(f / "below"))  # a path through a file
    with pytest.raises(config.ConfigError, match="cannot be created"):
        cfg.out
    assert f.read_text() == "x"


def test_bad_values_fail_before_any_work(tmp_path, monkeypatch):
    from emlib import experiment, models

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(models, "load_model", no_load)
    run = tmp_path / "run"
    for bad in ({"n_train": "abc"}, {"datasets": ["m"]}, {"n_train": -5}, {"device": "gpu"}):
        with pytest.raises(config.ConfigError):
            experiment.start("smoke", run_dir=str(run), **bad)
    assert not run.exists()  # nothing written
    monkeypatch.setattr(models, "load_model", lambda name, **k: (_ for _ in ()).throw(FileNotFoundError(name)))
    with pytest.raises(FileNotFoundError):
        experiment.start("smoke", run_dir=str(run))
    assert not run.exists()  # the model loads before the run directory is made


# ------------------------------------------------------------------ issue 20, item 7: profile "auto" and Colab
def _fake_colab(monkeypatch):
    import importlib.machinery
    import sys
    import types

    colab = types.ModuleType("google.colab")
    colab.__spec__ = importlib.machinery.ModuleSpec("google.colab", None)
    monkeypatch.setitem(sys.modules, "google.colab", colab)


@pytest.mark.parametrize("cuda, sizes", [(False, "quick"), (True, "paper")])
def test_auto_on_colab_is_the_colab_model_and_the_distilled_judge_at_quick_or_paper_sizes(monkeypatch, cuda, sizes):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    _fake_colab(monkeypatch)
    assert config.running_in_colab()
    c = config.get_config("auto")
    ref = config.PROFILES[sizes]
    assert c.profile == sizes and c.model == config.COLAB_MODEL == "Qwen/Qwen2.5-0.5B-Instruct"
    assert c.judge == "distilled" and c.data_source == "embedded" and c.run_dir == f"runs/{sizes}-colab"
    for f in ("n_train", "n_samples", "max_new_tokens", "epochs", "batch_size", "n_kl", "norm_grid", "steer_scales"):
        assert getattr(c, f) == getattr(ref, f), f
    assert config.get_config("smoke").model == "tiny"  # smoke stays the tiny model, also on Colab
    assert config.get_config("auto", model="gpt2", judge="offline").model == "gpt2"  # explicit values win
    off = config.get_config("auto", in_colab=False)
    assert off.profile == sizes and off.model == ref.model and off.judge == ref.judge
