# Two commands for a newcomer: `make demo` and `make test`.
# Both create (or reuse) the virtual environment in .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dev,s3,secure,privacy
CONSTRAINTS := requirements/constraints.txt
# Test processes (pytest-xdist). Most tests wait on parties starting Lightning, so two
# workers halve the suite on a 2-core machine; each worker runs up to 6 processes.
TEST_WORKERS ?= 2
# A second environment for the code that uses torchvision (the MNIST examples' torchvision
# data path and their tests): torch 2.14.1 with torchvision 0.29.1 (CUDA builds that also
# run on CPU, ~5.5 GB), because PyPI's torchvision crashes next to the CPU torch wheel of
# .venv. DEVELOPERS.md has the measurements behind two environments.
VISION_VENV ?= .venv-vision
VISION_PY := $(VISION_VENV)/bin/python
VISION_STAMP := $(VISION_VENV)/.installed
VISION_PINS := requirements/vision.txt

.PHONY: demo test test-main test-vision lint typecheck bench clean-venv help

help:
	@echo "make demo   - set up and run a simulated federation (offline)"
	@echo "make test   - set up and run the test suite (both environments)"
	@echo "make lint   - ruff and mypy"
	@echo "make bench  - print the channel, FedAvg, PSI, HeteroNN, secure HeteroNN, algorithms and privacy benchmark figures (hours)"

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lightning_fed needs Python 3.11 or newer; set PYTHON=python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/digits/demo.py

$(VISION_STAMP): pyproject.toml $(CONSTRAINTS) $(VISION_PINS)
	@test -x $(VISION_PY) || $(PYTHON) -m venv $(VISION_VENV)
	$(VISION_PY) -m pip install --quiet --upgrade "pip>=24"
	grep -v '^torch==' $(CONSTRAINTS) | cat - $(VISION_PINS) > $(VISION_VENV)/constraints.txt
	$(VISION_PY) -m pip install --quiet -c $(VISION_VENV)/constraints.txt -e ".[$(EXTRAS),examples]"
	@touch $(VISION_STAMP)

test: test-main test-vision

# The whole suite but the torchvision tests, in .venv.
test-main: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS)

# The torchvision tests (marker "vision"), in .venv-vision.
test-vision: $(VISION_STAMP)
	$(VISION_PY) -m pytest -n $(TEST_WORKERS) -m vision

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
	$(PY) benchmarks/privacy.py

clean-venv:
	rm -rf $(VENV) $(VISION_VENV)
