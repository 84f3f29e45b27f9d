# Two commands on a fresh machine: `make demo` (main job) and `make test` (test suite).
# Both create the project's own environment in .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The machine-local find-links dir holds a CPU-only torch 2.13.0 without a matching torchvision:
# never let pip pick it.
PIP := env -u PIP_FIND_LINKS $(PY) -m pip

.PHONY: env demo info test test-all clean

env: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch!=2.13.0" -e ".[all,test]"
	$(PY) -c "import torch, torchvision, timm, conv2former; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__)"
	touch $(STAMP)

# The main job: train a small Conv2Former on the bundled Fashion-MNIST subset (2 CPU cores: ~6 min),
# then evaluate it and classify two images.
DEMO := runs/demo
demo: $(STAMP)
	rm -rf $(DEMO)
	$(VENV)/bin/conv2former train --recipe small --model conv2former_n --model-kwargs "depths=[1,1,3,1]" \
		--img-size 32 --output runs --experiment demo
	$(VENV)/bin/conv2former validate --checkpoint $(DEMO)
	$(VENV)/bin/conv2former predict --checkpoint $(DEMO) --topk 3 \
		$$($(PY) -c "from conv2former.data import resolve_data_dir as r; v = r(None) / 'val'; \
		print(*(sorted((v / c).iterdir())[0] for c in ('sneaker', 'bag')))")

info: $(STAMP)
	$(VENV)/bin/conv2former info

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "slow or not slow"

clean:
	rm -rf $(VENV) .pytest_cache
