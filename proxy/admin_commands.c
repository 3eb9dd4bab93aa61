/* admin_commands.c - the admin console's command table, its line parser and the handlers.
 *
 * Commands live in one table (words, arguments, help, level, handler). A `show` handler builds
 * JSON; the table form is rendered from that same JSON (admin_render.c), so both forms always
 * agree.
 */
#include "admin_console.h"
#include "config.h"
#include "log.h"
#include "master.h"
#include "shm.h"
#include "utf8.h"

#include <ctype.h>
#include <stdarg.h>
#include <errno.h>
#include <event2/buffer.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define ADMIN_MAX_ARGS   16
#define ADMIN_STMT_SHOWN 60   /* statement characters in the table form of show clients */
/* A string from a fixed array that the configuration file, a node or a client filled: valid
 * UTF-8 in the answer whatever its bytes (jansson refuses anything else). */
#define ADMIN_FIELD_TEXT(array) admin_json_text((array), sizeof(array), 0)
#define ADMIN_STMT_HIDDEN "<insufficient privilege>" /* statement text below operator level */

/* What a handler gets: its arguments and where to put the answer. */
typedef struct admin_call {
    admin_session *sess;
    master *m;
    int argc;          /* arguments after the command words */
    char **argv;
    bool json;         /* a trailing "json" was given */
    struct evbuffer *out;
} admin_call;

/* A handler returns 0 with its answer written (or *result set for show commands), or -1 with
 * an error message written with admin_error(). */
typedef int (*admin_handler)(admin_call *call, json_t **result);

typedef struct admin_command {
    const char *words;   /* "show clients" */
    const char *args;    /* argument synopsis for help, "" when none */
    const char *help;    /* one line */
    admin_level level;   /* least level allowed */
    bool has_json;       /* accepts a trailing "json" */
    admin_handler handler;
} admin_command;

const char *admin_level_name(admin_level level)
{
    static const char *const names[] = {"user", "operator", "admin"};
    return level >= ADMIN_LEVEL_USER && level <= ADMIN_LEVEL_ADMIN ? names[level] : "none";
}

static void admin_error(admin_call *call, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void admin_error(admin_call *call, const char *fmt, ...)
{
    va_list ap;
    evbuffer_add_printf(call->out, "error: ");
    va_start(ap, fmt);
    evbuffer_add_vprintf(call->out, fmt, ap);
    va_end(ap);
    evbuffer_add_printf(call->out, "\n");
}

/* ---- helpers for the show commands ---- */

static void iso_time(int64_t us, char *buf, size_t len)
{
    time_t t = (time_t)(us / 1000000);
    struct tm tm;
    localtime_r(&t, &tm);
    strftime(buf, len, "%Y-%m-%d %H:%M:%S", &tm);
}

static json_t *json_time(int64_t us)
{
    char buf[32];
    if (us == 0)
        return json_null();
    iso_time(us, buf, sizeof(buf));
    return json_string(buf);
}

static const char *session_state_name(uint32_t state)
{
    switch (state) {
    case SESSION_STARTUP:
        return "startup";
    case SESSION_IDLE:
        return "idle";
    case SESSION_ACTIVE:
        return "active";
    case SESSION_IN_TX:
        return "in transaction";
    default:
        return "free";
    }
}

static const char *health_name(int health)
{
    switch (health) {
    case NODE_HEALTH_UP:
        return "up";
    case NODE_HEALTH_DOWN:
        return "down";
    default:
        return "unknown";
    }
}

/* ---- handlers ---- */

static const admin_command admin_commands[];
static const size_t admin_n_commands;

static int cmd_help(admin_call *call, json_t **result)
{
    (void)result;
    for (size_t i = 0; i < admin_n_commands; i++) {
        const admin_command *c = &admin_commands[i];
        if (c->level > call->sess->level)
            continue;
        char synopsis[128];
        snprintf(synopsis, sizeof(synopsis), "%s%s%s%s", c->words, c->args[0] ? " " : "",
                 c->args, c->has_json ? " [json]" : "");
        evbuffer_add_printf(call->out, "  %-28s %s (%s)\n", synopsis, c->help,
                            admin_level_name(c->level));
    }
    return 0;
}

/* A copy of the routing table in force (malloc'd: it is large), or NULL after an error line. */
static shm_route_table *admin_routes(admin_call *call)
{
    shm_route_table *routes = malloc(sizeof(*routes));
    if (!routes) {
        admin_error(call, "out of memory");
        return NULL;
    }
    shm_routes_read(call->m->shm, routes);
    return routes;
}

/* Does node i answer as a primary (probed, up, not in recovery)? */
static bool admin_node_says_primary(const shm_route_table *routes, uint32_t i)
{
    const shm_node *n = &routes->nodes[i];
    return n->probed && n->health == NODE_HEALTH_UP && !n->in_recovery;
}

/* Split brain: more than one node answers as a primary. The names of all of them go into
 * names (comma-separated); returns how many there are when more than one, else 0. */
static int admin_split_brain(const shm_route_table *routes, char *names, size_t len)
{
    int count = 0;
    size_t used = 0;
    names[0] = '\0';
    for (uint32_t i = 0; i < routes->n_nodes; i++) {
        if (!admin_node_says_primary(routes, i))
            continue;
        if (used < len)
            used += (size_t)snprintf(names + used, len - used, "%s%s", count ? "," : "",
                                     routes->nodes[i].name);
        count++;
    }
    return count > 1 ? count : 0;
}

static int cmd_show_info(admin_call *call, json_t **result)
{
    master *m = call->m;
    shm_route_table *routes = admin_routes(call);
    if (!routes)
        return -1;
    int alive = 0;
    for (int i = 0; i < m->n_workers; i++)
        alive += m->children[i].pid != 0;
    json_t *o = json_object();
    char primaries[CONFIG_MAX_NODES * CONFIG_NAME_MAX];
    bool split = admin_split_brain(routes, primaries, sizeof(primaries)) > 0;
    json_object_set_new(o, "version", json_string(PGRELAY_VERSION));
    json_object_set_new(o, "pid", json_integer(getpid()));
    json_object_set_new(o, "started", json_time(m->started_us));
    json_object_set_new(o, "uptime_s", json_integer((shm_mono_us() - m->started_us) / 1000000));
    json_object_set_new(o, "config_file", admin_json_text(m->cfg->path, sizeof(m->cfg->path), 0));
    json_object_set_new(o, "listen_addr", admin_json_text(m->cfg->listen_addr, sizeof(m->cfg->listen_addr), 0));
    json_object_set_new(o, "listen_port", json_integer(m->cfg->listen_port));
    /* the read-only port listens on listen_addr too; null when there is none */
    json_object_set_new(o, "read_listen_port", m->cfg->read_listen_port
                                                   ? json_integer(m->cfg->read_listen_port)
                                                   : json_null());
    json_object_set_new(o, "http_listen_port", m->cfg->http_listen_port
                                                   ? json_integer(m->cfg->http_listen_port)
                                                   : json_null());
    json_object_set_new(o, "workers", json_integer(m->n_workers));
    json_object_set_new(o, "workers_running", json_integer(alive));
    json_object_set_new(o, "clients", json_integer(atomic_load(&m->shm->clients)));
    json_object_set_new(o, "max_client_conn", json_integer(m->cfg->max_client_conn));
    pid_t agent_pid = m->n_children > m->n_workers ? m->children[m->n_workers].pid : 0;
    json_object_set_new(o, "agent", !m->cfg->agent ? json_string("off")
                                    : agent_pid    ? json_integer(agent_pid)
                                                   : json_string("restarting"));
    json_object_set_new(o, "epoch", json_integer((json_int_t)routes->epoch));
    json_object_set_new(o, "write_leader",
                        routes->leader >= 0 ? ADMIN_FIELD_TEXT(routes->nodes[routes->leader].name)
                                            : json_null());
    /* the nodes that all answer as primary, null when at most one does */
    json_object_set_new(o, "split_brain", split ? ADMIN_FIELD_TEXT(primaries) : json_null());
    json_object_set_new(o, "maintenance",
                        json_string(atomic_load(&m->shm->maintenance) ? "on" : "off"));
    json_object_set_new(o, "maintenance_since",
                        json_time(atomic_load(&m->shm->maintenance_since_us)));
    json_object_set_new(o, "maintenance_until",
                        json_time(atomic_load(&m->shm->maintenance_until_us)));
    json_object_set_new(o, "reloads", json_integer((json_int_t)atomic_load(&m->shm->reloads)));
    /* the control plane's proxy option read_only: the write port routes as the read port */
    json_object_set_new(o, "read_only_role", json_boolean(atomic_load(&m->shm->read_only_role)));
    json_object_set_new(o, "shutting_down", json_boolean(m->stop != MASTER_RUNNING));
    free(routes);
    *result = o;
    return 0;
}

static int cmd_show_workers(admin_call *call, json_t **result)
{
    master *m = call->m;
    json_t *rows = json_array();
    for (int i = 0; i < m->n_workers; i++) {
        shm_worker *w = &m->shm->workers[i];
        json_t *r = json_object();
        json_object_set_new(r, "worker", json_integer(i));
        json_object_set_new(r, "pid", m->children[i].pid ? json_integer(m->children[i].pid)
                                                         : json_null());
        json_object_set_new(r, "started", json_time(m->children[i].pid ? w->started_at_us : 0));
        json_object_set_new(r, "sessions", json_integer(atomic_load(&w->sessions)));
        json_object_set_new(r, "restarts", json_integer(w->restarts));
        json_array_append_new(rows, r);
    }
    *result = rows;
    return 0;
}

static int cmd_show_clients(admin_call *call, json_t **result)
{
    master *m = call->m;
    shm_session snap;
    int64_t now = shm_mono_us();
    json_t *rows = json_array();
    for (uint32_t i = 0; i < m->shm->max_sessions; i++) {
        if (atomic_load_explicit(&m->shm->sessions[i].state, memory_order_relaxed) ==
            SESSION_FREE)
            continue;
        if (!shm_session_snapshot(&m->shm->sessions[i], &snap))
            continue;
        json_t *r = json_object();
        uint32_t state = atomic_load(&snap.state);
        json_object_set_new(r, "id", json_integer((json_int_t)snap.id));
        json_object_set_new(r, "worker", json_integer(snap.worker));
        json_object_set_new(r, "client",
                            admin_json_text(snap.client_addr, sizeof(snap.client_addr), 0));
        json_object_set_new(r, "user", admin_json_text(snap.user, sizeof(snap.user), 0));
        json_object_set_new(r, "database",
                            admin_json_text(snap.database, sizeof(snap.database), 0));
        json_object_set_new(r, "application_name",
                            admin_json_text(snap.application_name,
                                            sizeof(snap.application_name), 0));
        json_object_set_new(r, "port", json_string(snap.read_port ? "read" : "write"));
        /* TLS version and cipher of the client's connection; null in clear. */
        json_object_set_new(r, "tls", snap.tls[0] ? admin_json_text(snap.tls, sizeof(snap.tls), 0)
                                                  : json_null());
        json_object_set_new(r, "node", snap.node_name[0] ? admin_json_text(snap.node_name,
                                                                           sizeof(snap.node_name), 0)
                                                         : json_null());
        json_object_set_new(r, "state", json_string(session_state_name(state)));
        json_object_set_new(r, "connected_s",
                            json_integer((now - snap.connected_at_us) / 1000000));
        json_object_set_new(r, "statement_ms",
                            snap.stmt_start_us ? json_integer((now - snap.stmt_start_us) / 1000)
                                               : json_null());
        /* Statement text is the client's bytes, cut wherever SHM_STMT_MAX fell. It may hold
         * secrets (ALTER ROLE ... PASSWORD), so, as pg_stat_activity without
         * pg_read_all_stats, the stats level does not see it. */
        json_object_set_new(r, "statement",
                            call->sess->level < ADMIN_LEVEL_OPERATOR
                                ? json_string(ADMIN_STMT_HIDDEN)
                                : admin_json_text(snap.stmt, sizeof(snap.stmt),
                                                  call->json ? 0 : ADMIN_STMT_SHOWN));
        json_array_append_new(rows, r);
    }
    *result = rows;
    return 0;
}

/* Mean latency in milliseconds of `completed` statements that took `latency_us` in all (a
 * statement: first message to the ReadyForQuery that ends it); null before the first. */
static json_t *avg_latency_ms(uint64_t latency_us, uint64_t completed)
{
    return completed ? json_real((double)latency_us / 1000.0 / (double)completed) : json_null();
}

static int cmd_show_nodes(admin_call *call, json_t **result)
{
    master *m = call->m;
    shm_route_table *routes = admin_routes(call);
    if (!routes)
        return -1;
    int64_t now = shm_mono_us();
    json_t *rows = json_array();
    char primaries[CONFIG_MAX_NODES * CONFIG_NAME_MAX];
    bool split = admin_split_brain(routes, primaries, sizeof(primaries)) > 0;
    for (uint32_t n = 0; n < routes->n_nodes; n++) {
        const shm_node *node = &routes->nodes[n];
        shm_node_count *count = shm_node_count_get(m->shm, node->name);
        json_t *r = json_object();
        json_object_set_new(r, "name", ADMIN_FIELD_TEXT(node->name));
        json_object_set_new(r, "host", ADMIN_FIELD_TEXT(node->host));
        json_object_set_new(r, "port", json_integer(node->port));
        json_object_set_new(r, "role", json_string(shm_node_role_name(routes, n)));
        json_object_set_new(r, "health", json_string(health_name(node->health)));
        json_object_set_new(r, "leader", json_boolean((int32_t)n == routes->leader));
        /* it answers as a primary, and so does another node */
        json_object_set_new(r, "split_brain",
                            json_boolean(split && admin_node_says_primary(routes, n)));
        json_object_set_new(r, "readable", json_boolean(node->readable));
        json_object_set_new(r, "lag_bytes",
                            node->lag_bytes >= 0 ? json_integer(node->lag_bytes) : json_null());
        json_object_set_new(r, "lag_ms", node->probed && node->in_recovery
                                             ? json_integer(node->lag_ms)
                                             : json_null());
        json_object_set_new(r, "write_sessions",
                            json_integer(count ? atomic_load(&count->write_sessions) : 0));
        json_object_set_new(r, "read_sessions",
                            json_integer(count ? atomic_load(&count->read_sessions) : 0));
        /* Traffic since start (sessions add theirs at each statement's end and at close). */
        shm_node_totals tot;
        memset(&tot, 0, sizeof(tot));
        if (count)
            shm_node_totals_read(m->shm, count, &tot);
        json_object_set_new(r, "statements", json_integer((json_int_t)tot.statements));
        json_object_set_new(r, "avg_latency_ms", avg_latency_ms(tot.latency_us, tot.count));
        json_object_set_new(r, "probe_age_ms", node->last_probe_us
                                                   ? json_integer((now - node->last_probe_us) / 1000)
                                                   : json_null());
        json_object_set_new(r, "last_error", ADMIN_FIELD_TEXT(node->last_error));
        /* Patroni's word ([agent] ha_source = patroni); null without one. */
        json_object_set_new(r, "patroni", node->ha == NODE_HA_LEADER       ? json_string("leader")
                                          : node->ha == NODE_HA_NOT_LEADER ? json_string("not leader")
                                                                           : json_null());
        json_array_append_new(rows, r);
    }
    free(routes);
    *result = rows;
    return 0;
}

/* A quantile of a node's histogram in milliseconds; null before its first statement. */
static json_t *latency_quantile_ms(const shm_node_totals *h, double q)
{
    double us = shm_latency_quantile_us(h, q);
    return us < 0 ? json_null() : json_real(us / 1000.0);
}

/* Statement latency per node from the per-worker histograms in shared memory: count, mean and
 * p50/p95/p99 estimated inside their bucket (the same buckets /metrics exports). */
static int cmd_show_latency(admin_call *call, json_t **result)
{
    master *m = call->m;
    shm_route_table *routes = admin_routes(call);
    if (!routes)
        return -1;
    json_t *rows = json_array();
    for (uint32_t n = 0; n < routes->n_nodes; n++) {
        const shm_node *node = &routes->nodes[n];
        shm_node_totals h;
        memset(&h, 0, sizeof(h));
        shm_node_count *count = shm_node_count_get(m->shm, node->name);
        if (count)
            shm_node_totals_read(m->shm, count, &h);
        json_t *r = json_object();
        json_object_set_new(r, "node", ADMIN_FIELD_TEXT(node->name));
        json_object_set_new(r, "statements", json_integer((json_int_t)h.count));
        json_object_set_new(r, "avg_ms", avg_latency_ms(h.latency_us, h.count));
        json_object_set_new(r, "p50_ms", latency_quantile_ms(&h, 0.50));
        json_object_set_new(r, "p95_ms", latency_quantile_ms(&h, 0.95));
        json_object_set_new(r, "p99_ms", latency_quantile_ms(&h, 0.99));
        json_array_append_new(rows, r);
    }
    free(routes);
    *result = rows;
    return 0;
}

static int cmd_show_leader_history(admin_call *call, json_t **result)
{
    shm_segment *shm = call->m->shm;
    uint64_t count = atomic_load_explicit(&shm->history_count, memory_order_acquire);
    uint64_t first = count > SHM_HISTORY_MAX ? count - SHM_HISTORY_MAX : 0;
    json_t *rows = json_array();
    for (uint64_t i = count; i > first; i--) {
        const shm_leader_event *e = &shm->history[(i - 1) % SHM_HISTORY_MAX];
        json_t *r = json_object();
        json_object_set_new(r, "time", json_time(e->at_us));
        json_object_set_new(r, "epoch", json_integer((json_int_t)e->epoch));
        json_object_set_new(r, "from", e->from[0] ? ADMIN_FIELD_TEXT(e->from) : json_null());
        json_object_set_new(r, "to", e->to[0] ? ADMIN_FIELD_TEXT(e->to) : json_null());
        json_object_set_new(r, "reason", ADMIN_FIELD_TEXT(e->reason));
        json_array_append_new(rows, r);
    }
    *result = rows;
    return 0;
}

static int cmd_set_leader(admin_call *call, json_t **result)
{
    master *m = call->m;
    (void)result;
    bool force = call->argc == 2 && strcasecmp(call->argv[1], "force") == 0;
    if (call->argc < 1 || call->argc > 2 || (call->argc == 2 && !force)) {
        admin_error(call, "usage: set leader NODE [force]");
        return -1;
    }
    if (!m->cfg->agent) {
        admin_error(call, "agent = off: the leader is the configured primary");
        return -1;
    }
    shm_route_table *routes = admin_routes(call);
    if (!routes)
        return -1;
    int index = -1;
    for (uint32_t i = 0; i < routes->n_nodes; i++)
        if (strcmp(routes->nodes[i].name, call->argv[0]) == 0)
            index = (int)i;
    int rc = -1;
    if (index < 0) {
        admin_error(call, "no node named \"%s\"", call->argv[0]);
    } else if (!force && !(routes->nodes[index].probed && !routes->nodes[index].in_recovery &&
                           !routes->nodes[index].last_error[0])) {
        admin_error(call, "node %s is %s; refusing (add force to switch anyway)",
                    call->argv[0],
                    !routes->nodes[index].probed ? "not probed yet"
                    : routes->nodes[index].last_error[0] ? "not answering"
                                                         : "in recovery");
    } else if (master_set_leader(m, index, force) != 0) {
        admin_error(call, "the agent is not running");
    } else {
        evbuffer_add_printf(call->out, "switching the write leader to %s%s (see show leader "
                                       "history)\n", call->argv[0], force ? " (forced)" : "");
        rc = 0;
    }
    free(routes);
    return rc;
}

static json_t *stats_row(const char *name, const shm_worker_stats *st, int live)
{
    json_t *r = json_object();
    json_object_set_new(r, "worker", json_string(name));
    json_object_set_new(r, "sessions", json_integer(live));
    json_object_set_new(r, "sessions_total", json_integer((json_int_t)st->sessions_total));
    json_object_set_new(r, "server_connects", json_integer((json_int_t)st->server_connects));
    json_object_set_new(r, "statements", json_integer((json_int_t)st->statements));
    json_object_set_new(r, "bytes_in", json_integer((json_int_t)st->bytes_in));
    json_object_set_new(r, "bytes_out", json_integer((json_int_t)st->bytes_out));
    json_object_set_new(r, "errors", json_integer((json_int_t)st->errors));
    json_object_set_new(r, "cancels", json_integer((json_int_t)st->cancels));
    json_object_set_new(r, "avg_latency_ms",
                        avg_latency_ms(st->latency_us, st->statements_completed));
    return r;
}

static int cmd_show_stats(admin_call *call, json_t **result)
{
    master *m = call->m;
    shm_worker_stats total;
    int total_live = 0;
    memset(&total, 0, sizeof(total));
    json_t *o = json_object();
    json_t *rows = json_array();
    json_object_set_new(o, "maintenance",
                        json_string(atomic_load(&m->shm->maintenance) ? "on" : "off"));
    json_object_set_new(o, "clients", json_integer(atomic_load(&m->shm->clients)));
    for (int i = 0; i < m->n_workers; i++) {
        shm_worker *w = &m->shm->workers[i];
        shm_worker_stats st;
        /* Each counter is a relaxed 64-bit load: a snapshot, not a transaction. */
        st.sessions_total = atomic_load_explicit(&w->stats.sessions_total, memory_order_relaxed);
        st.server_connects = atomic_load_explicit(&w->stats.server_connects, memory_order_relaxed);
        st.statements = atomic_load_explicit(&w->stats.statements, memory_order_relaxed);
        st.bytes_in = atomic_load_explicit(&w->stats.bytes_in, memory_order_relaxed);
        st.bytes_out = atomic_load_explicit(&w->stats.bytes_out, memory_order_relaxed);
        st.errors = atomic_load_explicit(&w->stats.errors, memory_order_relaxed);
        st.cancels = atomic_load_explicit(&w->stats.cancels, memory_order_relaxed);
        st.statements_completed =
            atomic_load_explicit(&w->stats.statements_completed, memory_order_relaxed);
        st.latency_us = atomic_load_explicit(&w->stats.latency_us, memory_order_relaxed);
        int live = atomic_load(&w->sessions);
        char name[16];
        snprintf(name, sizeof(name), "%d", i);
        json_array_append_new(rows, stats_row(name, &st, live));
        total.sessions_total += st.sessions_total;
        total.server_connects += st.server_connects;
        total.statements += st.statements;
        total.bytes_in += st.bytes_in;
        total.bytes_out += st.bytes_out;
        total.errors += st.errors;
        total.cancels += st.cancels;
        total.statements_completed += st.statements_completed;
        total.latency_us += st.latency_us;
        total_live += live;
    }
    json_array_append_new(rows, stats_row("total", &total, total_live));
    json_object_set_new(o, "workers", rows);
    *result = o;
    return 0;
}

static const char *plan_reason_name(uint32_t reason)
{
    switch (reason) {
    case PLAN_REASON_SLOW:
        return "slow";
    case PLAN_REASON_SAMPLED:
        return "sampled";
    case PLAN_REASON_RUNNING:
        return "running";
    default:
        return "?";
    }
}

#define ADMIN_PLAN_TEXT_SHOWN 50 /* characters of normalised text in the table form */

/* The agent's plans (shared memory), newest first, with the planner's and the rings'
 * counters. The json form carries each plan's EXPLAIN (FORMAT JSON) output: with bound
 * values in its conditions, it is shown from operator level only, as statement text is. */
static int cmd_show_plans(admin_call *call, json_t **result)
{
    shm_segment *shm = call->m->shm;
    shm_plans *plans = shm_plans_of(shm);
    int64_t now = shm_now_us();
    uint64_t dropped = 0, sampled = 0;
    for (uint32_t w = 0; w < shm->n_workers; w++) {
        dropped += atomic_load_explicit(&shm_plan_ring_of(shm, w)->dropped, memory_order_relaxed);
        sampled += atomic_load_explicit(&shm_plan_ring_of(shm, w)->sampled, memory_order_relaxed);
    }
    json_t *o = json_object();
    json_object_set_new(o, "requests", json_integer((json_int_t)atomic_load(&plans->requests)));
    json_object_set_new(o, "planned", json_integer((json_int_t)atomic_load(&plans->planned)));
    json_object_set_new(o, "failed", json_integer((json_int_t)atomic_load(&plans->failed)));
    json_object_set_new(o, "skipped", json_integer((json_int_t)atomic_load(&plans->skipped)));
    json_object_set_new(o, "deduplicated",
                        json_integer((json_int_t)atomic_load(&plans->deduplicated)));
    json_object_set_new(o, "rate_limited",
                        json_integer((json_int_t)atomic_load(&plans->rate_limited)));
    json_object_set_new(o, "ring_dropped", json_integer((json_int_t)dropped));
    json_object_set_new(o, "sampled", json_integer((json_int_t)sampled));
    json_object_set_new(o, "plan_changes",
                        json_integer((json_int_t)atomic_load(&plans->plan_changes)));
    shm_plan *snaps = malloc(sizeof(*snaps) * SHM_PLANS_MAX);
    int order[SHM_PLANS_MAX], n = 0;
    json_t *rows = json_array();
    if (!snaps) {
        json_decref(o);
        json_decref(rows);
        admin_error(call, "out of memory");
        return -1;
    }
    for (uint32_t i = 0; i < SHM_PLANS_MAX; i++) {
        if (!shm_plan_snapshot(shm, i, &snaps[n]))
            continue;
        /* insertion by planned_at, newest first */
        int k = n++;
        while (k > 0 && snaps[order[k - 1]].planned_at_us < snaps[n - 1].planned_at_us) {
            order[k] = order[k - 1];
            k--;
        }
        order[k] = n - 1;
    }
    for (int k = 0; k < n; k++) {
        const shm_plan *p = &snaps[order[k]];
        char id[24];
        snprintf(id, sizeof(id), "%016llx", (unsigned long long)p->id);
        json_t *r = json_object();
        json_object_set_new(r, "id", json_string(id));
        json_object_set_new(r, "text", admin_json_text(p->text, sizeof(p->text),
                                                       call->json ? 0 : ADMIN_PLAN_TEXT_SHOWN));
        json_object_set_new(r, "node", ADMIN_FIELD_TEXT(p->node_name));
        json_object_set_new(r, "database", ADMIN_FIELD_TEXT(p->database));
        json_object_set_new(r, "user", ADMIN_FIELD_TEXT(p->user));
        json_object_set_new(r, "reason", json_string(plan_reason_name(p->reason)));
        json_object_set_new(r, "duration_ms", json_integer(p->duration_us / 1000));
        json_object_set_new(r, "age_s", json_integer((now - p->planned_at_us) / 1000000));
        json_object_set_new(r, "total_cost",
                            p->total_cost >= 0 ? json_real(p->total_cost) : json_null());
        json_object_set_new(r, "top_node",
                            p->top_node[0] ? ADMIN_FIELD_TEXT(p->top_node) : json_null());
        json_object_set_new(r, "changes", json_integer(p->changes));
        json_object_set_new(r, "error", p->error[0] ? ADMIN_FIELD_TEXT(p->error) : json_null());
        if (call->json) {
            json_t *plan = NULL;
            if (call->sess->level < ADMIN_LEVEL_OPERATOR)
                plan = json_string(ADMIN_STMT_HIDDEN);
            else if (p->json_len)
                plan = json_loadb(p->json, p->json_len, 0, NULL);
            json_object_set_new(r, "plan", plan ? plan : json_null());
        }
        json_array_append_new(rows, r);
    }
    free(snaps);
    json_object_set_new(o, "plans", rows);
    *result = o;
    return 0;
}

#define ADMIN_SECRET_MASK "********"

/* One row: the key as the agent names it to the control plane ("listen_port",
 * "agent.health_interval", "node.pg1.host"), its section as written in the file. */
static json_t *config_row(const config_key *k, const char *section, const config *cfg,
                          const void *base)
{
    char value[1100], name[CONFIG_NAME_MAX + 64];
    config_format_value(cfg, k, base, value, sizeof(value));
    if (config_key_is_secret(k) && value[0]) /* whether one is set, never what it is */
        snprintf(value, sizeof(value), "%s", ADMIN_SECRET_MASK);
    if (strcmp(section, "pgrelay") == 0)
        snprintf(name, sizeof(name), "%s", k->name);
    else
        snprintf(name, sizeof(name), "%s.%s", section, k->name);
    json_t *r = json_object();
    json_object_set_new(r, "key", ADMIN_FIELD_TEXT(name));
    json_object_set_new(r, "section", admin_json_text(section, strlen(section), 0));
    json_object_set_new(r, "value", ADMIN_FIELD_TEXT(value));
    json_object_set_new(r, "default", k->def ? json_string(k->def) : json_null());
    json_object_set_new(r, "reloadable", json_boolean(k->reloadable));
    return r;
}

/* Every key of the key table, in its order: [pgrelay], [agent], [control], then each node. */
static int cmd_show_config(admin_call *call, json_t **result)
{
    const config *cfg = call->m->cfg;
    json_t *rows = json_array();
    for (size_t i = 0; i < config_n_keys; i++) {
        const config_key *k = &config_keys[i];
        if (strcmp(k->section, "node") != 0)
            json_array_append_new(rows, config_row(k, k->section, cfg, cfg));
    }
    for (int n = 0; n < cfg->n_nodes; n++) {
        char section[CONFIG_NAME_MAX + 8];
        snprintf(section, sizeof(section), CONFIG_NODE_PREFIX "%s", cfg->nodes[n].name);
        for (size_t i = 0; i < config_n_keys; i++) {
            const config_key *k = &config_keys[i];
            if (strcmp(k->section, "node") == 0)
                json_array_append_new(rows, config_row(k, section, cfg, &cfg->nodes[n]));
        }
    }
    *result = rows;
    return 0;
}

/* Sessions that are not at a safe point: running a statement, or inside a transaction. */
static void admin_busy_sessions(master *m, int *active, int *in_tx)
{
    *active = *in_tx = 0;
    for (uint32_t i = 0; i < m->shm->max_sessions; i++) {
        uint32_t state = atomic_load_explicit(&m->shm->sessions[i].state, memory_order_relaxed);
        if (state == SESSION_ACTIVE)
            (*active)++;
        else if (state == SESSION_IN_TX)
            (*in_tx)++;
    }
}

/* Has every running worker taken the current pause into account (it then holds each session
 * at its next safe point, so a session seen idle stays so)? */
static bool admin_workers_follow_pause(master *m)
{
    int64_t since = atomic_load(&m->shm->maintenance_since_us);
    for (uint32_t i = 0; i < m->shm->n_workers && i < SHM_MAX_WORKERS; i++) {
        const shm_worker *w = &m->shm->workers[i];
        if (atomic_load(&w->pid) != 0 && atomic_load(&w->maintenance_seen_us) != since)
            return false;
    }
    return true;
}

static void admin_print_busy(master *m, struct evbuffer *out)
{
    int active, in_tx;
    admin_busy_sessions(m, &active, &in_tx);
    if (active + in_tx == 0)
        evbuffer_add_printf(out, "no session is busy: every one is at a safe point\n");
    else
        evbuffer_add_printf(out, "%d session(s) busy (%d running a statement, %d in a "
                                 "transaction), each held at its next safe point; "
                                 "`pause wait` waits for them\n", active + in_tx, active, in_tx);
}

static int cmd_pause(admin_call *call, json_t **result)
{
    long ms = 0;
    (void)result;
    if (call->argc > 1) {
        admin_error(call, "usage: pause [TIMEOUT]");
        return -1;
    }
    if (call->argc == 1 && (config_parse_duration(call->argv[0], &ms) != 0 || ms <= 0)) {
        admin_error(call, "\"%s\" is not a duration (examples: 30s, 5m)", call->argv[0]);
        return -1;
    }
    master_set_maintenance(call->m, true, (int)ms);
    if (ms > 0)
        evbuffer_add_printf(call->out, "maintenance on: holding new sessions and next "
                                       "statements; resuming automatically in %s\n",
                            call->argv[0]);
    else
        evbuffer_add_printf(call->out, "maintenance on: holding new sessions and next "
                                       "statements until resume\n");
    admin_print_busy(call->m, call->out);
    return 0;
}

/* pause wait [TIMEOUT]: pause (unless paused already: its automatic resume stays), then answer
 * once no session is busy, as PgBouncer's PAUSE does; admin_wait_poll writes the answer. */
static int cmd_pause_wait(admin_call *call, json_t **result)
{
    long ms = 0;
    (void)result;
    if (call->argc > 1) {
        admin_error(call, "usage: pause wait [TIMEOUT]");
        return -1;
    }
    if (call->argc == 1 && (config_parse_duration(call->argv[0], &ms) != 0 || ms <= 0)) {
        admin_error(call, "\"%s\" is not a duration (examples: 30s, 5m)", call->argv[0]);
        return -1;
    }
    if (!atomic_load(&call->m->shm->maintenance))
        master_set_maintenance(call->m, true, 0);
    call->sess->waiting = true;
    call->sess->wait_started_us = shm_mono_us();
    call->sess->wait_until_us = ms > 0 ? call->sess->wait_started_us + (int64_t)ms * 1000 : 0;
    return 0;
}

bool admin_wait_poll(master *m, admin_session *sess, struct evbuffer *out)
{
    int active, in_tx;
    int64_t now = shm_mono_us();
    long waited_ms = (long)((now - sess->wait_started_us) / 1000);
    if (!atomic_load(&m->shm->maintenance)) {
        evbuffer_add_printf(out, "error: resumed after %ld ms, before every session was at a "
                                 "safe point\n\n", waited_ms);
        sess->waiting = false;
        return true;
    }
    admin_busy_sessions(m, &active, &in_tx);
    if (active + in_tx == 0 && admin_workers_follow_pause(m)) {
        evbuffer_add_printf(out, "maintenance on: every session is at a safe point "
                                 "(waited %ld ms); resume releases them\n\n", waited_ms);
        sess->waiting = false;
        return true;
    }
    if (sess->wait_until_us > 0 && now >= sess->wait_until_us) {
        evbuffer_add_printf(out, "error: %d session(s) still busy after %ld ms (%d running a "
                                 "statement, %d in a transaction); maintenance stays on\n\n",
                            active + in_tx, waited_ms, active, in_tx);
        sess->waiting = false;
        return true;
    }
    return false;
}

static int cmd_resume(admin_call *call, json_t **result)
{
    (void)result;
    if (call->argc != 0) {
        admin_error(call, "usage: resume");
        return -1;
    }
    master_set_maintenance(call->m, false, 0);
    evbuffer_add_printf(call->out, "maintenance off\n");
    return 0;
}

static int cmd_kill_client(admin_call *call, json_t **result)
{
    char *end;
    (void)result;
    if (call->argc != 1) {
        admin_error(call, "usage: kill client ID (see show clients)");
        return -1;
    }
    errno = 0;
    unsigned long long id = strtoull(call->argv[0], &end, 10);
    if (errno || *end || end == call->argv[0]) {
        admin_error(call, "\"%s\" is not a client id", call->argv[0]);
        return -1;
    }
    if (master_kill_session(call->m, id) != 0) {
        admin_error(call, "no client with id %llu", id);
        return -1;
    }
    evbuffer_add_printf(call->out, "client %llu: closing\n", id);
    return 0;
}

static int cmd_reload(admin_call *call, json_t **result)
{
    char msg[512];
    (void)result;
    if (call->argc != 0) {
        admin_error(call, "usage: reload");
        return -1;
    }
    if (master_reload(call->m, msg, sizeof(msg)) != 0) {
        admin_error(call, "%s", msg);
        return -1;
    }
    evbuffer_add_printf(call->out, "%s\n", msg);
    return 0;
}

static int cmd_shutdown(admin_call *call, json_t **result)
{
    (void)result;
    master_stop how = MASTER_GRACEFUL;
    if (call->argc > 1 || (call->argc == 1 && strcmp(call->argv[0], "graceful") != 0 &&
                           strcmp(call->argv[0], "fast") != 0)) {
        admin_error(call, "usage: shutdown [graceful|fast]");
        return -1;
    }
    if (call->argc == 1 && strcmp(call->argv[0], "fast") == 0)
        how = MASTER_FAST;
    evbuffer_add_printf(call->out, "shutting down (%s)\n",
                        how == MASTER_FAST ? "fast" : "graceful");
    master_shutdown(call->m, how);
    return 0;
}

static int cmd_prompt(admin_call *call, json_t **result)
{
    (void)result;
    call->sess->interactive = !call->sess->interactive;
    return 0;
}

static int cmd_quit(admin_call *call, json_t **result)
{
    (void)result;
    call->sess->interactive = false;
    call->sess->closing = true;
    return 0;
}

static const admin_command admin_commands[] = {
    {"help", "", "list the commands you may run", ADMIN_LEVEL_USER, false, cmd_help},
    {"show info", "", "version, pid, uptime, workers, epoch, write leader, maintenance",
     ADMIN_LEVEL_USER, true, cmd_show_info},
    {"show workers", "", "worker processes: pid, start time, sessions, restarts",
     ADMIN_LEVEL_USER, true, cmd_show_workers},
    {"show clients", "", "client sessions: address, user, database, node, state, statement (text: operator)",
     ADMIN_LEVEL_USER, true, cmd_show_clients},
    {"show nodes", "", "database nodes: address, role, health, leader, sessions",
     ADMIN_LEVEL_USER, true, cmd_show_nodes},
    {"show stats", "", "counters per worker and in total", ADMIN_LEVEL_USER, true,
     cmd_show_stats},
    {"show latency", "", "statement latency per node: count, mean, p50, p95, p99 (ms)",
     ADMIN_LEVEL_USER, true, cmd_show_latency},
    {"show config", "", "every key: section, effective value (secrets masked), reloadable",
     ADMIN_LEVEL_USER, true, cmd_show_config},
    {"show leader history", "", "the last changes of write leader: time, from, to, epoch, why",
     ADMIN_LEVEL_USER, true, cmd_show_leader_history},
    {"show plans", "",
     "EXPLAIN plans of slow, sampled and running statements: text, node, reason, cost, top "
     "node (json: the plan itself, operator level)",
     ADMIN_LEVEL_USER, true, cmd_show_plans},
    {"set leader", "NODE [force]", "make NODE the write leader (refused while it is in recovery)",
     ADMIN_LEVEL_OPERATOR, false, cmd_set_leader},
    {"pause", "[TIMEOUT]", "maintenance on: hold new sessions and each next statement",
     ADMIN_LEVEL_OPERATOR, false, cmd_pause},
    {"pause wait", "[TIMEOUT]",
     "pause, then answer once no session runs a statement or is in a transaction (ends a line)",
     ADMIN_LEVEL_OPERATOR, false, cmd_pause_wait},
    {"resume", "", "maintenance off: release what pause holds", ADMIN_LEVEL_OPERATOR, false,
     cmd_resume},
    {"kill client", "ID", "close one client session", ADMIN_LEVEL_OPERATOR, false,
     cmd_kill_client},
    {"reload", "", "re-read the configuration file", ADMIN_LEVEL_ADMIN, false, cmd_reload},
    {"shutdown", "[graceful|fast]", "stop pgrelay", ADMIN_LEVEL_ADMIN, false, cmd_shutdown},
    {"prompt", "", "toggle interactive mode (stay connected, print a prompt)",
     ADMIN_LEVEL_USER, false, cmd_prompt},
    {"quit", "", "close the connection", ADMIN_LEVEL_USER, false, cmd_quit},
};
static const size_t admin_n_commands = sizeof(admin_commands) / sizeof(admin_commands[0]);

/* ---- parsing and dispatch ---- */

/* Split on blanks; returns the count, or -1 when there are too many words. */
static int split_words(char *text, char **words, int max)
{
    int n = 0;
    char *save = NULL;
    for (char *w = strtok_r(text, " \t", &save); w; w = strtok_r(NULL, " \t", &save)) {
        if (n == max)
            return -1;
        words[n++] = w;
    }
    return n;
}

/* Does the command's words prefix the input words? Returns how many words matched, or 0. */
static int command_match(const admin_command *c, char **words, int n)
{
    char buf[64];
    char *cw[4];
    snprintf(buf, sizeof(buf), "%s", c->words);
    int k = split_words(buf, cw, 4);
    if (k > n)
        return 0;
    for (int i = 0; i < k; i++)
        if (strcasecmp(cw[i], words[i]) != 0)
            return 0;
    return k;
}

static void admin_run_command(master *m, admin_session *sess, char *text, struct evbuffer *out)
{
    char *words[ADMIN_MAX_ARGS];
    admin_call call = {.sess = sess, .m = m, .out = out};
    int n = split_words(text, words, ADMIN_MAX_ARGS);
    if (n == 0)
        return;
    if (n < 0) {
        admin_error(&call, "too many words");
        evbuffer_add_printf(out, "\n");
        return;
    }
    const admin_command *best = NULL;
    int best_k = 0;
    for (size_t i = 0; i < admin_n_commands; i++) {
        int k = command_match(&admin_commands[i], words, n);
        if (k > best_k) {
            best = &admin_commands[i];
            best_k = k;
        }
    }
    if (!best) {
        /* "show foo": name what may follow the first word when some command starts with it */
        char more[512] = "";
        size_t used = 0;
        for (size_t i = 0; i < admin_n_commands && used < sizeof(more); i++) {
            const char *w = admin_commands[i].words;
            size_t k = strlen(words[0]);
            if (strncasecmp(w, words[0], k) == 0 && w[k] == ' ')
                used += (size_t)snprintf(more + used, sizeof(more) - used, "%s%s",
                                         used ? ", " : "", w + k + 1);
        }
        if (more[0])
            admin_error(&call, "unknown command \"%s%s%s\"; %s is followed by one of: %s",
                        words[0], n > 1 ? " " : "", n > 1 ? words[1] : "", words[0], more);
        else
            admin_error(&call, "unknown command \"%s\"; try help", text);
        evbuffer_add_printf(out, "\n");
        return;
    }
    if (best->level > sess->level) {
        admin_error(&call, "permission denied: \"%s\" needs %s level, you have %s", best->words,
                    admin_level_name(best->level), admin_level_name(sess->level));
        evbuffer_add_printf(out, "\n");
        return;
    }
    call.argc = n - best_k;
    call.argv = words + best_k;
    if (best->has_json && call.argc > 0 && strcasecmp(call.argv[call.argc - 1], "json") == 0) {
        call.json = true;
        call.argc--;
    }
    if (best->has_json && call.argc > 0) {
        admin_error(&call, "usage: %s [json]", best->words);
        evbuffer_add_printf(out, "\n");
        return;
    }
    json_t *result = NULL;
    int rc = best->handler(&call, &result);
    if (rc == 0 && sess->waiting)
        return; /* the answer and its empty line come from admin_wait_poll */
    if (rc == 0 && result) {
        if (call.json) {
            char *text_out = json_dumps(result, JSON_PRESERVE_ORDER | JSON_COMPACT);
            evbuffer_add_printf(out, "%s\n", text_out ? text_out : "null");
            free(text_out);
        } else {
            admin_render(out, result);
        }
    }
    json_decref(result);
    evbuffer_add_printf(out, "\n");
}

/* Offset of the first of the n bytes of line that is not part of well-formed UTF-8 or is a
 * control character other than tab (NUL included), or (size_t)-1 when there is none. */
static size_t admin_text_check(const char *line, size_t n)
{
    const uint8_t *p = (const uint8_t *)line;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t len = utf8_decode(p + i, n - i, &cp);
        if (len == 0 || (cp != '\t' && utf8_is_control(cp)))
            return i;
        i += len;
    }
    return (size_t)-1;
}

void admin_run_line(master *m, admin_session *sess, char *line, size_t len, struct evbuffer *out)
{
    char *save = NULL;
    if (sess->level == ADMIN_LEVEL_NONE) {
        /* Answered only now that the line is read: a client such as socat that writes its
         * line first would otherwise get EPIPE and never see why. */
        evbuffer_add_printf(out, "error: permission denied: your user is not allowed on the "
                                 "admin socket (see admin_users)\n\n");
        sess->interactive = false;
        sess->closing = true;
        return;
    }
    size_t bad = admin_text_check(line, len);
    if (bad != (size_t)-1) {
        /* Not echoed: the answer must not carry what a terminal would act on. */
        evbuffer_add_printf(out, "error: the line is not printable UTF-8 text (byte %zu); "
                                 "nothing was run\n\n", bad + 1);
        return;
    }
    for (char *cmd = strtok_r(line, ";", &save); cmd; cmd = strtok_r(NULL, ";", &save)) {
        while (isspace((unsigned char)*cmd))
            cmd++;
        if (*cmd == '\0')
            continue;
        admin_run_command(m, sess, cmd, out);
        if (sess->closing || sess->waiting)
            break;
    }
}
