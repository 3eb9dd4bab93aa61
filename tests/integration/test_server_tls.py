"""TLS between pgrelay and the nodes: server_tls_mode against a PostgreSQL with ssl = on and a
certificate made by the test, a node with a certificate pgrelay must refuse, the agent's probes
over TLS, and SCRAM through a TLS-terminating pgrelay (channel binding cannot span it).

The module turns ssl on in the suite's shared PostgreSQL (its own certificate, in the data
directory) and turns it off again at the end; sessions in clear keep working meanwhile.
"""

import os
import shutil
import socket
import threading

import psycopg
import pytest

from conftest import RawClient, SCRAM_PASSWORD, SCRAM_USER, error_fields, wait_for
from test_client_tls import make_ca, make_signed, tls_keys  # noqa: F401
import test_client_tls

pki = test_client_tls.pki  # the same certificates: a CA, another CA, server certificates


@pytest.fixture(scope="module")
def node_tls(pg, pki):
    """ssl = on in the shared PostgreSQL with a certificate for localhost only (no IP address
    in it), signed by the test CA."""
    d = os.path.dirname(pki("ca.crt"))
    make_signed(d, "node", "ca", cn="localhost", san="DNS:localhost")
    pgdata = os.path.join(pg.datadir, "data")
    for name in ("node.crt", "node.key"):
        shutil.copy(pki(name), os.path.join(pgdata, name))
        shutil.chown(os.path.join(pgdata, name), "postgres", "postgres")
    os.chmod(os.path.join(pgdata, "node.key"), 0o600)
    # certificate authentication for one role: pgrelay's server_tls_cert_file is its login
    make_signed(d, "certuser", "ca", cn="certuser")
    shutil.copy(pki("ca.crt"), os.path.join(pgdata, "node-ca.crt"))
    shutil.chown(os.path.join(pgdata, "node-ca.crt"), "postgres", "postgres")
    hba = os.path.join(pgdata, "pg_hba.conf")
    with open(hba) as f:
        hba_before = f.read()
    with open(hba, "w") as f:
        f.write("hostssl all certuser 127.0.0.1/32 cert\n"
                "host all certuser 127.0.0.1/32 reject\n" + hba_before)
    with pg.connect() as c:
        c.execute("CREATE ROLE certuser LOGIN")
        c.execute("ALTER SYSTEM SET ssl_cert_file = 'node.crt'")
        c.execute("ALTER SYSTEM SET ssl_key_file = 'node.key'")
        c.execute("ALTER SYSTEM SET ssl_ca_file = 'node-ca.crt'")
        c.execute("ALTER SYSTEM SET ssl = on")
        c.execute("SELECT pg_reload_conf()")

    def tls_answers():
        try:
            with psycopg.connect(pg.conninfo(sslmode="require")) as c:
                return c.pgconn.ssl_in_use
        except psycopg.OperationalError:
            return False

    wait_for(tls_answers, what="PostgreSQL to take TLS")
    yield pg
    with open(hba, "w") as f:
        f.write(hba_before)
    with pg.connect() as c:
        c.execute("DROP ROLE certuser")
        c.execute("ALTER SYSTEM RESET ssl_ca_file")
        c.execute("ALTER SYSTEM RESET ssl")
        c.execute("ALTER SYSTEM RESET ssl_cert_file")
        c.execute("ALTER SYSTEM RESET ssl_key_file")
        c.execute("SELECT pg_reload_conf()")


def node(host="127.0.0.1", pg=None, **keys):
    return [("pg1", {"host": host, "port": pg.port, "role": "primary", **keys})]


def backend_ssl(conn):
    return conn.execute(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0]


def test_verify_full_to_a_node_with_its_own_certificate(relay_factory, node_tls, pki):
    r = relay_factory(nodes=node("localhost", node_tls), server_tls_mode="verify-full",
                      server_tls_ca_file=pki("ca.crt"))
    with r.connect() as c:  # the client in clear, the node over TLS
        assert not c.pgconn.ssl_in_use
        assert backend_ssl(c) is True
    # the agent's probes take the same settings: its connection is on TLS too
    wait_for(lambda: node_tls.query(
        "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
        "WHERE a.application_name = 'pgrelay-agent'")[0][0] is True,
        what="the agent's probe connection on TLS")


def test_disable_keeps_the_node_in_clear(relay_factory, node_tls):
    r = relay_factory(nodes=node(pg=node_tls))
    with r.connect() as c:
        assert backend_ssl(c) is False


def test_per_node_mode_overrides_the_global_one(relay_factory, node_tls, pki):
    r = relay_factory(nodes=node(pg=node_tls, server_tls_mode="require"),
                      server_tls_mode="disable")
    with r.connect() as c:
        assert backend_ssl(c) is True


def test_node_with_a_wrong_certificate_is_refused_with_08006(relay_factory, node_tls, pki):
    # the certificate names localhost, not 127.0.0.1: verify-full refuses it, verify-ca not
    r = relay_factory(nodes=node(pg=node_tls), server_tls_mode="verify-full",
                      server_tls_ca_file=pki("ca.crt"), agent="off")
    with pytest.raises(psycopg.OperationalError, match="TLS handshake failed"):
        r.connect().close()
    rc = RawClient(r.port)
    rc.send_startup()
    err = error_fields(rc.read_to_eof())
    rc.close()
    assert err["C"] == "08006" and "could not connect to node pg1" in err["M"], err
    assert "IP address mismatch" in r.log(), r.log_tail()

    # a CA that did not sign it
    r2 = relay_factory(nodes=node(pg=node_tls), server_tls_mode="verify-ca",
                       server_tls_ca_file=pki("otherca.crt"), agent="off")
    with pytest.raises(psycopg.OperationalError, match="08006|TLS handshake failed"):
        r2.connect().close()
    # X509's words depend on whether the node sends its CA along (it does with ssl_ca_file)
    assert ("unable to get local issuer certificate" in r2.log()
            or "self-signed certificate in certificate chain" in r2.log()), r2.log_tail()

    r3 = relay_factory(nodes=node(pg=node_tls), server_tls_mode="verify-ca",
                       server_tls_ca_file=pki("ca.crt"), agent="off")
    with r3.connect() as c:
        assert backend_ssl(c) is True


def test_agent_probe_refuses_a_wrong_node_certificate(relay_factory, node_tls, pki):
    r = relay_factory(nodes=node(pg=node_tls), server_tls_mode="verify-ca",
                      server_tls_ca_file=pki("otherca.crt"))
    wait_for(lambda: "certificate verify failed" in r.log(), what="the agent's probe to fail")


def test_node_without_tls_refused_under_require(relay_factory, pg, pki):
    # a node port where nothing speaks TLS: a stub that answers N
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def answer_n():
        for _ in range(2):
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.recv(8)
            c.sendall(b"N")
            c.recv(100)
            c.close()

    th = threading.Thread(target=answer_n, daemon=True)
    th.start()
    r = relay_factory(nodes=[("stub", {"host": "127.0.0.1", "port": srv.getsockname()[1],
                                       "role": "primary"})],
                      server_tls_mode="require", agent="off")
    with pytest.raises(psycopg.OperationalError, match="does not accept TLS"):
        r.connect().close()
    srv.close()


def scram(relay, **kw):
    return relay.connect(user=SCRAM_USER, password=SCRAM_PASSWORD, sslmode="require", **kw)


def test_scram_tls_client_to_a_tls_node(relay_factory, node_tls, pki):
    r = relay_factory(nodes=node(pg=node_tls), server_tls_mode="require", **tls_keys(pki))
    # The node offers SCRAM-SHA-256-PLUS on its TLS connection; the client must not see it,
    # or it binds to pgrelay's certificate and the node refuses the proof.
    with pytest.raises(psycopg.OperationalError,
                       match="channel binding is required, but server did not offer"):
        scram(r, channel_binding="require").close()
    with scram(r, channel_binding="disable") as c:
        assert c.pgconn.ssl_in_use
        assert c.execute("SELECT current_user").fetchone()[0] == SCRAM_USER
        assert backend_ssl(c) is True
    # prefer (libpq's default) on TLS tells the node "I could bind, you did not offer it":
    # the node, on TLS itself, takes that for a downgrade and refuses (pgrelay(8), TLS)
    with pytest.raises(psycopg.OperationalError, match="channel binding negotiation error"):
        scram(r, channel_binding="prefer").close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        r.connect(user=SCRAM_USER, password="wrong", sslmode="require",
                  channel_binding="disable").close()


def test_scram_clear_client_to_a_tls_node(relay_factory, node_tls):
    # libpq in clear refuses a server offering SCRAM-SHA-256-PLUS (it could only be a
    # man in the middle): pgrelay does not show it
    r = relay_factory(nodes=node(pg=node_tls), server_tls_mode="require")
    for binding in ("prefer", "disable"):
        with r.connect(user=SCRAM_USER, password=SCRAM_PASSWORD,
                       channel_binding=binding) as c:
            assert backend_ssl(c) is True


def test_scram_tls_client_to_a_clear_node(relay_factory, pg, pki):
    r = relay_factory(**tls_keys(pki))
    for binding in ("prefer", "disable"):
        with scram(r, channel_binding=binding) as c:
            assert c.pgconn.ssl_in_use and backend_ssl(c) is False
    with pytest.raises(psycopg.OperationalError,
                       match="channel binding is required, but server did not offer"):
        scram(r, channel_binding="require").close()


def test_copy_and_cancel_with_tls_on_both_sides(relay_factory, node_tls, pki):
    import hashlib
    import threading
    r = relay_factory(nodes=node(pg=node_tls), server_tls_mode="require", **tls_keys(pki))
    rows = 32 * 1024  # 32 MiB each way, one line per KiB
    with r.connect(sslmode="require", application_name="tls-both") as c:
        assert backend_ssl(c) is True
        c.execute("CREATE TEMP TABLE big (t text)")
        sent = hashlib.sha256()
        with c.cursor().copy("COPY big FROM STDIN") as cp:
            for i in range(rows):
                b = (f"{i:08d}" + "y" * 1015).encode() + b"\n"
                sent.update(b)
                cp.write(b)
        back = hashlib.sha256()
        with c.cursor().copy("COPY (SELECT t FROM big ORDER BY t) TO STDOUT") as cp:
            for data in cp:
                back.update(data)
        assert back.hexdigest() == sent.hexdigest()

        failed = {}

        def sleep():
            try:
                c.execute("SELECT pg_sleep(30)")
            except psycopg.errors.QueryCanceled as e:
                failed["error"] = e

        th = threading.Thread(target=sleep)
        th.start()
        wait_for(lambda: node_tls.active_query_pid("tls-both"), what="the statement to run")
        c.cancel()
        th.join(20)
        assert "error" in failed
        assert c.execute("SELECT 'after cancel'").fetchone()[0] == "after cancel"


class TlsStub:
    """A node that answers SSLRequest with S, does the TLS handshake as a server (recording
    the SNI the client sent), then closes."""

    def __init__(self, pki):
        self.sni = []
        self.ctx = __import__("ssl").SSLContext(__import__("ssl").PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pki("node.crt"), pki("node.key"))
        self.ctx.sni_callback = lambda sock, name, ctx: self.sni.append(name)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                c.recv(8)
                c.sendall(b"S")
                t = self.ctx.wrap_socket(c, server_side=True)
                t.close()
            except OSError:
                c.close()

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("host, sni", [("localhost", "localhost"), ("127.0.0.1", None)])
def test_sni_names_the_node_host(relay_factory, node_tls, pki, host, sni):
    stub = TlsStub(pki)
    try:
        r = relay_factory(nodes=[("stub", {"host": host, "port": stub.port,
                                           "role": "primary"})],
                          server_tls_mode="require", agent="off")
        with pytest.raises(psycopg.OperationalError):
            r.connect().close()  # the stub closes after the handshake
        wait_for(lambda: stub.sni, what="the handshake with the stub")
        assert stub.sni[0] == sni
    finally:
        stub.close()


def test_verify_modes_need_a_ca_file(tmp_path, pg, pki):
    from conftest import PGRELAY_BIN, write_config
    import subprocess
    conf = tmp_path / "pgrelay.ini"
    write_config(conf, 1, pg, nodes=node(pg=pg, server_tls_mode="verify-full"))
    r = subprocess.run([PGRELAY_BIN, "-t", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 1 and "server_tls_ca_file" in r.stderr, r.stderr
    write_config(conf, 1, pg, {"server_tls_mode": "require",
                               "server_tls_cert_file": pki("client.crt"),
                               "server_tls_key_file": pki("someone.key")})
    r = subprocess.run([PGRELAY_BIN, "-t", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 1 and "server_tls_key_file" in r.stderr, r.stderr


def test_client_certificate_to_the_node(relay_factory, node_tls, pki):
    r = relay_factory(nodes=node(pg=node_tls), server_tls_mode="verify-ca",
                      server_tls_ca_file=pki("ca.crt"), server_tls_cert_file=pki("certuser.crt"),
                      server_tls_key_file=pki("certuser.key"))
    with r.connect(user="certuser") as c:  # the node checks pgrelay's certificate
        assert c.execute("SELECT current_user").fetchone()[0] == "certuser"
        assert backend_ssl(c) is True
    bare = relay_factory(nodes=node(pg=node_tls), server_tls_mode="verify-ca",
                         server_tls_ca_file=pki("ca.crt"))
    with pytest.raises(psycopg.OperationalError, match="certificate"):
        bare.connect(user="certuser").close()
