# Set-up and entry points. `make parity` and `make test` each create .venv on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.PHONY: install parity test fixtures check-fixtures bench clean

install: $(STAMP)

# torch is installed first and pinned to 2.13.0, whose CPU wheel the development machines keep
# on disk: an unpinned torch pulled in later by another package would be a CUDA build of
# several GB. torchtune is installed without dependencies because its package imports torchao
# and a data stack; the suite loads only its RoPE file, which needs torch alone.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[torch,test,hf,lucidrains,report,dev]'
	$(PY) -m pip install --quiet --no-deps torchtune==0.6.1
	touch $(STAMP)

parity: $(STAMP)
	$(PY) -m pytest parity/ -n $(PYTEST_WORKERS)

test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS)

fixtures: $(STAMP)
	$(PY) -m parity.fixtures generate

check-fixtures: $(STAMP)
	$(PY) -m parity.fixtures check

bench: $(STAMP)
	$(PY) benchmarks/bench_flax_rope.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis reports
