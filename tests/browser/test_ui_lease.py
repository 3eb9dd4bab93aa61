"""The web UI with two pgrelay-control replicas sharing a store under a lease.

Every replica serves the UI's files; only the lease holder serves /api/v1. The UI of the
replica without the lease says so on its login page; when the holder dies, its page says the
control plane does not answer, and the UI of the replica that took the lease over signs in
and shows the fleet the store kept. Agents are simulated (tests/integration/test_control_api).
"""

import os

import pytest

from conftest import require, wait_for
from test_control_api import (ADMIN, SimAgent, control_factory, store)  # noqa: F401

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError:  # make deps installs python3-selenium
    webdriver = None

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
LEASE = {"enabled": "on", "lease_duration_secs": 3, "lease_interval_secs": 1,
         "release_timeout_secs": 2}


@pytest.fixture
def driver():
    require(webdriver is not None and os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER),
            "python3-selenium, chromium and chromium-driver (make deps)")
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield d
    finally:
        d.quit()


def text(d, id_):
    els = d.find_elements(By.ID, id_)
    return els[0].text if els and els[0].is_displayed() else ""


def sign_in(d, port):
    d.get(f"http://127.0.0.1:{port}/ui/#fleet")
    wait_for(lambda: d.find_element(By.ID, "login").is_displayed(), timeout=10,
             what="the login form")
    d.find_element(By.ID, "token").send_keys(ADMIN)
    d.find_element(By.ID, "login-button").click()


def test_the_ui_of_a_replica_without_the_lease_says_so_and_the_next_holder_serves_it(
        control_factory, driver):  # noqa: F811
    first = control_factory(lease=LEASE)
    second = control_factory(lease=LEASE, wait_ready=False)
    assert first.ready() and not second.ready()
    SimAgent(first, "proxy-a").register(hostname="seen-by-the-first")

    sign_in(driver, second.port)  # its files are served, its API is not
    wait_for(lambda: "does not hold the lease" in text(driver, "login-error"), timeout=10,
             what="the login page to say this replica does not hold the lease")

    sign_in(driver, first.port)
    wait_for(lambda: "proxy-a" in text(driver, "proxies"), timeout=10,
             what="the holder's fleet page")
    first.kill9()
    wait_for(lambda: "Reconnecting" in text(driver, "notice"), timeout=10,
             what="the holder's page to say the control plane does not answer")

    wait_for(second.ready, timeout=LEASE["lease_duration_secs"] + LEASE["lease_interval_secs"] + 5,
             interval=0.1, what="the second replica to take the lease over")
    sign_in(driver, second.port)
    wait_for(lambda: "proxy-a" in text(driver, "proxies"), timeout=10,
             what="the new holder's fleet page with the proxy the store kept")
    assert "seen-by-the-first" in text(driver, "proxies")
