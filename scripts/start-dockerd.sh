#!/usr/bin/env bash
# Start a Docker engine for the test tiers if none answers. Installs docker.io and mmdebstrap
# from Debian when they are missing (needs root). Prints the DOCKER_HOST to use, last.
set -euo pipefail
RUN_DIR="${VLMHUB_DOCKER_DIR:-/tmp/vlmhub-dockerd}"
SOCK="$RUN_DIR/docker.sock"
export DOCKER_HOST="${DOCKER_HOST:-unix://$SOCK}"
if docker version >/dev/null 2>&1; then
  echo "$DOCKER_HOST"
  exit 0
fi
if ! command -v dockerd >/dev/null 2>&1 || ! command -v mmdebstrap >/dev/null 2>&1; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io mmdebstrap >&2
fi
mkdir -p "$RUN_DIR/data" "$RUN_DIR/exec"
export DOCKER_HOST="unix://$SOCK"
if ! docker version >/dev/null 2>&1; then
  nohup dockerd --host "$DOCKER_HOST" --data-root "$RUN_DIR/data" --exec-root "$RUN_DIR/exec" \
    --pidfile "$RUN_DIR/dockerd.pid" >"$RUN_DIR/dockerd.log" 2>&1 &
  for _ in $(seq 1 60); do
    docker version >/dev/null 2>&1 && break
    sleep 1
  done
fi
if ! docker version >/dev/null 2>&1; then
  echo "dockerd did not come up; its log:" >&2
  tail -n 30 "$RUN_DIR/dockerd.log" >&2
  exit 1
fi
echo "$DOCKER_HOST"
