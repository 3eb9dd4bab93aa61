"""Query plans: the workers queue slow, sampled and running statements, the agent EXPLAINs
them (never ANALYZE) on the node and database they ran on, under SET ROLE to their user, and
the console's ``show plans`` shows the outcome.

Every plan is waited for (the planner polls every 100 ms); nothing sleeps to synchronise.
"""

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
