//! The status page of the admin listener: `/` (HTML, server-rendered, no
//! script) and `/sessions` (the same data as JSON).
//!
//! [`gather`] takes one snapshot of what an operator may see: the open
//! sessions with their live numbers, the last refused logins (what the
//! client was told), the proxy's identity and when its credentials end,
//! the audit trail's health, each endpoint and whether its upstream
//! answers, and the last hour per minute. No statement text and no
//! parameter is ever on it (literals can hold personal data; the audit
//! trail is the place for statements), and nothing secret: the identity
//! shows names and ARNs, never keys or tokens.
//!
//! [`html`] renders it (with [`chart`] for the inline SVG), [`json`] as
//! JSON. Sorting is done here, from the query string, so the page needs no
//! script and a refresh keeps the order.

pub mod chart;
pub mod html;
pub mod json;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::app::{AppContext, EndpointContext};
use crate::sessions::{Minute, Refusal, SessionInfo, Snapshot};

/// How long an upstream reachability check is reused.
const REACH_TTL: Duration = Duration::from_secs(15);
/// Bound on one reachability check.
const REACH_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on asking for the identity (it may refresh credentials).
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(3);

/// One open session as shown.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub info: SessionInfo,
    pub live: Snapshot,
}

impl SessionRow {
    /// Since when the session is in its current state.
    pub fn state_since(&self) -> SystemTime {
        self.live.state_since.unwrap_or(self.info.started)
    }
}

/// Who the proxy acts for, or what a gateway trusts.
#[derive(Debug, Clone)]
pub enum IdentityView {
    Local {
        source: &'static str,
        /// `Err`: the identity cannot be had now, and why.
        who: Result<LocalIdentity, String>,
        /// The IAM Identity Center login behind the profile.
        sso: Option<SsoView>,
    },
    Gateway {
        id: String,
        sts_region: String,
        accounts: Vec<String>,
        roles: Vec<String>,
    },
}

#[derive(Debug, Clone)]
pub struct LocalIdentity {
    pub person: String,
    pub arn: String,
    pub account: String,
    /// When the AWS credentials in use expire (`None`: they do not).
    pub expires: Option<SystemTime>,
}

#[derive(Debug, Clone)]
pub struct SsoView {
    pub profile: String,
    pub expires: Option<SystemTime>,
    /// aws-config can renew it without the person.
    pub refreshable: bool,
}

#[derive(Debug, Clone)]
pub struct AuditView {
    pub mode: &'static str,
    pub dir: Option<String>,
    pub password_guard: bool,
    pub queue_depth: u64,
    pub dropped: u64,
    pub written: u64,
    pub write_errors: u64,
    /// The last write failed and the writer is retrying.
    pub failing: bool,
}

impl AuditView {
    /// One word for the page: `off`, `ok`, `dropping` or `failing`.
    pub fn health(&self) -> &'static str {
        if self.mode == "off" {
            "off"
        } else if self.failing {
            "failing"
        } else if self.dropped > 0 {
            "dropping"
        } else {
            "ok"
        }
    }
}

#[derive(Debug, Clone)]
pub struct EndpointView {
    pub name: String,
    pub upstream: String,
    pub region: String,
    pub listen: Vec<String>,
    /// Time to a verified TLS session with the upstream, or why not.
    pub reach: Result<Duration, String>,
    pub checked_at: SystemTime,
}

/// Everything the page shows, taken at `now`.
#[derive(Debug, Clone)]
pub struct Status {
    pub now: SystemTime,
    pub version: &'static str,
    /// The admin listener's address when it is not loopback.
    pub exposed_at: Option<String>,
    pub max_connections: usize,
    pub sessions: Vec<SessionRow>,
    pub refusals: Vec<Refusal>,
    pub identity: IdentityView,
    pub audit: AuditView,
    pub endpoints: Vec<EndpointView>,
    pub history: Vec<Minute>,
}

/// Column a session table is sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Conn,
    Person,
    DbUser,
    Database,
    Client,
    Tls,
    Since,
    Statements,
    BytesIn,
    BytesOut,
    State,
    For,
}

impl SortKey {
    pub const ALL: [SortKey; 12] = [
        SortKey::Conn,
        SortKey::Person,
        SortKey::DbUser,
        SortKey::Database,
        SortKey::Client,
        SortKey::Tls,
        SortKey::Since,
        SortKey::Statements,
        SortKey::BytesIn,
        SortKey::BytesOut,
        SortKey::State,
        SortKey::For,
    ];

    pub fn key(self) -> &'static str {
        match self {
            SortKey::Conn => "conn",
            SortKey::Person => "person",
            SortKey::DbUser => "db_user",
            SortKey::Database => "database",
            SortKey::Client => "client",
            SortKey::Tls => "tls",
            SortKey::Since => "since",
            SortKey::Statements => "statements",
            SortKey::BytesIn => "bytes_in",
            SortKey::BytesOut => "bytes_out",
            SortKey::State => "state",
            SortKey::For => "for",
        }
    }

    fn parse(s: &str) -> Option<SortKey> {
        SortKey::ALL.into_iter().find(|k| k.key() == s)
    }
}

/// What the query string asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub sort: SortKey,
    pub descending: bool,
    /// Seconds between refreshes of the HTML page; 0: none.
    pub refresh: u32,
}

impl Default for View {
    fn default() -> Self {
        View {
            sort: SortKey::Conn,
            descending: false,
            refresh: 5,
        }
    }
}

impl View {
    /// `sort=KEY`, `order=asc|desc`, `refresh=SECONDS` (0 to 3600); what
    /// it does not know it ignores.
    pub fn from_query(q: &str) -> View {
        let mut v = View::default();
        for pair in q.split('&') {
            let (k, val) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "sort" => {
                    if let Some(s) = SortKey::parse(val) {
                        v.sort = s;
                    }
                }
                "order" => v.descending = val == "desc",
                "refresh" => {
                    if let Ok(n) = val.parse::<u32>() {
                        v.refresh = n.min(3600);
                    }
                }
                _ => {}
            }
        }
        v
    }

    /// The query string of this view with another sort (the same column
    /// again flips the order).
    pub fn sorted_by(self, key: SortKey) -> String {
        let descending = self.sort == key && !self.descending;
        format!(
            "?sort={}&order={}&refresh={}",
            key.key(),
            if descending { "desc" } else { "asc" },
            self.refresh
        )
    }
}

/// Sorts the sessions as `view` asks; ties go by connection id.
pub fn sort(rows: &mut [SessionRow], view: View, now: SystemTime) {
    use std::cmp::Ordering;
    let by = |a: &SessionRow, b: &SessionRow| -> Ordering {
        let (ai, bi) = (&a.info, &b.info);
        match view.sort {
            SortKey::Conn => Ordering::Equal,
            SortKey::Person => ai.person.cmp(&bi.person),
            SortKey::DbUser => ai.db_user.cmp(&bi.db_user),
            SortKey::Database => ai.database.cmp(&bi.database),
            SortKey::Client => ai.client_addr.cmp(&bi.client_addr),
            SortKey::Tls => ai.client_tls.cmp(&bi.client_tls),
            SortKey::Since => ai.started.cmp(&bi.started),
            SortKey::Statements => a.live.statements.cmp(&b.live.statements),
            SortKey::BytesIn => a.live.bytes_from_client.cmp(&b.live.bytes_from_client),
            SortKey::BytesOut => a.live.bytes_to_client.cmp(&b.live.bytes_to_client),
            SortKey::State => a.live.state.as_str().cmp(b.live.state.as_str()),
            // Longest in its state first when ascending by "since".
            SortKey::For => elapsed(a.state_since(), now).cmp(&elapsed(b.state_since(), now)),
        }
        .then(ai.conn.cmp(&bi.conn))
    };
    rows.sort_by(|a, b| {
        let o = by(a, b);
        if view.descending { o.reverse() } else { o }
    });
}

/// Time from `t` to `now` (zero when `t` is later).
pub fn elapsed(t: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(t).unwrap_or_default()
}

/// Upstream checks, reused for [`REACH_TTL`] so a refreshing page does not
/// open a TLS session per endpoint every few seconds.
#[derive(Debug, Default)]
pub struct Reachability {
    last: Mutex<HashMap<String, Checked>>,
}

/// One endpoint's last check: when (monotonic and wall clock), and its
/// result.
type Checked = (Instant, SystemTime, Result<Duration, String>);

impl Reachability {
    async fn check(&self, ep: &EndpointContext) -> (Result<Duration, String>, SystemTime) {
        if let Some((at, when, r)) = self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ep.name)
            && at.elapsed() < REACH_TTL
        {
            return (r.clone(), *when);
        }
        let began = Instant::now();
        let live = ep.live();
        let r = match tokio::time::timeout(
            REACH_TIMEOUT,
            crate::upstream::connect_tls(&live.endpoint, None),
        )
        .await
        {
            Ok(Ok(_)) => Ok(began.elapsed()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no TLS session within {}s",
                REACH_TIMEOUT.as_secs()
            )),
        };
        let when = SystemTime::now();
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ep.name.clone(), (Instant::now(), when, r.clone()));
        (r, when)
    }
}

/// Takes the snapshot the page and the JSON show.
pub async fn gather(
    app: &AppContext,
    eps: &[Arc<EndpointContext>],
    reach: &Reachability,
    view: View,
) -> Status {
    let now = SystemTime::now();
    let config = app.config.load_full();
    app.sessions.sample(now);
    let mut sessions: Vec<SessionRow> = app
        .sessions
        .sessions()
        .iter()
        .map(|s| SessionRow {
            info: s.info.clone(),
            live: s.counters.snapshot(),
        })
        .collect();
    sort(&mut sessions, view, now);

    let identity = match &app.gateway {
        Some(g) => IdentityView::Gateway {
            id: g.id.clone(),
            sts_region: g.sts_region.clone(),
            accounts: g.verifier.trust.accounts.clone(),
            roles: g.verifier.trust.roles.clone(),
        },
        None => {
            let who = match tokio::time::timeout(IDENTITY_TIMEOUT, app.identity.current()).await {
                Ok(Ok((_, id))) => Ok(LocalIdentity {
                    person: id.user_name.clone(),
                    arn: id.arn.clone(),
                    account: id.account.clone(),
                    expires: id.expires,
                }),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {}s", IDENTITY_TIMEOUT.as_secs())),
            };
            let sso = app.identity.sso_login().map(|l| {
                let state = l.state();
                SsoView {
                    profile: l.profile.clone(),
                    expires: state.as_ref().and_then(|s| s.expires_at),
                    refreshable: state.is_some_and(|s| s.refreshable),
                }
            });
            IdentityView::Local {
                source: app.identity.kind().as_str(),
                who,
                sso,
            }
        }
    };

    let audit = {
        use std::sync::atomic::Ordering::Relaxed;
        let a = &app.audit;
        let stats = a.stats();
        let get = |f: fn(&crate::audit::AuditStats) -> u64| stats.map_or(0, f);
        AuditView {
            mode: match (a.config.mode, &a.sink) {
                (_, None) => "off",
                (crate::audit::Mode::Sync, _) => "sync",
                _ => "async",
            },
            dir: a.config.dir.as_ref().map(|d| d.display().to_string()),
            password_guard: a.config.password_guard,
            queue_depth: get(|s| s.queue_depth.load(Relaxed)),
            dropped: get(|s| s.dropped.load(Relaxed)),
            written: get(|s| s.written.load(Relaxed)),
            write_errors: get(|s| s.write_errors.load(Relaxed)),
            failing: a.sink.as_ref().is_some_and(|s| s.failed.load(Relaxed)),
        }
    };

    let checks = eps.iter().map(|ep| reach.check(ep));
    let results = futures_join(checks).await;
    let endpoints = eps
        .iter()
        .zip(results)
        .map(|(ep, (reach, checked_at))| {
            let listen = config
                .endpoints
                .iter()
                .find(|e| e.start.name == ep.name)
                .map(|e| {
                    let mut l: Vec<String> = e.start.listen.iter().map(|a| a.to_string()).collect();
                    if let Some(dir) = &e.start.unix_socket {
                        l.push(format!(
                            "{}/.s.PGSQL.{}",
                            dir.display(),
                            e.unix_socket_port()
                        ));
                    }
                    l
                })
                .unwrap_or_default();
            EndpointView {
                name: ep.name.clone(),
                upstream: ep.upstream_name.clone(),
                region: ep.region.clone(),
                listen,
                reach,
                checked_at,
            }
        })
        .collect();

    Status {
        now,
        version: env!("CARGO_PKG_VERSION"),
        exposed_at: config
            .start
            .admin_listen
            .filter(|a| !a.ip().is_loopback())
            .map(|a| a.to_string()),
        max_connections: config.live.max_connections,
        sessions,
        refusals: app.sessions.refusals(),
        identity,
        audit,
        endpoints,
        history: app.sessions.history(now),
    }
}

/// Runs the checks at once (each bounded), in order.
async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::State;

    fn row(conn: u64, person: &str, statements: u64) -> SessionRow {
        SessionRow {
            info: SessionInfo {
                conn,
                endpoint: "default".into(),
                person: person.into(),
                db_user: person.into(),
                database: "db".into(),
                application_name: String::new(),
                client_addr: "127.0.0.1:1".into(),
                client_tls: None,
                started: SystemTime::UNIX_EPOCH,
            },
            live: Snapshot {
                statements,
                bytes_from_client: 0,
                bytes_to_client: 0,
                state: State::Idle,
                state_since: None,
            },
        }
    }

    #[test]
    fn query_string_picks_the_order() {
        let v = View::from_query("sort=person&order=desc&refresh=0&junk");
        assert_eq!(
            v,
            View {
                sort: SortKey::Person,
                descending: true,
                refresh: 0
            }
        );
        assert_eq!(View::from_query("sort=nope"), View::default());
        // The same column again flips the order.
        assert_eq!(
            v.sorted_by(SortKey::Person),
            "?sort=person&order=asc&refresh=0"
        );
        assert_eq!(
            v.sorted_by(SortKey::Statements),
            "?sort=statements&order=asc&refresh=0"
        );
        let mut rows = vec![row(1, "bo", 5), row(2, "al", 9), row(3, "cy", 1)];
        sort(&mut rows, v, SystemTime::now());
        let people: Vec<&str> = rows.iter().map(|r| r.info.person.as_str()).collect();
        assert_eq!(people, ["cy", "bo", "al"]);
        sort(
            &mut rows,
            View::from_query("sort=statements"),
            SystemTime::now(),
        );
        let n: Vec<u64> = rows.iter().map(|r| r.live.statements).collect();
        assert_eq!(n, [1, 5, 9]);
    }
}
