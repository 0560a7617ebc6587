//! Micro benchmarks of the per-connection and per-message work:
//! `cargo bench --bench micro`. See docs/PERFORMANCE.md.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rds_iam_proxy::pg::frame::{MAX_CLIENT_MESSAGE, Scanner, write_message};
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

criterion_group!(benches, frame_scanning, token_signing, startup_parse);
criterion_main!(benches);
