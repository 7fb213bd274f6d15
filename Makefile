# Two commands: `make run` (the main job, on 2 Ray workers of an embedded instance) and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The torch/torchvision builds that ship on the project machines; override for other platforms.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: run test test-fast lint bench-variance clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/fqa train jobs/configs/vit_digits.yaml --workers 2

# The complete suite (what CI runs).
test: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q

# The edit loop: no Ray, no slow statistical or end-to-end runs, no fault injection.
test-fast: $(STAMP)
	@start=$$(date +%s); \
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -q -m "not ray and not slow and not faults and not gpu"; \
	status=$$?; echo "test-fast: $$(( $$(date +%s) - start )) s"; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check fqa cluster benchmarks jobs tests

bench-variance: $(STAMP)
	$(BIN)/fqa bench variance

clean:
	rm -rf $(VENV) runs
