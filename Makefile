# Fresh-machine entry points. `make demo` and `make test` create .venv, install the pinned CPU build of
# torch first (a plain `torch` would pull a multi-GB CUDA build), then the package and its pins.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" -c constraints.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/multitune demo --offline

test: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -p no:cacheprovider tests

test-fast: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow" tests

# data preparation, training throughput against TRL's defaults, evaluation throughput (~10 min on 2 cores)
bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks

clean:
	rm -rf runs .pytest_cache
