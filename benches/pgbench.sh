#!/usr/bin/env bash
# Macro benchmarks (issue: performance): pgbench direct vs rds-iam-proxy vs
# pgbouncer on the local test bed, TLS on every hop. Needs root.
#
#   sudo benches/pgbench.sh                       # all scenarios, 3 rounds of 15 s
#   sudo DURATION=5 ROUNDS=1 benches/pgbench.sh   # a quick look
#   sudo benches/pgbench.sh --scenarios select8 bulk4 --targets direct proxy
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
scripts/setup-test-env.sh >/dev/null
if ! command -v pgbouncer >/dev/null && [[ ! -x /usr/sbin/pgbouncer ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null
fi
cargo build --release --locked --quiet --bin rds-iam-proxy --example tcp-relay
exec .venv/bin/python benches/macro.py "$@"
