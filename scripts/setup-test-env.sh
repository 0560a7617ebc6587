#!/usr/bin/env bash
# Prepares a fresh Debian machine (as root) for the test suites: the Debian
# packages the test bed compiles against and a Python venv at $REPO/.venv
# with the pinned testbed/requirements.txt. Idempotent: a re-run that finds
# everything in place does no network access.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
REQ="$REPO/testbed/requirements.txt"
STAMP="$VENV/.requirements.sha256"

# libpam0g-dev: headers for testbed/pam_rdsiam.c; gcc builds it; libclang-dev
# for bindgen in the pg_query crate (the audit log's SQL parser); openssl and
# postgresql client/server are the bed itself; python3-venv for the venv;
# iproute2 and util-linux (unshare) put the tests in a network namespace;
# chromium and chromium-driver are the real browser the status page's test
# drives (testbed/tests/test_status_page.py, through selenium).
DEB_PACKAGES=(libpam0g-dev gcc libc6-dev libclang-dev openssl python3 python3-venv postgresql-15 postgresql-client-15 iproute2 util-linux chromium chromium-driver)

missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup-test-env: missing Debian packages (${missing[*]}) and not root" >&2
        exit 1
    fi
    echo "setup-test-env: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "setup-test-env: $VENV is up to date"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
echo "$want" >"$STAMP"
echo "setup-test-env: $VENV ready"
