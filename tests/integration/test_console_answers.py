"""Console answers an operator can act on (issue 13 item 9): an unknown `show` target names the
ones there are, and `show info` gives every port pgrelay listens on."""

from conftest import admin, admin_json, free_port, start_relay


def test_show_with_an_unknown_target_names_the_targets(relay):
    answer = admin(relay, "show foo")
    assert answer.startswith('error: unknown command "show foo"; show is followed by one of: '
                             "info, workers, clients, nodes, stats, config, leader history"), answer
    assert admin(relay, "show").startswith('error: unknown command "show"; show is followed')
    assert "kill is followed by one of: client" in admin(relay, "kill someone")
    assert "try help" in admin(relay, "frobnicate")  # no command starts with it


def test_show_info_gives_the_read_port_and_the_http_port(pg):
    read_port, http_port = free_port(), free_port()
    r = start_relay(pg, extra={"read_listen_port": read_port, "http_listen_port": http_port})
    try:
        info = admin_json(r, "show info")
        assert info["listen_port"] == r.port
        assert info["read_listen_port"] == read_port
        assert info["http_listen_port"] == http_port
        rows = dict(ln.split(None, 1) for ln in admin(r, "show info").strip().splitlines())
        assert rows["read_listen_port"] == str(read_port), rows
    finally:
        r.stop()


def test_show_info_says_null_for_ports_that_are_off(relay):
    info = admin_json(relay, "show info")
    assert info["read_listen_port"] is None and info["http_listen_port"] is None
