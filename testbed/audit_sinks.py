"""The far side of audit shipping, for tests/audit_storage.rs: creates the
S3 bucket (Object Lock on) and the Kinesis stream in moto, reads back what
the proxy shipped, tries to delete a locked object, and asks DuckDB "who ran
what" over the S3 layout. Talks to moto only (--endpoint); prints JSON.

    audit_sinks.py --endpoint URL create-bucket BUCKET
    audit_sinks.py --endpoint URL create-stream STREAM
    audit_sinks.py --endpoint URL dump BUCKET PREFIX STREAM OUT_DIR
    audit_sinks.py --endpoint URL delete-locked BUCKET KEY
    audit_sinks.py duckdb DIR
"""
import argparse
import base64
import json
import os
import sys

import boto3
import botocore


def client(kind, endpoint):
    return boto3.client(
        kind,
        region_name="eu-west-1",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def create_bucket(s3, bucket):
    s3.create_bucket(
        Bucket=bucket,
        ObjectLockEnabledForBucket=True,
        CreateBucketConfiguration={"LocationConstraint": "eu-west-1"},
    )
    return {"bucket": bucket}


def create_stream(kinesis, stream):
    kinesis.create_stream(StreamName=stream, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(StreamName=stream)
    return {"stream": stream}


def dump(s3, kinesis, bucket, prefix, stream, out):
    """Every object (bytes under OUT/KEY, versions counted, lock read) and
    every Kinesis record (data as text, in order)."""
    objects = {}
    paginator = s3.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []):
            key = v["Key"]
            entry = objects.setdefault(key, {"versions": 0})
            entry["versions"] += 1
            if v["IsLatest"]:
                body = s3.get_object(Bucket=bucket, Key=key, VersionId=v["VersionId"])
                path = os.path.join(out, key)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(body["Body"].read())
                entry["path"] = path
                entry["version_id"] = v["VersionId"]
                entry["lock_mode"] = body.get("ObjectLockMode")
                entry["retain_until"] = str(body.get("ObjectLockRetainUntilDate"))
    records = []
    if stream:
        for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
            it = kinesis.get_shard_iterator(
                StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
            while it:
                r = kinesis.get_records(ShardIterator=it, Limit=10000)
                records.extend(x["Data"].decode() for x in r["Records"])
                if not r["Records"]:
                    break
                it = r.get("NextShardIterator")
    return {"objects": objects, "records": records}


def delete_locked(s3, bucket, key):
    versions = s3.list_object_versions(Bucket=bucket, Prefix=key)["Versions"]
    try:
        s3.delete_object(Bucket=bucket, Key=key, VersionId=versions[0]["VersionId"])
        return {"deleted": True}
    except botocore.exceptions.ClientError as e:
        return {"deleted": False, "error": e.response["Error"]["Code"]}


def who_ran_what(root):
    import duckdb

    files = os.path.join(root, "**", "audit-*.jsonl")
    con = duckdb.connect()
    rows = con.execute(
        f"""
        with r as (
            select * from read_json('{files}', format = 'newline_delimited',
                                    hive_partitioning = true, union_by_name = true,
                                    columns = {{'type': 'VARCHAR', 'time': 'VARCHAR', 'conn': 'BIGINT',
                                               'person': 'VARCHAR', 'db_user': 'VARCHAR',
                                               'text': 'VARCHAR'}})
        )
        select s.person, s.db_user, r.instance, r.text
        from r join r as s
          on s.type = 'session_start' and r.type = 'statement'
         and s.conn = r.conn and s.instance = r.instance
        order by r.time
        """
    ).fetchall()
    return {"rows": [list(x) for x in rows]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint")
    ap.add_argument("command")
    ap.add_argument("args", nargs="*")
    a = ap.parse_args()
    if a.command == "duckdb":
        print(json.dumps(who_ran_what(*a.args)))
        return
    s3, kinesis = client("s3", a.endpoint), client("kinesis", a.endpoint)
    result = {
        "create-bucket": lambda b: create_bucket(s3, b),
        "create-stream": lambda s: create_stream(kinesis, s),
        "dump": lambda b, p, s, o: dump(s3, kinesis, b, p, s, o),
        "delete-locked": lambda b, k: delete_locked(s3, b, k),
    }[a.command](*a.args)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
