# The README's two commands: `make train` and `make test`. Both bootstrap .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/mnist
CONFIG ?= configs/mnist.py

.PHONY: setup data train test lint format clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# Prepares TFDS's own `mnist` (downloads where a network allows, else offline sources).
data: setup
	$(PY) scripts/prepare_data.py

train: data
	$(PY) scripts/train.py --config=$(CONFIG) --workdir=$(WORKDIR)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: data lint
	$(PY) -m pytest -q

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) *.egg-info
