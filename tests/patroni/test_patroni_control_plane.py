"""pgrelay with ha_source = patroni under a control plane, in front of the real Patroni cluster:
the leader's Patroni is killed with SIGKILL, its PostgreSQL goes on as a primary, and after the
TTL etcd names another member, which Patroni promotes.

The agent reports Patroni's word on each node to the control plane, which does not count a
primary Patroni does not name as a primary: the deployment's leader moves to the promoted
member (without that word, two primaries are a split brain, which keeps the old leader, whose
writes the agent holds because Patroni no longer names it: no writes at all until an operator
steps in).

Invariants: the control plane's leader becomes the member etcd names; every write acknowledged
through pgrelay after etcd was seen naming the new leader is on that member; writes resume on it
while the old primary still answers.
"""

import contextlib
import os
import signal
import time
import uuid

import psycopg
import pytest

from cluster import destroy_relay, start_ha_relay
from conftest import wait_for
from loadgen import Writer
from control_e2e_helpers import PROD_TOKEN, ControlPlane, cleanup_dir, make_root
from patroni_cluster import AGENT, TTL, _NoCluster

pytestmark = pytest.mark.deadline(240)


@pytest.fixture
def controlled_relay(stack, pg):
    """pgrelay (ha_source = patroni) reporting to a pgrelay-control with its own store."""
    store_db = "patroni_cp_" + uuid.uuid4().hex[:8]
    pg.query(f"CREATE DATABASE {store_db}")
    root = make_root()
    control = relay = None
    try:
        control = ControlPlane(root, f"host={pg.host} port={pg.port} user=postgres "
                                     f"dbname={store_db} connect_timeout=5")
        control.start()
        stack.reset()
        leader = stack.leader()
        nodes = [m.relay_node("primary" if m.name == leader else "replica")
                 for m in stack.members.values()]
        urls = ", ".join(f"http://127.0.0.1:{m.api_port}" for m in stack.members.values())
        relay = start_ha_relay(_NoCluster(), nodes=nodes, workers=2, max_client_conn=200,
                               agent=dict(AGENT, ha_source="patroni", ha_patroni_urls=urls),
                               control={"endpoint": control.url, "token": PROD_TOKEN,
                                        "request_timeout": "2s", "metrics_interval": "250ms",
                                        "control_grace_period": "5s"})
        yield control, relay
    finally:
        if relay:
            with contextlib.suppress(Exception):
                destroy_relay(relay)
        if control:
            if os.environ.get("PATRONI_KEEP"):
                print("==== pgrelay-control\n" + control.log_tail(80))
            control.stop()
        cleanup_dir(root)
        with contextlib.suppress(psycopg.Error):
            pg.query(f"DROP DATABASE {store_db} WITH (FORCE)")


def test_kill_9_of_the_leaders_patroni_moves_the_control_planes_leader(stack, controlled_relay):
    control, relay = controlled_relay
    old = stack.leader()
    wait_for(lambda: control.deployment()["leader"] == old, timeout=30,
             what=f"the control plane to name {old}")
    stack.run_on_leader("DROP TABLE IF EXISTS cp_writes; "
                        "CREATE TABLE cp_writes (id bigserial PRIMARY KEY)")
    # a new session per write, each one INSERT: (seq, sent, acknowledged, server port)
    writer = Writer(relay, lambda conn, seq: conn.execute(
        "INSERT INTO cp_writes VALUES (DEFAULT) RETURNING inet_server_port()").fetchone(),
        session_per_row=True, pause=0.05, connect_timeout=3).start()
    try:
        old_port = stack.member(old).pg_port
        wait_for(lambda: any(w[3] == old_port for w in writer.ok), timeout=30,
                 what=f"writes through pgrelay on {old}")
        epoch_before = control.deployment()["epoch"]

        member = stack.member(old)
        os.kill(member.patroni_pid(), signal.SIGKILL)
        member.proc.wait(10)
        new = wait_for(lambda: stack.leader() not in (None, old) and stack.leader(),
                       timeout=TTL + 30, interval=0.2, what="etcd to name another leader")
        named_at = time.monotonic()
        promoted = stack.member(new)
        wait_for(promoted.is_primary, timeout=30, what=f"{new} to be promoted")
        assert stack.member(old).is_primary(), "the old leader's PostgreSQL should still run"

        dep = wait_for(lambda: (lambda d: d["leader"] == new and d)(control.deployment()),
                       timeout=30, what=f"the control plane to move the leader to {new}")
        assert dep["epoch"] > epoch_before, dep
        wait_for(lambda: any(w[2] > named_at and w[3] == promoted.pg_port for w in writer.ok),
                 timeout=30, what=f"writes through pgrelay on {new} while {old} is a primary")
    finally:
        writer.stop()
        stack.member(old).start()  # its Patroni demotes the old primary (as the scenarios do)
    wrong = [w for w in writer.ok if w[2] > named_at and w[3] != promoted.pg_port]
    assert not wrong, f"{len(wrong)} writes acknowledged on another member after etcd named {new}"
