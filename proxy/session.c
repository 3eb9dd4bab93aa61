/* session.c - a client session's life: startup packet, routing, connecting to the node, closing. */
#include "session.h"
#include "cancel.h"
#include "log.h"
#include "channel.h"
#include "net.h"
#include "route.h"
#include "utf8.h"
#include "worker.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define SSL_NOT_SUPPORTED 'N' /* answer to SSLRequest and GSSENCRequest */
#define SSL_SUPPORTED     'S' /* answer to SSLRequest when client_tls_mode is not disable */
#define SESSION_TLS_RECORD_HANDSHAKE 0x16 /* first byte of a TLS ClientHello (direct TLS) */
#define SESSION_SQLSTATE_SYSTEM_ERROR "58000" /* the kernel refused pgrelay something */
#define SESSION_SQLSTATE_INVALID_AUTH "28000" /* invalid_authorization_specification */

static void session_on_startup(evutil_socket_t fd, short what, void *arg);
static void session_on_connected(evutil_socket_t fd, short what, void *arg);
static void session_on_timer(evutil_socket_t fd, short what, void *arg);
static void session_on_held_client(evutil_socket_t fd, short what, void *arg);
static void session_timer_rearm(session *s);
static void session_request_probe(worker *w);

/* A session held by no_leader_wait asks the agent to probe this often, so that a replica
 * promoted while it waits is found now rather than at the agent's next health_interval. */
#define LEADER_WAIT_POKE_US (500 * 1000)

/* Copy a client-supplied name into a fixed shm field for the console: cut at a character
 * boundary, never invalid UTF-8 or a control character (see utf8_copy_printable). Only this
 * copy is cleaned; the node gets the client's own bytes. */
static void copy_ident(char *dst, size_t cap, const char *src)
{
    utf8_copy_printable(dst, cap, src);
}

/* Reads of what a refused client already sent, at most (a startup packet fits in far fewer). */
#define SESSION_REFUSE_DRAIN_READS 16

/* Refuse a connection that has no session: the error first, then close. What the client
 * already sent (its startup packet) is read first, so that the close is a FIN and not a reset
 * that could overtake the error; a client still sending after that is not waited for. */
static void session_refuse_now(int fd, const char *sqlstate, const char *message)
{
    uint8_t buf[512];
    size_t len = pg_error_build(buf, sizeof(buf), "FATAL", sqlstate, message);
    if (len) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        (void)n;
    }
    shutdown(fd, SHUT_WR);
    for (int i = 0; i < SESSION_REFUSE_DRAIN_READS; i++)
        if (recv(fd, buf, sizeof(buf), MSG_DONTWAIT) <= 0)
            break;
    close(fd);
}

void session_new(int fd, const struct sockaddr_storage *addr, socklen_t addrlen, bool read_port)
{
    worker *w = worker_self;
    session *s = calloc(1, sizeof(*s));
    if (!s) {
        log_error("out of memory for a new session; closing the client socket");
        close(fd);
        return;
    }
    net_format_addr(addr, addrlen, s->client_addr, sizeof(s->client_addr));
    s->cfd = fd;
    s->sfd = -1;
    s->tx_status = PG_TX_IDLE;
    s->read_port = read_port;
    s->client_at_boundary = true;
    net_tune_socket(fd, w->cfg->tcp_keepalive);

    s->slot = shm_session_claim(w->shm, w->index, w->slot_hint);
    if (!s->slot) {
        /* Even the reserve slots are gone (taken by connections that have not sent their
         * startup packet yet): answer 53300 now, as the server does when it cannot start a
         * backend, rather than a bare close. */
        log_warning("client %s: no session slot left (max_client_conn = %d); refused",
                    s->client_addr, w->cfg->max_client_conn);
        session_refuse_now(fd, PG_SQLSTATE_TOO_MANY_CONNECTIONS,
                           "sorry, too many clients already (max_client_conn)");
        shm_stat_add(&w->row->stats.errors, 1);
        free(s);
        return;
    }
    uint32_t idx = (uint32_t)(s->slot - w->shm->sessions);
    w->slot_hint = idx + 1;
    if (atomic_load(&w->shm->clients) > w->cfg->max_client_conn) {
        s->reject_sqlstate = PG_SQLSTATE_TOO_MANY_CONNECTIONS;
        s->reject_message = "sorry, too many clients already (max_client_conn)";
    }
    if (cancel_key_issue(s->slot, idx, s->client_key) != 0) {
        s->reject_sqlstate = SESSION_SQLSTATE_SYSTEM_ERROR;
        s->reject_message = "pgrelay could not make a cancel key (getrandom failed)";
    }
    shm_session_write_begin(s->slot);
    copy_ident(s->slot->client_addr, sizeof(s->slot->client_addr), s->client_addr);
    s->slot->connected_at_us = shm_mono_us();
    s->slot->read_port = read_port;
    shm_session_write_end(s->slot);

    event_assign(&s->ev_client, w->base, fd, EV_READ | EV_PERSIST, session_on_startup, s);
    event_add(&s->ev_client, NULL);
    s->client_mask = EV_READ;
    evtimer_assign(&s->ev_timer, w->base, session_on_timer, s);
    if (w->cfg->client_login_timeout_ms > 0)
        s->login_deadline_us = worker_clock_us() + (int64_t)w->cfg->client_login_timeout_ms * 1000;
    if (w->cfg->client_startup_timeout_ms > 0)
        s->startup_deadline_us =
            worker_clock_us() + (int64_t)w->cfg->client_startup_timeout_ms * 1000;
    session_timer_rearm(s);

    worker_session_added(w, s);
    shm_stat_add(&w->row->stats.sessions_total, 1);
    s->phase = PHASE_STARTUP;
}

/* Send bytes to the client without blocking; best effort for pgrelay's own short answers. */
static void session_send_client(session *s, const uint8_t *buf, size_t len)
{
    if (s->client_tls.ssl && !s->client_tls.handshaken)
        return; /* in the middle of the handshake there is no channel to say it on */
    ssize_t n = conn_write(s->cfd, &s->client_tls, buf, len);
    (void)n;
}

static void session_send_error(session *s, const char *severity, const char *sqlstate,
                               const char *message)
{
    uint8_t buf[512];
    size_t len = pg_error_build(buf, sizeof(buf), severity, sqlstate, message);
    if (len)
        session_send_client(s, buf, len);
}

/* Take the session off its node's counter, adding the traffic it has not added yet. */
static void session_uncount(session *s)
{
    if (!s->counter)
        return;
    relay_node_flush(s);
    atomic_fetch_sub(s->read_port ? &s->counter->read_sessions : &s->counter->write_sessions, 1);
    s->counter = NULL;
    /* A slot names its node only while counted on it: the master uncounts a dead worker's
     * sessions by that name. */
    shm_session_write_begin(s->slot);
    s->slot->node_name[0] = '\0';
    shm_session_write_end(s->slot);
}

void session_close(session *s, const char *sqlstate, const char *message)
{
    worker *w = worker_self;
    char gone[CONFIG_NAME_MAX + 64];
    /* The node closed before the login finished without an ErrorResponse of its own (it went
     * away, or was shut down): the client gets 08006, not a bare EOF. */
    if (!sqlstate && s->phase == PHASE_RELAY && s->server_gone && !s->logged_in &&
        !(s->server_scan.messages > 0 && s->server_scan.type == PG_MSG_ERROR_RESPONSE &&
          pg_scan_at_boundary(&s->server_scan))) {
        snprintf(gone, sizeof(gone), "node %s closed the connection during startup",
                 s->slot->node_name);
        log_warning("client %s: %s", s->client_addr, gone);
        sqlstate = PG_SQLSTATE_CONNECTION_FAILURE;
        message = gone;
    }
    if (sqlstate) {
        /* The error goes out only where a message may begin: after the last whole message
         * from the node (what is queued for the client is sent first, if the socket takes it
         * now). In the middle of a DataRow or CopyData it would desynchronise the client,
         * which then reports lost synchronisation instead of the SQLSTATE: there, just close. */
        if (s->client_at_boundary && !s->client_reset &&
            relay_flush(s, &s->to_client, s->cfd) == 0 && s->to_client.len == s->to_client.off)
            session_send_error(s, "FATAL", sqlstate, message);
        else
            log_debug("client %s: closed mid-message; no room for an error message",
                      s->client_addr);
        shm_stat_add(&w->row->stats.errors, 1);
        if (s->counter)
            shm_stat_add(&shm_node_stats_row(w->shm, (uint32_t)w->index,
                                             shm_node_count_index(w->shm, s->counter))
                              ->errors,
                         1);
    }
    /* pgrelay ends the session while a statement runs (shutdown, kill, grace), or the client
     * reset the connection: cancel the statement so the backend is freed now rather than when
     * it ends. A client that only closed (or sent Terminate) gets what the server would give
     * it: the statement runs on, as it would on a direct connection. */
    if ((sqlstate || s->client_reset) && s->phase == PHASE_RELAY && !s->server_gone &&
        s->pending_syncs > 0 && atomic_load(&s->slot->backend_valid))
        cancel_send(w, &s->slot->node_addr, s->slot->node_addrlen, s->slot->node_name,
                    s->slot->backend_pid, s->slot->backend_secret, -1);

    session_uncount(s);
    if (s->client_mask)
        event_del(&s->ev_client);
    if (s->server_mask)
        event_del(&s->ev_server);
    if (s->timer_armed)
        evtimer_del(&s->ev_timer);
    free(s->close_message);
    tls_close(&s->client_tls);
    close(s->cfd);
    tls_close(&s->server_tls);
    if (s->sfd >= 0)
        close(s->sfd);
    free(s->to_server.buf);
    free(s->to_client.buf);
    free(s->startup);
    plan_capture_free(&s->plan);
    if (s->slot)
        shm_session_release(w->shm, s->slot);
    worker_session_gone(w, s);
    free(s);
}

bool session_at_safe_point(const session *s)
{
    return s->phase == PHASE_RELAY && s->logged_in && s->pending_syncs == 0 && !s->ext_open &&
           s->tx_status == PG_TX_IDLE && pg_scan_at_boundary(&s->client_scan) &&
           pg_scan_at_boundary(&s->server_scan) && s->to_server.len == s->to_server.off;
}

void session_close_when_safe_for(session *s, const char *sqlstate, const char *message,
                                 int grace_ms)
{
    if (s->phase != PHASE_RELAY || !s->logged_in || session_at_safe_point(s)) {
        session_close(s, sqlstate, message);
        return;
    }
    char *copy = strdup(message);
    if (!copy) {
        session_close(s, sqlstate, "terminating connection");
        return;
    }
    free(s->close_message);
    s->close_message = copy;
    s->close_at_safe_point = true;
    s->close_sqlstate = sqlstate;
    if (grace_ms >= 0) {
        int64_t deadline = worker_clock_us() + (int64_t)grace_ms * 1000;
        if (!s->close_deadline_us || deadline < s->close_deadline_us)
            s->close_deadline_us = deadline;
        session_timer_rearm(s);
    }
}

void session_close_when_safe(session *s, const char *sqlstate, const char *message)
{
    session_close_when_safe_for(s, sqlstate, message, -1);
}

void session_arm(session *s)
{
    worker *w = worker_self;
    short want_c = 0, want_s = 0;

    switch (s->phase) {
    case PHASE_STARTUP:
        want_c = EV_READ; /* the TLS handshake too: tls_events says which event it waits for */
        break;
    case PHASE_CONNECTING:
        /* connect() finished when writable; the node's answer to SSLRequest and the TLS
         * handshake are reads (tls_events turns them into what OpenSSL waits for) */
        want_s = s->server_step == SERVER_STEP_CONNECT ? EV_WRITE : EV_READ;
        break;
    case PHASE_HELD:
        /* Waiting for a leader or for resume: only watch for the client going away. */
        if (!s->client_hup_seen)
            want_c = EV_CLOSED;
        break;
    case PHASE_RELAY:
        if (s->client_eof) {
            /* Nothing more comes from the client: pass on what it sent, then its EOF; the
             * node's answers still go to it. */
            if (s->to_server.len != s->to_server.off)
                want_s |= EV_WRITE;
            if (s->to_client.len == s->to_client.off)
                want_s |= EV_READ;
            else
                want_c |= EV_WRITE;
            break;
        }
        /* Held by maintenance at its safe point, the client is not read (its next statement
         * waits) and nothing waits for the server to be writable: an idle socket always is,
         * and waiting for that would spin the loop for as long as the pause lasts. */
        if (s->to_server.len != s->to_server.off)
            want_s |= EV_WRITE;
        else if (!(w->maintenance && session_at_safe_point(s)))
            want_c |= EV_READ;
        else if (!s->client_hup_seen)
            want_c |= EV_CLOSED; /* held: notice a client that leaves */
        if (s->to_client.len == s->to_client.off)
            want_s |= EV_READ;
        else
            want_c |= EV_WRITE;
        break;
    }
    /* On TLS the wish to read or write becomes the socket event OpenSSL waits for. */
    bool read_wished = (want_c & EV_READ) != 0, server_read_wished = (want_s & EV_READ) != 0;
    want_c = tls_events(&s->client_tls, want_c);
    want_s = tls_events(&s->server_tls, want_s);
    if (want_c != s->client_mask) {
        if (s->client_mask)
            event_del(&s->ev_client);
        if (want_c) {
            event_assign(&s->ev_client, w->base, s->cfd, want_c | EV_PERSIST,
                         s->phase == PHASE_STARTUP ? session_on_startup
                         : want_c == EV_CLOSED     ? session_on_held_client
                                                   : relay_on_client,
                         s);
            event_add(&s->ev_client, NULL);
        }
        s->client_mask = want_c;
    }
    if (want_s != s->server_mask) {
        if (s->server_mask)
            event_del(&s->ev_server);
        if (want_s) {
            event_assign(&s->ev_server, w->base, s->sfd, want_s | EV_PERSIST,
                         s->phase == PHASE_CONNECTING ? session_on_connected : relay_on_server,
                         s);
            event_add(&s->ev_server, NULL);
        }
        s->server_mask = want_s;
    }
    /* Bytes OpenSSL already decrypted make no socket readable: come back for them now. */
    if (read_wished && want_c && tls_has_pending(&s->client_tls))
        event_active(&s->ev_client, EV_READ, 0);
    if (server_read_wished && want_s && tls_has_pending(&s->server_tls))
        event_active(&s->ev_server, EV_READ, 0);
}

/* A held session's client closed its side (or reset). With nothing sent but a Terminate, it
 * has gone: end the session now rather than count it, and start a backend for it, when the
 * hold ends. Having sent a statement first, it half-closed: that runs after the hold, as on a
 * direct connection. */
static void session_on_held_client(evutil_socket_t fd, short what, void *arg)
{
    static const uint8_t terminate[PG_MSG_HEADER_LEN] = {PG_MSG_TERMINATE, 0, 0, 0, 4};
    session *s = arg;
    uint8_t peek[PG_MSG_HEADER_LEN + 1];
    (void)what;
    ssize_t n = s->client_tls.ssl ? tls_peek(&s->client_tls, peek, sizeof(peek))
                                  : recv(fd, peek, sizeof(peek), MSG_PEEK | MSG_DONTWAIT);
    bool only_terminate = n == (ssize_t)sizeof(terminate) &&
                          memcmp(peek, terminate, sizeof(terminate)) == 0;
    if ((n > 0 && !only_terminate) || (n < 0 && (errno == EAGAIN || errno == EINTR))) {
        s->client_hup_seen = true; /* stop watching: the close stays signalled */
        session_arm(s);
        return;
    }
    if (n < 0)
        s->client_reset = true;
    log_info("client %s: left while held (%s); closing", s->client_addr,
             s->phase == PHASE_HELD ? (s->waiting_leader ? "waiting for a write leader"
                                                         : "new session during pause")
                                    : "next statement held by pause");
    session_close(s, NULL, NULL);
}

/* The one timer of a session fires at the earliest of its deadlines. */
static void session_timer_rearm(session *s)
{
    const int64_t deadlines[] = {s->login_deadline_us, s->startup_deadline_us,
                                 s->connect_deadline_us,
                                 s->leader_wait_until_us, s->leader_poke_us,
                                 s->close_deadline_us};
    int64_t next = 0;
    for (size_t i = 0; i < sizeof(deadlines) / sizeof(deadlines[0]); i++)
        if (deadlines[i] && (!next || deadlines[i] < next))
            next = deadlines[i];
    if (s->timer_armed) {
        evtimer_del(&s->ev_timer);
        s->timer_armed = false;
    }
    if (!next)
        return;
    int64_t delta = next - worker_clock_us();
    if (delta < 0)
        delta = 0;
    struct timeval tv = {.tv_sec = delta / 1000000, .tv_usec = delta % 1000000};
    evtimer_add(&s->ev_timer, &tv);
    s->timer_armed = true;
}

static void session_on_timer(evutil_socket_t fd, short what, void *arg)
{
    session *s = arg;
    int64_t now = worker_clock_us();
    char msg[CONFIG_HOST_MAX + 128];
    (void)fd;
    (void)what;
    s->timer_armed = false;
    /* server_connect_timeout covers the TCP connect and the node's first answer to the
     * startup packet (a hung postmaster accepts connections in the kernel, then says nothing). */
    if (s->connect_deadline_us && s->phase == PHASE_RELAY &&
        (s->server_scan.messages > 0 || !pg_scan_at_boundary(&s->server_scan)))
        s->connect_deadline_us = 0; /* it answered */
    if (s->connect_deadline_us && now >= s->connect_deadline_us) {
        snprintf(msg, sizeof(msg), "could not connect to node %s: timed out%s",
                 s->slot->node_name,
                 s->phase == PHASE_RELAY ? " waiting for its answer to the startup packet" : "");
        log_warning("client %s: %s", s->client_addr, msg);
        if (!s->read_port)
            session_request_probe(worker_self);
        session_close(s, PG_SQLSTATE_CONNECTION_FAILURE, msg);
        return;
    }
    if (s->startup_deadline_us && now >= s->startup_deadline_us && s->phase == PHASE_STARTUP) {
        /* No startup packet: like the server, close without an answer. */
        log_info("client %s: no startup packet within client_startup_timeout; closing",
                 s->client_addr);
        session_close(s, NULL, NULL);
        return;
    }
    if (s->login_deadline_us && now >= s->login_deadline_us) {
        log_warning("client %s: login did not finish within client_login_timeout", s->client_addr);
        session_close(s, PG_SQLSTATE_PROTOCOL_VIOLATION,
                      "login timeout: startup and authentication took too long");
        return;
    }
    if (s->leader_wait_until_us && now >= s->leader_wait_until_us &&
        s->phase == PHASE_HELD && s->waiting_leader) {
        route_log_refusal(s->client_addr, "no write leader within no_leader_wait");
        session_close(s, PG_SQLSTATE_CANNOT_CONNECT_NOW,
                      "no write leader: none appeared within no_leader_wait");
        return;
    }
    if (s->leader_poke_us && now >= s->leader_poke_us) {
        /* Still no leader: a replica may have been promoted since the last probe. */
        s->leader_poke_us = 0;
        if (s->phase == PHASE_HELD && s->waiting_leader) {
            session_request_probe(worker_self);
            s->leader_poke_us = now + LEADER_WAIT_POKE_US;
        }
    }
    if (s->close_deadline_us && now >= s->close_deadline_us) {
        log_info("client %s: closing after leader_change_grace", s->client_addr);
        session_close(s, s->close_sqlstate ? s->close_sqlstate : PG_SQLSTATE_ADMIN_SHUTDOWN,
                      s->close_message ? s->close_message : "terminating connection");
        return;
    }
    session_timer_rearm(s);
}

/* Ask the agent (through the master) to probe now: the leader did not answer. */
static void session_request_probe(worker *w)
{
    int64_t now = worker_clock_us();
    if (now - w->last_probe_request_us > 100000) {
        w->last_probe_request_us = now;
        channel_send(w->channel_fd, CHANNEL_PROBE_NOW, 0);
    }
}

/* Route the session and start the non-blocking connection to its node. */
static void session_connect(session *s)
{
    worker *w = worker_self;
    char msg[CONFIG_HOST_MAX + 256];
    const char *sqlstate = NULL;
    int node = -1;

    worker_routes_refresh(w);
    route_result route = route_pick(w, s, &node, &sqlstate, msg, sizeof(msg));
    /* No write leader: a promoted replica is found at the agent's next probe, which a client
     * that wants one need not wait for (the master rate-limits these requests). */
    if (route != ROUTE_OK && !s->read_port)
        session_request_probe(w);
    switch (route) {
    case ROUTE_WAIT:
        if (!s->leader_wait_until_us)
            s->leader_wait_until_us = worker_clock_us() + (int64_t)route_leader_wait_ms(w) * 1000;
        s->phase = PHASE_HELD;
        s->waiting_leader = true;
        s->leader_poke_us = worker_clock_us() + LEADER_WAIT_POKE_US;
        s->login_deadline_us = 0;
        session_timer_rearm(s);
        session_arm(s);
        return;
    case ROUTE_REFUSE:
        route_log_refusal(s->client_addr, msg);
        session_close(s, sqlstate, msg);
        return;
    case ROUTE_OK:
        break;
    }
    s->waiting_leader = false;
    s->leader_wait_until_us = 0;
    s->leader_poke_us = 0;
    shm_node *n = &w->routes.nodes[node];
    if (n->addrlen == 0) {
        snprintf(msg, sizeof(msg), "could not connect to node %s (%s:%d): address not resolved",
                 n->name, n->host, n->port);
        log_warning("client %s: %s", s->client_addr, msg);
        session_close(s, PG_SQLSTATE_CONNECTION_FAILURE, msg);
        return;
    }
    int err = 0;
    s->sfd = net_connect_nonblock(&n->addr, n->addrlen, w->cfg->tcp_keepalive, &err);
    if (s->sfd < 0) {
        snprintf(msg, sizeof(msg), "could not connect to node %s (%s:%d): %s", n->name, n->host,
                 n->port, strerror(err));
        log_warning("client %s: %s", s->client_addr, msg);
        if (!s->read_port)
            session_request_probe(w);
        session_close(s, PG_SQLSTATE_CONNECTION_FAILURE, msg);
        return;
    }
    /* TLS toward the node: the SSL is made now, while the node's host name is at hand (SNI,
     * verify-full); the SSLRequest goes once the TCP connection is up. */
    s->server_tls_mode = w->cfg->server_tls_mode;
    for (int i = 0; i < w->cfg->n_nodes; i++)
        if (strcmp(w->cfg->nodes[i].name, n->name) == 0)
            s->server_tls_mode = config_node_server_tls(w->cfg, &w->cfg->nodes[i]);
    s->server_step = SERVER_STEP_CONNECT;
    if (s->server_tls_mode != SERVER_TLS_DISABLE &&
        tls_connect_begin(&s->server_tls, s->sfd, n->host, s->server_tls_mode) != 0) {
        snprintf(msg, sizeof(msg), "could not connect to node %s: cannot start TLS (out of "
                 "memory, or no TLS context toward nodes)", n->name);
        log_error("client %s: %s", s->client_addr, msg);
        session_close(s, PG_SQLSTATE_CONNECTION_FAILURE, msg);
        return;
    }
    shm_session_write_begin(s->slot);
    s->slot->node = node;
    s->slot->epoch = w->routes.epoch;
    copy_ident(s->slot->node_name, sizeof(s->slot->node_name), n->name);
    memcpy(&s->slot->node_addr, &n->addr, n->addrlen);
    s->slot->node_addrlen = n->addrlen;
    shm_session_write_end(s->slot);
    s->counter = shm_node_count_get(w->shm, n->name);
    if (s->counter)
        atomic_fetch_add(s->read_port ? &s->counter->read_sessions
                                      : &s->counter->write_sessions,
                         1);
    s->phase = PHASE_CONNECTING;
    s->connect_deadline_us = worker_clock_us() + (int64_t)w->cfg->server_connect_timeout_ms * 1000;
    session_timer_rearm(s);
    session_arm(s);
}

void session_reroute(session *s)
{
    if (s->phase != PHASE_CONNECTING)
        return;
    if (s->server_mask)
        event_del(&s->ev_server);
    s->server_mask = 0;
    close(s->sfd);
    s->sfd = -1;
    session_uncount(s);
    s->connect_deadline_us = 0;
    tls_close(&s->server_tls);
    s->server_step = SERVER_STEP_CONNECT;
    log_debug("client %s: routing changed while connecting; routing again", s->client_addr);
    session_connect(s);
}

/* The node is reached (and its TLS, if any, is up): the startup packet, then anything the
 * client sent after it, go to the node. */
static void session_start_relay(session *s)
{
    /* The callback of ev_server changes with the phase: registered afresh below. */
    if (s->server_mask) {
        event_del(&s->ev_server);
        s->server_mask = 0;
    }
    relay_init_scanners(s);
    s->to_server.buf = s->startup;
    s->to_server.off = 0;
    s->to_server.len = s->startup_have;
    s->startup = NULL;
    s->phase = PHASE_RELAY;
    if (relay_flush(s, &s->to_server, s->sfd) != 0) {
        session_close(s, PG_SQLSTATE_CONNECTION_FAILURE, "lost the connection to the node");
        return;
    }
    session_arm(s);
}

/* The node refused, broke or failed the TLS negotiation: 08006 with the reason, logged. */
static void session_server_tls_failed(session *s, const char *why)
{
    char msg[CONFIG_NAME_MAX + 512];
    snprintf(msg, sizeof(msg), "could not connect to node %s: %s", s->slot->node_name, why);
    log_warning("client %s: %s", s->client_addr, msg);
    session_close(s, PG_SQLSTATE_CONNECTION_FAILURE, msg);
}

static void session_server_tls_handshake(session *s)
{
    char why[300], desc[SHM_TLS_MAX], full[400];
    int rc = tls_handshake(&s->server_tls, why, sizeof(why));
    if (rc < 0) {
        snprintf(full, sizeof(full), "TLS handshake failed (server_tls_mode = %s): %s",
                 config_server_tls_word(s->server_tls_mode), why);
        session_server_tls_failed(s, full);
        return;
    }
    if (rc == 0) {
        session_arm(s);
        return;
    }
    tls_describe(&s->server_tls, desc, sizeof(desc));
    log_debug("client %s: TLS to node %s: %s", s->client_addr, s->slot->node_name, desc);
    session_start_relay(s);
}

/* One byte from the node after our SSLRequest: S (TLS follows) or N (no TLS there). */
static void session_server_tls_answer(session *s)
{
    uint8_t answer;
    ssize_t n = recv(s->sfd, &answer, 1, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n <= 0) {
        session_server_tls_failed(s, n == 0 ? "it closed the connection after SSLRequest"
                                            : strerror(errno));
        return;
    }
    if (answer == SSL_SUPPORTED) {
        s->server_step = SERVER_STEP_HANDSHAKE;
        session_server_tls_handshake(s);
        return;
    }
    if (answer == SSL_NOT_SUPPORTED && s->server_tls_mode == SERVER_TLS_PREFER) {
        tls_close(&s->server_tls); /* prefer: in clear, as libpq would */
        session_start_relay(s);
        return;
    }
    session_server_tls_failed(s, answer == SSL_NOT_SUPPORTED
                                     ? "the node does not accept TLS (it answered N to "
                                       "SSLRequest) and server_tls_mode requires it"
                                     : "invalid answer to SSLRequest");
}

static void session_on_connected(evutil_socket_t fd, short what, void *arg)
{
    static const uint8_t ssl_request[PG_STARTUP_MIN_LEN] = {0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f};
    session *s = arg;
    worker *w = worker_self;
    int err = 0;
    socklen_t len = sizeof(err);
    char msg[CONFIG_HOST_MAX + 256];
    (void)what;

    if (s->server_step == SERVER_STEP_ASKED) {
        session_server_tls_answer(s);
        return;
    }
    if (s->server_step == SERVER_STEP_HANDSHAKE) {
        session_server_tls_handshake(s);
        return;
    }
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
        err = errno;
    if (err != 0) {
        snprintf(msg, sizeof(msg), "could not connect to node %s: %s", s->slot->node_name,
                 strerror(err));
        log_warning("client %s: %s", s->client_addr, msg);
        if (!s->read_port)
            session_request_probe(w);
        session_close(s, PG_SQLSTATE_CONNECTION_FAILURE, msg);
        return;
    }
    shm_stat_add(&w->row->stats.server_connects, 1);
    /* connect_deadline_us stays until the node answers the startup packet (session_on_timer):
     * it bounds the TLS negotiation with the node too. */
    if (s->server_tls.ssl) {
        /* A fresh socket takes 8 bytes whole. */
        ssize_t sent = send(fd, ssl_request, sizeof(ssl_request), MSG_NOSIGNAL);
        if (sent != (ssize_t)sizeof(ssl_request)) {
            session_server_tls_failed(s, "cannot send SSLRequest");
            return;
        }
        s->server_step = SERVER_STEP_ASKED;
        session_arm(s);
        return;
    }
    session_start_relay(s);
}

#define SESSION_MSG_NEGOTIATE_VERSION 'v' /* B: NegotiateProtocolVersion */
#define SESSION_PROTOCOL_OPTION_PREFIX "_pq_." /* protocol extension options in a StartupMessage */

/* The client asked for protocol 3.1 or later (3.2 has variable-length cancel keys, which
 * pgrelay's cancel-key swap does not carry). Speak 3.0 with it, as a server that knows no
 * newer minor version would: rewrite the StartupMessage in place to ask the node for 3.0
 * without any _pq_ options, and answer the client with NegotiateProtocolVersion naming 3.0
 * and the options it asked for. Returns the new packet length, or 0 when the answer does not
 * fit (the session is then refused). */
static uint32_t session_negotiate_down(session *s, uint32_t len)
{
    uint8_t out[PG_STARTUP_MAX_LEN];
    uint8_t answer[PG_STARTUP_MAX_LEN + PG_MSG_HEADER_LEN + 8];
    uint32_t n_options = 0;
    size_t at = 8, alen = PG_MSG_HEADER_LEN + 8;
    const char *p = (const char *)s->startup + 8, *end = (const char *)s->startup + len - 1;

    /* Parameters were checked by pg_startup_parse: name\0value\0 pairs, then \0. */
    while (p < end) {
        size_t name_len = strlen(p), value_len = strlen(p + name_len + 1);
        size_t pair = name_len + 1 + value_len + 1;
        if (strncmp(p, SESSION_PROTOCOL_OPTION_PREFIX,
                    sizeof(SESSION_PROTOCOL_OPTION_PREFIX) - 1) == 0) {
            if (alen + name_len + 1 > sizeof(answer))
                return 0;
            memcpy(answer + alen, p, name_len + 1);
            alen += name_len + 1;
            n_options++;
        } else {
            memcpy(out + at, p, pair);
            at += pair;
        }
        p += pair;
    }
    out[at++] = '\0';
    pg_put_u32(out, (uint32_t)at);
    pg_put_u32(out + 4, PG_PROTOCOL_V3);
    memcpy(s->startup, out, at);

    answer[0] = SESSION_MSG_NEGOTIATE_VERSION;
    pg_put_u32(answer + 1, (uint32_t)(alen - 1));
    pg_put_u32(answer + PG_MSG_HEADER_LEN, PG_PROTOCOL_V3); /* the newest minor version: 0 */
    pg_put_u32(answer + PG_MSG_HEADER_LEN + 4, n_options);
    session_send_client(s, answer, alen);
    return (uint32_t)at;
}

/* The handshake with the client went on: finished, failed, or it waits for the socket. */
static void session_tls_handshake(session *s)
{
    char why[256];
    int rc = tls_handshake(&s->client_tls, why, sizeof(why));
    if (rc < 0) {
        log_warning("client %s: TLS handshake failed: %s", s->client_addr, why);
        session_close(s, NULL, NULL);
        return;
    }
    if (rc == 0) {
        session_arm(s);
        return;
    }
    /* PostgreSQL 17 refuses direct TLS without its ALPN protocol, so that a TLS client meant
     * for another service cannot be talked into speaking to a database. */
    if (s->direct_tls && !tls_alpn_is_postgresql(&s->client_tls)) {
        log_warning("client %s: direct TLS connection without the ALPN protocol "
                    "\"postgresql\"; closing", s->client_addr);
        session_close(s, PG_SQLSTATE_PROTOCOL_VIOLATION,
                      "received direct TLS connection request without ALPN protocol "
                      "negotiation extension \"postgresql\"");
        return;
    }
    char desc[SHM_TLS_MAX];
    bool ktls_send, ktls_recv;
    tls_describe(&s->client_tls, desc, sizeof(desc));
    tls_ktls_state(&s->client_tls, &ktls_send, &ktls_recv);
    shm_session_write_begin(s->slot);
    copy_ident(s->slot->tls, sizeof(s->slot->tls), desc);
    shm_session_write_end(s->slot);
    log_debug("client %s: %sTLS %s (kernel TLS: send %s, receive %s)", s->client_addr,
              s->direct_tls ? "direct " : "", desc, ktls_send ? "on" : "off",
              ktls_recv ? "on" : "off");
    session_arm(s);
}

/* Begin TLS on the client socket: after our 'S', or at a direct-TLS ClientHello. */
static void session_tls_start(session *s)
{
    if (tls_accept_begin(&s->client_tls, s->cfd) != 0) {
        log_error("client %s: cannot start TLS: out of memory", s->client_addr);
        session_close(s, NULL, NULL);
        return;
    }
    session_tls_handshake(s);
}

/* Refuse a login that client_tls_mode does not allow (NULL when it may go on). */
static const char *session_tls_refusal(session *s, const pg_startup *st, char *msg, size_t len)
{
    int mode = worker_self->cfg->client_tls_mode;
    if (mode >= CLIENT_TLS_REQUIRE && !s->client_tls.ssl) {
        snprintf(msg, len, "TLS required: client_tls_mode = %s and this connection is not "
                 "encrypted (connect with sslmode=require or stronger)",
                 mode == CLIENT_TLS_REQUIRE ? "require"
                 : mode == CLIENT_TLS_VERIFY_CA ? "verify-ca" : "verify-full");
        return msg;
    }
    if (mode == CLIENT_TLS_VERIFY_FULL) {
        char cn[SHM_IDENT_MAX];
        if (!tls_peer_common_name(&s->client_tls, cn, sizeof(cn))) {
            snprintf(msg, len, "certificate authentication failed for user \"%s\": the client "
                     "certificate has no usable common name", s->slot->user);
            return msg;
        }
        if (strcmp(cn, st->user) != 0) {
            char shown[SHM_IDENT_MAX];
            copy_ident(shown, sizeof(shown), cn);
            snprintf(msg, len, "certificate authentication failed for user \"%s\": the client "
                     "certificate's common name is \"%s\" (client_tls_mode = verify-full)",
                     s->slot->user, shown);
            return msg;
        }
    }
    return NULL;
}

/* A complete startup-phase packet is in s->startup[0..len). */
static void session_startup_packet(session *s, uint32_t len)
{
    worker *w = worker_self;
    pg_startup st;
    const char *err, *sqlstate;
    uint8_t no = SSL_NOT_SUPPORTED, yes = SSL_SUPPORTED;
    char tls_msg[SHM_IDENT_MAX * 2 + 160];

    if (pg_startup_parse(s->startup, len, &st, &err, &sqlstate) != 0) {
        log_warning("client %s: %s", s->client_addr, err);
        session_close(s, sqlstate, err);
        return;
    }
    switch (st.kind) {
    case PG_STARTUP_SSL:
    case PG_STARTUP_GSSENC:
        if (s->client_tls.ssl) {
            /* As the server: no second negotiation inside the encrypted channel. */
            log_warning("client %s: %s inside TLS; closing", s->client_addr,
                        st.kind == PG_STARTUP_SSL ? "SSLRequest" : "GSSENCRequest");
            session_close(s, PG_SQLSTATE_PROTOCOL_VIOLATION,
                          "encryption negotiation inside an encrypted connection");
            return;
        }
        s->startup_have = 0;
        if (st.kind == PG_STARTUP_SSL && tls_client_ctx()) {
            /* Sent in clear before any TLS byte is read: what the client sent after its
             * SSLRequest can only be read as TLS, never taken as plaintext. */
            session_send_client(s, &yes, 1);
            session_tls_start(s);
            return;
        }
        session_send_client(s, &no, 1);
        return;
    case PG_STARTUP_CANCEL:
        cancel_handle_request(w, st.cancel_pid, st.cancel_secret, s->client_addr, s->cfd);
        /* Inside TLS (libpq 17), no close_notify: the client takes the end of its cancel
         * connection for "done", which must wait for the node (cancel_on_done closes the
         * last copy of the socket), not come now. */
        tls_close_quietly(&s->client_tls);
        session_close(s, NULL, NULL);
        return;
    case PG_STARTUP_MESSAGE:
        break;
    }
    s->startup_deadline_us = 0;
    if (PG_PROTOCOL_MINOR(st.code) > 0) {
        log_debug("client %s: asked for protocol 3.%u; negotiating 3.0", s->client_addr,
                  PG_PROTOCOL_MINOR(st.code));
        len = session_negotiate_down(s, len);
        /* Parsed again: st's strings pointed into the packet the rewrite moved. */
        if (len == 0 || pg_startup_parse(s->startup, len, &st, &err, &sqlstate) != 0) {
            log_warning("client %s: cannot negotiate protocol 3.0", s->client_addr);
            session_close(s, PG_SQLSTATE_PROTOCOL_VIOLATION, "cannot negotiate protocol 3.0");
            return;
        }
        s->startup_have = len;
    }
    shm_session_write_begin(s->slot);
    copy_ident(s->slot->user, sizeof(s->slot->user), st.user);
    copy_ident(s->slot->database, sizeof(s->slot->database), st.database);
    copy_ident(s->slot->application_name, sizeof(s->slot->application_name),
               st.application_name ? st.application_name : "");
    shm_session_write_end(s->slot);
    const char *tls_refusal = session_tls_refusal(s, &st, tls_msg, sizeof(tls_msg));
    if (tls_refusal) {
        log_warning("client %s: refused: %s", s->client_addr, tls_refusal);
        session_close(s, SESSION_SQLSTATE_INVALID_AUTH, tls_refusal);
        return;
    }
    if (s->reject_sqlstate) {
        log_warning("client %s: refused: %s", s->client_addr, s->reject_message);
        session_close(s, s->reject_sqlstate, s->reject_message);
        return;
    }
    if (w->stop != WORKER_RUNNING) {
        session_close(s, PG_SQLSTATE_ADMIN_SHUTDOWN, "pgrelay is shutting down");
        return;
    }
    /* the cleaned copies: a name with a newline must not forge a log line */
    log_debug("client %s: user=%s database=%s", s->client_addr, s->slot->user,
              s->slot->database);
    s->startup_len = len;
    if (w->maintenance) {
        /* Held until resume: no login deadline meanwhile, the operator decides. */
        s->phase = PHASE_HELD;
        s->login_deadline_us = 0;
        session_timer_rearm(s);
        session_arm(s);
        return;
    }
    if (s->client_mask) {
        event_del(&s->ev_client);
        s->client_mask = 0;
    }
    session_connect(s);
}

void session_release_held(session *s)
{
    worker *w = worker_self;
    if (s->phase != PHASE_HELD)
        return;
    if (w->cfg->client_login_timeout_ms > 0)
        s->login_deadline_us = worker_clock_us() + (int64_t)w->cfg->client_login_timeout_ms * 1000;
    session_connect(s);
}

static void session_on_startup(evutil_socket_t fd, short what, void *arg)
{
    session *s = arg;
    (void)what;

    if (s->client_tls.ssl && !s->client_tls.handshaken) {
        session_tls_handshake(s);
        return;
    }
    if (s->startup_have == 0 && !s->client_tls.ssl && tls_client_ctx()) {
        /* Direct TLS (PostgreSQL 17's sslnegotiation=direct): a ClientHello where a startup
         * packet's length would begin (whose first byte, below 10000, is 0). Peeked, so that
         * OpenSSL reads the ClientHello whole. */
        uint8_t first;
        if (recv(fd, &first, 1, MSG_PEEK) == 1 && first == SESSION_TLS_RECORD_HANDSHAKE) {
            s->direct_tls = true;
            session_tls_start(s);
            return;
        }
    }
    if (!s->startup) {
        s->startup = malloc(PG_STARTUP_MAX_LEN);
        if (!s->startup) {
            session_close(s, PG_SQLSTATE_TOO_MANY_CONNECTIONS, "out of memory");
            return;
        }
    }
    /* Read no further than the current packet (every startup-phase packet is at least
     * PG_STARTUP_MIN_LEN long): after it the client waits for our answer. */
    long need = pg_startup_length(s->startup, s->startup_have);
    size_t want = need > 0 ? (size_t)need - s->startup_have : PG_STARTUP_MIN_LEN - s->startup_have;
    ssize_t n = conn_read(fd, &s->client_tls, s->startup + s->startup_have, want);
    if (n == 0) {
        session_close(s, NULL, NULL);
        return;
    }
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            log_debug("client %s: read error during startup: %s", s->client_addr,
                      strerror(errno));
            session_close(s, NULL, NULL);
            return;
        }
        if (s->client_tls.ssl)
            session_arm(s); /* OpenSSL may wait for the socket to be writable */
        return;
    }
    s->startup_have += (uint32_t)n;
    need = pg_startup_length(s->startup, s->startup_have);
    if (need < 0) {
        /* As the server does: logged, and closed without an answer (a client that queued a
         * Terminate before its startup packet, or that speaks another protocol, expects no
         * PostgreSQL error here). */
        log_warning("client %s: invalid length of startup packet (%u); closing",
                    s->client_addr, pg_get_u32(s->startup));
        session_close(s, NULL, NULL);
        return;
    }
    if (need > 0 && s->startup_have == (uint32_t)need) {
        session_startup_packet(s, (uint32_t)need);
        return;
    }
    if (tls_has_pending(&s->client_tls))
        event_active(&s->ev_client, EV_READ, 0); /* the rest is decrypted already */
}
