#!/usr/bin/env bash
# Cost of shipping the audit trail (docs/PERFORMANCE.md): pgbench
# select-only through the proxy with async audit to local files only, and
# the same with the trail also shipped to S3 (files rotated every 10 s) and
# to Kinesis (every record), in one run, interleaved, medians of ROUNDS;
# then records shipped per CPU second of the shipper alone, per sink
# (benches/oneshot/ship_rate.rs). The sinks are the bed's moto. Needs root.
#
#   sudo benches/ship_cost.sh                 # 3 rounds of 15 s
#   DURATION=5 ROUNDS=1 sudo benches/ship_cost.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
cargo build --release --locked --quiet --example ship-rate
WORK="$(mktemp -d /tmp/rip-ship-cost-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
SINKS=".venv/bin/python testbed/audit_sinks.py --endpoint \$MOTO_URL"
DURATION="${DURATION:-15}" ROUNDS="${ROUNDS:-3}" benches/pgbench.sh \
    --scenarios select8 prepared8 \
    --targets direct proxy-audit-async \
    --setup "$SINKS create-bucket rip-bench && $SINKS create-stream rip-bench && $SINKS create-bucket rip-rate && $SINKS create-stream rip-rate" \
    --variant "proxy-audit-async-s3=--audit-mode async --audit-dir $WORK/s3 --audit-rotate-age 10s --audit-s3-bucket rip-bench" \
    --variant "proxy-audit-async-kinesis=--audit-mode async --audit-dir $WORK/kinesis --audit-kinesis-stream rip-bench" \
    --after "AWS_ENDPOINT_URL=\$MOTO_URL AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_REGION=eu-west-1 AWS_EC2_METADATA_DISABLED=true target/release/examples/ship-rate 100000 rip-rate rip-rate" \
    "$@"
