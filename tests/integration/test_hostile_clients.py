"""Clients that misbehave on purpose: silent connections, bad startup lengths, guessed cancel
keys. None of them may lock others out or get more than the server would give them."""

import os
import socket
import struct
import subprocess
import time

import psycopg
import pytest

from conftest import (
    CANCEL_REQUEST_CODE,
    RawClient,
    admin_json,
    data_rows,
    error_fields,
    startup_packet_for,
    wait_for,
)
from pgstub import stub_factory, stub_relay  # noqa: F401 (stub_factory: a fixture used by name)


def closed_within(sock, timeout):
    """Everything the peer sends on sock until it closes it (EOF or reset), or None when it
    is still open after timeout seconds."""
    deadline = time.monotonic() + timeout
    got = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return got
        except socket.timeout:
            return None
        if not chunk:
            return got
        got += chunk


# --------------------------------------------------------------------------- #
# item 8: silent connections cannot lock everyone out
# --------------------------------------------------------------------------- #


def test_a_full_proxy_answers_53300_and_silent_connections_go_at_the_startup_deadline(relay_factory):
    # max_client_conn 2 + the 64 reserve slots = 66; 70 silent connections take every one
    r = relay_factory(max_client_conn=2, client_startup_timeout="1s", workers=1)
    silent = [socket.create_connection(("127.0.0.1", r.port)) for _ in range(70)]
    try:
        wait_for(lambda: admin_json(r, "show info")["clients"] >= 66, what="every slot taken")
        t0 = time.monotonic()
        # the old code closed a real client with a bare EOF
        with RawClient(r.port) as raw:
            raw.send_startup(application_name="real")
            msgs = raw.read_to_eof()
        assert [m[0] for m in msgs] == ["E"], msgs
        assert error_fields(msgs)["C"] == "53300" and error_fields(msgs)["S"] == "FATAL", msgs
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            r.connect(application_name="real")
        # the silent ones are closed after client_startup_timeout, not client_login_timeout (60s)
        answers = [closed_within(s, t0 + 10 - time.monotonic()) for s in silent]
        assert None not in answers, "a silent connection was kept past client_startup_timeout"
        # the 66 that got a slot are closed without an answer, as PostgreSQL does; the 4 others
        # were refused at once with 53300
        assert answers.count(b"") == 66, answers
        assert all(b"53300" in a for a in answers if a), answers
        assert "no startup packet within client_startup_timeout" in r.log()
    finally:
        for s in silent:
            s.close()
    with r.connect() as c:
        assert c.execute("SELECT 'in again'").fetchone() == ("in again",)


# --------------------------------------------------------------------------- #
# item 10: cancel secrets come from the kernel, one draw per key
# --------------------------------------------------------------------------- #

# getrandom(2) replaced by one that fills each call's buffer with one byte, 0x41, 0x42, ...
# A secret that comes from the kernel's source for its own key shows that byte four times; one
# made by a generator inside pgrelay (seeded once, then predictable from the keys it gave out)
# does not.
GETRANDOM_SHIM = r"""
#include <stddef.h>
#include <sys/types.h>
static unsigned shim_calls;
ssize_t getrandom(void *buf, size_t len, unsigned flags)
{
    unsigned char b = (unsigned char)(0x41 + __atomic_fetch_add(&shim_calls, 1, __ATOMIC_RELAXED) % 64);
    (void)flags;
    for (size_t i = 0; i < len; i++)
        ((unsigned char *)buf)[i] = b;
    return (ssize_t)len;
}
"""


@pytest.fixture
def getrandom_shim(tmp_path):
    src = tmp_path / "shim.c"
    src.write_text(GETRANDOM_SHIM)
    so = tmp_path / "getrandom_shim.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    os.chmod(tmp_path, 0o755)
    asan = os.environ.get("ASAN_OPTIONS", "")
    return ("env", f"LD_PRELOAD={so}", f"ASAN_OPTIONS={asan}:verify_asan_link_order=0")


def backend_key(raw):
    msgs = raw.login()
    (key,) = [body for t, body in msgs if t == "K"]
    return struct.unpack("!I4s", key)


def test_every_cancel_secret_is_drawn_from_getrandom(relay_factory, getrandom_shim):
    r = relay_factory(workers=1, wrapper=getrandom_shim)
    secrets = []
    for _ in range(3):
        with RawClient(r.port) as raw:
            pid, secret = backend_key(raw)
            secrets.append(secret)
            assert data_rows(raw.simple_query("SELECT 1")) == [("1",)]
    for secret in secrets:
        assert len(set(secret)) == 1 and secret[0] >= 0x41, secrets  # one draw of the shim
    assert len(set(secrets)) == 3, secrets  # a new draw for every key


# --------------------------------------------------------------------------- #
# item 4: protocol 3.2 (PostgreSQL 18's variable-length cancel keys)
# --------------------------------------------------------------------------- #


def startup_v3_2(**params):
    return startup_packet_for((3 << 16) | 2, {"user": "postgres", "database": "postgres",
                                              **params})


def test_a_client_asking_for_protocol_3_2_is_negotiated_down_and_cancel_still_works(
        relay_factory, stub_factory):
    stub = stub_factory(protocol_minor=2, mode="stall_after_row")
    r = stub_relay(relay_factory, stub)
    with RawClient(r.port) as raw:
        raw.send(startup_v3_2(application_name="v32", **{"_pq_.some_option": "on"}))
        msgs = raw.read_until("ZE")
        types = [m[0] for m in msgs]
        # NegotiateProtocolVersion first: newest minor 0, the _pq_ option not taken
        assert types[0] == "v", msgs
        newest, n_options = struct.unpack("!ii", msgs[0][1][:8])
        assert (newest, n_options) == (3 << 16, 1), msgs[0]
        assert msgs[0][1][8:] == b"_pq_.some_option\0", msgs[0]
        assert types.count("v") == 1 and types[-1] == "Z", types
        # the node was asked for 3.0, without the option, so its key is 3.0's 8 bytes, and
        # the client gets pgrelay's key, never the node's (the old code passed on the node's
        # 32-byte key as it was)
        assert stub.startups[0][0] == 3 << 16 and "_pq_.some_option" not in stub.startups[0][1]
        (key,) = [body for t, body in msgs if t == "K"]
        assert len(key) == 8 and key[4:] != stub.secret[:4], key
        raw.send_query("SELECT slow")  # the stub answers part of it, then stalls
        with RawClient(r.port) as cancel:
            cancel.send(struct.pack("!ii", 16, CANCEL_REQUEST_CODE) + key)
            assert cancel.read_to_eof() == []
        wait_for(lambda: stub.cancels, what="the cancel to reach the node")
        assert stub.cancels == [struct.pack("!i", stub.pid) + stub.secret[:4]]


def test_a_node_that_sends_a_long_cancel_key_anyway_never_shows_it_to_the_client(
        relay_factory, stub_factory):
    stub = stub_factory(always_long_key=True)
    r = stub_relay(relay_factory, stub)
    with RawClient(r.port) as raw:
        raw.send_startup()
        data = b""
        while True:  # raw bytes: nothing of the node's key may be among them
            chunk = raw.sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert stub.secret not in data and stub.secret[:8] not in data, data
    assert b"08P01" in data, data
    assert "sent a BackendKeyData of 36 bytes" in r.log()
