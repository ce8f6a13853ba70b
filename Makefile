# getfast — set-up, tests and demo.  `make test` on a fresh clone creates .venv, installs torch
# (only when it is not importable yet), builds the package in editable mode and runs pytest.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMPS := $(VENV)/.getfast-stamps
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
BUILD_DEPS := scikit-build-core>=1.1 pybind11 ninja
# Anything that changes the compiled extension or the package metadata triggers a rebuild, and so
# does any Python file: the editable install's import redirect knows only the modules that existed
# when it was made, so a new module needs a (≈5 s, incremental) reinstall.
BUILD_INPUTS := pyproject.toml CMakeLists.txt $(shell find csrc getfast kernels -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.txt' \) 2>/dev/null)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist (the demo's data and FID reference; tests that
# need it skip without it). `make data` installs it when it is missing and apt-get can run as root;
# otherwise it prints the one command to run, and the demo's preflight stops in seconds with the same
# advice. It never fails the build: `make test` still runs (those tests skip).
FMNIST_DIR := /usr/share/datasets/fashion-mnist
FMNIST_PKG := dataset-fashion-mnist

.PHONY: test demo install venv bench clean data wheel-py312

$(VPY):
	$(PYTHON) -m venv $(VENV)

# torch is installed only when it cannot be imported (re-runs never reinstall it).
$(STAMPS)/torch: | $(VPY)
	@mkdir -p $(STAMPS)
	@$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install $(TORCH_PINS)
	@touch $@

$(STAMPS)/build-deps: | $(STAMPS)/torch
	@$(VPY) -c "import scikit_build_core, pybind11, ninja" 2>/dev/null || $(VPY) -m pip install "scikit-build-core>=1.1" pybind11 ninja
	@touch $@

$(STAMPS)/install: $(BUILD_INPUTS) $(STAMPS)/build-deps
	$(VPY) -m pip install --no-build-isolation -e ".[test]"
	@touch $@

venv: $(STAMPS)/torch
install: $(STAMPS)/install

data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's $(FMNIST_PKG) (Fashion-MNIST) ..."; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq $(FMNIST_PKG) >/dev/null 2>&1 \
	    || { apt-get update -qq && apt-get install -y -qq $(FMNIST_PKG); } \
	    || echo "warning: could not install $(FMNIST_PKG); the demo needs it and some tests will skip" >&2; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  echo "note: Fashion-MNIST is missing; install it with: sudo apt-get install $(FMNIST_PKG)" >&2; \
	else \
	  echo "note: Fashion-MNIST is missing; the demo reads Debian's $(FMNIST_PKG) files from $(FMNIST_DIR)" >&2; \
	fi

test: $(STAMPS)/install data
	$(VPY) -m pytest -q tests

demo: $(STAMPS)/install data
	$(VENV)/bin/getfast demo

bench: $(STAMPS)/install
	$(VENV)/bin/getfast bench

# The cp312 wheel, CUDA kernels included, that a GPU machine without a package index installs when building in
# place fails there (benchmarks/gpu_check.sh looks in wheels/ and dist/). Built here with pyenv's Python 3.12
# (PY312=... for another) and this machine's nvcc, for CUDA_ARCHS (90: H100/H200); the build tools come from PyPI
# into build/py312-venv. The wheel is only valid for the commit it was built from.
PY312 ?= $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.12.*/bin/python3.12)))
CUDA_ARCHS ?= 90
wheel-py312:
	@test -n "$(PY312)" || { echo "wheel-py312: no Python 3.12 under ~/.pyenv/versions (pyenv install 3.12, or PY312=/path/to/python3.12)" >&2; exit 2; }
	@command -v nvcc >/dev/null || { echo "wheel-py312: nvcc is not on PATH: the wheel would have no CUDA kernels" >&2; exit 2; }
	$(PY312) -m venv build/py312-venv
	build/py312-venv/bin/python -m pip install -q "scikit-build-core>=1.1" pybind11 ninja
	GETFAST_CUDA=ON SKBUILD_CMAKE_DEFINE="CMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHS)" \
	  build/py312-venv/bin/python -m pip wheel --no-build-isolation --no-deps -w dist .
	@ls -l dist/getfast-*-cp312-*.whl

clean:
	rm -rf build dist $(STAMPS)
