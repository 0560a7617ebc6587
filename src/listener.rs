//! The accepting side: TCP and unix listeners and their accept loops.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};
use tracing::{error, info, warn};

use crate::admission::Source;

use crate::app::{AppContext, EndpointContext, Phase};
use crate::conn::{self, Peer};
use crate::peer::LocalPeer;
use crate::stream::Socket;
use crate::throttle::Throttle;

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
    /// per connection. A socket first takes a handshake place (see
    /// [`crate::admission`]); with none free it is closed at once, so a
    /// flood holds no more than `max_handshakes` sockets. The session
    /// limit is applied once the startup packet is read (FATAL 53300, so
    /// the client reads it, over TLS where it asked for TLS).
    pub async fn serve(self, app: Arc<AppContext>, ep: Arc<EndpointContext>) {
        // Anyone who can connect can fill the handshake places.
        static FULL: Throttle = Throttle::new(Duration::from_secs(10));
        let mut phase = app.phase.clone();
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                _ = phase.wait_for(|p| *p != Phase::Running) => break,
                a = self.accept() => a,
            };
            match accepted {
                Ok((socket, peer, source)) => {
                    backoff = Duration::from_millis(5);
                    let config = app.config.load();
                    let (max, per_source) = (
                        config.live.max_handshakes,
                        config.live.max_handshakes_per_source,
                    );
                    drop(config);
                    match app.metrics.handshakes.enter(source, max, per_source) {
                        Ok(place) => {
                            // Counted from now, so a shutdown waits for
                            // it even before its worker first runs it.
                            let tracked = app.tasks.token();
                            let (session_app, ep) = (app.clone(), ep.clone());
                            app.workers.spawn(socket, move |socket| async move {
                                conn::serve(session_app, ep, socket, peer, place).await;
                                drop(tracked);
                            });
                        }
                        Err(full) => {
                            app.metrics.connection("too_many_handshakes");
                            drop(socket);
                            if let Some(more) = FULL.admit(Instant::now()) {
                                warn!(
                                    listener = %self.describe(),
                                    peer = %peer.addr,
                                    not_logged_since = more,
                                    "connection closed at once: {full}"
                                );
                            }
                        }
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

    async fn accept(&self) -> io::Result<(Socket, Peer, Source)> {
        match self {
            Listener::Tcp(l) => {
                let (tcp, addr) = l.accept().await?;
                let _ = tcp.set_nodelay(true);
                // Judged by this connection's own addresses, not by the
                // listener's: a wildcard listener reached through 127.0.0.1
                // (or ::ffff:127.0.0.1 on a dual-stack one) is a local
                // connection, and gets the local-user check.
                let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
                let (addr, local_addr) = (canonical(addr), canonical(tcp.local_addr()?));
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
                    Source::of(addr.ip()),
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
                    Source::Local,
                ))
            }
        }
    }
}
