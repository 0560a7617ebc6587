"""The bed plus a running rds-iam-proxy, for tests written in Python
against real client libraries (testbed/tests/test_clients.py) and for the
third-party suite runner (tests/clients/psycopg_suite.py).

    with Stack(proxy_args=["--audit-mode", "sync", ...]) as st:
        st.proxy_dsn()     # libpq DSN through the proxy, TLS verify-full to its local CA
        st.direct_dsn()    # libpq DSN straight to PostgreSQL as the same IAM user
        st.admin_sql(sql)  # as the bed's master user

Direct connections as the IAM user need a token per login, as on RDS: a
passfile that a thread rewrites every minute with a fresh token from
`rds-iam-proxy token` (libpq reads the passfile at every connection).
Every AWS endpoint points at the bed; nothing leaves the machine.
"""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parent.parent
USER = "arianna"
DATABASE = "arianna_db"


def binary():
    """The proxy binary: RDS_IAM_PROXY_BIN, else the newer of the release
    and debug builds (never a stale one by accident)."""
    if os.environ.get("RDS_IAM_PROXY_BIN"):
        return os.environ["RDS_IAM_PROXY_BIN"]
    built = [p for p in (REPO / "target" / prof / "rds-iam-proxy" for prof in ("release", "debug")) if p.exists()]
    if not built:
        raise RuntimeError("no rds-iam-proxy binary: run cargo build first")
    return str(max(built, key=lambda p: p.stat().st_mtime))


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def _wait_for(what, deadline_s, probe):
    deadline = time.monotonic() + deadline_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Bed:
    """testbed/bed.py as a child process; stops when closed."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "testbed" / "bed.py"), "run"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the test bed did not start (needs root and scripts/setup-test-env.sh)")
        self.info = json.loads(line)

    def admin_dsn(self, dbname=None):
        i = self.info
        return (
            f"host={i['endpoint_host']} hostaddr=127.0.0.1 port={i['pg_port']} sslmode=verify-full "
            f"sslrootcert={i['ca_cert']} user={i['master_user']} password={i['master_password']} "
            f"dbname={dbname or i['database']}"
        )

    def admin_sql(self, sql, dbname=None):
        r = subprocess.run(
            ["psql", self.admin_dsn(dbname), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
            capture_output=True, text=True, env=_clean_env(),
        )
        if r.returncode != 0:
            raise RuntimeError(f"admin SQL failed: {r.stderr.strip()}")
        return r.stdout

    def superuser_sql(self, sql, dbname="postgres"):
        """As PostgreSQL's superuser, over the bed's unix socket (peer auth)."""
        i = self.info
        r = subprocess.run(
            ["runuser", "-u", "postgres", "--", "psql", "-h", i["pg_socket_dir"], "-p", str(i["pg_port"]),
             "-U", "postgres", "-d", dbname, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
            capture_output=True, text=True, env=_clean_env(), cwd="/",
        )
        if r.returncode != 0:
            raise RuntimeError(f"superuser SQL failed: {r.stderr.strip()}")
        return r.stdout

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PG", "RDS_IAM_PROXY_"))}


class Stack:
    """Bed, an IAM user owning its own database, an SSO login, one proxy."""

    def __init__(self, proxy_args=(), user=USER, database=DATABASE, bed=None, log_filter=None):
        self.log_filter = log_filter
        self.user = user
        self.database = database
        self.proxy_args = list(proxy_args)
        self._own_bed = bed is None
        self._bed_arg = bed
        self.proxy = None
        self.home = None
        self._stop = threading.Event()
        self._refresher = None

    # -- set-up ---------------------------------------------------------------

    def __enter__(self):
        try:
            self.bed = self._bed_arg or Bed()
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _setup(self):
        info = self.bed.info
        exists = self.bed.admin_sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{self.user}'").strip()
        if not exists:
            self.bed.admin_sql(f"CREATE USER {self.user} WITH LOGIN; GRANT rds_iam TO {self.user};")
            self.bed.superuser_sql(f"CREATE DATABASE {self.database} OWNER {self.user};")
        self.home = pathlib.Path(tempfile.mkdtemp(prefix="rdsiam-stack-home-"))
        os.chmod(self.home, 0o755)
        self.login()
        (self.home / ".aws" / "config").write_text(
            "[profile dev]\nsso_session = dev\n"
            f"sso_account_id = {info['account_id']}\nsso_role_name = DatabaseAdmin\nregion = {info['region']}\n\n"
            f"[sso-session dev]\nsso_start_url = {info['start_url']}\nsso_region = {info['region']}\n"
            "sso_registration_scopes = sso:account:access\n"
        )
        self.env = _clean_env()
        self.env.update(
            HOME=str(self.home),
            AWS_EC2_METADATA_DISABLED="true",
            AWS_ENDPOINT_URL=info["moto_url"],
            AWS_ENDPOINT_URL_STS=info["moto_url"],
            AWS_ENDPOINT_URL_SSO=info["sso_url"],
            AWS_ENDPOINT_URL_SSO_OIDC=info["sso_url"],
        )
        if self.log_filter:
            self.env["RDS_IAM_PROXY_LOG"] = self.log_filter
        self.state = self.home / "proxy-state"
        self.upstream_args = [
            "--profile", "dev",
            "--upstream", f"{info['endpoint_host']}:{info['endpoint_port']}",
            "--connect-to", f"127.0.0.1:{info['pg_port']}",
            "--upstream-ca", info["ca_cert"],
        ]
        self.passfile = self.home / "pgpass"
        self._refresh_token()
        self._refresher = threading.Thread(target=self._refresh_loop, daemon=True)
        self._refresher.start()
        self.start_proxy()

    def login(self):
        """What `aws sso login --profile dev` leaves behind."""
        cache = _post(self.bed.info["sso_url"] + "/_bed/login", {"user": self.user, "permission_set": "DatabaseAdmin"})
        path = self.home / ".aws" / "sso" / "cache"
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{hashlib.sha1(b'dev').hexdigest()}.json").write_text(json.dumps(cache))

    def start_proxy(self):
        self.log_path = self.home / "proxy.log"
        cmd = [binary(), *self.upstream_args, "--listen", "127.0.0.1:0", "--state-dir", str(self.state),
               *self.proxy_args]
        self._log = open(self.log_path, "w")
        self.proxy = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)

        def listening():
            if self.proxy.poll() is not None:
                raise RuntimeError("the proxy exited:\n" + self.log_path.read_text())
            text = self.log_path.read_text()
            return "listening on" in text and text

        text = _wait_for("the proxy to listen", 60, listening)
        self.port = int(text.split("listening on ")[1].split()[0].rsplit(":", 1)[1])

    def stop_proxy(self):
        if self.proxy and self.proxy.poll() is None:
            self.proxy.terminate()
            try:
                self.proxy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()

    def _refresh_token(self):
        i = self.bed.info
        cmd = [binary(), "token", "--profile", "dev", "--upstream", f"{i['endpoint_host']}:{i['endpoint_port']}"]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"rds-iam-proxy token failed: {r.stderr.strip()}")
        token = r.stdout.strip().replace("\\", "\\\\").replace(":", "\\:")
        tmp = self.passfile.with_suffix(".tmp")
        tmp.write_text(f"*:*:*:{self.user}:{token}\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.passfile)

    def _refresh_loop(self):
        while not self._stop.wait(60):
            try:
                self._refresh_token()
            except Exception as e:  # noqa: BLE001 - the next round tries again
                print(f"stack: token refresh failed: {e}", file=sys.stderr)

    # -- what tests use ---------------------------------------------------------

    def proxy_dsn(self, **extra):
        parts = {
            "host": "localhost", "port": self.port, "user": self.user, "dbname": self.database,
            "sslmode": "verify-full", "sslrootcert": self.state / "ca.crt",
        }
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def direct_dsn(self, **extra):
        i = self.bed.info
        parts = {
            "host": i["endpoint_host"], "hostaddr": "127.0.0.1", "port": i["pg_port"], "user": self.user,
            "dbname": self.database, "sslmode": "verify-full", "sslrootcert": i["ca_cert"],
            "passfile": self.passfile,
        }
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def admin_sql(self, sql, dbname=None):
        return self.bed.admin_sql(sql, dbname)

    def proxy_log(self):
        return self.log_path.read_text()

    def close(self):
        self._stop.set()
        self.stop_proxy()
        if self._own_bed and getattr(self, "bed", None):
            self.bed.close()
        if self.home:
            shutil.rmtree(self.home, ignore_errors=True)
