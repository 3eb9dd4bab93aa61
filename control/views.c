/* views.c - the operator's read-only endpoints: deployments, proxies, nodes, running queries,
 * metrics, schema and the current configuration, answered from memory (and the store for the
 * configuration text, read by the store worker: a slow store holds that view, not the loop). */
#include "views.h"
#include "control.h"
#include "leader.h"
#include "log.h"
#include "shm.h"
#include "store.h"
#include "store_worker.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VIEWS_RATE_WINDOW_MS 10000 /* rates are computed over the samples of this window */
#define MS_PER_S             1000
#define US_PER_MS            1000.0
#define VIEWS_LEADERS_MAX    512 /* leader changes kept in memory, all deployments together */
#define VIEWS_WHY_MAX        96  /* longest reason kept with a leader change */

/* One leader change as this control plane took or followed it. */
typedef struct views_leader_change {
    char deployment[CCONFIG_NAME_MAX];
    char leader[STATE_NODE_NAME_MAX];
    int64_t epoch;
    int64_t at_ms; /* milliseconds since the Unix epoch */
    char why[VIEWS_WHY_MAX];
} views_leader_change;

/* The ring of leader changes: the oldest is overwritten first. */
static struct {
    views_leader_change ring[VIEWS_LEADERS_MAX];
    int next; /* where the next change goes */
    int n;    /* how many are kept */
} views_leaders;

void views_deployments(http_call *call)
{
    json_t *list = json_array();
    for (state_deployment *d = state_deployments(); d; d = d->next) {
        int total, live;
        if (!d->configured && !d->is_auto)
            continue;
        state_count(d, &total, &live);
        json_array_append_new(list, json_pack("{s:s, s:i, s:i, s:o, s:I, s:b}", "name", d->name,
                                              "proxies", total, "live", live, "leader",
                                              d->leader[0] ? json_string(d->leader) : json_null(),
                                              "epoch", (json_int_t)d->epoch, "auto", d->is_auto));
    }
    http_reply_json(call->req, 200, list);
}

void views_proxies(http_call *call)
{
    json_t *list = json_array();
    int64_t now = control_now_ms();
    for (state_proxy *p = call->dep->proxies; p; p = p->next) {
        json_array_append_new(
            list, json_pack("{s:s, s:s, s:o, s:s, s:s, s:I, s:I, s:b, s:I, s:o, s:b, s:I, s:O}",
                            "node_id", p->node_id, "status", p->declared ? "declared" : "pending",
                            "options", p->options ? json_incref(p->options) : json_object(),
                            "hostname", p->hostname, "version", p->version, "last_seen",
                            (json_int_t)p->last_seen_ms, "last_seen_age_ms",
                            (json_int_t)(p->last_seen_ms ? now - p->last_seen_ms : -1), "live",
                            state_proxy_live(p, now), "epoch", (json_int_t)p->epoch, "leader",
                            p->leader[0] ? json_string(p->leader) : json_null(), "maintenance",
                            p->maintenance, "config_version", (json_int_t)p->config_version,
                            "listen", p->listen ? p->listen : json_array()));
        json_t *until = json_object_get(p->last_metrics, "maintenance_until_ms");
        json_object_set_new(json_array_get(list, json_array_size(list) - 1), "maintenance_until_ms",
                            json_integer(json_is_integer(until) ? json_integer_value(until) : 0));
    }
    http_reply_json(call->req, 200, list);
}

/* Copy a field of src into dst when src has it. */
static void copy_field(json_t *dst, json_t *src, const char *key)
{
    json_t *v = json_object_get(src, key);
    if (v)
        json_object_set(dst, key, v);
}

/* dst[key] += src[key] (whole numbers; a missing or mistyped one counts 0). */
static void views_add_int(json_t *dst, json_t *src, const char *key)
{
    json_int_t add = json_integer_value(json_object_get(src, key));
    json_object_set_new(dst, key,
                        json_integer(json_integer_value(json_object_get(dst, key)) + add));
}

void views_nodes(http_call *call)
{
    int64_t now = control_now_ms();
    json_t *by_name = json_object(); /* name -> row; rows keep the first-seen order below */
    json_t *list = json_array();
    for (state_proxy *p = call->dep->proxies; p; p = p->next) {
        size_t i;
        json_t *obs;
        json_array_foreach(p->nodes, i, obs)
        {
            const char *name = json_string_value(json_object_get(obs, "name"));
            if (!name)
                continue;
            json_t *row = json_object_get(by_name, name);
            if (!row) {
                row = json_pack("{s:s, s:b, s:{}, s:i, s:i}", "name", name, "leader",
                                strcmp(name, call->dep->leader) == 0, "health", "write_sessions", 0,
                                "read_sessions", 0);
                json_object_set_new(by_name, name, row);
                json_array_append(list, row);
            }
            copy_field(row, obs, "host");
            copy_field(row, obs, "port");
            copy_field(row, obs, "role");
            copy_field(row, obs, "in_recovery");
            copy_field(row, obs, "lag_bytes");
            copy_field(row, obs, "lag_ms");
            if (state_proxy_live(p, now)) { /* the sessions there now, over the live proxies */
                views_add_int(row, obs, "write_sessions");
                views_add_int(row, obs, "read_sessions");
            }
            copy_field(row, obs, "lsn");
            json_t *health = json_object_get(obs, "health");
            json_object_set_new(json_object_get(row, "health"), p->node_id,
                                json_is_string(health) ? json_copy(health)
                                                       : json_string("unknown"));
        }
    }
    json_decref(by_name);
    http_reply_json(call->req, 200, list);
}

void views_queries(http_call *call)
{
    json_t *list = json_array();
    for (state_proxy *p = call->dep->proxies; p; p = p->next) {
        size_t i;
        json_t *q;
        json_array_foreach(p->queries, i, q)
        {
            json_t *row = json_deep_copy(q);
            json_object_set_new(row, "node_id", json_string(p->node_id));
            /* when the proxy reported it: duration_ms was true then, not now */
            json_object_set_new(row, "as_of", json_integer(p->queries_ms));
            json_array_append_new(list, row);
        }
    }
    http_reply_json(call->req, 200, list);
}

/* Per-second rate of one counter between two samples (null after a counter reset). */
static json_t *views_rate(int64_t first, int64_t last, int64_t ms)
{
    if (ms <= 0 || last < first)
        return json_null();
    return json_real((double)(last - first) * MS_PER_S / (double)ms);
}

/* The per-second rates between two samples (a and b NULL: fewer than two samples). */
static json_t *views_rates(const state_sample *a, const state_sample *b)
{
    if (!a)
        return json_pack("{s:n, s:n, s:n, s:n}", "statements", "bytes_in", "bytes_out", "errors");
    int64_t ms = a->ts_ms && b->ts_ms ? b->ts_ms - a->ts_ms : b->received_ms - a->received_ms;
    return json_pack(
        "{s:o, s:o, s:o, s:o}", "statements", views_rate(a->statements, b->statements, ms),
        "bytes_in", views_rate(a->bytes_in, b->bytes_in, ms), "bytes_out",
        views_rate(a->bytes_out, b->bytes_out, ms), "errors", views_rate(a->errors, b->errors, ms));
}

/* Average latency in milliseconds of the statements that ended between two samples: null when
 * none did, with fewer than two samples, or after a counter reset. */
static json_t *views_latency_ms(const state_sample *a, const state_sample *b)
{
    if (!a)
        return json_null();
    int64_t n = b->statements_completed - a->statements_completed;
    int64_t us = b->latency_us - a->latency_us;
    if (n <= 0 || us < 0)
        return json_null();
    return json_real((double)us / (double)n / US_PER_MS);
}

_Static_assert(STATE_LATENCY_BUCKETS == SHM_LATENCY_BOUNDS + 1,
               "latency_buckets in a metrics body are the buckets of pgrelay's shared memory");

/* Add to h the statements of a node's histogram that ended between its samples a and b (both
 * in ns); false after a counter reset (a proxy restart) or with no histogram reported. */
static bool views_latency_add(const state_node_series *ns, const state_sample *a,
                              const state_sample *b, shm_node_totals *h)
{
    const int64_t *ha = ns->latency_buckets[a - ns->samples];
    const int64_t *hb = ns->latency_buckets[b - ns->samples];
    for (int k = 0; k < STATE_LATENCY_BUCKETS; k++)
        if (hb[k] < ha[k])
            return false;
    for (int k = 0; k < STATE_LATENCY_BUCKETS; k++) {
        h->buckets[k] += (uint64_t)(hb[k] - ha[k]);
        h->count += (uint64_t)(hb[k] - ha[k]);
    }
    return true;
}

/* The 99th percentile in milliseconds of a window's histogram; null when it holds nothing. */
static json_t *views_p99_ms(const shm_node_totals *h)
{
    double us = shm_latency_quantile_us(h, 0.99);
    return us < 0 ? json_null() : json_real(us / US_PER_MS);
}

/* Each node of the proxy's last observation: rates, latency and its p99 over the window; the
 * nodes' histograms of the window are added into all (for the proxy's own p99). */
static json_t *views_node_metrics(const state_proxy *p, shm_node_totals *all)
{
    json_t *list = json_array();
    for (int i = 0; i < p->node_series_n; i++) {
        const state_node_series *ns = &p->node_series[i];
        const state_sample *cur = state_node_current(p, ns), *a = NULL, *b = NULL;
        if (!cur)
            continue;
        if (!state_node_rate_window(ns, VIEWS_RATE_WINDOW_MS, &a, &b))
            a = b = NULL;
        shm_node_totals h;
        memset(&h, 0, sizeof(h));
        if (a && views_latency_add(ns, a, b, &h)) {
            for (int k = 0; k < STATE_LATENCY_BUCKETS; k++)
                all->buckets[k] += h.buckets[k];
            all->count += h.count;
        }
        json_array_append_new(list, json_pack("{s:s, s:I, s:o, s:o, s:o}", "name", ns->name,
                                              "sessions", (json_int_t)cur->clients, "rates",
                                              views_rates(a, b), "latency_ms",
                                              views_latency_ms(a, b), "p99_ms", views_p99_ms(&h)));
    }
    return list;
}

void views_metrics(http_call *call)
{
    json_t *list = json_array();
    int64_t now = control_now_ms();
    for (state_proxy *p = call->dep->proxies; p; p = p->next) {
        const state_sample *a = NULL, *b = NULL;
        if (!state_rate_window(p, VIEWS_RATE_WINDOW_MS, &a, &b))
            a = b = NULL;
        shm_node_totals all;
        memset(&all, 0, sizeof(all));
        json_t *nodes = views_node_metrics(p, &all);
        json_array_append_new(
            list, json_pack("{s:s, s:b, s:o, s:I, s:o, s:o, s:o, s:o, s:i}", "node_id",
                            p->node_id, "live", state_proxy_live(p, now), "sample",
                            p->last_metrics ? json_incref(p->last_metrics) : json_null(),
                            "received_ms", (json_int_t)p->last_metrics_ms, "rates",
                            views_rates(a, b), "latency_ms", views_latency_ms(a, b), "p99_ms",
                            views_p99_ms(&all), "nodes", nodes, "samples", p->samples_n));
    }
    http_reply_json(call->req, 200, list);
}

void views_schema(http_call *call)
{
    json_t *list = json_array();
    for (state_proxy *p = call->dep->proxies; p; p = p->next) {
        const char *db;
        json_t *entry;
        json_object_foreach(p->schema, db, entry)
        {
            json_array_append_new(list, json_pack("{s:s, s:s, s:O, s:O}", "node_id", p->node_id,
                                                  "database", db, "tables",
                                                  json_object_get(entry, "tables"), "received_ms",
                                                  json_object_get(entry, "received_ms")));
        }
    }
    http_reply_json(call->req, 200, list);
}

/* The configuration view's store read. */
typedef struct views_config_job {
    store_job job;
    struct evhttp_request *req;
    char deployment[CCONFIG_NAME_MAX];
    int64_t version; /* the newest committed version */
    char *text;      /* its text (malloc'd), or NULL */
} views_config_job;

static int views_config_run(store_job *job)
{
    views_config_job *j = (views_config_job *)job;
    return store_config_current(j->deployment, &j->version, &j->text);
}

static void views_config_done(store_job *job)
{
    views_config_job *j = (views_config_job *)job;
    state_deployment *dep = control.active ? state_find_deployment(j->deployment) : NULL;
    if (job->rc != 0) {
        http_reply_error(j->req, 503, "store unreachable: %s", job->error);
    } else if (!dep) {
        http_reply_error(j->req, 503, "not serving: %s",
                         control.active ? "the deployment is no longer known" : "state dropped");
    } else {
        json_t *proxies = json_array();
        int64_t now = control_now_ms();
        for (state_proxy *p = dep->proxies; p; p = p->next)
            json_array_append_new(
                proxies, json_pack("{s:s, s:I, s:b, s:O?}", "node_id", p->node_id,
                                   "config_version", (json_int_t)p->config_version, "live",
                                   state_proxy_live(p, now), "effective", p->config));
        http_reply_json(j->req, 200,
                        json_pack("{s:I, s:o, s:o}", "version", (json_int_t)j->version, "text",
                                  j->text ? json_string(j->text) : json_null(), "proxies",
                                  proxies));
    }
    free(j->text);
    free(j);
}

void views_config_get(http_call *call)
{
    views_config_job *j = calloc(1, sizeof(*j));
    if (!j) {
        http_reply_error(call->req, 500, "out of memory");
        return;
    }
    j->req = call->req;
    snprintf(j->deployment, sizeof(j->deployment), "%s", call->dep->name);
    j->job.run = views_config_run;
    j->job.done = views_config_done;
    store_worker_submit(&j->job);
}

void views_leader_changed(const state_deployment *dep, const char *why)
{
    views_leader_change *c = &views_leaders.ring[views_leaders.next];
    snprintf(c->deployment, sizeof(c->deployment), "%s", dep->name);
    snprintf(c->leader, sizeof(c->leader), "%s", dep->leader);
    c->epoch = dep->epoch;
    c->at_ms = control_now_ms();
    snprintf(c->why, sizeof(c->why), "%s", why ? why : "");
    views_leaders.next = (views_leaders.next + 1) % VIEWS_LEADERS_MAX;
    if (views_leaders.n < VIEWS_LEADERS_MAX)
        views_leaders.n++;
}

void views_leaders_get(http_call *call)
{
    json_t *list = json_array();
    for (int k = 1; k <= views_leaders.n; k++) { /* newest first */
        const views_leader_change *c =
            &views_leaders.ring[(views_leaders.next - k + VIEWS_LEADERS_MAX) % VIEWS_LEADERS_MAX];
        if (strcmp(c->deployment, call->dep->name) != 0)
            continue;
        json_array_append_new(list, json_pack("{s:o, s:I, s:I, s:s}", "leader",
                                              c->leader[0] ? json_string(c->leader) : json_null(),
                                              "epoch", (json_int_t)c->epoch, "at",
                                              (json_int_t)c->at_ms, "why", c->why));
    }
    http_reply_json(call->req, 200, list);
}

/* The per-second series of one ring of samples, since since_ms: one point per interval of at
 * least a second (samples closer together are folded into the next point), rates null across
 * a counter reset; a point is timed by its later sample's arrival. Each point: [t, statements/s,
 * bytes_in/s, bytes_out/s, errors/s, latency ms or null, sessions]. */
static json_t *views_series(const state_sample *ring, int cap, int head, int n, int64_t since_ms)
{
    json_t *points = json_array();
    const state_sample *a = NULL;
    for (int k = 0; k < n; k++) {
        const state_sample *b = &ring[(head + k) % cap];
        if (!a) {
            a = b;
            continue;
        }
        /* the agents' own timestamps when both have one, as views_rates: arrival jitter does
         * not bend the rates */
        int64_t ms = a->ts_ms && b->ts_ms ? b->ts_ms - a->ts_ms : b->received_ms - a->received_ms;
        if (ms < MS_PER_S)
            continue;
        if (b->received_ms > since_ms)
            json_array_append_new(points,
                                  json_pack("[I, o, o, o, o, o, I]", (json_int_t)b->received_ms,
                                            views_rate(a->statements, b->statements, ms),
                                            views_rate(a->bytes_in, b->bytes_in, ms),
                                            views_rate(a->bytes_out, b->bytes_out, ms),
                                            views_rate(a->errors, b->errors, ms),
                                            views_latency_ms(a, b), (json_int_t)b->clients));
        a = b;
    }
    return points;
}

void views_metrics_history(http_call *call)
{
    int64_t since_ms = 0;
    const char *since = evhttp_find_header(&call->query, "since_ms");
    if (since) {
        char *end;
        since_ms = strtoll(since, &end, 10);
        if (*since == '\0' || *end != '\0' || since_ms < 0) {
            http_reply_error(call->req, 400, "since_ms must be a whole number >= 0");
            return;
        }
    }
    json_t *list = json_array();
    for (state_proxy *p = call->dep->proxies; p; p = p->next) {
        json_t *nodes = json_array();
        for (int i = 0; i < p->node_series_n; i++) {
            const state_node_series *ns = &p->node_series[i];
            json_array_append_new(
                nodes, json_pack("{s:s, s:o}", "name", ns->name, "points",
                                 views_series(ns->samples, STATE_NODE_SAMPLES_MAX, ns->samples_head,
                                              ns->samples_n, since_ms)));
        }
        json_t *points = p->samples ? views_series(p->samples, STATE_SAMPLES_MAX, p->samples_head,
                                                   p->samples_n, since_ms)
                                    : json_array();
        json_array_append_new(list, json_pack("{s:s, s:o, s:o}", "node_id", p->node_id, "points",
                                              points, "nodes", nodes));
    }
    http_reply_json(call->req, 200,
                    json_pack("{s:I, s:[s,s,s,s,s,s,s], s:o}", "now", (json_int_t)control_now_ms(),
                              "fields", "t", "statements", "bytes_in", "bytes_out", "errors",
                              "latency_ms", "sessions", "proxies", list));
}
