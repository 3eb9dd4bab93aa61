"""Following the write leader under faults (issue 11): what a user relies on when the leader
hangs, a replica is not streaming, or pgrelay has not probed anything yet.

Each test builds its own PostgreSQL 15 cluster (cluster.py: pg1 primary, streaming replicas)
and its own pgrelay in front of it, with a fast agent (health_interval 200ms, fall 2, rise 1,
health_timeout 1s):

  * a leader deposed by a failover (hung: every process SIGSTOPped, a replica promoted) has
    its sessions closed at once, also one with a COMMIT in flight: that COMMIT is never
    acknowledged when the old leader wakes up; leader_change_grace is for planned switchovers;
  * a replica that is not streaming (no WAL receiver), with nothing replayed since it started
    (pg_last_xact_replay_timestamp() NULL), or that streams on another timeline than the
    leader's, is not readable and gets no read session; with no write leader the replicas
    keep serving reads, and reads that fell back to the leader move back to a replica;
  * pgrelay does not send a session anywhere before a probe confirmed the roles: a
    configured "primary" that is in fact a replica never gets a write, even while another
    node is slow to answer its first probe;
  * a hung postmaster (SIGSTOP of it alone) costs a client server_connect_timeout and is
    seen by the agent; a node that closes during startup gives 08006;
  * show nodes says "unknown" for nodes not heard from; refusals are logged with counts;
    no_leader_wait holds new sessions 5 s by default;
  * the epoch survives a restart of pgrelay (agent state file); an equal epoch naming another
    leader is refused; control_lost = keep_leader (default) and stop_writes.
"""

import contextlib
import os
import signal
import socket
import threading
import time

import psycopg
import pytest

from cluster import (  # noqa: F401,F811 (make_cluster: a fixture used by name)
    admin,
    destroy_relay,
    leader_history,
    log_lines,
    make_cluster,
    show_info,
    show_nodes,
    start_ha_relay,
    wait_relay_ready,
)
from conftest import (RawClient, child_pids, error_fields, free_port, port_listening,
                      spawn_relay, wait_for)
from failover_helpers import AGENT, ha_relay_fixture, raw_login, raw_scalar

pytestmark = pytest.mark.deadline(120)

# no_leader_wait keeps its default (a new session waits 5 s for a leader): these tests open
# sessions right after a leader change and the last section tests that default
ha_relay = ha_relay_fixture()


def messages_until_close(client, timeout):
    """Every message until the peer closes (AssertionError if it does not within timeout)."""
    client.sock.settimeout(timeout)
    try:
        return client.read_to_eof()
    except (socket.timeout, TimeoutError):
        raise AssertionError(f"not closed within {timeout}s; got so far {client.buf!r}") from None


@contextlib.contextmanager
def hung(node):
    """Every process of ``node`` stopped (SIGSTOP: the postmaster first, so it forks no more),
    continued on exit."""
    pm = node.postmaster_pid()
    os.kill(pm, signal.SIGSTOP)
    stopped = [pm]
    try:
        for pid in child_pids(pm):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        yield stopped
    finally:
        for pid in reversed(stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# --------------------------------------------------------------------------- #
# 1. a leader deposed by a failover: its sessions are closed at once
# --------------------------------------------------------------------------- #


def test_a_hung_leader_replaced_by_a_failover_has_its_sessions_closed_at_once(
    make_cluster, ha_relay
):
    """Every process of the leader stops; a replica is promoted. The session whose COMMIT is in
    flight on the hung leader is closed (FATAL 57P01, "failover") as soon as the agent moves
    the leader, not after leader_change_grace (60 s here); when the old leader wakes up, its
    COMMIT is not acknowledged to the client. New write sessions go to the promoted node."""
    c = make_cluster(replicas=1)
    pg1, pg2 = c.nodes
    pg1.query("CREATE TABLE ft (who text)")
    c.wait_caught_up(pg2)
    relay = ha_relay(c, leader_change_grace="60s")
    inflight = raw_login(relay.port, application_name="inflight")
    idle_in_tx = raw_login(relay.port, application_name="idle_in_tx")
    for s in (inflight, idle_in_tx):
        msgs = s.simple_query("BEGIN; INSERT INTO ft VALUES ('x')")
        assert error_fields(msgs) is None, msgs

    with hung(pg1):
        inflight.send_query("COMMIT")
        t0 = time.monotonic()
        pg2.promote()
        msgs = messages_until_close(inflight, timeout=15)
        t_closed = time.monotonic() - t0
        f = error_fields(msgs)
        assert f and f.get("C") == "57P01" and "failover" in f.get("M", ""), msgs
        assert ("C", b"COMMIT\0") not in msgs, msgs
        f2 = error_fields(messages_until_close(idle_in_tx, timeout=5))
        assert f2 and f2.get("C") == "57P01", f2
        assert t_closed < 10, f"closed {t_closed:.2f}s after the promotion"
        print(f"[following] in-flight COMMIT on the hung leader closed {t_closed:.3f}s after"
              " pg_promote() was called")
        with relay.connect(connect_timeout=10) as conn:
            port, rec = conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
        assert (port, rec) == (pg2.port, False)
        assert leader_history(relay)[0]["reason"].startswith("[failover] "), \
            leader_history(relay)[0]
    # pg1 runs again: nothing it does now reaches the closed clients
    assert inflight.read_message() is None
    wait_for(pg1.answers, timeout=10, what="pg1 to answer again")


# --------------------------------------------------------------------------- #
# 4. no write session before a probe confirmed the leader
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def silent_node():
    """A TCP port that accepts connections and never says a word (a node whose first probe
    lasts health_timeout)."""
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(64)
    try:
        yield lsn.getsockname()[1]
    finally:
        lsn.close()


def test_no_write_session_goes_to_the_configured_primary_before_a_probe_confirms_it(
    make_cluster, ha_relay
):
    """pgrelay.ini names pg2 role = primary, but pg2 is a replica (the configured role is stale,
    as it often is under an HA manager); a third node takes 3 s to answer its first probe.
    A read session and a write sent the moment the ports listen wait until the agent has
    confirmed the roles: the read lands on pg2, the real replica, the write on pg1, the real
    primary (it never reaches pg2: 25006 read-only)."""
    c = make_cluster(replicas=1)
    pg1, pg2 = c.nodes
    pg1.query("CREATE TABLE w (at int)")
    c.wait_caught_up(pg2)
    with silent_node() as slow_port:
        nodes = [
            ("pg1", {"host": pg1.host, "port": pg1.port, "role": "replica"}),
            ("pg2", {"host": pg2.host, "port": pg2.port, "role": "primary"}),
            ("slow", {"host": "127.0.0.1", "port": slow_port, "role": "replica"}),
        ]
        relay = start_ha_relay(c, agent={**AGENT, "health_timeout": "3s"}, nodes=nodes,
                               wait=False, workers=1, read_listen_port="auto")
        try:
            wait_for(lambda: port_listening(relay.port) and port_listening(relay.read_port),
                     timeout=15, interval=0.005, what="pgrelay to listen")
            # the read port too waits for the probes: pg1, "replica" in the file, is the primary
            assert read_session_port(relay) == pg2.port
            t0 = time.monotonic()
            with relay.connect(connect_timeout=10) as conn:
                port = conn.execute(
                    "INSERT INTO w VALUES (1) RETURNING inet_server_port()").fetchone()[0]
            took = time.monotonic() - t0
            assert port == pg1.port
            # confirmed by pg1's and pg2's first probes, not held for the silent node's 3 s
            assert took < 2.5, f"the write waited {took:.2f}s"
            print(f"[following] first write after the port listened: {took:.3f}s, on pg1")
        finally:
            destroy_relay(relay)


# --------------------------------------------------------------------------- #
# 3. honest replica lag
# --------------------------------------------------------------------------- #


def read_session_port(relay):
    with psycopg.connect(relay.conninfo(port=relay.read_port, connect_timeout=5),
                         autocommit=True) as conn:
        return conn.execute("SELECT inet_server_port()").fetchone()[0]


def test_a_replica_that_is_not_streaming_gets_no_read_session_though_nothing_was_replayed(
    make_cluster, ha_relay
):
    """pg3 has no WAL receiver (its primary_conninfo names a port nobody listens on) and was
    restarted, so pg_last_xact_replay_timestamp() is NULL there. The leader writes a few kB
    pg3 never gets: pg3 is not readable (its lag is not 0), every read session goes to pg2,
    which streams, and sees the leader's rows."""
    c = make_cluster(replicas=2)
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE r (x int)")
    pg1.query("CHECKPOINT")
    c.wait_caught_up(pg3)
    pg3.query("CHECKPOINT")  # a restartpoint after the last commit: nothing to replay at start
    pg3.query("ALTER SYSTEM SET primary_conninfo = "
              f"'host=127.0.0.1 port={free_port()} user=postgres'")
    pg3.stop("fast")
    pg3.start()
    wait_for(pg3.answers, timeout=30, what="pg3 to take connections")
    assert pg3.scalar("SELECT pg_last_xact_replay_timestamp() IS NULL")
    relay = ha_relay(c, read_fallback="none")
    pg1.query("INSERT INTO r SELECT generate_series(1, 100)")
    c.wait_caught_up(pg2)
    wait_for(lambda: show_nodes(relay)["pg2"]["readable"], timeout=10, what="pg2 readable")
    wait_for(lambda: (show_nodes(relay)["pg3"]["lag_bytes"] or 0) > 0, timeout=10,
             what="the agent to see pg3 behind the leader")
    # some probe rounds after the insert: pg3 never becomes readable, its lag is not 0
    deadline = time.monotonic() + 2.0
    ports = []
    while time.monotonic() < deadline:
        nodes = show_nodes(relay)
        assert not nodes["pg3"]["readable"], nodes["pg3"]
        assert nodes["pg3"]["lag_ms"] != 0, nodes["pg3"]
        ports.append(read_session_port(relay))
    assert set(ports) == {pg2.port}, ports
    with psycopg.connect(relay.conninfo(port=relay.read_port), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM r").fetchone()[0] == 100
    assert log_lines(relay, "replica pg3 is not fit for reads: no WAL receiver")


# --------------------------------------------------------------------------- #
# 2. the read port through a failover
# --------------------------------------------------------------------------- #


def test_the_read_port_keeps_serving_replicas_while_there_is_no_write_leader(
    make_cluster, ha_relay
):
    """The primary dies and nobody is promoted: there is no write leader, but both replicas
    have every transaction the leader had, so read sessions keep going to them (none is
    refused, with read_fallback = none)."""
    c = make_cluster(replicas=2)
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE r (x int); INSERT INTO r SELECT generate_series(1, 10)")
    c.wait_caught_up(pg2)
    c.wait_caught_up(pg3)
    relay = ha_relay(c, read_fallback="none")
    wait_for(lambda: all(show_nodes(relay)[n]["readable"] for n in ("pg2", "pg3")),
             timeout=10, what="pg2 and pg3 readable")
    pg1.stop("immediate")
    wait_for(lambda: show_info(relay).get("write_leader") is None, timeout=10,
             what="no write leader")
    deadline = time.monotonic() + 2.0
    ports = set()
    while time.monotonic() < deadline:
        ports.add(read_session_port(relay))
    assert ports <= {pg2.port, pg3.port} and ports, ports
    nodes = show_nodes(relay)
    assert nodes["pg2"]["readable"] and nodes["pg3"]["readable"], nodes


def test_read_sessions_that_fell_back_to_the_leader_move_back_to_a_replica(
    make_cluster, ha_relay
):
    """The only replica goes down: a read session falls back to the leader
    (read_fallback = leader). When the replica is back and fit for reads, that session is
    closed at its next safe point (FATAL 57P01, "fit for reads again") and the next read
    session goes to the replica."""
    c = make_cluster(replicas=1)
    pg1, pg2 = c.nodes
    relay = ha_relay(c, read_fallback="leader")
    wait_for(lambda: show_nodes(relay)["pg2"]["readable"], timeout=10, what="pg2 readable")
    pg2.stop("immediate")
    wait_for(lambda: not show_nodes(relay)["pg2"]["readable"], timeout=10,
             what="pg2 not readable")
    fell_back = RawClient(relay.read_port, timeout=10)
    fell_back.login()
    assert raw_scalar(fell_back, "SELECT inet_server_port()") == str(pg1.port)
    pg2.start()
    f = error_fields(messages_until_close(fell_back, timeout=20))
    assert f and f.get("C") == "57P01" and "fit for reads again" in f.get("M", ""), f
    assert read_session_port(relay) == pg2.port


# --------------------------------------------------------------------------- #
# 6. a node that closes during startup
# --------------------------------------------------------------------------- #


class ClosingNode(threading.Thread):
    """A TCP "node" that reads a client's startup packet and closes without a word (a server
    shutting down, or the postmaster's child dying, during the login)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.lsn = socket.socket()
        self.lsn.bind(("127.0.0.1", 0))
        self.lsn.listen(16)
        self.port = self.lsn.getsockname()[1]

    def run(self):
        while True:
            try:
                conn, _ = self.lsn.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(1024)

    def close(self):
        self.lsn.close()


def test_a_node_that_closes_during_startup_reaches_the_client_as_08006(relay_factory):
    """The node reads the startup packet and closes: the client gets FATAL 08006 ("closed the
    connection during startup"), not a bare EOF; a node's own FATAL is passed on alone."""
    node = ClosingNode()
    node.start()
    try:
        relay = relay_factory(agent="off",
                              nodes=[("pg1", {"host": "127.0.0.1", "port": node.port,
                                              "role": "primary"})])
        for _ in range(2):
            c = RawClient(relay.port, timeout=10)
            c.send_startup()
            msgs = messages_until_close(c, timeout=10)
            f = error_fields(msgs)
            assert f and f.get("C") == "08006" and "during startup" in f.get("M", ""), msgs
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(relay.conninfo(connect_timeout=5))
        assert "during startup" in str(e.value)
        assert relay.proc.poll() is None
    finally:
        node.close()
    # a node's own FATAL during startup reaches the client as it is, with nothing after it
    real = relay_factory()
    c = RawClient(real.port, timeout=10)
    c.send_startup(database="no_such_db")
    msgs = messages_until_close(c, timeout=10)
    errors = [parse for t, parse in msgs if t == "E"]
    assert len(errors) == 1 and msgs[-1][0] == "E", msgs
    assert error_fields(msgs).get("C") == "3D000", msgs


# --------------------------------------------------------------------------- #
# 7. show nodes roles, refusals in the log, the no_leader_wait default
# --------------------------------------------------------------------------- #


def test_show_nodes_role_is_unknown_for_a_silent_node_and_a_deposed_leader_that_is_down(
    make_cluster, ha_relay
):
    """A node that never answered a probe, and the old leader once it is down, are shown with
    role "unknown", not with the role they were configured with or last had. Refused clients
    are logged one line a second per worker, the others counted."""
    c = make_cluster(replicas=1)
    pg1, pg2 = c.nodes
    with silent_node() as slow_port:
        nodes = c.relay_nodes() + [("silent", {"host": "127.0.0.1", "port": slow_port,
                                               "role": "replica"})]
        relay = ha_relay(c, nodes=nodes, workers=1, no_leader_wait="0")
        roles = {n: v["role"] for n, v in show_nodes(relay).items()}
        assert roles == {"pg1": "primary", "pg2": "replica", "silent": "unknown"}, roles
        pg1.stop("immediate")
        wait_for(lambda: show_nodes(relay)["pg1"]["health"] == "down", timeout=10,
                 what="pg1 down")
        assert show_nodes(relay)["pg1"]["role"] == "unknown"
        refused = 0
        for _ in range(40):
            with contextlib.suppress(psycopg.OperationalError):
                psycopg.connect(relay.conninfo(connect_timeout=5)).close()
                continue
            refused += 1
        assert refused == 40
        pg2.promote()

        def logged():
            lines = log_lines(relay, "no write leader")
            single = [ln for ln in lines if "more client(s) refused" not in ln]
            counted = sum(int(ln.split("warning: ")[1].split()[0])
                          for ln in lines if "more client(s) refused" in ln)
            return (single, counted) if len(single) + counted == 40 else None

        single, counted = wait_for(logged, timeout=10, what="every refusal logged or counted")
        assert len(single) <= 5 and counted >= 35, (single, counted)


def test_by_default_a_new_write_session_waits_out_a_short_leaderless_spell(
    make_cluster, ha_relay
):
    """no_leader_wait is 5s unless set: the primary restarts, a new session opened while there
    is no leader is held and then served, not refused with 57P03."""
    c = make_cluster(replicas=0)
    (pg1,) = c.nodes
    relay = start_ha_relay(c, agent=AGENT, workers=1)
    try:
        # fast, not immediate: its start then needs no crash recovery, and fits in the 5 s
        pg1.stop("fast")
        wait_for(lambda: show_info(relay).get("write_leader") is None, timeout=10,
                 what="no write leader")
        result = {}

        def connect():
            t = time.monotonic()
            try:
                with relay.connect(connect_timeout=15) as conn:
                    result["port"] = conn.execute("SELECT inet_server_port()").fetchone()[0]
            except psycopg.Error as e:
                result["error"] = str(e)
            result["took"] = time.monotonic() - t

        th = threading.Thread(target=connect)
        th.start()
        time.sleep(0.3)  # the session is held meanwhile (nothing to wait for: it must not end)
        assert th.is_alive(), result
        pg1.start()
        th.join(15)
        assert result.get("port") == pg1.port, result
    finally:
        destroy_relay(relay)


# --------------------------------------------------------------------------- #
# issue 8 item 5: epochs survive a restart of the proxy
# --------------------------------------------------------------------------- #


def restart_relay(relay):
    """Stop pgrelay and start it again on the same configuration (and so the same directory:
    admin socket, agent state)."""
    relay.stop()
    again = spawn_relay(relay.workdir, relay.port, relay.conf_path,
                        relay.log_path + ".restarted")
    again.read_port = relay.read_port
    wait_for(lambda: port_listening(again.port), timeout=15, what="pgrelay to listen again")
    wait_relay_ready(again)
    return again


def test_the_epoch_survives_a_restart_of_the_proxy(make_cluster, ha_relay):
    """Two leader changes take the epoch to 3 (leader pg1 again); pgrelay is restarted (a
    fresh shared-memory segment): it goes on from epoch 3 with pg1, and the next change is
    epoch 4, so no epoch ever names two leaders."""
    c = make_cluster(replicas=1)
    relay = ha_relay(c)
    for cmd in ("set leader pg2 force", "set leader pg1"):
        out = admin(relay, cmd)
        assert not out.startswith("error"), out
    wait_for(lambda: show_info(relay)["epoch"] == 3, timeout=5, what="epoch 3")
    again = restart_relay(relay)
    try:
        info = show_info(again)
        assert (info["epoch"], info["write_leader"]) == (3, "pg1"), info
        out = admin(again, "set leader pg2 force")
        assert not out.startswith("error"), out
        wait_for(lambda: show_info(again)["epoch"] == 4, timeout=5, what="epoch 4")
        # pg1 still answered as a primary: a planned change, with leader_change_grace
        assert leader_history(again)[0]["reason"].startswith("[planned] "), \
            leader_history(again)[0]
    finally:
        destroy_relay(again)


# --------------------------------------------------------------------------- #
# issue 8 items 5 and 6: the control plane's epochs, and when it is gone
# --------------------------------------------------------------------------- #


class FakeControlPlane:
    """Where pgrelay-control should be: answers the agent with ``leader`` and ``epoch``, or,
    once ``down`` is set, 500 to everything."""

    def __init__(self, leader="pg1", epoch=1):
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.leader, self.epoch, self.down = leader, epoch, False
        self.metrics_calls = 0
        self.stopping = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                path = self.path.split("?")[0]
                if fake.down:
                    status, body = 500, {"error": "down"}
                elif path == "/api/v1/agent/metrics":
                    fake.metrics_calls += 1
                    status, body = 200, {"leader": fake.leader, "epoch": fake.epoch}
                elif path == "/api/v1/agent/commands":
                    fake.stopping.wait(0.5)
                    status, body = 200, {"commands": []}
                else:
                    status, body = 200, {}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_control():
    fakes = []

    def make(**kw):
        f = FakeControlPlane(**kw)
        fakes.append(f)
        return f

    yield make
    for f in fakes:
        f.close()


def relay_with_control(c, ha_relay, fake, **agent):
    relay = ha_relay(c, no_leader_wait="0", agent=agent,
                     control={"endpoint": fake.url, "token": "t", "metrics_interval": "200ms",
                              "control_grace_period": "1s", "request_timeout": "1s"})
    calls = fake.metrics_calls
    wait_for(lambda: fake.metrics_calls > calls + 1, timeout=10, what="the agent's reports")
    return relay


def write_leader(relay):
    return show_info(relay).get("write_leader")


def never(cond, seconds, what):
    """cond() stays false for ``seconds`` (polled); AssertionError naming ``what`` if not."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not cond(), what
        time.sleep(0.05)


def test_control_lost_keeps_the_leader_by_default_and_never_picks_another(
    make_cluster, ha_relay, fake_control
):
    """control_lost defaults to keep_leader: with the control plane gone, the leader it named
    (pg1) dies and pg2 is promoted, yet this proxy does not move writes to pg2 on its own
    (another proxy may still see pg1): no write leader until the control plane is back, which
    then names pg2, and writes go there."""
    c = make_cluster(replicas=1)
    pg1, pg2 = c.nodes
    fake = fake_control(leader="pg1", epoch=1)
    relay = relay_with_control(c, ha_relay, fake)
    assert write_leader(relay) == "pg1"
    fake.down = True
    wait_for(lambda: log_lines(relay, "unreachable for more than control_grace_period"),
             timeout=10, what="the control plane to count as lost")
    pg1.stop("immediate")
    pg2.promote()
    wait_for(lambda: write_leader(relay) is None, timeout=10, what="no write leader")
    wait_for(lambda: show_nodes(relay)["pg2"]["role"] == "primary", timeout=10,
             what="the agent to see pg2 as a primary")
    never(lambda: write_leader(relay) == "pg2", 1.5, "the agent chose pg2 on its own")
    assert log_lines(relay, "control_lost = keep_leader")
    fake.leader, fake.epoch, fake.down = "pg2", 2, False
    wait_for(lambda: write_leader(relay) == "pg2", timeout=10, what="pg2, named by the control plane")
    assert show_info(relay)["epoch"] == 2
    with relay.connect(connect_timeout=10) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone()[0] == pg2.port


def test_control_lost_stop_writes_routes_no_write_until_the_control_plane_is_back(
    make_cluster, ha_relay, fake_control
):
    c = make_cluster(replicas=1)
    pg1, pg2 = c.nodes
    fake = fake_control(leader="pg1", epoch=1)
    relay = relay_with_control(c, ha_relay, fake, control_lost="stop_writes")
    fake.down = True
    wait_for(lambda: write_leader(relay) is None, timeout=10, what="writes stopped")
    with pytest.raises(psycopg.OperationalError) as e:
        relay.connect(connect_timeout=5)
    assert "no write leader" in str(e.value)
    assert show_info(relay)["epoch"] == 1  # a hold, not a change of leader
    fake.down = False
    wait_for(lambda: write_leader(relay) == "pg1", timeout=10, what="writes back on pg1")
    with relay.connect(connect_timeout=10) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone()[0] == pg1.port


def test_an_equal_epoch_naming_another_leader_is_refused(make_cluster, ha_relay, fake_control):
    """Epoch 1 names pg1. The control plane then names pg2 under the same epoch 1 (pg2 is a
    primary too): the agent does not move, and says why; a higher epoch is followed."""
    c = make_cluster(replicas=1)
    pg1, pg2 = c.nodes
    fake = fake_control(leader="pg1", epoch=1)
    relay = relay_with_control(c, ha_relay, fake)
    pg2.promote()
    calls = fake.metrics_calls
    fake.leader = "pg2"
    wait_for(lambda: fake.metrics_calls > calls + 3, timeout=10, what="answers naming pg2")
    never(lambda: write_leader(relay) != "pg1", 1.0, "the agent left pg1 under epoch 1")
    assert show_info(relay)["epoch"] == 1
    assert log_lines(relay, "refused (an epoch names one leader)")
    fake.epoch = 2
    wait_for(lambda: write_leader(relay) == "pg2", timeout=10, what="pg2 under epoch 2")


# --------------------------------------------------------------------------- #
# 5. a hung postmaster
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def postmaster_stopped(node):
    """Only the postmaster of ``node`` stopped: its backends (the agent's monitoring connection
    included) go on answering, new connections are accepted by the kernel and never served."""
    pm = node.postmaster_pid()
    os.kill(pm, signal.SIGSTOP)
    try:
        yield pm
    finally:
        os.kill(pm, signal.SIGCONT)


def test_a_hung_postmaster_is_seen_and_a_promoted_replica_takes_over(make_cluster, ha_relay):
    """pg1's postmaster alone is stopped. A new write session gets FATAL 08006 within
    server_connect_timeout (1 s here), not at client_login_timeout; the agent probes with a
    fresh connection, so pg1 is no longer taken for a healthy primary, and once pg2 is
    promoted, writes go there."""
    c = make_cluster(replicas=1)
    pg1, pg2 = c.nodes
    relay = ha_relay(c, server_connect_timeout="1s", no_leader_wait="0")
    with postmaster_stopped(pg1):
        t0 = time.monotonic()
        cl = RawClient(relay.port, timeout=15)
        cl.send_startup()
        f = error_fields(messages_until_close(cl, timeout=15))
        took = time.monotonic() - t0
        assert f and f.get("C") == "08006", f
        assert took < 5, f"answered after {took:.2f}s"
        print(f"[following] hung postmaster: 08006 after {took:.3f}s")
        wait_for(lambda: show_nodes(relay)["pg1"]["last_error"], timeout=10,
                 what="the agent to see pg1's postmaster not answering")
        pg2.promote()
        wait_for(lambda: show_info(relay).get("write_leader") == "pg2", timeout=10,
                 what="pg2 to become the write leader")
        with relay.connect(connect_timeout=10) as conn:
            assert conn.execute("SELECT inet_server_port()").fetchone()[0] == pg2.port


def test_a_garbage_agent_state_file_is_ignored_and_rewritten(make_cluster, ha_relay):
    """The state file holds an epoch out of range: the agent says so, starts from the table's
    epoch, serves, and writes a good file at its next change."""
    c = make_cluster(replicas=1)
    relay = ha_relay(c)
    state = os.path.join(relay.workdir, "agent.state")
    relay.stop()
    with open(state, "w") as f:
        f.write("epoch 99999999999999999999999\nleader pg2\n")
    again = restart_relay(relay)
    try:
        assert "bad epoch line" in again.log()
        assert show_info(again)["write_leader"] == "pg1"
        with again.connect(connect_timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone()[0] == 1
        out = admin(again, "set leader pg2 force")
        assert not out.startswith("error"), out
        wait_for(lambda: "leader pg2" in open(state).read(), timeout=5, what="a good state file")
    finally:
        destroy_relay(again)


def test_a_replica_streaming_on_another_timeline_than_the_leader_is_not_readable(
    make_cluster, ha_relay
):
    """pg2 is promoted while pg1 still runs, and the leader is set to pg2; pg3 goes on
    streaming from pg1, the deposed primary, on the old timeline, and is even ahead of pg2 in
    bytes. It gets no read session (its timeline is not the leader's)."""
    c = make_cluster(replicas=2)
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE t (x int)")
    c.wait_caught_up(pg2)
    c.wait_caught_up(pg3)
    relay = ha_relay(c, read_fallback="none")
    pg2.promote()
    wait_for(lambda: log_lines(relay, "SPLIT BRAIN"), timeout=10, what="the split brain")
    out = admin(relay, "set leader pg2")
    assert not out.startswith("error"), out
    pg1.query("INSERT INTO t SELECT generate_series(1, 20000)")  # pg3 gets it, pg2 does not
    c.wait_caught_up(pg3, primary=pg1)
    wait_for(lambda: show_nodes(relay)["pg3"]["lag_bytes"] == 0, timeout=10,
             what="pg3 (by bytes) not behind pg2")
    never(lambda: show_nodes(relay)["pg3"]["readable"], 1.5, "pg3 became readable")
    assert log_lines(relay, "replica pg3 is not fit for reads: it receives timeline 1")
