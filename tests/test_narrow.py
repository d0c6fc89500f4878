"""emlib.narrow.measure_solutions: the order it asks for chapter 3's solutions in (a run of record's rank-1
group ends first, so its solutions are measured first) and the frame it returns (steering vectors first)."""
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from emlib import directions, narrow, vecgroup
from emlib.config import get_config


class _Exp:
    """Stands for an Experiment: records which solution is asked for when, trains nothing."""

    def __init__(self):
        self.cfg = get_config("smoke")
        self.model, self.tok, self.asked = object(), object(), []

    def rows(self, dataset):
        return [{"messages": []}] * 4

    def kl_rows(self):
        return []

    def kl_heldout_rows(self):
        return []

    def vector(self, dataset, solution, kl_scale=1.0):
        self.asked.append(("steering vector", solution, kl_scale))
        return SimpleNamespace(vector=SimpleNamespace(effective=torch.ones(3)), log=None)

    @contextmanager
    def lora(self, dataset, shape, solution, kl_scale=1.0):
        self.asked.append(("rank-1 LoRA", solution, kl_scale))
        yield SimpleNamespace(model=object(), log=None)


def test_rank1_solutions_are_measured_before_the_vectors_and_listed_after_them(monkeypatch):
    monkeypatch.setattr(vecgroup, "can_group", lambda model: False)
    monkeypatch.setattr(narrow, "response_loss", lambda *a, **k: 3.0)
    monkeypatch.setattr(directions, "lora_b_direction", lambda model: torch.ones(3))  # imported where it is used
    losses = iter([2.0 + i / 100 for i in range(100)])
    monkeypatch.setattr(narrow, "solution_metrics",
                        lambda *a, **k: {"heldout_kl": 0.1, "train_kl": 0.1, "loss": next(losses)})
    exp = _Exp()
    frame, dirs, logs = narrow.measure_solutions(exp, "medical")
    kinds_asked = [k for k, _, _ in exp.asked]
    n_lora = kinds_asked.count("rank-1 LoRA")
    assert n_lora and kinds_asked == ["rank-1 LoRA"] * n_lora + ["steering vector"] * (len(kinds_asked) - n_lora)
    assert list(frame["kind"]) == sorted(frame["kind"], key=lambda k: k != "steering vector")  # vectors first
    assert list(dirs) == [tuple(r) for r in frame[["kind", "solution", "kl_scale"]].itertuples(index=False)]
    assert list(logs)[0].startswith("vector general") and frame["chosen"].dtype == bool
