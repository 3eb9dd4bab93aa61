"""The renewals of the operator's maintenance (issue 8, Deliver 4) leave no trail: the pause is
sent again every third of pause_lease while maintenance is on (about 4,300 times a day with
the default 60 s), so each renewal must neither leave a row in the store's command table (with
one acknowledgement per proxy) until command_retention (7 days) nor an info line per proxy in
every log."""

import re
import time

import psycopg

from conftest import wait_for
from control_e2e_helpers import info
from fleet import Fleet

PAUSE_LEASE_S = 3  # renewed every second
RENEWALS = 10
MAX_MAINTENANCE_ROWS = 3  # the operator's command, the last renewal and the one it superseded


def store_scalar(fleet, sql):
    with psycopg.connect(f"host={fleet.pg.host} port={fleet.pg.port} user=postgres "
                         f"dbname={fleet.store_db}", autocommit=True) as c:
        return c.execute(sql).fetchone()[0]


def commands_created(fleet):
    return store_scalar(fleet, "SELECT last_value FROM pgrelay.commands_id_seq")


def test_maintenance_renewals_keep_a_bounded_number_of_command_rows_and_log_quietly(pg):
    started = time.monotonic()
    with Fleet.start(pg, control_settings={"pause_lease": f"{PAUSE_LEASE_S}s"}) as fleet:
        p = fleet.ctl("maintenance", "on")
        assert p.returncode == 0, (p.stdout, p.stderr)
        wait_for(lambda: all(info(r)["maintenance"] == "on" for r in fleet.proxies.values()),
                 timeout=5, what="both proxies paused")
        first = commands_created(fleet)
        wait_for(lambda: commands_created(fleet) >= first + 2, timeout=10, interval=0.1,
                 what="two renewals")
        logs = {n: len(r.log()) for n, r in fleet.proxies.items()}
        control_log = fleet.control.log_size()
        base = commands_created(fleet)
        wait_for(lambda: commands_created(fleet) >= base + RENEWALS, timeout=RENEWALS * 3,
                 interval=0.2, what=f"{RENEWALS} more renewals")
        # every renewal was taken: both proxies are still paused, with an end ahead
        for r in fleet.proxies.values():
            own = info(r)
            assert own["maintenance"] == "on" and own["maintenance_until"], own

        def counts():
            rows = store_scalar(fleet, "SELECT count(*) FROM pgrelay.commands"
                                       " WHERE type = 'maintenance'")
            acks = store_scalar(fleet, "SELECT count(*) FROM pgrelay.command_acks a"
                                       " JOIN pgrelay.commands c ON c.id = a.command_id"
                                       " WHERE c.type = 'maintenance'")
            return rows, acks

        def pruned():
            rows, acks = counts()
            return (rows, acks) if (rows <= MAX_MAINTENANCE_ROWS and
                                    acks <= MAX_MAINTENANCE_ROWS * len(fleet.proxies)) else None

        # Polled: a renewal is stored (a row more) before the older ones are pruned, in the
        # next store job; the bound holds between them. Unpruned, the rows would be 14.
        try:
            rows, acks = wait_for(pruned, timeout=5, interval=0.1, what="the renewals pruned")
        except AssertionError:
            rows, acks = counts()
            raise AssertionError(f"{rows} maintenance command rows, {acks} acks after "
                                 f"{RENEWALS + 2} renewals") from None
        # the renewals log at debug level only
        noisy = re.compile(r"\] (info|warning|error): .*(maintenance|pause ends|command \d+)")
        for n, r in fleet.proxies.items():
            lines = [ln for ln in r.log()[logs[n]:].splitlines() if noisy.search(ln)]
            assert not lines, (n, lines[:6])
        lines = [ln for ln in fleet.control.log_since(control_log).splitlines()
                 if noisy.search(ln)]
        assert not lines, lines[:6]
        assert "maintenance pause renewed" in fleet.control.log_since(control_log)  # at debug

        p = fleet.ctl("maintenance", "off")
        assert p.returncode == 0, (p.stdout, p.stderr)
        wait_for(lambda: all(info(r)["maintenance"] == "off" for r in fleet.proxies.values()),
                 timeout=5, what="both proxies resumed")
    print(f"scenario time {time.monotonic() - started:.1f}s ({rows} rows, {acks} acks after "
          f"{RENEWALS + 2} renewals)")
