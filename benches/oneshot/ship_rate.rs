//! Audit records shipped per CPU second of this process, per sink: a trail
//! of N records (in files of 20,000) is shipped to Kinesis (PutRecords of
//! 500) and to S3 (one object per file), against the endpoint in
//! AWS_ENDPOINT_URL (moto in benches/ship_cost.sh; its own time is not
//! counted: CPU time is this process's, wall time is shown apart).
//!
//!     AWS_ENDPOINT_URL=http://127.0.0.1:PORT cargo run --release --example ship-rate -- 100000 BUCKET STREAM

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use rds_iam_proxy::audit::ship::{KinesisShipper, S3Shipper, ShipConfig, SinkStats};

/// User + system CPU seconds of this process (/proc/self/stat).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let total: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let bucket = args.get(2).cloned().unwrap_or_else(|| "rip-bench".into());
    let stream = args.get(3).cloned().unwrap_or_else(|| "rip-bench".into());
    let dir = std::env::temp_dir().join(format!("rip-ship-rate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let per_file = 20_000;
    let mut bytes = 0u64;
    for f in 0..total.div_ceil(per_file) {
        let path = dir.join(format!(
            "audit-20270101T{:06}000000-{:08}.jsonl",
            f,
            f * per_file + 1
        ));
        let mut w = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for i in f * per_file..((f + 1) * per_file).min(total) {
            let line = format!(
                r#"{{"seq":{},"prev":"{}","v":1,"type":"statement","time":"2027-01-01T00:00:00.000000Z","conn":{},"n":{},"part":1,"parts":1,"protocol":"extended","text":"SELECT abalance FROM pgbench_accounts WHERE aid = $1"}}"#,
                i + 1,
                "0".repeat(64),
                i / 1000,
                i % 1000
            );
            bytes += line.len() as u64 + 1;
            writeln!(w, "{line}").unwrap();
        }
    }
    // An empty newest file, as the writer's live one: S3 ships the rest.
    std::fs::write(dir.join("audit-20271231T000000000000-99999999.jsonl"), b"").unwrap();
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let config = ShipConfig {
        instance_id: "bench".into(),
        s3_bucket: Some(bucket),
        s3_prefix: "bench/".into(),
        s3_lock: None,
        kinesis_stream: Some(stream),
        spool_max_bytes: 0,
    };
    println!(
        "{total} records, {:.1} MB, in {} files",
        bytes as f64 / 1e6,
        total.div_ceil(per_file)
    );

    let stats = Arc::new(SinkStats::default());
    let mut k = KinesisShipper::new(
        &dir,
        &config,
        aws_sdk_kinesis::Client::new(&sdk),
        stats.clone(),
    );
    let (cpu, wall) = (cpu_seconds(), Instant::now());
    while !k.pass().await {}
    let (cpu, wall) = (cpu_seconds() - cpu, wall.elapsed().as_secs_f64());
    let shipped = stats
        .shipped_items
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "kinesis: {shipped} records in {wall:.1} s wall, {cpu:.2} s CPU: {:.0} records per CPU second ({:.0} per wall second with the endpoint)",
        shipped as f64 / cpu.max(0.01),
        shipped as f64 / wall
    );

    let stats = Arc::new(SinkStats::default());
    let conf = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(true)
        .build();
    let mut s = S3Shipper::new(
        &dir,
        config,
        aws_sdk_s3::Client::from_conf(conf),
        stats.clone(),
    );
    let (cpu, wall) = (cpu_seconds(), Instant::now());
    while !s.pass(false).await {}
    let (cpu, wall) = (cpu_seconds() - cpu, wall.elapsed().as_secs_f64());
    let objects = stats
        .shipped_items
        .load(std::sync::atomic::Ordering::Relaxed);
    let shipped_bytes = stats
        .shipped_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "s3: {objects} objects, {:.1} MB in {wall:.1} s wall, {cpu:.2} s CPU: {:.0} records per CPU second ({:.0} MB/s per CPU second)",
        shipped_bytes as f64 / 1e6,
        total as f64 / cpu.max(0.01),
        shipped_bytes as f64 / 1e6 / cpu.max(0.01)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
