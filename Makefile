# Fresh-machine entry points: each target creates .venv and installs the project if needed.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: demo test bench-prep

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_OUT)/sample
	$(BIN)/gendertune make-sample --out $(DEMO_OUT)/sample --n 1000
	$(BIN)/gendertune prep --data $(DEMO_OUT)/sample --split identity --ratios 0.8,0.1,0.1 --image-size 64 --out $(DEMO_OUT)/prep --overwrite

# pytest exits 5 when it collects no tests; that is a configuration error, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

bench-prep: $(STAMP)
	$(BIN)/python bench/bench_prep.py
