"""pgbench side by side: direct TLS to PostgreSQL, through a bare TCP relay
(the floor any proxy pays), through rds-iam-proxy (audit off, async and
sync), and through pgbouncer, on the local test bed, TLS on every hop.

Run through benches/pgbench.sh. Each scenario runs as interleaved rounds
(direct, proxy, pgbouncer, ...) in one invocation; the table reports medians,
the ratio to direct, and the CPU time the proxy (or pgbouncer) spent per
transaction, read from /proc/PID/stat around each run: on a two-core machine
pgbench and PostgreSQL already fill the cores, so that CPU time is what
decides the ratio and is steadier than TPS.

Targets: direct; relay (benches/floor/tcp_relay.rs: copies bytes between two TCP
connections and nothing else, the client's TLS passes through to
PostgreSQL, so its CPU per transaction is the kernel and runtime cost of
the two extra loopback hops); proxy (defaults: password guard on, audit
off); proxy-audit-async and proxy-audit-sync (--audit-mode, records into
the run's directory); pgbouncer.

Environment: DURATION (seconds per run, default 15), ROUNDS (default 3),
SCENARIOS (space-separated subset), TARGETS (subset of the targets above,
plus any extra proxy variants added with --variant NAME=ARGS).
"""

import argparse
import hashlib
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
PROXY = REPO / "target" / "release" / "rds-iam-proxy"
RELAY = REPO / "target" / "release" / "examples" / "tcp-relay"
TARGETS = ["direct", "relay", "proxy", "proxy-audit-async", "proxy-audit-sync", "pgbouncer"]
USER = "bench"
TICK = os.sysconf("SC_CLK_TCK")

SCENARIOS = {
    # name: (pgbench arguments, description)
    "select8": (["-S", "-M", "simple", "-c", "8", "-j", "2"], "select-only, simple protocol, 8 clients"),
    "prepared8": (["-S", "-M", "prepared", "-c", "8", "-j", "2"], "select-only, prepared, 8 clients"),
    "select1": (["-S", "-M", "simple", "-c", "1", "-j", "1"], "select-only, 1 client"),
    "tpcb8": (["-M", "simple", "-c", "8", "-j", "2"], "TPC-B-like, 8 clients"),
    "connect4": (["-S", "-C", "-c", "4", "-j", "2"], "new connection per transaction, 4 clients"),
    "bulk4": (["-f", "@BULK@", "-c", "4", "-j", "2"], "bulk result (~1 MB per transaction), 4 clients"),
}
BULK_SQL = "select repeat('x', 1000) from generate_series(1, 1000);\n"
BULK_BYTES = 1000 * (1000 + 11)  # DataRow: 1 + 4 + 2 + 4 + 1000 bytes


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def cpu_seconds(pid):
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def wait_for(path, needle, proc, what, deadline=30):
    end = time.time() + deadline
    while needle not in path.read_text():
        if proc.poll() is not None or time.time() > end:
            sys.exit(f"{what} did not start:\n{path.read_text()}")
        time.sleep(0.05)


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="rdsiam-bench-"))
        os.chmod(self.work, 0o755)
        self.procs = []

    def start_bed(self):
        self.bed = subprocess.Popen(
            [sys.executable, str(REPO / "testbed" / "bed.py"), "run"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.info = json.loads(self.bed.stdout.readline())
        i = self.info
        admin = (f"host=127.0.0.1 port={i['pg_port']} sslmode=verify-full sslrootcert={i['ca_cert']} "
                 f"user={i['master_user']} dbname={i['database']}")
        env = {**self.clean_env(), "PGPASSWORD": i["master_password"]}
        subprocess.run(["psql", admin, "-X", "-q", "-c",
                        f"CREATE USER {USER} WITH LOGIN; GRANT rds_iam TO {USER}; "
                        f"GRANT ALL ON SCHEMA public TO {USER};"],
                       env=env, check=True)

    def clean_env(self):
        return {k: v for k, v in os.environ.items() if not k.startswith(("PG", "AWS_", "RDS_IAM_PROXY_"))}

    def aws_env(self):
        i = self.info
        home = self.work / "home"
        if not home.exists():
            cache = post(i["sso_url"] + "/_bed/login",
                         {"user": USER, "permission_set": "DatabaseAdmin", "access_token_ttl": 8 * 3600})
            (home / ".aws" / "sso" / "cache").mkdir(parents=True)
            (home / ".aws" / "config").write_text(
                f"[profile bench]\nsso_session = bench\nsso_account_id = {i['account_id']}\n"
                f"sso_role_name = DatabaseAdmin\nregion = {i['region']}\n\n[sso-session bench]\n"
                f"sso_start_url = {i['start_url']}\nsso_region = {i['region']}\n"
                "sso_registration_scopes = sso:account:access\n")
            name = hashlib.sha1(b"bench").hexdigest()
            (home / ".aws" / "sso" / "cache" / f"{name}.json").write_text(json.dumps(cache))
        return {**self.clean_env(), "HOME": str(home), "AWS_PROFILE": "bench", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_ENDPOINT_URL": i["moto_url"], "AWS_ENDPOINT_URL_STS": i["moto_url"],
                "AWS_ENDPOINT_URL_SSO": i["sso_url"], "AWS_ENDPOINT_URL_SSO_OIDC": i["sso_url"]}

    def token(self):
        i = self.info
        out = subprocess.run([str(PROXY), "token", "--upstream", f"{i['endpoint_host']}:5432"],
                             env=self.aws_env(), capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def start_proxy(self, name, extra):
        i = self.info
        log = self.work / f"{name}.log"
        proc = subprocess.Popen(
            [str(self.args.binary.get(name, PROXY)), "--upstream", f"{i['endpoint_host']}:5432", "--connect-to", f"127.0.0.1:{i['pg_port']}",
             "--upstream-ca", i["ca_cert"], "--listen", "127.0.0.1:0", "--state-dir", str(self.work / "proxy-ca"),
             *extra],
            env={**self.aws_env(), "RDS_IAM_PROXY_LOG": "warn,rds_iam_proxy::app=info"},
            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        self.procs.append(proc)
        wait_for(log, "listening on", proc, name)
        port = int(log.read_text().split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        return proc, {"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGSSLMODE": "verify-full",
                      "PGSSLROOTCERT": str(self.work / "proxy-ca" / "ca.crt")}

    def start_relay(self):
        log = self.work / "relay.log"
        proc = subprocess.Popen([str(RELAY), "127.0.0.1:0", f"127.0.0.1:{self.info['pg_port']}"],
                                stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        self.procs.append(proc)
        wait_for(log, "listening on", proc, "relay")
        return proc.pid, log.read_text().split("listening on ")[1].split()[0].rsplit(":", 1)[1]

    def start_pgbouncer(self, token):
        if shutil.which("pgbouncer") is None and not pathlib.Path("/usr/sbin/pgbouncer").exists():
            sys.exit("pgbouncer is not installed (apt-get install pgbouncer)")
        i = self.info
        d = self.work / "pgbouncer"
        d.mkdir()
        for src, dst in [(i["server_cert"], "server.crt"), (i["server_key"], "server.key"), (i["ca_cert"], "ca.crt")]:
            shutil.copy(src, d / dst)
        (d / "users.txt").write_text(f'"{USER}" "{token}"\n')
        port = free_port()
        (d / "pgbouncer.ini").write_text(
            f"[databases]\nmylab = host=127.0.0.1 port={i['pg_port']} dbname=mylab user={USER}\n\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {d}/users.txt\npool_mode = session\n"
            # A pooler reuses server connections; 0 makes every client
            # connection a fresh server login, comparable with the proxy.
            "server_lifetime = 0\nmax_client_conn = 200\ndefault_pool_size = 50\n"
            f"client_tls_sslmode = require\nclient_tls_cert_file = {d}/server.crt\nclient_tls_key_file = {d}/server.key\n"
            f"server_tls_sslmode = verify-full\nserver_tls_ca_file = {d}/ca.crt\n"
            f"logfile = {d}/pgbouncer.log\nlog_connections = 0\nlog_disconnections = 0\n")
        (d / "pgbouncer.log").touch()
        subprocess.run(["chown", "-R", "postgres", str(d)], check=True)
        os.chmod(d / "server.key", 0o600)
        exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        proc = subprocess.Popen(["runuser", "-u", "postgres", "--", exe, str(d / "pgbouncer.ini")],
                                stdout=subprocess.DEVNULL, stderr=open(d / "pgbouncer.log", "a"))
        self.procs.append(proc)
        wait_for(d / "pgbouncer.log", "process up", proc, "pgbouncer")
        # runuser forks: the CPU to measure is pgbouncer's own process.
        pid = int(subprocess.run(["pgrep", "-n", "-f", str(d / "pgbouncer.ini")], capture_output=True,
                                 text=True, check=True).stdout.split()[-1])
        return pid, {"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGSSLMODE": "verify-full",
                     "PGSSLROOTCERT": str(d / "ca.crt")}

    def pgbench(self, env, args, duration):
        full = {**self.clean_env(), **env, "PGUSER": USER, "PGDATABASE": "mylab"}
        out = subprocess.run(["pgbench", "-n", "-T", str(duration), *args], env=full, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"pgbench {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        tps = float(re.search(r"^tps = ([\d.]+)", out.stdout, re.M).group(1))
        lat = float(re.search(r"^latency average = ([\d.]+) ms", out.stdout, re.M).group(1))
        txns = int(re.search(r"number of transactions actually processed: (\d+)", out.stdout).group(1))
        return tps, lat, txns

    def run(self):
        a = self.args
        print(f"machine: {os.cpu_count()} cores, {cpu_model()}; load before: {load()}", flush=True)
        self.start_bed()
        i = self.info
        for cmd in a.setup:
            subprocess.run(cmd, shell=True, check=True, env={**os.environ, "MOTO_URL": i["moto_url"]})
        token = self.token()
        direct = {"PGHOST": "127.0.0.1", "PGPORT": str(i["pg_port"]), "PGSSLMODE": "verify-full",
                  "PGSSLROOTCERT": i["ca_cert"], "PGPASSWORD": token}
        env = {**self.clean_env(), **direct, "PGUSER": USER, "PGDATABASE": "mylab"}
        subprocess.run(["pgbench", "-i", "-q", "-s", str(a.scale)], env=env, check=True, capture_output=True)
        (self.work / "bulk.sql").write_text(BULK_SQL)
        os.chmod(self.work / "bulk.sql", 0o644)

        targets = {"direct": (None, direct)}
        if "relay" in a.targets:
            pid, port = self.start_relay()
            targets["relay"] = (pid, {**direct, "PGPORT": port})
        audit = [(f"proxy-audit-{m}", ["--audit-mode", m, "--audit-dir", str(self.work / f"audit-{m}")])
                 for m in ("async", "sync")]
        for name, extra in [("proxy", [])] + audit + a.variant:
            if name in a.targets:
                proc, penv = self.start_proxy(name, extra)
                targets[name] = (proc.pid, penv)
        if "pgbouncer" in a.targets:
            targets["pgbouncer"] = self.start_pgbouncer(token)
        # Table order: as asked for, direct first.
        targets = {k: targets[k] for k in ["direct"] + a.targets if k in targets}

        results = {}
        for rnd in range(a.rounds):
            for sc in a.scenarios:
                args, _ = SCENARIOS[sc]
                args = [str(self.work / "bulk.sql") if x == "@BULK@" else x for x in args]
                for name, (pid, tenv) in targets.items():
                    tenv = dict(tenv)
                    if name in ("direct", "relay"):
                        tenv["PGPASSWORD"] = self.token()  # a fresh IAM token for each run
                    elif name == "pgbouncer":
                        tenv["PGPASSWORD"] = ""
                    before = cpu_seconds(pid) if pid else 0
                    tps, lat, txns = self.pgbench(tenv, args, a.duration)
                    cpu = (cpu_seconds(pid) - before) if pid else None
                    results.setdefault((sc, name), []).append((tps, lat, cpu / txns * 1e6 if cpu is not None else None))
                    print(f"  round {rnd + 1} {sc:9} {name:10} tps {tps:9.1f}  lat {lat:7.3f} ms"
                          + (f"  cpu {cpu / txns * 1e6:7.1f} us/txn" if cpu is not None else ""), flush=True)
        self.report(results, targets)
        for cmd in a.after:
            subprocess.run(cmd, shell=True, check=True,
                           env={**self.clean_env(), "PATH": os.environ["PATH"], "MOTO_URL": i["moto_url"]})
        for name in targets:
            if name in ("proxy-audit-async", "proxy-audit-sync"):
                d = self.work / f"audit-{name.rsplit('-', 1)[1]}"
                records = sum(1 for f in d.glob("*.jsonl") for _ in f.open())
                verify = subprocess.run([str(PROXY), "audit", "verify", str(d)], capture_output=True, text=True)
                print(f"{name}: {records} records; audit verify: {(verify.stdout + verify.stderr).strip()}")

    def report(self, results, targets):
        print(f"\nload after: {load()}\n")
        print(f"| scenario | target | TPS (median) | latency ms | ratio to direct | proxy/pooler CPU per txn | MB/s |")
        print("|---|---|---|---|---|---|---|")
        for sc in self.args.scenarios:
            base = statistics.median(r[0] for r in results[(sc, "direct")])
            for name in targets:
                rs = results[(sc, name)]
                tps = statistics.median(r[0] for r in rs)
                lat = statistics.median(r[1] for r in rs)
                cpus = [r[2] for r in rs if r[2] is not None]
                cpu = f"{statistics.median(cpus):.1f} us" if cpus else ""
                if sc == "bulk4" and cpus:
                    cpu = f"{statistics.median(cpus) / (BULK_BYTES / 1e6) / 1000:.2f} ms/MB"
                mbs = f"{tps * BULK_BYTES / 1e6:.0f}" if sc == "bulk4" else ""
                print(f"| {SCENARIOS[sc][1]} | {name} | {tps:.0f} | {lat:.2f} | {tps / base:.2f} | {cpu} | {mbs} |")

    def stop(self):
        for p in self.procs:
            p.terminate()
        subprocess.run(["pkill", "-f", str(self.work / "pgbouncer" / "pgbouncer.ini")], check=False)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if hasattr(self, "bed"):
            self.bed.stdin.close()
            self.bed.wait(timeout=60)
        shutil.rmtree(self.work, ignore_errors=True)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model():
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def load():
    return pathlib.Path("/proc/loadavg").read_text().split()[:3]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=int(os.environ.get("DURATION", 15)))
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS", 3)))
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--scenarios", nargs="+", default=os.environ.get("SCENARIOS", " ".join(SCENARIOS)).split(),
                    choices=list(SCENARIOS))
    ap.add_argument("--targets", nargs="+", default=os.environ.get("TARGETS", " ".join(TARGETS)).split())
    ap.add_argument("--variant", action="append", default=[], type=lambda s: (s.split("=", 1)[0], s.split("=", 1)[1].split()),
                    help="an extra proxy target NAME='--flag value ...' (e.g. proxy-audit-sync='--audit-mode sync ...')")
    ap.add_argument("--setup", action="append", default=[],
                    help="a shell command run once the bed is up, with MOTO_URL set (e.g. to create an S3 bucket)")
    ap.add_argument("--after", action="append", default=[],
                    help="a shell command run after the report, before the bed stops, with MOTO_URL set")
    ap.add_argument("--binary", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                    help="run a proxy target from another build NAME=PATH (e.g. --variant old='' "
                         "--binary old=/tmp/rds-iam-proxy-before, to compare two builds in one run)")
    args = ap.parse_args()
    args.binary = dict(args.binary)
    args.targets = [t for t in args.targets if t != "direct"] + [name for name, _ in args.variant]
    unknown = set(args.targets) - set(TARGETS) - {name for name, _ in args.variant}
    if unknown:
        ap.error(f"unknown targets {sorted(unknown)}; known: {TARGETS}")
    for name, path in args.binary.items():
        if not name.startswith("proxy") and name not in {n for n, _ in args.variant}:
            ap.error(f"--binary {name}=...: {name} is not a proxy target or a --variant")
        if not os.access(path, os.X_OK):
            ap.error(f"--binary {name}={path}: not an executable file")
    b = Bench(args)
    try:
        b.run()
    finally:
        b.stop()


if __name__ == "__main__":
    main()
