//! Process-wide counters, rendered in the Prometheus text format by the
//! admin listener.
//!
//! Plain atomics, touched once per connection (or per credential change),
//! never per forwarded message: bytes are added when a session ends.
//! Labelled counters are small locked maps because their events are rare
//! (a connection's outcome, a failure's reason).
//!
//! Hook points for other parts of the proxy: [`Metrics::identity_failure`],
//! [`Metrics::credentials_refreshed`], [`Metrics::set_audit_queue_depth`],
//! [`Metrics::set_audit_dropped`], [`Metrics::set_audit_hold`].

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use crate::error::ConnError;
use crate::identity::IdentityError;
use crate::upstream::UpstreamError;

/// Upper bounds (seconds) of the upstream login latency histogram.
const LOGIN_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Default)]
pub struct Metrics {
    active: AtomicUsize,
    /// Sockets not yet past their startup packet.
    pub handshakes: std::sync::Arc<crate::admission::Handshakes>,
    connections: Labelled,
    auth_failures: Labelled,
    identity_failures: Labelled,
    tokens_signed: AtomicU64,
    upstream_lost: AtomicU64,
    credential_refreshes: AtomicU64,
    /// Unix seconds; 0 while unknown or not expiring.
    credential_expiry: AtomicI64,
    login: Histogram,
    bytes_client_to_upstream: AtomicU64,
    bytes_upstream_to_client: AtomicU64,
    audit_queue_depth: AtomicU64,
    audit_dropped: AtomicU64,
    audit_hold_bytes: AtomicU64,
    audit_hold_refused: AtomicU64,
    audit_long_parses: AtomicU64,
    reloads: Labelled,
}

/// An owned slot, for moving into a connection task.
#[derive(Debug)]
pub struct OwnedSlot(std::sync::Arc<Metrics>);

impl Drop for OwnedSlot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    /// Takes a connection slot unless `max` are taken.
    pub fn try_acquire(self: &std::sync::Arc<Self>, max: usize) -> Option<OwnedSlot> {
        let prev = self.active.fetch_add(1, Relaxed);
        if prev >= max {
            self.active.fetch_sub(1, Relaxed);
            return None;
        }
        Some(OwnedSlot(self.clone()))
    }

    /// Sessions open now (startup read: in login or under way).
    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }

    /// Counts one connection by how it went (see [`outcome`]).
    pub fn connection(&self, outcome: &'static str) {
        self.connections.inc(outcome, 1);
    }

    /// Records a failed connection: its outcome and, for refusals on
    /// identity or authentication grounds, the reason.
    pub fn connection_failed(&self, e: &ConnError) {
        self.connection(outcome(e));
        if let Some(reason) = auth_reason(e) {
            self.auth_failures.inc(reason, 1);
        }
        if let ConnError::Identity(i) = e {
            self.identity_failure(identity_reason(i));
        }
    }

    /// Hook: an identity failure (source, peer check, ...) by reason.
    pub fn identity_failure(&self, reason: &'static str) {
        self.identity_failures.inc(reason, 1);
    }

    pub fn token_signed(&self) {
        self.tokens_signed.fetch_add(1, Relaxed);
    }

    /// A session whose connection to the server was lost (reset, or closed
    /// with no message of the server's).
    pub fn upstream_lost(&self) {
        self.upstream_lost.fetch_add(1, Relaxed);
    }

    /// Hook: credentials were refreshed; `expiry` is when the new ones end.
    pub fn credentials_refreshed(&self, expiry: Option<SystemTime>) {
        self.credential_refreshes.fetch_add(1, Relaxed);
        self.credential_expiry.store(unix(expiry), Relaxed);
    }

    /// Notes the expiry of credentials just used; a change counts as a
    /// refresh (so refreshes show even where the source has no hook yet).
    pub fn observe_credentials(&self, expiry: Option<SystemTime>) {
        let new = unix(expiry);
        let old = self.credential_expiry.swap(new, Relaxed);
        if old != new && old != 0 {
            self.credential_refreshes.fetch_add(1, Relaxed);
        }
    }

    /// Time of the upstream login (resolve, TCP, TLS, authentication).
    pub fn upstream_login(&self, took: Duration) {
        self.login.observe(took);
    }

    /// Adds a finished session's traffic.
    pub fn session_bytes(&self, client_to_upstream: u64, upstream_to_client: u64) {
        self.bytes_client_to_upstream
            .fetch_add(client_to_upstream, Relaxed);
        self.bytes_upstream_to_client
            .fetch_add(upstream_to_client, Relaxed);
    }

    /// Hook: records waiting in the audit queue.
    pub fn set_audit_queue_depth(&self, depth: u64) {
        self.audit_queue_depth.store(depth, Relaxed);
    }

    /// Hook: the inspection's shared limits ([`crate::audit::limits`]):
    /// bytes held now, statements refused and long texts parsed off the
    /// event loop since start.
    pub fn set_audit_hold(&self, bytes: u64, refused: u64, long_parses: u64) {
        self.audit_hold_bytes.store(bytes, Relaxed);
        self.audit_hold_refused.store(refused, Relaxed);
        self.audit_long_parses.store(long_parses, Relaxed);
    }

    /// Hook: records the audit has had to drop since start (a total).
    pub fn set_audit_dropped(&self, total: u64) {
        self.audit_dropped.store(total, Relaxed);
    }

    /// A SIGHUP reload, `ok` or `failed`.
    pub fn reload(&self, result: &'static str) {
        self.reloads.inc(result, 1);
    }

    /// One counter's value, for tests and readiness.
    pub fn connections_with(&self, outcome: &str) -> u64 {
        self.connections.get(outcome)
    }

    /// The Prometheus text exposition.
    /// Appends the sessions on each session worker: how evenly the
    /// `--worker-threads` share the load.
    pub fn render_worker_sessions(s: &mut String, sessions: &[usize]) {
        let name = "rds_iam_proxy_worker_sessions";
        let _ = writeln!(
            s,
            "# HELP {name} Sessions on each session worker thread now.\n# TYPE {name} gauge"
        );
        for (i, n) in sessions.iter().enumerate() {
            let _ = writeln!(s, "{name}{{worker=\"{i}\"}} {n}");
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        let p = "rds_iam_proxy";
        gauge(
            &mut s,
            &format!("{p}_active_connections"),
            "Client sessions open now (startup read; counted against --max-connections).",
            self.active() as f64,
        );
        gauge(
            &mut s,
            &format!("{p}_handshakes_in_progress"),
            "Client sockets in TLS or startup now (counted against --max-handshakes).",
            self.handshakes.in_progress() as f64,
        );
        self.connections.render(
            &mut s,
            &format!("{p}_connections_total"),
            "Client connections by outcome.",
            "outcome",
        );
        self.auth_failures.render(
            &mut s,
            &format!("{p}_auth_failures_total"),
            "Connections refused on identity or authentication grounds, by reason.",
            "reason",
        );
        self.identity_failures.render(
            &mut s,
            &format!("{p}_identity_failures_total"),
            "Failures to establish the AWS identity, by reason.",
            "reason",
        );
        counter(
            &mut s,
            &format!("{p}_tokens_signed_total"),
            "IAM authentication tokens signed.",
            self.tokens_signed.load(Relaxed),
        );
        counter(
            &mut s,
            &format!("{p}_sessions_upstream_lost_total"),
            "Sessions whose connection to the server was lost (reset, or closed with no message of the server's).",
            self.upstream_lost.load(Relaxed),
        );
        counter(
            &mut s,
            &format!("{p}_credential_refreshes_total"),
            "Times the AWS credentials in use changed.",
            self.credential_refreshes.load(Relaxed),
        );
        gauge(
            &mut s,
            &format!("{p}_credential_expiry_timestamp_seconds"),
            "When the AWS credentials in use expire (0: unknown or never).",
            self.credential_expiry.load(Relaxed) as f64,
        );
        self.login.render(
            &mut s,
            &format!("{p}_upstream_login_seconds"),
            "Upstream connect and login time: resolve, TCP, TLS, IAM authentication.",
        );
        counter(
            &mut s,
            &format!("{p}_client_to_upstream_bytes_total"),
            "Bytes forwarded from clients to the database (added when a session ends).",
            self.bytes_client_to_upstream.load(Relaxed),
        );
        counter(
            &mut s,
            &format!("{p}_upstream_to_client_bytes_total"),
            "Bytes forwarded from the database to clients (added when a session ends).",
            self.bytes_upstream_to_client.load(Relaxed),
        );
        gauge(
            &mut s,
            &format!("{p}_audit_queue_depth"),
            "Audit records waiting to be written.",
            self.audit_queue_depth.load(Relaxed) as f64,
        );
        counter(
            &mut s,
            &format!("{p}_audit_dropped_total"),
            "Audit records dropped.",
            self.audit_dropped.load(Relaxed),
        );
        gauge(
            &mut s,
            &format!("{p}_audit_hold_bytes"),
            "Bytes of long statements held for inspection, across sessions.",
            self.audit_hold_bytes.load(Relaxed) as f64,
        );
        counter(
            &mut s,
            &format!("{p}_audit_hold_refused_total"),
            "Statements refused (53000) because the memory for long statements was in use.",
            self.audit_hold_refused.load(Relaxed),
        );
        counter(
            &mut s,
            &format!("{p}_audit_long_parses_total"),
            "Long statement texts the password guard parsed off the event loop.",
            self.audit_long_parses.load(Relaxed),
        );
        self.reloads.render(
            &mut s,
            &format!("{p}_reloads_total"),
            "Configuration reloads (SIGHUP) by result.",
            "result",
        );
        s
    }
}

/// The `outcome` label of a failed connection.
pub fn outcome(e: &ConnError) -> &'static str {
    match e {
        ConnError::Handshake(_) => "handshake_failed",
        ConnError::HandshakeTimeout(_) => "handshake_timeout",
        ConnError::TooManyConnections(_) => "too_many_connections",
        ConnError::Identity(_) => "identity_refused",
        ConnError::Peer(_) => "peer_refused",
        ConnError::Replication => "unsupported",
        ConnError::Upstream(UpstreamError::Refused(_) | UpstreamError::UnexpectedAuth { .. }) => {
            "auth_refused"
        }
        ConnError::Upstream(_) | ConnError::LoginTimeout(_) => "upstream_failed",
        ConnError::Forward(_) => "forward_failed",
        ConnError::AuditUnavailable => "audit_unavailable",
        ConnError::Gateway(_) => "gateway_refused",
    }
}

/// Why a connection was refused, as one label: the reason of
/// `auth_failures_total` when there is one, else the outcome.
pub fn refusal_reason(e: &ConnError) -> &'static str {
    auth_reason(e).unwrap_or_else(|| outcome(e))
}

fn auth_reason(e: &ConnError) -> Option<&'static str> {
    Some(match e {
        ConnError::Identity(i) => identity_reason(i),
        ConnError::Peer(_) => "local_peer_refused",
        ConnError::Upstream(UpstreamError::Refused(_)) => "server_refused",
        ConnError::Upstream(UpstreamError::UnexpectedAuth { .. }) => "unexpected_auth_method",
        ConnError::Gateway(g) => g.reason(),
        _ => return None,
    })
}

fn identity_reason(e: &IdentityError) -> &'static str {
    match e {
        IdentityError::Credentials(_) => "no_credentials",
        IdentityError::SsoExpired { .. } => "sso_expired",
        IdentityError::SsoNotSignedIn { .. } => "sso_not_signed_in",
        IdentityError::Saml(_) => "saml",
        IdentityError::CallerIdentity(_) | IdentityError::IncompleteCaller => "sts",
        IdentityError::Arn(_) => "unsupported_arn",
        IdentityError::NotIdentityCenter { .. } => "not_identity_center",
        IdentityError::NotYourUser { .. } => "not_your_user",
        IdentityError::NotAllowed { .. } => "not_allowed_for_workload",
    }
}

fn unix(t: Option<SystemTime>) -> i64 {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64)
}

#[derive(Debug, Default)]
struct Labelled(Mutex<Vec<(&'static str, u64)>>);

impl Labelled {
    fn inc(&self, label: &'static str, n: u64) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match v.iter_mut().find(|(l, _)| *l == label) {
            Some((_, c)) => *c += n,
            None => v.push((label, n)),
        }
    }

    fn get(&self, label: &str) -> u64 {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.iter().find(|(l, _)| *l == label).map_or(0, |(_, c)| *c)
    }

    fn render(&self, s: &mut String, name: &str, help: &str, key: &str) {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.sort();
        for (label, n) in v {
            let _ = writeln!(s, "{name}{{{key}=\"{label}\"}} {n}");
        }
    }
}

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; LOGIN_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LOGIN_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    fn render(&self, s: &mut String, name: &str, help: &str) {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in LOGIN_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(s, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            s,
            "{name}_sum {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(s, "{name}_count {count}");
    }
}

pub fn counter(s: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
}

fn gauge(s: &mut String, name: &str, help: &str, v: f64) {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn slots_stop_at_the_limit_and_free_on_drop() {
        let m = Arc::new(Metrics::default());
        let a = m.try_acquire(2).unwrap();
        let _b = m.try_acquire(2).unwrap();
        assert!(m.try_acquire(2).is_none());
        assert_eq!(m.active(), 2);
        drop(a);
        assert!(m.try_acquire(2).is_some());
    }

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.connection("session");
        m.connection("session");
        m.connection_failed(&ConnError::Identity(IdentityError::NotYourUser {
            requested: "a".into(),
            person: "b".into(),
        }));
        m.upstream_login(Duration::from_millis(20));
        m.upstream_login(Duration::from_secs(60));
        let text = m.render();
        assert!(text.contains("rds_iam_proxy_connections_total{outcome=\"session\"} 2\n"));
        assert!(text.contains("rds_iam_proxy_connections_total{outcome=\"identity_refused\"} 1\n"));
        assert!(text.contains("rds_iam_proxy_auth_failures_total{reason=\"not_your_user\"} 1\n"));
        assert!(text.contains("rds_iam_proxy_upstream_login_seconds_bucket{le=\"0.01\"} 0\n"));
        assert!(text.contains("rds_iam_proxy_upstream_login_seconds_bucket{le=\"0.025\"} 1\n"));
        assert!(text.contains("rds_iam_proxy_upstream_login_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("rds_iam_proxy_upstream_login_seconds_count 2\n"));
    }
}
