# Set-up and checks. `make demo` and `make test` each create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build that CI installs; a bare `torch` can pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test bench bench-quality bench-methods clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The demo trains the test zoo (cached after the first run), merges its four fine-tunes with task
# arithmetic (configs/demo.yaml) and scores the merge against the base and the fine-tunes.
demo: install
	$(BIN)/merge zoo build --size test
	$(BIN)/merge run configs/demo.yaml --force
	$(BIN)/merge eval build/merged/demo --zoo build/zoo/test

test: install
	$(BIN)/python -m pytest -q

bench: install
	bash benchmarks/run.sh

bench-quality: install
	$(BIN)/python benchmarks/quality.py

# The bench-zoo measurements that do not fit the merge-quality table: TALL-mask reconstructions
# (lambda chosen on each task's train split), Frank-Wolfe merging of four tasks with and without
# irrelevant checkpoints, and MWA over the LoRA run's checkpoints. Each prints Markdown rows.
bench-methods: install
	$(BIN)/merge zoo build --size bench
	$(BIN)/python benchmarks/tall_masks.py
	bash benchmarks/frank_wolfe/run.sh
	bash benchmarks/mwa/run.sh

clean:
	rm -rf build .pytest_cache
