/* admin.c - the admin console: a Unix socket in the master that answers one command per line.
 *
 * Protocol (as HAProxy's stats socket): one line of commands joined with ';'; every answer ends
 * with an empty line; the connection closes after the line unless `prompt` made it interactive.
 * `echo "show nodes" | socat - UNIX-CONNECT:/run/pgrelay/admin.sock` is the intended use.
 * Commands live in one table (words, arguments, help, level, handler). A `show` handler builds
 * JSON; the table form is rendered from that same JSON, so both forms always agree.
 */
#include "admin.h"
#include "config.h"
#include "log.h"
#include "master.h"
#include "shm.h"

#include <ctype.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <grp.h>
#include <jansson.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define ADMIN_LINE_MAX   4096 /* longest command line accepted */
#define ADMIN_MAX_ARGS   16
#define ADMIN_STMT_SHOWN 60   /* statement characters in the table form of show clients */
#define ADMIN_IDLE_S     10   /* a connection that sends no line for this long is closed */
#define ADMIN_PROMPT_IDLE_S 600 /* the same in interactive (prompt) mode */

typedef enum admin_level {
    ADMIN_LEVEL_NONE = -1,  /* not allowed on the socket */
    ADMIN_LEVEL_USER = 0,   /* show commands */
    ADMIN_LEVEL_OPERATOR,   /* + pause, resume, kill */
    ADMIN_LEVEL_ADMIN,      /* + reload, shutdown */
} admin_level;

static const char *const admin_level_names[] = {"user", "operator", "admin"};

typedef struct admin_conn {
    struct admin_conn *prev, *next;
    struct bufferevent *bev;
    uid_t uid;
    admin_level level;
    bool interactive;   /* `prompt` was given: stay open, print a prompt */
    bool closing;       /* close once the output is written */
} admin_conn;

/* What a handler gets: its arguments and where to put the answer. */
typedef struct admin_call {
    admin_conn *conn;
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

static struct {
    master *m;
    int fd;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    struct event ev_accept;
    admin_conn *conns;
} admin;

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

/* ---- rendering ---- */

static void json_cell(json_t *v, char *buf, size_t len)
{
    switch (json_typeof(v)) {
    case JSON_STRING:
        snprintf(buf, len, "%s", json_string_value(v));
        break;
    case JSON_INTEGER:
        snprintf(buf, len, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        break;
    case JSON_REAL:
        snprintf(buf, len, "%.3f", json_real_value(v));
        break;
    case JSON_TRUE:
        snprintf(buf, len, "yes");
        break;
    case JSON_FALSE:
        snprintf(buf, len, "no");
        break;
    case JSON_NULL:
        snprintf(buf, len, "-");
        break;
    default:
        snprintf(buf, len, "...");
    }
    /* Keep a row on one line. */
    for (char *c = buf; *c; c++)
        if (*c == '\n' || *c == '\r' || *c == '\t')
            *c = ' ';
}

/* An array of objects as aligned columns under a header of their keys. */
static void render_table(struct evbuffer *out, json_t *rows)
{
    size_t n = json_array_size(rows);
    if (n == 0) {
        evbuffer_add_printf(out, "(none)\n");
        return;
    }
    json_t *first = json_array_get(rows, 0);
    size_t ncol = json_object_size(first);
    const char **keys = calloc(ncol, sizeof(*keys));
    size_t *width = calloc(ncol, sizeof(*width));
    char cell[512];
    if (!keys || !width)
        goto done;
    size_t c = 0;
    const char *key;
    json_t *v;
    json_object_foreach(first, key, v)
    {
        keys[c] = key;
        width[c] = strlen(key);
        c++;
    }
    for (size_t r = 0; r < n; r++)
        for (c = 0; c < ncol; c++) {
            json_cell(json_object_get(json_array_get(rows, r), keys[c]), cell, sizeof(cell));
            if (strlen(cell) > width[c])
                width[c] = strlen(cell);
        }
    for (c = 0; c < ncol; c++)
        evbuffer_add_printf(out, "%-*s%s", c + 1 < ncol ? (int)width[c] : 0, keys[c],
                            c + 1 < ncol ? "  " : "\n");
    for (size_t r = 0; r < n; r++)
        for (c = 0; c < ncol; c++) {
            json_cell(json_object_get(json_array_get(rows, r), keys[c]), cell, sizeof(cell));
            evbuffer_add_printf(out, "%-*s%s", c + 1 < ncol ? (int)width[c] : 0, cell,
                                c + 1 < ncol ? "  " : "\n");
        }
done:
    free(keys);
    free(width);
}

/* Scalars of an object as "key  value" lines, then its arrays as tables. */
static void render(struct evbuffer *out, json_t *result)
{
    if (json_is_array(result)) {
        render_table(out, result);
        return;
    }
    const char *key;
    json_t *v;
    size_t width = 0;
    char cell[512];
    json_object_foreach(result, key, v) if (!json_is_array(v) && strlen(key) > width) width =
        strlen(key);
    json_object_foreach(result, key, v)
    {
        if (json_is_array(v))
            continue;
        json_cell(v, cell, sizeof(cell));
        evbuffer_add_printf(out, "%-*s  %s\n", (int)width, key, cell);
    }
    json_object_foreach(result, key, v)
    {
        if (!json_is_array(v))
            continue;
        evbuffer_add_printf(out, "\n");
        render_table(out, v);
    }
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
        if (c->level > call->conn->level)
            continue;
        char synopsis[128];
        snprintf(synopsis, sizeof(synopsis), "%s%s%s%s", c->words, c->args[0] ? " " : "",
                 c->args, c->has_json ? " [json]" : "");
        evbuffer_add_printf(call->out, "  %-28s %s (%s)\n", synopsis, c->help,
                            admin_level_names[c->level]);
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
    json_object_set_new(o, "version", json_string(PGRELAY_VERSION));
    json_object_set_new(o, "pid", json_integer(getpid()));
    json_object_set_new(o, "started", json_time(m->started_us));
    json_object_set_new(o, "uptime_s", json_integer((shm_now_us() - m->started_us) / 1000000));
    json_object_set_new(o, "config_file", json_string(m->cfg->path));
    json_object_set_new(o, "listen_addr", json_string(m->cfg->listen_addr));
    json_object_set_new(o, "listen_port", json_integer(m->cfg->listen_port));
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
                        routes->leader >= 0 ? json_string(routes->nodes[routes->leader].name)
                                            : json_null());
    json_object_set_new(o, "maintenance",
                        json_string(atomic_load(&m->shm->maintenance) ? "on" : "off"));
    json_object_set_new(o, "maintenance_since",
                        json_time(atomic_load(&m->shm->maintenance_since_us)));
    json_object_set_new(o, "maintenance_until",
                        json_time(atomic_load(&m->shm->maintenance_until_us)));
    json_object_set_new(o, "reloads", json_integer((json_int_t)atomic_load(&m->shm->reloads)));
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
    int64_t now = shm_now_us();
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
        json_object_set_new(r, "client", json_string(snap.client_addr));
        json_object_set_new(r, "user", json_string(snap.user));
        json_object_set_new(r, "database", json_string(snap.database));
        json_object_set_new(r, "application_name", json_string(snap.application_name));
        json_object_set_new(r, "port", json_string(snap.read_port ? "read" : "write"));
        json_object_set_new(r, "node", snap.node_name[0] ? json_string(snap.node_name)
                                                         : json_null());
        json_object_set_new(r, "state", json_string(session_state_name(state)));
        json_object_set_new(r, "connected_s",
                            json_integer((now - snap.connected_at_us) / 1000000));
        json_object_set_new(r, "statement_ms",
                            snap.stmt_start_us ? json_integer((now - snap.stmt_start_us) / 1000)
                                               : json_null());
        char stmt[SHM_STMT_MAX];
        snprintf(stmt, sizeof(stmt), "%s", snap.stmt);
        if (!call->json && strlen(stmt) > ADMIN_STMT_SHOWN)
            strcpy(stmt + ADMIN_STMT_SHOWN - 3, "...");
        /* Statement text may be cut mid-character; jansson wants valid UTF-8. */
        json_t *text = json_string(stmt);
        json_object_set_new(r, "statement", text ? text : json_string("(not UTF-8)"));
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
    int64_t now = shm_now_us();
    json_t *rows = json_array();
    for (uint32_t n = 0; n < routes->n_nodes; n++) {
        const shm_node *node = &routes->nodes[n];
        shm_node_count *count = shm_node_count_get(m->shm, node->name);
        json_t *r = json_object();
        json_object_set_new(r, "name", json_string(node->name));
        json_object_set_new(r, "host", json_string(node->host));
        json_object_set_new(r, "port", json_integer(node->port));
        json_object_set_new(r, "role", json_string(shm_node_role_name(routes, n)));
        json_object_set_new(r, "health", json_string(health_name(node->health)));
        json_object_set_new(r, "leader", json_boolean((int32_t)n == routes->leader));
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
        uint64_t done = count ? atomic_load_explicit(&count->statements_completed,
                                                     memory_order_relaxed)
                              : 0;
        uint64_t latency = count ? atomic_load_explicit(&count->latency_us, memory_order_relaxed)
                                 : 0;
        json_object_set_new(r, "statements",
                            json_integer(count ? (json_int_t)atomic_load_explicit(
                                                     &count->statements, memory_order_relaxed)
                                               : 0));
        json_object_set_new(r, "avg_latency_ms", avg_latency_ms(latency, done));
        json_object_set_new(r, "probe_age_ms", node->last_probe_us
                                                   ? json_integer((now - node->last_probe_us) / 1000)
                                                   : json_null());
        json_object_set_new(r, "last_error", json_string(node->last_error));
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
        json_object_set_new(r, "from", e->from[0] ? json_string(e->from) : json_null());
        json_object_set_new(r, "to", e->to[0] ? json_string(e->to) : json_null());
        json_object_set_new(r, "reason", json_string(e->reason));
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
    json_object_set_new(r, "key", json_string(name));
    json_object_set_new(r, "section", json_string(section));
    json_object_set_new(r, "value", json_string(value));
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
    return 0;
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

static void admin_set_idle(admin_conn *c)
{
    struct timeval tv = {c->interactive ? ADMIN_PROMPT_IDLE_S : ADMIN_IDLE_S, 0};
    bufferevent_set_timeouts(c->bev, &tv, NULL);
}

static int cmd_prompt(admin_call *call, json_t **result)
{
    (void)result;
    call->conn->interactive = !call->conn->interactive;
    admin_set_idle(call->conn);
    return 0;
}

static int cmd_quit(admin_call *call, json_t **result)
{
    (void)result;
    call->conn->interactive = false;
    call->conn->closing = true;
    return 0;
}

static const admin_command admin_commands[] = {
    {"help", "", "list the commands you may run", ADMIN_LEVEL_USER, false, cmd_help},
    {"show info", "", "version, pid, uptime, workers, epoch, write leader, maintenance",
     ADMIN_LEVEL_USER, true, cmd_show_info},
    {"show workers", "", "worker processes: pid, start time, sessions, restarts",
     ADMIN_LEVEL_USER, true, cmd_show_workers},
    {"show clients", "", "client sessions: address, user, database, node, state, statement",
     ADMIN_LEVEL_USER, true, cmd_show_clients},
    {"show nodes", "", "database nodes: address, role, health, leader, sessions",
     ADMIN_LEVEL_USER, true, cmd_show_nodes},
    {"show stats", "", "counters per worker and in total", ADMIN_LEVEL_USER, true,
     cmd_show_stats},
    {"show config", "", "every key: section, effective value (secrets masked), reloadable",
     ADMIN_LEVEL_USER, true, cmd_show_config},
    {"show leader history", "", "the last changes of write leader: time, from, to, epoch, why",
     ADMIN_LEVEL_USER, true, cmd_show_leader_history},
    {"set leader", "NODE [force]", "make NODE the write leader (refused while it is in recovery)",
     ADMIN_LEVEL_OPERATOR, false, cmd_set_leader},
    {"pause", "[TIMEOUT]", "maintenance on: hold new sessions and each next statement",
     ADMIN_LEVEL_OPERATOR, false, cmd_pause},
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

static void admin_run_command(admin_conn *conn, char *text, struct evbuffer *out)
{
    char *words[ADMIN_MAX_ARGS];
    admin_call call = {.conn = conn, .m = admin.m, .out = out};
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
        admin_error(&call, "unknown command \"%s\"; try help", text);
        evbuffer_add_printf(out, "\n");
        return;
    }
    if (best->level > conn->level) {
        admin_error(&call, "permission denied: \"%s\" needs %s level, you have %s", best->words,
                    admin_level_names[best->level], admin_level_names[conn->level]);
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
    if (best->handler(&call, &result) == 0 && result) {
        if (call.json) {
            char *text_out = json_dumps(result, JSON_PRESERVE_ORDER | JSON_COMPACT);
            evbuffer_add_printf(out, "%s\n", text_out ? text_out : "null");
            free(text_out);
        } else {
            render(out, result);
        }
    }
    json_decref(result);
    evbuffer_add_printf(out, "\n");
}

static void admin_run_line(admin_conn *conn, char *line)
{
    struct evbuffer *out = bufferevent_get_output(conn->bev);
    char *save = NULL;
    if (conn->level == ADMIN_LEVEL_NONE) {
        /* Answered only now that the line is read: a client such as socat that writes its
         * line first would otherwise get EPIPE and never see why. */
        evbuffer_add_printf(out, "error: permission denied: your user is not allowed on the "
                                 "admin socket (see admin_users)\n\n");
        conn->interactive = false;
        conn->closing = true;
        return;
    }
    for (char *cmd = strtok_r(line, ";", &save); cmd; cmd = strtok_r(NULL, ";", &save)) {
        while (isspace((unsigned char)*cmd))
            cmd++;
        if (*cmd == '\0')
            continue;
        admin_run_command(conn, cmd, out);
        if (conn->closing)
            break;
    }
}

/* ---- connections ---- */

static void admin_conn_free(admin_conn *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        admin.conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    bufferevent_free(c->bev);
    free(c);
}

static void admin_on_write(struct bufferevent *bev, void *arg)
{
    admin_conn *c = arg;
    (void)bev;
    if (c->closing)
        admin_conn_free(c);
}

static void admin_on_read(struct bufferevent *bev, void *arg)
{
    admin_conn *c = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    struct evbuffer *out = bufferevent_get_output(bev);
    char *line;
    size_t len;

    if (c->closing)
        return;
    while ((line = evbuffer_readln(in, &len, EVBUFFER_EOL_CRLF)) != NULL) {
        if (len > ADMIN_LINE_MAX) {
            evbuffer_add_printf(out, "error: line longer than %d characters\n\n",
                                ADMIN_LINE_MAX);
        } else {
            admin_run_line(c, line);
        }
        free(line);
        if (!c->interactive)
            c->closing = true;
        else
            evbuffer_add_printf(out, "> ");
        if (c->closing)
            break;
    }
    if (!c->closing && evbuffer_get_length(in) > ADMIN_LINE_MAX) {
        evbuffer_add_printf(out, "error: line longer than %d characters\n\n", ADMIN_LINE_MAX);
        c->closing = true;
    }
    if (c->closing && evbuffer_get_length(out) == 0)
        admin_conn_free(c);
}

static void admin_on_event(struct bufferevent *bev, short what, void *arg)
{
    admin_conn *c = arg;
    if (what & BEV_EVENT_EOF) {
        /* A last line without a newline still counts (printf "show info" | socat ...). */
        struct evbuffer *in = bufferevent_get_input(bev);
        size_t len = evbuffer_get_length(in);
        if (!c->closing && c->level == ADMIN_LEVEL_NONE) {
            char empty[] = "";
            admin_run_line(c, empty);
        } else if (!c->closing && len > 0 && len <= ADMIN_LINE_MAX) {
            char *line = malloc(len + 1);
            if (line) {
                evbuffer_remove(in, line, len);
                line[len] = '\0';
                admin_run_line(c, line);
                free(line);
            }
        }
        c->closing = true;
        if (evbuffer_get_length(bufferevent_get_output(bev)) > 0) {
            bufferevent_disable(bev, EV_READ);
            return; /* admin_on_write frees once flushed */
        }
    }
    admin_conn_free(c);
}

/* Is uid one of the comma-separated user names (or numeric uids) in list? */
static bool uid_in_list(uid_t uid, const char *list)
{
    char buf[512];
    char *save = NULL;
    snprintf(buf, sizeof(buf), "%s", list);
    for (char *name = strtok_r(buf, ", ", &save); name; name = strtok_r(NULL, ", ", &save)) {
        char *end;
        unsigned long n = strtoul(name, &end, 10);
        if (*end == '\0' && end != name) {
            if ((uid_t)n == uid)
                return true;
            continue;
        }
        struct passwd *pw = getpwnam(name);
        if (pw && pw->pw_uid == uid)
            return true;
    }
    return false;
}

static admin_level admin_level_of(uid_t uid)
{
    const config *cfg = admin.m->cfg;
    if (uid == 0 || uid == geteuid() || uid_in_list(uid, cfg->admin_users))
        return ADMIN_LEVEL_ADMIN;
    if (uid_in_list(uid, cfg->operator_users))
        return ADMIN_LEVEL_OPERATOR;
    if (uid_in_list(uid, cfg->stats_users))
        return ADMIN_LEVEL_USER;
    return ADMIN_LEVEL_NONE;
}

static void admin_on_accept(evutil_socket_t lfd, short what, void *arg)
{
    (void)what;
    (void)arg;
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
        if (errno != EAGAIN && errno != EINTR)
            log_warning("admin socket: accept: %s", strerror(errno));
        return;
    }
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        log_warning("admin socket: cannot read the peer's credentials: %s", strerror(errno));
        close(fd);
        return;
    }
    admin_level level = admin_level_of(cred.uid);
    if (level == ADMIN_LEVEL_NONE)
        log_warning("admin socket: refused uid %d (pid %d)", (int)cred.uid, (int)cred.pid);
    admin_conn *c = calloc(1, sizeof(*c));
    if (!c) {
        close(fd);
        return;
    }
    c->uid = cred.uid;
    c->level = level;
    c->bev = bufferevent_socket_new(admin.m->base, fd, BEV_OPT_CLOSE_ON_FREE);
    if (!c->bev) {
        close(fd);
        free(c);
        return;
    }
    c->next = admin.conns;
    if (admin.conns)
        admin.conns->prev = c;
    admin.conns = c;
    bufferevent_setcb(c->bev, admin_on_read, admin_on_write, admin_on_event, c);
    admin_set_idle(c);
    bufferevent_enable(c->bev, EV_READ | EV_WRITE);
    log_debug("admin socket: uid %d connected with %s level", (int)cred.uid,
              admin_level_names[level]);
}

/* ---- the socket ---- */

static int mkdir_parent(const char *path)
{
    char dir[sizeof(admin.path)];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir)
        return 0;
    *slash = '\0';
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return -1;
    return 0;
}

int admin_start(master *m)
{
    const config *cfg = m->cfg;
    struct sockaddr_un sun = {.sun_family = AF_UNIX};

    admin.m = m;
    admin.fd = -1;
    if (cfg->admin_socket[0] == '\0')
        return 0;
    if (strlen(cfg->admin_socket) >= sizeof(sun.sun_path)) {
        log_error("admin_socket %s: path is too long", cfg->admin_socket);
        return -1;
    }
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", cfg->admin_socket);
    if (mkdir_parent(cfg->admin_socket) != 0) {
        log_error("admin_socket %s: cannot create its directory: %s", cfg->admin_socket,
                  strerror(errno));
        return -1;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        log_error("admin_socket %s: socket: %s", cfg->admin_socket, strerror(errno));
        return -1;
    }
    /* A socket file left by a dead pgrelay is removed; a live one means another instance. */
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe >= 0 && connect(probe, (struct sockaddr *)&sun, sizeof(sun)) == 0) {
        close(probe);
        close(fd);
        log_error("admin_socket %s is in use by another running pgrelay", cfg->admin_socket);
        return -1;
    }
    if (probe >= 0)
        close(probe);
    unlink(cfg->admin_socket);
    mode_t old_umask = umask(0177);
    int rc = bind(fd, (struct sockaddr *)&sun, sizeof(sun));
    umask(old_umask);
    if (rc != 0) {
        log_error("admin_socket %s: bind: %s", cfg->admin_socket, strerror(errno));
        close(fd);
        return -1;
    }
    if (cfg->admin_socket_group[0]) {
        struct group *gr = getgrnam(cfg->admin_socket_group);
        if (!gr || chown(cfg->admin_socket, (uid_t)-1, gr->gr_gid) != 0) {
            log_error("admin_socket %s: cannot give it to group %s: %s", cfg->admin_socket,
                      cfg->admin_socket_group, gr ? strerror(errno) : "no such group");
            close(fd);
            unlink(cfg->admin_socket);
            return -1;
        }
    }
    if (chmod(cfg->admin_socket, (mode_t)cfg->admin_socket_mode) != 0 || listen(fd, 64) != 0) {
        log_error("admin_socket %s: %s", cfg->admin_socket, strerror(errno));
        close(fd);
        unlink(cfg->admin_socket);
        return -1;
    }
    admin.fd = fd;
    snprintf(admin.path, sizeof(admin.path), "%s", cfg->admin_socket);
    event_assign(&admin.ev_accept, m->base, fd, EV_READ | EV_PERSIST, admin_on_accept, NULL);
    event_add(&admin.ev_accept, NULL);
    log_info("admin socket %s (mode %04o)", cfg->admin_socket, cfg->admin_socket_mode);
    return 0;
}

void admin_stop_listening(void)
{
    if (admin.fd < 0)
        return;
    event_del(&admin.ev_accept);
    close(admin.fd);
    admin.fd = -1;
    unlink(admin.path);
}

void admin_close_in_child(void)
{
    if (admin.fd >= 0)
        close(admin.fd);
    for (admin_conn *c = admin.conns; c; c = c->next)
        close(bufferevent_getfd(c->bev));
}
