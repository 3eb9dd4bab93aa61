/* fuzz_scan.c - libFuzzer target: the framing scanner (pg_scan_feed) in both directions, fed in
 * arbitrary pieces.
 *
 * Input: byte 0 picks the direction (bit 0: 0 client->server, 1 server->client) and how many
 * split sizes follow (bits 1-4); each of those bytes is the size of one piece (0 means 1), used
 * in turn over the rest of the input, the message stream. The stream is fed once whole and once
 * in those pieces; both runs must agree with a plain reference reading of the framing: the same
 * messages (type, length, captured bytes), the same rewritten bytes, the same verdict on an
 * impossible length, and the scanner at a message boundary exactly when the stream ends on one.
 */
#include "pgproto.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_CAPTURE_CAP 1023 /* as the relay's statement capture (SHM_STMT_MAX - 1) */
#define FUZZ_MAX_EVENTS  4096

/* One end() call. */
typedef struct scan_event {
    uint8_t type;
    uint32_t body_len;
    uint32_t captured;
    uint32_t hash; /* FNV-1a of the captured bytes */
} scan_event;

typedef struct scan_run {
    bool server; /* server->client ops (ReadyForQuery, BackendKeyData rewrite) */
    scan_event events[FUZZ_MAX_EVENTS];
    size_t n_events;
    bool overflow; /* more events than kept (compared by count only) */
} scan_run;

static const uint8_t fuzz_key[8] = {'p', 'g', 'r', 'e', 'l', 'a', 'y', '!'};

static uint32_t fnv1a(const uint8_t *p, uint32_t n)
{
    uint32_t h = 2166136261u;
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

/* How many leading body bytes each direction's ops ask for (as relay.c's do, plus a request
 * larger than the body or the buffer for a few other types, which the scanner must clamp). */
static uint32_t want_of(bool server, uint8_t type, uint32_t body_len)
{
    if (server) {
        if (type == PG_MSG_READY_FOR_QUERY)
            return 1;
        if (type == PG_MSG_BACKEND_KEY_DATA)
            return body_len == sizeof(fuzz_key) ? sizeof(fuzz_key) : 0;
        if (type == 'T')
            return 0xffffffffu;
        return 0;
    }
    if (type == PG_MSG_QUERY || type == PG_MSG_PARSE)
        return FUZZ_CAPTURE_CAP;
    if (type == PG_MSG_BIND)
        return body_len + 10;
    return 0;
}

static uint32_t on_begin(void *ctx, pg_scan *scan, uint8_t type, uint32_t body_len)
{
    scan_run *run = ctx;
    if (run->server && type == PG_MSG_BACKEND_KEY_DATA && body_len == sizeof(fuzz_key)) {
        scan->rewrite = fuzz_key;
        scan->rewrite_len = sizeof(fuzz_key);
    }
    return want_of(run->server, type, body_len);
}

static void on_end(void *ctx, uint8_t type, const uint8_t *body, uint32_t captured,
                   uint32_t body_len)
{
    scan_run *run = ctx;
    if (captured > FUZZ_CAPTURE_CAP || captured > body_len || (captured && !body))
        abort();
    if (run->n_events == FUZZ_MAX_EVENTS) {
        run->overflow = true;
        return;
    }
    scan_event *e = &run->events[run->n_events++];
    e->type = type;
    e->body_len = body_len;
    e->captured = captured;
    e->hash = fnv1a(body, captured);
}

static const pg_scan_ops ops = {on_begin, on_end};

/* The reference: walk the stream message by message. Returns -1 on an impossible length,
 * else 0 with *at_boundary telling whether the stream ends between messages. The rewrite is
 * applied to buf. */
static int reference(bool server, uint8_t *buf, size_t n, scan_run *run, bool *at_boundary)
{
    size_t i = 0;
    while (n - i >= PG_MSG_HEADER_LEN) {
        uint32_t len = pg_get_u32(buf + i + 1);
        if (len < 4 || len > PG_MSG_MAX_LEN)
            return -1;
        uint8_t type = buf[i];
        uint32_t body_len = len - 4;
        size_t body = i + PG_MSG_HEADER_LEN;
        size_t have = n - body < body_len ? n - body : body_len;
        uint32_t want = want_of(server, type, body_len);
        if (want > FUZZ_CAPTURE_CAP)
            want = FUZZ_CAPTURE_CAP;
        if (want > body_len)
            want = body_len;
        /* end() sees the bytes as they came (the node's own cancel key), the next hop the
         * rewritten ones */
        if (have == body_len)
            on_end(run, type, buf + body, want, body_len);
        if (server && type == PG_MSG_BACKEND_KEY_DATA && body_len == sizeof(fuzz_key))
            memcpy(buf + body, fuzz_key, have < sizeof(fuzz_key) ? have : sizeof(fuzz_key));
        if (have < body_len) {
            *at_boundary = false;
            return 0;
        }
        i = body + body_len;
    }
    *at_boundary = i == n;
    return 0;
}

static bool same_events(const scan_run *a, const scan_run *b)
{
    if (a->n_events != b->n_events || a->overflow != b->overflow)
        return false;
    return memcmp(a->events, b->events, a->n_events * sizeof(a->events[0])) == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    bool server = data[0] & 1;
    size_t n_splits = (data[0] >> 1) & 0x0f;
    if (size < 1 + n_splits)
        return 0;
    const uint8_t *splits = data + 1;
    const uint8_t *stream = data + 1 + n_splits;
    size_t n = size - 1 - n_splits;

    static scan_run whole, pieces, ref;
    uint8_t capture_whole[FUZZ_CAPTURE_CAP], capture_pieces[FUZZ_CAPTURE_CAP];
    uint8_t *buf_whole = malloc(n + 1), *buf_pieces = malloc(n + 1), *buf_ref = malloc(n + 1);
    if (!buf_whole || !buf_pieces || !buf_ref)
        goto done;
    memcpy(buf_whole, stream, n);
    memcpy(buf_pieces, stream, n);
    memcpy(buf_ref, stream, n);
    memset(&whole, 0, sizeof(whole));
    memset(&pieces, 0, sizeof(pieces));
    memset(&ref, 0, sizeof(ref));
    whole.server = pieces.server = ref.server = server;

    /* Whole. */
    pg_scan s;
    pg_scan_init(&s, capture_whole, sizeof(capture_whole));
    int rc_whole = pg_scan_feed(&s, buf_whole, n, &ops, &whole);
    bool boundary_whole = pg_scan_at_boundary(&s);

    /* In pieces, each in a buffer of its own exact size (so ASan sees any overrun). */
    pg_scan_init(&s, capture_pieces, sizeof(capture_pieces));
    int rc_pieces = 0;
    size_t off = 0;
    for (size_t k = 0; off < n; k++) {
        size_t len = n_splits ? (splits[k % n_splits] ? splits[k % n_splits] : 1) : n;
        if (len > n - off)
            len = n - off;
        uint8_t *piece = malloc(len);
        if (!piece)
            goto done;
        memcpy(piece, buf_pieces + off, len);
        rc_pieces = pg_scan_feed(&s, piece, len, &ops, &pieces);
        memcpy(buf_pieces + off, piece, len);
        free(piece);
        off += len;
        if (rc_pieces != 0)
            break;
    }
    bool boundary_pieces = pg_scan_at_boundary(&s);

    /* The reference reading. */
    bool boundary_ref = false;
    int rc_ref = reference(server, buf_ref, n, &ref, &boundary_ref);

    if (rc_whole != rc_ref || rc_pieces != rc_ref)
        abort(); /* a different verdict on the stream */
    if (!same_events(&whole, &ref) || !same_events(&pieces, &ref))
        abort(); /* different messages seen */
    if (rc_ref == 0) {
        if (boundary_whole != boundary_ref || boundary_pieces != boundary_ref)
            abort();
        if (memcmp(buf_whole, buf_ref, n) != 0 || memcmp(buf_pieces, buf_ref, n) != 0)
            abort(); /* the cancel key rewritten differently */
    }
done:
    free(buf_whole);
    free(buf_pieces);
    free(buf_ref);
    return 0;
}
