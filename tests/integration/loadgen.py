"""Load generators for the integration tests: work in a background thread (InThread), the life
cycle of threads that loop until stopped (Threads) and a client that writes through pgrelay in
a loop (Writer, one of those).

    held = InThread(lambda: conn.execute("SELECT 1").fetchone()[0])
    assert not held.finished_within(0.7)        # pgrelay holds it (pause)
    assert held.result(timeout=5) == 1           # ... and lets it go

    writer = Writer(relay, lambda conn, seq: conn.execute(
        "INSERT INTO t VALUES (%s) RETURNING inet_server_port()", (seq,)).fetchone())
    writer.start(); ...; writer.stop()
    writer.ok      # [(seq, t_sent, t_done, *returned row)]
    writer.errors  # [(seq, t, sqlstate, first line of the message)]
"""

import threading
import time

import psycopg


class InThread:
    """Run ``fn(*args, **kwargs)`` in a daemon thread (a statement pgrelay holds must not hang
    the suite). ``value`` / ``error`` once done; ``started_at``, ``finished_at`` and
    ``elapsed`` in time.monotonic() seconds."""

    def __init__(self, fn, *args, **kwargs):
        self.value = self.error = None
        self.finished_at = None
        self._done = threading.Event()
        self.started_at = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, fn, args, kwargs):
        try:
            self.value = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            self.error = e
        finally:
            self.finished_at = time.monotonic()
            self._done.set()

    @property
    def elapsed(self):
        """Seconds from the start to the end; None while it runs."""
        return None if self.finished_at is None else self.finished_at - self.started_at

    def done(self):
        return self._done.is_set()

    def finished_within(self, seconds):
        """Wait up to ``seconds``; True if it has finished."""
        return self._done.wait(seconds)

    def join(self, timeout=10):
        """Wait for the end (AssertionError if it is not there after ``timeout``); the
        outcome stays in value / error."""
        assert self._done.wait(timeout), f"still running after {timeout}s"

    def result(self, timeout=10):
        """Wait for the end; return what fn returned, or raise what it raised."""
        self.join(timeout)
        if self.error is not None:
            raise self.error
        return self.value


class Threads:
    """The life cycle of a load generator: ``count`` daemon threads, thread n running
    ``self._run(n)`` until ``stop_flag`` is set. start() returns self; stop() sets the flag,
    joins every thread (``timeout`` each) and, with ``check``, fails with ``hang`` if one is
    still running (a statement that never ends)."""

    def __init__(self, count=1, hang="a load thread hangs"):
        self.hang = hang
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                        for n in range(count)]

    def _run(self, n):
        raise NotImplementedError

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self, timeout=15, check=True):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout)
        if check:
            assert not self.is_alive(), self.hang

    def is_alive(self):
        return any(t.is_alive() for t in self.threads)


class Writer(Threads):
    """Writes through pgrelay in a loop until stop(): ``statement(conn, seq)`` runs once per
    seq and returns a row (a tuple, or None). One session kept and opened again after any
    error, or a new session for every row (``session_per_row``, as a pooled application
    reconnecting would); ``setup(conn)`` runs on each new session (e.g. a statement_timeout).
    It waits ``pause`` seconds after an error and ``interval`` after every row.
    ``ok``: (seq, t_sent, t_done, *row); ``errors``: (seq, t, sqlstate, first line of the
    message)."""

    def __init__(self, relay, statement, session_per_row=False, pause=0.01, interval=0.0,
                 setup=None, **conninfo):
        super().__init__(hang="writer thread hangs (a statement through pgrelay never ends)")
        self.thread = self.threads[0]
        self.relay = relay
        self.statement = statement
        self.session_per_row = session_per_row
        self.pause = pause
        self.interval = interval
        self.setup = setup
        self.conninfo = conninfo
        self.ok = []
        self.errors = []
        self.seq = 0

    def _run(self, n):
        conn = None
        while not self.stop_flag.is_set():
            self.seq += 1
            t = time.monotonic()
            try:
                if conn is None:
                    conn = psycopg.connect(self.relay.conninfo(**self.conninfo), autocommit=True)
                    if self.setup is not None:
                        self.setup(conn)
                row = self.statement(conn, self.seq)
                self.ok.append((self.seq, t, time.monotonic(), *(row or ())))
                if self.session_per_row:
                    conn.close()
                    conn = None
            except psycopg.Error as e:
                line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                self.errors.append((self.seq, t, e.sqlstate, line))
                if conn is not None:
                    conn.close()
                conn = None
                self.stop_flag.wait(self.pause)
            if self.interval:
                self.stop_flag.wait(self.interval)
        if conn is not None:
            conn.close()
