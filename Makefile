# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY_BOOT ?= python3.11
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch==2.13.0 resolves to a local CPU wheel on our machines; any other spec pulls GBs of CUDA.
TORCH   ?= torch==2.13.0

.PHONY: setup demo test test-unit test-distributed test-gpu lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,mpi]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m papo_mega.cli demo

# pytest exits 5 when it collects no tests: make treats that as the failure it is.
test: $(STAMP)
	$(PY) -m pytest tests -q --durations=10

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

test-distributed: $(STAMP)
	$(PY) -m pytest tests/distributed -q

test-gpu: $(STAMP)
	$(PY) -m pytest tests/gpu -q

lint: $(STAMP)
	$(VENV)/bin/ruff check papo_mega tests tools

bench: $(STAMP)
	$(PY) tools/bench_model.py
	$(PY) tools/bench_algo.py

clean:
	rm -rf $(VENV) runs .pytest_cache
