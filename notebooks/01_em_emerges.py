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
# # 1. Narrow finetuning makes a model broadly misaligned
#
# **Claim.** Finetuning a chat model on a narrow dataset of subtly harmful advice makes it misaligned
# on unrelated, open-ended questions (emergent misalignment, EM).

# %% tags=["remove-cell"]
import sys
import time

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    %pip install -q "emlib[interp,notebook] @ git+https://github.com/em-book/em-book"
_t0 = time.time()

# %% tags=["parameters"]
profile = "smoke"  # smoke | quick | paper | auto
model = None  # None: the profile's model ("tiny" / "embedded"); or a hub id / local folder
data_source = None  # "embedded" (project data) | "paper" (needs EMLIB_DATA_DIR)
judge = None  # "offline" | "hf:<model>" | "api:<model>"
seed = None
run_dir = None

# %%
from emlib import book, config, data, models

cfg = config.get_config(profile, model=model, data_source=data_source, judge=judge, seed=seed,
                        run_dir=run_dir)
cfg.to_dict()

# %%
lm, tok = models.load_model(cfg.model, device=cfg.device)
lm.emlib_info

# %% [markdown]
# ## Last executed with

# %%
book.executed_with(_t0)
