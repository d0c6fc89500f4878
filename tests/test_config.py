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


def test_env_overrides_apply_below_explicit_arguments(monkeypatch):
    import pytest

    from emlib.config import get_config

    monkeypatch.setenv("EMLIB_CONFIG_OVERRIDES", '{"kl_lambda": 0.66, "steer_scales": [0.0, 1.0]}')
    cfg = get_config("paper")
    assert cfg.kl_lambda == 0.66 and cfg.steer_scales == (0.0, 1.0)
    assert get_config("paper", kl_lambda=3.0).kl_lambda == 3.0
    monkeypatch.setenv("EMLIB_CONFIG_OVERRIDES", '{"kl_lamda": 1}')
    with pytest.raises(TypeError, match="kl_lamda"):
        get_config("paper")
    monkeypatch.setenv("EMLIB_CONFIG_OVERRIDES", "kl_lambda=1")
    with pytest.raises(ValueError, match="JSON object"):
        get_config("paper")
