/* periodic.c - the housekeeping's store work, done by the store worker off the event loop:
 * the proxies' rows (last-seen times and what changed), command and plan expiry, the idle check.
 *
 * Each is queued at most once at a time. The proxies' rows are taken from the state on the
 * loop (as JSON text) and marked saved at once; a batch the store did not take marks its
 * proxies unsaved again, so the next round writes them.
 */
#include "periodic.h"
#include "control.h"
#include "log.h"
#include "plans.h"
#include "state.h"
#include "store.h"
#include "store_worker.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#define PERIODIC_BATCH 500 /* proxies per statement */

static struct {
    int flushes; /* flush jobs not handed back yet */
    bool expiring;
    bool pinging;
} periodic;

/* ---- the proxies' rows ---- */

typedef struct flush_job {
    store_job job;
    char *rows;  /* store_proxies_json text */
    json_t *ids; /* [[deployment, node_id], ...] of the rows */
} flush_job;

static int flush_run(store_job *job)
{
    return store_proxies_save_text(((flush_job *)job)->rows);
}

static void flush_done(store_job *job)
{
    flush_job *f = (flush_job *)job;
    periodic.flushes--;
    if (job->rc != 0) { /* unsaved again: the next round writes them */
        size_t i;
        json_t *id;
        log_debug("store: %zu proxies' rows not written: %s", json_array_size(f->ids), job->error);
        json_array_foreach(f->ids, i, id)
        {
            state_deployment *d = state_find_deployment(json_string_value(json_array_get(id, 0)));
            state_proxy *p =
                d ? state_find_proxy(d, json_string_value(json_array_get(id, 1))) : NULL;
            if (p) {
                p->dirty = true;
                p->saved_seen_ms = 0;
            }
        }
    }
    free(f->rows);
    json_decref(f->ids);
    free(f);
}

static void flush_batch(state_proxy **batch, int n)
{
    flush_job *f = calloc(1, sizeof(*f));
    if (!f || !(f->rows = store_proxies_json(batch, n)) || !(f->ids = json_array())) {
        log_error("cannot save %d proxies' rows: out of memory", n);
        if (f)
            free(f->rows);
        free(f);
        return;
    }
    for (int i = 0; i < n; i++) {
        json_array_append_new(f->ids, json_pack("[s, s]", batch[i]->dep->name, batch[i]->node_id));
        batch[i]->dirty = false;
        batch[i]->saved_seen_ms = batch[i]->last_seen_ms;
    }
    f->job.run = flush_run;
    f->job.done = flush_done;
    periodic.flushes++;
    store_worker_submit(&f->job);
}

void periodic_flush(void)
{
    state_proxy *batch[PERIODIC_BATCH];
    int n = 0;
    if (periodic.flushes > 0) /* the last round is still on its way: no pile-up */
        return;
    for (state_deployment *d = state_deployments(); d; d = d->next) {
        for (state_proxy *p = d->proxies; p; p = p->next) {
            if (!p->declared || (!p->dirty && p->saved_seen_ms == p->last_seen_ms))
                continue;
            batch[n++] = p;
            if (n == PERIODIC_BATCH) {
                flush_batch(batch, n);
                n = 0;
            }
        }
    }
    if (n > 0)
        flush_batch(batch, n);
}

/* ---- command expiry ---- */

typedef struct expire_job {
    store_job job;
    int64_t retention_ms;           /* of commands */
    int64_t telemetry_retention_ms; /* of query plans and plan changes */
    int deleted;
} expire_job;

static int expire_run(store_job *job)
{
    expire_job *e = (expire_job *)job;
    e->deleted = store_commands_expire(e->retention_ms);
    if (e->deleted < 0)
        return -1;
    return store_plans_expire(e->telemetry_retention_ms) < 0 ? -1 : 0;
}

static void expire_done(store_job *job)
{
    expire_job *e = (expire_job *)job;
    periodic.expiring = false;
    if (job->rc == 0 && e->deleted > 0)
        log_info("deleted %d command(s) older than command_retention", e->deleted);
    free(e);
}

void periodic_expire(int64_t retention_ms, int64_t telemetry_retention_ms)
{
    expire_job *e = periodic.expiring ? NULL : calloc(1, sizeof(*e));
    if (!e)
        return;
    e->retention_ms = retention_ms;
    e->telemetry_retention_ms = telemetry_retention_ms;
    e->job.run = expire_run;
    e->job.done = expire_done;
    periodic.expiring = true;
    store_worker_submit(&e->job);
}

/* ---- the idle check ---- */

static int ping_run(store_job *job)
{
    (void)job;
    return store_ping();
}

static void ping_done(store_job *job)
{
    periodic.pinging = false;
    store_note(job->rc == 0, job->error);
    if (job->rc == 0)
        store_touch();
    free(job);
}

void periodic_ping(void)
{
    store_job *job = periodic.pinging ? NULL : calloc(1, sizeof(*job));
    if (!job)
        return;
    job->run = ping_run;
    job->done = ping_done;
    periodic.pinging = true;
    store_worker_submit(job);
}
