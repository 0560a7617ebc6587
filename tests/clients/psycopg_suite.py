"""Run psycopg's own test suite against the test bed, directly and through rds-iam-proxy.

For each target a fresh bed and proxy are started (testbed/stack.py) and
pytest runs the `tests/` directory of a psycopg checkout, with
PSYCOPG_TEST_DSN set to:

    direct            PostgreSQL itself as the IAM user: Stack.direct_dsn() (TLS, a passfile of tokens)
    proxy             the proxy with its defaults: Stack.proxy_dsn() (TLS verify-full to its local CA)
    proxy-sync-audit  the proxy with --audit-mode sync --audit-dir TMP; afterwards the audit
                      files' hash chain is checked with `rds-iam-proxy audit verify`

Tests marked `timing` or `flakey` are left out by default (-m); the output
says which -m expression ran. Each pytest run gets a fresh cache directory
(-o cache_dir=...): psycopg's conftest refuses to start after a crash it
reads from the cache, and the checkout is left untouched.

Outcomes come from pytest's --junitxml. A watchdog follows each run through
a small pytest plugin (written to a temp dir, loaded with -p) that logs every
test's start and result. When no test makes progress for --timeout seconds,
the running test is recorded as `hung`, with the tracebacks faulthandler
dumped shortly before; pytest is stopped (SIGINT, so that it still writes its
junit xml, then SIGKILL) and a new run resumes without the tests already done
and the hung one. A pytest that dies inside a test is handled the same way
(the test is an `error`).

The outcomes of `direct` are compared with those of each proxy target, in
both directions; a test failing (or hanging) on both sides is no difference.
Each difference must match an entry of EXPECTED_DIFFERENCES, which says why
it is expected; a one-sided failure in a test psycopg marks `refcount`
("sometimes flaky") is listed as flaky. Any other difference, and any hang,
makes the script exit 1; each is printed with its failure message.

Usage (as root: the bed needs it), from the repository root:

    sudo RDS_IAM_PROXY_BIN=target/release/rds-iam-proxy .venv/bin/python \\
        tests/clients/psycopg_suite.py --checkout /path/to/psycopg \\
        --python /path/to/venv/bin/python [--targets direct,proxy] [-k copy] \\
        [-m EXPR] [--timeout 120] [--parallel] [--json OUT.json] [--keep-logs DIR] \\
        [-- MORE PYTEST ARGS]

    .venv/bin/python tests/clients/psycopg_suite.py --from-json OUT.json   # report again, run nothing

The interpreter given by --python needs psycopg (any implementation), pytest,
anyio and pproxy (psycopg's `test` extra, less the plugins); the one running
this script needs the bed's packages (scripts/setup-test-env.sh makes .venv).
The whole suite takes about 18-19 minutes per target on two CPUs; --parallel
runs the targets at once, each with its own bed, on machines with CPUs to spare.
"""

import argparse
import dataclasses
import fnmatch
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import xml.etree.ElementTree as ET

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "testbed"))

import stack  # noqa: E402  (testbed/stack.py)

DEFAULT_MARKERS = "not timing and not flakey"
ALL_TARGETS = ("direct", "proxy", "proxy-sync-audit")
BAD = ("failed", "error", "hung")  # outcomes that count as "does not work"
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "hung")
STOPPING = threading.Event()  # set on ^C/SIGTERM: targets running in threads stop too

# Differences from `direct` that this proxy explains, by node id or fnmatch
# pattern over node ids (a hang is never covered). Each entry is here because
# the test's source was read and the reason for the difference understood.
_PPROXY_TUNNEL = (
    "uses psycopg's `proxy` fixture (tests/fix_proxy.py): a pproxy TCP tunnel to the DSN's host and port,"
    " connected to with sslmode=disable; the fixture fails the test if one connection through it does not"
    " work. Direct, the host is the RDS endpoint name, which resolves only through the DSN's hostaddr, and the"
    " tunnel does not use hostaddr (PostgreSQL would refuse a plaintext login of an IAM user anyway): 'failed"
    " to create a working proxy', the test fails. Through rds-iam-proxy the host is localhost and the proxy"
    " accepts plaintext from loopback clients, so the tunnel works and the test passes."
)
_PASSWORD_FROM_PASSFILE = (
    "runs only if the test connection used a password (it skips otherwise), then assumes that the password"
    " came from the DSN or PGPASSWORD. Direct, libpq sends the IAM token from the passfile, so the test runs and"
    " trips on its assumption (test_multi_attempt_pgconn doubles host but not hostaddr: 'could not match 2 host"
    " names with 1 hostaddr values'; test_connect_operationalerror_pgconn: KeyError 'password'). Through the"
    " proxy the client sends no password at all (the proxy signs a token itself): skipped."
)
_ASYNC_NAME_RESOLUTION = (
    "counts Python objects (gc) after each of three connect-and-query rounds and wants three equal counts."
    " proxy_dsn() has host=localhost and no hostaddr, so psycopg's AsyncConnection.connect resolves the name"
    " itself (loop.getaddrinfo in asyncio's default thread pool, psycopg/_conninfo_attempts_async.py); the direct"
    " DSN has hostaddr=127.0.0.1 and resolves nothing. That client-side path leaves one object more after the"
    " second round: 'objects leaked: 1, 0'. Checked: test_cursor_async.py::test_leak[*tuple_row*] through the"
    " proxy fails 22 of 48 with proxy_dsn() and none with proxy_dsn(hostaddr='127.0.0.1')."
)
EXPECTED_DIFFERENCES = {
    "tests/pq/test_pgconn.py::test_change_password_error": (
        "PQchangePassword() sends ALTER USER ashesh PASSWORD '...', and the test wants the server's answer,"
        " 'role \"ashesh\" does not exist'. The proxy's password guard refuses CREATE/ALTER ROLE ... PASSWORD"
        " before the server sees it ('password changes are not allowed through rds-iam-proxy'; on by default,"
        " --allow-password-changes lifts it), so the message differs."
    ),
    "tests/pool/test_pool*.py::test_connect_check_timeout*": _PPROXY_TUNNEL,
    "tests/pool/test_pool*.py::test_reconnect_after_grow_failed*": _PPROXY_TUNNEL,
    "tests/pool/test_pool*.py::test_refill_on_check*": _PPROXY_TUNNEL,
    "tests/pool/test_pool*.py::test_stats_connect*": _PPROXY_TUNNEL,
    "tests/pool/test_pool_common*.py::test_setup_no_timeout*": _PPROXY_TUNNEL,
    "tests/test_waiting*.py::test_remote_closed*": _PPROXY_TUNNEL,
    "tests/test_waiting*.py::test_wait_remote_closed*": _PPROXY_TUNNEL,
    "tests/test_connection*.py::test_multi_attempt_pgconn*": _PASSWORD_FROM_PASSFILE,
    "tests/test_generators.py::test_connect_operationalerror_pgconn": _PASSWORD_FROM_PASSFILE,
    "tests/test_copy_async.py::test_copy_*_leaks[*": _ASYNC_NAME_RESOLUTION,
    "tests/test_cursor*_async.py::test_leak[*": _ASYNC_NAME_RESOLUTION,
}

# psycopg's markers for tests it calls flaky but runs by default. A test
# carrying one that fails (not hangs) on one side only is reported as flaky,
# not as a difference.
FLAKY_MARKERS = {
    "refcount": "psycopg's marker: 'the test checks ref counts which is sometimes flaky' (it counts"
                " gc objects over three runs; one object cached late is enough)",
}

# The pytest plugin the watchdog follows: one JSON line per event, flushed at
# once, so that the log survives pytest being killed.
PLUGIN_NAME = "psycopg_suite_progress"
PLUGIN_SOURCE = '''
"""Progress log and resume support for psycopg_suite.py (loaded with -p)."""
import json
import time

import pytest

_log = None


def pytest_addoption(parser):
    group = parser.getgroup("psycopg_suite")
    group.addoption("--suite-progress", help="append one JSON line per test event to this file")
    group.addoption("--suite-exclude", help="JSON list of node ids not to run (done or hung before)")


def pytest_configure(config):
    global _log
    if path := config.getoption("--suite-progress"):
        _log = open(path, "a", buffering=1)


def _emit(**event):
    if _log:
        _log.write(json.dumps({"t": round(time.time(), 3), **event}) + "\\n")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    excluded = set()
    if path := config.getoption("--suite-exclude"):
        with open(path) as f:
            excluded = set(json.load(f))
    dropped = [item for item in items if item.nodeid in excluded]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item.nodeid not in excluded]
    for item in items:
        item.user_properties.append(("nodeid", item.nodeid))
        item.user_properties.append(("markers", ",".join(sorted({m.name for m in item.iter_markers()}))))
    _emit(event="collected", count=len(items))


def pytest_runtest_logstart(nodeid, location):
    _emit(event="start", nodeid=nodeid)


def pytest_runtest_logreport(report):
    _emit(event="report", nodeid=report.nodeid, when=report.when, outcome=report.outcome,
          xfail=hasattr(report, "wasxfail"), message=report.longreprtext[-4000:])


def pytest_runtest_logfinish(nodeid, location):
    _emit(event="finish", nodeid=nodeid)
'''


@dataclasses.dataclass
class Result:
    outcome: str
    message: str = ""  # short: junit's message attribute, or why it hung
    details: str = ""  # the traceback (tail)
    markers: tuple = ()

    def category(self):
        return "bad" if self.outcome in BAD else self.outcome


@dataclasses.dataclass
class TargetRun:
    name: str
    results: dict = dataclasses.field(default_factory=dict)  # nodeid -> Result
    seconds: float = 0.0
    segments: int = 0
    problems: list = dataclasses.field(default_factory=list)  # target-level failures
    notes: list = dataclasses.field(default_factory=list)

    def counts(self):
        counts = dict.fromkeys(OUTCOMES, 0)
        for r in self.results.values():
            counts[r.outcome] += 1
        return counts


def proxy_args(target, tmp):
    if target == "proxy-sync-audit":
        audit = tmp / "audit"
        audit.mkdir()
        return ["--audit-mode", "sync", "--audit-dir", str(audit)]
    return []


# -- results from junit xml and from the progress log ---------------------------


def junit_results(path):
    """nodeid -> Result from a --junitxml file (node ids from the plugin's property)."""
    results = {}
    for case in ET.parse(path).iter("testcase"):
        prop = case.find("properties/property[@name='nodeid']")
        if prop is None:
            continue
        nodeid = prop.get("value")
        markers = case.find("properties/property[@name='markers']")
        markers = tuple(filter(None, markers.get("value").split(","))) if markers is not None else ()
        result = Result("passed", markers=markers)
        for tag in ("skipped", "error", "failure"):  # later ones win
            el = case.find(tag)
            if el is None:
                continue
            outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
            if tag == "skipped" and el.get("type") == "pytest.xfail":
                outcome = "xfailed"
            result = Result(outcome, el.get("message") or "", (el.text or "")[-4000:], markers)
        # A failing call plus a failing teardown make two testcases: keep the worse.
        if nodeid not in results or _rank(result) > _rank(results[nodeid]):
            results[nodeid] = result
    return results


def _rank(result):
    return OUTCOMES.index(result.outcome) if result.outcome in BAD else -1


def progress_results(events):
    """nodeid -> Result from the plugin's report events (when junit xml is missing)."""
    results = {}
    for ev in events:
        if ev["event"] != "report":
            continue
        if ev["outcome"] == "failed":
            outcome = "failed" if ev["when"] == "call" else "error"
        elif ev["outcome"] == "skipped":
            outcome = "xfailed" if ev["xfail"] else "skipped"
        else:
            outcome = "passed"
        prev = results.get(ev["nodeid"])
        if prev is None or prev.outcome == "passed" or outcome in BAD:
            lines = ev["message"].strip().splitlines()
            results[ev["nodeid"]] = Result(outcome, lines[-1] if lines else "", ev["message"])
    return results


# -- running pytest under the watchdog ------------------------------------------


class Segment:
    """One pytest process over the tests not yet done."""

    def __init__(self, cmd, cwd, env, workdir, index):
        self.progress = workdir / f"progress-{index}.jsonl"
        self.junit = workdir / f"junit-{index}.xml"
        self.output = workdir / f"pytest-{index}.log"
        self.cmd = [*cmd, "--suite-progress", str(self.progress), "--junitxml", str(self.junit),
                    "-o", f"cache_dir={workdir / f'cache-{index}'}"]
        self.cwd, self.env = cwd, env
        self.events = []
        self.running = None  # nodeid between its start and finish events
        self._partial = ""
        self.stop = None
        self.last_phase = None

    def run(self, exclude_file, timeout):
        """Run pytest to its end, a hang or a crash.

        Returns "" at the end, else the test it stopped in (or a "<...>" text
        when it stopped outside any test), with self.stop = "hang" or "crash".
        """
        self.progress.touch()
        with open(self.output, "w") as out, open(self.progress) as progress:
            proc = subprocess.Popen([*self.cmd, "--suite-exclude", str(exclude_file)], cwd=self.cwd,
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                last_progress = time.monotonic()
                while proc.poll() is None:
                    if STOPPING.wait(0.5):
                        raise KeyboardInterrupt
                    if self._read(progress):
                        last_progress = time.monotonic()
                    elif time.monotonic() - last_progress > timeout:
                        self._stop(proc)
                        self._read(progress)
                        self.stop = "hang"
                        return self.running or f"<outside any test, after {self._last_nodeid()}>"
                self._read(progress)
            finally:
                if proc.poll() is None:  # this script is being stopped
                    self._stop(proc)
        if self.running:  # died inside a test: a crash (pytest itself never leaves one open)
            self.stop = f"crash (exit status {proc.returncode})"
            return self.running
        return ""

    def _read(self, progress):
        """Take in the complete lines the plugin added; True if there were any."""
        *lines, self._partial = (self._partial + progress.read()).split("\n")
        for line in lines:
            ev = json.loads(line)
            self.events.append(ev)
            if ev["event"] == "start":
                self.running, self.last_phase = ev["nodeid"], None
            elif ev["event"] == "report":
                self.last_phase = ev["when"]
            elif ev["event"] == "finish":
                self.running = None
        return bool(lines)

    def _last_nodeid(self):
        starts = [ev["nodeid"] for ev in self.events if ev["event"] == "start"]
        return starts[-1] if starts else "collection"

    @staticmethod
    def _stop(proc):
        """SIGINT first, so that pytest writes its junit xml; SIGKILL if that is not enough."""
        for sig, grace in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def hang_phase(self):
        return {None: "setup", "setup": "call", "call": "teardown"}.get(self.last_phase, "teardown")

    def results(self):
        from_progress = progress_results(self.events)
        if not self.junit.exists():
            return from_progress
        try:
            from_junit = junit_results(self.junit)
        except ET.ParseError:
            return from_progress
        return {**from_progress, **from_junit}

    def faulthandler_dump(self):
        """The last traceback dump faulthandler_timeout wrote, if any."""
        return faulthandler_dump(self.output.read_text(errors="replace"))


def faulthandler_dump(pytest_output):
    """The last traceback dump of faulthandler_timeout in pytest's output, or ""."""
    start = pytest_output.rfind("Timeout (")
    if start < 0:
        return ""
    end = pytest_output.find("\n\n", start)
    return pytest_output[start:end if end >= 0 else None][:8000]


def run_target(target, args, pytest_cmd):
    run = TargetRun(target)
    started = time.monotonic()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"psycopg-suite-{target}-"))
    try:
        with stack.Stack(proxy_args=proxy_args(target, workdir)) as st:
            dsn = st.direct_dsn() if target == "direct" else st.proxy_dsn()
            env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PSYCOPG_", "AWS_"))}
            env.update(PSYCOPG_TEST_DSN=dsn, PYTHONPATH=str(workdir))
            (workdir / f"{PLUGIN_NAME}.py").write_text(PLUGIN_SOURCE)
            exclude = workdir / "exclude.json"
            while True:
                run.segments += 1
                exclude.write_text(json.dumps(sorted(run.results)))
                segment = Segment(pytest_cmd, args.checkout, env, workdir, run.segments)
                log(f"{target}: pytest run {run.segments} ({len(run.results)} tests done)")
                stopped_in = segment.run(exclude, args.timeout)
                run.results.update(segment.results())
                if not stopped_in:
                    break
                log(f"{target}: {segment.stop} in {stopped_in}")
                if stopped_in.startswith("<"):
                    run.problems.append(f"pytest stopped: {segment.stop} {stopped_in}")
                    break
                if segment.stop == "hang":
                    run.results[stopped_in] = Result(
                        "hung", f"no progress for {args.timeout} s in its {segment.hang_phase()}",
                        segment.faulthandler_dump())
                else:
                    run.results[stopped_in] = Result(
                        "error", f"pytest died in its {segment.hang_phase()}: {segment.stop}",
                        _tail(segment.output.read_text(errors="replace"), 40))
            if not run.results:
                run.problems.append("no test ran; pytest output:\n" + segment.output.read_text()[-3000:])
            if target != "direct":
                check_proxy(run, st, workdir)
            if args.keep_logs:
                keep = args.keep_logs / target
                shutil.copytree(workdir, keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("cache-*"))
                shutil.copy(st.log_path, keep / "proxy.log")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    run.seconds = time.monotonic() - started
    return run


def check_proxy(run, st, workdir):
    if st.proxy.poll() is not None:
        run.problems.append(f"the proxy exited with status {st.proxy.returncode} during the run")
    audit = workdir / "audit"
    if audit.is_dir():
        files = sorted(audit.iterdir())
        size = sum(f.stat().st_size for f in files)
        r = subprocess.run([stack.binary(), "audit", "verify", str(audit)], capture_output=True, text=True)
        if r.returncode != 0:
            run.problems.append(f"audit verify failed: {(r.stdout + r.stderr).strip()}")
        else:
            run.notes.append(f"audit: {len(files)} file(s), {size} bytes, `audit verify` ok")


# -- comparison and report ----------------------------------------------------


def expected_reason(nodeid):
    for pattern, reason in EXPECTED_DIFFERENCES.items():
        if nodeid == pattern or fnmatch.fnmatchcase(nodeid, pattern):
            return pattern, reason
    return None, None


def differences(direct, other):
    """(nodeid, direct outcome, other outcome, flaky marker or None) for tests whose outcome class differs."""
    diffs = []
    for nodeid in sorted(direct.results.keys() | other.results.keys()):
        a, b = direct.results.get(nodeid), other.results.get(nodeid)
        if a is None or b is None:
            diffs.append((nodeid, a.outcome if a else "not run", b.outcome if b else "not run", None))
        elif a.category() != b.category():
            flaky = "failed" in (a.outcome, b.outcome) and next(
                (m for m in a.markers + b.markers if m in FLAKY_MARKERS), None)
            diffs.append((nodeid, a.outcome, b.outcome, flaky or None))
    return diffs


def report(runs, settings):
    """Print the table and the differences; returns (ok, differences per target)."""
    ok = True
    print(f"psycopg test suite at {settings['checkout']}, interpreter {settings['python']}")
    print(f"pytest -m {settings['markers']!r}" + (f" -k {settings['k']!r}" if settings["k"] else "")
          + "".join(f" {a}" for a in settings["pytest_args"]) + f"; hang timeout {settings['timeout']} s")
    if "timing" in settings["markers"] or "flakey" in settings["markers"]:
        print("(tests marked timing/flakey are excluded by the -m expression above)")
    print(f"one-sided failures in tests marked {', '.join(FLAKY_MARKERS)} are reported as flaky, not as differences")
    print()
    header = f"{'target':<18} {'passed':>7} {'failed':>7} {'errors':>7} {'skipped':>8} {'xfailed':>8} " \
             f"{'hung':>5} {'runs':>5} {'time':>8}"
    print(header)
    print("-" * len(header))
    for run in runs.values():
        c = run.counts()
        print(f"{run.name:<18} {c['passed']:>7} {c['failed']:>7} {c['error']:>7} {c['skipped']:>8} "
              f"{c['xfailed']:>8} {c['hung']:>5} {run.segments:>5} {run.seconds:>7.0f}s")
    print("(runs: pytest processes needed; a hang or crash stops one and the next resumes after it)\n")

    for run in runs.values():
        for note in run.notes:
            print(f"{run.name}: {note}")
        for problem in run.problems:
            ok = False
            print(f"{run.name}: PROBLEM: {problem}")
        for nodeid, r in run.results.items():
            if r.outcome == "hung":  # a failure wherever it happens, difference or not
                ok = False
                print(f"{run.name}: HUNG {nodeid}: {r.message}")
                print(textwrap.indent("\n".join(r.details.splitlines()[:12]), "      | ", lambda line: True))

    if "direct" not in runs:
        print("\n(no `direct` target: no comparison)")
        return ok, {}

    found, used = {}, set()
    for run in runs.values():
        if run.name == "direct":
            continue
        expected, flaky, unexplained = [], [], []
        for nodeid, a, b, marker in differences(runs["direct"], run):
            pattern, reason = expected_reason(nodeid)
            if reason and "hung" not in (a, b):  # a hang is never expected
                used.add(pattern)
                expected.append({"nodeid": nodeid, "direct": a, "target": b, "reason": reason})
            elif marker:
                flaky.append({"nodeid": nodeid, "direct": a, "target": b, "marker": marker})
            else:
                unexplained.append({"nodeid": nodeid, "direct": a, "target": b})
        found[run.name] = {"expected": expected, "flaky": flaky, "unexplained": unexplained}
        print(f"\n== direct vs {run.name}: {len(expected) + len(flaky) + len(unexplained)} difference(s):"
              f" {len(expected)} expected, {len(flaky)} in flaky tests, {len(unexplained)} unexplained")
        for d in expected:
            print(f"  expected     {d['nodeid']}: direct {d['direct']}, {run.name} {d['target']}")
        for d in flaky:
            print(f"  flaky        {d['nodeid']}: direct {d['direct']}, {run.name} {d['target']}"
                  f" (marked {d['marker']})")
            print_failures(d["nodeid"], runs["direct"], run, lines=3)
        for d in unexplained:
            ok = False
            print(f"  UNEXPLAINED  {d['nodeid']}: direct {d['direct']}, {run.name} {d['target']}")
            print_failures(d["nodeid"], runs["direct"], run, lines=25)

    if used:
        print("\nWhy the expected differences differ:")
        by_reason = {}
        for pattern, reason in EXPECTED_DIFFERENCES.items():
            if pattern in used:
                by_reason.setdefault(reason, []).append(pattern)
        for reason, patterns in by_reason.items():
            print("".join(f"  {p}\n" for p in patterns) + textwrap.indent(textwrap.fill(reason, 96), "      "))
    if found and any(d["flaky"] for d in found.values()):
        print("\nFlaky markers: " + "; ".join(f"{m}: {why}" for m, why in FLAKY_MARKERS.items()))
    stale = [p for p in EXPECTED_DIFFERENCES if p not in used]
    if stale and not settings["k"] and not settings["pytest_args"]:
        print("\nEXPECTED_DIFFERENCES entries that matched no difference this run:")
        for pattern in stale:
            print(f"  {pattern}")
    return ok, found


# -- results file ---------------------------------------------------------------


def save(path, settings, runs, found=None):
    data = {"settings": settings, "targets": {
        run.name: {"counts": run.counts(), "seconds": round(run.seconds, 1), "pytest_runs": run.segments,
                   "problems": run.problems, "notes": run.notes, "differences": (found or {}).get(run.name),
                   "results": {n: dataclasses.asdict(r) for n, r in sorted(run.results.items())}}
        for run in runs.values()}}
    path.write_text(json.dumps(data, indent=1))


def load(path):
    data = json.loads(path.read_text())
    runs = {}
    for name, t in data["targets"].items():
        results = {n: Result(**{**r, "markers": tuple(r["markers"])}) for n, r in t["results"].items()}
        runs[name] = TargetRun(name, results, t["seconds"], t["pytest_runs"], t["problems"], t["notes"])
    return data["settings"], runs


def print_failures(nodeid, direct, other, lines):
    """The failure message and the traceback's last lines on each side that did not pass."""
    for run in (direct, other):
        r = run.results.get(nodeid)
        if r and r.outcome not in ("passed", "skipped") and (r.message or r.details):
            # A hang's details are a traceback dump, most recent call first.
            trace = "\n".join(r.details.splitlines()[:lines]) if r.outcome == "hung" else _tail(r.details, lines)
            text = f"[{run.name}] {r.message}\n{trace}"
            print(textwrap.indent(text, "      | ", lambda line: True))


def _tail(text, lines):
    return "\n".join(text.rstrip().splitlines()[-lines:])


def log(msg):
    print(f"psycopg_suite: {msg}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=pathlib.Path, help="psycopg source checkout (required unless --from-json)")
    ap.add_argument("--python", default=sys.executable, help="interpreter with psycopg and pytest")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS), help=f"comma-separated, from {', '.join(ALL_TARGETS)}")
    ap.add_argument("-k", help="pytest -k expression")
    ap.add_argument("-m", dest="markers", default=DEFAULT_MARKERS, help="pytest -m expression [%(default)s]")
    ap.add_argument("--timeout", type=int, default=120, help="seconds without test progress that make a hang")
    ap.add_argument("--parallel", action="store_true",
                    help="run the targets at the same time, each with its own bed (needs spare CPUs)")
    ap.add_argument("--json", type=pathlib.Path, help="write the results here")
    ap.add_argument("--from-json", type=pathlib.Path,
                    help="run nothing: report again on the results of an earlier --json (after editing"
                         " EXPECTED_DIFFERENCES, say)")
    ap.add_argument("--keep-logs", type=pathlib.Path, help="keep pytest output, junit xml and proxy log here")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = ap.parse_args()

    if args.from_json:
        settings, runs = load(args.from_json)
    else:
        if args.checkout is None:
            ap.error("--checkout is required")
        args.checkout = args.checkout.resolve()
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        if unknown := set(targets) - set(ALL_TARGETS):
            ap.error(f"unknown target(s): {', '.join(sorted(unknown))}")
        if not (args.checkout / "tests" / "conftest.py").exists():
            ap.error(f"{args.checkout} is not a psycopg checkout (no tests/conftest.py)")
        settings = {"checkout": str(args.checkout), "python": args.python, "markers": args.markers,
                    "k": args.k, "pytest_args": args.pytest_args, "timeout": args.timeout}
        runs = run_targets(targets, args)
        if args.json:
            save(args.json, settings, runs)
    ok, found = report(runs, settings)
    if args.json:
        save(args.json, settings, runs, found)
    return 0 if ok else 1


def run_targets(targets, args):
    # Started in the background, this process may ignore SIGINT, and so would
    # pytest: it needs SIGINT to stop cleanly. SIGTERM ends this script with
    # the same clean-up as ^C (pytest, proxy and bed stopped).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    pytest_cmd = [args.python, "-m", "pytest", "tests", "-p", "no:randomly", "-p", PLUGIN_NAME,
                  "-q", "-m", args.markers, "-o", f"faulthandler_timeout={max(1, args.timeout - 10)}"]
    if args.k:
        pytest_cmd += ["-k", args.k]
    pytest_cmd += args.pytest_args

    def run(target):
        result = run_target(target, args, pytest_cmd)
        log(f"{target}: done in {result.seconds:.0f} s: {result.counts()}")
        return result

    with ThreadPoolExecutor(max_workers=len(targets) if args.parallel else 1) as pool:
        futures = {target: pool.submit(run, target) for target in targets}
        try:
            return {target: future.result() for target, future in futures.items()}
        except KeyboardInterrupt:
            STOPPING.set()
            raise


if __name__ == "__main__":
    sys.exit(main())
