//! Who the proxy acts for: AWS credentials (loaded once, cached until
//! shortly before they expire) and the person's user name behind them.

mod arn;
mod credentials;

use std::sync::Arc;
use std::time::SystemTime;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use thiserror::Error;
use tokio::sync::Mutex;

pub use arn::{CallerArn, parse_caller_arn};
pub use credentials::{CachedCredentials, CredentialsUnavailable};

/// The person (or principal) behind the proxy's AWS session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The database user name this identity may use.
    pub user_name: String,
    pub arn: String,
    pub account: String,
    pub access_key_id: String,
    /// When the credentials expire, if they do.
    pub expires: Option<SystemTime>,
}

/// Identity failures; each names what the person can do about it.
#[derive(Debug, Error)]
pub enum IdentityError {
    #[error(transparent)]
    Credentials(#[from] CredentialsUnavailable),
    #[error("STS GetCallerIdentity failed: {0}")]
    CallerIdentity(String),
    #[error("STS returned an incomplete caller identity")]
    IncompleteCaller,
    #[error(transparent)]
    Arn(#[from] arn::ArnError),
}

/// Credentials plus the identity they belong to, shared by all connections.
#[derive(Debug)]
pub struct IdentityService {
    creds: CachedCredentials,
    sts: aws_sdk_sts::Client,
    caller: Mutex<Option<Arc<Identity>>>,
    profile: Option<String>,
}

impl IdentityService {
    /// Loads the AWS configuration once: the standard chain, or `profile`.
    pub async fn load_sdk_config(profile: Option<&str>, region: Option<&str>) -> SdkConfig {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(p) = profile {
            loader = loader.profile_name(p);
        }
        if let Some(r) = region {
            loader = loader.region(Region::new(r.to_owned()));
        }
        loader.load().await
    }

    /// Builds the service from a loaded configuration.
    pub fn new(sdk: &SdkConfig, profile: Option<String>) -> Self {
        let creds = CachedCredentials::new(sdk.credentials_provider());
        let sts_config = aws_sdk_sts::config::Builder::from(sdk)
            .credentials_provider(SharedCredentialsProvider::new(creds.clone()))
            .build();
        Self {
            creds,
            sts: aws_sdk_sts::Client::from_conf(sts_config),
            caller: Mutex::new(None),
            profile,
        }
    }

    /// The profile in use, for messages.
    pub fn profile(&self) -> Option<&str> {
        self.profile.as_deref()
    }

    /// Current credentials and the identity they carry. STS is asked only
    /// when the credentials changed since the last call.
    pub async fn current(&self) -> Result<(Credentials, Arc<Identity>), IdentityError> {
        let creds = self.creds.get().await?;
        let mut caller = self.caller.lock().await;
        if let Some(id) = caller.as_ref()
            && id.access_key_id == creds.access_key_id()
        {
            return Ok((creds, id.clone()));
        }
        let out = self
            .sts
            .get_caller_identity()
            .send()
            .await
            .map_err(|e| IdentityError::CallerIdentity(error_chain(&e)))?;
        let (Some(arn), Some(account)) = (out.arn(), out.account()) else {
            return Err(IdentityError::IncompleteCaller);
        };
        let parsed = parse_caller_arn(arn)?;
        let id = Arc::new(Identity {
            user_name: parsed.user_name().to_owned(),
            arn: arn.to_owned(),
            account: account.to_owned(),
            access_key_id: creds.access_key_id().to_owned(),
            expires: creds.expiry(),
        });
        tracing::info!(
            user = %id.user_name,
            arn = %id.arn,
            account = %id.account,
            access_key_id = %id.access_key_id,
            "AWS identity confirmed"
        );
        *caller = Some(id.clone());
        Ok((creds, id))
    }
}

/// An error with its causes, one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}
