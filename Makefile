# Fresh-machine entry points: each target creates .venv and installs the project if needed.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: demo test bench-prep bench-train

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gendertune demo --out $(DEMO_OUT)

# Lint first (ruff's settings are in pyproject.toml): it takes seconds, the suite minutes.
# pytest exits 5 when it collects no tests; that is a configuration error, not a pass.
test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

bench-prep: $(STAMP)
	$(BIN)/python bench/bench_prep.py

bench-train: $(STAMP)
	$(BIN)/python bench/bench_train.py --precision fp32,bf16
