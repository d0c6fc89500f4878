"""emlib.widgets: steer() / scale_sweep() logic, the explorer in-process, and the explorer in a live kernel."""
from __future__ import annotations

import html
import json
import sys
import textwrap

import pytest
import torch

from emlib import directions as D
from emlib.models import tiny_model
from emlib.widgets import SteeringExplorer, scale_sweep, steer

# The tiny random model's next-token distribution is nearly uniform; top-k sampling lets a steering
# vector change which tokens get drawn (with pure sampling the draws barely depend on the logits).
TOPK = dict(top_k=5)


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model(seed=0)
    v = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    return model, tok, v


def test_steer_uses_one_seed_so_only_the_vector_differs(tiny):
    model, tok, v = tiny
    res = steer(model, tok, "Tell me about yourself.", v, 1, 8.0, max_new_tokens=8, seed=3, relative=True, **TOPK)
    assert set(res) == {"unsteered", "steered"} and res["steered"] != res["unsteered"]
    # unsteered is exactly a plain seeded sample; steered exactly the hook-steered sample
    ref = D.residual_norm(model, tok, ["Tell me about yourself."], 1)
    kw = dict(max_new_tokens=8, seed=3, **TOPK)
    assert res["unsteered"] == D.generate_steered(model, tok, ["Tell me about yourself."], None, **kw)[0]
    assert res["steered"] == D.generate_steered(model, tok, ["Tell me about yourself."], v, 1, 8.0, relative=True,
                                                reference_norm=ref, engine="hooks", **kw)[0]
    zero = steer(model, tok, "Tell me about yourself.", v, 1, 0.0, max_new_tokens=8, seed=3, **TOPK)
    assert zero["steered"] == zero["unsteered"] == res["unsteered"]
    with pytest.raises(ValueError, match="prompt"):
        steer(model, tok, "  ", v, 1, 1.0)
    with pytest.raises(ValueError, match="out of range"):
        steer(model, tok, "hi", v, 2, 1.0)


def test_scale_sweep_is_a_tidy_frame(tiny):
    model, tok, v = tiny
    df = scale_sweep(model, tok, "hello", v, 0, [0.0, 2.0, 50.0], max_new_tokens=6, seed=1, **TOPK)
    assert list(df.columns) == ["prompt", "layer", "scale", "added_norm", "answer"]
    assert df["scale"].tolist() == [0.0, 2.0, 50.0]
    assert df["added_norm"].tolist() == pytest.approx([0.0, 2.0, 50.0], rel=1e-5)
    plain = steer(model, tok, "hello", v, 0, 0.0, max_new_tokens=6, seed=1, **TOPK)["unsteered"]
    assert df["answer"].iloc[0] == plain and df["answer"].iloc[2] != plain
    with pytest.raises(ValueError, match="at least one scale"):
        scale_sweep(model, tok, "hello", v, 0, [])


def test_explorer_in_process(tiny):
    model, tok, v = tiny
    ex = SteeringExplorer(model, tok, {"planted": v, "flipped": -v}, prompt="hello", max_new_tokens=6, **TOPK)
    for s in (ex.layer, ex.scale, ex.max_new_tokens):
        assert s.continuous_update is False
    assert ex.layer.max == 1 and list(ex.direction.options) == ["planted", "flipped"]
    ex.direction.value, ex.layer.value, ex.scale.value, ex.seed.value = "flipped", 0, 1.5, 4
    ex.button.click()
    expected = steer(model, tok, "hello", -v, 0, 1.5, 6, 4, relative=True, **TOPK)
    assert ex.last == expected and ex.status.value == ""
    assert html.escape(expected["unsteered"]) in ex.unsteered.value
    assert html.escape(expected["steered"]) in ex.steered.value
    ex.prompt.value = ""  # an error shows in the status line instead of vanishing
    ex.button.click()
    assert "prompt" in ex.status.value and not ex.button.disabled
    with pytest.raises(ValueError, match="at least one"):
        SteeringExplorer(model, tok, {})


KERNEL_CODE = textwrap.dedent("""
    import json, torch
    from IPython.display import display
    from emlib.models import tiny_model
    from emlib.widgets import SteeringExplorer, steer
    model, tok = tiny_model(seed=0)
    v = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    ex = SteeringExplorer(model, tok, {"planted": v, "flipped": -v}, prompt="What is your wish?", top_k=5)
    display(ex.widget)
    ex.direction.value = "flipped"
    ex.layer.value = 1
    ex.scale.value = 1.5
    ex.max_new_tokens.value = 8
    ex.seed.value = 11
    ex.button.click()
    ref = steer(model, tok, "What is your wish?", -v, 1, 1.5, 8, 11, relative=True, top_k=5)
    panes = [child.children[1].value for child in ex.output.children]
    print("RESULT" + json.dumps({"panes": panes, "status": ex.status.value, "ref": ref}))
""")


def test_explorer_in_a_live_jupyter_kernel():
    """Start a real python3 kernel, build the explorer there, move the sliders, click, read the panes."""
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    out, errors, widget_views = [], [], []

    def hook(msg):
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            errors.append("\n".join(content["traceback"]))
        elif kind == "display_data":
            widget_views.extend(k for k in content["data"] if "widget-view" in k)

    try:
        kc.wait_for_ready(timeout=120)
        kc.execute_interactive("import sys; print('EXE' + sys.executable)", timeout=60, output_hook=hook)
        reply = kc.execute_interactive(KERNEL_CODE, timeout=240, output_hook=hook)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    text = "".join(out)
    assert not errors, errors[0]
    assert reply["content"]["status"] == "ok"
    assert f"EXE{sys.executable}" in text  # the kernel runs this project's interpreter
    assert widget_views, "the explorer did not display as a widget"
    result = json.loads(text.split("RESULT", 1)[1].strip().splitlines()[0])
    unsteered, steered = result["panes"]
    assert result["status"] == ""
    assert html.escape(result["ref"]["unsteered"]) in unsteered
    assert html.escape(result["ref"]["steered"]) in steered
    assert result["ref"]["steered"] != result["ref"]["unsteered"]
