//! Micro benchmarks of the per-connection and per-message work:
//! `cargo bench --bench micro`. See docs/PERFORMANCE.md.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rds_iam_proxy::audit::{Auditor, SessionTap, redact};
use rds_iam_proxy::gate::{SERVER_PREFIX, server_wanted};
use rds_iam_proxy::pg::frame::{MAX_CLIENT_MESSAGE, Scanner, write_message};
use rds_iam_proxy::pg::messages::{self, Capture};
use rds_iam_proxy::pg::startup::{self, ProtocolVersion};
use rds_iam_proxy::token::{TokenTarget, sign_at};

/// What pgbench -M prepared -S sends per transaction: Bind, Execute, Sync.
fn prepared_select_stream(transactions: usize) -> Vec<u8> {
    let mut out = BytesMut::new();
    for i in 0..transactions {
        write_message(&mut out, b'B', |b| {
            b.extend_from_slice(b"\0P0_1\0\0\0\0\x01\0\0\0\x05");
            b.extend_from_slice(format!("{:05}", i % 100_000).as_bytes());
            b.extend_from_slice(b"\0\0");
        });
        write_message(&mut out, b'E', |b| b.extend_from_slice(b"\0\0\0\0\0"));
        write_message(&mut out, b'S', |_| {});
    }
    out.to_vec()
}

fn frame_scanning(c: &mut Criterion) {
    let stream = prepared_select_stream(10_000);
    let mut g = c.benchmark_group("scan client->upstream");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    for chunk in [16 * 1024, 1500, 64] {
        g.bench_function(format!("prepared select, {chunk}-byte reads"), |b| {
            b.iter(|| {
                let mut scanner = Scanner::new(MAX_CLIENT_MESSAGE);
                let mut n = 0u32;
                for piece in stream.chunks(chunk) {
                    scanner.feed(black_box(piece), |_| n += 1).unwrap();
                }
                assert_eq!(n, 30_000);
                n
            })
        });
    }
    g.finish();
}

/// What the server answers to `pgbench -S` (RowDescription, one DataRow,
/// CommandComplete, ReadyForQuery), `transactions` times.
fn select_result_stream(transactions: usize) -> Vec<u8> {
    let mut out = BytesMut::new();
    for i in 0..transactions {
        write_message(&mut out, b'T', |b| {
            b.extend_from_slice(
                b"\0\x01abalance\0\0\0\x40\x06\0\x03\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
            );
        });
        write_message(&mut out, b'D', |b| {
            b.extend_from_slice(b"\0\x01\0\0\0\x05");
            b.extend_from_slice(format!("{:05}", i % 100_000).as_bytes());
        });
        write_message(&mut out, b'C', |b| b.extend_from_slice(b"SELECT 1\0"));
        write_message(&mut out, b'Z', |b| b.extend_from_slice(b"I"));
    }
    out.to_vec()
}

/// The upstream -> client direction as the audit follows it: message
/// boundaries, and the first bytes of tags, errors and ReadyForQuery.
fn server_scanning(c: &mut Criterion) {
    let stream = select_result_stream(10_000);
    let mut g = c.benchmark_group("scan upstream->client (audit capture)");
    g.throughput(Throughput::Bytes(stream.len() as u64));
    for chunk in [16 * 1024, 1500] {
        g.bench_function(format!("select results, {chunk}-byte reads"), |b| {
            b.iter(|| {
                let mut capture = Capture::new(u32::MAX, SERVER_PREFIX);
                let mut n = 0u32;
                for piece in stream.chunks(chunk) {
                    capture
                        .feed(black_box(piece), server_wanted, |_, _| n += 1)
                        .unwrap();
                }
                // RowDescription, CommandComplete and ReadyForQuery of
                // each transaction (DataRows pass uncopied).
                assert_eq!(n, 30_000);
                n
            })
        });
    }
    g.finish();
}

/// The per-statement work of the default configuration (password guard
/// on, audit off), and the rare statement that needs PostgreSQL's parser.
fn statement_inspection(c: &mut Criterion) {
    let mut tap = SessionTap::new(1, std::sync::Arc::new(Auditor::off(true)));
    let mut inject = Vec::new();
    let mut g = c.benchmark_group("inspect statement (guard on, audit off)");
    for (name, sql) in [
        (
            "pgbench select",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
        ),
        (
            "2 KB report query",
            &*format!("select {} from orders where id = 1", "amount, ".repeat(250)),
        ),
        (
            "password change",
            "ALTER USER alice PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a:b'",
        ),
    ] {
        let mut q = Vec::new();
        messages::write_query(&mut q, sql);
        // Each statement is answered (ReadyForQuery), as a server would,
        // so the model stays one statement deep and the guard judges at
        // once instead of waiting for earlier answers.
        g.bench_function(name, |b| {
            b.iter(|| {
                let v = tap.client_message(b'Q', black_box(&q[5..]), true, &mut inject);
                tap.server_message(b'Z', b"I");
                v
            })
        });
    }
    g.finish();
    c.bench_function("redact a statement that sets a password", |b| {
        b.iter(|| {
            redact::redact(black_box(
                b"ALTER USER alice PASSWORD 'SCRAM-SHA-256$4096:c2FsdA==$a:b' VALID UNTIL '2030-01-01'",
            ))
        })
    });
}

fn token_signing(c: &mut Criterion) {
    let creds = Credentials::new(
        "ASIAEXAMPLEKEY123456",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        // A session token the size SSO hands out.
        Some("IQoJb3JpZ2luX2VjE".repeat(60)),
        None,
        "bench",
    );
    let target = TokenTarget {
        host: "demo.cluster-c0ffee.eu-west-1.rds.amazonaws.com",
        port: 5432,
        region: "eu-west-1",
        user: "arianna",
    };
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    c.bench_function("sign token (session credentials)", |b| {
        b.iter(|| sign_at(black_box(&creds), black_box(&target), at))
    });
}

fn startup_parse(c: &mut Criterion) {
    let mut packet = BytesMut::new();
    startup::encode_startup(
        &mut packet,
        ProtocolVersion::V3_0,
        [
            ("user", "arianna"),
            ("database", "mylab"),
            ("application_name", "psql"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
        ],
    );
    let body = packet[4..].to_vec();
    c.bench_function("parse StartupMessage", |b| {
        b.iter(|| startup::decode(black_box(&body)).unwrap())
    });
}

criterion_group!(
    benches,
    frame_scanning,
    server_scanning,
    statement_inspection,
    token_signing,
    startup_parse
);
criterion_main!(benches);
