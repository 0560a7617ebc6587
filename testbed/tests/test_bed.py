"""Self-tests of the offline test bed (testbed/bed.py).

Run with the venv python, as root:
    .venv/bin/python -m pytest -q -s testbed/tests

Every token here is made by botocore's generate_db_auth_token, the function
the AWS CLI runs, so the bed is checked against the reference signer and
not against the proxy under test.
"""

import datetime as dt
import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from unittest import mock

import botocore.auth
import botocore.session
import pytest
from conftest import running_bed

PAM_FAILED = 'FATAL:  PAM authentication failed for user "{}"'
FIGURES = {}

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the test bed needs root to install a PAM service in /etc/pam.d"
)


@pytest.fixture(scope="session")
def bed():
    t0 = time.monotonic()
    with running_bed() as info:
        FIGURES["bed start (s, as seen by the test)"] = round(time.monotonic() - t0, 2)
        FIGURES["bed start (s, inside bed.py)"] = info["start_secs"]
        info["users"] = set()
        yield info
    assert not os.path.exists(info["state_dir"]), "bed left its state directory behind"
    assert not os.path.exists(f"/etc/pam.d/{info['pam_service']}"), "bed left its PAM service behind"


def control(bed, path, body=None):
    req = urllib.request.Request(
        bed["sso_url"] + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def psql(bed, user, password, sql="select current_user", sslmode="verify-full", host=None):
    conninfo = (
        f"host={host or bed['endpoint_host']} hostaddr=127.0.0.1 port={bed['pg_port']} "
        f"sslmode={sslmode} sslrootcert={bed['ca_cert']} user={user} dbname={bed['database']}"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = password
    return subprocess.run(
        ["psql", conninfo, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True, text=True, env=env, timeout=60,
    )


def admin(bed, sql):
    r = psql(bed, bed["master_user"], bed["master_password"], sql)
    assert r.returncode == 0, r.stderr
    return r.stdout


def iam_user(bed, name):
    if name not in bed["users"]:
        admin(bed, f'CREATE USER "{name}" WITH LOGIN; GRANT rds_iam TO "{name}"; '
                   f'GRANT ALL ON DATABASE {bed["database"]} TO "{name}";')
        bed["users"].add(name)
    return name


def rds_client(access_key, secret, token=None):
    return botocore.session.get_session().create_client(
        "rds", region_name="eu-west-1",
        aws_access_key_id=access_key, aws_secret_access_key=secret, aws_session_token=token,
    )


def sign(bed, user, creds=None, host=None, port=None, region=None, at=None):
    key, secret, token = creds or (bed["long_term_access_key_id"], bed["long_term_secret_access_key"], None)
    client = rds_client(key, secret, token)
    args = (host or bed["endpoint_host"], port or bed["endpoint_port"], user)
    if at is None:
        return client.generate_db_auth_token(*args, Region=region)
    # Freeze botocore's signing clock: the signature then genuinely covers `at`.
    with mock.patch.object(botocore.auth, "get_current_datetime", lambda: at):
        return client.generate_db_auth_token(*args, Region=region)


def session_creds(bed, user):
    c = control(bed, "/_bed/credentials", {"user": user, "permission_set": "DatabaseUser"})
    return c["accessKeyId"], c["secretAccessKey"], c["sessionToken"]


def last_verdict(bed):
    with open(bed["verifier_log"]) as f:
        return f.read().splitlines()[-1]


def assert_refused(bed, user, token, reason):
    r = psql(bed, user, token)
    assert r.returncode != 0
    assert PAM_FAILED.format(user) in r.stderr, r.stderr
    verdict = last_verdict(bed)
    assert "REJECT" in verdict and reason in verdict, verdict


# -- logins that must work ----------------------------------------------------


def test_long_term_key_token_logs_in(bed):
    user = iam_user(bed, "alice")
    r = psql(bed, user, sign(bed, user))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "alice"
    assert "ACCEPT" in last_verdict(bed)


def test_session_token_logs_in_past_pam_exec_limit(bed):
    user = iam_user(bed, "alice")
    token = sign(bed, user, creds=session_creds(bed, user))
    assert len(token) > 511, "a session-token token must exceed pam_exec's 511-byte limit"
    FIGURES["session-token token length (bytes)"] = len(token)
    r = psql(bed, user, token)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "alice"


def test_token_near_8k_logs_in(bed):
    # Real SSO session tokens are ~1 KB; this one is far longer, to show the
    # PAM module passes the token whole.
    user = iam_user(bed, "alice")
    key = "ASIA" + secrets.token_hex(8).upper()
    creds = (key, secrets.token_urlsafe(30), "IQoJb3JpZ2luX2VjE" + "A" * 5500)
    control(bed, "/_bed/register", dict(zip(("access_key_id", "secret_access_key", "session_token"), creds)))
    token = sign(bed, user, creds=creds)
    assert 5500 < len(token) <= 8192
    r = psql(bed, user, token)
    assert r.returncode == 0, r.stderr


def test_master_scram_login(bed):
    assert admin(bed, "select current_user").strip() == bed["master_user"]


# -- tokens that must be refused -----------------------------------------------


def test_wrong_dbuser(bed):
    user, other = iam_user(bed, "alice"), iam_user(bed, "bob")
    assert_refused(bed, user, sign(bed, other), "is not the login user")


def test_signed_20_minutes_ago(bed):
    user = iam_user(bed, "alice")
    at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(minutes=20)
    assert_refused(bed, user, sign(bed, user, at=at), "token expired")


def test_dated_10_minutes_ahead(bed):
    user = iam_user(bed, "alice")
    at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(minutes=10)
    assert_refused(bed, user, sign(bed, user, at=at), "in the future")


def test_tampered_signature(bed):
    user = iam_user(bed, "alice")
    token = sign(bed, user)
    last = token[-1]
    tampered = token[:-1] + ("0" if last != "0" else "1")
    assert_refused(bed, user, tampered, "signature mismatch")


def test_tampered_expiry_breaks_signature(bed):
    user = iam_user(bed, "alice")
    token = sign(bed, user).replace("X-Amz-Expires=900", "X-Amz-Expires=899")
    assert_refused(bed, user, token, "signature mismatch")


def test_wrong_host(bed):
    user = iam_user(bed, "alice")
    assert_refused(bed, user, sign(bed, user, host="other.cluster-c0ffee.eu-west-1.rds.amazonaws.com"),
                   "not the endpoint")


def test_wrong_port(bed):
    user = iam_user(bed, "alice")
    assert_refused(bed, user, sign(bed, user, port=5433), "not the endpoint")


def test_wrong_region(bed):
    user = iam_user(bed, "alice")
    assert_refused(bed, user, sign(bed, user, region="us-east-1"), "credential scope")


def test_unknown_key(bed):
    user = iam_user(bed, "alice")
    creds = ("AKIA" + secrets.token_hex(8).upper(), "not-a-known-secret", None)
    assert_refused(bed, user, sign(bed, user, creds=creds), "unknown access key")


def test_missing_session_token(bed):
    user = iam_user(bed, "alice")
    key, secret, _ = session_creds(bed, user)
    assert_refused(bed, user, sign(bed, user, creds=(key, secret, None)), "security token missing or wrong")


def test_wrong_session_token(bed):
    user = iam_user(bed, "alice")
    key, secret, token = session_creds(bed, user)
    _, _, other = session_creds(bed, user)
    assert_refused(bed, user, sign(bed, user, creds=(key, secret, other)), "security token missing or wrong")


def test_oversized_password_refused(bed):
    user = iam_user(bed, "alice")
    r = psql(bed, user, "x" * 9000)
    assert r.returncode != 0
    assert PAM_FAILED.format(user) in r.stderr, r.stderr


def test_iam_user_without_tls_refused_by_pg_hba(bed):
    user = iam_user(bed, "alice")
    r = psql(bed, user, sign(bed, user), sslmode="disable")
    assert r.returncode != 0
    # The explicit `hostnossl ... reject` line makes PostgreSQL say
    # "pg_hba.conf rejects connection ... no encryption"; without that line it
    # would say "no pg_hba.conf entry ... no encryption". Match both.
    assert "pg_hba.conf" in r.stderr and "no encryption" in r.stderr, r.stderr
    assert "PAM" not in r.stderr


def test_server_cert_is_for_the_endpoint_only(bed):
    # verify-full against 'localhost' passes (SAN), against another name fails.
    r = psql(bed, bed["master_user"], bed["master_password"], host="other.example.invalid")
    assert r.returncode != 0 and "does not match host name" in r.stderr, r.stderr


# -- Identity Center stand-in, through botocore's own SSO clients ---------------


def sso_clients(bed):
    s = botocore.session.get_session()
    kw = dict(region_name="eu-west-1", endpoint_url=bed["sso_url"],
              config=botocore.config.Config(signature_version=botocore.UNSIGNED))
    return s.create_client("sso", **kw), s.create_client("sso-oidc", **kw)


def test_sso_get_role_credentials_is_identity_center_shaped(bed):
    import botocore.config  # noqa: F401 - used by sso_clients

    sso, _ = sso_clients(bed)
    cache = control(bed, "/_bed/login", {"user": "arianna", "permission_set": "DatabaseAdmin"})
    rc = sso.get_role_credentials(roleName="DatabaseAdmin", accountId=bed["account_id"],
                                  accessToken=cache["accessToken"])["roleCredentials"]
    assert rc["expiration"] > time.time() * 1000
    sts = botocore.session.get_session().create_client(
        "sts", region_name="eu-west-1", endpoint_url=bed["moto_url"],
        aws_access_key_id=rc["accessKeyId"], aws_secret_access_key=rc["secretAccessKey"],
        aws_session_token=rc["sessionToken"],
    )
    arn = sts.get_caller_identity()["Arn"]
    prefix = f"arn:aws:sts::{bed['account_id']}:assumed-role/AWSReservedSSO_DatabaseAdmin_"
    assert arn.startswith(prefix) and arn.endswith("/arianna"), arn
    assert len(arn[len(prefix):].split("/")[0]) == 16
    # The minted credentials are in the verifier's table: they sign usable tokens.
    user = iam_user(bed, "arianna")
    r = psql(bed, user, sign(bed, user, creds=(rc["accessKeyId"], rc["secretAccessKey"], rc["sessionToken"])))
    assert r.returncode == 0, r.stderr


def test_sso_expired_access_token_is_unauthorized(bed):
    import botocore.config  # noqa: F401

    sso, _ = sso_clients(bed)
    cache = control(bed, "/_bed/login", {"user": "arianna"})
    control(bed, "/_bed/expire", {"access_token": cache["accessToken"]})
    with pytest.raises(sso.exceptions.UnauthorizedException):
        sso.get_role_credentials(roleName="DatabaseAdmin", accountId=bed["account_id"],
                                 accessToken=cache["accessToken"])


def test_sso_oidc_refresh_and_revoke(bed):
    import botocore.config  # noqa: F401

    sso, oidc = sso_clients(bed)
    cache = control(bed, "/_bed/login", {"user": "arianna", "permission_set": "DatabaseAdmin"})
    new = oidc.create_token(clientId=cache["clientId"], clientSecret=cache["clientSecret"],
                            grantType="refresh_token", refreshToken=cache["refreshToken"])
    assert new["accessToken"] != cache["accessToken"] and new["expiresIn"] > 0
    sso.get_role_credentials(roleName="DatabaseAdmin", accountId=bed["account_id"], accessToken=new["accessToken"])
    # The old refresh token was rotated away; the new one can be revoked.
    with pytest.raises(oidc.exceptions.InvalidGrantException):
        oidc.create_token(clientId=cache["clientId"], clientSecret=cache["clientSecret"],
                          grantType="refresh_token", refreshToken=cache["refreshToken"])
    control(bed, "/_bed/revoke", {"refresh_token": new["refreshToken"]})
    with pytest.raises(oidc.exceptions.InvalidGrantException):
        oidc.create_token(clientId=cache["clientId"], clientSecret=cache["clientSecret"],
                          grantType="refresh_token", refreshToken=new["refreshToken"])
    paths = [r["path"] for r in control(bed, "/_bed/requests")]
    assert paths.count("/token") >= 3


def test_login_cache_file_shape(bed):
    cache = control(bed, "/_bed/login", {"user": "arianna", "access_token_ttl": 120, "refreshable": False})
    assert "refreshToken" not in cache
    expires = dt.datetime.strptime(cache["expiresAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    assert 60 < (expires - dt.datetime.now(dt.timezone.utc)).total_seconds() <= 121
    for field in ("accessToken", "clientId", "clientSecret", "registrationExpiresAt", "region", "startUrl"):
        assert cache[field], field


# -- figures -------------------------------------------------------------------


def test_login_cost_figures(bed, capsys):
    """Not a benchmark gate: prints the figures, asserts only that logins work."""
    user = iam_user(bed, "alice")
    n = 50

    def timed(fn):
        t0 = time.perf_counter()
        for _ in range(n):
            r = fn()
            assert r.returncode == 0, r.stderr
        return (time.perf_counter() - t0) / n * 1000

    token = sign(bed, user, creds=session_creds(bed, user))
    FIGURES["IAM (PAM + verifier) login via psql, mean ms"] = round(timed(lambda: psql(bed, user, token, "select 1")), 1)
    FIGURES["master SCRAM login via psql, mean ms"] = round(
        timed(lambda: psql(bed, bed["master_user"], bed["master_password"], "select 1")), 1)
    FIGURES["verifier round trip alone (unix socket, SigV4 recompute), mean ms"] = round(
        verifier_round_trip_ms(bed, user, token, 200), 2)
    with capsys.disabled():
        print("\n--- test bed figures ---")
        for k, v in FIGURES.items():
            print(f"{k}: {v}")


def verifier_round_trip_ms(bed, user, token, n):
    """What pam_rdsiam.so does per login, timed without PostgreSQL and psql."""
    import socket
    import struct

    sock_path = os.path.join(bed["state_dir"], "verifier.sock")
    t0 = time.perf_counter()
    for _ in range(n):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(sock_path)
            for field in (user.encode(), token.encode()):
                s.sendall(struct.pack(">I", len(field)) + field)
            assert s.recv(1) == b"Y"
    return (time.perf_counter() - t0) / n * 1000
