# lumbar-tf: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
# The fast suite runs on pytest-xdist workers (one per core here); its shared fixtures are built once
# across workers (tests/conftest.py `_built_once`).
TEST_WORKERS ?= 2

.PHONY: setup demo test test-slow lint bench fuzz reliability clean

$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[dev,edge,pacs,beam]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lumbar-tf demo --out $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --durations=15

lint: $(STAMP)
	$(BIN)/ruff check lumbar_tf tests benchmarks training export serving
	$(BIN)/ruff format --check lumbar_tf tests benchmarks training export serving
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/pipeline.py

# Coverage-guided fuzzing of the DICOM reader, preprocessing and the CSV index (tests/fuzz/README.md).
SECONDS ?= 300
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz.fuzz_inputs -max_total_time=$(SECONDS)

# Rewrite the README's Reliability table from what its cases do (tests/reliability/).
reliability: $(STAMP)
	$(BIN)/python -m tests.reliability --write-readme

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
