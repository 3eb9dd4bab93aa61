"""The documentation follows the code: pgrelay's own key table (``show config``) and command
table (``help``) are the one source; the man pages, the sample configuration and
``pgrelay --help`` must describe exactly what they hold."""

import json
import os
import re
import subprocess

import pytest

from conftest import admin, PGRELAY_BIN, wait_for

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MAN8 = os.path.join(REPO, "man", "pgrelay.8")
MAN5 = os.path.join(REPO, "man", "pgrelay.ini.5")
SAMPLE_INI = os.path.join(REPO, "etc", "pgrelay.ini")


# --------------------------------------------------------------------------- #
# what the running pgrelay says
# --------------------------------------------------------------------------- #



@pytest.fixture(scope="module")
def relay(relay):
    """conftest's module relay, once its admin socket answers (it may come a moment after
    the TCP port that start_relay waits for)."""

    def answers():
        try:
            return "version" in admin(relay, "show info")
        except OSError:
            return False

    wait_for(answers, timeout=10, what="the admin socket to answer")
    return relay


@pytest.fixture(scope="module")
def config_keys(relay):
    """(pgrelay keys, node keys) from ``show config json``, in table order."""
    rows = json.loads(admin(relay, "show config json").strip())
    pgrelay_keys, node_keys = [], []
    for row in rows:
        m = re.fullmatch(r"node\.[^.]+\.(\w+)", row["key"])
        if m:
            if m.group(1) not in node_keys:
                node_keys.append(m.group(1))
        else:
            pgrelay_keys.append(row["key"])
    assert pgrelay_keys and node_keys, rows
    return pgrelay_keys, node_keys


@pytest.fixture(scope="module")
def commands(relay):
    """{command words: full synopsis} from ``help`` (root has every level)."""
    out = admin(relay, "help")
    cmds = {}
    for line in out.strip("\n").split("\n"):
        synopsis = re.split(r"\s{2,}", line.strip())[0]
        words = " ".join(w for w in synopsis.split() if re.fullmatch(r"[a-z]+", w))
        cmds[words] = synopsis
    assert "help" in cmds and "show info" in cmds, out
    return cmds


# --------------------------------------------------------------------------- #
# reading roff
# --------------------------------------------------------------------------- #


def read(path):
    with open(path) as f:
        return f.read()


def sections(text):
    """{section title: its lines} for the .SH sections of a man page."""
    out, title = {}, None
    for line in text.split("\n"):
        m = re.match(r'\.SH\s+"?(.*?)"?\s*$', line)
        if m:
            title = m.group(1)
            out[title] = []
        elif title is not None:
            out[title].append(line)
    return out


def unescape(text):
    text = re.sub(r"\\f(\[[^]]*\]|.)", "", text)
    text = text.replace("\\-", "-").replace("\\(en", "-").replace("\\ ", " ").replace("\\&", "")
    return text


def render(line):
    """A roff line as it reads: font macros' arguments joined (the alternating ones
    without spaces), font escapes dropped."""
    m = re.match(r"\.(B|I|BR|RB|BI|IB|IR|RI)\s+(.*)$", line)
    if not m:
        return unescape(line)
    macro, rest = m.groups()
    args = [
        m.group(1) if m.group(1) is not None else m.group(2)
        for m in re.finditer(r'"((?:[^"]|"")*)"|(\S+)', rest)
    ]
    joined = (" " if macro in ("B", "I") else "").join(args)
    return unescape(joined)


def tp_entries(lines):
    """The tag line of each .TP item, rendered."""
    return [render(lines[i + 1]) for i, line in enumerate(lines[:-1]) if line.strip() == ".TP"]


def documented_keys(lines):
    """Keys of the ``.BR key " (type, default ...)"`` items of an ini.5 section."""
    keys = []
    for i, line in enumerate(lines[:-1]):
        if line.strip() == ".TP":
            m = re.match(r'\.BR?\s+(\w+)(\s|"|$)', lines[i + 1])
            if m:
                keys.append(m.group(1))
    return keys


def missing_message(what, missing, where):
    return f"{len(missing)} {what} missing from {where}: {', '.join(missing)}"


# --------------------------------------------------------------------------- #
# pgrelay.ini(5)
# --------------------------------------------------------------------------- #


def test_every_pgrelay_key_is_an_item_of_pgrelay_ini_5(config_keys):
    secs = sections(read(MAN5))
    documented = set(documented_keys(secs["SECTION [pgrelay]"]))
    missing = [k for k in config_keys[0] if k not in documented]
    assert not missing, missing_message("[pgrelay] keys", missing, "SECTION [pgrelay] of man/pgrelay.ini.5")


def test_every_node_key_is_an_item_of_pgrelay_ini_5(config_keys):
    secs = sections(read(MAN5))
    documented = set(documented_keys(secs["SECTION [node.NAME]"]))
    missing = [k for k in config_keys[1] if k not in documented]
    assert not missing, missing_message("[node.NAME] keys", missing, "SECTION [node.NAME] of man/pgrelay.ini.5")


def test_pgrelay_ini_5_documents_no_key_pgrelay_lacks(config_keys):
    secs = sections(read(MAN5))
    extra = [k for k in documented_keys(secs["SECTION [pgrelay]"]) if k not in config_keys[0]]
    extra += [f"node.{k}" for k in documented_keys(secs["SECTION [node.NAME]"]) if k not in config_keys[1]]
    assert not extra, f"man/pgrelay.ini.5 documents keys show config does not have: {', '.join(extra)}"


def test_every_pgrelay_key_appears_in_the_sample_config(config_keys):
    sample = {}
    section = None
    for line in read(SAMPLE_INI).split("\n"):
        m = re.match(r"\s*\[([^]]+)\]", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"\s*[;#]?\s*(\w+)\s*=", line)
        if m:
            sample.setdefault(section, set()).add(m.group(1))
    missing = [k for k in config_keys[0] if k not in sample.get("pgrelay", set())]
    assert not missing, missing_message("[pgrelay] keys", missing, "[pgrelay] of etc/pgrelay.ini (commented or not)")


# --------------------------------------------------------------------------- #
# pgrelay(8)
# --------------------------------------------------------------------------- #


def test_every_admin_command_is_an_item_of_the_admin_console_section(commands):
    entries = tp_entries(sections(read(MAN8))["ADMIN CONSOLE"])
    missing = [w for w in commands if not any(e == w or e.startswith(w + " ") for e in entries)]
    assert not missing, missing_message("admin commands", missing, "ADMIN CONSOLE of man/pgrelay.8") + (
        f"\nitems there: {entries}"
    )


def test_admin_console_items_show_the_arguments_help_shows(commands):
    entries = tp_entries(sections(read(MAN8))["ADMIN CONSOLE"])
    wrong = []
    for words, synopsis in commands.items():
        matching = [e for e in entries if e == words or e.startswith(words + " ")]
        if matching and synopsis not in matching:
            wrong.append(f"help says {synopsis!r}, the man page renders {matching[0]!r}")
    assert not wrong, "ADMIN CONSOLE items of man/pgrelay.8 disagree with help:\n" + "\n".join(wrong)


def test_admin_console_section_documents_no_command_pgrelay_lacks(commands):
    entries = tp_entries(sections(read(MAN8))["ADMIN CONSOLE"])
    unknown = [e for e in entries if not any(e == w or e.startswith(w + " ") for w in commands)]
    assert not unknown, f"man/pgrelay.8 ADMIN CONSOLE documents commands help lacks: {unknown}"


@pytest.mark.parametrize("path", [MAN8, MAN5])
def test_man_pages_are_plain_roff_without_control_characters(path):
    bad = [
        f"line {n}: {line!r}"
        for n, line in enumerate(read(path).split("\n"), 1)
        if re.search(r"[\x00-\x08\x0b-\x1f\x7f]", line)
    ]
    assert not bad, f"{os.path.relpath(path, REPO)} has control characters (a \\f written as a form feed?):\n" + "\n".join(bad)


def test_pgrelay_help_mentions_every_long_option_of_the_man_page():
    options_text = "\n".join(sections(read(MAN8))["OPTIONS"])
    documented = sorted(set(re.findall(r"\\-\\-([a-z][a-z-]*)", options_text)))
    assert documented, "no long options found in OPTIONS of man/pgrelay.8"
    r = subprocess.run([PGRELAY_BIN, "--help"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    missing = [f"--{o}" for o in documented if f"--{o}" not in r.stdout]
    assert not missing, missing_message("long options", missing, "pgrelay --help") + f"\n{r.stdout}"
    undocumented = sorted(set(re.findall(r"--([a-z][a-z-]*)", r.stdout)) - set(documented))
    assert not undocumented, f"pgrelay --help has options OPTIONS of man/pgrelay.8 lacks: {undocumented}"
