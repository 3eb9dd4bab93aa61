/* metrics.c - /metrics: Prometheus text exposition of the control plane and every proxy. */
#include "metrics.h"
#include "control.h"
#include "lease.h"
#include "state.h"
#include "store.h"

#include <event2/buffer.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#define METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"
#define METRICS_LABEL_MAX    512
#define MS_PER_S             1000.0
#define US_PER_S             1000000.0

/* One per-proxy metric family: its value for a proxy, or false when it has none. */
typedef bool (*metrics_getter)(const state_proxy *p, int64_t now, double *out);

typedef struct metrics_family {
    const char *name;
    const char *type; /* "gauge" or "counter" */
    const char *help;
    metrics_getter get;
} metrics_family;

static const state_sample *metrics_newest(const state_proxy *p)
{
    if (p->samples_n == 0)
        return NULL;
    return &p->samples[(p->samples_head + p->samples_n - 1) % STATE_SAMPLES_MAX];
}

#define SAMPLE_GETTER(fn_, field_)                                                                 \
    static bool fn_(const state_proxy *p, int64_t now, double *out)                                \
    {                                                                                              \
        const state_sample *s = metrics_newest(p);                                                 \
        (void)now;                                                                                 \
        if (!s)                                                                                    \
            return false;                                                                          \
        *out = (double)s->field_;                                                                  \
        return true;                                                                               \
    }
SAMPLE_GETTER(get_clients, clients)
SAMPLE_GETTER(get_statements, statements)
SAMPLE_GETTER(get_bytes_in, bytes_in)
SAMPLE_GETTER(get_bytes_out, bytes_out)
SAMPLE_GETTER(get_errors, errors)

static bool get_epoch(const state_proxy *p, int64_t now, double *out)
{
    (void)now;
    *out = (double)p->epoch;
    return true;
}

static bool get_maintenance(const state_proxy *p, int64_t now, double *out)
{
    (void)now;
    *out = p->maintenance ? 1 : 0;
    return true;
}

static bool get_config_version(const state_proxy *p, int64_t now, double *out)
{
    (void)now;
    *out = (double)p->config_version;
    return true;
}

static bool get_live(const state_proxy *p, int64_t now, double *out)
{
    *out = state_proxy_live(p, now) ? 1 : 0;
    return true;
}

static bool get_polling(const state_proxy *p, int64_t now, double *out)
{
    (void)now;
    *out = p->poll_req ? 1 : 0;
    return true;
}

static bool get_last_seen(const state_proxy *p, int64_t now, double *out)
{
    if (p->last_seen_ms == 0)
        return false;
    *out = (double)(now - p->last_seen_ms) / MS_PER_S;
    return true;
}

/* Plan changes the proxy's agent recorded (its last metrics body), when it reports them. */
static bool get_plan_changes(const state_proxy *p, int64_t now, double *out)
{
    json_t *v = json_object_get(p->last_metrics, "plan_changes");
    (void)now;
    if (!json_is_integer(v))
        return false;
    *out = (double)json_integer_value(v);
    return true;
}

/* The configuration version whose file the proxy's agent found edited by hand (0: none). */
static bool get_config_diverged(const state_proxy *p, int64_t now, double *out)
{
    json_t *v = json_object_get(p->last_metrics, "config_diverged");
    (void)now;
    if (!json_is_integer(v))
        return false;
    *out = (double)json_integer_value(v);
    return true;
}

static const metrics_family metrics_proxy_families[] = {
    {"pgrelay_proxy_clients", "gauge", "Client sessions of the proxy (last sample).", get_clients},
    {"pgrelay_proxy_statements_total", "counter", "Statements relayed since the proxy started.",
     get_statements},
    {"pgrelay_proxy_bytes_in_total", "counter", "Bytes received from clients since start.",
     get_bytes_in},
    {"pgrelay_proxy_bytes_out_total", "counter", "Bytes sent to clients since start.",
     get_bytes_out},
    {"pgrelay_proxy_errors_total", "counter", "Errors since the proxy started.", get_errors},
    {"pgrelay_proxy_plan_changes_total", "counter",
     "Query plans whose shape differed from the statement's previous plan (agent).",
     get_plan_changes},
    {"pgrelay_proxy_epoch", "gauge", "Leader epoch the proxy reports.", get_epoch},
    {"pgrelay_proxy_maintenance", "gauge", "1 while the proxy is in maintenance mode.",
     get_maintenance},
    {"pgrelay_proxy_config_diverged", "gauge",
     "Configuration version the proxy's file no longer matches (a local edit; 0: none).",
     get_config_diverged},
    {"pgrelay_proxy_config_version", "gauge", "Configuration version applied on the proxy.",
     get_config_version},
    {"pgrelay_proxy_live", "gauge", "1 while the proxy's last request is recent enough.", get_live},
    {"pgrelay_proxy_last_seen_seconds", "gauge", "Seconds since the proxy's last request.",
     get_last_seen},
    {"pgrelay_proxy_polling", "gauge",
     "1 while the proxy's long poll for commands is parked here (a command reaches it at once).",
     get_polling},
};

/* Per-node metric families, from the newest sample of each node a proxy last reported. */
typedef struct metrics_node_family {
    const char *name;
    const char *type;
    const char *help;
    size_t offset; /* of the int64_t in state_sample */
} metrics_node_family;

static const metrics_node_family metrics_node_families[] = {
    {"pgrelay_node_sessions", "gauge", "Client sessions of the proxy on the node (last sample).",
     offsetof(state_sample, clients)},
    {"pgrelay_node_statements_total", "counter", "Statements the proxy relayed to the node.",
     offsetof(state_sample, statements)},
    {"pgrelay_node_bytes_in_total", "counter", "Bytes from clients to the node through the proxy.",
     offsetof(state_sample, bytes_in)},
    {"pgrelay_node_bytes_out_total", "counter", "Bytes from the node to clients through the proxy.",
     offsetof(state_sample, bytes_out)},
    {"pgrelay_node_errors_total", "counter",
     "Sessions on the node that the proxy ended with an error.", offsetof(state_sample, errors)},
};

#define METRICS_PROXY_LATENCY "pgrelay_proxy_statement_latency_seconds"
#define METRICS_NODE_LATENCY  "pgrelay_node_statement_latency_seconds"

/* A label value with \, " and newline escaped. */
static const char *metrics_escape(const char *in, char *out, size_t len)
{
    size_t o = 0;
    for (; *in && o + 3 < len; in++) {
        if (*in == '\\' || *in == '"') {
            out[o++] = '\\';
            out[o++] = *in;
        } else if (*in == '\n') {
            out[o++] = '\\';
            out[o++] = 'n';
        } else {
            out[o++] = *in;
        }
    }
    out[o] = '\0';
    return out;
}

static void metrics_header(struct evbuffer *b, const char *name, const char *type, const char *help)
{
    evbuffer_add_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void metrics_deployments(struct evbuffer *b)
{
    char dep[METRICS_LABEL_MAX], lbl[METRICS_LABEL_MAX];

    metrics_header(b, "pgrelay_control_proxies", "gauge", "Known proxies of the deployment.");
    for (state_deployment *d = state_deployments(); d; d = d->next) {
        int total, live;
        state_count(d, &total, &live);
        evbuffer_add_printf(b, "pgrelay_control_proxies{deployment=\"%s\"} %d\n",
                            metrics_escape(d->name, dep, sizeof(dep)), total);
    }
    metrics_header(b, "pgrelay_control_proxies_live", "gauge",
                   "Proxies of the deployment that are live.");
    for (state_deployment *d = state_deployments(); d; d = d->next) {
        int total, live;
        state_count(d, &total, &live);
        evbuffer_add_printf(b, "pgrelay_control_proxies_live{deployment=\"%s\"} %d\n",
                            metrics_escape(d->name, dep, sizeof(dep)), live);
    }
    metrics_header(b, "pgrelay_control_epoch", "gauge",
                   "Leader epoch the control plane decided for the deployment.");
    for (state_deployment *d = state_deployments(); d; d = d->next)
        evbuffer_add_printf(b, "pgrelay_control_epoch{deployment=\"%s\"} %" PRId64 "\n",
                            metrics_escape(d->name, dep, sizeof(dep)), d->epoch);
    metrics_header(b, "pgrelay_control_leader", "gauge",
                   "1 for the write leader the control plane decided for the deployment.");
    for (state_deployment *d = state_deployments(); d; d = d->next)
        if (d->leader[0])
            evbuffer_add_printf(b, "pgrelay_control_leader{deployment=\"%s\",node=\"%s\"} 1\n",
                                metrics_escape(d->name, dep, sizeof(dep)),
                                metrics_escape(d->leader, lbl, sizeof(lbl)));

    int64_t now = control_now_ms();
    for (size_t f = 0; f < sizeof(metrics_proxy_families) / sizeof(metrics_proxy_families[0]);
         f++) {
        const metrics_family *fam = &metrics_proxy_families[f];
        metrics_header(b, fam->name, fam->type, fam->help);
        for (state_deployment *d = state_deployments(); d; d = d->next) {
            for (state_proxy *p = d->proxies; p; p = p->next) {
                double v;
                if (!fam->get(p, now, &v))
                    continue;
                evbuffer_add_printf(b, "%s{deployment=\"%s\",node_id=\"%s\"} %.17g\n", fam->name,
                                    metrics_escape(d->name, dep, sizeof(dep)),
                                    metrics_escape(p->node_id, lbl, sizeof(lbl)), v);
            }
        }
    }
}

/* Statement latency as a summary without quantiles: _sum (seconds) and _count, from which
 * Prometheus derives the average over any range: rate(_sum) / rate(_count). */
static void metrics_latency(struct evbuffer *b, const char *name, const char *labels,
                            const state_sample *s)
{
    evbuffer_add_printf(b, "%s_sum{%s} %.17g\n", name, labels, (double)s->latency_us / US_PER_S);
    evbuffer_add_printf(b, "%s_count{%s} %" PRId64 "\n", name, labels, s->statements_completed);
}

/* The rows of one per-node family (fam NULL: the latency summary), every proxy and node. */
static void metrics_node_rows(struct evbuffer *b, const metrics_node_family *fam)
{
    char dep[METRICS_LABEL_MAX], id[METRICS_LABEL_MAX], node[METRICS_LABEL_MAX];
    char labels[3 * METRICS_LABEL_MAX + 64];

    for (state_deployment *d = state_deployments(); d; d = d->next) {
        for (state_proxy *p = d->proxies; p; p = p->next) {
            for (int i = 0; i < p->node_series_n; i++) {
                const state_sample *s = state_node_current(p, &p->node_series[i]);
                if (!s)
                    continue;
                snprintf(labels, sizeof(labels), "deployment=\"%s\",node_id=\"%s\",node=\"%s\"",
                         metrics_escape(d->name, dep, sizeof(dep)),
                         metrics_escape(p->node_id, id, sizeof(id)),
                         metrics_escape(p->node_series[i].name, node, sizeof(node)));
                if (fam)
                    evbuffer_add_printf(b, "%s{%s} %" PRId64 "\n", fam->name, labels,
                                        *(const int64_t *)((const char *)s + fam->offset));
                else
                    metrics_latency(b, METRICS_NODE_LATENCY, labels, s);
            }
        }
    }
}

/* Statement latency per proxy, then the per-node families. */
static void metrics_statements(struct evbuffer *b)
{
    char dep[METRICS_LABEL_MAX], id[METRICS_LABEL_MAX];
    char labels[2 * METRICS_LABEL_MAX + 64];

    metrics_header(b, METRICS_PROXY_LATENCY, "summary",
                   "Statement latency, first message to the closing ReadyForQuery.");
    for (state_deployment *d = state_deployments(); d; d = d->next) {
        for (state_proxy *p = d->proxies; p; p = p->next) {
            const state_sample *s = metrics_newest(p);
            if (!s)
                continue;
            snprintf(labels, sizeof(labels), "deployment=\"%s\",node_id=\"%s\"",
                     metrics_escape(d->name, dep, sizeof(dep)),
                     metrics_escape(p->node_id, id, sizeof(id)));
            metrics_latency(b, METRICS_PROXY_LATENCY, labels, s);
        }
    }
    for (size_t f = 0; f < sizeof(metrics_node_families) / sizeof(metrics_node_families[0]); f++) {
        metrics_header(b, metrics_node_families[f].name, metrics_node_families[f].type,
                       metrics_node_families[f].help);
        metrics_node_rows(b, &metrics_node_families[f]);
    }
    metrics_header(b, METRICS_NODE_LATENCY, "summary",
                   "Statement latency on the node, first message to the closing ReadyForQuery.");
    metrics_node_rows(b, NULL);
}

void metrics_handle(http_call *call)
{
    char lease_name[METRICS_LABEL_MAX], holder[METRICS_LABEL_MAX], me[METRICS_LABEL_MAX];
    struct evbuffer *b = evbuffer_new();
    if (!b) {
        http_reply_error(call->req, 500, "out of memory");
        return;
    }
    bool serving = http_not_serving_reason() == NULL;

    metrics_header(b, "pgrelay_control_up", "gauge", "1 while pgrelay-control runs.");
    evbuffer_add_printf(b, "pgrelay_control_up 1\n");
    metrics_header(b, "pgrelay_control_store_up", "gauge",
                   "1 when the last store operation succeeded.");
    evbuffer_add_printf(b, "pgrelay_control_store_up %d\n", store_up() ? 1 : 0);
    metrics_header(b, "pgrelay_control_serving", "gauge",
                   "1 when this replica serves /api/v1 (state loaded, lease held or disabled).");
    evbuffer_add_printf(b, "pgrelay_control_serving %d\n", serving ? 1 : 0);
    metrics_header(b, "pgrelay_control_lease_held", "gauge",
                   "1 when this replica holds the lease (always 1 with leases disabled).");
    evbuffer_add_printf(b, "pgrelay_control_lease_held{identity=\"%s\"} %d\n",
                        metrics_escape(control.identity, me, sizeof(me)), lease_held() ? 1 : 0);
    if (lease_enabled()) {
        metrics_header(b, "pgrelay_control_lease_holder", "gauge",
                       "1 for the lease holder as last seen in the store.");
        metrics_escape(control.cfg->lease_name, lease_name, sizeof(lease_name));
        metrics_escape(lease_holder(), holder, sizeof(holder));
        if (holder[0])
            evbuffer_add_printf(b, "pgrelay_control_lease_holder{lease=\"%s\",holder=\"%s\"} 1\n",
                                lease_name, holder);
    }
    if (serving) {
        metrics_deployments(b);
        metrics_statements(b);
    }

    evhttp_add_header(evhttp_request_get_output_headers(call->req), "Content-Type",
                      METRICS_CONTENT_TYPE);
    http_reply_buffer(call->req, 200, b);
    evbuffer_free(b);
}
