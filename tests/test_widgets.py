"""emlib.widgets: steer() / scale_sweep() logic, the explorer in-process, in a live kernel, and in a real browser
(JupyterLab + headless Chromium driven by Playwright; skipped when either is missing)."""
from __future__ import annotations

import html
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import pandas as pd
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


# ------------------------------------------------------------------------------- a real browser
BROWSER_CELLS = [
    textwrap.dedent("""
        import torch
        from emlib.models import tiny_model
        from emlib.widgets import SteeringExplorer
        model, tok = tiny_model(seed=0)
        v = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
        ex = SteeringExplorer(model, tok, {"planted": v}, prompt="What is your wish?", layer=1, scale=0.0,
                              max_new_tokens=8, seed=11, top_k=5)
        clicks = []  # one entry per finished press of Generate (handlers run in the order they were added)
        ex.button.on_click(lambda _: clicks.append(ex.last))
        ex
    """).strip(),
    textwrap.dedent("""
        import json
        runs = globals().get("runs", 0) + 1
        print("LAST" + json.dumps({"run": runs, "clicks": len(clicks), "scale": ex.scale.value, "last": ex.last}))
    """).strip(),
]


def _chromium() -> str | None:
    for path in (os.environ.get("EMLIB_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if path and os.access(path, os.X_OK):
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def jupyterlab(tmp_path):
    """A JupyterLab server on 127.0.0.1 with a token, serving tmp_path; its own settings and workspaces."""
    pytest.importorskip("jupyterlab", reason="the browser test needs JupyterLab (the dev extra: `make venv`)")
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")):
        env[var] = str(tmp_path / "jupyter" / sub)  # nothing from ~/.jupyter; the venv's python3 kernel
    news = tmp_path / "jupyter" / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')  # no "get notified about Jupyter news?" toast over the page
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
         "--ServerApp.allow_root=True", "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy
    try:
        deadline = time.time() + 120
        while True:
            try:
                with direct.open(f"{base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                pytest.fail("JupyterLab did not start:\n" + (tmp_path / "jupyterlab.log").read_text()[-3000:])
            time.sleep(0.2)
        yield base, token
    finally:
        server.terminate()  # shuts its kernels down
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture()
def chromium():
    """(playwright's sync API, the system Chromium); skips with what to install when either is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the dev extra: "
                                   "`make venv`)")
    path = _chromium()
    if path is None:
        pytest.skip("the browser test needs Chromium: `apt-get install -y --no-install-recommends chromium` "
                    "(or set EMLIB_CHROMIUM to a Chromium/Chrome binary); .ci/run installs it")
    return sync_api, path


@pytest.mark.slow
def test_explorer_in_a_real_browser(tmp_path, chromium, jupyterlab):
    """JupyterLab + headless Chromium (Playwright): open a notebook with the explorer on the tiny model, run
    all cells, press Generate at scale 0 (both answers equal), drag the scale slider, press Generate again
    and read both answers from the page: the steered one changed, the unsteered one did not, and both are
    what the kernel computed for the scale the slider shows."""
    import nbformat

    sync_api, chromium = chromium

    t0 = time.time()
    base, token = jupyterlab
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in BROWSER_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "explorer.ipynb")

    shot = Path(os.environ.get("EMLIB_BROWSER_SCREENSHOT", tmp_path / "explorer.png"))
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.set_default_timeout(int(os.environ.get("EMLIB_BROWSER_TIMEOUT_MS", 120_000)))
            page.goto(f"{base}/lab/tree/explorer.ipynb?reset&token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell")
            page.wait_for_function(  # the kernel has started and the page is connected to it
                """() => { const name = document.querySelector('.jp-Toolbar-kernelName');
                           const state = document.querySelector('.jp-Notebook-ExecutionIndicator');
                           return name && !/No Kernel/.test(name.innerText) && state && state.dataset.status === 'idle'; }""")
            page.click(".lm-MenuBar-itemLabel:text-is('Run')")
            page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
            button = page.locator(".widget-button", has_text="Generate")
            button.wait_for()
            panes = page.locator(".widget-html-content div[style*='pre-wrap']")
            scale = page.locator(".widget-slider", has_text="Scale")
            last_cell = page.locator(".jp-Notebook .jp-Cell").nth(1)

            runs = [1]  # "Run All Cells" ran the last cell once

            def kernel_state(ready) -> dict:
                """Run the last cell (again) until what the kernel prints satisfies ``ready``: a widget's message
                (a click, a slider's new value) can reach the kernel after an execute request sent later."""
                deadline = time.time() + 120
                while True:
                    last_cell.locator(".jp-InputArea-editor").click()
                    page.keyboard.press("Shift+Enter")
                    runs[0] += 1
                    out = last_cell.locator(".jp-OutputArea-output", has_text=f'"run": {runs[0]},')
                    out.wait_for()
                    state = json.loads(out.inner_text().split("LAST", 1)[1])
                    if ready(state) or time.time() > deadline:
                        return state
                    time.sleep(0.2)

            def shown(state: dict) -> tuple[str, str]:
                """The two answers on the page once they show the kernel's last result (the widget manager
                renders comm updates asynchronously: they may land a moment after the cell's output)."""
                want = (_visible(state["last"]["unsteered"]), _visible(state["last"]["steered"]))
                deadline = time.time() + 60
                while True:
                    texts = panes.nth(0).inner_text(), panes.nth(1).inner_text()
                    if tuple(map(_visible, texts)) == want or time.time() > deadline:
                        return texts
                    time.sleep(0.1)

            assert scale.locator(".widget-readout").inner_text() == "0.00"
            button.click()
            state0 = kernel_state(lambda st: st["clicks"] == 1)
            assert state0["clicks"] == 1 and state0["scale"] == 0.0
            unsteered0, steered0 = shown(state0)
            assert _visible(unsteered0) and steered0 == unsteered0  # scale 0: no change

            handle, track = scale.locator(".noUi-handle"), scale.locator(".noUi-target")
            h, t = handle.bounding_box(), track.bounding_box()
            page.mouse.move(h["x"] + h["width"] / 2, h["y"] + h["height"] / 2)
            page.mouse.down()
            page.mouse.move(t["x"] + 0.85 * t["width"], h["y"] + h["height"] / 2, steps=10)
            page.mouse.up()
            readout = scale.locator(".widget-readout").inner_text()
            assert float(readout) > 0.5, readout  # the drag moved the slider to the right
            moved = kernel_state(lambda st: abs(st["scale"] - float(readout)) < 0.005)
            assert moved["scale"] == pytest.approx(float(readout), abs=0.005)  # the kernel got the slider's value
            button.click()
            state = kernel_state(lambda st: st["clicks"] == 2)
            assert state["clicks"] == 2 and state["scale"] == moved["scale"]
            unsteered, steered = shown(state)
        finally:
            page.screenshot(path=str(shot), full_page=True)  # what the page showed, also after a failure
            browser.close()
    print(f"browser test: {time.time() - t0:.1f} s after the server was up; screenshot {shot}")
    assert steered != unsteered  # the steered answer changed ...
    assert unsteered == unsteered0 and steered != steered0  # ... and the unsteered one did not
    assert (_visible(unsteered), _visible(steered)) == (_visible(state["last"]["unsteered"]),
                                                       _visible(state["last"]["steered"]))


def _visible(text: str) -> str:
    """Text as a browser shows it: control characters other than newlines and tabs are not rendered."""
    return "".join(ch for ch in text if ch in "\n\t" or ch.isprintable()).strip()


def test_scale_sweep_batched_is_one_generation_with_the_same_vectors(tiny):
    """batched: every scale in one generation. Greedy answers equal the one-scale-at-a-time ones (sampled ones
    share one random stream, so they differ); the added norms are the same either way."""
    model, tok, v = tiny
    kw = dict(max_new_tokens=6, seed=1, temperature=0.0)
    one = scale_sweep(model, tok, "hello", v, 0, [0.0, 2.0, 50.0], **kw)
    both = scale_sweep(model, tok, "hello", v, 0, [0.0, 2.0, 50.0], batched=True, engine="hooks", **kw)
    pd.testing.assert_frame_equal(one, both)
    assert one["answer"].iloc[2] != one["answer"].iloc[0]  # the vector changes the greedy answer
    sampled = scale_sweep(model, tok, "hello", v, 0, [0.0, 2.0], max_new_tokens=6, seed=1, batched=True, **TOPK)
    assert sampled["added_norm"].tolist() == pytest.approx([0.0, 2.0], rel=1e-5)
