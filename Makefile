# Every target sets up its own virtual environment on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: venv demo test lint bench bench-quick bench-kafka soak clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,kafka,postgres]'
	touch $(STAMP)

venv: $(STAMP)

## demo: generate events, run the example pipeline, SIGKILL it mid-way, resume, check the output
demo: $(STAMP)
	$(BIN)/python examples/demo.py

## test: lint, type-check and run the whole test suite
test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests examples bench
	$(BIN)/mypy

## bench: full benchmarks (writes docs/benchmarks.md); bench-quick: a short run for development
bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick

## bench-kafka: Kafka to Kafka against Quix Streams, replay after SIGKILL, 1 vs 3 workers
bench-kafka: $(STAMP)
	$(BIN)/python bench/kafka.py

## soak: a long run of the seeded fault simulator
soak: $(STAMP)
	$(BIN)/python -m resumeflow.testing soak --schedules 200000

clean:
	rm -rf $(VENV) demo-data .pytest_cache .mypy_cache .ruff_cache
