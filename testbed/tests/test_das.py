"""Tests of the Database Activity Streams stand-in (testbed/das.py).

Run with the venv python, as root:
    .venv/bin/python -m pytest -q testbed/tests/test_das.py

Real components throughout: a bed started with --das (PostgreSQL, moto's
KMS and Kinesis), psql and psycopg as clients, and what is on the stream
read back with testbed/das_reference.py, i.e. with boto3 and the real AWS
Encryption SDK, not with the emulator's own code.
"""

import base64
import gzip
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest

TESTBED = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(TESTBED)
sys.path.insert(0, TESTBED)

import das  # noqa: E402
import das_fixtures  # noqa: E402
import das_reference  # noqa: E402
from conftest import running_bed  # noqa: E402

FIXTURES = os.path.join(REPO, "tests", "fixtures", "das")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the test bed needs root to install a PAM service")


@pytest.fixture(scope="module")
def bed():
    if os.geteuid() != 0:
        pytest.skip("the test bed needs root to install a PAM service in /etc/pam.d")
    with running_bed("--das") as info:
        yield info
    assert not os.path.exists(info["state_dir"]), "bed left its state directory behind"


def control(bed, path, body=None):
    req = urllib.request.Request(
        bed["das"]["control_url"] + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def flush(bed):
    return control(bed, "/_bed/das-flush", {})


def clients(bed):
    return das_reference.clients(bed["das"]["endpoint_url"], bed["das"]["region"])


def read_all(bed):
    """[(shard_id, sequence_number, event)] for every event of every good
    record on the stream, decoded by the reference reader."""
    kinesis, kms = clients(bed)
    out = []
    for shard_id, seq, rec in das_reference.read_stream(
        kinesis, kms, bed["das"]["stream_name"], bed["das"]["cluster_resource_id"]
    ):
        if isinstance(rec, Exception):
            continue  # the bad records of test_bad_records
        out += [(shard_id, seq, ev) for ev in rec["databaseActivityEventList"]]
    return out


def session_events(bed, session_id, until=None, timeout=10):
    """This session's events, flushing and re-reading until `until(events)`."""
    deadline = time.monotonic() + timeout
    while True:
        flush(bed)
        events = [ev for _, _, ev in read_all(bed) if ev.get("sessionId") == session_id]
        if until is None or until(events) or time.monotonic() > deadline:
            return events
        time.sleep(0.3)


def local_port_of(pid, server_port):
    """The local port of process `pid`'s TCP connection to `server_port`,
    from /proc (what the client's own socket says, not the server)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if m:
            inodes.add(m.group(1))
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[9] in inodes and int(cols[2].rsplit(":", 1)[1], 16) == server_port:
                    return int(cols[1].rsplit(":", 1)[1], 16)
    return None


def psql_session(bed, statements):
    """Runs `statements` (one per line) in one psql session; returns its
    stdout and the client side's local port, read while it is connected."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = bed["master_password"]
    p = subprocess.Popen(
        ["psql", f"host=127.0.0.1 port={bed['pg_port']} user={bed['master_user']} dbname={bed['database']}",
         "-X", "-q", "-A", "-t"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    port, deadline = None, time.monotonic() + 10
    while port is None and time.monotonic() < deadline and p.poll() is None:
        port = local_port_of(p.pid, bed["pg_port"])
        time.sleep(0.02)
    out, err = p.communicate("\n".join(statements) + "\n", timeout=60)
    assert port is not None, f"psql's connection not found in /proc: {err}"
    return out, err, port


# PostgreSQL's %c, which DAS calls sessionId: hex backend start epoch "." hex pid.
SID_SQL = ("SELECT to_hex(trunc(extract(epoch from backend_start))::int) || '.' || to_hex(pg_backend_pid()) "
           "FROM pg_stat_activity WHERE pid = pg_backend_pid()")
SESSION_ID_SQL = SID_SQL.replace("SELECT ", "SELECT 'sid=' || ", 1).replace(
    " FROM", " || ' pid=' || pg_backend_pid() FROM", 1) + ";"


def test_psql_session_is_streamed_as_aurora_events(bed):
    table = f"das_t_{uuid.uuid4().hex[:8]}"
    expected = [  # statement, class, command, exitCode
        (f"CREATE TABLE {table} (id int, note text);", "DDL", "CREATE TABLE", None),
        (f"INSERT INTO {table} VALUES (1, 'one');", "WRITE", "INSERT", None),
        (f"SELECT count(*) FROM {table};", "READ", "SELECT", None),
        (f"UPDATE {table} SET note = 'uno' WHERE id = 1;", "WRITE", "UPDATE", None),
        (f"SELECT * FROM {table}_missing;", "READ", "SELECT", "42P01"),
        (f"GRANT SELECT ON {table} TO pg_monitor;", "ROLE", "GRANT", None),
        ("DO $$ BEGIN PERFORM 1; END $$;", "FUNCTION", "DO", None),
        ("SET work_mem = '8MB';", "MISC", "SET", None),
    ]
    out, err, client_port = psql_session(bed, [s for s, *_ in expected] + [SESSION_ID_SQL])
    m = re.search(r"sid=([0-9a-f]+\.[0-9a-f]+) pid=(\d+)", out)
    assert m, (out, err)
    sid, backend_pid = m.group(1), int(m.group(2))
    assert "does not exist" in err

    events = session_events(bed, sid, until=lambda evs: any(e["command"] == "DISCONNECT" for e in evs))
    by_id = sorted(events, key=lambda e: e["statementId"])
    assert [e["statementId"] for e in by_id] == list(range(1, len(by_id) + 1)), "statementIds not 1..n, once each"

    connect = by_id[0]
    assert (connect["command"], connect["class"], connect["type"]) == ("CONNECT", "CONNECT", "record")
    for e in events:
        assert e["dbUserName"] == bed["master_user"]
        assert e["databaseName"] == bed["database"]
        assert e["remoteHost"] == "127.0.0.1"
        assert e["remotePort"] == str(client_port)
        assert e["pid"] == backend_pid == int(sid.split(".")[1], 16)
        assert e["clientApplication"] == "psql"
        assert (e["serverType"], e["serviceName"], e["dbProtocol"], e["netProtocol"]) == (
            "PostgreSQL", "Amazon Aurora PostgreSQL-Compatible edition", "Postgres 3.0", "TCP")
        assert list(e) == list(das.EVENT_FIELDS), "fields differ from Aurora PostgreSQL's"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\+00", e["logTime"]), e["logTime"]
        assert e["startTime"] <= e["logTime"]

    for statement, cls, command, exit_code in expected:
        hits = [e for e in events if e["commandText"] == statement]
        assert len(hits) == 1, f"{statement!r} streamed {len(hits)} times"
        e = hits[0]
        assert (e["class"], e["command"], e["exitCode"]) == (cls, command, exit_code), e
        if exit_code:
            assert "does not exist" in e["errorMessage"]
        else:
            assert e["errorMessage"] is None
    disconnect = by_id[-1]
    assert (disconnect["command"], disconnect["class"], disconnect["exitCode"]) == ("DISCONNECT", "CONNECT", 0)
    assert len(events) == len(expected) + 3  # CONNECT, the statements, the session id query, DISCONNECT

    # pg_log is the stderr log it always was (pg_log readers: tests/audit_differential.rs).
    with open(bed["pg_log"]) as f:
        text = f.read()
    assert re.search(rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{{3}} UTC \[{backend_pid}\] master@mylab LOG:  "
                     r"connection authorized: user=master database=mylab", text, re.M)
    assert f"[{backend_pid}] master@mylab ERROR:  relation \"{table}_missing\" does not exist" in text


def test_records_are_what_aurora_puts_on_kinesis(bed):
    flush(bed)
    kinesis, kms = clients(bed)
    shard_id, record = next(das_reference.read_records(kinesis, bed["das"]["stream_name"]))
    outer = json.loads(record["Data"])
    assert list(outer) == ["type", "version", "databaseActivityEvents", "key"]
    assert (outer["type"], outer["version"]) == ("DatabaseActivityMonitoringRecords", "1.1")

    rid = bed["das"]["cluster_resource_id"]
    assert re.fullmatch(r"cluster-[A-Z0-9]{26}", rid)
    assert bed["das"]["stream_name"] == f"aws-rds-das-{rid}"
    blob = base64.b64decode(outer["key"])
    data_key = kms.decrypt(CiphertextBlob=blob, EncryptionContext={"aws:rds:dbc-id": rid})["Plaintext"]
    assert len(data_key) == 32
    with pytest.raises(kms.exceptions.InvalidCiphertextException):
        kms.decrypt(CiphertextBlob=blob, EncryptionContext={"aws:rds:dbc-id": rid + "X"})

    message = base64.b64decode(outer["databaseActivityEvents"])
    layout = das.esdk_layout(message)  # read without the SDK
    assert layout["algorithm_id"] == 0x0378
    assert [(k["provider_id"], bytes.fromhex(k["provider_info"])[:7]) for k in layout["encrypted_data_keys"]] == [
        ("BC", b"DataKey")]
    assert list(layout["encryption_context"]) == ["aws-crypto-public-key"]
    assert layout["frame_length"] == 4096 and layout["footer"]["signature_len"] > 0
    plain = das_reference.decrypt_events(message, data_key)  # the real SDK, then gunzip
    batch = json.loads(plain)
    assert list(batch) == ["type", "clusterId", "instanceId", "databaseActivityEventList"]
    assert (batch["type"], batch["clusterId"]) == ("DatabaseActivityMonitoringRecord", rid)
    assert re.fullmatch(r"db-[A-Z0-9]{26}", batch["instanceId"])

    # Consecutive records go to different shards (heartbeats come within ~1 s).
    deadline = time.monotonic() + 5
    while (stats := control(bed, "/_bed/das-stats"))["records"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    first_two = [s for s in stats["shards"] if s["parent_shard_id"] is None]
    assert len(first_two) == 2 and all(s["records"] > 0 for s in first_two), stats


def test_extended_protocol_parameters_and_application_name(bed):
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=bed["pg_port"], user=bed["master_user"],
                         password=bed["master_password"], dbname=bed["database"],
                         application_name="das test app", autocommit=True) as conn:
        sid = conn.execute(SID_SQL).fetchone()[0]
        assert conn.execute("SELECT %s::int + 1, %s::text, %s::text", (41, "it's", None)).fetchone()[0] == 42
        conn.execute("SET application_name = 'renamed app'")
        conn.execute("SELECT 'after the rename'")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT %s::int / 0", (7,))

    events = session_events(bed, sid, until=lambda evs: any(e["command"] == "DISCONNECT" for e in evs))
    [param] = [e for e in events if e["commandText"] == "SELECT $1::int + 1, $2::text, $3::text"]
    assert param["paramList"] == ["41", "it's"]  # NULLs left out, as Aurora does
    assert param["clientApplication"] == "das test app"
    [after] = [e for e in events if e["commandText"] == "SELECT 'after the rename'"]
    assert after["clientApplication"] == "renamed app"
    [failed] = [e for e in events if e["commandText"] == "SELECT $1::int / 0"]
    assert (failed["exitCode"], failed["errorMessage"]) == ("22012", "division by zero")


def test_split_loses_nothing(bed):
    token = uuid.uuid4().hex[:10]
    before = [f"SELECT 'split-{token}-before-{i}';" for i in range(5)]
    after = [f"SELECT 'split-{token}-after-{i}';" for i in range(5)]
    psql_session(bed, before)
    flush(bed)
    split = control(bed, "/_bed/das-split", {})
    parent, children = split["parent"], split["children"]
    assert len(children) == 2
    psql_session(bed, after[:2])
    flush(bed)
    psql_session(bed, after[2:])
    # Later records go to the children: wait for one (heartbeats or events).
    deadline = time.monotonic() + 10
    while True:
        stats = control(bed, "/_bed/das-stats")
        shards = {s["shard_id"]: s for s in stats["shards"]}
        if sum(shards[c]["records"] for c in children) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not shards[parent]["open"] and all(shards[c]["open"] for c in children), stats
    assert sum(shards[c]["records"] for c in children) > 0, stats
    flush(bed)

    events = read_all(bed)
    for text in before + after:
        hits = [(shard, ev) for shard, _, ev in events if ev["commandText"] == text]
        assert len(hits) == 1, f"{text!r} read {len(hits)} times across {parent} and {children}"
        if "-after-" in text:
            assert hits[0][0] != parent, "a record put after the split landed in the closed parent"

    # Kinesis semantics (moto patched): the parent keeps its records and ends.
    kinesis, _ = clients(bed)
    it = kinesis.get_shard_iterator(StreamName=bed["das"]["stream_name"], ShardId=parent,
                                    ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    r = kinesis.get_records(ShardIterator=it)
    assert r["Records"], "the split parent lost its records"
    assert "NextShardIterator" not in r or r["NextShardIterator"] is None
    assert sorted(c["ShardId"] for c in r["ChildShards"]) == sorted(children)


def test_bad_records_fail_in_the_reference_reader(bed):
    from aws_encryption_sdk.exceptions import AWSEncryptionSDKClientError
    from botocore.exceptions import ClientError
    from cryptography.exceptions import InvalidTag

    kinesis, kms = clients(bed)
    rid = bed["das"]["cluster_resource_id"]
    bad_before = control(bed, "/_bed/das-stats")["bad_records"]

    def fetch(kind):
        r = control(bed, "/_bed/das-bad", {"kind": kind})
        it = kinesis.get_shard_iterator(StreamName=bed["das"]["stream_name"], ShardId=r["shard_id"],
                                        ShardIteratorType="AT_SEQUENCE_NUMBER",
                                        StartingSequenceNumber=r["sequence_number"])["ShardIterator"]
        [record] = kinesis.get_records(ShardIterator=it, Limit=1)["Records"]
        assert record["SequenceNumber"] == r["sequence_number"]
        return record["Data"]

    data = fetch("tamper")
    with pytest.raises((InvalidTag, AWSEncryptionSDKClientError)):  # KMS is fine, the SDK refuses
        das_reference.decode_record(data, kms, rid)

    data = fetch("wrong-context")
    with pytest.raises(ClientError) as e:
        das_reference.decode_record(data, kms, rid)
    assert e.value.response["Error"]["Code"] == "InvalidCiphertextException"

    data = fetch("unknown-version")
    with pytest.raises(das_reference.UnsupportedRecord, match="9.9"):
        das_reference.decode_record(data, kms, rid)
    fixed = json.dumps({**json.loads(data), "version": "1.1"})
    assert das_reference.decode_record(fixed, kms, rid)["databaseActivityEventList"][0]["type"] == "heartbeat"

    data = fetch("not-json")
    with pytest.raises(ValueError):
        json.loads(data)
    with pytest.raises(ValueError):
        das_reference.decode_record(data, kms, rid)

    assert control(bed, "/_bed/das-stats")["bad_records"] == bad_before + 4
    with pytest.raises(urllib.error.HTTPError) as e:
        control(bed, "/_bed/das-bad", {"kind": "nonsense"})
    assert e.value.code == 400

    # The command-line reader reports each bad record and goes on.
    r = subprocess.run(
        [sys.executable, os.path.join(TESTBED, "das_reference.py"), "--endpoint-url", bed["das"]["endpoint_url"],
         "--resource-id", rid, "--keep-going"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 1, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    errors = sorted(line["error_type"] for line in lines if "error" in line)
    assert errors == sorted(["InvalidTag", "InvalidCiphertextException", "UnsupportedRecord", "JSONDecodeError"])
    assert sum(1 for line in lines if line.get("command") == "CONNECT") >= 3


def test_heartbeats_when_idle(bed):
    flush(bed)
    start = control(bed, "/_bed/das-stats")
    time.sleep(2.5)
    stats = control(bed, "/_bed/das-stats")
    assert stats["heartbeats"] >= start["heartbeats"] + 1, (start, stats)
    assert stats["records"] >= start["records"] + 1
    beats = [ev for _, _, ev in read_all(bed) if ev["type"] == "heartbeat"]
    assert len(beats) >= stats["heartbeats"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\+00", b["logTime"]) for b in beats)
    assert all(b["sessionId"] is None and b["serverType"] == "PostgreSQL" for b in beats)


# -- without a bed --------------------------------------------------------------


def test_checked_in_fixtures_decode_as_their_readme_says():
    import aws_encryption_sdk
    from aws_encryption_sdk import CommitmentPolicy

    with open(os.path.join(FIXTURES, "manifest.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(FIXTURES, "data_key.hex")) as f:
        key = bytes.fromhex(f.read().strip())
    assert key.hex() == manifest["data_key_hex"] and len(key) == 32
    with open(os.path.join(FIXTURES, "README.txt")) as f:
        readme = f.read()
    client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT)
    expected = {"batch.esdk", "heartbeat.esdk", "empty.esdk", "multiframe.esdk", "exact_frames.esdk",
                "tampered_header.esdk", "tampered_frame.esdk", "tampered_footer.esdk", "truncated.esdk"}
    assert set(manifest["files"]) == expected
    for name, facts in manifest["files"].items():
        assert name in readme
        with open(os.path.join(FIXTURES, name), "rb") as f:
            message = f.read()
        assert len(message) < 8192, f"{name} is not small"
        if "error" in facts:
            with pytest.raises(Exception):  # noqa: B017 - the SDK's own error types vary by part
                client.decrypt(source=message, key_provider=das.data_key_provider(key))
            continue
        plain, header = client.decrypt(source=message, key_provider=das.data_key_provider(key))
        with open(os.path.join(FIXTURES, facts["plaintext"]), "rb") as f:
            assert plain == f.read()
        assert header.algorithm.algorithm_id == 0x0378
        assert das.esdk_layout(message) == facts["layout"]
        if "json" in facts:
            with open(os.path.join(FIXTURES, facts["json"])) as f:
                assert json.loads(gzip.decompress(plain)) == json.load(f)
    assert manifest["files"]["multiframe.esdk"]["frames"] == 2
    assert manifest["files"]["exact_frames.esdk"]["frames"] == 3
    with open(os.path.join(FIXTURES, "batch.record.json")) as f:
        record = json.load(f)
    with open(os.path.join(FIXTURES, "batch.esdk"), "rb") as f:
        assert base64.b64decode(record["databaseActivityEvents"]) == f.read()


def test_fixture_generator_runs(tmp_path):
    assert das_fixtures.main([str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"README.txt", "manifest.json", "data_key.hex", "batch.esdk"}


def test_csv_tail_follows_partial_writes_and_rotation(tmp_path):
    path = tmp_path / "postgresql.csv"
    path.write_bytes(b'2024-01-01 00:00:00.001 UTC,"u","d",1,"h:1",a.1,1,"",,,0,LOG,00000,"one ""quoted""\nline two"\n'
                     b'2024-01-01 00:00:00.002 UTC,"u","d",1,"h:1",a.1,2,"",,,0,LOG,00000,"pa')
    tail = das.CsvTail(str(path))
    rows = tail.read()
    assert [r["message"] for r in rows] == ['one "quoted"\nline two']
    with open(path, "ab") as f:
        f.write(b'rtial"\n')
    assert [r["message"] for r in tail.read()] == ["partial"]
    with open(path, "ab") as f:
        f.write(b'2024-01-01 00:00:00.003 UTC,"u","d",1,"h:1",a.1,3,"",,,0,LOG,00000,"last in old"\n')
    os.rename(path, tmp_path / "postgresql.csv.1")  # rotation: the old file goes, a new one comes
    path.write_bytes(b'2024-01-01 00:00:00.004 UTC,"u","d",1,"h:1",a.1,4,"",,,0,LOG,00000,"first in new"\n')
    assert [r["message"] for r in tail.read()] == ["last in old", "first in new"]
    path.write_bytes(b'2024-01-01 00:00:00.005 UTC,"u","d",1,"h:1",a.1,5,"",,,0,LOG,00000,"x"\n')  # truncated
    assert [r["message"] for r in tail.read()] == ["x"]
    assert tail.reopened == 2
    tail.close()


def test_event_maker_handles_log_statement_all_and_classifies():
    maker = das.EventMaker("127.0.0.1", "15.0")
    base = dict(user_name="u", database_name="d", process_id="7", connection_from="127.0.0.1:5000",
                session_id="abc.7", session_start_time="2024-01-01 00:00:00 UTC", backend_type="client backend")

    def row(**kw):
        r = dict.fromkeys(das.CSV_COLUMNS, "")
        r.update(base, error_severity="LOG", log_time="2024-01-01 00:00:01.000 UTC")
        r.update(kw)
        return maker.feed(r)[0]

    assert row(message="connection authorized: user=u database=d application_name=x y")[0]["clientApplication"] == "x y"
    # A role with log_statement = 'all': the text first, then a bare duration.
    assert row(message="statement: DELETE FROM t", command_tag="DELETE") == []
    [ev] = row(message="duration: 1.500 ms", command_tag="DELETE")
    assert (ev["commandText"], ev["class"], ev["startTime"]) == (
        "DELETE FROM t", "WRITE", "2024-01-01 00:00:00.998500+00")
    assert row(message="duration: 0.1 ms  parse <unnamed>: SELECT 1", command_tag="PARSE") == []
    assert row(message="duration: 0.1 ms  bind <unnamed>: SELECT 1", command_tag="BIND") == []
    assert row(message="statement: SELEC 1") == []
    [ev] = row(message='syntax error at or near "SELEC"', error_severity="ERROR", sql_state_code="42601",
               query="SELEC 1", command_tag="idle")
    assert (ev["commandText"], ev["exitCode"], ev["command"]) == ("SELEC 1", "42601", "SELEC")
    [ev] = row(message="duration: 2 ms  statement: CREATE USER bob PASSWORD 'pw''d'", command_tag="CREATE ROLE")
    assert (ev["class"], ev["commandText"]) == ("ROLE", "CREATE USER bob PASSWORD '***'")
    for command, text, cls in [
        ("COPY", "COPY t FROM STDIN", "WRITE"), ("COPY", "COPY t TO STDOUT", "READ"),
        ("TRUNCATE TABLE", "TRUNCATE t", "WRITE"), ("CALL", "CALL p()", "FUNCTION"),
        ("DROP ROLE", "DROP ROLE x", "ROLE"), ("REVOKE", "REVOKE ALL ON t FROM x", "ROLE"),
        ("VACUUM", "VACUUM", "MISC"), ("ALTER TABLE", "ALTER TABLE t ADD c int", "DDL"),
    ]:
        assert das.classify(command, text) == cls, (command, text)
    [ev] = row(message="disconnection: session time: 0:00:01.000 user=u database=d host=127.0.0.1 port=5000")
    assert (ev["command"], ev["statementId"], ev["exitCode"]) == ("DISCONNECT", 5, 0)
