#!/usr/bin/env bash
# Instructions per transaction (issue: performance): the proxy and the bare
# TCP relay under valgrind's callgrind, one pgbench connection, split by
# component. Counts repeat exactly on a busy machine; see
# docs/PERFORMANCE.md. Needs root (the test bed).
#
#   sudo benches/callgrind.sh                                  # relay and proxy, 3 scenarios
#   sudo benches/callgrind.sh --scenarios select --transactions 2000
#   sudo benches/callgrind.sh --variant proxy-async='--audit-mode async --audit-dir /tmp/a'
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
scripts/setup-test-env.sh >/dev/null
if ! command -v valgrind >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >/dev/null
fi
cargo build --release --locked --quiet --bin rds-iam-proxy --example tcp-relay
exec .venv/bin/python benches/instructions.py "$@"
