"""TLS between clients and pgrelay: SSLRequest and direct TLS, certificates checked both ways,
the relay's data path on TLS, reload of a renewed certificate, cancel, and bad handshakes.

Certificates are made by the module with ``openssl req``/``openssl x509``: a CA, server
certificates for localhost/127.0.0.1 (a second one to renew with, an expired one, one signed by
another CA), client certificates for the user postgres and for someone else.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time

import psycopg
import pytest

from conftest import (RawClient, SCRAM_PASSWORD, SCRAM_USER, admin, error_fields, startup_packet,
                      wait_for)

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
            "-addext", "basicConstraints=critical,CA:TRUE", cwd=d)


def make_signed(d, name, ca, cn=None, san=None, days=2, is_ca=False):
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:TRUE\n" if is_ca else "basicConstraints=CA:FALSE\n")
        if san:
            f.write(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn or name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", str(days), "-extfile", ext, "-out", f"{name}.crt", cwd=d)
    os.chmod(os.path.join(d, f"{name}.key"), 0o600)


@pytest.fixture(scope="module")
def pki():
    d = tempfile.mkdtemp(prefix="pgrelay-client-tls-")
    make_ca(d, "ca")
    make_ca(d, "otherca")
    san = "DNS:localhost,IP:127.0.0.1"
    make_signed(d, "server", "ca", cn="localhost", san=san)
    make_signed(d, "server2", "ca", cn="localhost", san=san)
    make_signed(d, "expired", "ca", cn="localhost", san=san, days=-1)
    make_signed(d, "foreign", "otherca", cn="localhost", san=san)
    make_signed(d, "client", "ca", cn="postgres")
    make_signed(d, "someone", "ca", cn="someone")
    make_signed(d, "stranger", "otherca", cn="postgres")
    # a server certificate from an intermediate CA, with the chain file a server sends
    make_signed(d, "intermediate", "ca", is_ca=True)
    make_signed(d, "chained", "intermediate", cn="localhost", san=san)
    with open(os.path.join(d, "chain.crt"), "w") as out:
        for part in ("chained.crt", "intermediate.crt"):
            with open(os.path.join(d, part)) as f:
                out.write(f.read())
    os.chmod(d, 0o755)
    yield lambda name: os.path.join(d, name)
    shutil.rmtree(d, ignore_errors=True)


def tls_keys(pki, mode="require", cert="server", **more):
    keys = {"client_tls_mode": mode, "client_tls_cert_file": pki(f"{cert}.crt"),
            "client_tls_key_file": pki(f"{cert}.key"), "client_startup_timeout": "2s"}
    if mode.startswith("verify"):
        keys["client_tls_ca_file"] = pki("ca.crt")
    keys.update(more)
    return keys


@pytest.fixture(scope="module")
def tls_relay(pg, pki):
    from conftest import RelayFactory
    factory = RelayFactory(pg)
    yield factory(**tls_keys(pki))
    factory.close()


def connect(relay, **kw):
    params = dict(sslmode="require")
    params.update(kw)
    return relay.connect(**params)


def expect_refused(relay, match, **kw):
    with pytest.raises(psycopg.OperationalError) as e:
        connect(relay, **kw).close()
    assert match in str(e.value), str(e.value)
    return e.value


def raw_error(rc, **params):
    """Fields of the ErrorResponse that refuses a startup packet (libpq does not tell the
    SQLSTATE of a failed connection)."""
    rc.send_startup(**params)
    err = error_fields(rc.read_to_eof())
    rc.close()
    assert err, "no ErrorResponse"
    return err


# --------------------------------------------------------------------------------------------
# A raw client on TLS: byte-level control, as conftest's RawClient in clear.

def tls_context(pki=None, alpn=("postgresql",), cert=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if pki:
        ctx.load_verify_locations(pki("ca.crt"))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if cert:
        ctx.load_cert_chain(pki(f"{cert}.crt"), pki(f"{cert}.key"))
    return ctx


def raw_tls(relay, direct=False, ctx=None, timeout=10.0):
    """A RawClient whose socket is TLS: after SSLRequest and 'S', or directly."""
    rc = RawClient(relay.port, timeout=timeout)
    if not direct:
        rc.send(SSL_REQUEST)
        assert rc.sock.recv(1) == b"S"
    rc.sock = (ctx or tls_context()).wrap_socket(rc.sock, server_hostname="localhost")
    return rc


def backend_key(msgs):
    for t, body in msgs:
        if t == "K":
            return body
    raise AssertionError(f"no BackendKeyData in {msgs!r}")


def peer_cert(relay, direct=True):
    rc = raw_tls(relay, direct=direct)
    der = rc.sock.getpeercert(binary_form=True)
    rc.close()
    return der


def pem_der(path):
    with open(path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def assert_closed_without_plaintext(rc):
    """The peer closes; what it sent before, if anything, is a TLS alert, never a message."""
    data = rc.buf
    while True:
        try:
            chunk = rc.sock.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    assert data == b"" or data[0] == 0x15, data  # 0x15: TLS alert record


def clients(relay):
    return json.loads(admin(relay, "show clients json"))


# --------------------------------------------------------------------------------------------


def test_sslmode_require_gets_tls_and_show_clients_names_it(tls_relay):
    with connect(tls_relay, application_name="tls-a") as c:
        assert c.pgconn.ssl_in_use
        assert c.execute("SELECT 41 + 1").fetchone()[0] == 42
        (row,) = [r for r in clients(tls_relay) if r["application_name"] == "tls-a"]
        assert row["tls"].startswith("TLSv1.3 "), row
        with tls_relay.connect(sslmode="require", application_name="tls-b") as d:
            (row,) = [r for r in clients(tls_relay) if r["application_name"] == "tls-b"]
            assert row["tls"] and "TLS_" in row["tls"], row
            table = admin(tls_relay, "show clients")
            assert "tls" in table.splitlines()[0].split()
            assert "TLSv1.3" in table


def test_clear_client_refused_with_28000_when_tls_required(tls_relay):
    e = expect_refused(tls_relay, "TLS required", sslmode="disable")
    assert "client_tls_mode = require" in str(e)
    err = raw_error(RawClient(tls_relay.port))
    assert err["C"] == "28000" and err["S"] == "FATAL" and "TLS required" in err["M"], err
    assert "refused: TLS required" in tls_relay.log()


def test_verify_full_checks_the_host_name(tls_relay, pki):
    with connect(tls_relay, sslmode="verify-full", sslrootcert=pki("ca.crt"),
                 host="localhost") as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
    expect_refused(tls_relay, "does not match host name", sslmode="verify-full",
                   sslrootcert=pki("ca.crt"), host="wrong.example", hostaddr="127.0.0.1")


def test_untrusted_server_certificate_refused_by_the_client(tls_relay, pki):
    expect_refused(tls_relay, "certificate verify failed", sslmode="verify-ca",
                   sslrootcert=pki("otherca.crt"))


def test_expired_server_certificate_refused_by_the_client(relay_factory, pki):
    r = relay_factory(**tls_keys(pki, cert="expired"))
    expect_refused(r, "certificate verify failed", sslmode="verify-ca",
                   sslrootcert=pki("ca.crt"))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired"):
        raw_tls(r, ctx=tls_context(pki))
    with connect(r, sslmode="require") as c:  # not checked: encrypted all the same
        assert c.pgconn.ssl_in_use


def test_client_certificate_required_and_checked(relay_factory, pki):
    r = relay_factory(**tls_keys(pki, mode="verify-ca"))
    expect_refused(r, "", sslmode="require")  # none shown: the handshake fails
    assert "TLS handshake failed" in wait_for(
        lambda: "TLS handshake failed" in r.log() and r.log(), what="the handshake failure log")
    expect_refused(r, "", sslmode="require", sslcert=pki("stranger.crt"),
                   sslkey=pki("stranger.key"))
    expect_refused(r, "TLS required", sslmode="disable")
    with connect(r, sslcert=pki("client.crt"), sslkey=pki("client.key")) as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1
    with connect(r, sslcert=pki("someone.crt"), sslkey=pki("someone.key")) as c:
        assert c.execute("SELECT 1").fetchone()[0] == 1  # verify-ca: any name


def test_verify_full_wants_the_user_name_in_the_client_certificate(relay_factory, pki):
    r = relay_factory(**tls_keys(pki, mode="verify-full"))
    with connect(r, sslcert=pki("client.crt"), sslkey=pki("client.key")) as c:
        assert c.execute("SELECT current_user").fetchone()[0] == "postgres"
    e = expect_refused(r, "certificate authentication failed",
                       sslcert=pki("someone.crt"), sslkey=pki("someone.key"))
    assert '"someone"' in str(e)
    err = raw_error(raw_tls(r, ctx=tls_context(pki, cert="someone")))
    assert err["C"] == "28000", err


def test_allow_serves_both(relay_factory, pki):
    r = relay_factory(**tls_keys(pki, mode="allow"))
    with r.connect(sslmode="disable") as c:
        assert not c.pgconn.ssl_in_use
    with r.connect(sslmode="require") as c:
        assert c.pgconn.ssl_in_use


def test_copy_100mb_both_ways_over_tls(tls_relay):
    rows, width = 100 * 1024, 1023  # 100 MiB of COPY text, one line per KiB
    line = lambda i: (f"{i:08d}" + "x" * (width - 8)).encode() + b"\n"  # noqa: E731
    with connect(tls_relay) as c:
        c.execute("CREATE TEMP TABLE big (t text)")
        sent = hashlib.sha256()
        with c.cursor().copy("COPY big FROM STDIN") as cp:
            for i in range(rows):
                b = line(i)
                sent.update(b)
                cp.write(b)
        assert c.execute("SELECT count(*), sum(length(t) + 1) FROM big").fetchone() == (
            rows, rows * (width + 1))
        back = hashlib.sha256()
        n = 0
        with c.cursor().copy("COPY (SELECT t FROM big ORDER BY t) TO STDOUT") as cp:
            for data in cp:
                back.update(data)
                n += len(data)
        assert n == rows * (width + 1)
        assert back.hexdigest() == sent.hexdigest()


def test_direct_tls_with_alpn(tls_relay):
    rc = raw_tls(tls_relay, direct=True)
    assert rc.sock.selected_alpn_protocol() == "postgresql"
    msgs = rc.login()
    assert msgs[0][0] == "R"
    rows = rc.simple_query("SELECT 'direct'")
    assert any(t == "D" and b"direct" in b for t, b in rows)
    rc.close()


def test_direct_tls_without_alpn_refused(tls_relay):
    rc = raw_tls(tls_relay, direct=True, ctx=tls_context(alpn=None))
    rc.send_startup()
    err = error_fields(rc.read_to_eof())
    assert err and err["C"] == "08P01" and "ALPN" in err["M"], err
    rc.close()
    with pytest.raises(ssl.SSLError):
        raw_tls(tls_relay, direct=True, ctx=tls_context(alpn=("http/1.1",)))


def test_direct_tls_refused_when_tls_is_off(relay):
    rc = RawClient(relay.port)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_context().wrap_socket(rc.sock, server_hostname="localhost")
    rc.close()


def test_ssl_request_inside_tls_refused(tls_relay):
    rc = raw_tls(tls_relay)
    rc.send(SSL_REQUEST)
    err = error_fields(rc.read_to_eof())
    assert err and err["C"] == "08P01", err


@pytest.mark.deadline(60)
def test_bad_handshakes_do_not_disturb_a_running_session(relay_factory, pki):
    # one worker: the bad handshakes and the bystander share its event loop
    tls_relay = relay_factory(workers=1, **tls_keys(pki))
    with connect(tls_relay, application_name="bystander") as c:
        c.execute("SELECT 1")
        # garbage after SSLRequest: read as TLS, never as a startup packet
        g = RawClient(tls_relay.port)
        g.send(SSL_REQUEST + startup_packet())
        assert g.read_byte() == b"S"
        assert_closed_without_plaintext(g)
        g.close()
        # a truncated ClientHello, then silence: closed at client_startup_timeout (2s)
        t = RawClient(tls_relay.port)
        t.send(SSL_REQUEST)
        assert t.read_byte() == b"S"
        t.send(bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]))
        # a handshake that never starts: SSLRequest answered, then nothing
        h = RawClient(tls_relay.port)
        h.send(SSL_REQUEST)
        assert h.read_byte() == b"S"
        # a direct-TLS connection that sends one byte of a record
        d = RawClient(tls_relay.port)
        d.send(b"\x16")
        started = time.monotonic()
        # while they hang, the bystander is served at once
        assert c.execute("SELECT 'while they hang'").fetchone()[0] == "while they hang"
        assert time.monotonic() - started < 1
        for stuck in (t, h, d):
            assert_closed_without_plaintext(stuck)
        assert time.monotonic() - started < 8
        for stuck in (t, h, d):
            stuck.close()
        assert c.execute("SELECT 'still here'").fetchone()[0] == "still here"
        assert c.pgconn.ssl_in_use
    assert "TLS handshake failed" in tls_relay.log()


def test_reload_renewed_certificate_keeps_running_sessions(relay_factory, pki):
    work = tempfile.mkdtemp(prefix="pgrelay-tls-reload-")
    cert, key = os.path.join(work, "cur.crt"), os.path.join(work, "cur.key")
    shutil.copy(pki("server.crt"), cert)
    shutil.copy(pki("server.key"), key)
    try:
        r = relay_factory(client_tls_mode="require", client_tls_cert_file=cert,
                          client_tls_key_file=key)
        assert peer_cert(r) == pem_der(pki("server.crt"))
        with connect(r) as old:
            old.execute("SELECT 1")
            shutil.copy(pki("server2.crt"), cert)
            shutil.copy(pki("server2.key"), key)
            assert "reloaded" in admin(r, "reload")
            # once the reload has answered, every new session, on any worker, gets it
            for _ in range(6):
                assert peer_cert(r) == pem_der(pki("server2.crt"))
            assert old.execute("SELECT 'old session'").fetchone()[0] == "old session"
            # a broken key is refused at reload; the renewed certificate keeps serving
            with open(key, "w") as f:
                f.write("not a key\n")
            answer = admin(r, "reload")
            assert "reload failed" in answer and "client_tls_key_file" in answer, answer
            for _ in range(6):
                assert peer_cert(r) == pem_der(pki("server2.crt"))
            with connect(r) as new:
                assert new.execute("SELECT 2").fetchone()[0] == 2
            assert old.execute("SELECT 3").fetchone()[0] == 3
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_a_reload_serves_the_files_it_checked_even_if_they_change_before_a_worker_looks(
        relay_factory, pki):
    """Invariant: what a reload answered "reloaded" for is what every worker serves. Here the
    only worker is stopped (SIGSTOP) across the reload, and the key is broken after the reload
    answered and before the worker runs again: the worker must serve the renewed certificate
    the reload checked, not read the files again (it used to, found the broken key, and kept
    serving the old certificate while the console said the new one was in place)."""
    work = tempfile.mkdtemp(prefix="pgrelay-tls-reload-")
    cert, key = os.path.join(work, "cur.crt"), os.path.join(work, "cur.key")
    shutil.copy(pki("server.crt"), cert)
    shutil.copy(pki("server.key"), key)
    try:
        r = relay_factory(workers=1, client_tls_mode="require", client_tls_cert_file=cert,
                          client_tls_key_file=key)
        assert peer_cert(r) == pem_der(pki("server.crt"))
        (worker,) = r.worker_pids()
        os.kill(worker, signal.SIGSTOP)
        try:
            shutil.copy(pki("server2.crt"), cert)
            shutil.copy(pki("server2.key"), key)
            assert "reloaded" in admin(r, "reload")
            with open(key, "w") as f:
                f.write("not a key\n")
        finally:
            os.kill(worker, signal.SIGCONT)
        assert peer_cert(r) == pem_der(pki("server2.crt"))
        with connect(r) as c:
            assert c.execute("SELECT 'renewed'").fetchone()[0] == "renewed"
        assert "new sessions keep the previous certificates" not in r.log()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_whole_chain_is_sent_and_a_client_trusting_only_the_root_verifies_it(
        relay_factory, pki):
    """client_tls_cert_file holds the server's certificate and its intermediate CA: both are
    sent, so a client that trusts only the root CA verifies the name and the chain."""
    r = relay_factory(**tls_keys(pki, cert="chained", client_tls_cert_file=pki("chain.crt")))
    rc = raw_tls(r, ctx=tls_context(pki))
    assert rc.sock.getpeercert()["subject"] == ((("commonName", "localhost"),),)
    rc.close()
    with connect(r, sslmode="verify-full", sslrootcert=pki("ca.crt"), host="localhost") as c:
        assert c.execute("SELECT 'chain'").fetchone()[0] == "chain"
    # with the leaf alone, the same client cannot verify it
    r2 = relay_factory(**tls_keys(pki, cert="chained"))
    with pytest.raises(ssl.SSLCertVerificationError):
        raw_tls(r2, ctx=tls_context(pki))


def test_broken_certificate_stops_the_check(pki, tmp_path, pg):
    from conftest import PGRELAY_BIN, write_config
    conf = tmp_path / "pgrelay.ini"
    write_config(conf, 1, pg, {"client_tls_mode": "require",
                               "client_tls_cert_file": pki("server.crt"),
                               "client_tls_key_file": pki("server2.key")})
    r = subprocess.run([PGRELAY_BIN, "-t", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 1 and "client_tls_key_file" in r.stderr, r.stderr
    write_config(conf, 1, pg, {"client_tls_mode": "verify-ca",
                               "client_tls_cert_file": pki("server.crt"),
                               "client_tls_key_file": pki("server.key")})
    r = subprocess.run([PGRELAY_BIN, "-t", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 1 and "client_tls_ca_file" in r.stderr, r.stderr


def test_certificate_files_larger_than_pgrelay_reads_stop_the_check(pki, tmp_path, pg):
    """The files together may be 16 MiB (pgrelay.ini(5)): a CA file past that is refused by
    name, and one just below it (padded with text OpenSSL skips) is read whole."""
    from conftest import PGRELAY_BIN, write_config
    with open(pki("ca.crt")) as f:
        ca = f.read()
    used = sum(os.path.getsize(pki(n)) for n in ("server.crt", "server.key"))
    for size, ok in ((16 * 2**20 - used, True), (16 * 2**20 - used + 1, False)):
        big = tmp_path / "big-ca.crt"
        with open(big, "w") as f:
            f.write(ca)
            f.write("x" * (size - len(ca) - 1) + "\n")
        assert os.path.getsize(big) == size
        conf = tmp_path / "pgrelay.ini"
        write_config(conf, 1, pg, {"client_tls_mode": "verify-ca",
                                   "client_tls_cert_file": pki("server.crt"),
                                   "client_tls_key_file": pki("server.key"),
                                   "client_tls_ca_file": str(big)})
        r = subprocess.run([PGRELAY_BIN, "-t", "-c", str(conf)], capture_output=True,
                           text=True)
        if ok:
            assert r.returncode == 0, r.stderr
        else:
            assert r.returncode == 1 and "client_tls_ca_file" in r.stderr \
                and "16 MiB" in r.stderr, r.stderr


def _sleep_then_cancel(pg, conn, app, cancel):
    done = {}

    def run():
        try:
            conn.execute("SELECT pg_sleep(30)")
        except psycopg.errors.QueryCanceled as e:
            done["error"] = e

    th = threading.Thread(target=run)
    started = time.monotonic()
    th.start()
    wait_for(lambda: pg.active_query_pid(app), what="the statement to run on the node")
    cancel()
    th.join(20)
    assert "error" in done and time.monotonic() - started < 15


def test_cancel_of_a_tls_session_in_clear(tls_relay, pg):
    with connect(tls_relay, application_name="tls-cancel") as c:
        # libpq 15 sends the cancel in clear on a new connection
        _sleep_then_cancel(pg, c, "tls-cancel", c.cancel)


def test_cancel_request_over_tls(tls_relay, pg):
    rc = raw_tls(tls_relay)
    key = backend_key(rc.login(application_name="tls-cancel-raw"))
    rc.send_query("SELECT pg_sleep(30)")
    wait_for(lambda: pg.active_query_pid("tls-cancel-raw"), what="the statement to run")
    canceller = raw_tls(tls_relay)
    canceller.send(struct.pack("!ii", 16, 80877102) + key)
    assert canceller.read_to_eof() == []
    msgs = rc.read_until("Z")
    err = error_fields(msgs)
    assert err and err["C"] == "57014", msgs
    rc.close()


def test_tls_clients_that_leave_while_held_by_pause_are_let_go(relay_factory, pki, pg):
    from test_relay_hardening import clients_named, paused, stats_total
    r = relay_factory(**tls_keys(pki))
    idle = connect(r, application_name="tls-held-idle")
    idle.execute("SELECT 1")
    backend = pg.backend_pids("tls-held-idle")[0]
    paused(r)
    try:
        new = raw_tls(r)
        new.send_startup(application_name="tls-held-new")  # held before reaching a node
        wait_for(lambda: clients_named(r, "tls-held-new"), what="the held new session")
        idle.close()  # Terminate, inside TLS, then close: seen through OpenSSL, not raw bytes
        new.close()
        wait_for(lambda: not clients_named(r, "tls-held-idle"), what="idle session let go")
        wait_for(lambda: not clients_named(r, "tls-held-new"), what="held new session let go")
        wait_for(lambda: not pg.pid_exists(backend), what="the idle session's backend to end")
        connects = stats_total(r, "server_connects")
    finally:
        admin(r, "resume")
    with connect(r) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert stats_total(r, "server_connects") == connects + 1


def test_read_only_port_follows_the_same_keys(relay_factory, pki):
    from conftest import free_port
    read_port = free_port()
    r = relay_factory(read_listen_port=read_port, **tls_keys(pki))
    with psycopg.connect(r.conninfo(port=read_port, sslmode="require")) as c:
        assert c.pgconn.ssl_in_use
        assert c.execute("SELECT 1").fetchone()[0] == 1
    with pytest.raises(psycopg.OperationalError, match="TLS required"):
        psycopg.connect(r.conninfo(port=read_port, sslmode="disable")).close()


def test_tls_turned_on_and_off_by_reload(relay_factory, pki, pg):
    from conftest import write_config
    r = relay_factory()
    with r.connect(sslmode="prefer") as c:
        assert not c.pgconn.ssl_in_use  # answered N
    with r.connect(sslmode="disable") as running:
        write_config(r.conf_path, r.port, pg, {"admin_socket": os.path.join(
            os.path.dirname(r.conf_path), "admin.sock"), **tls_keys(pki)})
        assert "reloaded" in admin(r, "reload")
        wait_for(lambda: _tls_in_use(r), what="new sessions on TLS")
        with pytest.raises(psycopg.OperationalError, match="TLS required"):
            r.connect(sslmode="disable").close()
        assert running.execute("SELECT 'clear, from before'").fetchone()[0] == "clear, from before"
        write_config(r.conf_path, r.port, pg, {"admin_socket": os.path.join(
            os.path.dirname(r.conf_path), "admin.sock")})
        assert "reloaded" in admin(r, "reload")
        wait_for(lambda: not _tls_in_use(r), what="new sessions in clear again")


def _tls_in_use(relay):
    try:
        with relay.connect(sslmode="prefer") as c:
            return c.pgconn.ssl_in_use
    except psycopg.OperationalError:
        return None


def test_a_cancel_over_tls_ends_when_the_node_is_done(relay_factory, pki):
    """libpq 17 takes the end of its encrypted cancel connection for "the cancel is done": no
    close_notify may come before the node closed its own cancel connection."""
    import threading
    from pgstub import PgStub
    stub = PgStub()
    stub.cancel_hold = threading.Event()
    try:
        r = relay_factory(nodes=[("stub", {"host": "127.0.0.1", "port": stub.port,
                                           "role": "primary"})], agent="off", **tls_keys(pki))
        rc = raw_tls(r)
        key = backend_key(rc.login())
        canceller = raw_tls(r)
        canceller.send(struct.pack("!ii", 16, 80877102) + key)
        wait_for(lambda: stub.cancels, what="the cancel to reach the node")
        canceller.sock.settimeout(0.5)
        with pytest.raises((socket.timeout, TimeoutError)):
            canceller.sock.recv(1)  # neither close_notify nor EOF while the node holds on
        stub.cancel_hold.set()
        canceller.sock.settimeout(10)
        assert canceller.sock.recv(1) == b""
        canceller.close()
        rc.close()
    finally:
        stub.cancel_hold.set()
        stub.close()
