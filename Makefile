# FlexiAct for Blender — set-up, tests, demo. Everything a fresh machine needs is installed from here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

# torch first, pinned, so that a CPU machine never pulls a multi-GB CUDA build through the `torch>=2.5` range.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/flexiact-backend make-tiny-model out/tiny-model
	$(VENV)/bin/flexiact-backend generate --model out/tiny-model --image-demo --prompt "a figure waves" --out out/demo.mp4

clean:
	rm -rf $(VENV) out dist build *.egg-info
