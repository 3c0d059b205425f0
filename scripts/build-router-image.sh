#!/usr/bin/env bash
# Build the router image (deploy/router.Dockerfile): `vlmhub route` in a container, beside the
# engine containers it starts through the mounted Docker socket (examples/compose.yaml).
#
# The build needs no registry access inside Docker and no pip in the base image: this script
# builds the vlmhub wheel from the checkout and fetches the wheels of its dependencies (and
# pip's own) with the pip of a local Python, for the image's Python (3.11, glibc <= 2.36,
# this machine's CPU architecture), into the build context. Dependencies are pinned to the
# versions of the checkout's .venv when there is one (the versions the tests ran).
#
# Idempotent and cached: the image is labelled with a hash of its inputs (the sources that
# go into the wheel, the Dockerfile, this script, the base image and the extras); when the
# image already carries that hash nothing is rebuilt. Uses DOCKER_HOST from the environment.
# Prints the image tag, last.
#
# Env: VLMHUB_ROUTER_IMAGE (default vlmhub/router:dev), VLMHUB_ROUTER_BASE (the Dockerfile's
# BASE, default python:3.11-slim; offline: vlmhub/debian-python:bookworm from
# scripts/build-stub-image.sh), VLMHUB_ROUTER_EXTRAS (e.g. "[nvml]" to read the GPU with
# NVML), VLMHUB_ROUTER_PYTHON (the base's Python, default 3.11), PYTHON (whose pip fetches the
# wheels; default .venv/bin/python, else python3).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${VLMHUB_ROUTER_IMAGE:-vlmhub/router:dev}"
BASE="${VLMHUB_ROUTER_BASE:-python:3.11-slim}"
EXTRAS="${VLMHUB_ROUTER_EXTRAS:-}"
PY_VERSION="${VLMHUB_ROUTER_PYTHON:-3.11}"
DOCKERFILE="$REPO_ROOT/deploy/router.Dockerfile"
SELF="$REPO_ROOT/scripts/$(basename "${BASH_SOURCE[0]}")"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO_ROOT/.venv/bin/python" ]; then PYTHON="$REPO_ROOT/.venv/bin/python"
  else PYTHON=python3; fi
fi
SOURCES=(vlmhub plugins pyproject.toml README.md)  # what goes into the wheel

log() { echo "build-router-image: $*" >&2; }

if ! docker version >/dev/null 2>&1; then
  log "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-unset}); run scripts/start-dockerd.sh"
  exit 1
fi

# The inputs' hash: every source file (name and content), the Dockerfile, this script, the
# base image's id (when it is present locally) and the build arguments.
cd "$REPO_ROOT"
HASH="$(
  {
    find -L "${SOURCES[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum
    sha256sum "$DOCKERFILE" "$SELF"
    docker image inspect --format '{{.Id}}' "$BASE" 2>/dev/null || echo "$BASE"
    echo "extras=$EXTRAS python=$PY_VERSION"
  } | sha256sum | cut -c1-32
)"
LABEL_KEY="vlmhub.source-hash"
if [ "$(docker image inspect --format "{{ index .Config.Labels \"$LABEL_KEY\" }}" "$IMAGE" \
        2>/dev/null || true)" = "$HASH" ]; then
  log "$IMAGE is up to date ($LABEL_KEY $HASH), reusing it"
  echo "$IMAGE"
  exit 0
fi

CONTEXT="$(mktemp -d)"
trap 'rm -rf "$CONTEXT"' EXIT
mkdir -p "$CONTEXT/src" "$CONTEXT/wheels"
# A copy of the sources: building the wheel in the checkout would leave build/ and egg-info.
cp -RL "${SOURCES[@]}" "$CONTEXT/src/"
find "$CONTEXT/src" -name __pycache__ -prune -exec rm -rf {} +

log "building the vlmhub wheel with $PYTHON"
if ! "$PYTHON" -m pip wheel --quiet --no-deps --disable-pip-version-check \
      -w "$CONTEXT/wheels" "$CONTEXT/src" >"$CONTEXT/wheel.log" 2>&1; then
  tail -n 40 "$CONTEXT/wheel.log" >&2
  log "the vlmhub wheel did not build"
  exit 1
fi
WHEEL="$(ls "$CONTEXT"/wheels/vlmhub-*.whl)"
rm -rf "$CONTEXT/src"

# Wheels for the image's platform, whatever this machine runs: CPython $PY_VERSION on
# manylinux up to glibc 2.36 (Debian bookworm, the base of python:3.11-slim).
ARCH="$(uname -m)"
PLATFORMS=()
for minor in $(seq 36 -1 17); do PLATFORMS+=(--platform "manylinux_2_${minor}_${ARCH}"); done
PLATFORMS+=(--platform "manylinux2014_$ARCH" --platform "manylinux2010_$ARCH" \
            --platform "manylinux1_$ARCH")
PINS=()
if [ -x "$REPO_ROOT/.venv/bin/pip" ]; then  # the versions the tests ran with
  "$REPO_ROOT/.venv/bin/pip" freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
    | grep -E '^[A-Za-z0-9_.-]+==' >"$CONTEXT/pins.txt" || true
  PINS=(--constraint "$CONTEXT/pins.txt")
fi
log "fetching the wheels of its dependencies for CPython $PY_VERSION ($ARCH)"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --dest "$CONTEXT/wheels" \
  --only-binary=:all: --implementation cp --python-version "$PY_VERSION" "${PLATFORMS[@]}" \
  "${PINS[@]}" "${WHEEL}${EXTRAS}" pip 2> >(grep -v "is ignored: it is neither" >&2)

cp "$DOCKERFILE" "$CONTEXT/router.Dockerfile"
log "building $IMAGE on $BASE"
if ! docker build --force-rm --file "$CONTEXT/router.Dockerfile" --build-arg "BASE=$BASE" \
      --build-arg "EXTRAS=$EXTRAS" --label "$LABEL_KEY=$HASH" --tag "$IMAGE" \
      "$CONTEXT" >"$CONTEXT/build.log" 2>&1; then
  tail -n 40 "$CONTEXT/build.log" >&2
  log "docker build failed"
  exit 1
fi
# Untagged leftovers of this script only (by their labels): the previous router image, the
# build stage. Images in use by a container are kept.
docker image prune --force --filter "label=$LABEL_KEY" >/dev/null || true
docker image prune --force --filter "label=vlmhub.router-build-stage" >/dev/null || true
log "done: $IMAGE ($LABEL_KEY $HASH)"
echo "$IMAGE"
