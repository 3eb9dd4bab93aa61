"""Split brain: two primaries at once keep the current write leader.

Each test builds its own PostgreSQL 15 cluster (pg1 primary, pg2 and pg3 streaming replicas;
see cluster.py) and its own pgrelay with health_interval = 200ms, fall = 2, rise = 1, a
read-only port, pg1 as role = primary and pg2/pg3 as role = replica (failover_helpers.py's
ha_relay). What is asserted is what a user relies on (pgrelay(8), pgrelay-agent(8),
pgrelay.ini(5)):

  * two primaries at once keep the current leader (SPLIT BRAIN logged).
"""

import pytest

from cluster import (  # noqa: F401,F811 (fixtures used by name)
    admin,
    leader_history,
    make_cluster,
    show_info,
    wait_probe_rounds,
)
from failover_helpers import ha_relay, say, wait_log  # noqa: F401,F811 (fixtures used by name)

pytestmark = pytest.mark.deadline(90)


# --------------------------------------------------------------------------- #
# two primaries at once
# --------------------------------------------------------------------------- #


def test_split_brain_keeps_the_current_leader(make_cluster, ha_relay, say):
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE sb (port int)")
    c.wait_caught_up(pg2)
    relay = ha_relay(c)
    held = relay.connect()
    info0 = show_info(relay)
    hist0 = leader_history(relay)

    pg2.promote()
    line = wait_log(relay, "SPLIT BRAIN", timeout=5)
    say(f"log: {line[0]}")
    assert "pg2" in line[0]
    wait_probe_rounds(relay)  # with two primaries

    for _ in range(5):
        with relay.connect() as w:
            port, rec = w.execute(
                "INSERT INTO sb VALUES (inet_server_port()) RETURNING port, pg_is_in_recovery()"
            ).fetchone()
            assert (port, rec) == (pg1.port, False)
    held.execute("INSERT INTO sb VALUES (inet_server_port())")
    assert pg1.query("SELECT count(*) FROM sb WHERE port = %s", (pg1.port,))[0][0] == 6
    assert pg2.query("SELECT count(*) FROM sb")[0][0] == 0
    info = show_info(relay)
    assert (info["write_leader"], info["epoch"]) == ("pg1", info0["epoch"]), info
    assert leader_history(relay) == hist0

    # set leader to a node in recovery: refused without force
    out = admin(relay, "set leader pg3")
    say(f"set leader pg3 -> {out.strip()}")
    assert out.startswith("error:") and "recovery" in out, out
    wait_probe_rounds(relay, rounds=2)
    info = show_info(relay)
    assert (info["write_leader"], info["epoch"]) == ("pg1", info0["epoch"]), info
    assert leader_history(relay) == hist0
    held.close()
