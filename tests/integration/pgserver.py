"""The session's PostgreSQL 15 server (the ``pg`` fixture): initdb, roles, a direct client.

pg              session-scoped PostgreSQL 15 on a port of free_port()'s (PgCluster)
PgEndpoint      conninfo(), connect(), query() of a server or pgrelay (a base class)
_as_postgres    run a command as the postgres user
MD5_USER, SCRAM_USER and their passwords: roles checked with md5 and scram-sha-256
"""

import os
import shutil
import subprocess
import tempfile

import psycopg
import pytest

from procs import free_port


PG_BIN = "/usr/lib/postgresql/15/bin"

MD5_USER, MD5_PASSWORD = "md5user", "md5-secret-pw"
SCRAM_USER, SCRAM_PASSWORD = "scramuser", "scram-secret-pw"


def _as_postgres(args, **kw):
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        **kw,
    )


class PgEndpoint:
    """Something a psycopg client logs in to as postgres, on ``self.host``:``self.port`` (a
    PostgreSQL server, a pgrelay): trust, no TLS, no GSSAPI. conninfo()'s and connect()'s
    keyword arguments are libpq keys that override these."""

    CONNECT_TIMEOUT = 10  # seconds

    def conninfo(self, **kw):
        params = dict(
            host=self.host,
            port=self.port,
            user="postgres",
            dbname="postgres",
            sslmode="disable",
            gssencmode="disable",
            connect_timeout=self.CONNECT_TIMEOUT,
        )
        params.update(kw)
        return psycopg.conninfo.make_conninfo(**params)

    def connect(self, autocommit=True, **kw):
        return psycopg.connect(self.conninfo(**kw), autocommit=autocommit)

    def query(self, sql, params=None):
        """Run one statement in a session of its own; its rows (None if it has none)."""
        with self.connect() as c:
            cur = c.execute(sql, params)
            return cur.fetchall() if cur.description is not None else None


class PgCluster(PgEndpoint):
    """The session's PostgreSQL server; connect(): a direct connection (bypassing pgrelay)."""

    def __init__(self, datadir, port):
        self.datadir = datadir
        self.sockdir = datadir  # unix_socket_directories
        self.port = port
        self.host = "127.0.0.1"

    def backend_pids(self, application_name):
        rows = self.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        )
        return [r[0] for r in rows]

    def active_query_pid(self, application_name, like="%pg_sleep%"):
        rows = self.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
            " AND state = 'active' AND query LIKE %s",
            (application_name, like),
        )
        return rows[0][0] if rows else None

    def pid_exists(self, pid):
        return bool(self.query("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)))


@pytest.fixture(scope="session")
def pg():
    datadir = tempfile.mkdtemp(prefix="pgrelay-it-pg-")
    shutil.chown(datadir, "postgres", "postgres")
    os.chmod(datadir, 0o700)
    pgdata = os.path.join(datadir, "data")
    port = free_port()
    r = _as_postgres(
        [f"{PG_BIN}/initdb", "-D", pgdata, "--auth=trust", "-U", "postgres", "-E", "UTF8",
         "--locale=C", "--no-sync"]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    with open(os.path.join(pgdata, "postgresql.conf"), "a") as f:
        f.write(
            f"""
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{datadir}'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 128MB
max_wal_size = 2GB
log_min_messages = warning
"""
        )
    # password-checked roles first, everything else trusted
    hba = os.path.join(pgdata, "pg_hba.conf")
    with open(hba) as f:
        original = f.read()
    with open(hba, "w") as f:
        f.write(
            f"host all {MD5_USER} 127.0.0.1/32 md5\n"
            f"host all {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
            "local all all trust\n" + original
        )
    logfile = os.path.join(datadir, "postgres.log")
    r = _as_postgres(
        [f"{PG_BIN}/pg_ctl", "-D", pgdata, "-l", logfile, "-w", "-t", "60", "start"]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    cluster = PgCluster(datadir, port)
    try:
        with cluster.connect() as c:
            c.execute("SET password_encryption = 'md5'")
            c.execute(f"CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}'")
            c.execute("SET password_encryption = 'scram-sha-256'")
            c.execute(f"CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}'")
        yield cluster
    finally:
        _as_postgres([f"{PG_BIN}/pg_ctl", "-D", pgdata, "-m", "immediate", "-w", "stop"])
        shutil.rmtree(datadir, ignore_errors=True)


# what conftest offers (suite.py), private names that helpers import included
__all__ = ["PG_BIN", "MD5_USER", "MD5_PASSWORD", "SCRAM_USER", "SCRAM_PASSWORD", "_as_postgres",
           "PgEndpoint", "PgCluster", "pg"]
