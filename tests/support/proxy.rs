//! The proxy binary as a child process of a test, pointed at the bed.
//!
//! Readiness is read from the proxy's own log ("listening on ADDR"), with a
//! deadline; the log is kept in memory so tests can assert on it (and on
//! what must never be in it).

#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::bed::{AwsHome, Bed, unique_temp_path};

const READY_DEADLINE: Duration = Duration::from_secs(30);

/// A running proxy.
pub struct Proxy {
    child: Child,
    log: Arc<Mutex<String>>,
    /// The first TCP listener.
    pub addr: SocketAddr,
    /// Unix socket directory, when one was asked for.
    pub unix_dir: Option<PathBuf>,
    /// The state directory (holds the generated local CA).
    pub state_dir: PathBuf,
}

/// Builds a proxy command line for the bed.
pub struct ProxyBuilder {
    cmd: Command,
    subcommand: Option<&'static str>,
    switches: Vec<&'static str>,
    args: Vec<(String, std::ffi::OsString)>,
    state_dir: PathBuf,
    unix_dir: Option<PathBuf>,
}

impl ProxyBuilder {
    /// The proxy for the bed's endpoint name, dialling the bed's PostgreSQL,
    /// trusting the bed's CA, on a free loopback port, with `home`'s AWS
    /// identity and every AWS endpoint redirected into the bed.
    pub fn new(bed: &Bed, home: &AwsHome) -> Self {
        let i = &bed.info;
        let state_dir = unique_temp_path("rdsiam-proxy-state");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
        home.apply(&mut cmd);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("RDS_IAM_PROXY_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("RDS_IAM_PROXY_LOG", "info,rds_iam_proxy=debug");
        let args = [
            (
                "--upstream",
                format!("{}:{}", i.endpoint_host, i.endpoint_port).into(),
            ),
            ("--connect-to", format!("127.0.0.1:{}", i.pg_port).into()),
            ("--upstream-ca", i.ca_cert.clone().into_os_string()),
            ("--listen", "127.0.0.1:0".into()),
            ("--state-dir", state_dir.clone().into_os_string()),
        ];
        ProxyBuilder {
            cmd,
            subcommand: None,
            switches: Vec::new(),
            args: args.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            state_dir,
            unix_dir: None,
        }
    }

    /// Sets a flag, replacing the default value it had here.
    pub fn arg(mut self, flag: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        let value = value.as_ref().to_owned();
        match self.args.iter_mut().find(|(k, _)| k == flag) {
            Some(slot) => slot.1 = value,
            None => self.args.push((flag.to_owned(), value)),
        }
        self
    }

    /// Sets an environment variable for the proxy (after the AWS home's).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.cmd.env(key, value);
        self
    }

    /// Runs `rds-iam-proxy NAME` (e.g. `gateway`) instead of the proxy.
    pub fn subcommand(mut self, name: &'static str) -> Self {
        self.subcommand = Some(name);
        self
    }

    /// Adds a flag that takes no value (e.g. `--allow-remote-clients`).
    pub fn switch(mut self, flag: &'static str) -> Self {
        self.switches.push(flag);
        self
    }

    /// Drops a default flag.
    pub fn without(mut self, flag: &str) -> Self {
        self.args.retain(|(k, _)| k != flag);
        self
    }

    /// Also listen on a unix socket in a fresh directory.
    pub fn unix_socket(mut self) -> Self {
        let dir = unique_temp_path("rdsiam-sock");
        self.cmd.arg("--unix-socket").arg(&dir);
        self.unix_dir = Some(dir);
        self
    }

    pub fn start(mut self) -> Proxy {
        if let Some(sub) = self.subcommand {
            // Before every flag; `--unix-socket` may already be on the line.
            let before: Vec<std::ffi::OsString> =
                self.cmd.get_args().map(|a| a.to_owned()).collect();
            let mut cmd = Command::new(self.cmd.get_program());
            for (k, v) in self.cmd.get_envs() {
                match v {
                    Some(v) => cmd.env(k, v),
                    None => cmd.env_remove(k),
                };
            }
            cmd.arg(sub).args(before);
            self.cmd = cmd;
        }
        for (k, v) in &self.args {
            self.cmd.arg(k).arg(v);
        }
        self.cmd.args(&self.switches);
        let mut child = self
            .cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rds-iam-proxy");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let deadline = Instant::now() + READY_DEADLINE;
        let addr = loop {
            if let Some(addr) = listening_addr(&log.lock().unwrap()) {
                break addr;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "proxy exited ({status}) before listening:\n{}",
                    log.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "proxy not listening after {READY_DEADLINE:?}:\n{}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Proxy {
            child,
            log,
            addr,
            unix_dir: self.unix_dir,
            state_dir: self.state_dir,
        }
    }
}

fn listening_addr(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter_map(|l| l.split("listening on ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .find_map(|a| a.parse().ok())
}

impl Proxy {
    pub fn builder(bed: &Bed, home: &AwsHome) -> ProxyBuilder {
        ProxyBuilder::new(bed, home)
    }

    /// Everything the proxy logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the proxy log after {within:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The admin listener's address (with `--admin-listen`).
    pub fn admin_addr(&self) -> SocketAddr {
        let log = self.wait_for_log("admin HTTP on ", READY_DEADLINE);
        addr_after(&log, "admin HTTP on ").expect("admin address in the log")
    }

    /// A rustls client configuration that trusts the proxy's CA.
    pub fn tls_config(&self) -> rustls::ClientConfig {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(self.ca_cert()).unwrap();
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.unwrap()).unwrap();
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
    }

    /// tokio-postgres through the proxy over TLS, as `user` to mylab.
    pub async fn tokio_pg(
        &self,
        user: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.tls_config());
        let conninfo = format!(
            "host=127.0.0.1 port={} user={user} dbname=mylab sslmode=require",
            self.addr.port()
        );
        let (client, conn) = tokio_postgres::connect(&conninfo, tls).await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// The CA that clients verify the proxy with.
    pub fn ca_cert(&self) -> PathBuf {
        self.state_dir.join("ca.crt")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "TERM", "HUP") to the proxy.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {signal} failed");
    }

    /// Waits for the proxy to exit by itself, with a deadline.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "proxy still running after {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// psql through the proxy, `user` to the bed's database, with no
    /// password and a clean libpq environment. `extra` is appended to the
    /// connection string (e.g. "sslmode=disable").
    pub fn psql(&self, user: &str, extra: &str) -> Command {
        let conninfo = format!(
            "host=127.0.0.1 port={} user={user} dbname=mylab sslmode=verify-full sslrootcert={} {extra}",
            self.addr.port(),
            self.ca_cert().display()
        );
        let mut cmd = super::bed::psql(&conninfo);
        cmd.stdin(Stdio::null());
        cmd
    }
}

/// GET over plain HTTP/1.1 (the admin listener); (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(READY_DEADLINE)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {resp:?}"));
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_owned())
}

/// A sample's value in a Prometheus text page (0 when absent: counters
/// with labels appear at their first event).
pub fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// Address in a log line "PHRASE ADDR".
pub fn addr_after(log: &str, phrase: &str) -> Option<SocketAddr> {
    log.lines()
        .filter_map(|l| l.split(phrase).nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .find_map(|a| a.parse().ok())
}

/// psql through `proxy` runs a 60 s sleep as `user`, tagged with
/// `app`; once the server shows it running, psql gets SIGINT (what Ctrl-C
/// sends: a cancel request). Returns psql's stderr and how long the sleep
/// lasted after the signal.
pub fn psql_sleep_then_interrupt(
    proxy: &Proxy,
    bed: &super::bed::Bed,
    user: &str,
    app: &str,
) -> (String, Duration) {
    let child = proxy
        .psql(user, &format!("application_name={app}"))
        .args(["-c", "select pg_sleep(60)"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let active = format!(
        "select count(*) from pg_stat_activity where application_name = '{app}' and state = 'active'"
    );
    while bed.admin_sql(&active).trim() != "1" {
        assert!(Instant::now() < deadline, "the sleep never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// Removes inherited PG* variables so only the test's settings count.
pub fn clean_pg_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            cmd.env_remove(k);
        }
    }
}

/// Runs a command and returns (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("run command");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state_dir);
        if let Some(d) = &self.unix_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
