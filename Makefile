# Set-up and everyday commands. `make run` and `make test` work on a fresh clone.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

.PHONY: venv run test test-fast lint format lock clean

venv: $(STAMP)

# Pinned install: requirements.txt (top-level pins) constrained by constraints.txt (full lock).
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Main job on the embedded default dataset.
run: venv
	$(BIN)/mme prepare

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
