#!/usr/bin/env bash
# Start a Docker engine for the test tiers if none answers. Installs docker.io and mmdebstrap
# from Debian when they are missing (needs root). Prints the DOCKER_HOST to use, last.
#
# The engine's socket, data, exec root and log go in a private directory made for the run
# (mktemp -d: a random name, mode 0700), never a fixed /tmp path another user could create
# first. Where it is goes in a record file only this user can write (0600, in /run by
# default); a later call reuses the engine it names, but only when the record and the
# directory are this user's, private (0600, 0700) and not symlinks, and the engine answers.
#
#   start-dockerd.sh            reuse $DOCKER_HOST or the recorded engine, else start one
#   start-dockerd.sh --running  print the recorded engine's DOCKER_HOST, or fail; start nothing
#
# Env: DOCKER_HOST (used as it is when an engine answers there), VLMHUB_DOCKERD_RECORD (the
# record, default /run/vlmhub-dockerd.dir), VLMHUB_DOCKERD_ARGS (more dockerd flags, e.g.
# "--bridge=none --iptables=false" beside another engine), TMPDIR (where the directory goes).
set -euo pipefail
RECORD="${VLMHUB_DOCKERD_RECORD:-/run/vlmhub-dockerd.dir}"
ME="$(id -u)"

owned_private() {  # PATH MODE: PATH is no symlink, this user's, with exactly MODE
  [ ! -L "$1" ] && [ "$(stat -c '%u %a' -- "$1" 2>/dev/null)" = "$ME $2" ]
}

answers() {  # DIR: a Docker engine answers on DIR/docker.sock
  [ -S "$1/docker.sock" ] && DOCKER_HOST="unix://$1/docker.sock" docker version >/dev/null 2>&1
}

recorded() {  # the recorded engine's directory, if the record can be trusted and it answers
  local dir
  [ -f "$RECORD" ] && owned_private "$RECORD" 600 || return 1
  dir="$(head -n 1 -- "$RECORD")"
  case "$dir" in /*) ;; *) return 1 ;; esac
  [ -d "$dir" ] && owned_private "$dir" 700 && answers "$dir" || return 1
  echo "$dir"
}

if [ "${1:-}" = "--running" ]; then
  if RUN_DIR="$(recorded)"; then
    echo "unix://$RUN_DIR/docker.sock"
    exit 0
  fi
  echo "start-dockerd: no engine recorded in $RECORD that answers and can be trusted" >&2
  exit 1
fi

if [ -n "${DOCKER_HOST:-}" ] && docker version >/dev/null 2>&1; then
  echo "$DOCKER_HOST"
  exit 0
fi
exec 9>>"$RECORD.lock"  # one start at a time: a second caller waits, then reuses it
flock 9
if RUN_DIR="$(recorded)"; then
  echo "unix://$RUN_DIR/docker.sock"
  exit 0
fi
if ! command -v dockerd >/dev/null 2>&1 || ! command -v mmdebstrap >/dev/null 2>&1; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io mmdebstrap >&2
fi
if [ -S /tmp/vlmhub-dockerd/docker.sock ]; then  # where this script used to put it
  echo "start-dockerd: not reusing the engine at /tmp/vlmhub-dockerd (a fixed path, started" \
    "by an older start-dockerd.sh): set DOCKER_HOST to it if you trust it, or stop it" >&2
fi
RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/vlmhub-dockerd.XXXXXXXXXX")"
chmod 700 "$RUN_DIR"
export DOCKER_HOST="unix://$RUN_DIR/docker.sock"
read -r -a EXTRA <<<"${VLMHUB_DOCKERD_ARGS:-}"
nohup dockerd --host "$DOCKER_HOST" --data-root "$RUN_DIR/data" --exec-root "$RUN_DIR/exec" \
  --pidfile "$RUN_DIR/dockerd.pid" "${EXTRA[@]}" >"$RUN_DIR/dockerd.log" 2>&1 9>&- &
for _ in $(seq 1 60); do
  answers "$RUN_DIR" && break
  sleep 1
done
if ! answers "$RUN_DIR"; then
  echo "dockerd did not come up; its log:" >&2
  tail -n 30 "$RUN_DIR/dockerd.log" >&2
  exit 1
fi
(umask 077 && echo "$RUN_DIR" >"$RECORD.$$" && mv -f "$RECORD.$$" "$RECORD")
echo "$DOCKER_HOST"
