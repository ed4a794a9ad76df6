# Two commands do all set-up (see README): `make demo` and `make test`.
# Both create .venv on first use with the CPU build of torch, then install the kit.
# GPU users: install your CUDA torch into the venv first (see README), the kit keeps it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: install demo test benchmarks clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/rdtf demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

benchmarks: install
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf reports data runs cache .pytest_cache
