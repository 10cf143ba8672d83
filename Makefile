# make setup: system data (as root) + a virtual environment with every dependency; make test: the CPU test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup data venv test test-slow bench default-run clean

setup: data venv
	$(PY) -m diffguide.data.fashion_mnist

data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ -n "$$DIFFGUIDE_FMNIST_DIR" ]; then \
		echo "Fashion-MNIST present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	else \
		echo "not root: Fashion-MNIST will be downloaded by torchvision after the venv is built"; \
	fi

venv:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision pinned to the releases this project is tested with (installed from local disk here).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	@$(PY) -m diffguide.data.fashion_mnist >/dev/null 2>&1 || $(PY) -m diffguide.data.fashion_mnist --download

test:
	$(PY) -m pytest -q

test-slow:
	$(PY) -m pytest -q -m slow

bench:
	$(PY) scripts/bench_sampling.py

default-run:
	$(PY) -m diffguide.run

clean:
	rm -rf outputs multirun .pytest_cache
