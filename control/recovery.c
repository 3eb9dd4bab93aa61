/* recovery.c - a new holder's first act, once its state is loaded (lease.c): the operator's
 * maintenance loaded, the operations another replica left running finished or rolled back
 * (switchover.c, config_apply.c), the committed configuration applies watched again, and the
 * maintenance pauses renewed.
 *
 * The store is read by the store worker (one job: the maintenance rows, the running
 * operations with their prepare answers, the committed applies, each deployment's desired
 * configuration version); the decisions are taken here, on the loop, and their writes go back
 * to the worker in order. Until the last of them is back no orchestration starts (503) and no
 * leader is decided (a finished switchover stores its own), as when all this ran before the
 * first request.
 *
 * A read that fails (a store that times out, a lock another session holds) decides nothing:
 * the whole read is tried again, 1 s later and then at doubling intervals up to
 * RECOVERY_RETRY_MAX_MS, and the replica stays recovering until one read sees everything.
 * Deciding on half of it could leave a switchover another replica paused the fleet for, or an
 * apply it prepared everywhere, running for ever. Its statements wait at most
 * RECOVERY_LOCK_TIMEOUT_MS for a lock, in the store itself: a read the client gave up on
 * would otherwise leave its backend waiting on the lock, one more at every attempt.
 */
#include "control.h"
#include "log.h"
#include "maintenance.h"
#include "operator_internal.h"
#include "state.h"
#include "store.h"
#include "store_maintenance.h"
#include "store_queue.h"
#include "store_worker.h"

#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RECOVERY_RETRY_MS      1000
#define RECOVERY_RETRY_MAX_MS  16000
#define RECOVERY_LOCK_TIMEOUT_MS 4000 /* below a store call's own 5 s */

static uint64_t recovery_generation; /* the recovery under way (0: none) */
static uint64_t recovery_count;
static int recovery_holds; /* its jobs whose writes are not all queued yet */
static struct event *recovery_retry_timer;
static unsigned recovery_attempts; /* reads of the recovery under way that failed */
static int recovery_delay_ms;       /* before the next read */
static bool recovery_maintenance_read; /* it has loaded the operator's maintenance */

/* No read failed yet, none waits to be made again. */
static void recovery_retries_reset(void)
{
    recovery_attempts = 0;
    recovery_delay_ms = 0;
    if (recovery_retry_timer)
        evtimer_del(recovery_retry_timer);
}

typedef struct recovery_job {
    store_job job;
    uint64_t generation;
    json_t *names; /* the deployments, whose desired version is read */
    json_t *maintenance;
    char maintenance_error[256];
    json_t *running;
    json_t *committed;
    json_t *versions; /* {deployment: version} */
    char error[300];  /* the first read that failed ("" when all succeeded) */
} recovery_job;

/* Notes the first read that failed; false then. */
static bool recovery_read_ok(recovery_job *j, bool ok, const char *what)
{
    if (!ok && !j->error[0])
        snprintf(j->error, sizeof(j->error), "%s: %s", what, store_error());
    return ok;
}

static int recovery_run(store_job *job)
{
    recovery_job *j = (recovery_job *)job;
    size_t i;
    json_t *name;
    if (!recovery_read_ok(j, store_lock_timeout(RECOVERY_LOCK_TIMEOUT_MS) == 0,
                          "(setting lock_timeout)"))
        return -1;
    /* the maintenance first (loaded on its own when the rest fails); then up to the first
     * read that fails: the next attempt reads everything again anyway */
    if (!recovery_read_ok(j, (j->maintenance = store_maintenance_rows()) != NULL,
                          "the maintenance"))
        snprintf(j->maintenance_error, sizeof(j->maintenance_error), "%s", store_error());
    else if (recovery_read_ok(j, (j->running = store_operations_list(NULL, 1000, true)) != NULL,
                              "the operations left running") &&
             recovery_read_ok(j, config_recover_read(j->running) == 0,
                              "the answers to an apply's prepare") &&
             recovery_read_ok(j, (j->committed = store_config_committed()) != NULL,
                              "the committed configuration applies") &&
             recovery_read_ok(j, (j->versions = json_object()) != NULL, "(out of memory)")) {
        json_array_foreach(j->names, i, name)
        {
            int64_t version = 0;
            if (!recovery_read_ok(j, store_config_current(json_string_value(name), &version,
                                                          NULL) == 0,
                                  "a deployment's configuration version"))
                break;
            json_object_set_new(j->versions, json_string_value(name), json_integer(version));
        }
    }
    store_lock_timeout(0); /* a failed reset goes with its connection */
    return j->error[0] ? -1 : 0;
}

static void recovery_free(recovery_job *j)
{
    json_decref(j->names);
    json_decref(j->maintenance);
    json_decref(j->running);
    json_decref(j->committed);
    json_decref(j->versions);
    free(j);
}

/* Every write of the recovery is back. */
static void recovery_ended(const char *deployment, int64_t id, const char *error, void *arg)
{
    (void)deployment;
    (void)id;
    (void)error;
    if ((uint64_t)(uintptr_t)arg != recovery_generation || !control.active)
        return;
    recovery_generation = 0;
    recovery_retries_reset();
    log_info("recovery done: orchestrations and leader decisions resume");
    for (state_deployment *d = state_deployments(); d; d = d->next)
        state_decide_again(d);
    maintenance_renew_all(); /* what the store says, at once */
}

static void recovery_read(uint64_t generation);
static void recovery_read_later(void);

static void recovery_retry(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (recovery_generation && control.active)
        recovery_read(recovery_generation);
}

/* The next read, 1 s from now and twice as long at each failure up to RECOVERY_RETRY_MAX_MS.
 * Without a timer (out of memory) the recovery is abandoned, as before a retry existed: better
 * than recovering for ever. */
static void recovery_read_later(void)
{
    recovery_delay_ms = recovery_delay_ms <= 0 ? RECOVERY_RETRY_MS
                        : recovery_delay_ms >= RECOVERY_RETRY_MAX_MS / 2 ? RECOVERY_RETRY_MAX_MS
                                                                         : recovery_delay_ms * 2;
    struct timeval tv = {recovery_delay_ms / 1000, (recovery_delay_ms % 1000) * 1000};
    if (!recovery_retry_timer)
        recovery_retry_timer = evtimer_new(control.base, recovery_retry, NULL);
    if (!recovery_retry_timer || evtimer_add(recovery_retry_timer, &tv) != 0) {
        log_error("recovery abandoned: cannot arm the timer to read again (out of memory); "
                  "operations left running stay so until the next take-over");
        recovery_generation = 0;
        recovery_holds = 0;
        recovery_retries_reset();
    }
}

static void recovery_done(store_job *job)
{
    recovery_job *j = (recovery_job *)job;
    size_t i;
    json_t *row;
    if (j->generation != recovery_generation || !control.active) {
        recovery_free(j); /* the state was dropped meanwhile: the next activation recovers */
        return;
    }
    if (job->rc != 0 && !j->error[0]) /* handed back unrun (the worker stopping) */
        snprintf(j->error, sizeof(j->error), "anything: %.200s", job->error);
    /* First: the operator's maintenance (a rollback resumes to it). Loaded once (no
     * orchestration changes it while the replica recovers); a failed read of it is said once.
     * It is not renewed while the replica recovers (maintenance_renew_all waits: a renewal's
     * end could resume proxies a switchover left paused): renewed at once when the recovery
     * ends, it lapses on the proxies after pause_lease if the recovery lasts longer. */
    if ((j->maintenance && !recovery_maintenance_read) || !recovery_attempts)
        maintenance_loaded(j->maintenance, j->maintenance_error);
    recovery_maintenance_read |= j->maintenance != NULL;
    if (j->error[0]) {
        /* The first failure and then every tenth: a store that stays away is said by the
         * lease too. The read's hold stays: still recovering. */
        if (recovery_attempts++ % 10 == 0)
            log_error("recovery: cannot read %s; orchestrations and leader decisions wait, "
                      "read again in 1 s to %d s (attempt %u)",
                      j->error, RECOVERY_RETRY_MAX_MS / 1000, recovery_attempts);
        recovery_free(j);
        recovery_read_later();
        return;
    }
    if (recovery_attempts)
        log_info("recovery: the store answered every read (after %u failed)", recovery_attempts);
    config_recover(j->running, j->committed, j->versions);
    json_array_foreach(j->running, i, row)
    {
        const char *kind = json_string_value(json_object_get(row, "kind"));
        if (!kind || strcmp(kind, "config") != 0)
            switchover_recover(row);
    }
    recovery_free(j);
    operation_recovery_release(); /* this job's own hold */
}

void operation_recovery_hold(void)
{
    if (recovery_generation)
        recovery_holds++;
}

void operation_recovery_release(void)
{
    if (!recovery_generation || recovery_holds <= 0 || --recovery_holds > 0)
        return;
    /* after every write the recovery's decisions queued (a finished switchover's resume and
     * end included: they are queued when its leader is back) */
    store_queue_barrier("", recovery_ended, (void *)(uintptr_t)recovery_generation);
}

/* One read of everything the recovery decides on, by the store worker. */
static void recovery_read(uint64_t generation)
{
    recovery_job *j = calloc(1, sizeof(*j));
    if (!j || !(j->names = json_array())) {
        free(j);
        log_error("cannot recover the operations left running: out of memory; read again "
                  "later");
        recovery_read_later();
        return;
    }
    for (state_deployment *d = state_deployments(); d; d = d->next)
        json_array_append_new(j->names, json_string(d->name));
    j->generation = generation;
    j->job.run = recovery_run;
    j->job.done = recovery_done;
    store_worker_submit(&j->job);
}

void operation_recover(void)
{
    recovery_retries_reset();
    recovery_generation = ++recovery_count;
    recovery_maintenance_read = false;
    recovery_holds = 1; /* the read, until its decisions are queued */
    recovery_read(recovery_generation);
}

bool operation_recovering(void)
{
    return recovery_generation != 0 && control.active;
}

void operation_recovery_reset(void)
{
    recovery_generation = 0;
    recovery_holds = 0;
    recovery_retries_reset();
}
