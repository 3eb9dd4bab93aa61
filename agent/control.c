/* control.c - the agent's side of the control plane: registration, telemetry, command polling.
 *
 * Two threads, so that HTTP can never delay a health probe: the reporter registers, then
 * uploads metrics every metrics_interval (the answer carries the deployment's leader and
 * epoch), running queries every active_queries_interval, the effective configuration when it
 * changes and the leader's schema summary when that changes; the poller long-polls for
 * commands, runs them and acknowledges each. Both read shared memory (lock-free snapshots) and
 * their own copy of the settings; they reach the event loop only through a socketpair.
 * Failures back off exponentially (capped, with jitter) and are logged once per change.
 */
#include "control.h"
#include "channel.h"
#include "config_local.h"
#include "http.h"
#include "log.h"
#include "normalize.h"
#include "planner.h"

#include <ctype.h>
#include <curl/curl.h>
#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BACKOFF_FIRST_MS 500    /* first retry delay after a failure */
#define BACKOFF_MAX_MS   30000  /* ceiling of the retry delay */
#define POLL_WAIT_S      25     /* long-poll wait asked of the control plane */
#define QUERIES_MAX      200    /* running queries sent per upload */
#define UNDECLARED_RETRY_MS 2000 /* retry delay while refused as undeclared (403), not an outage */
#define CONVERGE_RETRY_MS   10000 /* a desired configuration that failed here is tried this often */

control_ctx control;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The reporter's early wake-up: the agent's view of the nodes changed (a node went down or
 * came up, a replica became a primary), which the control plane should hear now, not at the
 * next metrics_interval. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond; /* on CLOCK_MONOTONIC */
    bool due;
} report = {.lock = PTHREAD_MUTEX_INITIALIZER};

void control_report_now(void)
{
    pthread_mutex_lock(&report.lock);
    report.due = true;
    pthread_cond_signal(&report.cond);
    pthread_mutex_unlock(&report.lock);
}

/* Wait up to ms, or until control_report_now(). */
static void reporter_wait(int64_t ms)
{
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += ms / 1000;
    deadline.tv_nsec += (ms % 1000) * 1000000;
    if (deadline.tv_nsec >= 1000000000) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&report.lock);
    while (!report.due)
        if (pthread_cond_timedwait(&report.cond, &report.lock, &deadline) == ETIMEDOUT)
            break;
    pthread_mutex_unlock(&report.lock);
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Capped exponential backoff with +-20% jitter; failures counts the failures in a row. */
static int64_t backoff_ms(int failures)
{
    int64_t d = BACKOFF_FIRST_MS;
    for (int i = 1; i < failures && d < BACKOFF_MAX_MS; i++)
        d *= 2;
    if (d > BACKOFF_MAX_MS)
        d = BACKOFF_MAX_MS;
    uint32_t r = 0;
    if (getrandom(&r, sizeof(r), 0) != sizeof(r))
        r = (uint32_t)now_ms();
    return d * 8 / 10 + (int64_t)(r % (uint32_t)(d * 4 / 10 + 1));
}

bool control_epoch_valid(json_t *epoch)
{
    return json_is_integer(epoch) && json_integer_value(epoch) >= 0 &&
           json_integer_value(epoch) <= CONTROL_EPOCH_MAX;
}

void control_send_leader(const char *leader, uint64_t epoch)
{
    control_msg m = {.type = CONTROL_MSG_LEADER, .epoch = epoch};
    snprintf(m.leader, sizeof(m.leader), "%s", leader ? leader : "");
    ssize_t n = send(control.loop_fd, &m, sizeof(m), MSG_NOSIGNAL);
    (void)n;
}

/* Hand an answer's leader and epoch (metrics, long poll) to the agent's loop. False, and
 * nothing handed on, unless leader is a name or null and epoch is valid. */
/* The per-proxy options of a metrics answer (set-proxy-options; absent: the defaults):
 * read_only goes to the master when it changes (each process of the agent tells it once). */
static void follow_options(json_t *reply)
{
    static int sent = -1; /* the reporter thread's */
    int want = json_is_true(json_object_get(json_object_get(reply, "options"), "read_only"));
    if (sent == want)
        return;
    sent = want;
    if (channel_send(control.master_fd, CHANNEL_READ_ONLY, (uint64_t)want) != 0) {
        log_error("control plane: cannot tell the master read_only = %s", want ? "on" : "off");
        sent = -1; /* again at the next answer */
    }
}

static bool follow_answer(json_t *reply)
{
    json_t *leader = json_object_get(reply, "leader");
    json_t *epoch = json_object_get(reply, "epoch");
    if (!control_epoch_valid(epoch) || !(json_is_string(leader) || json_is_null(leader)))
        return false;
    control_send_leader(json_is_string(leader) ? json_string_value(leader) : "",
                        (uint64_t)json_integer_value(epoch));
    return true;
}

/* Log reachability only when it changes (per thread). */
typedef struct reach_state {
    const char *who;
    bool down;
    int failures;
    int64_t down_since_ms;
} reach_state;

static void reach_ok(reach_state *r)
{
    if (r->down)
        log_info("control plane (%s): reachable again", r->who);
    r->down = false;
    r->failures = 0;
}

static void reach_failed(reach_state *r, const http_client *c, long status)
{
    if (!r->down) {
        log_warning("control plane (%s): %s%s", r->who,
                    status ? "" : "unreachable: ", c->error[0] ? c->error : "no endpoint");
        r->down = true;
        r->down_since_ms = now_ms();
    }
    r->failures++;
}

/* ---- snapshots of shared memory ---- */

/* A node's statement latency histogram (summed over the workers): statements per bucket, not
 * cumulative, in the order of shm_latency_bounds_us, the last bucket past 60 s. */
static json_t *latency_buckets_json(const shm_node_totals *h)
{
    json_t *a = json_array();
    for (unsigned b = 0; b <= SHM_LATENCY_BOUNDS; b++)
        json_array_append_new(a, json_integer((json_int_t)h->buckets[b]));
    return a;
}

static json_t *routes_json(const shm_route_table *t)
{
    json_t *nodes = json_array();
    for (uint32_t i = 0; i < t->n_nodes; i++) {
        const shm_node *n = &t->nodes[i];
        shm_node_count *c = shm_node_count_get(control.shm, n->name);
        /* The workers' rows of the node, summed (all 0 when the node has no entry). */
        shm_node_totals tot;
        memset(&tot, 0, sizeof(tot));
        if (c)
            shm_node_totals_read(control.shm, c, &tot);
        json_t *node =
            json_pack("{s:s, s:s, s:i, s:s, s:s, s:b, s:I, s:I, s:i, s:i, s:I, s:I, s:I, s:I, s:I, "
                      "s:I}",
                      "name", n->name, "host", n->host, "port", n->port, "role",
                      n->role == NODE_ROLE_PRIMARY ? "primary" : "replica", "health",
                      n->health == NODE_HEALTH_UP     ? "up"
                      : n->health == NODE_HEALTH_DOWN ? "down"
                                                      : "unknown",
                      "in_recovery", n->in_recovery, "lsn", (json_int_t)n->wal_lsn, "lag_bytes",
                      (json_int_t)n->lag_bytes, "write_sessions",
                      c ? (int)atomic_load(&c->write_sessions) : 0, "read_sessions",
                      c ? (int)atomic_load(&c->read_sessions) : 0, "statements",
                      (json_int_t)tot.statements, "bytes_in", (json_int_t)tot.bytes_in,
                      "bytes_out", (json_int_t)tot.bytes_out, "errors", (json_int_t)tot.errors,
                      "latency_us", (json_int_t)tot.latency_us, "statements_completed",
                      (json_int_t)tot.count);
        json_object_set_new(node, "latency_buckets", latency_buckets_json(&tot));
        json_object_set_new(node, "lag_ms", json_integer((json_int_t)n->lag_ms));
        /* Patroni's word, when the agent has one: the control plane does not count a primary
         * that Patroni does not name as a primary (leader.c there). */
        if (n->ha != NODE_HA_NONE)
            json_object_set_new(node, "patroni",
                                json_string(n->ha == NODE_HA_LEADER ? "leader" : "not_leader"));
        json_array_append_new(nodes, node);
    }
    return nodes;
}

static const char *leader_name(const shm_route_table *t)
{
    return t->leader >= 0 && (uint32_t)t->leader < t->n_nodes ? t->nodes[t->leader].name : NULL;
}

static json_t *metrics_body(const shm_route_table *t)
{
    shm_segment *shm = control.shm;
    uint64_t statements = 0, bytes_in = 0, bytes_out = 0, errors = 0, completed = 0, latency = 0;
    for (uint32_t i = 0; i < shm->n_workers; i++) {
        shm_worker_stats *st = &shm->workers[i].stats;
        statements += atomic_load_explicit(&st->statements, memory_order_relaxed);
        bytes_in += atomic_load_explicit(&st->bytes_in, memory_order_relaxed);
        bytes_out += atomic_load_explicit(&st->bytes_out, memory_order_relaxed);
        errors += atomic_load_explicit(&st->errors, memory_order_relaxed);
        /* Read a moment apart from each other: an interval's average may be off by one
         * statement, which the next interval makes up. */
        latency += atomic_load_explicit(&st->latency_us, memory_order_relaxed);
        completed += atomic_load_explicit(&st->statements_completed, memory_order_relaxed);
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    const char *leader = leader_name(t);
    int64_t until_us = atomic_load(&shm->maintenance_until_us);
    return json_pack(
        "{s:s, s:I, s:i, s:I, s:I, s:I, s:I, s:I, s:I, s:b, s:I, s:I, s:o, s:I, s:I, s:o}",
        "node_id",
        control.node_id, "ts_ms", (json_int_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000, "clients",
        (int)atomic_load(&shm->clients), "statements", (json_int_t)statements, "bytes_in",
        (json_int_t)bytes_in, "bytes_out", (json_int_t)bytes_out, "errors", (json_int_t)errors,
        "latency_us", (json_int_t)latency, "statements_completed", (json_int_t)completed,
        "maintenance", atomic_load(&shm->maintenance) != 0, "maintenance_until_ms",
        (json_int_t)(until_us / 1000), "epoch", (json_int_t)t->epoch, "leader",
        leader ? json_string(leader) : json_null(), "config_version",
        (json_int_t)config_local_claimed(), "plan_changes",
        (json_int_t)atomic_load(&shm_plans_of(shm)->plan_changes), "nodes", routes_json(t));
}

static const char *state_name(uint32_t state)
{
    switch (state) {
    case SESSION_ACTIVE:
        return "active";
    case SESSION_IN_TX:
        return "in transaction";
    case SESSION_IDLE:
        return "idle";
    default:
        return "startup";
    }
}

static json_t *plan_link(uint64_t id);

static json_t *queries_body(void)
{
    shm_segment *shm = control.shm;
    shm_session snap;
    char text[SHM_STMT_MAX];
    int64_t now = shm_mono_us();
    json_t *list = json_array();
    for (uint32_t i = 0; i < shm->max_sessions && json_array_size(list) < QUERIES_MAX; i++) {
        uint32_t st = atomic_load_explicit(&shm->sessions[i].state, memory_order_relaxed);
        if (st != SESSION_ACTIVE && st != SESSION_IN_TX)
            continue;
        if (!shm_session_snapshot(&shm->sessions[i], &snap) || !snap.stmt_start_us)
            continue;
        normalize_sql(snap.stmt, text, sizeof(text));
        json_t *t = json_string(text);
        /* the client's own words: a name that is not UTF-8 is left out rather than mangled */
        snap.application_name[sizeof(snap.application_name) - 1] = '\0';
        json_t *app = json_string(snap.application_name);
        json_t *plan = plan_link(planner_plan_id(text, snap.database, snap.user));
        json_array_append_new(
            list, json_pack("{s:I, s:s, s:o, s:s, s:s, s:s, s:s, s:s, s:I, s:o}", "session",
                            (json_int_t)snap.id, "client", snap.client_addr, "application_name",
                            app ? app : json_string(""), "user", snap.user, "database",
                            snap.database, "node", snap.node_name, "tls", snap.tls, "state",
                            state_name(atomic_load(&snap.state)), "duration_ms",
                            (json_int_t)((now - snap.stmt_start_us) / 1000), "text",
                            t ? t : json_string("(not UTF-8)")));
        if (plan)
            json_object_set_new(json_array_get(list, json_array_size(list) - 1), "plan_id", plan);
    }
    return json_pack("{s:s, s:o}", "node_id", control.node_id, "queries", list);
}

/* ---- plans ---- */

/* The id of the published plan with this id as text, or NULL when the planner has none. */
static json_t *plan_link(uint64_t id)
{
    shm_plans *plans = shm_plans_of(control.shm);
    for (uint32_t i = 0; i < SHM_PLANS_MAX; i++) {
        if (plans->plans[i].used && plans->plans[i].id == id) {
            char hex[24];
            snprintf(hex, sizeof(hex), "%016llx", (unsigned long long)id);
            return json_string(hex);
        }
    }
    return NULL;
}

static const char *plan_reason(uint32_t reason)
{
    return reason == PLAN_REASON_SLOW      ? "slow"
           : reason == PLAN_REASON_SAMPLED ? "sampled"
           : reason == PLAN_REASON_RUNNING ? "running"
                                           : "?";
}

/* The plans published (or rewritten) since the last upload, and the plan changes recorded
 * since then; NULL when there is nothing new. sent[i] is the seq of slot i last uploaded;
 * the new values go to next[] and *next_change, taken once the upload succeeded. */
static json_t *plans_body(const uint32_t *sent, uint32_t *next, uint64_t changes_sent,
                          uint64_t *next_change)
{
    static shm_plan snap;
    json_t *list = json_array();
    for (uint32_t i = 0; i < SHM_PLANS_MAX; i++) {
        next[i] = atomic_load_explicit(&shm_plans_of(control.shm)->plans[i].seq,
                                       memory_order_acquire);
        if (next[i] == sent[i] || !shm_plan_snapshot(control.shm, i, &snap))
            continue;
        next[i] = atomic_load_explicit(&snap.seq, memory_order_relaxed);
        char id[24];
        snprintf(id, sizeof(id), "%016llx", (unsigned long long)snap.id);
        snap.text[sizeof(snap.text) - 1] = '\0';
        json_t *text = json_string(snap.text);
        json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:o, s:s, s:I, s:I, s:i}", "id", id, "node",
                              snap.node_name, "database", snap.database, "user", snap.user,
                              "text", text ? text : json_string("(not UTF-8)"), "reason", plan_reason(snap.reason), "duration_ms",
                              (json_int_t)(snap.duration_us / 1000), "planned_at_ms",
                              (json_int_t)(snap.planned_at_us / 1000), "changes",
                              (int)snap.changes);
        if (!o)
            continue; /* a name that is not UTF-8 */
        if (snap.total_cost >= 0)
            json_object_set_new(o, "total_cost", json_real(snap.total_cost));
        if (snap.top_node[0])
            json_object_set_new(o, "top_node", json_string(snap.top_node));
        if (snap.error[0])
            json_object_set_new(o, "error", json_string(snap.error));
        if (snap.json_len) {
            json_t *plan = json_loadb(snap.json, snap.json_len, 0, NULL);
            if (plan)
                json_object_set_new(o, "plan", plan);
        }
        json_array_append_new(list, o);
    }
    *next_change = changes_sent;
    json_t *changes = planner_changes_since(changes_sent, next_change);
    if (json_array_size(list) == 0 && json_array_size(changes) == 0) {
        json_decref(list);
        json_decref(changes);
        return NULL;
    }
    return json_pack("{s:s, s:o, s:o}", "node_id", control.node_id, "plans", list, "changes",
                     changes);
}

static json_t *config_body(const config *cfg)
{
    json_t *keys = json_object();
    char value[1100], name[CONFIG_NAME_MAX + 40];
    for (size_t i = 0; i < config_n_keys; i++) {
        const config_key *k = &config_keys[i];
        if (config_key_is_secret(k))
            continue; /* secrets stay on the host, a node's monitor_password too */
        if (strcmp(k->section, "node") == 0) {
            for (int n = 0; n < cfg->n_nodes; n++) {
                config_format_value(cfg, k, &cfg->nodes[n], value, sizeof(value));
                snprintf(name, sizeof(name), "node.%s.%s", cfg->nodes[n].name, k->name);
                json_object_set_new(keys, name, json_string(value));
            }
            continue;
        }
        config_format_value(cfg, k, cfg, value, sizeof(value));
        snprintf(name, sizeof(name), "%s%s%s", strcmp(k->section, "pgrelay") ? k->section : "",
                 strcmp(k->section, "pgrelay") ? "." : "", k->name);
        json_object_set_new(keys, name, json_string(value));
    }
    return json_pack("{s:s, s:I, s:o}", "node_id", control.node_id, "config_version",
                     (json_int_t)config_local_claimed(), "config", keys);
}

/* The leader's schema: tables with their columns and indexes, outside the system schemas. */
static json_t *schema_body(const config *cfg, const shm_route_table *t)
{
    const char *leader = leader_name(t);
    if (!leader)
        return NULL;
    const config_node *node = NULL;
    for (int i = 0; i < cfg->n_nodes; i++)
        if (strcmp(cfg->nodes[i].name, leader) == 0)
            node = &cfg->nodes[i];
    if (!node)
        return NULL;
    char port[16], timeout[16];
    snprintf(port, sizeof(port), "%d", node->port);
    snprintf(timeout, sizeof(timeout), "%d", cfg->control_request_timeout_ms / 1000 + 2);
    const char *dbname = node->monitor_dbname[0] ? node->monitor_dbname : cfg->monitor_dbname;
    const char *keys[] = {"host", "port", "user", "password", "dbname", "connect_timeout",
                          "application_name", "sslmode", "sslrootcert", "sslcert", "sslkey",
                          NULL};
    const char *vals[] = {node->host,
                          port,
                          node->monitor_user[0] ? node->monitor_user : cfg->monitor_user,
                          node->monitor_password[0] ? node->monitor_password
                                                    : cfg->monitor_password,
                          dbname,
                          timeout,
                          "pgrelay-agent schema",
                          /* TLS as the probes speak it (server_tls_*) */
                          config_server_tls_word(config_node_server_tls(cfg, node)),
                          cfg->server_tls_ca_file[0] ? cfg->server_tls_ca_file : NULL,
                          cfg->server_tls_cert_file[0] ? cfg->server_tls_cert_file : NULL,
                          cfg->server_tls_key_file[0] ? cfg->server_tls_key_file : NULL,
                          NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 0);
    json_t *tables = NULL;
    if (PQstatus(conn) != CONNECTION_OK)
        goto done;
    /* One row per table: its columns and indexes as JSON built by the server. */
    PGresult *res = PQexec(
        conn,
        "SELECT json_agg(json_build_object('schema', n.nspname, 'name', c.relname, "
        "'columns', (SELECT coalesce(json_agg(json_build_object('name', a.attname, 'type', "
        "format_type(a.atttypid, a.atttypmod)) ORDER BY a.attnum), '[]') FROM pg_attribute a "
        "WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), "
        "'indexes', (SELECT coalesce(json_agg(json_build_object('name', i.relname, "
        "'definition', pg_get_indexdef(x.indexrelid)) ORDER BY i.relname), '[]') "
        "FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = c.oid)) "
        "ORDER BY n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = "
        "c.relnamespace WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', "
        "'information_schema') AND n.nspname NOT LIKE 'pg_toast%'");
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1) {
        const char *v = PQgetisnull(res, 0, 0) ? "[]" : PQgetvalue(res, 0, 0);
        tables = json_loads(v, 0, NULL);
    }
    PQclear(res);
done:
    PQfinish(conn);
    if (!tables)
        return NULL;
    return json_pack("{s:s, s:s, s:o}", "node_id", control.node_id, "database", dbname,
                     "tables", tables);
}

/* ---- the reporter ---- */

typedef struct reporter_state {
    config cfg;
    bool undeclared; /* the control plane said this node id is not declared (logged once) */
    uint64_t settings_version;
    uint64_t config_sent_version;  /* settings version last uploaded (0 = never) */
    char *schema_sent;             /* JSON text of the schema last uploaded */
    uint32_t plan_seq_sent[SHM_PLANS_MAX]; /* seq of each plan slot as last uploaded */
    uint64_t plan_change_sent;     /* number of the last plan change uploaded */
    bool registered;
    int64_t converge_failed;       /* desired config version that failed here last (0: none) */
    int64_t converge_retry_ms;     /* when to try that version again */
    int64_t converge_held;         /* desired version not taken over a local edit (logged) */
} reporter_state;

static long post(http_client *c, const char *path, json_t *body, json_t **reply)
{
    long status = http_request(c, "POST", path, body, reply, 0);
    json_decref(body);
    return status;
}

/* The metrics answer names the deployment's desired configuration version: a proxy on
 * another one (it missed a commit while down or cut off, or an apply was rolled back after it)
 * fetches that version's text and applies it. A version that fails here is tried again after
 * CONVERGE_RETRY_MS. */
static void converge(reporter_state *r, http_client *c, json_t *reply)
{
    json_t *want = json_object_get(reply, "config_version");
    char path[128 + sizeof(control.node_id)], detail[512];
    if (!json_is_integer(want) || json_integer_value(want) <= 0)
        return;
    int64_t version = json_integer_value(want);
    if (version == config_local_claimed())
        return;
    if (config_local_diverged() > 0) { /* a local edit: an operator decides (config_local.c) */
        if (r->converge_held != version)
            log_warning("control plane: not taking the deployment's configuration version %lld "
                        "over the local edit of %s",
                        (long long)version, r->cfg.path);
        r->converge_held = version;
        return;
    }
    r->converge_held = 0;
    if (version == r->converge_failed && now_ms() < r->converge_retry_ms)
        return;
    snprintf(path, sizeof(path), "/api/v1/agent/config?node_id=%s", control.node_id);
    json_t *desired = NULL;
    long status = http_request(c, "GET", path, NULL, &desired, 0);
    json_t *v = json_object_get(desired, "version");
    json_t *text = json_object_get(desired, "text");
    int rc = -1;
    if (status != 200 || !json_is_integer(v) || !json_is_string(text)) {
        snprintf(detail, sizeof(detail), "cannot fetch it (HTTP %ld%s%s)", status,
                 c->error[0] ? ": " : "", c->error);
    } else {
        version = json_integer_value(v);
        log_info("control plane: this proxy is on configuration version %llu, the deployment "
                 "on %lld: applying it",
                 (unsigned long long)atomic_load(&control.shm->config_version),
                 (long long)version);
        rc = control_config_converge(version, json_string_value(text), detail, sizeof(detail));
    }
    if (rc == 0) {
        log_info("control plane: converged: %s", detail);
        r->converge_failed = 0;
    } else {
        if (r->converge_failed != version)
            log_error("control plane: cannot take the deployment's configuration version %lld: "
                      "%s; trying again every %d s",
                      (long long)version, detail, CONVERGE_RETRY_MS / 1000);
        r->converge_failed = version;
        r->converge_retry_ms = now_ms() + CONVERGE_RETRY_MS;
    }
    json_decref(desired);
}

static void *reporter_main(void *arg)
{
    reporter_state *r = arg;
    http_client c;
    reach_state reach = {.who = "reporter"};
    int64_t next_queries = 0, next_schema = 0, next_plans = 0;
    shm_route_table *t = malloc(sizeof(*t));

    if (!t || http_client_init(&c, &r->cfg) != 0) {
        log_error("control plane: cannot start the HTTP client");
        return NULL;
    }
    for (;;) {
        int64_t started = now_ms();
        pthread_mutex_lock(&report.lock);
        report.due = false; /* this report carries the table read below */
        pthread_mutex_unlock(&report.lock);
        if (shm_settings_version(control.shm) != r->settings_version)
            r->settings_version = shm_settings_read(control.shm, &r->cfg);
        shm_routes_read(control.shm, t);
        bool ok = true;
        long status;

        if (!r->registered) {
            char host[256] = "";
            char listen[2][CONFIG_HOST_MAX + 16];
            gethostname(host, sizeof(host) - 1);
            json_t *addrs = json_array();
            snprintf(listen[0], sizeof(listen[0]), "%s:%d", r->cfg.listen_addr,
                     r->cfg.listen_port);
            json_array_append_new(addrs, json_string(listen[0]));
            if (r->cfg.read_listen_port) {
                snprintf(listen[1], sizeof(listen[1]), "%s:%d", r->cfg.listen_addr,
                         r->cfg.read_listen_port);
                json_array_append_new(addrs, json_string(listen[1]));
            }
            const char *leader = leader_name(t);
            json_t *body = json_pack(
                "{s:s, s:s, s:s, s:o, s:I, s:I, s:o, s:b}", "node_id", control.node_id,
                "hostname", host, "version", PGRELAY_VERSION, "listen", addrs, "config_version",
                (json_int_t)config_local_claimed(), "epoch",
                (json_int_t)t->epoch, "leader", leader ? json_string(leader) : json_null(),
                "maintenance", atomic_load(&control.shm->maintenance) != 0);
            json_t *reply = NULL;
            status = post(&c, "/api/v1/agent/register", body, &reply);
            if (status == 200) {
                bool declared = !json_is_false(json_object_get(reply, "declared"));
                r->registered = true;
                if (!r->undeclared || declared) /* again while refused is not news */
                    log_info("control plane: registered as %s", control.node_id);
                if (!declared && !r->undeclared)
                    log_warning("control plane: node id %s is not declared in the deployment: "
                                "the control plane refuses its reports and sends it no leader "
                                "until an operator runs 'pgrelayctl create-proxy %s'; this "
                                "agent decides the leader alone meanwhile",
                                control.node_id, control.node_id);
                r->undeclared = !declared;
            } else {
                ok = false;
            }
            json_decref(reply);
        }
        if (ok) {
            json_t *reply = NULL;
            config_local_check(r->cfg.path); /* a local edit: claim no version */
            json_t *mbody = metrics_body(t);
            if (mbody)
                json_object_set_new(mbody, "config_diverged",
                                    json_integer(config_local_diverged()));
            status = post(&c, "/api/v1/agent/metrics", mbody, &reply);
            if (status == 200) {
                r->undeclared = false;
                follow_options(reply);
                if (!follow_answer(reply)) {
                    /* Garbage must not move the epoch, which only ever grows. */
                    snprintf(c.error, sizeof(c.error),
                             "metrics: the answer needs leader (a name or null) and epoch (a "
                             "whole number from 0 to 2^53)");
                    ok = false;
                } else {
                    converge(r, &c, reply);
                }
            } else {
                ok = false;
                if (status == 404 || status == 401 || status == 403)
                    r->registered = false; /* the control plane forgot us: register again */
                if (status == 403 && !r->undeclared) /* refused: not declared (or deleted) */
                    log_warning("control plane: refuses node id %s (%s); serving on this agent's "
                                "own leader decision",
                                control.node_id, c.error);
                r->undeclared = status == 403;
            }
            json_decref(reply);
        }
        if (ok && started >= next_queries) {
            next_queries = started + r->cfg.active_queries_interval_ms;
            ok = (status = post(&c, "/api/v1/agent/queries", queries_body(), NULL)) < 300 &&
                 status > 0;
        }
        if (ok && started >= next_plans) {
            /* Plans go with the running queries, on their interval. */
            next_plans = started + r->cfg.active_queries_interval_ms;
            uint32_t seq[SHM_PLANS_MAX];
            uint64_t change = 0;
            json_t *body = plans_body(r->plan_seq_sent, seq, r->plan_change_sent, &change);
            if (body) {
                ok = (status = post(&c, "/api/v1/agent/plans", body, NULL)) < 300 && status > 0;
                if (ok) {
                    memcpy(r->plan_seq_sent, seq, sizeof(seq));
                    r->plan_change_sent = change;
                }
            }
        }
        if (ok && r->config_sent_version != r->settings_version) {
            ok = (status = post(&c, "/api/v1/agent/config", config_body(&r->cfg), NULL)) < 300 &&
                 status > 0;
            if (ok)
                r->config_sent_version = r->settings_version;
        }
        if (ok && started >= next_schema) {
            next_schema = started + r->cfg.schema_interval_ms;
            json_t *schema = schema_body(&r->cfg, t);
            char *text = schema ? json_dumps(json_object_get(schema, "tables"), JSON_COMPACT)
                                : NULL;
            if (schema && text && (!r->schema_sent || strcmp(text, r->schema_sent) != 0)) {
                ok = (status = post(&c, "/api/v1/agent/schema", schema, NULL)) < 300 &&
                     status > 0;
                schema = NULL;
                if (ok) {
                    free(r->schema_sent);
                    r->schema_sent = text;
                    text = NULL;
                }
            }
            json_decref(schema);
            free(text);
        }

        int64_t delay;
        if (ok) {
            reach_ok(&reach);
            delay = r->cfg.metrics_interval_ms - (now_ms() - started);
        } else {
            reach_failed(&reach, &c, status);
            if (reach.down && now_ms() - reach.down_since_ms >= r->cfg.control_grace_period_ms) {
                control_msg m = {.type = CONTROL_MSG_UNREACHABLE};
                ssize_t n = send(control.loop_fd, &m, sizeof(m), MSG_NOSIGNAL);
                (void)n;
            }
            delay = backoff_ms(reach.failures);
            if (r->undeclared && delay > UNDECLARED_RETRY_MS)
                delay = UNDECLARED_RETRY_MS; /* be there soon after an operator declares us */
            if (delay > r->cfg.metrics_interval_ms * 10 && r->cfg.metrics_interval_ms > delay / 10)
                delay = r->cfg.metrics_interval_ms * 10;
        }
        if (delay > 0 && ok)
            reporter_wait(delay);
        else if (delay > 0)
            sleep_ms(delay); /* backing off: a changed view does not shorten it */
    }
    return NULL;
}

/* ---- the poller ---- */

static void *poller_main(void *arg)
{
    config *cfg = arg;
    http_client c;
    reach_state reach = {.who = "commands"};
    char path[512], detail[512]; /* path: a node id escaped takes up to 3 x 63 bytes */

    if (http_client_init(&c, cfg) != 0) {
        log_error("control plane: cannot start the HTTP client");
        return NULL;
    }
    /* a node id may hold '&', '+', '%' or '#': escaped, it names exactly this proxy */
    char *node_id = curl_easy_escape(c.curl, control.node_id, 0);
    if (!node_id) {
        log_error("control plane: cannot escape node id %s for the command poll", control.node_id);
        http_client_free(&c);
        return NULL;
    }
    snprintf(path, sizeof(path), "/api/v1/agent/commands?node_id=%s&wait_s=%d", node_id,
             POLL_WAIT_S);
    curl_free(node_id);
    for (;;) {
        json_t *reply = NULL;
        long status = http_request(&c, "GET", path, NULL, &reply, POLL_WAIT_S * 1000L);
        json_t *cmds = json_object_get(reply, "commands");
        if (status != 200 || !json_is_array(cmds)) {
            if (status == 200)
                snprintf(c.error, sizeof(c.error), "commands: the answer has no list");
            reach_failed(&reach, &c, status);
            json_decref(reply);
            int64_t delay = backoff_ms(reach.failures);
            sleep_ms(status == 403 && delay > UNDECLARED_RETRY_MS ? UNDECLARED_RETRY_MS : delay);
            continue;
        }
        reach_ok(&reach);
        /* The control plane answers parked polls at once when it decides a new leader. */
        follow_answer(reply);
        size_t i;
        json_t *cmd;
        json_array_foreach(cmds, i, cmd)
        {
            json_t *id = json_object_get(cmd, "id");
            json_t *type = json_object_get(cmd, "type");
            if (!json_is_integer(id) || !json_is_string(type))
                continue;
            detail[0] = '\0';
            int rc = control_run_command(json_string_value(type), json_object_get(cmd, "args"),
                                         detail, sizeof(detail));
            /* a pause renewal comes every third of pause_lease: debug, unless it failed */
            log_level level = rc == 0 && json_is_true(json_object_get(
                                             json_object_get(cmd, "args"), "renewal"))
                                  ? LOG_LVL_DEBUG
                                  : LOG_LVL_INFO;
            if (log_current_level >= level)
                log_msg(level, "control plane command %lld (%s): %s%s",
                        (long long)json_integer_value(id), json_string_value(type),
                        rc == 0 ? "ok" : "failed: ", rc == 0 ? "" : detail);
            char ack[128];
            snprintf(ack, sizeof(ack), "/api/v1/agent/commands/%lld/ack",
                     (long long)json_integer_value(id));
            json_t *body = json_pack("{s:s, s:b, s:s}", "node_id", control.node_id, "ok",
                                     rc == 0, "detail", detail);
            /* An ack that does not arrive is fine: the command comes again. */
            post(&c, ack, body, NULL);
        }
        json_decref(reply);
    }
    return NULL;
}

int control_start(agent *a)
{
    int pair[2];
    pthread_t tid;

    if (!a->shm || !a->cfg->control_endpoint[0])
        return -1;
    if (!a->cfg->control_token[0]) {
        log_error("[control] endpoint is set but token is empty: not connecting");
        return -1;
    }
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
        log_error("control plane: socketpair: %s", strerror(errno));
        return -1;
    }
    control.shm = a->shm;
    control.master_fd = a->channel_fd;
    control.loop_fd = pair[1];
    /* NODE_ID from the environment, else [control] node_id, else the host name */
    const char *id = getenv("NODE_ID");
    const char *from = "NODE_ID";
    char host[sizeof(control.node_id)] = "";
    if (!id || !*id) {
        id = a->cfg->control_node_id;
        from = "[control] node_id";
    }
    if (!*id && gethostname(host, sizeof(host) - 1) == 0) {
        id = host;
        from = "the host name";
    }
    for (const char *ch = id; *ch; ch++) {
        if (!isgraph((unsigned char)*ch)) {
            log_error("control plane: node id \"%s\" (%s) has blanks or control characters: "
                      "using a random one, which no operator can declare",
                      id, from);
            id = "";
            break;
        }
    }
    if (*id) {
        snprintf(control.node_id, sizeof(control.node_id), "%s", id);
    } else {
        from = "random";
        uint64_t r = 0;
        if (getrandom(&r, sizeof(r), 0) != sizeof(r))
            r = (uint64_t)now_ms() ^ ((uint64_t)getpid() << 32);
        snprintf(control.node_id, sizeof(control.node_id), "proxy-%016llx", (unsigned long long)r);
    }
    control_config_init(a->cfg->path);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    reporter_state *r = calloc(1, sizeof(*r));
    config *pcfg = malloc(sizeof(*pcfg));
    if (!r || !pcfg) {
        free(r);
        free(pcfg);
        return -1;
    }
    memcpy(&r->cfg, a->cfg, sizeof(r->cfg));
    memcpy(pcfg, a->cfg, sizeof(*pcfg));
    r->settings_version = shm_settings_version(a->shm);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&report.cond, &attr);
    pthread_condattr_destroy(&attr);
    if (pthread_create(&tid, NULL, reporter_main, r) != 0 ||
        pthread_create(&tid, NULL, poller_main, pcfg) != 0) {
        log_error("control plane: cannot start its threads");
        return -1;
    }
    log_info("control plane: %s as node %s (%s)", a->cfg->control_endpoint, control.node_id, from);
    return pair[0];
}
