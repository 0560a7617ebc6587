//! Gateway mode: one shared proxy (a bastion) in front of a cluster, used
//! by several people, each proven by their own AWS session.
//!
//! The person's machine sends a [`proof`] as its PostgreSQL password: a
//! presigned `sts:GetCallerIdentity` bound to this gateway's id, and an RDS
//! token signed by the same credentials. The gateway checks the proof
//! ([`proof::check`], no I/O), refuses a proof it has seen ([`ReplaySet`]),
//! asks STS who signed it ([`sts`]), checks that the caller is a role and
//! account it trusts ([`Trust`]) and that the requested database user is
//! the person's, and logs in with the person's own token. The gateway holds
//! no `rds-db:connect` permission: the cluster's IAM policy keeps deciding
//! per person.

pub mod config;
pub mod login;
pub mod proof;
pub mod sts;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use thiserror::Error;

use crate::identity::{CallerArn, parse_caller_arn};
use crate::secret::Secret;
pub use proof::{Expected, ProofError};
pub use sts::{Caller, StsEndpoint, StsError};

/// Which callers a gateway accepts people from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    /// AWS account ids (12 digits); at least one.
    pub accounts: Vec<String>,
    /// Role names, each exact or a prefix ending in `*`
    /// (default `AWSReservedSSO_*`: Identity Center permission sets, whose
    /// trust policy admits federation alone, so the session name is the
    /// person's Identity Center user name).
    pub roles: Vec<String>,
}

impl Trust {
    /// The person a caller is, if this gateway trusts it.
    pub fn person(&self, caller: &Caller) -> Result<String, Untrusted> {
        let arn = parse_caller_arn(&caller.arn).map_err(|_| Untrusted::NotARole)?;
        let CallerArn::AssumedRole { role, session } = arn else {
            return Err(Untrusted::NotARole);
        };
        // The ARN's account must be the one STS reported.
        if caller.arn.split(':').nth(4) != Some(caller.account.as_str()) {
            return Err(Untrusted::NotARole);
        }
        if !self.accounts.contains(&caller.account) {
            return Err(Untrusted::Account);
        }
        let matches = |pattern: &String| match pattern.strip_suffix('*') {
            Some(prefix) => role.starts_with(prefix),
            None => *pattern == role,
        };
        if !self.roles.iter().any(matches) {
            return Err(Untrusted::Role);
        }
        // UserId is ROLEID:SESSION for an assumed role.
        if caller
            .user_id
            .split_once(':')
            .is_none_or(|(_, s)| s != session)
        {
            return Err(Untrusted::NotARole);
        }
        Ok(session)
    }
}

/// Why a caller STS confirmed is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Untrusted {
    #[error("the caller is not an assumed-role session")]
    NotARole,
    #[error("the caller's account is not one this gateway trusts")]
    Account,
    #[error("the caller's role is not one this gateway trusts")]
    Role,
}

/// Proofs seen recently, kept until they could no longer pass the
/// freshness check. One gateway's memory: several gateways behind a load
/// balancer each keep their own (docs/gateway.md says what that means).
#[derive(Debug)]
pub struct ReplaySet {
    inner: Mutex<Seen>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Seen {
    keys: HashSet<String>,
    /// (forget after, key), in the order seen.
    order: VecDeque<(SystemTime, String)>,
}

impl ReplaySet {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Seen::default()),
            capacity,
        }
    }

    /// Records a proof's signature. `Err` when it was seen before, or when
    /// the set is full of proofs still fresh (refused rather than
    /// forgotten: a forgotten proof could be replayed).
    pub fn first_use(
        &self,
        signature: &str,
        signed_at: SystemTime,
        now: SystemTime,
    ) -> Result<(), Replay> {
        let mut seen = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((until, _)) = seen.order.front() {
            if *until > now {
                break;
            }
            if let Some((_, key)) = seen.order.pop_front() {
                seen.keys.remove(&key);
            }
        }
        if seen.keys.contains(signature) {
            return Err(Replay::Seen);
        }
        if seen.keys.len() >= self.capacity {
            return Err(Replay::Full);
        }
        let until = signed_at + proof::MAX_AGE + proof::MAX_SKEW;
        seen.keys.insert(signature.to_owned());
        seen.order.push_back((until, signature.to_owned()));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Replay {
    #[error("this proof was used before (each proof logs in once)")]
    Seen,
    #[error("too many proofs in the last 20 minutes to remember another")]
    Full,
}

/// A person the gateway has proven.
#[derive(Debug)]
pub struct Proven {
    pub person: String,
    pub caller: Caller,
    pub access_key_id: String,
    /// The person's RDS token, to log in with.
    pub token: Secret,
}

/// Why a login through the gateway was refused.
#[derive(Debug, Error)]
pub enum GatewayRefusal {
    #[error("gateway proof refused: {0}")]
    Proof(#[from] ProofError),
    #[error("gateway proof refused: {0}")]
    Replay(#[from] Replay),
    #[error(transparent)]
    Sts(#[from] StsError),
    #[error("gateway proof refused: {why} ({arn})")]
    Untrusted { why: Untrusted, arn: String },
    #[error("database user {requested:?} refused: the proof is {person:?}'s")]
    NotYourUser { requested: String, person: String },
}

/// Sessions per person at once. A place is held by a [`PersonPlace`]
/// and given back when it drops.
#[derive(Debug, Default)]
pub struct PersonSessions {
    counts: Mutex<HashMap<String, usize>>,
}

impl PersonSessions {
    /// A place for one more session of `person`, if under `limit`.
    pub fn enter(self: &Arc<Self>, person: &str, limit: usize) -> Option<PersonPlace> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(person.to_owned()).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(PersonPlace {
            sessions: self.clone(),
            person: person.to_owned(),
        })
    }
}

/// One person's session place.
#[derive(Debug)]
pub struct PersonPlace {
    sessions: Arc<PersonSessions>,
    person: String,
}

impl Drop for PersonPlace {
    fn drop(&mut self) {
        let mut counts = self
            .sessions
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.person) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.person);
            }
        }
    }
}

/// Refused proofs per client address in the current minute. Bounded: past
/// `MAX_SOURCES` addresses, the oldest windows are dropped first.
#[derive(Debug, Default)]
pub struct FailedProofs {
    windows: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Addresses tracked at once.
const MAX_SOURCES: usize = 100_000;
const WINDOW: Duration = Duration::from_secs(60);

impl FailedProofs {
    /// True when `source` has `limit` refusals in its current minute.
    pub fn blocked(&self, source: IpAddr, limit: u32, now: Instant) -> bool {
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        windows
            .get(&source)
            .is_some_and(|(start, n)| now.duration_since(*start) < WINDOW && *n >= limit)
    }

    /// Counts one refusal.
    pub fn refused(&self, source: IpAddr, now: Instant) {
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= MAX_SOURCES && !windows.contains_key(&source) {
            windows.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
            if windows.len() >= MAX_SOURCES {
                // Every window is current: forget one rather than grow.
                if let Some(k) = windows.keys().next().copied() {
                    windows.remove(&k);
                }
            }
        }
        let w = windows.entry(source).or_insert((now, 0));
        if now.duration_since(w.0) >= WINDOW {
            *w = (now, 0);
        }
        w.1 = w.1.saturating_add(1);
    }
}

/// Gateway mode at run time: built once at start, shared by every
/// connection.
#[derive(Debug)]
pub struct Gateway {
    /// This gateway's id, which proofs are signed for.
    pub id: String,
    /// The region whose STS verifies proofs.
    pub sts_region: String,
    pub verifier: Verifier,
    pub sessions: Arc<PersonSessions>,
    pub failures: FailedProofs,
    pub max_sessions_per_person: usize,
    pub max_failed_proofs_per_source: u32,
    /// The other instances of this gateway, by instance number: where a
    /// cancel request for one of their keys goes.
    pub peers: Vec<(u8, Arc<crate::upstream::Endpoint>)>,
}

/// Proofs remembered at once: 200 logins a second (the cluster's own IAM
/// throttle) for the 20 minutes a proof stays usable is 240,000.
pub const REPLAY_CAPACITY: usize = 1_000_000;

impl Gateway {
    pub fn new(
        config: &config::GatewayConfig,
        sts_region: String,
        tls: Option<Arc<rustls::ClientConfig>>,
        peers: Vec<(u8, Arc<crate::upstream::Endpoint>)>,
    ) -> Self {
        let dial = config
            .sts_endpoint_url
            .as_deref()
            .map(|u| sts::Dial::parse(u).expect("validated with the configuration"));
        Self {
            id: config.id.clone(),
            sts_region,
            verifier: Verifier {
                trust: Trust {
                    accounts: config.trust_accounts.clone(),
                    roles: config.trust_roles.clone(),
                },
                sts: StsEndpoint {
                    dial,
                    tls,
                    timeout: config.sts_timeout,
                },
                replay: ReplaySet::new(REPLAY_CAPACITY),
            },
            sessions: Arc::default(),
            failures: FailedProofs::default(),
            max_sessions_per_person: config.max_sessions_per_person,
            max_failed_proofs_per_source: config.max_failed_proofs_per_source,
            peers,
        }
    }

    /// The peer instance that issued `key`, if another one did.
    pub fn peer_for(
        &self,
        key: &crate::pg::startup::CancelKey,
    ) -> Option<&crate::upstream::Endpoint> {
        let instance = crate::cancel::CancelRegistry::instance_of(key)?;
        self.peers
            .iter()
            .find(|(n, _)| *n == instance)
            .map(|(_, e)| e.as_ref())
    }
}

/// Everything a gateway needs to prove a person, shared by all connections.
#[derive(Debug)]
pub struct Verifier {
    pub trust: Trust,
    pub sts: StsEndpoint,
    pub replay: ReplaySet,
}

impl Verifier {
    /// Checks a password against `want`, then asks STS. The replay set is
    /// consulted before STS, so a proof sent twice at once is asked once.
    pub async fn verify(
        &self,
        password: &[u8],
        want: &Expected<'_>,
    ) -> Result<Proven, GatewayRefusal> {
        let checked = proof::check(password, want)?;
        self.replay
            .first_use(&checked.signature, checked.signed_at, want.now)?;
        let caller = sts::get_caller_identity(&self.sts, &checked.sts).await?;
        let person = self
            .trust
            .person(&caller)
            .map_err(|why| GatewayRefusal::Untrusted {
                why,
                arn: caller.arn.clone(),
            })?;
        if person != want.db_user {
            return Err(GatewayRefusal::NotYourUser {
                requested: want.db_user.to_owned(),
                person,
            });
        }
        Ok(Proven {
            person,
            caller,
            access_key_id: checked.access_key_id,
            token: checked.token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(arn: &str, user_id: &str) -> Caller {
        Caller {
            arn: arn.into(),
            account: "111122223333".into(),
            user_id: user_id.into(),
        }
    }

    #[test]
    fn trust_names_the_person_only_for_trusted_roles_and_accounts() {
        let trust = Trust {
            accounts: vec!["111122223333".into()],
            roles: vec!["AWSReservedSSO_*".into(), "Exact".into()],
        };
        let sso =
            "arn:aws:sts::111122223333:assumed-role/AWSReservedSSO_DBA_0123456789abcdef/arianna";
        assert_eq!(
            trust.person(&caller(sso, "AROAX:arianna")).unwrap(),
            "arianna"
        );
        assert_eq!(
            trust
                .person(&caller(
                    "arn:aws:sts::111122223333:assumed-role/Exact/bob",
                    "AROAY:bob"
                ))
                .unwrap(),
            "bob"
        );
        assert_eq!(
            trust.person(&caller(
                "arn:aws:sts::111122223333:assumed-role/Exactly/bob",
                "AROAY:bob"
            )),
            Err(Untrusted::Role)
        );
        assert_eq!(
            trust.person(&caller("arn:aws:iam::111122223333:user/arianna", "AIDAX")),
            Err(Untrusted::NotARole)
        );
        // The session in UserId must be the ARN's.
        assert_eq!(
            trust.person(&caller(sso, "AROAX:bob")),
            Err(Untrusted::NotARole)
        );
        let other = Caller {
            account: "444455556666".into(),
            ..caller(
                &sso.replace("111122223333", "444455556666"),
                "AROAX:arianna",
            )
        };
        assert_eq!(trust.person(&other), Err(Untrusted::Account));
        // An ARN whose account differs from the one STS reported.
        assert_eq!(
            trust.person(&caller(
                &sso.replace("111122223333", "444455556666"),
                "AROAX:arianna"
            )),
            Err(Untrusted::NotARole)
        );
    }

    #[test]
    fn a_proof_is_used_once_and_forgotten_when_it_could_no_longer_pass() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_180_000);
        let set = ReplaySet::new(2);
        assert_eq!(set.first_use("a", t0, t0), Ok(()));
        assert_eq!(
            set.first_use("a", t0, t0 + Duration::from_secs(60)),
            Err(Replay::Seen)
        );
        assert_eq!(set.first_use("b", t0, t0), Ok(()));
        // Full of fresh proofs: refused, not forgotten.
        assert_eq!(set.first_use("c", t0, t0), Err(Replay::Full));
        // After MAX_AGE + MAX_SKEW nobody could use them again.
        let later = t0 + proof::MAX_AGE + proof::MAX_SKEW;
        assert_eq!(set.first_use("c", later, later), Ok(()));
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn person_places_come_back_when_sessions_end() {
        let sessions = Arc::new(PersonSessions::default());
        let a = sessions.enter("arianna", 2).unwrap();
        let b = sessions.enter("arianna", 2).unwrap();
        assert!(sessions.enter("arianna", 2).is_none());
        assert!(sessions.enter("bob", 2).is_some());
        drop(a);
        assert!(sessions.enter("arianna", 2).is_some());
        drop(b);
    }

    #[test]
    fn failed_proofs_block_a_source_for_the_rest_of_its_minute() {
        let f = FailedProofs::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!f.blocked(ip, 3, t0));
            f.refused(ip, t0);
        }
        assert!(f.blocked(ip, 3, t0 + Duration::from_secs(59)));
        assert!(!f.blocked("192.0.2.8".parse().unwrap(), 3, t0));
        assert!(!f.blocked(ip, 3, t0 + WINDOW));
    }
}
