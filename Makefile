# Set-up and checks. `make demo` and `make test` each create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build that CI installs; a bare `torch` can pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test bench bench-quality clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The demo trains the test zoo (cached after the first run), merges three of its fine-tunes with TIES
# and scores the merge against the base and the fine-tunes on their tasks.
demo: install
	$(BIN)/merge zoo build --size test
	$(BIN)/merge run configs/examples/ties.yaml --force
	$(BIN)/merge eval build/merged/ties --zoo build/zoo/test

test: install
	$(BIN)/python -m pytest -q

bench: install
	bash benchmarks/run.sh

bench-quality: install
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf build .pytest_cache
