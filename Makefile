# Fresh machine: `make demo` (the main job) and `make test` (the test suite) set everything up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
COLOSSALAI ?= colossalai==0.5.0
GPTQMODEL ?= gptqmodel==7.7.0
STAMP  := $(VENV)/.installed

.PHONY: setup test lint demo clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[train,quantize,serve,dev,loadtest]"
	$(PIP) install -q --no-deps "$(COLOSSALAI)" "$(GPTQMODEL)"
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -ra tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) runs
