"""Queries, prepared statements, errors, notifications and notices through pgrelay."""

import select
import subprocess
import uuid

import pytest
from psycopg import errors

from conftest import PG_BIN, wait_for


# --------------------------------------------------------------------------- #
# simple and extended query protocol
# --------------------------------------------------------------------------- #


def test_simple_query_returns_rows(conn):
    # no parameters => psycopg sends a simple-protocol Query message
    rows = conn.execute("SELECT g, 'row ' || g FROM generate_series(1, 5) g").fetchall()
    assert rows == [(i, f"row {i}") for i in range(1, 6)]


def test_simple_query_with_several_statements_returns_every_result(conn):
    # only the simple protocol accepts several statements in one string
    cur = conn.execute("SELECT 1; SELECT 2; SELECT 'three'")
    results = [cur.fetchall()]
    while cur.nextset():
        results.append(cur.fetchall())
    assert results == [[(1,)], [(2,)], [("three",)]]


def test_extended_query_with_parameters(conn):
    # parameters => Parse/Bind/Describe/Execute/Sync
    row = conn.execute(
        "SELECT %s::int + %s::int, %s::text || '!', %s::bytea, %s::int IS NULL",
        (40, 2, "héllo", b"\x00\x01\xff", None),
    ).fetchone()
    assert row == (42, "héllo!", b"\x00\x01\xff", True)


def test_extended_query_with_binary_results(conn):
    cur = conn.cursor(binary=True)
    row = cur.execute("SELECT %s::bigint * 2, %s::float8", (2**40, 1.5)).fetchone()
    assert row == (2**41, 1.5)


def test_server_reports_startup_parameters_to_the_client(relay):
    with relay.connect(application_name="param-check", dbname="template1") as c:
        assert c.info.server_version >= 150000
        assert c.info.parameter_status("application_name") == "param-check"
        assert c.execute("SELECT current_database(), current_user").fetchone() == (
            "template1",
            "postgres",
        )
        # ParameterStatus sent after SET is relayed too
        c.execute("SET TimeZone = 'Asia/Tokyo'")
        assert c.info.parameter_status("TimeZone") == "Asia/Tokyo"


def test_protocol_level_named_prepared_statements(relay):
    with relay.connect() as c:
        c.prepare_threshold = 0
        for i in range(5):
            row = c.execute("SELECT %s::int * 10", (i,), prepare=True).fetchone()
            assert row == (i * 10,)
        # psycopg named the statement on the server (Parse with a name, then Bind only)
        names = c.execute(
            "SELECT name FROM pg_prepared_statements WHERE NOT from_sql"
        ).fetchall()
        assert len(names) >= 1 and all(n[0] for n in names), names


def test_sql_prepare_and_execute(conn):
    conn.execute("PREPARE add_one(int) AS SELECT $1 + 1")
    assert conn.execute("EXECUTE add_one(41)").fetchone() == (42,)
    assert conn.execute("EXECUTE add_one(1)").fetchone() == (2,)
    assert conn.execute(
        "SELECT count(*) FROM pg_prepared_statements WHERE name = 'add_one'"
    ).fetchone() == (1,)
    conn.execute("DEALLOCATE add_one")
    with pytest.raises(errors.InvalidSqlStatementName):
        conn.execute("EXECUTE add_one(1)")


def test_pipeline_of_many_extended_queries(conn):
    # many Parse/Bind/Execute sent before reading any result
    with conn.pipeline():
        curs = [conn.execute("SELECT %s::int", (i,)) for i in range(200)]
    assert [c.fetchone()[0] for c in curs] == list(range(200))


def test_psql_through_pgrelay(relay):
    r = subprocess.run(
        [f"{PG_BIN}/psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(relay.port),
         "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1",
         "-c", "SELECT 6 * 7", "-c", "SELECT string_agg(g::text, ',') FROM generate_series(1,3) g"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        env={"PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["42", "1,2,3"]


# --------------------------------------------------------------------------- #
# errors and transactions
# --------------------------------------------------------------------------- #


def test_error_in_transaction_then_rollback_leaves_session_usable(relay, pg):
    table = f"t_err_{uuid.uuid4().hex[:8]}"
    pg.query(f"CREATE TABLE {table} (id int)")
    with relay.connect(autocommit=False) as c:
        c.execute(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(errors.DivisionByZero):
            c.execute("SELECT 1 / 0")
        # the transaction is aborted: further statements are refused
        with pytest.raises(errors.InFailedSqlTransaction):
            c.execute("SELECT 1")
        c.rollback()
        assert c.execute("SELECT 2").fetchone() == (2,)
        assert c.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        c.execute(f"INSERT INTO {table} VALUES (2)")
        c.commit()
    assert pg.query(f"SELECT id FROM {table}") == [(2,)]


def test_error_in_extended_query_leaves_session_usable(conn):
    conn.execute("CREATE TEMP TABLE uq (x int PRIMARY KEY)")
    conn.execute("INSERT INTO uq VALUES (%s)", (1,))
    with pytest.raises(errors.UniqueViolation):
        conn.execute("INSERT INTO uq VALUES (%s)", (1,))
    assert conn.execute("SELECT %s::int", (7,)).fetchone() == (7,)
    with pytest.raises(errors.InvalidTextRepresentation):
        conn.execute("SELECT %s::int", ("not a number",))
    assert conn.execute("SELECT %s::text", ("still fine",)).fetchone() == ("still fine",)


def test_syntax_error_is_reported_with_sqlstate(conn):
    with pytest.raises(errors.SyntaxError) as ei:
        conn.execute("SELEC 1")
    assert ei.value.sqlstate == "42601"
    assert conn.execute("SELECT 1").fetchone() == (1,)


# --------------------------------------------------------------------------- #
# LISTEN / NOTIFY and NOTICE
# --------------------------------------------------------------------------- #


def test_notify_is_delivered_to_a_listening_session(relay):
    channel = f"chan_{uuid.uuid4().hex[:8]}"
    with relay.connect() as listener, relay.connect() as notifier:
        received = []
        listener.add_notify_handler(received.append)
        listener.execute(f"LISTEN {channel}")
        notifier_pid = notifier.execute("SELECT pg_backend_pid()").fetchone()[0]

        notifier.execute(f"NOTIFY {channel}, 'hello through pgrelay'")

        # the notification reaches the idle listener without it sending anything
        readable, _, _ = select.select([listener.pgconn.socket], [], [], 10)
        assert readable, "NOTIFY not forwarded to the idle listening client"
        wait_for(
            lambda: listener.execute("SELECT 1") and received,
            timeout=5,
            what="notification",
        )
        assert [(n.channel, n.payload, n.pid) for n in received] == [
            (channel, "hello through pgrelay", notifier_pid)
        ]


def test_notify_payloads_arrive_in_order(relay):
    channel = f"chan_{uuid.uuid4().hex[:8]}"
    with relay.connect() as listener, relay.connect() as notifier:
        received = []
        listener.add_notify_handler(received.append)
        listener.execute(f"LISTEN {channel}")
        with notifier.transaction():
            for i in range(50):
                notifier.execute(f"NOTIFY {channel}, 'msg {i}'")
        wait_for(
            lambda: listener.execute("SELECT 1") and len(received) >= 50,
            timeout=10,
            what="50 notifications",
        )
        assert [n.payload for n in received] == [f"msg {i}" for i in range(50)]


def test_notice_is_delivered_to_the_client(conn):
    notices = []
    # a Diagnostic is only valid inside the handler: copy what we check
    conn.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.message_primary)))
    conn.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END $$")
    assert notices == [
        ("NOTICE", "hello 42"),
        ("WARNING", "careful"),
    ]
    # the session continues normally after the notices
    assert conn.execute("SELECT 'after'").fetchone() == ("after",)


def test_notice_during_extended_query(conn):
    notices = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    conn.execute(
        "CREATE OR REPLACE FUNCTION pg_temp.shout(t text) RETURNS int "
        "LANGUAGE plpgsql AS $$ BEGIN RAISE NOTICE 'got %', t; RETURN length(t); END $$"
    )
    assert conn.execute("SELECT pg_temp.shout(%s)", ("abcd",)).fetchone() == (4,)
    assert notices == ["got abcd"]
