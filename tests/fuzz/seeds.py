#!/usr/bin/python3
"""Write the checked-in seed corpus of every fuzz target (tests/fuzz/corpus/<target>/).

Run it from anywhere after changing an input format; each seed is named for what it is.
A crash input that `make fuzz` finds is copied into the corpus by hand (crash-<what>), so
that `make test` replays it for ever.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
V3 = 196608


def u32(v):
    return struct.pack("!I", v & 0xFFFFFFFF)


def startup(params=None, code=V3, terminate=True):
    body = u32(code)
    for k, v in (params or {}).items():
        body += k + b"\0" + v + b"\0"
    if terminate:
        body += b"\0"
    return u32(len(body) + 4) + body


def msg(t, body):
    return t + u32(len(body) + 4) + body


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


LONG_NON_ASCII = "é".encode() * 40
ESCAPES = b"\x1b[2J\x1b[31mred\rover\x07\xc2\x9b1m\xe2\x80\xae"

# ---- startup: what a client sends first
STARTUPS = {
    "message": startup({b"user": b"postgres", b"database": b"postgres"}),
    "message-appname": startup({b"user": b"app", b"application_name": b"psql"}),
    "message-long-non-ascii": startup({b"user": b"md5user", b"application_name": LONG_NON_ASCII}),
    "message-escapes": startup({b"user": ESCAPES, b"database": b"\xff\xfe", b"application_name": ESCAPES}),
    "message-options": startup({b"user": b"u", b"options": b"-c search_path=x", b"replication": b"true"}),
    "ssl": u32(8) + u32(80877103),
    "gssenc": u32(8) + u32(80877104),
    "cancel": u32(16) + u32(80877102) + u32(0x00100001) + u32(0xDEADBEEF),
    "cancel-long": u32(24) + u32(80877102) + u32(1) + b"\0" * 12,
    "protocol-2": startup({b"user": b"u"}, code=0x00020000),
    "protocol-3-2": startup({b"user": b"u"}, code=0x00030002),
    "protocol-4": startup({b"user": b"u"}, code=0x00040000),
    "no-user": startup({b"database": b"d"}),
    "empty-user": startup({b"user": b""}),
    "unterminated": startup({b"user": b"u"}, terminate=False),
    "name-without-value": u32(4 + 4 + 5) + u32(V3) + b"user\0",
    "data-after-terminator": startup({b"user": b"u"})[:-0] + b"",
    "length-too-short": u32(4) + u32(V3),
    "length-too-long": u32(10001) + u32(V3),
    "length-negative": u32(0xFFFFFFF0) + u32(V3),
    "truncated-length": b"\0\0",
}
p = startup({b"user": b"u"})
STARTUPS["data-after-terminator"] = u32(len(p) + 2) + p[4:] + b"x\0"
for name, data in STARTUPS.items():
    write("startup", name, data)

# ---- scan: byte 0 = direction (bit 0: server) | split count << 1, then split sizes, then stream
CLIENT = (
    msg(b"Q", b"SELECT 1\0")
    + msg(b"P", b"s1\0SELECT $1\0\0\0")
    + msg(b"B", b"\0s1\0\0\0\0\0\0\0")
    + msg(b"E", b"\0\0\0\0\0")
    + msg(b"S", b"")
    + msg(b"Q", b"x" * 2000 + b"\0")
    + msg(b"X", b"")
)
SERVER = (
    msg(b"R", u32(0))
    + msg(b"S", b"server_version\x0015.0\0")
    + msg(b"K", u32(4242) + u32(0x12345678))
    + msg(b"Z", b"I")
    + msg(b"T", b"\0\1a\0" + b"\0" * 18)
    + msg(b"D", b"\0\1" + u32(3) + b"abc")
    + msg(b"C", b"SELECT 1\0")
    + msg(b"Z", b"T")
)


def scan_seed(server, splits, stream):
    return bytes([(1 if server else 0) | (len(splits) << 1)]) + bytes(splits) + stream


write("scan", "client-whole", scan_seed(False, [], CLIENT))
write("scan", "client-bytewise", scan_seed(False, [1], CLIENT))
write("scan", "client-splits", scan_seed(False, [3, 7, 2, 200, 5], CLIENT))
write("scan", "server-whole", scan_seed(True, [], SERVER))
write("scan", "server-bytewise", scan_seed(True, [1], SERVER))
write("scan", "server-key-split", scan_seed(True, [9, 1, 2, 3, 4, 6], SERVER))
write("scan", "server-key-long", scan_seed(True, [2], msg(b"K", u32(1) + b"k" * 32) + msg(b"Z", b"I")))
write("scan", "length-below-4", scan_seed(False, [2], msg(b"Q", b"")[:1] + u32(3) + b"rest"))
write("scan", "length-huge", scan_seed(True, [], b"D" + u32(0x7FFFFFFF) + b"abc"))
write("scan", "length-negative", scan_seed(True, [1], b"D" + u32(0xFFFFFFFF)))
write("scan", "partial-header", scan_seed(False, [1], msg(b"Q", b"SELECT 1\0") + b"Q\0\0"))
write("scan", "empty-bodies", scan_seed(True, [4], msg(b"1", b"") + msg(b"2", b"") + msg(b"n", b"")))

# ---- cancel: byte 0 = slots (low 3 bits); per slot: secret (4), tag (1), flags (1); packet
# flags: bit 0 in use, bit 1 reached a node (backend key), bit 2 node address, bits 6-7 tag


def slot(secret, tag, flags):
    return u32(secret) + bytes([tag, flags])


def cancel_pkt(pid, secret):
    return u32(16) + u32(80877102) + u32(pid) + u32(secret)


def pid_of(idx, tag_byte, flags):
    tag = ((tag_byte << 2) | (flags >> 6)) & 0x3FF
    return (tag << 20) | (idx + 1)


SLOTS = slot(0xCAFEBABE, 0x12, 0x07) + slot(0x11111111, 0x00, 0x01) + slot(0x22222222, 0x7F, 0x47)
write("cancel", "match-slot0", b"\x03" + SLOTS + cancel_pkt(pid_of(0, 0x12, 0x07), 0xCAFEBABE))
write("cancel", "match-slot2", b"\x03" + SLOTS + cancel_pkt(pid_of(2, 0x7F, 0x47), 0x22222222))
write("cancel", "wrong-secret", b"\x03" + SLOTS + cancel_pkt(pid_of(0, 0x12, 0x07), 0xCAFEBABF))
write("cancel", "wrong-tag", b"\x03" + SLOTS + cancel_pkt(pid_of(0, 0x13, 0x07), 0xCAFEBABE))
write("cancel", "not-on-a-node", b"\x03" + SLOTS + cancel_pkt(pid_of(1, 0x00, 0x01), 0x11111111))
write("cancel", "slot-free", b"\x03" + SLOTS + cancel_pkt(pid_of(5, 0, 0), 0))
write("cancel", "slot-zero", b"\x03" + SLOTS + cancel_pkt(0, 0xCAFEBABE))
write("cancel", "slot-beyond", b"\x03" + SLOTS + cancel_pkt(0x000FFFFF, 0))
write("cancel", "slot-just-beyond", b"\x03" + SLOTS + cancel_pkt(9, 0))
write("cancel", "no-slots", b"\x00" + cancel_pkt(1, 1))
write("cancel", "cancel-bad-length", b"\x00" + u32(20) + u32(80877102) + b"\0" * 12)
write("cancel", "startup-not-cancel", b"\x00" + startup({b"user": b"u"}))

# ---- admin: byte 0 = level (0 none, 1 user, 2 operator, 3 admin), a command line, "\n", then
# fields: each a length byte (bit 7: stored as copy_ident does) and its bytes.


def field(data, cleaned=False):
    return bytes([min(len(data), 127) | (0x80 if cleaned else 0)]) + data[:127]


def session(flags, client=b"127.0.0.1:5000", user=b"postgres", db=b"postgres", app=b"",
            node=b"pg1", stmt=b"SELECT 1", cleaned=False):
    return (bytes([flags]) + field(client) + field(user, cleaned) + field(db, cleaned)
            + field(app, cleaned) + field(node) + field(stmt))


NODES_OK = field(b"") + field(b"")
HISTORY = field(b"probe: pg1 answers as primary")
ORDINARY = session(0x02)
# The attack, as the old copy_ident stored it: 63 bytes, the last character cut.
CUT = session(0x00, user=b"md5user", app=LONG_NON_ASCII[:63])
HOSTILE = session(0x1B, user=ESCAPES, db=b"db\xff\xfe\xc3", app=ESCAPES,
                  stmt=b"SELECT 1 /* \x1b]0;owned\x07 \xff\xfe \xe2\x80\xae */")
UNTERMINATED = session(0x03, client=b"c" * 127, user=b"u" * 127, db=b"\xc3" * 127,
                       app=b"a" * 127, node=b"n" * 127, stmt=b"\xe2\x82" * 63)
CLEANED = session(0x01, user=ESCAPES, db=LONG_NON_ASCII, app=b"x\xff\x00y", cleaned=True)
STATE = NODES_OK + HISTORY + ORDINARY + CUT + CUT + HOSTILE + UNTERMINATED + CLEANED
NODE_ERRORS = (field(b"") + field("é".encode() * 63 + b"\xc3") + field(b"\x1b[2Jreason\xff")
               + ORDINARY + HOSTILE)

COMMANDS = [
    "help", "show info", "show workers", "show clients", "show clients json", "show nodes",
    "show nodes json", "show stats", "show stats json", "show config", "show config json",
    "show leader history", "show leader history json", "set leader pg2", "set leader pg2 force",
    "set leader nosuch", "set leader", "pause", "pause 30s", "pause forever", "resume",
    "resume now", "kill client 1", "kill client 2", "kill client x", "kill client",
    "reload", "shutdown", "shutdown fast", "shutdown never", "prompt", "quit",
    "show clients; show stats json; quit; show info", "SHOW CLIENTS JSON", "show", "nonsense",
    " ; ;; ", "show clients extra", "a b c d e f g h i j k l m n o p q r s", "show\tinfo",
]
for i, line in enumerate(COMMANDS):
    for level in (1, 3) if i % 2 else (0, 2, 3):
        name = f"cmd-{i:02d}-{line.split(' ')[0].strip(';') or 'blank'}-level{level}"
        write("admin", name, bytes([level]) + line.encode() + b"\n" + STATE)
write("admin", "issue-item1-cut-inside-a-character", b"\x03show clients\n" + NODES_OK + HISTORY
      + ORDINARY + CUT + CUT)
write("admin", "node-errors-not-utf8", b"\x03show nodes\n" + NODE_ERRORS)
write("admin", "line-with-escape", b"\x03show \x1b[2J clients\n" + STATE)
write("admin", "line-not-utf8", b"\x02kill client \xff\n" + STATE)
write("admin", "line-with-nul", b"\x03show info\x00; shutdown\n" + STATE)
write("admin", "line-too-long", b"\x03" + b"show info;" * 500 + b"\n" + STATE)
write("admin", "empty", b"")

# ---- config: the text of pgrelay.ini as a reload reads it
with open(os.path.join(HERE, "..", "..", "etc", "pgrelay.ini"), "rb") as f:
    write("config", "sample", f.read())
NODES = b"".join(b"[node.n%d]\nhost = 10.0.0.%d\nport = 5432\nrole = replica\n" % (i, i)
                 for i in range(70))
CONFIGS = {
    "minimal": b"[pgrelay]\nlisten_port = 6432\n[node.pg1]\nhost = 127.0.0.1\nrole = primary\n",
    "every-kind-of-value": b"[pgrelay]\nworkers = 4\nclient_login_timeout = 250ms\n"
    b"tcp_keepalive = yes\nadmin_socket_mode = 0660\nlog_level = debug\n"
    b"[agent]\nhealth_interval = 1s\n[control]\nendpoint = http://ctl:8080\ntoken = s3cr3t\n"
    b"[node.pg1]\nhost = /var/run/postgresql\nport = 5433\nrole = primary\n",
    "errors": b"[pgrelay]\nworkers = many\nlisten_port = 99999\nno_such_key = 1\n"
    b"client_login_timeout = -5s\n[node.]\nhost=\n[unknown]\nx = y\nnot a key line\n",
    "too-many-errors": b"[pgrelay]\n" + b"workers = x\n" * 200,
    "too-many-nodes": b"[pgrelay]\n" + NODES,
    "long-values": b"[pgrelay]\nadmin_users = " + b"u," * 2000 + b"\nlogfile = /"
    + b"d/" * 3000 + b"\n[node." + b"n" * 300 + b"]\nhost = " + b"h" * 5000 + b"\n",
    "not-utf8-and-controls": b"[pgrelay]\nlogfile = /tmp/\xff\x1b[2J\napplication = \xc3\n"
    b"[node.pg\xe2\x80\xae]\nhost = a\rb\nrole = primary\n",
    "duplicates": b"[pgrelay]\nworkers = 1\nworkers = 2\n[node.a]\nhost = x\n[node.a]\nhost = y\n",
    "comments-and-quotes": b"; comment\n# comment\n[pgrelay] ; trailing\nlisten_addr = \"::1\"\n"
    b"  workers   =   3   ; inline\n[node.pg1]\nhost = 'q'\n",
    "empty": b"",
}
for name, data in CONFIGS.items():
    write("config", name, data)
# fuzz_sasl: one read from the node before login (AuthenticationSASL among other messages).
SASL = msg(b"R", u32(10) + b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")
SASL_SEEDS = {
    "plus-first": SASL,
    "plus-last": msg(b"R", u32(10) + b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0"),
    "only-plus": msg(b"R", u32(10) + b"SCRAM-SHA-256-PLUS\0\0"),
    "with-others": msg(b"R", u32(0)) + SASL + msg(b"Z", b"I"),
    "split": SASL[:17],
    "unterminated": msg(b"R", u32(10) + b"SCRAM-SHA-256-PLUS\0SCRAM"),
    "continue-not-list": msg(b"R", u32(11) + b"r=abc-PLUS\0"),
    "bad-length": b"R" + u32(2) + SASL,
}
for name, data in SASL_SEEDS.items():
    write("sasl", name, data)
# A dictionary of the key names (from the key table) and the INI syntax.
import re  # noqa: E402

with open(os.path.join(HERE, "..", "..", "common", "config.c")) as f:
    keys = sorted(set(re.findall(r'_KEY\("([a-z_]+)"', f.read())))
with open(os.path.join(HERE, "config.dict"), "w") as f:
    f.write("# libFuzzer dictionary for fuzz_config: written by seeds.py from common/config.c\n")
    for word in ["[pgrelay]", "[agent]", "[control]", "[node.", "]", " = ", "\\x0a", ";", "#",
                 "yes", "off", "250ms", "5s", "2m", "primary", "replica"] + keys:
        f.write('"%s"\n' % word)
