"""Every man page renders without a groff warning, and every JSON example in them can be copied
and pasted: it parses (issue 13 item 9)."""

import glob
import json
import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PAGES = sorted(glob.glob(os.path.join(REPO, "man", "*.[0-9]")))


def render(page, width=1000):
    """The page as man -l shows it, with groff's warnings on stderr."""
    env = dict(os.environ, MANWIDTH=str(width), MANPAGER="cat", PAGER="cat", LC_ALL="C.UTF-8")
    p = subprocess.run(["man", "--warnings=w", "-l", page], capture_output=True, text=True,
                       env=env, timeout=60)
    return p


def json_examples(text):
    """Every substring that starts with {" and ends at its balancing brace."""
    found = []
    for m in re.finditer(r'\{"', text):
        depth, in_str, esc = 0, False, False
        for i in range(m.start(), len(text)):
            c = text[i]
            if in_str:
                if esc:
                    esc = False
                elif c == "\\":
                    esc = True
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[m.start():i + 1])
                    break
        else:
            found.append(text[m.start():m.start() + 80])  # never closed: fails to parse
    # nested objects are found again from their own {": keep the outermost only
    return [f for f in found if not any(f != g and f in g for g in found)]


@pytest.mark.skipif(not shutil.which("man"), reason="man is not installed")
@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_page_renders_without_warnings(page):
    p = render(page, width=80)
    assert p.returncode == 0, p.stderr
    assert p.stderr == "", p.stderr
    assert len(p.stdout.splitlines()) > 20


@pytest.mark.skipif(not shutil.which("man"), reason="man is not installed")
@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_every_json_example_parses_as_rendered(page):
    text = render(page).stdout
    bad = []
    for example in json_examples(text):
        try:
            json.loads(example)
        except ValueError as e:
            bad.append(f"{example!r}: {e}")
    assert not bad, "\n".join(bad)


def test_the_control_planes_page_has_its_api_examples():
    text = render(os.path.join(REPO, "man", "pgrelay-control.8")).stdout
    examples = [json.loads(e) for e in json_examples(text)]
    assert {"node_id": "proxy-a"} in examples
    assert {"node": "pg2", "promote": False, "timeout_s": 30} in examples
    assert {"text": "[pgrelay]\n..."} in examples


@pytest.mark.parametrize("page", ["pgrelay.8", "pgrelay.ini.5"])
def test_see_also_names_the_control_plane(page):
    text = render(os.path.join(REPO, "man", page)).stdout
    see_also = text.split("SEE ALSO", 1)[1]
    assert "pgrelay-control(8)" in see_also and "pgrelayctl(1)" in see_also, see_also


def test_pgrelay_8_says_how_many_workers_it_forks_in_words():
    text = " ".join(render(os.path.join(REPO, "man", "pgrelay.8")).stdout.split())
    assert "workers worker processes" not in text
    assert "forks worker processes (as many as workers)" in text
