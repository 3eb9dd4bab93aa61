/* leader.c - coordinated leadership: one write leader per deployment, decided from the node
 * observations of its declared proxies.
 *
 * Rules (docs/protocol.md, "Coordinated leadership"). Only declared proxies count (members.c);
 * the quorum is a majority of the declared proxies, live or not, so that neither invented node
 * ids nor the first proxy to report after a failover decide anything alone:
 *  - the current leader stays unless a quorum of declared proxies, reporting under the current
 *    epoch, see it down or in recovery (a report made under an older epoch does not count
 *    against it, so a switchover is not undone by observations made before the agents
 *    switched);
 *  - then the node that a quorum sees as a primary takes over with a new epoch (no node when
 *    two have one: a split brain keeps the leader);
 *  - with no leader yet, the leader the reporting agents agree on is taken when a quorum sees
 *    it as a primary, else the quorum's primary;
 *  - one epoch names one leader: a new leader always gets an epoch above every epoch the
 *    deployment or any of its declared proxies has used, and the store refuses anything else.
 */
#include "leader.h"
#include "agents.h"
#include "control.h"
#include "log.h"
#include "operator.h"
#include "store.h"
#include "store_worker.h"
#include "views.h"

#include <event2/http.h>

#include <event2/event.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LEADER_MAX_NODES 64  /* distinct node names considered per decision */
#define LEADER_BURST_MS  100 /* decisions are counted per window of this many ms... */
#define LEADER_BURST_MAX 32  /* ...and at most this many per window are taken inline */
#define US_PER_MS        1000

/* What the live proxies say about one database node. */
typedef struct leader_tally {
    const char *name;
    int reported;       /* proxies that report the node at all */
    int primary;        /* proxies that see it up and not in recovery */
    int reported_since; /* as reported, counting only proxies that already run the current
                           epoch (their observations are newer than the decision) */
    int primary_since;  /* as primary, idem */
} leader_tally;

/* Up and not in recovery (a report without in_recovery falls back to its role), and not a
 * primary that the proxy's Patroni says is not the leader (ha_source = patroni: the PostgreSQL
 * of a member whose Patroni died goes on as a primary after another member was promoted). */
static bool leader_sees_primary(json_t *obs)
{
    const char *health = json_string_value(json_object_get(obs, "health"));
    const char *patroni = json_string_value(json_object_get(obs, "patroni"));
    json_t *rec = json_object_get(obs, "in_recovery");
    if (!health || strcmp(health, "up") != 0)
        return false;
    if (patroni && strcmp(patroni, "not_leader") == 0)
        return false;
    if (json_is_boolean(rec))
        return json_is_false(rec);
    const char *role = json_string_value(json_object_get(obs, "role"));
    return role && strcmp(role, "primary") == 0;
}

static leader_tally *leader_tally_get(leader_tally *t, int *n, const char *name)
{
    for (int i = 0; i < *n; i++)
        if (strcmp(t[i].name, name) == 0)
            return &t[i];
    if (*n >= LEADER_MAX_NODES)
        return NULL;
    t[*n] = (leader_tally){.name = name};
    return &t[(*n)++];
}

/* Observations of a proxy recent enough to count (as old as the proxy timeout at most). */
static bool leader_fresh_nodes(const state_proxy *p, int64_t now)
{
    return p->nodes && now - p->nodes_ms <= control.cfg->proxy_timeout_ms;
}

bool leader_observe(state_proxy *p, json_t *nodes, int64_t now)
{
    size_t n = json_array_size(nodes), kept = 0, j;
    json_t *obs;
    state_node_view *views = n ? malloc(n * sizeof(*views)) : NULL;
    if (n && !views) {
        /* no summary: the decision hears nothing from this proxy until the next report */
        free(p->views);
        p->views = NULL;
        p->n_views = 0;
        return true;
    }
    json_array_foreach(nodes, j, obs)
    {
        const char *name = json_string_value(json_object_get(obs, "name"));
        if (!name)
            continue;
        snprintf(views[kept].name, sizeof(views[kept].name), "%s", name);
        views[kept].primary = leader_sees_primary(obs);
        kept++;
    }
    /* The summary was stale or gone (it no longer counted), or says something else now. */
    bool changed = !leader_fresh_nodes(p, now) || (int)kept != p->n_views;
    for (size_t i = 0; i < kept && !changed; i++)
        changed =
            strcmp(views[i].name, p->views[i].name) != 0 || views[i].primary != p->views[i].primary;
    free(p->views);
    p->views = views;
    p->n_views = (int)kept;
    return changed;
}

/* Answer every parked poll of the deployment now: the answer carries the new leader and
 * epoch, so the agents follow within milliseconds rather than at their next metrics call. */
static void leader_announce(state_deployment *dep, const char *why)
{
    views_leader_changed(dep, why);
    for (state_proxy *p = dep->proxies; p; p = p->next)
        agents_wake(p);
}

/* A metrics call answered once the leader decision on its way to the store is in it. */
struct leader_waiter {
    struct leader_waiter *next;
    struct evhttp_request *req;
    char node_id[STATE_NODE_ID_MAX];
};

/* Answer the metrics calls parked while a decision was saved (with what the state says now,
 * or 503 when it is being dropped). */
static void leader_release(state_deployment *dep, bool dropped)
{
    struct leader_waiter *w = dep->leader_waiters;
    dep->leader_waiters = NULL;
    while (w) {
        struct leader_waiter *next = w->next;
        if (dropped)
            http_reply_error(w->req, 503, "not serving: the state was dropped");
        else
            agents_metrics_reply(w->req, dep, state_find_proxy(dep, w->node_id));
        free(w);
        w = next;
    }
}

bool leader_wait(state_deployment *dep, struct evhttp_request *req, const char *node_id)
{
    if (!dep->leader_saving)
        return false;
    struct leader_waiter *w = calloc(1, sizeof(*w));
    if (!w)
        return false; /* answered now, with the decision before this one */
    w->req = req;
    snprintf(w->node_id, sizeof(w->node_id), "%s", node_id);
    w->next = dep->leader_waiters;
    dep->leader_waiters = w;
    return true;
}

void leader_forget(state_deployment *dep)
{
    leader_release(dep, true);
}

/* A decision on its way to the store (the store worker's). */
typedef struct leader_save_job {
    store_job job;
    char deployment[CCONFIG_NAME_MAX];
    char leader[STATE_NODE_NAME_MAX];
    int64_t epoch;
    char why[128];
    int rc; /* store_leadership_save's: > 0 refused */
    int64_t stored_epoch;
    char stored_leader[STATE_NODE_NAME_MAX];
} leader_save_job;

static int leader_save_run(store_job *job)
{
    leader_save_job *j = (leader_save_job *)job;
    j->rc = store_leadership_save(j->deployment, j->leader, j->epoch, &j->stored_epoch,
                                  j->stored_leader);
    return j->rc < 0 ? -1 : 0;
}

/* The decision is in the store (take and announce it), or refused (take the store's when it
 * is newer), or not written (decided again at the next report). Either way the metrics calls
 * parked meanwhile are answered and the next report decides again. */
static void leader_save_done(store_job *job)
{
    leader_save_job *j = (leader_save_job *)job;
    state_deployment *dep = control.active ? state_find_deployment(j->deployment) : NULL;
    if (!dep) {
        free(j);
        return;
    }
    dep->leader_saving = false;
    dep->decide_at_ms = 0;
    if (job->rc != 0) {
        log_error("deployment %s: cannot store the leader decision (%s): %s", dep->name, j->leader,
                  job->error);
    } else if (j->rc > 0) {
        log_error("deployment %s: the store refused leader %s at epoch %" PRId64
                  ": it holds leader %s at epoch %" PRId64 " (one epoch names one leader)",
                  dep->name, j->leader, j->epoch, j->stored_leader[0] ? j->stored_leader : "(none)",
                  j->stored_epoch);
        if (j->stored_epoch >= dep->epoch &&
            (j->stored_epoch != dep->epoch || strcmp(j->stored_leader, dep->leader) != 0)) {
            snprintf(dep->leader, sizeof(dep->leader), "%s", j->stored_leader);
            dep->epoch = j->stored_epoch;
            leader_announce(dep, "taken from the store: another replica's decision");
        }
    } else if (j->epoch < dep->epoch) {
        log_warning("deployment %s: leader %s at epoch %" PRId64 " was stored after epoch %" PRId64
                    " was taken here; the store's newest decision stands",
                    dep->name, j->leader, j->epoch, dep->epoch);
    } else {
        if (strcmp(dep->leader, j->leader) != 0)
            log_info("deployment %s: write leader %s -> %s, epoch %" PRId64 " (%s)", dep->name,
                     dep->leader[0] ? dep->leader : "(none)", j->leader, j->epoch, j->why);
        else
            log_info("deployment %s: write leader %s, epoch %" PRId64 " -> %" PRId64 " (%s)",
                     dep->name, j->leader, dep->epoch, j->epoch, j->why);
        snprintf(dep->leader, sizeof(dep->leader), "%s", j->leader);
        dep->epoch = j->epoch;
        leader_announce(dep, j->why);
    }
    free(j);
    leader_release(dep, false);
}

/* Persist, then announce, leader at epoch. The epoch is raised where it would go down or, for
 * another leader, repeat the current one. The store worker writes it; until it is back nothing
 * is decided again and the metrics calls wait (leader_wait), so that no answer names a leader
 * the store does not hold. A store that holds a newer decision (another replica's) refuses
 * it: that decision is taken instead. 0, or -1 (out of memory: decided again later). */
static int leader_commit(state_deployment *dep, const char *leader, int64_t epoch, const char *why)
{
    bool same = strcmp(dep->leader, leader) == 0;
    if (same && dep->epoch == epoch)
        return 0;
    if (same ? epoch < dep->epoch : epoch <= dep->epoch)
        epoch = same ? dep->epoch : dep->epoch + 1; /* never down, never reused */
    leader_save_job *j = calloc(1, sizeof(*j));
    if (!j) {
        log_error("deployment %s: cannot store the leader decision (%s): out of memory", dep->name,
                  leader);
        return -1;
    }
    snprintf(j->deployment, sizeof(j->deployment), "%s", dep->name);
    snprintf(j->leader, sizeof(j->leader), "%s", leader);
    j->epoch = epoch;
    snprintf(j->why, sizeof(j->why), "%s", why);
    j->job.run = leader_save_run;
    j->job.done = leader_save_done;
    dep->leader_saving = true;
    store_worker_submit(&j->job);
    return 0;
}

/* The epoch under which leader can be announced without an epoch naming two leaders: the
 * highest epoch the deployment or a live proxy has used, when nobody names another leader
 * under it, else one above it. An agent that decided alone (control_lost = decide_alone, or
 * before the control plane answered) raises its own epoch, so two agents, or an agent and the
 * deployment, can hold the same number for different leaders; an agent refuses a leader that
 * its own epoch names otherwise, so only a higher epoch brings them back together. */
static int64_t leader_epoch_for(const state_deployment *dep, state_proxy **live, int n,
                                const char *leader)
{
    int64_t top = dep->epoch;
    bool taken = dep->leader[0] && strcmp(dep->leader, leader) != 0;
    for (int i = 0; i < n; i++) {
        const state_proxy *p = live[i];
        bool other = p->leader[0] && strcmp(p->leader, leader) != 0;
        if (p->epoch > top) {
            top = p->epoch;
            taken = other;
        } else if (p->epoch == top) {
            taken = taken || other;
        }
    }
    return taken ? top + 1 : top;
}

/* Decide, given the live declared proxies (see leader_decide). */
static int leader_decide_among(state_deployment *dep, state_proxy **live, int n)
{
    leader_tally tally[LEADER_MAX_NODES];
    int n_tally = 0, reporters = 0;
    int64_t now = control_now_ms();
    int64_t max_epoch = 0;     /* highest epoch a live declared proxy reports */
    const char *agreed = NULL; /* the leader every reporting proxy names, if any */
    bool agree = true;
    int quorum = dep->n_declared / 2 + 1; /* a majority of the declared proxies */

    for (int i = 0; i < n; i++) {
        state_proxy *p = live[i];
        if (p->epoch > max_epoch)
            max_epoch = p->epoch;
        if (p->leader[0]) {
            if (agreed && strcmp(agreed, p->leader) != 0)
                agree = false;
            agreed = p->leader;
        }
        if (!leader_fresh_nodes(p, now))
            continue;
        reporters++;
        for (int j = 0; j < p->n_views; j++) {
            leader_tally *t = leader_tally_get(tally, &n_tally, p->views[j].name);
            if (!t)
                continue;
            bool primary = p->views[j].primary;
            t->reported++;
            t->primary += primary;
            if (p->epoch >= dep->epoch) {
                t->reported_since++;
                t->primary_since += primary;
            }
        }
    }
    if (reporters < quorum)
        return 0; /* too few declared proxies observe anything: no new opinion */

    /* The primary a quorum sees; none when two nodes have one (a split brain decides nothing). */
    const leader_tally *candidate = NULL;
    int with_quorum = 0;
    for (int i = 0; i < n_tally; i++) {
        if (tally[i].primary >= quorum) {
            candidate = &tally[i];
            with_quorum++;
        }
    }
    if (with_quorum > 1)
        candidate = NULL;

    if (dep->leader[0]) {
        leader_tally *cur = NULL;
        for (int i = 0; i < n_tally; i++)
            if (strcmp(tally[i].name, dep->leader) == 0)
                cur = &tally[i];
        bool stays = cur && cur->reported_since - cur->primary_since < quorum;
        if (stays || !candidate || strcmp(candidate->name, dep->leader) == 0) {
            /* Keep the leader; catch up with an epoch some agent raised on its own, or move
             * past one an agent holds for another leader. */
            int64_t e = leader_epoch_for(dep, live, n, dep->leader);
            if (e > dep->epoch)
                return leader_commit(dep, dep->leader, e,
                                     e > max_epoch ? "an agent names another leader under "
                                                     "the highest epoch in use"
                                                   : "an agent reported a higher epoch");
            return 0;
        }
        int64_t base = dep->epoch > max_epoch ? dep->epoch : max_epoch;
        return leader_commit(dep, candidate->name, base + 1,
                             "a majority of the proxies see the old leader down or in recovery");
    }

    /* No leader yet: seed it. */
    if (agreed && agree) {
        for (int i = 0; i < n_tally; i++) {
            if (strcmp(tally[i].name, agreed) == 0 && tally[i].primary >= quorum) {
                /* the agents' own epoch when it names this leader, else a new one */
                int64_t e = leader_epoch_for(dep, live, n, agreed);
                return leader_commit(dep, agreed, e > dep->epoch ? e : dep->epoch + 1,
                                     "the leader the agents agree on");
            }
        }
    }
    if (candidate) {
        int64_t base = dep->epoch > max_epoch ? dep->epoch : max_epoch;
        return leader_commit(dep, candidate->name, base + 1,
                             "the primary a majority of the proxies see");
    }
    return 0;
}

/* The earliest wall-clock time at which one of the live proxies stops being live, or its
 * observation stops counting, with nothing else happening: until then, the same inputs give
 * the same decision. A proxy held live by a parked poll stays so until the poll ends, which
 * asks for a decision itself (agents.c). */
static int64_t leader_next_change(state_proxy **live, int n, int64_t now)
{
    int64_t timeout = control.cfg->proxy_timeout_ms, at = INT64_MAX;
    for (int i = 0; i < n; i++) {
        const state_proxy *p = live[i];
        if (!p->poll_req && p->last_seen_ms + timeout + 1 < at)
            at = p->last_seen_ms + timeout + 1;
        if (leader_fresh_nodes(p, now) && p->nodes_ms + timeout + 1 < at)
            at = p->nodes_ms + timeout + 1;
    }
    return at;
}

static void leader_deferred(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    leader_decide(arg);
}

/* More than LEADER_BURST_MAX decisions in this window (every proxy's report changed at once,
 * after a failover or under overload): one decision at the window's end stands for the rest,
 * instead of one over every proxy per report. true when put off. */
static bool leader_put_off(state_deployment *dep)
{
    int64_t mono = control_mono_ms();
    if (mono - dep->burst_start_ms >= LEADER_BURST_MS) {
        dep->burst_start_ms = mono;
        dep->burst_count = 0;
    }
    if (dep->burst_count < LEADER_BURST_MAX) {
        dep->burst_count++;
        return false;
    }
    if (!dep->decide_timer)
        dep->decide_timer = evtimer_new(control.base, leader_deferred, dep);
    if (!dep->decide_timer) {
        dep->burst_count++;
        return false; /* no timer: decide now rather than not at all */
    }
    if (!evtimer_pending(dep->decide_timer, NULL)) {
        int64_t left = dep->burst_start_ms + LEADER_BURST_MS - mono;
        struct timeval tv = {.tv_sec = 0,
                             .tv_usec = (suseconds_t)((left > 0 ? left : 0) * US_PER_MS)};
        if (evtimer_add(dep->decide_timer, &tv) != 0) {
            dep->burst_count++;
            return false;
        }
    }
    return true;
}

int leader_decide(state_deployment *dep)
{
    int64_t now = control_now_ms();
    if (now < dep->decide_at_ms)
        return 0; /* nothing it reads has changed since the last decision */
    if (operator_leadership_frozen(dep) || dep->leader_saving) {
        dep->decide_at_ms = 0; /* a switchover decides, or a decision is being saved; after
                                  it, decide again */
        return 0;
    }
    if (leader_put_off(dep))
        return 0; /* decide_at_ms stays due: the timer, or the next report, decides */
    /* live declared proxies only: a pending node id has no say */
    state_proxy **live = NULL;
    int n = state_live_proxies(dep, &live);
    if (n < 0)
        return -1; /* out of memory: decide again at the next call */
    int64_t epoch = dep->epoch;
    char leader[STATE_NODE_NAME_MAX];
    snprintf(leader, sizeof(leader), "%s", dep->leader);
    int rc = leader_decide_among(dep, live, n);
    /* A change moves what the next decision reads (the current epoch): decide again then. */
    if (rc != 0 || epoch != dep->epoch || strcmp(leader, dep->leader) != 0)
        dep->decide_at_ms = 0;
    else
        dep->decide_at_ms = leader_next_change(live, n, now);
    free(live);
    return rc;
}

/* The highest epoch any declared proxy of the deployment has reported. */
static int64_t leader_max_reported_epoch(const state_deployment *dep)
{
    int64_t max = 0;
    for (const state_proxy *p = dep->proxies; p; p = p->next)
        if (p->declared && p->epoch > max)
            max = p->epoch;
    return max;
}

int64_t leader_set_epoch(const state_deployment *dep, int64_t epoch)
{
    int64_t used = leader_max_reported_epoch(dep);
    if (used < dep->epoch)
        used = dep->epoch;
    return epoch <= used ? used + 1 : epoch; /* above every epoch in use: an agent may have
                                                raised its own */
}

void leader_saved(state_deployment *dep, const char *node, int64_t epoch)
{
    if (epoch < dep->epoch || (epoch == dep->epoch && strcmp(node, dep->leader) == 0))
        return; /* the store holds it; what is here is as new or newer */
    log_info("deployment %s: write leader %s -> %s, epoch %" PRId64 " (switchover)", dep->name,
             dep->leader[0] ? dep->leader : "(none)", node, epoch);
    snprintf(dep->leader, sizeof(dep->leader), "%s", node);
    dep->epoch = epoch;
    state_decide_again(dep);
    leader_announce(dep, "switchover");
}

int64_t leader_highest_lsn(state_deployment *dep, const char *node)
{
    int64_t best = 0;
    for (state_proxy *p = dep->proxies; p; p = p->next) {
        size_t i;
        json_t *obs;
        json_array_foreach(p->nodes, i, obs)
        {
            const char *name = json_string_value(json_object_get(obs, "name"));
            json_t *lsn = json_object_get(obs, "lsn");
            if (name && strcmp(name, node) == 0 && json_is_integer(lsn) &&
                json_integer_value(lsn) > best)
                best = json_integer_value(lsn);
        }
    }
    return best;
}

bool leader_node_known(state_deployment *dep, const char *node)
{
    bool any = false;
    for (state_proxy *p = dep->proxies; p; p = p->next) {
        size_t i;
        json_t *obs;
        if (!p->nodes)
            continue;
        any = true;
        json_array_foreach(p->nodes, i, obs)
        {
            const char *name = json_string_value(json_object_get(obs, "name"));
            if (name && strcmp(name, node) == 0)
                return true;
        }
    }
    return !any;
}
