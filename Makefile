# Two commands on a fresh machine: `make demo` (main job) and `make test` (test suite).
# Both create the project's own environment in .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The machine-local find-links dir holds a CPU-only torch 2.13.0 without a matching torchvision:
# never let pip pick it.
PIP := env -u PIP_FIND_LINKS $(PY) -m pip

.PHONY: env demo test test-all clean

env: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch!=2.13.0" -e ".[test]"
	$(PY) -c "import torch, torchvision, timm, conv2former; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/conv2former info

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "slow or not slow"

clean:
	rm -rf $(VENV) .pytest_cache
