//! The floor for any user-space PostgreSQL proxy on this machine: a relay
//! that copies bytes between two TCP connections and does nothing else (no
//! TLS termination, no protocol work; the client's TLS session passes
//! through to PostgreSQL untouched). Same runtime as the proxy (tokio,
//! multi-thread, one worker per core) and TCP_NODELAY on both sockets.
//!
//! `benches/macro.py` runs it as the `relay` target: its CPU per
//! transaction is what the kernel and the runtime cost for the two extra
//! loopback hops, which the proxy cannot go below.
//!
//!     tcp-relay LISTEN_ADDR UPSTREAM_ADDR    (prints "listening on ADDR")

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: tcp-relay LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM_ADDR is host:port");
    let listener = TcpListener::bind(&listen).await?;
    eprintln!("listening on {}", listener.local_addr()?);
    loop {
        let (mut client, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut server = TcpStream::connect(upstream).await?;
            client.set_nodelay(true)?;
            server.set_nodelay(true)?;
            tokio::io::copy_bidirectional(&mut client, &mut server).await?;
            Ok::<_, std::io::Error>(())
        });
    }
}
