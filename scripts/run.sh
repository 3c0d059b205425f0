#!/usr/bin/env bash
# The main job. With an NVIDIA GPU: `vlmhub route` over ./models.yaml (Docker + vLLM).
# Without one: the built-in demo, three stand-in engines (a test double of vLLM's API) run as
# local processes, so the whole flow (start, queue, swap, stream) works on any machine.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  exec "$BIN/vlmhub" route --config models.yaml "$@"
fi
echo "No NVIDIA GPU found: running the demo (examples/demo.yaml, stand-in engines)." >&2
exec "$BIN/vlmhub" route --config examples/demo.yaml "$@"
