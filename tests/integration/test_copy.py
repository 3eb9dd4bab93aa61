"""Bulk data through pgrelay: COPY in both directions and large result sets (>= 100 MB)."""

import hashlib
import uuid

import pytest
from psycopg import errors

ROWS = 103_000  # x 1024-byte payload = 105 MB > 100 MiB
PAYLOAD_LEN = 1024  # repeat(md5(id::text), 32)
MB = 1024 * 1024


def payload(i):
    return hashlib.md5(str(i).encode()).hexdigest() * 32


def copy_lines(first, last):
    """The COPY text-format lines for ids first..last (same text COPY TO produces)."""
    return "".join(f"{i}\t{payload(i)}\n" for i in range(first, last + 1)).encode()


@pytest.fixture
def big_table(pg):
    name = f"big_{uuid.uuid4().hex[:8]}"
    pg.query(f"CREATE UNLOGGED TABLE {name} (id int, payload text)")
    yield name
    pg.query(f"DROP TABLE {name}")


@pytest.mark.deadline(300)
def test_copy_100mb_in_and_out_preserves_every_byte(relay, pg, big_table):
    sent = hashlib.md5()
    sent_bytes = 0
    with relay.connect() as c:
        with c.cursor().copy(f"COPY {big_table} (id, payload) FROM STDIN") as copy:
            for first in range(1, ROWS + 1, 1000):
                chunk = copy_lines(first, min(first + 999, ROWS))
                sent.update(chunk)
                sent_bytes += len(chunk)
                copy.write(chunk)
    assert sent_bytes >= 100 * MB

    # what arrived in the server, checked directly (not through pgrelay)
    count, total, bad = pg.query(
        f"SELECT count(*), sum(length(payload)), "
        f"count(*) FILTER (WHERE payload IS DISTINCT FROM repeat(md5(id::text), 32)) "
        f"FROM {big_table}"
    )[0]
    assert (count, total, bad) == (ROWS, ROWS * PAYLOAD_LEN, 0)

    received = hashlib.md5()
    received_bytes = 0
    with relay.connect() as c:
        with c.cursor().copy(
            f"COPY (SELECT id, payload FROM {big_table} ORDER BY id) TO STDOUT"
        ) as copy:
            for data in copy:
                received.update(data)
                received_bytes += len(data)
    assert received_bytes == sent_bytes
    assert received.hexdigest() == sent.hexdigest()


def test_copy_from_stdin_with_bad_row_reports_error_and_session_continues(conn):
    conn.execute("CREATE TEMP TABLE c_bad (id int, t text)")
    with pytest.raises(errors.InvalidTextRepresentation):
        with conn.cursor().copy("COPY c_bad FROM STDIN") as copy:
            copy.write(copy_lines(1, 500))
            copy.write(b"not-a-number\tboom\n")
            # keep sending after the server already failed the COPY
            for first in range(501, 5001, 500):
                copy.write(copy_lines(first, first + 499))
    assert conn.execute("SELECT count(*) FROM c_bad").fetchone() == (0,)
    assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)


def test_copy_aborted_by_client_rolls_back_and_session_continues(conn):
    conn.execute("CREATE TEMP TABLE c_fail (id int, t text)")
    # psycopg turns the exception into a CopyFail message; the server's answer
    # (an ErrorResponse quoting the CopyFail reason) must come back through pgrelay
    with pytest.raises(errors.QueryCanceled, match="ZeroDivisionError"):
        with conn.cursor().copy("COPY c_fail FROM STDIN") as copy:
            copy.write(copy_lines(1, 100))
            1 / 0
    assert conn.execute("SELECT count(*) FROM c_fail").fetchone() == (0,)
    with conn.cursor().copy("COPY c_fail FROM STDIN") as copy:
        copy.write(copy_lines(1, 100))
    assert conn.execute("SELECT count(*) FROM c_fail").fetchone() == (100,)


def test_binary_copy_round_trip(conn):
    conn.execute("CREATE TEMP TABLE c_bin (id int, b bytea)")
    rows = [(i, bytes(range(i % 256)) * 3) for i in range(1000)]
    cur = conn.cursor()
    with cur.copy("COPY c_bin (id, b) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["int4", "bytea"])
        for r in rows:
            copy.write_row(r)
    with cur.copy("COPY (SELECT id, b FROM c_bin ORDER BY id) TO STDOUT (FORMAT BINARY)") as copy:
        copy.set_types(["int4", "bytea"])
        back = list(copy.rows())
    assert back == rows


@pytest.mark.deadline(300)
def test_100mb_result_set_arrives_complete(conn):
    cur = conn.cursor()
    cur.execute(
        "SELECT id, repeat(md5(id::text), 32) FROM generate_series(1, %s) id", (ROWS,)
    )
    count = total = mismatches = 0
    for i, text in cur:
        count += 1
        total += len(text)
        if i != count or text != payload(i):
            mismatches += 1
    assert count == ROWS
    assert total == ROWS * PAYLOAD_LEN >= 100 * MB
    assert mismatches == 0


@pytest.mark.deadline(300)
def test_100mb_result_set_streamed_row_by_row(conn):
    # single-row mode: the client consumes slowly while the server pushes ~100 MB
    count = total = 0
    for i, text in conn.cursor().stream(
        "SELECT id, repeat('x', 1000) || id FROM generate_series(1, 105000) id"
    ):
        count += 1
        total += len(text)
        assert text == "x" * 1000 + str(i)
    assert count == 105000
    assert total >= 100 * MB


def test_single_50mb_value_in_both_directions(conn):
    # one DataRow / one Bind message far larger than any relay buffer
    big = "".join(payload(i) for i in range(50 * MB // PAYLOAD_LEN))
    assert len(big) == 50 * MB
    row = conn.execute("SELECT length(%s::text), md5(%s::text)", (big, big)).fetchone()
    assert row == (len(big), hashlib.md5(big.encode()).hexdigest())
    (back,) = conn.execute("SELECT repeat(md5('x'), %s)", (50 * MB // 32,)).fetchone()
    assert back == hashlib.md5(b"x").hexdigest() * (50 * MB // 32)
