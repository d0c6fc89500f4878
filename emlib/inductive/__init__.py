"""Inductive-bias metrics: why the *general* solution wins over the *narrow* one (claims 4, 5 and 6).

Every metric reads *saved* solutions (a steering vector, :mod:`emlib.vectors`, or a LoRA adapter,
:mod:`emlib.adapters`; paths or loaded objects) and never trains. Three measurements, each returning a
tidy DataFrame and cached on disk (:mod:`.common`):

* **Efficiency** (:mod:`.efficiency`, :func:`loss_vs_norm`): the SFT loss of each solution rescaled to a
  shared grid of norms; :func:`paired_gaps` compares two solutions row by row.
* **Stability** (:mod:`.stability`, :func:`stability_curve`): the normalised loss increase under
  orthogonal perturbation (relative to each solution's norm, or of one matched absolute norm), with a CI over
  perturbation seeds; :func:`paired_stability` compares two solutions draw by draw.
* **Pretraining influence** (:mod:`.pretraining`, :func:`pretraining_kl`): ``KL(base || steered)`` per
  token on natural text.

Norms are each solution type's one definition: ``||alpha * v||`` for a vector
(:attr:`emlib.vectors.SteeringVector.norm`), ``||scaling * B @ A||_F`` per LoRA module
(:mod:`emlib.adapters`). Rescaling and perturbing act on copies (vectors) or in place and undone on exit
(LoRA weights), so a saved or loaded solution is never changed. Figures: :mod:`emlib.plots`.
"""
from .common import (PAPER_EPS_GRID, PAPER_NORM_FRACTIONS, Solution, as_solutions, default_cache_dir,
                     load_solution)
from .efficiency import (by_family, efficiency_summary, loss_vs_norm, norm_summary, paired_gaps, reference_norm,
                         row_losses_vs_norm)
from .pretraining import null_summary, pretraining_kl, random_null_kl
from .stability import (NOISE_MODES, paired_stability, seed_curves, stability_curve, stability_losses,
                        summarise_stability)

__all__ = [
    "PAPER_EPS_GRID", "PAPER_NORM_FRACTIONS", "Solution", "as_solutions", "default_cache_dir", "load_solution",
    "by_family", "efficiency_summary", "loss_vs_norm", "reference_norm", "pretraining_kl", "random_null_kl", "null_summary",
    "stability_curve", "stability_losses", "summarise_stability", "norm_summary", "paired_gaps",
    "row_losses_vs_norm", "NOISE_MODES", "paired_stability", "seed_curves",
]
