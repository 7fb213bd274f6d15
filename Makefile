# Two commands: `make run` (the main job, on 2 Ray workers of an embedded instance) and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The torch/torchvision builds that ship on the project machines; override for other platforms.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: run test lint bench-variance clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/fqa train jobs/configs/vit_digits.yaml --workers 2

test: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check fqa tests

bench-variance: $(STAMP)
	$(BIN)/fqa bench variance

clean:
	rm -rf $(VENV) runs
