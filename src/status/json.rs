//! `/sessions`: the status page's data as one JSON document (times in
//! RFC 3339 UTC, durations in seconds, bytes as numbers).

use serde_json::{Value, json};

use super::{IdentityView, Status, elapsed};
use crate::audit::event::rfc3339;

pub fn document(st: &Status) -> String {
    let t = |t: std::time::SystemTime| rfc3339(t);
    let sessions: Vec<Value> = st
        .sessions
        .iter()
        .map(|r| {
            let (i, l) = (&r.info, &r.live);
            json!({
                "conn": i.conn,
                "endpoint": i.endpoint,
                "person": i.person,
                "db_user": i.db_user,
                "database": i.database,
                "application_name": i.application_name,
                "client_addr": i.client_addr,
                "client_tls": i.client_tls,
                "since": t(i.started),
                "statements": l.statements,
                "bytes_from_client": l.bytes_from_client,
                "bytes_to_client": l.bytes_to_client,
                "state": l.state.as_str(),
                "state_since": t(r.state_since()),
                "state_seconds": elapsed(r.state_since(), st.now).as_secs_f64(),
            })
        })
        .collect();
    let refusals: Vec<Value> = st
        .refusals
        .iter()
        .map(|r| {
            json!({
                "time": t(r.time),
                "client_addr": r.client_addr,
                "db_user": r.db_user,
                "database": r.database,
                "person": r.person,
                "reason": r.reason,
                "sqlstate": r.sqlstate,
                "message": r.message,
            })
        })
        .collect();
    let identity = match &st.identity {
        IdentityView::Local { source, who, sso } => {
            let mut v = json!({ "mode": "local", "source": source });
            match who {
                Ok(id) => {
                    v["person"] = json!(id.person);
                    v["arn"] = json!(id.arn);
                    v["account"] = json!(id.account);
                    v["credentials_expire"] = json!(id.expires.map(t));
                }
                Err(e) => v["error"] = json!(e),
            }
            if let Some(l) = sso {
                v["sso"] = json!({
                    "profile": l.profile,
                    "expires": l.expires.map(t),
                    "refreshable": l.refreshable,
                });
            }
            v
        }
        IdentityView::Gateway {
            id,
            sts_region,
            accounts,
            roles,
        } => json!({
            "mode": "gateway",
            "gateway_id": id,
            "sts_region": sts_region,
            "trusted_accounts": accounts,
            "trusted_roles": roles,
        }),
    };
    let a = &st.audit;
    let endpoints: Vec<Value> = st
        .endpoints
        .iter()
        .map(|e| {
            json!({
                "name": e.name,
                "upstream": e.upstream,
                "region": e.region,
                "listen": e.listen,
                "reachable": e.reach.is_ok(),
                "tls_ms": e.reach.as_ref().ok().map(|d| d.as_secs_f64() * 1e3),
                "error": e.reach.as_ref().err(),
                "checked_at": t(e.checked_at),
            })
        })
        .collect();
    let history: Vec<Value> = st
        .history
        .iter()
        .map(|m| {
            json!({
                "minute": t(std::time::UNIX_EPOCH + std::time::Duration::from_secs(m.minute * 60)),
                "sessions_started": m.sessions,
                "statements": m.statements,
            })
        })
        .collect();
    let doc = json!({
        "taken_at": t(st.now),
        "version": st.version,
        "admin_exposed_at": st.exposed_at,
        "max_connections": st.max_connections,
        "sessions": sessions,
        "refusals": refusals,
        "identity": identity,
        "audit": {
            "health": a.health(),
            "mode": a.mode,
            "dir": a.dir,
            "password_guard": a.password_guard,
            "written": a.written,
            "queued": a.queue_depth,
            "dropped": a.dropped,
            "write_errors": a.write_errors,
        },
        "endpoints": endpoints,
        "history": history,
    });
    let mut out = serde_json::to_string_pretty(&doc).unwrap_or_default();
    out.push('\n');
    out
}
