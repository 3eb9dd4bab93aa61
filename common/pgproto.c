/* pgproto.c - parsing of startup packets and incremental framing of v3 message streams. */
#include "pgproto.h"

#include <string.h>

long pg_startup_length(const uint8_t *buf, size_t have)
{
    if (have < 4)
        return 0;
    uint32_t len = pg_get_u32(buf);
    if (len < PG_STARTUP_MIN_LEN || len > PG_STARTUP_MAX_LEN)
        return -1;
    return (long)len;
}

int pg_startup_parse(const uint8_t *pkt, size_t len, pg_startup *out, const char **err,
                     const char **sqlstate)
{
    memset(out, 0, sizeof(*out));
    *sqlstate = PG_SQLSTATE_PROTOCOL_VIOLATION;
    if (len < PG_STARTUP_MIN_LEN || len > PG_STARTUP_MAX_LEN || pg_get_u32(pkt) != len) {
        *err = "invalid startup packet length";
        return -1;
    }
    out->code = pg_get_u32(pkt + 4);
    switch (out->code) {
    case PG_SSL_REQUEST_CODE:
    case PG_GSSENC_REQUEST_CODE:
        if (len != PG_STARTUP_MIN_LEN) {
            *err = "invalid length of SSL or GSS encryption request";
            return -1;
        }
        out->kind = out->code == PG_SSL_REQUEST_CODE ? PG_STARTUP_SSL : PG_STARTUP_GSSENC;
        return 0;
    case PG_CANCEL_REQUEST_CODE:
        if (len != PG_CANCEL_REQUEST_LEN) {
            *err = "invalid length of cancel request";
            return -1;
        }
        out->kind = PG_STARTUP_CANCEL;
        out->cancel_pid = pg_get_u32(pkt + 8);
        out->cancel_secret = pg_get_u32(pkt + 12);
        return 0;
    }
    if (PG_PROTOCOL_MAJOR(out->code) != 3) {
        *err = "unsupported frontend protocol: pgrelay speaks protocol 3";
        *sqlstate = PG_SQLSTATE_FEATURE_NOT_SUPPORTED;
        return -1;
    }
    out->kind = PG_STARTUP_MESSAGE;

    /* Parameters: name\0value\0 ... \0. Every string must end inside the packet. */
    const char *p = (const char *)pkt + 8;
    const char *end = (const char *)pkt + len;
    if (end[-1] != '\0') {
        *err = "startup packet is not terminated";
        return -1;
    }
    while (p < end && *p != '\0') {
        const char *name = p;
        const char *nul = memchr(p, '\0', (size_t)(end - p));
        if (!nul || nul + 1 >= end) {
            *err = "startup packet has a parameter without a value";
            return -1;
        }
        const char *value = nul + 1;
        nul = memchr(value, '\0', (size_t)(end - value));
        if (!nul) {
            *err = "startup packet has an unterminated value";
            return -1;
        }
        if (strcmp(name, "user") == 0)
            out->user = value;
        else if (strcmp(name, "database") == 0)
            out->database = value;
        else if (strcmp(name, "application_name") == 0)
            out->application_name = value;
        p = nul + 1;
    }
    if (p != end - 1) {
        *err = "startup packet has data after its terminator";
        return -1;
    }
    if (!out->user || out->user[0] == '\0') {
        *err = "no PostgreSQL user name specified in startup packet";
        return -1;
    }
    if (!out->database || out->database[0] == '\0')
        out->database = out->user;
    return 0;
}

void pg_scan_init(pg_scan *s, uint8_t *capture, uint32_t capture_cap)
{
    memset(s, 0, sizeof(*s));
    s->capture = capture;
    s->capture_cap = capture ? capture_cap : 0;
}

/* The current message has passed whole: back to expecting a header. */
static void pg_scan_finish(pg_scan *s, const pg_scan_ops *ops, void *ctx)
{
    s->hdr_have = 0;
    s->messages++;
    if (ops->end)
        ops->end(ctx, s->type, s->capture, s->captured, s->body_len);
}

int pg_scan_feed(pg_scan *s, uint8_t *data, size_t n, const pg_scan_ops *ops, void *ctx)
{
    size_t i = 0;
    while (i < n) {
        if (s->hdr_have < PG_MSG_HEADER_LEN) {
            /* Fast path: a whole header in the buffer. */
            if (s->hdr_have == 0 && n - i >= PG_MSG_HEADER_LEN) {
                memcpy(s->hdr, data + i, PG_MSG_HEADER_LEN);
                s->hdr_have = PG_MSG_HEADER_LEN;
                i += PG_MSG_HEADER_LEN;
            } else {
                s->hdr[s->hdr_have++] = data[i++];
                if (s->hdr_have < PG_MSG_HEADER_LEN)
                    continue;
            }
            uint32_t len = pg_get_u32(s->hdr + 1);
            if (len < 4 || len > PG_MSG_MAX_LEN)
                return -1;
            s->type = s->hdr[0];
            s->body_len = len - 4;
            s->body_seen = 0;
            s->captured = 0;
            s->rewrite = NULL;
            s->rewrite_len = 0;
            s->capture_want = ops->begin ? ops->begin(ctx, s, s->type, s->body_len) : 0;
            if (s->capture_want > s->capture_cap)
                s->capture_want = s->capture_cap;
            if (s->capture_want > s->body_len)
                s->capture_want = s->body_len;
            if (s->body_len == 0) {
                pg_scan_finish(s, ops, ctx);
                continue;
            }
        }
        /* Inside a body: take what this buffer holds of it. */
        size_t take = n - i;
        if (take > s->body_len - s->body_seen)
            take = s->body_len - s->body_seen;
        if (s->captured < s->capture_want) {
            size_t c = s->capture_want - s->captured;
            if (c > take)
                c = take;
            memcpy(s->capture + s->captured, data + i, c);
            s->captured += (uint32_t)c;
        }
        if (s->rewrite && s->body_seen < s->rewrite_len) {
            size_t r = s->rewrite_len - s->body_seen;
            if (r > take)
                r = take;
            memcpy(data + i, s->rewrite + s->body_seen, r);
        }
        s->body_seen += (uint32_t)take;
        i += take;
        if (s->body_seen == s->body_len)
            pg_scan_finish(s, ops, ctx);
    }
    return 0;
}

static size_t put_field(uint8_t *buf, size_t off, size_t cap, char code, const char *text)
{
    size_t len = strlen(text) + 1;
    if (off + 1 + len > cap)
        return 0;
    buf[off] = (uint8_t)code;
    memcpy(buf + off + 1, text, len);
    return off + 1 + len;
}

size_t pg_error_build(uint8_t *buf, size_t cap, const char *severity, const char *sqlstate,
                      const char *message)
{
    size_t off = PG_MSG_HEADER_LEN;
    if (cap < PG_MSG_HEADER_LEN + 1)
        return 0;
    buf[0] = PG_MSG_ERROR_RESPONSE;
    if (!(off = put_field(buf, off, cap, 'S', severity)) ||
        !(off = put_field(buf, off, cap, 'V', severity)) ||
        !(off = put_field(buf, off, cap, 'C', sqlstate)) ||
        !(off = put_field(buf, off, cap, 'M', message)))
        return 0;
    if (off + 1 > cap)
        return 0;
    buf[off++] = '\0';
    pg_put_u32(buf + 1, (uint32_t)(off - 1));
    return off;
}
