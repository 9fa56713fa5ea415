# Quick start:  make demo   |   make test
# Both create .venv and install what they need (torch is pinned and installed first; set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build where plain PyPI would give a CUDA one).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test
TORCH_PIN ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test test-all bench clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: $(VENV)/.installed-$(EXTRAS)
	$(VENV)/bin/dimscope demo

test: $(VENV)/.installed-$(EXTRAS)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.installed-$(EXTRAS)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
