//! Expiry-aware caching of the AWS credential chain.
//!
//! `SdkConfig::credentials_provider()` asks its source every time (for SSO:
//! a GetRoleCredentials call). This wrapper keeps the last credentials
//! until shortly before they expire and lets one refresh run at a time.
//!
//! Nothing rejected stays cached. The SDK's providers keep state of their
//! own (the SSO token provider holds the portal access token in memory
//! until its last five minutes), so after a sign-out and a new
//! `aws sso login` they would go on presenting the old token for hours.
//! When the source fails, or STS rejects what it gave, the source is built
//! again from the files on disk ([`Rebuild`]) and asked once more.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Builds the credential source anew (the AWS configuration read again
/// from disk); `None` when it now has none.
pub type Rebuild = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Option<SharedCredentialsProvider>> + Send>>
        + Send
        + Sync,
>;

#[derive(Clone)]
pub struct CachedCredentials {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CachedCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedCredentials")
            .field("rebuilds", &self.inner.rebuild.is_some())
            .finish_non_exhaustive()
    }
}

struct Inner {
    source: StdMutex<Option<SharedCredentialsProvider>>,
    rebuild: Option<Rebuild>,
    /// The source failed or its credentials were rejected: build it again
    /// before asking it next time.
    stale: AtomicBool,
    cached: StdMutex<Option<Credentials>>,
    refresh: Mutex<()>,
}

impl CachedCredentials {
    /// A source that is never rebuilt.
    pub fn new(source: Option<SharedCredentialsProvider>) -> Self {
        Self::with_rebuild(source, None)
    }

    /// A source that `rebuild` makes anew after a failure or a rejection.
    pub fn with_rebuild(
        source: Option<SharedCredentialsProvider>,
        rebuild: Option<Rebuild>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                source: StdMutex::new(source),
                rebuild,
                stale: AtomicBool::new(false),
                cached: StdMutex::new(None),
                refresh: Mutex::new(()),
            }),
        }
    }

    /// STS (or another AWS API) refused these credentials: forget them, and
    /// build the source again before the next attempt (nothing changes when
    /// they are no longer the cached ones).
    pub fn reject(&self, access_key_id: &str) {
        let mut cached = self.inner.cached.lock().expect("lock poisoned");
        if cached
            .as_ref()
            .is_some_and(|c| c.access_key_id() == access_key_id)
        {
            *cached = None;
            self.inner.stale.store(true, Ordering::Relaxed);
        }
    }

    async fn rebuild_source(&self) {
        let Some(rebuild) = &self.inner.rebuild else {
            return;
        };
        let fresh = rebuild().await;
        tracing::debug!(
            found = fresh.is_some(),
            "AWS credential source built again from the configuration files"
        );
        *self.inner.source.lock().expect("lock poisoned") = fresh;
        self.inner.stale.store(false, Ordering::Relaxed);
    }

    fn source(&self) -> Option<SharedCredentialsProvider> {
        self.inner.source.lock().expect("lock poisoned").clone()
    }

    async fn ask(&self) -> Result<Credentials, CredentialsUnavailable> {
        let Some(source) = self.source() else {
            return Err(CredentialsUnavailable {
                message:
                    "no credential source is configured (no profile, environment keys or role)"
                        .into(),
            });
        };
        source
            .provide_credentials()
            .await
            .map_err(|e| CredentialsUnavailable {
                message: crate::identity::error_chain(&e),
            })
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
        let rebuilt = self.inner.stale.load(Ordering::Relaxed);
        if rebuilt {
            self.rebuild_source().await;
        }
        let mut answer = self.ask().await;
        if answer.is_err() && !rebuilt && self.inner.rebuild.is_some() {
            // What failed may be state the source keeps in memory (an SSO
            // token signed out since): read the files again, now.
            self.rebuild_source().await;
            answer = self.ask().await;
        }
        if answer.is_err() && self.inner.rebuild.is_some() {
            self.inner.stale.store(true, Ordering::Relaxed);
        }
        match answer {
            Ok(c) => {
                tracing::debug!(access_key_id = c.access_key_id(), expiry = ?c.expiry(), "AWS credentials loaded");
                *self.inner.cached.lock().expect("lock poisoned") = Some(c.clone());
                Ok(c)
            }
            Err(CredentialsUnavailable { message }) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A source that fails, or gives credentials with key `AKID<n>` valid
    /// for an hour; counts how often it was asked.
    #[derive(Debug)]
    struct Fixed {
        ok: Option<usize>,
        asked: Arc<AtomicUsize>,
    }

    impl ProvideCredentials for Fixed {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            self.asked.fetch_add(1, Ordering::Relaxed);
            future::ProvideCredentials::ready(match self.ok {
                Some(n) => Ok(Credentials::new(
                    format!("AKID{n}"),
                    "secret",
                    None,
                    Some(SystemTime::now() + Duration::from_secs(3600)),
                    "test",
                )),
                None => Err(CredentialsError::not_loaded("signed out")),
            })
        }
    }

    /// Each rebuild makes the next source in `plan` (None: failing).
    fn rebuilding(
        plan: Vec<Option<usize>>,
        asked: Arc<AtomicUsize>,
    ) -> (CachedCredentials, Arc<AtomicUsize>) {
        let built = Arc::new(AtomicUsize::new(0));
        let plan = Arc::new(plan);
        let (b, a) = (built.clone(), asked.clone());
        let rebuild: Rebuild = Arc::new(move || {
            let n = b.fetch_add(1, Ordering::Relaxed);
            let ok = plan.get(n).copied().flatten();
            let asked = a.clone();
            Box::pin(async move { Some(SharedCredentialsProvider::new(Fixed { ok, asked })) })
        });
        let first = SharedCredentialsProvider::new(Fixed {
            ok: None,
            asked: asked.clone(),
        });
        (
            CachedCredentials::with_rebuild(Some(first), Some(rebuild)),
            built,
        )
    }

    #[tokio::test]
    async fn a_failing_source_is_built_again_and_asked_at_once() {
        let asked = Arc::new(AtomicUsize::new(0));
        let (creds, built) = rebuilding(vec![Some(1)], asked.clone());
        let c = creds.get().await.unwrap();
        assert_eq!(c.access_key_id(), "AKID1");
        assert_eq!(built.load(Ordering::Relaxed), 1);
        assert_eq!(asked.load(Ordering::Relaxed), 2);
        // Cached from now on: no more asking, no more building.
        creds.get().await.unwrap();
        assert_eq!(asked.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_source_still_failing_after_a_rebuild_is_built_again_next_time() {
        let asked = Arc::new(AtomicUsize::new(0));
        let (creds, built) = rebuilding(vec![None, Some(2)], asked);
        assert!(creds.get().await.is_err());
        assert_eq!(built.load(Ordering::Relaxed), 1);
        assert_eq!(creds.get().await.unwrap().access_key_id(), "AKID2");
        assert_eq!(built.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn rejected_credentials_are_dropped_and_the_source_rebuilt() {
        let asked = Arc::new(AtomicUsize::new(0));
        let (creds, built) = rebuilding(vec![Some(1), Some(2)], asked);
        assert_eq!(creds.get().await.unwrap().access_key_id(), "AKID1");
        // Someone else's key changes nothing.
        creds.reject("AKIDX");
        assert_eq!(creds.get().await.unwrap().access_key_id(), "AKID1");
        creds.reject("AKID1");
        assert_eq!(creds.get().await.unwrap().access_key_id(), "AKID2");
        assert_eq!(built.load(Ordering::Relaxed), 2);
    }
}
