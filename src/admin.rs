//! The admin HTTP listener: `/startup`, `/liveness`, `/readiness`,
//! `/metrics`, and the status page (`/`, `/sessions`: [`crate::status`]).
//! A small HTTP/1.1 responder for a few GET paths: one request per
//! connection, bounded request size, a deadline for the whole exchange, a
//! cap on concurrent admin connections.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::debug;

use crate::app::{AppContext, EndpointContext, Phase};

/// Largest request head read; longer requests get 431.
const MAX_REQUEST: usize = 8 * 1024;
/// Deadline for reading a request and writing the answer.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections served at once; beyond, new ones wait in the backlog.
const MAX_ADMIN_CONNECTIONS: usize = 16;
/// Credentials closer than this to expiry make the proxy not ready.
pub const NEAR_EXPIRY: Duration = Duration::from_secs(120);
/// Bound on each readiness check that may go to the network.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the status page's per-minute history is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// Serves until the process exits.
pub async fn serve(listener: TcpListener, app: Arc<AppContext>, eps: Vec<Arc<EndpointContext>>) {
    let permits = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let eps = Arc::new(eps);
    let reach = Arc::new(crate::status::Reachability::default());
    // The last hour's chart needs a sample in every minute, whether or
    // not anyone looks.
    tokio::spawn({
        let app = app.clone();
        async move {
            loop {
                app.sessions.sample(SystemTime::now());
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        }
    });
    let mut backoff = Duration::from_millis(5);
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((sock, _)) => {
                backoff = Duration::from_millis(5);
                let (app, eps, reach) = (app.clone(), eps.clone(), reach.clone());
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(sock, &app, &eps, &reach))
                            .await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "admin accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn exchange(
    mut sock: TcpStream,
    app: &AppContext,
    eps: &[Arc<EndpointContext>],
    reach: &crate::status::Reachability,
) {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    let head_end = loop {
        if let Some(i) = find_head_end(&buf[..len]) {
            break i;
        }
        if len == buf.len() {
            let _ = respond(&mut sock, 431, "text/plain", "request too large\n", false).await;
            return;
        }
        match sock.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let _ = respond(&mut sock, 405, "text/plain", "only GET\n", false).await;
        return;
    }
    debug!(path, "admin request");
    let (status, ctype, body) = match path {
        "/startup" if app.started.load(Ordering::Acquire) => {
            (200, "text/plain", "started\n".into())
        }
        "/startup" => (503, "text/plain", "starting\n".into()),
        "/liveness" => (200, "text/plain", "alive\n".into()),
        "/readiness" => match readiness(app, eps).await {
            Ok(()) => (200, "text/plain", "ready\n".into()),
            Err(reasons) => (
                503,
                "text/plain",
                format!("not ready:\n{}\n", reasons.join("\n")),
            ),
        },
        "/metrics" => {
            use std::sync::atomic::Ordering::Relaxed;
            if let Some(audit) = app.audit.stats() {
                app.metrics
                    .set_audit_queue_depth(audit.queue_depth.load(Relaxed));
                app.metrics.set_audit_dropped(audit.dropped.load(Relaxed));
            }
            {
                let limits = &app.audit.limits;
                app.metrics.set_audit_hold(
                    limits.hold.used() as u64,
                    limits.hold.refused.load(Relaxed),
                    limits.off_loop_parses.load(Relaxed),
                );
            }
            let mut page = app.metrics.render();
            crate::metrics::Metrics::render_worker_sessions(&mut page, &app.workers.sessions());
            app.audit.shipping.render(&mut page, "rds_iam_proxy");
            crate::metrics::counter(
                &mut page,
                "rds_iam_proxy_audit_digest_failures_total",
                "Audit digests that could not be signed or written.",
                app.audit.digest_failures.load(Relaxed),
            );
            (200, "text/plain; version=0.0.4; charset=utf-8", page)
        }
        "/" | "/sessions" => {
            let view = crate::status::View::from_query(query);
            let st = crate::status::gather(app, eps, reach, view).await;
            if path == "/" {
                (
                    200,
                    "text/html; charset=utf-8",
                    crate::status::html::page(&st, view),
                )
            } else {
                (200, "application/json", crate::status::json::document(&st))
            }
        }
        _ => (
            404,
            "text/plain",
            "not found: try /, /sessions, /startup, /liveness, /readiness or /metrics\n".into(),
        ),
    };
    let _ = respond(&mut sock, status, ctype, &body, head_only).await;
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| b.windows(2).position(|w| w == b"\n\n"))
}

async fn respond(
    sock: &mut TcpStream,
    status: u16,
    ctype: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nContent-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    sock.write_all(out.as_bytes()).await?;
    sock.shutdown().await
}

/// Ready: running (not draining), every listener bound, usable AWS
/// credentials not about to expire, below the connection limit, and
/// (when asked for) every upstream reachable over verified TLS. The
/// error lists every reason.
pub async fn readiness(app: &AppContext, eps: &[Arc<EndpointContext>]) -> Result<(), Vec<String>> {
    let mut reasons = Vec::new();
    if *app.phase.borrow() != Phase::Running {
        reasons.push("shutting down".to_owned());
    }
    if !app.started.load(Ordering::Acquire) {
        reasons.push("listeners not up yet".to_owned());
    }
    if let Some(behind) = app.audit.shipping.behind() {
        reasons.push(behind);
    }
    let config = app.config.load_full();
    if app.metrics.active() >= config.live.max_connections {
        reasons.push(format!(
            "at the connection limit ({})",
            config.live.max_connections
        ));
    }
    match tokio::time::timeout(CHECK_TIMEOUT, app.identity.current()).await {
        Ok(Ok((creds, _))) => {
            if let Some(exp) = creds.expiry()
                && exp < SystemTime::now() + NEAR_EXPIRY
            {
                reasons.push("AWS credentials expire within 2 minutes".to_owned());
            }
        }
        Ok(Err(e)) => reasons.push(format!("AWS identity: {e}")),
        Err(_) => reasons.push("AWS identity: no answer within 5s".to_owned()),
    }
    if config.live.admin_upstream_check {
        for ep in eps {
            let live = ep.live();
            match tokio::time::timeout(
                CHECK_TIMEOUT,
                crate::upstream::connect_tls(&live.endpoint, None),
            )
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => reasons.push(format!("upstream {}: {e}", ep.name)),
                Err(_) => reasons.push(format!("upstream {}: no TLS session within 5s", ep.name)),
            }
        }
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons)
    }
}
