# Two entry points for a fresh clone: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
# torch is installed first, pinned: on a CPU-only machine this resolves to the small CPU wheel,
# and the project's range (torch>=2.2) then adds nothing. Override for other builds, e.g.
# `make install TORCH_SPEC=torch` on a CUDA machine. An existing torch is kept.
TORCH_SPEC ?= torch==2.13.0
export PATH := $(BIN):$(PATH)

.PHONY: install demo test test-slow test-all benchmark browser-deps clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# demo series -> dvc repro (index, measure, thermo, report) -> data/report/index.html
demo: install
	dvc repro
	@echo "report: $(abspath data/report/index.html)"

# lint (ruff, config in pyproject.toml), then the default (fast) suite plus the headless-Chromium
# report test
test: install browser-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow and not benchmark"

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: install browser-deps
	$(BIN)/python -m pytest -q -m "not benchmark"

benchmark: install
	$(BIN)/python benchmarks/throughput.py

# Debian's chromium for the report's browser test (root + apt only; the test skips without it)
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser test will skip"; }

# every output path, read from params.yaml (paths): the one place they are written
clean: install
	$(BIN)/python -c "import dataclasses, shutil, pathlib; from pipeline.settings import load_settings; \
	  [shutil.rmtree(p, True) if pathlib.Path(p).is_dir() else pathlib.Path(p).unlink(True) \
	   for p in dataclasses.astuple(load_settings().paths)]"
