/* pgproto.h - PostgreSQL wire protocol v3: constants, startup packets, framing, ErrorResponse. */
#ifndef PGRELAY_PGPROTO_H
#define PGRELAY_PGPROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Startup-phase request codes (protocol docs, "Message Formats"). */
#define PG_PROTOCOL_V3          0x00030000u /* StartupMessage, protocol 3.0 */
#define PG_PROTOCOL_MAJOR(c)    ((c) >> 16)
#define PG_PROTOCOL_MINOR(c)    ((c)&0xffff)
#define PG_CANCEL_REQUEST_CODE  80877102u /* CancelRequest */
#define PG_SSL_REQUEST_CODE     80877103u /* SSLRequest */
#define PG_GSSENC_REQUEST_CODE  80877104u /* GSSENCRequest */
#define PG_CANCEL_REQUEST_LEN   16        /* length + code + pid + secret */
#define PG_STARTUP_MIN_LEN      8         /* length + code */
#define PG_STARTUP_MAX_LEN      10000     /* same bound as the server's MAX_STARTUP_PACKET_LENGTH */
#define PG_MSG_HEADER_LEN       5         /* type byte + int32 length */
#define PG_MSG_MAX_LEN          0x40000000u /* 1 GiB: larger than any message the server accepts */

/* Message type bytes we look at (frontend F, backend B). */
#define PG_MSG_QUERY            'Q' /* F: simple query */
#define PG_MSG_PARSE            'P' /* F: extended protocol Parse */
#define PG_MSG_BIND             'B' /* F: Bind */
#define PG_MSG_EXECUTE          'E' /* F: Execute (B: ErrorResponse) */
#define PG_MSG_SYNC             'S' /* F: Sync (B: ParameterStatus) */
#define PG_MSG_FUNCTION_CALL    'F' /* F: FunctionCall */
#define PG_MSG_TERMINATE        'X' /* F: Terminate */
#define PG_MSG_READY_FOR_QUERY  'Z' /* B: ReadyForQuery, body = transaction status */
#define PG_MSG_BACKEND_KEY_DATA 'K' /* B: BackendKeyData, body = pid + secret */
#define PG_MSG_ERROR_RESPONSE   'E' /* B: ErrorResponse */
#define PG_MSG_AUTHENTICATION   'R' /* B: Authentication* */

/* Transaction status byte of ReadyForQuery. */
#define PG_TX_IDLE     'I' /* not in a transaction block */
#define PG_TX_INBLOCK  'T' /* in a transaction block */
#define PG_TX_FAILED   'E' /* in a failed transaction block */

/* SQLSTATEs pgrelay reports itself. */
#define PG_SQLSTATE_CONNECTION_FAILURE   "08006" /* node unreachable */
#define PG_SQLSTATE_PROTOCOL_VIOLATION   "08P01" /* malformed packet */
#define PG_SQLSTATE_TOO_MANY_CONNECTIONS "53300" /* max_client_conn reached */
#define PG_SQLSTATE_FEATURE_NOT_SUPPORTED "0A000" /* unsupported protocol version */
#define PG_SQLSTATE_ADMIN_SHUTDOWN       "57P01" /* pgrelay is shutting down */
#define PG_SQLSTATE_CANNOT_CONNECT_NOW   "57P03" /* no write leader */

/* What a startup-phase packet asks for. */
typedef enum pg_startup_kind {
    PG_STARTUP_MESSAGE = 0, /* a StartupMessage: protocol version + parameters */
    PG_STARTUP_SSL,         /* SSLRequest */
    PG_STARTUP_GSSENC,      /* GSSENCRequest */
    PG_STARTUP_CANCEL,      /* CancelRequest */
} pg_startup_kind;

typedef struct pg_startup {
    pg_startup_kind kind;
    uint32_t code;            /* the int32 after the length */
    /* PG_STARTUP_MESSAGE: pointers into the packet (NUL-terminated there) */
    const char *user;
    const char *database;     /* defaults to user when absent */
    const char *application_name; /* NULL when absent */
    /* PG_STARTUP_CANCEL */
    uint32_t cancel_pid;
    uint32_t cancel_secret;
} pg_startup;

static inline uint32_t pg_get_u32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline void pg_put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Given the first `have` bytes of a startup-phase packet, return its total length once the
 * 4-byte length is known, 0 when fewer than 4 bytes are here, or -1 when the length is out of
 * bounds (PG_STARTUP_MIN_LEN..PG_STARTUP_MAX_LEN). */
long pg_startup_length(const uint8_t *buf, size_t have);

/* Parse a complete startup-phase packet of `len` bytes (len as returned above). The packet is
 * not modified; out's strings point into it. Returns 0, or -1 with *err set to a message naming
 * what is wrong (also for an unsupported protocol major version; then *sqlstate is 0A000). */
int pg_startup_parse(const uint8_t *pkt, size_t len, pg_startup *out, const char **err,
                     const char **sqlstate);

/* Incremental framing of one direction of a v3 message stream, fed with whatever each read()
 * returned. For every message it calls begin() when the 5-byte header is complete and end() when
 * the whole body has passed; begin() says how many leading body bytes to capture for end(), and
 * may set scan->rewrite so that the body bytes are replaced in the caller's buffer as they pass
 * (used to swap the backend's cancel key for pgrelay's). */
typedef struct pg_scan pg_scan;
typedef struct pg_scan_ops {
    uint32_t (*begin)(void *ctx, pg_scan *scan, uint8_t type, uint32_t body_len);
    void (*end)(void *ctx, uint8_t type, const uint8_t *body, uint32_t captured,
                uint32_t body_len);
} pg_scan_ops;

struct pg_scan {
    uint8_t hdr[PG_MSG_HEADER_LEN]; /* header bytes gathered so far */
    uint8_t hdr_have;               /* 0..5; 5 means we are inside a body */
    uint8_t type;                   /* type byte of the current message */
    uint32_t body_len;              /* length field minus 4 */
    uint32_t body_seen;             /* body bytes passed so far */
    uint32_t capture_want;          /* body bytes to keep for end() */
    uint32_t captured;              /* body bytes kept so far */
    const uint8_t *rewrite;         /* replacement body bytes, or NULL */
    uint32_t rewrite_len;           /* how many leading body bytes rewrite covers */
    uint64_t messages;              /* complete messages seen */
    uint8_t *capture;               /* owner's buffer for captured body bytes */
    uint32_t capture_cap;           /* its size: begin()'s answer is clamped to this */
};

/* Prepare a scanner; capture/capture_cap is where begin()-requested body bytes are kept
 * (may be NULL/0 when nothing is ever captured). */
void pg_scan_init(pg_scan *scan, uint8_t *capture, uint32_t capture_cap);

/* Feed n bytes (modifiable in place for rewrite). Returns 0, or -1 when a length field is
 * impossible (below 4 or above PG_MSG_MAX_LEN): a protocol violation. */
int pg_scan_feed(pg_scan *scan, uint8_t *data, size_t n, const pg_scan_ops *ops, void *ctx);

/* True when the scanner is between messages (no partial header or body pending). */
static inline bool pg_scan_at_boundary(const pg_scan *scan)
{
    return scan->hdr_have == 0;
}

/* Build an ErrorResponse (severity ERROR or FATAL) into buf. Returns its length, or 0 when
 * cap is too small. */
size_t pg_error_build(uint8_t *buf, size_t cap, const char *severity, const char *sqlstate,
                      const char *message);

#endif
