"""Scale benchmarks for rds-iam-proxy on the local test bed, TLS on every hop.

Run through benches/scale.sh (needs root). Two scenarios, each against a fresh
proxy (release build):

  idle  SESSIONS (default 1000) concurrent sessions opened by an asyncio client
        speaking the PostgreSQL protocol over TLS; each must reach
        ReadyForQuery. Reports the proxy's VmRSS before, with all sessions
        idle, and after one query on each, as KiB per session (target: at most
        64 KiB), and the proxy's open file descriptors.
  slow  One client pulls COPY_MB (default 2048) MB of COPY ... TO STDOUT while
        reading slowly (64 KiB, then 1 ms asleep). The proxy's VmRSS is sampled
        every 0.5 s; reports min/median/max. It must stay flat: the proxy may
        only hold what its buffers hold while the slow client applies
        backpressure. Every byte is counted and checked.

The proxy is started as benches/macro.py starts it (bed, SSO login through the
bed's control API, an AWS home with a profile).
"""

import argparse
import asyncio
import json
import os
import pathlib
import resource
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import macro  # noqa: E402 - the bench helpers live next to this file

USER = macro.USER
DATABASE = "mylab"
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
ROW = 1000  # bytes of 'x' per COPY row; each row is ROW + 1 bytes with its newline


def status_kib(pid, field):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def rss(pid):
    return status_kib(pid, "VmRSS")


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid):
    for line in pathlib.Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3]  # soft limit
    return "?"


def startup_message():
    body = struct.pack("!i", 196608) + f"user\0{USER}\0database\0{DATABASE}\0\0".encode()
    return struct.pack("!i", len(body) + 4) + body


def error_text(payload):
    fields = dict((f[:1], f[1:].decode(errors="replace")) for f in payload.split(b"\0") if f)
    return f"{fields.get(b'S', '?')} {fields.get(b'C', '?')}: {fields.get(b'M', '?')}"


# --------------------------------------------------------------------------
# idle sessions (asyncio)


class AsyncSession:
    def __init__(self, port, ctx):
        self.port, self.ctx = port, ctx

    async def message(self):
        head = await self.reader.readexactly(5)
        length = struct.unpack("!i", head[1:])[0]
        if not 4 <= length <= 1 << 20:
            raise RuntimeError(f"bad message length {length}")
        return head[:1], await self.reader.readexactly(length - 4)

    async def until_ready(self):
        while True:
            kind, payload = await self.message()
            if kind == b"E":
                raise RuntimeError(error_text(payload))
            if kind == b"R" and struct.unpack("!i", payload[:4])[0] != 0:
                raise RuntimeError(f"the proxy asked for authentication {struct.unpack('!i', payload[:4])[0]}")
            if kind == b"Z":
                return

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(SSL_REQUEST)
        await self.writer.drain()
        if await self.reader.readexactly(1) != b"S":
            raise RuntimeError("the proxy refused TLS")
        await self.writer.start_tls(self.ctx, server_hostname="127.0.0.1")
        self.writer.write(startup_message())
        await self.writer.drain()
        await self.until_ready()

    async def query(self, sql):
        body = sql.encode() + b"\0"
        self.writer.write(b"Q" + struct.pack("!i", len(body) + 4) + body)
        await self.writer.drain()
        rows = []
        while True:
            kind, payload = await self.message()
            if kind == b"E":
                raise RuntimeError(error_text(payload))
            if kind == b"D":
                rows.append(payload)
            if kind == b"Z":
                return rows

    async def close(self):
        self.writer.write(b"X" + struct.pack("!i", 4))
        await self.writer.drain()
        self.writer.close()
        await self.writer.wait_closed()


async def idle_sessions(pid, port, ctx, n, parallel, rounds):
    out = {"sessions": n}
    await asyncio.sleep(0)
    out["rss_before_kib"] = rss(pid)
    out["fds_before"] = open_fds(pid)
    sessions = [AsyncSession(port, ctx) for _ in range(n)]
    gate = asyncio.Semaphore(parallel)

    async def open_one(s):
        async with gate:
            await s.open()

    t0 = time.monotonic()
    results = await asyncio.gather(*(open_one(s) for s in sessions), return_exceptions=True)
    out["open_secs"] = time.monotonic() - t0
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n} sessions did not reach ReadyForQuery; first: {failed[0]!r}")
    await asyncio.sleep(1)  # let the proxy's tasks settle after the last login
    out["rss_idle_kib"] = rss(pid)
    out["fds_idle"] = open_fds(pid)
    # One query on every session, all of them at once in flight.
    rows = await asyncio.gather(*(s.query("select pg_backend_pid()") for s in sessions))
    backends = {r[0] for r in rows if len(r) == 1}
    if len(backends) != n:
        raise RuntimeError(f"expected {n} distinct backends, got {len(backends)}")
    await asyncio.sleep(1)
    out["rss_after_query_kib"] = rss(pid)
    await asyncio.gather(*(s.close() for s in sessions))
    deadline = time.monotonic() + 30
    while open_fds(pid) > out["fds_before"] + 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    out["rss_after_close_kib"] = rss(pid)
    out["fds_after_close"] = open_fds(pid)
    # A second round tells memory the allocator keeps for reuse from a leak:
    # it should need (almost) nothing beyond the first round's peak.
    out["rss_later_rounds_kib"] = []
    for _ in range(rounds - 1):
        again = [AsyncSession(port, ctx) for _ in range(n)]
        await asyncio.gather(*(open_one(s) for s in again))
        await asyncio.sleep(1)
        out["rss_later_rounds_kib"].append(rss(pid))
        await asyncio.gather(*(s.close() for s in again))
    out["kib_per_idle_session"] = (out["rss_idle_kib"] - out["rss_before_kib"]) / n
    out["kib_per_session_after_query"] = (out["rss_after_query_kib"] - out["rss_before_kib"]) / n
    out["fds_per_session"] = (out["fds_idle"] - out["fds_before"]) / n
    return out


# --------------------------------------------------------------------------
# slow reader (blocking socket; a sampler thread reads the proxy's RSS)


def slow_copy(pid, port, ctx, rows, chunk, pause):
    samples = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append(rss(pid))
            done.wait(0.5)

    raw = socket.create_connection(("127.0.0.1", port))
    raw.sendall(SSL_REQUEST)
    if raw.recv(1) != b"S":
        raise RuntimeError("the proxy refused TLS")
    sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    sock.sendall(startup_message())
    buf = bytearray()
    ready = False
    while not ready:  # login: small messages, read normally
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("the proxy closed during login")
        buf += data
        while len(buf) >= 5:
            length = struct.unpack_from("!i", buf, 1)[0]
            if len(buf) < 1 + length:
                break
            kind, payload = buf[:1], bytes(buf[5:1 + length])
            del buf[:1 + length]
            if kind == b"E":
                raise RuntimeError(error_text(payload))
            if kind == b"Z":
                ready = True
    rss_before = rss(pid)
    sql = f"COPY (select repeat('x', {ROW}) from generate_series(1, {rows})) TO STDOUT".encode() + b"\0"
    sock.sendall(b"Q" + struct.pack("!i", len(sql) + 4) + sql)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    copy_bytes = wire_bytes = copy_msgs = 0
    tag = None
    error = None
    finished = False
    view = bytearray(65536)
    pending = bytearray()
    since_pause = 0
    while not finished:
        # One recv yields at most one TLS record (16 KiB): pause after every
        # `chunk` bytes, parse after every recv so the end never blocks.
        n = sock.recv_into(view)
        if n == 0:
            raise RuntimeError("the proxy closed the connection mid-result")
        wire_bytes += n
        pending += memoryview(view)[:n]
        pos, end = 0, len(pending)
        while end - pos >= 5:
            length = struct.unpack_from("!i", pending, pos + 1)[0]
            if end - pos < 1 + length:
                break
            kind = pending[pos]
            if kind == 0x64:  # 'd' CopyData
                copy_bytes += length - 4
                copy_msgs += 1
            elif kind == 0x43:  # 'C' CommandComplete
                tag = bytes(pending[pos + 5:pos + length]).rstrip(b"\0").decode()
            elif kind == 0x45:  # 'E'
                error = error_text(bytes(pending[pos + 5:pos + 1 + length]))
            elif kind == 0x5A:  # 'Z' ReadyForQuery
                finished = True
            pos += 1 + length
        del pending[:pos]
        since_pause += n
        if since_pause >= chunk:
            since_pause = 0
            time.sleep(pause)
    secs = time.monotonic() - t0
    done.set()
    sampler.join()
    sock.sendall(b"X" + struct.pack("!i", 4))
    sock.close()
    if error:
        raise RuntimeError(f"COPY failed: {error}")
    want = rows * (ROW + 1)
    if copy_bytes != want or copy_msgs != rows or tag != f"COPY {rows}":
        raise RuntimeError(f"incomplete result: {copy_bytes} of {want} bytes, {copy_msgs} of {rows} rows, tag {tag!r}")
    return {"rows": rows, "copy_bytes": copy_bytes, "wire_bytes": wire_bytes, "secs": secs,
            "mb_per_s": copy_bytes / secs / 1e6, "rss_before_kib": rss_before, "samples": len(samples),
            "rss_min_kib": min(samples), "rss_median_kib": statistics.median(samples), "rss_max_kib": max(samples),
            "rss_after_kib": rss(pid)}


# --------------------------------------------------------------------------


class ScaleBench(macro.Bench):
    def start_bed(self):
        # macro.Bench.start_bed with PostgreSQL's max_connections raised.
        self.bed = subprocess.Popen(
            [sys.executable, str(macro.REPO / "testbed" / "bed.py"), "run",
             "--max-connections", str(self.args.sessions + 100)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = self.bed.stdout.readline()
        if not line:
            sys.exit("the test bed did not start (see its messages above)")
        self.info = i = json.loads(line)
        admin = (f"host=127.0.0.1 port={i['pg_port']} sslmode=verify-full sslrootcert={i['ca_cert']} "
                 f"user={i['master_user']} dbname={i['database']}")
        env = {**self.clean_env(), "PGPASSWORD": i["master_password"]}
        subprocess.run(["psql", admin, "-X", "-q", "-c", f"CREATE USER {USER} WITH LOGIN; GRANT rds_iam TO {USER};"],
                       env=env, check=True)

    def client_tls(self):
        # Verifies the proxy's certificate (made in its state dir) and the name 127.0.0.1.
        return ssl.create_default_context(cafile=str(self.work / "proxy-ca" / "ca.crt"))

    def run(self):
        a = self.args
        print(f"machine: {os.cpu_count()} cores, {macro.cpu_model()}; load before: {' '.join(macro.load())}",
              flush=True)
        self.start_bed()
        proxy_args = ["--max-connections", str(a.sessions + 100)]
        results = {}
        if "idle" in a.scenarios:
            proc, penv = self.start_proxy("proxy-idle", proxy_args)
            print(f"idle: proxy pid {proc.pid}, open files limit {nofile_limit(proc.pid)}; "
                  f"opening {a.sessions} sessions ({a.parallel} logins at a time)", flush=True)
            r = asyncio.run(idle_sessions(proc.pid, int(penv["PGPORT"]), self.client_tls(),
                                          a.sessions, a.parallel, a.idle_rounds))
            r["nofile_soft_limit"] = nofile_limit(proc.pid)
            r["load"] = " ".join(macro.load())
            results["idle"] = r
            print(json.dumps(r), flush=True)
        if "slow" in a.scenarios:
            proc, penv = self.start_proxy("proxy-slow", proxy_args)
            rows = a.copy_mb * 1_000_000 // (ROW + 1)
            print(f"slow: proxy pid {proc.pid}; COPY of {rows} rows ({rows * (ROW + 1) / 1e6:.0f} MB), "
                  f"reading {a.chunk_kib} KiB then sleeping {a.pause_ms} ms", flush=True)
            r = slow_copy(proc.pid, int(penv["PGPORT"]), self.client_tls(), rows, a.chunk_kib * 1024,
                          a.pause_ms / 1000)
            r["load"] = " ".join(macro.load())
            results["slow"] = r
            print(json.dumps(r), flush=True)
        self.report(results)

    def report(self, results):
        print(f"\nload after: {' '.join(macro.load())}\n")
        if "idle" in results:
            r = results["idle"]
            print(f"| idle sessions | proxy RSS before | with all idle | after 1 query each | KiB/session idle "
                  f"| KiB/session after query | fds/session | open files limit | login time |")
            print("|---|---|---|---|---|---|---|---|---|")
            print(f"| {r['sessions']} | {r['rss_before_kib'] / 1024:.1f} MiB | {r['rss_idle_kib'] / 1024:.1f} MiB "
                  f"| {r['rss_after_query_kib'] / 1024:.1f} MiB | {r['kib_per_idle_session']:.1f} "
                  f"| {r['kib_per_session_after_query']:.1f} | {r['fds_per_session']:.2f} | {r['nofile_soft_limit']} "
                  f"| {r['open_secs']:.1f} s |")
            print(f"\nafter closing all: RSS {r['rss_after_close_kib'] / 1024:.1f} MiB, {r['fds_after_close']} fds "
                  f"(before: {r['fds_before']}); RSS with {r['sessions']} sessions open in later rounds: "
                  + ", ".join(f"{k / 1024:.1f} MiB" for k in r["rss_later_rounds_kib"]) + "\n")
        if "slow" in results:
            r = results["slow"]
            print("| slow reader | bytes received | time | MB/s | RSS before | RSS min | median | max | samples |")
            print("|---|---|---|---|---|---|---|---|---|")
            print(f"| {r['rows']} rows | {r['copy_bytes']} | {r['secs']:.1f} s | {r['mb_per_s']:.0f} "
                  f"| {r['rss_before_kib'] / 1024:.1f} MiB | {r['rss_min_kib'] / 1024:.1f} MiB "
                  f"| {r['rss_median_kib'] / 1024:.1f} MiB | {r['rss_max_kib'] / 1024:.1f} MiB | {r['samples']} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", nargs="+", choices=["idle", "slow"], default=["idle", "slow"])
    ap.add_argument("--sessions", type=int, default=int(os.environ.get("SESSIONS", 1000)))
    ap.add_argument("--parallel", type=int, default=32, help="logins in flight at once while opening sessions")
    ap.add_argument("--idle-rounds", type=int, default=3,
                    help="open and close the sessions this many times (later rounds show reuse vs. growth)")
    ap.add_argument("--copy-mb", type=int, default=int(os.environ.get("COPY_MB", 2048)))
    ap.add_argument("--chunk-kib", type=int, default=64)
    ap.add_argument("--pause-ms", type=float, default=1.0)
    args = ap.parse_args()
    # Each session is a socket here; the proxy (our child) holds two per session.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 8192))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 2 * args.sessions + 100:
        sys.exit(f"open files limit {want} is too low for {args.sessions} sessions (ulimit -n)")
    b = ScaleBench(args)
    try:
        b.run()
    finally:
        b.stop()


if __name__ == "__main__":
    main()
