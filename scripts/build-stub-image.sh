#!/usr/bin/env bash
# Build the vlmhub stub-engine image (a stand-in for vllm/vllm-openai, for the Docker test tier).
#
# No registry is reachable here, so the base image is made locally:
#   mmdebstrap --variant=apt --include=python3 bookworm rootfs.tar
#   docker import rootfs.tar vlmhub/debian-python:bookworm
# The rootfs tarball is cached under ${VLMHUB_CACHE:-$HOME/.cache/vlmhub}; the base image is
# reused when it already exists. Safe to run repeatedly. Uses DOCKER_HOST from the environment.
#
# Env: VLMHUB_STUB_IMAGE (default vlmhub/stub-engine:dev), VLMHUB_CACHE, VLMHUB_DEBIAN_MIRROR.
set -euo pipefail

IMAGE="${VLMHUB_STUB_IMAGE:-vlmhub/stub-engine:dev}"
BASE_IMAGE="vlmhub/debian-python:bookworm"  # the Dockerfile FROM
CACHE_DIR="${VLMHUB_CACHE:-$HOME/.cache/vlmhub}"
MIRROR="${VLMHUB_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC_DIR="$REPO_ROOT/vlmhub/testing"

log() { echo "build-stub-image: $*" >&2; }

if ! docker version >/dev/null 2>&1; then
  log "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-unset}); run scripts/start-dockerd.sh"
  exit 1
fi

if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  log "base image $BASE_IMAGE exists, reusing it"
else
  ROOTFS="$CACHE_DIR/rootfs.tar"
  if [ ! -s "$ROOTFS" ]; then
    if ! command -v mmdebstrap >/dev/null 2>&1; then
      log "mmdebstrap is missing (apt-get install mmdebstrap)"
      exit 1
    fi
    mkdir -p "$CACHE_DIR"
    PARTIAL="$CACHE_DIR/rootfs.partial.$$.tar"
    trap 'rm -f "$PARTIAL"' EXIT
    log "creating $ROOTFS with mmdebstrap (a minute or two)"
    # The mirror is given explicitly: without one, mmdebstrap reads it from a non-tty stdin.
    mmdebstrap --variant=apt --include=python3 --format=tar \
      bookworm "$PARTIAL" "$MIRROR" </dev/null
    mv -f "$PARTIAL" "$ROOTFS"
    trap - EXIT
  else
    log "reusing cached $ROOTFS"
  fi
  log "importing $ROOTFS as $BASE_IMAGE"
  docker import "$ROOTFS" "$BASE_IMAGE" >/dev/null
fi

CONTEXT="$(mktemp -d)"
trap 'rm -rf "$CONTEXT"' EXIT
cp "$SRC_DIR/Dockerfile" "$SRC_DIR/stub_engine.py" "$SRC_DIR/stub_endpoints.py" \
  "$SRC_DIR/stub_layout.py" "$SRC_DIR/stub_sleep.py" "$SRC_DIR/stub_gpus.py" "$CONTEXT/"
log "building $IMAGE"
docker build -q -t "$IMAGE" "$CONTEXT" >/dev/null
log "done: $IMAGE"
echo "$IMAGE"
