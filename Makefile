# Two commands do everything on a fresh machine:  make demo   |   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: setup data demo test test-all check-install bench clean

setup: $(VENV)/.installed

# torch/torchvision pinned to the wheels these machines carry on disk (a newer torch downloads GBs)
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist

# the recipe measured best against one model at equal cost (docs/RESULTS.md, session 10): members on a trunk
# that trains on from 2.5 of the 3 epochs, without label smoothing, made to disagree on 8 jigsawed images a step
DEMO_RECIPE := --trunk joint --warm-start-epochs 2.5 --member-opt label_smoothing=0 --diversity batch=8

demo: setup data
	$(OFFLINE) $(VENV)/bin/shared-backbone train-ensemble $(DEMO_RECIPE) --out runs/demo

# the suite, then the wheel installed (not editable) into a fresh venv and run from another folder
test: setup
	$(OFFLINE) $(PY) -m pytest -m "not slow"
	scripts/check_install.sh

check-install:
	scripts/check_install.sh

test-all: setup data
	$(OFFLINE) $(PY) -m pytest

bench: setup data
	$(OFFLINE) $(PY) scripts/bench.py --out results/bench.json

clean:
	rm -rf runs results .pytest_cache
