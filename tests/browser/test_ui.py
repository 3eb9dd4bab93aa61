"""The web UI of pgrelay-control in a real browser: headless Chromium driven by Selenium.

One module-wide fleet, as in tests/integration/test_control_e2e.py: a store database in the
session's PostgreSQL, bin/pgrelay-control serving deployment ``prod``, a cluster of pg1
(primary) and pg2 (streaming replica), and two pgrelay proxies (proxy-a, proxy-b) each in its
own mount namespace. The browser signs in with the admin token and does what an operator
does; each test asserts what the operator relies on, from the page and from the outside (the
proxies' admin consoles, sessions through them, the API).

Every page is screenshot into the artifacts directory (PGRELAY_TEST_ARTIFACTS, default
build/test-artifacts/browser) and the browser's console log is checked after every test: no
error may appear but the HTTP answers a test provokes on purpose (the 401 of a wrong token,
the 409 of a refused configuration, the connection refused while the control plane is down).
"""

import os
import re
import shutil
import time
import uuid

import pytest

from cluster import Cluster
from conftest import admin, require, start_together_on_free_port, wait_for
from control_e2e_helpers import (ADMIN_TOKEN, API, DEPLOYMENT, ControlPlane, cleanup_dir, http,
                                 info, make_root, render_ini, start_proxy, stop_proxy)
from loadgen import InThread

try:
    from selenium import webdriver
    from selenium.common.exceptions import (NoSuchElementException,
                                            StaleElementReferenceException)
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
except ImportError:  # make deps installs python3-selenium
    webdriver = None

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ARTIFACTS = os.environ.get("PGRELAY_TEST_ARTIFACTS",
                           os.path.join(REPO, "build", "test-artifacts", "browser"))
ADDRESSES = {"proxy-a": "127.0.0.2", "proxy-b": "127.0.0.3"}
CSP = ("default-src 'self'; script-src 'self'; object-src 'none'; frame-ancestors 'none'")


class Fleet:
    def __init__(self, root, control, cluster, proxies, listen_port):
        self.root, self.control, self.cluster = root, control, cluster
        self.proxies, self.listen_port = proxies, listen_port

    def ini(self, pgrelay=None):
        return render_ini(self.listen_port, os.path.join(self.root, "host"), self.control.url,
                          self.cluster.relay_nodes(), pgrelay=pgrelay)

    def live_proxies(self):
        return {k: v for k, v in self.control.proxies().items() if v["live"]}


@pytest.fixture(scope="module")
def fleet(pg):
    root = make_root()
    store_db = "ui_" + uuid.uuid4().hex[:10]
    pg.query(f"CREATE DATABASE {store_db}")
    control = ControlPlane(
        os.path.join(root, "control"),
        f"host={pg.host} port={pg.port} user=postgres dbname={store_db} connect_timeout=5")
    os.makedirs(control.workdir)
    cluster = None
    proxies = {}
    try:
        control.start()
        cluster = Cluster.create(replicas=1)
        cluster.relay_pinned = True

        def start_proxies(port):
            fl = Fleet(root, control, cluster, proxies, port)
            for node_id, address in ADDRESSES.items():
                proxies[node_id] = start_proxy(root, node_id, address, fl.ini())
            return fl

        def discard_proxies():
            for r in proxies.values():
                stop_proxy(r)
            proxies.clear()

        fl = start_together_on_free_port(start_proxies, discard_proxies)
        wait_for(lambda: set(fl.live_proxies()) >= set(ADDRESSES), timeout=15,
                 what="both proxies registered and live")
        wait_for(lambda: control.deployment()["leader"], timeout=10, interval=0.1,
                 what="the control plane to settle the deployment's write leader")
        yield fl
    finally:
        for r in proxies.values():
            stop_proxy(r)
        control.stop()
        if cluster is not None:
            cluster.destroy()
        pg.query(f"DROP DATABASE IF EXISTS {store_db} WITH (FORCE)")
        cleanup_dir(root)


@pytest.fixture(scope="module")
def browser():
    require(webdriver is not None and os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER),
            "python3-selenium, chromium and chromium-driver (make deps)")
    os.makedirs(ARTIFACTS, exist_ok=True)
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--metrics-recording-only", "--no-default-browser-check"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def ui(browser, fleet):
    """The browser, its console log emptied first and checked after the test."""
    browser.get_log("browser")
    page = Page(browser, fleet)
    yield page
    page.assert_no_console_errors()


class Page:
    def __init__(self, driver, fleet):
        self.d = driver
        self.fleet = fleet
        self.allowed = []  # console errors the test provokes on purpose (regexps)

    @property
    def base(self):
        return self.fleet.control.url

    def open(self, hash_="fleet"):
        self.d.get(f"{self.base}/ui/#{hash_}")

    def sign_in(self, token=ADMIN_TOKEN, page="fleet"):
        self.d.get(f"{self.base}/ui/")
        self.d.execute_script("sessionStorage.clear()")
        self.d.get(f"{self.base}/ui/#{page}")
        self.wait(lambda: self.visible("login"), "the login form")
        self.el("token").send_keys(token)
        self.el("login-button").click()

    def signed_in(self, page="fleet"):
        """Signed in with the admin token, on page."""
        if not self.d.current_url.startswith(self.base) or not self.d.execute_script(
                "return sessionStorage.getItem('pgrelay.token')"):
            self.sign_in(page=page)
        else:
            self.open(page)
        self.wait(lambda: self.visible("page-" + page), f"the {page} page")

    def el(self, id_):
        return self.d.find_element(By.ID, id_)

    def attr(self, id_, name):
        """An attribute of the element with that id, looked up afresh (a page may replace it)."""
        for _ in range(20):
            try:
                return self.el(id_).get_attribute(name)
            except (StaleElementReferenceException, NoSuchElementException):
                time.sleep(0.05)
        return self.el(id_).get_attribute(name)

    def visible(self, id_):
        els = self.d.find_elements(By.ID, id_)
        return bool(els) and els[0].is_displayed()

    def text(self, id_):
        for _ in range(20):
            try:
                return self.el(id_).text
            except StaleElementReferenceException:
                time.sleep(0.05)
        return self.el(id_).text

    def wait(self, cond, what, timeout=15):
        def safe():
            try:
                return cond()
            except (StaleElementReferenceException, NoSuchElementException):
                return None  # the page replaced or has not drawn it yet
        return wait_for(safe, timeout=timeout, interval=0.1, what=what)

    def rows(self, table_id):
        """The body rows of a table as lists of cell texts, keyed by the first cell (read
        again when the page redraws the table meanwhile: it does every second)."""
        for attempt in range(20):
            try:
                out = {}
                for tr in self.d.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr"):
                    cells = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                    if cells:
                        out[cells[0]] = cells
                return out
            except StaleElementReferenceException:
                time.sleep(0.05)
        raise AssertionError(f"#{table_id} was redrawn during every read")

    def screenshot(self, name):
        path = os.path.join(ARTIFACTS, name + ".png")
        self.d.save_screenshot(path)
        return path

    def confirm(self, expect_words):
        """The confirmation dialog names what will happen; confirm it."""
        self.wait(lambda: self.visible("confirm"), "the confirmation dialog")
        said = self.text("confirm-title") + " " + self.text("confirm-text")
        for w in expect_words:
            assert w in said, (w, said)
        return said

    def console_errors(self):
        errors = [e for e in self.d.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        return [e for e in errors if not any(re.search(a, e["message"]) for a in self.allowed)]

    def assert_no_console_errors(self):
        errors = self.console_errors()
        assert not errors, f"console errors: {errors}"


# --------------------------------------------------------------------------- #
# serving and headers
# --------------------------------------------------------------------------- #


def test_ui_is_served_from_the_binary_with_strict_headers_on_every_answer(fleet):
    port = fleet.control.port
    import http.client

    def raw(path, token=None):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        r = c.getresponse()
        body = r.read()
        c.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body

    status, headers, _ = raw("/")
    assert status == 302 and headers["location"] == "/ui/", (status, headers)
    status, headers, _ = raw("/ui")
    assert status == 302 and headers["location"] == "/ui/", (status, headers)
    for path, ctype in (("/ui/", "text/html"), ("/ui/app.js", "text/javascript"),
                        ("/ui/style.css", "text/css"), ("/ui/favicon.svg", "image/svg+xml")):
        status, headers, body = raw(path)
        assert status == 200 and headers["content-type"].startswith(ctype), (path, headers)
        assert body, path
    status, headers, body = raw("/ui/index.html")
    assert b"<script src=\"app.js\"" in body
    # no inline script or style anywhere in what is served
    assert not re.search(rb"<script>|<script [^>]*>[^<]+</script>|<style|style=", body)
    status, headers, _ = raw("/ui/nothing.js")
    assert status == 404

    answers = {
        "ui": raw("/ui/"),
        "api": raw(f"{API}/deployments", ADMIN_TOKEN),
        "api 401": raw(f"{API}/deployments", "wrong-token-123"),
        "api 404": raw(f"{API}/nowhere", ADMIN_TOKEN),
        "healthz": raw("/healthz"),
    }
    for what, (status, headers, _) in answers.items():
        assert headers.get("content-security-policy") == CSP, (what, headers)
        assert headers.get("x-frame-options") == "DENY", (what, headers)
        assert headers.get("x-content-type-options") == "nosniff", (what, headers)
        assert headers.get("referrer-policy") == "no-referrer", (what, headers)
    for what in ("api", "api 401", "api 404"):
        assert answers[what][1].get("cache-control") == "no-store", (what, answers[what][1])
    assert answers["api 401"][0] == 401


# --------------------------------------------------------------------------- #
# login
# --------------------------------------------------------------------------- #


def test_login_refuses_a_wrong_token_and_accepts_the_admin_token(ui):
    ui.allowed.append(r"401")  # the refused token's answer, logged by the browser
    ui.sign_in("not-the-admin-token")
    ui.wait(lambda: "refused" in ui.text("login-error"), "the refusal on the login form")
    assert ui.visible("login") and not ui.visible("app")
    assert ui.d.execute_script("return sessionStorage.getItem('pgrelay.token')") is None
    ui.screenshot("login-refused")

    ui.el("token").send_keys(ADMIN_TOKEN)
    ui.el("login-button").click()
    ui.wait(lambda: ui.visible("page-fleet"), "the fleet page after signing in")
    assert not ui.visible("login")
    # kept for this tab only: sessionStorage, not localStorage or a cookie
    assert ui.d.execute_script("return sessionStorage.getItem('pgrelay.token')") == ADMIN_TOKEN
    assert ui.d.execute_script("return localStorage.length") == 0
    assert ui.d.get_cookies() == []

    # a token the control plane refuses later (401) returns to the login
    ui.d.execute_script("sessionStorage.setItem('pgrelay.token', 'revoked-token-456')")
    ui.d.refresh()
    ui.wait(lambda: ui.visible("login") and "refused" in ui.text("login-error"),
            "the login form after a 401")
    ui.sign_in()
    ui.wait(lambda: ui.visible("page-fleet"), "the fleet page")


# --------------------------------------------------------------------------- #
# fleet
# --------------------------------------------------------------------------- #


def test_fleet_page_lists_both_proxies_and_both_nodes_with_the_leader_and_epoch(ui, fleet):
    ui.signed_in("fleet")
    dep = fleet.control.deployment()
    leader, epoch = dep["leader"], dep["epoch"]
    assert leader == info(fleet.proxies["proxy-a"])["write_leader"]

    ui.wait(lambda: ui.text("leader") == leader and ui.text("epoch") == str(epoch),
            f"leader {leader} and epoch {epoch} at the top")
    proxies = ui.wait(lambda: (lambda r: r if set(r) >= set(ADDRESSES) else None)(
        ui.rows("proxies")), "both proxies listed")
    for node_id in ADDRESSES:
        row = proxies[node_id]
        # node id, status, live, host, listen, version, epoch, leader, maintenance, config
        assert row[1] == "declared" and row[2] == "yes", row
        assert row[5] == info(fleet.proxies[node_id])["version"], row
        assert row[6] == str(epoch) and row[7] == leader, row
        assert row[8] == "off", row
        assert f"{fleet.listen_port}" in row[4], row
    names = {n.name for n in fleet.cluster.nodes}
    nodes = ui.wait(lambda: (lambda r: r if set(r) >= names else None)(ui.rows("nodes")),
                    "both database nodes listed")
    assert "write leader" in nodes[leader][2], nodes[leader]
    replica = next(n for n in names if n != leader)
    assert "in recovery" in nodes[replica][2], nodes[replica]
    for name in names:
        assert "proxy-a: up" in nodes[name][3] and "proxy-b: up" in nodes[name][3], nodes[name]
    # statements through a proxy show up in its node's sessions and statements/s
    with fleet.proxies["proxy-a"].connect() as c:
        for _ in range(50):
            c.execute("SELECT 1")
        ui.wait(lambda: ui.rows("nodes")[leader][6].startswith("1 write"),
                "the session on the leader")
        ui.wait(lambda: ui.rows("nodes")[leader][7] not in ("-", "0"),
                "statements/s on the leader")
    ui.screenshot("fleet")


def test_the_page_follows_itself_once_a_second(ui, fleet):
    """The 'updated' stamp moves about every second without a reload (the page polls once a
    second from start to start; on a loaded machine an answer may take longer)."""
    ui.signed_in("fleet")
    seen = set()
    deadline = time.monotonic() + 5.5
    while time.monotonic() < deadline:
        seen.add(ui.text("updated"))
        time.sleep(0.1)
    assert len(seen - {""}) >= 4, seen


# --------------------------------------------------------------------------- #
# charts and queries
# --------------------------------------------------------------------------- #


def test_a_chart_receives_new_points_every_second(ui, fleet):
    """The page polls once a second and the charts get a point per second of samples. Judged
    on the points' own times (when the control plane received each sample), so that a slow
    machine delaying the browser does not count against the data."""
    ui.signed_in("charts")
    canvas = "chart-statements"
    ui.wait(lambda: int(ui.attr(canvas, "data-points")) > 0,
            "the statements chart's first points")
    first_last = int(ui.attr(canvas, "data-last"))
    seen = {first_last}

    def proxy_a_times():
        return [t for t in ui.d.execute_script(
            "return ui.charts.series['p:proxy-a'].points.map(p => p[0])") if t >= first_last]

    with fleet.proxies["proxy-a"].connect() as c:
        def six_more():
            c.execute("SELECT 1")
            seen.add(int(ui.attr(canvas, "data-last")))
            return len(proxy_a_times()) >= 7
        ui.wait(six_more, "six more points of proxy-a on the chart", timeout=30)
    assert len(seen) >= 4, sorted(seen)  # the page took them in several polls, not at once
    recent = proxy_a_times()
    gaps = sorted(b - a for a, b in zip(recent, recent[1:]))
    # a point is a second of samples by the agent's clock, placed at its arrival: a late
    # sample followed by one on time arrive closer than a second, never at once
    assert 500 <= gaps[0] and gaps[len(gaps) // 2] <= 1300 and gaps[-1] <= 3000, gaps
    points = int(ui.attr(canvas, "data-points"))
    assert points >= 8, points  # two proxies and their nodes
    legend = ui.d.find_element(By.CSS_SELECTOR, "#charts .chart .legend").text
    assert "proxy-a" in legend and "proxy-b" in legend, legend
    ui.screenshot("charts")


def test_a_running_pg_sleep_appears_in_queries_and_disappears_when_it_ends(ui, fleet):
    ui.signed_in("queries")
    relay = fleet.proxies["proxy-b"]

    def sleep():
        with relay.connect() as c:
            c.execute("SELECT pg_sleep(10)")  # long enough for the steps below on a loaded machine
        return True

    def sleeping_row():
        for tr in ui.d.find_elements(By.CSS_SELECTOR, "#queries tbody tr"):
            if "pg_sleep" in tr.text:
                return tr.text
        return None

    def in_api():
        return any("pg_sleep" in q["text"] and q["node_id"] == "proxy-b"
                   for q in fleet.control.get(f"/deployments/{DEPLOYMENT}/queries"))

    t = InThread(sleep)
    # the agent uploads its running statements every 500 ms; the page must show them within
    # its next polls once the control plane has them
    wait_for(in_api, timeout=15, interval=0.1, what="the pg_sleep in GET .../queries")
    row = ui.wait(sleeping_row, "the pg_sleep statement in the queries table", timeout=4)
    assert "proxy-b" in row and "postgres" in row, row
    # a row opens its detail; the columns sort
    def click_row():  # rows are redrawn every second: find and click in one go, again if stale
        next(tr for tr in ui.d.find_elements(By.CSS_SELECTOR, "#queries tbody tr")
             if "pg_sleep" in tr.text).click()
        return True
    ui.wait(click_row, "a click on the statement's row")
    ui.wait(lambda: "pg_sleep" in ui.text("query-detail"), "the statement's detail")
    user_th = ui.d.find_element(By.CSS_SELECTOR, "#queries th[data-key=user]")
    user_th.click()
    assert "asc" in user_th.get_attribute("class")
    # filtering on its text keeps it; on something else hides it
    ui.el("query-filter").send_keys("pg_sleep")
    assert sleeping_row()
    ui.screenshot("queries")
    ui.el("query-filter").send_keys("-nothing-like-this")
    ui.wait(lambda: sleeping_row() is None, "the filter to hide it")
    ui.el("query-filter").clear()
    ui.el("query-filter").send_keys(" ")
    ui.wait(sleeping_row, "the row back with the filter cleared")
    assert t.result(timeout=30) is True
    wait_for(lambda: not in_api(), timeout=15, interval=0.1,
             what="the finished pg_sleep to leave GET .../queries")
    ui.wait(lambda: sleeping_row() is None, "the finished statement to leave the table",
            timeout=4)


def test_a_slow_statement_gets_its_plan_on_the_plans_page(ui, fleet):
    """A statement slower than plan_slow_threshold (1 s by default) through proxy-a: its
    agent EXPLAINs it and uploads the plan; the Plans page lists it with reason slow and a row
    opens the plan tree as EXPLAIN's text form reads."""
    with fleet.proxies["proxy-a"].connect() as c:
        c.execute("SELECT pg_sleep(1.2) AS ui_plan_marker")

    def in_api():
        return [p for p in fleet.control.get(f"/deployments/{DEPLOYMENT}/plans")
                if "ui_plan_marker" in p["text"]]

    [plan] = wait_for(in_api, timeout=20, interval=0.2, what="the plan in GET .../plans")
    # planned while it still ran past the threshold (running), or after it ended (slow)
    assert plan["reason"] in ("slow", "running") and plan["node_id"] == "proxy-a", plan
    ui.signed_in("plans")

    def plan_row():
        for tr in ui.d.find_elements(By.CSS_SELECTOR, "#plans tbody tr"):
            if "ui_plan_marker" in tr.text:
                return tr.text
        return None

    row = ui.wait(plan_row, "the plan in the plans table", timeout=5)
    assert ("slow" in row or "running" in row) and "planned" in row, row

    def click_row():  # rows are redrawn every second: find and click in one go
        next(tr for tr in ui.d.find_elements(By.CSS_SELECTOR, "#plans tbody tr")
             if "ui_plan_marker" in tr.text).click()
        return True

    ui.wait(click_row, "a click on the plan's row")
    tree = ui.wait(lambda: ui.text("plan-tree"), "the plan tree")
    assert tree.startswith("Result  (cost="), tree  # SELECT pg_sleep(...) plans as a Result
    ui.screenshot("plans")
    assert ui.console_errors() == []


def test_switching_pages_quickly_keeps_one_poll_a_second(ui):
    """Each page change restarts polling; a poll still under way must not start a second
    loop, or the control plane gets a request per loop per second from every open tab."""
    ui.signed_in("fleet")
    for _ in range(3):
        for page in ("charts", "queries", "operations", "fleet"):
            ui.d.execute_script("location.hash = arguments[0]", page)
    # requests started from now on (the resource timing buffer may still hold older ones)
    since = ui.d.execute_script("performance.clearResourceTimings(); return performance.now()")
    t0 = time.monotonic()
    time.sleep(5)  # a window to count requests in, not a synchronisation
    elapsed = time.monotonic() - t0
    urls = ui.d.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(e => e.startTime >= arguments[0]).map(e => e.name)", since)
    polls = [u for u in urls if u.endswith(API + "/deployments")]
    assert 2 <= len(polls) <= elapsed + 1, (len(polls), elapsed)


def test_every_page_loads_without_console_errors(ui):
    for page in ("fleet", "charts", "queries", "operations", "plans"):
        ui.signed_in(page)
        ui.wait(lambda: ui.text("updated").startswith("updated"), f"the {page} page polled")
        if page == "operations":
            ui.screenshot(page)
        assert ui.console_errors() == [], page


# --------------------------------------------------------------------------- #
# operations
# --------------------------------------------------------------------------- #


def confirm_and_wait(ui, kind):
    """Confirm the dialog and wait for this tab's operation ``kind`` to end: the text of its
    box (a new one: the box of an earlier operation does not count)."""
    before = ui.attr("op-live", "data-started")
    ui.el("confirm-ok").click()

    def done():
        box = ui.el("op-live")
        if box.get_attribute("data-started") in (before, None) or \
                box.get_attribute("data-state") != "done":
            return None
        txt = box.text
        assert kind in txt, txt
        return txt
    return ui.wait(done, f"{kind} to end", timeout=60)


def test_maintenance_from_the_ui_holds_statements_on_both_proxies_until_turned_off(ui, fleet):
    ui.signed_in("operations")
    conns = {n: r.connect() for n, r in fleet.proxies.items()}
    try:
        ui.el("maint-on").click()
        ui.confirm(["Pause every live declared proxy of prod"])
        ui.screenshot("operations-confirm-maintenance")
        txt = confirm_and_wait(ui, "maintenance on")
        assert "Succeeded" in txt, txt
        for node_id, relay in fleet.proxies.items():
            assert info(relay)["maintenance"] == "on", node_id
            assert node_id in ui.rows("op-result"), txt
        held = {n: InThread(lambda c=c: c.execute("SELECT 1").fetchone()[0])
                for n, c in conns.items()}
        time.sleep(0.7)
        assert not any(t.done() for t in held.values()), "a statement ran during maintenance"

        ui.open("fleet")
        ui.wait(lambda: ui.text("maint-state").startswith("on"), "maintenance on at the top")
        ui.wait(lambda: all(r[8].startswith("on") for n, r in ui.rows("proxies").items()
                            if n in ADDRESSES), "both proxies in maintenance on the fleet page")
        ui.screenshot("fleet-maintenance")
        ui.open("operations")
        ui.wait(lambda: ui.visible("page-operations"), "the operations page")
        ui.el("maint-off").click()
        ui.confirm(["Resume every proxy of prod"])
        txt = confirm_and_wait(ui, "maintenance off")
        assert "Succeeded" in txt, txt
        for node_id, relay in fleet.proxies.items():
            assert info(relay)["maintenance"] == "off", node_id
        for node_id, t in held.items():
            assert t.result(timeout=5) == 1, node_id
    finally:  # never leave the fleet paused: the operator's maintenance is renewed until off
        fleet.control.api("POST", f"/deployments/{DEPLOYMENT}/maintenance",
                          {"on": False, "timeout_s": 10})
        for relay in fleet.proxies.values():
            if info(relay)["maintenance"] == "on":
                admin(relay, "resume")
        for c in conns.values():
            c.close()


def test_a_switchover_without_promote_to_a_replica_is_refused_and_changes_nothing(ui, fleet):
    old = info(fleet.proxies["proxy-a"])["write_leader"]
    new = next(n.name for n in fleet.cluster.nodes if n.name != old)
    assert fleet.cluster[new].in_recovery()
    epoch = fleet.control.deployment()["epoch"]
    ui.allowed.append(r"409")  # the refusal's answer, logged by the browser
    ui.signed_in("operations")
    ui.wait(lambda: new in [o.get_attribute("value") for o in
                            Select(ui.el("sw-node")).options], "the nodes in the switchover form")
    Select(ui.el("sw-node")).select_by_value(new)
    if ui.el("sw-promote").is_selected():
        ui.el("sw-promote").click()
    ui.el("sw-start").click()
    said = ui.confirm([f"from {old} to {new}"])
    assert "promote" not in said, said
    txt = confirm_and_wait(ui, "switchover")
    assert "Failed (HTTP 409)" in txt and "use --promote" in txt, txt
    assert fleet.control.deployment()["epoch"] == epoch
    for node_id, relay in fleet.proxies.items():
        own = info(relay)
        assert (own["write_leader"], own["epoch"], own["maintenance"]) == (old, epoch, "off"), \
            (node_id, own)


def test_a_switchover_from_the_ui_moves_both_proxies_and_the_page_shows_the_new_leader(ui, fleet):
    old = info(fleet.proxies["proxy-a"])["write_leader"]
    new = next(n.name for n in fleet.cluster.nodes if n.name != old)
    old_node, new_node = fleet.cluster[old], fleet.cluster[new]
    fleet.cluster.wait_caught_up(new_node, old_node)
    epoch_before = fleet.control.deployment()["epoch"]

    ui.signed_in("operations")
    ui.wait(lambda: new in [o.get_attribute("value") for o in
                            Select(ui.el("sw-node")).options], "the nodes in the switchover form")
    Select(ui.el("sw-node")).select_by_value(new)
    if not ui.el("sw-promote").is_selected():
        ui.el("sw-promote").click()
    ui.el("sw-start").click()
    said = ui.confirm([f"from {old} to {new}", "promoted", f"{old} is fenced"])
    assert str(epoch_before + 1) in said, said
    txt = confirm_and_wait(ui, "switchover")
    assert "Succeeded" in txt and f"leader {new}" in txt, txt
    epoch = fleet.control.deployment()["epoch"]
    assert epoch > epoch_before
    # the steps, as the operation record has them
    ui.wait(lambda: all(s in ui.text("op-live") for s in ("pause", "fence", "promote",
                                                          "switch", "resume")),
            "the switchover's steps on the page")
    ui.screenshot("operations-switchover")
    for node_id, relay in fleet.proxies.items():
        own = info(relay)
        assert (own["write_leader"], own["epoch"]) == (new, epoch), (node_id, own)
    assert not new_node.in_recovery()

    ui.open("fleet")
    ui.wait(lambda: ui.text("leader") == new and ui.text("epoch") == str(epoch),
            f"the fleet page to show {new} at epoch {epoch}")
    ui.wait(lambda: all(r[7] == new and r[6] == str(epoch)
                        for n, r in ui.rows("proxies").items() if n in ADDRESSES),
            "both proxies on the new leader")
    ui.wait(lambda: any(r[1] == new and r[2] == str(epoch) and r[3] == "switchover"
                        for r in ui.rows("leaders").values()), "the switchover in the history")
    ui.screenshot("fleet-after-switchover")

    # give the fleet its replica back: the old primary follows the new one
    fleet.cluster.rebuild_as_replica(old, new_node)
    fleet.cluster.wait_streaming(new_node, 1)


def test_charts_mark_the_leader_change_and_maintenance(ui, fleet):
    dep = fleet.control.deployment()
    ui.signed_in("charts")
    canvas = "chart-statements"
    ui.wait(lambda: f"{dep['leader']}@{dep['epoch']}" in
            ui.attr(canvas, "data-leaders"),
            f"a marker for {dep['leader']} at epoch {dep['epoch']}")
    assert ui.attr(canvas, "data-maintenance") == "0"
    path = f"/deployments/{DEPLOYMENT}/maintenance"
    status, body = fleet.control.api("POST", path, {"on": True, "timeout_s": 10})
    assert status == 200, body
    try:
        ui.wait(lambda: ui.attr(canvas, "data-maintenance") == "1",
                "the maintenance period on the chart")
        time.sleep(3)  # not a synchronisation: a few seconds of shading for the screenshot
        ui.screenshot("charts-markers")
    finally:
        status, body = fleet.control.api("POST", path, {"on": False, "timeout_s": 10})
        assert status == 200, body


def test_a_config_apply_one_proxy_refuses_names_it_and_changes_nothing(ui, fleet):
    """A third proxy, proxy-c, runs max_client_conn = 500 (restart-only): a text with 1000
    suits proxy-a and proxy-b but proxy-c refuses it, so none takes it."""
    current = fleet.control.get(f"/deployments/{DEPLOYMENT}/config")
    with open(fleet.proxies["proxy-a"].conf_path) as f:
        base_text = f.read()
    files = {}
    for node_id, relay in fleet.proxies.items():
        with open(relay.conf_path) as f:
            files[node_id] = f.read()
    versions = {n: fleet.control.proxies()[n]["config_version"] for n in ADDRESSES}
    c_text = base_text.replace("max_client_conn = 1000", "max_client_conn = 500")
    assert c_text != base_text
    proxy_c = start_proxy(fleet.root, "proxy-c", "127.0.0.4", c_text)
    ui.allowed.append(r"409")  # the refused apply's answer, logged by the browser
    try:
        wait_for(lambda: "proxy-c" in fleet.live_proxies(), timeout=10,
                 what="proxy-c registered and live")
        new_text = re.sub(r"^leader_change_grace = .*$", "leader_change_grace = 15s", base_text,
                          flags=re.M)
        assert new_text != base_text
        ui.signed_in("operations")
        upload = os.path.join(fleet.root, "upload-pgrelay.ini")
        with open(upload, "w") as f:
            f.write(new_text)
        ui.el("cfg-file").send_keys(upload)  # uploaded, as an operator picks a file
        ui.wait(lambda: ui.el("cfg-text").get_attribute("value") == new_text,
                "the uploaded file in the text area")
        ui.el("cfg-apply").click()
        ui.confirm(["Apply this pgrelay.ini to every live proxy of prod"])
        # what changes, per proxy, against the settings it reports running
        diff = ui.text("confirm-diff")
        assert re.search(r"proxy-a: 1 setting\(s\) change\s+leader_change_grace: 10s \u2192 15s",
                         diff), diff
        assert "max_client_conn: 500 \u2192 1000" in diff.split("proxy-c:")[1], diff
        if current["text"]:
            assert "- leader_change_grace = 10s" in diff and "+ leader_change_grace = 15s" in diff
        ui.screenshot("operations-confirm-config")
        txt = confirm_and_wait(ui, "config apply")
        assert "Failed (HTTP 409)" in txt, txt
        assert "proxy-c" in ui.text("op-refused"), txt
        answers = ui.rows("op-result")
        assert answers["proxy-c"][1] == "no" and "max_client_conn" in answers["proxy-c"][2], answers
        ui.screenshot("operations-config-refused")

        for node_id, relay in fleet.proxies.items():
            with open(relay.conf_path) as f:
                assert f.read() == files[node_id], f"{node_id}'s file changed"
            assert fleet.control.proxies()[node_id]["config_version"] == versions[node_id]
        assert fleet.control.get(f"/deployments/{DEPLOYMENT}/config")["version"] == \
            current["version"]
    finally:
        stop_proxy(proxy_c)
        wait_for(lambda: "proxy-c" not in fleet.live_proxies(), timeout=15, interval=0.2,
                 what="proxy-c to be no longer live")


# --------------------------------------------------------------------------- #
# the control plane going away
# --------------------------------------------------------------------------- #


def test_the_page_says_when_the_control_plane_stops_answering_and_when_it_is_back(ui, fleet):
    ui.signed_in("fleet")
    leader = fleet.control.deployment()["leader"]
    ui.wait(lambda: ui.text("leader") == leader, "the fleet page")
    ui.allowed.append(r"ERR_CONNECTION_REFUSED|Failed to fetch|503")
    fleet.control.stop()
    try:
        ui.wait(lambda: "Reconnecting" in ui.text("notice"), "the reconnect notice", timeout=5)
        assert ui.text("leader") == leader  # the last state stays, said to be stale
        ui.screenshot("fleet-control-plane-down")
    finally:
        fleet.control.start()
    ui.wait(lambda: "Reconnected" in ui.text("notice"), "the notice that it is back", timeout=15)
    ui.wait(lambda: ui.text("leader") == leader, "the leader again")
    assert ui.visible("page-fleet") and not ui.visible("login")


def test_a_config_apply_committed_but_not_everywhere_is_shown_as_committed_not_failed(ui, fleet):
    """A version committed on some proxies and pending on others is in force (the pending ones
    converge): the page says so and names them, instead of "Failed". Making a real proxy miss
    its commit at the right instant is the fault suite's work (test_config_apply_faults.py,
    which checks the same answer from the API); here the browser gets that answer, as
    docs/protocol.md gives it, for the page's POST, and the rest of the page is the real one."""
    answer = {"ok": False, "state": "committed", "version": 41, "operation": 9,
              "committed": True, "outcome": "version 41 committed on 1 of 2 proxies; pending: "
              "proxy-b", "pending": ["proxy-b"],
              "proxies": [{"node_id": "proxy-a", "ok": True, "detail": "committed version 41"},
                          {"node_id": "proxy-b", "ok": False,
                           "detail": "no answer to the commit within the timeout"}]}
    ui.signed_in("operations")
    ui.d.execute_script("""
        const answer = arguments[0], real = window.fetch;
        window.fetch = (path, opts) => (opts && opts.method === 'POST' && /\\/config$/.test(path))
          ? Promise.resolve(new Response(JSON.stringify(answer),
              {status: 200, headers: {'Content-Type': 'application/json'}}))
          : real(path, opts);""", answer)
    with open(fleet.proxies["proxy-a"].conf_path) as f:
        text = f.read() + "\n; edited\n"
    box = ui.el("cfg-text")
    box.clear()
    box.send_keys(text)
    ui.el("cfg-apply").click()
    ui.confirm(["Apply this pgrelay.ini"])
    txt = confirm_and_wait(ui, "config apply")
    assert "Committed, not yet on every proxy (HTTP 200); version 41" in txt, txt
    assert "Failed" not in txt, txt
    assert "proxy-b" in ui.text("op-pending"), txt
    ui.screenshot("operations-config-committed")
