/* agents.c - the agent endpoints: register, telemetry uploads, the command long poll and acks. */
#include "agents.h"
#include "control.h"
#include "leader.h"
#include "log.h"
#include "members.h"
#include "operator.h"
#include "store.h"
#include "store_members.h"
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

static void agents_set_leader_text(state_proxy *p, const char *leader)
{
    if (strcmp(p->leader, leader) != 0) {
        snprintf(p->leader, sizeof(p->leader), "%s", leader);
        p->dirty = true;
        state_decide_again(p->dep);
    }
}

static void agents_set_leader(state_proxy *p, json_t *v)
{
    agents_set_leader_text(p, json_is_string(v) ? json_string_value(v) : "");
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

/* A registration's store work, done by the store worker: the member row first when the proxy is
 * declared now (auto_declare), then its proxies row. */
typedef struct agents_register_job {
    struct agents_register_job *next;
    struct evhttp_request *req; /* answered when the store is done */
    char deployment[CCONFIG_NAME_MAX];
    char node_id[STATE_NODE_ID_MAX];
    bool declare;    /* auto_declare: declared once the member row is written */
    char *row;       /* the proxies row (store_proxies_json) */
    int64_t seen_ms; /* last_seen_ms written in it */
    /* the proxy's claims, applied once it is declared (a pending proxy's feed no decision) */
    int64_t config_version;
    int64_t epoch;
    bool maintenance;
    char leader[STATE_NODE_NAME_MAX];
} agents_register_job;

/* What a register says of a declared proxy's state. */
static void agents_register_claims(state_proxy *p, const agents_register_job *j)
{
    agents_set_int(p, &p->config_version, j->config_version);
    agents_set_int(p, &p->epoch, j->epoch);
    p->maintenance = j->maintenance;
    agents_set_leader_text(p, j->leader);
}

/* The same on a copy of the proxy (its row before it is declared): no decision is told. */
static void agents_register_claims_copy(state_proxy *row, const agents_register_job *j)
{
    if (j->config_version >= 0)
        row->config_version = j->config_version;
    if (j->epoch >= 0)
        row->epoch = j->epoch;
    row->maintenance = j->maintenance;
    snprintf(row->leader, sizeof(row->leader), "%s", j->leader);
}

/* The answer to a register (the proxy is registered). */
static void agents_register_answer(struct evhttp_request *req, const state_proxy *p)
{
    const char *dep = p->dep->name, *node_id = p->node_id;
    log_level level = p->declared ? LOG_LVL_INFO : agents_pending_level();
    if (log_current_level >= level)
        log_msg(level, "deployment %s: proxy %s registered (host %s, version %s)%s", dep, node_id,
                p->hostname[0] ? p->hostname : "?", p->version[0] ? p->version : "?",
                p->declared ? "" : "; not declared: pending until an operator creates it");

    int64_t wait_s = control.cfg->poll_wait_max_ms / MS_PER_S;
    if (wait_s > AGENTS_POLL_WAIT_SUGGESTED_S)
        wait_s = AGENTS_POLL_WAIT_SUGGESTED_S;
    json_t *answer = json_pack("{s:s, s:s, s:I, s:b}", "deployment", dep, "node_id", node_id,
                               "poll_wait_s", (json_int_t)wait_s, "declared", p->declared);
    if (!p->declared)
        json_object_set_new(answer, "warning",
                            json_sprintf("proxy %s is not declared in deployment %s: every other "
                                         "call is refused (403) until an operator runs "
                                         "'pgrelayctl create-proxy %s'",
                                         node_id, dep, node_id));
    http_reply_json(req, 200, answer);
}

/* Registrations go to the store worker in batches: what arrives while a batch is with the
 * worker goes in the next one, as one statement for every proxy's row (a fleet that restarts
 * at once is a few statements, not one per proxy ahead of the long polls). */
typedef struct agents_register_batch {
    store_job job;
    agents_register_job *items; /* in arrival order */
    char *rows;                 /* every proxy's row, one array (a proxy's last one only) */
} agents_register_batch;

static struct {
    agents_register_job *head, *tail; /* waiting for the next batch */
    bool busy;                        /* a batch is with the store worker */
} registering;

static int agents_register_run(store_job *job)
{
    agents_register_batch *b = (agents_register_batch *)job;
    for (agents_register_job *j = b->items; j; j = j->next)
        if (j->declare && store_member_save(j->deployment, j->node_id, NULL) != 0)
            return -1;
    return store_proxies_save_text(b->rows);
}

/* One registration of a batch is done (rc, error: the batch's). */
static void agents_register_one_done(agents_register_job *j, int rc, const char *error)
{
    state_deployment *dep = control.active ? state_find_deployment(j->deployment) : NULL;
    state_proxy *p = dep ? state_find_proxy(dep, j->node_id) : NULL;
    if (rc != 0)
        http_reply_error(j->req, 503, "store unreachable: %s", error);
    else if (!p) /* the state went away meanwhile (lease lost, proxy deleted) */
        http_reply_error(j->req, 503, "not serving: %s",
                         control.active ? "the proxy is no longer known" : "state dropped");
    else {
        if (j->declare && !p->declared) {
            state_set_declared(p, true);
            log_info("deployment %s: proxy %s declared (auto_declare)", dep->name, p->node_id);
            agents_register_claims(p, j);
        }
        /* p->dirty stays: what changed while the row was on its way is written by the next
         * flush (at worst the same row once more) */
        if (p->declared && p->saved_seen_ms <= j->seen_ms)
            p->saved_seen_ms = j->seen_ms;
        agents_register_answer(j->req, p);
    }
    free(j->row);
    free(j);
}

static void agents_register_flush(void);

static void agents_register_done(store_job *job)
{
    agents_register_batch *b = (agents_register_batch *)job;
    agents_register_job *j = b->items;
    while (j) {
        agents_register_job *next = j->next;
        agents_register_one_done(j, job->rc, job->error);
        j = next;
    }
    free(b->rows);
    free(b);
    registering.busy = false;
    agents_register_flush();
}

/* Hand the waiting registrations to the store worker, unless a batch is with it already. */
static void agents_register_flush(void)
{
    if (registering.busy || !registering.head)
        return;
    agents_register_batch *b = calloc(1, sizeof(*b));
    size_t len = 2;
    for (agents_register_job *j = registering.head; j; j = j->next)
        len += strlen(j->row) + 1;
    char *rows = b ? malloc(len) : NULL;
    if (!rows) { /* answered now; the proxies register again */
        agents_register_job *j = registering.head;
        free(b);
        registering.head = registering.tail = NULL;
        while (j) {
            agents_register_job *next = j->next;
            agents_register_one_done(j, -1, "out of memory");
            j = next;
        }
        return;
    }
    /* a proxy's last registration of the batch stands for its others (one statement may not
     * write a row twice): {"deployment/node_id": that job} */
    json_t *last = json_object();
    char key[CCONFIG_NAME_MAX + STATE_NODE_ID_MAX + 1];
    for (agents_register_job *j = registering.head; last && j; j = j->next) {
        snprintf(key, sizeof(key), "%s/%s", j->deployment, j->node_id);
        json_object_set_new(last, key, json_integer((json_int_t)(intptr_t)j));
    }
    size_t off = 0;
    rows[off++] = '[';
    for (agents_register_job *j = registering.head; j; j = j->next) {
        size_t n = strlen(j->row); /* "[{...}]": the object inside */
        snprintf(key, sizeof(key), "%s/%s", j->deployment, j->node_id);
        if (n < 2 || (last && json_integer_value(json_object_get(last, key)) != (intptr_t)j))
            continue;
        if (off > 1)
            rows[off++] = ',';
        memcpy(rows + off, j->row + 1, n - 2);
        off += n - 2;
    }
    rows[off++] = ']';
    rows[off] = '\0';
    json_decref(last);
    b->rows = rows;
    b->items = registering.head;
    registering.head = registering.tail = NULL;
    registering.busy = true;
    b->job.run = agents_register_run;
    b->job.done = agents_register_done;
    store_worker_submit(&b->job);
}

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
    snprintf(p->hostname, sizeof(p->hostname), "%s", hostname ? hostname : "");
    snprintf(p->version, sizeof(p->version), "%s", version ? version : "");
    json_decref(p->listen);
    p->listen = listen ? json_deep_copy(listen) : json_array();
    p->registered_ms = p->last_seen_ms;
    bool declare = !p->declared && control.cfg->auto_declare;
    if (!p->declared && !declare) { /* pending: nothing to write */
        agents_register_answer(call->req, p);
        return;
    }
    agents_register_job *j = calloc(1, sizeof(*j));
    if (!j) {
        http_reply_error(call->req, 500, "out of memory");
        return;
    }
    j->req = call->req;
    snprintf(j->deployment, sizeof(j->deployment), "%s", call->dep->name);
    snprintf(j->node_id, sizeof(j->node_id), "%s", node_id);
    j->declare = declare;
    j->seen_ms = p->last_seen_ms;
    j->config_version = config_version;
    j->epoch = epoch;
    j->maintenance = maintenance;
    snprintf(j->leader, sizeof(j->leader), "%s", leader ? leader : "");
    if (p->declared) { /* a pending proxy's claims feed no decision: epochs, config versions */
        agents_register_claims(p, j);
        j->row = store_proxies_json(&p, 1);
    } else { /* its row as it will be once declared */
        state_proxy row = *p;
        row.declared = true;
        agents_register_claims_copy(&row, j);
        state_proxy *list = &row;
        j->row = store_proxies_json(&list, 1);
    }
    if (!j->row) {
        free(j);
        http_reply_error(call->req, 500, "out of memory");
        return;
    }
    /* written by the store worker: a slow store holds this registration, not the event loop */
    if (registering.tail)
        registering.tail->next = j;
    else
        registering.head = j;
    registering.tail = j;
    agents_register_flush();
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
        http_reply_error(call->req, 400,
                         "%s.latency_buckets must be an array of %d whole numbers >= 0", where,
                         STATE_LATENCY_BUCKETS);
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
        p->nodes_observation++;
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
    if (!leader_wait(call->dep, call->req, p->node_id))
        agents_metrics_reply(call->req, call->dep, p);
}

void agents_metrics_reply(struct evhttp_request *req, state_deployment *d, state_proxy *p)
{
    json_t *answer =
        json_pack("{s:o, s:I}", "leader", d->leader[0] ? json_string(d->leader) : json_null(),
                  "epoch", (json_int_t)d->epoch);
    if (d->config_version > 0) /* the desired configuration version (config_apply.c) */
        json_object_set_new(answer, "config_version", json_integer(d->config_version));
    /* the per-proxy options the agent applies itself (members.c), in every answer while set
     * (absent: the defaults), so that a proxy that restarted converges at its first call */
    if (answer && p && json_is_true(json_object_get(p->options, "read_only")))
        json_object_set_new(answer, "options", json_pack("{s:b}", "read_only", 1));
    http_reply_json(req, 200, answer);
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

static void agents_batch_release(const char *reason);

void agents_release_all(const char *reason)
{
    agents_batch_release(reason);
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

/* ---- the store work of polls and acks, in batches ----
 *
 * Reading a proxy's pending commands (its long poll arrives, or a command was queued for its
 * parked poll) and recording an acknowledgement are a store statement each: at 2,000 proxies
 * one maintenance step makes 2,000 of each within a second. They are queued here and run by the
 * store worker in batches, one statement per batch (per deployment, for reads), with at most
 * one batch of each kind on its way: whatever comes meanwhile goes in the next one. The loop
 * never waits for them; a slow store holds the polls and acks, nothing else. */

#define AGENTS_BATCH_MAX 2000 /* reads or acks in one statement */

/* One read of a proxy's pending commands. */
typedef struct agents_read {
    struct agents_read *next;
    struct evhttp_request *req; /* a poll that just came (answered or parked once read), or
                                   NULL: a wake of the proxy's parked poll */
    char deployment[CCONFIG_NAME_MAX];
    char node_id[STATE_NODE_ID_MAX];
    int64_t wait_s;    /* the new poll's wait */
    uint64_t wakes;    /* the proxy's wakes when it was queued: a later one reads again */
    store_pending got; /* the worker's answer (commands NULL: the store failed) */
} agents_read;

/* One acknowledgement on its way to the store. */
typedef struct agents_acking {
    struct agents_acking *next;
    struct evhttp_request *req; /* answered once it is recorded */
    char deployment[CCONFIG_NAME_MAX];
    char node_id[STATE_NODE_ID_MAX];
    char *detail;        /* what the proxy said, or NULL */
    store_ack_item item; /* the store's part (points into the fields above) */
} agents_acking;

/* A batch for the store worker: reads or acks, in the order they came. */
typedef struct agents_batch {
    store_job job;
    agents_read **reads; /* n of them, or NULL */
    agents_acking **acks;
    int n;
    /* the worker's room, allocated on the loop: for acks, the store's items; for reads, the
     * node ids of one deployment, their answers, their places in reads, and which are read */
    store_ack_item *items;
    const char **ids;
    store_pending *got;
    int *which;
    bool *taken;
} agents_batch;

static struct {
    agents_read *reads; /* queued, oldest first */
    agents_read **reads_tail;
    int n_reads;
    bool reading; /* a batch of reads is with the worker */
    agents_acking *acks;
    agents_acking **acks_tail;
    int n_acks;
    bool acking;
    struct event *kick; /* sends what is queued, at the end of this loop iteration */
} agents_q;

static void agents_batch_kick(void);

static int agents_reads_run(store_job *job)
{
    agents_batch *b = (agents_batch *)job;
    int rc = 0;
    for (int i = 0; i < b->n; i++) { /* one statement per deployment */
        if (b->taken[i])
            continue;
        int k = 0;
        for (int j = i; j < b->n; j++) {
            if (!b->taken[j] && strcmp(b->reads[j]->deployment, b->reads[i]->deployment) == 0) {
                b->taken[j] = true;
                b->which[k] = j;
                b->ids[k++] = b->reads[j]->node_id;
            }
        }
        if (store_commands_pending_many(b->reads[i]->deployment, b->ids, k, b->got) != 0)
            rc = -1;
        for (int m = 0; m < k; m++)
            b->reads[b->which[m]]->got = b->got[m];
    }
    return rc;
}

static void agents_batch_free(agents_batch *b)
{
    free(b->reads);
    free(b->acks);
    free(b->items);
    free(b->ids);
    free(b->got);
    free(b->which);
    free(b->taken);
    free(b);
}

/* A read is back for a poll that just came: answer it at once, or park it until a command
 * comes or its wait ends. */
static void agents_read_new_poll(agents_read *r, state_deployment *dep, state_proxy *p,
                                 const char *error)
{
    struct evhttp_request *req = r->req;
    json_t *pending = r->got.commands;
    int64_t wait_s = r->wait_s, since_ms = r->got.since_ms;
    if (!p) { /* the state went away meanwhile (lease lost, proxy deleted) */
        json_decref(pending);
        http_reply_error(req, 503, "not serving: %s",
                         control.active ? "the proxy is no longer known" : "state dropped");
        free(r);
        return;
    }
    if (!pending) {
        http_reply_error(req, 503, "store unreachable: %s", error);
        free(r);
        return;
    }
    if (json_array_size(pending) == 0 && wait_s > 0 && r->wakes != p->wakes) {
        json_decref(pending); /* a command may have come meanwhile: read again */
        r->got = (store_pending){.commands = NULL, .since_ms = -1};
        r->wakes = p->wakes;
        r->next = NULL;
        *agents_q.reads_tail = r;
        agents_q.reads_tail = &r->next;
        agents_q.n_reads++;
        agents_batch_kick();
        return;
    }
    free(r);
    int64_t wait_ms = wait_s * MS_PER_S;
    if (json_array_size(pending) > 0) {
        /* only what it had within the hold, unless that delivery never reached it */
        bool repeat_only = since_ms >= 0 && since_ms < AGENTS_REDELIVER_HOLD_MS && !p->poll_marked;
        if (!repeat_only || wait_s == 0) {
            p->poll_marked = false;
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

/* A read is back for a parked poll (a wake): answer it, if it is still there. */
static void agents_read_wake(agents_read *r, state_proxy *p, const char *error)
{
    json_t *pending = r->got.commands;
    free(r);
    if (p && p->poll_req) {
        if (!pending) {
            struct evhttp_request *req = p->poll_req;
            agents_unpark(p);
            http_reply_error(req, 503, "store unreachable: %s", error);
            return;
        }
        p->poll_marked = false;
        agents_answer(p, pending);
        return;
    }
    /* the poll went meanwhile (answered, hung up): the commands were marked delivered but
     * reach the proxy with its next poll, which must not hold them back as repeats */
    if (p && pending && json_array_size(pending) > 0)
        p->poll_marked = true;
    json_decref(pending);
}

static void agents_reads_done(store_job *job)
{
    agents_batch *b = (agents_batch *)job;
    agents_q.reading = false;
    for (int i = 0; i < b->n; i++) {
        agents_read *r = b->reads[i];
        state_deployment *dep = control.active ? state_find_deployment(r->deployment) : NULL;
        state_proxy *p = dep ? state_find_proxy(dep, r->node_id) : NULL;
        if (r->req)
            agents_read_new_poll(r, dep, p, job->error);
        else
            agents_read_wake(r, p, job->error);
    }
    agents_batch_free(b);
    agents_batch_kick();
}

static int agents_acks_run(store_job *job)
{
    agents_batch *b = (agents_batch *)job;
    return store_command_ack_many(b->items, b->n);
}

static void agents_learn(state_proxy *p, const char *type, json_t *args);

/* An acknowledgement is back from the store: answer the proxy, then tell the orchestration. */
static void agents_ack_done(agents_acking *a, const char *error)
{
    store_ack_item *it = &a->item;
    int64_t id = it->id;
    switch (it->result) {
    case STORE_ACK_ERROR:
        if (error[0])
            http_reply_error(a->req, 503, "store unreachable: %s", error);
        else
            http_reply_error(a->req, 503,
                             "store unreachable: acknowledgement of command %" PRId64
                             ": not written (this replica no longer holds the lease)",
                             id);
        goto out;
    case STORE_ACK_UNKNOWN:
        http_reply_error(a->req, 404,
                         "unknown command %" PRId64 " for proxy %s (a proxy acknowledges only the "
                         "commands sent to it)",
                         id, a->node_id);
        goto out;
    case STORE_ACK_DUPLICATE:
        http_reply_empty(a->req, 204);
        goto out;
    case STORE_ACK_RECORDED:
        break;
    }
    /* a pause renewal (maintenance.c) comes every third of pause_lease: debug, unless failed */
    log_level level =
        it->ok && json_is_true(json_object_get(it->args, "renewal")) ? LOG_LVL_DEBUG : LOG_LVL_INFO;
    if (log_current_level >= level)
        log_msg(level, "deployment %s: proxy %s acknowledged command %" PRId64 " (%s): %s%s%s",
                a->deployment, a->node_id, id, it->type, it->ok ? "ok" : "FAILED",
                a->detail ? ", " : "", a->detail ? a->detail : "");
    state_deployment *dep = control.active ? state_find_deployment(a->deployment) : NULL;
    state_proxy *p = dep ? state_find_proxy(dep, a->node_id) : NULL;
    if (it->ok && p)
        agents_learn(p, it->type, it->args);
    /* answer first: the orchestration may go on to answer other requests */
    http_reply_empty(a->req, 204);
    if (dep)
        operator_on_ack(dep, id, a->node_id, it->ok, a->detail ? a->detail : "");
out:
    json_decref(it->args);
    free(a->detail);
    free(a);
}

static void agents_acks_done(store_job *job)
{
    agents_batch *b = (agents_batch *)job;
    agents_q.acking = false;
    for (int i = 0; i < b->n; i++) {
        b->acks[i]->item = b->items[i];
        if (job->rc != 0)
            b->acks[i]->item.result = STORE_ACK_ERROR;
        agents_ack_done(b->acks[i], job->rc != 0 ? job->error : "");
    }
    agents_batch_free(b);
    agents_batch_kick();
}

/* Hand what is queued to the worker: a batch of reads and one of acks, each unless one of its
 * kind is already there. */
static void agents_batch_send(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (!agents_q.reading && agents_q.reads) {
        agents_batch *b = calloc(1, sizeof(*b));
        int n = agents_q.n_reads < AGENTS_BATCH_MAX ? agents_q.n_reads : AGENTS_BATCH_MAX;
        if (!b || !(b->reads = malloc((size_t)n * sizeof(*b->reads))) ||
            !(b->ids = malloc((size_t)n * sizeof(*b->ids))) ||
            !(b->got = malloc((size_t)n * sizeof(*b->got))) ||
            !(b->which = malloc((size_t)n * sizeof(*b->which))) ||
            !(b->taken = calloc((size_t)n, sizeof(*b->taken)))) {
            if (b)
                agents_batch_free(b);
            log_error("cannot read %d proxies' commands: out of memory (retrying)", n);
            return; /* the next kick tries again */
        }
        for (b->n = 0; b->n < n; b->n++) {
            agents_read *r = agents_q.reads;
            agents_q.reads = r->next;
            b->reads[b->n] = r;
            if (!r->req) { /* from now on a wake needs a read of its own */
                state_deployment *d = state_find_deployment(r->deployment);
                state_proxy *p = d ? state_find_proxy(d, r->node_id) : NULL;
                if (p)
                    p->wake_queued = false;
            }
        }
        agents_q.n_reads -= n;
        if (!agents_q.reads)
            agents_q.reads_tail = &agents_q.reads;
        b->job.run = agents_reads_run;
        b->job.done = agents_reads_done;
        agents_q.reading = true;
        store_worker_submit(&b->job);
    }
    if (!agents_q.acking && agents_q.acks) {
        agents_batch *b = calloc(1, sizeof(*b));
        int n = agents_q.n_acks < AGENTS_BATCH_MAX ? agents_q.n_acks : AGENTS_BATCH_MAX;
        if (!b || !(b->acks = malloc((size_t)n * sizeof(*b->acks))) ||
            !(b->items = malloc((size_t)n * sizeof(*b->items)))) {
            if (b)
                agents_batch_free(b);
            log_error("cannot record %d acknowledgements: out of memory (retrying)", n);
            return;
        }
        for (b->n = 0; b->n < n; b->n++) {
            b->acks[b->n] = agents_q.acks;
            b->items[b->n] = agents_q.acks->item;
            agents_q.acks = agents_q.acks->next;
        }
        agents_q.n_acks -= n;
        if (!agents_q.acks)
            agents_q.acks_tail = &agents_q.acks;
        b->job.run = agents_acks_run;
        b->job.done = agents_acks_done;
        agents_q.acking = true;
        store_worker_submit(&b->job);
    }
}

static void agents_batch_kick(void)
{
    if (!agents_q.reads_tail)
        agents_q.reads_tail = &agents_q.reads;
    if (!agents_q.acks_tail)
        agents_q.acks_tail = &agents_q.acks;
    if (!agents_q.kick)
        agents_q.kick = event_new(control.base, -1, 0, agents_batch_send, NULL);
    if (agents_q.kick)
        event_active(agents_q.kick, EV_TIMEOUT, 0);
    else
        agents_batch_send(-1, 0, NULL);
}

/* Answer what waits for the next batch with 503 and reason (the state goes: lease lost,
 * shutdown); the batches with the worker are answered when they come back. */
static void agents_batch_release(const char *reason)
{
    while (agents_q.reads) {
        agents_read *r = agents_q.reads;
        agents_q.reads = r->next;
        if (r->req)
            http_reply_error(r->req, 503, "%s", reason);
        free(r);
    }
    agents_q.reads_tail = &agents_q.reads;
    agents_q.n_reads = 0;
    while (agents_q.acks) {
        agents_acking *a = agents_q.acks;
        agents_q.acks = a->next;
        http_reply_error(a->req, 503, "%s", reason);
        free(a->detail);
        free(a);
    }
    agents_q.acks_tail = &agents_q.acks;
    agents_q.n_acks = 0;
}

/* Queue a read of p's pending commands: for a poll that just came (req), or for its parked
 * poll (req NULL). false when out of memory. */
static bool agents_queue_read(state_proxy *p, struct evhttp_request *req, int64_t wait_s)
{
    agents_read *r = calloc(1, sizeof(*r));
    if (!r)
        return false;
    r->req = req;
    snprintf(r->deployment, sizeof(r->deployment), "%s", p->dep->name);
    snprintf(r->node_id, sizeof(r->node_id), "%s", p->node_id);
    r->wait_s = wait_s;
    r->wakes = p->wakes;
    r->got.since_ms = -1;
    agents_batch_kick(); /* sets the tails up the first time */
    *agents_q.reads_tail = r;
    agents_q.reads_tail = &r->next;
    agents_q.n_reads++;
    return true;
}

void agents_wake(state_proxy *p)
{
    p->wakes++;
    if (!p->poll_req || p->wake_queued)
        return;
    if (!agents_queue_read(p, NULL, 0)) {
        struct evhttp_request *req = p->poll_req;
        agents_unpark(p);
        http_reply_error(req, 500, "out of memory");
        return;
    }
    p->wake_queued = true;
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
    /* the pending commands are read (and marked delivered) by the store worker, with other
     * polls' in one statement: a slow store holds this poll, not the event loop */
    if (!agents_queue_read(p, call->req, wait_s))
        http_reply_error(call->req, 500, "out of memory");
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
    /* recorded by the store worker with the other acks queued meanwhile, in one statement;
     * answered (and the orchestration told) once it is written */
    agents_acking *a = calloc(1, sizeof(*a));
    if (!a || (detail && !(a->detail = strdup(detail)))) {
        free(a);
        http_reply_error(call->req, 500, "out of memory");
        return;
    }
    a->req = call->req;
    snprintf(a->deployment, sizeof(a->deployment), "%s", call->dep->name);
    snprintf(a->node_id, sizeof(a->node_id), "%s", node_id);
    a->item = (store_ack_item){.id = id,
                               .deployment = a->deployment,
                               .node_id = a->node_id,
                               .ok = ok,
                               .detail = a->detail ? a->detail : ""};
    agents_batch_kick(); /* sets the tails up the first time */
    *agents_q.acks_tail = a;
    agents_q.acks_tail = &a->next;
    agents_q.n_acks++;
}
