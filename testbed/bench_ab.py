"""A/B throughput of two rds-iam-proxy binaries on the local test bed.

Starts the bed, signs one user in through the SSO stand-in, starts both
proxies (plaintext loopback listeners, TLS upstream), and runs pgbench
select-only against each in turn, ROUNDS times, alternating so drift in
the machine's load hits both alike. Prints TPS per run and the medians.

    .venv/bin/python testbed/bench_ab.py A_BINARY B_BINARY [SECONDS] [ROUNDS] [CLIENTS]
"""

import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parent.parent
USER = "benchab"


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def start_proxy(binary, info, home, env, name):
    log_path = home / f"{name}.log"
    log = open(log_path, "w")
    cmd = [binary, "--profile", "dev", "--upstream", f"{info['endpoint_host']}:5432",
           "--connect-to", f"127.0.0.1:{info['pg_port']}", "--upstream-ca", info["ca_cert"],
           "--listen", "127.0.0.1:0", "--state-dir", str(home / f"{name}-state")]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while "listening on" not in log_path.read_text():
        if proc.poll() is not None or time.time() > deadline:
            sys.exit(f"{name} did not start:\n" + log_path.read_text())
        time.sleep(0.05)
    port = int(log_path.read_text().split("listening on ")[1].split()[0].rsplit(":", 1)[1])
    return proc, port


def pgbench(port, seconds, clients, penv, extra=()):
    conn = ["-h", "127.0.0.1", "-p", str(port), "-U", USER]
    out = subprocess.run(["pgbench", *conn, *extra, "mylab"], env=penv, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr)
    return out.stdout


def main():
    a, b = sys.argv[1], sys.argv[2]
    seconds = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    clients = int(sys.argv[5]) if len(sys.argv) > 5 else 8
    bed = subprocess.Popen([sys.executable, str(REPO / "testbed" / "bed.py"), "run"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    home = pathlib.Path(tempfile.mkdtemp(prefix="rdsiam-bench-home-"))
    procs = []
    try:
        info = json.loads(bed.stdout.readline())
        admin = (f"host={info['endpoint_host']} hostaddr=127.0.0.1 port={info['pg_port']} sslmode=verify-full "
                 f"sslrootcert={info['ca_cert']} user={info['master_user']} dbname={info['database']}")
        subprocess.run(["psql", admin, "-X", "-q", "-c",
                        f"CREATE USER {USER} WITH LOGIN; GRANT rds_iam TO {USER}; GRANT ALL ON SCHEMA public TO {USER};"],
                       env={**os.environ, "PGPASSWORD": info["master_password"]}, check=True)
        cache = post(info["sso_url"] + "/_bed/login", {"user": USER, "permission_set": "DatabaseAdmin"})
        (home / ".aws" / "sso" / "cache").mkdir(parents=True)
        (home / ".aws" / "config").write_text(
            "[profile dev]\nsso_session = dev\n"
            f"sso_account_id = {info['account_id']}\nsso_role_name = DatabaseAdmin\nregion = {info['region']}\n\n"
            f"[sso-session dev]\nsso_start_url = {info['start_url']}\nsso_region = {info['region']}\n"
            "sso_registration_scopes = sso:account:access\n")
        import hashlib
        (home / ".aws" / "sso" / "cache" / f"{hashlib.sha1(b'dev').hexdigest()}.json").write_text(json.dumps(cache))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PG", "RDS_IAM_PROXY_"))}
        env.update(HOME=str(home), AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL=info["moto_url"],
                   AWS_ENDPOINT_URL_STS=info["moto_url"], AWS_ENDPOINT_URL_SSO=info["sso_url"],
                   AWS_ENDPOINT_URL_SSO_OIDC=info["sso_url"], RDS_IAM_PROXY_LOG="info")
        penv = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        penv["PGSSLMODE"] = "disable"
        pa, port_a = start_proxy(a, info, home, env, "A")
        pb, port_b = start_proxy(b, info, home, env, "B")
        procs = [pa, pb]
        pgbench(port_a, 0, 1, penv, ["-i", "-s", "1", "-q"])
        tps = {"A": [], "B": []}
        for r in range(rounds):
            for name, port in (("A", port_a), ("B", port_b)):
                out = pgbench(port, seconds, clients, penv, ["-S", "-c", str(clients), "-j", "2", "-T", str(seconds)])
                m = re.search(r"tps = ([0-9.]+) \(without initial", out)
                tps[name].append(float(m.group(1)))
                print(f"round {r + 1} {name}: {float(m.group(1)):.0f} tps", flush=True)
        for name, binary in (("A", a), ("B", b)):
            print(f"{name} {binary}: median {statistics.median(tps[name]):.0f} tps over {rounds} x {seconds}s, {clients} clients")
        print(f"B/A = {statistics.median(tps['B']) / statistics.median(tps['A']):.3f}")
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        bed.stdin.close()
        bed.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
