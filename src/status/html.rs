//! The status page as HTML: one server-rendered document, a style sheet
//! in it, no script. Sorting is a link per column header (the server
//! sorts); refreshing is a `<meta http-equiv="refresh">` that keeps the
//! query string, so the order survives it. On a narrow screen each table
//! row becomes a card of label: value lines.
//!
//! Every text that came from outside (names a client sent, error texts)
//! goes through [`esc`].

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use super::{IdentityView, SortKey, Status, View, elapsed};
use crate::audit::event::rfc3339;

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;padding:0 12px 24px;max-width:1400px;color:#222}
h1{font-size:20px;margin:12px 0 4px}h2{font-size:16px;margin:20px 0 6px}
.meta{color:#555;font-size:12px}
.warn{background:#fff3cd;border:1px solid #e0b000;padding:6px 10px;margin:8px 0}
.bad{color:#b00020;font-weight:600}.ok{color:#1b5e20;font-weight:600}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #ddd;vertical-align:top}
th a{color:inherit;text-decoration:none}th a:hover{text-decoration:underline}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr.running td.state{color:#0d47a1;font-weight:600}
.empty{color:#777;font-style:italic}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0}dt{color:#555}dd{margin:0;overflow-wrap:anywhere}
.charts{display:flex;flex-wrap:wrap;gap:16px}.charts figure{flex:1 1 320px;margin:0}
figcaption{font-size:12px;color:#555}
svg.chart{width:100%;height:auto;background:#fafafa}svg.chart rect{fill:#3f6fb5}svg.chart .axis{font-size:10px;fill:#555}
@media (max-width:720px){
 table.cards thead{display:none}
 table.cards tr{display:block;border:1px solid #ddd;margin:0 0 8px;padding:4px}
 table.cards td{display:flex;justify-content:space-between;gap:12px;border:0;padding:1px 4px;text-align:right}
 table.cards td::before{content:attr(data-label);color:#555;text-align:left}
}
"#;

/// Escapes text for HTML element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// `HH:MM:SS` UTC, the full time in its tooltip.
fn time(t: SystemTime) -> String {
    let full = rfc3339(t);
    format!(
        r#"<time datetime="{full}" title="{full}">{}</time>"#,
        &full[11..19]
    )
}

/// `45 s`, `3 min 2 s`, `2 h 5 min`, `3 d 4 h`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// `512 B`, `1.5 kB`, `3.2 MB`, `1.1 GB` (powers of 1000).
pub fn bytes(n: u64) -> String {
    match n {
        0..1000 => format!("{n} B"),
        1000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.1} GB", n as f64 / 1e9),
    }
}

/// Until `t` from `now`, in words: `in 2 h 5 min` or `5 min 2 s ago`.
fn until(t: SystemTime, now: SystemTime) -> String {
    match t.duration_since(now) {
        Ok(d) => format!("in {}", duration(d)),
        Err(e) => format!("{} ago", duration(e.duration())),
    }
}

/// The whole page for `view`.
pub fn page(st: &Status, view: View) -> String {
    let mut s = String::with_capacity(16 * 1024 + st.sessions.len() * 600);
    s.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    s.push_str(r#"<meta name="viewport" content="width=device-width, initial-scale=1">"#);
    if view.refresh > 0 {
        let _ = write!(
            s,
            r#"<meta http-equiv="refresh" content="{}">"#,
            view.refresh
        );
    }
    let _ = write!(
        s,
        "<title>rds-iam-proxy: {} open</title><style>{STYLE}</style></head><body>",
        st.sessions.len()
    );
    let mode = match st.identity {
        IdentityView::Gateway { .. } => "gateway",
        IdentityView::Local { .. } => "local proxy",
    };
    let _ = write!(
        s,
        "<h1>rds-iam-proxy status</h1><p class=\"meta\">{mode}, version {}; taken at {} UTC",
        esc(st.version),
        time(st.now)
    );
    if view.refresh > 0 {
        let _ = write!(
            s,
            "; refreshes every {} s (<a href=\"?sort={}&amp;order={}&amp;refresh=0\">stop</a>)",
            view.refresh,
            view.sort.key(),
            if view.descending { "desc" } else { "asc" }
        );
    }
    s.push_str(". Also as JSON: <a href=\"/sessions\">/sessions</a>. No statement text or parameter is shown.</p>");
    if let Some(at) = &st.exposed_at {
        let _ = write!(
            s,
            "<p class=\"warn\" id=\"exposed\">This admin listener is on {}, not loopback: anyone who can reach it can read this page (who is connected, from where) and the metrics.</p>",
            esc(at)
        );
    }
    sessions(&mut s, st, view);
    charts(&mut s, st);
    refusals(&mut s, st);
    identity(&mut s, st);
    audit(&mut s, st);
    endpoints(&mut s, st);
    s.push_str("</body></html>\n");
    s
}

fn sessions(s: &mut String, st: &Status, view: View) {
    let _ = write!(
        s,
        "<h2 id=\"sessions\">Sessions: {} open (limit {})</h2>",
        st.sessions.len(),
        st.max_connections
    );
    let cols: [(SortKey, &str, bool); 12] = [
        (SortKey::Conn, "conn", true),
        (SortKey::Person, "person", false),
        (SortKey::DbUser, "database user", false),
        (SortKey::Database, "database", false),
        (SortKey::Client, "client", false),
        (SortKey::Tls, "TLS", false),
        (SortKey::Since, "since", false),
        (SortKey::Statements, "statements", true),
        (SortKey::BytesIn, "bytes in", true),
        (SortKey::BytesOut, "bytes out", true),
        (SortKey::State, "state", false),
        (SortKey::For, "for", true),
    ];
    s.push_str("<table class=\"cards\" id=\"session-table\"><thead><tr>");
    for (key, label, num) in cols {
        let arrow = match (view.sort == key, view.descending) {
            (true, false) => " ▲",
            (true, true) => " ▼",
            _ => "",
        };
        let _ = write!(
            s,
            "<th{} data-key=\"{}\"><a href=\"{}\">{label}{arrow}</a></th>",
            if num { " class=\"n\"" } else { "" },
            key.key(),
            view.sorted_by(key).replace('&', "&amp;")
        );
    }
    s.push_str("</tr></thead><tbody>");
    if st.sessions.is_empty() {
        s.push_str("<tr><td colspan=\"12\" class=\"empty\">no session open</td></tr>");
    }
    for r in &st.sessions {
        let i = &r.info;
        let l = &r.live;
        let state = l.state.as_str();
        let _ = write!(
            s,
            "<tr class=\"session {}\" data-conn=\"{}\" data-person=\"{}\">",
            state.replace(' ', "-"),
            i.conn,
            esc(&i.person)
        );
        let cell = |s: &mut String, label: &str, class: &str, v: &str| {
            let _ = write!(s, "<td data-label=\"{label}\" class=\"{class}\">{v}</td>");
        };
        cell(s, "conn", "n conn", &i.conn.to_string());
        cell(s, "person", "person", &esc(&i.person));
        cell(s, "database user", "db_user", &esc(&i.db_user));
        let db = if i.application_name.is_empty() {
            esc(&i.database)
        } else {
            format!(
                "{} <span class=\"meta\" title=\"application_name (the client's to set)\">{}</span>",
                esc(&i.database),
                esc(&i.application_name)
            )
        };
        cell(s, "database", "database", &db);
        cell(s, "client", "client", &esc(&i.client_addr));
        cell(
            s,
            "TLS",
            "tls",
            &esc(i.client_tls.as_deref().unwrap_or("no (local)")),
        );
        cell(s, "since", "since", &time(i.started));
        cell(s, "statements", "n statements", &l.statements.to_string());
        cell(s, "bytes in", "n bytes_in", &bytes(l.bytes_from_client));
        cell(s, "bytes out", "n bytes_out", &bytes(l.bytes_to_client));
        cell(s, "state", "state", state);
        cell(
            s,
            "for",
            "n for",
            &duration(elapsed(r.state_since(), st.now)),
        );
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
}

fn charts(s: &mut String, st: &Status) {
    s.push_str("<h2 id=\"history\">Last hour</h2><div class=\"charts\">");
    let _ = write!(
        s,
        "<figure>{}<figcaption>sessions started per minute</figcaption></figure>",
        super::chart::bars("sessions started per minute", &st.history, |m| m.sessions)
    );
    let _ = write!(
        s,
        "<figure>{}<figcaption>statements per minute (Query, Execute, FunctionCall)</figcaption></figure>",
        super::chart::bars("statements per minute", &st.history, |m| m.statements)
    );
    s.push_str("</div>");
}

fn refusals(s: &mut String, st: &Status) {
    let _ = write!(
        s,
        "<h2 id=\"refusals\">Refused logins: the last {}</h2>",
        st.refusals.len()
    );
    s.push_str("<table class=\"cards\" id=\"refusal-table\"><thead><tr><th>time</th><th>client</th><th>database user</th><th>database</th><th>person</th><th>reason</th><th>SQLSTATE</th><th>what the client was told</th></tr></thead><tbody>");
    if st.refusals.is_empty() {
        s.push_str("<tr><td colspan=\"8\" class=\"empty\">none since start</td></tr>");
    }
    for r in &st.refusals {
        let _ = write!(
            s,
            "<tr class=\"refusal\"><td data-label=\"time\">{}</td><td data-label=\"client\">{}</td><td data-label=\"database user\" class=\"db_user\">{}</td><td data-label=\"database\">{}</td><td data-label=\"person\">{}</td><td data-label=\"reason\" class=\"reason\">{}</td><td data-label=\"SQLSTATE\">{}</td><td data-label=\"told\">{}</td></tr>",
            time(r.time),
            esc(&r.client_addr),
            esc(r.db_user.as_deref().unwrap_or("")),
            esc(r.database.as_deref().unwrap_or("")),
            esc(r.person.as_deref().unwrap_or("")),
            esc(r.reason),
            esc(&r.sqlstate),
            esc(&r.message)
        );
    }
    s.push_str("</tbody></table>");
}

fn expiry(t: Option<SystemTime>, now: SystemTime) -> String {
    match t {
        None => "does not expire".to_owned(),
        Some(t) => {
            let class = if t <= now + crate::admin::NEAR_EXPIRY {
                "bad"
            } else {
                "ok"
            };
            format!(
                "<span class=\"{class}\">{}</span> ({})",
                esc(&rfc3339(t)),
                until(t, now)
            )
        }
    }
}

fn identity(s: &mut String, st: &Status) {
    s.push_str("<h2 id=\"identity\">Identity</h2><dl>");
    match &st.identity {
        IdentityView::Local { source, who, sso } => {
            let _ = write!(s, "<dt>source</dt><dd>{}</dd>", esc(source));
            match who {
                Ok(id) => {
                    let _ = write!(
                        s,
                        "<dt>acting for</dt><dd id=\"acting-for\">{}</dd><dt>role session</dt><dd>{}</dd><dt>account</dt><dd>{}</dd><dt>credentials expire</dt><dd id=\"credential-expiry\">{}</dd>",
                        esc(&id.person),
                        esc(&id.arn),
                        esc(&id.account),
                        expiry(id.expires, st.now)
                    );
                }
                Err(e) => {
                    let _ = write!(
                        s,
                        "<dt>acting for</dt><dd class=\"bad\">no usable identity: {}</dd>",
                        esc(e)
                    );
                }
            }
            if let Some(l) = sso {
                let _ = write!(
                    s,
                    "<dt>SSO login ({})</dt><dd>{}{}</dd>",
                    esc(&l.profile),
                    expiry(l.expires, st.now),
                    if l.refreshable {
                        ", renews itself"
                    } else {
                        ", the person must run aws sso login again"
                    }
                );
            }
        }
        IdentityView::Gateway {
            id,
            sts_region,
            accounts,
            roles,
        } => {
            let _ = write!(
                s,
                "<dt>gateway id</dt><dd>{}</dd><dt>acting for</dt><dd>each client, by its own proof (no credentials of the gateway's)</dd><dt>trusted accounts</dt><dd>{}</dd><dt>trusted roles</dt><dd>{}</dd><dt>STS region</dt><dd>{}</dd>",
                esc(id),
                esc(&accounts.join(", ")),
                esc(&roles.join(", ")),
                esc(sts_region)
            );
        }
    }
    s.push_str("</dl>");
}

fn audit(s: &mut String, st: &Status) {
    let a = &st.audit;
    let health = a.health();
    let class = match health {
        "ok" => "ok",
        "off" => "meta",
        _ => "bad",
    };
    let _ = write!(
        s,
        "<h2 id=\"audit\">Audit trail</h2><dl><dt>health</dt><dd class=\"{class}\" id=\"audit-health\">{health}</dd><dt>mode</dt><dd>{}</dd><dt>directory</dt><dd>{}</dd><dt>records written</dt><dd>{}</dd><dt>queued</dt><dd>{}</dd><dt>dropped</dt><dd>{}</dd><dt>write errors</dt><dd>{}</dd><dt>password guard</dt><dd>{}</dd></dl>",
        a.mode,
        esc(a.dir.as_deref().unwrap_or("-")),
        a.written,
        a.queue_depth,
        a.dropped,
        a.write_errors,
        if a.password_guard { "on" } else { "off" }
    );
}

fn endpoints(s: &mut String, st: &Status) {
    s.push_str("<h2 id=\"endpoints\">Endpoints</h2><table class=\"cards\" id=\"endpoint-table\"><thead><tr><th>name</th><th>listens on</th><th>upstream</th><th>region</th><th>upstream reachable</th></tr></thead><tbody>");
    for e in &st.endpoints {
        let reach = match &e.reach {
            Ok(d) => format!(
                "<span class=\"ok\">yes</span>, verified TLS in {} ms (checked {})",
                d.as_millis(),
                time(e.checked_at)
            ),
            Err(why) => format!(
                "<span class=\"bad\">no</span>: {} (checked {})",
                esc(why),
                time(e.checked_at)
            ),
        };
        let _ = write!(
            s,
            "<tr class=\"endpoint\"><td data-label=\"name\">{}</td><td data-label=\"listens on\">{}</td><td data-label=\"upstream\">{}</td><td data-label=\"region\">{}</td><td data-label=\"reachable\" class=\"reach\">{reach}</td></tr>",
            esc(&e.name),
            esc(&e.listen.join(", ")),
            esc(&e.upstream),
            esc(&e.region)
        );
    }
    s.push_str("</tbody></table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_clients_cannot_make_markup() {
        assert_eq!(
            esc("<script>alert('x')</script>&\"\n"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;\u{fffd}"
        );
    }

    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(duration(Duration::from_secs(45)), "45 s");
        assert_eq!(duration(Duration::from_secs(182)), "3 min 2 s");
        assert_eq!(duration(Duration::from_secs(7500)), "2 h 5 min");
        assert_eq!(duration(Duration::from_secs(3 * 86400 + 7200)), "3 d 2 h");
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1500), "1.5 kB");
        assert_eq!(bytes(3_210_000), "3.2 MB");
    }
}
