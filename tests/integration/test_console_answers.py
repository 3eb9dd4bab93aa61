"""Console answers an operator can act on (issue 13 item 9): an unknown `show` target names the
ones there are, and `show info` gives every port pgrelay listens on."""

from conftest import admin, admin_json, free_port, start_relay


def test_show_with_an_unknown_target_names_the_targets(relay):
    answer = admin(relay, "show foo")
    prefix = 'error: unknown command "show foo"; show is followed by one of: '
    assert answer.startswith(prefix), answer
    # every show command of the console's help, and nothing else
    targets = sorted(t.strip() for t in answer[len(prefix):].strip().split(","))
    in_help = sorted({line.split()[1] if line.split()[1] != "leader" else "leader history"
                      for line in admin(relay, "help").splitlines()
                      if line.strip().startswith("show ")})
    assert targets == in_help, (targets, in_help)
    assert admin(relay, "show").startswith('error: unknown command "show"; show is followed')
    assert "kill is followed by one of: client" in admin(relay, "kill someone")
    assert "try help" in admin(relay, "frobnicate")  # no command starts with it


def test_show_info_gives_the_read_port_and_the_http_port(pg):
    read_port, http_port = free_port(), free_port()
    r = start_relay(pg, extra={"read_listen_port": read_port, "http_listen_port": http_port})
    try:
        info = admin_json(r, "show info")
        assert info["listen_port"] == r.port
        assert info["read_listen_port"] == read_port
        assert info["http_listen_port"] == http_port
        rows = dict(ln.split(None, 1) for ln in admin(r, "show info").strip().splitlines())
        assert rows["read_listen_port"] == str(read_port), rows
    finally:
        r.stop()


def test_show_info_says_null_for_ports_that_are_off(relay):
    info = admin_json(relay, "show info")
    assert info["read_listen_port"] is None and info["http_listen_port"] is None


def test_a_split_brain_is_flagged_in_show_nodes_and_show_info():
    """Two nodes answering as primary: show info names them and show nodes flags both, not
    only the log (the leader stays pg1, as test_failover checks)."""
    from cluster import Cluster, destroy_relay, show_info, show_nodes, start_ha_relay
    from conftest import wait_for

    c = Cluster.create(replicas=1)
    relay = None
    try:
        pg1, pg2 = c.nodes
        relay = start_ha_relay(c, agent={"health_interval": "200ms", "fall": 2, "rise": 1})
        assert show_info(relay)["split_brain"] is None
        assert not any(n["split_brain"] for n in show_nodes(relay).values())
        pg2.promote()
        wait_for(lambda: show_info(relay)["split_brain"] == "pg1,pg2", timeout=10,
                 what="show info to name both primaries")
        flags = {name: n["split_brain"] for name, n in show_nodes(relay).items()}
        assert flags == {"pg1": True, "pg2": True}, flags
        assert show_info(relay)["write_leader"] == "pg1"
    finally:
        if relay:
            destroy_relay(relay)
        c.destroy()


def test_the_first_leader_is_in_the_history_and_a_stale_role_is_no_leader_in_the_log():
    """pg1 is the primary but the file still says role = primary for pg2 (the old one): the log
    names pg2 only as the configured guess, and show leader history starts with pg1, the leader
    the first probes confirmed."""
    from cluster import Cluster, destroy_relay, leader_history, show_info, start_ha_relay

    c = Cluster.create(replicas=1)
    relay = None
    try:
        pg1, pg2 = c.nodes
        stale = [pg1.relay_node("replica"), pg2.relay_node("primary")]
        http_port = free_port()
        relay = start_ha_relay(c, agent={"health_interval": "200ms", "fall": 2, "rise": 1},
                               nodes=stale, http_listen_port=http_port)
        assert show_info(relay)["write_leader"] == "pg1"
        hist = leader_history(relay)
        assert len(hist) == 1, hist
        assert (hist[0]["from"] or "", hist[0]["to"]) == ("", "pg1"), hist
        assert "first probes" in hist[0]["reason"], hist
        log = relay.log()
        assert "write leader: node pg2" not in log, log
        assert "configured primary: node pg2" in log and "first probe confirms" in log, log
        # the leader confirmed at start is no change of leader for alerts
        from conftest import http_call
        status, metrics = http_call(http_port, "GET", "/metrics")
        assert status == 200 and "\npgrelay_leader_changes_total 0\n" in metrics, metrics
    finally:
        if relay:
            destroy_relay(relay)
        c.destroy()
