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
import socket
import time
import uuid

import pytest

from cluster import Cluster
from conftest import admin, require, wait_for
from control_e2e_helpers import (ADMIN_TOKEN, API, DEPLOYMENT, ControlPlane, cleanup_dir, http,
                                 info, make_root, render_ini, start_proxy, stop_proxy)
from loadgen import InThread

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
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


def free_listen_port():
    """A port free on 127.0.0.2 and 127.0.0.3 (the proxies' addresses)."""
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.3", port))
    return port


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
        for attempt in range(3):
            fl = Fleet(root, control, cluster, proxies, free_listen_port())
            try:
                for node_id, address in ADDRESSES.items():
                    proxies[node_id] = start_proxy(root, node_id, address, fl.ini())
                break
            except AssertionError:
                for r in proxies.values():
                    stop_proxy(r)
                proxies.clear()
                if attempt == 2:
                    raise
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

    def visible(self, id_):
        els = self.d.find_elements(By.ID, id_)
        return bool(els) and els[0].is_displayed()

    def text(self, id_):
        return self.el(id_).text

    def wait(self, cond, what, timeout=15):
        def safe():
            try:
                return cond()
            except StaleElementReferenceException:
                return None
        return wait_for(safe, timeout=timeout, interval=0.1, what=what)

    def rows(self, table_id):
        """The body rows of a table as lists of cell texts, keyed by the first cell."""
        out = {}
        for tr in self.d.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr"):
            cells = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            if cells:
                out[cells[0]] = cells
        return out

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
        ui.wait(lambda: ui.rows("nodes")[leader][6] != "0", "a session on the leader")
        ui.wait(lambda: ui.rows("nodes")[leader][7] not in ("-", "0"),
                "statements/s on the leader")
    ui.screenshot("fleet")


def test_the_page_follows_itself_once_a_second(ui, fleet):
    """The 'updated' stamp moves every second without a reload."""
    ui.signed_in("fleet")
    seen = set()
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        seen.add(ui.text("updated"))
        time.sleep(0.1)
    assert len(seen - {""}) >= 3, seen
