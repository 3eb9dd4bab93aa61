/* prom.c - the proxy's metrics in Prometheus' text exposition format (GET /metrics).
 *
 * Everything comes from shared memory and the master's process table: per-worker counters are
 * summed, sessions are counted from their slots, nodes from the routing table in force.
 */
#include "prom.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

static shm_route_table prom_routes; /* the master is single-threaded; the table is large */

static void prom_head(struct evbuffer *out, const char *name, const char *type, const char *help)
{
    evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void prom_value(struct evbuffer *out, const char *name, const char *type, const char *help,
                       double v)
{
    prom_head(out, name, type, help);
    evbuffer_add_printf(out, "%s %.17g\n", name, v);
}

/* Session slot states, as the console names them. */
static const char *const prom_state_names[] = {
    [SESSION_STARTUP] = "startup",
    [SESSION_IDLE] = "idle",
    [SESSION_ACTIVE] = "active",
    [SESSION_IN_TX] = "in_transaction",
};
#define PROM_STATES ((int)(sizeof(prom_state_names) / sizeof(prom_state_names[0])))

static void prom_sessions(master *m, struct evbuffer *out)
{
    uint64_t count[2][PROM_STATES];
    memset(count, 0, sizeof(count));
    for (uint32_t i = 0; i < m->shm->max_sessions; i++) {
        shm_session *s = &m->shm->sessions[i];
        uint32_t state = atomic_load_explicit(&s->state, memory_order_acquire);
        if (state == SESSION_FREE || state >= (uint32_t)PROM_STATES)
            continue;
        count[s->read_port ? 1 : 0][state]++;
    }
    prom_head(out, "pgrelay_sessions", "gauge", "Client sessions by port and state.");
    for (int port = 0; port < 2; port++)
        for (int st = SESSION_STARTUP; st < PROM_STATES; st++)
            evbuffer_add_printf(out, "pgrelay_sessions{port=\"%s\",state=\"%s\"} %" PRIu64 "\n",
                                port ? "read" : "write", prom_state_names[st], count[port][st]);
}

/* The per-worker counters, summed over every worker slot (restarted workers keep their row). */
static void prom_worker_totals(master *m, struct evbuffer *out)
{
    shm_worker_stats sum;
    memset(&sum, 0, sizeof(sum));
    uint64_t restarts = 0;
    for (uint32_t w = 0; w < m->shm->n_workers; w++) {
        const shm_worker *wk = &m->shm->workers[w];
        sum.sessions_total += atomic_load_explicit(&wk->stats.sessions_total, memory_order_relaxed);
        sum.server_connects +=
            atomic_load_explicit(&wk->stats.server_connects, memory_order_relaxed);
        sum.bytes_in += atomic_load_explicit(&wk->stats.bytes_in, memory_order_relaxed);
        sum.bytes_out += atomic_load_explicit(&wk->stats.bytes_out, memory_order_relaxed);
        sum.statements += atomic_load_explicit(&wk->stats.statements, memory_order_relaxed);
        sum.errors += atomic_load_explicit(&wk->stats.errors, memory_order_relaxed);
        sum.cancels += atomic_load_explicit(&wk->stats.cancels, memory_order_relaxed);
        sum.statements_completed +=
            atomic_load_explicit(&wk->stats.statements_completed, memory_order_relaxed);
        sum.latency_us += atomic_load_explicit(&wk->stats.latency_us, memory_order_relaxed);
        restarts += wk->restarts;
    }
    prom_value(out, "pgrelay_sessions_accepted_total", "counter", "Client sessions accepted.",
               (double)sum.sessions_total);
    prom_value(out, "pgrelay_server_connects_total", "counter",
               "Successful connections to database nodes.", (double)sum.server_connects);
    prom_value(out, "pgrelay_client_bytes_received_total", "counter",
               "Bytes relayed from clients to nodes.", (double)sum.bytes_in);
    prom_value(out, "pgrelay_client_bytes_sent_total", "counter",
               "Bytes relayed from nodes to clients.", (double)sum.bytes_out);
    prom_value(out, "pgrelay_statements_total", "counter",
               "Query and Execute messages from clients.", (double)sum.statements);
    prom_value(out, "pgrelay_session_errors_total", "counter",
               "Sessions pgrelay ended with an error.", (double)sum.errors);
    prom_value(out, "pgrelay_cancels_total", "counter", "Cancel requests forwarded.",
               (double)sum.cancels);
    prom_head(out, "pgrelay_statement_latency_seconds", "summary",
              "Time from a statement's first message to its ReadyForQuery.");
    evbuffer_add_printf(out, "pgrelay_statement_latency_seconds_sum %.6f\n",
                        (double)sum.latency_us / 1e6);
    evbuffer_add_printf(out, "pgrelay_statement_latency_seconds_count %" PRIu64 "\n",
                        sum.statements_completed);
    prom_value(out, "pgrelay_worker_restarts_total", "counter",
               "Workers re-forked after they died.", (double)restarts);
}

static void prom_nodes(master *m, struct evbuffer *out)
{
    const shm_route_table *t = &prom_routes;
    static const struct {
        const char *name, *type, *help;
    } heads[] = {
        {"pgrelay_node_up", "gauge", "1 when the node answers its probes, 0 when down."},
        {"pgrelay_node_leader", "gauge", "1 for the write leader."},
        {"pgrelay_node_in_recovery", "gauge", "1 when the last probe found it in recovery."},
        {"pgrelay_node_readable", "gauge", "1 when it takes read-only sessions."},
        {"pgrelay_node_lag_bytes", "gauge", "Replay lag behind the leader; -1 when unknown."},
        {"pgrelay_node_lag_seconds", "gauge", "Replay lag in time; -1 when unknown."},
        {"pgrelay_node_sessions", "gauge", "Client sessions on the node, by port."},
        {"pgrelay_node_statements_total", "counter", "Statements relayed to the node."},
    };
    for (size_t h = 0; h < sizeof(heads) / sizeof(heads[0]); h++) {
        prom_head(out, heads[h].name, heads[h].type, heads[h].help);
        for (uint32_t i = 0; i < t->n_nodes; i++) {
            const shm_node *n = &t->nodes[i];
            const char *name = n->name;
            shm_node_count *c = shm_node_count_get(m->shm, name);
            switch (h) {
            case 0:
                evbuffer_add_printf(out, "%s{node=\"%s\"} %d\n", heads[h].name, name,
                                    n->health != NODE_HEALTH_DOWN);
                break;
            case 1:
                evbuffer_add_printf(out, "%s{node=\"%s\"} %d\n", heads[h].name, name,
                                    (int)i == t->leader);
                break;
            case 2:
                evbuffer_add_printf(out, "%s{node=\"%s\"} %d\n", heads[h].name, name,
                                    n->probed && n->in_recovery);
                break;
            case 3:
                evbuffer_add_printf(out, "%s{node=\"%s\"} %d\n", heads[h].name, name,
                                    n->readable);
                break;
            case 4:
                evbuffer_add_printf(out, "%s{node=\"%s\"} %" PRId64 "\n", heads[h].name, name,
                                    n->lag_bytes);
                break;
            case 5:
                evbuffer_add_printf(out, "%s{node=\"%s\"} %.3f\n", heads[h].name, name,
                                    n->lag_ms < 0 ? -1.0 : (double)n->lag_ms / 1000.0);
                break;
            case 6:
                evbuffer_add_printf(
                    out, "%s{node=\"%s\",port=\"write\"} %d\n%s{node=\"%s\",port=\"read\"} %d\n",
                    heads[h].name, name, c ? atomic_load(&c->write_sessions) : 0, heads[h].name,
                    name, c ? atomic_load(&c->read_sessions) : 0);
                break;
            default: {
                shm_node_totals tot;
                memset(&tot, 0, sizeof(tot));
                if (c)
                    shm_node_totals_read(m->shm, c, &tot);
                evbuffer_add_printf(out, "%s{node=\"%s\"} %" PRIu64 "\n", heads[h].name, name,
                                    tot.statements);
                break;
            }
            }
        }
    }
}

/* Statement latency per node as a Prometheus histogram: cumulative buckets from the per-worker
 * rows in shared memory, summed. */
static void prom_latency(master *m, struct evbuffer *out)
{
    static const char name[] = "pgrelay_node_statement_latency_seconds";
    const shm_route_table *t = &prom_routes;
    prom_head(out, name, "histogram",
              "Time from a statement's first message to its ReadyForQuery, per node.");
    for (uint32_t i = 0; i < t->n_nodes; i++) {
        const char *node = t->nodes[i].name;
        shm_node_totals h;
        memset(&h, 0, sizeof(h));
        shm_node_count *c = shm_node_count_get(m->shm, node);
        if (c)
            shm_node_totals_read(m->shm, c, &h);
        uint64_t le = 0;
        for (unsigned b = 0; b < SHM_LATENCY_BOUNDS; b++) {
            le += h.buckets[b];
            evbuffer_add_printf(out, "%s_bucket{node=\"%s\",le=\"%g\"} %" PRIu64 "\n", name, node,
                                (double)shm_latency_bounds_us[b] / 1e6, le);
        }
        evbuffer_add_printf(out, "%s_bucket{node=\"%s\",le=\"+Inf\"} %" PRIu64 "\n", name, node,
                            h.count);
        evbuffer_add_printf(out, "%s_sum{node=\"%s\"} %.6f\n", name, node,
                            (double)h.latency_us / 1e6);
        evbuffer_add_printf(out, "%s_count{node=\"%s\"} %" PRIu64 "\n", name, node, h.count);
    }
}

void prom_write(master *m, struct evbuffer *out)
{
    shm_routes_read(m->shm, &prom_routes);
    int alive = 0;
    for (int i = 0; i < m->n_workers; i++)
        alive += m->children[i].pid != 0;
    bool agent_up = m->n_children > m->n_workers && m->children[m->n_workers].pid != 0;

    prom_value(out, "pgrelay_up", "gauge", "1: the master answers.", 1);
    prom_value(out, "pgrelay_workers", "gauge", "Worker processes configured.", m->n_workers);
    prom_value(out, "pgrelay_workers_running", "gauge", "Worker processes running.", alive);
    prom_value(out, "pgrelay_agent_up", "gauge", "1 while pgrelay-agent runs (0 when off).",
               agent_up);
    prom_value(out, "pgrelay_shutting_down", "gauge", "1 while sessions drain for a shutdown.",
               m->stop != MASTER_RUNNING);
    prom_value(out, "pgrelay_maintenance", "gauge", "1 while paused (maintenance on).",
               atomic_load(&m->shm->maintenance) != 0);
    int64_t until = atomic_load(&m->shm->maintenance_until_us);
    prom_value(out, "pgrelay_maintenance_until_seconds", "gauge",
               "Unix time at which a pause ends by itself; 0 when none.",
               until > 0 ? (double)until / 1e6 : 0);
    prom_value(out, "pgrelay_epoch", "gauge", "Routing epoch in force.", (double)prom_routes.epoch);
    /* history_starts is set before the entry it marks is counted: read the count first */
    uint64_t events = atomic_load(&m->shm->history_count);
    uint64_t starts = events ? atomic_load(&m->shm->history_starts) : 0;
    prom_value(out, "pgrelay_leader_changes_total", "counter", "Changes of write leader recorded.",
               (double)(events - starts));
    prom_value(out, "pgrelay_reloads_total", "counter", "Configuration reloads applied.",
               (double)atomic_load(&m->shm->reloads));
    prom_value(out, "pgrelay_plan_changes_total", "counter",
               "Query plans whose shape differed from the previous plan of the statement.",
               (double)atomic_load(&shm_plans_of(m->shm)->plan_changes));
    prom_value(out, "pgrelay_clients", "gauge", "Live client sessions.",
               atomic_load(&m->shm->clients));
    prom_value(out, "pgrelay_max_client_conn", "gauge", "The max_client_conn in force.",
               m->cfg->max_client_conn);
    prom_sessions(m, out);
    prom_worker_totals(m, out);
    prom_nodes(m, out);
    prom_latency(m, out);
}
