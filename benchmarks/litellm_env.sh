#!/usr/bin/env bash
# Make (or reuse) the venv of the LiteLLM proxy that router_overhead.py measures as its
# `litellm` path. A benchmark tool, not a vlmhub dependency: it lives in its own venv, away
# from vlmhub's, and nothing in vlmhub imports it.
#
#   bash benchmarks/litellm_env.sh [VENV]        # prints the venv's litellm executable
#
# VENV defaults to $LITELLM_VENV, else ~/.cache/vlmhub-bench/litellm-venv. LITELLM_VERSION
# picks the release (default below: the one of the first measurement, proxy-measurements.md;
# stay off 1.107.0, whose PyPI upload was compromised). PYTHON picks the interpreter (3.11+).
set -euo pipefail

venv="${1:-${LITELLM_VENV:-${HOME}/.cache/vlmhub-bench/litellm-venv}}"
version="${LITELLM_VERSION:-1.108.7}"
python="${PYTHON:-python3}"

if [[ "${version}" == "1.107.0" ]]; then
    echo "litellm 1.107.0 was a compromised upload; pick another LITELLM_VERSION" >&2
    exit 2
fi
if [[ ! -x "${venv}/bin/litellm" ]] \
        || [[ "$("${venv}/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))' 2>/dev/null)" != "${version}" ]]; then
    echo "installing litellm[proxy]==${version} into ${venv} (a few minutes)..." >&2
    "${python}" -m venv "${venv}"
    "${venv}/bin/pip" install --quiet --upgrade pip >&2
    "${venv}/bin/pip" install --quiet "litellm[proxy]==${version}" >&2
fi
echo "${venv}/bin/litellm"
