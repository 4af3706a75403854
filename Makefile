# Set-up is part of every target: a fresh machine needs only python3 (>= 3.11) and make.
# The virtual environment sees system packages, so a machine that already has torch (e.g. a CUDA
# build) keeps it; torch==2.13.0 (a local CPU wheel on our machines) is installed only when no torch
# is importable, never an unpinned torch that would pull several GB of CUDA packages.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.twostage-installed

.PHONY: demo test setup clean

demo: $(STAMP)
	$(PY) -m twostage demo

test: $(STAMP)
	$(PY) -m pytest

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,emoji]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache
