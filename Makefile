# The two commands a newcomer needs: `make serve` and `make test`.
# Both set everything up first; `make install` does the set-up alone.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
export HF_HUB_OFFLINE := 1

.PHONY: install serve test lint bench clean

install: $(STAMP)

# torch goes in first and on its own: resolved as a plain dependency it would
# pull a multi-GB CUDA build onto CPU machines.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

serve: install
	$(BIN)/hearth serve

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check app workers models hearth tests benchmarks

bench: install
	$(BIN)/python benchmarks/embeddings.py
	$(BIN)/python benchmarks/images.py

clean:
	rm -rf $(VENV) .pytest_cache
