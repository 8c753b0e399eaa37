# Two entry points for a new user: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint

$(BIN)/faceforge: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c .ci/constraints.txt -e ".[dev]"
	# Only for its MTCNN weight files: its own dependencies (torchvision) are never installed nor imported.
	$(BIN)/pip install --quiet --no-deps -c .ci/constraints.txt facenet-pytorch
	touch $(BIN)/faceforge

setup: $(BIN)/faceforge

demo: setup
	$(BIN)/faceforge demo

lint: setup
	$(BIN)/ruff check platform data_pipeline web tests bench docs
	$(BIN)/ruff format --check platform data_pipeline web tests bench docs

# Two workers (the 2 cores CI has), each test file on one worker, its module fixtures built once: 23 min, not 39.
test: lint
	$(BIN)/pytest -q -n 2 --dist loadfile
