/* lease.c - lease election: take or renew the store's lease row; only the holder acts.
 *
 * Mirrors Kubernetes' Lease and client-go's leader election: every lease_interval_secs a
 * replica tries to take the row lease_name for lease_duration_secs (the store's clock decides
 * expiry, so replicas' clocks need not agree). A holder counts its term from the moment it
 * sent the renewal, which is never later than the store's renew time, and stops acting at its
 * renew deadline - two thirds of the duration after that, and at least halfway between the
 * interval and the duration - well before anyone else may take the lease over, so that no two
 * replicas act at once even when clocks run at slightly different rates or a call is slow.
 *
 * The attempts run in a thread of their own, on a store connection of their own, so that a
 * renewal never waits behind a slow call of the event loop (and a slow renewal never holds the
 * loop). The thread hands each outcome to the loop through a pipe; the loop decides (activate,
 * step down) and arms a timer at the renew deadline. The loop's own store calls are capped at
 * the renew deadline (store_set_cap), and every write of the holder is conditional on its term
 * in the store (store_lease_set_guard). With leases disabled a timer of the loop just (re)loads
 * the state until the store answers.
 */
#include "lease.h"
#include "control.h"
#include "log.h"
#include "operator.h"
#include "periodic.h"
#include "state.h"
#include "store.h"
#include "store_worker.h"

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LEASE_RETRY_MS   1000 /* leases disabled: time between two attempts to load state */
#define LEASE_HOLDER_MAX 256
#define LEASE_ERROR_MAX  512
#define MS_PER_S         1000
#define US_PER_MS        1000
#define NS_PER_MS        1000000

/* One attempt's outcome, handed from the thread to the loop. */
typedef struct lease_result {
    bool ok;                       /* the store answered */
    bool held;                     /* this replica holds the lease now */
    int64_t term;                  /* lease_transitions it holds it under */
    int64_t sent_ms;               /* monotonic time the attempt was sent */
    char holder[LEASE_HOLDER_MAX]; /* the holder seen in the store */
    char error[LEASE_ERROR_MAX];   /* why it failed, when !ok */
} lease_result;

static struct {
    /* the event loop's side */
    struct event *timer;           /* leases disabled: the retry timer */
    struct event *deadline_timer;  /* fires at the renew deadline */
    struct event *notify;          /* the thread wrote an outcome */
    bool held;                     /* the last outcome said held, and no step-down since */
    int64_t deadline_mono_ms;      /* renew deadline: acting stops here unless renewed */
    char holder[LEASE_HOLDER_MAX]; /* holder seen in the store */
    int64_t renew_deadline_ms;     /* from a renewal's sending to its renew deadline */
    /* shared with the thread, under lock */
    pthread_mutex_t lock;
    pthread_cond_t cond; /* on CLOCK_MONOTONIC: stop asked, or the thread went idle */
    bool stop;           /* the loop asks the thread to end */
    bool busy;           /* the thread is in an attempt */
    bool fresh;          /* result not yet read by the loop */
    lease_result result; /* the last outcome */
    int pipe[2];         /* thread -> loop: "an outcome is there" */
    pthread_t thread;
    bool thread_started;
    /* the thread's copy of the settings (a reload may replace control.cfg) */
    char name[CCONFIG_NAME_MAX];
    char identity[LEASE_HOLDER_MAX];
    int duration_s;
    int64_t interval_ms;
} lease = {.lock = PTHREAD_MUTEX_INITIALIZER, .pipe = {-1, -1}};

bool lease_enabled(void)
{
    return control.cfg->lease_enabled;
}

bool lease_held(void)
{
    if (!lease_enabled())
        return true;
    return lease.held && control_mono_ms() < lease.deadline_mono_ms;
}

const char *lease_holder(void)
{
    return lease.holder;
}

int64_t lease_renew_deadline_ms(int duration_s, int interval_s)
{
    int64_t duration = (int64_t)duration_s * MS_PER_S, interval = (int64_t)interval_s * MS_PER_S;
    int64_t d = duration * 2 / 3;
    int64_t least = interval + (duration - interval) / 2;
    return d > least ? d : least;
}

/* Stop acting: no guarded write changes anything from now on, and every orchestration, long
 * poll and the state are dropped. */
static void lease_step_down(const char *why)
{
    lease.held = false;
    store_lease_set_guard(control.cfg->lease_name, "", -1);
    if (lease.deadline_timer)
        evtimer_del(lease.deadline_timer);
    log_warning("lease %s: %s; stepping down", control.cfg->lease_name, why);
    state_deactivate(why);
}

void lease_check(void)
{
    if (!lease_enabled() || !lease.held)
        return;
    int64_t now = control_mono_ms();
    if (now >= lease.deadline_mono_ms) {
        char why[128];
        snprintf(why, sizeof(why),
                 "renew deadline passed without a renewal (%lld ms after the last one was sent)",
                 (long long)(now - (lease.deadline_mono_ms - lease.renew_deadline_ms)));
        lease_step_down(why);
    }
}

static void lease_on_deadline(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    lease_check();
}

/* An attempt's outcome, on the loop. */
static void lease_apply(const lease_result *r)
{
    const cconfig *cfg = control.cfg;
    if (!r->ok) {
        log_warning("lease %s: cannot reach the store (%s)", cfg->lease_name, r->error);
        lease_check();
        return;
    }
    if (r->held) {
        int64_t now = control_mono_ms();
        int64_t deadline = r->sent_ms + lease.renew_deadline_ms;
        if (!lease.held || now >= lease.deadline_mono_ms)
            log_info("lease %s: acquired as %s", cfg->lease_name, control.identity);
        lease.held = true;
        lease.deadline_mono_ms = deadline;
        snprintf(lease.holder, sizeof(lease.holder), "%s", r->holder);
        store_lease_set_guard(cfg->lease_name, control.identity, r->term);
        store_set_cap(deadline); /* no store call of the loop outlasts the renew deadline */
        store_worker_renewed(r->term, deadline);
        if (now >= deadline) { /* the outcome came too late to act on */
            lease_check();
            return;
        }
        int64_t left = deadline - now;
        struct timeval tv = {.tv_sec = (time_t)(left / MS_PER_S),
                             .tv_usec = (suseconds_t)((left % MS_PER_S) * US_PER_MS)};
        evtimer_add(lease.deadline_timer, &tv);
        if (!control.active) /* loaded by the store worker, then the take-over's recovery */
            state_activate(operation_recover);
        return;
    }
    if (strcmp(lease.holder, r->holder) != 0)
        log_info("lease %s: held by %s", cfg->lease_name, r->holder[0] ? r->holder : "(nobody)");
    snprintf(lease.holder, sizeof(lease.holder), "%s", r->holder);
    if (lease.held) {
        char why[LEASE_HOLDER_MAX + 32];
        snprintf(why, sizeof(why), "lost to %s", r->holder);
        lease_step_down(why);
    } else if (control.active) {
        state_deactivate("the lease is held by another replica");
    }
}

static void lease_on_notify(evutil_socket_t fd, short what, void *arg)
{
    char buf[64];
    lease_result r;
    bool fresh;
    (void)what;
    (void)arg;
    while (read(fd, buf, sizeof(buf)) > 0)
        ;
    pthread_mutex_lock(&lease.lock);
    fresh = lease.fresh;
    r = lease.result;
    lease.fresh = false;
    pthread_mutex_unlock(&lease.lock);
    if (fresh && !control.stopping)
        lease_apply(&r);
}

/* The thread: an attempt every interval (from the sending of the last one), on its own store
 * connection; a renewal is given no longer than the renew deadline it would extend. */
static void *lease_thread_main(void *arg)
{
    bool schema_ok = false;
    int64_t held_until = 0; /* the renew deadline as far as this thread knows */
    int64_t next_ms = 0;
    (void)arg;
    store_use_own_connection();
    for (;;) {
        pthread_mutex_lock(&lease.lock);
        while (!lease.stop && control_mono_ms() < next_ms) {
            int64_t wait = next_ms - control_mono_ms();
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            ts.tv_sec += wait / MS_PER_S;
            ts.tv_nsec += (wait % MS_PER_S) * NS_PER_MS;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&lease.cond, &lease.lock, &ts);
        }
        if (lease.stop) {
            pthread_mutex_unlock(&lease.lock);
            break;
        }
        lease.busy = true;
        pthread_mutex_unlock(&lease.lock);

        lease_result r = {.sent_ms = control_mono_ms()};
        store_set_cap(held_until > r.sent_ms ? held_until : 0);
        if (!schema_ok && store_migrate() == 0) {
            schema_ok = true;
            r.sent_ms = control_mono_ms();
        }
        bool held = false;
        if (schema_ok && store_lease_take(lease.name, lease.identity, lease.duration_s, &held,
                                          &r.term, r.holder, sizeof(r.holder)) == 0) {
            r.ok = true;
            r.held = held;
            held_until = held ? r.sent_ms + lease.renew_deadline_ms : 0;
        } else {
            snprintf(r.error, sizeof(r.error), "%s%s",
                     schema_ok ? "" : "preparing the schema: ", store_error());
        }
        next_ms = r.sent_ms + lease.interval_ms;

        pthread_mutex_lock(&lease.lock);
        lease.result = r;
        lease.fresh = true;
        lease.busy = false;
        pthread_cond_broadcast(&lease.cond);
        pthread_mutex_unlock(&lease.lock);
        ssize_t w = write(lease.pipe[1], "x", 1);
        (void)w; /* a full pipe already says "look" */
    }
    store_drop_own_connection();
    return NULL;
}

/* ---- leases disabled ---- */

static void lease_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (control.stopping)
        return;
    /* While the store is seen down, the store worker checks it (off this loop) until it
     * answers; then the state is loaded here. */
    if (!store_up()) {
        periodic_ping();
    } else if (!control.active) {
        state_activate(operation_recover);
    }
}

static int lease_start_disabled(void)
{
    struct timeval tv = {.tv_sec = LEASE_RETRY_MS / MS_PER_S,
                         .tv_usec = (LEASE_RETRY_MS % MS_PER_S) * US_PER_MS};
    lease.timer = event_new(control.base, -1, EV_PERSIST, lease_tick, NULL);
    if (!lease.timer || event_add(lease.timer, &tv) != 0) {
        log_error("cannot start the state loading timer");
        return -1;
    }
    store_lease_set_guard(NULL, control.identity, -1);
    lease_tick(-1, 0, NULL);
    return 0;
}

int lease_start(void)
{
    const cconfig *cfg = control.cfg;
    if (!cfg->lease_enabled)
        return lease_start_disabled();

    snprintf(lease.name, sizeof(lease.name), "%s", cfg->lease_name);
    snprintf(lease.identity, sizeof(lease.identity), "%s", control.identity);
    lease.duration_s = cfg->lease_duration_secs;
    lease.interval_ms = (int64_t)cfg->lease_interval_secs * MS_PER_S;
    lease.renew_deadline_ms =
        lease_renew_deadline_ms(cfg->lease_duration_secs, cfg->lease_interval_secs);
    store_lease_set_guard(cfg->lease_name, "", -1);

    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&lease.cond, &attr);
    pthread_condattr_destroy(&attr);
    if (pipe2(lease.pipe, O_NONBLOCK | O_CLOEXEC) != 0) {
        log_error("lease %s: cannot create its pipe: %s", cfg->lease_name, strerror(errno));
        return -1;
    }
    lease.notify =
        event_new(control.base, lease.pipe[0], EV_READ | EV_PERSIST, lease_on_notify, NULL);
    lease.deadline_timer = evtimer_new(control.base, lease_on_deadline, NULL);
    if (!lease.notify || !lease.deadline_timer || event_add(lease.notify, NULL) != 0) {
        log_error("lease %s: cannot start its events", cfg->lease_name);
        return -1;
    }
    int rc = pthread_create(&lease.thread, NULL, lease_thread_main, NULL);
    if (rc != 0) {
        log_error("lease %s: cannot start its thread: %s", cfg->lease_name, strerror(rc));
        return -1;
    }
    lease.thread_started = true;
    log_info("lease %s: competing as %s (duration %ds, interval %ds, renew deadline %lld ms)",
             cfg->lease_name, control.identity, cfg->lease_duration_secs, cfg->lease_interval_secs,
             (long long)lease.renew_deadline_ms);
    return 0;
}

void lease_stop(void)
{
    const cconfig *cfg = control.cfg;
    if (lease.timer) {
        event_free(lease.timer);
        lease.timer = NULL;
    }
    if (lease.thread_started) {
        /* no renewal after the release: wait (bounded) for an attempt under way */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_sec += cfg->release_timeout_secs > 0 ? cfg->release_timeout_secs : 1;
        pthread_mutex_lock(&lease.lock);
        lease.stop = true;
        pthread_cond_broadcast(&lease.cond);
        while (lease.busy)
            if (pthread_cond_timedwait(&lease.cond, &lease.lock, &ts) == ETIMEDOUT)
                break;
        bool idle = !lease.busy;
        pthread_mutex_unlock(&lease.lock);
        if (idle)
            pthread_join(lease.thread, NULL);
        else
            pthread_detach(lease.thread);
        lease.thread_started = false;
    }
    if (lease.notify) {
        event_free(lease.notify);
        lease.notify = NULL;
    }
    if (lease.deadline_timer) {
        event_free(lease.deadline_timer);
        lease.deadline_timer = NULL;
    }
    if (!lease_enabled() || !lease.held)
        return;
    lease.held = false;
    store_set_cap(0);
    if (store_lease_release(cfg->lease_name, control.identity,
                            cfg->release_timeout_secs * MS_PER_S) == 0)
        log_info("lease %s: released", cfg->lease_name);
    else
        log_warning("lease %s: could not be released within %ds (%s); it runs out by itself",
                    cfg->lease_name, cfg->release_timeout_secs, store_error());
}
