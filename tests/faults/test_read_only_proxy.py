"""A per-proxy option the control plane pushes to the proxy (issue 8, Deliver 1: "per-proxy
settings that the control plane pushes, e.g. maintenance exemption or a read-only role"):
`pgrelayctl set-proxy-options proxy-b read_only=on` makes proxy-b route every new session of
its write port as its read-only port would (to the replica), so that it routes no writes, while
proxy-a goes on writing to the leader; read_only=off gives it its writes back."""

import time

import psycopg

from conftest import wait_for
from control_e2e_helpers import info
from fleet import Fleet


def session_node(relay):
    """(in recovery?, port) of the node a new session through relay's write port reaches."""
    with psycopg.connect(relay.conninfo(connect_timeout=5), autocommit=True) as c:
        return c.execute("SELECT pg_is_in_recovery(), inet_server_port()").fetchone()


def test_read_only_pushed_to_one_proxy_routes_its_write_port_to_a_replica(pg):
    started = time.monotonic()
    with Fleet.start(pg) as fleet:
        pg1, pg2 = fleet.cluster["pg1"], fleet.cluster["pg2"]
        assert session_node(fleet.b) == (False, pg1.port)
        assert info(fleet.b)["read_only_role"] is False

        p = fleet.ctl("set-proxy-options", "proxy-b", "read_only=on")
        assert p.returncode == 0, (p.stdout, p.stderr)
        assert fleet.control.proxies()["proxy-b"]["options"] == {"read_only": True}
        wait_for(lambda: info(fleet.b)["read_only_role"] is True, timeout=10,
                 what="proxy-b to take read_only from the control plane")
        assert "this proxy is read-only now" in fleet.b.log()
        # the replica may need a health interval to be fit for reads
        wait_for(lambda: session_node(fleet.b) == (True, pg2.port), timeout=10,
                 what="proxy-b's write port to reach the replica")
        with psycopg.connect(fleet.b.conninfo(connect_timeout=5), autocommit=True) as c:
            try:
                c.execute("CREATE TABLE read_only_proxy_t (x int)")
                raise AssertionError("a write went through the read-only proxy")
            except psycopg.errors.ReadOnlySqlTransaction:
                pass
        # the other proxy is untouched
        assert info(fleet.a)["read_only_role"] is False
        assert session_node(fleet.a) == (False, pg1.port)

        p = fleet.ctl("set-proxy-options", "proxy-b", "read_only=")
        assert p.returncode == 0, (p.stdout, p.stderr)
        wait_for(lambda: info(fleet.b)["read_only_role"] is False, timeout=10,
                 what="proxy-b to give up read_only")
        assert session_node(fleet.b) == (False, pg1.port)
    print(f"scenario time {time.monotonic() - started:.1f}s")
