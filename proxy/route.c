/* route.c - which node a new session goes to, and what live sessions do when routing changes.
 *
 * Nothing is routed by the master's static table while an agent is to run: sessions of both
 * ports wait for the agent's first table (its probes confirmed the roles).
 * Write port: the write leader of the routing table, or wait (no_leader_wait) or refuse (57P03).
 * Read-only port: the readable replica with the fewest read sessions across all workers, else
 * the leader (read_fallback = leader) or a refusal. When the table changes, write sessions on a
 * node that is no longer the leader are closed at their next safe point (close_idle, with
 * leader_change_grace for an open transaction) or at once (close_all, and after a failover:
 * a leader that is down, unreachable or deposed gets no grace, so that a statement in flight
 * there is never acknowledged when it wakes up); read sessions on a replica that is down or
 * too far behind likewise, and read sessions that fell back to the leader once a replica is
 * fit for reads again. Sessions still connecting are re-routed.
 */
#include "route.h"
#include "log.h"
#include "worker.h"

#include <stdio.h>
#include <string.h>

static int find_node(const shm_route_table *t, const char *name)
{
    for (uint32_t i = 0; i < t->n_nodes; i++)
        if (strcmp(t->nodes[i].name, name) == 0)
            return (int)i;
    return -1;
}

static int32_t read_load(worker *w, const char *name)
{
    shm_node_count *c = shm_node_count_get(w->shm, name);
    return c ? atomic_load_explicit(&c->read_sessions, memory_order_relaxed) : 0;
}

route_result route_pick(worker *w, session *s, int *node, const char **sqlstate, char *msg,
                        size_t msglen)
{
    const shm_route_table *t = &w->routes;
    int leader = t->leader >= 0 && (uint32_t)t->leader < t->n_nodes ? t->leader : -1;
    /* Until a probe confirmed them, the configured roles are only a guess (the "replica" may be
     * the primary now, the "primary" a replica): sessions of either port wait for the agent's
     * first table. */
    bool unconfirmed = route_leader_unconfirmed(w, t);
    if (unconfirmed) {
        if (s->leader_wait_until_us == 0 || worker_clock_us() < s->leader_wait_until_us)
            return ROUTE_WAIT;
        *sqlstate = PG_SQLSTATE_CANNOT_CONNECT_NOW;
        snprintf(msg, msglen, "no probe has confirmed the nodes' roles yet (is pgrelay-agent "
                 "running?)");
        return ROUTE_REFUSE;
    }

    if (s->read_port) {
        int best = -1;
        int32_t best_load = 0;
        for (uint32_t i = 0; i < t->n_nodes; i++) {
            if (!t->nodes[i].readable || (int)i == leader || t->nodes[i].addrlen == 0)
                continue;
            int32_t load = read_load(w, t->nodes[i].name);
            if (best < 0 || load < best_load) {
                best = (int)i;
                best_load = load;
            }
        }
        if (best >= 0) {
            *node = best;
            return ROUTE_OK;
        }
        if (w->cfg->read_fallback == READ_FALLBACK_LEADER && leader >= 0) {
            *node = leader;
            return ROUTE_OK;
        }
        *sqlstate = PG_SQLSTATE_CANNOT_CONNECT_NOW;
        snprintf(msg, msglen, "no replica is fit for read-only sessions (down or lagging)%s",
                 w->cfg->read_fallback == READ_FALLBACK_LEADER ? " and there is no write leader"
                                                               : "");
        return ROUTE_REFUSE;
    }
    if (leader >= 0) {
        *node = leader;
        return ROUTE_OK;
    }
    if (route_leader_wait_ms(w) > 0 &&
        (s->leader_wait_until_us == 0 || worker_clock_us() < s->leader_wait_until_us))
        return ROUTE_WAIT;
    *sqlstate = PG_SQLSTATE_CANNOT_CONNECT_NOW;
    snprintf(msg, msglen, "no write leader: no node is a reachable primary right now");
    return ROUTE_REFUSE;
}

bool route_leader_unconfirmed(const worker *w, const shm_route_table *t)
{
    return w->cfg->agent && !t->confirmed;
}

int route_leader_wait_ms(const worker *w)
{
    int ms = w->cfg->no_leader_wait_ms;
    if (route_leader_unconfirmed(w, &w->routes)) {
        /* The agent's first probe of the leader ends within health_timeout; a second to start
         * the agent. A longer no_leader_wait applies as it is. */
        int first = w->cfg->health_timeout_ms + 1000;
        if (ms < first)
            ms = first;
    }
    return ms;
}

/* The first replica fit for read sessions (not the leader), or -1. */
static int route_readable_replica(const shm_route_table *t, int leader)
{
    for (uint32_t i = 0; i < t->n_nodes; i++)
        if (t->nodes[i].readable && (int)i != leader && t->nodes[i].addrlen != 0)
            return (int)i;
    return -1;
}

/* Refusals logged per worker: the first of a window in full, the rest counted. */
#define ROUTE_REFUSAL_LOG_US (1000 * 1000)
static int64_t route_refusal_window_us;   /* start of the current window, 0 = none */
static unsigned route_refusals_suppressed; /* refusals counted, not logged, in it */
static char route_refusal_last[160];       /* why the last counted one was refused */

void route_log_refusals_flush(void)
{
    if (route_refusals_suppressed)
        log_warning("%u more client(s) refused in the last %.1f s (the last: %s)",
                    route_refusals_suppressed,
                    (double)(shm_mono_us() - route_refusal_window_us) / 1e6, route_refusal_last);
    route_refusals_suppressed = 0;
}

void route_log_refusal(const char *client, const char *why)
{
    int64_t now = shm_mono_us();
    if (route_refusal_window_us && now - route_refusal_window_us < ROUTE_REFUSAL_LOG_US) {
        route_refusals_suppressed++;
        snprintf(route_refusal_last, sizeof(route_refusal_last), "%s", why);
        return;
    }
    route_log_refusals_flush();
    route_refusal_window_us = now;
    log_warning("client %s: %s", client, why);
}

/* Should session s leave its node under table t? Fills why when so. */
static bool session_misplaced(worker *w, session *s, const shm_route_table *t, char *why,
                              size_t len)
{
    const char *on = s->slot->node_name;
    int leader = t->leader >= 0 && (uint32_t)t->leader < t->n_nodes ? t->leader : -1;
    if (!s->read_port) {
        if (leader >= 0 && strcmp(t->nodes[leader].name, on) == 0)
            return false;
        snprintf(why, len, "terminating connection: the write leader changed from %s to %s "
                 "(epoch %llu%s); reconnect", on, leader >= 0 ? t->nodes[leader].name : "none",
                 (unsigned long long)t->epoch,
                 t->change == LEADER_CHANGE_FAILOVER ? ", failover" : "");
        return true;
    }
    int i = find_node(t, on);
    if (i >= 0 && i == leader && !t->nodes[i].readable) {
        /* It fell back to the leader: back to a replica (at its safe point) once one is fit. */
        int r = route_readable_replica(t, leader);
        if (r < 0)
            return false;
        snprintf(why, len, "terminating connection: this read session is on the write leader "
                 "%s and replica %s is fit for reads again; reconnect", on, t->nodes[r].name);
        return true;
    }
    if (i >= 0 && (t->nodes[i].readable || i == leader))
        return false;
    (void)w;
    snprintf(why, len, "terminating connection: replica %s is %s; reconnect", on,
             i < 0 ? "no longer configured"
             : t->nodes[i].health == NODE_HEALTH_DOWN ? "down"
                                                      : "no longer fit for reads (lag or role)");
    return true;
}

void route_table_changed(worker *w, const shm_route_table *old)
{
    const shm_route_table *t = &w->routes;
    bool epoch_moved = t->epoch != old->epoch;
    bool failover = t->change == LEADER_CHANGE_FAILOVER;
    char why[256];
    session *next;

    if (epoch_moved)
        route_log_refusals_flush(); /* a leader change ends a run of refusals: count it now */
    if (epoch_moved)
        log_info("routing epoch %llu -> %llu: write leader %s",
                 (unsigned long long)old->epoch, (unsigned long long)t->epoch,
                 t->leader >= 0 ? t->nodes[t->leader].name : "(none)");
    for (session *s = w->sessions; s; s = next) {
        next = s->next;
        if (s->phase == PHASE_HELD) {
            /* A leader is confirmed, or it is certain there is none and no wait is allowed:
             * route again (the refusal is immediate then). */
            bool decided = !route_leader_unconfirmed(w, t) &&
                           (s->read_port || t->leader >= 0 || w->cfg->no_leader_wait_ms == 0);
            if (s->waiting_leader && decided && !w->maintenance)
                session_release_held(s);
            continue;
        }
        if (s->phase != PHASE_CONNECTING && s->phase != PHASE_RELAY)
            continue;
        if (!session_misplaced(w, s, t, why, sizeof(why)))
            continue;
        if (s->phase == PHASE_CONNECTING) {
            session_reroute(s); /* nothing reached the client yet */
            continue;
        }
        if (!s->read_port && failover) {
            log_info("client %s: closed at once: %s", s->client_addr, why);
            session_close(s, PG_SQLSTATE_ADMIN_SHUTDOWN, why);
            continue;
        }
        if (s->close_at_safe_point)
            continue; /* already on its way out */
        if (!s->read_port && w->cfg->on_leader_change == ON_LEADER_CHANGE_CLOSE_ALL) {
            session_close(s, PG_SQLSTATE_ADMIN_SHUTDOWN, why);
            continue;
        }
        session_close_when_safe_for(s, PG_SQLSTATE_ADMIN_SHUTDOWN, why,
                                    w->cfg->leader_change_grace_ms);
    }
}
