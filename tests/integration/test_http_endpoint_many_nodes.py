"""The proxy's HTTP health checks with as many nodes, and as long node names, as the
configuration allows: every answer is still whole JSON."""

import json
import socket

from cluster import Cluster, destroy_relay, start_ha_relay
from conftest import free_port, wait_for

NAME_MAX = 63  # longest [node.NAME] (CONFIG_NAME_MAX, NUL included, is 64)


def health(port, path):
    """(status, parsed JSON body): the body must be whole JSON."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    raw = b"".join(chunks).decode()
    head, body = raw.split("\r\n\r\n", 1)
    return int(head.split(" ", 2)[1]), json.loads(body)


def test_is_read_ready_lists_every_fit_replica_in_whole_json_with_long_names():
    with Cluster.create(replicas=1) as cluster:
        primary, replica = cluster.relay_nodes()
        # Twelve names of the longest length for the one replica: each is a node fit for reads.
        names = [f"r{i:02d}-" + "x" * (NAME_MAX - 4) for i in range(12)]
        nodes = [primary] + [(name, dict(replica[1])) for name in names]
        port = free_port()
        r = start_ha_relay(cluster, nodes=nodes, agent={"health_interval": "200ms"},
                           read_listen_port="auto", read_fallback="none", http_listen_port=port)
        try:
            def all_listed():
                status, body = health(port, "/health/is-read-ready")
                return status == 200 and len(body["replicas"]) == len(names)

            wait_for(all_listed, what="every replica fit for reads")
            status, body = health(port, "/health/is-read-ready")
            assert sorted(body["replicas"]) == sorted(names)
        finally:
            destroy_relay(r)
