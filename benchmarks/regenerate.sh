#!/usr/bin/env bash
# Regenerate every measured block of docs/benchmarks.md on this machine, in one go:
#
#   bash benchmarks/regenerate.sh          # about 15 minutes; a quiet machine gives firmer figures
#
# Each block (<!-- begin NAME --> ... <!-- end NAME -->) gets its command, the machine and the
# figures of this run; the prose around the blocks is not touched, so reread it afterwards.
# Needs wrk (apt-get install -y wrk); the LiteLLM venv is made on first use (litellm_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
doc=docs/benchmarks.md
"$py" benchmarks/router_overhead.py --paths direct,vlmhub,vlmhub-quiet,vlmhub-asyncio,aiohttp,httpx,litellm \
    --update-doc "$doc"
"$py" benchmarks/cold_start.py --update-doc "$doc"
# The access log's cost and the router against the thin aiohttp proxy (issue 21 item 15).
(cd benchmarks && ../"$py" log_cost.py --concurrency 16,64 --rounds 8 --seconds 4 \
    --update-doc "../$doc")
if [[ -f benchmarks/simulate_table.py ]] && grep -q "<!-- begin simulate -->" "$doc"; then
    "$py" benchmarks/simulate_table.py | "$py" benchmarks/benchlib.py "$doc" simulate
fi
