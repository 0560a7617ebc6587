#!/usr/bin/env python3
"""Offline Aurora-like test bed for rds-iam-proxy.

One supervisor process runs, and tears down, everything the integration
tests need to talk to "Aurora" with IAM authentication, without AWS:

- PostgreSQL 15 (as the `postgres` OS user) with RDS-style pg_hba: members of
  `rds_iam` log in over TLS through PAM, never without TLS;
- pam_rdsiam.so (testbed/pam_rdsiam.c), compiled at start, which passes the
  password (the IAM token) to
- the token verifier, a thread of this process, that recomputes the SigV4
  signature with botocore against a table of test credentials;
- moto_server (STS, KMS, Kinesis, ...);
- an IAM Identity Center stand-in (SSO portal GetRoleCredentials, SSO-OIDC
  CreateToken) because moto serves neither, plus a control API under /_bed/;
- an STS GetCallerIdentity stand-in that, unlike moto, checks SigV4 query
  signatures (gateway mode replays presigned requests to it);
- with --das, a stand-in for Aurora Database Activity Streams (testbed/das.py):
  PostgreSQL's csvlog, turned into encrypted DAS records on a moto Kinesis
  stream.

Usage: bed.py run [--state-dir DIR] [--keep] [--max-connections N] [--das]

Prints one JSON line on stdout when ready, then runs until stdin reaches EOF,
SIGTERM/SIGINT arrives or its parent process goes away. The bed therefore
dies with the test process that started it: keep its stdin a pipe
(`< /dev/null` stops it at once).
"""

import argparse
import datetime as dt
import hashlib
import hmac
import http.server
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree
from xml.sax.saxutils import escape

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import botocore.session

ENDPOINT_HOST = "demo.cluster-c0ffee.eu-west-1.rds.amazonaws.com"
ENDPOINT_PORT = 5432
WRONG_NAME_HOST = "other.cluster-c0ffee.eu-west-1.rds.amazonaws.com"
REGION = "eu-west-1"
ACCOUNT_ID = "111122223333"
DATABASE = "mylab"
MASTER_USER = "master"
PG_BIN = "/usr/lib/postgresql/15/bin"
PG_OS_USER = "postgres"

# Fixed long-term key: tests may sign with it directly (it is in no AWS account).
LONG_TERM_ACCESS_KEY_ID = "AKIAIOSFODNN7BEDTEST"
LONG_TERM_SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYBEDTESTKEY"

MAX_EXPIRES = 900
FUTURE_SKEW_SECS = 60
MAX_USER = 1024
MAX_TOKEN = 8192

HERE = os.path.dirname(os.path.abspath(__file__))
PR_SET_PDEATHSIG = 1


def log(msg):
    print(f"bed: {msg}", file=sys.stderr, flush=True)


def free_port():
    # Bind-to-0 then release: a small race with other beds, handled by retries
    # where a collision is visible (PostgreSQL), tolerated elsewhere.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, deadline_secs, probe, interval=0.05):
    deadline = time.monotonic() + deadline_secs
    last = None
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except Exception as e:  # noqa: BLE001 - probing, the last error is reported
            last = e
        time.sleep(interval)
    raise RuntimeError(f"timed out after {deadline_secs}s waiting for {what} (last error: {last!r})")


def utc_now():
    return dt.datetime.now(dt.timezone.utc)


def rfc3339(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def child_preexec(uid=None, gid=None, death_signal=signal.SIGTERM):
    """preexec_fn: drop to uid/gid, then ask for a signal when we die.

    Traps: PR_SET_PDEATHSIG is cleared by a credential change, so it must come
    after setuid; it fires when the *thread* that forked exits, so children
    are started from the main thread only.
    """

    def fn():
        import ctypes

        os.setsid()
        if gid is not None:
            os.setgroups([])
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)

    return fn


# --------------------------------------------------------------------------
# Certificates


def make_certs(d):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = utc_now()

    def write_key(key, path, mode=0o644):
        with open(path, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        os.chmod(path, mode)

    def write_cert(cert, path):
        with open(path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(path, 0o644)

    def ca(cn):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(ca_key, ca_cert, host):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(host),
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        return key, cert

    paths = {}
    ca_key, ca_cert = ca("rds-iam-proxy test bed CA")
    write_cert(ca_cert, paths.setdefault("ca_cert", f"{d}/ca.crt"))
    key, cert = leaf(ca_key, ca_cert, ENDPOINT_HOST)
    write_cert(cert, paths.setdefault("server_cert", f"{d}/server.crt"))
    write_key(key, paths.setdefault("server_key", f"{d}/server.key"))

    # Same name, unrelated CA: a client trusting only ca.crt must refuse it.
    other_key, other_cert = ca("unrelated test CA")
    write_cert(other_cert, paths.setdefault("other_ca_cert", f"{d}/other-ca.crt"))
    key, cert = leaf(other_key, other_cert, ENDPOINT_HOST)
    write_cert(cert, paths.setdefault("other_ca_server_cert", f"{d}/other-ca-server.crt"))
    write_key(key, paths.setdefault("other_ca_server_key", f"{d}/other-ca-server.key"))

    # Trusted CA, wrong name (the SANs still include localhost/127.0.0.1, so
    # only a client checking the endpoint name refuses it).
    key, cert = leaf(ca_key, ca_cert, WRONG_NAME_HOST)
    write_cert(cert, paths.setdefault("wrong_name_cert", f"{d}/wrong-name.crt"))
    write_key(key, paths.setdefault("wrong_name_key", f"{d}/wrong-name.key"))
    return paths


# --------------------------------------------------------------------------
# Token verifier


class Credentials:
    """Access key -> (secret, session token or None). Shared by all threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._table = {}
        # Called on a miss to learn credentials minted elsewhere (moto).
        self.on_miss = None

    def add(self, access_key, secret, session_token=None):
        with self._lock:
            self._table[access_key] = (secret, session_token)

    def get(self, access_key):
        with self._lock:
            hit = self._table.get(access_key)
        if hit is None and self.on_miss is not None:
            self.on_miss()
            with self._lock:
                hit = self._table.get(access_key)
        return hit


def learn_moto_sessions(moto_url, creds):
    """Like RDS, which accepts whatever STS issued: credentials that moto minted
    for a client directly (AssumeRole from a profile, AssumeRoleWithSAML) are
    read from moto's model dump and added to the verifier's table."""
    try:
        with urllib.request.urlopen(f"{moto_url}/moto-api/data.json", timeout=5) as r:
            data = json.load(r)
    except Exception as e:  # noqa: BLE001 - a miss stays a miss
        log(f"cannot read moto's sessions: {e}")
        return
    for role in data.get("sts", {}).get("AssumedRole", []):
        if role.get("access_key_id") and role.get("secret_access_key"):
            creds.add(role["access_key_id"], role["secret_access_key"], role.get("session_token"))


class Reject(Exception):
    def __init__(self, reason, access_key="-"):
        super().__init__(reason)
        self.access_key = access_key


def verify_token(token, login_user, creds, now=None):
    """Returns (ok, reason, access_key). Never raises."""
    try:
        return True, "ok", _verify(token, login_user, creds, now or time.time())
    except Reject as e:
        return False, str(e), e.access_key
    except Exception as e:  # noqa: BLE001 - any surprise is a rejection
        return False, f"malformed token ({type(e).__name__})", "-"


def session_token_problem(expected, presented):
    """Why `presented` (X-Amz-Security-Token) does not go with a key whose
    session token is `expected` (None: long-term key); None if it does."""
    if expected is None:
        return "security token given for a long-term key" if presented is not None else None
    if presented is None or not hmac.compare_digest(presented.encode(), expected.encode()):
        return "security token missing or wrong"
    return None


def _verify(token, login_user, creds, now):
    if "://" in token:
        raise Reject("token carries a URL scheme")
    hostport, sep, query = token.partition("/?")
    if not sep:
        raise Reject("token is not HOST:PORT/?QUERY")
    if hostport != f"{ENDPOINT_HOST}:{ENDPOINT_PORT}":
        raise Reject(f"signed for {hostport!r}, not the endpoint")

    params = {}
    for pair in query.split("&"):
        k, eq, v = pair.partition("=")
        if not eq:
            raise Reject("query pair without '='")
        k, v = urllib.parse.unquote(k, errors="strict"), urllib.parse.unquote(v, errors="strict")
        if k in params:
            raise Reject(f"duplicate parameter {k}")
        params[k] = v

    def need(name):
        if name not in params:
            raise Reject(f"missing {name}")
        return params[name]

    if need("Action") != "connect":
        raise Reject("Action is not connect")
    if need("DBUser") != login_user:
        raise Reject(f"DBUser {params['DBUser']!r} is not the login user")
    if need("X-Amz-Algorithm") != "AWS4-HMAC-SHA256":
        raise Reject("unsupported algorithm")
    if need("X-Amz-SignedHeaders") != "host":
        raise Reject("signed headers are not exactly 'host'")

    amz_date = need("X-Amz-Date")
    signed_at = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    expires = int(need("X-Amz-Expires"))
    if not 0 < expires <= MAX_EXPIRES:
        raise Reject(f"X-Amz-Expires {expires} outside 1..{MAX_EXPIRES}")
    if signed_at.timestamp() + expires <= now:
        raise Reject("token expired")
    if signed_at.timestamp() > now + FUTURE_SKEW_SECS:
        raise Reject("token dated in the future")

    scope = need("X-Amz-Credential").split("/")
    if len(scope) != 5:
        raise Reject("malformed credential scope")
    access_key, date, region, service, terminator = scope
    if date != amz_date[:8] or region != REGION or service != "rds-db" or terminator != "aws4_request":
        raise Reject(f"credential scope {date}/{region}/{service}/{terminator} does not fit", access_key)

    entry = creds.get(access_key)
    if entry is None:
        raise Reject("unknown access key", access_key)
    secret, session_token = entry
    problem = session_token_problem(session_token, params.get("X-Amz-Security-Token"))
    if problem:
        raise Reject(problem, access_key)

    # Recompute with botocore's own signer. The query is rebuilt from the
    # decoded parameters (request.params), so botocore re-encodes it
    # canonically: a token with sloppy percent-encoding fails here, as it
    # would at AWS, instead of being checked against its own bytes.
    signed_params = {k: v for k, v in params.items() if k != "X-Amz-Signature"}
    request = botocore.awsrequest.AWSRequest(
        method="GET", url=f"https://{hostport}/", params=signed_params
    )
    request.context["timestamp"] = amz_date
    signer = botocore.auth.SigV4QueryAuth(
        botocore.credentials.Credentials(access_key, secret, session_token), "rds-db", REGION, expires
    )
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, need("X-Amz-Signature")):
        raise Reject("signature mismatch", access_key)
    return access_key


class Verifier:
    """Serves pam_rdsiam.so on a unix socket, one thread per connection."""

    def __init__(self, sock_path, log_path, creds):
        self.creds = creds
        self._log = open(log_path, "a", buffering=1)
        self._log_lock = threading.Lock()
        verifier = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                verifier.handle(self.request)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(sock_path, Handler)
        # The module runs as `postgres`, the bed as root.
        os.chmod(sock_path, 0o666)
        self.thread = threading.Thread(target=self.server.serve_forever, name="verifier", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def handle(self, conn):
        conn.settimeout(10)
        user, ok, reason, key = "?", False, "bad request", "-"
        try:
            user = self._field(conn, MAX_USER).decode("utf-8", "strict")
            token = self._field(conn, MAX_TOKEN).decode("utf-8", "strict")
            ok, reason, key = verify_token(token, user, self.creds)
        except Exception as e:  # noqa: BLE001 - fail closed
            reason = f"bad request ({type(e).__name__})"
        # Log before answering: a test that reads the log right after its login
        # failed must find this verdict.
        with self._log_lock:
            self._log.write(
                f"{rfc3339(utc_now())} {'ACCEPT' if ok else 'REJECT'} user={user!r} key={key} reason={reason}\n"
            )
        try:
            conn.sendall(b"Y" if ok else b"N")
        except OSError:
            pass

    @staticmethod
    def _field(conn, limit):
        (n,) = struct.unpack(">I", Verifier._exact(conn, 4))
        if n > limit:
            raise ValueError("field too long")
        return Verifier._exact(conn, n)

    @staticmethod
    def _exact(conn, n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf


# --------------------------------------------------------------------------
# IAM Identity Center stand-in
#
# moto serves STS but not the SSO portal (GetRoleCredentials) nor SSO-OIDC
# (CreateToken). This stand-in serves both with the wire shapes of the real
# services (botocore models sso/2019-06-10 and sso-oidc/2019-06-10, as used
# by the Rust aws-sdk-sso / aws-sdk-ssooidc clients inside aws-config), and
# mints real moto credentials through AssumeRole so that GetCallerIdentity
# answers like Identity Center:
# arn:aws:sts::ACCT:assumed-role/AWSReservedSSO_<set>_<hex>/<user>.


class IdentityCenter:
    def __init__(self, moto_url, creds):
        self.creds = creds
        self.lock = threading.Lock()
        self.access_tokens = {}  # token -> {user, permission_set, expires (epoch s)}
        self.refresh_tokens = {}  # token -> {user, permission_set, client_id, ttl}
        self.clients = {}  # client_id -> client_secret
        self.requests = []
        self.url = None
        self.start_url = None
        session = botocore.session.get_session()
        self.sts, self.iam = (
            session.create_client(
                service,
                region_name=REGION,
                endpoint_url=moto_url,
                aws_access_key_id=LONG_TERM_ACCESS_KEY_ID,
                aws_secret_access_key=LONG_TERM_SECRET_ACCESS_KEY,
            )
            for service in ("sts", "iam")
        )
        self.roles = set()  # permission sets whose IAM role exists in moto
        self.das = None  # the DAS stand-in (das.DasEmulator) when the bed runs with --das

    @staticmethod
    def role_name(permission_set):
        # Real suffixes are 16 hex digits, stable per permission set and account.
        suffix = hashlib.sha256(f"{ACCOUNT_ID}/{permission_set}".encode()).hexdigest()[:16]
        return f"AWSReservedSSO_{permission_set}_{suffix}"

    def mint(self, user, permission_set, credentials_ttl=None):
        """Role credentials from moto; `credentials_ttl` (seconds) makes the
        reported expiration that much from now, so that a client has to come
        back for new ones soon (moto's own minimum is 900 s)."""
        with self.lock:
            if permission_set not in self.roles:
                # moto's GetCallerIdentity makes up a fresh random AROA... UserId
                # on every call for a role that IAM does not know; with the role
                # created (as Identity Center provisions it) the UserId is the
                # role's stable id, as at AWS. Best effort: a name IAM refuses
                # only costs that stability.
                try:
                    self.iam.create_role(
                        RoleName=self.role_name(permission_set),
                        AssumeRolePolicyDocument=json.dumps({
                            "Version": "2012-10-17",
                            "Statement": [{
                                "Effect": "Allow", "Action": "sts:AssumeRoleWithSAML",
                                "Principal": {"Federated": f"arn:aws:iam::{ACCOUNT_ID}:saml-provider/AWSSSO"},
                            }],
                        }),
                    )
                except Exception as e:  # noqa: BLE001
                    log(f"cannot create IAM role for permission set {permission_set!r}: {e}")
                self.roles.add(permission_set)
            resp = self.sts.assume_role(
                RoleArn=f"arn:aws:iam::{ACCOUNT_ID}:role/{self.role_name(permission_set)}",
                RoleSessionName=user,
                DurationSeconds=3600,
            )
        c = resp["Credentials"]
        self.creds.add(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"])
        expiration = c["Expiration"].timestamp()
        if credentials_ttl is not None:
            expiration = min(expiration, time.time() + credentials_ttl)
        return {
            "accessKeyId": c["AccessKeyId"],
            "secretAccessKey": c["SecretAccessKey"],
            "sessionToken": c["SessionToken"],
            "expiration": int(expiration * 1000),
        }

    def new_access_token(self, user, permission_set, ttl, credentials_ttl=None):
        token = "aoa" + secrets.token_urlsafe(48)
        self.access_tokens[token] = {
            "user": user, "permission_set": permission_set, "expires": time.time() + ttl,
            "credentials_ttl": credentials_ttl,
        }
        return token

    def login(self, body):
        user = body["user"]
        permission_set = body.get("permission_set")
        ttl = int(body.get("access_token_ttl", 3600))
        refreshable = bool(body.get("refreshable", True))
        credentials_ttl = body.get("credentials_ttl")
        now = utc_now()
        client_id = "bedclient-" + secrets.token_hex(8)
        client_secret = secrets.token_urlsafe(32)
        with self.lock:
            self.clients[client_id] = client_secret
            access_token = self.new_access_token(user, permission_set, ttl, credentials_ttl)
            cache = {
                "startUrl": self.start_url,
                "region": REGION,
                "accessToken": access_token,
                "expiresAt": rfc3339(now + dt.timedelta(seconds=ttl)),
                "clientId": client_id,
                "clientSecret": client_secret,
                "registrationExpiresAt": rfc3339(now + dt.timedelta(days=90)),
            }
            if refreshable:
                refresh = "aorAAAA" + secrets.token_urlsafe(48)
                self.refresh_tokens[refresh] = {
                    "user": user, "permission_set": permission_set, "client_id": client_id, "ttl": ttl,
                }
                cache["refreshToken"] = refresh
        return cache

    def record(self, **kw):
        with self.lock:
            self.requests.append({"time": time.time(), **kw})

    def get_role_credentials(self, query, headers):
        """GET /federation/credentials -> (status, headers, body)."""
        role = query.get("role_name", [None])[0]
        account = query.get("account_id", [None])[0]
        bearer = headers.get("x-amz-sso_bearer_token")
        with self.lock:
            session = self.access_tokens.get(bearer) if bearer else None
        self.record(path="/federation/credentials", role=role, account=account,
                    user=session["user"] if session else None)
        if session is None or session["expires"] <= time.time():
            return error(401, "UnauthorizedException", "Session token not found or invalid")
        if role is None or account is None:
            return error(400, "InvalidRequestException", "role_name and account_id are required")
        if account != ACCOUNT_ID or (session["permission_set"] not in (None, role)):
            return error(403, "ForbiddenException", "No access")
        return 200, {}, {"roleCredentials": self.mint(session["user"], role, session.get("credentials_ttl"))}

    def create_token(self, body):
        """POST /token (SSO-OIDC CreateToken) with grant_type refresh_token."""
        client_id = body.get("clientId")
        self.record(path="/token", role=None, user=None, grant_type=body.get("grantType"), client_id=client_id)
        with self.lock:
            if client_id not in self.clients or not hmac.compare_digest(
                self.clients[client_id], str(body.get("clientSecret", ""))
            ):
                return oidc_error(401, "InvalidClientException", "invalid_client")
            if body.get("grantType") != "refresh_token":
                return oidc_error(400, "UnsupportedGrantTypeException", "unsupported_grant_type")
            old = self.refresh_tokens.pop(str(body.get("refreshToken")), None)
            if old is None or old["client_id"] != client_id:
                return oidc_error(400, "InvalidGrantException", "invalid_grant")
            # Rotate the refresh token, as Identity Center may: the old one is spent.
            refresh = "aorAAAA" + secrets.token_urlsafe(48)
            self.refresh_tokens[refresh] = old
            ttl = max(old["ttl"], 60)
            access_token = self.new_access_token(old["user"], old["permission_set"], ttl)
        self.requests[-1]["user"] = old["user"]
        return 200, {}, {
            "accessToken": access_token, "tokenType": "Bearer", "expiresIn": ttl, "refreshToken": refresh,
        }

    def serve(self):
        ic = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status, headers, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def body(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                return json.loads(raw) if raw else {}

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                try:
                    if url.path == "/federation/credentials":
                        return self.reply(*ic.get_role_credentials(urllib.parse.parse_qs(url.query), self.headers))
                    if url.path == "/_bed/requests":
                        with ic.lock:
                            return self.reply(200, {}, list(ic.requests))
                    if url.path.startswith("/_bed/das-") and ic.das is not None:
                        return self.reply(*ic.das.control("GET", url.path, {}))
                    self.reply(*error(404, "ResourceNotFoundException", f"no route for GET {url.path}"))
                except Exception as e:  # noqa: BLE001
                    self.reply(*error(500, "InternalServerException", repr(e)))

            def do_POST(self):
                path = urllib.parse.urlsplit(self.path).path
                try:
                    body = self.body()
                    if path == "/token":
                        return self.reply(*ic.create_token(body))
                    if path.startswith("/_bed/das-") and ic.das is not None:
                        return self.reply(*ic.das.control("POST", path, body))
                    if path == "/_bed/login":
                        return self.reply(200, {}, ic.login(body))
                    if path == "/_bed/credentials":
                        return self.reply(200, {}, ic.mint(body["user"], body.get("permission_set", "DatabaseUser")))
                    if path == "/_bed/register":
                        # Verifier-only credentials (unknown to moto), e.g. with an
                        # oversized session token to exercise the 8 KB token path.
                        ic.creds.add(body["access_key_id"], body["secret_access_key"], body.get("session_token"))
                        return self.reply(200, {}, {"registered": body["access_key_id"]})
                    if path == "/_bed/expire":
                        with ic.lock:
                            found = body.get("access_token") in ic.access_tokens
                            if found:
                                ic.access_tokens[body["access_token"]]["expires"] = 0
                        return self.reply(200 if found else 404, {}, {"found": found})
                    if path == "/_bed/revoke":
                        with ic.lock:
                            found = ic.refresh_tokens.pop(body.get("refresh_token"), None) is not None
                        return self.reply(200 if found else 404, {}, {"found": found})
                    self.reply(*error(404, "ResourceNotFoundException", f"no route for POST {path}"))
                except Exception as e:  # noqa: BLE001
                    self.reply(*error(500, "InternalServerException", repr(e)))

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        self.start_url = f"{self.url}/start"
        threading.Thread(target=self.server.serve_forever, name="sso", daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def error(status, code, message):
    # restJson1 errors: the SDKs read the code from x-amzn-ErrorType first.
    return status, {"x-amzn-ErrorType": code}, {"__type": code, "message": message}


def oidc_error(status, code, oauth_error):
    # SSO-OIDC errors carry OAuth-style members (error, error_description).
    return status, {"x-amzn-ErrorType": code}, {
        "error": oauth_error, "error_description": f"{code} from the test bed",
    }


# --------------------------------------------------------------------------
# STS GetCallerIdentity stand-in that checks signatures
#
# Gateway mode: a client presigns sts:GetCallerIdentity (query-string SigV4,
# with the signed header x-rds-iam-proxy-gateway-id), the gateway replays it
# to STS and trusts the ARN that comes back. moto answers without looking at
# signatures, so a gateway that forwarded a tampered, stale or re-targeted
# request would pass against it; this stand-in refuses what STS refuses, in
# STS's own error shapes, and records what reached it.

STS_NS = "https://sts.amazonaws.com/doc/2011-06-15/"
# STS ignores X-Amz-Expires on presigned GetCallerIdentity and allows 15
# minutes after X-Amz-Date, 5 minutes of clock skew ahead.
STS_MAX_AGE_SECS = 15 * 60
STS_MAX_AHEAD_SECS = 5 * 60
STS_MAX_BODY = 64 * 1024
GATEWAY_ID_HEADER = "x-rds-iam-proxy-gateway-id"
# Global endpoint (signed for us-east-1) or a regional one (China: .com.cn).
STS_HOST = re.compile(r"sts(?:\.([a-z0-9-]+))?\.amazonaws\.com(?:\.cn)?(?::443)?")
INVALID_TOKEN = "The security token included in the request is invalid"


class StsError(Exception):
    def __init__(self, status, code, message, access_key="-"):
        super().__init__(message)
        self.status, self.code, self.access_key = status, code, access_key


class _SignedAsReceived(botocore.auth.SigV4QueryAuth):
    """botocore's query signer, fed exactly the headers the request names in
    X-Amz-SignedHeaders with their received values: its own choice (all but a
    blacklist, host from the URL) is a signer's choice, not a verifier's."""

    def __init__(self, credentials, region, signed_headers):
        super().__init__(credentials, "sts", region)
        self._signed_headers = signed_headers

    def headers_to_sign(self, request):
        return self._signed_headers


def check_sts_request(method, path, raw_query, headers, body, creds, expired_keys, now):
    """Verifies a presigned GetCallerIdentity as STS would.

    `headers` is the received http.client.HTTPMessage. Returns (access_key,
    secret, session_token); raises StsError.
    """
    def bad(message):
        return StsError(400, "InvalidParameterValue", message)

    if path != "/":
        raise bad(f"no STS operation at {path!r}")
    params = {}
    for pair in raw_query.split("&") if raw_query else ():
        k, _, v = pair.partition("=")
        try:
            k, v = urllib.parse.unquote(k, errors="strict"), urllib.parse.unquote(v, errors="strict")
        except UnicodeDecodeError:
            raise bad("query is not valid percent-encoded UTF-8") from None
        if k in params:
            raise bad(f"duplicate parameter {k}")
        params[k] = v

    if "X-Amz-Signature" not in params:
        raise StsError(400, "MissingAuthenticationToken", "Request is missing Authentication Token")
    for name in ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-SignedHeaders"):
        if name not in params:
            raise bad(f"{name} is missing")
    if params.get("Action") != "GetCallerIdentity" or params.get("Version") != "2011-06-15":
        # Real STS would run any action; a gateway must never replay one.
        raise StsError(400, "InvalidAction", "this stand-in serves GetCallerIdentity (2011-06-15) only")
    if params["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
        raise bad(f"unsupported X-Amz-Algorithm {params['X-Amz-Algorithm']!r}")
    amz_date = params["X-Amz-Date"]
    try:
        signed_at = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
        signed_at = signed_at.timestamp()
    except ValueError:
        raise bad("X-Amz-Date is not YYYYMMDD'T'HHMMSS'Z'") from None
    scope = params["X-Amz-Credential"].split("/")
    if len(scope) != 5 or not scope[0]:
        raise bad("X-Amz-Credential is not AKID/DATE/REGION/SERVICE/aws4_request")
    access_key, date, region, service, terminator = scope

    def refuse(code, message):
        return StsError(403, code, message, access_key)

    # The gateway dials the stand-in but sends the host the client signed.
    hosts = headers.get_all("Host") or []
    if len(hosts) != 1:
        raise bad("not exactly one Host header")
    host = hosts[0]
    m = STS_HOST.fullmatch(host)
    if m is None:
        # Stand-in specific: STS is never reached under another name.
        raise refuse("AccessDenied", f"Host {host!r} is not an STS endpoint")
    # STS's own wording, for whoever reads a failing test.
    mismatch = "SignatureDoesNotMatch"
    if service != "sts":
        raise refuse(mismatch, "Credential should be scoped to correct service: 'sts'.")
    if terminator != "aws4_request":
        raise refuse(mismatch, f"Credential should be scoped with a valid terminator: 'aws4_request', "
                               f"not {terminator!r}.")
    if region != (m.group(1) or "us-east-1"):
        raise refuse(mismatch, f"Credential should be scoped to a valid region, not {region!r}.")
    if date != amz_date[:8]:
        raise refuse(mismatch, f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
                               f"from HTTP: {date!r} != '{amz_date[:8]}', from '{amz_date}'.")

    def stamp(t):
        return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))

    if signed_at < now - STS_MAX_AGE_SECS:
        raise refuse(mismatch, f"Signature expired: {amz_date} is now earlier than "
                               f"{stamp(now - STS_MAX_AGE_SECS)} ({stamp(now)} - 15 min.)")
    if signed_at > now + STS_MAX_AHEAD_SECS:
        raise refuse(mismatch, f"Signature not yet current: {amz_date} is still later than "
                               f"{stamp(now + STS_MAX_AHEAD_SECS)} ({stamp(now)} + 5 min.)")

    signed = botocore.awsrequest.HTTPHeaders()
    names = params["X-Amz-SignedHeaders"].split(";")
    if "host" not in names:
        raise refuse(mismatch, "'Host' must be a signed header")
    for name in names:
        values = headers.get_all(name)
        if not values:
            raise refuse(mismatch, f"header {name!r} is in X-Amz-SignedHeaders but not in the request")
        for value in values:
            signed[name] = value

    entry = creds.get(access_key)
    if entry is None:
        raise refuse("InvalidClientTokenId", INVALID_TOKEN + " (unknown access key).")
    secret, session_token = entry
    problem = session_token_problem(session_token, params.get("X-Amz-Security-Token"))
    if problem:
        raise refuse("InvalidClientTokenId", f"{INVALID_TOKEN} ({problem}).")
    if access_key in expired_keys:
        raise refuse("ExpiredToken", "The security token included in the request is expired")

    # As the RDS token verifier does: the query is rebuilt from the decoded
    # parameters and re-encoded canonically by botocore, the body is hashed
    # as received (empty for GET: STS does not take UNSIGNED-PAYLOAD).
    request = botocore.awsrequest.AWSRequest(
        method=method, url=f"https://{host}/", data=body,
        params={k: v for k, v in params.items() if k != "X-Amz-Signature"},
    )
    request.context["timestamp"] = amz_date
    signer = _SignedAsReceived(botocore.credentials.Credentials(access_key, secret, session_token), region, signed)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    if not hmac.compare_digest(expected.encode(), params["X-Amz-Signature"].encode()):
        raise refuse(mismatch, "The request signature we calculated does not match the signature you provided.")
    return access_key, secret, session_token


class StsVerify:
    """Plain-HTTP server: `/` is GetCallerIdentity, `/_bed/` its control API."""

    def __init__(self, moto_url, creds, log_path):
        self.moto_url = moto_url
        self.creds = creds
        self.lock = threading.Lock()
        self.requests = []
        self.identities = {}  # access key -> (arn, user id, account)
        self.expired_keys = set()
        self.delay = 0.0
        self._log = open(log_path, "a", buffering=1)

    def identity(self, access_key, secret, session_token):
        """Arn, UserId and Account as moto's GetCallerIdentity states them.

        moto knows which role each session it minted belongs to (the SSO
        stand-in's included), so it is asked, once per key: the answer
        cannot change for a key, and the cache keeps a check at ~1 ms. moto
        does not check signatures; the request is signed anyway so that it is
        one moto would also get from a real client.
        """
        with self.lock:
            hit = self.identities.get(access_key)
        if hit:
            return hit
        request = botocore.awsrequest.AWSRequest(
            method="POST", url=f"{self.moto_url}/", data=b"Action=GetCallerIdentity&Version=2011-06-15",
            headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        )
        botocore.auth.SigV4Auth(
            botocore.credentials.Credentials(access_key, secret, session_token), "sts", REGION
        ).add_auth(request)
        with urllib.request.urlopen(
            urllib.request.Request(request.url, data=request.body, headers=dict(request.headers.items())), timeout=10
        ) as r:
            root = xml.etree.ElementTree.fromstring(r.read())
        hit = tuple(root.findtext(f".//{{*}}{name}") for name in ("Arn", "UserId", "Account"))
        if not all(hit):
            raise RuntimeError(f"moto's GetCallerIdentity lacks Arn/UserId/Account for {access_key}")
        with self.lock:
            self.identities[access_key] = hit
        return hit

    def answer(self, method, path, raw_query, headers, body):
        """-> (status, XML, request id, record) for one STS request. Never raises."""
        request_id = str(uuid.uuid4())
        gateway_ids = headers.get_all(GATEWAY_ID_HEADER) or []
        record = {
            "time": time.time(), "access_key_id": "-", "verdict": "ok",
            "gateway_id": ",".join(gateway_ids) if gateway_ids else None, "gateway_id_signed": False,
            "host": headers.get("Host"), "reason": "ok",
        }
        try:
            params = urllib.parse.parse_qs(raw_query)
            signed_names = (params.get("X-Amz-SignedHeaders") or [""])[0].split(";")
            record["gateway_id_signed"] = GATEWAY_ID_HEADER in signed_names and bool(gateway_ids)
            with self.lock:
                expired = set(self.expired_keys)
            key, secret, token = check_sts_request(
                method, path, raw_query, headers, body, self.creds, expired, time.time()
            )
            record["access_key_id"] = key
            arn, user_id, account = self.identity(key, secret, token)
            record["arn"] = arn
            doc = (
                f'<GetCallerIdentityResponse xmlns="{STS_NS}"><GetCallerIdentityResult>'
                f"<Arn>{escape(arn)}</Arn><UserId>{escape(user_id)}</UserId><Account>{escape(account)}</Account>"
                f"</GetCallerIdentityResult><ResponseMetadata><RequestId>{request_id}</RequestId>"
                "</ResponseMetadata></GetCallerIdentityResponse>"
            )
            return 200, doc, request_id, record
        except Exception as e:  # noqa: BLE001 - junk gets an STS-shaped answer
            if not isinstance(e, StsError):
                e = StsError(500, "InternalFailure", f"stand-in failed: {e!r}", record["access_key_id"])
            record.update(access_key_id=e.access_key, verdict=e.code, reason=str(e))
            kind = "Receiver" if e.status >= 500 else "Sender"
            doc = (
                f'<ErrorResponse xmlns="{STS_NS}"><Error><Type>{kind}</Type><Code>{e.code}</Code>'
                f"<Message>{escape(str(e))}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>"
            )
            return e.status, doc, request_id, record

    def note(self, record):
        # Logged before the answer goes out: a test that reads the log right
        # after its request finds the verdict.
        with self.lock:
            self.requests.append(record)
            self._log.write(
                f"{rfc3339(utc_now())} {'ACCEPT' if record['verdict'] == 'ok' else 'REJECT'} "
                f"key={record['access_key_id']} verdict={record['verdict']} gateway_id={record['gateway_id']!r} "
                f"signed={record['gateway_id_signed']} host={record['host']!r} reason={record['reason']!r}\n"
            )

    def serve(self):
        sts = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in one segment (flushed after each
            # request): written apart, on a keep-alive connection the body
            # waits ~40 ms for the client's delayed ACK (Nagle).
            wbufsize = -1
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def reply(self, status, content_type, data, extra=()):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def json_reply(self, status, value):
                self.reply(status, "application/json", json.dumps(value).encode())

            def read_body(self):
                # No chunked bodies: close rather than misread the next request.
                if "Transfer-Encoding" in self.headers:
                    self.close_connection = True
                    raise ValueError("Transfer-Encoding is not supported")
                n = int(self.headers.get("Content-Length") or 0)
                if not 0 <= n <= STS_MAX_BODY:
                    self.close_connection = True
                    raise ValueError("bad Content-Length")
                return self.rfile.read(n) if n else b""

            def route(self, method):
                url = urllib.parse.urlsplit(self.path)
                try:
                    body = self.read_body()
                except ValueError as e:
                    return self.json_reply(400, {"error": str(e)})
                if url.path.startswith("/_bed/"):
                    return self.control(method, url.path, body)
                status, doc, request_id, record = sts.answer(method, url.path, url.query, self.headers, body)
                sts.note(record)
                if sts.delay:
                    time.sleep(sts.delay)
                self.reply(status, "text/xml", doc.encode(), [("x-amzn-RequestId", request_id)])

            def control(self, method, path, body):
                try:
                    args = json.loads(body) if body else {}
                    if (method, path) == ("GET", "/_bed/sts-requests"):
                        with sts.lock:
                            return self.json_reply(200, list(sts.requests))
                    if (method, path) == ("POST", "/_bed/sts-delay"):
                        seconds = float(args["seconds"])
                        if not 0 <= seconds <= 600:
                            raise ValueError("seconds must be within 0..600")
                        sts.delay = seconds
                        return self.json_reply(200, {"seconds": seconds})
                    if (method, path) == ("POST", "/_bed/sts-expire"):
                        with sts.lock:
                            sts.expired_keys.add(str(args["access_key_id"]))
                        return self.json_reply(200, {"expired": args["access_key_id"]})
                    return self.json_reply(404, {"error": f"no route for {method} {path}"})
                except Exception as e:  # noqa: BLE001
                    return self.json_reply(400, {"error": repr(e)})

            def do_GET(self):
                self.route("GET")

            def do_POST(self):
                self.route("POST")

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # the login benchmark opens many at once

            def handle_error(self, request, client_address):
                # A client hanging up mid-request is no news; anything else is.
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="sts-verify", daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self._log.close()


# --------------------------------------------------------------------------
# Supervisor


class Bed:
    def __init__(self, state_dir, keep, max_connections=200, das=False):
        self.keep = keep
        self.das_enabled = das
        self.das = None
        self.max_connections = max_connections
        self.state_dir = state_dir
        self.pam_service = "rdsiam_" + secrets.token_hex(6)
        self.pam_file = f"/etc/pam.d/{self.pam_service}"
        self.pg = None
        self.moto = None
        self.verifier = None
        self.ic = None
        self.sts_verify = None
        self.stopping = threading.Event()
        self.pg_user = pwd.getpwnam(PG_OS_USER)
        self.master_password = secrets.token_urlsafe(18)

    # -- start -----------------------------------------------------------

    @staticmethod
    def sweep_stale():
        """Removes what a SIGKILLed bed left behind (its PAM file, state dir).

        Its postgres and moto_server already died of PR_SET_PDEATHSIG.
        """
        for name in os.listdir("/etc/pam.d"):
            if not name.startswith("rdsiam_"):
                continue
            path = f"/etc/pam.d/{name}"
            try:
                with open(path) as f:
                    fields = dict(w.split("=", 1) for w in f.readline().split() if "=" in w)
                pid, state_dir = int(fields["pid"]), fields["dir"].rstrip(";")
                os.kill(pid, 0)
                continue  # owner alive
            except ProcessLookupError:
                pass
            except Exception:  # noqa: BLE001 - not ours, or unreadable: leave it
                continue
            log(f"removing stale bed {state_dir} (pid {pid} is gone)")
            os.unlink(path)
            if state_dir.startswith("/tmp/rdsiam-bed-"):
                shutil.rmtree(state_dir, ignore_errors=True)

    def start(self):
        t0 = time.monotonic()
        self.sweep_stale()
        d = self.state_dir
        os.chmod(d, 0o755)  # `postgres` must traverse it; the checkout may be 0700
        self.creds = Credentials()
        self.creds.add(LONG_TERM_ACCESS_KEY_ID, LONG_TERM_SECRET_ACCESS_KEY, None)

        self.moto_port = free_port()
        moto_log = open(f"{d}/moto.log", "ab")
        # With --das, moto runs patched so that Kinesis resharding behaves
        # like Kinesis (das.patch_moto_kinesis); otherwise it is moto as is.
        moto_cmd = (
            [sys.executable, os.path.join(HERE, "das.py"), "moto-server"] if self.das_enabled
            else [os.path.join(os.path.dirname(sys.executable), "moto_server")]
        )
        self.moto = subprocess.Popen(
            moto_cmd + ["-H", "127.0.0.1", "-p", str(self.moto_port)],
            stdin=subprocess.DEVNULL, stdout=moto_log, stderr=moto_log,
            env={**os.environ, "MOTO_ACCOUNT_ID": ACCOUNT_ID},
            preexec_fn=child_preexec(),
        )
        self.moto_url = f"http://127.0.0.1:{self.moto_port}"
        self.creds.on_miss = lambda: learn_moto_sessions(self.moto_url, self.creds)

        self.paths = make_certs(d)
        self.compile_pam_module()
        self.verifier_log = f"{d}/verifier.log"
        self.verifier_sock = f"{d}/verifier.sock"
        self.verifier = Verifier(self.verifier_sock, self.verifier_log, self.creds)
        self.verifier.start()
        self.write_pam_service()
        self.start_postgres()

        wait_until("moto_server", 60, lambda: self._moto_ready())
        self.ic = IdentityCenter(self.moto_url, self.creds)
        self.ic.serve()
        self.sts_verify_log = f"{d}/sts_verify.log"
        self.sts_verify = StsVerify(self.moto_url, self.creds, self.sts_verify_log)
        self.sts_verify.serve()
        if self.das_enabled:
            self.start_das()
        self.start_secs = time.monotonic() - t0

    def start_das(self):
        import das

        version = subprocess.run([f"{PG_BIN}/postgres", "--version"], check=True, capture_output=True, text=True)
        self.das = das.DasEmulator(
            csv_path=self.pg_csvlog, pg_port=self.pg_port, moto_url=self.moto_url, region=REGION,
            seed=self.state_dir, server_version=version.stdout.split()[2],
        )
        self.das.start()
        self.ic.das = self.das

    def _moto_ready(self):
        if self.moto.poll() is not None:
            raise SystemExit(f"moto_server exited with {self.moto.returncode}; see {self.state_dir}/moto.log")
        with urllib.request.urlopen(f"{self.moto_url}/moto-api/", timeout=2) as r:
            return r.status == 200

    def compile_pam_module(self):
        self.pam_module = f"{self.state_dir}/pam_rdsiam.so"
        src = f"{self.state_dir}/pam_rdsiam.c"
        shutil.copy(os.path.join(HERE, "pam_rdsiam.c"), src)
        subprocess.run(
            ["gcc", "-Wall", "-Wextra", "-Werror", "-O2", "-shared", "-fPIC", "-o", self.pam_module, src, "-lpam"],
            check=True,
        )
        os.chmod(self.pam_module, 0o755)

    def write_pam_service(self):
        with open(self.pam_file, "w") as f:
            f.write(
                f"# rds-iam-proxy test bed pid={os.getpid()} dir={self.state_dir}; removed when the bed stops\n"
                f"auth    required {self.pam_module} socket={self.verifier_sock}\n"
                f"account required {self.pam_module}\n"
            )

    def pg_run(self, *args, **kw):
        return subprocess.run(
            list(args), check=True, capture_output=True, text=True, cwd=self.state_dir,
            preexec_fn=child_preexec(self.pg_user.pw_uid, self.pg_user.pw_gid), **kw,
        )

    def start_postgres(self):
        d = self.state_dir
        self.pgdata = f"{d}/pgdata"
        self.pg_log = f"{d}/postgresql.log"
        self.pg_csvlog = f"{d}/postgresql.csv"
        # The state dir is root's; give `postgres` its own data and socket dirs.
        self.pg_socket_dir = f"{d}/pgsock"
        for sub, mode in ((self.pgdata, 0o700), (self.pg_socket_dir, 0o755)):
            os.mkdir(sub, mode)
            os.chown(sub, self.pg_user.pw_uid, self.pg_user.pw_gid)
        self.pg_run(f"{PG_BIN}/initdb", "-D", self.pgdata, "-U", "postgres", "-A", "peer", "-E", "UTF8",
                    "--locale=C.UTF-8", "--no-sync")
        # PostgreSQL insists that its key belongs to it with mode 0600.
        key = f"{self.pgdata}/server.key"
        shutil.copy(self.paths["server_key"], key)
        shutil.copy(self.paths["server_cert"], f"{self.pgdata}/server.crt")
        for p in (key, f"{self.pgdata}/server.crt"):
            os.chown(p, self.pg_user.pw_uid, self.pg_user.pw_gid)
        os.chmod(key, 0o600)
        with open(f"{self.pgdata}/pg_hba.conf", "w") as f:
            f.write(
                "# RDS-like: IAM users only over TLS, through PAM.\n"
                f"hostssl all +rds_iam 127.0.0.1/32 pam pamservice={self.pam_service}\n"
                "hostnossl all +rds_iam 127.0.0.1/32 reject\n"
                f"hostssl all {MASTER_USER} 127.0.0.1/32 scram-sha-256\n"
                f"host all {MASTER_USER} 127.0.0.1/32 scram-sha-256\n"
                "local all postgres peer\n"
            )
        os.chown(f"{self.pgdata}/pg_hba.conf", self.pg_user.pw_uid, self.pg_user.pw_gid)

        last_err = None
        for _attempt in range(5):
            self.pg_port = free_port()
            with open(f"{self.pgdata}/postgresql.auto.conf", "w") as f:
                f.write(
                    f"listen_addresses = '127.0.0.1'\nport = {self.pg_port}\n"
                    f"unix_socket_directories = '{self.pg_socket_dir}'\n"
                    "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                    f"max_connections = {self.max_connections}\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "password_encryption = 'scram-sha-256'\n"
                    "log_connections = on\nlog_disconnections = on\nlog_line_prefix = '%m [%p] %q%u@%d '\n"
                    + self.das_log_settings()
                )
            os.chown(f"{self.pgdata}/postgresql.auto.conf", self.pg_user.pw_uid, self.pg_user.pw_gid)
            log_f = open(self.pg_log, "ab")
            os.chown(self.pg_log, self.pg_user.pw_uid, self.pg_user.pw_gid)
            if self.das_enabled:
                # The collector creates nothing in the (root-owned) state dir:
                # both of its files exist already and belong to `postgres`.
                open(self.pg_csvlog, "ab").close()
                os.chown(self.pg_csvlog, self.pg_user.pw_uid, self.pg_user.pw_gid)
            # The postmaster is our direct child (not pg_ctl's daemon), so the
            # death signal reaches it even if this supervisor is SIGKILLed;
            # SIGQUIT is PostgreSQL's immediate shutdown.
            self.pg = subprocess.Popen(
                [f"{PG_BIN}/postgres", "-D", self.pgdata],
                stdin=subprocess.DEVNULL, stdout=log_f, stderr=log_f, cwd=d,
                preexec_fn=child_preexec(self.pg_user.pw_uid, self.pg_user.pw_gid, signal.SIGQUIT),
            )
            try:
                wait_until("postgres", 60, self._pg_ready)
                break
            except Exception as e:  # noqa: BLE001 - most likely a port collision: retry
                last_err = e
                self.stop_postgres()
        else:
            raise RuntimeError(f"postgres did not start: {last_err}; see {self.pg_log}")

        # Like the RDS master: not a superuser, and NOT a member of rds_iam
        # (membership would route its own logins to PAM via +rds_iam). On
        # PostgreSQL 15 CREATEROLE is enough to grant rds_iam to others.
        sql = f"""
            CREATE ROLE rds_iam NOLOGIN;
            CREATE ROLE {MASTER_USER} LOGIN CREATEROLE CREATEDB PASSWORD '{self.master_password}';
            GRANT pg_signal_backend, pg_monitor TO {MASTER_USER};
            CREATE DATABASE {DATABASE} OWNER {MASTER_USER};
        """
        self.pg_run(f"{PG_BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
                    "-h", self.pg_socket_dir, "-p", str(self.pg_port), "-U", "postgres", "-d", "postgres", input=sql)

    def das_log_settings(self):
        """With --das: a csvlog beside the stderr log, every statement logged
        once when it ends. The logging collector writes the stderr output to
        the same postgresql.log (pg_log) the postmaster's stderr goes to, so
        its readers see the lines they always saw, plus `duration: ...`
        lines. Timestamps in both are UTC."""
        if not self.das_enabled:
            return ""
        return (
            "logging_collector = on\n"
            "log_destination = 'stderr,csvlog'\n"
            f"log_directory = '{self.state_dir}'\n"
            "log_filename = 'postgresql.log'\n"  # csvlog: postgresql.csv
            "log_file_mode = 0644\n"
            "log_rotation_size = 0\n"
            "log_min_duration_statement = 0\n"
            "log_timezone = 'UTC'\n"
        )

    def _pg_ready(self):
        if self.pg.poll() is not None:
            raise RuntimeError(f"postgres exited with {self.pg.returncode}")
        r = subprocess.run(
            [f"{PG_BIN}/pg_isready", "-q", "-h", self.pg_socket_dir, "-p", str(self.pg_port)], capture_output=True
        )
        return r.returncode == 0

    # -- run ---------------------------------------------------------------

    def info(self):
        info = {
            "state_dir": self.state_dir,
            "pg_host": "127.0.0.1",
            "pg_port": self.pg_port,
            "pg_socket_dir": self.pg_socket_dir,
            "endpoint_host": ENDPOINT_HOST,
            "endpoint_port": ENDPOINT_PORT,
            "region": REGION,
            "account_id": ACCOUNT_ID,
            **self.paths,
            "master_user": MASTER_USER,
            "master_password": self.master_password,
            "database": DATABASE,
            "moto_url": self.moto_url,
            "sso_url": self.ic.url,
            "start_url": self.ic.start_url,
            "sts_verify_url": self.sts_verify.url,
            "sts_verify_log": self.sts_verify_log,
            "long_term_access_key_id": LONG_TERM_ACCESS_KEY_ID,
            "long_term_secret_access_key": LONG_TERM_SECRET_ACCESS_KEY,
            "verifier_log": self.verifier_log,
            "pg_log": self.pg_log,
            "pam_service": self.pam_service,
            "start_secs": round(self.start_secs, 3),
        }
        if self.das is not None:
            info["das"] = self.das.info(control_url=self.ic.url)
        return info

    def wait(self):
        parent = os.getppid()

        def stdin_watch():
            # os.read on the raw fd: a daemon thread blocked inside
            # sys.stdin.buffer holds its lock and aborts interpreter shutdown.
            try:
                while os.read(0, 4096):
                    pass
            except OSError:
                pass
            self.stopping.set()

        threading.Thread(target=stdin_watch, name="stdin", daemon=True).start()
        while not self.stopping.wait(1.0):
            # Safety net for a parent that died without closing our stdin
            # (e.g. stdin was shared with a surviving grandchild).
            if os.getppid() != parent:
                log("parent went away")
                break
            if self.pg.poll() is not None or self.moto.poll() is not None:
                log("postgres or moto_server died; stopping the bed")
                break

    # -- stop ----------------------------------------------------------------

    def stop_postgres(self):
        if self.pg and self.pg.poll() is None:
            self.pg.send_signal(signal.SIGQUIT)
            try:
                self.pg.wait(15)
            except subprocess.TimeoutExpired:
                self.pg.kill()
                self.pg.wait()

    def stop(self):
        for step in (
            lambda: self.das and self.das.stop(),
            self.stop_postgres,
            lambda: self.moto and (self.moto.terminate(), self.moto.wait(10)),
            lambda: self.verifier and self.verifier.stop(),
            lambda: self.ic and self.ic.stop(),
            lambda: self.sts_verify and self.sts_verify.stop(),
            lambda: os.path.exists(self.pam_file) and os.unlink(self.pam_file),
            lambda: (not self.keep) and shutil.rmtree(self.state_dir, ignore_errors=True),
        ):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - clean up as much as possible
                log(f"cleanup step failed: {e!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="start the bed, print its JSON line, run until stdin closes")
    run.add_argument("--state-dir", help="directory to create (default: a fresh /tmp/rdsiam-bed-*)")
    run.add_argument("--keep", action="store_true", help="keep the state directory after stopping")
    run.add_argument("--max-connections", type=int, default=200, metavar="N",
                     help="PostgreSQL max_connections (default 200; the scale benchmark raises it)")
    run.add_argument("--das", action="store_true",
                     help="also run the Database Activity Streams stand-in (testbed/das.py): csvlog, "
                          "KMS key, Kinesis stream, /_bed/das-* control routes, a `das` object in the JSON line")
    args = ap.parse_args()

    if os.geteuid() != 0:
        print("bed: the test bed needs root to install a PAM service in /etc/pam.d", file=sys.stderr)
        return 2

    if args.state_dir:
        os.makedirs(args.state_dir, mode=0o755, exist_ok=False)
        state_dir = os.path.abspath(args.state_dir)
    else:
        # Short path on purpose: the verifier socket lives here (sun_path is 108 bytes).
        state_dir = tempfile.mkdtemp(prefix="rdsiam-bed-", dir="/tmp")

    bed = Bed(state_dir, args.keep, args.max_connections, das=args.das)

    def on_signal(signum, _frame):
        bed.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        bed.start()
        if bed.stopping.is_set():
            return 1
        sys.stdout.write(json.dumps(bed.info()) + "\n")
        sys.stdout.flush()
        bed.wait()
        return 0
    except BaseException as e:
        log(f"failed: {e!r}")
        if isinstance(e, subprocess.CalledProcessError):
            log(f"stdout: {e.stdout}\nstderr: {e.stderr}")
        return 1
    finally:
        bed.stop()


if __name__ == "__main__":
    sys.exit(main())
