"""Real client libraries through the proxy, over the TLS client leg.

psycopg 3 (with the libpq 18 that psycopg-binary bundles; async and sync)
and asyncpg (its own protocol implementation, no libpq), against the bed's
PostgreSQL through rds-iam-proxy with `sslmode=verify-full` to the proxy's
local CA, with the defaults and with synchronous audit. What broke for real
users: bulk results in TLS records larger than libpq reads (sessions that
hung for good), cancel over TLS reported as failed, pipelined executemany
with large random rows, COPY both ways, large and server-side cursors, a
slow reader.

Every client call runs under a deadline: a hang fails the test that hung,
with its name, and never stalls the suite. Run as root (the bed installs a
PAM service); scripts/test.sh runs it with the debug build.
"""

import asyncio
import contextlib
import os
import random
import ssl
import string
import sys
import tempfile
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import stack  # noqa: E402  (testbed/stack.py)

asyncpg = pytest.importorskip("asyncpg")
psycopg = pytest.importorskip("psycopg")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the test bed needs root to install a PAM service in /etc/pam.d"
)

# Far above what any of these takes through the proxy (seconds), far below
# what a hung session would take.
DEADLINE_S = 60


@pytest.fixture(scope="module")
def bed():
    b = stack.Bed()
    yield b
    b.close()


@pytest.fixture(scope="module", params=["defaults", "sync-audit"])
def st(request, bed):
    args = []
    audit_dir = None
    if request.param == "sync-audit":
        audit_dir = tempfile.mkdtemp(prefix="rdsiam-clients-audit-")
        args = ["--audit-mode", "sync", "--audit-dir", audit_dir]
    with stack.Stack(proxy_args=args, bed=bed) as s:
        s.audit_dir = audit_dir
        yield s


def deadline(work, what):
    """Runs `work` (a coroutine, on a fresh event loop, or a function) on a
    daemon thread; a hang fails with `what` in the message. A thread that
    hangs is left behind: cancelling a hung client may itself wait for
    good (psycopg answers a cancellation with a cancel request and waits
    for the server's answer), so nothing here waits for it."""
    outcome = {}

    def body():
        try:
            outcome["value"] = asyncio.run(work) if asyncio.iscoroutine(work) else work()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            outcome["error"] = e

    thread = threading.Thread(target=body, name=what, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    if thread.is_alive():
        pytest.fail(f"hung: {what} did not finish within {DEADLINE_S}s through the proxy")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def random_text(rng, n):
    return "".join(rng.choices(string.ascii_letters + string.digits + " ,;'\"\\\t", k=n))


def random_rows(seed, count, min_len, max_len):
    rng = random.Random(seed)
    return [(i, random_text(rng, rng.randint(min_len, max_len)), rng.randbytes(rng.randint(0, max_len)))
            for i in range(count)]


def table(name):
    return f"{name}_{os.getpid()}_{time.monotonic_ns()}"


# -- psycopg (libpq 18) -----------------------------------------------------------


def test_psycopg_pipelined_executemany_with_large_random_rows(st):
    rows = random_rows(1, 400, 500, 30_000)
    t = table("exm")

    async def run():
        async with await psycopg.AsyncConnection.connect(st.proxy_dsn()) as conn:
            await conn.execute(f"create table {t} (id int primary key, txt text, bin bytea)")
            async with conn.cursor() as cur:
                # psycopg runs executemany in pipeline mode: many Bind/Execute
                # before a Sync, results streaming back while it writes.
                await cur.executemany(f"insert into {t} values (%s, %s, %s)", rows)
                await cur.executemany(f"select id, txt, bin from {t} where id = %s", [(r[0],) for r in rows],
                                      returning=True)
                back = []
                while True:
                    back.extend(await cur.fetchall())
                    if not cur.nextset():
                        break
            await conn.execute(f"drop table {t}")
            return back

    back = deadline(run(), "psycopg executemany")
    assert [(i, s, bytes(b)) for i, s, b in back] == rows


def test_psycopg_fresh_sessions_with_pipelined_inserts_then_copy_to(st):
    """The shape of psycopg's own leak tests that hung through the proxy
    (sessions waiting for good on the end of a COPY TO): before the fix a
    run of these hung within a few dozen sessions."""
    t = table("fresh")

    async def one(seed):
        rng = random.Random(seed)
        rows = [(i, "".join(rng.choices("abc\\\t\n'", k=rng.randint(0, 4000))),
                 str(rng.random()) * rng.randint(1, 200), rng.randbytes(rng.randint(0, 2000)))
                for i in range(20)]
        async with await psycopg.AsyncConnection.connect(st.proxy_dsn()) as conn:
            async with conn.cursor() as cur:
                await cur.execute(f"drop table if exists {t}")
                await cur.execute(f"create table {t} (id int, a text, b text, c bytea)")
                await cur.executemany(f"insert into {t} values (%s, %s, %s, %s)", rows)
                got = 0
                async with cur.copy(f"copy (select * from {t} order by id) to stdout") as copy:
                    while data := await copy.read():
                        got += bytes(data).count(b"\n")
                return got

    async def run():
        return [await one(seed) for seed in range(60)]

    assert deadline(run(), "psycopg fresh sessions with COPY TO") == [20] * 60


def test_psycopg_sync_executemany_and_bulk_select(st):
    rows = random_rows(2, 300, 1_000, 20_000)
    t = table("sync")

    def run():
        with psycopg.connect(st.proxy_dsn()) as conn:
            conn.execute(f"create table {t} (id int primary key, txt text, bin bytea)")
            with conn.cursor() as cur:
                cur.executemany(f"insert into {t} values (%s, %s, %s)", rows)
                cur.execute(f"select id, txt, bin from {t} order by id")
                back = cur.fetchall()
            conn.execute(f"drop table {t}")
            return back

    back = deadline(run, "sync psycopg executemany")
    assert [(i, s, bytes(b)) for i, s, b in back] == rows


def test_psycopg_copy_from_and_to_with_many_rows(st):
    rows = random_rows(3, 20_000, 0, 600)
    t = table("copy")

    async def run():
        async with await psycopg.AsyncConnection.connect(st.proxy_dsn()) as conn:
            await conn.execute(f"create table {t} (id int, txt text, bin bytea)")
            async with conn.cursor() as cur:
                async with cur.copy(f"copy {t} from stdin") as copy:
                    for r in rows:
                        await copy.write_row(r)
                out = []
                async with cur.copy(f"copy (select id, txt, bin from {t} order by id) to stdout") as copy:
                    copy.set_types(["int4", "text", "bytea"])
                    async for r in copy.rows():
                        out.append(r)
                # Raw blocks too: what psql's \copy and most drivers read.
                raw = bytearray()
                async with cur.copy(f"copy (select * from {t} order by id) to stdout (format binary)") as copy:
                    async for block in copy:
                        raw += block
            await conn.execute(f"drop table {t}")
            return out, raw

    out, raw = deadline(run(), "psycopg COPY")
    assert [(i, s, bytes(b)) for i, s, b in out] == rows
    assert raw.startswith(b"PGCOPY\n\xff\r\n\0") and len(raw) > sum(len(r[1]) + len(r[2]) for r in rows)


def test_psycopg_large_and_server_side_cursors(st):
    async def run():
        async with await psycopg.AsyncConnection.connect(st.proxy_dsn()) as conn:
            cur = conn.cursor()
            # One result of ~8 MB in a single response.
            await cur.execute("select i, repeat(md5(i::text), 8) from generate_series(1, 30000) i")
            big = await cur.fetchall()
            async with conn.transaction():
                named = conn.cursor("scroll_me")
                named.itersize = 777
                await named.execute("select i, md5(i::text) from generate_series(1, 50000) i")
                streamed = [r async for r in named]
                await named.close()
            return big, streamed

    big, streamed = deadline(run(), "psycopg cursors")
    assert len(big) == 30000 and big[-1][0] == 30000 and len(big[-1][1]) == 256
    assert [r[0] for r in streamed] == list(range(1, 50001))


def test_psycopg_cancel_over_tls_succeeds(st):
    """libpq 17+ sends the CancelRequest over TLS, like the session."""

    async def run():
        async with await psycopg.AsyncConnection.connect(st.proxy_dsn(), autocommit=True) as conn:
            started = time.monotonic()
            query = asyncio.create_task(conn.execute("select pg_sleep(30)"))
            await asyncio.sleep(0.5)
            # Raises OperationalError when the cancel connection ends badly
            # ("SSL error: unexpected eof while reading").
            await conn.cancel_safe(timeout=10)
            with pytest.raises(psycopg.errors.QueryCanceled):
                await query
            assert time.monotonic() - started < 20
            # The session goes on.
            cur = await conn.execute("select 42")
            return (await cur.fetchone())[0]

    assert deadline(run(), "psycopg cancel") == 42


def test_psycopg_slow_reader_gets_every_row(st):
    """A client that reads far slower than the server writes: the proxy's
    writes wait on a full socket buffer, and nothing is lost or stuck."""
    n = 40_000

    def run():
        got = total = 0
        with psycopg.connect(st.proxy_dsn()) as conn, conn.cursor() as cur:
            query = "select i, repeat('x', 200) from generate_series(1, %s) i"
            for i, (k, text) in enumerate(cur.stream(query, (n,))):
                got += 1
                total += k
                assert len(text) == 200
                if i % 2_000 == 0:
                    time.sleep(0.05)
        return got, total

    assert deadline(run, "slow reader") == (n, n * (n + 1) // 2)


# -- asyncpg (no libpq) -----------------------------------------------------------


def asyncpg_connect(st):
    ctx = ssl.create_default_context(cafile=str(st.state / "ca.crt"))
    return asyncpg.connect(host="localhost", port=st.port, user=st.user, database=st.database, ssl=ctx)


def test_asyncpg_executemany_copy_and_cursor(st):
    rows = random_rows(4, 2_000, 0, 20_000)
    t = table("apg")

    async def run():
        conn = await asyncpg_connect(st)
        try:
            await conn.execute(f"create table {t} (id int primary key, txt text, bin bytea)")
            await conn.executemany(f"insert into {t} values ($1, $2, $3)", rows[:1000])
            await conn.copy_records_to_table(t, records=rows[1000:])
            fetched = await conn.fetch(f"select id, txt, bin from {t} order by id")
            async with conn.transaction():
                streamed = [tuple(r) async for r in conn.cursor(f"select id, txt, bin from {t} order by id",
                                                                 prefetch=50)]
            buf = bytearray()

            async def sink(chunk):
                buf.extend(chunk)

            await conn.copy_from_query(f"select * from {t} order by id", output=sink, format="csv")
            await conn.execute(f"drop table {t}")
            return [tuple(r) for r in fetched], streamed, buf
        finally:
            await conn.close()

    fetched, streamed, csv = deadline(run(), "asyncpg bulk")
    assert fetched == rows
    assert streamed == rows
    assert csv.count(b"\n") >= len(rows)


def test_asyncpg_timeout_cancels_the_query_over_tls(st):
    """asyncpg cancels a timed-out query with a CancelRequest on a new TLS
    connection; the session is usable right after."""

    async def run():
        conn = await asyncpg_connect(st)
        try:
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.execute("select pg_sleep(30)", timeout=0.5)
            value = await conn.fetchval("select 7")
            return value, time.monotonic() - started
        finally:
            await conn.close()

    value, took = deadline(run(), "asyncpg cancel")
    assert value == 7
    assert took < 20, f"the cancel did not reach the server: the next query waited {took:.1f}s"
