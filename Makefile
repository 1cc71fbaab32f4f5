# `make demo` and `make test` work on a fresh machine: they create .venv (torch first, the CPU
# build pinned below where no torch is installed yet), install the project, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO := data/demo

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

$(DEMO)/ground_truth.json: | $(STAMP)
	$(VENV)/bin/m3-curate demo-archive $(DEMO) --cases 4 --seed 0

demo: $(STAMP) $(DEMO)/ground_truth.json
	$(VENV)/bin/m3-curate build manifests/demo.yaml
	@echo "share out/demo/dataset as it is (README.md dataset card, dataset_card.json, rows in data/<split>/part-NNNNN.parquet); out/demo/internal names source files (index, ledger, cache): never share it"

# PYTHONFAULTHANDLER: a crash in native code, even after the last test, prints its stack.
test: $(STAMP)
	PYTHONFAULTHANDLER=1 $(PY) -m pytest

# The Dockerfile, linted (no image can be built here): hadolint from its PyPI wheel (dev extras).
lint: $(STAMP)
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf out data/demo
