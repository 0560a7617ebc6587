//! Who the proxy acts for, and which database users it may use.
//!
//! One identity source is active per proxy instance ([`SourceKind`]):
//!
//! - `sso` (default): an IAM Identity Center session; the person's user name
//!   is the session name of the `AWSReservedSSO_*` role. Anything else is
//!   refused rather than guessed.
//! - `saml`: the proxy performs AssumeRoleWithSAML itself and takes the
//!   person's user name from the assertion's `PrincipalTag:userName`.
//! - `workload`: an application's role (instance profile, ECS task role,
//!   EKS IRSA / pod identity); no person, so only the database users the
//!   operator listed are allowed.
//!
//! Credentials are loaded once, cached until shortly before they expire
//! ([`CachedCredentials`]); the identity behind them is confirmed with STS
//! once per access key.

mod arn;
mod credentials;
pub mod saml;
pub mod skew;
pub mod sso;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use thiserror::Error;
use tokio::sync::Mutex;

pub use arn::{ArnError, CallerArn, parse_caller_arn};
pub use credentials::{CachedCredentials, CredentialsUnavailable};
use saml::{SamlError, SamlInput, SamlProvider};
use skew::SkewProbe;
use sso::SsoLogin;

/// Where the person's identity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SourceKind {
    /// AWS SSO / IAM Identity Center profile: user name = Identity Center user name.
    #[default]
    Sso,
    /// SAML assertion: user name = PrincipalTag:userName of the assertion.
    Saml,
    /// Workload role (no person): only the --allow-db-user names.
    Workload,
    /// Gateway mode: each client proved who they are with their own AWS
    /// session (never chosen with --identity-source).
    #[value(skip)]
    Gateway,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Sso => "AWS SSO / IAM Identity Center",
            SourceKind::Saml => "SAML assertion",
            SourceKind::Workload => "workload role",
            SourceKind::Gateway => "gateway proof",
        }
    }

    /// The `--identity-source` value, as written in audit records.
    pub fn key(self) -> &'static str {
        match self {
            SourceKind::Sso => "sso",
            SourceKind::Saml => "saml",
            SourceKind::Workload => "workload",
            SourceKind::Gateway => "gateway",
        }
    }
}

/// How the identity source is configured (validated by [`IdentityOptions::new`]).
/// The default is the SSO source with the standard credential chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityOptions {
    pub kind: SourceKind,
    /// `--profile`; the SDK falls back to AWS_PROFILE, then `default`.
    pub profile: Option<String>,
    /// Workload only: the database users it may use.
    pub allowed_db_users: Vec<String>,
    /// SAML only.
    pub saml: Option<SamlInput>,
    /// SAML only: the role to choose when the assertion offers several.
    pub saml_role: Option<String>,
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OptionsError {
    #[error(
        "--identity-source workload needs at least one --allow-db-user: a workload has no person, so the database users it may use must be listed"
    )]
    WorkloadWithoutUsers,
    #[error(
        "--allow-db-user applies only to --identity-source workload; a person may use only their own database user"
    )]
    UsersWithoutWorkload,
    #[error(
        "--identity-source saml needs the assertion: --saml-assertion-file FILE ('-' for stdin) or --saml-assertion-env VAR"
    )]
    NoSamlAssertion,
    #[error("--saml-assertion-file and --saml-assertion-env apply only to --identity-source saml")]
    SamlWithoutSaml,
    #[error("cannot read the SAML assertion: {0}")]
    SamlRead(String),
}

impl IdentityOptions {
    /// Checks that the flags fit together. `saml_env` is the value of the
    /// variable named by `--saml-assertion-env`; `stdin` reads stdin when
    /// the file is `-`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: SourceKind,
        profile: Option<String>,
        allowed_db_users: Vec<String>,
        saml_file: Option<PathBuf>,
        saml_env: Option<(String, Option<String>)>,
        saml_role: Option<String>,
        stdin: impl FnOnce() -> std::io::Result<String>,
    ) -> Result<Self, OptionsError> {
        match kind {
            SourceKind::Workload if allowed_db_users.is_empty() => {
                return Err(OptionsError::WorkloadWithoutUsers);
            }
            SourceKind::Sso | SourceKind::Saml if !allowed_db_users.is_empty() => {
                return Err(OptionsError::UsersWithoutWorkload);
            }
            SourceKind::Sso | SourceKind::Workload if saml_file.is_some() || saml_env.is_some() => {
                return Err(OptionsError::SamlWithoutSaml);
            }
            _ => {}
        }
        let saml = match (kind, saml_file, saml_env) {
            (SourceKind::Saml, Some(f), _) if f.as_os_str() == "-" => Some(SamlInput::Fixed {
                from: "stdin".into(),
                value: crate::secret::Secret::new(
                    stdin().map_err(|e| OptionsError::SamlRead(format!("stdin: {e}")))?,
                ),
            }),
            (SourceKind::Saml, Some(f), _) => Some(SamlInput::File(f)),
            (SourceKind::Saml, None, Some((var, Some(v)))) => Some(SamlInput::Fixed {
                from: format!("environment variable {var}"),
                value: crate::secret::Secret::new(v),
            }),
            (SourceKind::Saml, None, Some((var, None))) => {
                return Err(OptionsError::SamlRead(format!(
                    "environment variable {var} is not set"
                )));
            }
            (SourceKind::Saml, None, None) => return Err(OptionsError::NoSamlAssertion),
            _ => None,
        };
        Ok(IdentityOptions {
            kind,
            profile,
            allowed_db_users,
            saml,
            saml_role,
        })
    }
}

/// The principal behind the proxy's AWS session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub source: SourceKind,
    /// The person's user name (for a workload: the principal's name).
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
    #[error("your AWS SSO session for profile \"{profile}\" expired at {at}; run: {login}")]
    SsoExpired {
        profile: String,
        at: String,
        login: String,
    },
    #[error("you are not signed in to AWS SSO for profile \"{profile}\"; run: {login}")]
    SsoNotSignedIn { profile: String, login: String },
    #[error(transparent)]
    Saml(#[from] SamlError),
    #[error("STS GetCallerIdentity failed: {0}")]
    CallerIdentity(String),
    #[error("STS returned an incomplete caller identity")]
    IncompleteCaller,
    #[error(transparent)]
    Arn(#[from] arn::ArnError),
    #[error(
        "the AWS session {arn} is not an IAM Identity Center session, so it does not say which person you are; \
         sign in with an SSO profile, or choose --identity-source saml or workload"
    )]
    NotIdentityCenter { arn: String },
    #[error("database user {requested:?} refused: the proxy acts for {person:?}")]
    NotYourUser { requested: String, person: String },
    #[error("database user {requested:?} refused: this workload identity may use only {}", list(.allowed))]
    NotAllowed {
        requested: String,
        allowed: Vec<String>,
    },
}

fn list(users: &[String]) -> String {
    users
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The active source and what it needs at run time.
#[derive(Debug)]
enum Source {
    Sso(Option<SsoLogin>),
    Saml(Arc<SamlProvider>),
    Workload { allowed: Vec<String> },
}

/// Credentials plus the identity they belong to, shared by all connections.
#[derive(Debug)]
pub struct IdentityService {
    creds: CachedCredentials,
    sts: aws_sdk_sts::Client,
    caller: Mutex<Option<Arc<Identity>>>,
    profile: Option<String>,
    source: Source,
    skew: SkewProbe,
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
    pub fn new(sdk: &SdkConfig, options: IdentityOptions) -> Self {
        // The SDK's own variables, read where the SDK reads them, only to
        // name the profile and its SSO cache file in messages.
        let profile = options
            .profile
            .clone()
            .or_else(|| std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty()));
        // SSO and the standard chain are read again from the files after a
        // failure or a rejection (see credentials.rs); SAML re-reads its
        // assertion by itself.
        let reload = reload(options.profile.clone(), sdk.region().map(|r| r.to_string()));
        let (source, chain, rebuild) = match options.kind {
            // A gateway never asks its own identity service (each client
            // brings a proof); it gets the default one, unused.
            SourceKind::Sso | SourceKind::Gateway => {
                let home = std::env::var_os("HOME").map(PathBuf::from);
                let config_file = std::env::var_os("AWS_CONFIG_FILE")
                    .map(PathBuf::from)
                    .or_else(|| home.as_ref().map(|h| h.join(".aws/config")));
                let login = match (config_file, home) {
                    (Some(c), Some(h)) => {
                        SsoLogin::locate(&c, &h, profile.as_deref().unwrap_or("default"))
                    }
                    _ => None,
                };
                (Source::Sso(login), sdk.credentials_provider(), Some(reload))
            }
            SourceKind::Saml => {
                let input = options.saml.clone().expect("validated: saml has an input");
                let provider = Arc::new(SamlProvider::new(input, options.saml_role.clone(), sdk));
                let chain = SharedCredentialsProvider::new(SharedSaml(provider.clone()));
                (Source::Saml(provider), Some(chain), None)
            }
            SourceKind::Workload => (
                Source::Workload {
                    allowed: options.allowed_db_users.clone(),
                },
                sdk.credentials_provider(),
                Some(reload),
            ),
        };
        let creds = CachedCredentials::with_rebuild(chain, rebuild);
        let skew = SkewProbe::default();
        let sts_config = aws_sdk_sts::config::Builder::from(sdk)
            .credentials_provider(SharedCredentialsProvider::new(creds.clone()))
            .interceptor(skew.clone())
            .build();
        Self {
            creds,
            sts: aws_sdk_sts::Client::from_conf(sts_config),
            caller: Mutex::new(None),
            profile,
            source,
            skew,
        }
    }

    /// The profile in use, for messages.
    pub fn profile(&self) -> Option<&str> {
        self.profile.as_deref()
    }

    pub fn kind(&self) -> SourceKind {
        match self.source {
            Source::Sso(_) => SourceKind::Sso,
            Source::Saml(_) => SourceKind::Saml,
            Source::Workload { .. } => SourceKind::Workload,
        }
    }

    /// The database users this proxy may use: the person's own, or the
    /// workload's list.
    pub fn db_users(&self, id: &Identity) -> Vec<String> {
        match &self.source {
            Source::Workload { allowed } => allowed.clone(),
            _ => vec![id.user_name.clone()],
        }
    }

    /// The measured clock skew against AWS, when it matters.
    pub fn clock_skew(&self) -> Option<i64> {
        self.skew.significant()
    }

    /// The IAM Identity Center login behind the profile, if any.
    pub fn sso_login(&self) -> Option<&SsoLogin> {
        match &self.source {
            Source::Sso(l) => l.as_ref(),
            _ => None,
        }
    }

    /// May this identity use database user `db_user`, and with which
    /// credentials. Checked before any token is signed.
    pub async fn authorize(
        &self,
        db_user: &str,
    ) -> Result<(Credentials, Arc<Identity>), IdentityError> {
        if let Source::Workload { allowed } = &self.source
            && !allowed.iter().any(|u| u == db_user)
        {
            return Err(IdentityError::NotAllowed {
                requested: db_user.to_owned(),
                allowed: allowed.clone(),
            });
        }
        let (creds, id) = self.current().await?;
        if !matches!(self.source, Source::Workload { .. }) && db_user != id.user_name {
            return Err(IdentityError::NotYourUser {
                requested: db_user.to_owned(),
                person: id.user_name.clone(),
            });
        }
        Ok((creds, id))
    }

    /// Current credentials and the identity they carry. STS is asked only
    /// when the credentials changed since the last call.
    pub async fn current(&self) -> Result<(Credentials, Arc<Identity>), IdentityError> {
        let creds = match self.creds.get().await {
            Ok(c) => c,
            Err(e) => return Err(self.explain(e)),
        };
        let mut caller = self.caller.lock().await;
        if let Some(id) = caller.as_ref()
            && id.access_key_id == creds.access_key_id()
        {
            return Ok((creds, id.clone()));
        }
        let out = self.sts.get_caller_identity().send().await.map_err(|e| {
            // GetCallerIdentity needs no permission: an answer from STS
            // that is an error means these credentials were refused.
            if e.as_service_error().is_some() {
                self.creds.reject(creds.access_key_id());
            }
            IdentityError::CallerIdentity(error_chain(&e))
        })?;
        let (Some(arn), Some(account)) = (out.arn(), out.account()) else {
            return Err(IdentityError::IncompleteCaller);
        };
        let parsed = parse_caller_arn(arn)?;
        let user_name = match &self.source {
            Source::Sso(_) if !parsed.is_identity_center() => {
                return Err(IdentityError::NotIdentityCenter {
                    arn: arn.to_owned(),
                });
            }
            Source::Saml(p) => p
                .user_for(creds.access_key_id())
                .ok_or(IdentityError::Saml(SamlError::NoUserTag))?,
            _ => parsed.user_name().to_owned(),
        };
        let id = Arc::new(Identity {
            source: self.kind(),
            user_name,
            arn: arn.to_owned(),
            account: account.to_owned(),
            access_key_id: creds.access_key_id().to_owned(),
            expires: creds.expiry(),
        });
        tracing::info!(
            source = self.kind().as_str(),
            user = %id.user_name,
            arn = %id.arn,
            account = %id.account,
            access_key_id = %id.access_key_id,
            "AWS identity confirmed"
        );
        if let Some(skew) = self.skew.significant() {
            tracing::warn!(
                skew_s = skew,
                "{}: tokens signed here may be refused by the database; fix the clock (NTP)",
                skew::describe(skew)
            );
        }
        *caller = Some(id.clone());
        Ok((creds, id))
    }

    /// Turns "no credentials" into the source's own words where it can.
    fn explain(&self, e: CredentialsUnavailable) -> IdentityError {
        match &self.source {
            Source::Sso(Some(login)) => {
                let now = SystemTime::now();
                let Some(state) = login.state() else {
                    return IdentityError::SsoNotSignedIn {
                        profile: login.profile.clone(),
                        login: login.login_command(),
                    };
                };
                match state.expires_at {
                    Some(at) if at <= now + credentials::MIN_REMAINING => {
                        IdentityError::SsoExpired {
                            profile: login.profile.clone(),
                            at: sso::utc_hhmm(at, now),
                            login: login.login_command(),
                        }
                    }
                    _ => e.into(),
                }
            }
            // The assertion's own problem (expired, no tag, roles) when it has one.
            Source::Saml(p) => match p.check() {
                Err(s) => s.into(),
                Ok(_) => SamlError::Sts(e.message).into(),
            },
            _ => e.into(),
        }
    }

    /// Logs a warning once when the SSO login will end within `ahead` and
    /// cannot be renewed without the person. Runs until dropped.
    pub async fn watch_expiry(&self, ahead: std::time::Duration) {
        let mut warned_for = None;
        loop {
            if let Some(login) = self.sso_login()
                && let Some(state) = login.state()
                && let Some(at) = state.expires_at
            {
                let now = SystemTime::now();
                if !state.refreshable && at > now && at <= now + ahead && warned_for != Some(at) {
                    warned_for = Some(at);
                    tracing::warn!(
                        profile = %login.profile,
                        "your AWS SSO session for profile \"{}\" ends at {}; new connections will be refused after that; run: {}",
                        login.profile,
                        sso::utc_hhmm(at, now),
                        login.login_command()
                    );
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        }
    }
}

/// Makes the standard chain (for `profile`) again from the files on disk.
fn reload(profile: Option<String>, region: Option<String>) -> credentials::Rebuild {
    Arc::new(move || {
        let (profile, region) = (profile.clone(), region.clone());
        Box::pin(async move {
            IdentityService::load_sdk_config(profile.as_deref(), region.as_deref())
                .await
                .credentials_provider()
        })
    })
}

/// Lets the SAML provider sit inside the cached chain while the service
/// keeps a handle to ask it whose credentials they are.
#[derive(Debug)]
struct SharedSaml(Arc<SamlProvider>);

impl aws_credential_types::provider::ProvideCredentials for SharedSaml {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        self.0.provide_credentials()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(
        kind: SourceKind,
        users: &[&str],
        file: Option<&str>,
        env: Option<(&str, Option<&str>)>,
    ) -> Result<IdentityOptions, OptionsError> {
        IdentityOptions::new(
            kind,
            None,
            users.iter().map(|u| u.to_string()).collect(),
            file.map(PathBuf::from),
            env.map(|(k, v)| (k.to_owned(), v.map(str::to_owned))),
            None,
            || Ok("PHNhbWxwOlJlc3BvbnNlLz4=".into()),
        )
    }

    #[test]
    fn flags_must_fit_the_source() {
        use OptionsError::*;
        assert!(opts(SourceKind::Sso, &[], None, None).is_ok());
        assert_eq!(
            opts(SourceKind::Workload, &[], None, None).unwrap_err(),
            WorkloadWithoutUsers
        );
        assert_eq!(
            opts(SourceKind::Sso, &["app"], None, None).unwrap_err(),
            UsersWithoutWorkload
        );
        assert_eq!(
            opts(SourceKind::Workload, &["app"], Some("f"), None).unwrap_err(),
            SamlWithoutSaml
        );
        assert_eq!(
            opts(SourceKind::Saml, &[], None, None).unwrap_err(),
            NoSamlAssertion
        );
        assert!(matches!(
            opts(SourceKind::Saml, &[], None, Some(("SAML", None))).unwrap_err(),
            SamlRead(m) if m.contains("SAML is not set")
        ));
        let o = opts(SourceKind::Saml, &[], Some("-"), None).unwrap();
        assert!(
            matches!(o.saml, Some(SamlInput::Fixed { ref from, ref value }) if from == "stdin" && value.expose().starts_with("PHN"))
        );
        let o = opts(SourceKind::Saml, &[], None, Some(("SAML", Some("x")))).unwrap();
        assert_eq!(o.saml.unwrap().describe(), "environment variable SAML");
    }
}
