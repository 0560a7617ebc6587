//! Session workers: a few threads, each running its own single-threaded
//! event loop, that carry the client sessions from TLS handshake to
//! goodbye. The accept loops, admin HTTP and signal handling stay on the
//! main runtime; each accepted socket is handed to the worker with the
//! fewest sessions and stays there for its whole life.
//!
//! Why not one work-stealing runtime: a session is one task that waits on
//! two sockets. On a work-stealing runtime the thread that polls epoll is
//! often not the one that runs the woken task, so each round trip pays a
//! cross-thread wake-up (futex) and the scheduler's bookkeeping. A
//! single-threaded loop per worker polls, runs and writes on one thread:
//! measured with callgrind, about 8% fewer instructions per forwarded
//! round trip, and 15-20% less CPU per transaction under pgbench
//! (docs/PERFORMANCE.md).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tracing::warn;

use crate::stream::{Socket, StdSocket};

/// The running workers. Dropping this stops them; sessions still on them
/// are dropped (shutdown drains them first).
#[derive(Debug)]
pub struct SessionWorkers {
    workers: Vec<Worker>,
}

#[derive(Debug)]
struct Worker {
    handle: Handle,
    /// Sessions on this worker now.
    live: Arc<AtomicUsize>,
    /// Dropped to stop the worker's loop.
    _stop: oneshot::Sender<()>,
}

/// Lowers a worker's session count when the session's task ends, however
/// it ends.
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SessionWorkers {
    /// Starts `count` worker threads (at least one).
    pub fn start(count: usize) -> io::Result<Self> {
        let mut workers = Vec::with_capacity(count.max(1));
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("session-worker-{i}"))
                .spawn(move || {
                    // Runs the sessions' tasks until told to stop; then
                    // dropping the runtime drops whatever is left.
                    let _ = runtime.block_on(stopped);
                })?;
            workers.push(Worker {
                handle,
                live: Arc::new(AtomicUsize::new(0)),
                _stop: stop,
            });
        }
        Ok(Self { workers })
    }

    /// How many workers run.
    pub fn count(&self) -> usize {
        self.workers.len()
    }

    /// Moves `socket` to the least busy worker and runs `session(socket)`
    /// there. The socket is re-registered with that worker's event loop,
    /// so all its I/O is handled on that one thread.
    pub fn spawn<F, Fut>(&self, socket: Socket, session: F)
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let worker = self
            .workers
            .iter()
            .min_by_key(|w| w.live.load(Ordering::Relaxed))
            .expect("at least one worker");
        let socket = match socket.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot hand the connection to a session worker; closed");
                return;
            }
        };
        worker.live.fetch_add(1, Ordering::Relaxed);
        let live = LiveGuard(worker.live.clone());
        worker.handle.spawn(async move {
            let _live = live;
            match StdSocket::into_tokio(socket) {
                Ok(socket) => session(socket).await,
                Err(e) => {
                    warn!(error = %e, "cannot register the connection with a session worker; closed")
                }
            }
        });
    }

    /// Sessions on each worker, in worker order (for tests and metrics).
    pub fn sessions(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.live.load(Ordering::Relaxed))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Sockets accepted on one runtime are served on the workers' threads,
    /// spread over both, and their bytes go through.
    #[tokio::test]
    async fn sessions_run_on_the_workers_and_spread() {
        let workers = SessionWorkers::start(2).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (names_tx, mut names_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let names = names_tx.clone();
            workers.spawn(Socket::Tcp(server), move |mut s| async move {
                let name = std::thread::current().name().map(str::to_owned);
                names.send(name).unwrap();
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).await.unwrap();
                s.write_all(&buf).await.unwrap();
                // Stay live until the client closes.
                let _ = s.read(&mut buf).await;
            });
            client.write_all(b"hello").await.unwrap();
            let mut back = [0u8; 5];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"hello");
            clients.push(client);
        }
        let mut names = Vec::new();
        for _ in 0..4 {
            names.push(names_rx.recv().await.unwrap().unwrap());
        }
        names.sort();
        assert_eq!(
            names,
            [
                "session-worker-0",
                "session-worker-0",
                "session-worker-1",
                "session-worker-1"
            ]
        );
        assert_eq!(workers.sessions(), [2, 2]);
        drop(clients);
        for _ in 0..200 {
            if workers.sessions() == [0, 0] {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(workers.sessions(), [0, 0]);
    }
}
