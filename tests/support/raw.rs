//! A minimal hand-rolled PostgreSQL client for tests that need to send what
//! real clients never send (oversized packets, early bytes, odd versions).

#![allow(dead_code)]

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A StartupMessage for protocol 3.`minor`.
pub fn startup_packet(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&((3u32 << 16) | u32::from(minor)).to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Reads one tagged message; `None` at end of stream.
pub async fn read_message<S: AsyncRead + Unpin>(s: &mut S) -> Option<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    s.read_exact(&mut header).await.ok()?;
    let len = u32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
    assert!((4..1 << 20).contains(&len), "bad length {len}");
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await.ok()?;
    Some((header[0], body))
}

/// A plaintext session as `user` to database mylab on `addr`, logged in
/// (up to the first ReadyForQuery).
pub async fn login(addr: std::net::SocketAddr, user: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&startup_packet(0, &[("user", user), ("database", "mylab")]))
        .await
        .unwrap();
    let login = read_until_ready(&mut s).await;
    assert_eq!(login.last().map(|m| m.0), Some(b'Z'), "{login:?}");
    s
}

/// Sends a simple Query without reading the answer.
pub async fn simple_query_send<S: AsyncWrite + Unpin>(s: &mut S, sql: &str) {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    let mut out = vec![b'Q'];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&body);
    s.write_all(&out).await.unwrap();
}

/// Reads messages up to and including ReadyForQuery or an ErrorResponse.
pub async fn read_until_ready<S: AsyncRead + Unpin>(s: &mut S) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((tag, body)) = read_message(s).await {
        out.push((tag, body));
        if tag == b'Z' || tag == b'E' {
            break;
        }
    }
    out
}

/// The SQLSTATE and message of an ErrorResponse body.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    for f in body.split(|&b| b == 0) {
        if let Some((&t, v)) = f.split_first() {
            match t {
                b'C' => code = String::from_utf8_lossy(v).into_owned(),
                b'M' => message = String::from_utf8_lossy(v).into_owned(),
                _ => {}
            }
        }
    }
    (code, message)
}

/// Sends a simple Query and returns the first column of every DataRow.
pub async fn simple_query<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, sql: &str) -> Vec<String> {
    simple_query_send(s, sql).await;
    s.flush().await.unwrap();
    let mut rows = Vec::new();
    loop {
        let (tag, body) = read_message(s).await.expect("answer to query");
        match tag {
            b'D' => {
                let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                rows.push(String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned());
            }
            b'E' => panic!("query failed: {:?}", error_fields(&body)),
            b'Z' => return rows,
            _ => {}
        }
    }
}
