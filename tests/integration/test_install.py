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
