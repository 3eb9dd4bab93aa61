"""HTTPS between the control plane and its clients: agents and pgrelayctl, with a private CA.

Certificates are made by each test module with ``openssl req``: a CA, a server certificate for
127.0.0.1, a client certificate, and a second CA that signed nothing of ours.
"""

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import tempfile

import pytest

from conftest import PGRELAY_BIN, free_port, start_on_free_port, wait_for, write_config
from test_control_api import ADMIN, CONTROL_BIN, TOKENS, store, write_ini  # noqa: F401 (fixture)
from control_e2e_helpers import CTL_BIN

API = "/api/v1"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
            "-addext", "basicConstraints=critical,CA:TRUE", cwd=d)


def make_signed(d, name, ca, san=None, days=2):
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=CA:FALSE\n")
        if san:
            f.write(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", str(days), "-extfile", ext, "-out", f"{name}.crt", cwd=d)


@pytest.fixture(scope="module")
def pki():
    d = tempfile.mkdtemp(prefix="pgrelay-pki-")
    make_ca(d, "ca")
    make_ca(d, "otherca")
    make_signed(d, "server", "ca", san="IP:127.0.0.1,DNS:localhost")
    make_signed(d, "server2", "ca", san="IP:127.0.0.1,DNS:localhost")
    make_signed(d, "client", "ca")
    make_signed(d, "stranger", "otherca")
    os.chmod(d, 0o755)
    return lambda name: os.path.join(d, name)


class TlsControl:
    def __init__(self, workdir, port, conf, log_path, proc):
        self.workdir, self.port, self.conf, self.log_path, self.proc = (
            workdir, port, conf, log_path, proc)

    @property
    def url(self):
        return f"https://127.0.0.1:{self.port}"

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def https(port, method, path, ca, body=None, token=ADMIN, cert=None, timeout=10):
    """(status, parsed body) of one HTTPS request, verifying the server against ca."""
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert[0], cert[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            data = json.dumps(body).encode() if body is not None else b""
            head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                    f"Authorization: Bearer {token}\r\nContent-Length: {len(data)}\r\n\r\n")
            s.sendall(head.encode() + data)
            chunks = []
            while True:
                try:
                    b = s.recv(65536)
                except ssl.SSLZeroReturnError:
                    break
                if not b:
                    break
                chunks.append(b)
    raw = b"".join(chunks).decode()
    status = int(raw.split(" ", 2)[1])
    text = raw.split("\r\n\r\n", 1)[1]
    try:
        return status, json.loads(text) if text.strip() else None
    except ValueError:
        return status, text


def peer_fingerprint(port, ca):
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()


@pytest.fixture
def tls_control(store, pki):
    started = []

    def start(**control):
        workdir = tempfile.mkdtemp(prefix="pgrelay-control-tls-")
        keys = {"tls_cert_file": pki("server.crt"), "tls_key_file": pki("server.key")}
        keys.update(control)

        def launch(port, attempt):
            conf = os.path.join(workdir, "control.ini")
            log_path = os.path.join(workdir, f"control-{attempt}.log")
            write_ini(conf, port, store, control=keys)
            with open(log_path, "w") as logf:
                proc = subprocess.Popen([CONTROL_BIN, "-c", conf], stdin=subprocess.DEVNULL,
                                        stdout=logf, stderr=subprocess.STDOUT)
            return TlsControl(workdir, port, conf, log_path, proc)

        def ready(c):
            try:
                cert = (pki("client.crt"), pki("client.key"))
                return https(c.port, "GET", "/readyz", pki("ca.crt"), cert=cert,
                             timeout=2)[0] == 200
            except (OSError, ValueError):
                return False

        c = start_on_free_port(launch, ready, lambda c: c.stop(), "pgrelay-control (TLS)")
        started.append(c)
        return c

    yield start
    for c in started:
        rc = c.stop()
        assert rc == 0, c.log()[-3000:]


def ctl(control_url, *args, env=None):
    e = {k: v for k, v in os.environ.items()
         if not k.startswith("PGRELAYCTL_") and not k.lower().endswith("_proxy")}
    e.update({"PGRELAYCTL_ENDPOINT": control_url, "PGRELAYCTL_TOKEN": ADMIN})
    e.update(env or {})
    return subprocess.run([CTL_BIN, *args], capture_output=True, text=True, env=e, timeout=60)


def test_the_api_speaks_https_verified_by_the_private_ca_and_not_plain_http(tls_control, pki):
    c = tls_control()
    status, body = https(c.port, "GET", API + "/deployments", pki("ca.crt"))
    assert status == 200 and {d["name"] for d in body} >= {"prod"}
    with pytest.raises(ssl.SSLCertVerificationError):
        https(c.port, "GET", "/healthz", pki("otherca.crt"))
    # Plain HTTP on the HTTPS port gets no HTTP answer (the token would have gone in clear).
    with socket.create_connection(("127.0.0.1", c.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        try:
            answer = s.recv(100)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 200")


def test_pgrelayctl_over_https_with_cacert_and_refused_with_a_wrong_ca(tls_control, pki):
    c = tls_control()
    ok = ctl(c.url, "--cacert", pki("ca.crt"), "show-deployments")
    assert ok.returncode == 0, ok.stderr
    assert "prod" in ok.stdout
    via_env = ctl(c.url, "show-deployments", env={"PGRELAYCTL_CACERT": pki("ca.crt")})
    assert via_env.returncode == 0, via_env.stderr
    wrong = ctl(c.url, "--cacert", pki("otherca.crt"), "show-deployments")
    assert wrong.returncode == 3, (wrong.returncode, wrong.stderr)
    assert "certificate" in wrong.stderr.lower()
    # TLS options with a plain http:// endpoint: refused before anything is sent.
    plain = ctl(f"http://127.0.0.1:{c.port}", "--cacert", pki("ca.crt"), "show-deployments")
    assert plain.returncode == 2 and "not https://" in plain.stderr


def test_a_client_certificate_is_required_when_tls_client_ca_file_is_set(tls_control, pki):
    c = tls_control(tls_client_ca_file=pki("ca.crt"))
    cert = (pki("client.crt"), pki("client.key"))
    assert https(c.port, "GET", "/healthz", pki("ca.crt"), cert=cert)[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError, IndexError)):
        https(c.port, "GET", "/healthz", pki("ca.crt"))  # no certificate
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError, IndexError)):
        https(c.port, "GET", "/healthz", pki("ca.crt"),
              cert=(pki("stranger.crt"), pki("stranger.key")))
    ok = ctl(c.url, "--cacert", pki("ca.crt"), "--cert", pki("client.crt"), "--key",
             pki("client.key"), "show-deployments")
    assert ok.returncode == 0, ok.stderr
    refused = ctl(c.url, "--cacert", pki("ca.crt"), "show-deployments")
    assert refused.returncode == 3, refused.stderr


def start_agent_relay(pg, control, pki, ca, name):
    """A pgrelay whose agent reaches the control plane over HTTPS as node NAME."""
    workdir = tempfile.mkdtemp(prefix="pgrelay-tls-relay-")
    port = free_port()
    conf = os.path.join(workdir, "pgrelay.ini")
    log_path = os.path.join(workdir, "pgrelay.log")
    write_config(conf, port, pg, {"admin_socket": os.path.join(workdir, "admin.sock")},
                 sections={"control": {"endpoint": control.url, "token": TOKENS["prod"],
                                       "ca_file": ca, "cert_file": pki("client.crt"),
                                       "key_file": pki("client.key")}})
    env = dict(os.environ, NODE_ID=name)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([PGRELAY_BIN, "-c", conf], stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    return proc, log_path


def stop_agent_relay(proc):
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_an_agent_registers_over_https_with_its_certificate_and_not_with_a_wrong_ca(
        tls_control, pki, pg):
    c = tls_control(tls_client_ca_file=pki("ca.crt"))

    def proxies():
        return {p["node_id"] for p in https(c.port, "GET", API + "/deployments/prod/proxies",
                                              pki("ca.crt"),
                                              cert=(pki("client.crt"), pki("client.key")))[1]}

    good, _ = start_agent_relay(pg, c, pki, pki("ca.crt"), "tls-good")
    bad, bad_log = start_agent_relay(pg, c, pki, pki("otherca.crt"), "tls-bad")
    try:
        wait_for(lambda: "tls-good" in proxies(), timeout=20, what="the agent to register")

        def bad_logged():
            with open(bad_log, errors="replace") as f:
                text = f.read().lower()
            return "certificate" in text

        wait_for(bad_logged, timeout=20, what="the agent with the wrong CA to log why")
        assert "tls-bad" not in proxies()
    finally:
        stop_agent_relay(good)
        stop_agent_relay(bad)


def test_check_refuses_broken_tls_files_and_warns_about_clear_text_beyond_loopback(
        tmp_path, pki, store):
    conf = str(tmp_path / "control.ini")
    write_ini(conf, free_port(), store, control={"tls_cert_file": pki("server.crt"),
                                                 "tls_key_file": pki("client.key")})
    r = subprocess.run([CONTROL_BIN, "-t", "-c", conf], capture_output=True, text=True)
    assert r.returncode == 1 and "not a usable key" in r.stderr, r.stderr
    write_ini(conf, free_port(), store, control={"tls_cert_file": str(tmp_path / "missing.crt"),
                                                 "tls_key_file": pki("server.key")})
    r = subprocess.run([CONTROL_BIN, "-t", "-c", conf], capture_output=True, text=True)
    assert r.returncode == 1 and "missing.crt" in r.stderr, r.stderr
    write_ini(conf, free_port(), store, control={"tls_cert_file": pki("server.crt")})
    r = subprocess.run([CONTROL_BIN, "-t", "-c", conf], capture_output=True, text=True)
    assert r.returncode == 1 and "go together" in r.stderr, r.stderr
    write_ini(conf, free_port(), store, control={"listen_addr": "0.0.0.0"})
    r = subprocess.run([CONTROL_BIN, "-t", "-c", conf], capture_output=True, text=True)
    assert r.returncode == 0 and "without TLS" in r.stderr, r.stderr
    write_ini(conf, free_port(), store, control={"listen_addr": "127.0.0.1"})
    r = subprocess.run([CONTROL_BIN, "-t", "-c", conf], capture_output=True, text=True)
    assert r.returncode == 0 and "without TLS" not in r.stderr, r.stderr


def test_a_reload_renews_the_certificate_for_new_connections_and_refuses_a_broken_one(
        tls_control, pki):
    c = tls_control()
    first = peer_fingerprint(c.port, pki("ca.crt"))
    with open(c.conf) as f:
        text = f.read()
    with open(c.conf, "w") as f:
        f.write(text.replace(pki("server.crt"), pki("server2.crt"))
                .replace(pki("server.key"), pki("server2.key")))
    c.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: peer_fingerprint(c.port, pki("ca.crt")) != first, what="the new certificate")
    renewed = peer_fingerprint(c.port, pki("ca.crt"))
    # A key that does not match: the reload is refused and the running certificate stays.
    with open(c.conf, "w") as f:
        f.write(text.replace(pki("server.key"), pki("client.key")))
    c.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "not a usable key" in c.log(), what="the refused reload to be logged")
    assert peer_fingerprint(c.port, pki("ca.crt")) == renewed
    assert https(c.port, "GET", "/healthz", pki("ca.crt"))[0] == 200
