"""Gateway mode measured on the local test bed, side by side in one run:
login latency direct / through the local proxy / through a local proxy and
a gateway, the gateway's CPU per verified login (so the logins per second
one gateway core sustains), and the forwarding cost per round trip through
the gateway against the local proxy's.

    sudo benches/gateway.sh                      # 3 rounds of 10 s
    sudo DURATION=5 ROUNDS=1 benches/gateway.sh  # a quick look

Scenarios (pgbench, select-only, TLS verify-full on every hop):
  connect1   new connection per transaction, 1 client: login latency
  connect8   new connection per transaction, 8 clients: login throughput;
             the gateway's CPU per login is what one core of it pays to
             read a proof, ask STS (the bed's verifying stand-in) and log
             in with the person's token
  select8    one connection per client, 8 clients: forwarding per round trip

Targets: direct (PostgreSQL itself, a fresh IAM token per run), local (the
person's own rds-iam-proxy to PostgreSQL), via-gateway (the person's own
rds-iam-proxy --gateway, to an rds-iam-proxy gateway holding no AWS
credentials, to PostgreSQL). CPU columns are read from /proc around each
run: `local cpu` is the person's proxy, `gateway cpu` the gateway.
"""

import os
import pathlib
import statistics
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import macro  # noqa: E402  (benches/macro.py: the bed, pgbench, CPU readings)

GATEWAY_ID = "bench-gateway"
SCENARIOS = {
    "connect1": (["-S", "-C", "-c", "1", "-j", "1"], "new connection per transaction, 1 client"),
    "connect8": (["-S", "-C", "-c", "8", "-j", "2"], "new connection per transaction, 8 clients"),
    "select8": (["-S", "-M", "simple", "-c", "8", "-j", "2"], "select-only, 8 clients, one connection each"),
}


class GatewayBench(macro.Bench):
    def start(self, name, args, env):
        log = self.work / f"{name}.log"
        proc = subprocess.Popen([str(macro.PROXY), *args], env={**env, "RDS_IAM_PROXY_LOG": "warn,rds_iam_proxy::app=info"},
                                stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        self.procs.append(proc)
        macro.wait_for(log, "listening on", proc, name)
        port = int(log.read_text().split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        return proc, port

    def run(self):
        a = self.args
        print(f"machine: {os.cpu_count()} cores, {macro.cpu_model()}; load before: {macro.load()}", flush=True)
        self.start_bed()
        i = self.info
        env = {**self.clean_env(), "PGPASSWORD": self.token(), "PGHOST": "127.0.0.1", "PGPORT": str(i["pg_port"]),
               "PGSSLMODE": "verify-full", "PGSSLROOTCERT": i["ca_cert"], "PGUSER": macro.USER, "PGDATABASE": "mylab"}
        subprocess.run(["pgbench", "-i", "-q", "-s", "10"], env=env, check=True, capture_output=True)
        upstream = f"{i['endpoint_host']}:5432"
        local, local_port = self.start(
            "local",
            ["--upstream", upstream, "--connect-to", f"127.0.0.1:{i['pg_port']}", "--upstream-ca", i["ca_cert"],
             "--listen", "127.0.0.1:0", "--state-dir", str(self.work / "local-ca")],
            self.aws_env())
        # The gateway has no AWS credentials at all.
        gateway, gw_port = self.start(
            "gateway",
            ["gateway", "--upstream", upstream, "--connect-to", f"127.0.0.1:{i['pg_port']}", "--upstream-ca",
             i["ca_cert"], "--listen", "127.0.0.1:0", "--state-dir", str(self.work / "gateway-ca"),
             "--gateway-id", GATEWAY_ID, "--trust-account", i["account_id"], "--sts-endpoint-url",
             i["sts_verify_url"], "--max-sessions-per-person", "1000", "--max-connections", "1000"],
            self.clean_env())
        via, via_port = self.start(
            "via-gateway",
            ["--upstream", upstream, "--gateway", f"127.0.0.1:{gw_port}", "--gateway-id", GATEWAY_ID,
             "--gateway-ca", str(self.work / "gateway-ca" / "ca.crt"), "--listen", "127.0.0.1:0",
             "--state-dir", str(self.work / "via-ca")],
            self.aws_env())
        targets = {
            "direct": (None, None, {"PGHOST": "127.0.0.1", "PGPORT": str(i["pg_port"]), "PGSSLMODE": "verify-full",
                                    "PGSSLROOTCERT": i["ca_cert"]}),
            "local": (local.pid, None, {"PGHOST": "127.0.0.1", "PGPORT": str(local_port), "PGSSLMODE": "verify-full",
                                        "PGSSLROOTCERT": str(self.work / "local-ca" / "ca.crt")}),
            "via-gateway": (via.pid, gateway.pid, {"PGHOST": "127.0.0.1", "PGPORT": str(via_port),
                                                   "PGSSLMODE": "verify-full",
                                                   "PGSSLROOTCERT": str(self.work / "via-ca" / "ca.crt")}),
        }
        results = {}
        for rnd in range(a.rounds):
            for sc in a.scenarios:
                args, _ = SCENARIOS[sc]
                for name, (local_pid, gw_pid, tenv) in targets.items():
                    tenv = dict(tenv)
                    if name == "direct":
                        tenv["PGPASSWORD"] = self.token()
                    before = [macro.cpu_seconds(p) if p else 0 for p in (local_pid, gw_pid)]
                    tps, lat, txns = self.pgbench(tenv, args, a.duration)
                    after = [macro.cpu_seconds(p) if p else 0 for p in (local_pid, gw_pid)]
                    cpu = [(x - y) / txns * 1e6 if p else None for x, y, p in zip(after, before, (local_pid, gw_pid))]
                    results.setdefault((sc, name), []).append((tps, lat, *cpu))
                    print(f"  round {rnd + 1} {sc:9} {name:12} tps {tps:9.1f}  lat {lat:7.3f} ms"
                          + "".join(f"  {w} {c:7.1f} us/txn" for w, c in zip(("local", "gateway"), cpu) if c is not None),
                          flush=True)
        print(f"\nload after: {macro.load()}\n")
        print("| scenario | target | TPS (median) | latency ms | ratio to direct | local proxy CPU per txn | gateway CPU per txn |")
        print("|---|---|---|---|---|---|---|")
        for sc in a.scenarios:
            base = statistics.median(r[0] for r in results[(sc, "direct")])
            for name in targets:
                rs = results[(sc, name)]
                tps = statistics.median(r[0] for r in rs)
                lat = statistics.median(r[1] for r in rs)
                cols = []
                for k in (2, 3):
                    v = [r[k] for r in rs if r[k] is not None]
                    cols.append(f"{statistics.median(v):.0f} us" if v else "")
                print(f"| {sc} | {name} | {tps:.1f} | {lat:.2f} | {tps / base:.2f} | {cols[0]} | {cols[1]} |")
        logins = [r[3] for r in results.get(("connect8", "via-gateway"), []) if r[3]]
        if logins:
            per_login = statistics.median(logins)
            print(f"\ngateway CPU per verified login (connect8): {per_login:.0f} us, "
                  f"so one gateway core sustains about {1e6 / per_login:.0f} verified logins per second")
        refused = subprocess.run(["grep", "-c", "connection refused", str(self.work / "gateway.log")],
                                 capture_output=True, text=True).stdout.strip()
        print(f"gateway refusals during the run: {refused or 0}")


def main():
    p = macro.argparse.ArgumentParser(description=__doc__, formatter_class=macro.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    a = p.parse_args()
    a.duration = int(os.environ.get("DURATION", "10"))
    a.rounds = int(os.environ.get("ROUNDS", "3"))
    a.binary = {}
    b = GatewayBench(a)
    try:
        b.run()
    finally:
        b.stop()


if __name__ == "__main__":
    main()
