"""The fence on a node with many databases (issue 8, Deliver 3): the fence keeps the oids of
the databases it closed in one setting and builds its statements from that list, so a node
with 200 databases (an oid list of about 1,200 characters) is fenced and unfenced whole,
like a node with three. template1, which stays open for the agent to lift the fence, takes no
role but superusers meanwhile (CONNECTION LIMIT 0), so an application role cannot write there
either; its limit is given back by unfence."""

import time

import psycopg
import pytest

from fleet import Fleet

EXIT_OK = 0
N_DATABASES = 200
PREFIX = "fence_many_"
APP_ROLE = "fence_app"  # an application's role: no superuser


def connect_error(node, dbname, **kw):
    """The error a fresh connection to ``dbname`` on ``node`` gets, or None when it connects."""
    try:
        with node.connect(dbname=dbname, connect_timeout=3, **kw) as c:
            c.execute("SELECT 1")
    except psycopg.Error as e:
        return str(e).strip()
    return None


def open_databases(node):
    """Databases of ``node`` (but template1) that accept connections, read through template1."""
    with node.connect(dbname="template1") as c:
        return {r[0] for r in c.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND datname <> 'template1'")}


@pytest.mark.deadline(300)  # 200 CREATE DATABASE took 10-50 s on a loaded 2-CPU machine
def test_a_node_with_200_databases_is_fenced_whole_and_unfenced_whole(pg):
    started = time.monotonic()
    with Fleet.start(pg) as fleet:
        pg1, pg2 = fleet.cluster["pg1"], fleet.cluster["pg2"]
        with pg1.connect() as c:
            for i in range(N_DATABASES):
                # FILE_COPY: a checkpoint and a directory copy each, not 8 MB of WAL each
                c.execute(f"CREATE DATABASE {PREFIX}{i} STRATEGY FILE_COPY")
            c.execute(f"CREATE ROLE {APP_ROLE} LOGIN")
        created = time.monotonic() - started
        with pg1.connect(dbname="template1") as c:
            c.execute(f"GRANT CREATE ON SCHEMA public TO {APP_ROLE}")  # it may write there
        with pg1.connect(dbname="template1", user=APP_ROLE) as c:
            c.execute("CREATE TABLE app_t (x int); INSERT INTO app_t VALUES (1)")
        fleet.cluster.wait_caught_up(pg2, pg1)
        before = open_databases(pg1)
        assert len([d for d in before if d.startswith(PREFIX)]) == N_DATABASES

        rc, out, err = fleet.ctl_json("switchover", "--node", "pg2", "--promote",
                                      "--timeout", "60")
        assert rc == EXIT_OK, (out, err)
        assert "pg1 fenced" in out["steps"]["fence"], out
        assert f"{len(before)} more database(s) refuse connections" in out["steps"]["fence"], out
        assert open_databases(pg1) == set(), "a database of the fenced pg1 accepts connections"
        for dbname in ("postgres", f"{PREFIX}0", f"{PREFIX}{N_DATABASES - 1}"):
            error = connect_error(pg1, dbname)
            assert error and "not currently accepting connections" in error, (dbname, error)
        # template1: open to the agent (a superuser), closed to every other role
        error = connect_error(pg1, "template1", user=APP_ROLE)
        assert error and "too many connections" in error, error
        assert not pg2.in_recovery()

        rc, out, err = fleet.ctl_json("unfence", "pg1", "--timeout", "30")
        assert rc == EXIT_OK, (out, err)
        assert f"pg1 unfenced: {len(before)} database(s) accept connections again" \
            in out["detail"], out
        assert open_databases(pg1) == before
        for dbname in ("postgres", f"{PREFIX}0", f"{PREFIX}{N_DATABASES - 1}"):
            assert connect_error(pg1, dbname) is None, dbname
        assert connect_error(pg1, "template1", user=APP_ROLE) is None
        assert pg1.scalar("SELECT datconnlimit FROM pg_database WHERE datname = 'template1'") \
            == -1
        with pg1.connect(dbname="template1") as c:
            assert c.execute("SELECT count(*) FROM pg_db_role_setting r, unnest(r.setconfig) s"
                             " WHERE s LIKE 'pgrelay.fenced%'").fetchone()[0] == 0
    print(f"scenario time {time.monotonic() - started:.1f}s ({N_DATABASES} databases created "
          f"in {created:.1f}s)")
