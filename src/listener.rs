//! The accepting side: TCP and unix listeners and their accept loops.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, UnixListener};
use tracing::{error, info};

use crate::app::{AppContext, EndpointContext, Phase};
use crate::conn::{self, Peer};
use crate::peer::LocalPeer;
use crate::stream::Socket;

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds a TCP address.
    pub async fn tcp(addr: SocketAddr) -> io::Result<Self> {
        Ok(Listener::Tcp(TcpListener::bind(addr).await?))
    }

    /// Binds `dir/.s.PGSQL.<port>`, replacing a stale socket file. The
    /// directory is created 0700 if missing; the socket file is 0600.
    pub fn unix(dir: &std::path::Path, port: u16) -> io::Result<Self> {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let path = dir.join(format!(".s.PGSQL.{port}"));
        if let Ok(meta) = std::fs::symlink_metadata(&path)
            && meta.file_type().is_socket()
        {
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Listener::Unix(listener, path))
    }

    /// What to print as "listening on".
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }

    /// Accepts until the process stops running, spawning a tracked task
    /// per connection. Beyond `max_connections` a connection still gets
    /// its answer (FATAL 53300 after the startup packet, so the client
    /// reads it over TLS), from a small bounded set of refusal tasks.
    pub async fn serve(self, app: Arc<AppContext>, ep: Arc<EndpointContext>) {
        let mut phase = app.phase.clone();
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                _ = phase.wait_for(|p| *p != Phase::Running) => break,
                a = self.accept() => a,
            };
            match accepted {
                Ok((socket, peer)) => {
                    backoff = Duration::from_millis(5);
                    let max = app.config.load().max_connections;
                    match app.metrics.try_acquire(max) {
                        Some(slot) => {
                            // Counted from now, so a shutdown waits for
                            // it even before its worker first runs it.
                            let tracked = app.tasks.token();
                            let (session_app, ep) = (app.clone(), ep.clone());
                            app.workers.spawn(socket, move |socket| async move {
                                conn::serve(session_app, ep, socket, peer, slot).await;
                                drop(tracked);
                            });
                        }
                        None => match Refusing::enter(&REFUSING) {
                            Some(r) => {
                                app.tasks.spawn(conn::refuse_too_many(
                                    app.clone(),
                                    ep.clone(),
                                    socket,
                                    peer,
                                    max,
                                    r,
                                ));
                            }
                            None => {
                                // Flooded: close at once rather than queue.
                                app.metrics.connection("too_many_connections");
                                drop(socket);
                            }
                        },
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of
                    // spinning on the same error.
                    error!(listener = %self.describe(), error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        if let Listener::Unix(_, path) = &self {
            let _ = std::fs::remove_file(path);
        }
        info!(listener = %self.describe(), "stopped accepting");
    }

    async fn accept(&self) -> io::Result<(Socket, Peer)> {
        match self {
            Listener::Tcp(l) => {
                let (tcp, addr) = l.accept().await?;
                let _ = tcp.set_nodelay(true);
                let local_addr = l.local_addr()?;
                let local = local_addr.ip().is_loopback();
                Ok((
                    Socket::Tcp(tcp),
                    Peer {
                        addr: addr.to_string(),
                        plaintext_ok: local,
                        local: if local {
                            LocalPeer::Tcp {
                                peer: addr,
                                local: local_addr,
                            }
                        } else {
                            LocalPeer::Remote
                        },
                    },
                ))
            }
            Listener::Unix(l, _) => {
                let (unix, _) = l.accept().await?;
                // SO_PEERCRED: the uid the client process had when it connected.
                let uid = unix.peer_cred().ok().map(|c| c.uid());
                Ok((
                    Socket::Unix(unix),
                    Peer {
                        addr: "unix".into(),
                        plaintext_ok: true,
                        local: LocalPeer::Unix { uid },
                    },
                ))
            }
        }
    }
}

/// Over-limit connections being answered now, all listeners together.
static REFUSING: AtomicUsize = AtomicUsize::new(0);

/// Most over-limit connections answered at once; beyond, they are closed
/// without an answer so a flood cannot hold unbounded sockets.
const MAX_REFUSING: usize = 64;

/// A place among the refusal tasks, freed on drop.
#[derive(Debug)]
pub struct Refusing(&'static AtomicUsize);

impl Refusing {
    fn enter(counter: &'static AtomicUsize) -> Option<Self> {
        if counter.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
            counter.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Refusing(counter))
    }
}

impl Drop for Refusing {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
