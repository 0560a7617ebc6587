"""Instructions per transaction, counted by valgrind's callgrind: the
proxy's own user-space work for one pgbench round trip, split by
component, next to the bare TCP relay (benches/floor/tcp_relay.rs).

Counts, unlike timings, repeat exactly whatever else the machine is doing,
so a change to the hot path shows here as a number that moved. They do
not include the kernel (system calls, TCP), which is most of the CPU time
per transaction on loopback (see docs/PERFORMANCE.md).

Run through benches/callgrind.sh. Each target runs under callgrind; for
each scenario the counters are zeroed, pgbench runs WARM transactions on
one connection, the counters are dumped, zeroed again, pgbench runs
WARM + N transactions, and dumped. The difference divided by N is the
cost of one transaction with the login taken out.
"""

import argparse
import pathlib
import re
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import macro  # noqa: E402  (the bed, login and proxy start-up are shared)

SCENARIOS = {
    "select": (["-S", "-M", "simple"], "select-only, simple protocol"),
    "prepared": (["-S", "-M", "prepared"], "select-only, prepared"),
    "tpcb": (["-M", "simple"], "TPC-B-like (7 statements)"),
    # ~1 MB per transaction (macro.BULK_SQL): counted per MB, over 1/20 of
    # the transactions (valgrind runs AES-GCM 50 times slower).
    "bulk": (["-f", "@BULK@"], "bulk result, per MB"),
}
# Components, matched against callgrind's "file:function" names in order.
GROUPS = [
    ("AES-GCM and hashing (aws-lc)", r"aws-lc|aws_lc"),
    ("TLS records (rustls, tokio-rustls)", r"rustls"),
    ("runtime (tokio)", r"tokio-1\.|tokio-util|tokio::"),
    # valgrind's CPU has no SHA extensions, so this is sha2's portable code;
    # on the real CPU (sha_ni) the audit chain's hashing costs less.
    ("SHA-256 of the audit chain (sha2)", r"sha2"),
    ("PostgreSQL's parser (pg_query)", r"pg_query"),
    ("rds-iam-proxy", r"/src/.*\.rs:rds_iam_proxy|rds_iam_proxy::"),
    ("malloc/free", r"malloc"),
    ("libc (syscall wrappers, memcpy)", r"libc\.so|libm\.so|sysdeps|nptl"),
]
OTHER = "other (Rust std and core)"


def annotate(path):
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", "--auto=no",
                          "--tree=none", str(path)], capture_output=True, text=True, check=True).stdout
    whole = total(path)
    costs = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([ \d.]+%\)\s+(.*)", line)
        if m and "PROGRAM TOTALS" not in line:
            costs[m.group(2)] = costs.get(m.group(2), 0) + int(m.group(1).replace(",", ""))
    # Functions that were running when the counters were zeroed (the
    # thread's entry and its event loop) are listed with the thread's whole
    # cost since then, not their own: leave them out.
    return {k: v for k, v in costs.items() if whole == 0 or v < 0.99 * whole}


def total(path):
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {path}")


def per_transaction(a, b, n):
    """Per-component instructions per transaction between two dumps, each
    a {thread: file} map (callgrind writes one file per thread)."""
    whole, groups = 0.0, {}
    for thread, fb in b.items():
        fa = a.get(thread)
        thread_whole = (total(fb) - (total(fa) if fa else 0)) / n
        whole += thread_whole
        ca, cb = (annotate(fa) if fa else {}), annotate(fb)
        for name in set(ca) | set(cb):
            v = (cb.get(name, 0) - ca.get(name, 0)) / n
            g = next((g for g, rx in GROUPS if re.search(rx, name)), OTHER)
            groups[g] = groups.get(g, 0) + v
    return whole, groups


class Counter(macro.Bench):
    def start_counted(self, name, cmd, env):
        log = self.work / f"{name}.log"
        out = self.work / f"cg.{name}"
        proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--separate-threads=yes",
                                 f"--callgrind-out-file={out}.%p", *cmd],
                                env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        self.procs.append(proc)
        macro.wait_for(log, "listening on", proc, name, deadline=180)
        port = log.read_text().split("listening on ")[1].split()[0].rsplit(":", 1)[1]
        return proc, port

    def dumps(self, name, pid):
        """{trigger: {thread: file}} of the dumps written so far."""
        found = {}
        for f in self.work.glob(f"cg.{name}.{pid}.*-*"):
            m = re.search(r"^desc: Trigger: dump (\S+)", f.read_text(errors="replace"), re.M)
            if m:
                found.setdefault(m.group(1), {})[f.name.rsplit("-", 1)[1]] = f
        return found

    def count(self, name, proc, env, args):
        control = lambda *a: subprocess.run(["callgrind_control", *a, str(proc.pid)], check=True,
                                            capture_output=True)
        self.pgbench_t(env, ["-S", "-c", "1", "-t", "10"])  # the first login: caches, TLS keys
        for sc in args.scenarios:
            warm, n = self.counts(sc)
            pg_args = [str(self.work / "bulk.sql") if x == "@BULK@" else x for x in SCENARIOS[sc][0]]
            for label, t in (("a", warm), ("b", warm + n)):
                control("--zero")
                self.pgbench_t(env, pg_args + ["-c", "1", "-t", str(t)])
                control("--dump", f"{label}-{sc}")
        # callgrind writes a dump asynchronously; wait until all are there.
        want = {f"{l}-{sc}" for sc in args.scenarios for l in "ab"}
        end = time.time() + 60
        while not want <= set(self.dumps(name, proc.pid)) and time.time() < end:
            time.sleep(0.2)
        time.sleep(1)  # one file per thread: let the last ones be written
        proc.terminate()
        proc.wait(timeout=60)
        files = self.dumps(name, proc.pid)
        return {sc: per_transaction(files[f"a-{sc}"], files[f"b-{sc}"], self.per(sc))
                for sc in args.scenarios}

    def counts(self, sc):
        """(warm-up, counted) transactions for a scenario."""
        a = self.args
        if sc == "bulk":
            return max(2, a.warm // 20), max(10, a.transactions // 20)
        return a.warm, a.transactions

    def per(self, sc):
        """What one row counts: a transaction, or for bulk one MB."""
        n = self.counts(sc)[1]
        return n * macro.BULK_BYTES / 1e6 if sc == "bulk" else n

    def pgbench_t(self, env, args):
        full = {**self.clean_env(), **env, "PGUSER": macro.USER, "PGDATABASE": "mylab"}
        out = subprocess.run(["pgbench", "-n", *args], env=full, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"pgbench {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")

    def run(self):
        a = self.args
        self.start_bed()
        i = self.info
        direct = {"PGHOST": "127.0.0.1", "PGPORT": str(i["pg_port"]), "PGSSLMODE": "verify-full",
                  "PGSSLROOTCERT": i["ca_cert"], "PGPASSWORD": self.token()}
        subprocess.run(["pgbench", "-i", "-q", "-s", "1"], check=True, capture_output=True,
                       env={**self.clean_env(), **direct, "PGUSER": macro.USER, "PGDATABASE": "mylab"})
        (self.work / "bulk.sql").write_text(macro.BULK_SQL)
        results = {}
        if "relay" in a.targets:
            proc, port = self.start_counted("relay", [str(macro.RELAY), "127.0.0.1:0", f"127.0.0.1:{i['pg_port']}"],
                                            self.clean_env())
            results["relay"] = self.count("relay", proc, {**direct, "PGPORT": port, "PGPASSWORD": self.token()}, a)
        for name, extra in [("proxy", [])] + a.variant:
            if name not in a.targets:
                continue
            cmd = [str(macro.PROXY), "--upstream", f"{i['endpoint_host']}:5432", "--connect-to",
                   f"127.0.0.1:{i['pg_port']}", "--upstream-ca", i["ca_cert"], "--listen", "127.0.0.1:0",
                   "--state-dir", str(self.work / "proxy-ca"), *extra]
            env = {**self.aws_env(), "RDS_IAM_PROXY_LOG": "warn,rds_iam_proxy::app=info"}
            proc, port = self.start_counted(name, cmd, env)
            penv = {"PGHOST": "127.0.0.1", "PGPORT": port, "PGSSLMODE": "verify-full",
                    "PGSSLROOTCERT": str(self.work / "proxy-ca" / "ca.crt")}
            results[name] = self.count(name, proc, penv, a)
        self.report(results)

    def report(self, results):
        a = self.args
        print(f"\ninstructions per transaction (bulk: per MB) (callgrind, {a.transactions} transactions "
              f"after {a.warm}, bulk 1/20 of that; one connection; user space only)\n")
        cols = [(t, sc) for t in results for sc in a.scenarios]
        print("| component | " + " | ".join(f"{t}: {sc}" for t, sc in cols) + " |")
        print("|---|" + "---|" * len(cols))
        for g in [g for g, _ in GROUPS] + [OTHER]:
            cells = [results[t][sc][1].get(g, 0) for t, sc in cols]
            if any(round(c) for c in cells):
                print(f"| {g} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")
        print("| **total** | " + " | ".join(f"**{results[t][sc][0]:,.0f}**" for t, sc in cols) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transactions", type=int, default=1000, help="N: transactions counted (default 1000)")
    ap.add_argument("--warm", type=int, default=200, help="transactions run before counting (default 200)")
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--targets", nargs="+", default=["relay", "proxy"])
    ap.add_argument("--variant", action="append", default=[],
                    type=lambda s: (s.split("=", 1)[0], s.split("=", 1)[1].split()),
                    help="another proxy target NAME='--flag value ...'")
    ap.add_argument("--keep", action="store_true", help="keep the callgrind dumps (prints where)")
    args = ap.parse_args()
    args.targets += [name for name, _ in args.variant]
    c = Counter(args)
    try:
        c.run()
    finally:
        if args.keep:
            keep = pathlib.Path(f"/tmp/rdsiam-callgrind-{int(time.time())}")
            keep.mkdir()
            for f in c.work.glob("cg.*"):
                f.rename(keep / f.name)
            print(f"callgrind dumps kept in {keep} (callgrind_annotate FILE)")
        c.stop()


if __name__ == "__main__":
    main()
