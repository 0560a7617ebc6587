"""The whole flow on the local test bed, for someone without an AWS account.

Starts the bed (PostgreSQL with RDS-style IAM login, moto STS, the IAM
Identity Center stand-in), signs "arianna" in through the SSO stand-in as
`aws sso login` would, starts rds-iam-proxy with that SSO profile, and runs
psql through it with no password. Run through scripts/demo.sh.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parent.parent
PROXY = REPO / "target" / "debug" / "rds-iam-proxy"
USER = "arianna"


def say(text):
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def sha1_hex(s):
    import hashlib

    return hashlib.sha1(s.encode()).hexdigest()


def main():
    interactive = "--no-shell" not in sys.argv and sys.stdin.isatty()
    say("starting the test bed (PostgreSQL + PAM verifier + moto + Identity Center stand-in)")
    bed = subprocess.Popen(
        [sys.executable, str(REPO / "testbed" / "bed.py"), "run"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    proxy = None
    home = pathlib.Path(tempfile.mkdtemp(prefix="rdsiam-demo-home-"))
    try:
        info = json.loads(bed.stdout.readline())
        print(f"    Aurora stand-in: {info['endpoint_host']} (PostgreSQL on 127.0.0.1:{info['pg_port']})")

        say(f"creating the IAM database user {USER!r} (CREATE USER ... ; GRANT rds_iam ...)")
        admin = (
            f"host={info['endpoint_host']} hostaddr=127.0.0.1 port={info['pg_port']} sslmode=verify-full "
            f"sslrootcert={info['ca_cert']} user={info['master_user']} dbname={info['database']}"
        )
        subprocess.run(
            ["psql", admin, "-X", "-q", "-c", f"CREATE USER {USER} WITH LOGIN; GRANT rds_iam TO {USER};"],
            env={**os.environ, "PGPASSWORD": info["master_password"]},
            check=True,
        )

        say(f"signing {USER} in to IAM Identity Center (what `aws sso login --profile dev` leaves behind)")
        cache = post(info["sso_url"] + "/_bed/login", {"user": USER, "permission_set": "DatabaseAdmin"})
        (home / ".aws" / "sso" / "cache").mkdir(parents=True)
        (home / ".aws" / "config").write_text(
            "[profile dev]\nsso_session = dev\n"
            f"sso_account_id = {info['account_id']}\nsso_role_name = DatabaseAdmin\nregion = {info['region']}\n\n"
            f"[sso-session dev]\nsso_start_url = {info['start_url']}\nsso_region = {info['region']}\n"
            "sso_registration_scopes = sso:account:access\n"
        )
        (home / ".aws" / "sso" / "cache" / f"{sha1_hex('dev')}.json").write_text(json.dumps(cache))
        print(f"    ~/.aws/config and the SSO token cache written under {home}")

        say("starting rds-iam-proxy --profile dev")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PG", "RDS_IAM_PROXY_"))}
        env.update(
            HOME=str(home),
            AWS_EC2_METADATA_DISABLED="true",
            # Every AWS endpoint goes to the bed: this demo never talks to AWS.
            AWS_ENDPOINT_URL=info["moto_url"],
            AWS_ENDPOINT_URL_STS=info["moto_url"],
            AWS_ENDPOINT_URL_SSO=info["sso_url"],
            AWS_ENDPOINT_URL_SSO_OIDC=info["sso_url"],
        )
        state = home / "proxy-state"
        cmd = [
            str(PROXY),
            "--profile", "dev",
            "--upstream", f"{info['endpoint_host']}:5432",
            "--connect-to", f"127.0.0.1:{info['pg_port']}",
            "--upstream-ca", info["ca_cert"],
            # A free port, read back from the log: the demo never collides.
            "--listen", "127.0.0.1:0",
            "--state-dir", str(state),
        ]
        print("    " + " ".join(cmd[:5]) + " \\\n      " + " ".join(cmd[5:]))
        log = open(home / "proxy.log", "w")
        proxy = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while "listening on" not in (home / "proxy.log").read_text():
            if proxy.poll() is not None or time.time() > deadline:
                sys.exit("the proxy did not start:\n" + (home / "proxy.log").read_text())
            time.sleep(0.05)
        text = (home / "proxy.log").read_text()
        print("    " + "\n    ".join(text.strip().splitlines()[-3:]))
        port = int(text.split("listening on ")[1].split()[0].rsplit(":", 1)[1])

        conn = f"host=localhost port={port} user={USER} dbname=mylab sslmode=verify-full sslrootcert={state / 'ca.crt'}"
        penv = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        say(f'psql "{conn}"   (no password)')
        subprocess.run(
            ["psql", conn, "-X", "-c",
             "select current_user, inet_server_port() as aurora_port, ssl as upstream_tls, version "
             "from pg_stat_ssl where pid = pg_backend_pid()"],
            env=penv,
            check=True,
        )

        say("asking for someone else's database user is refused before any token is signed")
        r = subprocess.run(["psql", conn.replace(f"user={USER}", "user=postgres"), "-X", "-c", "select 1"],
                           env=penv, capture_output=True, text=True)
        print("    " + r.stderr.strip().replace("\n", "\n    "))

        if interactive:
            say("an interactive psql through the proxy; \\q to leave")
            subprocess.run(["psql", conn], env=penv)
        say("done; the proxy log is below")
        print((home / "proxy.log").read_text())
    finally:
        if proxy:
            proxy.terminate()
            proxy.wait()
        bed.stdin.close()
        bed.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
