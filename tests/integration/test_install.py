"""`make install` and `make uninstall` into a DESTDIR (issue 13): owners and modes of what holds
secrets, a configuration directory the agent can commit into, nothing left behind, and the
install's closing hints."""

import grp
import os
import stat
import subprocess

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GROUP = "daemon"  # stands for the pgrelay group, which this machine need not have


def make(*args):
    p = subprocess.run(["make", "-s", "-C", REPO, *args], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.fixture
def destdir(tmp_path):
    d = tmp_path / "root"
    (tmp_path / "install.out").write_text(make("install", f"DESTDIR={d}",
                                               f"PGRELAY_GROUP={GROUP}"))
    return d


def mode_owner(path):
    st = os.stat(path)
    return stat.S_IMODE(st.st_mode), st.st_uid, grp.getgrgid(st.st_gid).gr_name


def test_install_makes_secrets_group_readable_only_and_the_config_directory_writable(destdir):
    conf = destdir / "etc" / "pgrelay"
    assert mode_owner(conf) == (0o2775, 0, GROUP)
    for name in ("pgrelay.ini", "control.ini"):
        assert mode_owner(conf / name) == (0o640, 0, GROUP), name
    for name in ("pgrelay.ini.sample", "control.ini.sample"):
        assert mode_owner(conf / name)[0] == 0o644, name
    for path in ("usr/local/sbin/pgrelay", "usr/local/sbin/pgrelay-agent",
                 "usr/local/sbin/pgrelay-control", "usr/local/bin/pgrelayctl",
                 "etc/init.d/pgrelay", "etc/init.d/pgrelay-control"):
        assert mode_owner(destdir / path)[0] == 0o755, path
    for path in ("usr/local/lib/systemd/system/pgrelay.service",
                 "usr/local/lib/systemd/system/pgrelay-control.service",
                 "etc/default/pgrelay", "etc/default/pgrelay-control",
                 "etc/logrotate.d/pgrelay", "usr/local/share/man/man8/pgrelay-control.8"):
        assert mode_owner(destdir / path)[0] == 0o644, path


def test_install_ends_with_the_next_steps(destdir):
    out = (destdir.parent / "install.out").read_text()
    for words in ("Next steps", "[node.*]", "10.0.0.11", "pgrelay -t -c /etc/pgrelay/pgrelay.ini",
                  "/etc/init.d/pgrelay start", "pgrelay-control", "mandb", "make uninstall"):
        assert words in out, (words, out)


def test_installed_pages_and_units_name_the_installed_paths(destdir):
    for page in ("man8/pgrelay-control.8", "man8/pgrelay.8"):
        text = (destdir / "usr/local/share/man" / page).read_text()
        assert "/usr/share/doc/pgrelay" not in text, page
    text = (destdir / "usr/local/share/man/man8/pgrelay-control.8").read_text()
    assert "/usr/local/share/doc/pgrelay/protocol.md" in text
    assert (destdir / "usr/local/share/doc/pgrelay/protocol.md").exists()
    for unit in ("pgrelay.service", "pgrelay-control.service"):
        text = (destdir / "usr/local/lib/systemd/system" / unit).read_text()
        assert "@SBINDIR@" not in text and "/usr/local/sbin/" in text, unit
    assert "EnvironmentFile=-/etc/default/pgrelay\n" in (
        destdir / "usr/local/lib/systemd/system/pgrelay.service").read_text()


def test_uninstall_leaves_no_file_behind_and_keeps_an_edited_configuration(destdir):
    with open(destdir / "etc/pgrelay/pgrelay.ini", "a") as f:
        f.write("; edited\n")
    out = make("uninstall", f"DESTDIR={destdir}")
    left = sorted(os.path.relpath(os.path.join(d, f), destdir)
                  for d, _, files in os.walk(destdir) for f in files)
    assert left == ["etc/pgrelay/pgrelay.ini"], left
    assert "kept" in out and "pgrelay.ini" in out, out
    os.remove(destdir / "etc/pgrelay/pgrelay.ini")
    make("uninstall", f"DESTDIR={destdir}")
    assert not (destdir / "etc/pgrelay").exists()
    assert not (destdir / "usr/local/share/doc/pgrelay").exists()


# --------------------------------------------------------------------------- #
# the installed init scripts
# --------------------------------------------------------------------------- #


def shared_dir(tmp):
    """A directory under /tmp that every user may use (pytest's tmp_path is root's only)."""
    import tempfile
    d = tempfile.mkdtemp(prefix="pgrelay-install-", dir="/tmp")
    os.chmod(d, 0o777)
    return d


def test_the_init_script_exports_node_id_from_its_defaults_file(destdir):
    """NODE_ID=proxy-a in /etc/default/pgrelay reaches the daemon (the agent's node id), not
    only the script: a restart keeps the proxy's name."""
    import shutil
    d = shared_dir(destdir)
    try:
        seen = os.path.join(d, "node_id")
        daemon = os.path.join(d, "pgrelay")
        with open(daemon, "w") as f:  # stands for pgrelay: -t passes, a start records NODE_ID
            f.write('#!/bin/sh\ncase "$1" in -t) exit 0 ;; esac\n'
                    f'printf "%s" "${{NODE_ID-unset}}" > {seen}\n')
        os.chmod(daemon, 0o755)
        defaults = os.path.join(d, "defaults")
        with open(defaults, "w") as f:
            f.write("NODE_ID=proxy-a\n")
        conf = os.path.join(d, "pgrelay.ini")
        with open(conf, "w") as f:
            f.write("[pgrelay]\n")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PGRELAY_DEFAULTS": defaults,
               "DAEMON": daemon, "CONFIG": conf, "PIDFILE": os.path.join(d, "run", "p.pid"),
               "RUN_AS": "nobody"}
        p = subprocess.run([str(destdir / "etc/init.d/pgrelay"), "start"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        with open(seen) as f:
            assert f.read() == "proxy-a"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_the_units_pass_systemd_analyze(destdir):
    import shutil
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    for unit in ("pgrelay.service", "pgrelay-control.service"):
        path = destdir / "usr/local/lib/systemd/system" / unit
        text = path.read_text().replace("/usr/local/sbin/", str(destdir / "usr/local/sbin") + "/")
        check = destdir / unit
        check.write_text(text)
        p = subprocess.run(["systemd-analyze", "verify", "--man=no", str(check)],
                           capture_output=True, text=True, timeout=60)
        problems = [ln for ln in (p.stdout + p.stderr).splitlines()
                    if unit in ln and "User" not in ln and "Group" not in ln]
        assert not problems, p.stdout + p.stderr


def test_the_control_planes_init_script_starts_stops_and_reports_it(destdir, pg):
    """The installed pgrelay-control under its init script: start (as RUN_AS, in the
    background, stderr to OUTPUT), status, /readyz, stop."""
    import shutil
    import uuid

    from conftest import free_port, http_call, wait_for

    d = shared_dir(destdir)
    store_db = "ctl_inst_" + uuid.uuid4().hex[:10]
    pg.query(f"CREATE DATABASE {store_db}")
    port = free_port()
    conf = os.path.join(d, "control.ini")
    with open(conf, "w") as f:
        f.write(f"[control]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n"
                f"store = host={pg.host} port={pg.port} user=postgres dbname={store_db}\n"
                f"admin_tokens = {'a' * 32}\n\n[deployment.prod]\ntoken = {'b' * 32}\n")
    os.chmod(conf, 0o644)
    pidfile = os.path.join(d, "run", "pgrelay-control.pid")
    output = os.path.join(d, "log", "control.log")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PGRELAY_CONTROL_DEFAULTS": "/nonexistent",
           "DAEMON": str(destdir / "usr/local/sbin/pgrelay-control"), "CONFIG": conf,
           "PIDFILE": pidfile, "OUTPUT": output, "RUN_AS": "postgres"}
    os.chmod(destdir, 0o755)
    for parent in (destdir.parent, destdir.parent.parent, destdir.parent.parent.parent):
        os.chmod(parent, os.stat(parent).st_mode | 0o005)  # postgres reaches the binary

    def init(action):
        return subprocess.run([str(destdir / "etc/init.d/pgrelay-control"), action], env=env,
                              capture_output=True, text=True, timeout=60)

    try:
        p = init("start")
        assert p.returncode == 0, p.stdout + p.stderr
        wait_for(lambda: http_call(port, "GET", "/readyz", timeout=2)[0] == 200, timeout=20,
                 what="pgrelay-control to be ready")
        with open(pidfile) as f:
            pid = int(f.read())
        with open(f"/proc/{pid}/status") as f:
            uid = next(ln.split()[1] for ln in f if ln.startswith("Uid:"))
        assert int(uid) == int(subprocess.check_output(["id", "-u", "postgres"]))
        p = init("status")
        assert p.returncode == 0 and "is running" in p.stdout, p.stdout + p.stderr
        p = init("stop")
        assert p.returncode == 0, p.stdout + p.stderr
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), what="pgrelay-control to exit")
        assert init("status").returncode == 3
        assert os.path.getsize(output) > 0  # its log went to OUTPUT
    finally:
        init("stop")
        shutil.rmtree(d, ignore_errors=True)
