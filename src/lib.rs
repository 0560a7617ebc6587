//! rds-iam-proxy: a PostgreSQL proxy for Amazon Aurora / RDS IAM database
//! authentication that ties every session to the person behind it.
//!
//! A connection's life, one module per stage (see ARCHITECTURE.md):
//!
//! - [`listener`]: TCP and unix listeners, accept loops; each accepted
//!   socket goes to one of the [`workers`] (a thread with its own event
//!   loop) for the rest of its life.
//! - [`handshake`]: SSLRequest / GSSENCRequest / direct TLS / CancelRequest,
//!   then the StartupMessage.
//! - [`peer`]: which local OS user is behind a loopback or unix connection.
//! - [`identity`]: the identity source (SSO, SAML, workload), cached AWS
//!   credentials and which database users they may use.
//! - [`gateway`]: gateway mode, a bastion several people share: each
//!   client's proof of identity (checked, once, with STS) instead of the
//!   proxy's own identity.
//! - [`token`]: the SigV4-presigned RDS IAM token ([`sigv4`] presigns it,
//!   and the gateway proof's GetCallerIdentity).
//! - [`upstream`]: resolve, connect, verified TLS, log in with the token.
//! - [`forward`]: both directions until the session ends.
//! - [`cancel`]: proxy-issued cancel keys and their upstream targets.
//!
//! - [`audit`]: the audit trail and the password guard; [`gate`] is the
//!   forwarding pump that feeds it.
//! - [`das`]: Aurora Database Activity Streams read back and joined with
//!   the audit trail (`das tail`, `das reconcile`).
//!
//! [`commands`] holds the subcommands (`token`, `whoami`, `policy`,
//! `connect`, `doctor`); [`banner`] says at start-up who the proxy acts for;
//! [`peer`] checks which local OS user is on the other end.
//!
//! Running it like infrastructure: [`config`] (flags > environment > TOML
//! file), [`metrics`] and [`admin`] (health and Prometheus over HTTP),
//! [`sessions`] (the open sessions, refusals and last hour that
//! [`status`] shows on the admin listener's page),
//! [`activity`] (idle timeout), [`systemd`] (readiness notification),
//! [`log_text`] (text log lines a client cannot forge), [`throttle`]
//! (log lines a stranger can cause, at a bounded rate);
//! [`app`] owns the lifecycle (SIGHUP reload, SIGTERM drain);
//! [`reloadable`] says which settings a reload applies.
//!
//! [`conn`] strings the stages together for one connection; [`app`] builds
//! the shared context and runs the listeners. [`pg`] is the sans-I/O wire
//! protocol, [`tls`] the two TLS configurations, [`error`] what a client is
//! told when something fails.

pub mod activity;
pub mod admin;
pub mod admission;
pub mod app;
pub mod audit;
pub mod banner;
pub mod cancel;
pub mod cli;
pub mod commands;
pub mod config;
pub mod conn;
pub mod das;
pub mod error;
pub mod forward;
pub mod gate;
pub mod gateway;
pub mod handshake;
pub mod identity;
pub mod listener;
pub mod local_ca;
pub mod log_text;
pub mod metrics;
pub mod peer;
pub mod pg;
pub mod reloadable;
pub mod secret;
pub mod sessions;
pub mod sigv4;
pub mod status;
pub mod stream;
pub mod systemd;
pub mod throttle;
pub mod tls;
pub mod token;
pub mod upstream;
pub mod workers;
