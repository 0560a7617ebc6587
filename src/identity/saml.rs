//! SAML identity: the proxy performs the AssumeRoleWithSAML exchange itself,
//! because that is the only place where the person's `PrincipalTag:userName`
//! is visible (no STS API returns session tags).
//!
//! The assertion is a base64 SAML Response, as saml2aws and similar tools
//! produce, read from a file (re-read at every refresh, so a fresh assertion
//! written there is picked up live), from stdin or from an environment
//! variable (both read once at start-up). XML is parsed with roxmltree,
//! which rejects any DTD, so no entity is ever expanded.
//!
//! The signature is AWS's to check (STS validates it against the IAM SAML
//! provider); the proxy checks what it relies on: not expired, one role
//! chosen, and the user-name tag present.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, error::CredentialsError, future};
use thiserror::Error;
use zeroize::Zeroizing;

use super::sso::utc_hhmm;
use crate::secret::Secret;

const ATTR: &str = "https://aws.amazon.com/SAML/Attributes/";
const SAML_ASSERTION_NS: &str = "urn:oasis:names:tc:SAML:2.0:assertion";
/// A SAML response larger than this is not an assertion anyone sends.
const MAX_ASSERTION_BYTES: u64 = 1 << 20;

/// Where the base64 SAML response comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SamlInput {
    /// Re-read at every refresh.
    File(PathBuf),
    /// Read once at start-up: from stdin, or from the named variable.
    Fixed { from: String, value: Secret },
}

impl SamlInput {
    /// The assertion (a bearer credential until it expires): wiped when
    /// dropped.
    fn read(&self) -> Result<Zeroizing<String>, SamlError> {
        match self {
            SamlInput::File(p) => {
                let meta = std::fs::metadata(p).map_err(|e| SamlError::Read {
                    from: p.display().to_string(),
                    reason: e.to_string(),
                })?;
                if meta.len() > MAX_ASSERTION_BYTES {
                    return Err(SamlError::TooLarge);
                }
                std::fs::read_to_string(p)
                    .map(Zeroizing::new)
                    .map_err(|e| SamlError::Read {
                        from: p.display().to_string(),
                        reason: e.to_string(),
                    })
            }
            SamlInput::Fixed { value, .. } => Ok(Zeroizing::new(value.expose().to_owned())),
        }
    }

    /// Where a fresh assertion has to go, for messages.
    pub fn describe(&self) -> String {
        match self {
            SamlInput::File(p) => format!("file {}", p.display()),
            SamlInput::Fixed { from, .. } => from.clone(),
        }
    }
}

/// Why an assertion cannot be used. Messages say what to do.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SamlError {
    #[error("cannot read the SAML assertion from {from}: {reason}")]
    Read { from: String, reason: String },
    #[error("the SAML assertion is larger than 1 MiB")]
    TooLarge,
    #[error("the SAML assertion is not base64")]
    Base64,
    #[error("the SAML assertion is not well-formed XML without a DTD: {0}")]
    Xml(String),
    #[error("the SAML response holds no Assertion")]
    NoAssertion,
    #[error(
        "the SAML assertion expired at {0}; sign in to your identity provider again for a fresh one"
    )]
    Expired(String),
    #[error(
        "the SAML assertion carries no PrincipalTag:userName (or AccessControl:userName) attribute; \
         without it the proxy cannot tell which database user is yours. Ask the IdP administrators \
         to send the userName session tag"
    )]
    NoUserTag,
    #[error("the SAML assertion offers no AWS role")]
    NoRole,
    #[error(
        "the SAML assertion offers several roles ({}); choose one with --saml-role ROLE_ARN",
        .0.join(", ")
    )]
    SeveralRoles(Vec<String>),
    #[error("the SAML assertion does not offer role {0}")]
    RoleNotOffered(String),
    #[error("STS AssumeRoleWithSAML failed: {0}")]
    Sts(String),
}

impl SamlError {
    /// What a database client is told: what is wrong with the assertion,
    /// without its paths, roles, XML or STS's answer (those go to the log).
    pub fn client_text(&self) -> &'static str {
        match self {
            SamlError::Read { .. } => "the SAML assertion cannot be read",
            SamlError::TooLarge => "the SAML assertion is larger than 1 MiB",
            SamlError::Base64 => "the SAML assertion is not base64",
            SamlError::Xml(_) => "the SAML assertion is not well-formed XML without a DTD",
            SamlError::NoAssertion => "the SAML response holds no Assertion",
            SamlError::Expired(_) => {
                "the SAML assertion expired; sign in to your identity provider again for a fresh one"
            }
            SamlError::NoUserTag => {
                "the SAML assertion carries no PrincipalTag:userName (or AccessControl:userName) \
                 attribute, so the proxy cannot tell which database user is yours"
            }
            SamlError::NoRole => "the SAML assertion offers no AWS role",
            SamlError::SeveralRoles(_) => {
                "the SAML assertion offers several roles; the proxy must be started with --saml-role"
            }
            SamlError::RoleNotOffered(_) => {
                "the SAML assertion does not offer the role given with --saml-role"
            }
            SamlError::Sts(_) => "STS refused the SAML assertion (AssumeRoleWithSAML)",
        }
    }
}

/// What the proxy reads from an assertion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assertion {
    /// (role ARN, SAML provider ARN) pairs.
    pub roles: Vec<(String, String)>,
    pub session_name: Option<String>,
    pub session_duration: Option<i32>,
    /// `PrincipalTag:userName`, else `AccessControl:userName`.
    pub user_name: Option<String>,
    /// The earliest NotOnOrAfter of the conditions and subject confirmations.
    pub not_on_or_after: Option<SystemTime>,
}

/// The role to assume and who the person is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub role_arn: String,
    pub principal_arn: String,
    pub user_name: String,
    pub session_duration: Option<i32>,
}

impl Assertion {
    /// Parses a base64 SAML response.
    pub fn parse_base64(b64: &str) -> Result<Assertion, SamlError> {
        let compact: Zeroizing<String> = Zeroizing::new(b64.split_whitespace().collect());
        let xml = Zeroizing::new(
            aws_smithy_types::base64::decode(compact.as_str()).map_err(|_| SamlError::Base64)?,
        );
        let xml = std::str::from_utf8(&xml).map_err(|_| SamlError::Xml("not UTF-8".into()))?;
        Assertion::parse_xml(xml)
    }

    pub fn parse_xml(xml: &str) -> Result<Assertion, SamlError> {
        // Default options: DTDs are refused, so no entity expansion at all.
        let doc = roxmltree::Document::parse(xml).map_err(|e| SamlError::Xml(e.to_string()))?;
        let assertion = doc
            .descendants()
            .find(|n| n.has_tag_name((SAML_ASSERTION_NS, "Assertion")))
            .ok_or(SamlError::NoAssertion)?;
        let mut out = Assertion::default();
        for n in assertion.descendants() {
            let bounded = n.has_tag_name((SAML_ASSERTION_NS, "Conditions"))
                || n.has_tag_name((SAML_ASSERTION_NS, "SubjectConfirmationData"));
            if bounded && let Some(t) = n.attribute("NotOnOrAfter").and_then(parse_time) {
                out.not_on_or_after = Some(out.not_on_or_after.map_or(t, |o| o.min(t)));
            }
            if !n.has_tag_name((SAML_ASSERTION_NS, "Attribute")) {
                continue;
            }
            let Some(name) = n.attribute("Name").and_then(|a| a.strip_prefix(ATTR)) else {
                continue;
            };
            let values: Vec<String> = n
                .children()
                .filter(|c| c.has_tag_name((SAML_ASSERTION_NS, "AttributeValue")))
                .map(|c| c.text().unwrap_or("").trim().to_owned())
                .collect();
            match name {
                "Role" => {
                    for v in &values {
                        if let Some(pair) = role_pair(v) {
                            out.roles.push(pair);
                        }
                    }
                }
                "RoleSessionName" => out.session_name = values.into_iter().next(),
                "SessionDuration" => {
                    out.session_duration = values.first().and_then(|v| v.parse().ok())
                }
                "PrincipalTag:userName" => {
                    out.user_name = values.into_iter().find(|v| !v.is_empty())
                }
                "AccessControl:userName" if out.user_name.is_none() => {
                    out.user_name = values.into_iter().find(|v| !v.is_empty())
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Checks expiry, the tag and the role choice.
    pub fn choose(&self, role: Option<&str>, now: SystemTime) -> Result<Chosen, SamlError> {
        if let Some(t) = self.not_on_or_after
            && t <= now
        {
            return Err(SamlError::Expired(utc_hhmm(t, now)));
        }
        let user_name = self.user_name.clone().ok_or(SamlError::NoUserTag)?;
        let (role_arn, principal_arn) = match (role, self.roles.as_slice()) {
            (_, []) => return Err(SamlError::NoRole),
            (Some(r), roles) => roles
                .iter()
                .find(|(a, _)| a == r)
                .cloned()
                .ok_or_else(|| SamlError::RoleNotOffered(r.to_owned()))?,
            (None, [one]) => one.clone(),
            (None, several) => {
                return Err(SamlError::SeveralRoles(
                    several.iter().map(|(a, _)| a.clone()).collect(),
                ));
            }
        };
        Ok(Chosen {
            role_arn,
            principal_arn,
            user_name,
            session_duration: self.session_duration,
        })
    }
}

/// `role-arn,provider-arn`, in either order (IdPs differ).
fn role_pair(v: &str) -> Option<(String, String)> {
    let (a, b) = v.split_once(',')?;
    let (a, b) = (a.trim(), b.trim());
    if a.contains(":role/") && b.contains(":saml-provider/") {
        Some((a.to_owned(), b.to_owned()))
    } else if b.contains(":role/") && a.contains(":saml-provider/") {
        Some((b.to_owned(), a.to_owned()))
    } else {
        None
    }
}

fn parse_time(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// A credentials provider that performs AssumeRoleWithSAML with the current
/// assertion, and remembers which person each access key belongs to.
#[derive(Debug)]
pub struct SamlProvider {
    input: SamlInput,
    role: Option<String>,
    sts: aws_sdk_sts::Client,
    /// (access key id, user name) of the last credentials; the cache above
    /// holds only those.
    last: Mutex<Option<(String, String)>>,
}

impl SamlProvider {
    pub fn new(input: SamlInput, role: Option<String>, sdk: &aws_config::SdkConfig) -> Self {
        // AssumeRoleWithSAML is an unsigned call (the SDK's auth scheme for it
        // is "no auth"): the assertion is the credential.
        let conf = aws_sdk_sts::config::Builder::from(sdk).build();
        Self {
            input,
            role,
            sts: aws_sdk_sts::Client::from_conf(conf),
            last: Mutex::new(None),
        }
    }

    /// Reads and checks the assertion without calling AWS.
    pub fn check(&self) -> Result<(Chosen, Zeroizing<String>), SamlError> {
        let b64 = self.input.read()?;
        let chosen =
            Assertion::parse_base64(&b64)?.choose(self.role.as_deref(), SystemTime::now())?;
        Ok((chosen, b64))
    }

    /// The person behind credentials this provider produced.
    pub fn user_for(&self, access_key_id: &str) -> Option<String> {
        self.last
            .lock()
            .expect("lock poisoned")
            .as_ref()
            .filter(|(key, _)| key == access_key_id)
            .map(|(_, user)| user.clone())
    }

    pub fn input(&self) -> &SamlInput {
        &self.input
    }

    async fn assume(&self) -> Result<Credentials, SamlError> {
        let (chosen, b64) = self.check()?;
        let compact: String = b64.split_whitespace().collect();
        let out = self
            .sts
            .assume_role_with_saml()
            .role_arn(&chosen.role_arn)
            .principal_arn(&chosen.principal_arn)
            .saml_assertion(compact)
            .set_duration_seconds(chosen.session_duration)
            .send()
            .await
            .map_err(|e| SamlError::Sts(super::error_chain(&e)))?;
        let c = out
            .credentials()
            .ok_or_else(|| SamlError::Sts("the response holds no credentials".into()))?;
        let expiry = SystemTime::try_from(*c.expiration()).ok();
        let creds = Credentials::new(
            c.access_key_id(),
            c.secret_access_key(),
            Some(c.session_token().to_owned()),
            expiry,
            "AssumeRoleWithSAML",
        );
        tracing::info!(
            user = %chosen.user_name,
            role = %chosen.role_arn,
            expires_in_s = expiry
                .and_then(|e| e.duration_since(SystemTime::now()).ok())
                .unwrap_or(Duration::ZERO)
                .as_secs(),
            "assumed a role with the SAML assertion"
        );
        *self.last.lock().expect("lock poisoned") =
            Some((creds.access_key_id().to_owned(), chosen.user_name));
        Ok(creds)
    }
}

impl ProvideCredentials for SamlProvider {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            self.assume()
                .await
                .map_err(|e| CredentialsError::not_loaded(e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn response(attrs: &[(&str, &[&str])], not_on_or_after: &str) -> String {
        let mut a = String::new();
        for (name, values) in attrs {
            a.push_str(&format!("<saml:Attribute Name=\"{ATTR}{name}\">"));
            for v in *values {
                a.push_str(&format!("<saml:AttributeValue>{v}</saml:AttributeValue>"));
            }
            a.push_str("</saml:Attribute>");
        }
        format!(
            "<samlp:Response xmlns:samlp=\"urn:oasis:names:tc:SAML:2.0:protocol\" xmlns:saml=\"{SAML_ASSERTION_NS}\">\
             <saml:Assertion><saml:Subject><saml:SubjectConfirmation><saml:SubjectConfirmationData NotOnOrAfter=\"{not_on_or_after}\"/>\
             </saml:SubjectConfirmation></saml:Subject><saml:Conditions NotOnOrAfter=\"{not_on_or_after}\"/>\
             <saml:AttributeStatement>{a}</saml:AttributeStatement></saml:Assertion></samlp:Response>"
        )
    }

    const ROLE: &str = "arn:aws:iam::1:role/Dba,arn:aws:iam::1:saml-provider/Corp";

    fn at(s: &str) -> SystemTime {
        parse_time(s).unwrap()
    }

    #[test]
    fn reads_role_tag_and_expiry() {
        let xml = response(
            &[
                ("Role", &[ROLE]),
                ("RoleSessionName", &["arianna@corp"]),
                ("SessionDuration", &["3600"]),
                ("PrincipalTag:userName", &["arianna"]),
            ],
            "2026-11-26T14:02:00Z",
        );
        let b64 = aws_smithy_types::base64::encode(xml.as_bytes());
        let a = Assertion::parse_base64(&b64).unwrap();
        assert_eq!(a.session_name.as_deref(), Some("arianna@corp"));
        let c = a.choose(None, at("2026-11-26T14:00:00Z")).unwrap();
        assert_eq!(c.user_name, "arianna");
        assert_eq!(c.role_arn, "arn:aws:iam::1:role/Dba");
        assert_eq!(c.principal_arn, "arn:aws:iam::1:saml-provider/Corp");
        assert_eq!(c.session_duration, Some(3600));
        assert_eq!(
            a.choose(None, at("2026-11-26T14:02:00Z")),
            Err(SamlError::Expired("14:02 UTC".into()))
        );
    }

    #[test]
    fn refuses_missing_tag_and_unchosen_roles() {
        let t = "2099-01-01T00:00:00Z";
        let now = at("2026-01-01T00:00:00Z");
        let a = Assertion::parse_xml(&response(&[("Role", &[ROLE])], t)).unwrap();
        assert_eq!(a.choose(None, now), Err(SamlError::NoUserTag));
        let other = "arn:aws:iam::1:saml-provider/Corp,arn:aws:iam::1:role/ReadOnly";
        let a = Assertion::parse_xml(&response(
            &[
                ("Role", &[ROLE, other]),
                ("AccessControl:userName", &["bob"]),
            ],
            t,
        ))
        .unwrap();
        assert!(matches!(a.choose(None, now), Err(SamlError::SeveralRoles(r)) if r.len() == 2));
        let c = a.choose(Some("arn:aws:iam::1:role/ReadOnly"), now).unwrap();
        assert_eq!(
            (c.user_name.as_str(), c.principal_arn.as_str()),
            ("bob", "arn:aws:iam::1:saml-provider/Corp")
        );
        assert!(matches!(
            a.choose(Some("arn:aws:iam::1:role/Nope"), now),
            Err(SamlError::RoleNotOffered(_))
        ));
    }

    #[test]
    fn refuses_dtds_and_garbage() {
        let bomb = "<?xml version=\"1.0\"?><!DOCTYPE r [<!ENTITY a \"aaaa\"><!ENTITY b \"&a;&a;\">]><r>&b;</r>";
        assert!(matches!(Assertion::parse_xml(bomb), Err(SamlError::Xml(_))));
        assert_eq!(Assertion::parse_base64("***"), Err(SamlError::Base64));
        assert_eq!(Assertion::parse_xml("<r/>"), Err(SamlError::NoAssertion));
    }
}
