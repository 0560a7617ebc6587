#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what the tests need, check
# formatting and lints, build, then run every test with no network but
# loopback, so no test can reach a real AWS endpoint.
#
#   scripts/test.sh            everything
#   scripts/test.sh -- ARGS    extra arguments for `cargo test`
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

extra=()
if [[ "${1:-}" == "--" ]]; then
    shift
    extra=("$@")
fi

if [[ $(id -u) -eq 0 ]]; then
    scripts/setup-test-env.sh
else
    echo "test.sh: not root: the test bed cannot install its PAM service;" >&2
    echo "test.sh: the tests that need it will print SKIPPED." >&2
fi

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo build --locked --all-targets

# Tests run offline: in a fresh network namespace (root) only loopback
# exists, so a request that escapes the redirected AWS endpoints fails
# instead of reaching AWS. Everything else also redirects every endpoint.
run_offline() {
    if [[ $(id -u) -eq 0 ]] && command -v unshare >/dev/null; then
        unshare --net -- bash -c 'ip link set lo up && "$@"' offline "$@"
    else
        echo "test.sh: cannot make a network namespace; relying on endpoint redirection" >&2
        "$@"
    fi
}

if [[ -x .venv/bin/python ]]; then
    # The client tests drive the build made just above.
    RDS_IAM_PROXY_BIN="$REPO/target/debug/rds-iam-proxy" \
        run_offline .venv/bin/python -m pytest -q -p no:cacheprovider testbed/tests
fi
run_offline cargo test --locked --offline --all-targets "${extra[@]}"

# Fuzzing (docs/fuzzing.md): every target replays its seeds and kept
# corpus, then fuzzes a fixed number of runs from a fixed seed. Built while
# the package registry is reachable; run offline like the tests.
scripts/fuzz.sh build
CARGO_NET_OFFLINE=true run_offline scripts/fuzz.sh short
