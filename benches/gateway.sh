#!/usr/bin/env bash
# Gateway mode benchmark (benches/gateway.py): login latency and the
# gateway's CPU per verified login, direct vs the local proxy vs a local
# proxy through a gateway, on the local test bed. Needs root.
#
#   sudo benches/gateway.sh                      # 3 rounds of 10 s
#   sudo DURATION=5 ROUNDS=1 benches/gateway.sh  # a quick look
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
scripts/setup-test-env.sh >/dev/null
cargo build --release --locked --quiet --bin rds-iam-proxy
exec .venv/bin/python benches/gateway.py "$@"
