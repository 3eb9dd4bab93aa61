"""A declared proxy cut off from the control plane for longer than proxy_timeout before a
switchover (issue 8, Deliver 7). proxy-b reaches the control plane at 127.0.0.3 and an nftables
rule drops what it sends there; once the control plane counts it as gone, a switchover only
addresses proxy-a, so nothing pauses proxy-b or tells it the new leader: it goes on routing to
the old primary until it hears again. That is safe only because the old primary is fenced
(it then takes no write from anyone); so:

* without --force the switchover goes on (the fence holds), names the silent proxy in its
  record, and a write recorder through both proxies shows that no write was acknowledged on the
  old primary after one was acknowledged on the new one (two nodes never both took writes) and
  that none was lost;
* with --force and an old primary that cannot be fenced, it is refused and names the silent
  proxy (nothing would stop that proxy's writes to the old primary), changing nothing.
"""

import time
import uuid

import pytest

import loadgen
from conftest import wait_for
from control_e2e_helpers import DEPLOYMENT, info
from fleet import Fleet
from test_partition import CUT_HOST, partition

EXIT_OK = 0
PROXY_TIMEOUT = "3s"  # the control plane's proxy_timeout in these scenarios
SETTINGS = {"listen_addr": "0.0.0.0", "proxy_timeout": PROXY_TIMEOUT,
            "poll_wait_max": "2s"}  # a parked long poll keeps a proxy live until it ends


class Recorder(loadgen.Writer):
    """Writes through one proxy, one autocommit INSERT at a time (statement_timeout 5 s), each
    answered with the port of the node that committed it; keeps (sent, acknowledged, port, n)
    of every acknowledged write (monotonic times)."""

    def __init__(self, relay, table, tag):
        def insert(conn, n):
            return conn.execute(f"INSERT INTO {table} (proxy, n) VALUES (%s, %s)"
                                " RETURNING inet_server_port()", (tag, n)).fetchone()

        super().__init__(relay, insert, pause=0.05, interval=0.01, connect_timeout=2,
                         setup=lambda conn: conn.execute("SET statement_timeout = 5000"))
        self.table, self.tag = table, tag
        self.start()

    @property
    def acked(self):
        return [(sent, done, port, n) for n, sent, done, port in self.ok]

    def finish(self):
        self.stop(timeout=15)


def assert_one_writable_node_at_a_time(recorders, old, new):
    """No write sent after a write on ``new`` was acknowledged was acknowledged on ``old``:
    both nodes never took writes at the same time, through any proxy."""
    on_old = [(r.tag, s, a) for r in recorders for (s, a, p, _) in r.acked if p == old.port]
    on_new = [(r.tag, s, a) for r in recorders for (s, a, p, _) in r.acked if p == new.port]
    assert on_old and on_new, (len(on_old), len(on_new))
    first_new = min(on_new, key=lambda w: w[2])
    late = [w for w in on_old if w[1] > first_new[2]]
    assert not late, (f"acknowledged on {old.name} though sent after {first_new[0]}'s write on "
                      f"{new.name} was acknowledged: {late[:5]}")


def make_table(fleet):
    table = "silent_" + uuid.uuid4().hex[:8]
    with fleet.a.connect() as c:
        c.execute(f"CREATE TABLE {table} (proxy text, n int)")
    return table


def wait_gone(fleet, node_id):
    wait_for(lambda: not fleet.control.proxies()[node_id]["live"], timeout=20, interval=0.2,
             what=f"the control plane to count {node_id} as gone (proxy_timeout)")


class PolicyFleet(Fleet):
    """A fleet whose proxies run with control_lost = ``policy``."""

    policy = "keep_leader"

    def ini(self, node_id=None):
        return super().ini(node_id).replace("control_lost = decide_alone",
                                            f"control_lost = {self.policy}")


@pytest.mark.parametrize("policy", ["keep_leader", "decide_alone", "stop_writes"])
def test_a_switchover_with_a_declared_proxy_silent_past_proxy_timeout_keeps_one_writer(pg, policy):
    """proxy-b runs with control_lost = ``policy``: keep_leader and stop_writes leave it on the
    fenced pg1 or on none (its writes fail until it is back), decide_alone moves it to pg2 by
    itself once pg1 is fenced; in every case one node at a time takes writes."""
    started = time.monotonic()
    PolicyFleet.policy = policy
    with PolicyFleet.start(pg, control_settings=SETTINGS,
                           control_hosts={"proxy-b": CUT_HOST}) as fleet:
        pg1, pg2 = fleet.cluster["pg1"], fleet.cluster["pg2"]
        table = make_table(fleet)
        recorders = [Recorder(r, table, n) for n, r in fleet.proxies.items()]
        try:
            wait_for(lambda: all(len(r.acked) > 3 for r in recorders), timeout=10,
                     what="both recorders to get going")
            with partition(fleet.control.port):
                wait_gone(fleet, "proxy-b")
                rc, out, err = fleet.ctl_json("switchover", "--node", "pg2", "--promote",
                                              "--timeout", "20")
                assert rc == EXIT_OK, (out, err)
                assert "pg1 fenced" in out["steps"]["fence"], out
                assert "proxy-b" in out["steps"]["pause"], out  # the silent proxy is named
                assert [p["node_id"] for p in out["proxies"]] == ["proxy-a"], out
                assert info(fleet.a)["write_leader"] == "pg2"
                # some time with proxy-b cut off: it tries on (whatever its control_lost
                # makes of it) while proxy-a writes on pg2
                tries_b = len(recorders[1].acked) + len(recorders[1].errors)
                n_a = len(recorders[0].acked)
                wait_for(lambda: len(recorders[0].acked) > n_a + 20 and
                         len(recorders[1].acked) + len(recorders[1].errors) > tries_b + 3,
                         timeout=15, what="writes through proxy-a on pg2, tries through proxy-b")
            # back: proxy-b hears the new leader and writes again, on pg2
            wait_for(lambda: info(fleet.b)["write_leader"] == "pg2", timeout=20,
                     what="proxy-b to follow pg2 once it hears the control plane again")
            n_b = len(recorders[1].acked)
            wait_for(lambda: len(recorders[1].acked) > n_b + 3, timeout=15,
                     what="writes through proxy-b again")
        finally:
            for r in recorders:
                r.finish()
        assert_one_writable_node_at_a_time(recorders, pg1, pg2)
        rows = set(pg2.query(f"SELECT proxy, n FROM {table}"))
        lost = [(r.tag, n) for r in recorders for (_, _, _, n) in r.acked if (r.tag, n) not in rows]
        assert not lost, f"acknowledged writes missing on pg2: {lost[:10]}"
        [op] = fleet.control.get(f"/deployments/{DEPLOYMENT}/operations")
        assert op["state"] == "done", op
    print(f"scenario time {time.monotonic() - started:.1f}s (control_lost = {policy}; proxy-b: "
          f"{len(recorders[1].acked)} writes, {len(recorders[1].errors)} errors)")


def test_a_forced_switchover_is_refused_while_a_declared_proxy_is_silent(pg):
    """pg1 down (cannot be fenced), proxy-b silent past proxy_timeout: --force takes the risk
    of an unfenced old primary, not that of a proxy nobody can tell the new leader; refused,
    naming proxy-b, and pg2 is not promoted."""
    started = time.monotonic()
    with Fleet.start(pg, control_settings=SETTINGS, control_hosts={"proxy-b": CUT_HOST}) as fleet:
        pg2 = fleet.cluster["pg2"]
        epoch = fleet.control.deployment()["epoch"]
        with partition(fleet.control.port):
            wait_gone(fleet, "proxy-b")
            fleet.cluster.stop_node("pg1", mode="immediate")
            rc, out, err = fleet.ctl_json("switchover", "--node", "pg2", "--promote", "--force",
                                          "--timeout", "20")
            assert rc != EXIT_OK, out
            error = (out or {}).get("error", err)
            assert "proxy-b" in error and "NOT FENCED" in error, (out, err)
            assert pg2.in_recovery(), "pg2 was promoted while proxy-b may write to pg1"
            assert fleet.control.deployment()["epoch"] == epoch
            wait_for(lambda: info(fleet.a)["maintenance"] == "off", timeout=5,
                     what="proxy-a to resume after the refusal")
        # with proxy-b back (live again) the operator's --force goes through
        wait_for(lambda: fleet.control.proxies()["proxy-b"]["live"], timeout=20,
                 what="proxy-b live again")
        rc, out, err = fleet.ctl_json("switchover", "--node", "pg2", "--promote", "--force",
                                      "--timeout", "20")
        assert rc == EXIT_OK, (out, err)
        assert not pg2.in_recovery()
    print(f"scenario time {time.monotonic() - started:.1f}s")
