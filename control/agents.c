/* agents.c - the agent endpoints: register, telemetry uploads, the command long poll and acks. */
#include "agents.h"
#include "control.h"
#include "leader.h"
#include "log.h"
#include "members.h"
#include "operator.h"
#include "store.h"
#include "store_worker.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define AGENTS_DETAIL_MAX 4096 /* longest ack detail accepted */
#define AGENTS_TEXT_MAX   (STATE_TEXT_MAX - 1)
#define AGENTS_NODE_MAX   (STATE_NODE_NAME_MAX - 1)
#define AGENTS_QUERY_MAX  (64 * 1024) /* longest statement text accepted */
#define AGENTS_INT_MAX    INT64_MAX
#define AGENTS_ID_DIGITS  19 /* digits of the largest command id */
#define MS_PER_S          1000
#define US_PER_MS         1000
/* A long poll that would only repeat commands it delivered this recently waits this long
 * first: an agent working on a command while it polls again does not spin. */
#define AGENTS_REDELIVER_HOLD_MS 1000
#define AGENTS_REFUSED_LOG_MS    10000 /* refusals by address are logged this often at most */

/* Counts agents_wake calls: a poll whose query was under way when a command was queued (it
 * was not parked yet, so nothing woke it) reads again instead of parking on a stale answer. */
static uint64_t agents_wakes;

/* ---- common parts ---- */

/* The node_id of a body, validated; answers 400 and returns NULL when missing or bad. */
static const char *agents_node_id(http_call *call)
{
    const char *id = NULL;
    if (!http_field_string(call, call->body, NULL, "node_id", true, STATE_NODE_ID_MAX - 1, &id))
        return NULL;
    if (!http_node_id_valid(id)) {
        http_reply_error(call->req, 400,
                         "node_id must be 1 to %d printable characters without blanks",
                         STATE_NODE_ID_MAX - 1);
        return NULL;
    }
    return id;
}

/* A declared proxy pinned to an address (option address) calling from another one is refused:
 * answered 403 and false. */
static bool agents_from_its_address(http_call *call, const state_proxy *p)
{
    static int64_t logged_ms; /* the last warning: at most one per AGENTS_REFUSED_LOG_MS */
    char peer[INET6_ADDRSTRLEN + 1];
    if (members_peer_allowed(p, call->req, peer, sizeof(peer)))
        return true;
    if (control_mono_ms() - logged_ms >= AGENTS_REFUSED_LOG_MS) {
        logged_ms = control_mono_ms();
        log_warning("deployment %s: refused a call as proxy %s from %s (it is pinned to %s)",
                    call->dep->name, p->node_id, peer,
                    json_string_value(json_object_get(p->options, "address")));
    }
    http_reply_error(call->req, 403, "proxy %s takes calls only from its address, not from %s",
                     p->node_id, peer);
    return false;
}

/* The level of a line about a pending proxy: info at most once per AGENTS_REFUSED_LOG_MS,
 * debug otherwise (whoever holds a deployment token can invent node ids at request rate). */
static log_level agents_pending_level(void)
{
    static int64_t last_ms;
    if (last_ms && control_mono_ms() - last_ms < AGENTS_REFUSED_LOG_MS)
        return LOG_LVL_DEBUG;
    last_ms = control_mono_ms();
    return LOG_LVL_INFO;
}

/* The proxy a request is about, recorded on first contact (pending until declared) and marked
 * as seen now. NULL after answering 500 (out of memory) or 403 (a declared proxy's node id from
 * another address than the one it is pinned to: not marked as seen). */
static state_proxy *agents_seen(http_call *call, const char *node_id)
{
    state_proxy *p = state_get_proxy(call->dep, node_id);
    if (!p) {
        http_reply_error(call->req, 500, "out of memory");
        return NULL;
    }
    if (p->declared && !agents_from_its_address(call, p))
        return NULL;
    log_level level = p->declared ? LOG_LVL_INFO : agents_pending_level();
    if (p->last_seen_ms == 0 && log_current_level >= level)
        log_msg(level, "deployment %s: proxy %s appeared%s", call->dep->name, node_id,
                p->declared ? "" : " (not declared: pending)");
    int64_t now = control_now_ms();
    if (p->declared && !state_proxy_live(p, now))
        state_decide_again(p->dep); /* heard again: what it reports counts again */
    p->last_seen_ms = now;
    return p;
}

/* As agents_seen, for the calls only a declared proxy may make: an undeclared node id is
 * recorded and answered 403 (NULL returned). */
static state_proxy *agents_proxy(http_call *call, const char *node_id)
{
    state_proxy *p = agents_seen(call, node_id);
    if (!p || p->declared)
        return p;
    http_reply_error(call->req, 403,
                     "proxy %s is not declared in deployment %s: it is pending until an operator "
                     "runs 'pgrelayctl create-proxy %s'",
                     node_id, call->dep->name, node_id);
    return NULL;
}

state_proxy *agents_caller(http_call *call)
{
    const char *node_id = agents_node_id(call);
    return node_id ? agents_proxy(call, node_id) : NULL;
}

static void agents_set_leader(state_proxy *p, json_t *v)
{
    const char *leader = json_is_string(v) ? json_string_value(v) : "";
    if (strcmp(p->leader, leader) != 0) {
        snprintf(p->leader, sizeof(p->leader), "%s", leader);
        p->dirty = true;
        state_decide_again(p->dep);
    }
}

static void agents_set_int(state_proxy *p, int64_t *field, int64_t v)
{
    if (v >= 0 && *field != v) {
        *field = v;
        p->dirty = true;
        if (field == &p->epoch)
            state_decide_again(p->dep);
    }
}

/* A "leader" field: absent, null, or a node name. */
static bool agents_leader_field(http_call *call, json_t *obj, const char **out)
{
    json_t *v = json_object_get(obj, "leader");
    if (!v || json_is_null(v))
        return true;
    return http_field_string(call, obj, NULL, "leader", false, AGENTS_NODE_MAX, out);
}

/* ---- register ---- */

void agents_register(http_call *call)
{
    const char *node_id, *hostname = NULL, *version = NULL, *leader = NULL;
    json_t *listen = NULL;
    int64_t config_version = -1, epoch = -1;
    bool maintenance = false;

    if (!(node_id = agents_node_id(call)) ||
        !http_field_string(call, call->body, NULL, "hostname", false, AGENTS_TEXT_MAX, &hostname) ||
        !http_field_string(call, call->body, NULL, "version", false, AGENTS_TEXT_MAX, &version) ||
        !http_field_container(call, call->body, NULL, "listen", false, false, &listen) ||
        !http_field_int(call, call->body, NULL, "config_version", false, 0, AGENTS_INT_MAX,
                        &config_version) ||
        !http_field_int(call, call->body, NULL, "epoch", false, 0, AGENTS_INT_MAX, &epoch) ||
        !http_field_bool(call, call->body, NULL, "maintenance", false, &maintenance) ||
        !agents_leader_field(call, call->body, &leader))
        return;
    if (listen) {
        size_t i;
        json_t *v;
        json_array_foreach(listen, i, v)
        {
            if (!json_is_string(v)) {
                http_reply_error(call->req, 400, "field listen must be an array of strings");
                return;
            }
        }
    }
    state_proxy *p = agents_seen(call, node_id);
    if (!p)
        return;
    if (!p->declared && control.cfg->auto_declare && members_declare(p) != 0) {
        http_reply_error(call->req, 503, "store unreachable: %s", store_error());
        return;
    }
    snprintf(p->hostname, sizeof(p->hostname), "%s", hostname ? hostname : "");
    snprintf(p->version, sizeof(p->version), "%s", version ? version : "");
    json_decref(p->listen);
    p->listen = listen ? json_deep_copy(listen) : json_array();
    if (p->declared) { /* a pending proxy's claims feed no decision: epochs, config versions */
        agents_set_int(p, &p->config_version, config_version);
        agents_set_int(p, &p->epoch, epoch);
        p->maintenance = maintenance;
        agents_set_leader(p, json_object_get(call->body, "leader"));
    }
    p->registered_ms = p->last_seen_ms;
    if (p->declared) {
        if (store_proxy_save(p) != 0) {
            http_reply_error(call->req, 503, "store unreachable: %s", store_error());
            return;
        }
        p->dirty = false;
        p->saved_seen_ms = p->last_seen_ms;
    }
    log_level level = p->declared ? LOG_LVL_INFO : agents_pending_level();
    if (log_current_level >= level)
        log_msg(level, "deployment %s: proxy %s registered (host %s, version %s)%s",
                call->dep->name, node_id, p->hostname[0] ? p->hostname : "?",
                p->version[0] ? p->version : "?",
                p->declared ? "" : "; not declared: pending until an operator creates it");

    int64_t wait_s = control.cfg->poll_wait_max_ms / MS_PER_S;
    if (wait_s > AGENTS_POLL_WAIT_SUGGESTED_S)
        wait_s = AGENTS_POLL_WAIT_SUGGESTED_S;
    json_t *answer = json_pack("{s:s, s:s, s:I, s:b}", "deployment", call->dep->name, "node_id",
                               node_id, "poll_wait_s", (json_int_t)wait_s, "declared", p->declared);
    if (!p->declared)
        json_object_set_new(answer, "warning",
                            json_sprintf("proxy %s is not declared in deployment %s: every other "
                                         "call is refused (403) until an operator runs "
                                         "'pgrelayctl create-proxy %s'",
                                         node_id, call->dep->name, node_id));
    http_reply_json(call->req, 200, answer);
}

/* ---- metrics ---- */

/* The cumulative counters of a metrics body, and of each of its nodes. */
static const struct {
    const char *key;
    size_t offset; /* of the int64_t in state_sample */
} agents_counters[] = {
    {"statements", offsetof(state_sample, statements)},
    {"bytes_in", offsetof(state_sample, bytes_in)},
    {"bytes_out", offsetof(state_sample, bytes_out)},
    {"errors", offsetof(state_sample, errors)},
    {"latency_us", offsetof(state_sample, latency_us)},
    {"statements_completed", offsetof(state_sample, statements_completed)},
};
#define AGENTS_N_COUNTERS (sizeof(agents_counters) / sizeof(agents_counters[0]))

static int64_t *agents_counter(state_sample *s, size_t i)
{
    return (int64_t *)((char *)s + agents_counters[i].offset);
}

/* The counters of obj (a body or a node) into s; 400 when one is not a whole number >= 0. */
static bool agents_sample_fields(http_call *call, json_t *obj, const char *where, state_sample *s)
{
    for (size_t i = 0; i < AGENTS_N_COUNTERS; i++)
        if (!http_field_int(call, obj, where, agents_counters[i].key, false, 0, AGENTS_INT_MAX,
                            agents_counter(s, i)))
            return false;
    return true;
}

/* A node's optional latency_buckets: STATE_LATENCY_BUCKETS whole numbers >= 0. */
static bool agents_check_latency_buckets(http_call *call, json_t *node, const char *where)
{
    json_t *a = json_object_get(node, "latency_buckets");
    if (!a)
        return true;
    bool ok = json_is_array(a) && json_array_size(a) == STATE_LATENCY_BUCKETS;
    for (size_t i = 0; ok && i < STATE_LATENCY_BUCKETS; i++) {
        json_t *v = json_array_get(a, i);
        ok = json_is_integer(v) && json_integer_value(v) >= 0 &&
             json_integer_value(v) <= AGENTS_INT_MAX;
    }
    if (!ok)
        http_reply_error(call->req, 400, "%s.latency_buckets must be an array of %d whole numbers >= 0",
                         where, STATE_LATENCY_BUCKETS);
    return ok;
}

/* The nodes observation: an array of objects with at least a name. */
static bool agents_check_nodes(http_call *call, json_t *nodes)
{
    size_t i;
    json_t *n;
    char where[64];
    json_array_foreach(nodes, i, n)
    {
        const char *s = NULL;
        int64_t v;
        bool b;
        snprintf(where, sizeof(where), "nodes[%zu]", i);
        if (!json_is_object(n)) {
            http_reply_error(call->req, 400, "%s must be an object", where);
            return false;
        }
        if (!http_field_string(call, n, where, "name", true, AGENTS_NODE_MAX, &s) ||
            !http_field_string(call, n, where, "host", false, AGENTS_TEXT_MAX, &s) ||
            !http_field_int(call, n, where, "port", false, 0, UINT16_MAX, &v) ||
            !http_field_string(call, n, where, "role", false, AGENTS_TEXT_MAX, &s) ||
            !http_field_string(call, n, where, "health", false, AGENTS_TEXT_MAX, &s) ||
            !http_field_bool(call, n, where, "in_recovery", false, &b) ||
            !http_field_int(call, n, where, "lsn", false, 0, AGENTS_INT_MAX, &v) ||
            !http_field_int(call, n, where, "lag_bytes", false, INT64_MIN, AGENTS_INT_MAX, &v) ||
            !http_field_int(call, n, where, "lag_ms", false, INT64_MIN, AGENTS_INT_MAX, &v) ||
            !http_field_int(call, n, where, "write_sessions", false, 0, INT32_MAX, &v) ||
            !http_field_int(call, n, where, "read_sessions", false, 0, INT32_MAX, &v) ||
            !http_field_string(call, n, where, "patroni", false, AGENTS_TEXT_MAX, &s) ||
            !agents_check_latency_buckets(call, n, where))
            return false;
        const char *patroni = json_string_value(json_object_get(n, "patroni"));
        if (patroni && strcmp(patroni, "leader") != 0 && strcmp(patroni, "not_leader") != 0) {
            http_reply_error(call->req, 400, "%s.patroni must be \"leader\" or \"not_leader\"",
                             where);
            return false;
        }
        state_sample counters;
        if (!agents_sample_fields(call, n, where, &counters))
            return false;
    }
    return true;
}

/* Each node's counters as a sample of the node (the nodes were checked). */
static void agents_node_samples(state_proxy *p, json_t *nodes, const state_sample *body)
{
    size_t i;
    json_t *n;
    json_array_foreach(nodes, i, n)
    {
        state_sample s = {.received_ms = body->received_ms, .ts_ms = body->ts_ms};
        s.clients = json_integer_value(json_object_get(n, "write_sessions")) +
                    json_integer_value(json_object_get(n, "read_sessions"));
        for (size_t c = 0; c < AGENTS_N_COUNTERS; c++)
            *agents_counter(&s, c) = json_integer_value(json_object_get(n, agents_counters[c].key));
        int64_t buckets[STATE_LATENCY_BUCKETS];
        json_t *a = json_object_get(n, "latency_buckets");
        for (size_t b = 0; a && b < STATE_LATENCY_BUCKETS; b++)
            buckets[b] = json_integer_value(json_array_get(a, b));
        state_add_node_sample(p, json_string_value(json_object_get(n, "name")), &s,
                              a ? buckets : NULL);
    }
}

void agents_metrics(http_call *call)
{
    const char *node_id, *leader = NULL;
    state_sample s = {0};
    int64_t epoch = -1, config_version = -1, until_ms = 0; /* until_ms: checked, kept in the body */
    bool maintenance = false;
    json_t *nodes = NULL;

    if (!(node_id = agents_node_id(call)) ||
        !http_field_int(call, call->body, NULL, "ts_ms", false, 0, AGENTS_INT_MAX, &s.ts_ms) ||
        !http_field_int(call, call->body, NULL, "epoch", false, 0, AGENTS_INT_MAX, &epoch) ||
        !http_field_int(call, call->body, NULL, "config_version", false, 0, AGENTS_INT_MAX,
                        &config_version) ||
        !http_field_bool(call, call->body, NULL, "maintenance", false, &maintenance) ||
        !http_field_int(call, call->body, NULL, "maintenance_until_ms", false, 0, AGENTS_INT_MAX,
                        &until_ms) ||
        !agents_leader_field(call, call->body, &leader) ||
        !http_field_container(call, call->body, NULL, "nodes", false, false, &nodes))
        return;
    if (!http_field_int(call, call->body, NULL, "clients", false, 0, AGENTS_INT_MAX, &s.clients) ||
        !agents_sample_fields(call, call->body, NULL, &s))
        return;
    if (nodes && !agents_check_nodes(call, nodes))
        return;

    state_proxy *p = agents_proxy(call, node_id);
    if (!p)
        return;
    int64_t now = p->last_seen_ms;
    s.received_ms = now;
    state_add_sample(p, &s);
    json_decref(p->last_metrics);
    p->last_metrics = json_incref(call->body);
    p->last_metrics_ms = now;
    if (nodes) {
        if (leader_observe(p, nodes, now))
            state_decide_again(p->dep);
        json_decref(p->nodes);
        p->nodes = json_incref(nodes);
        p->nodes_ms = now;
        agents_node_samples(p, nodes, &s);
    }
    agents_set_int(p, &p->epoch, epoch);
    agents_set_int(p, &p->config_version, config_version);
    if (json_object_get(call->body, "maintenance") && p->maintenance != maintenance) {
        p->maintenance = maintenance;
        p->dirty = true;
    }
    if (json_object_get(call->body, "leader"))
        agents_set_leader(p, json_object_get(call->body, "leader"));

    leader_decide(call->dep); /* only when something it reads changed */
    state_deployment *d = call->dep;
    json_t *answer = json_pack("{s:o, s:I}", "leader",
                               d->leader[0] ? json_string(d->leader) : json_null(), "epoch",
                               (json_int_t)d->epoch);
    if (d->config_version > 0) /* the desired configuration version (config_apply.c) */
        json_object_set_new(answer, "config_version", json_integer(d->config_version));
    /* the per-proxy options the agent applies itself (members.c), in every answer while set
     * (absent: the defaults), so that a proxy that restarted converges at its first call */
    if (answer && json_is_true(json_object_get(p->options, "read_only")))
        json_object_set_new(answer, "options", json_pack("{s:b}", "read_only", 1));
    http_reply_json(call->req, 200, answer);
}

/* ---- queries, config, schema ---- */

void agents_queries(http_call *call)
{
    const char *node_id;
    json_t *queries = NULL, *q;
    size_t i;
    char where[64];

    if (!(node_id = agents_node_id(call)) ||
        !http_field_container(call, call->body, NULL, "queries", true, false, &queries))
        return;
    json_array_foreach(queries, i, q)
    {
        const char *s;
        int64_t v;
        snprintf(where, sizeof(where), "queries[%zu]", i);
        if (!json_is_object(q)) {
            http_reply_error(call->req, 400, "%s must be an object", where);
            return;
        }
        if (!http_field_int(call, q, where, "session", false, INT64_MIN, AGENTS_INT_MAX, &v) ||
            !http_field_int(call, q, where, "duration_ms", false, INT64_MIN, AGENTS_INT_MAX, &v) ||
            !http_field_string(call, q, where, "client", false, AGENTS_TEXT_MAX, &s) ||
            !http_field_string(call, q, where, "application_name", false, AGENTS_TEXT_MAX, &s) ||
            !http_field_string(call, q, where, "user", false, AGENTS_TEXT_MAX, &s) ||
            !http_field_string(call, q, where, "database", false, AGENTS_TEXT_MAX, &s) ||
            !http_field_string(call, q, where, "node", false, AGENTS_TEXT_MAX, &s) ||
            !http_field_string(call, q, where, "tls", false, AGENTS_TEXT_MAX, &s) ||
            !http_field_string(call, q, where, "state", false, AGENTS_TEXT_MAX, &s) ||
            !http_field_string(call, q, where, "text", false, AGENTS_QUERY_MAX, &s))
            return;
    }
    state_proxy *p = agents_proxy(call, node_id);
    if (!p)
        return;
    json_decref(p->queries);
    p->queries = json_incref(queries);
    p->queries_ms = p->last_seen_ms;
    http_reply_empty(call->req, 204);
}

void agents_config(http_call *call)
{
    const char *node_id;
    json_t *config = NULL;
    int64_t version = -1;

    if (!(node_id = agents_node_id(call)) ||
        !http_field_int(call, call->body, NULL, "config_version", true, 0, AGENTS_INT_MAX,
                        &version) ||
        !http_field_container(call, call->body, NULL, "config", true, true, &config))
        return;
    state_proxy *p = agents_proxy(call, node_id);
    if (!p)
        return;
    json_decref(p->config);
    p->config = json_incref(config);
    p->config_ms = p->last_seen_ms;
    p->config_reported_version = version;
    agents_set_int(p, &p->config_version, version);
    http_reply_empty(call->req, 204);
}

void agents_schema(http_call *call)
{
    const char *node_id, *database = NULL;
    json_t *tables = NULL;

    if (!(node_id = agents_node_id(call)) ||
        !http_field_string(call, call->body, NULL, "database", true, AGENTS_TEXT_MAX, &database) ||
        !http_field_container(call, call->body, NULL, "tables", true, false, &tables))
        return;
    state_proxy *p = agents_proxy(call, node_id);
    if (!p)
        return;
    if (!p->schema)
        p->schema = json_object();
    json_object_set_new(
        p->schema, database,
        json_pack("{s:O, s:I}", "tables", tables, "received_ms", (json_int_t)p->last_seen_ms));
    http_reply_empty(call->req, 204);
}

/* ---- the long poll ---- */

/* A poll's answer: the commands, and the deployment's leader and epoch, so that an agent
 * learns a new decision from the poll the control plane answers at once (leader.c) instead of
 * at its next metrics call. */
static json_t *agents_poll_answer(const state_deployment *dep, json_t *commands)
{
    json_t *answer = json_pack("{s:o, s:o, s:I}", "commands", commands, "leader",
                               dep->leader[0] ? json_string(dep->leader) : json_null(), "epoch",
                               (json_int_t)dep->epoch);
    if (dep->config_version > 0) /* the desired configuration version (config_apply.c) */
        json_object_set_new(answer, "config_version", json_integer(dep->config_version));
    return answer;
}

static void agents_unpark(state_proxy *p)
{
    if (p->poll_timer)
        event_free(p->poll_timer);
    if (p->poll_watch)
        event_free(p->poll_watch);
    p->poll_timer = NULL;
    p->poll_watch = NULL;
    p->poll_req = NULL;
    /* the poll held it live; now its last request does, or nothing does */
    if (p->declared && !state_proxy_live(p, control_now_ms()))
        state_decide_again(p->dep);
}

/* Answer p's parked poll with the given list (stolen). */
static void agents_answer(state_proxy *p, json_t *commands)
{
    struct evhttp_request *req = p->poll_req;
    agents_unpark(p);
    /* held until now: the proxy was there all along, unless its connection went away */
    if (evhttp_request_get_connection(req))
        p->last_seen_ms = control_now_ms();
    http_reply_json(req, 200, agents_poll_answer(p->dep, commands));
}

void agents_wake(state_proxy *p)
{
    agents_wakes++;
    if (!p->poll_req)
        return;
    json_t *pending = store_commands_pending(p->dep->name, p->node_id, NULL);
    if (!pending) {
        struct evhttp_request *req = p->poll_req;
        agents_unpark(p);
        http_reply_error(req, 503, "store unreachable: %s", store_error());
        return;
    }
    agents_answer(p, pending);
}

/* The parked poll's socket became readable. evhttp stops reading a connection while its
 * request waits for an answer, so it would not notice an agent that went away until the
 * answer is written: the proxy would look live for a whole poll_wait_max. Peek: end of file
 * or an error means the agent hung up, and the poll is dropped (the answer goes nowhere,
 * which makes evhttp free the connection). Anything else (bytes of a next request) is left
 * for evhttp once the poll is answered. */
static void agents_poll_watch(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    state_proxy *p = arg;
    char c;
    ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n > 0 || (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))) {
        if (n < 0) /* spurious: watch again */
            event_add(p->poll_watch, NULL);
        return;
    }
    log_debug("deployment %s: proxy %s hung up during its long poll", p->dep->name, p->node_id);
    struct evhttp_request *req = p->poll_req;
    agents_unpark(p);
    http_reply_json(req, 200, agents_poll_answer(p->dep, json_array()));
}

/* Watch the socket of p's freshly parked poll for a hang-up (best effort: without a socket
 * the poll simply waits for its timer). */
static void agents_watch_hangup(state_proxy *p)
{
    struct evhttp_connection *conn = evhttp_request_get_connection(p->poll_req);
    struct bufferevent *bev = conn ? evhttp_connection_get_bufferevent(conn) : NULL;
    evutil_socket_t fd = bev ? bufferevent_getfd(bev) : -1;
    if (fd < 0)
        return;
    p->poll_watch = event_new(control.base, fd, EV_READ, agents_poll_watch, p);
    if (p->poll_watch && event_add(p->poll_watch, NULL) != 0) {
        event_free(p->poll_watch);
        p->poll_watch = NULL;
    }
}

/* The wait ran out: answer with whatever is pending (usually nothing). */
static void agents_poll_timeout(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    agents_wake(arg);
}

void agents_refuse_poll(state_proxy *p, const char *why)
{
    if (!p->poll_req)
        return;
    struct evhttp_request *req = p->poll_req;
    agents_unpark(p);
    http_reply_error(req, 403, "%s", why);
}

void agents_release_all(const char *reason)
{
    for (state_deployment *d = state_deployments(); d; d = d->next) {
        for (state_proxy *p = d->proxies; p; p = p->next) {
            if (!p->poll_req)
                continue;
            struct evhttp_request *req = p->poll_req;
            agents_unpark(p);
            http_reply_error(req, 503, "%s", reason);
        }
    }
}

/* A long poll whose pending commands the store worker reads. */
typedef struct agents_poll_job {
    store_job job;
    struct evhttp_request *req; /* answered by agents_poll_done, or parked */
    char deployment[CCONFIG_NAME_MAX];
    char node_id[STATE_NODE_ID_MAX];
    int64_t wait_s;
    json_t *pending; /* the commands (worker), or NULL when the store failed */
    int64_t since_ms;
    uint64_t wakes; /* agents_wakes when the query was queued */
} agents_poll_job;


static int agents_poll_run(store_job *job)
{
    agents_poll_job *j = (agents_poll_job *)job;
    j->pending = store_commands_pending(j->deployment, j->node_id, &j->since_ms);
    return j->pending ? 0 : -1;
}

/* Back on the loop: answer at once, or park the poll until a command or its wait ends. */
static void agents_poll_done(store_job *job)
{
    agents_poll_job *j = (agents_poll_job *)job;
    struct evhttp_request *req = j->req;
    json_t *pending = j->pending;
    int64_t wait_s = j->wait_s, since_ms = j->since_ms;
    state_deployment *dep = control.active ? state_find_deployment(j->deployment) : NULL;
    state_proxy *p = dep ? state_find_proxy(dep, j->node_id) : NULL;
    if (!p) { /* the state went away meanwhile (lease lost, proxy deleted) */
        json_decref(pending);
        http_reply_error(req, 503, "not serving: %s",
                         control.active ? "the proxy is no longer known" : "state dropped");
        free(j);
        return;
    }
    if (!pending) {
        http_reply_error(req, 503, "store unreachable: %s", j->job.error);
        free(j);
        return;
    }
    if (json_array_size(pending) == 0 && wait_s > 0 && j->wakes != agents_wakes) {
        json_decref(pending); /* a command may have come meanwhile: read again */
        j->pending = NULL;
        j->since_ms = -1;
        j->wakes = agents_wakes;
        store_worker_submit(&j->job);
        return;
    }
    free(j);
    int64_t wait_ms = wait_s * MS_PER_S;
    if (json_array_size(pending) > 0) {
        bool repeat_only = since_ms >= 0 && since_ms < AGENTS_REDELIVER_HOLD_MS;
        if (!repeat_only || wait_s == 0) {
            http_reply_json(req, 200, agents_poll_answer(dep, pending));
            return;
        }
        wait_ms = AGENTS_REDELIVER_HOLD_MS;
    } else if (wait_s == 0) {
        http_reply_json(req, 200, agents_poll_answer(dep, pending));
        return;
    }
    json_decref(pending);
    if (p->poll_req) /* an older poll of the same proxy: it gets an empty answer */
        agents_answer(p, json_array());
    struct timeval tv = {.tv_sec = (time_t)(wait_ms / MS_PER_S),
                         .tv_usec = (suseconds_t)((wait_ms % MS_PER_S) * US_PER_MS)};
    p->poll_timer = evtimer_new(control.base, agents_poll_timeout, p);
    if (!p->poll_timer || evtimer_add(p->poll_timer, &tv) != 0) {
        if (p->poll_timer)
            event_free(p->poll_timer);
        p->poll_timer = NULL;
        http_reply_error(req, 500, "cannot start the long-poll timer");
        return;
    }
    p->poll_req = req;
    agents_watch_hangup(p);
    log_debug("deployment %s: proxy %s polls for %" PRId64 "s", dep->name, p->node_id, wait_s);
}

void agents_commands(http_call *call)
{
    const char *node_id = evhttp_find_header(&call->query, "node_id");
    const char *wait_text = evhttp_find_header(&call->query, "wait_s");
    int64_t wait_s = 0;
    int64_t wait_max_s = control.cfg->poll_wait_max_ms / MS_PER_S;

    if (!node_id) {
        http_reply_error(call->req, 400, "missing query parameter node_id");
        return;
    }
    if (!http_node_id_valid(node_id)) {
        http_reply_error(call->req, 400,
                         "node_id must be 1 to %d printable characters without blanks",
                         STATE_NODE_ID_MAX - 1);
        return;
    }
    if (wait_text) {
        char *end;
        long long v = strtoll(wait_text, &end, 10);
        if (!isdigit((unsigned char)wait_text[0]) || *end != '\0' || v < 0) {
            http_reply_error(call->req, 400, "wait_s must be a whole number of seconds");
            return;
        }
        wait_s = v > wait_max_s ? wait_max_s : v;
    }
    state_proxy *p = agents_proxy(call, node_id);
    if (!p)
        return;
    /* the pending commands are read (and marked delivered) by the store worker: a slow
     * store holds this poll, not the event loop */
    agents_poll_job *job = calloc(1, sizeof(*job));
    if (!job) {
        http_reply_error(call->req, 500, "out of memory");
        return;
    }
    job->req = call->req;
    snprintf(job->deployment, sizeof(job->deployment), "%s", call->dep->name);
    snprintf(job->node_id, sizeof(job->node_id), "%s", node_id);
    job->wait_s = wait_s;
    job->since_ms = -1;
    job->wakes = agents_wakes;
    job->job.run = agents_poll_run;
    job->job.done = agents_poll_done;
    store_worker_submit(&job->job);
}

/* ---- acknowledgements ---- */

/* A command id from the path: digits only. */
static bool agents_parse_id(const char *text, int64_t *id)
{
    size_t len = strlen(text);
    if (len == 0 || len > AGENTS_ID_DIGITS)
        return false;
    for (const char *c = text; *c; c++)
        if (!isdigit((unsigned char)*c))
            return false;
    *id = strtoll(text, NULL, 10);
    return true;
}

/* What an acknowledged command tells about the proxy's state. */
static void agents_learn(state_proxy *p, const char *type, json_t *args)
{
    if (strcmp(type, "config_commit") == 0) {
        agents_set_int(p, &p->config_version, json_integer_value(json_object_get(args, "version")));
    } else if (strcmp(type, "maintenance") == 0) {
        bool on = json_is_true(json_object_get(args, "on"));
        if (p->maintenance != on) {
            p->maintenance = on;
            p->dirty = true;
        }
    } else if (strcmp(type, "set_leader") == 0) {
        agents_set_leader(p, json_object_get(args, "leader"));
        agents_set_int(p, &p->epoch, json_integer_value(json_object_get(args, "epoch")));
    }
}

void agents_ack(http_call *call)
{
    const char *node_id, *detail = NULL;
    int64_t id;
    bool ok = false;
    char type[STORE_TYPE_MAX] = "";
    json_t *args = NULL;

    if (!agents_parse_id(call->args[0], &id)) {
        http_reply_error(call->req, 404, "unknown command %s", call->args[0]);
        return;
    }
    if (!(node_id = agents_node_id(call)) ||
        !http_field_bool(call, call->body, NULL, "ok", true, &ok) ||
        !http_field_string(call, call->body, NULL, "detail", false, AGENTS_DETAIL_MAX, &detail))
        return;
    state_proxy *p = agents_proxy(call, node_id);
    if (!p)
        return;
    switch (
        store_command_ack(id, call->dep->name, node_id, ok, detail ? detail : "", type, &args)) {
    case STORE_ACK_ERROR:
        http_reply_error(call->req, 503, "store unreachable: %s", store_error());
        return;
    case STORE_ACK_UNKNOWN:
        http_reply_error(call->req, 404,
                         "unknown command %" PRId64 " for proxy %s (a proxy acknowledges only the "
                         "commands sent to it)",
                         id, node_id);
        return;
    case STORE_ACK_DUPLICATE:
        http_reply_empty(call->req, 204);
        return;
    case STORE_ACK_RECORDED:
        break;
    }
    /* a pause renewal (maintenance.c) comes every third of pause_lease: debug, unless failed */
    log_level level =
        ok && json_is_true(json_object_get(args, "renewal")) ? LOG_LVL_DEBUG : LOG_LVL_INFO;
    if (log_current_level >= level)
        log_msg(level, "deployment %s: proxy %s acknowledged command %" PRId64 " (%s): %s%s%s",
                call->dep->name, node_id, id, type, ok ? "ok" : "FAILED", detail ? ", " : "",
                detail ? detail : "");
    if (ok)
        agents_learn(p, type, args);
    json_decref(args);
    /* answer first: the orchestration may go on to answer other requests */
    http_reply_empty(call->req, 204);
    operator_on_ack(call->dep, id, node_id, ok, detail ? detail : "");
}
