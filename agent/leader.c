/* leader.c - who is the write leader, and publishing the routing table to the workers.
 *
 * Rules (standalone mode):
 *   - a candidate is a node whose last probe succeeded and said "not in recovery";
 *   - the current leader stays while it is a candidate, even when another node also claims to be
 *     primary (split brain: logged loudly, once per occurrence);
 *   - a leader whose probes fail stays until it is down (`fall` failures) unless another
 *     candidate exists: a promoted replica takes over at its first good probe;
 *   - a leader that reports recovery is dropped at once: no session goes to a node in recovery;
 *   - among several new candidates, the configured primary wins, then the highest WAL position;
 *   - every change of leader (including to none) increments the epoch, which only grows;
 *   - with ha_source = patroni, while Patroni answers, a node it does not name leader is no
 *     candidate: the leader it stops naming (its key gone, or another member named) is left at
 *     once as in a failover, and writes wait until a probe sees the member it names as a
 *     primary. Patroni's word never makes a leader by itself (etcd's key moves before the
 *     promotion ends); when no member answers, the rules above alone decide.
 */
#include "agent.h"
#include "channel.h"
#include "control.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static bool is_candidate(const agent_node *n)
{
    return n->probed && n->last_ok && !n->in_recovery;
}

static const char *node_name(const agent *a, int i)
{
    return i >= 0 ? a->nodes[i].view.name : "(none)";
}

/* ha_source = patroni and Patroni answered: it names another member than node i, or none, or
 * node i's own Patroni is dead or hung (it renews the key no more). */
static bool ha_vetoes(const agent *a, int i)
{
    return a->ha_on && a->ha_view == HA_VIEW_ANSWERED &&
           (a->ha_leader != i || !a->ha_leader_alive);
}

/* A node writes may go to: a candidate that Patroni, when it answers, names leader. */
static bool is_write_candidate(const agent *a, int i)
{
    return is_candidate(&a->nodes[i]) && !ha_vetoes(a, i);
}

/* Why Patroni vetoes node i, for the log and the history. */
static void ha_veto_reason(const agent *a, int i, char *buf, size_t len)
{
    if (!a->ha_member[0])
        snprintf(buf, len, "Patroni names no leader (its leader key is gone), not %s",
                 node_name(a, i));
    else if (a->ha_leader == i && !a->ha_leader_alive)
        snprintf(buf, len, "the Patroni of leader %s does not answer (its key will expire)",
                 node_name(a, i));
    else
        snprintf(buf, len, "Patroni names %s leader, not %s", a->ha_member, node_name(a, i));
}

void leader_record_lsn(agent *a, int64_t at_us, uint64_t lsn)
{
    a->leader_lsn[a->next_leader_lsn] = (lsn_sample){at_us, lsn};
    a->next_leader_lsn = (a->next_leader_lsn + 1) % LEADER_SAMPLES;
    if (a->n_leader_lsn < LEADER_SAMPLES)
        a->n_leader_lsn++;
}

/* The leader's position as known at time `at` (the newest sample not after it), so that a
 * replica probed a moment before the leader is not taken for lagging; the oldest sample when
 * all are newer. 0 when there is none. */
static uint64_t leader_lsn_at(const agent *a, int64_t at)
{
    uint64_t best = 0, oldest = 0;
    int64_t best_at = 0, oldest_at = 0;
    for (int i = 0; i < a->n_leader_lsn; i++) {
        const lsn_sample *s = &a->leader_lsn[i];
        if (s->at_us <= at && s->at_us >= best_at) {
            best = s->lsn;
            best_at = s->at_us;
        }
        if (!oldest_at || s->at_us < oldest_at) {
            oldest = s->lsn;
            oldest_at = s->at_us;
        }
    }
    return best ? best : oldest;
}

/* For how long, as of time `at`, the leader has had WAL beyond `lsn`: no longer than since the
 * newest of its samples (not after `at`) that `lsn` had reached. -1 when no sample shows that
 * (behind for longer than the samples go back, or no samples). */
static int64_t leader_ahead_ms(const agent *a, uint64_t lsn, int64_t at)
{
    int64_t since = -1;
    for (int i = 0; i < a->n_leader_lsn; i++) {
        const lsn_sample *s = &a->leader_lsn[i];
        if (s->at_us <= at && s->lsn <= lsn && s->at_us > since)
            since = s->at_us;
    }
    return since < 0 ? -1 : (at - since) / 1000;
}

/* The leader becomes `to`: its WAL positions are the replicas' reference from now on (seeded
 * with its last probe, so replicas are not "lag unknown" until its next one). With no leader
 * the last one's positions stay: nobody writes meanwhile, so a replica that had them all is
 * as current as any node can be, and the read port keeps serving from it. */
static void leader_samples_for(agent *a, int to)
{
    if (to < 0)
        return;
    a->n_leader_lsn = 0;
    a->next_leader_lsn = 0;
    const agent_node *n = &a->nodes[to];
    if (n->probed && n->last_ok && !n->in_recovery)
        leader_record_lsn(a, n->view.last_probe_us, n->lsn);
}

/* How leaving `from` counts: planned while it still answers as a primary, a failover when it
 * is down, unreachable or in recovery (then its sessions are closed at once). */
static shm_leader_change change_kind(const agent *a, int from)
{
    if (from < 0)
        return a->change; /* a leader appears: how the last one left still holds */
    return is_write_candidate(a, from) ? LEADER_CHANGE_PLANNED : LEADER_CHANGE_FAILOVER;
}

/* What the log and the history say first about a change: what happened to the sessions on the
 * node the leader left ([failover]: closed at once; [planned]: leader_change_grace). */
static const char *change_tag(const agent *a, int from)
{
    if (from < 0)
        return "";
    return a->change == LEADER_CHANGE_FAILOVER ? "[failover] " : "[planned] ";
}

/* Change the leader, bump the epoch, record why. */
static void leader_switch(agent *a, int to, const char *reason)
{
    int from = a->leader;
    char full[192];
    a->change = change_kind(a, from);
    a->epoch++;
    a->leader = to;
    leader_samples_for(a, to);
    snprintf(full, sizeof(full), "%s%s", change_tag(a, from), reason);
    log_warning("write leader: %s -> %s (epoch %llu): %s", node_name(a, from), node_name(a, to),
                (unsigned long long)a->epoch, full);
    /* Before the first probes confirmed a leader, "from" is only the configured guess: the
     * history starts with the confirmed one (leader_publish). */
    if (a->shm && a->ready)
        shm_history_add(a->shm, a->epoch, from >= 0 ? a->nodes[from].view.name : "",
                        to >= 0 ? a->nodes[to].view.name : "", full);
}

/* The best new leader among the candidates, or -1. */
static int pick_candidate(const agent *a)
{
    int best = -1;
    for (int i = 0; i < a->n_nodes; i++) {
        const agent_node *n = &a->nodes[i];
        if (!is_write_candidate(a, i))
            continue;
        if (best < 0)
            best = i;
        else {
            bool hint_n = a->cfg->nodes[i].role == NODE_ROLE_PRIMARY;
            bool hint_b = a->cfg->nodes[best].role == NODE_ROLE_PRIMARY;
            if ((hint_n && !hint_b) || (hint_n == hint_b && n->lsn > a->nodes[best].lsn))
                best = i;
        }
    }
    return best;
}

static int node_index(const agent *a, const char *name)
{
    for (int i = 0; i < a->n_nodes; i++)
        if (strcmp(a->nodes[i].view.name, name) == 0)
            return i;
    return -1;
}

/* Coordinated mode: follow the control plane's leader and epoch. Returns false when its word
 * cannot be followed (no opinion, stale, unknown node, an epoch behind ours): decide alone. */
static bool leader_follow_control(agent *a)
{
    if (!a->control_on || !a->control_seen_us || !a->control_leader[0])
        return false;
    if (shm_mono_us() - a->control_seen_us > (int64_t)a->cfg->control_grace_period_ms * 1000)
        return false;
    int idx = node_index(a, a->control_leader);
    if (idx < 0)
        return false;
    if (a->control_epoch < a->epoch) {
        if (!a->control_lag_logged)
            log_warning("control plane's epoch %llu is behind ours (%llu): deciding alone",
                        (unsigned long long)a->control_epoch, (unsigned long long)a->epoch);
        a->control_lag_logged = true;
        return false;
    }
    a->control_lag_logged = false;
    if (a->control_epoch == a->epoch && a->leader >= 0 && idx != a->leader) {
        /* One epoch names one leader: an equal epoch naming another node is a conflict (the
         * store or another writer is wrong), never a reason to move. */
        if (!a->control_conflict_logged)
            log_error("control plane names %s under epoch %llu, which names %s here: refused "
                      "(an epoch names one leader); deciding alone until it moves on",
                      a->control_leader, (unsigned long long)a->epoch, node_name(a, a->leader));
        a->control_conflict_logged = true;
        return false;
    }
    a->control_conflict_logged = false;
    /* Never route to a node that this agent sees in recovery, whoever says so. */
    agent_node *n = &a->nodes[idx];
    bool vetoed = ha_vetoes(a, idx);
    int target = (n->probed && n->last_ok && n->in_recovery) || vetoed ? -1 : idx;
    if (target != a->leader || a->control_epoch != a->epoch) {
        char reason[224];
        int from = a->leader;
        if (from != target)
            a->change = change_kind(a, from);
        snprintf(reason, sizeof(reason), "%scontrol plane: leader %s, epoch %llu%s",
                 from != target ? change_tag(a, from) : "", a->control_leader,
                 (unsigned long long)a->control_epoch,
                 vetoed   ? " (Patroni names another leader: no leader until they agree)"
                 : target < 0 ? " (it is in recovery here: no leader until it is promoted)"
                              : "");
        a->leader = target;
        a->epoch = a->control_epoch;
        leader_samples_for(a, target);
        log_warning("write leader: %s -> %s (epoch %llu): %s", node_name(a, from),
                    node_name(a, target), (unsigned long long)a->epoch, reason);
        if (a->shm)
            shm_history_add(a->shm, a->epoch, from >= 0 ? a->nodes[from].view.name : "",
                            target >= 0 ? a->nodes[target].view.name : "", reason);
        leader_publish(a, true);
        return true;
    }
    leader_publish(a, false);
    return true;
}

/* The control plane was lost (control_lost = keep_leader or stop_writes): no leader of our
 * own choosing. keep_leader keeps the last leader while it answers as a primary and holds
 * writes (no leader in the table, same epoch) while it is in recovery or down; stop_writes
 * holds them at once. Nothing here changes the epoch: the control plane's word goes on when it
 * is back. */
static void leader_hold_for_control(agent *a)
{
    const char *why = NULL;
    if (a->cfg->control_lost == CONTROL_LOST_STOP_WRITES) {
        why = "control_lost = stop_writes";
    } else if (a->leader >= 0) {
        const agent_node *l = &a->nodes[a->leader];
        if (l->probed && l->last_ok && l->in_recovery)
            why = "control_lost = keep_leader and the leader reports recovery";
        else if (l->probed && !l->last_ok && l->fails >= a->cfg->fall)
            why = "control_lost = keep_leader and the leader is down";
    }
    bool stop = why != NULL;
    if (stop != a->writes_stopped) {
        a->writes_stopped = stop;
        if (stop)
            log_warning("control plane lost: no write leader until it is back (%s; epoch %llu "
                        "kept, leader %s)", why, (unsigned long long)a->epoch,
                        node_name(a, a->leader));
        else
            log_warning("control plane lost: leader %s answers as a primary again; writes go "
                        "to it (control_lost = keep_leader)", node_name(a, a->leader));
        leader_publish(a, true);
        return;
    }
    leader_publish(a, false);
}

void leader_decide(agent *a)
{
    int cur = a->leader;
    int candidates = 0;
    char reason[128];

    if (leader_follow_control(a)) {
        a->writes_stopped = false;
        return;
    }
    if (a->control_lost && a->cfg->control_lost != CONTROL_LOST_DECIDE_ALONE) {
        leader_hold_for_control(a);
        return;
    }
    if (a->writes_stopped) {
        a->writes_stopped = false; /* control_lost changed by a reload: decide alone */
        leader_publish(a, true);
    }

    for (int i = 0; i < a->n_nodes; i++) {
        agent_node *n = &a->nodes[i];
        candidates += is_write_candidate(a, i);
        /* A primary Patroni does not name (the old leader whose Patroni died): said once. */
        bool vetoed_primary = is_candidate(n) && ha_vetoes(a, i);
        if (vetoed_primary && !n->ha_primary_logged) {
            char why[128];
            ha_veto_reason(a, i, why, sizeof(why));
            log_error("node %s reports it is a primary, but %s: no writes go to it", n->view.name,
                      why);
        }
        n->ha_primary_logged = vetoed_primary;
    }

    /* An operator's forced choice holds while that node answers. */
    if (a->forced >= 0) {
        agent_node *f = &a->nodes[a->forced];
        if (f->probed && !f->last_ok && f->fails >= a->cfg->fall) {
            log_warning("node %s, forced as leader, is down: back to automatic choice",
                        f->view.name);
            a->forced = -1;
        } else if (is_write_candidate(a, a->forced)) {
            a->forced = -1; /* it is a primary now: the normal rules agree */
        } else {
            leader_publish(a, false);
            return;
        }
    }

    if (cur >= 0) {
        agent_node *l = &a->nodes[cur];
        bool vetoed = ha_vetoes(a, cur);
        if (!vetoed && (!l->probed || is_candidate(l))) {
            /* Keep it; warn once about other primaries. */
            a->split_brain = l->probed && candidates > 1;
            if (l->probed && candidates > 1) {
                if (!a->conflict_logged) {
                    for (int i = 0; i < a->n_nodes; i++)
                        if (i != cur && is_write_candidate(a, i))
                            log_error("SPLIT BRAIN: node %s also reports it is a primary; "
                                      "writes stay on the current leader %s (epoch %llu). "
                                      "Fence one of them, or use `set leader NODE`.",
                                      a->nodes[i].view.name, l->view.name,
                                      (unsigned long long)a->epoch);
                    a->conflict_logged = true;
                }
            } else {
                a->conflict_logged = false;
            }
            leader_publish(a, false);
            return;
        }
        if (vetoed) {
            ha_veto_reason(a, cur, reason, sizeof(reason));
        } else if (l->last_ok && l->in_recovery) {
            snprintf(reason, sizeof(reason), "leader %s reports it is in recovery", l->view.name);
        } else if ((candidates == 0 || a->split_brain) && l->fails < a->cfg->fall) {
            /* A blip: keep routing to it until it is really down. Another primary that was
             * one already while the leader answered (a split brain, the old leader during
             * leader_change_grace) is no promoted replica: it waits for that too, or the writes
             * would go to two timelines. */
            leader_publish(a, false);
            return;
        } else if (candidates == 0 && l->fails_are_timeouts) {
            /* Slow, not gone (a loaded server answers late; a dead one refuses or resets), and
             * nobody else is primary: dropping it would only close every session. */
            if (!l->slow_logged)
                log_warning("leader %s has not answered %d probes within health_timeout; no "
                            "other node is primary, so it stays the leader", l->view.name,
                            l->fails);
            l->slow_logged = true;
            leader_publish(a, false);
            return;
        } else if (candidates > 0) {
            snprintf(reason, sizeof(reason), "leader %s does not answer (%s)", l->view.name,
                     l->view.last_error);
        } else {
            snprintf(reason, sizeof(reason), "leader %s is down after %d failed probes",
                     l->view.name, l->fails);
        }
        int next = pick_candidate(a);
        if (next >= 0) {
            size_t len = strlen(reason);
            snprintf(reason + len, sizeof(reason) - len, "; %s is primary",
                     a->nodes[next].view.name);
        }
        a->conflict_logged = false;
        leader_switch(a, next, reason);
        leader_publish(a, true);
        return;
    }

    /* No leader: take the first candidate. */
    int next = pick_candidate(a);
    if (next >= 0) {
        snprintf(reason, sizeof(reason), "node %s reports it is primary%s",
                 a->nodes[next].view.name,
                 a->ha_on && a->ha_view == HA_VIEW_ANSWERED ? " and Patroni names it leader" : "");
        leader_switch(a, next, reason);
        leader_publish(a, true);
        return;
    }
    leader_publish(a, false);
}

int leader_set(agent *a, int index, bool force, char *why, size_t len)
{
    if (index < 0 || index >= a->n_nodes) {
        snprintf(why, len, "no such node");
        return -1;
    }
    agent_node *n = &a->nodes[index];
    if (!force && is_candidate(n) && ha_vetoes(a, index)) {
        ha_veto_reason(a, index, why, len);
        size_t used = strlen(why);
        snprintf(why + used, len - used, "; use force to switch anyway");
        return -1;
    }
    if (!force && !is_candidate(n)) {
        snprintf(why, len, "node %s is %s; use force to switch anyway", n->view.name,
                 !n->probed ? "not probed yet"
                 : !n->last_ok ? "not answering"
                               : "in recovery");
        return -1;
    }
    if (index == a->leader) {
        snprintf(why, len, "node %s is already the leader", n->view.name);
        return 0;
    }
    char reason[128];
    snprintf(reason, sizeof(reason), "set leader %s%s by an administrator", n->view.name,
             force ? " force" : "");
    a->forced = force && !is_write_candidate(a, index) ? index : -1;
    a->conflict_logged = false;
    leader_switch(a, index, reason);
    leader_publish(a, true);
    snprintf(why, len, "%s", reason);
    return 0;
}

/* The rule a replica fails for reads, or NULL: see node_not_readable(). A reason formatted
 * into buf names its rule in *buf_kind. */
static const char *node_not_readable_why(const agent *a, const agent_node *n, const agent_node *l,
                                         char *buf, size_t len, const char **buf_kind)
{
    if (!n->probed || !n->last_ok || n->view.health != NODE_HEALTH_UP)
        return "not answering";
    if (!n->in_recovery)
        return "not a replica";
    if (n->view.lag_bytes < 0 || n->view.lag_ms < 0)
        return "its lag is unknown (nothing replayed that dates it, no leader position)";
    if (n->view.lag_bytes > a->cfg->max_replica_lag_bytes) {
        *buf_kind = "bytes";
        snprintf(buf, len, "%lld bytes behind (max_replica_lag_bytes %d)",
                 (long long)n->view.lag_bytes, a->cfg->max_replica_lag_bytes);
        return buf;
    }
    if (n->view.lag_ms > a->cfg->max_replica_lag_ms) {
        *buf_kind = "time";
        snprintf(buf, len, "%lld ms behind (max_replica_lag_seconds %d ms)",
                 (long long)n->view.lag_ms, a->cfg->max_replica_lag_ms);
        return buf;
    }
    if (!l)
        return NULL;
    if (!n->streaming)
        return "no WAL receiver is streaming from the leader";
    if (n->timeline && l->timeline && n->timeline != l->timeline) {
        *buf_kind = "timeline";
        snprintf(buf, len, "it receives timeline %u, the leader %s is on timeline %u",
                 n->timeline, l->view.name, l->timeline);
        return buf;
    }
    int64_t still_ms = (n->view.last_probe_us - n->receive_moved_us) / 1000;
    if (leader_lsn_at(a, n->view.last_probe_us) > n->receive_lsn &&
        still_ms > a->cfg->max_replica_lag_ms) {
        *buf_kind = "receive";
        snprintf(buf, len, "its received WAL position has not moved for %lld ms while the "
                 "leader has more", (long long)still_ms);
        return buf;
    }
    return NULL;
}

/* Why a node is not fit for read sessions, or NULL when it is. `leader_up`: the leader
 * answered its last probe as a primary, so a replica reading from it must stream from it.
 * *kind is the rule that failed (a fixed string, for logging each change of reason once). */
static const char *node_not_readable(const agent *a, const agent_node *n, bool leader_up,
                                     char *buf, size_t len, const char **kind)
{
    const agent_node *l = leader_up ? &a->nodes[a->leader] : NULL;
    const char *buf_kind = NULL;
    const char *why = node_not_readable_why(a, n, l, buf, len, &buf_kind);
    *kind = why == buf ? buf_kind : why;
    return why;
}

/* Fill the per-node view fields that depend on the whole picture (roles, lag). Lag is honest:
 * a replica behind the leader whose replay cannot be dated (no transaction replayed since it
 * started) is as far behind as the leader's samples show, or of unknown lag (-1), never 0. */
static void leader_refresh_views(agent *a)
{
    const agent_node *l = a->leader >= 0 ? &a->nodes[a->leader] : NULL;
    bool leader_up = l && l->probed && l->last_ok && !l->in_recovery;
    for (int i = 0; i < a->n_nodes; i++) {
        agent_node *n = &a->nodes[i];
        shm_node *v = &n->view;
        uint64_t leader_lsn = leader_lsn_at(a, v->last_probe_us);
        v->ha = !a->ha_on || a->ha_view != HA_VIEW_ANSWERED ? NODE_HA_NONE
                : ha_vetoes(a, i)                            ? NODE_HA_NOT_LEADER
                                                             : NODE_HA_LEADER;
        v->probed = n->probed;
        v->in_recovery = n->in_recovery;
        v->wal_lsn = n->lsn;
        if (n->probed)
            v->role = n->in_recovery ? NODE_ROLE_REPLICA : NODE_ROLE_PRIMARY;
        if (n->probed && n->in_recovery && leader_lsn) {
            v->lag_bytes = leader_lsn > n->lsn ? (int64_t)(leader_lsn - n->lsn) : 0;
            /* Behind since when, by the leader's samples (-1: longer than they go back). */
            int64_t behind = v->lag_bytes > 0 ? leader_ahead_ms(a, n->lsn, v->last_probe_us) : 0;
            if (v->lag_bytes == 0)
                v->lag_ms = 0;
            else if (n->replay_age_ms >= 0)
                /* Replay age means lag only since the replica fell behind: after an idle spell
                 * its last replayed commit is old, yet it is a moment behind, not that long. */
                v->lag_ms = behind >= 0 && behind < n->replay_age_ms ? behind : n->replay_age_ms;
            else
                v->lag_ms = behind;
        } else {
            v->lag_bytes = n->probed && !n->in_recovery ? 0 : -1;
            v->lag_ms = n->probed && n->in_recovery ? -1 : 0;
        }
        char buf[160];
        const char *kind = NULL;
        const char *why = node_not_readable(a, n, leader_up, buf, sizeof(buf), &kind);
        bool readable = why == NULL;
        if (!readable && n->probed && n->last_ok && n->in_recovery && kind != n->not_fit_kind) {
            log_info("replica %s is not fit for reads: %s", v->name, why);
            n->not_fit_kind = kind;
        } else if (readable && n->not_fit_kind) {
            log_info("replica %s is fit for reads again", v->name);
            n->not_fit_kind = NULL;
        }
        v->readable = readable;
    }
}

/* Did anything the workers route by change since the last table? */
static int published_leader(const agent *a)
{
    return a->writes_stopped ? -1 : a->leader;
}

static bool routing_changed(const agent *a, const shm_route_table *t)
{
    if (t->epoch != a->epoch || t->leader != published_leader(a) ||
        t->n_nodes != (uint32_t)a->n_nodes ||
        !t->confirmed || t->change != (int32_t)a->change)
        return true;
    for (int i = 0; i < a->n_nodes; i++) {
        const shm_node *o = &t->nodes[i], *v = &a->nodes[i].view;
        if (o->health != v->health || o->readable != v->readable || o->role != v->role ||
            o->ha != v->ha)
            return true;
    }
    return false;
}

/* May the first table be published? Once every node was probed; or sooner, once the leader
 * answered as a primary and every node configured role = primary was probed (so the choice
 * cannot change when they answer), so that a node slow to answer its first probe does not hold
 * up every write session meanwhile. */
static bool leader_confirmed(const agent *a)
{
    bool all = true;
    if (a->ha_on && a->ha_view == HA_VIEW_UNKNOWN)
        return false; /* Patroni's first round (at most one health_timeout per URL) first */
    for (int i = 0; i < a->n_nodes; i++) {
        if (a->nodes[i].probed)
            continue;
        all = false;
        if (a->cfg->nodes[i].role == NODE_ROLE_PRIMARY)
            return false;
    }
    return all || (a->leader >= 0 && is_write_candidate(a, a->leader));
}

void leader_ha_changed(agent *a)
{
    probe_all(a); /* see the named member's state now, not an interval later */
    leader_decide(a);
}

void leader_publish(agent *a, bool force_poke)
{
    leader_refresh_views(a);
    if (!a->shm)
        return; /* run by hand: decisions are only logged */
    /* Durable before anyone sees it: a restart never hands out this epoch again. */
    const char *leader = a->leader >= 0 ? a->nodes[a->leader].view.name : "";
    if (a->epoch != a->saved_epoch || strcmp(leader, a->saved_leader) != 0) {
        /* A failure is logged by the save; it is tried again at the next change, not at
         * every probe. */
        agent_state_save(a->cfg, a->epoch, leader);
        a->saved_epoch = a->epoch;
        snprintf(a->saved_leader, sizeof(a->saved_leader), "%s", leader);
    }
    if (!a->ready) {
        if (!leader_confirmed(a))
            return;
        a->ready = true;
        /* The confirmed leader gets its line in show leader history when the history does
         * not end with it already: at pgrelay's start, or after a restarted agent found
         * another leader than the one recorded (its switches before now are not recorded). */
        uint64_t n_events = a->shm ? atomic_load(&a->shm->history_count) : 0;
        const char *last = n_events ? a->shm->history[(n_events - 1) % SHM_HISTORY_MAX].to : "";
        if (a->shm && a->leader >= 0 && strcmp(last, a->nodes[a->leader].view.name) != 0) {
            if (n_events == 0)
                atomic_store(&a->shm->history_starts, 1);
            shm_history_add(a->shm, a->epoch, last, a->nodes[a->leader].view.name,
                            n_events ? "confirmed by the first probes after an agent restart"
                                     : "confirmed by the first probes at start");
        }
        if (a->leader >= 0 && is_candidate(&a->nodes[a->leader]))
            log_info("write leader %s confirmed by a probe: publishing the routing table",
                     node_name(a, a->leader));
        else
            log_info("every node probed once: publishing the routing table (write leader %s)",
                     node_name(a, a->leader));
    }
    shm_route_table *t = a->published;
    bool poke = force_poke || routing_changed(a, t);
    t->epoch = a->epoch;
    t->leader = published_leader(a);
    t->n_nodes = (uint32_t)a->n_nodes;
    t->agent_pid = (int32_t)getpid();
    t->change = (int32_t)a->change;
    t->confirmed = true;
    for (int i = 0; i < a->n_nodes; i++)
        memcpy(&t->nodes[i], &a->nodes[i].view, sizeof(shm_node));
    shm_routes_publish(a->shm, t);
    if (poke && a->channel_fd >= 0)
        channel_send(a->channel_fd, CHANNEL_LOOK_AGAIN, 0);
    if (poke && a->control_on)
        control_report_now();
}
