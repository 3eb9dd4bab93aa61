"""Query plans: the workers queue slow, sampled and running statements, the agent EXPLAINs
them (never ANALYZE) on the node and database they ran on, under SET ROLE to their user, and
the console's ``show plans`` shows the outcome.

Every plan is waited for (the planner polls every 100 ms); nothing sleeps to synchronise.
"""

import os

import psycopg
import pytest

from conftest import admin, admin_json, wait_for

THRESHOLD = "500ms"
SLEEP = 0.7  # seconds: past THRESHOLD with room to spare


def plans(relay):
    return admin_json(relay, "show plans")


def plan_for(relay, fragment, **match):
    """The plan row whose normalised text contains fragment (and whose fields match), or None."""
    for p in plans(relay)["plans"]:
        if fragment in p["text"] and all(p.get(k) == v for k, v in match.items()):
            return p
    return None


def wait_plan(relay, fragment, timeout=15, **match):
    wait_for(lambda: plan_for(relay, fragment, **match) is not None, timeout=timeout,
             what=f"a plan of {fragment!r} {match}")
    return plan_for(relay, fragment, **match)


@pytest.fixture
def planning(relay_factory):
    """A pgrelay that plans statements slower than THRESHOLD."""
    return relay_factory(sections={"agent": {"plan_slow_threshold": THRESHOLD}})


def test_a_slow_statement_gets_a_plan_with_reason_slow(planning, pg):
    with planning.connect() as c:
        c.execute(f"SELECT pg_sleep({SLEEP}), 'secret-literal'")
    p = wait_plan(planning, "pg_sleep", reason="slow")
    assert p["text"] == "SELECT pg_sleep($1), $2", "the text is normalised: no literal kept"
    assert p["node"] == "pg1" and p["database"] == "postgres" and p["user"] == "postgres"
    assert p["duration_ms"] >= SLEEP * 1000
    assert p["error"] is None, p
    assert p["top_node"] == "Result"
    assert p["total_cost"] is not None and p["total_cost"] >= 0
    assert p["plan"][0]["Plan"]["Node Type"] == "Result", "the full EXPLAIN JSON in the json form"
    assert "Actual Rows" not in str(p["plan"]), "never ANALYZE"
    table = admin(planning, "show plans")
    assert "pg_sleep" in table and "slow" in table and "Result" in table


def test_a_fast_statement_gets_no_plan_without_sampling(planning):
    with planning.connect() as c:
        c.execute("SELECT 42 AS fast_one")
        c.execute(f"SELECT pg_sleep({SLEEP})")
    wait_plan(planning, "pg_sleep")
    assert plan_for(planning, "fast_one") is None


def test_ddl_and_copy_are_not_explained(planning, pg):
    with planning.connect() as c:
        c.execute(f"DO $$BEGIN PERFORM pg_sleep({SLEEP}); END$$")
        with c.cursor() as cur:
            with cur.copy(f"COPY (SELECT pg_sleep({SLEEP}) AS copied) TO STDOUT") as cp:
                for _ in cp:
                    pass
        c.execute(f"SELECT pg_sleep({SLEEP}), 'after'")
    # The last statement's plan proves the planner went past the two before it.
    wait_plan(planning, "pg_sleep($1), $2", reason="slow")
    got = plans(planning)
    texts = [p["text"] for p in got["plans"]]
    assert not any("DO" in t or "COPY" in t for t in texts), texts
    assert got["skipped"] >= 2, got


def test_the_same_statement_is_planned_once_within_plan_max_age(planning):
    with planning.connect() as c:
        c.execute(f"SELECT pg_sleep({SLEEP}), 'once'")
        wait_plan(planning, "pg_sleep($1), $2", reason="slow")
        before = plans(planning)
        c.execute(f"SELECT pg_sleep({SLEEP}), 'twice'")
    wait_for(lambda: plans(planning)["deduplicated"] > before["deduplicated"],
             what="the second run deduplicated")
    after = plans(planning)
    assert after["planned"] == before["planned"]
    assert len([p for p in after["plans"] if p["text"] == "SELECT pg_sleep($1), $2"]) == 1


def test_sample_rate_one_plans_a_fast_statement_as_sampled(relay_factory):
    r = relay_factory(sections={"agent": {"plan_slow_threshold": "0", "plan_sample_rate": "1"}})
    with r.connect() as c:
        c.execute("SELECT 1 AS sampled_one")
    p = wait_plan(r, "sampled_one", reason="sampled")
    assert p["error"] is None and p["top_node"] == "Result"
    assert plans(r)["sampled"] >= 1


def test_planning_off_queues_nothing(relay_factory):
    r = relay_factory(sections={"agent": {"plan_slow_threshold": "0"}})
    with r.connect() as c:
        c.execute("SELECT pg_sleep(0.3)")
        c.execute("SELECT 1")
    got = plans(r)
    assert got["requests"] == 0 and got["plans"] == [] and got["sampled"] == 0


@pytest.mark.parametrize("value", ["2", "-0.1", "often", "0.5x"])
def test_a_sample_rate_outside_0_to_1_is_refused_naming_file_and_line(tmp_path, pg, value):
    import subprocess

    from conftest import PGRELAY_BIN
    path = tmp_path / "pgrelay.ini"
    path.write_text("[pgrelay]\nlisten_port = 6999\n\n[agent]\nplan_sample_rate = "
                    f"{value}\n\n[node.pg1]\nhost = 127.0.0.1\nport = {pg.port}\nrole = primary\n")
    r = subprocess.run([PGRELAY_BIN, "-t", "-c", str(path)], capture_output=True, text=True,
                       timeout=10)
    assert r.returncode != 0
    assert f"{path}:5: [agent] plan_sample_rate: \"{value}\" is not a number from 0 to 1" in \
        r.stderr + r.stdout, r.stderr + r.stdout


@pytest.fixture
def ext_table(pg):
    pg.query("DROP TABLE IF EXISTS plan_ext")
    pg.query("CREATE TABLE plan_ext (id int PRIMARY KEY, v text)")
    pg.query("INSERT INTO plan_ext SELECT g, 'v' || g FROM generate_series(1, 1000) g")
    pg.query("ANALYZE plan_ext")
    yield
    pg.query("DROP TABLE IF EXISTS plan_ext")


def test_a_parameterised_statement_is_planned_with_its_values(planning, ext_table):
    with planning.connect() as c:
        # psycopg 3 binds %s server-side: Parse with $1, $2, Bind with the values
        c.execute("SELECT v, pg_sleep(%s) FROM plan_ext WHERE id = %s", ("0.7", "777"))
    p = wait_plan(planning, "plan_ext", reason="slow")
    assert p["error"] is None, p
    assert p["text"] == "SELECT v, pg_sleep($1) FROM plan_ext WHERE id = $2"
    assert "Index Scan using plan_ext_pkey" in p["top_node"], p
    assert "777" in str(p["plan"]), "the Bind's value is in the plan's index condition"


def test_python_numbers_as_parameters_are_planned_with_their_values(planning, ext_table):
    with planning.connect() as c:
        c.execute("SELECT v, pg_sleep(%s) AS numbers FROM plan_ext WHERE id = %s", (0.7, 778))
    p = wait_plan(planning, "numbers", reason="slow")
    assert p["error"] is None, p
    assert "778" in str(p["plan"])


def test_binary_parameters_of_common_types_are_planned_with_their_values(planning, ext_table):
    with planning.connect() as c:
        c.execute("SELECT v, pg_sleep(%b) AS binary_params FROM plan_ext WHERE id = %b",
                  (0.7, 779))
    p = wait_plan(planning, "binary_params", reason="slow")
    assert p["error"] is None, p
    assert "779" in str(p["plan"])


def test_a_binary_parameter_of_another_type_is_skipped_with_the_reason(planning, ext_table):
    import datetime
    with planning.connect() as c:
        c.execute("SELECT pg_sleep(0.7), %b::date AS binary_date", (datetime.date(2020, 1, 2),))
    p = wait_plan(planning, "binary_date", reason="slow")
    assert p["top_node"] is None, p
    assert "binary format with type OID 1082" in p["error"], p
    assert plans(planning)["skipped"] >= 1


def test_a_named_prepared_statement_is_planned_with_its_values(planning, ext_table):
    q = "SELECT v, pg_sleep(%s) AS named_prepared FROM plan_ext WHERE id = %s"
    with planning.connect() as c:
        c.execute(q, ("0.1", "780"), prepare=True)  # Parse of a named statement, fast
        c.execute(q, ("0.7", "781"), prepare=True)  # Bind and Execute of it only, slow
    p = wait_plan(planning, "named_prepared", reason="slow")
    assert p["error"] is None, p
    assert "781" in str(p["plan"])


def test_a_statement_running_past_the_threshold_gets_a_running_plan_before_it_ends(
        planning):
    import threading
    done = threading.Event()

    def run():
        with planning.connect() as c:
            c.execute("SELECT pg_sleep(4), 'still running'")
        done.set()

    t = threading.Thread(target=run)
    t.start()
    try:
        p = wait_plan(planning, "pg_sleep", reason="running", timeout=3.5)
        assert not done.is_set(), "the plan came before the statement ended"
        assert p["error"] is None and p["top_node"] == "Result", p
        assert p["duration_ms"] >= 500, "the duration is how long it had run when seen"
    finally:
        t.join(10)
    # Once it ended (slow), the same plan says so: no second EXPLAIN.
    p = wait_plan(planning, "pg_sleep", reason="slow")
    assert p["duration_ms"] >= 4000


@pytest.fixture
def two_users(pg):
    for sql in ("DROP TABLE IF EXISTS plan_secret", "DROP ROLE IF EXISTS plan_reader",
                "DROP ROLE IF EXISTS plan_outsider",
                "CREATE TABLE plan_secret (id int PRIMARY KEY, v text)",
                "CREATE ROLE plan_reader LOGIN", "CREATE ROLE plan_outsider LOGIN",
                "GRANT SELECT ON plan_secret TO plan_reader"):
        pg.query(sql)
    yield
    for sql in ("DROP TABLE IF EXISTS plan_secret", "DROP ROLE IF EXISTS plan_reader",
                "DROP ROLE IF EXISTS plan_outsider"):
        pg.query(sql)


def test_each_user_gets_a_plan_under_its_own_role(relay_factory, two_users):
    r = relay_factory(sections={"agent": {"plan_slow_threshold": "0", "plan_sample_rate": "1"}})
    with r.connect(user="plan_reader") as c:
        c.execute("SELECT v FROM plan_secret WHERE id = 1")
    with r.connect(user="plan_outsider") as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT v FROM plan_secret WHERE id = 1")
    ok = wait_plan(r, "plan_secret", user="plan_reader")
    denied = wait_plan(r, "plan_secret", user="plan_outsider")
    assert ok["error"] is None and "plan_secret" in ok["top_node"], ok
    assert denied["top_node"] is None, denied
    assert "42501" in denied["error"] and "permission denied for table plan_secret" in \
        denied["error"], denied
    assert plans(r)["failed"] >= 1


@pytest.fixture
def change_table(pg):
    pg.query("DROP TABLE IF EXISTS plan_chg")
    pg.query("CREATE TABLE plan_chg (id int, v text)")
    pg.query("INSERT INTO plan_chg SELECT g, 'v' || g FROM generate_series(1, 20000) g")
    pg.query("ANALYZE plan_chg")
    yield
    pg.query("DROP TABLE IF EXISTS plan_chg")


def test_a_changed_plan_shape_is_detected_and_counted(relay_factory, pg, change_table):
    from conftest import free_port
    from test_latency_histogram import http_metrics
    http = free_port()
    r = relay_factory(http_listen_port=http,
                      sections={"agent": {"plan_slow_threshold": "0", "plan_sample_rate": "1",
                                          "plan_max_age": "0"}})
    q = "SELECT v FROM plan_chg WHERE id = 4242"
    with r.connect() as c:
        c.execute(q)
    first = wait_plan(r, "plan_chg")
    assert first["top_node"].startswith("Seq Scan"), first
    assert first["changes"] == 0 and plans(r)["plan_changes"] == 0
    # The same cost-only difference is no change: plan it again unchanged.
    with r.connect() as c:
        c.execute(q)
    wait_for(lambda: plans(r)["planned"] >= 2, what="a second plan")
    assert plans(r)["plan_changes"] == 0
    pg.query("CREATE INDEX plan_chg_id ON plan_chg (id)")
    pg.query("ANALYZE plan_chg")
    with r.connect() as c:
        c.execute(q)
    p = wait_plan(r, "plan_chg", changes=1)
    assert "plan_chg_id" in p["top_node"], p
    assert plans(r)["plan_changes"] == 1
    assert "\npgrelay_plan_changes_total 1\n" in http_metrics(http)


class Forwarder:
    """A TCP forwarder to a port: the node's address, so that a test can take the node away."""

    def __init__(self, target_port):
        import socket
        import threading
        self.target = target_port
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self.closed = False
        self.socks = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        import socket
        import threading
        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except (socket.timeout, OSError):
                continue
            try:
                s = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            c.settimeout(None)
            self.socks += [c, s]
            for a, b in ((c, s), (s, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        import socket
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for x in (a, b):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        import socket
        self.closed = True
        self.lsock.close()
        for x in self.socks:
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            x.close()
        self.thread.join(2)


def test_a_node_down_counts_the_request_as_failed_and_the_proxy_serves_on(relay_factory, pg):
    import signal
    fwd = Forwarder(pg.port)
    try:
        r = relay_factory(nodes=[("pg1", {"host": "127.0.0.1", "port": fwd.port,
                                          "role": "primary"})],
                          sections={"agent": {"plan_slow_threshold": THRESHOLD}})
        with r.connect() as c:
            c.execute("SELECT 1")  # the leader is confirmed
        agent = r.agent_pid()
        os.kill(agent, signal.SIGSTOP)  # the request waits in the ring while the node goes
        try:
            with r.connect() as c:
                c.execute(f"SELECT pg_sleep({SLEEP}), 'node goes'")
            fwd.close()
        finally:
            os.kill(agent, signal.SIGCONT)
        p = wait_plan(r, "pg_sleep")
        assert p["top_node"] is None and "cannot connect to node pg1" in p["error"], p
        assert plans(r)["failed"] == 1
        # The proxy serves on: every process alive, the console answers, a new client gets
        # a proper error rather than a hang.
        assert r.proc.poll() is None and len(r.worker_pids()) == 2 and r.agent_pid() == agent
        assert admin_json(r, "show info")
        with pytest.raises(psycopg.OperationalError):
            r.connect(connect_timeout=15)
    finally:
        fwd.close()


def test_a_flood_stays_within_the_rate_limit_and_drops_what_the_rings_cannot_hold(
        relay_factory):
    import signal
    import time
    r = relay_factory(sections={"agent": {"plan_slow_threshold": "0", "plan_sample_rate": "1",
                                          "plan_rate_limit": "3"}})
    with r.connect() as c:
        c.execute("SELECT 1")  # the leader is confirmed
    wait_for(lambda: plans(r)["requests"] == 1, what="the warm-up statement taken")
    agent = r.agent_pid()
    n = 300
    os.kill(agent, signal.SIGSTOP)  # nothing is taken from the rings meanwhile
    try:
        conns = [r.connect() for _ in range(4)]
        for i in range(n):
            conns[i % 4].execute(f"SELECT {i} AS flood_{i}")  # distinct after normalisation
        for c in conns:
            c.close()
    finally:
        resumed = time.monotonic()
        os.kill(agent, signal.SIGCONT)
    got = plans(r)
    assert got["sampled"] == n + 1, "every statement completed and was picked"
    ring_capacity = 32 * 2  # SHM_PLAN_RING per worker, workers = 2
    assert got["ring_dropped"] >= n - ring_capacity, got
    queued = n + 1 - got["ring_dropped"]
    wait_for(lambda: plans(r)["requests"] >= queued, what="the rings drained")
    got = plans(r)
    elapsed = time.monotonic() - resumed
    explained = got["planned"] + got["failed"]
    assert got["rate_limited"] > 0, got
    assert explained <= 3 * (elapsed + 1) + 1, (explained, elapsed, got)
    assert explained + got["rate_limited"] + got["skipped"] + got["deduplicated"] == queued, got
    assert got["rate_limited"] >= queued - explained - 1


def _msg(t, body):
    import struct
    return t + struct.pack("!i", len(body) + 4) + body


@pytest.mark.parametrize("parse_types, bind", [
    (b"\0\0", b""),                                            # empty Bind
    (b"\0\0", b"\0"),                                          # portal name only
    (b"\0\0", b"\0\0\xff\xff"),                                # 65535 formats, none there
    (b"\0\x01\0\0\0\x17", b"\0\0\0\x01\0\x01\0\x01\x7f\xff\xff\xff"),  # a value of 2 GB claimed
    (b"\0\x01\0\0\0\x17", b"\0\0\0\0\x01\x00"),                # 256 values, none there
    (b"\0\x01\0\0\0\x17", b"\0\0\0\x03\0\0\0\0\0\0\0\x01\0\0\0\x012\0\0"),  # 3 formats, 1 value
    (b"\x03\xe8\0\0", b"\0unseen_statement\0\0\0\0\0\0\0"),    # 1000 types claimed; other stmt
    (b"\0\x01\0\0\0\x17", b"\xff" * 3000),                     # longer than the capture
])
def test_malformed_parse_and_bind_never_stop_a_worker_or_the_agent(relay_factory, parse_types,
                                                                   bind):
    r = relay_factory(sections={"agent": {"plan_slow_threshold": "0", "plan_sample_rate": "1"}})
    with r.connect() as c:
        c.execute("SELECT 1")
    workers, agent = sorted(r.worker_pids()), r.agent_pid()
    c = r.raw()
    c.login()
    c.send(_msg(b"P", b"\0SELECT $1::int AS hostile\0" + parse_types) + _msg(b"B", bind) +
           _msg(b"E", b"\0\0\0\0\0") + _msg(b"S", b""))
    c.read_until("Z")  # the server's error, or its close
    c.close()
    # A well-formed one afterwards is planned with its value: the pipeline still works.
    c = r.raw()
    c.login()
    c.send(_msg(b"P", b"\0SELECT $1::int AS well_formed\0\0\x01\0\0\0\x17") +
           _msg(b"B", b"\0\0\0\0\0\x01\0\0\0\x0242\0\0") + _msg(b"E", b"\0\0\0\0\0") +
           _msg(b"S", b""))
    assert c.read_until("Z")[-1][0] == "Z"
    c.close()
    p = wait_plan(r, "well_formed")
    assert p["error"] is None and "42" in str(p["plan"]), p
    assert sorted(r.worker_pids()) == workers and r.agent_pid() == agent
    assert all(w["restarts"] == 0 for w in admin_json(r, "show workers"))


def test_the_plan_keys_are_reloadable(relay_factory):
    import signal
    r = relay_factory(sections={"agent": {"plan_slow_threshold": "0"}})
    with r.connect() as c:
        c.execute(f"SELECT pg_sleep({SLEEP}) AS before_reload")
    with open(r.conf_path) as f:
        text = f.read()
    with open(r.conf_path, "w") as f:
        f.write(text.replace("plan_slow_threshold = 0", f"plan_slow_threshold = {THRESHOLD}"))
    r.signal(signal.SIGHUP)
    wait_for(lambda: any(row["key"] == "agent.plan_slow_threshold" and row["value"] == THRESHOLD
                         for row in admin_json(r, "show config")), what="the reload")
    with r.connect() as c:
        c.execute(f"SELECT pg_sleep({SLEEP}) AS after_reload")
    wait_plan(r, "after_reload", reason="slow")
    assert plan_for(r, "before_reload") is None


def test_a_restarted_agent_keeps_the_plans_and_deduplicates_against_them(planning):
    import signal
    with planning.connect() as c:
        c.execute(f"SELECT pg_sleep({SLEEP}) AS survives_restart")
    p = wait_plan(planning, "survives_restart", reason="slow")
    old = planning.agent_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: planning.agent_pid() not in (None, old), timeout=20,
             what="the master restarted the agent")
    assert plan_for(planning, "survives_restart") == {**p, "age_s": plan_for(
        planning, "survives_restart")["age_s"]}
    before = plans(planning)
    with planning.connect() as c:
        c.execute(f"SELECT pg_sleep({SLEEP}) AS survives_restart")
    wait_for(lambda: plans(planning)["deduplicated"] > before["deduplicated"],
             what="the statement deduplicated by the new agent")
    after = plans(planning)
    assert after["planned"] == before["planned"]
    assert len([x for x in after["plans"] if "survives_restart" in x["text"]]) == 1


def test_the_plan_itself_is_hidden_from_the_stats_level_as_statement_text_is(relay_factory):
    import stat
    import subprocess

    from conftest import admin_socket
    r = relay_factory(admin_socket_mode="0666", stats_users="postgres", operator_users="nobody",
                      sections={"agent": {"plan_slow_threshold": THRESHOLD}})
    os.chmod(r.workdir, 0o711)
    assert stat.S_IMODE(os.stat(admin_socket(r)).st_mode) == 0o666
    with r.connect() as c:
        c.execute(f"SELECT pg_sleep({SLEEP}), 'hunter2-in-a-plan'")
    wait_plan(r, "pg_sleep", reason="slow")

    def console_as(user):
        out = subprocess.run(["runuser", "-u", user, "--", "socat", "-",
                              f"UNIX-CONNECT:{admin_socket(r)}"], input="show plans json\n",
                             capture_output=True, text=True, timeout=15).stdout
        import json
        return out, json.loads(out.strip())["plans"][0]

    out, row = console_as("postgres")
    assert "hunter2" not in out and row["plan"] == "<insufficient privilege>", out
    assert row["top_node"] == "Result" and row["text"] == "SELECT pg_sleep($1), $2"
    out, row = console_as("nobody")
    assert "hunter2-in-a-plan" in out and row["plan"][0]["Plan"]["Node Type"] == "Result"


def test_writes_are_planned_in_a_read_only_transaction_and_not_run_again(relay_factory, pg,
                                                                         ext_table):
    r = relay_factory(sections={"agent": {"plan_slow_threshold": "0", "plan_sample_rate": "1"}})
    with r.connect() as c:
        c.execute("INSERT INTO plan_ext VALUES (5001, 'inserted')")
        c.execute("UPDATE plan_ext SET v = v || '!' WHERE id = 5001")
        c.execute("WITH d AS (DELETE FROM plan_ext WHERE id = 5001 RETURNING id) SELECT * FROM d")
    ins = wait_plan(r, "INSERT INTO plan_ext")
    upd = wait_plan(r, "UPDATE plan_ext")
    dele = wait_plan(r, "DELETE FROM plan_ext")
    assert ins["error"] is None and ins["top_node"] == "Insert on public.plan_ext", ins
    assert upd["error"] is None and upd["top_node"] == "Update on public.plan_ext", upd
    assert dele["error"] is None and dele["top_node"] == "CTE Scan on d", dele
    # EXPLAIN without ANALYZE ran nothing: the row the client deleted stays deleted, and the
    # table holds exactly what the clients' own statements left.
    assert pg.query("SELECT count(*) FROM plan_ext WHERE id = 5001") == [(0,)]
    assert pg.query("SELECT count(*) FROM plan_ext") == [(1000,)]


def _long_select(tag, columns):
    cols = ", ".join(f"{i} AS {tag}_{i}" for i in range(columns))
    return f"SELECT pg_sleep({SLEEP}) AS {tag}, {cols}"


def test_a_statement_longer_than_the_session_slot_is_planned_whole(planning):
    q = _long_select("long_simple", 300)  # about 4 kB: more than the slot's 1023 bytes
    assert 3000 < len(q) < 8000
    with planning.connect() as c:
        c.execute(q)
        c.execute(_long_select("long_extended", 300) + ", %s::text AS param", ("value",))
    # the text shown is cut at 1023 bytes; the plan shows the whole statement was explained
    p = wait_plan(planning, "AS long_simple,", reason="slow")
    assert p["error"] is None and p["top_node"] == "Result", p
    output = p["plan"][0]["Plan"]["Output"]
    assert len(output) == 301 and output[-1] == "299", output[-3:]
    p = wait_plan(planning, "AS long_extended,", reason="slow")
    assert p["error"] is None and p["plan"][0]["Plan"]["Output"][-1] == "'value'::text", p


def test_a_statement_longer_than_the_request_limit_is_skipped_and_counted(planning):
    q = _long_select("too_long", 700)  # more than 8191 bytes
    assert len(q) > 8192
    with planning.connect() as c:
        assert c.execute(q).fetchone()[700] == 699  # the statement itself is whole
        c.execute(f"SELECT pg_sleep({SLEEP}) AS after_the_long_one")
    wait_plan(planning, "after_the_long_one", reason="slow")
    got = plans(planning)
    assert plan_for(planning, "AS too_long,") is None and got["skipped"] >= 1, got
