/* probe.c - health checks: one persistent non-blocking libpq connection per node.
 *
 * Every health_interval each idle node gets a probe: (re)connect if needed, then one query that
 * reads pg_is_in_recovery(), the WAL position (current on a primary, replayed on a replica),
 * the age of the last replayed transaction, and a replica's WAL receiver (streaming or not, its
 * timeline and received position). health_timeout bounds connect + query. A node is
 * down after `fall` failed probes in a row and up again after `rise` good ones.
 */
#include "agent.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern agent *agent_self;

/* Columns: in recovery; WAL position (current, or replayed); age of the last replayed
 * transaction in ms (-1 when none was replayed since the replica started); a replica's WAL
 * receiver: 1 streaming, 0 none or not streaming (status is hidden from a monitor_user without
 * pg_read_all_stats: then a receiver that exists counts as streaming); the timeline (a
 * primary's current one, a replica's received one; 0 when hidden); the received WAL position
 * (0 on a primary). */
static const char PROBE_SQL[] =
    "SELECT pg_is_in_recovery(), "
    "(CASE WHEN pg_is_in_recovery() THEN coalesce(pg_last_wal_replay_lsn(), '0/0') "
    "ELSE pg_current_wal_lsn() END - '0/0')::bigint, "
    "CASE WHEN pg_is_in_recovery() THEN coalesce((extract(epoch FROM now() - "
    "pg_last_xact_replay_timestamp()) * 1000)::bigint, -1) ELSE 0 END, "
    "CASE WHEN pg_is_in_recovery() THEN coalesce((SELECT (pid IS NOT NULL AND "
    "coalesce(status, 'streaming') = 'streaming')::int FROM pg_stat_wal_receiver), 0) "
    "ELSE 0 END, "
    "CASE WHEN pg_is_in_recovery() THEN coalesce((SELECT received_tli FROM "
    "pg_stat_wal_receiver), 0) "
    "ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, "
    "(coalesce(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() END, '0/0') "
    "- '0/0')::bigint";

#define PROBE_COLUMNS 6

/* A node's monitoring connection is used for this many probes, then opened afresh. */
#define PROBE_FRESH_EVERY 10

static void probe_on_io(evutil_socket_t fd, short what, void *arg);

/* Notices on a monitoring connection (e.g. "terminating connection due to immediate shutdown")
 * go to the log, not raw to stderr. */
static void probe_notice(void *arg, const char *message)
{
    agent_node *n = arg;
    char line[256];
    size_t len = strcspn(message, "\n");
    if (len >= sizeof(line))
        len = sizeof(line) - 1;
    memcpy(line, message, len);
    line[len] = '\0';
    log_info("node %s says: %s", n->view.name, line);
}

void probe_node_detach(agent_node *n)
{
    if (n->sock >= 0)
        event_del(&n->ev_io);
    n->sock = -1;
    n->io_what = 0;
    evtimer_del(&n->ev_timeout);
    n->state = PROBE_IDLE;
}

void probe_node_close(agent_node *n)
{
    probe_node_detach(n);
    if (n->conn)
        PQfinish(n->conn);
    n->conn = NULL;
}

/* Wait for `what` on the connection's socket (libpq may change sockets while connecting). */
static void probe_watch(agent_node *n, short what)
{
    int sock = PQsocket(n->conn);
    if (n->sock >= 0)
        event_del(&n->ev_io);
    n->sock = sock;
    n->io_what = what;
    if (sock < 0)
        return;
    event_assign(&n->ev_io, agent_self->base, sock, what, probe_on_io, n);
    event_add(&n->ev_io, NULL);
}

/* The first line of a libpq error message, for logs and show nodes. */
static void first_line(char *dst, size_t cap, const char *msg)
{
    size_t len = strcspn(msg, "\n");
    if (len >= cap)
        len = cap - 1;
    memcpy(dst, msg, len);
    dst[len] = '\0';
}

static void probe_finish_as(agent_node *n, bool ok, bool timed_out, const char *error);

static void probe_finish(agent_node *n, bool ok, const char *error)
{
    probe_finish_as(n, ok, false, error);
}

static void probe_finish_as(agent_node *n, bool ok, bool timed_out, const char *error)
{
    agent *a = agent_self;
    evtimer_del(&n->ev_timeout);
    n->probed = true;
    n->view.last_probe_us = shm_mono_us();
    if (ok) {
        n->last_ok = true;
        n->fails = 0;
        n->slow_logged = false;
        n->oks++;
        n->view.last_error[0] = '\0';
        if (n->view.health == NODE_HEALTH_UNKNOWN ||
            (n->view.health == NODE_HEALTH_DOWN && n->oks >= a->cfg->rise)) {
            if (n->view.health == NODE_HEALTH_DOWN)
                log_info("node %s is up (%d good probes)", n->view.name, n->oks);
            n->view.health = NODE_HEALTH_UP;
        }
        n->state = PROBE_IDLE;
    } else {
        char msg[sizeof(n->view.last_error)];
        first_line(msg, sizeof(msg), error && *error ? error : "probe failed");
        if (n->last_ok || strcmp(msg, n->view.last_error) != 0)
            log_warning("node %s: probe failed: %s", n->view.name, msg);
        memcpy(n->view.last_error, msg, sizeof(msg));
        n->last_ok = false;
        n->oks = 0;
        n->fails_are_timeouts = (n->fails == 0 || n->fails_are_timeouts) && timed_out;
        n->fails++;
        if (n->fails >= a->cfg->fall && n->view.health != NODE_HEALTH_DOWN) {
            log_warning("node %s is down (%d failed probes)", n->view.name, n->fails);
            n->view.health = NODE_HEALTH_DOWN;
        }
        probe_node_close(n); /* reconnect on the next probe */
    }
    leader_decide(a);
}

static void probe_on_timeout(evutil_socket_t fd, short what, void *arg)
{
    agent_node *n = arg;
    char msg[96];
    (void)fd;
    (void)what;
    snprintf(msg, sizeof(msg), "no answer within health_timeout (%d ms)",
             agent_self->cfg->health_timeout_ms);
    probe_finish_as(n, false, true, msg);
}

static void probe_send(agent_node *n)
{
    if (!PQsendQuery(n->conn, PROBE_SQL)) {
        probe_finish(n, false, PQerrorMessage(n->conn));
        return;
    }
    n->state = PROBE_QUERYING;
    int f = PQflush(n->conn);
    if (f < 0) {
        probe_finish(n, false, PQerrorMessage(n->conn));
        return;
    }
    probe_watch(n, f == 1 ? (EV_READ | EV_WRITE) : EV_READ);
}

/* Read whatever results are complete; returns true when the probe is finished (either way). */
static bool probe_read(agent_node *n)
{
    bool got_row = false, in_recovery = false, streaming = false;
    long long lsn = 0, age = -1, timeline = 0, received = 0;
    const char *error = NULL;
    char errbuf[256];

    while (!PQisBusy(n->conn)) {
        PGresult *res = PQgetResult(n->conn);
        if (!res) {
            if (error) {
                probe_finish(n, false, errbuf);
            } else if (!got_row) {
                probe_finish(n, false, "probe query returned no row");
            } else {
                int64_t now = shm_mono_us();
                n->in_recovery = in_recovery;
                n->lsn = (uint64_t)lsn;
                n->replay_age_ms = age;
                n->streaming = streaming;
                n->timeline = (uint32_t)timeline;
                if ((uint64_t)received != n->receive_lsn || !n->receive_moved_us)
                    n->receive_moved_us = now;
                n->receive_lsn = (uint64_t)received;
                if (n->index == agent_self->leader && !in_recovery)
                    leader_record_lsn(agent_self, now, n->lsn);
                probe_finish(n, true, NULL);
            }
            return true;
        }
        if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
            PQnfields(res) == PROBE_COLUMNS) {
            got_row = true;
            in_recovery = PQgetvalue(res, 0, 0)[0] == 't';
            lsn = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
            age = strtoll(PQgetvalue(res, 0, 2), NULL, 10);
            streaming = strtoll(PQgetvalue(res, 0, 3), NULL, 10) == 1;
            timeline = strtoll(PQgetvalue(res, 0, 4), NULL, 10);
            received = strtoll(PQgetvalue(res, 0, 5), NULL, 10);
        } else if (!error) {
            first_line(errbuf, sizeof(errbuf), PQresultErrorMessage(res));
            error = errbuf;
        }
        PQclear(res);
    }
    return false;
}

static void probe_on_io(evutil_socket_t fd, short what, void *arg)
{
    agent_node *n = arg;
    (void)fd;
    n->sock = -1; /* the event was one-shot */
    if (n->state == PROBE_CONNECTING) {
        switch (PQconnectPoll(n->conn)) {
        case PGRES_POLLING_READING:
            probe_watch(n, EV_READ);
            return;
        case PGRES_POLLING_WRITING:
            probe_watch(n, EV_WRITE);
            return;
        case PGRES_POLLING_OK:
            probe_send(n);
            return;
        default:
            probe_finish(n, false, PQerrorMessage(n->conn));
            return;
        }
    }
    if (n->state != PROBE_QUERYING)
        return;
    if (what & EV_WRITE) {
        int f = PQflush(n->conn);
        if (f < 0) {
            probe_finish(n, false, PQerrorMessage(n->conn));
            return;
        }
        if (f == 1) {
            probe_watch(n, EV_READ | EV_WRITE);
            return;
        }
    }
    if ((what & EV_READ) && !PQconsumeInput(n->conn)) {
        probe_finish(n, false, PQerrorMessage(n->conn));
        return;
    }
    if (!probe_read(n))
        probe_watch(n, EV_READ);
}

/* Start a probe of one node: reuse its connection, or open a new one. Every
 * PROBE_FRESH_EVERY-th probe, and when `fresh`, the connection is new: a persistent one keeps
 * answering while the postmaster hangs and no new session could connect. */
static void probe_start(agent *a, agent_node *n, bool fresh)
{
    const config_node *c = &a->cfg->nodes[n->index];
    char port[16], timeout[16];

    /* Not one whose query is still out (a reload detached its probe): its answer would come
     * first. */
    if (n->conn && (PQstatus(n->conn) != CONNECTION_OK || fresh ||
                    PQtransactionStatus(n->conn) != PQTRANS_IDLE ||
                    ++n->probes_on_conn >= PROBE_FRESH_EVERY))
        probe_node_close(n);
    if (!n->conn)
        n->probes_on_conn = 0;
    n->started_us = shm_mono_us();
    struct timeval tv = {a->cfg->health_timeout_ms / 1000,
                         (a->cfg->health_timeout_ms % 1000) * 1000};
    evtimer_assign(&n->ev_timeout, a->base, probe_on_timeout, n);
    evtimer_add(&n->ev_timeout, &tv);
    if (n->conn) {
        probe_send(n);
        return;
    }
    snprintf(port, sizeof(port), "%d", c->port);
    /* libpq's own connect_timeout (whole seconds, at least 2) is only a backstop. */
    snprintf(timeout, sizeof(timeout), "%d", a->cfg->health_timeout_ms / 1000 + 2);
    /* TLS as the proxy's sessions speak it to this node (server_tls_* in [pgrelay]); an
     * empty file name is libpq's default, which verify-* never meets (the CA is required). */
    const char *keys[] = {"host",     "port",           "user",  "password", "dbname",
                          "connect_timeout", "application_name", "sslmode", "sslrootcert",
                          "sslcert", "sslkey", NULL};
    const char *vals[] = {c->host,
                          port,
                          c->monitor_user[0] ? c->monitor_user : a->cfg->monitor_user,
                          c->monitor_password[0] ? c->monitor_password
                                                 : a->cfg->monitor_password,
                          c->monitor_dbname[0] ? c->monitor_dbname : a->cfg->monitor_dbname,
                          timeout,
                          "pgrelay-agent",
                          config_server_tls_word(config_node_server_tls(a->cfg, c)),
                          a->cfg->server_tls_ca_file[0] ? a->cfg->server_tls_ca_file : NULL,
                          a->cfg->server_tls_cert_file[0] ? a->cfg->server_tls_cert_file : NULL,
                          a->cfg->server_tls_key_file[0] ? a->cfg->server_tls_key_file : NULL,
                          NULL};
    n->conn = PQconnectStartParams(keys, vals, 0);
    if (!n->conn || PQstatus(n->conn) == CONNECTION_BAD) {
        probe_finish(n, false, n->conn ? PQerrorMessage(n->conn) : "out of memory");
        return;
    }
    PQsetnonblocking(n->conn, 1);
    PQsetNoticeProcessor(n->conn, probe_notice, n);
    n->state = PROBE_CONNECTING;
    probe_watch(n, EV_WRITE); /* libpq: behave as if PQconnectPoll said WRITING */
}

void probe_all(agent *a)
{
    for (int i = 0; i < a->n_nodes; i++)
        if (a->nodes[i].state == PROBE_IDLE)
            probe_start(a, &a->nodes[i], false);
}

void probe_all_fresh(agent *a)
{
    for (int i = 0; i < a->n_nodes; i++)
        if (a->nodes[i].state == PROBE_IDLE)
            probe_start(a, &a->nodes[i], true);
}
