"""The agents' store work stays off the event loop (issue 9, Deliver 2): with the store holding
one proxy's rows (a test trigger makes every write of proxy-slow's rows in a table wait for an
advisory lock the test holds), its acknowledgement, the delivery of `maintenance on` to its
parked long poll, its registration and its plan upload wait on the store worker, while
/healthz, a view served from memory and another agent's metrics are answered at once. Once the
store lets go, each completes."""

import time

import psycopg

from conftest import wait_for
from test_control_api import (  # noqa: F401 - fixtures
    ADMIN,
    API,
    TOKENS,
    Background,
    SimAgent,
    agents,
    control,
    control_factory,
    store,
)

HOLD_KEY = 94210417  # the advisory lock the trigger waits for

HOLD_SQL = """
CREATE OR REPLACE FUNCTION pgrelay.test_hold() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared({key});
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;  -- NULL would skip the deletion
    END IF;
    RETURN NEW;
END $$;
"""


class StoreHold:
    """While held, every insert or update of the rows of table that when selects (by default
    proxy-slow's) waits in the store."""

    def __init__(self, store, table="command_acks", events="UPDATE",
                 when="NEW.node_id = 'proxy-slow'"):
        self.store, self.table = store, table
        with psycopg.connect(store, autocommit=True) as c:
            c.execute(HOLD_SQL.format(key=HOLD_KEY))
            c.execute(f"CREATE TRIGGER test_hold BEFORE {events} ON pgrelay.{table} FOR EACH ROW"
                      f" WHEN ({when}) EXECUTE FUNCTION pgrelay.test_hold()")
        self.conn = psycopg.connect(store, autocommit=True)
        self.conn.execute("SELECT pg_advisory_lock(%s)", (HOLD_KEY,))

    def waiting(self):
        """A statement of the control plane on the table waits for the hold."""
        with psycopg.connect(self.store, autocommit=True) as c:
            return c.execute("SELECT count(*) FROM pg_stat_activity"
                             " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                             " AND wait_event = 'advisory' AND query LIKE %s",
                             (f"%{self.table}%",)).fetchone()[0] > 0

    def release(self):
        """Let the held statements go, then drop the trigger (another hold may follow)."""
        if self.conn is not None:
            self.conn.execute("SELECT pg_advisory_unlock(%s)", (HOLD_KEY,))
            self.conn.close()
            self.conn = None
            with psycopg.connect(self.store, autocommit=True) as c:
                c.execute(f"DROP TRIGGER test_hold ON pgrelay.{self.table}")


def waits_on_lock(store, table):
    """A statement on pgrelay.table waits for a table lock in the store (LOCK TABLE by the
    test)."""
    with psycopg.connect(store, autocommit=True) as c:
        return c.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                         " AND query LIKE %s AND pid <> pg_backend_pid()",
                         (f"%pgrelay.{table}%",)).fetchone()[0] > 0


def worst_answer(control, other, rounds=10):
    """The slowest of /healthz, the proxies view and other's metrics, asked rounds times:
    (seconds, which)."""
    worst = (0.0, None)
    for _ in range(rounds):
        for what, ask in (
                ("/healthz", lambda: control.call("GET", "/healthz", timeout=10)),
                ("the proxies view",
                 lambda: control.admin("GET", "/deployments/prod/proxies", timeout=10)),
                ("another agent's metrics",
                 lambda: other.post("/metrics", {"ts_ms": int(time.time() * 1000)}))):
            t = time.monotonic()
            status, body = ask()
            worst = max(worst, (time.monotonic() - t, what), key=lambda w: w[0])
            assert status == 200, (what, body)
    return worst


def others_answer_while(control, other, pending, name):
    """While pending (a Background request) waits in the store: /healthz, the proxies view and
    other's metrics each answer within a second, and pending is still waiting after them. The
    slowest answer, in seconds."""
    worst, what = worst_answer(control, other)
    assert worst < 1.0, f"{what} waited {worst:.2f}s behind {name}"
    assert not pending.done(), f"{name} did not wait for the store"
    return worst


def maintenance_on(control):
    """The operator's `maintenance on`, held until every proxy acknowledged, in a thread."""
    return Background(control.port, "POST", API + "/deployments/prod/maintenance",
                      {"on": True, "timeout_s": 60}, token=ADMIN, timeout=90)


def command_for(agent):
    """Poll (without waiting) until a command comes; it."""
    got = []

    def one():
        status, body = agent.poll(wait_s=0)
        assert status == 200, body
        got.extend(body["commands"])
        return bool(got)

    wait_for(one, timeout=15, what=f"a command for {agent.node_id}")
    return got[0]


def test_an_acknowledgement_waiting_on_the_store_holds_no_other_request(control, store):
    slow = SimAgent(control, "proxy-slow")
    slow.register()
    other = SimAgent(control, "proxy-other")
    other.register()
    op = maintenance_on(control)
    cmd = command_for(slow)
    assert command_for(other)["id"] == cmd["id"]
    hold = StoreHold(store)
    try:
        ack = Background(control.port, "POST", f"{API}/agent/commands/{cmd['id']}/ack",
                         {"node_id": "proxy-slow", "ok": True, "detail": "paused"},
                         token=TOKENS["prod"], timeout=60)
        wait_for(hold.waiting, timeout=10, what="the acknowledgement to wait in the store")
        worst = others_answer_while(control, other, ack, "the acknowledgement")
    finally:
        hold.release()
    status, body = ack.result(timeout=30)
    assert status == 204, body
    status, body = other.ack(cmd["id"])
    assert status == 204, body
    status, body = op.result(timeout=30)
    assert status == 200 and body["ok"], body
    print(f"worst answer while an acknowledgement waited on the store: {worst * 1000:.0f} ms")


def test_maintenance_on_while_a_parked_polls_delivery_waits_on_the_store_holds_no_other_request(
        control, store):
    slow = SimAgent(control, "proxy-slow")
    slow.register()
    other = SimAgent(control, "proxy-other")
    other.register()
    hold = StoreHold(store)
    try:
        poll = Background(control.port, "GET", API + "/agent/commands?node_id=proxy-slow&wait_s=20",
                          token=TOKENS["prod"], timeout=60)
        wait_for(lambda: "proxy proxy-slow polls for 20s" in control.log(), timeout=10,
                 what="proxy-slow's long poll to park")
        op = maintenance_on(control)
        # the parked poll's read marks the new command delivered: it waits for the hold
        wait_for(hold.waiting, timeout=10, what="the delivery to wait in the store")
        worst = others_answer_while(control, other, poll, "the delivery")
    finally:
        hold.release()
    status, body = poll.result(timeout=30)
    assert status == 200, body
    [cmd] = body["commands"]
    assert cmd["type"] == "maintenance" and cmd["args"]["on"] is True, cmd
    assert command_for(other)["id"] == cmd["id"]
    for agent in (slow, other):
        status, answer = agent.ack(cmd["id"])
        assert status == 204, answer
    status, body = op.result(timeout=30)
    assert status == 200 and body["ok"], body
    print(f"worst answer while a delivery waited on the store: {worst * 1000:.0f} ms")


def test_a_registration_waiting_on_the_store_holds_no_other_request(control, store):
    other = SimAgent(control, "proxy-other")
    other.register()
    hold = StoreHold(store, table="proxies", events="INSERT OR UPDATE")
    try:
        # auto_declare: the member row, then the proxies row, which waits
        register = Background(control.port, "POST", API + "/agent/register",
                              {"node_id": "proxy-slow", "hostname": "slow-host"},
                              token=TOKENS["prod"], timeout=60)
        wait_for(hold.waiting, timeout=10, what="the registration to wait in the store")
        worst = others_answer_while(control, other, register, "the registration")
    finally:
        hold.release()
    status, body = register.result(timeout=30)
    assert status == 200 and body["declared"] is True, body
    assert control.proxies()["proxy-slow"]["hostname"] == "slow-host"
    print(f"worst answer while a registration waited on the store: {worst * 1000:.0f} ms")


def test_a_plan_upload_waiting_on_the_store_holds_no_other_request(control, store):
    slow = SimAgent(control, "proxy-slow")
    slow.register()
    other = SimAgent(control, "proxy-other")
    other.register()
    plan = {"id": "00000000000000a1", "node": "pg1", "database": "app", "user": "app",
            "text": "SELECT 1", "reason": "slow", "duration_ms": 1500,
            "planned_at_ms": int(time.time() * 1000), "changes": 0,
            "plan": [{"Plan": {"Node Type": "Result"}}]}
    hold = StoreHold(store, table="plans", events="INSERT OR UPDATE")
    try:
        upload = Background(control.port, "POST", API + "/agent/plans",
                            {"node_id": "proxy-slow", "plans": [plan]}, token=TOKENS["prod"],
                            timeout=60)
        wait_for(lambda: hold.waiting() or upload.done(), timeout=10,
                 what="the plan upload to wait in the store")
        assert not upload.done(), f"the plan upload did not wait for the store: {upload.value}"
        worst = others_answer_while(control, other, upload, "the plan upload")
    finally:
        hold.release()
    status, body = upload.result(timeout=30)
    assert status == 204, body
    status, body = control.admin("GET", "/deployments/prod/plans")
    assert status == 200 and [p["id"] for p in body] == [plan["id"]], body
    print(f"worst answer while a plan upload waited on the store: {worst * 1000:.0f} ms")


def test_a_plan_without_its_optional_change_count_is_kept(control):
    """"changes" is optional in an upload (docs/protocol.md); the store took it as NULL and
    refused the row (503)."""
    agent = SimAgent(control, "proxy-a")
    agent.register()
    plan = {"id": "00000000000000b2", "node": "pg1", "database": "app", "user": "app",
            "text": "SELECT 2", "reason": "sampled", "duration_ms": 3,
            "planned_at_ms": int(time.time() * 1000)}
    status, body = agent.post("/plans", {"plans": [plan]})
    assert status == 204, body
    status, body = control.admin("GET", "/deployments/prod/plans")
    assert status == 200 and [(p["id"], p["changes"]) for p in body] == [(plan["id"], 0)], body


def test_the_configuration_view_waiting_on_the_store_holds_no_other_request(control, store):
    other = SimAgent(control, "proxy-other")
    other.register()
    locker = psycopg.connect(store)
    try:
        # the view reads the committed version: it waits behind this lock
        locker.execute("LOCK TABLE pgrelay.config_versions IN ACCESS EXCLUSIVE MODE")
        view = Background(control.port, "GET", API + "/deployments/prod/config", token=ADMIN,
                          timeout=60)
        wait_for(lambda: waits_on_lock(store, "config_versions"), timeout=10,
                 what="the configuration view to wait in the store")
        worst = others_answer_while(control, other, view, "the configuration view")
    finally:
        locker.rollback()
        locker.close()
    status, body = view.result(timeout=30)
    assert status == 200 and body["version"] == 0, body
    assert [p["node_id"] for p in body["proxies"]] == ["proxy-other"], body
    print(f"worst answer while the configuration view waited on the store: {worst * 1000:.0f} ms")


def test_withdrawing_a_superseded_maintenance_renewal_waiting_on_the_store_holds_no_other_request(
        control_factory, store):
    # pause_lease 3 s: a renewal of the pause every second, each withdrawing the one before
    control = control_factory(control={"pause_lease": "3s"})
    slow = SimAgent(control, "proxy-slow")
    slow.register()
    other = SimAgent(control, "proxy-other")
    other.register()
    op = maintenance_on(control)
    cmd = command_for(slow)
    assert command_for(other)["id"] == cmd["id"]
    for agent in (slow, other):
        status, answer = agent.ack(cmd["id"])
        assert status == 204, answer
    status, body = op.result(timeout=30)
    assert status == 200 and body["ok"], body
    # renewals nobody takes: proxy-slow's row of each stays unanswered until withdrawn
    hold = StoreHold(store)
    try:
        wait_for(hold.waiting, timeout=15, what="a renewal's withdrawal to wait in the store")
        worst, what = worst_answer(control, other)
        assert worst < 1.0, f"{what} waited {worst:.2f}s behind the withdrawal of a renewal"
    finally:
        hold.release()

    def withdrawn():
        with psycopg.connect(store, autocommit=True) as c:
            return c.execute("SELECT count(*) FROM pgrelay.command_acks WHERE"
                             " node_id = 'proxy-slow' AND detail LIKE 'superseded%'"
                             ).fetchone()[0] > 0

    wait_for(withdrawn, timeout=15, what="the superseded renewal withdrawn")
    print(f"worst answer while a withdrawal waited on the store: {worst * 1000:.0f} ms")


def test_registrations_that_arrive_together_are_written_in_a_few_statements(control, store):
    """A fleet that restarts registers at once: the registrations that arrive while one is
    with the store go in the next batch, one statement for all their rows (not one each ahead
    of the long polls), and each is answered once its row is written."""
    with psycopg.connect(store, autocommit=True) as c:
        # an upsert fires both the INSERT and the UPDATE statement triggers: count the
        # transactions (each of the control plane's statements is one)
        c.execute("CREATE TABLE public.row_writes (xact bigint DEFAULT txid_current())")
        c.execute("CREATE FUNCTION public.count_write() RETURNS trigger LANGUAGE plpgsql AS $$"
                  " BEGIN INSERT INTO public.row_writes DEFAULT VALUES; RETURN NULL; END $$")
        c.execute("CREATE TRIGGER count_write AFTER INSERT OR UPDATE ON pgrelay.proxies"
                  " FOR EACH STATEMENT EXECUTE FUNCTION public.count_write()")

    def writes():
        with psycopg.connect(store, autocommit=True) as c:
            return c.execute("SELECT count(DISTINCT xact) FROM public.row_writes").fetchone()[0]

    hold = StoreHold(store, table="proxies", events="INSERT OR UPDATE")
    many = [f"proxy-{i:02d}" for i in range(40)]
    try:
        first = Background(control.port, "POST", API + "/agent/register",
                           {"node_id": "proxy-slow"}, token=TOKENS["prod"], timeout=60)
        wait_for(hold.waiting, timeout=10, what="the first registration to wait in the store")
        before = writes()
        # proxy-00 twice (an agent that retried): one row in the statement, both answered
        rest = [Background(control.port, "POST", API + "/agent/register",
                           {"node_id": node_id, "hostname": f"host-{node_id}"},
                           token=TOKENS["prod"], timeout=60) for node_id in many + many[:1]]
        # each is known (pending) at once, its row waiting for the worker
        wait_for(lambda: len(control.proxies()) == 1 + len(many), timeout=15,
                 what="every registration to arrive")
    finally:
        hold.release()
    for reg in [first] + rest:
        status, body = reg.result(timeout=30)
        assert status == 200 and body["declared"] is True, body
    statements = writes() - before
    # the first one's statement, then one for the 40 that waited behind it (and the periodic
    # write of the proxies' rows, every 5 s, may come between)
    assert 1 <= statements <= 4, f"{statements} statements wrote 41 registrations' rows"
    proxies = control.proxies()
    assert all(proxies[n]["hostname"] == f"host-{n}" for n in many), proxies
