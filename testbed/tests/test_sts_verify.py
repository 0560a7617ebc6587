"""Self-tests of the bed's signature-checking STS GetCallerIdentity stand-in
(gateway mode: a client presigns GetCallerIdentity with the signed header
x-rds-iam-proxy-gateway-id, the gateway replays it to STS).

Run with the venv python, as root:
    .venv/bin/python -m pytest -q testbed/tests/test_sts_verify.py

Requests are presigned by botocore's SigV4QueryAuth, the reference signer,
not by the proxy under test.
"""

import datetime as dt
import http.client
import json
import os
import re
import secrets
import socket
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from unittest import mock

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest
from conftest import running_bed

STS_HOST = "sts.eu-west-1.amazonaws.com"
GATEWAY_HEADER = "x-rds-iam-proxy-gateway-id"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the test bed needs root to install a PAM service in /etc/pam.d"
)


@pytest.fixture(scope="module")
def bed():
    with running_bed() as info:
        yield info


def control(url, path, body=None):
    req = urllib.request.Request(
        url + path, data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def sso_creds(bed, user):
    c = control(bed["sso_url"], "/_bed/credentials", {"user": user, "permission_set": "DatabaseUser"})
    return c["accessKeyId"], c["secretAccessKey"], c["sessionToken"]


def long_term(bed):
    return bed["long_term_access_key_id"], bed["long_term_secret_access_key"], None


def presign(creds, gateway_id="gw-test", at=None, region="eu-west-1", host=STS_HOST,
            action="GetCallerIdentity", expires=60, method="GET"):
    """-> (query string, headers the client signed). `gateway_id=None` signs
    no custom header (SignedHeaders=host)."""
    headers = {} if gateway_id is None else {GATEWAY_HEADER: gateway_id}
    req = botocore.awsrequest.AWSRequest(
        method=method, url=f"https://{host}/", params={"Action": action, "Version": "2011-06-15"}, headers=headers,
    )
    signer = botocore.auth.SigV4QueryAuth(botocore.credentials.Credentials(*creds), "sts", region, expires)
    if at is None:
        signer.add_auth(req)
    else:
        # Freeze botocore's signing clock: the signature genuinely covers `at`.
        with mock.patch.object(botocore.auth, "get_current_datetime", lambda: at):
            signer.add_auth(req)
    return urllib.parse.urlsplit(req.url).query, {"Host": host, **headers}


def send(bed, query, headers, method="GET", body=b""):
    """Raw HTTP to the stand-in: Host (and any header) exactly as given, the
    way the gateway dials the stand-in but names the signed STS host."""
    url = urllib.parse.urlsplit(bed["sts_verify_url"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.putrequest(method, "/?" + query if query else "/", skip_host=True, skip_accept_encoding=True)
        items = headers.items() if isinstance(headers, dict) else headers
        for k, v in items:
            conn.putheader(k, v)
        if method == "POST":
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body if method == "POST" else None)
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type"), ET.fromstring(r.read())
    finally:
        conn.close()


def text(doc, name):
    return doc.findtext(f".//{{*}}{name}")


def refused(bed, query, headers, status, code, message=None, **kw):
    st, ctype, doc = send(bed, query, headers, **kw)
    assert (st, text(doc, "Code")) == (status, code), ET.tostring(doc)
    assert ctype == "text/xml"
    assert doc.tag.endswith("ErrorResponse") and text(doc, "Type") == "Sender" and text(doc, "RequestId")
    if message:
        assert message in text(doc, "Message"), text(doc, "Message")


def records(bed, gateway_id):
    return [r for r in control(bed["sts_verify_url"], "/_bed/sts-requests") if r["gateway_id"] == gateway_id]


def with_param(query, name, value):
    """The query with `name` set to `value` (None: removed), order kept."""
    out = []
    for pair in query.split("&"):
        k = urllib.parse.unquote(pair.partition("=")[0])
        if k != name:
            out.append(pair)
        elif value is not None:
            out.append(f"{k}={urllib.parse.quote(value, safe='')}")
    return "&".join(out)


# -- accepted ---------------------------------------------------------------


def test_sso_session_gets_identity_center_identity(bed):
    creds = sso_creds(bed, "alice")
    gw = "gw-" + secrets.token_hex(4)
    st, ctype, doc = send(bed, *presign(creds, gw))
    assert st == 200 and ctype == "text/xml", ET.tostring(doc)
    assert doc.tag == "{https://sts.amazonaws.com/doc/2011-06-15/}GetCallerIdentityResponse"
    acct = bed["account_id"]
    assert re.fullmatch(rf"arn:aws:sts::{acct}:assumed-role/AWSReservedSSO_DatabaseUser_[0-9a-f]{{16}}/alice",
                        text(doc, "Arn")), text(doc, "Arn")
    assert re.fullmatch(r"AROA[A-Z0-9]+:alice", text(doc, "UserId")), text(doc, "UserId")
    assert text(doc, "Account") == acct
    assert re.fullmatch(r"[0-9a-f-]{36}", text(doc, "RequestId"))

    # Like AWS: the UserId is the role's id, the same for every session of it.
    st, _, doc2 = send(bed, *presign(sso_creds(bed, "alice"), gw))
    assert st == 200 and text(doc2, "UserId") == text(doc, "UserId")
    [first, second] = records(bed, gw)
    assert first["verdict"] == second["verdict"] == "ok"
    assert first["access_key_id"] == creds[0] and first["gateway_id_signed"] is True


def test_long_term_key_and_post(bed):
    query, headers = presign(long_term(bed), method="POST")
    st, _, doc = send(bed, query, headers, method="POST")
    assert st == 200, ET.tostring(doc)
    # What moto's GetCallerIdentity says for a key it never issued.
    assert text(doc, "Account") == bed["account_id"] and text(doc, "Arn")
    # The method is signed: the same query as a GET does not verify.
    refused(bed, query, headers, 403, "SignatureDoesNotMatch")


def test_global_endpoint_signed_for_us_east_1(bed):
    st, _, doc = send(bed, *presign(long_term(bed), host="sts.amazonaws.com", region="us-east-1"))
    assert st == 200, ET.tostring(doc)


def test_x_amz_expires_is_ignored_like_sts(bed):
    # Signed 10 minutes ago with X-Amz-Expires=60: STS allows 15 minutes anyway.
    at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)
    st, _, doc = send(bed, *presign(long_term(bed), at=at, expires=60))
    assert st == 200, ET.tostring(doc)


def test_unsigned_gateway_header_is_accepted_but_reported_unsigned(bed):
    # STS does not care about unsigned extra headers: refusing this is the
    # gateway's job (it must check X-Amz-SignedHeaders); the record shows it.
    gw = "gw-" + secrets.token_hex(4)
    query, headers = presign(long_term(bed), gateway_id=None)
    st, _, _ = send(bed, query, {**headers, GATEWAY_HEADER: gw})
    assert st == 200
    [rec] = records(bed, gw)
    assert rec["verdict"] == "ok" and rec["gateway_id_signed"] is False


# -- refused ------------------------------------------------------------------


def test_tampered_signature(bed):
    query, headers = presign(sso_creds(bed, "bob"))
    sig = urllib.parse.parse_qs(query)["X-Amz-Signature"][0]
    flipped = ("0" if sig[-1] != "0" else "1")
    refused(bed, with_param(query, "X-Amz-Signature", sig[:-1] + flipped), headers,
            403, "SignatureDoesNotMatch", "does not match")


def test_changed_gateway_id_value(bed):
    query, headers = presign(sso_creds(bed, "bob"), gateway_id="gw-a")
    refused(bed, query, {**headers, GATEWAY_HEADER: "gw-b"}, 403, "SignatureDoesNotMatch")


def test_signed_gateway_header_missing_from_request(bed):
    query, headers = presign(sso_creds(bed, "bob"), gateway_id="gw-a")
    del headers[GATEWAY_HEADER]
    refused(bed, query, headers, 403, "SignatureDoesNotMatch", GATEWAY_HEADER)


def test_gateway_header_dropped_from_signed_headers(bed):
    # Claiming the header was not signed changes the canonical request.
    query, headers = presign(sso_creds(bed, "bob"), gateway_id="gw-a")
    refused(bed, with_param(query, "X-Amz-SignedHeaders", "host"), headers, 403, "SignatureDoesNotMatch")


def test_other_host_than_signed(bed):
    query, headers = presign(long_term(bed))
    refused(bed, query, {**headers, "Host": "sts.us-west-2.amazonaws.com"}, 403, "SignatureDoesNotMatch",
            "valid region")
    refused(bed, query, {**headers, "Host": "evil.example.com"}, 403, "AccessDenied")


def test_stale_and_future_dates(bed):
    now = dt.datetime.now(dt.timezone.utc)
    refused(bed, *presign(long_term(bed), at=now - dt.timedelta(minutes=20)),
            403, "SignatureDoesNotMatch", "Signature expired")
    refused(bed, *presign(long_term(bed), at=now + dt.timedelta(minutes=10)),
            403, "SignatureDoesNotMatch", "not yet current")


def test_unknown_key_and_wrong_or_missing_session_token(bed):
    refused(bed, *presign(("ASIAUNKNOWNBEDKEY000", "x" * 40, "token")), 403, "InvalidClientTokenId")
    query, headers = presign(sso_creds(bed, "carol"))
    refused(bed, with_param(query, "X-Amz-Security-Token", None), headers, 403, "InvalidClientTokenId")
    refused(bed, with_param(query, "X-Amz-Security-Token", "forged"), headers, 403, "InvalidClientTokenId")


def test_expired_session(bed):
    creds = sso_creds(bed, "dave")
    control(bed["sts_verify_url"], "/_bed/sts-expire", {"access_key_id": creds[0]})
    refused(bed, *presign(creds), 403, "ExpiredToken")


def test_wrong_service_and_action(bed):
    query, headers = presign(long_term(bed))
    cred = urllib.parse.parse_qs(query)["X-Amz-Credential"][0]
    refused(bed, with_param(query, "X-Amz-Credential", cred.replace("/sts/", "/rds-db/")), headers,
            403, "SignatureDoesNotMatch", "'sts'")
    refused(bed, *presign(long_term(bed), action="GetSessionToken"), 400, "InvalidAction")


def test_garbage(bed):
    h = {"Host": STS_HOST}
    refused(bed, "", h, 400, "MissingAuthenticationToken")
    refused(bed, "Action=GetCallerIdentity&Version=2011-06-15", h, 400, "MissingAuthenticationToken")
    refused(bed, "%ff%fe=1&X-Amz-Signature=00", h, 400, "InvalidParameterValue")
    refused(bed, "X-Amz-Signature=00&X-Amz-Signature=11", h, 400, "InvalidParameterValue")
    refused(bed, "Action=GetCallerIdentity&Version=2011-06-15&X-Amz-Signature=00", h, 400, "InvalidParameterValue")
    query, headers = presign(long_term(bed))
    refused(bed, with_param(query, "X-Amz-Date", "yesterday"), headers, 400, "InvalidParameterValue")
    refused(bed, with_param(query, "X-Amz-Credential", "AKID"), headers, 400, "InvalidParameterValue")
    refused(bed, query, [("Host", STS_HOST), ("Host", STS_HOST), (GATEWAY_HEADER, "gw-test")],
            400, "InvalidParameterValue")
    # Junk on the wire does not take the server down.
    with socket.create_connection(("127.0.0.1", urllib.parse.urlsplit(bed["sts_verify_url"]).port)) as s:
        s.sendall(b"\x00\x01garbage \xff\r\n\r\n")
        s.recv(4096)
    assert send(bed, query, headers)[0] == 200


# -- observability --------------------------------------------------------------


def test_requests_are_counted_and_logged(bed):
    gw = "gw-count-" + secrets.token_hex(4)
    creds = sso_creds(bed, "erin")
    good_query, good_headers = presign(creds, gw)
    for _ in range(3):
        assert send(bed, good_query, good_headers)[0] == 200
    refused(bed, with_param(good_query, "X-Amz-Signature", "0" * 64), good_headers, 403, "SignatureDoesNotMatch")
    refused(bed, *presign(("AKIAUNKNOWNBEDKEY000", "x" * 40, None), gw), 403, "InvalidClientTokenId")
    recs = records(bed, gw)
    assert [r["verdict"] for r in recs] == ["ok"] * 3 + ["SignatureDoesNotMatch", "InvalidClientTokenId"]
    assert [r["access_key_id"] for r in recs] == [creds[0]] * 4 + ["AKIAUNKNOWNBEDKEY000"]
    assert all(set(r) >= {"time", "access_key_id", "verdict", "gateway_id"} for r in recs)
    with open(bed["sts_verify_log"]) as f:
        lines = [ln for ln in f if f"gateway_id='{gw}'" in ln]
    assert len(lines) == 5 and lines[0].split()[1] == "ACCEPT" and lines[-1].split()[1] == "REJECT"


def test_delay(bed):
    query, headers = presign(long_term(bed))
    control(bed["sts_verify_url"], "/_bed/sts-delay", {"seconds": 0.5})
    try:
        t0 = time.monotonic()
        assert send(bed, query, headers)[0] == 200
        assert time.monotonic() - t0 >= 0.5
    finally:
        control(bed["sts_verify_url"], "/_bed/sts-delay", {"seconds": 0})
    t0 = time.monotonic()
    assert send(bed, query, headers)[0] == 200
    assert time.monotonic() - t0 < 0.5


def test_verification_is_fast(bed):
    # Keep-alive connection, as the gateway would hold one.
    query, headers = presign(sso_creds(bed, "frank"))
    url = urllib.parse.urlsplit(bed["sts_verify_url"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    n = 300
    t0 = time.perf_counter()
    for _ in range(n):
        conn.request("GET", "/?" + query, headers=headers)
        r = conn.getresponse()
        r.read()
        assert r.status == 200
    per = (time.perf_counter() - t0) / n
    conn.close()
    print(f"\nsts stand-in: {per * 1000:.2f} ms per verified GetCallerIdentity ({1 / per:.0f}/s, one connection)")
    assert per < 0.02
