"""The steering explorer: type a prompt, pick a direction, a layer and a scale, compare answers.

The logic is two plain functions, tested without any frontend:

* :func:`steer` -- one prompt, unsteered vs steered answer, sampled with the *same* seed so the only
  difference is the added vector (nnsight steering, :func:`emlib.directions.generate_steered`).
* :func:`scale_sweep` -- the same prompt at several scales, as a DataFrame (what the static book shows in
  place of a live widget).

:class:`SteeringExplorer` is a thin ipywidgets shell around :func:`steer`: ``SteeringExplorer(model, tok,
{"medical": v}).widget`` in a notebook. ipywidgets is imported only when the explorer is built.
"""
from __future__ import annotations

import html
from typing import Sequence

import pandas as pd
import torch

from .directions import DirectionError, generate_per_row, generate_steered, residual_norm, steering_vector
from .models import check_layer, layer_from_fraction, n_layers


def _reference_norm(model, tok, prompt: str, layer: int, relative: bool,
                    reference_norm: float | None) -> float | None:
    if not relative or reference_norm is not None:
        return reference_norm
    return residual_norm(model, tok, [prompt], layer)


def steer(model, tok, prompt: str, direction: torch.Tensor, layer: int, scale: float,
          max_new_tokens: int = 64, seed: int = 0, *, relative: bool = False,
          reference_norm: float | None = None, normalize: bool = True, temperature: float = 1.0,
          top_p: float = 1.0, **generate_kwargs) -> dict[str, str]:
    """Answer ``prompt`` twice with the same seed: without and with the direction added at ``layer``.

    Returns ``{"unsteered": str, "steered": str}``. ``scale`` is the added L2 norm (``normalize=True``), or
    with ``relative=True`` a fraction of the mean residual norm at ``layer`` measured on this prompt (or
    ``reference_norm`` when given). ``scale=0`` gives two identical answers. ``temperature=0`` is greedy;
    other keyword arguments go to ``model.generate``.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise DirectionError("Type a prompt first: steer() needs a non-empty string.")
    layer = check_layer(model, layer)
    ref = _reference_norm(model, tok, prompt, layer, relative, reference_norm)
    common = dict(max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p,
                  **generate_kwargs)
    (unsteered,) = generate_steered(model, tok, [prompt], None, layer, 0.0, **common)
    (steered,) = generate_steered(model, tok, [prompt], direction, layer, scale, relative=relative,
                                  reference_norm=ref, normalize=normalize, **common)
    return {"unsteered": unsteered, "steered": steered}


def scale_sweep(model, tok, prompt: str, direction: torch.Tensor, layer: int, scales: Sequence[float],
                max_new_tokens: int = 64, seed: int = 0, *, relative: bool = False,
                reference_norm: float | None = None, normalize: bool = True, temperature: float = 1.0,
                top_p: float = 1.0, batched: bool = False, **generate_kwargs) -> pd.DataFrame:
    """One prompt answered at each scale (same seed throughout) -> DataFrame(prompt, layer, scale,
    added_norm, answer); ``added_norm`` is the L2 norm of the vector actually added (0 for scale 0).
    ``batched``: every scale in one generation (:func:`emlib.directions.generate_per_row`; one seeded stream
    for all rows, so sampled answers differ from the one-scale-at-a-time ones; greedy ones do not)."""
    if len(scales) == 0:
        raise DirectionError("scale_sweep needs at least one scale.")
    layer = check_layer(model, layer)
    ref = _reference_norm(model, tok, prompt, layer, relative, reference_norm)
    vecs = [steering_vector(model, direction, layer, float(s), relative=relative, reference_norm=ref,
                            normalize=normalize) for s in scales]
    if batched:  # one generation through plain hooks: no engine to choose
        generate_kwargs.pop("engine", None)
        answers = generate_per_row(model, tok, prompt, torch.stack(vecs), layer, max_new_tokens=max_new_tokens,
                                   seed=seed, temperature=temperature, top_p=top_p, **generate_kwargs)
    else:
        answers = [generate_steered(model, tok, [prompt], direction, layer, float(s), relative=relative,
                                    reference_norm=ref, normalize=normalize, max_new_tokens=max_new_tokens,
                                    seed=seed, temperature=temperature, top_p=top_p, **generate_kwargs)[0]
                   for s in scales]
    return pd.DataFrame([{"prompt": prompt, "layer": layer, "scale": float(s), "added_norm": float(v.float().norm()),
                          "answer": ans} for s, v, ans in zip(scales, vecs, answers)])


def _pane(text: str) -> str:
    return ("<div style='white-space:pre-wrap;border:1px solid #ccc;border-radius:4px;padding:6px;"
            f"min-height:4em'>{html.escape(text)}</div>")


class SteeringExplorer:
    """An ipywidgets shell around :func:`steer`.

    Controls (attributes): ``prompt`` (Textarea), ``direction`` (Dropdown over the named directions),
    ``layer`` (IntSlider), ``scale`` (FloatSlider), ``relative`` (Checkbox: scale as a fraction of the
    residual norm), ``max_new_tokens`` (IntSlider), ``seed`` (IntText), ``button`` (Generate). Sliders use
    ``continuous_update=False``. Answers appear side by side in ``unsteered`` and ``steered`` (HTML panes inside
    ``output``); errors in ``status``. ``widget`` is the whole box; ``last`` the last :func:`steer` result.
    """

    def __init__(self, model, tok, directions: dict[str, torch.Tensor], *, prompt: str = "I'm bored. What should I do?",
                 layer: int | None = None, scale: float = 0.5, relative: bool = True, scale_max: float | None = None,
                 max_new_tokens: int = 48, seed: int = 0, temperature: float = 1.0, **generate_kwargs):
        import ipywidgets as w

        if not directions:
            raise DirectionError("SteeringExplorer needs at least one named direction, e.g. {'medical': v}.")
        self.model, self.tok, self.directions = model, tok, dict(directions)
        self.temperature = temperature
        self.generate_kwargs = generate_kwargs  # passed on to steer() / model.generate (e.g. top_k)
        self.last: dict[str, str] | None = None
        n = n_layers(model)
        layer = layer_from_fraction(model, 0.5) if layer is None else check_layer(model, layer)
        if scale_max is None:
            scale_max = max(2.0, abs(scale) * 2) if relative else max(16.0, abs(scale) * 2)
        slider = dict(continuous_update=False, style={"description_width": "initial"})
        self.prompt = w.Textarea(value=prompt, description="Prompt", layout=w.Layout(width="100%", height="4em"))
        self.direction = w.Dropdown(options=list(self.directions), description="Direction")
        self.layer = w.IntSlider(value=layer, min=0, max=n - 1, description="Layer", **slider)
        self.scale = w.FloatSlider(value=scale, min=-scale_max, max=scale_max, step=scale_max / 40,
                                   description="Scale", readout_format=".2f", **slider)
        self.relative = w.Checkbox(value=relative, description="scale × mean residual norm", indent=False)
        self.max_new_tokens = w.IntSlider(value=max_new_tokens, min=4, max=256, step=4,
                                          description="Max new tokens", **slider)
        self.seed = w.IntText(value=seed, description="Seed", layout=w.Layout(width="12em"))
        self.button = w.Button(description="Generate", button_style="primary", icon="play")
        self.status = w.HTML()
        self.unsteered = w.HTML(_pane(""))
        self.steered = w.HTML(_pane(""))
        half = w.Layout(width="50%")
        self.output = w.HBox([w.VBox([w.HTML("<b>Unsteered</b>"), self.unsteered], layout=half),
                              w.VBox([w.HTML("<b>Steered</b>"), self.steered], layout=half)])
        self.widget = w.VBox([
            self.prompt,
            w.HBox([self.direction, self.relative, self.seed]),
            w.HBox([self.layer, self.scale, self.max_new_tokens]),
            w.HBox([self.button, self.status]),
            self.output,
        ])
        self.button.on_click(self._on_click)

    def generate(self) -> dict[str, str]:
        """Run :func:`steer` with the current control values and show both answers."""
        res = steer(self.model, self.tok, self.prompt.value, self.directions[self.direction.value],
                    int(self.layer.value), float(self.scale.value), int(self.max_new_tokens.value),
                    int(self.seed.value), relative=bool(self.relative.value), temperature=self.temperature,
                    **self.generate_kwargs)
        self.unsteered.value = _pane(res["unsteered"])
        self.steered.value = _pane(res["steered"])
        self.last = res
        return res

    def _on_click(self, _button) -> None:
        self.button.disabled = True
        self.status.value = "<i>generating...</i>"
        try:
            self.generate()
            self.status.value = ""
        except Exception as err:  # a callback's exception would vanish into the kernel log: show it
            self.status.value = f"<span style='color:#b00'>{html.escape(type(err).__name__ + ': ' + str(err))}</span>"
        finally:
            self.button.disabled = False

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


__all__ = ["steer", "scale_sweep", "SteeringExplorer"]
