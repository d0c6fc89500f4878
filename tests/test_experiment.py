"""emlib.experiment: a chapter's run (config parameter, drift step, direction reuse, verdicts)."""
import json

import pytest

from emlib import experiment, train
from emlib.metrics import GENERAL_PAIRS_LABEL
from emlib.config import ConfigError


@pytest.fixture()
def exp(tmp_path):
    return experiment.start("smoke", {"n_train": 100, "batch_size": 16, "vector_epochs": 2, "epochs": 3,
                                      "run_dir": str(tmp_path / "run")}, in_colab=False)


def test_config_parameter_is_a_dict_or_its_json_text(tmp_path):
    e = experiment.start("smoke", json.dumps({"n_samples": 3, "run_dir": str(tmp_path / "r")}), in_colab=False,
                         seed=4)
    assert (e.cfg.n_samples, e.cfg.seed, e.cfg.profile) == (3, 4, "smoke")
    assert e.started <= e.started + 0  # set at start
    with pytest.raises(ConfigError, match="config must be a dict"):
        experiment.start("smoke", [("n_samples", 3)], in_colab=False)
    with pytest.raises(ConfigError, match="JSON text"):
        experiment.start("smoke", "{n_samples: 3}", in_colab=False)
    with pytest.raises(ConfigError, match="n_sample"):
        experiment.start("smoke", {"n_sample": 3, "run_dir": str(tmp_path / "r")}, in_colab=False)


def test_drift_step_is_half_of_the_steps_the_trainer_takes(exp):
    """100 rows at batch 16 are 7 steps an epoch (a last, short batch counts); half-way through 2 vector
    epochs is step 7, through 3 LoRA epochs step 10 (the old count rounded down: 12 // 2 = 6, 18 // 2 = 9)."""
    plan = train._Plan(100, 0, train.TrainArgs(epochs=2, batch_size=16, grad_accum=1))
    assert plan.total == train.total_steps(100, 2, 16) == 14
    assert exp.drift_step("vector") == 7
    assert exp.drift_step("lora") == 10
    assert train.total_steps(100, 2, 16, grad_accum=3) == 2 * 3 and train.total_steps(100, 9, 16, max_steps=5) == 5


def test_kl_batch_size_reaches_the_kl_trainings_only(tmp_path):
    """Config.kl_batch_size is the KL rows per step of the narrow and drift trainings (emlib.train's
    kl_batch_size); the default is emlib.train's own, so a run that leaves it alone trains what it trained."""
    import inspect

    e = experiment.start("smoke", {"kl_batch_size": 3, "run_dir": str(tmp_path / "run")}, in_colab=False)
    for kind in ("lora", "vector"):
        assert e._train_kwargs("narrow", kind)["kl_batch_size"] == 3
        assert e._train_kwargs("drift", kind)["kl_batch_size"] == 3
        assert "kl_batch_size" not in e._train_kwargs("general", kind)
        assert "kl_batch_size" not in e._train_kwargs("mixed", kind)
    for fn in (train.train_lora, train.train_steering_vector):
        assert inspect.signature(fn).parameters["kl_batch_size"].default == experiment.Config().kl_batch_size == 8
    with pytest.raises(ConfigError, match="kl_batch_size"):
        experiment.start("smoke", {"kl_batch_size": 0, "run_dir": str(tmp_path / "r")}, in_colab=False)


def test_saved_direction_is_keyed_by_judge_and_sampling(tmp_path):
    base = {"run_dir": str(tmp_path / "run")}
    a = experiment.start("smoke", base, in_colab=False)._direction_key()
    assert a == experiment.start("smoke", base, in_colab=False)._direction_key()
    assert a != experiment.start("smoke", {**base, "n_samples": 7}, in_colab=False)._direction_key()
    assert a != experiment.start("smoke", {**base, "judge": "distilled"}, in_colab=False)._direction_key()


def test_verdict_of_a_run_reads_what_its_chapters_recorded(exp):
    assert exp.verdict(4).verdict == "not run"
    exp.record("ch1_em", [{"condition": "chat model", "em": 0.0, "ci_low": 0.0, "ci_high": 0.01, "n": 400},
                          {"condition": "medical rank1", "em": 0.2, "ci_low": 0.15, "ci_high": 0.25, "n": 400}])
    assert exp.verdict(1).verdict == "not run"  # chapter 1 recorded part of what it promises: it did not finish
    exp.record("ch1_scores", [{"condition": "chat model", "mean_aligned": 90.0, "mean_coherent": 90.0}])
    exp.record("judge_agreement", [{"judge": "some-judge", "pairs": GENERAL_PAIRS_LABEL, "auroc": 0.95, "n": 50,
                                    "auroc_ci_low": 0.9, "auroc_ci_high": 1.0, "em_recall": 0.9,
                                    "em_false_positive": 0.0}])
    v = exp.verdict(1)
    assert v.verdict == "reproduced" and "highest EM 20.0%" in v.ours


def test_pairs_are_measured_in_the_order_their_solutions_are_trained(exp, monkeypatch):
    """``in_order_trained``: a pair whose general and narrow solutions are both trained (a finished
    ``train_meta.json``, no other process holding the folder) goes before the pairs still training; with none
    trained, the order given; each pair once; held by another process it is not trained yet."""
    monkeypatch.setattr(exp, "narrow_scale", lambda kind: 0.3)  # chapter 3's choice, without training a sweep
    pairs = [(kind, s) for s in (1, 2) for kind in ("steering vector", "rank-1 LoRA")]
    assert list(exp.in_order_trained(pairs)) == pairs  # nothing trained: the order given
    for sol, scale in (("general", 1.0), ("narrow", 0.3)):
        d = exp._solution_dir("rank-1 LoRA", sol, scale, 2)
        d.mkdir(parents=True)
        (d / train.META_FILE).write_text(json.dumps({"finished": True}))
    assert exp.compared_trained("rank-1 LoRA", 2) and not exp.compared_trained("steering vector", 2)
    assert list(exp.in_order_trained(pairs)) == [("rank-1 LoRA", 2), ("steering vector", 1), ("rank-1 LoRA", 1),
                                                 ("steering vector", 2)]
    monkeypatch.setattr(train, "finetune_held", lambda d: "narrow" in str(d))  # a worker still holds it
    assert not exp.compared_trained("rank-1 LoRA", 2)
    assert list(exp.in_order_trained(pairs)) == pairs
    with pytest.raises(ValueError, match="steering vector"):
        exp.compared_trained("rank-32", 1)
