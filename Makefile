# The two commands of the README: `make demo` and `make test`. Both set up what they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: demo test setup system-deps bench bench-smoke clean

demo: setup system-deps
	$(BIN)/streamkd demo

test: setup system-deps
	$(BIN)/python -m pytest

# Python side: a virtual environment with the package (editable) and its dev extras, torch pinned by constraints.txt.
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $@

# System side (Debian/Ubuntu): the Fashion-MNIST files and a real Prometheus server + promtool for the tests.
system-deps:
	@if [ ! -f $(FMNIST) ] || ! command -v promtool >/dev/null; then \
	  command -v apt-get >/dev/null || { echo "need dataset-fashion-mnist and prometheus (promtool): install them, or set STREAMKD_DATA_DIR"; exit 1; }; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist prometheus >/dev/null; \
	fi

bench: setup system-deps
	$(BIN)/python bench/fashion_mnist.py
	$(BIN)/python bench/throughput.py --preset cpu

# The benchmark scripts at toy sizes (numbers meaningless): run before spending a GPU lease on them.
# Benchmarks stay out of the test suite (DESIGN.md), so this is a separate target.
bench-smoke: setup system-deps
	$(BIN)/python bench/throughput.py --preset cpu --smoke --naive-records 32 | tail -n 1
	$(BIN)/python bench/student_step.py --model streamkd:lenet5 --size 28 --channels 1 --batch 8 --steps 2 --no-compile --device cpu | tail -n 1

clean:
	rm -rf $(VENV) state .pytest_cache build *.egg-info
