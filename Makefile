# Set-up and everyday commands. `make run` and `make test` work on a fresh clone.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
# dvc.yaml's stages call `mme`: the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)

# Servers: local only, state inside the project (.prefect/, mlflow.db, mlartifacts/).
HOST         ?= 127.0.0.1
PREFECT_PORT ?= 4200
MLFLOW_PORT  ?= 5000
PREFECT_ENV  := PREFECT_HOME=$(CURDIR)/.prefect \
	PREFECT_API_URL=http://$(HOST):$(PREFECT_PORT)/api \
	PREFECT_SERVER_ANALYTICS_ENABLED=false \
	PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120

.PHONY: venv run report test test-fast lint format lock clean prefect-server serve mlflow-ui

venv: $(STAMP)

# Pinned install: requirements.txt (top-level pins) constrained by constraints.txt (full lock).
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Main job on the embedded default dataset: the DVC pipeline (dvc.yaml, params.yaml), its MLflow
# runs nested in one parent run, then the clean vs protected table.
run: venv
	MME_PARENT_RUN=make-run-$$(date +%Y%m%d-%H%M%S) $(BIN)/dvc repro
	$(BIN)/mme report

report: venv
	$(BIN)/mme report

# Prefect API + UI on http://$(HOST):$(PREFECT_PORT) (foreground; Ctrl-C stops it).
prefect-server: venv
	$(PREFECT_ENV) $(BIN)/prefect server start --host $(HOST) --port $(PREFECT_PORT)

# Serve mme-pipeline/default and reevaluate/scheduled against that server (foreground).
serve: venv
	$(PREFECT_ENV) $(BIN)/python -m flows.serve

# MLflow UI on http://$(HOST):$(MLFLOW_PORT) over the project's store.
mlflow-ui: venv
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--host $(HOST) --port $(MLFLOW_PORT)

test: venv lint
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Regenerate the full lock from the top-level pins.
lock: venv
	$(BIN)/pip freeze --exclude-editable | grep -v '^mme' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
