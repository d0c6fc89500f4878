"""emlib.prefix: the layers below a metric's layer run once per batch, with the full forward's numbers."""
import pytest
import torch

from emlib import chat, prefix
from emlib import train as T
from emlib.hooks import add_rows, add_vector
from emlib.models import tiny_model


def _batch(seed=0, rows=3, n=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (rows, n), generator=g)
    att = torch.ones_like(ids)
    att[1, 6:] = 0  # a right-padded row
    return ids, att


def _model():
    model, tok = tiny_model(seed=0)
    return model.eval(), tok


@torch.no_grad()
def test_reused_prefix_gives_the_full_forward_bit_for_bit():
    model, _ = _model()
    ids, att = _batch()
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    full, _ = chat.head_inputs(model, ids, att)
    with add_vector(model, 1, v):
        full_v, _ = chat.head_inputs(model, ids, att)
    rows = torch.randn(2 * ids.shape[0], model.config.hidden_size)
    with add_rows(model, 1, rows):
        full_rows, _ = chat.head_inputs(model, ids.repeat(2, 1), att.repeat(2, 1))
    with prefix.reuse_prefix(model, 1) as cache:
        first, _ = chat.head_inputs(model, ids, att)
        with add_vector(model, 1, v):
            steered, _ = chat.head_inputs(model, ids, att)
        with add_rows(model, 1, rows):
            per_row, _ = chat.head_inputs(model, ids.repeat(2, 1), att.repeat(2, 1))
        again, _ = chat.head_inputs(model, ids, att)
    assert torch.equal(first, full) and torch.equal(again, full) and torch.equal(steered, full_v)
    assert torch.equal(per_row, full_rows) and not torch.equal(steered, full)
    assert (cache.misses, cache.hits) == (2, 2)  # two distinct batches, each run whole once
    assert prefix.active(model.get_decoder()) is None  # the block closed


@torch.no_grad()
def test_a_change_below_the_layer_is_refused_or_recomputed():
    model, _ = _model()
    ids, att = _batch()
    with prefix.reuse_prefix(model, 1) as cache:
        chat.head_inputs(model, ids, att)
        with add_vector(model, 0, torch.ones(model.config.hidden_size)):
            with pytest.raises(RuntimeError, match="layer 0 .* forward hook"):
                chat.head_inputs(model, ids, att)
        w = model.get_decoder().layers[0].mlp.down_proj.weight
        w.mul_(1.5)  # in place, below the layer: what was kept is stale
        got, _ = chat.head_inputs(model, ids, att)
    want, _ = chat.head_inputs(model, ids, att)
    assert torch.equal(got, want) and cache.misses == 2


@torch.no_grad()
@pytest.mark.parametrize("adapter_layer", [0, 1])
def test_a_lora_at_the_layer_reuses_and_one_below_is_refused(adapter_layer):
    model, _ = _model()
    ids, att = _batch()
    lora = T.add_lora(model, "rank1", layers=adapter_layer)
    for m in lora.modules():
        if hasattr(m, "lora_B") and "default" in m.lora_B:
            m.lora_B["default"].weight.fill_(0.3)  # not the identity any more
    want, _ = chat.head_inputs(lora, ids, att)
    with prefix.reuse_prefix(lora, 1) as cache:
        if adapter_layer < 1:
            with pytest.raises(RuntimeError, match="layer 0 has a LoRA module"):
                chat.head_inputs(lora, ids, att)
            return
        chat.head_inputs(lora, ids, att)
        got, _ = chat.head_inputs(lora, ids, att)
    assert torch.equal(got, want) and cache.hits == 1


def test_no_layer_changes_nothing_and_bad_layers_say_so():
    model, _ = _model()
    with prefix.reuse_prefix(model, None) as cache:
        assert cache is None
    with prefix.reuse_prefix(model, 0) as cache:
        assert cache is None
    with pytest.raises(ValueError, match="0 <= layer"):
        with prefix.reuse_prefix(model, 7):
            pass
