//! Activity stream events decrypted and joined per second, on one core:
//! the work `das tail` does per record after KMS (whose data keys are
//! cached), from the Encryption SDK message to the printed JSON line.
//!
//! The records are the stand-in's (tests/fixtures/das, made by the real
//! Python Encryption SDK): `batch` holds 7 events, `multiframe` 37. Each
//! event is looked up among 1,000 proxy sessions.

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rds_iam_proxy::das::{esdk, record, tail, trail};

fn key() -> [u8; 32] {
    let hex = include_str!("../tests/fixtures/das/data_key.hex").trim();
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    key
}

fn sessions() -> trail::Sessions {
    let mut s = trail::Sessions::default();
    for conn in 0..1000u64 {
        s.add(Arc::new(trail::ProxySession {
            instance: Arc::from("bench:1"),
            conn,
            person: format!("person{conn}"),
            identity_source: "sso".into(),
            role_arn: "arn:aws:sts::111122223333:assumed-role/AWSReservedSSO_DatabaseAdmin_0/x"
                .into(),
            access_key_id: "ASIAEXAMPLE".into(),
            db_user: "alice".into(),
            database: "mylab".into(),
            // The fixtures' sessions use pid 12345; one of these is it.
            backend_pid: Some(12345 - 500 + conn as i64),
            upstream_local_port: None,
            session_id: None,
            started_after: None,
            started_before: None,
            time: None,
        }));
    }
    s
}

fn decrypt_and_join(c: &mut Criterion) {
    let key = key();
    let sessions = sessions();
    let mut g = c.benchmark_group("das record to printed events");
    for (name, message) in [
        (
            "batch",
            include_bytes!("../tests/fixtures/das/batch.esdk").as_slice(),
        ),
        (
            "multiframe",
            include_bytes!("../tests/fixtures/das/multiframe.esdk").as_slice(),
        ),
    ] {
        let events = {
            let plain = esdk::decrypt(message, &key).unwrap().plaintext;
            let json = esdk::gunzip_capped(&plain, esdk::GUNZIP_CAP).unwrap();
            record::batch(&json).unwrap().events.len()
        };
        g.throughput(Throughput::Elements(events as u64));
        g.bench_function(format!("{name} ({events} events)"), |b| {
            b.iter(|| {
                let plain = esdk::decrypt(message, &key).unwrap().plaintext;
                let json = esdk::gunzip_capped(&plain, esdk::GUNZIP_CAP).unwrap();
                let batch = record::batch(&json).unwrap();
                let mut bytes = 0;
                for e in &batch.events {
                    let who = sessions.find(e);
                    bytes += tail::json_line(e, &batch, Some(who)).len();
                }
                bytes
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decrypt_and_join);
criterion_main!(benches);
