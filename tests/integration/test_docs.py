"""The documentation follows the code: pgrelay's own key table (``show config``, every key of
every section) and command table (``help``) are the one source; the man pages, the sample
configuration and ``pgrelay --help`` must describe exactly what they hold."""

import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import admin, PGRELAY_BIN, require

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MAN8 = os.path.join(REPO, "man", "pgrelay.8")
MAN5 = os.path.join(REPO, "man", "pgrelay.ini.5")
SAMPLE_INI = os.path.join(REPO, "etc", "pgrelay.ini")


# --------------------------------------------------------------------------- #
# what the running pgrelay says
# --------------------------------------------------------------------------- #



@pytest.mark.parametrize("page", sorted(os.listdir(os.path.join(REPO, "man"))))
def test_every_man_page_formats_without_warnings(page):
    require(shutil.which("groff"), "groff is not installed (make deps installs groff-base)")
    p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", os.path.join(REPO, "man", page)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stderr == "", p.stderr


SECTIONS = ["pgrelay", "agent", "control", "node"]


@pytest.fixture(scope="module")
def config_keys(relay):
    """{section: {key: reloadable}} for every section of the key table, from ``show config
    json`` (each [node.NAME] as "node"), keys in table order."""
    rows = json.loads(admin(relay, "show config json").strip())
    keys = {}
    for row in rows:
        section = "node" if row["section"].startswith("node.") else row["section"]
        name = row["key"].rsplit(".", 1)[-1]
        keys.setdefault(section, {})
        assert keys[section].get(name, row["reloadable"]) == row["reloadable"], row
        keys[section][name] = row["reloadable"]
    assert sorted(keys) == sorted(SECTIONS), f"show config has sections {sorted(keys)}"
    return keys


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
    return list(documented_items(lines))


def documented_items(lines):
    """{key: the text of its item} for the ``.TP`` items of an ini.5 section."""
    items, key = {}, None
    for i, line in enumerate(lines):
        if line.strip() == ".TP" and i + 1 < len(lines):
            m = re.match(r'\.BR?\s+(\w+)(\s|"|$)', lines[i + 1])
            key = m.group(1) if m else None
            if key:
                items[key] = []
            continue
        if key:
            items[key].append(render(line))
    return {k: " ".join(v) for k, v in items.items()}


def section_preamble(lines):
    """The text of an ini.5 section before its first item."""
    out = []
    for line in lines:
        if line.strip() == ".TP":
            break
        out.append(render(line))
    return " ".join(out)


def says_reloadable(text):
    """True / False when the text says a key is (not) reloadable, None when it says neither."""
    if re.search(r"\bNot reloadable\b", text, re.I):
        return False
    if re.search(r"\b(All are )?reloadable\b", text, re.I):
        return True
    return None


def man5_section(name):
    return sections(read(MAN5))["SECTION [node.NAME]" if name == "node" else f"SECTION [{name}]"]


def missing_message(what, missing, where):
    return f"{len(missing)} {what} missing from {where}: {', '.join(missing)}"


# --------------------------------------------------------------------------- #
# pgrelay.ini(5)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("section", SECTIONS)
def test_every_key_of_every_section_is_an_item_of_pgrelay_ini_5(config_keys, section):
    documented = set(documented_keys(man5_section(section)))
    missing = [k for k in config_keys[section] if k not in documented]
    where = "SECTION [node.NAME]" if section == "node" else f"SECTION [{section}]"
    assert not missing, missing_message(f"[{section}] keys", missing, f"{where} of man/pgrelay.ini.5")


def test_pgrelay_ini_5_documents_no_key_pgrelay_lacks(config_keys):
    extra = [
        f"[{section}] {k}"
        for section in SECTIONS
        for k in documented_keys(man5_section(section))
        if k not in config_keys[section]
    ]
    assert not extra, f"man/pgrelay.ini.5 documents keys show config does not have: {', '.join(extra)}"


@pytest.mark.parametrize("section", SECTIONS)
def test_pgrelay_ini_5_says_whether_each_key_is_reloadable_as_show_config_does(config_keys, section):
    lines = man5_section(section)
    items = documented_items(lines)
    section_says = says_reloadable(section_preamble(lines))
    wrong = []
    for key, reloadable in config_keys[section].items():
        says = says_reloadable(items.get(key, ""))
        if says is None:
            says = section_says
        if says is None:
            wrong.append(f"{key}: neither its item nor its section says whether it is reloadable")
        elif says != reloadable:
            wrong.append(f"{key}: the man page says {'' if says else 'not '}reloadable, "
                         f"show config says {'' if reloadable else 'not '}reloadable")
    assert not wrong, f"[{section}] of man/pgrelay.ini.5:\n" + "\n".join(wrong)


def test_every_key_of_every_section_appears_in_the_sample_config(config_keys):
    sample = {}
    section = None
    for line in read(SAMPLE_INI).split("\n"):
        m = re.match(r"\s*\[([^]]+)\]", line)
        if m:
            section = "node" if m.group(1).startswith("node.") else m.group(1)
            continue
        m = re.match(r"\s*[;#]?\s*(\w+)\s*=", line)
        if m:
            sample.setdefault(section, set()).add(m.group(1))
    missing = [
        f"[{sec}] {k}" for sec in SECTIONS for k in config_keys[sec] if k not in sample.get(sec, set())
    ]
    assert not missing, missing_message("keys", missing, "etc/pgrelay.ini (commented or not)")


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


def documented_defaults(lines):
    """{key: default as pgrelay.ini(5) writes it ("" for "default empty")} of an ini.5 section;
    keys without a default (required) are left out."""
    out = {}
    for i, line in enumerate(lines[:-1]):
        if line.strip() != ".TP":
            continue
        tag = render(lines[i + 1])
        m = re.match(r"(\w+) \((.*)\)\s*$", tag)
        if not m:
            continue
        d = re.search(r"default (empty|\S+)$", m.group(2))
        if d:
            out[m.group(1)] = "" if d.group(1) == "empty" else d.group(1)
    return out


_UNIT_MS = {"ms": 1, "s": 1000, "min": 60000, "h": 3600000, "d": 86400000}


def same_value(a, b):
    """Equal as pgrelay reads them: a duration may be written 0 or 0s, 60s or 1min."""
    if a == b:
        return True
    ma, mb = (re.fullmatch(r"(\d+)(ms|s|min|h|d)?", x) for x in (a, b))
    if not (ma and mb) or not (ma.group(2) or mb.group(2)):
        return False
    return (int(ma.group(1)) * _UNIT_MS[ma.group(2) or "s"] ==
            int(mb.group(1)) * _UNIT_MS[mb.group(2) or "s"])


@pytest.mark.parametrize("section", SECTIONS)
def test_every_default_in_pgrelay_ini_5_is_the_one_pgrelay_applies(relay, section):
    """The man page's default of each key is show config's default, and the value a key takes
    when the file does not set it (the module relay's file sets only a few [pgrelay] keys and
    a node's host, port and role)."""
    with open(relay.conf_path) as f:
        set_in_file = {line.split("=")[0].strip() for line in f if "=" in line}
    rows = json.loads(admin(relay, "show config json").strip())
    prefix = "node.pg1" if section == "node" else section
    shown = {row["key"].rsplit(".", 1)[-1]: row for row in rows if row["section"] == prefix}
    documented = documented_defaults(man5_section(section))
    assert documented, f"no defaults read from the [{section}] section of pgrelay.ini(5)"
    wrong = []
    for key, default in documented.items():
        row = shown.get(key)
        if row is None:
            wrong.append(f"{key}: not in show config")
            continue
        if not same_value(row["default"], default):
            wrong.append(f"{key}: the man page says default {default!r}, show config "
                         f"{row['default']!r}")
        if key not in set_in_file and not same_value(row["value"], default):
            wrong.append(f"{key}: not set in the file, yet its value is {row['value']!r}, not "
                         f"the documented default {default!r}")
    assert not wrong, f"[{section}] of man/pgrelay.ini.5:\n" + "\n".join(wrong)
