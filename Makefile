# Set-up and checks. `make demo` and `make test` each create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build that CI installs; a bare `torch` can pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(BIN)/python -m mergekit_plus.demo build/demo
	$(BIN)/merge run configs/examples/ties.yaml --force
	$(BIN)/python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \
	m = AutoModelForCausalLM.from_pretrained('build/merged/ties'); t = AutoTokenizer.from_pretrained('build/merged/ties'); \
	out = m.generate(**t('hello', return_tensors='pt'), max_new_tokens=8, do_sample=False); \
	print('generated:', repr(t.decode(out[0])), '(random tiny weights: the text means nothing; this checks that the merge loads and runs)')"

test: install
	$(BIN)/python -m pytest -q

bench: install
	bash benchmarks/run.sh

clean:
	rm -rf build .pytest_cache
