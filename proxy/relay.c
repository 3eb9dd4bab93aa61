/* relay.c - the data path: read a chunk, follow its message framing, write it on, backpressure.
 *
 * Each readable event does one read() into the worker's scratch buffer, feeds it to the framing
 * scanner of that direction (which records statement text, transaction state and cancel keys,
 * and swaps the backend's cancel key for pgrelay's in place), and write()s it to the other
 * side. Only bytes the other side did not take are copied, into that direction's pending
 * buffer; while it is non-empty the source is not read, so memory per session stays bounded.
 */
#include "cancel.h"
#include "log.h"
#include "plan_ring.h"
#include "session.h"
#include "worker.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* Message types of COPY (protocol docs, "COPY Operations"). */
#define RELAY_MSG_COPY_IN_RESPONSE 'G' /* B: CopyInResponse, the server is in copy-in mode */
#define RELAY_MSG_COPY_DONE        'c' /* F: CopyDone */
#define RELAY_MSG_COPY_FAIL        'f' /* F: CopyFail */

/* ---- per-node counters ---- */

/* Add what the session gathered for its node to this worker's row of that node (one writer:
 * plain relaxed stores, no locked add, no line shared with another worker). */
void relay_node_flush(session *s)
{
    shm_node_count *c = s->counter;
    if (c) {
        worker *w = worker_self;
        shm_node_stats *row =
            shm_node_stats_row(w->shm, (uint32_t)w->index, shm_node_count_index(w->shm, c));
        if (s->node_statements)
            shm_stat_add(&row->statements, s->node_statements);
        if (s->node_bytes_in)
            shm_stat_add(&row->bytes_in, s->node_bytes_in);
        if (s->node_bytes_out)
            shm_stat_add(&row->bytes_out, s->node_bytes_out);
    }
    /* Without an entry (the master never created one) there is nothing to add it to. */
    s->node_statements = s->node_bytes_in = s->node_bytes_out = 0;
}

/* ---- client -> server messages ---- */

static void session_set_state(session *s, shm_session_state state)
{
    atomic_store_explicit(&s->slot->state, state, memory_order_relaxed);
}

/* The first message after the session was idle starts a statement. */
static void relay_statement_starts(session *s)
{
    if (s->pending_syncs == 0 && !s->ext_open) {
        s->slot->stmt_start_us = shm_mono_us();
        session_set_state(s, SESSION_ACTIVE);
    }
}

/* A new statement (Query or Execute): what the last COPY left to settle is moot. */
static void relay_copy_forget(session *s)
{
    s->syncs_since_execute = 0;
    s->copy_in = false;
    s->copy_end_early = false;
    s->copy_end_syncs = 0;
}

/* The server ignored n Syncs in copy-in mode: no ReadyForQuery will answer them. */
static void relay_copy_syncs_ignored(session *s, uint32_t n)
{
    s->pending_syncs -= n < s->pending_syncs ? n : s->pending_syncs;
    s->copy_in = false;
    s->copy_end_early = false;
    s->copy_end_syncs = 0;
}

/* Where the client scanner keeps the body bytes begin() asks for: the slot's statement text,
 * or the session's plan capture for a Bind. */
static void relay_capture_into(session *s, pg_scan *scan, uint8_t *buf, uint32_t cap)
{
    (void)s;
    scan->capture = buf;
    scan->capture_cap = cap;
}

static uint32_t client_begin(void *ctx, pg_scan *scan, uint8_t type, uint32_t body_len)
{
    session *s = ctx;
    worker *w = worker_self;

    if (!s->logged_in)
        return 0; /* password and SASL messages */
    switch (type) {
    case PG_MSG_QUERY:
        shm_session_write_begin(s->slot); /* ended in client_end, once the text is in */
        s->plan.extended = s->plan.function_call = false;
        s->plan.truncated = body_len > SHM_STMT_MAX;
        relay_statement_starts(s);
        relay_copy_forget(s);
        s->pending_syncs++;
        shm_stat_add(&w->row->stats.statements, 1);
        s->node_statements++;
        return plan_text_begin(s, scan, body_len);
    case PG_MSG_PARSE:
        shm_session_write_begin(s->slot);
        relay_statement_starts(s);
        s->ext_open = true;
        return plan_text_begin(s, scan, body_len);
    case PG_MSG_EXECUTE:
        shm_stat_add(&w->row->stats.statements, 1);
        s->node_statements++;
        relay_copy_forget(s);
        /* fall through */
    case 'D': /* Describe */
    case 'C': /* Close */
    case 'H': /* Flush */
        relay_statement_starts(s);
        s->ext_open = true;
        return 0;
    case PG_MSG_BIND:
        relay_statement_starts(s);
        s->ext_open = true;
        /* Its values go with a plan request; kept only while planning is on. */
        s->plan.extended = true;
        s->plan.function_call = false;
        s->plan.bind_len = body_len;
        s->plan.bind_have = 0;
        if (!plan_enabled(w))
            return 0;
        relay_capture_into(s, scan, s->plan.bind, sizeof(s->plan.bind));
        return sizeof(s->plan.bind);
    case PG_MSG_SYNC:
        relay_statement_starts(s);
        s->ext_open = false;
        s->pending_syncs++;
        s->syncs_since_execute++;
        return 0;
    case RELAY_MSG_COPY_DONE:
    case RELAY_MSG_COPY_FAIL:
        if (s->copy_in) {
            relay_copy_syncs_ignored(s, s->syncs_since_execute);
        } else {
            s->copy_end_early = true;
            s->copy_end_syncs = s->syncs_since_execute;
        }
        return 0;
    case PG_MSG_FUNCTION_CALL:
        s->plan.function_call = true;
        relay_statement_starts(s);
        s->pending_syncs++;
        return 0;
    default:
        return 0;
    }
}

static void client_end(void *ctx, uint8_t type, const uint8_t *body, uint32_t captured,
                       uint32_t body_len)
{
    session *s = ctx;
    (void)body;

    if (!s->logged_in)
        return;
    if (type == PG_MSG_BIND) {
        s->plan.bind_have = captured;
    } else if ((type == PG_MSG_QUERY || type == PG_MSG_PARSE) && s->plan.long_used) {
        plan_text_end(s, type, captured, body_len);
        shm_session_write_end(s->slot);
    } else if (type == PG_MSG_QUERY) {
        s->slot->stmt[captured] = '\0';
        shm_session_write_end(s->slot);
    } else if (type == PG_MSG_PARSE) {
        /* Parse: statement name \0 query \0 ...; keep the query. */
        char *stmt = s->slot->stmt;
        plan_parse_seen(s, (const uint8_t *)stmt, captured, body_len);
        stmt[captured] = '\0';
        size_t name_len = strnlen(stmt, captured);
        if (name_len < captured)
            memmove(stmt, stmt + name_len + 1, captured - name_len);
        else
            stmt[0] = '\0';
        shm_session_write_end(s->slot);
    }
}

/* ---- server -> client messages ---- */

/* The ReadyForQuery that ends a statement: its latency goes to the worker's row and to the
 * worker's own histogram of the node, and what the session gathered for its node to the
 * worker's counters of that node. A few adds per statement, none per message. The first
 * ReadyForQuery after login ends no statement (stmt_start_us is 0). */
static void relay_statement_ends(session *s)
{
    worker *w = worker_self;
    int64_t start = s->slot->stmt_start_us;
    if (start) {
        int64_t us = shm_mono_us() - start;
        uint64_t latency = us > 0 ? (uint64_t)us : 0;
        s->slot->stmt_start_us = 0;
        shm_stat_add(&w->row->stats.statements_completed, 1);
        shm_stat_add(&w->row->stats.latency_us, latency);
        if (s->counter) {
            shm_node_stats *h = shm_node_stats_row(w->shm, (uint32_t)w->index,
                                                   shm_node_count_index(w->shm, s->counter));
            shm_stat_add(&h->buckets[shm_latency_bucket(latency)], 1);
            shm_stat_add(&h->latency_us, latency);
        }
        plan_statement_ended(w, s, latency);
    }
    relay_node_flush(s);
}

static uint32_t server_begin(void *ctx, pg_scan *scan, uint8_t type, uint32_t body_len)
{
    session *s = ctx;
    switch (type) {
    case PG_MSG_READY_FOR_QUERY:
        return 1;
    case RELAY_MSG_COPY_IN_RESPONSE:
        if (!s->logged_in)
            return 0;
        if (s->copy_end_early)
            relay_copy_syncs_ignored(s, s->copy_end_syncs);
        else
            s->copy_in = true;
        return 0;
    case PG_MSG_BACKEND_KEY_DATA:
        if (body_len == sizeof(s->client_key)) {
            scan->rewrite = s->client_key;
            scan->rewrite_len = sizeof(s->client_key);
            return sizeof(s->client_key);
        }
        /* A longer (protocol 3.2) key although 3.0 was asked for: it must not reach the
         * client unswapped; relay_pump ends the session before this chunk is sent. */
        s->server_key_len = body_len;
        return 0;
    default:
        return 0;
    }
}

static void server_end(void *ctx, uint8_t type, const uint8_t *body, uint32_t captured,
                       uint32_t body_len)
{
    session *s = ctx;
    (void)body_len;

    if (type == PG_MSG_READY_FOR_QUERY && captured == 1) {
        s->tx_status = (char)body[0];
        if (s->pending_syncs > 0)
            s->pending_syncs--;
        if (s->pending_syncs == 0 && !s->ext_open) {
            session_set_state(s, s->tx_status == PG_TX_IDLE ? SESSION_IDLE : SESSION_IN_TX);
            relay_statement_ends(s);
        }
        if (!s->logged_in) {
            s->logged_in = true;
            s->login_deadline_us = 0;
            if (s->timer_armed) {
                evtimer_del(&s->ev_timer);
                s->timer_armed = false;
            }
        }
    } else if (type == PG_MSG_BACKEND_KEY_DATA && captured == 8) {
        s->slot->backend_pid = pg_get_u32(body);
        s->slot->backend_secret = pg_get_u32(body + 4);
        atomic_store_explicit(&s->slot->backend_valid, 1, memory_order_release);
    }
}

static const pg_scan_ops client_ops = {client_begin, client_end};
static const pg_scan_ops server_ops = {server_begin, server_end};

void relay_init_scanners(session *s)
{
    pg_scan_init(&s->client_scan, (uint8_t *)s->slot->stmt, SHM_STMT_MAX - 1);
    pg_scan_init(&s->server_scan, s->server_capture, sizeof(s->server_capture));
}

/* ---- moving bytes ---- */

/* The TLS state of the side whose socket is fd. */
static inline tls_conn *relay_tls(session *s, int fd)
{
    return fd == s->cfd ? &s->client_tls : &s->server_tls;
}

int relay_flush(session *s, relay_pending *p, int fd)
{
    tls_conn *t = relay_tls(s, fd);
    while (p->off < p->len) {
        ssize_t n = conn_write(fd, t, p->buf + p->off, p->len - p->off);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            return -1;
        }
        p->off += (size_t)n;
    }
    free(p->buf);
    p->buf = NULL;
    p->off = p->len = 0;
    return 0;
}

/* Keep what `to` did not take. The source is not read again until it drains. */
static int relay_keep(relay_pending *p, const uint8_t *data, size_t len)
{
    p->buf = malloc(len);
    if (!p->buf)
        return -1;
    memcpy(p->buf, data, len);
    p->off = 0;
    p->len = len;
    return 0;
}

typedef enum relay_result {
    RELAY_OK = 0,  /* moved what there was (or nothing yet) */
    RELAY_CLOSED,  /* the session was closed and freed */
} relay_result;

/* Anything between the client and the node not yet finished: a statement or message under
 * way in either direction, or bytes not yet written. */
static bool relay_work_in_flight(const session *s)
{
    return s->pending_syncs > 0 || s->ext_open || s->to_server.len != s->to_server.off ||
           s->to_client.len != s->to_client.off || !pg_scan_at_boundary(&s->client_scan) ||
           !pg_scan_at_boundary(&s->server_scan);
}

/* The client half-closed: once what it sent has reached the node, so does its EOF. */
static void relay_pass_client_eof(session *s)
{
    if (!s->client_eof || s->server_shut || s->to_server.len != s->to_server.off)
        return;
    s->server_shut = true;
    tls_shutdown_write(&s->server_tls); /* a node on TLS gets close_notify first */
    if (shutdown(s->sfd, SHUT_WR) != 0)
        log_debug("client %s: shutdown toward node %s: %s", s->client_addr,
                  s->slot->node_name, strerror(errno));
}

/* The client closed its side. With nothing in flight the session ends now; else it goes on
 * as a direct connection would: the node runs what it got, then reads EOF and closes, and
 * its answers reach a client that only half-closed. */
static relay_result relay_client_eof(session *s)
{
    if (s->phase != PHASE_RELAY || !relay_work_in_flight(s)) {
        log_debug("client %s: disconnected", s->client_addr);
        session_close(s, NULL, NULL);
        return RELAY_CLOSED;
    }
    log_debug("client %s: closed its side with a statement in flight; the node finishes it",
              s->client_addr);
    s->client_eof = true;
    relay_pass_client_eof(s);
    return RELAY_OK;
}

/* One read from `from`, scanned, written to `to`. */
static relay_result relay_pump(session *s, bool from_client)
{
    worker *w = worker_self;
    int from = from_client ? s->cfd : s->sfd;
    int to = from_client ? s->sfd : s->cfd;
    relay_pending *out = from_client ? &s->to_server : &s->to_client;
    uint8_t *buf = w->scratch;

    ssize_t n = conn_read(from, from_client ? &s->client_tls : &s->server_tls, buf,
                          RELAY_BUF_SIZE);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return RELAY_OK;
        if (from_client) {
            if (n == 0)
                return relay_client_eof(s);
            log_debug("client %s: connection lost: %s", s->client_addr, strerror(errno));
            s->client_reset = true;
            session_close(s, NULL, NULL);
        } else {
            /* The node closed (after a FATAL, or it went away): pass on what is queued. With no
             * ErrorResponse as the node's last word (its backend was killed, its postmaster
             * died, or an immediate shutdown, which tells an idle session only a WARNING), the
             * client gets 08006, not a bare EOF: in a statement, and also when idle, since its
             * next query may already be on its way (it then reads the 08006 as that query's
             * answer, as a direct client reads PostgreSQL's FATAL at a fast shutdown). */
            s->server_gone = true;
            relay_flush(s, &s->to_client, s->cfd);
            log_debug("client %s: node closed the connection", s->client_addr);
            bool told = s->server_scan.messages > 0 &&
                        s->server_scan.type == PG_MSG_ERROR_RESPONSE &&
                        pg_scan_at_boundary(&s->server_scan);
            /* the client said goodbye (Terminate, or it closed its sending side): the node's
             * close is the answer it waits for, as with a direct connection */
            bool goodbye = s->client_eof ||
                           (s->client_scan.messages > 0 && s->client_scan.type == PG_MSG_TERMINATE);
            bool statement = s->pending_syncs > 0 || s->ext_open;
            if (s->logged_in && !told && (statement || !goodbye)) {
                char gone[CONFIG_NAME_MAX + 64];
                snprintf(gone, sizeof(gone), "node %s closed the connection%s",
                         s->slot->node_name, statement ? " during a statement" : "");
                if (statement)
                    log_warning("client %s: %s", s->client_addr, gone);
                else
                    log_info("client %s: %s while the session was idle", s->client_addr, gone);
                session_close(s, PG_SQLSTATE_CONNECTION_FAILURE, gone);
            } else {
                session_close(s, NULL, NULL);
            }
        }
        return RELAY_CLOSED;
    }
    /* Before login: a node on TLS offers channel binding, which cannot span pgrelay (the
     * client's channel, if any, ends at pgrelay's certificate): not shown to the client (see
     * tls_strip_sasl_plus). */
    if (!from_client && !s->logged_in && s->server_tls.ssl &&
        pg_scan_at_boundary(&s->server_scan))
        n = (ssize_t)tls_strip_sasl_plus(buf, (size_t)n);
    /* Bytes are counted for the node before the scan, so that the chunk holding a statement's
     * ReadyForQuery is in the flush that statement's end makes. */
    if (from_client) {
        s->node_bytes_in += (uint64_t)n;
        if (pg_scan_feed(&s->client_scan, buf, (size_t)n, &client_ops, s) != 0) {
            log_warning("client %s: invalid message length from client; closing",
                        s->client_addr);
            session_close(s, PG_SQLSTATE_PROTOCOL_VIOLATION, "invalid message length");
            return RELAY_CLOSED;
        }
        shm_stat_add(&w->row->stats.bytes_in, (uint64_t)n);
    } else {
        s->node_bytes_out += (uint64_t)n;
        if (pg_scan_feed(&s->server_scan, buf, (size_t)n, &server_ops, s) != 0) {
            log_warning("client %s: invalid message length from node %s; closing",
                        s->client_addr, s->slot->node_name);
            session_close(s, PG_SQLSTATE_PROTOCOL_VIOLATION, "invalid message from the node");
            return RELAY_CLOSED;
        }
        if (s->server_key_len) {
            log_warning("client %s: node %s sent a BackendKeyData of %u bytes (protocol 3.0, "
                        "which was asked for, has 8); closing", s->client_addr,
                        s->slot->node_name, s->server_key_len);
            session_close(s, PG_SQLSTATE_PROTOCOL_VIOLATION,
                          "the node answered with a protocol newer than 3.0");
            return RELAY_CLOSED;
        }
        /* The chunk goes to the client whole (sent now or queued): where it ends is where
         * the client's stream ends. A chunk refused above never reaches it. */
        s->client_at_boundary = pg_scan_at_boundary(&s->server_scan);
        shm_stat_add(&w->row->stats.bytes_out, (uint64_t)n);
    }
    if (s->node_bytes_in + s->node_bytes_out >= RELAY_NODE_FLUSH_BYTES)
        relay_node_flush(s);

    ssize_t sent = conn_write(to, from_client ? &s->server_tls : &s->client_tls, buf, (size_t)n);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            log_debug("client %s: write to %s failed: %s", s->client_addr,
                      from_client ? "node" : "client", strerror(errno));
            s->server_gone = from_client;
            session_close(s, NULL, NULL);
            return RELAY_CLOSED;
        }
        sent = 0;
    }
    if (sent < n && relay_keep(out, buf + sent, (size_t)(n - sent)) != 0) {
        log_error("client %s: out of memory buffering %zd bytes", s->client_addr, n - sent);
        session_close(s, PG_SQLSTATE_CONNECTION_FAILURE, "pgrelay is out of memory");
        return RELAY_CLOSED;
    }
    return RELAY_OK;
}

/* After server output passed: a session waiting for its safe point may close now. */
static relay_result relay_check_safe_point(session *s)
{
    if (s->close_at_safe_point && session_at_safe_point(s) && s->to_client.len == 0) {
        session_close(s, s->close_sqlstate, s->close_message);
        return RELAY_CLOSED;
    }
    return RELAY_OK;
}

void relay_on_client(evutil_socket_t fd, short what, void *arg)
{
    session *s = arg;
    what = tls_ready(&s->client_tls, what);
    if (what & EV_WRITE) {
        if (relay_flush(s, &s->to_client, fd) != 0) {
            session_close(s, NULL, NULL);
            return;
        }
        if (relay_check_safe_point(s) == RELAY_CLOSED)
            return;
    }
    if ((what & EV_READ) && s->to_server.len == 0 && !s->client_eof) {
        if (relay_pump(s, true) == RELAY_CLOSED)
            return;
    }
    session_arm(s);
}

void relay_on_server(evutil_socket_t fd, short what, void *arg)
{
    session *s = arg;
    what = tls_ready(&s->server_tls, what);
    if (what & EV_WRITE) {
        if (relay_flush(s, &s->to_server, fd) != 0) {
            s->server_gone = true;
            session_close(s, PG_SQLSTATE_CONNECTION_FAILURE, "lost the connection to the node");
            return;
        }
        relay_pass_client_eof(s);
    }
    if ((what & EV_READ) && s->to_client.len == 0) {
        if (relay_pump(s, false) == RELAY_CLOSED)
            return;
        if (relay_check_safe_point(s) == RELAY_CLOSED)
            return;
    }
    session_arm(s);
}
