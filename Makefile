# The two commands a newcomer needs: `make serve` and `make test`.
# Both set everything up first; `make install` does the set-up alone.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
CHROMIUM := /usr/bin/chromium
export HF_HUB_OFFLINE := 1

.PHONY: install serve test lint bench clean

install: $(STAMP)
	@# The browser tests (tests/test_playground.py) drive Debian's Chromium. Hearth itself
	@# does not need it: without root (or apt), say how to get it and carry on.
	@if [ ! -x $(CHROMIUM) ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        echo "Installing chromium for the browser tests"; \
	        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	            || echo "warning: could not install chromium; the browser tests will fail" >&2; \
	    else \
	        echo "note: $(CHROMIUM) is missing; the browser tests (tests/test_playground.py) need it." >&2; \
	        echo "      Install it with: sudo apt-get update && sudo apt-get install -y chromium" >&2; \
	    fi; \
	fi

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

# Two processes: much of the suite waits on the processes it starts (a worker
# imports torch and loads its model), which a second runner fills. A file's
# tests stay together, in order, in one of them.
test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: install
	$(BIN)/ruff check app workers models hearth tests benchmarks

# infinity-emb, the peer in the embeddings benchmark, gets its own virtual
# environment (.venv-infinity) on first use: it cannot share Hearth's.
bench: install
	$(BIN)/python benchmarks/embeddings.py
	$(BIN)/python benchmarks/images.py
	$(BIN)/python benchmarks/queues.py

clean:
	rm -rf $(VENV) .pytest_cache
