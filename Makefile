# Two entry points do all set-up on a fresh Debian machine (Python 3.11):
#   make train   # train the default config on real Fashion-MNIST, write samples + logs
#   make test    # run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: setup packages train test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned: it resolves to the CPU wheel (a bare `torch` pulls a multi-GB CUDA build).
	$(PY) -m pip install -q -e ".[test]"
	# Reference implementations for the evaluation parity tests. --no-deps: the torchvision they
	# depend on is a CUDA build that does not import beside the CPU torch (tests load around it).
	$(PY) -m pip install -q --no-deps torch-fidelity==0.4.0 pytorch-fid==0.3.0
	touch $@

setup: $(VENV)/.installed packages

# Debian packages, one apt run for whichever are missing: dataset-fashion-mnist (real data,
# offline), libjemalloc2 (`mmdit`/train.py preload it on CPU: no per-step page faults), g++ and
# libdnnl-dev (CPU matmuls as a oneDNN custom call, built on first use; see docs/performance.md).
APT_PACKAGES := dataset-fashion-mnist libjemalloc2 g++ libdnnl-dev
packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; fi

train: setup
	$(VENV)/bin/mmdit train --config fashion_mnist $(ARGS)

test: lint
	$(PY) -m pytest -q $(ARGS)

# ruff: the linter and the formatter's check (`.venv/bin/ruff format .` applies it).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) -m benchmarks.bench_train $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
