/* store_worker.h - store calls run by a thread of their own, off the event loop. */
#ifndef PGRELAY_STORE_WORKER_H
#define PGRELAY_STORE_WORKER_H

#include <stdbool.h>
#include <stdint.h>

/* One piece of store work. The caller allocates it (usually inside a larger struct of its own
 * data), sets run and done, and submits it; run is called on the worker thread (store calls
 * only: no state, no events), done on the event loop with rc and error set, and owns the job
 * from then on (frees it). */
typedef struct store_job {
    struct store_job *next;
    int (*run)(struct store_job *job);   /* worker thread: 0 or -1 */
    void (*done)(struct store_job *job); /* event loop: the outcome is in rc and error */
    int rc;                              /* what run returned */
    char error[512];                     /* store_error() when rc != 0 */
    /* the lease guard and store cap the loop had when it submitted the job */
    char guard_name[64];
    char guard_identity[256];
    int64_t guard_term;
    int64_t cap_ms;
} store_job;

/* Start the thread (after the event base exists). 0 or -1. */
int store_worker_start(void);

/* Queue a job; its done() comes later on the loop (at once, here, without a thread). */
void store_worker_submit(store_job *job);

/* The lease holder renewed its lease under term, to the renew deadline cap_ms (monotonic):
 * jobs queued under that term may run until then (they were queued with the deadline of
 * their time; the guard in each statement still checks the term). */
void store_worker_renewed(int64_t term, int64_t cap_ms);

/* Jobs queued and not yet handed back. */
int store_worker_pending(void);

/* Stop the thread: waits for a job under way; the queued ones are handed back failed. */
void store_worker_stop(void);

#endif
