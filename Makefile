# rnnkern's two entry points. Each creates the virtual environment on first use (torch first,
# pinned so a CPU machine takes the CPU wheel instead of a multi-GB CUDA build, then rnnkern
# itself with its extras, which builds the C++ extension) and reinstalls when the build inputs
# change.
#
#   make generate  the main job: folk tunes from the bundled model (ABC on stdout)
#   make test      the test suite (what CI runs)
#   make bench     rnnkern beside torch.nn on the default shapes
#   make test-gpu-versions  the test suite under the GPU machines' torch 2.11 + Triton 3.6

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# more requirements installed with torch (test-gpu-versions pins numpy: Triton 3.6's interpreter
# fails with numpy 2.4, which it calls int() on one-element arrays in)
PINS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.rnnkern-installed
# (the CUDA sources too: where nvcc is found the install builds rnnkern._cuda from them)
BUILD_INPUTS := pyproject.toml setup.py $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h csrc/common/*.h \
	csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h csrc/cuda/*.cpp)

.PHONY: generate bench test test-gpu-versions lint install clean

$(STAMP): $(BUILD_INPUTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(PINS)
	$(BIN)/python -m pip install -q -e ".[dev,music,triton]"
	touch $@

install: $(STAMP)

generate: $(STAMP)
	$(BIN)/rnnkern generate --count 2 --seed 1 --midi tunes.mid

bench: $(STAMP)
	$(BIN)/rnnkern bench

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The same suite under the versions of the GPU machines the benchmarks run on: torch 2.11 (its
# PyPI build, which pins Triton 3.6 and runs on a CPU too; about 5 GB installed). It catches API
# differences between torch versions before a GPU run does. It runs in a copy of the working
# tree (tracked and untracked files) under .gpu-versions/, with a venv of its own there that
# later runs keep (an editable install builds the extension into the source tree, against one
# torch's headers, so the copy is rebuilt every run: about 2 minutes).
GPU_VERSIONS_DIR := .gpu-versions
test-gpu-versions:
	mkdir -p $(GPU_VERSIONS_DIR)
	find $(GPU_VERSIONS_DIR) -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
	rm -f $(GPU_VERSIONS_DIR)/$(STAMP)
	git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C $(GPU_VERSIONS_DIR)
	$(MAKE) -C $(GPU_VERSIONS_DIR) test TORCH_SPEC=torch==2.11.0 PINS=numpy~=2.2.0

lint: $(STAMP)
	$(BIN)/ruff check rnnkern tests benchmarks

clean:
	rm -rf $(VENV) $(GPU_VERSIONS_DIR) build *.egg-info rnnkern/*.so
