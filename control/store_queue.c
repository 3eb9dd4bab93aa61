/* store_queue.c - store writes the event loop does not wait on, run by the store worker in the
 * order asked for (store_queue.h).
 *
 * Why in order, on the worker: an orchestration's writes must land in the order it made them
 * (a fence's command before the rollback that withdraws it and queues the unfence; a step's
 * record before its command), and the store worker runs every job, these and the ones an
 * orchestration waits for (operator.c), one at a time in the order they were queued. A write
 * made on the loop's own connection instead could overtake one still queued.
 */
#include "store_queue.h"
#include "agents.h"
#include "cconfig.h"
#include "log.h"
#include "store.h"
#include "store_maintenance.h"
#include "store_worker.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum queue_kind {
    QUEUE_COMMAND,
    QUEUE_NOTE,
    QUEUE_END,
    QUEUE_CANCEL,
    QUEUE_CONFIG_END,
    QUEUE_MAINTENANCE,
    QUEUE_BARRIER,
} queue_kind;

typedef struct queue_job {
    store_job job;
    queue_kind kind;
    char deployment[CCONFIG_NAME_MAX];
    store_queue_then then;
    void *arg;
    int64_t id; /* the command created; the operation written */
    /* a command */
    char type[32];
    json_t *args;
    char (*ids)[STATE_NODE_ID_MAX];
    int n;
    /* an operation's record: note or outcome or detail; state */
    char *text;
    char state[16];
    /* maintenance */
    bool on;
    int64_t until_ms;
} queue_job;

static int queue_run(store_job *job)
{
    queue_job *j = (queue_job *)job;
    switch (j->kind) {
    case QUEUE_COMMAND: {
        const char **ids = malloc((size_t)(j->n > 0 ? j->n : 1) * sizeof(*ids));
        if (!ids)
            return -1;
        for (int i = 0; i < j->n; i++)
            ids[i] = j->ids[i];
        j->id = store_command_create_ids(j->deployment, j->type, j->args, ids, j->n);
        free(ids);
        return j->id < 0 ? -1 : 0;
    }
    case QUEUE_NOTE:
        return store_operation_note(j->id, j->text);
    case QUEUE_END:
        return store_operation_end(j->id, j->state, j->text);
    case QUEUE_CANCEL:
        return store_operation_cancel_commands(j->id, j->text);
    case QUEUE_CONFIG_END:
        return store_config_end(j->id, j->state, j->text);
    case QUEUE_MAINTENANCE:
        return store_maintenance_save(j->deployment, j->on, j->until_ms);
    case QUEUE_BARRIER:
        return 0;
    }
    return -1;
}

static const char *const queue_what[] = {"queue a command",
                                         "record an operation's step outcome",
                                         "record an operation's end",
                                         "withdraw an operation's commands",
                                         "record a configuration operation's end",
                                         "record the maintenance",
                                         "wait"};

static void queue_done(store_job *job)
{
    queue_job *j = (queue_job *)job;
    if (job->rc != 0) {
        if (j->kind == QUEUE_COMMAND)
            log_error("deployment %s: cannot queue %s: %s", j->deployment, j->type, job->error);
        else if (j->kind != QUEUE_MAINTENANCE || !j->then) /* else the caller says it */
            log_error("deployment %s: cannot %s%s: %s", j->deployment, queue_what[j->kind],
                      j->kind == QUEUE_MAINTENANCE ? "" : " (operation)", job->error);
    }
    if (j->kind == QUEUE_COMMAND && job->rc == 0) {
        state_deployment *dep = state_find_deployment(j->deployment);
        for (int i = 0; dep && i < j->n; i++) {
            state_proxy *p = state_find_proxy(dep, j->ids[i]);
            if (p)
                agents_wake(p);
        }
    }
    if (j->then)
        j->then(j->deployment, job->rc == 0 ? j->id : -1, job->rc == 0 ? "" : job->error, j->arg);
    json_decref(j->args);
    free(j->ids);
    free(j->text);
    free(j);
}

static queue_job *queue_new(queue_kind kind, const char *deployment, const char *text)
{
    queue_job *j = calloc(1, sizeof(*j));
    if (j && text && !(j->text = strdup(text))) {
        free(j);
        j = NULL;
    }
    if (!j) {
        log_error("deployment %s: cannot %s: out of memory", deployment, queue_what[kind]);
        return NULL;
    }
    j->kind = kind;
    snprintf(j->deployment, sizeof(j->deployment), "%s", deployment);
    j->job.run = queue_run;
    j->job.done = queue_done;
    return j;
}

void store_queue_command(state_deployment *dep, const char *type, json_t *args,
                         state_proxy *const *targets, int n, store_queue_then then, void *arg)
{
    if (n <= 0) {
        json_decref(args);
        if (then)
            then(dep->name, 0, "", arg);
        return;
    }
    queue_job *j = queue_new(QUEUE_COMMAND, dep->name, NULL);
    if (j && !(j->ids = malloc((size_t)n * sizeof(*j->ids)))) {
        log_error("deployment %s: cannot queue %s: out of memory", dep->name, type);
        free(j);
        j = NULL;
    }
    if (!j) {
        json_decref(args);
        if (then)
            then(dep->name, -1, "out of memory", arg);
        return;
    }
    snprintf(j->type, sizeof(j->type), "%s", type);
    j->args = args;
    for (int i = 0; i < n; i++)
        snprintf(j->ids[i], STATE_NODE_ID_MAX, "%s", targets[i]->node_id);
    j->n = n;
    j->then = then;
    j->arg = arg;
    store_worker_submit(&j->job);
}

void store_queue_command_one(state_deployment *dep, const char *node_id, const char *type,
                             json_t *args)
{
    state_proxy *p = state_find_proxy(dep, node_id);
    if (!p) {
        json_decref(args);
        return;
    }
    store_queue_command(dep, type, args, &p, 1, NULL, NULL);
}

static void queue_operation(queue_kind kind, const char *deployment, int64_t op_id,
                            const char *state, const char *text)
{
    if (op_id <= 0)
        return;
    queue_job *j = queue_new(kind, deployment, text);
    if (!j)
        return;
    j->id = op_id;
    snprintf(j->state, sizeof(j->state), "%s", state ? state : "");
    store_worker_submit(&j->job);
}

void store_queue_operation_note(const char *deployment, int64_t op_id, const char *detail)
{
    queue_operation(QUEUE_NOTE, deployment, op_id, NULL, detail);
}

void store_queue_operation_end(const char *deployment, int64_t op_id, const char *state,
                               const char *outcome)
{
    queue_operation(QUEUE_END, deployment, op_id, state, outcome);
}

void store_queue_operation_cancel(const char *deployment, int64_t op_id, const char *detail)
{
    queue_operation(QUEUE_CANCEL, deployment, op_id, NULL, detail);
}

void store_queue_config_end(const char *deployment, int64_t op_id, const char *state,
                            const char *outcome)
{
    queue_operation(QUEUE_CONFIG_END, deployment, op_id, state, outcome);
}

void store_queue_maintenance(const char *deployment, bool on, int64_t until_ms,
                             store_queue_then then, void *arg)
{
    queue_job *j = queue_new(QUEUE_MAINTENANCE, deployment, NULL);
    if (!j) {
        if (then)
            then(deployment, -1, "out of memory", arg);
        return;
    }
    j->on = on;
    j->until_ms = until_ms;
    j->then = then;
    j->arg = arg;
    store_worker_submit(&j->job);
}

void store_queue_barrier(const char *deployment, store_queue_then then, void *arg)
{
    queue_job *j = queue_new(QUEUE_BARRIER, deployment, NULL);
    if (!j) { /* nothing to wait for that could be told apart from this */
        then(deployment, 0, "", arg);
        return;
    }
    j->then = then;
    j->arg = arg;
    store_worker_submit(&j->job);
}
