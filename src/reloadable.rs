//! What a SIGHUP may change, and what a refused reload says.
//!
//! The split is in the type: [`Config::start`] and each endpoint's `start`
//! are built once at start-up; [`Config::live`] and each endpoint's `live`
//! are what a reload swaps in (new connections see them; sessions under
//! way keep what they started with). A new configuration whose start-only
//! halves differ from the running ones is refused as a whole, and the
//! running configuration stays: nothing is reported as applied that is not.
//!
//! The refusal names each changed setting by its key in the configuration
//! file, and the names come from the file's schema, not from a list kept
//! here: the running configuration with the new start-only halves put in
//! is written out ([`Config::to_file`]) and compared with the running one
//! key by key, so only start-only keys can differ. The few start-only
//! settings a file cannot hold (command line and environment only) are
//! named below.

use crate::config::{Config, EndpointConfig};

/// The start-only settings that differ between the running configuration
/// and `new`, by the name they have in the configuration file (empty: the
/// reload may go ahead).
pub fn start_only_changes(running: &Config, new: &Config) -> Vec<String> {
    let same_count = running.endpoints.len() == new.endpoints.len();
    if running.start == new.start
        && same_count
        && running
            .endpoints
            .iter()
            .zip(&new.endpoints)
            .all(|(a, b)| a.start == b.start)
    {
        return Vec::new();
    }
    let mut changed = Vec::new();
    let (old_start, new_start) = (&running.start, &new.start);
    // Not in the file: a reload re-reads the same command line, so these
    // change only when a test or a caller builds the configuration anew.
    let mut same_identity = old_start.identity.clone();
    same_identity
        .profile
        .clone_from(&new_start.identity.profile);
    for (name, same) in [
        ("identity", same_identity == new_start.identity),
        (
            "allow_local_users",
            old_start.allow_local_users == new_start.allow_local_users,
        ),
        (
            "worker_threads",
            old_start.worker_threads == new_start.worker_threads,
        ),
    ] {
        if !same {
            changed.push(name.to_owned());
        }
    }
    let endpoints = if same_count {
        running
            .endpoints
            .iter()
            .zip(&new.endpoints)
            .map(|(old, new)| EndpointConfig {
                start: new.start.clone(),
                live: old.live.clone(),
            })
            .collect()
    } else {
        running.endpoints.clone()
    };
    let candidate = Config {
        start: new.start.clone(),
        live: running.live.clone(),
        endpoints,
        file: running.file.clone(),
    };
    let (Ok(before), Ok(after)) = (
        toml::Table::try_from(running.to_file()),
        toml::Table::try_from(candidate.to_file()),
    ) else {
        changed.push("the start-only settings".into());
        return changed;
    };
    differing_keys(&before, &after, "", &mut changed);
    if !same_count {
        changed.retain(|k| !k.starts_with("endpoint"));
        changed.push(format!(
            "the endpoints ({} now, {} in the new configuration)",
            running.endpoints.len(),
            new.endpoints.len()
        ));
    }
    if changed.is_empty() {
        // The halves differ in something the file does not show: say so
        // rather than apply it.
        changed.push("the start-only settings".into());
    }
    changed
}

/// Keys whose values differ, in the file's order: top-level tables by
/// dotted name (`audit`, `admin.listen`), `[[endpoint]]` tables by the
/// endpoint's name.
fn differing_keys(a: &toml::Table, b: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    let mut keys: Vec<&String> = a.keys().collect();
    keys.extend(b.keys().filter(|k| !a.contains_key(*k)));
    for key in keys {
        let (x, y) = (a.get(key), b.get(key));
        if x == y {
            continue;
        }
        match (key.as_str(), x, y) {
            ("endpoint", Some(toml::Value::Array(xs)), Some(toml::Value::Array(ys))) => {
                for (x, y) in xs.iter().zip(ys) {
                    if let (Some(x), Some(y)) = (x.as_table(), y.as_table()) {
                        let name = x.get("name").and_then(toml::Value::as_str).unwrap_or("?");
                        differing_keys(x, y, &format!("endpoint {name:?}: "), out);
                    }
                }
            }
            // The audit trail and gateway are built as a whole: named as
            // one, as the operator thinks of them.
            ("audit" | "gateway", _, _) if prefix.is_empty() => out.push(key.clone()),
            (_, Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                differing_keys(x, y, &format!("{prefix}{key}."), out);
            }
            _ => out.push(format!("{prefix}{key}")),
        }
    }
}
