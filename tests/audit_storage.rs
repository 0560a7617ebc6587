//! Audit storage a regulator accepts, end to end: signed digests written
//! by the running proxy (a local key file, and a KMS key in moto), checked
//! offline by `audit verify --public-key`, which catches a rewritten file
//! even when the hash chain was recomputed.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::bed::{repo_root, sso_setup, unique_temp_path};
use support::proxy::{Proxy, run};

fn verify(dir: &Path, key: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
    cmd.args(["audit", "verify"]).arg(dir);
    if let Some(k) = key {
        cmd.arg("--public-key").arg(k);
    }
    let (ok, out, err) = run(&mut cmd);
    (ok, format!("{out}{err}"))
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A P-256 key pair made with openssl, as an operator would: the private
/// key (PKCS#8 PEM) at `key`, its public half at `key` + `.pub`.
fn p256_key_pair(key: &Path) -> PathBuf {
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        key.to_str().unwrap(),
    ]);
    let public = key.with_extension("pub");
    openssl(&[
        "pkey",
        "-in",
        key.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    public
}

/// Rewrites one record's text and recomputes every `prev` after it: the
/// chain verifies, as an attacker with write access would leave it.
fn rewrite_with_chain(dir: &Path, needle: &str, replacement: &str) -> PathBuf {
    let files = rds_iam_proxy::audit::writer::audit_files(dir).unwrap();
    let mut prev: Option<[u8; 32]> = None;
    let mut changed = None;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let mut out = String::new();
        for line in text.lines() {
            let mut line = line.to_owned();
            if line.contains(needle) {
                line = line.replace(needle, replacement);
                changed = Some(f.clone());
            }
            if let Some(h) = prev {
                let at = line.find(",\"prev\":\"").unwrap() + 9;
                line.replace_range(at..at + 64, &rds_iam_proxy::audit::event::hex(&h));
            }
            prev = Some(Sha256::digest(line.as_bytes()).into());
            out.push_str(&line);
            out.push('\n');
        }
        std::fs::write(f, out).unwrap();
    }
    changed.expect("the needle is in the trail")
}

fn run_session(proxy: &Proxy, statements: &[&str]) {
    let mut cmd = proxy.psql("storage", "");
    for s in statements {
        cmd.args(["-c", s]);
    }
    let (ok, out, err) = run(&mut cmd);
    assert!(ok, "{out}{err}");
}

#[test]
fn digests_signed_with_a_key_file_catch_a_rewrite_the_chain_hides() {
    let Some((bed, home)) = sso_setup("digests_key_file", "storage") else {
        return;
    };
    let keys = unique_temp_path("rdsiam-digest-keys");
    std::fs::create_dir_all(&keys).unwrap();
    let key = keys.join("digest.pem");
    let public = p256_key_pair(&key);
    let dir = unique_temp_path("rdsiam-digest-audit");
    let mut proxy = Proxy::builder(bed, &home)
        .arg("--audit-mode", "sync")
        .arg("--audit-dir", &dir)
        .arg("--audit-sign-key", format!("file:{}", key.display()))
        .arg("--audit-digest-interval", "1s")
        .arg("--audit-rotate-age", "2s")
        .start();
    run_session(&proxy, &["select 'before the rotation' as x"]);
    proxy.wait_for_log("audit file opened", Duration::from_secs(20));
    run_session(&proxy, &["select 'the amount was 100' as x", "select 2"]);
    proxy.signal("TERM");
    assert!(
        proxy.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        proxy.log()
    );
    let digests = rds_iam_proxy::audit::digest::digest_files(&dir).unwrap();
    assert!(
        digests.len() >= 3,
        "start, rotation or interval, stop: {digests:?}"
    );

    let (ok, out) = verify(&dir, Some(&public));
    assert!(ok, "{out}");
    assert!(out.contains("digest(s) signed by key"), "{out}");
    // Without the key the chain is checked and the digests are mentioned.
    let (ok, out) = verify(&dir, None);
    assert!(ok && out.contains("not checked"), "{out}");

    // The key the proxy published beside the trail is the same key.
    let published = std::fs::read_to_string(dir.join("digest-public-key.pem")).unwrap();
    assert_eq!(published, std::fs::read_to_string(&public).unwrap());

    // A third party checks a digest with openssl alone.
    let signed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&digests[0]).unwrap()).unwrap();
    std::fs::write(keys.join("body"), signed["body"].as_str().unwrap()).unwrap();
    use base64::Engine as _;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(signed["signature"].as_str().unwrap())
        .unwrap();
    std::fs::write(keys.join("sig"), sig).unwrap();
    openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        public.to_str().unwrap(),
        "-signature",
        keys.join("sig").to_str().unwrap(),
        keys.join("body").to_str().unwrap(),
    ]);

    // A rewrite with the chain recomputed: the chain says nothing, the
    // digests say which file.
    let changed = rewrite_with_chain(&dir, "the amount was 100", "the amount was 900");
    let (ok, out) = verify(&dir, None);
    assert!(ok, "the chain alone cannot see it: {out}");
    let (ok, out) = verify(&dir, Some(&public));
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("{}: its first", changed.display())) && out.contains("rewritten"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&keys);
}

#[test]
fn digests_signed_with_a_kms_key() {
    let Some((bed, home)) = sso_setup("digests_kms", "storage") else {
        return;
    };
    // An ECC_NIST_P256 signing key in moto KMS.
    let python = repo_root().join(".venv/bin/python");
    let script = format!(
        "import boto3\nk = boto3.client('kms', region_name='{}', endpoint_url='{}', aws_access_key_id='x', aws_secret_access_key='x')\n\
         print(k.create_key(KeySpec='ECC_NIST_P256', KeyUsage='SIGN_VERIFY')['KeyMetadata']['Arn'])",
        bed.info.region, bed.info.moto_url
    );
    let out = Command::new(python).args(["-c", &script]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let arn = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let dir = unique_temp_path("rdsiam-digest-kms");
    let role = "arn:aws:iam::111122223333:role/audit-writer";
    let mut proxy = Proxy::builder(bed, &home)
        .arg("--audit-mode", "async")
        .arg("--audit-dir", &dir)
        .arg("--audit-sign-key", format!("kms:{arn}"))
        .arg("--audit-role-arn", role)
        .start();
    run_session(&proxy, &["select 'signed by kms'"]);
    proxy.signal("TERM");
    assert!(
        proxy.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        proxy.log()
    );
    let public = dir.join("digest-public-key.pem");
    // The published key is what KMS holds; the check uses a copy made
    // apart from the trail.
    let copy = unique_temp_path("rdsiam-kms-pub");
    std::fs::copy(&public, &copy).unwrap();
    let (ok, out) = verify(&dir, Some(&copy));
    assert!(ok, "{out}\n{}", proxy.log());
    // KMS was asked as the audit role, assumed by the proxy for the audit.
    let (status, moto) =
        support::bed::http_json(&bed.info.moto_url, "GET", "/moto-api/data.json", None);
    assert_eq!(status, 200);
    let assumed = moto["sts"]["AssumedRole"].to_string();
    assert!(
        assumed.contains("audit-writer/rds-iam-proxy-audit"),
        "no session of the audit role in moto: {assumed}"
    );
    let digests = rds_iam_proxy::audit::digest::digest_files(&dir).unwrap();
    assert!(digests.len() >= 2, "start and stop: {digests:?}");
    // A key that is not the signer's is refused.
    let keys = unique_temp_path("rdsiam-other-key");
    std::fs::create_dir_all(&keys).unwrap();
    let other = keys.join("o.pem");
    let other_pub = p256_key_pair(&other);
    let (ok, out) = verify(&dir, Some(&other_pub));
    assert!(
        !ok && out.contains("does not verify with the given key"),
        "{out}"
    );
    drop(home);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&keys);
    let _ = std::fs::remove_file(&copy);
}

/// testbed/audit_sinks.py: the S3 bucket and Kinesis stream in moto, and
/// what arrived there.
fn sinks(bed: &support::bed::Bed, args: &[&str]) -> serde_json::Value {
    let out = Command::new(repo_root().join(".venv/bin/python"))
        .arg(repo_root().join("testbed/audit_sinks.py"))
        .args(["--endpoint", &bed.info.moto_url])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit_sinks.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn metric(proxy: &Proxy, series: &str) -> f64 {
    let (_, page) = support::proxy::http_get(proxy.admin_addr(), "/metrics");
    support::proxy::metric(&page, series)
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ships_to_s3_under_object_lock_and_to_kinesis_through_an_outage_and_a_kill() {
    let Some((bed, home)) = sso_setup("audit_shipping", "storage") else {
        return;
    };
    let n = std::process::id();
    let bucket = format!("rip-audit-{n}");
    let stream = format!("rip-audit-{n}");
    let dir = unique_temp_path("rdsiam-ship-audit");
    let keys = unique_temp_path("rdsiam-ship-keys");
    std::fs::create_dir_all(&keys).unwrap();
    let key = keys.join("k.pem");
    let public = p256_key_pair(&key);
    let start = || {
        Proxy::builder(bed, &home)
            .arg("--audit-mode", "sync")
            .arg("--audit-dir", &dir)
            .arg("--audit-rotate-age", "1s")
            .arg("--audit-sign-key", format!("file:{}", key.display()))
            .arg("--audit-s3-bucket", &bucket)
            .arg("--audit-s3-prefix", "trail")
            .arg("--audit-s3-lock-mode", "compliance")
            .arg("--audit-s3-retention", "1d")
            .arg("--audit-kinesis-stream", &stream)
            .arg("--audit-instance-id", "bastion-a")
            .arg("--admin-listen", "127.0.0.1:0")
            .start()
    };

    // The sinks do not exist yet: an outage. Records wait on disk.
    let mut proxy = start();
    run_session(&proxy, &["select 'shipped one' as x"]);
    wait_until("a rotation", Duration::from_secs(20), || {
        rds_iam_proxy::audit::writer::audit_files(&dir)
            .unwrap()
            .len()
            >= 2
    });
    wait_until("failed shipping calls", Duration::from_secs(20), || {
        metric(
            &proxy,
            "rds_iam_proxy_audit_ship_failures_total{sink=\"s3\"}",
        ) > 0.0
            && metric(
                &proxy,
                "rds_iam_proxy_audit_ship_failures_total{sink=\"kinesis\"}",
            ) > 0.0
    });
    assert!(
        metric(
            &proxy,
            "rds_iam_proxy_audit_ship_pending_bytes{sink=\"s3\"}"
        ) > 0.0
    );

    // The sinks come up: shipping resumes by itself.
    sinks(bed, &["create-bucket", &bucket]);
    sinks(bed, &["create-stream", &stream]);
    wait_until("the first files in S3", Duration::from_secs(90), || {
        metric(
            &proxy,
            "rds_iam_proxy_audit_shipped_items_total{sink=\"s3\"}",
        ) >= 2.0
            && metric(
                &proxy,
                "rds_iam_proxy_audit_shipped_items_total{sink=\"kinesis\"}",
            ) >= 5.0
    });

    // kill -9 in the middle of it, then a restart on the same directory.
    run_session(&proxy, &["select 'shipped two' as x"]);
    proxy.signal("KILL");
    let _ = proxy.wait_exit(Duration::from_secs(10));
    let mut proxy = start();
    run_session(&proxy, &["select 'shipped three' as x"]);
    proxy.signal("TERM");
    assert!(
        proxy.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        proxy.log()
    );

    // Everything is in S3, byte for byte, once; and every record in Kinesis.
    let out = unique_temp_path("rdsiam-ship-dump");
    let dump = sinks(
        bed,
        &["dump", &bucket, "trail/", &stream, out.to_str().unwrap()],
    );
    let objects = dump["objects"].as_object().unwrap();
    let local: Vec<PathBuf> = rds_iam_proxy::audit::writer::audit_files(&dir)
        .unwrap()
        .into_iter()
        .chain(rds_iam_proxy::audit::digest::digest_files(&dir).unwrap())
        .collect();
    let mut lines = Vec::new();
    for path in &local {
        let name = path.file_name().unwrap().to_str().unwrap();
        let (key, o) = objects
            .iter()
            .find(|(k, _)| k.ends_with(&format!("/{name}")))
            .unwrap_or_else(|| panic!("{name} not shipped: {dump:#}"));
        assert!(key.starts_with("trail/instance=bastion-a/date="), "{key}");
        assert_eq!(o["versions"], 1, "{key} shipped once: {o}");
        assert_eq!(o["lock_mode"], "COMPLIANCE", "{key}: {o}");
        let shipped = std::fs::read(o["path"].as_str().unwrap()).unwrap();
        assert_eq!(shipped, std::fs::read(path).unwrap(), "{key} byte for byte");
        if name.starts_with("audit-") {
            lines.extend(
                String::from_utf8(shipped)
                    .unwrap()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>(),
            );
        }
    }
    assert!(objects.contains_key("trail/instance=bastion-a/digest-public-key.pem"));
    // Each Kinesis record holds whole audit records, one per line.
    let entries = dump["records"].as_array().unwrap();
    assert!(entries.iter().all(|r| r.as_str().unwrap().ends_with('\n')));
    let records: Vec<&str> = entries
        .iter()
        .flat_map(|r| r.as_str().unwrap().lines())
        .collect();
    assert!(entries.len() < records.len(), "records are packed");
    let unique: std::collections::BTreeSet<&str> = records.iter().copied().collect();
    let all: std::collections::BTreeSet<&str> = lines.iter().map(String::as_str).collect();
    assert_eq!(unique, all, "every record in Kinesis, nothing else");
    // At most what kill -9 cut between a send and its note came twice.
    assert!(
        records.len() - unique.len() <= 500,
        "{} repeats",
        records.len() - unique.len()
    );
    // The shipped trail verifies on its own.
    let shipped_dir = out.join("trail/instance=bastion-a");
    let flat = unique_temp_path("rdsiam-ship-flat");
    std::fs::create_dir_all(&flat).unwrap();
    for e in walk(&shipped_dir) {
        std::fs::copy(&e, flat.join(e.file_name().unwrap())).unwrap();
    }
    let (ok, report) = verify(&flat, Some(&public));
    assert!(ok, "{report}");

    // The store refuses to delete a locked object.
    let some_key = objects.keys().find(|k| k.ends_with(".jsonl")).unwrap();
    let refused = sinks(bed, &["delete-locked", &bucket, some_key]);
    assert_eq!(refused["deleted"], false, "{refused}");

    // Who ran what, as one query on an existing engine over the layout.
    let who = sinks(bed, &["duckdb", out.to_str().unwrap()]);
    let rows = who["rows"].as_array().unwrap();
    for text in ["shipped one", "shipped two", "shipped three"] {
        assert!(
            rows.iter().any(|r| r[0] == "storage"
                && r[2] == "bastion-a"
                && r[3].as_str().unwrap().contains(text)),
            "{text}: {who:#}"
        );
    }
    for d in [&dir, &keys, &out, &flat] {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn two_instances_ship_at_once_and_verify_independently() {
    let Some((bed, home)) = sso_setup("audit_fleet", "storage") else {
        return;
    };
    let bucket = format!("rip-fleet-{}", std::process::id());
    sinks(bed, &["create-bucket", &bucket]);
    let keys = unique_temp_path("rdsiam-fleet-keys");
    std::fs::create_dir_all(&keys).unwrap();
    let key = keys.join("k.pem");
    let public = p256_key_pair(&key);
    let start = |id: &str, dir: &Path| {
        Proxy::builder(bed, &home)
            .arg("--audit-mode", "async")
            .arg("--audit-dir", dir)
            .arg("--audit-rotate-age", "1s")
            .arg("--audit-sign-key", format!("file:{}", key.display()))
            .arg("--audit-s3-bucket", &bucket)
            .arg("--audit-instance-id", id)
            .start()
    };
    let dirs = [
        unique_temp_path("rdsiam-fleet-a"),
        unique_temp_path("rdsiam-fleet-b"),
    ];
    let mut a = start("gw-a", &dirs[0]);
    let mut b = start("gw-b", &dirs[1]);
    for round in 0..3 {
        run_session(&a, &[&format!("select 'from a, round {round}'")]);
        run_session(&b, &[&format!("select 'from b, round {round}'")]);
    }
    for p in [&a, &b] {
        p.signal("TERM");
    }
    for p in [&mut a, &mut b] {
        assert!(
            p.wait_exit(Duration::from_secs(60)).success(),
            "{}",
            p.log()
        );
    }
    let out = unique_temp_path("rdsiam-fleet-dump");
    let dump = sinks(bed, &["dump", &bucket, "", "", out.to_str().unwrap()]);
    let keys_shipped: Vec<&String> = dump["objects"].as_object().unwrap().keys().collect();
    // Each instance's copy, from S3, in a directory of its own.
    let mut copies = Vec::new();
    for id in ["gw-a", "gw-b"] {
        assert!(
            keys_shipped
                .iter()
                .any(|k| k.starts_with(&format!("instance={id}/date="))),
            "{id}: {keys_shipped:?}"
        );
        let copy = unique_temp_path(&format!("rdsiam-fleet-copy-{id}"));
        std::fs::create_dir_all(&copy).unwrap();
        for f in walk(&out.join(format!("instance={id}"))) {
            std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
        }
        copies.push(copy);
    }
    let fleet = |dirs: &[PathBuf]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rds-iam-proxy"));
        cmd.args(["audit", "verify"])
            .args(dirs)
            .arg("--public-key")
            .arg(&public);
        let (ok, o, e) = run(&mut cmd);
        (ok, format!("{o}{e}"))
    };
    let (ok, report) = fleet(&copies);
    assert!(ok, "{report}");
    assert_eq!(
        report.matches("digest(s) signed by key").count(),
        2,
        "{report}"
    );
    // One instance's copy rewritten (chain recomputed): that one fails,
    // the other still verifies, and the exit status says so.
    let changed = rewrite_with_chain(&copies[1], "from b, round 1", "from b, round 9");
    let (ok, report) = fleet(&copies);
    assert!(!ok, "{report}");
    assert_eq!(report.matches("FAILED").count(), 1, "{report}");
    assert!(report.contains(&changed.display().to_string()), "{report}");
    for d in dirs.iter().chain(&copies).chain([&out, &keys]) {
        let _ = std::fs::remove_dir_all(d);
    }
}
