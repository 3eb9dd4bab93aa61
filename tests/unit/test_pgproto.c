/* test_pgproto.c - unit tests for common/pgproto.c: startup packets, v3 framing, ErrorResponse. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "pgproto.h"

/* ------------------------------------------------------------------------------------------ */
/* Startup packets                                                                            */
/* ------------------------------------------------------------------------------------------ */

/* Build length + code + body (raw bytes, embedded NULs included). Returns the packet length. */
static size_t build_startup(uint8_t *buf, uint32_t code, const char *body, size_t body_len)
{
    size_t len = 8 + body_len;
    pg_put_u32(buf, (uint32_t)len);
    pg_put_u32(buf + 4, code);
    memcpy(buf + 8, body, body_len);
    return len;
}

/* A string literal with embedded NULs; the literal's own final NUL is not part of it. */
#define STARTUP(buf, code, lit) build_startup((buf), (code), (lit), sizeof(lit) - 1)

/* Parse and expect failure with exactly this message (any message if NULL) and SQLSTATE. */
static void expect_parse_error(const uint8_t *pkt, size_t len, const char *msg, const char *state)
{
    pg_startup st;
    const char *err = NULL, *sqlstate = NULL;
    assert_int_equal(pg_startup_parse(pkt, len, &st, &err, &sqlstate), -1);
    assert_non_null(err);
    assert_non_null(sqlstate);
    if (msg)
        assert_string_equal(err, msg);
    assert_string_equal(sqlstate, state);
}

/* Parse and expect success, with no error message. */
static void expect_parse_ok(const uint8_t *pkt, size_t len, pg_startup *st)
{
    const char *err = NULL, *sqlstate = NULL;
    assert_int_equal(pg_startup_parse(pkt, len, st, &err, &sqlstate), 0);
    assert_null(err);
}

/* Build a startup packet (code, then body_len bytes of body) and expect_parse_error() it. */
static void expect_startup_error(uint32_t code, const char *body, size_t body_len, const char *msg,
                                 const char *state)
{
    uint8_t pkt[256];
    assert_true(8 + body_len <= sizeof(pkt));
    expect_parse_error(pkt, build_startup(pkt, code, body, body_len), msg, state);
}

/* The same with the body a string literal (embedded NULs included, its final NUL not). */
#define EXPECT_STARTUP_ERROR(code, lit, msg, state)                                              \
    expect_startup_error((code), (lit), sizeof(lit) - 1, (msg), (state))

static void test_startup_length_short(void **state)
{
    (void)state;
    const uint8_t buf[4] = {0, 0, 0, 20};
    const uint8_t bad[4] = {0xff, 0xff, 0xff, 0xff};
    for (size_t have = 0; have < 4; have++) {
        assert_int_equal(pg_startup_length(buf, have), 0);
        assert_int_equal(pg_startup_length(bad, have), 0); /* not judged before 4 bytes */
    }
    assert_int_equal(pg_startup_length(buf, 4), 20);
    assert_int_equal(pg_startup_length(buf, 100), 20); /* more than the packet: still its length */
}

static void test_startup_length_bounds(void **state)
{
    (void)state;
    static const struct {
        uint32_t len;
        long want;
    } cases[] = {
        {0, -1},     {4, -1},        {7, -1},           {8, 8},           {16, 16},
        {9999, 9999}, {10000, 10000}, {10001, -1},      {65536, -1},      {0x7fffffff, -1},
        {0x80000000u, -1}, /* negative as int32 */ {0xffffffffu, -1},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        uint8_t buf[4];
        pg_put_u32(buf, cases[i].len);
        assert_int_equal(pg_startup_length(buf, 4), cases[i].want);
        assert_int_equal(pg_startup_length(buf, 8), cases[i].want);
    }
}

static void test_startup_message_full(void **state)
{
    (void)state;
    uint8_t pkt[256];
    size_t len = STARTUP(pkt, PG_PROTOCOL_V3,
                         "user\0alice\0database\0sales\0application_name\0psql\0"
                         "client_encoding\0UTF8\0options\0-c geqo=off\0\0");
    assert_int_equal(pg_startup_length(pkt, len), (long)len);

    pg_startup st;
    expect_parse_ok(pkt, len, &st);
    assert_int_equal(st.kind, PG_STARTUP_MESSAGE);
    assert_int_equal(st.code, PG_PROTOCOL_V3);
    assert_string_equal(st.user, "alice");
    assert_string_equal(st.database, "sales");
    assert_string_equal(st.application_name, "psql");
    /* The strings point into the packet, which is not modified. */
    assert_true((const uint8_t *)st.user > pkt && (const uint8_t *)st.user < pkt + len);
    assert_true((const uint8_t *)st.database > pkt && (const uint8_t *)st.database < pkt + len);
    assert_true((const uint8_t *)st.application_name > pkt &&
                (const uint8_t *)st.application_name < pkt + len);
    assert_ptr_equal(st.user, (const char *)pkt + 8 + 5);
    assert_int_equal(pg_get_u32(pkt), len);
    assert_int_equal(pkt[len - 1], 0);
}

static void test_startup_message_order_independent(void **state)
{
    (void)state;
    uint8_t pkt[256];
    size_t len = STARTUP(pkt, PG_PROTOCOL_V3, "database\0db1\0user\0bob\0\0");
    pg_startup st;
    expect_parse_ok(pkt, len, &st);
    assert_string_equal(st.user, "bob");
    assert_string_equal(st.database, "db1");
    assert_null(st.application_name);
}

static void test_startup_database_defaults_to_user(void **state)
{
    (void)state;
    uint8_t pkt[256];
    pg_startup st;

    /* database absent */
    size_t len = STARTUP(pkt, PG_PROTOCOL_V3, "user\0carol\0\0");
    expect_parse_ok(pkt, len, &st);
    assert_string_equal(st.user, "carol");
    assert_ptr_equal(st.database, st.user);
    assert_null(st.application_name);

    /* database present but empty */
    len = STARTUP(pkt, PG_PROTOCOL_V3, "user\0carol\0database\0\0\0");
    expect_parse_ok(pkt, len, &st);
    assert_ptr_equal(st.database, st.user);
}

static void test_startup_missing_user(void **state)
{
    (void)state;
    const char *msg = "no PostgreSQL user name specified in startup packet";

    EXPECT_STARTUP_ERROR(PG_PROTOCOL_V3, "database\0db\0\0", msg, "08P01");

    /* empty user */
    EXPECT_STARTUP_ERROR(PG_PROTOCOL_V3, "user\0\0database\0db\0\0", msg, "08P01");

    EXPECT_STARTUP_ERROR(PG_PROTOCOL_V3, "\0", msg, "08P01"); /* no parameters at all */
}

static void test_startup_unterminated(void **state)
{
    (void)state;
    const char *msg = "startup packet is not terminated";

    /* value runs to the end of the packet */
    EXPECT_STARTUP_ERROR(PG_PROTOCOL_V3, "user\0alice", msg, "08P01");
    /* name runs to the end of the packet */
    EXPECT_STARTUP_ERROR(PG_PROTOCOL_V3, "user\0alice\0datab", msg, "08P01");
    /* protocol 3.2 with nothing after the code: the code's last byte is not a NUL */
    EXPECT_STARTUP_ERROR(0x00030002u, "", msg, "08P01");

    /* The last string ends but the list terminator is missing: rejected too. */
    EXPECT_STARTUP_ERROR(PG_PROTOCOL_V3, "user\0alice\0", NULL, "08P01");
    /* 3.0 with nothing after the code (its last byte happens to be a NUL) */
    EXPECT_STARTUP_ERROR(PG_PROTOCOL_V3, "", NULL, "08P01");
}

static void test_startup_parameter_without_value(void **state)
{
    (void)state;
    EXPECT_STARTUP_ERROR(PG_PROTOCOL_V3, "user\0alice\0database\0",
                         "startup packet has a parameter without a value", "08P01");
}

static void test_startup_trailing_data(void **state)
{
    (void)state;
    const char *msg = "startup packet has data after its terminator";
    EXPECT_STARTUP_ERROR(PG_PROTOCOL_V3, "user\0alice\0\0xyz\0", msg, "08P01");
    EXPECT_STARTUP_ERROR(PG_PROTOCOL_V3, "user\0alice\0\0\0", msg, "08P01");
}

static void test_startup_length_mismatch(void **state)
{
    (void)state;
    uint8_t pkt[256];
    const char *msg = "invalid startup packet length";
    size_t len = STARTUP(pkt, PG_PROTOCOL_V3, "user\0alice\0\0");
    expect_parse_error(pkt, len - 1, msg, "08P01"); /* length field says more */
    pg_put_u32(pkt, (uint32_t)len + 1);
    expect_parse_error(pkt, len, msg, "08P01"); /* length field says more than given */
    pg_put_u32(pkt, 4);
    expect_parse_error(pkt, 4, msg, "08P01"); /* below the minimum */
}

static void test_startup_max_length(void **state)
{
    (void)state;
    static uint8_t pkt[PG_STARTUP_MAX_LEN + 16];
    /* user\0u\0options\0<filler>\0\0 exactly PG_STARTUP_MAX_LEN bytes long */
    size_t off = 8;
    memcpy(pkt + off, "user\0u\0options\0", 15);
    off += 15;
    size_t filler = PG_STARTUP_MAX_LEN - off - 2;
    memset(pkt + off, 'x', filler);
    off += filler;
    pkt[off++] = '\0';
    pkt[off++] = '\0';
    assert_int_equal(off, PG_STARTUP_MAX_LEN);
    pg_put_u32(pkt, (uint32_t)off);
    pg_put_u32(pkt + 4, PG_PROTOCOL_V3);

    pg_startup st;
    assert_int_equal(pg_startup_length(pkt, 4), PG_STARTUP_MAX_LEN);
    expect_parse_ok(pkt, off, &st);
    assert_string_equal(st.user, "u");

    /* one byte more: refused by both */
    memmove(pkt + 24, pkt + 23, off - 23);
    pkt[23] = 'x';
    off++;
    pg_put_u32(pkt, (uint32_t)off);
    assert_int_equal(pg_startup_length(pkt, 4), -1);
    expect_parse_error(pkt, off, "invalid startup packet length", "08P01");
}

static void test_startup_ssl_gssenc(void **state)
{
    (void)state;
    uint8_t pkt[64];
    pg_startup st;

    size_t len = STARTUP(pkt, PG_SSL_REQUEST_CODE, "");
    assert_int_equal(len, 8);
    assert_int_equal(pg_startup_length(pkt, len), 8);
    expect_parse_ok(pkt, len, &st);
    assert_int_equal(st.kind, PG_STARTUP_SSL);
    assert_int_equal(st.code, 80877103u);
    assert_null(st.user);

    len = STARTUP(pkt, PG_GSSENC_REQUEST_CODE, "");
    expect_parse_ok(pkt, len, &st);
    assert_int_equal(st.kind, PG_STARTUP_GSSENC);
    assert_int_equal(st.code, 80877104u);

    const char *msg = "invalid length of SSL or GSS encryption request";
    EXPECT_STARTUP_ERROR(PG_SSL_REQUEST_CODE, "\0\0\0\0", msg, "08P01");
    EXPECT_STARTUP_ERROR(PG_GSSENC_REQUEST_CODE, "\0\0\0\0\0\0\0\0", msg, "08P01");
}

static void test_startup_cancel(void **state)
{
    (void)state;
    uint8_t pkt[64];
    pg_startup st;

    size_t len = STARTUP(pkt, PG_CANCEL_REQUEST_CODE, "\x12\x34\x56\x78\xde\xad\xbe\xef");
    assert_int_equal(len, PG_CANCEL_REQUEST_LEN);
    assert_int_equal(pg_startup_length(pkt, len), 16);
    expect_parse_ok(pkt, len, &st);
    assert_int_equal(st.kind, PG_STARTUP_CANCEL);
    assert_int_equal(st.code, 80877102u);
    assert_int_equal(st.cancel_pid, 0x12345678u);
    assert_int_equal(st.cancel_secret, 0xdeadbeefu); /* above INT32_MAX: kept unsigned */
    assert_null(st.user);

    const char *msg = "invalid length of cancel request";
    EXPECT_STARTUP_ERROR(PG_CANCEL_REQUEST_CODE, "\x12\x34\x56\x78", msg, "08P01");
    EXPECT_STARTUP_ERROR(PG_CANCEL_REQUEST_CODE, "", msg, "08P01");
    EXPECT_STARTUP_ERROR(PG_CANCEL_REQUEST_CODE, "\x12\x34\x56\x78\xde\xad\xbe\xef\0\0\0\0", msg,
                         "08P01");
}

static void test_startup_protocol_versions(void **state)
{
    (void)state;
    uint8_t pkt[64];
    pg_startup st;
    const char *msg = "unsupported frontend protocol: pgrelay speaks protocol 3";

    /* 2.0, 1.0, 4.0, and the unknown 1234.x negotiation codes: 0A000 */
    static const uint32_t bad[] = {0x00020000u, 0x00010000u, 0x00040000u, 0x00000000u,
                                   (1234u << 16) | 5677u, (1234u << 16) | 5681u};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        EXPECT_STARTUP_ERROR(bad[i], "user\0alice\0\0", msg, "0A000");

    /* 3.2 (and any 3.x): accepted, the server negotiates the minor version */
    static const uint32_t good[] = {0x00030000u, 0x00030002u, 0x00030063u};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        size_t len = STARTUP(pkt, good[i], "user\0alice\0\0");
        expect_parse_ok(pkt, len, &st);
        assert_int_equal(st.kind, PG_STARTUP_MESSAGE);
        assert_int_equal(st.code, good[i]);
        assert_int_equal(PG_PROTOCOL_MAJOR(st.code), 3);
        assert_string_equal(st.user, "alice");
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Framing: pg_scan                                                                           */
/* ------------------------------------------------------------------------------------------ */

#define REC_MAX 64

typedef struct rec_msg {
    uint8_t type;
    uint32_t body_len;
    uint32_t captured;
    uint8_t body[64]; /* the captured bytes */
} rec_msg;

typedef struct recorder {
    int n_begin, n_end;
    uint8_t begin_type[REC_MAX];
    uint32_t begin_len[REC_MAX];
    rec_msg end[REC_MAX];
    uint32_t want;             /* begin()'s answer for every message */
    uint8_t rewrite_type;      /* rewrite bodies of this type ... */
    const uint8_t *rewrite;    /* ... with these bytes */
    uint32_t rewrite_len;
} recorder;

static uint32_t rec_begin(void *ctx, pg_scan *scan, uint8_t type, uint32_t body_len)
{
    recorder *r = ctx;
    assert_true(r->n_begin < REC_MAX);
    /* begin() comes before end() of the same message, after end() of the previous one */
    assert_int_equal(r->n_begin, r->n_end);
    assert_false(pg_scan_at_boundary(scan));
    assert_int_equal(scan->type, type);
    assert_int_equal(scan->body_len, body_len);
    assert_null(scan->rewrite); /* reset for every message */
    r->begin_type[r->n_begin] = type;
    r->begin_len[r->n_begin] = body_len;
    r->n_begin++;
    if (r->rewrite && type == r->rewrite_type) {
        scan->rewrite = r->rewrite;
        scan->rewrite_len = r->rewrite_len;
    }
    return r->want;
}

static void rec_end(void *ctx, uint8_t type, const uint8_t *body, uint32_t captured,
                    uint32_t body_len)
{
    recorder *r = ctx;
    assert_true(r->n_end < REC_MAX);
    assert_int_equal(r->n_end + 1, r->n_begin);
    assert_int_equal(r->begin_type[r->n_end], type);
    assert_int_equal(r->begin_len[r->n_end], body_len);
    rec_msg *m = &r->end[r->n_end++];
    m->type = type;
    m->body_len = body_len;
    m->captured = captured;
    assert_true(captured <= sizeof(m->body));
    if (captured)
        memcpy(m->body, body, captured);
}

static const pg_scan_ops rec_ops = {rec_begin, rec_end};

/* Append one message; returns the new length. */
static size_t put_msg(uint8_t *buf, size_t off, uint8_t type, const void *body, uint32_t len)
{
    buf[off] = type;
    pg_put_u32(buf + off + 1, len + 4);
    if (len)
        memcpy(buf + off + 5, body, len);
    return off + 5 + len;
}

#define PUT(buf, off, type, lit) put_msg((buf), (off), (type), (lit), sizeof(lit) - 1)

typedef struct stream {
    uint8_t data[512];
    size_t len;
    int n;                 /* messages */
    size_t ends[REC_MAX];  /* offset just past each message */
    uint8_t types[REC_MAX];
    uint32_t lens[REC_MAX];
} stream;

static void stream_add(stream *s, uint8_t type, const void *body, uint32_t len)
{
    s->len = put_msg(s->data, s->len, type, body, len);
    s->types[s->n] = type;
    s->lens[s->n] = len;
    s->ends[s->n++] = s->len;
}

#define ADD(s, type, lit) stream_add((s), (type), (lit), sizeof(lit) - 1)

/* A mixed stream: several messages, zero-length bodies in the middle and at the end. */
static void make_stream(stream *s)
{
    memset(s, 0, sizeof(*s));
    ADD(s, 'Q', "SELECT 1\0");
    ADD(s, 'P', "\0SELECT $1\0\0\0");
    ADD(s, 'B', "\0\0\0\0\0\0\0\0\0\0");
    ADD(s, 'E', "\0\0\0\0\0");
    ADD(s, 'S', "");
    ADD(s, 'K', "\x00\x00\x30\x39\x7f\xff\xff\xff");
    ADD(s, 'Z', "I");
    ADD(s, 'H', "");
    ADD(s, 'd', "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz");
    ADD(s, 'X', "");
}

static void check_stream(const stream *s, const recorder *r, const pg_scan *scan)
{
    assert_int_equal(r->n_begin, s->n);
    assert_int_equal(r->n_end, s->n);
    assert_int_equal(scan->messages, (uint64_t)s->n);
    assert_true(pg_scan_at_boundary(scan));
    for (int i = 0; i < s->n; i++) {
        assert_int_equal(r->end[i].type, s->types[i]);
        assert_int_equal(r->end[i].body_len, s->lens[i]);
    }
}

static void test_scan_whole(void **state)
{
    (void)state;
    stream s;
    make_stream(&s);
    recorder r = {0};
    pg_scan scan;
    pg_scan_init(&scan, NULL, 0);
    assert_true(pg_scan_at_boundary(&scan));
    assert_int_equal(scan.messages, 0);
    assert_int_equal(pg_scan_feed(&scan, s.data, s.len, &rec_ops, &r), 0);
    check_stream(&s, &r, &scan);
    for (int i = 0; i < s.n; i++)
        assert_int_equal(r.end[i].captured, 0);

    /* The scanner goes on with the next stream as if it were one. */
    assert_int_equal(pg_scan_feed(&scan, s.data, s.len, &rec_ops, &r), 0);
    assert_int_equal(r.n_end, 2 * s.n);
    assert_int_equal(scan.messages, (uint64_t)(2 * s.n));
}

static void test_scan_empty_feed(void **state)
{
    (void)state;
    recorder r = {0};
    pg_scan scan;
    uint8_t byte = 'Q';
    pg_scan_init(&scan, NULL, 0);
    assert_int_equal(pg_scan_feed(&scan, &byte, 0, &rec_ops, &r), 0);
    assert_true(pg_scan_at_boundary(&scan));
    assert_int_equal(r.n_begin, 0);
}

static void test_scan_byte_at_a_time(void **state)
{
    (void)state;
    stream s;
    make_stream(&s);
    recorder r = {0};
    pg_scan scan;
    pg_scan_init(&scan, NULL, 0);
    int done = 0;
    for (size_t i = 0; i < s.len; i++) {
        assert_int_equal(pg_scan_feed(&scan, s.data + i, 1, &rec_ops, &r), 0);
        while (done < s.n && s.ends[done] <= i + 1)
            done++;
        /* exactly the messages that ended by this byte are complete */
        assert_int_equal(r.n_end, done);
        assert_int_equal(scan.messages, (uint64_t)done);
        bool boundary = done > 0 && s.ends[done - 1] == i + 1;
        assert_int_equal(pg_scan_at_boundary(&scan), boundary);
    }
    check_stream(&s, &r, &scan);
}

/* Two feeds split at every offset of the stream (every header position included). */
static void test_scan_split_everywhere(void **state)
{
    (void)state;
    stream s;
    make_stream(&s);
    for (size_t k = 0; k <= s.len; k++) {
        recorder r = {0};
        pg_scan scan;
        pg_scan_init(&scan, NULL, 0);
        assert_int_equal(pg_scan_feed(&scan, s.data, k, &rec_ops, &r), 0);
        int done = 0;
        while (done < s.n && s.ends[done] <= k)
            done++;
        assert_int_equal(r.n_end, done);
        assert_int_equal(pg_scan_at_boundary(&scan), done == 0 ? k == 0 : s.ends[done - 1] == k);
        assert_int_equal(pg_scan_feed(&scan, s.data + k, s.len - k, &rec_ops, &r), 0);
        check_stream(&s, &r, &scan);
    }
}

/* A header split in two at each of its four inner points: begin() waits for all 5 bytes. */
static void test_scan_header_split(void **state)
{
    (void)state;
    uint8_t buf[64];
    size_t len = PUT(buf, 0, 'Q', "SELECT 1\0");
    for (size_t k = 1; k < PG_MSG_HEADER_LEN; k++) {
        recorder r = {0};
        pg_scan scan;
        pg_scan_init(&scan, NULL, 0);
        assert_int_equal(pg_scan_feed(&scan, buf, k, &rec_ops, &r), 0);
        assert_int_equal(r.n_begin, 0);
        assert_int_equal(scan.hdr_have, k);
        assert_false(pg_scan_at_boundary(&scan));
        /* rest of the header only */
        assert_int_equal(pg_scan_feed(&scan, buf + k, PG_MSG_HEADER_LEN - k, &rec_ops, &r), 0);
        assert_int_equal(r.n_begin, 1);
        assert_int_equal(r.begin_type[0], 'Q');
        assert_int_equal(r.begin_len[0], 9);
        assert_int_equal(r.n_end, 0);
        assert_false(pg_scan_at_boundary(&scan));
        assert_int_equal(pg_scan_feed(&scan, buf + 5, len - 5, &rec_ops, &r), 0);
        assert_int_equal(r.n_end, 1);
        assert_true(pg_scan_at_boundary(&scan));
    }
}

static void test_scan_zero_length_body(void **state)
{
    (void)state;
    uint8_t buf[64];
    recorder r = {0};
    pg_scan scan;

    /* Sync alone, exactly 5 bytes: complete at once */
    size_t len = PUT(buf, 0, 'S', "");
    assert_int_equal(len, 5);
    assert_memory_equal(buf, "S\0\0\0\4", 5);
    pg_scan_init(&scan, NULL, 0);
    assert_int_equal(pg_scan_feed(&scan, buf, len, &rec_ops, &r), 0);
    assert_int_equal(r.n_begin, 1);
    assert_int_equal(r.n_end, 1);
    assert_int_equal(r.end[0].type, 'S');
    assert_int_equal(r.end[0].body_len, 0);
    assert_true(pg_scan_at_boundary(&scan));
    assert_int_equal(scan.messages, 1);

    /* Sync as the last thing in a buffer after another message */
    memset(&r, 0, sizeof(r));
    len = PUT(buf, 0, 'E', "\0\0\0\0\0");
    len = PUT(buf, len, 'S', "");
    pg_scan_init(&scan, NULL, 0);
    assert_int_equal(pg_scan_feed(&scan, buf, len, &rec_ops, &r), 0);
    assert_int_equal(r.n_end, 2);
    assert_int_equal(r.end[1].type, 'S');
    assert_true(pg_scan_at_boundary(&scan));

    /* Sync header arriving byte by byte: completes on its 5th byte */
    memset(&r, 0, sizeof(r));
    len = PUT(buf, 0, 'S', "");
    pg_scan_init(&scan, NULL, 0);
    for (size_t i = 0; i < len; i++) {
        assert_int_equal(pg_scan_feed(&scan, buf + i, 1, &rec_ops, &r), 0);
        assert_int_equal(r.n_end, i == 4 ? 1 : 0);
    }
    assert_true(pg_scan_at_boundary(&scan));

    /* A run of zero-length messages */
    memset(&r, 0, sizeof(r));
    len = 0;
    for (int i = 0; i < 10; i++)
        len = PUT(buf, len, (uint8_t)(i % 2 ? 'H' : 'S'), "");
    pg_scan_init(&scan, NULL, 0);
    assert_int_equal(pg_scan_feed(&scan, buf, len, &rec_ops, &r), 0);
    assert_int_equal(r.n_end, 10);
    assert_int_equal(scan.messages, 10);
}

/* Feed one header with this length field; returns pg_scan_feed's result. */
static int feed_len(uint32_t lenfield, bool bytewise, recorder *r)
{
    uint8_t buf[PG_MSG_HEADER_LEN];
    pg_scan scan;
    buf[0] = 'Q';
    pg_put_u32(buf + 1, lenfield);
    pg_scan_init(&scan, NULL, 0);
    if (!bytewise)
        return pg_scan_feed(&scan, buf, sizeof(buf), &rec_ops, r);
    for (size_t i = 0; i < sizeof(buf); i++) {
        int rc = pg_scan_feed(&scan, buf + i, 1, &rec_ops, r);
        if (rc != 0) {
            assert_int_equal(i, PG_MSG_HEADER_LEN - 1); /* judged on the last header byte */
            return rc;
        }
    }
    return 0;
}

static void test_scan_bad_length(void **state)
{
    (void)state;
    static const uint32_t bad[] = {0, 1, 3, PG_MSG_MAX_LEN + 1, 0x7fffffffu, 0x80000000u,
                                   0xfffffffcu, 0xffffffffu};
    for (int bytewise = 0; bytewise < 2; bytewise++) {
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
            recorder r = {0};
            assert_int_equal(feed_len(bad[i], bytewise, &r), -1);
            assert_int_equal(r.n_begin, 0); /* begin() never sees an impossible length */
            assert_int_equal(r.n_end, 0);
        }
        /* the extremes that are fine */
        recorder r = {0};
        assert_int_equal(feed_len(4, bytewise, &r), 0);
        assert_int_equal(r.n_end, 1);
        memset(&r, 0, sizeof(r));
        assert_int_equal(feed_len(PG_MSG_MAX_LEN, bytewise, &r), 0);
        assert_int_equal(r.n_begin, 1);
        assert_int_equal(r.begin_len[0], PG_MSG_MAX_LEN - 4);
        assert_int_equal(r.n_end, 0);
    }

    /* A bad header after good messages in the same buffer */
    uint8_t buf[64];
    recorder r = {0};
    pg_scan scan;
    size_t len = PUT(buf, 0, 'Q', "x\0");
    buf[len] = 'Q';
    pg_put_u32(buf + len + 1, 2);
    len += 5;
    pg_scan_init(&scan, NULL, 0);
    assert_int_equal(pg_scan_feed(&scan, buf, len, &rec_ops, &r), -1);
    assert_int_equal(r.n_end, 1);
}

static void test_scan_truncated(void **state)
{
    (void)state;
    uint8_t buf[64];
    recorder r = {0};
    pg_scan scan;
    size_t len = PUT(buf, 0, 'Q', "SELECT 42\0");
    pg_scan_init(&scan, NULL, 0);

    /* header and part of the body */
    assert_int_equal(pg_scan_feed(&scan, buf, 8, &rec_ops, &r), 0);
    assert_false(pg_scan_at_boundary(&scan));
    assert_int_equal(r.n_begin, 1);
    assert_int_equal(r.n_end, 0);
    assert_int_equal(scan.body_seen, 3);
    assert_int_equal(scan.messages, 0);

    /* more of the body, still short */
    assert_int_equal(pg_scan_feed(&scan, buf + 8, 4, &rec_ops, &r), 0);
    assert_false(pg_scan_at_boundary(&scan));
    assert_int_equal(r.n_end, 0);

    /* the rest and the start of the next message */
    size_t len2 = PUT(buf, len, 'Q', "SELECT 43\0");
    assert_int_equal(pg_scan_feed(&scan, buf + 12, len + 2 - 12, &rec_ops, &r), 0);
    assert_int_equal(r.n_end, 1);
    assert_int_equal(r.end[0].body_len, 10);
    assert_false(pg_scan_at_boundary(&scan)); /* two header bytes of the next one pending */
    assert_int_equal(scan.hdr_have, 2);
    assert_int_equal(pg_scan_feed(&scan, buf + len + 2, len2 - len - 2, &rec_ops, &r), 0);
    assert_int_equal(r.n_end, 2);
    assert_true(pg_scan_at_boundary(&scan));
}

static void test_scan_capture(void **state)
{
    (void)state;
    uint8_t buf[128];
    uint8_t cap[16];
    pg_scan scan;
    size_t len = PUT(buf, 0, 'K', "\x00\x00\x30\x39\xde\xad\xbe\xef");
    len = PUT(buf, len, 'Z', "T");
    len = PUT(buf, len, 'S', "");
    len = PUT(buf, len, 'D', "0123456789abcdefghijklmnopqrstuvwxyz");

    /* begin() asks for 4: the first 4 bytes of each body (fewer when the body is shorter) */
    recorder r = {.want = 4};
    pg_scan_init(&scan, cap, sizeof(cap));
    assert_int_equal(pg_scan_feed(&scan, buf, len, &rec_ops, &r), 0);
    assert_int_equal(r.n_end, 4);
    assert_int_equal(r.end[0].captured, 4);
    assert_memory_equal(r.end[0].body, "\x00\x00\x30\x39", 4);
    assert_int_equal(r.end[1].captured, 1);
    assert_int_equal(r.end[1].body[0], 'T');
    assert_int_equal(r.end[2].captured, 0);
    assert_int_equal(r.end[3].captured, 4);
    assert_memory_equal(r.end[3].body, "0123", 4);

    /* More than the body: the whole body. More than the capture buffer: clamped to it. */
    memset(&r, 0, sizeof(r));
    r.want = 1000;
    pg_scan_init(&scan, cap, sizeof(cap));
    assert_int_equal(pg_scan_feed(&scan, buf, len, &rec_ops, &r), 0);
    assert_int_equal(r.end[0].captured, 8);
    assert_memory_equal(r.end[0].body, "\x00\x00\x30\x39\xde\xad\xbe\xef", 8);
    assert_int_equal(r.end[3].captured, sizeof(cap));
    assert_memory_equal(r.end[3].body, "0123456789abcdef", sizeof(cap));

    /* No capture buffer: nothing is captured whatever begin() says */
    memset(&r, 0, sizeof(r));
    r.want = 8;
    pg_scan_init(&scan, NULL, 100);
    assert_int_equal(scan.capture_cap, 0);
    assert_int_equal(pg_scan_feed(&scan, buf, len, &rec_ops, &r), 0);
    for (int i = 0; i < 4; i++)
        assert_int_equal(r.end[i].captured, 0);

    /* Capture across feeds split at every point gives the same bytes */
    for (size_t k = 0; k <= len; k++) {
        memset(&r, 0, sizeof(r));
        r.want = 8;
        pg_scan_init(&scan, cap, sizeof(cap));
        assert_int_equal(pg_scan_feed(&scan, buf, k, &rec_ops, &r), 0);
        assert_int_equal(pg_scan_feed(&scan, buf + k, len - k, &rec_ops, &r), 0);
        assert_int_equal(r.n_end, 4);
        assert_int_equal(r.end[0].captured, 8);
        assert_memory_equal(r.end[0].body, "\x00\x00\x30\x39\xde\xad\xbe\xef", 8);
        assert_int_equal(r.end[3].captured, 8);
        assert_memory_equal(r.end[3].body, "01234567", 8);
    }

    /* and one byte at a time */
    memset(&r, 0, sizeof(r));
    r.want = 8;
    pg_scan_init(&scan, cap, sizeof(cap));
    for (size_t i = 0; i < len; i++)
        assert_int_equal(pg_scan_feed(&scan, buf + i, 1, &rec_ops, &r), 0);
    assert_int_equal(r.end[0].captured, 8);
    assert_memory_equal(r.end[0].body, "\x00\x00\x30\x39\xde\xad\xbe\xef", 8);
    assert_memory_equal(r.end[3].body, "01234567", 8);
}

/* Without callbacks the scanner still frames. */
static void test_scan_null_ops(void **state)
{
    (void)state;
    stream s;
    make_stream(&s);
    static const pg_scan_ops none = {NULL, NULL};
    pg_scan scan;
    uint8_t cap[8];
    pg_scan_init(&scan, cap, sizeof(cap));
    assert_int_equal(pg_scan_feed(&scan, s.data, s.len, &none, NULL), 0);
    assert_int_equal(scan.messages, (uint64_t)s.n);
    assert_true(pg_scan_at_boundary(&scan));
}

static void build_rewrite_stream(uint8_t *buf, size_t *len)
{
    size_t n = PUT(buf, 0, 'R', "\0\0\0\0");
    n = PUT(buf, n, 'S', "server_version\00015.4\0");
    n = PUT(buf, n, 'K', "\x00\x00\x30\x39\xde\xad\xbe\xef");
    n = PUT(buf, n, 'Z', "I");
    n = PUT(buf, n, 'K', "\x00\x00\x30\x39\xde\xad\xbe\xef"); /* a second one, also rewritten */
    *len = n;
}

static void test_scan_rewrite(void **state)
{
    (void)state;
    static const uint8_t fake[8] = {0x00, 0x01, 0x00, 0x02, 0x11, 0x22, 0x33, 0x44};
    uint8_t orig[128], buf[128], want[128];
    uint8_t cap[16];
    size_t len;
    build_rewrite_stream(orig, &len);

    /* The expected output: both K bodies replaced, everything else as is. */
    memcpy(want, orig, len);
    size_t k1 = 5 + 4 + 5 + 20 + 5; /* body of the first K */
    size_t k2 = k1 + 8 + 5 + 1 + 5;
    assert_int_equal(want[k1 - 5], 'K');
    assert_int_equal(want[k2 - 5], 'K');
    memcpy(want + k1, fake, 8);
    memcpy(want + k2, fake, 8);

    /* whole, then split at every point, then byte by byte */
    for (size_t k = 0; k <= len + 1; k++) {
        recorder r = {.want = 8, .rewrite_type = 'K', .rewrite = fake, .rewrite_len = 8};
        pg_scan scan;
        memcpy(buf, orig, len);
        pg_scan_init(&scan, cap, sizeof(cap));
        if (k <= len) {
            assert_int_equal(pg_scan_feed(&scan, buf, k, &rec_ops, &r), 0);
            assert_int_equal(pg_scan_feed(&scan, buf + k, len - k, &rec_ops, &r), 0);
        } else {
            for (size_t i = 0; i < len; i++)
                assert_int_equal(pg_scan_feed(&scan, buf + i, 1, &rec_ops, &r), 0);
        }
        assert_memory_equal(buf, want, len);
        assert_int_equal(r.n_end, 5);
        /* capture sees the original key (captured before the rewrite) */
        assert_int_equal(r.end[2].type, 'K');
        assert_int_equal(r.end[2].captured, 8);
        assert_memory_equal(r.end[2].body, "\x00\x00\x30\x39\xde\xad\xbe\xef", 8);
        assert_int_equal(r.end[4].captured, 8);
        assert_memory_equal(r.end[4].body, "\x00\x00\x30\x39\xde\xad\xbe\xef", 8);
        assert_true(pg_scan_at_boundary(&scan));
    }

    /* rewrite_len shorter than the body: only that many leading bytes change */
    for (size_t k = 0; k <= len; k++) {
        recorder r = {.rewrite_type = 'K', .rewrite = fake, .rewrite_len = 4};
        pg_scan scan;
        memcpy(buf, orig, len);
        memcpy(want, orig, len);
        memcpy(want + k1, fake, 4);
        memcpy(want + k2, fake, 4);
        pg_scan_init(&scan, NULL, 0);
        assert_int_equal(pg_scan_feed(&scan, buf, k, &rec_ops, &r), 0);
        assert_int_equal(pg_scan_feed(&scan, buf + k, len - k, &rec_ops, &r), 0);
        assert_memory_equal(buf, want, len);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* ErrorResponse                                                                              */
/* ------------------------------------------------------------------------------------------ */

static void test_error_build(void **state)
{
    (void)state;
    static const char want[] = "E\0\0\0\x24"
                               "SFATAL\0"
                               "VFATAL\0"
                               "C53300\0"
                               "Mtoo many\0"
                               "\0";
    const size_t want_len = sizeof(want) - 1;
    assert_int_equal(want_len, 37);

    uint8_t buf[256];
    memset(buf, 0xaa, sizeof(buf));
    size_t n = pg_error_build(buf, sizeof(buf), "FATAL", PG_SQLSTATE_TOO_MANY_CONNECTIONS,
                              "too many");
    assert_int_equal(n, want_len);
    assert_memory_equal(buf, want, want_len);
    assert_int_equal(buf[n], 0xaa); /* nothing written past it */
    assert_int_equal(pg_get_u32(buf + 1), n - 1);

    /* It frames as exactly one 'E' message. */
    recorder r = {.want = 6};
    uint8_t cap[16];
    pg_scan scan;
    pg_scan_init(&scan, cap, sizeof(cap));
    assert_int_equal(pg_scan_feed(&scan, buf, n, &rec_ops, &r), 0);
    assert_int_equal(r.n_end, 1);
    assert_int_equal(r.end[0].type, 'E');
    assert_int_equal(r.end[0].body_len, n - 5);
    assert_memory_equal(r.end[0].body, "SFATAL", 6);
    assert_true(pg_scan_at_boundary(&scan));

    /* ERROR severity, another code */
    n = pg_error_build(buf, sizeof(buf), "ERROR", PG_SQLSTATE_PROTOCOL_VIOLATION, "bad");
    static const char want2[] = "E\0\0\0\x1f"
                                "SERROR\0"
                                "VERROR\0"
                                "C08P01\0"
                                "Mbad\0"
                                "\0";
    assert_int_equal(n, sizeof(want2) - 1);
    assert_memory_equal(buf, want2, n);
}

static void test_error_build_too_small(void **state)
{
    (void)state;
    uint8_t buf[64];
    const size_t need = 37;
    assert_int_equal(pg_error_build(buf, need, "FATAL", "53300", "too many"), need);
    for (size_t cap = 0; cap < need; cap++) {
        memset(buf, 0, sizeof(buf));
        assert_int_equal(pg_error_build(buf, cap, "FATAL", "53300", "too many"), 0);
        for (size_t i = cap; i < sizeof(buf); i++)
            assert_int_equal(buf[i], 0); /* never writes at or past cap */
    }
}

static void test_error_build_long_message(void **state)
{
    (void)state;
    static char msg[5000];
    static uint8_t buf[6000];
    memset(msg, 'm', sizeof(msg) - 1);
    msg[sizeof(msg) - 1] = '\0';
    size_t n = pg_error_build(buf, sizeof(buf), "ERROR", "08006", msg);
    /* 5 header + S,V,C (7 each) + M + 4999 + NUL + final NUL */
    assert_int_equal(n, 5 + 21 + 1 + 4999 + 1 + 1);
    assert_int_equal(pg_get_u32(buf + 1), n - 1);
    assert_int_equal(buf[n - 1], 0);
    assert_int_equal(buf[n - 2], 0);
    assert_int_equal(pg_error_build(buf, 100, "ERROR", "08006", msg), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_startup_length_short),
        cmocka_unit_test(test_startup_length_bounds),
        cmocka_unit_test(test_startup_message_full),
        cmocka_unit_test(test_startup_message_order_independent),
        cmocka_unit_test(test_startup_database_defaults_to_user),
        cmocka_unit_test(test_startup_missing_user),
        cmocka_unit_test(test_startup_unterminated),
        cmocka_unit_test(test_startup_parameter_without_value),
        cmocka_unit_test(test_startup_trailing_data),
        cmocka_unit_test(test_startup_length_mismatch),
        cmocka_unit_test(test_startup_max_length),
        cmocka_unit_test(test_startup_ssl_gssenc),
        cmocka_unit_test(test_startup_cancel),
        cmocka_unit_test(test_startup_protocol_versions),
        cmocka_unit_test(test_scan_whole),
        cmocka_unit_test(test_scan_empty_feed),
        cmocka_unit_test(test_scan_byte_at_a_time),
        cmocka_unit_test(test_scan_split_everywhere),
        cmocka_unit_test(test_scan_header_split),
        cmocka_unit_test(test_scan_zero_length_body),
        cmocka_unit_test(test_scan_bad_length),
        cmocka_unit_test(test_scan_truncated),
        cmocka_unit_test(test_scan_capture),
        cmocka_unit_test(test_scan_null_ops),
        cmocka_unit_test(test_scan_rewrite),
        cmocka_unit_test(test_error_build),
        cmocka_unit_test(test_error_build_too_small),
        cmocka_unit_test(test_error_build_long_message),
    };
    return cmocka_run_group_tests_name("pgproto", tests, NULL, NULL);
}
