#!/usr/bin/env bash
# See vlmhub's loading progress in Open WebUI (issue 26 item 1). A person runs this: it is not
# part of `make test` or `make bench` (Open WebUI is a 7 GB install). docs/api.md, "Seeing it in
# Open WebUI", says what to look for.
#
#   bash benchmarks/openwebui_progress.sh
#
# 1. installs open-webui into its own venv ($VENV, made once; OPENWEBUI_VERSION pins it),
# 2. starts `vlmhub route` on 127.0.0.1:$ROUTER_PORT over one stand-in engine ("slow", a test
#    double, no GPU) that takes $START_S seconds to start, with router.loading_progress
#    $ROUTER_PROGRESS (reasoning | comments | off) and a progress line every 2 s,
# 3. starts Open WebUI on 127.0.0.1:$PORT (no login, its data in a temporary dir) pointed at
#    the router's /v1, and waits. Ctrl-C stops both and removes the temporary dir.
# Open http://127.0.0.1:$PORT, pick "slow", send a message: a "thinking" block grows while the
# model loads, then the answer follows. To watch another cold start, unload the model:
#   curl -X POST http://127.0.0.1:$ROUTER_PORT/api/models/slow/unload
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=${PY:-python3.11}  # Open WebUI needs Python 3.11 or 3.12
VENV=${VENV:-$HOME/.cache/vlmhub/openwebui-venv}
PORT=${PORT:-3000}
ROUTER_PORT=${ROUTER_PORT:-8080}
ROUTER_PROGRESS=${ROUTER_PROGRESS:-reasoning}
START_S=${START_S:-20}
VLMHUB=${VLMHUB:-$repo/.venv/bin/vlmhub}

case "$ROUTER_PROGRESS" in
    reasoning | comments | off) ;;
    *) echo "ROUTER_PROGRESS must be reasoning, comments or off" >&2; exit 2 ;;
esac
[[ -x "$VLMHUB" ]] || { echo "no $VLMHUB: run 'make run' (or set VLMHUB) first" >&2; exit 2; }

if [[ ! -x "$VENV/bin/open-webui" ]]; then
    echo "installing open-webui into $VENV (several GB, a few minutes)"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "open-webui${OPENWEBUI_VERSION:+==$OPENWEBUI_VERSION}"
fi

work=$(mktemp -d)
router_pid=""
webui_pid=""
cleanup() {
    for pid in "$webui_pid" "$router_pid"; do
        [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

cat >"$work/models.yaml" <<YAML
gpu: {total_gib: 8, reserve_gib: 0, force_total: true}
router: {host: 127.0.0.1, port: $ROUTER_PORT, loading_progress: $ROUTER_PROGRESS,
         loading_comments_s: 2}
runtime:
  kind: process
  process_argv: ["{python}", "-m", "vlmhub.testing.stub_engine"]
models:
  slow:
    spec:
      hf_repo: stub/slow
      image: vlmhub/stub-engine:dev
      options: {max_model_len: 2048}
      vram: {weights_gib: 1, kv_bytes_per_token: 1024}
    env: {VLMHUB_STUB_STARTUP_DELAY: "$START_S", VLMHUB_STUB_TOKEN_DELAY: "0.05"}
YAML

VLMHUB_STATE_DIR="$work/state" "$VLMHUB" route --config "$work/models.yaml" &
router_pid=$!
for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$ROUTER_PORT/health" >/dev/null 2>&1 && break
    sleep 0.2
done
curl -fsS "http://127.0.0.1:$ROUTER_PORT/health" >/dev/null || { echo "router did not start" >&2; exit 1; }

DATA_DIR="$work/webui" WEBUI_AUTH=False ENABLE_OLLAMA_API=False \
    OPENAI_API_BASE_URL="http://127.0.0.1:$ROUTER_PORT/v1" OPENAI_API_KEY=none \
    "$VENV/bin/open-webui" serve --host 127.0.0.1 --port "$PORT" &
webui_pid=$!
echo
echo "Open WebUI: http://127.0.0.1:$PORT  (router: http://127.0.0.1:$ROUTER_PORT, progress: $ROUTER_PROGRESS)"
echo "Pick the model 'slow' and send a message; Ctrl-C stops both."
wait "$webui_pid"
