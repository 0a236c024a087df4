# One command to set up and run the demo, one to set up and run the tests (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export MLFLOW_DISABLE_TELEMETRY := true
export DAGSTER_HOME := $(CURDIR)/var/dagster_home
export PYTHONUNBUFFERED := 1

.PHONY: install install-ray demo test test-fast test-ray dev clean

# torch==2.13.0 resolves to the local CPU wheel; constraints.txt pins the tested set for reproducible installs.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[test,qlora]'
	touch $@

install: $(VENV)/.installed

# The optional Ray extra (dagster-ray + ray), for scale-out; constraints.txt pins it too.
$(VENV)/.installed-ray: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[test,qlora,ray]'
	touch $@

install-ray: $(VENV)/.installed-ray

demo: install
	$(VENV)/bin/grouplora demo

# Everything, including the tests that read the real registry archives and the real model (cached after once).
test: install
	$(PY) -m pytest -q -m "not ray" -p no:cacheprovider

# Without those (no downloads).
test-fast: install
	$(PY) -m pytest -q -m "not slow and not ray" -p no:cacheprovider

# The Ray scale-out test: a local Ray head with 2 logical GPUs runs the per-dataset steps as Ray jobs.
test-ray: install-ray
	$(PY) -m pytest -q -m ray -p no:cacheprovider tests/test_ray.py

dev: install
	$(VENV)/bin/grouplora ui

clean:
	rm -rf var
