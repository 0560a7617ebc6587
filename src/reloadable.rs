//! Which settings a SIGHUP applies and which only a restart does.
//!
//! Every field of [`Config`] and [`EndpointConfig`] is named below, with
//! no `..`: a new setting does not compile until it is sorted into one
//! kind or the other. A reload that changes a start-only setting is
//! refused as a whole, naming each one, and the running configuration
//! stays; nothing is reported as applied that is not.
//!
//! Applied on reload (new connections see them; sessions under way keep
//! what they started with): the timeouts, `max_connections`, the handshake bounds,
//! `max_sigterm_delay`, `admin.upstream_check`, and per endpoint the client
//! certificate, the upstream CA bundle and `connect_to`.
//!
//! Start-only: everything that is built once at start, namely the
//! endpoints, their listeners, upstream names and regions, the admin
//! address, the AWS profile and identity source, the local-user allow
//! list, `allow_remote_clients`, the gateway settings, the audit trail and
//! password guard, the log format and the session workers.

use crate::config::{AdminConfig, Config, EndpointConfig};

/// The start-only settings that differ between the running configuration
/// and `new`, by the name they have in the configuration file.
pub fn start_only_changes(running: &Config, new: &Config) -> Vec<String> {
    let Config {
        endpoints,
        profile,
        identity,
        allow_local_users,
        allow_remote_clients,
        gateway,
        audit,
        handshake_timeout: _,
        connect_timeout: _,
        login_timeout: _,
        idle_timeout: _,
        max_connections: _,
        max_handshakes: _,
        max_handshakes_per_source: _,
        max_sigterm_delay: _,
        admin,
        log_format,
        worker_threads,
        file: _,
    } = running;
    let mut changed = Vec::new();
    let mut differs = |name: &str, same: bool| {
        if !same {
            changed.push(name.to_owned());
        }
    };
    differs("profile", *profile == new.profile);
    // The identity options carry the profile too; it is named once, above.
    let mut same_identity = identity.clone();
    same_identity.profile.clone_from(&new.identity.profile);
    differs("identity", same_identity == new.identity);
    differs(
        "allow_local_users",
        *allow_local_users == new.allow_local_users,
    );
    differs("audit", *audit == new.audit);
    differs(
        "allow_remote_clients",
        *allow_remote_clients == new.allow_remote_clients,
    );
    differs("gateway", *gateway == new.gateway);
    differs(
        "admin.listen",
        admin.as_ref().map(admin_listen) == new.admin.as_ref().map(admin_listen),
    );
    differs("log_format", *log_format == new.log_format);
    differs("worker_threads", *worker_threads == new.worker_threads);
    if endpoints.len() != new.endpoints.len() {
        changed.push(format!(
            "the endpoints ({} now, {} in the new configuration)",
            endpoints.len(),
            new.endpoints.len()
        ));
    } else {
        for (a, b) in endpoints.iter().zip(&new.endpoints) {
            for key in endpoint_changes(a, b) {
                changed.push(format!("endpoint {:?}: {key}", a.name));
            }
        }
    }
    changed
}

fn admin_listen(a: &AdminConfig) -> std::net::SocketAddr {
    let AdminConfig {
        listen,
        upstream_check: _,
    } = a;
    *listen
}

fn endpoint_changes(running: &EndpointConfig, new: &EndpointConfig) -> Vec<&'static str> {
    let EndpointConfig {
        name,
        upstream_host,
        upstream_port,
        connect_to: _,
        upstream_ca: _,
        region,
        listen,
        unix_socket,
        client_tls: _,
        gateway,
    } = running;
    [
        ("name", *name == new.name),
        (
            "upstream",
            *upstream_host == new.upstream_host && *upstream_port == new.upstream_port,
        ),
        ("region", *region == new.region),
        ("listen", *listen == new.listen),
        ("unix_socket", *unix_socket == new.unix_socket),
        ("gateway", *gateway == new.gateway),
    ]
    .into_iter()
    .filter(|(_, same)| !same)
    .map(|(key, _)| key)
    .collect()
}
