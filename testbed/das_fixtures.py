#!/usr/bin/env python3
"""Writes Database Activity Streams test fixtures for a DAS decoder.

    das_fixtures.py DIR

Into DIR: AWS Encryption SDK messages made exactly as the bed's DAS
stand-in (testbed/das.py) makes them (suite 0x0378, message format 1, raw
AES-GCM master key "BC"/"DataKey", frame length 4096, gzip plaintext), their
plaintexts, the 32-byte data key (hex), edge cases (an empty plaintext, a
multi-frame message, a plaintext that is an exact multiple of the frame
length) and broken messages (a byte flipped in the header, in a frame, in
the footer signature; the footer cut off). Every message is checked with the
real SDK before it is written: good ones must decrypt to their plaintext,
broken ones must fail. README.txt and manifest.json say what each file
should decode to, or which error it should raise.

Needs only the venv (aws-encryption-sdk), no bed: the data key is fixed
(SHA-256 of a phrase), so no KMS is involved; the `key` field of the sample
Kinesis record is a placeholder, not a KMS blob.
"""

import gzip
import hashlib
import json
import logging
import os
import random
import sys

import das

DATA_KEY = hashlib.sha256(b"rds-iam-proxy DAS fixture data key").digest()
CLUSTER_ID = das.resource_id("cluster-", "fixtures/cluster")
INSTANCE_ID = das.resource_id("db-", "fixtures/instance")
SERVER_VERSION = "15.18"


def csv_row(**kw):
    row = dict.fromkeys(das.CSV_COLUMNS, "")
    row.update(backend_type="client backend", error_severity="LOG", sql_state_code="00000")
    row.update(kw)
    return row


def sample_events(extra_statements=0, seed=1):
    """A session as the stand-in reports it: connect, statements (one with
    parameters, one failing), disconnect. Built by feeding csvlog rows
    through the emulator's own EventMaker."""
    rnd = random.Random(seed)
    maker = das.EventMaker("127.0.0.1", SERVER_VERSION)
    sid, pid, peer = "6650a1b2.3039", "12345", "127.0.0.1:50432"
    base = dict(user_name="alice", database_name="mylab", process_id=pid, connection_from=peer,
                session_id=sid, session_start_time="2024-05-24 10:00:02 UTC", application_name="psql")
    rows = [
        csv_row(**{**base, "user_name": "", "database_name": "", "application_name": ""},
                log_time="2024-05-24 10:00:02.100 UTC", command_tag="",
                message="connection received: host=127.0.0.1 port=50432", backend_type="not initialized"),
        csv_row(**base, log_time="2024-05-24 10:00:02.140 UTC", command_tag="authentication",
                message="connection authorized: user=alice database=mylab application_name=psql "
                        "SSL enabled (protocol=TLSv1.3, cipher=TLS_AES_256_GCM_SHA384, bits=256)"),
        csv_row(**base, log_time="2024-05-24 10:00:03.001 UTC", command_tag="CREATE TABLE",
                message="duration: 2.500 ms  statement: CREATE TABLE notes (id int, body text)"),
        csv_row(**base, log_time="2024-05-24 10:00:03.020 UTC", command_tag="INSERT",
                message="duration: 0.310 ms  execute <unnamed>: INSERT INTO notes VALUES ($1, $2)",
                detail="parameters: $1 = '1', $2 = 'it''s'"),
        csv_row(**base, log_time="2024-05-24 10:00:03.050 UTC", command_tag="SELECT",
                message="duration: 0.120 ms  statement: SELECT * FROM notes"),
        csv_row(**base, log_time="2024-05-24 10:00:03.070 UTC", command_tag="SELECT", error_severity="ERROR",
                sql_state_code="42P01", message='relation "nope" does not exist', query="SELECT * FROM nope"),
        csv_row(**base, log_time="2024-05-24 10:00:03.090 UTC", command_tag="ALTER ROLE",
                message="duration: 1.000 ms  statement: ALTER ROLE alice PASSWORD 'hunter2'"),
    ]
    for i in range(extra_statements):
        text = f"SELECT '{rnd.randbytes(100).hex()}' AS filler_{i}"
        rows.append(csv_row(**base, log_time=f"2024-05-24 10:00:04.{i:03d} UTC", command_tag="SELECT",
                            message=f"duration: 0.050 ms  statement: {text}"))
    rows.append(csv_row(**base, log_time="2024-05-24 10:00:05.000 UTC", command_tag="idle",
                        message="disconnection: session time: 0:00:02.900 user=alice database=mylab "
                                "host=127.0.0.1 port=50432"))
    events = []
    for row in rows:
        events += maker.feed(row)[0]
    return events, maker


def gz(events):
    return gzip.compress(das.batch_plaintext(CLUSTER_ID, INSTANCE_ID, events), mtime=0)


def decrypt(message):
    import aws_encryption_sdk
    from aws_encryption_sdk import CommitmentPolicy

    client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT)
    return client.decrypt(source=message, key_provider=das.data_key_provider(DATA_KEY))[0]


def describe_layout(layout):
    frames = layout["frames"]
    return (f"header {layout['header_len']} B + header auth {layout['header_auth']['len']} B "
            f"(at {layout['header_auth']['offset']}); {len(frames)} frame(s) of frame length "
            f"{layout['frame_length']}: " +
            ", ".join(f"#{f['sequence']}{' final' if f['final'] else ''} at {f['offset']} "
                      f"(content {f['content']['len']} B at {f['content']['offset']})" for f in frames) +
            f"; footer at {layout['footer']['offset']} (signature {layout['footer']['signature_len']} B); "
            f"{layout['total_len']} B in all")


def main(argv):
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = argv[0]
    os.makedirs(out, exist_ok=True)
    # The SDK logs its own traceback before raising on a broken message.
    logging.getLogger("aws_encryption_sdk").addHandler(logging.NullHandler())
    client = das.esdk_client()
    manifest = {"data_key_hex": DATA_KEY.hex(), "cluster_id": CLUSTER_ID, "files": {}}
    readme = []

    def write(name, data):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)

    def good(name, plaintext, frame_length=das.FRAME_LENGTH, what="", json_of=None):
        message = das.seal(plaintext, DATA_KEY, frame_length=frame_length, client=client)
        if decrypt(message) != plaintext:
            raise SystemExit(f"{name}: the SDK does not give the plaintext back")
        layout = das.esdk_layout(message)
        write(f"{name}.esdk", message)
        write(f"{name}.plain", plaintext)
        entry = {"plaintext": f"{name}.plain", "frames": len(layout["frames"]), "layout": layout}
        lines = [f"{name}.esdk  ->  decrypts to {name}.plain ({len(plaintext)} B). {what}",
                 f"    {describe_layout(layout)}"]
        if json_of is not None:
            write(f"{name}.json", json.dumps(json_of, indent=1).encode() + b"\n")
            entry["json"] = f"{name}.json"
            lines.append(f"    {name}.plain gunzipped = {name}.json (re-indented; the plaintext JSON is compact).")
        manifest["files"][f"{name}.esdk"] = entry
        readme.extend(lines)
        return message, layout

    def bad(name, message, error, what):
        try:
            decrypt(message)
        except Exception as e:  # noqa: BLE001 - the point
            sdk_error = f"{type(e).__module__}.{type(e).__name__}"
        else:
            raise SystemExit(f"{name}: the SDK decrypted a broken message")
        write(f"{name}.esdk", message)
        manifest["files"][f"{name}.esdk"] = {"error": error, "python_sdk_raises": sdk_error}
        readme.append(f"{name}.esdk  ->  ERROR ({error}). {what} The Python SDK raises {sdk_error}.")

    write("data_key.hex", DATA_KEY.hex().encode() + b"\n")
    events, maker = sample_events()
    batch = {"type": das.RECORD_TYPE, "clusterId": CLUSTER_ID, "instanceId": INSTANCE_ID,
             "databaseActivityEventList": events}
    batch_msg, batch_layout = good(
        "batch", gz(events), json_of=batch,
        what="A DAS batch as the stand-in makes it: CONNECT, CREATE TABLE, INSERT with paramList, SELECT, "
             "a failed SELECT (exitCode 42P01), ALTER ROLE with the password redacted, DISCONNECT.")
    write("batch.record.json", das.kinesis_record(
        batch_msg, b"placeholder: not a KMS blob; the data key is data_key.hex") + b"\n")
    readme.append("batch.record.json  ->  the Kinesis record the stand-in would put for batch.esdk "
                  "(databaseActivityEvents = base64 of batch.esdk); its `key` is a placeholder, not a KMS "
                  "CiphertextBlob: use data_key.hex.")
    beat = [maker.heartbeat()]
    beat[0]["logTime"] = "2024-05-24 10:00:06.000000+00"
    good("heartbeat", gz(beat), json_of={**batch, "databaseActivityEventList": beat},
         what="A batch of one heartbeat event, as the stand-in puts when idle.")
    good("empty", b"", what="Empty plaintext: the body is one final frame with content length 0.")
    extra = 30
    while len(gz(sample_events(extra_statements=extra)[0])) < das.FRAME_LENGTH + 600:
        extra += 5
    big = gz(sample_events(extra_statements=extra)[0])
    good("multiframe", big,
         what=f"A DAS batch (the batch.esdk session plus {extra} filler SELECTs; gunzip multiframe.plain to see "
              "it) "
              "larger than the 4096-byte frame length: one full frame and a shorter final one.")
    good("exact_frames", bytes(range(256)) * 8, frame_length=1024,
         what="Plaintext (bytes 0..255, 8 times) exactly 2 x the frame length 1024 (not gzip; not a DAS batch).")

    h = batch_layout
    bad("tampered_header", das.flip(batch_msg, 4 + 7),
        "header authentication fails",
        "batch.esdk with one bit flipped in the message id (offset 11), inside the authenticated header.")
    frame = h["frames"][0]["content"]
    bad("tampered_frame", das.flip(batch_msg, frame["offset"] + frame["len"] // 2),
        "frame authentication (AES-GCM tag) fails",
        f"batch.esdk with one bit flipped in the ciphertext of frame 1 (offset "
        f"{frame['offset'] + frame['len'] // 2}).")
    sig = h["footer"]["offset"] + 2 + h["footer"]["signature_len"] // 2
    bad("tampered_footer", das.flip(batch_msg, sig),
        "signature verification fails",
        f"batch.esdk with one bit flipped in the middle of the ECDSA P-384 footer signature (offset {sig}); "
        "header and frames are intact, so a streaming decoder may already have released the plaintext.")
    bad("truncated", batch_msg[: h["footer"]["offset"]],
        "message ends before the footer",
        "batch.esdk without its footer (the signature is missing).")

    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    with open(os.path.join(out, "README.txt"), "w") as f:
        f.write(README_HEAD.format(key=DATA_KEY.hex(), cluster=CLUSTER_ID))
        f.write("\n".join(readme) + "\n")
    return 0


README_HEAD = """\
Database Activity Streams fixtures (written by testbed/das_fixtures.py; regenerate with
  .venv/bin/python testbed/das_fixtures.py tests/fixtures/das
and every message changes: message ids, IVs and signing keys are random).

Every *.esdk is an AWS Encryption SDK message, format 1 (no key commitment),
algorithm suite 0x0378 (AES_256_GCM_IV12_TAG16_HKDF_SHA384_ECDSA_P384), with one
encrypted data key from the raw AES-256-GCM keyring provider "BC", key name
"DataKey", wrapped with the 32-byte data key in data_key.hex:
  {key}
(In a real record that key is KMS Decrypt of the record's `key` under the
encryption context {{"aws:rds:dbc-id": "<cluster resource id>"}}.) The only
encryption context in the messages is the SDK's own aws-crypto-public-key.
DAS batches are gzip (RFC 1952) of compact JSON {{"type":"DatabaseActivityMonitoringRecord",
"clusterId":"{cluster}","instanceId":...,"databaseActivityEventList":[...]}}.
manifest.json has the same facts machine-readably (offsets included).

"""

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
