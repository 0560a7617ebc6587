//! Expiry-aware caching of the AWS credential chain.
//!
//! `SdkConfig::credentials_provider()` asks its source every time (for SSO:
//! a GetRoleCredentials call). This wrapper keeps the last credentials
//! until shortly before they expire and lets one refresh run at a time.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{
    ProvideCredentials, SharedCredentialsProvider, error::CredentialsError, future,
};
use thiserror::Error;
use tokio::sync::Mutex;

/// Refresh this long before the credentials expire.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(5 * 60);
/// Never sign with credentials that expire sooner than this.
pub const MIN_REMAINING: Duration = Duration::from_secs(60);

/// No usable credentials; the message is the provider's own (never secret).
#[derive(Debug, Clone, Error)]
#[error("no usable AWS credentials: {message}")]
pub struct CredentialsUnavailable {
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct CachedCredentials {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    source: Option<SharedCredentialsProvider>,
    cached: StdMutex<Option<Credentials>>,
    refresh: Mutex<()>,
}

impl CachedCredentials {
    pub fn new(source: Option<SharedCredentialsProvider>) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                cached: StdMutex::new(None),
                refresh: Mutex::new(()),
            }),
        }
    }

    fn fresh(&self, now: SystemTime, margin: Duration) -> Option<Credentials> {
        let cached = self.inner.cached.lock().expect("lock poisoned");
        cached
            .as_ref()
            .filter(|c| c.expiry().is_none_or(|e| e > now + margin))
            .cloned()
    }

    /// Credentials valid for at least [`MIN_REMAINING`]; refreshed when
    /// fewer than [`REFRESH_AHEAD`] remain.
    pub async fn get(&self) -> Result<Credentials, CredentialsUnavailable> {
        if let Some(c) = self.fresh(SystemTime::now(), REFRESH_AHEAD) {
            return Ok(c);
        }
        let _one_refresh = self.inner.refresh.lock().await;
        // Another task may have refreshed while this one waited.
        if let Some(c) = self.fresh(SystemTime::now(), REFRESH_AHEAD) {
            return Ok(c);
        }
        let Some(source) = &self.inner.source else {
            return Err(CredentialsUnavailable {
                message:
                    "no credential source is configured (no profile, environment keys or role)"
                        .into(),
            });
        };
        match source.provide_credentials().await {
            Ok(c) => {
                tracing::debug!(access_key_id = c.access_key_id(), expiry = ?c.expiry(), "AWS credentials loaded");
                *self.inner.cached.lock().expect("lock poisoned") = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                let message = crate::identity::error_chain(&e);
                // Credentials that still live past the minimum keep working.
                if let Some(c) = self.fresh(SystemTime::now(), MIN_REMAINING) {
                    tracing::warn!(error = %message, "refreshing AWS credentials failed; using the current ones until they expire");
                    return Ok(c);
                }
                Err(CredentialsUnavailable { message })
            }
        }
    }
}

impl ProvideCredentials for CachedCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            self.get()
                .await
                .map_err(|e| CredentialsError::not_loaded(e.message))
        })
    }
}
