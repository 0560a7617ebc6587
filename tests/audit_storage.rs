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
    let public = keys.join("digest.pub.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        key.to_str().unwrap(),
    ]);
    openssl(&[
        "pkey",
        "-in",
        key.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
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
    let mut proxy = Proxy::builder(bed, &home)
        .arg("--audit-mode", "async")
        .arg("--audit-dir", &dir)
        .arg("--audit-sign-key", format!("kms:{arn}"))
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
    let digests = rds_iam_proxy::audit::digest::digest_files(&dir).unwrap();
    assert!(digests.len() >= 2, "start and stop: {digests:?}");
    // A key that is not the signer's is refused.
    let keys = unique_temp_path("rdsiam-other-key");
    std::fs::create_dir_all(&keys).unwrap();
    let other = keys.join("o.pem");
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        other.to_str().unwrap(),
    ]);
    let other_pub = keys.join("o.pub");
    openssl(&[
        "pkey",
        "-in",
        other.to_str().unwrap(),
        "-pubout",
        "-out",
        other_pub.to_str().unwrap(),
    ]);
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
