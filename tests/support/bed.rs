//! The offline Aurora-like test bed, from Rust.
//!
//! `testbed/bed.py` runs PostgreSQL with RDS-style IAM authentication (PAM +
//! a SigV4 verifier), moto for STS and an IAM Identity Center stand-in. This
//! module starts it, parses the JSON line it prints when ready, and gives
//! tests small helpers: admin SQL, IAM users, SSO logins, and a throwaway
//! HOME with an AWS profile for child processes (the proxy, test clients).
//!
//! The bed stops when its stdin closes: when a `Bed` is dropped, or when the
//! test process exits for any reason (the shared bed is never dropped; the
//! kernel closes the pipe). Needs root and `scripts/setup-test-env.sh`.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

const START_DEADLINE: Duration = Duration::from_secs(60);
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// Everything the bed printed when it became ready.
#[derive(Clone, Debug)]
pub struct BedInfo {
    pub state_dir: PathBuf,
    pub pg_host: String,
    pub pg_port: u16,
    pub pg_socket_dir: PathBuf,
    /// Name the server certificate is issued for; tokens are signed for it.
    pub endpoint_host: String,
    pub endpoint_port: u16,
    pub region: String,
    pub account_id: String,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// An unrelated CA, and a server cert for the endpoint name signed by it.
    pub other_ca_cert: PathBuf,
    pub other_ca_server_cert: PathBuf,
    pub other_ca_server_key: PathBuf,
    /// Signed by the bed's CA, but for `other.cluster-c0ffee...` (SANs also
    /// hold localhost and 127.0.0.1, so only the endpoint name check fails).
    pub wrong_name_cert: PathBuf,
    pub wrong_name_key: PathBuf,
    pub master_user: String,
    pub master_password: String,
    pub database: String,
    pub moto_url: String,
    pub sso_url: String,
    pub start_url: String,
    /// Signature-checking STS GetCallerIdentity stand-in (gateway mode):
    /// dial it, but send the signed STS host in `Host`.
    pub sts_verify_url: String,
    pub long_term_access_key_id: String,
    pub long_term_secret_access_key: String,
    pub verifier_log: PathBuf,
    pub pg_log: PathBuf,
    pub pam_service: String,
    /// With `bed.py run --das`: the activity stream stand-in's facts
    /// (`cluster_resource_id`, `stream_name`, `kms_key_id`, `region`,
    /// `endpoint_url`, `control_url`; testbed/README.md).
    pub das: Option<Value>,
}

impl BedInfo {
    fn parse(v: &Value) -> Result<BedInfo, String> {
        let s = |k: &str| -> Result<String, String> {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("bed JSON lacks string {k:?}"))
        };
        let p = |k: &str| s(k).map(PathBuf::from);
        let port = |k: &str| -> Result<u16, String> {
            v.get(k)
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| format!("bed JSON lacks port {k:?}"))
        };
        Ok(BedInfo {
            state_dir: p("state_dir")?,
            pg_host: s("pg_host")?,
            pg_port: port("pg_port")?,
            pg_socket_dir: p("pg_socket_dir")?,
            endpoint_host: s("endpoint_host")?,
            endpoint_port: port("endpoint_port")?,
            region: s("region")?,
            account_id: s("account_id")?,
            ca_cert: p("ca_cert")?,
            server_cert: p("server_cert")?,
            server_key: p("server_key")?,
            other_ca_cert: p("other_ca_cert")?,
            other_ca_server_cert: p("other_ca_server_cert")?,
            other_ca_server_key: p("other_ca_server_key")?,
            wrong_name_cert: p("wrong_name_cert")?,
            wrong_name_key: p("wrong_name_key")?,
            master_user: s("master_user")?,
            master_password: s("master_password")?,
            database: s("database")?,
            moto_url: s("moto_url")?,
            sso_url: s("sso_url")?,
            start_url: s("start_url")?,
            sts_verify_url: s("sts_verify_url")?,
            long_term_access_key_id: s("long_term_access_key_id")?,
            long_term_secret_access_key: s("long_term_secret_access_key")?,
            verifier_log: p("verifier_log")?,
            pg_log: p("pg_log")?,
            pam_service: s("pam_service")?,
            das: v.get("das").filter(|d| !d.is_null()).cloned(),
        })
    }
}

/// AWS credentials minted by the bed (registered with its token verifier).
#[derive(Clone, Debug)]
pub struct AwsCreds {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

/// A running bed. Dropping it stops the bed and removes its state.
pub struct Bed {
    pub info: BedInfo,
    child: Mutex<Child>,
    stdin: Mutex<Option<ChildStdin>>,
    stderr_path: PathBuf,
    /// IAM users created so far: tests run in parallel and CREATE ROLE
    /// races with itself, so creation is serialized and done once.
    created_users: Mutex<Vec<String>>,
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Effective uid 0, read from /proc to avoid `unsafe` FFI for geteuid.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// A fresh path under the temp dir: pid + counter + clock, never reused.
pub fn unique_temp_path(prefix: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Bed {
    /// Starts a private bed and waits (60 s at most) until it is ready.
    /// Panics with the bed's stderr if it does not come up.
    pub fn start() -> Bed {
        Self::start_with(&[])
    }

    /// Starts a private bed with extra `bed.py run` options (e.g. `--das`).
    pub fn start_with(options: &[&str]) -> Bed {
        let python = repo_root().join(".venv/bin/python");
        assert!(
            python.exists(),
            "{} missing: run scripts/setup-test-env.sh first",
            python.display()
        );
        let stderr_path = unique_temp_path("rdsiam-bed-stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("create bed stderr file");
        let mut child = Command::new(&python)
            .arg(repo_root().join("testbed/bed.py"))
            .arg("run")
            .args(options)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", python.display()));

        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = tx.send(reader.read_line(&mut line).map(|_| line));
            // Keep draining so a chatty bed never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });

        let failure = |child: &mut Child, why: String| -> ! {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            panic!("test bed did not start: {why}\n--- bed stderr ---\n{stderr}");
        };
        let line = match rx.recv_timeout(START_DEADLINE) {
            Ok(Ok(line)) if !line.trim().is_empty() => line,
            Ok(Ok(_)) => failure(&mut child, "it exited before it was ready".into()),
            Ok(Err(e)) => failure(&mut child, format!("reading its stdout: {e}")),
            Err(_) => failure(
                &mut child,
                format!("no ready line within {START_DEADLINE:?}"),
            ),
        };
        let info = match serde_json::from_str::<Value>(&line)
            .map_err(|e| e.to_string())
            .and_then(|v| BedInfo::parse(&v))
        {
            Ok(info) => info,
            Err(e) => failure(&mut child, format!("bad ready line {line:?}: {e}")),
        };
        // The open file moves with the rename; the bed deletes its state dir on
        // exit, so a never-dropped shared bed leaves nothing behind.
        let moved = info.state_dir.join("bed.stderr");
        let stderr_path = match std::fs::rename(&stderr_path, &moved) {
            Ok(()) => moved,
            Err(_) => stderr_path,
        };
        let stdin = child.stdin.take();
        Bed {
            info,
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
            stderr_path,
            created_users: Mutex::new(Vec::new()),
        }
    }

    /// One bed per test process, started on first use. Returns `None`, after
    /// a loud SKIPPED line, when not root.
    pub fn shared(test_name: &str) -> Option<&'static Bed> {
        static SHARED: OnceLock<Bed> = OnceLock::new();
        if !is_root() {
            // Straight to fd 2: eprintln! output of a passing test is captured
            // by the harness, and a skip must be visible.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test_name}: needs root (the test bed installs a PAM service in /etc/pam.d)"
            );
            return None;
        }
        Some(SHARED.get_or_init(Bed::start))
    }

    /// A psql command with a clean libpq environment, verify-full TLS to the
    /// endpoint name (dialled at 127.0.0.1), as `user` with `password`.
    pub fn psql(&self, user: &str, password: &str) -> Command {
        let i = &self.info;
        let conninfo = format!(
            "host={} hostaddr=127.0.0.1 port={} sslmode=verify-full sslrootcert={} user={} dbname={}",
            i.endpoint_host,
            i.pg_port,
            i.ca_cert.display(),
            user,
            i.database
        );
        let mut cmd = psql(&conninfo);
        cmd.env("PGPASSWORD", password);
        cmd
    }

    /// Runs SQL as the master user over verified TLS; returns stdout.
    pub fn admin_sql(&self, sql: &str) -> String {
        let out = self
            .psql(&self.info.master_user, &self.info.master_password)
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "admin SQL failed ({}): {sql}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A login role that authenticates with IAM tokens (idempotent).
    pub fn create_iam_user(&self, name: &str) {
        let mut created = self.created_users.lock().unwrap_or_else(|e| e.into_inner());
        if created.iter().any(|u| u == name) {
            return;
        }
        let ident = quote_ident(name);
        let literal = name.replace('\'', "''");
        let db = quote_ident(&self.info.database);
        self.admin_sql(&format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{literal}') \
             THEN CREATE ROLE {ident} LOGIN; END IF; END $$;\n\
             GRANT rds_iam TO {ident};\n\
             GRANT ALL ON DATABASE {db} TO {ident};\n\
             GRANT ALL ON SCHEMA public TO {ident};"
        ));
        created.push(name.to_owned());
    }

    /// How many verifier verdicts name `user` (each is a token that
    /// reached the database).
    pub fn verifier_lines_for(&self, user: &str) -> usize {
        let needle = format!("user='{user}'");
        self.verifier_log()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }

    /// `aws sso login` for `user`: the SSO cache-file JSON (1 h token, refreshable).
    pub fn sso_login(&self, user: &str, permission_set: &str) -> Value {
        self.sso_login_with(user, permission_set, None, true)
    }

    /// As `sso_login`, with the access token's lifetime in seconds (negative:
    /// already expired) and whether a refresh token is issued.
    pub fn sso_login_with(
        &self,
        user: &str,
        permission_set: &str,
        access_token_ttl: Option<i64>,
        refreshable: bool,
    ) -> Value {
        let mut body =
            json!({"user": user, "permission_set": permission_set, "refreshable": refreshable});
        if let Some(ttl) = access_token_ttl {
            body["access_token_ttl"] = json!(ttl);
        }
        self.control("POST", "/_bed/login", Some(&body))
    }

    /// A login whose role credentials are reported to expire
    /// `credentials_ttl` seconds after each GetRoleCredentials, so a client
    /// has to go back to the portal for every connection (no refresh token).
    pub fn sso_login_short_credentials(
        &self,
        user: &str,
        permission_set: &str,
        credentials_ttl: u64,
    ) -> Value {
        let body = json!({"user": user, "permission_set": permission_set,
                          "refreshable": false, "credentials_ttl": credentials_ttl});
        self.control("POST", "/_bed/login", Some(&body))
    }

    /// Role credentials for `user` minted directly (moto AssumeRole), known
    /// to the token verifier.
    pub fn mint_credentials(&self, user: &str, permission_set: &str) -> AwsCreds {
        let v = self.control(
            "POST",
            "/_bed/credentials",
            Some(&json!({"user": user, "permission_set": permission_set})),
        );
        let s = |k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("no {k} in {v}"))
                .to_owned()
        };
        AwsCreds {
            access_key_id: s("accessKeyId"),
            secret_access_key: s("secretAccessKey"),
            session_token: Some(s("sessionToken")),
        }
    }

    /// The long-term key the verifier always accepts.
    pub fn long_term_credentials(&self) -> AwsCreds {
        AwsCreds {
            access_key_id: self.info.long_term_access_key_id.clone(),
            secret_access_key: self.info.long_term_secret_access_key.clone(),
            session_token: None,
        }
    }

    /// Makes the SSO stand-in treat this access token as expired (the cache
    /// file still says it is valid).
    pub fn expire_access_token(&self, access_token: &str) {
        self.control(
            "POST",
            "/_bed/expire",
            Some(&json!({"access_token": access_token})),
        );
    }

    /// Revokes a refresh token: CreateToken then answers invalid_grant.
    pub fn revoke_refresh_token(&self, refresh_token: &str) {
        self.control(
            "POST",
            "/_bed/revoke",
            Some(&json!({"refresh_token": refresh_token})),
        );
    }

    /// The SSO/OIDC requests seen so far: `[{"path","role","user","time",..}]`.
    pub fn sso_requests(&self) -> Value {
        self.control("GET", "/_bed/requests", None)
    }

    /// Verdict lines the token verifier has logged so far.
    pub fn verifier_log(&self) -> String {
        std::fs::read_to_string(&self.info.verifier_log).unwrap_or_default()
    }

    /// Calls the bed's control API; panics unless it answers 200.
    pub fn control(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, v) = http_json(&self.info.sso_url, method, path, body);
        assert_eq!(status, 200, "{method} {path} -> {status}: {v}");
        v
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        // EOF on stdin is the bed's stop signal.
        drop(self.stdin.lock().map(|mut s| s.take()));
        if let Ok(mut child) = self.child.lock() {
            let deadline = Instant::now() + STOP_DEADLINE;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Minimal HTTP/1.1 client for the bed's plain-HTTP stand-in (no new crates).
pub fn http_json(base: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let hostport = base
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("not an http:// URL: {base}"))
        .trim_end_matches('/');
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut stream =
        TcpStream::connect(hostport).unwrap_or_else(|e| panic!("connect {hostport}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    )
    .expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP response: {head}"));
    let value = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, value)
}

/// psql on `conninfo` with a clean libpq environment (no inherited PG*
/// variables), unaligned tuples-only output, stopping at the first error.
pub fn psql(conninfo: &str) -> Command {
    let mut cmd = Command::new("psql");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            cmd.env_remove(k);
        }
    }
    cmd.env("PGCONNECT_TIMEOUT", "20").args([
        conninfo,
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
    ]);
    cmd
}

/// The shared bed, the IAM database user `user`, and an SSO home signed in
/// as `user`; `None` (after a SKIPPED line) when not root.
pub fn sso_setup(test: &str, user: &str) -> Option<(&'static Bed, AwsHome)> {
    let bed = Bed::shared(test)?;
    bed.create_iam_user(user);
    Some((bed, AwsHome::sso(bed, user, "DatabaseAdmin")))
}

/// A throwaway HOME holding one AWS identity, for child processes.
pub struct AwsHome {
    pub dir: PathBuf,
    profile: String,
    moto_url: String,
    sso_url: String,
    region: String,
}

/// The `[sso-session NAME]` every SSO home uses.
pub const SSO_SESSION: &str = "dev";

impl AwsHome {
    /// Profile `dev` with `[sso-session dev]`, after a fresh `sso_login`.
    pub fn sso(bed: &Bed, user: &str, permission_set: &str) -> AwsHome {
        let cache = bed.sso_login(user, permission_set);
        AwsHome::sso_with_cache(bed, permission_set, &cache)
    }

    /// Profile `dev` for `permission_set`, with a given SSO cache file.
    pub fn sso_with_cache(bed: &Bed, permission_set: &str, cache: &Value) -> AwsHome {
        let home = AwsHome::empty(bed, "dev");
        let i = &bed.info;
        home.write(
            ".aws/config",
            &format!(
                "[profile dev]\nsso_session = {SSO_SESSION}\nsso_account_id = {}\n\
                 sso_role_name = {permission_set}\nregion = {}\n\n\
                 [sso-session {SSO_SESSION}]\nsso_start_url = {}\nsso_region = {}\n\
                 sso_registration_scopes = sso:account:access\n",
                i.account_id, i.region, i.start_url, i.region
            ),
        );
        home.write_sso_cache(cache);
        home
    }

    /// Profile `default` with static keys in the credentials file.
    pub fn static_keys(bed: &Bed, creds: &AwsCreds) -> AwsHome {
        let home = AwsHome::empty(bed, "default");
        home.write(
            ".aws/config",
            &format!("[default]\nregion = {}\n", bed.info.region),
        );
        let mut text = format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            creds.access_key_id, creds.secret_access_key
        );
        if let Some(token) = &creds.session_token {
            text.push_str(&format!("aws_session_token = {token}\n"));
        }
        home.write(".aws/credentials", &text);
        home
    }

    /// Profile `app`: a non-SSO role assumed by aws-config itself through
    /// moto AssumeRole, with the bed's long-term keys as source (a workload
    /// role, as an instance profile or IRSA would give).
    pub fn assumed_role(bed: &Bed, role: &str, session: &str) -> AwsHome {
        let home = AwsHome::empty(bed, "app");
        let i = &bed.info;
        home.write(
            ".aws/config",
            &format!(
                "[profile app]\nrole_arn = arn:aws:iam::{}:role/{role}\nsource_profile = base\n\
                 role_session_name = {session}\nregion = {}\n\n[profile base]\nregion = {}\n",
                i.account_id, i.region, i.region
            ),
        );
        home.write(
            ".aws/credentials",
            &format!(
                "[base]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                i.long_term_access_key_id, i.long_term_secret_access_key
            ),
        );
        home
    }

    /// Profile `default` with a region and no credentials at all (SAML:
    /// the proxy gets its credentials from the assertion).
    pub fn without_credentials(bed: &Bed) -> AwsHome {
        let home = AwsHome::empty(bed, "default");
        home.write(
            ".aws/config",
            &format!("[default]\nregion = {}\n", bed.info.region),
        );
        home
    }

    fn empty(bed: &Bed, profile: &str) -> AwsHome {
        let dir = unique_temp_path("rdsiam-awshome");
        std::fs::create_dir_all(dir.join(".aws/sso/cache")).expect("create AWS home");
        AwsHome {
            dir,
            profile: profile.to_owned(),
            moto_url: bed.info.moto_url.clone(),
            sso_url: bed.info.sso_url.clone(),
            region: bed.info.region.clone(),
        }
    }

    fn write(&self, rel: &str, text: &str) {
        std::fs::write(self.dir.join(rel), text).unwrap_or_else(|e| panic!("write {rel}: {e}"));
    }

    pub fn config_file(&self) -> PathBuf {
        self.dir.join(".aws/config")
    }

    pub fn credentials_file(&self) -> PathBuf {
        self.dir.join(".aws/credentials")
    }

    /// `~/.aws/sso/cache/<sha1(session name)>.json`, where aws-config looks.
    pub fn sso_cache_file(&self) -> PathBuf {
        self.dir
            .join(".aws/sso/cache")
            .join(format!("{}.json", sha1_hex(SSO_SESSION.as_bytes())))
    }

    pub fn write_sso_cache(&self, cache: &Value) {
        std::fs::write(self.sso_cache_file(), cache.to_string()).expect("write SSO cache file");
    }

    pub fn read_sso_cache(&self) -> Value {
        let text = std::fs::read_to_string(self.sso_cache_file()).expect("read SSO cache file");
        serde_json::from_str(&text).expect("SSO cache file is JSON")
    }

    /// Variables to set in a child: every endpoint points into the bed.
    pub fn env(&self) -> Vec<(String, String)> {
        let d = self.dir.display();
        [
            ("HOME", d.to_string()),
            ("AWS_CONFIG_FILE", self.config_file().display().to_string()),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                self.credentials_file().display().to_string(),
            ),
            ("AWS_PROFILE", self.profile.clone()),
            ("AWS_ENDPOINT_URL", self.moto_url.clone()),
            ("AWS_ENDPOINT_URL_STS", self.moto_url.clone()),
            ("AWS_ENDPOINT_URL_SSO", self.sso_url.clone()),
            ("AWS_ENDPOINT_URL_SSO_OIDC", self.sso_url.clone()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
            ("AWS_REGION", self.region.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Inherited AWS_* variables that must not reach the child (static keys,
    /// web identity, container credentials, other profiles...): all of them,
    /// except those `env()` sets.
    pub fn removed_env(&self) -> Vec<String> {
        let set: Vec<String> = self.env().into_iter().map(|(k, _)| k).collect();
        std::env::vars_os()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .filter(|k| k.starts_with("AWS_") && !set.contains(k))
            .collect()
    }

    pub fn apply(&self, cmd: &mut Command) {
        for k in self.removed_env() {
            cmd.env_remove(k);
        }
        cmd.envs(self.env());
    }
}

impl Drop for AwsHome {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SHA-1 (FIPS 180-4), only to name the SSO cache file the way aws-config does.
pub fn sha1_hex(data: &[u8]) -> String {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}
