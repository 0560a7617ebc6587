//! Names for FunctionCall records. A FunctionCall ('F', the protocol's
//! fastpath, which libpq's large-object calls use) names its function by
//! OID only. The server can tell the name, but asking on the client's own
//! session would put a statement of the proxy's into it (and into its
//! transaction). So a session that makes a FunctionCall gets one lookup
//! connection of the proxy's own, opened at its first call, as the same
//! person and database user (a fresh token, the same endpoint and TLS),
//! with `application_name` [`LOOKUP_APPLICATION_NAME`]. Each OID is asked
//! once per session (at most [`MAX_OIDS`]), off the session's path; each
//! answer is a `function` record (`conn`, `function_oid`, `name` or
//! `error`) that joins the statement records by `conn` and `function_oid`.

use std::collections::HashSet;
use std::time::SystemTime;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::event::{Event, FunctionName};
use crate::pg::frame::split_frame;
use std::future::Future;

/// Most OIDs one session has looked up; later new ones are not.
pub const MAX_OIDS: usize = 1000;
/// How the lookup connection shows up in `pg_stat_activity` and in
/// Database Activity Streams.
pub const LOOKUP_APPLICATION_NAME: &str = "rds-iam-proxy function names";
/// Longest wait for one lookup's answer.
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest answer message read from the lookup connection.
const MAX_ANSWER: u32 = 64 * 1024;

/// The session's side: asks for each OID once.
#[derive(Debug)]
pub struct Asker {
    tx: mpsc::Sender<u32>,
    asked: HashSet<u32>,
}

impl Asker {
    pub fn ask(&mut self, oid: u32) {
        if self.asked.len() < MAX_OIDS && self.asked.insert(oid) {
            let _ = self.tx.try_send(oid);
        }
    }
}

/// An asker and the receiver its lookups are served from.
pub fn channel() -> (Asker, mpsc::Receiver<u32>) {
    let (tx, rx) = mpsc::channel(MAX_OIDS);
    (
        Asker {
            tx,
            asked: HashSet::new(),
        },
        rx,
    )
}

/// Serves the lookups of session `conn` until its asker is dropped:
/// `open` logs in, awaited at the first OID (its error text goes into the
/// records: it must be fit for the audit trail, no secrets); each answer
/// is recorded through `audit`.
pub async fn serve<S>(
    conn: u64,
    mut rx: mpsc::Receiver<u32>,
    open: impl Future<Output = Result<S, String>>,
    audit: &super::Auditor,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let record = async |event| {
        audit.record(event).await;
    };
    let Some(first) = rx.recv().await else {
        return;
    };
    let answer = |oid, result: Result<Option<String>, String>| {
        Event::Function(Box::new(FunctionName {
            conn,
            time: SystemTime::now(),
            oid,
            result,
        }))
    };
    let mut stream = match open.await {
        Ok(s) => s,
        Err(e) => {
            record(answer(first, Err(e.clone()))).await;
            while let Some(oid) = rx.recv().await {
                record(answer(oid, Err(e.clone()))).await;
            }
            return;
        }
    };
    let mut next = Some(first);
    while let Some(oid) = next {
        let result = tokio::time::timeout(LOOKUP_TIMEOUT, lookup(&mut stream, oid))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {LOOKUP_TIMEOUT:?}")));
        let broken = result.is_err();
        record(answer(oid, result)).await;
        if broken {
            // The connection's state is unknown after a failed lookup.
            while let Some(oid) = rx.recv().await {
                record(answer(oid, Err("lookup connection failed".into()))).await;
            }
            return;
        }
        next = rx.recv().await;
    }
    let _ = stream.write_all(&[b'X', 0, 0, 0, 4]).await;
    let _ = stream.shutdown().await;
}

/// The function's name with its argument types (`regprocedure`, schema
/// qualified when not on the search path); `None` when no function has
/// that OID (any more).
pub async fn lookup<S>(stream: &mut S, oid: u32) -> Result<Option<String>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // An OID is a number: nothing of the client's reaches this text.
    let sql =
        format!("select p.oid::regprocedure::text from pg_catalog.pg_proc p where p.oid = {oid}");
    let mut out = Vec::new();
    crate::pg::messages::write_query(&mut out, &sql);
    let io = |e: std::io::Error| format!("lookup connection: {e}");
    stream.write_all(&out).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut buf = BytesMut::with_capacity(1024);
    let mut name = None;
    let mut error = None;
    loop {
        let Some((header, body)) =
            split_frame(&buf, MAX_ANSWER).map_err(|e| format!("lookup connection: {e}"))?
        else {
            if stream.read_buf(&mut buf).await.map_err(io)? == 0 {
                return Err("lookup connection closed".into());
            }
            continue;
        };
        let len = header.frame_len();
        match header.tag {
            b'D' => name = first_column(body),
            b'E' => {
                let e = crate::pg::backend::parse_error(body);
                error = Some(format!("{} {}", e.code, e.message));
            }
            b'Z' => {
                return match error {
                    Some(e) => Err(e),
                    None => Ok(name),
                };
            }
            _ => {}
        }
        let _ = buf.split_to(len);
    }
}

/// The first column of a DataRow as text (`None` when NULL or malformed).
fn first_column(body: &[u8]) -> Option<String> {
    let count = u16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    if count == 0 {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    let value = body.get(6..6 + len)?;
    Some(String::from_utf8_lossy(value).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_oid_is_asked_once_and_within_the_bound() {
        let (mut asker, mut rx) = channel();
        for oid in [7, 8, 7, 7, 8, 9] {
            asker.ask(oid);
        }
        let mut got = Vec::new();
        while let Ok(oid) = rx.try_recv() {
            got.push(oid);
        }
        assert_eq!(got, [7, 8, 9]);
        for oid in 100..(100 + 2 * MAX_OIDS as u32) {
            asker.ask(oid);
        }
        let mut more = 0;
        while rx.try_recv().is_ok() {
            more += 1;
        }
        assert_eq!(more, MAX_OIDS - 3);
    }

    #[test]
    fn data_row_first_column() {
        let mut row = vec![0, 1, 0, 0, 0, 3];
        row.extend(b"abc");
        assert_eq!(first_column(&row).as_deref(), Some("abc"));
        assert_eq!(first_column(&[0, 1, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(first_column(&[0, 1, 0, 0, 0, 9, b'x']), None);
        assert_eq!(first_column(&[0]), None);
    }
}
