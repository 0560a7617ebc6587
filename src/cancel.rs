//! Query cancellation. Clients get a key made by the proxy (the server's
//! pid with a fresh random secret); only keys handed out here are honoured,
//! and each leads to the upstream session it stands for, over TLS, at the
//! address that session is connected to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::pg::startup::{self, CancelKey};
use crate::upstream::{self, Endpoint};

/// Where a proxy key leads.
#[derive(Debug, Clone)]
struct Target {
    endpoint: Arc<Endpoint>,
    addr: SocketAddr,
    key: CancelKey,
}

/// Proxy-issued cancel keys of the live sessions.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<CancelKey, Target>>,
    /// A gateway instance's number, written into the first byte of every
    /// secret it issues, so that another instance that receives the
    /// cancel request knows where to send it.
    instance: Option<u8>,
}

/// Removes its key from the registry when the session ends.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<CancelRegistry>,
    key: CancelKey,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .map
            .lock()
            .expect("lock poisoned")
            .remove(&self.key);
    }
}

impl CancelRegistry {
    /// A registry whose keys name this gateway instance.
    pub fn for_instance(instance: Option<u8>) -> Self {
        Self {
            map: Mutex::default(),
            instance,
        }
    }

    /// The instance a key names, when keys name instances.
    pub fn instance_of(key: &CancelKey) -> Option<u8> {
        key.secret.first().copied()
    }

    /// Issues a proxy key for the session behind `upstream_key`. Protocol
    /// 3.2 allows 32-byte secrets; 3.0 clients expect 4 bytes.
    pub fn register(
        self: &Arc<Self>,
        endpoint: Arc<Endpoint>,
        addr: SocketAddr,
        upstream_key: CancelKey,
        minor: u16,
    ) -> (CancelKey, Registration) {
        let len = if minor >= 2 { 32 } else { 4 };
        let mut map = self.map.lock().expect("lock poisoned");
        let key = loop {
            let mut secret = vec![0u8; len];
            crate::tls::random_bytes(&mut secret);
            if let Some(instance) = self.instance {
                secret[0] = instance;
            }
            let key = CancelKey {
                pid: upstream_key.pid,
                secret,
            };
            if !map.contains_key(&key) {
                break key;
            }
        };
        map.insert(
            key.clone(),
            Target {
                endpoint,
                addr,
                key: upstream_key,
            },
        );
        (
            key.clone(),
            Registration {
                registry: self.clone(),
                key,
            },
        )
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.map.lock().expect("lock poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forwards a cancel request if `key` is one of ours. Returns whether it
    /// was; like PostgreSQL, the client is told nothing either way. The
    /// whole exchange (connect, TLS, send, the server's close) is bounded
    /// by [`CANCEL_TIMEOUT`], so a stalled server cannot hold the task.
    pub async fn cancel(&self, key: &CancelKey) -> Result<bool, CancelError> {
        let target = self.map.lock().expect("lock poisoned").get(key).cloned();
        let Some(target) = target else {
            return Ok(false);
        };
        send(&target.endpoint, Some(target.addr), &target.key).await?;
        Ok(true)
    }
}

/// Sends `key`'s CancelRequest over TLS to `endpoint` (at `addr`, or
/// resolved), bounded by [`CANCEL_TIMEOUT`] as a whole. Used for the
/// server, and by a gateway for a peer instance that issued the key.
pub async fn send(
    endpoint: &Endpoint,
    addr: Option<SocketAddr>,
    key: &CancelKey,
) -> Result<(), CancelError> {
    let send = async {
        let (mut stream, _) = upstream::connect_tls(endpoint, addr).await?;
        let mut out = BytesMut::new();
        startup::encode_cancel(&mut out, key);
        stream.write_all(&out).await?;
        stream.flush().await?;
        // The server closes once it has acted; wait for that, briefly.
        let mut sink = [0u8; 64];
        let _ = tokio::time::timeout(
            CANCEL_CLOSE_WAIT,
            tokio::io::AsyncReadExt::read(&mut stream, &mut sink),
        )
        .await;
        Ok::<_, upstream::UpstreamError>(())
    };
    tokio::time::timeout(CANCEL_TIMEOUT, send)
        .await
        .map_err(|_| CancelError::TimedOut(CANCEL_TIMEOUT))??;
    Ok(())
}

/// Why a cancel request with a known key did not reach the server.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
    #[error("the server did not take the cancel request within {0:?}")]
    TimedOut(Duration),
}

/// The longest a cancel request is carried upstream, TLS handshake
/// included.
pub const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait for the server to close after the request was sent.
const CANCEL_CLOSE_WAIT: Duration = Duration::from_secs(5);
