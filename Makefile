# Two entry points: `make bench` (set up, build, quick benchmark table) and `make test`.
# Everything goes into a virtualenv in .venv. torch is installed as the pinned CPU build
# (torch==2.13.0) only when the venv has no torch; bring your own by creating .venv with it.
PY_BOOT ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
# Where pip finds that CPU build. Empty: pip's own configuration (a local wheel here). On a
# machine where plain PyPI would serve the multi-GB CUDA build instead, run
# `make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"`.
TORCH_INDEX ?=
STAMP   := $(VENV)/.seqkern-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: setup test bench bench-full info clean

$(PY):
	$(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja

# Rebuilds the extension only when a C++ source or the build files changed.
$(STAMP): $(SOURCES) | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,gpu]"
	@touch $@

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(VENV)/bin/seqkern bench --quick --threads 2

bench-full: setup
	$(VENV)/bin/seqkern bench --full --threads 2 --json bench-full.json

info: setup
	$(VENV)/bin/seqkern info

clean:
	rm -rf build seqkern/_C*.so *.egg-info $(STAMP)
