# The README's two commands: `make train` and `make test`. Both bootstrap .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/mnist
CONFIG ?= configs/mnist.py

.PHONY: setup data train test lint format clean

# A .venv without pip (a failed `venv` where python3-venv is missing) or older than Python 3.11
# is made again rather than kept.
$(VENV)/.installed: pyproject.toml
	@$(PY) -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	  || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); } \
	  || { echo "error: '$(PYTHON) -m venv $(VENV)' failed; Python 3.11+ with venv is needed" \
	       "(Debian/Ubuntu: apt-get install python3-venv; or make PYTHON=python3.11)"; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# Prepares TFDS's own `mnist` (downloads where a network allows, else offline sources) and,
# where available, `fashion_mnist` (offline: Debian's dataset-fashion-mnist, installed here
# when we are root and apt can reach its registry; nothing fails without it).
FASHION_DIR := /usr/share/datasets/fashion-mnist
data: setup
	@if [ ! -d $(FASHION_DIR) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
	  || echo "note: dataset-fashion-mnist not installed; OOD evaluation needs it"; fi
	$(PY) scripts/prepare_data.py

train: data
	mkdir -p $(dir $(WORKDIR))
	$(PY) scripts/train.py --config=$(CONFIG) --workdir=$(WORKDIR)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: data lint
	$(PY) -m pytest -q -n 2 --dist loadscope

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) *.egg-info
