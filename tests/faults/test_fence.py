"""A fence that holds (issue 8, Deliver 3; issue 13 item 1): the old primary of a switchover
accepts no writes from anyone until `pgrelayctl unfence`; one that cannot be fenced stops
the switchover unless --force; a switchover to a replica without --promote is refused at once.
"""

import time
import uuid

import psycopg
import pytest

from conftest import wait_for
from control_e2e_helpers import info, table_rows
from fleet import (
    Fleet,
    Watch,
    Writer,
    assert_no_acknowledged_write_lost,
    direct_write_fails,
)

EXIT_OK = 0


def make_table(fleet):
    table = "faults_" + uuid.uuid4().hex[:8]
    with fleet.a.connect() as c:
        c.execute(f"CREATE TABLE {table} (proxy text, n int)")
    return table


def test_a_promote_switchover_fences_the_old_primary_until_unfence(pg):
    """switchover --promote with a client writing through each proxy: every acknowledged row
    is on the new primary; the old primary refuses a fresh BEGIN READ WRITE; INSERT; COMMIT
    (the connection itself is refused), and keeps refusing until `pgrelayctl unfence pg1`;
    then it has no row the new primary lacks (nothing committed on it after the fence)."""
    started = time.monotonic()
    with Fleet.start(pg) as fleet:
        pg1, pg2 = fleet.cluster["pg1"], fleet.cluster["pg2"]
        table = make_table(fleet)
        watch = Watch(fleet)
        writers = [Writer(r, table, n) for n, r in fleet.proxies.items()]
        try:
            wait_for(lambda: all(len(w.acked) > 5 for w in writers), timeout=10,
                     what="both writers to get going")
            rc, out, err = fleet.ctl_json("switchover", "--node", "pg2", "--promote",
                                          "--timeout", "20")
            wait_for(lambda: all(len(w.acked) > 0 and w.acked[-1] > 0 for w in writers),
                     timeout=5, what="writes after the switchover")
            time.sleep(0.3)
        finally:
            for w in writers:
                w.finish()
        assert rc == EXIT_OK, (out, err)
        # fenced: a fresh read-write transaction from a normal client does not commit
        error = direct_write_fails(pg1, table)
        assert "not currently accepting connections" in error, error
        watch.check()
        assert out["ok"] is True and out["leader"] == "pg2", out
        assert "pg1 fenced" in out["steps"]["fence"], out
        assert not pg2.in_recovery()
        for relay in fleet.proxies.values():
            assert info(relay)["write_leader"] == "pg2"
        assert_no_acknowledged_write_lost(pg2, table, writers)
        time.sleep(1.0)
        direct_write_fails(pg1, table)  # and it stays so

        # the operation's record, as pgrelayctl show-operations prints it
        p = fleet.ctl("show-operations")
        assert p.returncode == EXIT_OK, p.stderr
        [row] = table_rows(p.stdout)
        assert (row["node"], row["old_leader"], row["state"]) == ("pg2", "pg1", "done"), row
        assert row["steps"].startswith("pause fence catch_up promote switch resume"), row

        rc, out, err = fleet.ctl_json("unfence", "pg1", "--timeout", "5")
        assert rc == EXIT_OK, (out, err)
        assert "pg1 unfenced" in out["detail"], out
        rows_pg1 = set(pg1.query(f"SELECT proxy, n FROM {table}"))
        rows_pg2 = set(pg2.query(f"SELECT proxy, n FROM {table}"))
        assert rows_pg1 <= rows_pg2, f"written on pg1 after the fence: {rows_pg1 - rows_pg2}"
        assert not pg1.in_recovery()
    print(f"scenario time {time.monotonic() - started:.1f}s")


def test_an_old_primary_that_cannot_be_reached_stops_the_promote_unless_forced(pg):
    """The old primary is down: switchover --promote is refused (nothing promoted, the fleet
    resumes on the old leader); with --force it goes on, and the answer says it was forced and
    that pg1 was NOT fenced."""
    started = time.monotonic()
    with Fleet.start(pg) as fleet:
        pg2 = fleet.cluster["pg2"]
        fleet.cluster.stop_node("pg1", mode="immediate")
        watch = Watch(fleet)
        rc, out, err = fleet.ctl_json("switchover", "--node", "pg2", "--promote", "--timeout",
                                      "15")
        assert rc != EXIT_OK, out
        assert "cannot fence pg1" in (out or {}).get("error", err), (out, err)
        assert pg2.in_recovery(), "pg2 was promoted without a fence"
        for relay in fleet.proxies.values():
            wait_for(lambda: info(relay)["maintenance"] == "off", timeout=5,
                     what="the fleet to resume after the refusal")
        rc, out, err = fleet.ctl_json("switchover", "--node", "pg2", "--promote", "--force",
                                      "--timeout", "20")
        assert rc == EXIT_OK, (out, err)
        assert out["forced"] is True and out["steps"]["fence"].startswith("NOT FENCED"), out
        assert not pg2.in_recovery()
        for relay in fleet.proxies.values():
            assert info(relay)["write_leader"] == "pg2"
        assert "NOT FENCED" in fleet.control.log_since(0)
        watch.check()
    print(f"scenario time {time.monotonic() - started:.1f}s")


def test_a_switchover_to_a_replica_without_promote_is_refused_at_once_and_changes_nothing(pg):
    """A typo (`switchover --node pg2` while pg2 is a replica): refused at once with
    "pg2 is in recovery; use --promote"; no pause, no new epoch, writes carry on."""
    started = time.monotonic()
    with Fleet.start(pg) as fleet:
        before = {n: info(r) for n, r in fleet.proxies.items()}
        epoch = fleet.control.deployment()["epoch"]
        watch = Watch(fleet)
        t0 = time.monotonic()
        rc, out, err = fleet.ctl_json("switchover", "--node", "pg2", "--timeout", "10")
        took = time.monotonic() - t0
        assert rc != EXIT_OK, out
        assert "pg2 is in recovery; use --promote" in err, (out, err)
        assert took < 2, took
        assert fleet.control.deployment()["epoch"] == epoch
        time.sleep(0.5)
        for n, r in fleet.proxies.items():
            own = info(r)
            assert (own["write_leader"], own["epoch"], own["maintenance"]) == \
                (before[n]["write_leader"], before[n]["epoch"], "off"), own
            with r.connect() as c:
                c.execute("CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (1)")
        watch.check()
    print(f"scenario time {time.monotonic() - started:.1f}s")


def test_a_switchover_without_promote_fences_and_drains_the_old_leader_first(pg):
    """pg2 promoted by hand; a transaction left open on pg1 through proxy-a; switchover --node
    pg2: that transaction cannot commit on pg1 any more, pg1 refuses new writes, and both
    proxies route to pg2."""
    started = time.monotonic()
    with Fleet.start(pg) as fleet:
        pg1, pg2 = fleet.cluster["pg1"], fleet.cluster["pg2"]
        table = make_table(fleet)
        fleet.cluster.wait_caught_up(pg2, pg1)
        open_tx = psycopg.connect(fleet.a.conninfo(), autocommit=False)
        open_tx.execute(f"INSERT INTO {table} VALUES ('open', 1)")
        pg2.promote()
        watch = Watch(fleet)
        # until every agent has reported pg2 out of recovery, the switchover is refused
        # (changing nothing): try again meanwhile
        deadline = time.monotonic() + 5
        while True:
            rc, out, err = fleet.ctl_json("switchover", "--node", "pg2", "--timeout", "20")
            if "in recovery" not in err or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert rc == EXIT_OK, (out, err)
        with pytest.raises(psycopg.Error):
            open_tx.execute("COMMIT")
        open_tx.close()
        direct_write_fails(pg1, table)
        assert "pg1 fenced" in out["steps"]["fence"], out
        for relay in fleet.proxies.values():
            assert info(relay)["write_leader"] == "pg2"
        watch.check()
    print(f"scenario time {time.monotonic() - started:.1f}s")
