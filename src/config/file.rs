//! The configuration file's schema, both ways: [`FileConfig`] is what
//! `--config` reads, and [`Config::to_file`] fills the same structs so
//! that [`Config::render`] (`--check-config`) writes a file that reads
//! back to the same configuration.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ClientTls, Config, ConfigError, EndpointConfig};
use crate::tls::UpstreamCa;

/// The TOML file. Every table denies unknown keys so a typo is an error,
/// not a silently ignored setting.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub region: Option<String>,
    pub profile: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub handshake_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub login_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub max_handshakes: Option<usize>,
    pub max_handshakes_per_source: Option<usize>,
    pub max_sigterm_delay: Option<String>,
    pub log_format: Option<String>,
    pub admin: Option<AdminFile>,
    pub audit: Option<AuditFile>,
    pub allow_remote_clients: Option<bool>,
    pub gateway: Option<crate::gateway::config::GatewayFile>,
    #[serde(default)]
    pub endpoint: Vec<EndpointFile>,
}

/// The `[audit]` table: the `--audit-*` flags without their prefix.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    pub mode: Option<String>,
    pub dir: Option<PathBuf>,
    pub parameters: Option<bool>,
    pub stamp_application_name: Option<bool>,
    pub max_statement: Option<usize>,
    pub rotate_size: Option<u64>,
    pub rotate_age: Option<String>,
    pub sign_key: Option<String>,
    pub digest_interval: Option<String>,
    pub s3_bucket: Option<String>,
    pub s3_prefix: Option<String>,
    pub s3_lock_mode: Option<String>,
    pub s3_retention: Option<String>,
    pub kinesis_stream: Option<String>,
    pub instance_id: Option<String>,
    pub spool_max: Option<u64>,
    pub role_arn: Option<String>,
    pub queue: Option<usize>,
    pub allow_password_changes: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub listen: String,
    pub upstream_check: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    pub name: Option<String>,
    pub upstream: Option<String>,
    pub listen: Option<Vec<String>>,
    pub unix_socket: Option<PathBuf>,
    pub connect_to: Option<String>,
    pub upstream_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub region: Option<String>,
    pub gateway: Option<String>,
    pub gateway_id: Option<String>,
    pub gateway_ca: Option<PathBuf>,
}

pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::ParseFile {
        path: path.display().to_string(),
        message: e.to_string().trim_end().to_owned(),
    })
}

impl Config {
    /// The effective configuration as a TOML file (valid input for
    /// `--config`): [`Config::to_file`] written by the same schema that
    /// reads it, under comments for what a file cannot say. Nothing secret
    /// is held in the configuration: keys are files, shown by path.
    pub fn render(&self) -> String {
        let mut s = String::from("# effective configuration of rds-iam-proxy\n");
        let start = &self.start;
        let mut note = |line: String| {
            s.push_str("# ");
            s.push_str(&line);
            s.push('\n');
        };
        note(format!(
            "worker_threads: {} (--worker-threads or RDS_IAM_PROXY_WORKER_THREADS only)",
            start.worker_threads
        ));
        if self.live.idle_timeout.is_none() {
            note("idle_timeout: off".into());
        }
        if start.admin_listen.is_none() {
            note("admin listener: off".into());
        }
        for e in &self.endpoints {
            if e.start.region.is_none() {
                note(format!(
                    "endpoint {:?}: region from the AWS configuration",
                    e.start.name
                ));
            }
            let ca = match e.live.upstream_ca {
                UpstreamCa::RdsBundle => "the embedded Amazon RDS bundle",
                UpstreamCa::System => "the system's trust store",
                UpstreamCa::File(_) => continue,
            };
            note(format!("endpoint {:?}: upstream CA: {ca}", e.start.name));
        }
        s.push('\n');
        // The file schema writes every value it can read back: a failure
        // here is a bug, and is said in the output, not hidden.
        match toml::to_string(&self.to_file()) {
            Ok(body) => s.push_str(&body),
            Err(e) => {
                let _ = writeln!(s, "# cannot render the configuration: {e}");
            }
        }
        s
    }

    /// The configuration in the file's schema ([`FileConfig`]), every
    /// setting a file can hold written out, defaults included.
    pub fn to_file(&self) -> FileConfig {
        let (start, live) = (&self.start, &self.live);
        let a = &start.audit;
        // One directory for every endpoint's local CA (merge gives them all
        // the same): said once at the top, or a reload of this text would
        // fall back to the default.
        let state_dir = self
            .endpoints
            .iter()
            .find_map(|e| match &e.live.client_tls {
                ClientTls::Local { state_dir } => Some(state_dir.clone()),
                ClientTls::Files { .. } => None,
            });
        FileConfig {
            region: None,
            profile: start.profile.clone(),
            state_dir,
            handshake_timeout: Some(duration_text(live.handshake_timeout)),
            connect_timeout: Some(duration_text(live.connect_timeout)),
            login_timeout: Some(duration_text(live.login_timeout)),
            idle_timeout: live.idle_timeout.map(duration_text),
            max_connections: Some(live.max_connections),
            max_handshakes: Some(live.max_handshakes),
            max_handshakes_per_source: Some(live.max_handshakes_per_source),
            max_sigterm_delay: Some(duration_text(live.max_sigterm_delay)),
            log_format: Some(value_name(&start.log_format)),
            admin: start.admin_listen.map(|l| AdminFile {
                listen: l.to_string(),
                upstream_check: Some(live.admin_upstream_check),
            }),
            audit: Some(AuditFile {
                mode: Some(value_name(&a.mode)),
                dir: a.dir.clone(),
                parameters: Some(a.parameters),
                stamp_application_name: Some(a.stamp_application_name),
                max_statement: Some(a.max_statement_bytes),
                rotate_size: Some(a.rotate_bytes / (1024 * 1024)),
                rotate_age: Some(duration_text(a.rotate_age)),
                queue: Some(a.queue_capacity),
                allow_password_changes: Some(!a.password_guard),
                sign_key: a.sign_key.as_ref().map(ToString::to_string),
                digest_interval: Some(duration_text(a.digest_interval)),
                s3_bucket: a.ship.s3_bucket.clone(),
                s3_prefix: Some(a.ship.s3_prefix.clone()),
                s3_lock_mode: a.ship.s3_lock.map(|(m, _)| value_name(&m)),
                s3_retention: a.ship.s3_lock.map(|(_, d)| duration_text(d)),
                kinesis_stream: a.ship.kinesis_stream.clone(),
                instance_id: Some(a.ship.instance_id.clone()),
                spool_max: Some(a.ship.spool_max_bytes >> 20),
                role_arn: a.role_arn.clone(),
            }),
            allow_remote_clients: start.allow_remote_clients.then_some(true),
            gateway: start.gateway.as_ref().map(crate::gateway::config::to_file),
            endpoint: self.endpoints.iter().map(EndpointConfig::to_file).collect(),
        }
    }
}

impl EndpointConfig {
    /// This endpoint as an `[[endpoint]]` table.
    fn to_file(&self) -> EndpointFile {
        let (start, live) = (&self.start, &self.live);
        let file = |ca: &UpstreamCa| match ca {
            UpstreamCa::File(p) => Some(p.clone()),
            UpstreamCa::RdsBundle | UpstreamCa::System => None,
        };
        let (tls_cert, tls_key) = match &live.client_tls {
            ClientTls::Files { cert, key } => (Some(cert.clone()), Some(key.clone())),
            // The local CA's directory is the top-level state_dir.
            ClientTls::Local { .. } => (None, None),
        };
        EndpointFile {
            name: Some(start.name.clone()),
            upstream: Some(self.upstream_name()),
            listen: Some(start.listen.iter().map(ToString::to_string).collect()),
            unix_socket: start.unix_socket.clone(),
            connect_to: live.connect_to.clone(),
            upstream_ca: file(&live.upstream_ca),
            tls_cert,
            tls_key,
            region: start.region.clone(),
            gateway: start
                .gateway
                .as_ref()
                .map(|g| format!("{}:{}", g.host, g.port)),
            gateway_id: start.gateway.as_ref().map(|g| g.id.clone()),
            gateway_ca: start.gateway.as_ref().and_then(|g| file(&g.ca)),
        }
    }
}

/// A duration the way the file writes it: `"30s"`, or `"1500ms"`.
pub(crate) fn duration_text(d: Duration) -> String {
    if d.subsec_millis() != 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

/// A clap value enum by the name its flag takes.
fn value_name(v: &impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}
