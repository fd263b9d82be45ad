# Two entry points do all set-up on a fresh Debian machine (Python 3.11):
#   make train   # train the default config on real Fashion-MNIST, write samples + logs
#   make test    # run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
ARGS   ?=

.PHONY: setup data jemalloc onednn train test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned: it resolves to the CPU wheel (a bare `torch` pulls a multi-GB CUDA build).
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed data jemalloc onednn

# jemalloc: `mmdit` and train.py preload it on CPU (no per-step page faults; see docs/performance.md).
jemalloc:
	@ldconfig -p | grep -q libjemalloc.so.2 || { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libjemalloc2; }

# oneDNN + a C++ compiler: CPU matmuls run as a oneDNN custom call, built on first use
# (jax_mmdit/kernels/onednn.py; AMX bf16, see docs/performance.md).
onednn:
	@{ dpkg -s libdnnl-dev >/dev/null 2>&1 && command -v g++ >/dev/null; } || { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq g++ libdnnl-dev; }

# Real Fashion-MNIST from Debian (dataset-fashion-mnist), so training works offline.
data: $(DATA)
$(DATA):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

train: setup
	$(VENV)/bin/mmdit train --config fashion_mnist $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

bench: setup
	$(PY) -m benchmarks.bench_train $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
