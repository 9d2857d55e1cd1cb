# FlexiAct for Blender — set-up, tests, demo. Everything a fresh machine needs is installed from here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: setup test test-fast demo bench gpu-check clean

setup: $(STAMP)

# torch first, pinned, so the `torch>=2.5` range never pulls another build. From pip's configured indexes (the
# default index's torch is a CUDA build); a CPU-only machine without a local wheel saves about 2.5 GB with
# `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu` (README: "Which torch build").
TORCH_INDEX ?=
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[test,cluster]'
	touch $(STAMP)

# One Blender (5.0) only, to keep a fresh machine quick: its own builder packs the add-on zip the demo installs.
# The tiny model on a free loopback port unless MODEL=DIR names a real pipeline folder; DEMO_ARGS go to demo/main.py.
DEMO_ZIP = build/demo/flexiact-$(EXT_VERSION).zip
demo: setup .venv-bpy50/.installed
	rm -rf build/demo && mkdir -p build/demo/src
	cp blender_manifest.toml flexiact_blender/*.py build/demo/src/
	.venv-bpy50/bin/python $(call BLENDER_EXT,50,5.0) build --source-dir build/demo/src --output-filepath $(DEMO_ZIP)
	$(PY) demo/main.py --blender-python .venv-bpy50/bin/python --zip $(DEMO_ZIP) --out out $(if $(MODEL),--model $(MODEL)) $(DEMO_ARGS)

clean:
	rm -rf $(VENV) out dist build *.egg-info

# ---- Blender extension (issue 5): bpy venvs, extension zip ------------------------------------------
# `make test` runs tests/test_blender.py, which needs $(BLENDER_TEST_DEPS) built first.
BPY_PYTHON ?= python3.11
BPY_VERSIONS := 42 45 50
BPY_42 := 4.2.23
BPY_45 := 4.5.15
BPY_50 := 5.0.1
BPY_STAMPS := $(foreach v,$(BPY_VERSIONS),.venv-bpy$(v)/.installed)
# X/GL libraries the bpy module links against; installed only when `import bpy` fails for want of them.
BLENDER_APT := libx11-6 libxext6 libxrender1 libxxf86vm1 libxfixes3 libxi6 libxkbcommon0 libsm6 libice6 \
	libxcb1 libgl1 libglx0 libegl1 libgomp1 libbsd0
EXT_VERSION := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' blender_manifest.toml)
EXT_ZIP := dist/flexiact-$(EXT_VERSION).zip
BLENDER_EXT = .venv-bpy$(1)/lib/python3.11/site-packages/bpy/$(2)/scripts/addons_core/bl_pkg/cli/blender_ext.py
BLENDER_TEST_DEPS := blender-setup extension

.PHONY: blender-setup blender-libs extension

blender-setup: $(BPY_STAMPS)

.venv-bpy%/.installed:
	test -x .venv-bpy$*/bin/python || $(BPY_PYTHON) -m venv .venv-bpy$*
	.venv-bpy$*/bin/python -c "import bpy" 2>/dev/null || .venv-bpy$*/bin/pip install -q bpy==$(BPY_$*) pytest
	.venv-bpy$*/bin/python -c "import pytest" 2>/dev/null || .venv-bpy$*/bin/pip install -q pytest
	.venv-bpy$*/bin/python -c "import bpy" 2>/dev/null || $(MAKE) --no-print-directory blender-libs
	.venv-bpy$*/bin/python -c "import bpy; print('bpy', bpy.app.version_string)"
	touch $@

blender-libs:
	missing=$$(for p in $(BLENDER_APT); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

# Built by Blender's own extension builder (4.2, the oldest supported) from a staging folder holding the
# root manifest and the add-on package, then validated by 4.2's and 5.0's validators. That builder/validator is one
# standard-library script (blender_ext.py) that ships only inside Blender: it is copied out of a bpy venv when one
# is there (`make test` builds them anyway), else out of the bpy wheel, downloaded once and never installed; either
# way it is kept in .cache/blender_ext/, so a packager needs no Blender installed.
extension: $(EXT_ZIP)

BLENDER_EXT_CACHE := .cache/blender_ext
EXT_CLI = $(BLENDER_EXT_CACHE)/$(1)/blender_ext.py
BLENDER_EXT_IN_WHEEL = bpy/$(1)/scripts/addons_core/bl_pkg/cli/blender_ext.py

$(BLENDER_EXT_CACHE)/%/blender_ext.py:
	mkdir -p $(@D)
	v=$$(echo $* | tr -d .); venv=.venv-bpy$$v/lib/python3.11/site-packages/$(call BLENDER_EXT_IN_WHEEL,$*); \
	if [ -f "$$venv" ]; then cp "$$venv" $@.tmp; else \
		pin=$$(make -s --no-print-directory print-bpy-$$v); \
		$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 -d .cache/wheels "bpy==$$pin"; \
		$(PYTHON) -c "import glob, sys, zipfile; z = zipfile.ZipFile(glob.glob('.cache/wheels/bpy-' + sys.argv[1] + '-*.whl')[0]); open(sys.argv[3], 'wb').write(z.read(sys.argv[2]))" \
			"$$pin" $(call BLENDER_EXT_IN_WHEEL,$*) $@.tmp; \
	fi
	mv $@.tmp $@

print-bpy-%:
	@echo $(BPY_$*)

$(EXT_ZIP): blender_manifest.toml $(wildcard flexiact_blender/*.py) $(call EXT_CLI,4.2) $(call EXT_CLI,5.0)
	rm -rf build/extension && mkdir -p build/extension dist
	cp blender_manifest.toml flexiact_blender/*.py build/extension/
	$(PYTHON) $(call EXT_CLI,4.2) build --source-dir build/extension --output-filepath $@.tmp.zip
	$(PYTHON) $(call EXT_CLI,4.2) validate $@.tmp.zip
	$(PYTHON) $(call EXT_CLI,5.0) validate $@.tmp.zip
	mv $@.tmp.zip $@

# ---- the whole suite ------------------------------------------------------------------------------------
# Defined last: its prerequisites use the Blender block's variables, which make expands when it reads the rule.
test: setup $(BLENDER_TEST_DEPS)
	$(PY) -m pytest -q

# The suite without Blender, the demo, the Ray cluster and the slow tests (no bpy venvs needed): a quick check while
# working on the backend.
test-fast: setup
	$(PY) -m pytest -q -m "not blender and not slow and not cluster" --ignore tests/test_demo.py

# The benchmarks on the tiny model (CPU or GPU, whichever is here), each as JSON in out/bench/ and a table;
# `make bench BENCH_MODEL="--model DIR"` measures a real pipeline instead.
BENCH_MODEL ?= --tiny
bench: setup
	mkdir -p out/bench
	$(VENV)/bin/flexiact-backend bench attention --json out/bench/attention.json
	$(VENV)/bin/flexiact-backend bench generate $(BENCH_MODEL) --json out/bench/generate.json
	$(VENV)/bin/flexiact-backend bench extract $(BENCH_MODEL) --json out/bench/extract.json

# On one CUDA GPU, under 8 minutes: every CUDA-only path at reduced size, then full-size steps with random
# weights; JSON and a table to docs/benchmarks/. `make gpu-check GPU_CHECK_ARGS=--dry-run` tries it on a CPU.
GPU_CHECK_ARGS ?=
gpu-check: setup
	$(VENV)/bin/flexiact-backend bench gpu-check --out-dir docs/benchmarks $(GPU_CHECK_ARGS)
