"""What the Patroni suite records while a scenario runs, and the invariants it checks.

LeaderPoller   reads etcd's leader key every 100 ms: who etcd named leader when.
WriteLoad      writer threads through one proxy (pgrelay or HAProxy); every acknowledged insert
               records the server's port, timeline and WAL position, the server's clock just
               before the commit, and the client's send and acknowledgement times.
ReadLoad       one reader through a read port.
check_*        the invariants; figures() the numbers the report gives per proxy.

All times are time.time() (the same clock as the server's clock_timestamp(): one machine).

Each of them is a loadgen.Threads (start, stop, the stop flag). WriteLoad and ReadLoad are not
loadgen.Writer: they speak the protocol on a RawClient, because libpq reports an error that
arrives on a session the server is closing without its SQLSTATE, and the invariants count
errors without one; they stamp with the wall clock (compared with the server's), run several
kinds of threads (kept and fresh sessions), and record the server's port, timeline and WAL
position, which the checks below read.
"""

import bisect
import time

import psycopg

from conftest import RawClient, data_rows, error_fields
from loadgen import Threads
from patroni_cluster import LOOP_WAIT

POLL_INTERVAL = 0.1
# How long a member that lost the leader key may still acknowledge writes as a primary: Patroni
# demotes it at its next HA loop (loop_wait) with an immediate shutdown (a second at most).
HANDOVER_S = LOOP_WAIT + 1.0


class LeaderPoller(Threads):
    """Samples (t_before, t_after, leader) of etcd's leader key."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack
        self.samples = []

    def _run(self, n):
        while not self.stop_flag.is_set():
            t0 = time.time()
            try:
                leader = self.stack.leader(strict=True)
            except (OSError, ValueError):
                leader = "?"  # etcd did not answer: unknown, never taken as anyone's
            self.samples.append((t0, time.time(), leader))
            self.stop_flag.wait(POLL_INTERVAL)

    def stop(self):
        # not checked (as before): a sample is one etcd request with a 1 s timeout
        super().stop(timeout=5, check=False)

    def possibly_leader(self, name, start, end, grace=0.0):
        """Could etcd have named ``name`` at some instant in [start, end]? A run of samples
        naming it counts from the start of the sample before the run to the end of the sample
        after it (the key may have changed anywhere between two samples), and ``grace``
        seconds more."""
        s = self.samples
        for i, (_, _, leader) in enumerate(s):
            if leader != name and leader != "?":
                continue
            lo = s[i - 1][0] if i > 0 else float("-inf")
            hi = s[i + 1][1] + grace if i + 1 < len(s) else float("inf")
            if lo <= end and hi >= start:
                return True
        return False

    def last_named(self, name, before):
        """The start of the last sample before ``before`` that could name ``name`` (or
        -inf): from then on, etcd may have named another member."""
        last = float("-inf")
        for t0, _, leader in self.samples:
            if t0 >= before:
                break
            if leader == name or leader == "?":
                last = t0
        return last

    def changes(self):
        """[(t, leader)] at each change of the sampled value."""
        out, last = [], object()
        for t0, _, leader in self.samples:
            if leader != last:
                out.append((t0, leader))
                last = leader
        return out


class StreamingPoller(Threads):
    """Samples (t, set of members streaming from the member etcd names leader), read from
    pg_stat_replication on that leader every 100 ms (a thread of its own, so that a hung
    leader does not delay the leader samples)."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack
        self.samples = []

    def _run(self, n):
        while not self.stop_flag.is_set():
            try:
                leader = self.stack.leader()
                streaming = self.stack.streaming_replicas(leader) if leader else set()
            except (OSError, ValueError, KeyError):
                streaming = set()
            self.samples.append((time.time(), streaming))
            self.stop_flag.wait(POLL_INTERVAL)

    def stop(self):
        # not checked (as before): a query on a leader a scenario hung (SIGSTOP) has no
        # timeout and may outlast the join; the samples taken are what the checks read
        super().stop(timeout=10, check=False)

    def longest_streaming(self, start, end):
        """The longest stretch within [start, end] during which every sample saw at least one
        replica streaming from the leader."""
        best, since = 0.0, None
        for t, streaming in self.samples:
            if t < start:
                continue
            if t > end:
                break
            if streaming:
                since = t if since is None else since
                best = max(best, t - since)
            else:
                since = None
        return best


INSERT = ("INSERT INTO {table} (src, thread, seq) VALUES ('{src}', {thread}, {seq}) RETURNING "
          "inet_server_port(), "
          "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int, "
          "pg_current_wal_lsn()::text, extract(epoch FROM clock_timestamp())::float8")

# A client that waits this long for an answer calls it a hang (longer than any scenario's
# outage, so that a hang is reported as one and not hidden).
CLIENT_TIMEOUT = 45.0


class ClientError(Exception):
    """What a client got instead of an answer: the ErrorResponse's fields, or none (a close
    or reset without one, a timeout)."""

    def __init__(self, at, fields, what):
        super().__init__(what)
        self.at = at
        self.sqlstate = (fields or {}).get("C")
        self.fatal = fields is None or fields.get("S") in ("FATAL", "PANIC")
        self.message = (fields or {}).get("M", what)


def _exchange(client, sql, at):
    """One simple query on a RawClient: its rows, or ClientError. The protocol is read
    directly so that an error's SQLSTATE is seen even when it arrives on a session the server
    is closing (libpq reports those without one)."""
    try:
        client.send_query(sql)
    except OSError:
        pass  # the peer closed: what it sent before is still to be read
    try:
        msgs = client.read_until("Z")
    except OSError as e:
        raise ClientError(at, None, f"{type(e).__name__}: {e}") from None
    fields = error_fields(msgs)
    if fields is not None:
        raise ClientError(at, fields, fields.get("M", ""))
    if not msgs or msgs[-1][0] != "Z":
        raise ClientError(at, None, "connection closed without an ErrorResponse")
    return data_rows(msgs)


def _connect(port):
    """A logged-in RawClient, or ClientError."""
    try:
        client = RawClient(port, timeout=CLIENT_TIMEOUT)
    except OSError as e:
        raise ClientError("connect", None, f"connect: {e}") from None
    try:
        client.send_startup()
        msgs = client.read_until("ZE")
    except OSError as e:
        client.close()
        raise ClientError("connect", None, f"{type(e).__name__}: {e}") from None
    fields = error_fields(msgs)
    if fields is not None or not msgs or msgs[-1][0] != "Z":
        client.close()
        raise ClientError("connect", fields, (fields or {}).get(
            "M", "connection closed during login without an ErrorResponse"))
    return client


class _Load(Threads):
    """What WriteLoad and ReadLoad share: clients of ``port`` that record each ClientError in
    ``errors`` (dicts src, t, sqlstate, message, at = connect | statement) and wait ``pause``
    after one; stop() fails if a client hangs past CLIENT_TIMEOUT."""

    def __init__(self, src, port, pause, count, hang):
        super().__init__(count=count, hang=hang)
        self.src = src
        self.port = port
        self.pause = pause
        self.errors = []

    def _failed(self, e, client):
        """Record the ClientError ``e``; the session to go on with (None once a fatal error
        closed it)."""
        self.errors.append(dict(src=self.src, t=time.time(), sqlstate=e.sqlstate,
                                message=e.message, at=e.at))
        if e.fatal and client is not None:
            client.close()
            return None
        return client

    def stop(self):
        super().stop(timeout=CLIENT_TIMEOUT + 5)


class WriteLoad(_Load):
    """``threads`` writers to ``port``, each keeping one session and opening another after a
    fatal error, and ``fresh`` more that open a new session for every write (as a pooled
    application does; these see what new sessions meet). ``acks``: dicts (src, thread, seq,
    sent, began (before the connect, if one was needed), acked, port, timeline, lsn,
    server_time); ``errors``: dicts (src, t, sqlstate,
    message, at = connect | statement)."""

    def __init__(self, src, port, table, threads=3, fresh=1, pause=0.02):
        super().__init__(src, port, pause, count=threads + fresh, hang=f"a {src} writer hangs")
        self.kept = threads
        self.table = table
        self.acks = []

    def _run(self, n):
        client, seq = None, 0
        while not self.stop_flag.is_set():
            seq += 1
            began = time.time()
            try:
                if client is None:
                    client = _connect(self.port)
                t0 = time.time()
                sql = INSERT.format(table=self.table, src=self.src, thread=n, seq=seq)
                port, tl, lsn, server_time = _exchange(client, sql, "statement")[0]
                self.acks.append(dict(src=self.src, thread=n, seq=seq, sent=t0, began=began,
                                      acked=time.time(),
                                      port=int(port), timeline=int(tl), lsn=lsn,
                                      server_time=float(server_time)))
                if n >= self.kept:
                    client.send_terminate()
                    client.close()
                    client = None
            except ClientError as e:
                client = self._failed(e, client)
                self.stop_flag.wait(self.pause)
        if client is not None:
            client.close()


class ReadLoad(_Load):
    """One reader to a read port: a session kept, a new one after a fatal error."""

    def __init__(self, src, port, pause=0.02):
        super().__init__(src, port, pause, count=1, hang=f"the {src} reader hangs")
        self.oks = []  # (t, port)

    def _run(self, n):
        client = None
        while not self.stop_flag.is_set():
            try:
                if client is None:
                    client = _connect(self.port)
                port = _exchange(client, "SELECT inet_server_port()", "statement")[0][0]
                self.oks.append((time.time(), int(port)))
            except ClientError as e:
                client = self._failed(e, client)
            self.stop_flag.wait(self.pause)
        if client is not None:
            client.close()


def carries_sqlstate(err):
    """The client got an ErrorResponse with a SQLSTATE (not a bare close, reset or hang)."""
    return bool(err["sqlstate"])


def wrong_node_writes(load, poller, port_to_member, handover=0.0):
    """Acknowledged writes whose node etcd did not name leader at any instant between the
    server's clock just before the commit and the acknowledgement (the commit happened then).

    With ``handover`` > 0, a write on a member that had just lost the key is not counted when
    it is in that member's hand-over tail: acknowledged at most ``handover`` seconds after
    etcd could last have named it, and before this proxy acknowledged any write on another
    member since then. Patroni demotes a leader that lost its key within one HA loop; until
    then that member is a writable primary, and a proxy that follows it (as HAProxy does)
    lands writes there. Going back to it after writing elsewhere is never a tail."""
    acks = sorted(load.acks, key=lambda a: a["acked"])
    acked = [a["acked"] for a in acks]
    wrong = []
    for a in acks:
        member = port_to_member[a["port"]]
        lo = min(a["server_time"], a["acked"])
        if poller.possibly_leader(member, lo, a["acked"]):
            continue
        if handover > 0 and poller.possibly_leader(member, lo, a["acked"], handover):
            since = poller.last_named(member, lo)
            between = acks[bisect.bisect_right(acked, since):bisect.bisect_left(acked, lo)]
            if all(port_to_member[b["port"]] == member for b in between):
                continue
        wrong.append(dict(a, member=member))
    return wrong


def lsn_int(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


# A row whose insert's WAL position is this close before the end of its timeline may have
# committed after it (the commit record follows the insert, other writers' records between).
COMMIT_SLACK = 64 * 1024


class FinalLeader:
    """What the missing-writes check reads from the final leader, in one session: the rows of
    ``table``, its timeline and the history of that timeline (timeline -> the LSN where the
    final timeline's history left it)."""

    def __init__(self, name, present, timeline, history):
        self.name = name
        self.present = present
        self.timeline = timeline
        self.history = history


def read_final_leader(stack, table):
    """A FinalLeader read from the member etcd names leader, or None when there is no such
    member or it is not (or no longer) a primary that answers: etcd named it before and after
    the read, and the read's own session saw it out of recovery. A caller waits on it
    (wait_for): Patroni may be restarting or demoting that member at that moment (a leader
    that lost its key under load restarts as a replica), and one refused connection between
    two reads is no evidence about the writes."""
    name = stack.leader()
    if name not in stack.members:
        return None
    try:
        with stack.member(name).connect() as conn:
            if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                return None
            present = {(r[0], r[1], r[2]) for r in conn.execute(
                f"SELECT src, thread, seq FROM {table}")}
            tl = conn.execute("SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), "
                              "1, 8))::bit(32)::int").fetchone()[0]
            history = {}
            if tl > 1:
                raw = conn.execute("SELECT pg_read_binary_file(%s)",
                                   (f"pg_wal/{tl:08X}.history",)).fetchone()[0]
                for line in bytes(raw).decode().splitlines():
                    parts = line.split()
                    if len(parts) >= 2 and parts[0].isdigit():
                        history[int(parts[0])] = lsn_int(parts[1])
            if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                return None
    except psycopg.Error:
        return None
    if stack.leader() != name:
        return None
    return FinalLeader(name, present, tl, history)


def missing_writes(loads, final):
    """(lost, discarded): acknowledged writes absent from the final leader (a FinalLeader).
    ``discarded``: its timeline was left by the final one's history at or before the write
    (Patroni promoted a replica that had not received it: asynchronous replication's
    documented loss, bounded by maximum_lag_on_failover); ``lost``: every other absent write
    (an invariant broken)."""
    lost, discarded = [], []
    for load in loads:
        for a in load.acks:
            if (a["src"], a["thread"], a["seq"]) in final.present:
                continue
            tl = a["timeline"]
            if tl != final.timeline and (tl not in final.history
                                         or lsn_int(a["lsn"]) + COMMIT_SLACK
                                         >= final.history[tl]):
                discarded.append(a)
            else:
                lost.append(a)
    return lost, discarded


def gaps(times, start, end):
    """The stretches [a, b] in [start, end] between consecutive elements of ``times``."""
    ts = sorted(t for t in times if start <= t <= end)
    points = [start, *ts, end]
    return list(zip(points, points[1:]))


def outage(times, start, end):
    """The longest stretch in [start, end] without an element of ``times``."""
    ts = sorted(t for t in times if start <= t <= end)
    points = [start, *ts, end]
    return max(b - a for a, b in zip(points, points[1:]))


def figures(load, reads, poller, port_to_member, start, end):
    """The numbers the report gives for one proxy in one scenario."""
    return {
        "write_outage_s": round(outage([a["acked"] for a in load.acks], start, end), 3),
        "writes_acked": len(load.acks),
        "longest_write_s": round(max((a["acked"] - a["began"] for a in load.acks
                                      if a["acked"] >= start), default=0), 3),
        "failed_ops": len(load.errors),
        "errors_without_sqlstate": sum(not carries_sqlstate(e) for e in load.errors),
        "wrong_node_writes": len(wrong_node_writes(load, poller, port_to_member)),
        "wrong_past_handover": len(wrong_node_writes(load, poller, port_to_member,
                                                     HANDOVER_S)),
        "read_outage_s": round(outage([t for t, _ in reads.oks], start, end), 3),
        "read_errors": len(reads.errors),
        "reads_on_leader": sum(1 for t, port in reads.oks
                               if port_to_member[port] == _leader_at(poller, t)),
    }


def _leader_at(poller, t):
    best = None
    for t0, _, leader in poller.samples:
        if t0 > t:
            break
        best = leader
    return best
