/* state.c - the lease holder's in-memory deployments, proxies and telemetry, loaded from the store.
 */
#include "state.h"
#include "agents.h"
#include "leader.h"
#include "lease.h"
#include "log.h"
#include "maintenance.h"
#include "operator.h"
#include "store.h"
#include "store_worker.h"

#include <event2/event.h>
#include <event2/http.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STATE_AUTO_PREFIX     "auto-"
#define STATE_AUTO_HEX_DIGITS 12  /* of the token's SHA-256 in an auto deployment's name */
#define STATE_FLUSH_BATCH     500 /* proxies written to the store by one statement */
#define STATE_INDEX_MIN       64  /* buckets of a deployment's proxy index at least */

static state_deployment *state_head;

state_deployment *state_deployments(void)
{
    return state_head;
}

state_deployment *state_find_deployment(const char *name)
{
    for (state_deployment *d = state_head; d; d = d->next)
        if (strcmp(d->name, name) == 0)
            return d;
    return NULL;
}

state_deployment *state_deployment_by_digest(const char *sha_hex)
{
    state_deployment *found = NULL;
    /* Look at every deployment, so that the time taken does not say which one matched. */
    for (state_deployment *d = state_head; d; d = d->next)
        if ((d->configured || d->is_auto) && control_digest_equal(d->token_sha256, sha_hex))
            found = d;
    return found;
}

static state_deployment *state_new_deployment(const char *name, const char *sha_hex, bool is_auto)
{
    state_deployment *d = calloc(1, sizeof(*d));
    if (!d)
        return NULL;
    snprintf(d->name, sizeof(d->name), "%s", name);
    snprintf(d->token_sha256, sizeof(d->token_sha256), "%s", sha_hex);
    d->is_auto = is_auto;
    /* keep the list sorted by name: listings come out in order */
    state_deployment **at = &state_head;
    while (*at && strcmp((*at)->name, name) < 0)
        at = &(*at)->next;
    d->next = *at;
    *at = d;
    return d;
}

state_deployment *state_auto_deployment(const char *sha_hex)
{
    char name[CCONFIG_NAME_MAX];
    snprintf(name, sizeof(name), STATE_AUTO_PREFIX "%.*s", STATE_AUTO_HEX_DIGITS, sha_hex);
    state_deployment *d = state_find_deployment(name);
    if (d)
        return d->is_auto && control_digest_equal(d->token_sha256, sha_hex) ? d : NULL;
    if (store_deployment_save(name, sha_hex, true) != 0)
        return NULL;
    d = state_new_deployment(name, sha_hex, true);
    if (d)
        log_info("deployment %s created by auto_register", name);
    return d;
}

/* ---- the index of a deployment's proxies by node_id: every request looks its proxy up ---- */

static unsigned state_index_hash(const char *node_id)
{
    unsigned h = 2166136261u; /* FNV-1a */
    for (const unsigned char *c = (const unsigned char *)node_id; *c; c++)
        h = (h ^ *c) * 16777619u;
    return h;
}

static void state_index_insert(state_deployment *dep, state_proxy *p)
{
    unsigned b = state_index_hash(p->node_id) & (unsigned)(dep->index_size - 1);
    p->index_next = dep->index[b];
    dep->index[b] = p;
}

/* Rebuild the index with room for the proxies there are (twice as many buckets, at least
 * STATE_INDEX_MIN). Without memory the index is dropped and lookups walk the list. */
static void state_index_rebuild(state_deployment *dep)
{
    int want = STATE_INDEX_MIN;
    while (want < 2 * (dep->n_declared + dep->n_pending + 1))
        want *= 2;
    free(dep->index);
    dep->index_size = 0;
    dep->index = calloc((size_t)want, sizeof(*dep->index));
    if (!dep->index)
        return;
    dep->index_size = want;
    for (state_proxy *p = dep->proxies; p; p = p->next)
        state_index_insert(dep, p);
}

static void state_index_remove(state_deployment *dep, const state_proxy *p)
{
    if (!dep->index)
        return;
    unsigned b = state_index_hash(p->node_id) & (unsigned)(dep->index_size - 1);
    for (state_proxy **at = &dep->index[b]; *at; at = &(*at)->index_next) {
        if (*at == p) {
            *at = p->index_next;
            return;
        }
    }
}

state_proxy *state_find_proxy(state_deployment *dep, const char *node_id)
{
    if (dep->index) {
        unsigned b = state_index_hash(node_id) & (unsigned)(dep->index_size - 1);
        for (state_proxy *p = dep->index[b]; p; p = p->index_next)
            if (strcmp(p->node_id, node_id) == 0)
                return p;
        return NULL;
    }
    for (state_proxy *p = dep->proxies; p; p = p->next)
        if (strcmp(p->node_id, node_id) == 0)
            return p;
    return NULL;
}

static void state_free_proxy(state_proxy *p);

/* Forget the pending proxy seen longest ago, other than keep (the bound on pending ids: a
 * token holder inventing node ids costs memory for STATE_PENDING_MAX of them, no more). */
static void state_forget_oldest_pending(state_deployment *dep, const state_proxy *keep)
{
    state_proxy **oldest = NULL;
    for (state_proxy **at = &dep->proxies; *at; at = &(*at)->next) {
        const state_proxy *p = *at;
        if (p->declared || p == keep || p->poll_req)
            continue;
        if (!oldest || p->last_seen_ms < (*oldest)->last_seen_ms)
            oldest = at;
    }
    if (!oldest)
        return;
    state_proxy *gone = *oldest;
    *oldest = gone->next;
    state_index_remove(dep, gone);
    dep->n_pending--;
    log_debug("deployment %s: forgot pending proxy %s (more than %d undeclared node ids)",
              dep->name, gone->node_id, STATE_PENDING_MAX);
    state_free_proxy(gone);
}

state_proxy *state_get_proxy(state_deployment *dep, const char *node_id)
{
    state_proxy *p = state_find_proxy(dep, node_id);
    if (p)
        return p;
    p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    p->dep = dep;
    snprintf(p->node_id, sizeof(p->node_id), "%s", node_id);
    p->listen = json_array();
    p->dirty = true;
    state_proxy **at = &dep->proxies;
    while (*at && strcmp((*at)->node_id, node_id) < 0)
        at = &(*at)->next;
    p->next = *at;
    *at = p;
    dep->n_pending++;
    if (!dep->index || 2 * (dep->n_declared + dep->n_pending) > dep->index_size)
        state_index_rebuild(dep);
    else
        state_index_insert(dep, p);
    if (dep->n_pending > STATE_PENDING_MAX)
        state_forget_oldest_pending(dep, p);
    return p;
}

void state_set_declared(state_proxy *p, bool declared)
{
    if (p->declared == declared)
        return;
    p->declared = declared;
    p->dep->n_declared += declared ? 1 : -1;
    p->dep->n_pending += declared ? -1 : 1;
    if (declared && !p->options)
        p->options = json_object();
    if (!declared) {
        json_decref(p->options);
        p->options = NULL;
        if (p->dep->n_pending > STATE_PENDING_MAX)
            state_forget_oldest_pending(p->dep, p);
    }
    p->dirty = true;
    state_decide_again(p->dep); /* the quorum, and who is heard, changed */
}

bool state_proxy_live(const state_proxy *p, int64_t now_ms)
{
    /* a parked long poll whose client is still connected */
    if (p->poll_req && evhttp_request_get_connection(p->poll_req))
        return true;
    return p->last_seen_ms > 0 && now_ms - p->last_seen_ms <= control.cfg->proxy_timeout_ms;
}

int state_live_proxies(state_deployment *dep, state_proxy ***out)
{
    int n = 0;
    int64_t now = control_now_ms();
    *out = NULL;
    if (dep->n_declared <= 0)
        return 0;
    state_proxy **list = malloc((size_t)dep->n_declared * sizeof(*list));
    if (!list) {
        log_error("deployment %s: out of memory listing %d declared proxies", dep->name,
                  dep->n_declared);
        return -1;
    }
    /* the list is sorted by node_id */
    for (state_proxy *p = dep->proxies; p && n < dep->n_declared; p = p->next)
        if (p->declared && state_proxy_live(p, now))
            list[n++] = p;
    if (n == 0) {
        free(list);
        list = NULL;
    }
    *out = list;
    return n;
}

void state_decide_again(state_deployment *dep)
{
    dep->decide_at_ms = 0;
}

void state_count(state_deployment *dep, int *total, int *live)
{
    int64_t now = control_now_ms();
    *total = *live = 0;
    for (state_proxy *p = dep->proxies; p; p = p->next) {
        if (!p->declared)
            continue;
        (*total)++;
        if (state_proxy_live(p, now))
            (*live)++;
    }
}

/* Push a sample on a ring of cap entries (the oldest dropped when full). */
static void state_ring_push(state_sample *ring, int cap, int *head, int *n, const state_sample *s)
{
    if (*n == cap) {
        *head = (*head + 1) % cap;
        (*n)--;
    }
    ring[(*head + *n) % cap] = *s;
    (*n)++;
}

/* The oldest and newest sample of a ring within window_ms of the newest. */
static bool state_ring_window(const state_sample *ring, int cap, int head, int n, int64_t window_ms,
                              const state_sample **first, const state_sample **last)
{
    if (n < 2)
        return false;
    const state_sample *newest = &ring[(head + n - 1) % cap];
    for (int i = 0; i < n - 1; i++) {
        const state_sample *s = &ring[(head + i) % cap];
        if (s->received_ms >= newest->received_ms - window_ms) {
            *first = s;
            *last = newest;
            return true;
        }
    }
    return false;
}

void state_add_sample(state_proxy *p, const state_sample *s)
{
    if (!p->samples) {
        p->samples = calloc(STATE_SAMPLES_MAX, sizeof(*p->samples));
        if (!p->samples)
            return;
    }
    state_ring_push(p->samples, STATE_SAMPLES_MAX, &p->samples_head, &p->samples_n, s);
}

bool state_rate_window(const state_proxy *p, int64_t window_ms, const state_sample **first,
                       const state_sample **last)
{
    if (!p->samples)
        return false;
    return state_ring_window(p->samples, STATE_SAMPLES_MAX, p->samples_head, p->samples_n,
                             window_ms, first, last);
}

/* The newest sample of a node (every series in the list has at least one). */
static const state_sample *state_series_newest(const state_node_series *ns)
{
    return &ns->samples[(ns->samples_head + ns->samples_n - 1) % STATE_NODE_SAMPLES_MAX];
}

void state_add_node_sample(state_proxy *p, const char *node, const state_sample *s,
                           const int64_t *latency_buckets)
{
    state_node_series *ns = NULL;
    for (int i = 0; i < p->node_series_n && !ns; i++)
        if (strcmp(p->node_series[i].name, node) == 0)
            ns = &p->node_series[i];
    if (!ns && p->node_series_n >= STATE_NODES_MAX) {
        /* Full of nodes renamed or removed since: the one reported longest ago makes room. */
        ns = &p->node_series[0];
        for (int i = 1; i < p->node_series_n; i++)
            if (state_series_newest(&p->node_series[i])->received_ms <
                state_series_newest(ns)->received_ms)
                ns = &p->node_series[i];
        memset(ns, 0, sizeof(*ns));
        snprintf(ns->name, sizeof(ns->name), "%s", node);
    } else if (!ns) {
        state_node_series *grown =
            realloc(p->node_series, (size_t)(p->node_series_n + 1) * sizeof(*grown));
        if (!grown)
            return;
        p->node_series = grown;
        ns = &grown[p->node_series_n++];
        memset(ns, 0, sizeof(*ns));
        snprintf(ns->name, sizeof(ns->name), "%s", node);
    }
    state_ring_push(ns->samples, STATE_NODE_SAMPLES_MAX, &ns->samples_head, &ns->samples_n, s);
    ns->observation = p->nodes_observation;
    int64_t *h = ns->latency_buckets[state_series_newest(ns) - ns->samples];
    if (latency_buckets)
        memcpy(h, latency_buckets, sizeof(ns->latency_buckets[0]));
    else
        memset(h, 0, sizeof(ns->latency_buckets[0]));
}

bool state_node_rate_window(const state_node_series *ns, int64_t window_ms,
                            const state_sample **first, const state_sample **last)
{
    return state_ring_window(ns->samples, STATE_NODE_SAMPLES_MAX, ns->samples_head, ns->samples_n,
                             window_ms, first, last);
}

const state_sample *state_node_current(const state_proxy *p, const state_node_series *ns)
{
    const state_sample *newest = state_series_newest(ns);
    return p->nodes && ns->observation == p->nodes_observation ? newest : NULL;
}

/* Drop node samples older than cutoff, and the nodes left with none. */
static void state_prune_nodes(state_proxy *p, int64_t cutoff)
{
    int kept = 0;
    for (int i = 0; i < p->node_series_n; i++) {
        state_node_series *ns = &p->node_series[i];
        while (ns->samples_n > 0 && ns->samples[ns->samples_head].received_ms < cutoff) {
            ns->samples_head = (ns->samples_head + 1) % STATE_NODE_SAMPLES_MAX;
            ns->samples_n--;
        }
        if (ns->samples_n == 0)
            continue;
        if (kept != i)
            p->node_series[kept] = *ns;
        kept++;
    }
    p->node_series_n = kept;
    if (kept == 0) {
        free(p->node_series);
        p->node_series = NULL;
    }
}

static void state_prune_json(json_t **obj, int64_t at_ms, int64_t cutoff)
{
    if (*obj && at_ms < cutoff) {
        json_decref(*obj);
        *obj = NULL;
    }
}

void state_prune(int64_t now_ms)
{
    int64_t cutoff = now_ms - control.cfg->telemetry_retention_ms;
    for (state_deployment *d = state_head; d; d = d->next) {
        for (state_proxy *p = d->proxies; p; p = p->next) {
            /* A proxy gone past proxy_timeout (a restart under a new node id leaves one) is
             * a ghost: its observations are no longer true, so none of them is shown. */
            int64_t pc = state_proxy_live(p, now_ms) ? cutoff : now_ms + 1;
            while (p->samples_n > 0 && p->samples[p->samples_head].received_ms < pc) {
                p->samples_head = (p->samples_head + 1) % STATE_SAMPLES_MAX;
                p->samples_n--;
            }
            state_prune_nodes(p, pc);
            state_prune_json(&p->last_metrics, p->last_metrics_ms, pc);
            state_prune_json(&p->nodes, p->nodes_ms, pc);
            state_prune_json(&p->queries, p->queries_ms, pc);
            state_prune_json(&p->config, p->config_ms, pc);
            if (p->schema) {
                const char *db;
                json_t *entry, *tmp;
                json_object_foreach_safe(p->schema, tmp, db, entry)
                {
                    json_int_t at = json_integer_value(json_object_get(entry, "received_ms"));
                    if (at < pc)
                        json_object_del(p->schema, db);
                }
            }
        }
    }
}

static void state_free_proxy(state_proxy *p)
{
    json_decref(p->options);
    json_decref(p->listen);
    json_decref(p->last_metrics);
    json_decref(p->nodes);
    json_decref(p->queries);
    json_decref(p->schema);
    json_decref(p->config);
    free(p->views);
    free(p->samples);
    free(p->node_series);
    free(p);
}

static void state_free_list(state_deployment *head)
{
    while (head) {
        state_deployment *d = head;
        head = d->next;
        while (d->proxies) {
            state_proxy *p = d->proxies;
            d->proxies = p->next;
            state_free_proxy(p);
        }
        leader_forget(d);
        json_decref(d->members_busy);
        free(d->index);
        if (d->decide_timer)
            event_free(d->decide_timer);
        free(d);
    }
}

static void state_mark_configured(void)
{
    const cconfig *cfg = control.cfg;
    for (state_deployment *d = state_head; d; d = d->next) {
        d->configured = false;
        for (int i = 0; i < cfg->n_deployments; i++)
            if (strcmp(cfg->deployments[i].name, d->name) == 0)
                d->configured = true;
    }
}

/* Loading the state from the store (the store worker's): the schema migrated, the configured
 * deployments written, configuration versions no operation decides dropped, then every
 * deployment with its leadership and proxies read. */
typedef struct state_load_job {
    store_job job;
    int n;                                   /* configured deployments */
    char (*names)[CCONFIG_NAME_MAX];         /* their names */
    char (*digests)[CONTROL_SHA256_HEX_LEN]; /* and their tokens' digests */
    state_deployment *loaded;
    void (*then)(void);
} state_load_job;

static bool state_loading; /* a load is with the store worker */

static int state_load_run(store_job *job)
{
    state_load_job *j = (state_load_job *)job;
    if (store_migrate() != 0)
        return -1;
    for (int i = 0; i < j->n; i++)
        if (store_deployment_save(j->names[i], j->digests[i], false) != 0)
            return -1;
    if (store_config_recover() < 0)
        return -1;
    return store_load(&j->loaded);
}

static void state_load_free(state_load_job *j)
{
    state_free_list(j->loaded);
    free(j->names);
    free(j->digests);
    free(j);
}

static void state_load_done(store_job *job)
{
    state_load_job *j = (state_load_job *)job;
    state_loading = false;
    if (job->rc != 0) {
        log_error("cannot load state from the store: %s", job->error);
        state_load_free(j);
        return;
    }
    if (control.active || control.stopping || (lease_enabled() && !lease_held())) {
        state_load_free(j); /* the lease was lost meanwhile (or it is loaded already) */
        return;
    }
    state_deployment *loaded = j->loaded;
    j->loaded = NULL;
    /* store_load prepends: put the list in name order */
    state_head = NULL;
    while (loaded) {
        state_deployment *d = loaded;
        loaded = d->next;
        state_deployment **at = &state_head;
        while (*at && strcmp((*at)->name, d->name) < 0)
            at = &(*at)->next;
        d->next = *at;
        *at = d;
        for (state_proxy *p = d->proxies; p; p = p->next)
            p->saved_seen_ms = p->last_seen_ms;
        state_index_rebuild(d);
        while (d->n_pending > STATE_PENDING_MAX)
            state_forget_oldest_pending(d, NULL);
    }
    state_mark_configured();
    control.active = true;
    int n_dep = 0, n_proxy = 0;
    for (state_deployment *d = state_head; d; d = d->next) {
        n_dep++;
        for (state_proxy *p = d->proxies; p; p = p->next)
            n_proxy++;
    }
    log_info("active: %d deployment(s), %d known prox%s loaded from the store", n_dep, n_proxy,
             n_proxy == 1 ? "y" : "ies");
    void (*then)(void) = j->then;
    state_load_free(j);
    if (then)
        then();
}

void state_activate(void (*then)(void))
{
    const cconfig *cfg = control.cfg;
    if (control.active || state_loading)
        return;
    state_load_job *j = calloc(1, sizeof(*j));
    int n = cfg->n_deployments;
    if (j) {
        j->names = calloc(n > 0 ? (size_t)n : 1, sizeof(*j->names));
        j->digests = calloc(n > 0 ? (size_t)n : 1, sizeof(*j->digests));
    }
    if (!j || !j->names || !j->digests) {
        if (j)
            state_load_free(j);
        log_error("cannot load state from the store: out of memory");
        return;
    }
    for (int i = 0; i < n; i++) { /* the worker gets its own copy: a reload replaces cfg */
        snprintf(j->names[i], sizeof(j->names[i]), "%s", cfg->deployments[i].name);
        control_sha256_hex(cfg->deployments[i].token, j->digests[i]);
    }
    j->n = n;
    j->then = then;
    j->job.run = state_load_run;
    j->job.done = state_load_done;
    state_loading = true;
    store_worker_submit(&j->job);
}

void state_deactivate(const char *reason)
{
    if (!control.active && !state_head)
        return;
    operator_cancel_all(reason);
    operation_recovery_reset();
    maintenance_forget(); /* the next activation's recovery loads the store again */
    agents_release_all(reason);
    state_free_list(state_head);
    state_head = NULL;
    control.active = false;
    log_info("inactive: %s", reason);
}

/* A configured deployment's row (new, or a new token), for the store worker; taken here once
 * it is stored, so a token is accepted only once the store has it. */
typedef struct state_deployment_job {
    store_job job;
    char name[CCONFIG_NAME_MAX];
    char sha[CONTROL_SHA256_HEX_LEN];
} state_deployment_job;

/* {name: rows on their way}: a reload writes a deployment's row again while one is, so the
 * store ends with the last reload's token (T1, T2, then T1 again). */
static json_t *state_saving;

static void state_saving_add(const char *name, int by)
{
    if (!state_saving && !(state_saving = json_object()))
        return;
    int64_t n = json_integer_value(json_object_get(state_saving, name)) + by;
    if (n > 0)
        json_object_set_new(state_saving, name, json_integer(n));
    else
        json_object_del(state_saving, name);
}

static int state_deployment_run(store_job *job)
{
    state_deployment_job *j = (state_deployment_job *)job;
    return store_deployment_save(j->name, j->sha, false);
}

static void state_deployment_done(store_job *job)
{
    state_deployment_job *j = (state_deployment_job *)job;
    const cconfig *cfg = control.cfg;
    char sha[CONTROL_SHA256_HEX_LEN] = "";
    for (int i = 0; i < cfg->n_deployments; i++)
        if (strcmp(cfg->deployments[i].name, j->name) == 0)
            control_sha256_hex(cfg->deployments[i].token, sha);
    state_deployment *d = control.active ? state_find_deployment(j->name) : NULL;
    state_saving_add(j->name, -1);
    if (job->rc != 0) {
        log_error("reload: cannot save deployment %s: %s", j->name, job->error);
    } else if (!control.active || strcmp(sha, j->sha) != 0) {
        /* dropped meanwhile, or reloaded again: the later reload's row decides */
    } else if (d) {
        if (strcmp(d->token_sha256, j->sha) != 0) {
            snprintf(d->token_sha256, sizeof(d->token_sha256), "%s", j->sha);
            log_info("reload: deployment %s has a new token", j->name);
        }
        d->configured = true;
    } else if ((d = state_new_deployment(j->name, j->sha, false))) {
        d->configured = true;
        log_info("reload: deployment %s added", j->name);
    }
    free(j);
}

void state_apply_config(void)
{
    const cconfig *cfg = control.cfg;
    char sha[CONTROL_SHA256_HEX_LEN];

    if (!control.active)
        return;
    for (int i = 0; i < cfg->n_deployments; i++) {
        const cconfig_deployment *cd = &cfg->deployments[i];
        control_sha256_hex(cd->token, sha);
        state_deployment *d = state_find_deployment(cd->name);
        if (d && strcmp(d->token_sha256, sha) == 0 && !json_object_get(state_saving, cd->name))
            continue;
        state_deployment_job *j = calloc(1, sizeof(*j));
        if (!j) {
            log_error("reload: cannot save deployment %s: out of memory", cd->name);
            continue;
        }
        snprintf(j->name, sizeof(j->name), "%s", cd->name);
        snprintf(j->sha, sizeof(j->sha), "%s", sha);
        j->job.run = state_deployment_run;
        j->job.done = state_deployment_done;
        state_saving_add(cd->name, 1);
        store_worker_submit(&j->job); /* taken once stored (state_deployment_done) */
    }
    for (state_deployment *d = state_head; d; d = d->next) {
        bool was = d->configured;
        d->configured = false;
        for (int i = 0; i < cfg->n_deployments; i++)
            if (strcmp(cfg->deployments[i].name, d->name) == 0)
                d->configured = true; /* a new token is taken once stored */
        if (was && !d->configured)
            log_info("reload: deployment %s is no longer configured; its token is refused",
                     d->name);
    }
}

/* Saves the pending list; on success its proxies are clean. 0 or -1. */
static int state_flush_batch(state_proxy **batch, int n)
{
    if (n == 0)
        return 0;
    if (store_proxies_save(batch, n) != 0)
        return -1;
    for (int i = 0; i < n; i++) {
        batch[i]->dirty = false;
        batch[i]->saved_seen_ms = batch[i]->last_seen_ms;
    }
    return 0;
}

void state_flush(void)
{
    state_proxy *batch[STATE_FLUSH_BATCH];
    int n = 0;
    for (state_deployment *d = state_head; d; d = d->next) {
        for (state_proxy *p = d->proxies; p; p = p->next) {
            if (!p->declared || (!p->dirty && p->saved_seen_ms == p->last_seen_ms))
                continue;
            batch[n++] = p;
            if (n == STATE_FLUSH_BATCH) {
                if (state_flush_batch(batch, n) != 0)
                    return; /* the store is down; try again next time */
                n = 0;
            }
        }
    }
    state_flush_batch(batch, n);
}
