"""Every pause has an end, the operator's too (invariant 4 of DESIGN.md; issue 8, Deliver 4):
`pgrelayctl maintenance on` without a timeout is kept in the store and sent as a pause that
ends pause_lease after it was sent, renewed every third of it while maintenance is on. A
control plane that dies leaves no proxy paused past pause_lease; one that lives keeps the
fleet paused as long as the operator wants; a restarted one renews what the store says."""

import time

from conftest import wait_for
from control_e2e_helpers import DEPLOYMENT, info
from fleet import Fleet, Watch, _parse_time
from loadgen import InThread

PAUSE_LEASE_S = 6  # renewed every 2 s
SETTINGS = {"pause_lease": f"{PAUSE_LEASE_S}s"}


def maintenance(fleet, on):
    p = fleet.ctl("maintenance", "on" if on else "off")
    assert p.returncode == 0, (p.stdout, p.stderr)


def all_paused(fleet):
    return all(info(r)["maintenance"] == "on" for r in fleet.proxies.values())


def assert_held_and_paused(fleet, stmt, seconds):
    """For ``seconds``, sampled every 0.5 s: the statement (an InThread) has not ended, pgrelay
    holds it, and every proxy is in maintenance."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not stmt.done(), f"the statement was not held: {stmt.value!r} {stmt.error!r}"
        assert all_paused(fleet), {n: info(r) for n, r in fleet.proxies.items()}
        time.sleep(0.5)  # sampling a state that must not change, not waiting for one


def test_maintenance_on_without_a_timeout_ends_by_itself_when_the_control_plane_dies(pg):
    """maintenance on (no timeout), then kill -9 of the control plane: nobody renews or ends
    the pause, and both proxies resume by themselves within pause_lease, and say so in the
    log; `show info` showed the end all along."""
    started = time.monotonic()
    with Fleet.start(pg, control_settings=SETTINGS) as fleet:
        watch = Watch(fleet)
        maintenance(fleet, True)
        assert all_paused(fleet)
        until = {n: info(r)["maintenance_until"] for n, r in fleet.proxies.items()}
        t0 = time.monotonic()
        fleet.control.kill9()
        for node_id, relay in fleet.proxies.items():
            assert not fleet.new_session_runs(relay, timeout=0.5), f"{node_id} was not paused"
        wait_for(lambda: all(fleet.new_session_runs(r, timeout=0.5)
                             for r in fleet.proxies.values()),
                 timeout=PAUSE_LEASE_S + 3, interval=0.2,
                 what="both proxies to resume by themselves at the pause's end")
        resumed_after = time.monotonic() - t0
        assert all(until.values()), f"a pause without an end time: {until}"
        for node_id, relay in fleet.proxies.items():
            assert "maintenance timeout reached: resuming" in relay.log(), node_id
            assert info(relay)["maintenance"] == "off", node_id
        watch.check()
    print(f"scenario time {time.monotonic() - started:.1f}s, resumed {resumed_after:.1f}s "
          f"after the kill (pause_lease {PAUSE_LEASE_S}s)")


def test_maintenance_holds_past_several_renewals_while_the_control_plane_lives(pg):
    """maintenance on (no timeout) with the control plane alive: a statement stays held for
    three times pause_lease, the pause's end moves forward with each renewal, and maintenance
    off releases the statement."""
    with Fleet.start(pg, control_settings=SETTINGS) as fleet:
        conn = fleet.a.connect()  # opened before the pause
        try:
            watch = Watch(fleet)
            maintenance(fleet, True)
            first_until = _parse_time(info(fleet.a)["maintenance_until"])
            stmt = InThread(lambda: conn.execute("SELECT 42").fetchone()[0])
            assert_held_and_paused(fleet, stmt, 3 * PAUSE_LEASE_S)
            last_until = _parse_time(info(fleet.a)["maintenance_until"])
            assert last_until >= first_until + 2 * PAUSE_LEASE_S, (first_until, last_until)
            maintenance(fleet, False)
            assert stmt.result(timeout=5) == 42
            watch.check()
        finally:
            conn.close()


def test_a_restarted_control_plane_renews_the_maintenance_the_store_holds(pg):
    """maintenance on, kill -9 and an immediate restart of the control plane: the new one
    loads the maintenance from the store and renews it, so the fleet stays paused past the
    first pause's end; maintenance off then resumes it."""
    with Fleet.start(pg, control_settings=SETTINGS) as fleet:
        conn = fleet.b.connect()  # opened before the pause
        try:
            watch = Watch(fleet)
            maintenance(fleet, True)
            stmt = InThread(lambda: conn.execute("SELECT 42").fetchone()[0])
            offset = fleet.control.log_size()
            fleet.control.kill9()
            fleet.start_control()
            assert "maintenance is on (from the store)" in fleet.control.log_since(offset)
            assert_held_and_paused(fleet, stmt, PAUSE_LEASE_S + 3)
            maintenance(fleet, False)
            assert stmt.result(timeout=5) == 42
            watch.check()
        finally:
            conn.close()


def test_an_operator_timeout_still_ends_the_maintenance_then(pg):
    """maintenance on with the operator's resume_after_s (sooner than pause_lease): both
    proxies resume at that end, the renewals that follow do not pause them again, and the
    control plane records the maintenance as ended."""
    with Fleet.start(pg, control_settings=SETTINGS) as fleet:
        watch = Watch(fleet)
        offset = fleet.control.log_size()
        status, answer = fleet.control.api("POST", f"/deployments/{DEPLOYMENT}/maintenance",
                                           {"on": True, "resume_after_s": 3})
        assert status == 200 and answer["ok"], answer
        t0 = time.monotonic()
        assert all_paused(fleet)
        wait_for(lambda: not any(info(r)["maintenance"] == "on" for r in fleet.proxies.values()),
                 timeout=6, interval=0.1, what="both proxies to resume at the operator's end")
        resumed_after = time.monotonic() - t0
        assert resumed_after >= 2, resumed_after
        wait_for(lambda: "maintenance ends: the operator's timeout has passed"
                 in fleet.control.log_since(offset), timeout=PAUSE_LEASE_S,
                 what="the control plane to end the maintenance")
        deadline = time.monotonic() + PAUSE_LEASE_S
        while time.monotonic() < deadline:  # two renewal periods and more
            assert not any(info(r)["maintenance"] == "on" for r in fleet.proxies.values())
            time.sleep(0.5)  # sampling a state that must not change, not waiting for one
        watch.check()


def test_a_switchover_during_maintenance_ends_with_the_maintenance_still_on(pg):
    """maintenance on, then switchover --promote: the switchover's resume puts the proxies
    back in the operator's maintenance (with an end, renewed) instead of turning it off; they
    stay paused past the switchover's own pause end until maintenance off."""
    with Fleet.start(pg, control_settings=SETTINGS) as fleet:
        watch = Watch(fleet)
        maintenance(fleet, True)
        p = fleet.ctl("-o", "json", "switchover", "--node", "pg2", "--promote", "--timeout", "5")
        assert p.returncode == 0, (p.stdout, p.stderr)
        assert all(info(r)["write_leader"] == "pg2" for r in fleet.proxies.values())
        deadline = time.monotonic() + 5 + 5 + 2  # past the switchover pause's end
        while time.monotonic() < deadline:
            assert all_paused(fleet), {n: info(r) for n, r in fleet.proxies.items()}
            for relay in fleet.proxies.values():
                assert not fleet.new_session_runs(relay, timeout=0.3)
        maintenance(fleet, False)
        for relay in fleet.proxies.values():
            wait_for(lambda relay=relay: fleet.new_session_runs(relay, timeout=1), timeout=5,
                     what="sessions to run after maintenance off")
        watch.check()
