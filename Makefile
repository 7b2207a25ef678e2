# The two commands a fresh machine needs: `make quickstart` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install quickstart test options-doc llamacpp

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/tunesmith run examples/quickstart/config.yaml --overwrite

test: install
	$(PY) -m pytest -q

options-doc: install
	$(VENV)/bin/tunesmith options --markdown > docs/config.md

llamacpp: install  # optional: llama.cpp's Python binding, built from source, for bench/export.py
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[llamacpp]"
