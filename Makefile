# Fresh-machine entry points. `make demo` and `make test` create .venv, install the pinned torch first,
# then the package and its pins. On Linux without an NVIDIA GPU the default index's torch is the CUDA
# build (several GB of CUDA libraries): there torch comes from the PyTorch CPU index when it answers,
# and from the default index otherwise (machines that reach only PyPI or a local mirror).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup demo test test-fast bench gpu-bundle gpu-check gpu-record clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1 && \
	  $(PY) -c "import urllib.request; urllib.request.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" 2>/dev/null; then \
	  echo "no GPU: the CPU build of torch from $(TORCH_CPU_INDEX)"; \
	  $(PY) -m pip install -q "$(TORCH_SPEC)" --index-url "$(TORCH_CPU_INDEX)"; \
	else \
	  echo "torch from the default index"; \
	  $(PY) -m pip install -q "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]" -c constraints.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/multitune demo --offline

test: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -p no:cacheprovider tests

test-fast: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow" tests

# data preparation, training throughput against TRL (defaults and expert-tuned), evaluation throughput; one
# verdict line per target at the end (under 20 min on 2 cores)
bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks

# On this (CPU) machine: wheels for the GPU machine (Python 3.12, manylinux x86_64) and the assets, in two
# bundles of at most 64 MiB with the working tree: .gpu-bundle/run1 (sections a, b; bitsandbytes), run2 (c, d, e)
GPU_BUNDLE ?= .gpu-bundle
gpu-bundle: setup
	HF_HUB_OFFLINE=1 $(PY) scripts/gpu_bundle.py --out $(GPU_BUNDLE)

# On the bare GPU machine (no venv, no network), one run per bundle: make gpu-check RUN=1, then RUN=2; each writes
# section-X.json, gpu-X.json (the benchmark's rows, after every side) and logs/ to $$OUT as it goes
RUN ?= 1
gpu-check:
	python3 scripts/gpu_check.py --run $(RUN) --bundle $(GPU_BUNDLE)/run$(RUN)

# Back here, the two calls' output folders become one record, benchmarks/results/<date>-<gpu>-gpu-check.json (the
# layout tests/unit/test_memory.py evaluates the memory model at): make gpu-record OUTS="RUN1_OUT RUN2_OUT"
gpu-record: setup
	$(PY) scripts/gpu_record.py $(OUTS)

clean:
	rm -rf runs .pytest_cache
