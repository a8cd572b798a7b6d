# Two entry points that do all their own set-up on a fresh Debian machine (as root, or with sudo):
#   make demo   PCL on Fashion-MNIST through `protoray train` (embedded Ray, MLflow in ./mlruns.db)
#   make test   the test suite (what .ci/run calls)
# Stamp files in .venv make re-runs skip what is already installed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.deps-installed $(FMNIST)

# torch first, pinned: the CUDA build that runs on CPU too; the project's ranges then accept it.
$(VENV)/.torch-installed:
	python3 -m venv $(VENV)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	touch $@

# the package __init__ files too: an editable install made before one existed maps that package
# as a namespace package and `from orchestration import sweep` then fails
$(VENV)/.deps-installed: $(VENV)/.torch-installed pyproject.toml orchestration/__init__.py methods/__init__.py
	$(PIP) install -e ".[dev]"
	touch $@

$(FMNIST):
	$(SUDO) apt-get install -y dataset-fashion-mnist || \
	  ($(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist)

demo: setup
	$(VENV)/bin/protoray train configs/demo.yaml

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/fashion_mnist.py

clean:
	rm -rf outputs .pytest_cache
