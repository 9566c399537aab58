# rnnkern's two entry points. Each creates the virtual environment on first use (torch first,
# pinned so a CPU machine takes the CPU wheel instead of a multi-GB CUDA build, then rnnkern
# itself with its extras, which builds the C++ extension) and reinstalls when the build inputs
# change.
#
#   make generate  the main job: folk tunes from the bundled model (ABC on stdout)
#   make test      the test suite (what CI runs)
#   make bench     rnnkern beside torch.nn on the default shapes

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.rnnkern-installed
BUILD_INPUTS := pyproject.toml setup.py $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: generate bench test lint install clean

$(STAMP): $(BUILD_INPUTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,music,triton]"
	touch $@

install: $(STAMP)

generate: $(STAMP)
	$(BIN)/rnnkern generate --count 2 --seed 1 --midi tunes.mid

bench: $(STAMP)
	$(BIN)/rnnkern bench

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check rnnkern tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info rnnkern/*.so
