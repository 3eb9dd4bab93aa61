"""Many concurrent clients through pgrelay, each isolated from the others."""

import os
import re
import subprocess
import threading
import uuid

import pytest

from conftest import PG_BIN

CLIENTS = 200
ITERATIONS = 15


@pytest.mark.deadline(300)
def test_200_concurrent_clients_see_only_their_own_data(relay, pg):
    table = f"conc_{uuid.uuid4().hex[:8]}"
    pg.query(f"CREATE TABLE {table} (id int PRIMARY KEY, counter int, tag text)")
    app = f"conc-{uuid.uuid4().hex[:8]}"
    barrier = threading.Barrier(CLIENTS + 1, timeout=120)
    failures = []

    def client(n):
        try:
            with relay.connect(application_name=app) as c:
                c.execute(f"INSERT INTO {table} VALUES (%s, 0, '')", (n,))
                barrier.wait()  # everybody connected at the same time
                barrier.wait()  # main thread has counted the sessions
                for k in range(1, ITERATIONS + 1):
                    tag = f"client {n} iteration {k}"
                    with c.transaction():
                        c.execute(
                            f"UPDATE {table} SET counter = counter + 1, tag = %s WHERE id = %s",
                            (tag, n),
                        )
                        row = c.execute(
                            f"SELECT id, counter, tag FROM {table} WHERE id = %s", (n,)
                        ).fetchone()
                        if row != (n, k, tag):
                            failures.append(f"client {n} read {row!r}, expected {(n, k, tag)!r}")
                    # simple-protocol round trip carrying the client's identity
                    echo = c.execute(f"SELECT 'echo-{n}-{k}'").fetchone()
                    if echo != (f"echo-{n}-{k}",):
                        failures.append(f"client {n} got echo {echo!r}")
        except Exception as e:  # noqa: BLE001
            failures.append(f"client {n}: {e!r}")
            barrier.abort()

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
        concurrent = pg.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
        )[0][0]
        barrier.wait()
    except threading.BrokenBarrierError:
        concurrent = None
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads), "some clients hung"
    assert failures == [], failures[:10]
    assert concurrent == CLIENTS
    rows = pg.query(f"SELECT id, counter, tag FROM {table} ORDER BY id")
    assert rows == [(n, ITERATIONS, f"client {n} iteration {ITERATIONS}") for n in range(CLIENTS)]
    pg.query(f"DROP TABLE {table}")


@pytest.fixture
def bench_db(pg):
    """A database of its own, initialised by pgbench -i, for one test: none depends on what
    another left behind."""
    db = f"bench_{uuid.uuid4().hex[:10]}"
    pg.query(f"CREATE DATABASE {db}")
    try:
        init = subprocess.run(
            [f"{PG_BIN}/pgbench", "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(pg.port),
             "-U", "postgres", db],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
        )
        assert init.returncode == 0, init.stderr
        yield db
    finally:
        pg.query(f"DROP DATABASE {db} WITH (FORCE)")


@pytest.mark.deadline(180)
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_through_pgrelay_completes_without_failures(relay, pg, mode, bench_db):
    db = bench_db
    clients, txs = 16, 50
    r = subprocess.run(
        [f"{PG_BIN}/pgbench", "-n", "-M", mode, "-c", str(clients), "-j", "2", "-t", str(txs),
         "-h", "127.0.0.1", "-p", str(relay.port), "-U", "postgres", db],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=150,
        env={**os.environ, "PGSSLMODE": "disable"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"number of transactions actually processed: (\d+)/(\d+)", r.stdout)
    assert m, r.stdout
    assert int(m.group(1)) == int(m.group(2)) == clients * txs
    m = re.search(r"number of failed transactions: (\d+)", r.stdout)
    assert m and int(m.group(1)) == 0, r.stdout
