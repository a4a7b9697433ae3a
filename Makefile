# Both targets create their own virtual environment and install into it, so
# each works on a fresh machine with Python 3.10 or newer.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.terrace-installed
# Eight simulated CPU devices for the multi-device JAX tests.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: test demo bench docs clean

$(STAMP): pyproject.toml constraints-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-ci.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q
	$(PY) -m mkdocs build --strict --site-dir build/site

demo: $(STAMP)
	$(PY) examples/digits.py

bench: $(STAMP)
	$(PY) benchmarks/run.py

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir build/site

clean:
	rm -rf $(VENV) build
