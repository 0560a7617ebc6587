#!/usr/bin/env bash
# Cost of the audit log and the password guard: pgbench direct vs the proxy
# with the guard off (no per-message work), the default (guard on, no log),
# async audit and sync audit, in one run, interleaved, medians of ROUNDS.
# Scenarios: select-only simple and prepared (8 clients), and a bulk result
# (~1 MB per transaction, 4 clients). Reports TPS and the proxy's CPU time
# per transaction. Uses the pgbench harness (benches/pgbench.sh, macro.py).
# Needs root.
#
#   sudo benches/audit_cost.sh                      # 3 rounds of 15 s
#   DURATION=5 sudo benches/audit_cost.sh           # a quicker look
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
DURATION="${DURATION:-15}" ROUNDS="${ROUNDS:-3}" exec benches/pgbench.sh \
    --scenarios select8 prepared8 bulk4 \
    --targets direct proxy proxy-audit-async proxy-audit-sync \
    --variant "proxy-noguard=--allow-password-changes" \
    "$@"
