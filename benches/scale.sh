#!/usr/bin/env bash
# Scale benchmarks (issue: performance): proxy memory per idle session with
# 1,000 sessions open, and proxy memory while a slow client pulls a multi-GB
# result, on the local test bed, TLS on every hop. Needs root.
#
#   sudo benches/scale.sh                              # both scenarios
#   sudo SESSIONS=200 COPY_MB=256 benches/scale.sh     # a quick look
#   sudo benches/scale.sh --scenarios idle
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
scripts/setup-test-env.sh >/dev/null
cargo build --release --locked --quiet
# Two descriptors per session in the proxy, one in this client.
ulimit -n 8192
exec .venv/bin/python benches/scale.py "$@"
