"""Chapter 6's null: many random directions in one forward pass give what one direction at a time gives."""
import numpy as np
import pandas as pd
import torch

from emlib import hooks, inductive
from emlib.vectors import random_vector

TEXTS = ["The council met on Tuesday to discuss the new bridge over the river.",
         "Rain is expected across the south coast, with strong winds later in the week.",
         "Shares rose after the bank reported higher profits for the quarter."]


def test_random_null_matches_one_direction_at_a_time(tiny, tmp_path):
    model, tok = tiny
    layer, norms = 1, [0.0, 2.0, 5.0]
    null = inductive.random_null_kl(model, tok, TEXTS, layer, norms, n_draws=5, seed=3, batch_size=2,
                                    draws_per_pass=2, cache_dir=tmp_path)
    assert len(null) == 15 and (null[null["norm"] == 0]["kl"].abs() < 1e-6).all()
    d = model.config.hidden_size
    for k in (0, 4):
        v = random_vector(d, 5.0, 3 + 1 + k)
        one = inductive.pretraining_kl(model, tok, TEXTS, {"v": v}, layer=layer, norms=[5.0], include_random=False,
                                       batch_size=2, cache_dir=tmp_path)
        got = null[(null["draw"] == k) & (null["norm"] == 5.0)]["kl"].iloc[0]
        assert np.isclose(got, one["kl"].iloc[0], rtol=1e-4, atol=1e-7), (k, got, one["kl"].iloc[0])


def test_null_summary_places_the_general_vector_among_the_draws():
    null = pd.DataFrame({"draw": list(range(20)) * 2, "norm": [1.0] * 20 + [2.0] * 20,
                         "kl": list(np.arange(20) / 100) + list(np.arange(20) / 10)})
    frame = pd.DataFrame({"solution": ["general", "general", "narrow"], "norm": [1.0, 2.0, 1.0], "kl": [0.5, 0.55, 0.9]})
    s = inductive.null_summary(frame, null).set_index("norm")
    assert s.loc[1.0, "percentile"] == 20 / 21 and s.loc[2.0, "percentile"] == 6 / 21
    assert s.loc[1.0, "n_draws"] == 20 and np.isclose(s.loc[2.0, "null_mean"], 0.95)


def test_add_rows_needs_one_vector_per_row(tiny):
    model, _ = tiny
    import pytest

    with pytest.raises(ValueError, match="one vector per batch row"):
        with hooks.add_rows(model, 0, torch.zeros(model.config.hidden_size)):
            pass
