#!/usr/bin/env python3
"""Reference reader for Aurora Database Activity Streams records.

Does what AWS's documented Python consumer does, with the real libraries
(boto3, aws-encryption-sdk): for each Kinesis record, JSON-decode it, KMS
Decrypt its `key` under the encryption context {"aws:rds:dbc-id": <cluster
resource id>}, decrypt `databaseActivityEvents` with the AWS Encryption SDK
(raw AES-GCM master key, provider "BC", key name "DataKey"), gunzip, and
print every activity event as one JSON line.

Unlike that sample, it reads every shard of the stream (closed parents
before their children) from TRIM_HORIZON until it has caught up, and it
refuses a record whose `type`/`version` it does not know. It is the yardstick
for testbed/das.py: what the emulator puts on the stream must be what the
real SDK decodes.

    das_reference.py --endpoint-url URL --resource-id cluster-XXXX [--region R]
                     [--stream NAME] [--keep-going] [--with-source]

It never talks to AWS itself: --endpoint-url is required (moto in the bed).
Exit status 1 if a record failed (with --keep-going: after the others, each
failure printed as {"error", "error_type", "shard_id", "sequence_number"}).
"""

import argparse
import base64
import json
import logging
import sys
import zlib

KNOWN_VERSIONS = ("1.0", "1.1", "1.2")
CONTEXT_KEY = "aws:rds:dbc-id"


class UnsupportedRecord(ValueError):
    """A record that is JSON but not a DAS record this reader knows."""


def clients(endpoint_url, region):
    import boto3

    session = boto3.session.Session(
        aws_access_key_id="AKIAIOSFODNN7DASREAD0", aws_secret_access_key="das-reference-dummy-secret",
        region_name=region,
    )
    return session.client("kinesis", endpoint_url=endpoint_url), session.client("kms", endpoint_url=endpoint_url)


def master_key(data_key):
    from aws_encryption_sdk.identifiers import EncryptionKeyType, WrappingAlgorithm
    from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
    from aws_encryption_sdk.key_providers.raw import RawMasterKey

    return RawMasterKey(
        provider_id="BC", key_id=b"DataKey",
        wrapping_key=WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=data_key, wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        ),
    )


def decrypt_events(message, data_key):
    """ESDK message -> gunzipped plaintext bytes. Raises the SDK's errors."""
    import aws_encryption_sdk
    from aws_encryption_sdk import CommitmentPolicy

    # As AWS's sample: REQUIRE_ENCRYPT_ALLOW_DECRYPT still decrypts the
    # non-committing (format 1) messages DAS produces.
    client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_ALLOW_DECRYPT)
    plaintext, _header = client.decrypt(source=message, key_provider=master_key(data_key))
    return zlib.decompress(plaintext, zlib.MAX_WBITS + 16)


def decode_record(data, kms, resource_id):
    """One Kinesis record's Data -> the DatabaseActivityMonitoringRecord dict.

    Raises ValueError (not JSON), UnsupportedRecord (unknown type/version),
    botocore ClientError (KMS refuses the key, e.g. wrong encryption context)
    or the Encryption SDK's errors (tampered message).
    """
    outer = json.loads(data)
    if not isinstance(outer, dict) or outer.get("type") != "DatabaseActivityMonitoringRecords":
        raise UnsupportedRecord(f"not a DatabaseActivityMonitoringRecords record: type {outer.get('type')!r}"
                                if isinstance(outer, dict) else "not a JSON object")
    if outer.get("version") not in KNOWN_VERSIONS:
        raise UnsupportedRecord(f"unknown record version {outer.get('version')!r}")
    key = kms.decrypt(CiphertextBlob=base64.b64decode(outer["key"]),
                      EncryptionContext={CONTEXT_KEY: resource_id})["Plaintext"]
    inner = json.loads(decrypt_events(base64.b64decode(outer["databaseActivityEvents"]), key))
    if inner.get("type") != "DatabaseActivityMonitoringRecord":
        raise UnsupportedRecord(f"unexpected payload type {inner.get('type')!r}")
    return inner


def list_shards(kinesis, stream):
    shards, token = [], None
    while True:
        r = kinesis.list_shards(NextToken=token) if token else kinesis.list_shards(StreamName=stream)
        shards += r["Shards"]
        token = r.get("NextToken")
        if not token:
            return shards


def shards_in_order(shards):
    """Parents before their children (so a session's records come in order)."""
    ids = {s["ShardId"] for s in shards}
    done, out, todo = set(), [], list(shards)
    while todo:
        ready = [s for s in todo
                 if all(p not in ids or p in done for p in (s.get("ParentShardId"), s.get("AdjacentParentShardId")))]
        if not ready:  # a cycle cannot happen; do not loop forever if it did
            ready = todo
        for s in ready:
            done.add(s["ShardId"])
            out.append(s)
            todo.remove(s)
    return out


def read_records(kinesis, stream):
    """Every record of every shard from TRIM_HORIZON: yields (shard_id,
    record). A closed shard is read until GetRecords returns no
    NextShardIterator; an open one until it is caught up."""
    for shard in shards_in_order(list_shards(kinesis, stream)):
        it = kinesis.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                        ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            r = kinesis.get_records(ShardIterator=it, Limit=1000)
            for record in r["Records"]:
                yield shard["ShardId"], record
            it = r.get("NextShardIterator")
            if not r["Records"] and r.get("MillisBehindLatest", 0) == 0:
                break


def read_stream(kinesis, kms, stream, resource_id):
    """Yields (shard_id, sequence_number, decoded record or the exception)."""
    for shard_id, record in read_records(kinesis, stream):
        try:
            yield shard_id, record["SequenceNumber"], decode_record(record["Data"], kms, resource_id)
        except Exception as e:  # noqa: BLE001 - handed to the caller
            yield shard_id, record["SequenceNumber"], e


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint-url", required=True, help="Kinesis and KMS endpoint (moto)")
    ap.add_argument("--region", default="eu-west-1")
    ap.add_argument("--resource-id", required=True, help="DbClusterResourceId, cluster-...")
    ap.add_argument("--stream", help="default: aws-rds-das-<resource id>")
    ap.add_argument("--keep-going", action="store_true", help="report a bad record and go on")
    ap.add_argument("--with-source", action="store_true", help="add _shard_id and _sequence_number to each event")
    args = ap.parse_args(argv)
    # The SDK logs a traceback of its own ("Error on closing") before raising
    # on a tampered message; the failure is reported below instead.
    logging.getLogger("aws_encryption_sdk").addHandler(logging.NullHandler())
    kinesis, kms = clients(args.endpoint_url, args.region)
    failed = False
    out = sys.stdout
    for shard_id, seq, result in read_stream(kinesis, kms, args.stream or f"aws-rds-das-{args.resource_id}",
                                             args.resource_id):
        if isinstance(result, Exception):
            failed = True
            if not args.keep_going:
                raise result
            out.write(json.dumps({"error": str(result), "error_type": type(result).__name__,
                                  "shard_id": shard_id, "sequence_number": seq}) + "\n")
            continue
        for event in result["databaseActivityEventList"]:
            if args.with_source:
                event = {**event, "_shard_id": shard_id, "_sequence_number": seq}
            out.write(json.dumps(event) + "\n")
    out.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
