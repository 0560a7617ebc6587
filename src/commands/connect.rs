//! `rds-iam-proxy connect [-- COMMAND ...]`: the proxy in this process on
//! a private unix socket, and a command (psql by default) pointed at it
//! through PGHOST/PGPORT/PGUSER. Exits with the command's status.
//!
//! The socket lives in a fresh 0700 directory that only this user can
//! enter, so no other local user can borrow the session; the directory is
//! removed on the way out.

use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::app::Server;
use crate::config::{Config, DEFAULT_PORT};

pub async fn run(mut config: Config, command: Vec<OsString>) -> anyhow::Result<u8> {
    if config.endpoints.len() != 1 {
        bail!(
            "connect uses one endpoint; the configuration has {}: pass --upstream, or a file with one [[endpoint]]",
            config.endpoints.len()
        );
    }
    let dir = private_dir().context("cannot create a private socket directory")?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let e = &mut config.endpoints[0];
    e.start.listen.clear();
    e.start.unix_socket = Some(dir.clone());
    config.start.admin_listen = None;

    let server = Server::start(config).await?;
    let (_, identity) = server
        .app
        .identity
        .current()
        .await
        .context("cannot confirm your AWS identity")?;

    let mut argv = command.into_iter();
    let program = argv.next().unwrap_or_else(|| "psql".into());
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(argv)
        .env("PGHOST", &dir)
        .env("PGPORT", DEFAULT_PORT.to_string())
        .env("PGUSER", &identity.user_name)
        // A password prompt would only confuse: the proxy needs none.
        .env_remove("PGPASSWORD")
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", program.to_string_lossy()))?;
    let status = child.wait().await?;
    // The command's sessions are closed by now; a little time for their
    // tasks to finish, no more.
    let _ = server
        .shutdown(tokio::time::sleep(std::time::Duration::from_secs(2)))
        .await;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        (None, None) => 1,
    })
}

/// A new directory, 0700, under the runtime or temp directory. Created
/// with `create` (not `create_all`), so an existing path is never reused.
fn private_dir() -> std::io::Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let mut last = None;
    for _ in 0..8 {
        let mut rnd = [0u8; 8];
        crate::tls::random_bytes(&mut rnd);
        let name: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        let dir = base.join(format!("rds-iam-proxy-{name}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into()))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
