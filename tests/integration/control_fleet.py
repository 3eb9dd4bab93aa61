"""A fleet (pgrelay-control, a primary and a replica, two real proxies as separate hosts) handed
to every test in the same known state, so that no test depends on which ran before it.

Building a fleet costs about 2.5 s (a store database, initdb + pg_basebackup, three daemons) and
most tests leave it as they found it. So ``FleetKeeper.get()``, called by a function-scoped
fixture before each test, first resets the fleet the previous test left (cheap steps only: a
proxy id that test declared is deleted) and then checks it against the state it was built in:

  * every daemon runs: pgrelay-control answers /readyz, every proxy's master is alive;
  * the cluster is as built: pg1 a primary, pg2 in recovery and streaming from it;
  * the configuration is as built: the committed version and text, each proxy's pgrelay.ini and
    its running configuration (``show config``);
  * the declared proxies are exactly the fleet's own, every one live at the control plane;
  * one leader, one epoch: the deployment's leader is pg1, and every proxy's own console and its
    show-proxies row name pg1 at the deployment's epoch, out of maintenance, and no client
    session is left on any proxy (the last test's sessions are gone);
  * every agent reports: a new metrics report from each since the check began.

The first four are facts checked once; the last two may still be settling when a test has just
restarted the control plane, resumed an agent (a reporter backs off up to 30 s after failures)
or closed its sessions, so they are waited for (a few seconds). A fleet that fails any check is
torn down and a new one built, which must pass the same checks (so the reset is verified either
way). Moving the leader (a switchover, a failover) or committing a
configuration cannot be undone cheaply: the next test gets a new fleet.

PGRELAY_FRESH_FLEET=1 in the environment builds a new fleet for every test (to measure the cost,
or to rule the reuse out when hunting an order dependency).
"""

import contextlib
import os
import socket
import sys
import time
import uuid

from conftest import admin_json, free_port, wait_for
from cluster import Cluster
from control_e2e_helpers import (DEPLOYMENT, ControlPlane, cleanup_dir, ctl_json, info, make_root,
                                 render_ini, run_ctl, running_config, start_proxy, stop_proxy)

ADDRESSES = {"proxy-a": "127.0.0.2", "proxy-b": "127.0.0.3"}
LEADER = "pg1"  # the fleet's write leader as built
SETTLE_S = 5  # how long "one leader, one epoch" may take to settle after the previous test


class Fleet:
    """One fleet: ``control`` (a ControlPlane), ``cluster`` (pg1 primary, pg2 replica),
    ``proxies`` (node id -> Relay, each a separate host) all running the same pgrelay.ini."""

    def __init__(self, pg, root, control, store_db, cluster, listen_port):
        self.pg = pg
        self.root = root
        self.control = control
        self.store_db = store_db
        self.cluster = cluster
        self.proxies = {}  # node_id -> Relay
        self.listen_port = listen_port
        self.built = None  # what the checks compare with, recorded once built

    @property
    def a(self):
        return self.proxies["proxy-a"]

    @property
    def b(self):
        return self.proxies["proxy-b"]

    def ini(self, pgrelay=None, **kw):
        return render_ini(self.listen_port, os.path.join(self.root, "host"), self.control.url,
                          self.cluster.relay_nodes(), pgrelay=pgrelay, **kw)

    def ctl(self, *args, **kw):
        return run_ctl(self.control, *args, **kw)

    def ctl_json(self, *args, **kw):
        return ctl_json(self.control, *args, **kw)

    def live_proxies(self):
        return {k: v for k, v in self.control.proxies().items() if v["live"]}

    def committed_config(self):
        rc, shown, err = self.ctl_json("config", "show")
        assert rc == 0, err
        return shown["version"], shown["text"]

    def snapshot(self):
        """What the checks compare: the committed configuration, and per proxy its file and
        its running configuration."""
        files = {}
        for node_id, relay in self.proxies.items():
            with open(relay.conf_path) as f:
                files[node_id] = f.read()
        return {"committed": self.committed_config(), "files": files,
                "running": {n: running_config(r) for n, r in self.proxies.items()}}

    def destroy(self):
        """Stop everything; a proxy that did not stop cleanly fails, after the rest is gone."""
        problems = []
        for relay in self.proxies.values():
            try:
                stop_proxy(relay)
            except AssertionError as e:
                problems.append(str(e))
        self.control.stop()
        self.cluster.destroy()
        self.pg.query(f"DROP DATABASE IF EXISTS {self.store_db} WITH (FORCE)")
        if os.environ.get("PGRELAY_E2E_KEEP"):  # keep the logs for a post-mortem
            print(f"control fleet: logs kept in {self.root}", file=sys.stderr)
        else:
            cleanup_dir(self.root)
        assert not problems, "\n".join(problems)


def free_listen_port():
    """A port of free_port()'s (below the ephemeral range): free on 0.0.0.0, so on 127.0.0.2
    and 127.0.0.3 (the proxies' addresses) too."""
    port = free_port()
    for address in ADDRESSES.values():
        with socket.socket() as s:
            s.bind((address, port))
    return port


def build_fleet(pg, prefix, auto_declare=True):
    """A new fleet, running: the store database ``<prefix>_<random>`` in the session's
    PostgreSQL, pgrelay-control (``auto_declare``; off: the proxies are declared with
    create-proxy first), pg1 + pg2, proxy-a and proxy-b live with the deployment's leader pg1."""
    root = make_root()
    store_db = f"{prefix}_{uuid.uuid4().hex[:10]}"
    pg.query(f"CREATE DATABASE {store_db}")
    control = ControlPlane(
        os.path.join(root, "control"),
        f"host={pg.host} port={pg.port} user=postgres dbname={store_db} connect_timeout=5",
        auto_declare=auto_declare)
    os.makedirs(control.workdir)
    fleet = Fleet(pg, root, control, store_db, None, None)
    try:
        control.start()
        if not auto_declare:
            for node_id in ADDRESSES:
                p = run_ctl(control, "create-proxy", node_id)
                assert p.returncode == 0, p.stderr
        fleet.cluster = Cluster.create(replicas=1)
        fleet.cluster.relay_pinned = True
        for attempt in range(3):
            fleet.listen_port = free_listen_port()
            try:
                for node_id, address in ADDRESSES.items():
                    fleet.proxies[node_id] = start_proxy(root, node_id, address, fleet.ini())
                break
            except AssertionError:
                for r in fleet.proxies.values():
                    with contextlib.suppress(AssertionError):
                        stop_proxy(r)
                fleet.proxies.clear()
                if attempt == 2:
                    raise
        wait_for(lambda: set(fleet.live_proxies()) >= set(ADDRESSES), timeout=15,
                 what="both proxies registered and live")
        # the first metrics reports carry the agents' observations: the control plane then
        # seeds the deployment's leader from them
        wait_for(lambda: control.deployment()["leader"] == LEADER, timeout=15, interval=0.1,
                 what=f"the control plane to settle the deployment's write leader on {LEADER}")
        fleet.built = fleet.snapshot()
        return fleet
    except BaseException:
        with contextlib.suppress(Exception):
            if fleet.cluster is None:
                fleet.cluster = Cluster()  # nothing to destroy but its empty directory
            fleet.destroy()
        raise


def reset(fleet):
    """The cheap steps back to the state as built: a proxy that a test declared and left is
    deleted (in auto_declare mode a proxy that registered once stays declared and counts in
    the quorum)."""
    for node_id, row in fleet.control.proxies().items():
        if node_id not in fleet.proxies and row.get("status") == "declared" and not row["live"]:
            p = fleet.ctl("delete-proxy", node_id)
            assert p.returncode == 0, (node_id, p.stderr)


def problem(fleet):
    """None if ``fleet`` is in its state as built, else what differs."""
    control, cluster = fleet.control, fleet.cluster
    if control.proc is None or control.proc.poll() is not None or not control.ready():
        return "pgrelay-control is not running"
    for node_id, relay in fleet.proxies.items():
        if relay.proc.poll() is not None:
            return f"{node_id} exited ({relay.proc.poll()})"
    primary, replica = cluster[LEADER], cluster["pg2"]
    if not (primary.answers() and replica.answers()):
        return "a database node is down"
    if primary.in_recovery() or not replica.in_recovery():
        return "the cluster's roles moved"
    if primary.scalar("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") < 1:
        return f"pg2 does not stream from {LEADER}"
    now = fleet.snapshot()
    for what in ("committed", "files", "running"):
        if now[what] != fleet.built[what]:
            return f"the configuration changed ({what})"
    rows = control.proxies()
    declared = {n for n, r in rows.items() if r.get("status") == "declared"}
    if declared != set(fleet.proxies):
        return f"the declared proxies are {sorted(declared)}"

    def settled():
        if any(admin_json(r, "show stats")["clients"] for r in fleet.proxies.values()):
            return None
        dep, rows = control.deployment(), control.proxies()
        if dep["leader"] != LEADER:
            return None
        want = (LEADER, dep["epoch"])
        for node_id, relay in fleet.proxies.items():
            own, row = info(relay), rows.get(node_id, {})
            if (own["write_leader"], own["epoch"], own["maintenance"]) != (*want, "off"):
                return None
            if not row.get("live") or (row["leader"], row["epoch"]) != want or \
                    row["maintenance"]:
                return None
        return True

    reports = Reports(control, fleet.proxies)
    try:
        wait_for(settled, timeout=SETTLE_S, interval=0.1, what="one leader, one epoch")
    except AssertionError:
        return (f"not one leader, one epoch and no session within {SETTLE_S}s: deployment "
                f"{control.deployment()}, proxies "
                f"{ {n: info(r) for n, r in fleet.proxies.items()} }")
    try:  # an agent's reporter may still back off from an outage the last test made
        reports.wait(1, timeout=SETTLE_S)
    except AssertionError:
        return f"no metrics report from every proxy within {SETTLE_S}s: {reports.counts}"
    return None


def checked(fleet):
    """reset() then problem(); a check that could not run at all is a problem too."""
    try:
        reset(fleet)
        return problem(fleet)
    except Exception as e:  # e.g. the control plane does not answer
        return f"the check failed: {e!r}"


class FleetKeeper:
    """Hands every test of a module a fleet in its known state (see the module's docstring);
    ``close()`` at the module's end."""

    def __init__(self, pg, prefix, auto_declare=True):
        self.pg, self.prefix, self.auto_declare = pg, prefix, auto_declare
        self.fleet = None
        self.built = self.reused = 0  # for the module's summary line
        self.seconds = 0.0  # spent building, resetting and checking

    def get(self):
        t0 = time.monotonic()
        try:
            fresh = os.environ.get("PGRELAY_FRESH_FLEET") == "1"
            why = "PGRELAY_FRESH_FLEET=1" if fresh else None
            if self.fleet is not None and not fresh:
                why = checked(self.fleet)
                if why is None:
                    self.reused += 1
                    return self.fleet
            if self.fleet is not None:
                print(f"control fleet: a new one ({why})", file=sys.stderr)
                old, self.fleet = self.fleet, None
                old.destroy()
            self.fleet = build_fleet(self.pg, self.prefix, self.auto_declare)
            self.built += 1
            why = checked(self.fleet)
            assert why is None, f"a new fleet is not in its state as built: {why}"
            return self.fleet
        finally:
            self.seconds += time.monotonic() - t0

    def close(self):
        print(f"control fleet: {self.built} built, {self.reused} reused, "
              f"{self.seconds:.1f}s building and checking", file=sys.stderr)
        if self.fleet is not None:
            old, self.fleet = self.fleet, None
            old.destroy()


class Reports:
    """Counts the metrics reports the control plane receives from each proxy: a new
    received_ms in /deployments/prod/metrics is a new report. Polled more often than the
    agents report (metrics_interval 250 ms), a report missed between two polls only makes a
    count slower, never early."""

    def __init__(self, control, node_ids):
        self.control = control
        self.node_ids = list(node_ids)
        self.last = self._received()
        self.counts = dict.fromkeys(self.node_ids, 0)

    def _received(self):
        rows = {m["node_id"]: m for m in self.control.get(f"/deployments/{DEPLOYMENT}/metrics")}
        return {n: rows[n]["received_ms"] if n in rows else None for n in self.node_ids}

    def poll(self):
        """Counts what arrived since the last poll; returns the smallest count."""
        now = self._received()
        for n in self.node_ids:
            if now[n] is not None and now[n] != self.last[n]:
                self.counts[n] += 1
        self.last = now
        return min(self.counts.values())

    def wait(self, count, timeout=10):
        """Until every proxy has sent ``count`` reports since this counter was made."""
        wait_for(lambda: self.poll() >= count, timeout=timeout, interval=0.05,
                 what=f"{count} metrics reports from each of {self.node_ids}: {self.counts}")


def wait_reports(control, count, node_ids=ADDRESSES, timeout=10):
    """Until the control plane has received ``count`` new metrics reports from each proxy."""
    Reports(control, node_ids).wait(count, timeout)
