# The two commands of the README: `make demo` (set up, then run the local demo) and `make test`
# (set up, then run the whole test suite). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "antorcha needs Python 3.11 or newer"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: this exact release is on disk as a CPU build; a looser spec may pull CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,hf]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/antorcha demo --workers 3 --rounds 6

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

proto: setup
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) build src/*.egg-info
