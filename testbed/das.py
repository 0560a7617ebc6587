#!/usr/bin/env python3
"""Stand-in for Aurora Database Activity Streams (DAS) in the offline test bed.

Nothing offline provides DAS (moto serves Kinesis and KMS, not RDS activity
streams), so this module imitates what Aurora PostgreSQL does when an
activity stream is started on a cluster. It is a stand-in: what it puts on
the stream has the documented shape and the real encryption, but the events
come from PostgreSQL's csvlog, not from Aurora's auditing hooks (see
testbed/README.md, "Database Activity Streams stand-in", for what differs).

- PostgreSQL (started by bed.py with `--das`) writes a csvlog beside its
  stderr log: log_connections, log_disconnections and
  log_min_duration_statement = 0 (every statement logged once, when it ends,
  with its duration).
- A tailer thread follows that file (surviving rotation) and turns each
  authorized connection, statement, failed statement and disconnection into
  an activity event shaped like Aurora PostgreSQL's (version 1.1 records).
- A batcher thread gathers events every ~200 ms (or on demand) into a
  `DatabaseActivityMonitoringRecord`, adds a heartbeat when idle, gzips it,
  encrypts it with the AWS Encryption SDK (suite 0x0378, message format 1,
  raw AES-GCM key "BC"/"DataKey" = a KMS data key generated under the
  encryption context {"aws:rds:dbc-id": <cluster resource id>}) and puts the
  `DatabaseActivityMonitoringRecords` JSON on the moto Kinesis stream
  `aws-rds-das-<cluster resource id>` (two shards).
- `control()` serves the bed's `/_bed/das-*` routes: flush, split a shard,
  put a bad record, stats.

Also here, because bed.py starts moto through it when `--das` is given:
`patch_moto_kinesis()` makes moto's SplitShard and GetRecords behave like
Kinesis (a split shard keeps its records and ends; see its docstring).

Run as `das.py moto-server -H HOST -p PORT` to start such a patched moto.
"""

import base64
import csv
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import re
import socket
import struct
import sys
import threading
import time

REGION = "eu-west-1"
# The only credentials any client here uses: moto accepts anything.
DUMMY_ACCESS_KEY_ID = "AKIAIOSFODNN7DASBED0"
DUMMY_SECRET_ACCESS_KEY = "das-bed-dummy-secret-not-an-aws-key"

SERVER_TYPE = "PostgreSQL"
SERVICE_NAME = "Amazon Aurora PostgreSQL-Compatible edition"
NET_PROTOCOL = "TCP"
DB_PROTOCOL = "Postgres 3.0"
RECORDS_TYPE = "DatabaseActivityMonitoringRecords"
RECORD_TYPE = "DatabaseActivityMonitoringRecord"
RECORDS_VERSION = "1.1"
CONTEXT_KEY = "aws:rds:dbc-id"
PROVIDER_ID = "BC"
KEY_NAME = b"DataKey"

BATCH_SECS = 0.2          # how often queued events are put on the stream
HEARTBEAT_SECS = 1.0      # a heartbeat record after this long without a record
DATA_KEY_TTL_SECS = 10.0  # a data key is reused this long, then a new one is generated
FRAME_LENGTH = 4096       # the Encryption SDK's default frame length
MAX_BATCH_JSON = 256 * 1024  # plaintext JSON per record (Kinesis caps a record at 1 MiB)
SHARD_COUNT = 2

# The order of Aurora PostgreSQL's documented examples (version 1.1 records).
EVENT_FIELDS = (
    "startTime", "logTime", "statementId", "substatementId", "objectType", "command", "objectName",
    "databaseName", "dbUserName", "remoteHost", "remotePort", "sessionId", "rowCount", "commandText",
    "paramList", "pid", "clientApplication", "exitCode", "class", "serverVersion", "serverType",
    "serviceName", "serverHost", "netProtocol", "dbProtocol", "type", "errorMessage",
)

# PostgreSQL 15 csvlog columns.
CSV_COLUMNS = (
    "log_time", "user_name", "database_name", "process_id", "connection_from", "session_id",
    "session_line_num", "command_tag", "session_start_time", "virtual_transaction_id", "transaction_id",
    "error_severity", "sql_state_code", "message", "detail", "hint", "internal_query", "internal_query_pos",
    "context", "query", "query_pos", "location", "application_name", "backend_type", "leader_pid", "query_id",
)


def log(msg):
    print(f"bed: das: {msg}", file=sys.stderr, flush=True)


def resource_id(prefix, seed):
    """`prefix` + 26 characters of [A-Z2-7], like DbClusterResourceId /
    DbiResourceId (cluster-4HNY5V4RRNPKKYB7ICFKE5JBQQ), stable for a seed."""
    digest = hashlib.sha256(seed.encode()).digest()
    return prefix + base64.b32encode(digest).decode()[:26]


# --------------------------------------------------------------------------
# Following the csvlog


class CsvTail:
    """Reads the complete csvlog records appended to `path` since the last call.

    A record ends at a newline outside double quotes (csvlog quotes every
    field that may hold a newline and doubles embedded quotes). Rotation is
    survived: when the name points to another file (renamed away) or the file
    shrank (truncated), what is left of the old one is read first, then the
    new one from its start.
    """

    def __init__(self, path):
        self.path = path
        self.f = None
        self.buf = b""
        self.scan = 0       # bytes of buf already scanned for a record end
        self.quoted = False  # scanner state at buf[scan]
        self.reopened = 0

    def _open(self):
        try:
            self.f = open(self.path, "rb")
        except FileNotFoundError:
            self.f = None

    def read(self):
        if self.f is None:
            self._open()
            if self.f is None:
                return []
        self.buf += self.f.read()
        try:
            st = os.stat(self.path)
            mine = os.fstat(self.f.fileno())
            rotated = (st.st_ino, st.st_dev) != (mine.st_ino, mine.st_dev) or st.st_size < self.f.tell()
        except FileNotFoundError:
            rotated = False  # renamed away, not yet recreated: keep reading the old one
        if not rotated:
            return self._records()
        self.buf += self.f.read()  # whatever reached the old file meanwhile
        out = self._records()
        if self.buf:
            log(f"{len(self.buf)} bytes of an unfinished record lost at the rotation of {self.path}")
        self.buf, self.scan, self.quoted = b"", 0, False
        self.f.close()
        self.reopened += 1
        self._open()  # the new file (or the truncated one) from its start
        if self.f is not None:
            self.buf += self.f.read()
        return out + self._records()

    def _records(self):
        buf, i, quoted, end = self.buf, self.scan, self.quoted, -1
        n = len(buf)
        while i < n:
            c = buf[i]
            if c == 0x22:  # '"'
                quoted = not quoted
            elif c == 0x0A and not quoted:  # '\n'
                end = i
            i += 1
        if end < 0:
            self.scan, self.quoted = n, quoted
            return []
        complete, self.buf = buf[: end + 1], buf[end + 1:]
        # `end` lay outside quotes: the remainder (one partial record at
        # most) is scanned again from its start next time.
        self.scan, self.quoted = 0, False
        rows = list(csv.reader(io.StringIO(complete.decode("utf-8", "replace"), newline="")))
        return [dict(zip(CSV_COLUMNS, row)) for row in rows if row]

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


# --------------------------------------------------------------------------
# From log rows to activity events

DURATION = re.compile(
    r"duration: (?P<ms>[0-9.]+) ms"
    r"(?:  (?P<kind>statement|execute|parse|bind|fastpath function call)(?P<name> [^:]*)?: (?P<text>.*))?\Z",
    re.DOTALL,
)
LOGGED_STATEMENT = re.compile(r"(?:statement|execute(?: [^:]*)?): (?P<text>.*)\Z", re.DOTALL)
PARAM = re.compile(r"\$(\d+) = (?:NULL|'((?:[^']|'')*)')")
APP_IN_MESSAGE = re.compile(r" application_name=(.*?)(?: SSL enabled| GSS| \(|$)")
PASSWORD_LITERAL = re.compile(r"(?i)(\bPASSWORD\s+)'(?:[^']|'')*'")
NOT_A_COMMAND = {"", "idle", "idle in transaction", "idle in transaction (aborted)", "authentication",
                 "startup", "PARSE", "BIND", "notify interrupt"}
ROLE_OBJECTS = {"ROLE", "USER", "GROUP"}


def redact(text):
    """Hides password literals, as Aurora does when it can tell one from the
    context (ALTER ROLE ... PASSWORD '...'); the placeholder is this stand-in's."""
    return PASSWORD_LITERAL.sub(r"\1'***'", text) if text else text


def first_words(text, n=6):
    """The first `n` words of a statement, upper case, comments skipped."""
    body = re.sub(r"(?s)^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", "", text or "")
    return [w.upper() for w in re.findall(r"[A-Za-z_]+", body[:300])[:n]]


MODIFIERS = {"OR", "REPLACE", "TEMP", "TEMPORARY", "UNLOGGED", "UNIQUE", "GLOBAL", "LOCAL", "TRUSTED",
             "PROCEDURAL", "RECURSIVE"}
TWO_WORD_OBJECTS = {"MATERIALIZED", "FOREIGN", "EVENT", "TEXT", "DEFAULT", "ACCESS", "USER", "OPERATOR"}


def keyword_command(text):
    """The command tag a statement would get, from its first keywords: for
    the failed statements whose log row has no usable tag (syntax errors)."""
    w = first_words(text)
    if not w:
        return "UNKNOWN"
    if w[0] in ("CREATE", "ALTER", "DROP") and len(w) > 1:
        rest = w[1:]
        while len(rest) > 1 and rest[0] in MODIFIERS:
            rest = rest[1:]
        if rest[0] in TWO_WORD_OBJECTS and len(rest) > 1 and not (rest[0] == "USER" and rest[1] != "MAPPING"):
            return f"{w[0]} {rest[0]} {rest[1]}"
        return f"{w[0]} {rest[0]}"
    if w[0] == "WITH":
        return "SELECT"
    if w[0] == "TRUNCATE":
        return "TRUNCATE TABLE"
    if w[0] in ("START", "BEGIN"):
        return "BEGIN"
    return w[0]


def classify(command, text):
    """DAS class of a statement: a keyword classifier on the command tag (and
    the text, for COPY's direction). Aurora's own classes come from its
    parser; this gets the common statements right."""
    c = command.upper()
    head = c.split(" ")
    if c in ("SELECT", "SELECT INTO"):
        return "READ"
    if c == "COPY":
        return "WRITE" if re.search(r"(?is)\bFROM\s+(STDIN|'|PROGRAM\b)", text or "") else "READ"
    if c in ("INSERT", "UPDATE", "DELETE", "TRUNCATE TABLE", "MERGE"):
        return "WRITE"
    if c in ("GRANT", "REVOKE", "GRANT ROLE", "REVOKE ROLE", "ALTER DEFAULT PRIVILEGES") or (
        head[0] in ("CREATE", "ALTER", "DROP") and len(head) == 2 and head[1] in ROLE_OBJECTS
    ):
        return "ROLE"
    if c in ("DO", "CALL"):
        return "FUNCTION"
    if head[0] in ("CREATE", "ALTER", "DROP", "COMMENT") or c == "SECURITY LABEL":
        return "DDL"
    return "MISC"


def pg_time(value):
    """csvlog time ('2024-05-01 10:11:12.345 UTC', bed.py sets log_timezone
    to UTC) -> aware datetime; None for an empty field."""
    if not value:
        return None
    stamp, _, zone = value.rpartition(" ")
    if zone not in ("UTC", "GMT", "+00", "Z"):
        stamp = value  # no zone: taken as UTC
    fmt = "%Y-%m-%d %H:%M:%S.%f" if "." in stamp else "%Y-%m-%d %H:%M:%S"
    return dt.datetime.strptime(stamp, fmt).replace(tzinfo=dt.timezone.utc)


def das_time(t):
    """DAS's timestamp form: '2019-10-30 00:39:49.940668+00'."""
    return None if t is None else t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f") + "+00"


def params_of(detail):
    """paramList from a 'parameters: $1 = '42', $2 = NULL' detail. Aurora's
    paramList leaves NULLs out (documented), so does this."""
    if not detail or not detail.startswith("parameters: "):
        return []
    return [m.group(2).replace("''", "'") for m in PARAM.finditer(detail) if m.group(2) is not None]


class EventMaker:
    """Turns csvlog rows into DAS activity events, one session table deep."""

    def __init__(self, server_host, server_version):
        self.server = {
            "serverVersion": server_version, "serverType": SERVER_TYPE, "serviceName": SERVICE_NAME,
            "serverHost": server_host, "netProtocol": NET_PROTOCOL, "dbProtocol": DB_PROTOCOL,
        }
        self.sessions = {}  # session_id -> state

    def event(self, **fields):
        ev = dict.fromkeys(EVENT_FIELDS)
        ev.update(self.server)
        ev.update(type="record", paramList=[], substatementId=1)
        ev.update(fields)
        return ev

    def heartbeat(self, now=None):
        ev = dict.fromkeys(EVENT_FIELDS)
        ev.update(self.server)
        ev.update(type="heartbeat", logTime=das_time(now or dt.datetime.now(dt.timezone.utc)))
        return ev

    def _session(self, row):
        sid = row["session_id"]
        s = self.sessions.get(sid)
        if s is None:
            host, _, port = row["connection_from"].rpartition(":")
            if not host:  # "[local]" (unix socket): no port
                host, port = row["connection_from"] or None, None
            s = self.sessions[sid] = {
                "authorized": False, "statements": 0, "received": None, "pending": None,
                "remoteHost": host, "remotePort": port or None, "seen": time.monotonic(),
                "application": None,
            }
            if len(self.sessions) > 1000:
                self._prune()
        return s

    def _prune(self):
        # Sessions that never logged in (failed or abandoned startups) leave
        # no disconnection line behind.
        old = time.monotonic() - 60
        for sid in [k for k, v in self.sessions.items() if not v["authorized"] and v["seen"] < old]:
            del self.sessions[sid]

    def _common(self, row, s):
        app = row["application_name"] or s["application"]
        return {
            "databaseName": row["database_name"] or None, "dbUserName": row["user_name"] or None,
            "remoteHost": s["remoteHost"], "remotePort": s["remotePort"], "sessionId": row["session_id"],
            "pid": int(row["process_id"]), "clientApplication": app or None,
        }

    def _statement(self, row, s, text, params, start, end, exit_code=None, error=None):
        tag = row["command_tag"]
        command = tag if tag not in NOT_A_COMMAND else keyword_command(text)
        s["statements"] += 1
        return self.event(
            startTime=das_time(start), logTime=das_time(end), statementId=s["statements"],
            command=command, commandText=redact(text), paramList=params, exitCode=exit_code,
            errorMessage=error, **{"class": classify(command, text)}, **self._common(row, s),
        )

    def feed(self, row):
        """-> (events, marker) for one csvlog row; marker is the client port
        of a bare TCP connection ('connection received' from 127.0.0.1), the
        bed's way of knowing that everything logged before it has been read."""
        if row.get("backend_type") not in ("client backend", "not initialized", None) or not row.get("session_id"):
            return [], None
        msg, severity = row["message"], row["error_severity"]
        s = self._session(row)
        s["seen"] = time.monotonic()
        when = pg_time(row["log_time"])

        if msg.startswith("connection received: "):
            s["received"] = when
            host, _, port = row["connection_from"].rpartition(":")
            if host == "127.0.0.1" and port.isdigit():
                return [], int(port)  # the emulator tells its markers from clients
            return [], None
        if msg.startswith("connection authorized: "):
            s["authorized"] = True
            m = APP_IN_MESSAGE.search(msg)
            s["application"] = row["application_name"] or (m.group(1) if m else None)
            s["statements"] = 1
            return [self.event(
                startTime=das_time(s["received"] or pg_time(row["session_start_time"])), logTime=das_time(when),
                statementId=1, command="CONNECT", **{"class": "CONNECT"}, **self._common(row, s),
            )], None
        if msg.startswith("disconnection: "):
            self.sessions.pop(row["session_id"], None)
            s["statements"] += 1
            return [self.event(
                startTime=das_time(s["received"] or pg_time(row["session_start_time"])), logTime=das_time(when),
                statementId=s["statements"], command="DISCONNECT", exitCode=0, **{"class": "CONNECT"},
                **self._common(row, s),
            )], None
        if not s["authorized"]:
            if severity in ("FATAL", "PANIC"):
                self.sessions.pop(row["session_id"], None)  # a failed login: no events (see README)
            return [], None

        if severity in ("ERROR", "FATAL", "PANIC"):
            pending, s["pending"] = s["pending"], None
            text = row["query"] or (pending and pending[0])
            if not text:
                return [], None  # e.g. FATAL: terminating connection: the disconnection follows
            start = pending[2] if pending else when
            return [self._statement(row, s, text, [], start, when, row["sql_state_code"] or None, msg)], None

        if severity != "LOG":
            return [], None
        m = DURATION.match(msg)
        if m:
            took = dt.timedelta(milliseconds=float(m.group("ms")))
            kind = m.group("kind")
            if kind is None:
                # log_statement logged the text already (a role or database
                # with log_statement = 'all'): the duration line is bare.
                pending, s["pending"] = s["pending"], None
                if pending is None:
                    return [], None
                return [self._statement(row, s, pending[0], pending[1], when - took, when)], None
            if kind in ("parse", "bind"):
                return [], None
            s["pending"] = None
            text = m.group("text")
            if kind == "fastpath function call":
                text = f"fastpath function call: {text}"
            return [self._statement(row, s, text, params_of(row["detail"]), when - took, when)], None
        m = LOGGED_STATEMENT.match(msg)
        if m:
            s["pending"] = (m.group("text"), params_of(row["detail"]), when)
        return [], None


# --------------------------------------------------------------------------
# The Encryption SDK message


def esdk_client():
    import aws_encryption_sdk
    from aws_encryption_sdk import CommitmentPolicy

    # Message format 1 (no key commitment) is what DAS produces; encrypting it
    # needs FORBID_ENCRYPT_ALLOW_DECRYPT.
    return aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT)


def data_key_provider(data_key):
    """The raw AES-256-GCM master key DAS wraps its message key with:
    provider "BC", key name "DataKey", wrapping key = the KMS data key."""
    from aws_encryption_sdk.identifiers import EncryptionKeyType, WrappingAlgorithm
    from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
    from aws_encryption_sdk.key_providers.raw import RawMasterKey

    if len(data_key) != 32:
        raise ValueError("the data key must be 32 bytes")
    return RawMasterKey(
        provider_id=PROVIDER_ID, key_id=KEY_NAME,
        wrapping_key=WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=data_key, wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        ),
    )


def seal(plaintext, data_key, frame_length=FRAME_LENGTH, client=None):
    """ESDK message (suite 0x0378, format 1) of `plaintext` under `data_key`."""
    from aws_encryption_sdk.identifiers import Algorithm

    client = client or esdk_client()
    message, _header = client.encrypt(
        source=plaintext, key_provider=data_key_provider(data_key),
        algorithm=Algorithm.AES_256_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384, frame_length=frame_length,
    )
    return message


def esdk_layout(msg):
    """Where the parts of a format-1, framed ESDK message are (offsets into
    `msg`), read independently of the SDK. Raises ValueError if malformed.

    Header: version 1, type 0x80, suite id, message id (16), AAD (length,
    count, key/value pairs), encrypted data keys (count, then provider id,
    provider info, ciphertext, each u16-length-prefixed), content type (2 =
    framed), 4 reserved zero bytes, IV length, frame length; then the header
    authentication (IV, 16-byte tag). Body: frames (sequence number, IV,
    frame-length ciphertext, tag) and a final frame (0xFFFFFFFF, sequence
    number, IV, u32 content length, ciphertext, tag). Footer (signed suites):
    u16 signature length, signature.
    """
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(msg):
            raise ValueError(f"message ends inside a field at offset {pos}")
        pos += n
        return msg[pos - n: pos]

    def u8():
        return take(1)[0]

    def u16():
        return struct.unpack(">H", take(2))[0]

    def u32():
        return struct.unpack(">I", take(4))[0]

    out = {}
    if u8() != 1 or u8() != 0x80:
        raise ValueError("not a format-1 customer-authenticated-encrypted-data message")
    out["algorithm_id"] = u16()
    out["message_id"] = take(16).hex()
    aad_len = u16()
    aad_end = pos + aad_len
    context = {}
    if aad_len:
        for _ in range(u16()):
            k = take(u16()).decode()
            context[k] = take(u16()).decode()
        if pos != aad_end:
            raise ValueError("AAD length does not match its pairs")
    out["encryption_context"] = context
    edks = []
    for _ in range(u16()):
        edks.append({"provider_id": take(u16()).decode(), "provider_info": take(u16()).hex(),
                     "ciphertext_len": len(take(u16()))})
    out["encrypted_data_keys"] = edks
    if u8() != 2:
        raise ValueError("not framed content")
    if take(4) != b"\0\0\0\0":
        raise ValueError("reserved bytes are not zero")
    iv_len = u8()
    frame_length = u32()
    out["iv_length"], out["frame_length"] = iv_len, frame_length
    out["header_len"] = pos
    out["header_auth"] = {"offset": pos, "len": iv_len + 16}
    take(iv_len + 16)
    frames = []
    while True:
        start = pos
        seq = u32()
        final = seq == 0xFFFFFFFF
        if final:
            seq = u32()
        take(iv_len)
        n = u32() if final else frame_length
        frames.append({"offset": start, "sequence": seq, "final": final,
                       "content": {"offset": pos, "len": n}, "tag": {"offset": pos + n, "len": 16}})
        take(n + 16)
        if seq != len(frames):
            raise ValueError(f"frame {len(frames)} has sequence number {seq}")
        if final:
            break
    out["frames"] = frames
    footer = pos
    sig_len = u16()
    take(sig_len)
    out["footer"] = {"offset": footer, "len": 2 + sig_len, "signature_len": sig_len}
    if pos != len(msg):
        raise ValueError(f"{len(msg) - pos} bytes after the footer")
    out["total_len"] = len(msg)
    return out


def flip(data, offset, mask=0x01):
    b = bytearray(data)
    b[offset] ^= mask
    return bytes(b)


def batch_plaintext(cluster_id, instance_id, events):
    return json.dumps(
        {"type": RECORD_TYPE, "clusterId": cluster_id, "instanceId": instance_id,
         "databaseActivityEventList": events},
        separators=(",", ":"),
    ).encode()


def kinesis_record(message, key_blob, version=RECORDS_VERSION):
    return json.dumps({
        "type": RECORDS_TYPE, "version": version,
        "databaseActivityEvents": base64.b64encode(message).decode(),
        "key": base64.b64encode(key_blob).decode(),
    }, separators=(",", ":")).encode()


# --------------------------------------------------------------------------
# moto's Kinesis, made to reshard like Kinesis


def patch_moto_kinesis():
    """Two differences from Kinesis that matter to a DAS reader, fixed here:

    - moto's SplitShard moves the parent's records into the children (with
      new sequence numbers) and leaves the parent empty; Kinesis keeps them in
      the closed parent (until retention ends) and starts the children empty.
    - moto keeps routing records to a split (closed) shard; Kinesis routes
      them to the open shard whose hash key range holds the key.
    - moto's GetRecords always returns a NextShardIterator; Kinesis returns
      none, plus ChildShards, once a closed shard has been read to its end,
      which is how a reader knows to go on with the children.
    """
    from collections import OrderedDict

    from moto.kinesis import models, responses
    from moto.kinesis.utils import decompose_shard_iterator

    split = models.Stream.split_shard

    def split_keeping_records(self, shard_to_split, new_starting_hash_key):
        parent = self.shards.get(shard_to_split)
        kept = OrderedDict(parent.records) if parent is not None else None
        before = set(self.shards)
        split(self, shard_to_split, new_starting_hash_key)
        for shard_id in set(self.shards) - before:
            self.shards[shard_id].records = OrderedDict()
        parent.records = kept

    models.Stream.split_shard = split_keeping_records

    shard_for_key = models.Stream.get_shard_for_key

    def open_shard_for_key(self, partition_key, explicit_hash_key):
        shard_for_key(self, partition_key, explicit_hash_key)  # moto's checks of the key
        key = (int(explicit_hash_key) if explicit_hash_key
               else int.from_bytes(hashlib.md5(partition_key.encode("utf-8")).digest(), "big"))
        for shard in self.shards.values():
            if shard.is_open and shard.starting_hash <= key <= shard.ending_hash:
                return shard
        return None

    models.Stream.get_shard_for_key = open_shard_for_key

    get_records = responses.KinesisResponse.get_records

    def get_records_ending_closed_shards(self):
        result = get_records(self)
        body = result.result
        stream_name, shard_id, last = decompose_shard_iterator(body["NextShardIterator"])
        stream = self.kinesis_backend.describe_stream(
            stream_arn=self._get_param("StreamARN"), stream_name=stream_name
        )
        shard = stream.shards.get(shard_id)
        if shard is not None and not shard.is_open and int(last) >= shard.get_max_sequence_number():
            del body["NextShardIterator"]
            body["ChildShards"] = [
                {
                    "ShardId": child.shard_id,
                    "ParentShards": [p for p in (child.parent, child.adjacent_parent) if p],
                    "HashKeyRange": {"StartingHashKey": str(child.starting_hash),
                                     "EndingHashKey": str(child.ending_hash)},
                }
                for child in stream.shards.values()
                if shard_id in (child.parent, child.adjacent_parent)
            ]
        return result

    responses.KinesisResponse.get_records = get_records_ending_closed_shards


# --------------------------------------------------------------------------
# The emulator


def aws_client(service, endpoint_url, region=REGION):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        service, region_name=region, endpoint_url=endpoint_url,
        aws_access_key_id=DUMMY_ACCESS_KEY_ID, aws_secret_access_key=DUMMY_SECRET_ACCESS_KEY,
        config=Config(retries={"max_attempts": 2, "mode": "standard"}),
    )


class DasError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class DasEmulator:
    def __init__(self, *, csv_path, pg_port, moto_url, seed, server_version, region=REGION,
                 server_host="127.0.0.1"):
        self.csv_path = csv_path
        self.pg_port = pg_port
        self.moto_url = moto_url
        self.region = region
        self.cluster_id = resource_id("cluster-", f"cluster/{seed}")
        self.instance_id = resource_id("db-", f"instance/{seed}")
        self.stream_name = f"aws-rds-das-{self.cluster_id}"
        self.maker = EventMaker(server_host, server_version)
        self.tail = CsvTail(csv_path)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.put_lock = threading.Lock()  # one Kinesis/KMS writer at a time (and no put during a split)
        self.queue = []
        self.enqueued = 0   # events ever queued
        self.drained = 0    # events ever put (or given up on)
        self.markers = set()           # marker ports seen in the log, not yet waited for
        self.expected_markers = set()  # marker ports poked, not yet seen
        self.flush_requested = False
        self.live = False   # False until the start-up marker: what was logged before is not streamed
        self.stopping = threading.Event()
        self.threads = []
        self.totals = {"records": 0, "events": 0, "heartbeats": 0, "bad_records": 0}
        self.per_shard = {}
        self.last_put = 0.0
        self.data_key = None  # (plaintext, blob, made at)
        self.failure = None
        self.seq = 0
        self._startup_marker = None

    # -- start / stop --------------------------------------------------------

    def start(self):
        self.kms = aws_client("kms", self.moto_url, self.region)
        self.kinesis = aws_client("kinesis", self.moto_url, self.region)
        self.kms_key_id = self.kms.create_key(
            Description=f"DAS stand-in key for {self.cluster_id}", KeyUsage="ENCRYPT_DECRYPT",
        )["KeyMetadata"]["KeyId"]
        self.kinesis.create_stream(StreamName=self.stream_name, ShardCount=SHARD_COUNT)
        self._wait_active()
        self.esdk = esdk_client()
        for target, name in ((self._tail_loop, "das-tail"), (self._batch_loop, "das-batch")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)
        # What PostgreSQL logged before the stream "started" (the bed's own
        # setup) is skipped: the tailer reads from the start of the file and
        # goes live at this marker.
        port = self._poke()
        self._wait_marker(port, 30)
        with self.cond:
            self.live = True

    def stop(self):
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        for t in self.threads:
            t.join(5)
        self.tail.close()

    def info(self, control_url):
        return {
            "cluster_resource_id": self.cluster_id,
            "instance_resource_id": self.instance_id,
            "stream_name": self.stream_name,
            "kms_key_id": self.kms_key_id,
            "region": self.region,
            "endpoint_url": self.moto_url,
            "control_url": control_url,
            "pg_csvlog": self.csv_path,
        }

    def _wait_active(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.kinesis.describe_stream_summary(StreamName=self.stream_name)
            if status["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
                return
            time.sleep(0.05)
        raise DasError(504, f"stream {self.stream_name} not ACTIVE after {timeout}s")

    # -- tailing -------------------------------------------------------------

    def _tail_loop(self):
        while not self.stopping.is_set():
            try:
                rows = self.tail.read()
            except Exception as e:  # noqa: BLE001 - keep following
                log(f"reading {self.csv_path}: {e!r}")
                rows = []
            if rows:
                self._take(rows)
            else:
                self.stopping.wait(0.02)

    def _take(self, rows):
        events, markers = [], []
        for row in rows:
            try:
                evs, marker = self.maker.feed(row)
            except Exception as e:  # noqa: BLE001 - one odd line must not stop the stream
                log(f"cannot turn a log row into an event ({e!r}): {row}")
                continue
            events.extend(evs)
            if marker is not None:
                with self.cond:
                    mine = marker in self.expected_markers
                if mine:
                    self.maker.sessions.pop(row["session_id"], None)  # it never logs in
                    markers.append((len(events), marker))
        with self.cond:
            done = 0
            for upto, marker in markers + [(len(events), None)]:
                if self.live:
                    self.queue.extend(events[done:upto])
                    self.enqueued += upto - done
                done = upto
                if marker is not None:
                    self.expected_markers.discard(marker)
                    self.markers.add(marker)
                    if not self.live and marker == self._startup_marker:
                        self.live = True  # what follows the start-up marker is streamed
            self.cond.notify_all()

    def _poke(self):
        """A bare TCP connection to PostgreSQL: its 'connection received' line
        is a marker in the log, after everything already logged. The port is
        known (bound) before the connection is made, so the line cannot be
        read before it is expected."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            with self.cond:
                self.expected_markers.add(port)
                if not self.live:
                    self._startup_marker = port
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", self.pg_port))
            except OSError:
                with self.cond:
                    self.expected_markers.discard(port)
                raise
        return port

    def _wait_marker(self, port, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while port not in self.markers:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DasError(504, f"the log marker (port {port}) did not show up in {timeout}s")
                self.cond.wait(left)
            self.markers.discard(port)

    # -- batching and putting ------------------------------------------------

    def _batch_loop(self):
        while not self.stopping.is_set():
            with self.cond:
                self.cond.wait_for(lambda: self.flush_requested or self.stopping.is_set(), BATCH_SECS)
                self.flush_requested = False
                events, self.queue = self.queue, []
            if self.stopping.is_set():
                return
            try:
                if events:
                    self._put_events(events)
                elif time.monotonic() - self.last_put >= HEARTBEAT_SECS:
                    self._put_events([])
                self.failure = None
            except Exception as e:  # noqa: BLE001 - moto hiccup: keep the events, retry
                self.failure = repr(e)
                log(f"cannot put a record: {e!r}")
                with self.cond:
                    self.queue[:0] = events
                self.stopping.wait(0.5)
                continue
            with self.cond:
                self.drained += len(events)
                self.cond.notify_all()

    def _chunks(self, events):
        chunk, size = [], 0
        for ev in events:
            n = len(json.dumps(ev))
            if chunk and size + n > MAX_BATCH_JSON:
                yield chunk
                chunk, size = [], 0
            chunk.append(ev)
            size += n
        yield chunk

    def _current_data_key(self):
        now = time.monotonic()
        if self.data_key is None or now - self.data_key[2] > DATA_KEY_TTL_SECS:
            r = self.kms.generate_data_key(
                KeyId=self.kms_key_id, KeySpec="AES_256", EncryptionContext={CONTEXT_KEY: self.cluster_id},
            )
            self.data_key = (r["Plaintext"], r["CiphertextBlob"], now)
        return self.data_key[0], self.data_key[1]

    def _partition_key(self):
        """A key whose MD5 falls in the lower or upper half of the hash range,
        alternately: consecutive records land on different shards."""
        self.seq += 1
        for i in range(1000):
            key = f"{self.instance_id}:{self.seq}:{i}"
            if hashlib.md5(key.encode()).digest()[0] >> 7 == self.seq & 1:
                return key
        return key

    def _put(self, data):
        r = self.kinesis.put_record(StreamName=self.stream_name, Data=data, PartitionKey=self._partition_key())
        self.per_shard[r["ShardId"]] = self.per_shard.get(r["ShardId"], 0) + 1
        return r

    def _seal_batch(self, events, data_key):
        plain = gzip.compress(batch_plaintext(self.cluster_id, self.instance_id, events), mtime=0)
        return seal(plain, data_key, client=self.esdk)

    def _put_events(self, events):
        with self.put_lock:
            for chunk in self._chunks(events) if events else [[self.maker.heartbeat()]]:
                key, blob = self._current_data_key()
                self._put(kinesis_record(self._seal_batch(chunk, key), blob))
                beats = sum(1 for e in chunk if e["type"] == "heartbeat")
                with self.cond:
                    self.totals["records"] += 1
                    self.totals["heartbeats"] += beats
                    self.totals["events"] += len(chunk) - beats
            self.last_put = time.monotonic()

    # -- control API -----------------------------------------------------------

    def flush(self, timeout=30):
        port = self._poke()
        self._wait_marker(port, timeout)
        deadline = time.monotonic() + timeout
        with self.cond:
            target = self.enqueued
            self.flush_requested = True
            self.cond.notify_all()
            while self.drained < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DasError(504, f"events not on the stream after {timeout}s (last error: {self.failure})")
                self.cond.wait(min(left, 0.5))
            return {"records": self.totals["records"], "events": self.totals["events"]}

    def shards(self):
        shards = []
        token = None
        while True:
            r = (self.kinesis.list_shards(NextToken=token) if token
                 else self.kinesis.list_shards(StreamName=self.stream_name))
            shards += r["Shards"]
            token = r.get("NextToken")
            if not token:
                return shards

    def split(self):
        with self.put_lock:
            open_shards = [s for s in self.shards() if "EndingSequenceNumber" not in s["SequenceNumberRange"]]
            if not open_shards:
                raise DasError(409, "no open shard")
            parent = open_shards[0]
            lo = int(parent["HashKeyRange"]["StartingHashKey"])
            hi = int(parent["HashKeyRange"]["EndingHashKey"])
            self.kinesis.split_shard(StreamName=self.stream_name, ShardToSplit=parent["ShardId"],
                                     NewStartingHashKey=str((lo + hi + 1) // 2))
            self._wait_active()
            children = [s["ShardId"] for s in self.shards() if s.get("ParentShardId") == parent["ShardId"]]
        return {"parent": parent["ShardId"], "children": children}

    def bad(self, kind):
        other = resource_id("cluster-", f"not-{self.cluster_id}")
        with self.put_lock:
            key, blob = self._current_data_key()
            if kind == "tamper":
                message = self._seal_batch([self.maker.heartbeat()], key)
                frame = esdk_layout(message)["frames"][0]
                target = frame["content"] if frame["content"]["len"] else frame["tag"]
                data = kinesis_record(flip(message, target["offset"] + target["len"] // 2), blob)
            elif kind == "wrong-context":
                r = self.kms.generate_data_key(KeyId=self.kms_key_id, KeySpec="AES_256",
                                               EncryptionContext={CONTEXT_KEY: other})
                data = kinesis_record(self._seal_batch([self.maker.heartbeat()], r["Plaintext"]),
                                      r["CiphertextBlob"])
            elif kind == "unknown-version":
                data = kinesis_record(self._seal_batch([self.maker.heartbeat()], key), blob, version="9.9")
            elif kind == "not-json":
                data = b"\x00DAS stand-in: this record is not JSON \xff\xfe{"
            else:
                raise DasError(400, f"unknown kind {kind!r}: tamper, wrong-context, unknown-version or not-json")
            r = self._put(data)
            with self.cond:
                self.totals["bad_records"] += 1
        return {"sequence_number": r["SequenceNumber"], "shard_id": r["ShardId"], "kind": kind}

    def stats(self):
        shards = [
            {
                "shard_id": s["ShardId"], "parent_shard_id": s.get("ParentShardId"),
                "open": "EndingSequenceNumber" not in s["SequenceNumberRange"],
                "hash_key_range": [s["HashKeyRange"]["StartingHashKey"], s["HashKeyRange"]["EndingHashKey"]],
                "records": self.per_shard.get(s["ShardId"], 0),
            }
            for s in self.shards()
        ]
        with self.cond:
            return {**self.totals, "shards": shards, "queued": len(self.queue), "last_error": self.failure}

    def control(self, method, path, body):
        """-> (status, headers, JSON body) for a /_bed/das-* request."""
        try:
            if (method, path) == ("POST", "/_bed/das-flush"):
                return 200, {}, self.flush(float(body.get("timeout", 30)))
            if (method, path) == ("POST", "/_bed/das-split"):
                return 200, {}, self.split()
            if (method, path) == ("POST", "/_bed/das-bad"):
                return 200, {}, self.bad(body.get("kind"))
            if (method, path) == ("GET", "/_bed/das-stats"):
                return 200, {}, self.stats()
            return 404, {}, {"error": f"no route for {method} {path}"}
        except DasError as e:
            return e.status, {}, {"error": str(e)}
        except Exception as e:  # noqa: BLE001
            return 500, {}, {"error": repr(e)}


def main(argv):
    if argv[:1] == ["moto-server"]:
        patch_moto_kinesis()
        from moto.server import main as moto_main

        return moto_main(argv[1:])
    print(f"usage: {os.path.basename(__file__)} moto-server [moto_server options]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) or 0)
