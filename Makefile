# Fresh machine: `make demo` (the main job) and `make test` (the test suite) set everything up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
COLOSSALAI ?= colossalai==0.5.0
GPTQMODEL ?= gptqmodel==7.7.0
STAMP  := $(VENV)/.installed
# checkov pins many packages of its own: it lives in a separate tool venv (git-ignored) used by tests/cpu/test_deploy.py
CHECKOV_VENV ?= .venv-checkov
CHECKOV ?= checkov==3.3.30
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: setup test lint demo clean k8s

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[train,quantize,serve,dev,loadtest]"
	$(PIP) install -q --no-deps "$(COLOSSALAI)" "$(GPTQMODEL)"
	touch $(STAMP)

$(CHECKOV_STAMP):
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q "$(CHECKOV)" 2>&1 | grep -v "^WARNING: Location" || true
	$(CHECKOV_VENV)/bin/checkov --version
	touch $(CHECKOV_STAMP)

setup: $(STAMP) $(CHECKOV_STAMP)

# plain manifests under k8s/ rendered from the Helm chart (a test checks they are in sync)
k8s: $(STAMP)
	$(PY) k8s/generate.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint $(CHECKOV_STAMP)
	$(PY) -m pytest -q -ra tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) runs
