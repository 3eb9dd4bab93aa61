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

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t recovery_generation; /* the recovery under way (0: none) */
static uint64_t recovery_count;
static int recovery_holds; /* its jobs whose writes are not all queued yet */

typedef struct recovery_job {
    store_job job;
    uint64_t generation;
    json_t *names; /* the deployments, whose desired version is read */
    json_t *maintenance;
    char maintenance_error[256];
    json_t *running;
    char running_error[256];
    json_t *committed;
    json_t *versions; /* {deployment: version} */
} recovery_job;

static int recovery_run(store_job *job)
{
    recovery_job *j = (recovery_job *)job;
    size_t i;
    json_t *name;
    if (!(j->maintenance = store_maintenance_rows()))
        snprintf(j->maintenance_error, sizeof(j->maintenance_error), "%s", store_error());
    if (!(j->running = store_operations_list(NULL, 1000, true)))
        snprintf(j->running_error, sizeof(j->running_error), "%s", store_error());
    else
        config_recover_read(j->running);
    j->committed = store_config_committed();
    j->versions = json_object();
    json_array_foreach(j->names, i, name)
    {
        int64_t version = 0;
        if (j->versions && store_config_current(json_string_value(name), &version, NULL) == 0)
            json_object_set_new(j->versions, json_string_value(name), json_integer(version));
    }
    return 0;
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
    log_info("recovery done: orchestrations and leader decisions resume");
    for (state_deployment *d = state_deployments(); d; d = d->next)
        state_decide_again(d);
    maintenance_renew_all(); /* what the store says, at once */
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
    /* first: a rollback resumes to the operator's maintenance */
    maintenance_loaded(j->maintenance, j->maintenance_error);
    if (!j->running) {
        log_error("cannot look for unfinished operations: %s", j->running_error);
    } else {
        config_recover(j->running, j->committed, j->versions);
        json_array_foreach(j->running, i, row)
        {
            const char *kind = json_string_value(json_object_get(row, "kind"));
            if (!kind || strcmp(kind, "config") != 0)
                switchover_recover(row);
        }
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

void operation_recover(void)
{
    recovery_job *j = calloc(1, sizeof(*j));
    if (!j || !(j->names = json_array())) {
        free(j);
        log_error("cannot recover the operations left running: out of memory");
        return;
    }
    for (state_deployment *d = state_deployments(); d; d = d->next)
        json_array_append_new(j->names, json_string(d->name));
    j->generation = recovery_generation = ++recovery_count;
    recovery_holds = 1; /* the read, until its decisions are queued */
    j->job.run = recovery_run;
    j->job.done = recovery_done;
    store_worker_submit(&j->job);
}

bool operation_recovering(void)
{
    return recovery_generation != 0 && control.active;
}

void operation_recovery_reset(void)
{
    recovery_generation = 0;
    recovery_holds = 0;
}
