/* store_worker.c - a thread with a store connection of its own that runs the event loop's
 * store work for the agents (their long polls' reads and deliveries, their acknowledgements,
 * in batches: agents.c) and the periodic one (the proxies' rows, command expiry, the idle
 * check), so that a slow or stopped store never holds the loop for it.
 *
 * The loop queues a job (store_worker_submit); the worker runs it with the lease guard and the
 * store cap the loop had when it queued it (a job queued by a holder stays conditional on that
 * holder's term, and ends by its renew deadline), then hands it back through a pipe, and the
 * loop calls its done() with the outcome. Jobs run one at a time, in order.
 */
#include "store_worker.h"
#include "control.h"
#include "log.h"
#include "store.h"

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond; /* a job was queued, or stop was asked */
    store_job *queue;    /* waiting for the worker, oldest first */
    store_job *queue_tail;
    store_job *finished; /* done by the worker, waiting for the loop */
    bool stop;
    int pipe[2]; /* worker -> loop: "a job is finished" */
    struct event *notify;
    pthread_t thread;
    bool started;
    int pending; /* queued or running or finished but not yet handed back */
    /* the holder's latest renew deadline and the term it holds it under (store_worker_renewed):
     * a job queued under that term runs by it, not by the deadline it was queued with */
    int64_t renewed_term;
    int64_t renewed_cap_ms;
} worker = {.lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER, .pipe = {-1, -1}};

static void *store_worker_main(void *arg)
{
    (void)arg;
    store_use_own_connection();
    for (;;) {
        pthread_mutex_lock(&worker.lock);
        while (!worker.stop && !worker.queue)
            pthread_cond_wait(&worker.cond, &worker.lock);
        if (worker.stop) {
            pthread_mutex_unlock(&worker.lock);
            break;
        }
        store_job *job = worker.queue;
        worker.queue = job->next;
        if (!worker.queue)
            worker.queue_tail = NULL;
        pthread_mutex_unlock(&worker.lock);

        store_lease_set_guard(job->guard_name[0] ? job->guard_name : NULL, job->guard_identity,
                              job->guard_term);
        pthread_mutex_lock(&worker.lock);
        int64_t cap = job->cap_ms;
        if (cap > 0 && job->guard_name[0] && job->guard_term == worker.renewed_term &&
            worker.renewed_cap_ms > cap)
            cap = worker.renewed_cap_ms; /* the lease was renewed under the same term since */
        pthread_mutex_unlock(&worker.lock);
        store_set_cap(cap);
        job->rc = job->run(job);
        snprintf(job->error, sizeof(job->error), "%s", job->rc == 0 ? "" : store_error());

        pthread_mutex_lock(&worker.lock);
        job->next = worker.finished;
        worker.finished = job;
        pthread_mutex_unlock(&worker.lock);
        ssize_t w = write(worker.pipe[1], "x", 1);
        (void)w; /* a full pipe already says "look" */
    }
    store_drop_own_connection();
    return NULL;
}

/* Finished jobs, on the loop: done() of each, oldest first. */
static void store_worker_on_notify(evutil_socket_t fd, short what, void *arg)
{
    char buf[64];
    (void)what;
    (void)arg;
    while (read(fd, buf, sizeof(buf)) > 0)
        ;
    pthread_mutex_lock(&worker.lock);
    store_job *list = worker.finished;
    worker.finished = NULL;
    pthread_mutex_unlock(&worker.lock);
    store_job *ordered = NULL; /* the list is newest first */
    while (list) {
        store_job *next = list->next;
        list->next = ordered;
        ordered = list;
        list = next;
    }
    while (ordered) {
        store_job *next = ordered->next;
        worker.pending--;
        ordered->done(ordered);
        ordered = next;
    }
}

int store_worker_start(void)
{
    if (pipe2(worker.pipe, O_NONBLOCK | O_CLOEXEC) != 0) {
        log_error("store worker: cannot create its pipe: %s", strerror(errno));
        return -1;
    }
    worker.notify =
        event_new(control.base, worker.pipe[0], EV_READ | EV_PERSIST, store_worker_on_notify, NULL);
    if (!worker.notify || event_add(worker.notify, NULL) != 0) {
        log_error("store worker: cannot watch its pipe");
        return -1;
    }
    int rc = pthread_create(&worker.thread, NULL, store_worker_main, NULL);
    if (rc != 0) {
        log_error("store worker: cannot start its thread: %s", strerror(rc));
        return -1;
    }
    worker.started = true;
    return 0;
}

void store_worker_submit(store_job *job)
{
    const char *name, *identity;
    char term[32];
    store_lease_guard(&name, &identity, term);
    snprintf(job->guard_name, sizeof(job->guard_name), "%s", name ? name : "");
    snprintf(job->guard_identity, sizeof(job->guard_identity), "%s", identity);
    job->guard_term = strtoll(term, NULL, 10);
    job->cap_ms = store_get_cap();
    job->next = NULL;
    if (!worker.started) { /* no thread (it could not start): run it here */
        job->rc = job->run(job);
        snprintf(job->error, sizeof(job->error), "%s", job->rc == 0 ? "" : store_error());
        job->done(job);
        return;
    }
    worker.pending++;
    pthread_mutex_lock(&worker.lock);
    if (worker.queue_tail)
        worker.queue_tail->next = job;
    else
        worker.queue = job;
    worker.queue_tail = job;
    pthread_cond_signal(&worker.cond);
    pthread_mutex_unlock(&worker.lock);
}

void store_worker_renewed(int64_t term, int64_t cap_ms)
{
    pthread_mutex_lock(&worker.lock);
    worker.renewed_term = term;
    worker.renewed_cap_ms = cap_ms;
    pthread_mutex_unlock(&worker.lock);
}

int store_worker_pending(void)
{
    return worker.pending;
}

void store_worker_stop(void)
{
    if (!worker.started)
        return;
    pthread_mutex_lock(&worker.lock);
    worker.stop = true;
    pthread_cond_signal(&worker.cond);
    pthread_mutex_unlock(&worker.lock);
    /* a job under way ends by its own timeout (STORE_TIMEOUT_MS at most) */
    pthread_join(worker.thread, NULL);
    worker.started = false;
    store_worker_on_notify(worker.pipe[0], 0, NULL); /* what finished meanwhile */
    while (worker.queue) {                           /* never run: handed back as failed */
        store_job *job = worker.queue;
        worker.queue = job->next;
        job->rc = -1;
        snprintf(job->error, sizeof(job->error), "not run: shutting down");
        worker.pending--;
        job->done(job);
    }
    worker.queue_tail = NULL;
    if (worker.notify)
        event_free(worker.notify);
    worker.notify = NULL;
}
