# Two commands for a newcomer: `make demo` and `make test`.
# Both create (or reuse) the virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dev,s3,secure
CONSTRAINTS := requirements/constraints.txt
# Test processes (pytest-xdist). Most tests wait on parties starting Lightning, so two
# workers halve the suite on a 2-core machine; each worker runs up to 6 processes.
TEST_WORKERS ?= 2

.PHONY: demo test lint typecheck bench clean-venv help

help:
	@echo "make demo   - set up and run a simulated federation (offline)"
	@echo "make test   - set up and run the test suite"
	@echo "make lint   - ruff and mypy"
	@echo "make bench  - print the channel, FedAvg, PSI, HeteroNN, secure HeteroNN and algorithms benchmark figures (hours)"

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lightning_fed needs Python 3.11 or newer; set PYTHON=python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/digits/demo.py

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS)

lint: $(STAMP)
	$(PY) -m ruff check lightning_fed tests examples benchmarks
	$(PY) -m ruff format --check lightning_fed tests examples benchmarks
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/channel.py
	$(PY) benchmarks/fedavg.py
	$(PY) benchmarks/psi.py
	$(PY) benchmarks/hetero.py
	$(PY) benchmarks/secure_hetero.py
	$(PY) benchmarks/algorithms.py --json runs/bench-algorithms.json

clean-venv:
	rm -rf $(VENV)
