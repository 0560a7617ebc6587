#!/usr/bin/env bash
# The whole flow on the built-in local setup, no AWS account needed:
# test bed up, SSO sign-in, proxy, psql through it with no password.
# Needs root (the bed installs a PAM service). --no-shell skips the
# interactive psql at the end.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
scripts/setup-test-env.sh >/dev/null
cargo build --locked --quiet
exec .venv/bin/python testbed/demo.py "$@"
