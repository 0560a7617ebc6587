//! `rds-iam-proxy das tail` and `das reconcile`.

use std::io::IsTerminal as _;
use std::time::SystemTime;

use anyhow::{Context, bail};

use crate::cli::{DasCommand, DasReconcileArgs, DasStreamArgs, DasTailArgs, parse_duration};
use crate::das::checkpoint::Checkpoint;
use crate::das::event::parse_time;
use crate::das::record::{KmsKeys, RecordError};
use crate::das::stream::{Start, StreamReader};
use crate::das::tail::{self, Format, Joiner, TailOptions};
use crate::das::trail::Trail;
use crate::das::{reconcile, stream_name};
use crate::identity::IdentityService;

/// Runs the command; the exit status.
pub async fn run(command: DasCommand) -> anyhow::Result<u8> {
    match command {
        DasCommand::Tail(args) => tail(args).await,
        DasCommand::Reconcile(args) => reconcile(args).await,
    }
}

/// `2026-12-07T09:00:00Z`, `2026-12-07 09:00:00+00`, or a duration ago
/// (`15m`).
pub(crate) fn when(flag: &str, v: &str) -> anyhow::Result<SystemTime> {
    if let Some(t) = parse_time(v) {
        return Ok(t);
    }
    match parse_duration(v) {
        Ok(d) => SystemTime::now()
            .checked_sub(d)
            .with_context(|| format!("{flag} {v:?} reaches before 1970")),
        Err(_) => {
            bail!("{flag} {v:?}: give a time (2026-12-07T09:00:00Z) or a duration ago (15m, 1h)")
        }
    }
}

struct Clients {
    kinesis: aws_sdk_kinesis::Client,
    kms: aws_sdk_kms::Client,
    stream: String,
}

async fn clients(a: &DasStreamArgs) -> anyhow::Result<Clients> {
    let id = a.cluster_resource_id.trim();
    if id.is_empty()
        || id.len() > 128
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        bail!(
            "--cluster-resource-id {id:?}: expected the cluster's DbClusterResourceId, e.g. cluster-ABCDEFGHIJKLMNOPQRSTUVWXY0 (aws rds describe-db-clusters --query 'DBClusters[].DbClusterResourceId')"
        );
    }
    let sdk = IdentityService::load_sdk_config(a.profile.as_deref(), a.region.as_deref()).await;
    if sdk.region().is_none() {
        bail!(
            "no AWS region: give --region (the stream's region) or set one in the AWS configuration"
        );
    }
    let mut k = aws_sdk_kinesis::config::Builder::from(&sdk);
    let mut m = aws_sdk_kms::config::Builder::from(&sdk);
    if let Some(url) = &a.endpoint_url {
        k = k.endpoint_url(url);
        m = m.endpoint_url(url);
    }
    Ok(Clients {
        kinesis: aws_sdk_kinesis::Client::from_conf(k.build()),
        kms: aws_sdk_kms::Client::from_conf(m.build()),
        stream: a.stream.clone().unwrap_or_else(|| stream_name(id)),
    })
}

fn format(a: &DasStreamArgs) -> Format {
    a.format.unwrap_or(if std::io::stdout().is_terminal() {
        Format::Text
    } else {
        Format::Json
    })
}

/// Bad records go to stderr, one line each, and the run goes on.
fn report_bad(shard: &str, seq: &str, e: &RecordError) {
    eprintln!("rds-iam-proxy das: skipped record {seq} of {shard}: {e}");
}

async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn tail(args: DasTailArgs) -> anyhow::Result<u8> {
    let start = match args.from.as_str() {
        "latest" => Start::Latest,
        "trim-horizon" | "trim_horizon" => Start::TrimHorizon,
        v => Start::At(when("--from", v)?),
    };
    let joiner = match &args.audit_dir {
        Some(dir) => Some(Joiner::new(Trail::open(dir).with_context(|| {
            format!("cannot read the audit directory {}", dir.display())
        })?)),
        None => None,
    };
    let c = clients(&args.stream).await?;
    let checkpoint = match &args.checkpoint {
        Some(p) => Checkpoint::load(p, &c.stream)?,
        None => Checkpoint {
            stream: c.stream.clone(),
            ..Checkpoint::default()
        },
    };
    let mut reader = StreamReader::new(
        c.kinesis,
        c.stream.clone(),
        start,
        checkpoint,
        args.stream.poll_interval,
    );
    let keys = KmsKeys::new(c.kms, args.stream.cluster_resource_id.trim().to_owned());
    let format = format(&args.stream);
    let opts = TailOptions {
        format,
        colour: format == Format::Text
            && std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        checkpoint: args.checkpoint.clone(),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let counts = tail::run(
        &mut reader,
        &keys,
        joiner,
        &opts,
        &mut out,
        report_bad,
        stop_signal(),
    )
    .await?;
    let bad: u64 = counts.bad.values().sum();
    let kinds: Vec<String> = counts.bad.iter().map(|(k, v)| format!("{k} {v}")).collect();
    eprintln!(
        "rds-iam-proxy das tail: {} records, {} events ({} with a person), {} heartbeats, {} skipped{}",
        counts.records,
        counts.events,
        counts.matched,
        counts.heartbeats,
        bad,
        if kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", kinds.join(", "))
        }
    );
    Ok(u8::from(bad > 0))
}

async fn reconcile(args: DasReconcileArgs) -> anyhow::Result<u8> {
    let from = when("--from", &args.from)?;
    let to = match &args.to {
        Some(v) => when("--to", v)?,
        None => SystemTime::now(),
    };
    if to <= from {
        bail!("--to must come after --from");
    }
    let trail = Trail::open(&args.audit_dir).with_context(|| {
        format!(
            "cannot read the audit directory {}",
            args.audit_dir.display()
        )
    })?;
    let c = clients(&args.stream).await?;
    let start = from.checked_sub(reconcile::MARGIN).unwrap_or(from);
    let mut reader = StreamReader::new(
        c.kinesis,
        c.stream.clone(),
        Start::At(start),
        Checkpoint {
            stream: c.stream.clone(),
            ..Checkpoint::default()
        },
        args.stream.poll_interval,
    );
    let keys = KmsKeys::new(c.kms, args.stream.cluster_resource_id.trim().to_owned());
    let report = reconcile::Reconciler::new(trail, from, to)
        .run(&mut reader, &keys, report_bad)
        .await?;
    match format(&args.stream) {
        Format::Text => print!("{}", reconcile::text(&report, &c.stream, from, to)),
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "stream": c.stream,
                "from": crate::audit::event::rfc3339(from),
                "to": crate::audit::event::rfc3339(to),
                "unexplained": report.unexplained(),
                "report": report,
            })
        ),
    }
    Ok(u8::from(report.unexplained() > 0))
}
