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

static void session_on_startup(evutil_socket_t fd, short what, void *arg);
static void session_on_connected(evutil_socket_t fd, short what, void *arg);
static void session_on_timer(evutil_socket_t fd, short what, void *arg);
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
    net_tune_socket(fd, w->cfg->tcp_keepalive);

    s->slot = shm_session_claim(w->shm, w->index, w->slot_hint);
    if (!s->slot) {
        /* Even the reserve slots are gone: nothing to do but close. */
        log_warning("client %s: no session slot left (max_client_conn = %d); closing",
                    s->client_addr, w->cfg->max_client_conn);
        close(fd);
        free(s);
        return;
    }
    uint32_t idx = (uint32_t)(s->slot - w->shm->sessions);
    w->slot_hint = idx + 1;
    if (atomic_load(&w->shm->clients) > w->cfg->max_client_conn) {
        s->reject_sqlstate = PG_SQLSTATE_TOO_MANY_CONNECTIONS;
        s->reject_message = "sorry, too many clients already (max_client_conn)";
    }
    cancel_key_issue(w, s->slot, idx, s->client_key);
    shm_session_write_begin(s->slot);
    copy_ident(s->slot->client_addr, sizeof(s->slot->client_addr), s->client_addr);
    s->slot->connected_at_us = shm_now_us();
    s->slot->read_port = read_port;
    shm_session_write_end(s->slot);

    event_assign(&s->ev_client, w->base, fd, EV_READ | EV_PERSIST, session_on_startup, s);
    event_add(&s->ev_client, NULL);
    s->client_mask = EV_READ;
    evtimer_assign(&s->ev_timer, w->base, session_on_timer, s);
    if (w->cfg->client_login_timeout_ms > 0)
        s->login_deadline_us = shm_now_us() + (int64_t)w->cfg->client_login_timeout_ms * 1000;
    session_timer_rearm(s);

    worker_session_added(w, s);
    shm_stat_add(&w->row->stats.sessions_total, 1);
    s->phase = PHASE_STARTUP;
}

/* Send bytes to the client without blocking; best effort for pgrelay's own short answers. */
static void session_send_client(session *s, const uint8_t *buf, size_t len)
{
    ssize_t n = send(s->cfd, buf, len, MSG_NOSIGNAL);
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
}

void session_close(session *s, const char *sqlstate, const char *message)
{
    worker *w = worker_self;
    if (sqlstate) {
        /* Only when nothing else is queued for the client would the error arrive intact. */
        if (s->to_client.len == s->to_client.off)
            session_send_error(s, "FATAL", sqlstate, message);
        shm_stat_add(&w->row->stats.errors, 1);
        if (s->counter)
            atomic_fetch_add_explicit(&s->counter->errors, 1, memory_order_relaxed);
    }
    /* Closing while a statement runs (the client left, or shutdown): cancel it so the backend
     * is freed now rather than when the statement ends. */
    if (s->phase == PHASE_RELAY && !s->server_gone && s->pending_syncs > 0 &&
        atomic_load(&s->slot->backend_valid))
        cancel_send(w, &s->slot->node_addr, s->slot->node_addrlen, s->slot->node_name,
                    s->slot->backend_pid, s->slot->backend_secret);

    session_uncount(s);
    if (s->client_mask)
        event_del(&s->ev_client);
    if (s->server_mask)
        event_del(&s->ev_server);
    if (s->timer_armed)
        evtimer_del(&s->ev_timer);
    free(s->close_message);
    close(s->cfd);
    if (s->sfd >= 0)
        close(s->sfd);
    free(s->to_server.buf);
    free(s->to_client.buf);
    free(s->startup);
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
        int64_t deadline = shm_now_us() + (int64_t)grace_ms * 1000;
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
        want_c = EV_READ;
        break;
    case PHASE_CONNECTING:
        want_s = EV_WRITE;
        break;
    case PHASE_HELD:
        break;
    case PHASE_RELAY:
        if (s->to_server.len == s->to_server.off &&
            !(w->maintenance && session_at_safe_point(s)))
            want_c |= EV_READ;
        else
            want_s |= EV_WRITE;
        if (s->to_client.len == s->to_client.off)
            want_s |= EV_READ;
        else
            want_c |= EV_WRITE;
        break;
    }
    if (want_c != s->client_mask) {
        if (s->client_mask)
            event_del(&s->ev_client);
        if (want_c) {
            event_assign(&s->ev_client, w->base, s->cfd, want_c | EV_PERSIST,
                         s->phase == PHASE_STARTUP ? session_on_startup : relay_on_client, s);
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
}

/* The one timer of a session fires at the earliest of its deadlines. */
static void session_timer_rearm(session *s)
{
    const int64_t deadlines[] = {s->login_deadline_us, s->connect_deadline_us,
                                 s->leader_wait_deadline_us, s->leader_poke_us,
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
    int64_t delta = next - shm_now_us();
    if (delta < 0)
        delta = 0;
    struct timeval tv = {.tv_sec = delta / 1000000, .tv_usec = delta % 1000000};
    evtimer_add(&s->ev_timer, &tv);
    s->timer_armed = true;
}

static void session_on_timer(evutil_socket_t fd, short what, void *arg)
{
    session *s = arg;
    int64_t now = shm_now_us();
    char msg[CONFIG_HOST_MAX + 128];
    (void)fd;
    (void)what;
    s->timer_armed = false;
    if (s->connect_deadline_us && now >= s->connect_deadline_us) {
        snprintf(msg, sizeof(msg), "could not connect to node %s: timed out",
                 s->slot->node_name);
        log_warning("client %s: %s", s->client_addr, msg);
        if (!s->read_port)
            session_request_probe(worker_self);
        session_close(s, PG_SQLSTATE_CONNECTION_FAILURE, msg);
        return;
    }
    if (s->login_deadline_us && now >= s->login_deadline_us) {
        log_warning("client %s: login did not finish within client_login_timeout", s->client_addr);
        session_close(s, PG_SQLSTATE_PROTOCOL_VIOLATION,
                      "login timeout: startup and authentication took too long");
        return;
    }
    if (s->leader_wait_deadline_us && now >= s->leader_wait_deadline_us &&
        s->phase == PHASE_HELD && s->waiting_leader) {
        log_warning("client %s: no write leader within no_leader_wait", s->client_addr);
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
    int64_t now = shm_now_us();
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
        if (!s->leader_wait_deadline_us)
            s->leader_wait_deadline_us =
                shm_now_us() + (int64_t)w->cfg->no_leader_wait_ms * 1000;
        s->phase = PHASE_HELD;
        s->waiting_leader = true;
        s->leader_poke_us = shm_now_us() + LEADER_WAIT_POKE_US;
        s->login_deadline_us = 0;
        session_timer_rearm(s);
        session_arm(s);
        return;
    case ROUTE_REFUSE:
        log_warning("client %s: %s", s->client_addr, msg);
        session_close(s, sqlstate, msg);
        return;
    case ROUTE_OK:
        break;
    }
    s->waiting_leader = false;
    s->leader_wait_deadline_us = 0;
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
    s->connect_deadline_us = shm_now_us() + (int64_t)w->cfg->server_connect_timeout_ms * 1000;
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
    log_debug("client %s: routing changed while connecting; routing again", s->client_addr);
    session_connect(s);
}

static void session_on_connected(evutil_socket_t fd, short what, void *arg)
{
    session *s = arg;
    worker *w = worker_self;
    int err = 0;
    socklen_t len = sizeof(err);
    char msg[CONFIG_HOST_MAX + 256];
    (void)what;

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
    s->connect_deadline_us = 0;
    session_timer_rearm(s);

    /* The startup packet, then anything the client sent after it, go to the server. */
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

/* A complete startup-phase packet is in s->startup[0..len). */
static void session_startup_packet(session *s, uint32_t len)
{
    worker *w = worker_self;
    pg_startup st;
    const char *err, *sqlstate;
    uint8_t no = SSL_NOT_SUPPORTED;

    if (pg_startup_parse(s->startup, len, &st, &err, &sqlstate) != 0) {
        log_warning("client %s: %s", s->client_addr, err);
        session_close(s, sqlstate, err);
        return;
    }
    switch (st.kind) {
    case PG_STARTUP_SSL:
    case PG_STARTUP_GSSENC:
        session_send_client(s, &no, 1);
        s->startup_have = 0;
        return;
    case PG_STARTUP_CANCEL:
        cancel_handle_request(w, st.cancel_pid, st.cancel_secret, s->client_addr);
        session_close(s, NULL, NULL);
        return;
    case PG_STARTUP_MESSAGE:
        break;
    }
    shm_session_write_begin(s->slot);
    copy_ident(s->slot->user, sizeof(s->slot->user), st.user);
    copy_ident(s->slot->database, sizeof(s->slot->database), st.database);
    copy_ident(s->slot->application_name, sizeof(s->slot->application_name),
               st.application_name ? st.application_name : "");
    shm_session_write_end(s->slot);
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
        s->login_deadline_us = shm_now_us() + (int64_t)w->cfg->client_login_timeout_ms * 1000;
    session_connect(s);
}

static void session_on_startup(evutil_socket_t fd, short what, void *arg)
{
    session *s = arg;
    (void)what;

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
    ssize_t n = recv(fd, s->startup + s->startup_have, want, 0);
    if (n == 0) {
        session_close(s, NULL, NULL);
        return;
    }
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            log_debug("client %s: read error during startup: %s", s->client_addr,
                      strerror(errno));
            session_close(s, NULL, NULL);
        }
        return;
    }
    s->startup_have += (uint32_t)n;
    need = pg_startup_length(s->startup, s->startup_have);
    if (need < 0) {
        log_warning("client %s: invalid startup packet length %u", s->client_addr,
                    pg_get_u32(s->startup));
        session_close(s, PG_SQLSTATE_PROTOCOL_VIOLATION, "invalid startup packet length");
        return;
    }
    if (need > 0 && s->startup_have == (uint32_t)need)
        session_startup_packet(s, (uint32_t)need);
}
