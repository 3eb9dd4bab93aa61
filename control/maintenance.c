/* maintenance.c - the operator's maintenance as a pause that always has an end.
 *
 * `pgrelayctl maintenance on` is kept in the store (store_maintenance.c) and sent to the
 * proxies as a pause that ends by itself pause_lease after it was sent (or at the operator's
 * own end, if sooner). While it is on, the lease holder sends a fresh pause every third of
 * pause_lease, each superseding the last; a new holder loads the store and renews at once. A
 * control plane that dies therefore leaves no proxy paused for longer than pause_lease: each
 * one resumes by itself (DESIGN.md, invariant 4). A switchover carries its own pause and
 * ends it with the operator's maintenance (switchover.c), so no renewal is sent while one runs.
 */
#include "maintenance.h"
#include "agents.h"
#include "control.h"
#include "lease.h"
#include "log.h"
#include "members.h"
#include "operator.h"
#include "operator_internal.h"
#include "store.h"
#include "store_maintenance.h"
#include "store_queue.h"
#include "store_worker.h"

#include <event2/event.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAINTENANCE_RENEWALS 3 /* renewals per pause_lease: two may be lost before it ends */

/* One deployment whose maintenance is on. */
typedef struct maintenance_entry {
    struct maintenance_entry *next;
    char deployment[CCONFIG_NAME_MAX];
    int64_t until_ms;   /* the operator's end (wall clock), 0 = until turned off */
    int64_t command_id; /* the last renewal sent (the next one supersedes it), 0 = none */
    bool ending;        /* its end (the operator's timeout passed) is on its way to the store */
} maintenance_entry;

static struct {
    maintenance_entry *on; /* the deployments whose maintenance is on */
    bool loaded;           /* the list reflects the store (it is reloaded when false) */
    struct event *timer;   /* the next renewal */
} maint;

static maintenance_entry *maintenance_find(const char *deployment)
{
    for (maintenance_entry *e = maint.on; e; e = e->next)
        if (strcmp(e->deployment, deployment) == 0)
            return e;
    return NULL;
}

static void maintenance_drop(const char *deployment)
{
    for (maintenance_entry **pp = &maint.on; *pp; pp = &(*pp)->next) {
        if (strcmp((*pp)->deployment, deployment) == 0) {
            maintenance_entry *e = *pp;
            *pp = e->next;
            free(e);
            return;
        }
    }
}

static int maintenance_remember(const char *deployment, int64_t until_ms)
{
    maintenance_entry *e = maintenance_find(deployment);
    if (!e) {
        e = calloc(1, sizeof(*e));
        if (!e)
            return -1;
        snprintf(e->deployment, sizeof(e->deployment), "%s", deployment);
        e->next = maint.on;
        maint.on = e;
    }
    e->until_ms = until_ms;
    return 0;
}

int maintenance_wanted(state_deployment *dep, bool on, int64_t until_ms)
{
    if (!on) {
        maintenance_drop(dep->name);
        return 0;
    }
    if (maintenance_remember(dep->name, until_ms) != 0) {
        log_error("deployment %s: cannot remember its maintenance: out of memory", dep->name);
        return -1;
    }
    maintenance_find(dep->name)->ending = false;
    return 0;
}

bool maintenance_is_on(const state_deployment *dep)
{
    const maintenance_entry *e = maintenance_find(dep->name);
    return e && (e->until_ms == 0 || control_now_ms() < e->until_ms);
}

json_t *maintenance_args(const state_deployment *dep)
{
    const maintenance_entry *e = maintenance_find(dep->name);
    int64_t now = control_now_ms();
    if (!maintenance_is_on(dep))
        return op_maintenance_args(false, 0);
    int64_t end = now + control.cfg->pause_lease_ms;
    if (e->until_ms > 0 && e->until_ms < end)
        end = e->until_ms;
    return json_pack("{s:b, s:I, s:I}", "on", 1, "resume_after_s",
                     (json_int_t)((end - now + 999) / 1000), "until_ms", (json_int_t)end);
}

static bool maintenance_exempt(const state_proxy *p)
{
    return json_is_true(json_object_get(p->options, "maintenance_exempt"));
}

/* dep's proxies in a malloc'd list: every one the state knows, or the live declared ones. */
static int maintenance_list(state_deployment *dep, bool all_known, state_proxy ***out)
{
    if (!all_known)
        return state_live_proxies(dep, out);
    int n = 0;
    for (state_proxy *p = dep->proxies; p; p = p->next)
        n++;
    *out = malloc((size_t)(n > 0 ? n : 1) * sizeof(**out));
    if (!*out)
        return -1;
    n = 0;
    for (state_proxy *p = dep->proxies; p; p = p->next)
        (*out)[n++] = p;
    return n;
}

int maintenance_split(state_deployment *dep, bool all_known, state_proxy ***held,
                      state_proxy ***rest, int *n_rest)
{
    state_proxy **list = NULL;
    int n = maintenance_list(dep, all_known, &list), nh = 0, nr = 0;
    bool on = maintenance_is_on(dep);
    *held = *rest = NULL;
    *n_rest = 0;
    if (n < 0)
        return -1;
    *held = malloc((size_t)(n > 0 ? n : 1) * sizeof(**held));
    *rest = malloc((size_t)(n > 0 ? n : 1) * sizeof(**rest));
    if (!*held || !*rest) {
        free(*held);
        free(*rest);
        free(list);
        *held = *rest = NULL;
        log_error("deployment %s: out of memory listing its proxies", dep->name);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (on && !maintenance_exempt(list[i]))
            (*held)[nh++] = list[i];
        else
            (*rest)[nr++] = list[i];
    }
    free(list);
    *n_rest = nr;
    return nh;
}

/* Queue a maintenance command (args stolen) for targets (the store worker writes it and wakes
 * them; then, if set, gets its id). */
static void maintenance_queue(state_deployment *dep, json_t *args, state_proxy *const *targets,
                              int n, store_queue_then then)
{
    store_queue_command(dep, "maintenance", args, targets, n, then, NULL);
}

void maintenance_fire_resume(state_deployment *dep, bool all_known)
{
    state_proxy **held, **rest;
    int nr = 0;
    int nh = maintenance_split(dep, all_known, &held, &rest, &nr);
    if (nh >= 0) {
        maintenance_queue(dep, op_maintenance_args(false, 0), rest, nr, NULL);
        maintenance_queue(dep, maintenance_args(dep), held, nh, NULL);
    }
    free(held);
    free(rest);
}

/* Withdrawing a superseded renewal and deleting the ones before it, for the store worker. */
typedef struct maintenance_prune_job {
    store_job job;
    char deployment[CCONFIG_NAME_MAX];
    int64_t superseded; /* the renewal superseded */
    int64_t by;         /* the renewal that supersedes it */
} maintenance_prune_job;

static int maintenance_prune_run(store_job *job)
{
    maintenance_prune_job *j = (maintenance_prune_job *)job;
    if (store_command_cancel(j->superseded, "superseded by a later renewal of the pause") != 0 ||
        store_commands_prune_renewals(j->deployment, j->superseded) < 0)
        return -1;
    return 0;
}

static void maintenance_prune_done(store_job *job)
{
    maintenance_prune_job *j = (maintenance_prune_job *)job;
    if (job->rc != 0)
        log_warning("deployment %s: cannot withdraw or prune maintenance renewals before "
                    "command %" PRId64 ": %s",
                    j->deployment, j->by, job->error);
    free(j);
}

static void maintenance_prune(const char *deployment, int64_t superseded, int64_t by)
{
    maintenance_prune_job *j = calloc(1, sizeof(*j));
    if (!j) {
        log_warning("deployment %s: cannot prune maintenance renewals: out of memory", deployment);
        return;
    }
    snprintf(j->deployment, sizeof(j->deployment), "%s", deployment);
    j->superseded = superseded;
    j->by = by;
    j->job.run = maintenance_prune_run;
    j->job.done = maintenance_prune_done;
    store_worker_submit(&j->job);
}

/* The end of a deployment's maintenance is in the store (or not: tried again at the next
 * renewal): maintenance off to the proxies it held. */
static void maintenance_ended(const char *deployment, int64_t id, const char *error, void *arg)
{
    maintenance_entry *e = maintenance_find(deployment);
    state_deployment *dep = control.active ? state_find_deployment(deployment) : NULL;
    (void)arg;
    if (!e || !e->ending || !dep)
        return; /* turned on again meanwhile, or no longer ours to end */
    e->ending = false;
    if (id < 0) {
        log_error("deployment %s: cannot record the end of its maintenance: %s", deployment, error);
        return;
    }
    log_info("deployment %s: maintenance ends: the operator's timeout has passed", deployment);
    state_proxy **held = NULL;
    int n = members_maintenance_targets(dep, &held);
    maintenance_queue(dep, op_maintenance_args(false, 0), held, n > 0 ? n : 0, NULL);
    free(held);
    maintenance_drop(deployment);
}

/* A renewal is in the store: the one before it is superseded. */
static void maintenance_renewed(const char *deployment, int64_t id, const char *error, void *arg)
{
    maintenance_entry *e = maintenance_find(deployment);
    (void)error;
    (void)arg;
    if (!e || id <= 0)
        return;
    /* the last renewal, where not taken yet, is superseded: a proxy that was away gets one;
     * the ones before it are deleted (a renewal every third of pause_lease would otherwise
     * leave thousands of rows a day until command_retention), also those that a replica which
     * held the lease before left behind. Housekeeping of earlier commands, in any order with
     * what comes next. */
    if (e->command_id > 0)
        maintenance_prune(deployment, e->command_id, id);
    e->command_id = id;
    log_debug("deployment %s: maintenance pause renewed (command %" PRId64 ")", deployment, id);
}

/* Renew one deployment's pause, or end it when the operator's end has passed. */
static void maintenance_renew(maintenance_entry *e)
{
    state_deployment *dep = state_find_deployment(e->deployment);
    if (!dep || e->ending ||
        (dep->op && (dep->op->kind == OP_SWITCHOVER || dep->op->kind == OP_MAINTENANCE)))
        return; /* gone; or a switchover holds the fleet and ends with maintenance_args; or
                   the operator's maintenance is being changed (its write must stay last) */
    if (!maintenance_is_on(dep)) {
        e->ending = true;
        store_queue_maintenance(dep->name, false, 0, maintenance_ended, NULL);
        return;
    }
    state_proxy **held = NULL;
    int n = members_maintenance_targets(dep, &held);
    if (n <= 0) {
        free(held);
        return;
    }
    json_t *args = maintenance_args(dep);
    /* marked, so that proxies log it quietly and the store keeps only the last two */
    json_object_set_new(args, "renewal", json_true());
    /* queued here, so that it stays before a later maintenance off */
    maintenance_queue(dep, args, held, n, maintenance_renewed);
    free(held);
}

static void maintenance_load(void);

void maintenance_renew_all(void)
{
    maintenance_entry *next;
    if (!control.active || !lease_held() || operation_recovering())
        return;          /* a recovery loads what the store says, then renews (recovery.c) */
    if (!maint.loaded) { /* the last load failed: again, and renewed once it is back */
        maintenance_load();
        return;
    }
    for (maintenance_entry *e = maint.on; e; e = next) {
        next = e->next; /* maintenance_renew may drop e */
        maintenance_renew(e);
    }
}

static void maintenance_arm(void);

static void maintenance_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (!control.stopping)
        maintenance_renew_all();
    maintenance_arm();
}

/* The next renewal in a third of pause_lease (as configured now: a reload applies). */
static void maintenance_arm(void)
{
    int64_t ms = control.cfg->pause_lease_ms / MAINTENANCE_RENEWALS;
    struct timeval tv = {.tv_sec = (time_t)(ms / 1000), .tv_usec = (ms % 1000) * 1000};
    if (!maint.timer)
        maint.timer = evtimer_new(control.base, maintenance_tick, NULL);
    if (!maint.timer || evtimer_add(maint.timer, &tv) != 0)
        log_error("cannot start the maintenance renewal timer: pauses end after pause_lease");
}

void maintenance_forget(void)
{
    while (maint.on)
        maintenance_drop(maint.on->deployment);
    maint.loaded = false;
}

void maintenance_loaded(json_t *rows, const char *error)
{
    size_t i;
    json_t *row;
    while (maint.on)
        maintenance_drop(maint.on->deployment);
    maint.loaded = rows != NULL;
    if (!rows)
        log_error("cannot load the deployments' maintenance (retrying at the next renewal): %s",
                  error);
    json_array_foreach(rows, i, row)
    {
        const char *deployment = json_string_value(json_object_get(row, "deployment"));
        int64_t until_ms = json_integer_value(json_object_get(row, "until_ms"));
        if (!deployment)
            continue;
        if (maintenance_remember(deployment, until_ms) != 0)
            log_error("deployment %s: cannot remember its maintenance: out of memory", deployment);
        else
            log_info("deployment %s: maintenance is on (from the store)%s", deployment,
                     until_ms > 0 ? ", with the operator's end" : "");
    }
    if (!maint.timer || !evtimer_pending(maint.timer, NULL))
        maintenance_arm();
}

/* A load on its own (the last one failed), by the store worker. */
typedef struct maintenance_load_job {
    store_job job;
    json_t *rows;
} maintenance_load_job;

static bool maintenance_loading;

static int maintenance_load_run(store_job *job)
{
    maintenance_load_job *j = (maintenance_load_job *)job;
    j->rows = store_maintenance_rows();
    return j->rows ? 0 : -1;
}

static void maintenance_load_done(store_job *job)
{
    maintenance_load_job *j = (maintenance_load_job *)job;
    maintenance_loading = false;
    bool load = control.active && !maint.loaded && !operation_recovering();
    if (load)
        maintenance_loaded(j->rows, job->error);
    json_decref(j->rows);
    free(j);
    if (load && maint.loaded)
        maintenance_renew_all();
}

static void maintenance_load(void)
{
    maintenance_load_job *j = maintenance_loading ? NULL : calloc(1, sizeof(*j));
    if (!j)
        return;
    j->job.run = maintenance_load_run;
    j->job.done = maintenance_load_done;
    maintenance_loading = true;
    store_worker_submit(&j->job);
}
