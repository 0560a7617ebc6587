"""The status page in a real browser: headless Chromium (Debian's chromium
and chromium-driver) driven over WebDriver by selenium, against a proxy
with live sessions through it on the bed's PostgreSQL.

Three sessions (one idle, one in a transaction, one running a query) and a
refused login; the page must show each session by its content (person,
database, application name, state, statement count), the refusal with its
reason, who the proxy acts for, sort by a column when its header is
clicked, fold into cards on a narrow screen, and drop a session once it
ends. The screenshot is kept at target/artifacts/status-page.png (the
path is printed).
"""

import contextlib
import os
import re
import shutil
import sys
import tempfile
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import stack  # noqa: E402  (testbed/stack.py)

psycopg = pytest.importorskip("psycopg")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402

# Selenium must not look for a browser or a driver to download: these are
# Debian's.
os.environ.setdefault("SE_OFFLINE", "true")
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the test bed needs root to install a PAM service in /etc/pam.d"),
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver"),
]

ARTIFACT = stack.REPO / "target" / "artifacts" / "status-page.png"
DEADLINE_S = 20


def wait_until(what, probe, deadline_s=DEADLINE_S):
    end = time.monotonic() + deadline_s
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,1000", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    # Chromium keeps its profile here, not in root's home.
    opts.add_argument("--user-data-dir=" + tempfile.mkdtemp(prefix="rdsiam-chromium-"))
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    return webdriver.Chrome(options=opts, service=service)


def rows(driver):
    """Each session row of the table as {column class: text}."""
    out = []
    for tr in driver.find_elements(By.CSS_SELECTOR, "#session-table tbody tr.session"):
        cells = {}
        for td in tr.find_elements(By.TAG_NAME, "td"):
            cls = td.get_attribute("class").split()[-1]
            cells[cls] = td.text.strip()
        cells["conn_id"] = tr.get_attribute("data-conn")
        out.append(cells)
    return out


@pytest.fixture(scope="module")
def st():
    audit_dir = tempfile.mkdtemp(prefix="rdsiam-status-audit-")
    args = ["--admin-listen", "127.0.0.1:0", "--audit-mode", "async", "--audit-dir", audit_dir]
    with stack.Stack(proxy_args=args) as s:
        log = wait_until("the admin listener", lambda: re.search(r"admin HTTP on (\S+)", s.proxy_log()))
        s.admin = "http://" + log.group(1)
        yield s


def test_the_status_page_shows_who_is_connected_in_a_real_browser(st):
    idle = psycopg.connect(st.proxy_dsn(application_name="status-idle"), autocommit=True)
    tx = psycopg.connect(st.proxy_dsn(application_name="status-tx"))
    run = psycopg.connect(st.proxy_dsn(application_name="status-run"), autocommit=True)
    for i in range(5):
        idle.execute("select %s::int", (i,)).fetchone()
    tx.execute("select 1").fetchone()  # psycopg opens a transaction
    def sleep():
        # Cancelled when the test ends.
        with contextlib.suppress(psycopg.Error):
            run.execute("select pg_sleep(60)")

    running = threading.Thread(target=sleep, daemon=True)
    running.start()
    # A login the proxy refuses: someone else's database user.
    with pytest.raises(psycopg.OperationalError, match="not yours"):
        psycopg.connect(st.proxy_dsn(user="postgres"))
    driver = browser()
    try:
        driver.set_page_load_timeout(DEADLINE_S)
        driver.get(st.admin + "/?refresh=0")

        def three_rows():
            driver.refresh()
            r = rows(driver)
            states = {x["database"].split()[-1]: x["state"] for x in r}
            want = {"status-idle": "idle", "status-tx": "in transaction", "status-run": "running"}
            return r if len(r) == 3 and states == want else None

        r = wait_until("three sessions in their states", three_rows)
        by_app = {x["database"].split()[-1]: x for x in r}
        for x in r:
            assert x["person"] == "arianna", x
            assert x["db_user"] == "arianna", x
            assert x["database"].startswith("arianna_db"), x
            assert x["tls"].startswith("TLSv1_3"), x
            assert x["client"].startswith("127.0.0.1:"), x
        assert int(by_app["status-idle"]["statements"]) >= 5
        assert int(by_app["status-run"]["statements"]) >= 1

        refusal = driver.find_element(By.CSS_SELECTOR, "#refusal-table tr.refusal")
        assert refusal.find_element(By.CLASS_NAME, "db_user").text == "postgres"
        assert refusal.find_element(By.CLASS_NAME, "reason").text == "not_your_user"
        assert "28000" in refusal.text
        assert driver.find_element(By.ID, "acting-for").text == "arianna"
        assert driver.find_element(By.ID, "audit-health").text == "ok"
        assert "yes, verified TLS" in driver.find_element(By.CSS_SELECTOR, "#endpoint-table td.reach").text
        charts = driver.find_elements(By.CSS_SELECTOR, "svg.chart")
        assert len(charts) == 2
        # The three sessions (not the refused login), and their statements.
        assert "3 in the last hour" in charts[0].get_attribute("aria-label")
        assert len(charts[1].find_elements(By.TAG_NAME, "rect")) >= 1
        assert not driver.find_elements(By.ID, "exposed"), "loopback admin listener"

        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACT))
        print(f"\nstatus page screenshot: {ARTIFACT}")
        assert ARTIFACT.stat().st_size > 10_000

        # Sorted by statements, descending, by clicking the header twice.
        driver.find_element(By.CSS_SELECTOR, "th[data-key=statements] a").click()
        driver.find_element(By.CSS_SELECTOR, "th[data-key=statements] a").click()
        assert "sort=statements&order=desc" in driver.current_url
        counts = [int(x["statements"]) for x in rows(driver)]
        assert counts == sorted(counts, reverse=True) and counts[0] >= 5, counts

        # A narrow screen: rows become cards, headers go.
        driver.set_window_size(420, 900)
        header = driver.find_element(By.CSS_SELECTOR, "#session-table thead")
        assert header.value_of_css_property("display") == "none"
        driver.set_window_size(1400, 1000)

        # An ended session leaves the page.
        gone = by_app["status-idle"]["conn_id"]
        idle.close()

        def dropped():
            driver.refresh()
            left = rows(driver)
            return len(left) == 2 and all(x["conn_id"] != gone for x in left)

        wait_until("the ended session to disappear", dropped)

        # The JSON has the same sessions, and no statement text.
        driver.get(st.admin + "/sessions")
        body = driver.find_element(By.TAG_NAME, "body").text
        assert '"state": "running"' in body and "pg_sleep" not in body
    finally:
        driver.quit()
        for c in (tx, run):
            c.cancel_safe() if hasattr(c, "cancel_safe") else c.cancel()
            c.close()
