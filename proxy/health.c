/* health.c - can this proxy serve: the answers of /health/is-live, is-ready and is-read-ready.
 *
 * Read from the master's own state and shared memory, as `show info` and `show nodes` are, so
 * that a load balancer sees what a client would meet: no leader, a pause, a drain, no worker.
 */
#include "health.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

static shm_route_table health_routes; /* the master is single-threaded; the table is large */

static int health_workers_running(const master *m)
{
    int alive = 0;
    for (int i = 0; i < m->n_workers; i++)
        alive += m->children[i].pid != 0;
    return alive;
}

/* "2026-12-05T23:10:00Z" as a JSON string, or null for 0. */
static void health_json_time(int64_t us, char *buf, size_t len)
{
    if (us <= 0) {
        snprintf(buf, len, "null");
        return;
    }
    time_t t = (time_t)(us / 1000000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, len, "\"%Y-%m-%dT%H:%M:%SZ\"", &tm);
}

/* Reasons shared by both ready checks; false (with json filled) when one applies. */
static bool health_can_serve(master *m, const char *check, char *json, size_t len)
{
    if (m->stop != MASTER_RUNNING) {
        snprintf(json, len, "{\"%s\": false, \"reason\": \"shutting down: sessions are draining\"}",
                 check);
        return false;
    }
    if (health_workers_running(m) == 0) {
        snprintf(json, len, "{\"%s\": false, \"reason\": \"no worker is running\"}", check);
        return false;
    }
    if (atomic_load(&m->shm->maintenance)) {
        char until[40];
        health_json_time(atomic_load(&m->shm->maintenance_until_us), until, sizeof(until));
        snprintf(json, len,
                 "{\"%s\": false, \"reason\": \"paused by maintenance\", \"until\": %s}", check,
                 until);
        return false;
    }
    return true;
}

/* The write leader's index when it can take sessions, else -1 with *why set. */
static int health_leader(const master *m, const shm_route_table *t, const char **why)
{
    if (t->leader < 0 || (uint32_t)t->leader >= t->n_nodes) {
        *why = "no write leader";
        return -1;
    }
    const shm_node *n = &t->nodes[t->leader];
    if (n->health == NODE_HEALTH_DOWN) {
        *why = "the write leader is down";
        return -1;
    }
    if (m->cfg->agent && (!n->probed || n->health != NODE_HEALTH_UP || n->in_recovery)) {
        *why = "the write leader is not confirmed by a probe yet";
        return -1;
    }
    return t->leader;
}

bool health_is_live(master *m, char *json, size_t len)
{
    int alive = health_workers_running(m);
    if (alive == 0) {
        snprintf(json, len, "{\"live\": false, \"reason\": \"no worker is running\"}");
        return false;
    }
    snprintf(json, len, "{\"live\": true, \"workers_running\": %d}", alive);
    return true;
}

bool health_is_ready(master *m, char *json, size_t len)
{
    if (!health_can_serve(m, "ready", json, len))
        return false;
    shm_routes_read(m->shm, &health_routes);
    const char *why = NULL;
    int leader = health_leader(m, &health_routes, &why);
    if (atomic_load(&m->shm->read_only_role)) {
        why = "a read-only proxy (proxy option read_only): its write port routes no writes";
        leader = -1;
    }
    if (leader < 0) {
        snprintf(json, len, "{\"ready\": false, \"reason\": \"%s\", \"epoch\": %llu}", why,
                 (unsigned long long)health_routes.epoch);
        return false;
    }
    snprintf(json, len, "{\"ready\": true, \"leader\": \"%s\", \"epoch\": %llu}",
             health_routes.nodes[leader].name, (unsigned long long)health_routes.epoch);
    return true;
}

bool health_is_read_ready(master *m, int64_t lag_bytes, int64_t lag_ms, char *json, size_t len)
{
    if (m->cfg->read_listen_port == 0) {
        snprintf(json, len, "{\"ready\": false, \"reason\": \"no read-only port is configured\"}");
        return false;
    }
    if (!health_can_serve(m, "ready", json, len))
        return false;
    const shm_route_table *t = &health_routes;
    shm_routes_read(m->shm, &health_routes);
    const char *why = NULL;
    int leader = health_leader(m, t, &why);
    char names[CONFIG_MAX_NODES * (CONFIG_NAME_MAX + 4)] = ""; /* ", \"NAME\"" each */
    size_t used = 0;
    int found = 0;
    for (uint32_t i = 0; i < t->n_nodes; i++) {
        const shm_node *n = &t->nodes[i];
        if ((int)i == t->leader || !n->readable || n->health == NODE_HEALTH_DOWN ||
            n->addrlen == 0)
            continue;
        if (lag_bytes >= 0 && (n->lag_bytes < 0 || n->lag_bytes > lag_bytes))
            continue;
        if (lag_ms >= 0 && (n->lag_ms < 0 || n->lag_ms > lag_ms))
            continue;
        int w = snprintf(names + used, sizeof(names) - used, "%s\"%s\"", found ? ", " : "",
                         n->name);
        if (w > 0 && (size_t)w < sizeof(names) - used)
            used += (size_t)w;
        found++;
    }
    if (found > 0) {
        snprintf(json, len, "{\"ready\": true, \"replicas\": [%s]}", names);
        return true;
    }
    if (m->cfg->read_fallback == READ_FALLBACK_LEADER && leader >= 0) {
        snprintf(json, len, "{\"ready\": true, \"replicas\": [], \"fallback\": \"%s\"}",
                 t->nodes[leader].name);
        return true;
    }
    snprintf(json, len,
             "{\"ready\": false, \"reason\": \"no replica qualifies%s\"}",
             m->cfg->read_fallback == READ_FALLBACK_LEADER ? " and there is no write leader"
                                                           : " (read_fallback = none)");
    return false;
}
