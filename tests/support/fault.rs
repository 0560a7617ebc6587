//! A TCP relay that misbehaves on demand, put between two real peers (the
//! proxy and PostgreSQL, or a client and the proxy). It sees only bytes
//! (TLS records, when the leg is encrypted): the faults are the network's,
//! not the protocol's.
//!
//! Each direction of each connection starts passing bytes through; a test
//! arms a fault for a direction, which applies to the connections open at
//! that moment and to later ones, counting bytes from the moment it is armed.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Which way bytes go through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the side that dialled the relay to the side it dials.
    Forward,
    /// Back.
    Back,
}

/// What the relay does to one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every byte, as fast as it comes.
    Pass,
    /// One byte per write, with a pause after each.
    Trickle(Duration),
    /// At most this many bytes per second.
    Cap(usize),
    /// After this many more bytes, reset the connection (RST both ways).
    ResetAfter(usize),
    /// After this many more bytes, pass nothing more in this direction and
    /// keep the connection open.
    StallAfter(usize),
    /// After this many more bytes, close this direction (FIN) and read no
    /// more from it; the other direction goes on.
    CloseAfter(usize),
}

#[derive(Debug, Clone, Copy)]
struct Armed {
    fault: Fault,
    /// Counts arming, so a connection knows to restart its byte count.
    generation: u64,
}

/// A running relay in the test's runtime.
pub struct Relay {
    pub addr: SocketAddr,
    faults: [watch::Sender<Armed>; 2],
}

impl Relay {
    /// Listens on a free loopback port and relays every connection to `to`.
    pub async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pass = Armed {
            fault: Fault::Pass,
            generation: 0,
        };
        let faults = [watch::channel(pass).0, watch::channel(pass).0];
        let watchers = [faults[0].subscribe(), faults[1].subscribe()];
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let watchers = watchers.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(to).await else {
                        return;
                    };
                    connection(inbound, outbound, watchers).await;
                });
            }
        });
        Relay { addr, faults }
    }

    /// Applies `fault` to `dir` from now on.
    pub fn arm(&self, dir: Dir, fault: Fault) {
        self.faults[dir as usize].send_modify(|a| {
            a.fault = fault;
            a.generation += 1;
        });
    }
}

async fn connection(
    inbound: TcpStream,
    outbound: TcpStream,
    watchers: [watch::Receiver<Armed>; 2],
) {
    // Each write its own segment, so a trickle arrives a byte at a time.
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_r, in_w) = inbound.into_split();
    let (out_r, out_w) = outbound.into_split();
    let (reset_tx, reset_rx) = watch::channel(false);
    let [fwd, back] = watchers;
    let a = tokio::spawn(direction(
        in_r,
        out_w,
        fwd,
        reset_tx.clone(),
        reset_rx.clone(),
    ));
    let b = tokio::spawn(direction(out_r, in_w, back, reset_tx, reset_rx));
    let _ = tokio::join!(a, b);
}

/// Moves bytes one way under the armed fault. A reset in either direction
/// ends both: each drops its halves with linger 0, so the kernel sends RST.
async fn direction(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut armed: watch::Receiver<Armed>,
    reset_tx: watch::Sender<bool>,
    mut reset_rx: watch::Receiver<bool>,
) {
    let reset = |from: &OwnedReadHalf, to: &OwnedWriteHalf| {
        for s in [from.as_ref(), to.as_ref()] {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    };
    let mut generation = armed.borrow().generation;
    let mut counted = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            _ = async { drop(reset_rx.wait_for(|r| *r).await) } => {
                reset(&from, &to);
                return;
            }
        };
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            let now = *armed.borrow_and_update();
            if now.generation != generation {
                generation = now.generation;
                counted = 0;
            }
            let limit = |after: usize| after.saturating_sub(counted).min(chunk.len());
            let (pass, then) = match now.fault {
                Fault::Pass => (chunk.len(), None),
                Fault::Trickle(_) => (1, None),
                Fault::Cap(per_second) => ((per_second / 20).max(1).min(chunk.len()), None),
                Fault::ResetAfter(after) | Fault::StallAfter(after) | Fault::CloseAfter(after) => {
                    let pass = limit(after);
                    (
                        pass,
                        (pass < chunk.len() || counted + pass >= after).then_some(now.fault),
                    )
                }
            };
            if pass > 0 && to.write_all(&chunk[..pass]).await.is_err() {
                return;
            }
            counted += pass;
            chunk = &chunk[pass..];
            match (now.fault, then) {
                (Fault::Trickle(pause), _) if pause.is_zero() => tokio::task::yield_now().await,
                (Fault::Trickle(pause), _) => tokio::time::sleep(pause).await,
                (Fault::Cap(_), _) => tokio::time::sleep(Duration::from_millis(50)).await,
                (_, Some(Fault::ResetAfter(_))) => {
                    let _ = reset_tx.send(true);
                    reset(&from, &to);
                    return;
                }
                (_, Some(Fault::StallAfter(_))) => {
                    // Hold the connection, pass nothing, until a reset or
                    // the test ends.
                    let _ = reset_rx.wait_for(|r| *r).await;
                    reset(&from, &to);
                    return;
                }
                (_, Some(Fault::CloseAfter(_))) => {
                    let _ = to.shutdown().await;
                    // Keep the read half (and so the socket) open, unread.
                    let _ = reset_rx.wait_for(|r| *r).await;
                    return;
                }
                _ => {}
            }
        }
    }
}
