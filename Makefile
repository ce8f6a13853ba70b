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

.PHONY: test demo install venv bench clean

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

test: $(STAMPS)/install
	$(VPY) -m pytest -q tests

demo: $(STAMPS)/install
	$(VENV)/bin/getfast demo

bench: $(STAMPS)/install
	$(VPY) -m benchmarks

clean:
	rm -rf build dist $(STAMPS)
