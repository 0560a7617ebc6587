//! The command line. Every flag also reads an `RDS_IAM_PROXY_*` variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::identity::{IdentityOptions, OptionsError, SourceKind};

/// A PostgreSQL proxy for Amazon Aurora / RDS IAM database authentication.
///
/// Clients connect with no password. The proxy learns who you are from
/// your AWS session, refuses any database user that is not yours, signs a
/// fresh 15-minute IAM token for every connection, connects to the cluster
/// over verified TLS and forwards the PostgreSQL protocol.
///
/// Without a subcommand, runs the proxy.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "rds-iam-proxy",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub proxy: ProxyArgs,
}

/// Commands besides running the proxy.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Print an IAM auth token, like `aws rds generate-db-auth-token`, after
    /// the same identity check the proxy makes.
    Token(TokenArgs),
    /// Show who the proxy would act for: identity source, user name, ARN,
    /// account and when the credentials expire.
    Whoami(WhoamiArgs),
    /// Print the IAM policy and the SQL that IAM database authentication
    /// through this proxy needs.
    Policy(PolicyArgs),
    /// Run a command (psql by default) through a private proxy on a unix
    /// socket, with PGHOST/PGPORT/PGUSER set for it; exits with its status.
    Connect(ConnectArgs),
    /// Check credentials, identity, region, DNS, reachability, TLS and token
    /// signing in order, and print what to fix.
    Doctor(DoctorArgs),
    /// Work with audit log files.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Run as a gateway shared by several people (a bastion): each client
    /// proves who they are with their own AWS session (see
    /// `gateway-password`), and logs in with a token they signed
    /// themselves. Takes the proxy's flags and those under "Gateway mode".
    Gateway(GatewayCommand),
    /// Print a fresh proof of your AWS identity for a gateway, to use as
    /// the password of one connection (PGPASSWORD) through it.
    GatewayPassword(GatewayPasswordArgs),
    /// Read an Aurora Database Activity Stream: every event with the
    /// person behind it, and a reconciliation with the audit trail.
    #[command(subcommand)]
    Das(DasCommand),
}

/// `rds-iam-proxy das ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum DasCommand {
    /// Print every activity event as it arrives (all shards, in order
    /// across splits and merges), decrypted, heartbeats dropped; with
    /// --audit-dir, each names the person behind its session. Stops at
    /// Ctrl-C / SIGTERM; exits 1 if any record could not be opened.
    Tail(DasTailArgs),
    /// Account for a time window: each stream session matched to a proxy
    /// session or reported as not through the proxy, statements one side
    /// has and the other lacks, and a summary per person. Exits 1 when
    /// anything is unexplained.
    Reconcile(DasReconcileArgs),
}

/// What both `das` commands read.
#[derive(Debug, Clone, Args)]
pub struct DasStreamArgs {
    /// The cluster's resource id (`cluster-...`, DbClusterResourceId): the
    /// stream's name and the data keys' encryption context.
    #[arg(long, env = "RDS_IAM_PROXY_CLUSTER_RESOURCE_ID", value_name = "ID")]
    pub cluster_resource_id: String,

    /// The Kinesis stream [default: aws-rds-das-<cluster resource id>].
    #[arg(long, value_name = "NAME")]
    pub stream: Option<String>,

    /// AWS region of the stream and key [default: the AWS configuration].
    #[arg(long, env = "RDS_IAM_PROXY_REGION")]
    pub region: Option<String>,

    /// AWS profile [default: AWS_PROFILE, else the standard chain].
    #[arg(long, env = "RDS_IAM_PROXY_PROFILE")]
    pub profile: Option<String>,

    /// Send the Kinesis and KMS calls here instead of AWS's endpoints (a
    /// VPC endpoint, or a test double) [default: the SDK's, which also
    /// reads AWS_ENDPOINT_URL].
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,

    /// How often an idle shard is asked again.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub poll_interval: Duration,

    /// json (one object per line: every DAS field, plus `person` and the
    /// proxy's fields) or text (aligned columns) [default: text on a
    /// terminal, else json].
    #[arg(long, value_enum)]
    pub format: Option<crate::das::tail::Format>,
}

/// `rds-iam-proxy das tail`.
#[derive(Debug, Clone, Args)]
pub struct DasTailArgs {
    #[command(flatten)]
    pub stream: DasStreamArgs,

    /// Where to start on a shard the checkpoint does not know: latest,
    /// trim-horizon (the oldest kept, 24 h), a time (2026-12-07T09:00:00Z)
    /// or a duration ago (15m).
    #[arg(long, default_value = "latest", value_name = "WHEN")]
    pub from: String,

    /// The proxy's audit directory: name the person behind each event.
    #[arg(long, value_name = "DIR")]
    pub audit_dir: Option<PathBuf>,

    /// Resume where the last run with this file stopped, and keep it up to
    /// date: no event is lost or printed twice across restarts.
    #[arg(long, value_name = "FILE")]
    pub checkpoint: Option<PathBuf>,
}

/// `rds-iam-proxy das reconcile`.
#[derive(Debug, Clone, Args)]
pub struct DasReconcileArgs {
    #[command(flatten)]
    pub stream: DasStreamArgs,

    /// The proxy's audit directory.
    #[arg(long, value_name = "DIR")]
    pub audit_dir: PathBuf,

    /// Start of the window: a time (2026-12-07T09:00:00Z) or a duration
    /// ago (1h).
    #[arg(long, value_name = "WHEN")]
    pub from: String,

    /// End of the window [default: now].
    #[arg(long, value_name = "WHEN")]
    pub to: Option<String>,
}

/// `rds-iam-proxy gateway`.
#[derive(Debug, Clone, Args)]
pub struct GatewayCommand {
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

/// `rds-iam-proxy gateway-password`.
#[derive(Debug, Clone, Args)]
pub struct GatewayPasswordArgs {
    #[command(flatten)]
    pub token: TokenArgs,

    /// The gateway's id: the name you reach it by, unless its operator
    /// says otherwise.
    #[arg(long, env = "RDS_IAM_PROXY_GATEWAY_ID", value_name = "ID")]
    pub gateway_id: String,

    /// The region whose STS the gateway asks [default: the endpoint's
    /// region].
    #[arg(long, env = "RDS_IAM_PROXY_STS_REGION", value_name = "REGION")]
    pub sts_region: Option<String>,
}

/// `rds-iam-proxy whoami`.
#[derive(Debug, Clone, Args)]
pub struct WhoamiArgs {
    #[command(flatten)]
    pub aws: AwsArgs,
}

/// `rds-iam-proxy policy`.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// The cluster's resource id (`cluster-ABCDEFGHIJKL...`, shown by
    /// `aws rds describe-db-clusters` as DbClusterResourceId).
    #[arg(long, value_name = "ID")]
    pub cluster_resource_id: String,

    /// Region of the cluster (`*` if not given).
    #[arg(long)]
    pub region: Option<String>,

    /// Account id of the cluster (`*` if not given).
    #[arg(long)]
    pub account: Option<String>,

    /// Database users to write the SQL for [default: a placeholder].
    #[arg(long = "user", value_name = "USER")]
    pub users: Vec<String>,
}

/// `rds-iam-proxy connect`.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub proxy: ProxyArgs,

    /// The command and its arguments [default: psql].
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

/// `rds-iam-proxy doctor`.
#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub proxy: ProxyArgs,
}

/// `rds-iam-proxy audit ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of audit files (oldest first) and, with
    /// --public-key, the signed digests. A directory means all its audit
    /// files: one proxy instance's trail. Several directories (a fleet) are
    /// checked one by one. Exits 1 and says what is wrong and where.
    Verify {
        #[arg(required = true, value_name = "FILE|DIR")]
        files: Vec<PathBuf>,

        /// The digests' public key (PEM), obtained apart from the trail
        /// (a copy in the trail's directory proves nothing): every digest
        /// must verify with it, and the files must be what they signed.
        #[arg(long, value_name = "PEM")]
        public_key: Option<PathBuf>,
    },
    /// Find statements: who ran what, where, when and how it ended. Reads
    /// every file of the directory in order, rotated and live, and checks
    /// the hash chain as it goes (a break is reported on stderr and the
    /// exit status is 1; the search goes on).
    Search(AuditSearchArgs),
    /// Follow the live audit file, like tail -f: each statement once its
    /// outcome is written (or its session ends), checking the chain.
    /// Stops at Ctrl-C.
    Tail(AuditTailArgs),
}

/// Which statements `audit search` and `audit tail` show.
#[derive(Debug, Clone, Args)]
pub struct AuditFilterArgs {
    /// The proxy's audit directory (--audit-dir of the proxy).
    #[arg(long, value_name = "DIR")]
    pub audit_dir: PathBuf,

    /// Only this person's sessions (the IdP / Identity Center user name).
    #[arg(long, value_name = "PERSON")]
    pub person: Option<String>,

    /// Only sessions as this database user.
    #[arg(long, value_name = "USER")]
    pub db_user: Option<String>,

    /// Only sessions on this database.
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,

    /// Only statements whose text contains TEXT (case-sensitive).
    #[arg(long, value_name = "TEXT")]
    pub grep: Option<String>,

    /// Only statements that ended this way.
    #[arg(long, value_enum)]
    pub outcome: Option<crate::audit::search::OutcomeKind>,

    /// table (aligned columns: time, person, database, outcome, duration,
    /// statement) or json (one object per line) [default: table on a
    /// terminal, else json].
    #[arg(long, value_enum)]
    pub format: Option<AuditFormat>,
}

/// How `audit search` and `audit tail` print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditFormat {
    Table,
    Json,
}

/// `rds-iam-proxy audit search`.
#[derive(Debug, Clone, Args)]
pub struct AuditSearchArgs {
    #[command(flatten)]
    pub filter: AuditFilterArgs,

    /// Only the last DURATION (15m, 1h, 7d) [default: everything].
    #[arg(long, value_name = "DURATION", conflicts_with_all = ["from", "to"])]
    pub since: Option<String>,

    /// Statements from this time (2026-12-07T09:00:00Z, or a duration
    /// ago: 24h).
    #[arg(long, value_name = "WHEN")]
    pub from: Option<String>,

    /// Statements before this time [default: now].
    #[arg(long, value_name = "WHEN")]
    pub to: Option<String>,
}

/// `rds-iam-proxy audit tail`.
#[derive(Debug, Clone, Args)]
pub struct AuditTailArgs {
    #[command(flatten)]
    pub filter: AuditFilterArgs,

    /// How often the file is looked at for new records.
    #[arg(long, default_value = "250ms", value_parser = parse_duration, value_name = "DURATION")]
    pub poll_interval: Duration,
}

/// AWS identity options shared by the proxy and the subcommands.
#[derive(Debug, Clone, Args)]
pub struct AwsArgs {
    /// AWS region for signing [default: from the endpoint name
    /// (*.REGION.rds.amazonaws.com), else the AWS configuration].
    #[arg(long, env = "RDS_IAM_PROXY_REGION")]
    pub region: Option<String>,

    /// AWS profile (SSO profiles included) [default: AWS_PROFILE, else the
    /// standard credential chain].
    #[arg(long, env = "RDS_IAM_PROXY_PROFILE")]
    pub profile: Option<String>,

    /// Where the person's identity comes from: `sso` (IAM Identity Center
    /// session; user name = Identity Center user name), `saml` (the proxy
    /// calls AssumeRoleWithSAML; user name = PrincipalTag:userName) or
    /// `workload` (an application's role; only --allow-db-user users).
    #[arg(long, env = "RDS_IAM_PROXY_IDENTITY_SOURCE", value_enum, default_value_t = SourceKind::Sso)]
    pub identity_source: SourceKind,

    /// Workload only: a database user the workload may use; repeat for
    /// several. No other user is allowed.
    #[arg(
        long,
        env = "RDS_IAM_PROXY_ALLOW_DB_USER",
        value_name = "USER",
        value_delimiter = ','
    )]
    pub allow_db_user: Vec<String>,

    /// SAML only: file holding the base64 SAML response (re-read whenever
    /// credentials are renewed); `-` reads it once from stdin.
    #[arg(long, env = "RDS_IAM_PROXY_SAML_ASSERTION_FILE", value_name = "FILE")]
    pub saml_assertion_file: Option<PathBuf>,

    /// SAML only: name of an environment variable holding the base64 SAML
    /// response (read once at start-up).
    #[arg(long, env = "RDS_IAM_PROXY_SAML_ASSERTION_ENV", value_name = "VAR")]
    pub saml_assertion_env: Option<String>,

    /// SAML only: the role ARN to assume when the assertion offers several.
    #[arg(long, env = "RDS_IAM_PROXY_SAML_ROLE", value_name = "ROLE_ARN")]
    pub saml_role: Option<String>,
}

impl AwsArgs {
    /// The identity source these flags describe. Reads stdin or the named
    /// variable only when the SAML flags ask for it.
    pub fn identity_options(&self) -> Result<IdentityOptions, OptionsError> {
        IdentityOptions::new(
            self.identity_source,
            self.profile.clone(),
            self.allow_db_user.clone(),
            self.saml_assertion_file.clone(),
            self.saml_assertion_env
                .as_ref()
                .map(|v| (v.clone(), std::env::var(v).ok())),
            self.saml_role.clone(),
            || std::io::read_to_string(std::io::stdin()),
        )
    }
}

/// `rds-iam-proxy token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The endpoint name the token is for. Port 5432 unless given.
    #[arg(long, env = "RDS_IAM_PROXY_UPSTREAM", value_name = "HOST[:PORT]")]
    pub upstream: String,

    /// Database user [default: your own user name; any other is refused].
    #[arg(long)]
    pub user: Option<String>,

    #[command(flatten)]
    pub aws: AwsArgs,
}

/// The proxy's own options.
#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// TOML configuration file. Flags and RDS_IAM_PROXY_* variables override
    /// its values; see docs/configuration.md.
    #[arg(long, env = "RDS_IAM_PROXY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Validate the configuration, print the effective one and exit.
    #[arg(long)]
    pub check_config: bool,

    /// The Aurora/RDS endpoint name: tokens are signed for it and the
    /// server certificate must name it. Port 5432 unless given. Required.
    #[arg(long, env = "RDS_IAM_PROXY_UPSTREAM", value_name = "HOST[:PORT]")]
    pub upstream: Option<String>,

    /// Address to listen on; repeat for several. Plaintext is accepted only
    /// on loopback addresses.
    #[arg(
        long,
        env = "RDS_IAM_PROXY_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:5432",
        value_delimiter = ','
    )]
    pub listen: Vec<SocketAddr>,

    /// Also listen on a unix socket DIR/.s.PGSQL.<port> (port of the first
    /// --listen address, 5432 if that is 0), so `psql -h DIR` works.
    #[arg(long, env = "RDS_IAM_PROXY_UNIX_SOCKET", value_name = "DIR")]
    pub unix_socket: Option<PathBuf>,

    /// Dial this HOST:PORT instead of resolving the upstream name (SSH or
    /// SSM tunnels); tokens and TLS still use the upstream name.
    #[arg(long, env = "RDS_IAM_PROXY_CONNECT_TO", value_name = "HOST:PORT")]
    pub connect_to: Option<String>,

    /// Reach the cluster through this rds-iam-proxy gateway (HOST:PORT, a
    /// shared bastion) instead of dialling it: each connection proves who
    /// you are to the gateway with your own AWS session, and the token is
    /// still signed here, by you. Every local check stays.
    #[arg(long, env = "RDS_IAM_PROXY_GATEWAY", value_name = "HOST:PORT")]
    pub gateway: Option<String>,

    /// PEM bundle of CAs trusted for the gateway's certificate [default:
    /// the system's trust store].
    #[arg(long, env = "RDS_IAM_PROXY_GATEWAY_CA", value_name = "PEM")]
    pub gateway_ca: Option<PathBuf>,

    /// PEM bundle of CAs trusted for the upstream certificate [default:
    /// the Amazon RDS global bundle built into the binary].
    #[arg(long, env = "RDS_IAM_PROXY_UPSTREAM_CA", value_name = "PEM")]
    pub upstream_ca: Option<PathBuf>,

    #[command(flatten)]
    pub aws: AwsArgs,

    /// Another local OS user (name or uid) that may connect over loopback
    /// TCP or the unix socket; repeat for several, or `any`. By default only
    /// the OS user running the proxy may, since every connection acts as
    /// the proxy's AWS identity.
    #[arg(
        long,
        env = "RDS_IAM_PROXY_ALLOW_LOCAL_USER",
        value_name = "USER",
        value_delimiter = ','
    )]
    pub allow_local_user: Vec<String>,

    #[command(flatten)]
    pub audit: AuditArgs,

    #[command(flatten)]
    pub gateway_server: crate::gateway::config::GatewayArgs,

    /// Set by `rds-iam-proxy gateway`, never by a flag.
    #[arg(skip)]
    pub gateway_mode: bool,

    /// Serve clients that connect from other hosts (a --listen address
    /// that is not loopback). Each of them acts as this proxy's AWS
    /// identity, with no check of who they are: only for a sidecar whose
    /// network only its application reaches. For a proxy that several
    /// people share, run `rds-iam-proxy gateway` instead.
    #[arg(long, env = "RDS_IAM_PROXY_ALLOW_REMOTE_CLIENTS")]
    pub allow_remote_clients: bool,

    /// Certificate chain (PEM) shown to clients [default: a local CA and
    /// localhost certificate made on first run in the state directory].
    #[arg(
        long,
        env = "RDS_IAM_PROXY_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) for --tls-cert.
    #[arg(
        long,
        env = "RDS_IAM_PROXY_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Where the generated local CA lives [default:
    /// $XDG_STATE_HOME/rds-iam-proxy or ~/.local/state/rds-iam-proxy].
    #[arg(long, env = "RDS_IAM_PROXY_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Time a client has to finish TLS and send its startup packet.
    #[arg(long, env = "RDS_IAM_PROXY_HANDSHAKE_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Time allowed for the TCP connection to the upstream.
    #[arg(long, env = "RDS_IAM_PROXY_CONNECT_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Time allowed for the whole upstream login (TLS, token, greeting).
    #[arg(long, env = "RDS_IAM_PROXY_LOGIN_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub login_timeout: Duration,

    /// Most client connections at once; beyond it clients get FATAL 53300
    /// at once.
    #[arg(
        long,
        env = "RDS_IAM_PROXY_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 500
    )]
    pub max_connections: usize,

    /// Most connections at once that have not yet sent their startup
    /// packet (TLS and startup under way); beyond it a new socket is
    /// closed at once. Counted apart from sessions, so idle sockets cannot
    /// take their places.
    #[arg(
        long,
        env = "RDS_IAM_PROXY_MAX_HANDSHAKES",
        value_name = "N",
        default_value_t = 256
    )]
    pub max_handshakes: usize,

    /// Most handshakes at once from one remote address (loopback and unix
    /// clients count toward --max-handshakes only).
    #[arg(
        long,
        env = "RDS_IAM_PROXY_MAX_HANDSHAKES_PER_SOURCE",
        value_name = "N",
        default_value_t = 32
    )]
    pub max_handshakes_per_source: usize,

    /// End sessions with no traffic either way for this long (57P05); off
    /// unless given (0 also means off). Checked at this granularity: a session ends between
    /// one and two periods of silence.
    #[arg(long, env = "RDS_IAM_PROXY_IDLE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,

    /// After SIGTERM/SIGINT, time sessions get to finish before they are
    /// ended with FATAL 57P01.
    #[arg(long, env = "RDS_IAM_PROXY_MAX_SIGTERM_DELAY", value_name = "DURATION", default_value = "20s", value_parser = parse_duration)]
    pub max_sigterm_delay: Duration,

    /// Serve the status page (/ and /sessions: who is connected, refused
    /// logins, credential expiry) and /startup, /liveness, /readiness and
    /// /metrics over HTTP on this address (a bare port means
    /// 127.0.0.1:PORT; keep it on loopback: the page names people and
    /// their addresses) [default: off].
    #[arg(long, env = "RDS_IAM_PROXY_ADMIN_LISTEN", value_name = "ADDR|PORT")]
    pub admin_listen: Option<String>,

    /// /readiness also opens TCP+TLS to each upstream.
    #[arg(long, env = "RDS_IAM_PROXY_ADMIN_UPSTREAM_CHECK")]
    pub admin_upstream_check: bool,

    /// Log format on stderr.
    #[arg(long, env = "RDS_IAM_PROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Threads that carry client sessions, each with its own event loop
    /// [default: half the CPUs, at least one]; the main thread only
    /// accepts, answers the admin listener and handles signals. One worker
    /// is one core's worth: about 25,000 round trips a second at the 37-43
    /// us of CPU each measured in docs/PERFORMANCE.md; raise this when the
    /// proxy keeps a whole core busy. Command line and environment only,
    /// read once at start-up.
    #[arg(long, env = "RDS_IAM_PROXY_WORKER_THREADS", value_name = "N")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
}

/// The audit log and the password guard.
#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Audit log mode: off; async (a bounded queue, forwarding never
    /// waits, a full queue drops records and counts them); sync (each
    /// statement is forwarded only after its record is fsynced, and refused
    /// if the log cannot be written).
    #[arg(long = "audit-mode", env = "RDS_IAM_PROXY_AUDIT_MODE", value_enum, default_value_t = crate::audit::Mode::Off, value_name = "MODE")]
    pub mode: crate::audit::Mode,

    /// Directory for the audit files (required with --audit-mode async|sync).
    #[arg(
        long = "audit-dir",
        env = "RDS_IAM_PROXY_AUDIT_DIR",
        value_name = "DIR"
    )]
    pub dir: Option<PathBuf>,

    /// Write Bind parameter values into statement records.
    #[arg(long = "audit-parameters", env = "RDS_IAM_PROXY_AUDIT_PARAMETERS")]
    pub parameters: bool,

    /// Prefix the application_name the server sees (and Activity Streams'
    /// clientApplication) with the person and connection id. A hint for
    /// people reading server-side logs, not proof: a session can SET it.
    #[arg(
        long = "audit-stamp-application-name",
        env = "RDS_IAM_PROXY_AUDIT_STAMP_APPLICATION_NAME"
    )]
    pub stamp_application_name: bool,

    /// Statement text kept per record; longer text is cut and its SHA-256
    /// recorded.
    #[arg(
        long = "audit-max-statement",
        env = "RDS_IAM_PROXY_AUDIT_MAX_STATEMENT",
        value_name = "BYTES",
        default_value_t = 65536
    )]
    pub max_statement: usize,

    /// Start a new audit file after this many MiB.
    #[arg(
        long = "audit-rotate-size",
        env = "RDS_IAM_PROXY_AUDIT_ROTATE_SIZE",
        value_name = "MIB",
        default_value_t = 256
    )]
    pub rotate_mib: u64,

    /// Start a new audit file after this long.
    #[arg(long = "audit-rotate-age", env = "RDS_IAM_PROXY_AUDIT_ROTATE_AGE", value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub rotate_age: Duration,

    /// Records the async queue holds before it drops.
    #[arg(
        long = "audit-queue",
        env = "RDS_IAM_PROXY_AUDIT_QUEUE",
        value_name = "RECORDS",
        default_value_t = 65536
    )]
    pub queue: usize,

    /// Sign digests of the audit trail (periodically, at each rotation and
    /// at the stop) with this key: `kms:KEY` (an ECC_NIST_P256 KMS key id,
    /// ARN or alias) or `file:PEM` (a P-256 private key); `audit verify
    /// --public-key` checks them [default: no digests].
    #[arg(
        long = "audit-sign-key",
        env = "RDS_IAM_PROXY_AUDIT_SIGN_KEY",
        value_name = "kms:KEY|file:PEM"
    )]
    pub sign_key: Option<String>,

    /// How often a digest is signed when the trail grew.
    #[arg(long = "audit-digest-interval", env = "RDS_IAM_PROXY_AUDIT_DIGEST_INTERVAL", value_name = "DURATION", default_value = "15m", value_parser = parse_duration)]
    pub digest_interval: Duration,

    /// Ship each closed audit file, digest and the public key to this S3
    /// bucket, under PREFIX/instance=ID/date=YYYY-MM-DD/ [default: no S3].
    #[arg(
        long = "audit-s3-bucket",
        env = "RDS_IAM_PROXY_AUDIT_S3_BUCKET",
        value_name = "BUCKET"
    )]
    pub s3_bucket: Option<String>,

    /// Key prefix in the bucket (e.g. rds-iam-proxy/).
    #[arg(
        long = "audit-s3-prefix",
        env = "RDS_IAM_PROXY_AUDIT_S3_PREFIX",
        value_name = "PREFIX",
        default_value = ""
    )]
    pub s3_prefix: String,

    /// Object Lock mode for each object: compliance (nobody can shorten
    /// or delete, root included) or governance [default: the bucket's
    /// default retention, if any].
    #[arg(
        long = "audit-s3-lock-mode",
        env = "RDS_IAM_PROXY_AUDIT_S3_LOCK_MODE",
        value_enum,
        value_name = "MODE"
    )]
    pub s3_lock_mode: Option<crate::audit::ship::LockMode>,

    /// Retention with --audit-s3-lock-mode (e.g. 365d).
    #[arg(long = "audit-s3-retention", env = "RDS_IAM_PROXY_AUDIT_S3_RETENTION", value_name = "DURATION", default_value = "365d", value_parser = parse_duration)]
    pub s3_retention: Duration,

    /// Send every audit record, as it is written, to this Kinesis data
    /// stream (partition key: the instance id) [default: no Kinesis].
    #[arg(
        long = "audit-kinesis-stream",
        env = "RDS_IAM_PROXY_AUDIT_KINESIS_STREAM",
        value_name = "STREAM"
    )]
    pub kinesis_stream: Option<String>,

    /// Reach the digests' KMS key, S3 and Kinesis as this role, assumed
    /// with the proxy's credentials [default: the proxy's credentials].
    #[arg(
        long = "audit-role-arn",
        env = "RDS_IAM_PROXY_AUDIT_ROLE_ARN",
        value_name = "ARN"
    )]
    pub role_arn: Option<String>,

    /// This proxy's name in the shipped layout and the partition key
    /// [default: the host name].
    #[arg(
        long = "audit-instance-id",
        env = "RDS_IAM_PROXY_AUDIT_INSTANCE_ID",
        value_name = "ID"
    )]
    pub instance_id: Option<String>,

    /// Unshipped MiB beyond which /readiness reports not ready (the files
    /// stay on disk until shipped) [default: 0, no limit].
    #[arg(
        long = "audit-spool-max",
        env = "RDS_IAM_PROXY_AUDIT_SPOOL_MAX",
        value_name = "MIB",
        default_value_t = 0
    )]
    pub spool_max_mib: u64,

    /// Let CREATE/ALTER ROLE ... PASSWORD through (refused by default, so
    /// IAM stays the only way in).
    #[arg(
        long = "allow-password-changes",
        env = "RDS_IAM_PROXY_ALLOW_PASSWORD_CHANGES"
    )]
    pub allow_password_changes: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parses `500ms`, `30s`, `5m`, `1h`, `7d` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    // Far beyond any timeout, and what a deadline `now + d` can hold.
    const MAX_SECS: u64 = 100 * 365 * 24 * 3600;
    let too_long = || format!("{:?} is too long a duration (at most 100 years)", s.trim());
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 500ms, 30s, 5m or 1h"))?;
    if unit == "ms" && n / 1000 > MAX_SECS {
        return Err(too_long());
    }
    let per_unit = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{s:?} has unknown unit {unit:?}: use ms, s, m, h or d"
            ));
        }
    };
    n.checked_mul(per_unit)
        .filter(|&secs| secs <= MAX_SECS)
        .map(Duration::from_secs)
        .ok_or_else(too_long)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Found by the config fuzz target: minutes and hours that do not fit
    /// in seconds overflowed (a panic with overflow checks, a wrapped,
    /// wrong duration without).
    #[test]
    fn durations_too_long_are_errors() {
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        let e = parse_duration("6148914691236517202m").unwrap_err();
        assert!(e.contains("too long"), "{e}");
        assert!(parse_duration("18446744073709551615h").is_err());
        assert!(parse_duration("18446744073709551615s").is_err());
        assert!(parse_duration("18446744073709551615ms").is_err());
        assert_eq!(
            parse_duration("876000h"),
            Ok(Duration::from_secs(876_000 * 3600))
        );
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("s").is_err());
    }
}
