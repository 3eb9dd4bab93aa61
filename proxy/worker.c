/* worker.c - a worker process: accepts from its own listen sockets and runs its sessions. */
#include "worker.h"
#include "channel.h"
#include "log.h"
#include "route.h"
#include "tls.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ACCEPT_BATCH     64 /* accepts per wake-up, so one worker cannot starve its sessions */
#define ACCEPT_PAUSE_MS  1000 /* back off this long when out of file descriptors */
#define WORKER_HEARTBEAT_MS 250 /* how often a worker says it runs (shm heartbeat_us) */
#define WORKER_STUCK_MS  3000 /* a worker silent this long (or started this long ago and not
                               * running yet) is stuck: a neighbour accepts from its sockets
                               * until it runs */

worker *worker_self;

int64_t worker_clock_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void worker_walk_begin(worker *w)
{
    w->walk_depth++;
}

void worker_walk_end(worker *w)
{
    if (--w->walk_depth == 0 && w->routes_deferred)
        worker_routes_refresh(w);
}

void worker_routes_refresh(worker *w)
{
    if (w->walk_depth > 0) {
        /* route_table_changed would walk the list under the running walk's feet. */
        w->routes_deferred = true;
        return;
    }
    w->routes_deferred = false;
    while (shm_routes_version(w->shm) != w->routes_version) {
        memcpy(&w->routes_prev, &w->routes, sizeof(w->routes));
        w->routes_version = shm_routes_read(w->shm, &w->routes);
        worker_walk_begin(w);
        route_table_changed(w, &w->routes_prev);
        w->walk_depth--; /* not worker_walk_end: the loop itself looks again */
        w->routes_deferred = false;
    }
}

void worker_session_added(worker *w, session *s)
{
    s->prev = NULL;
    s->next = w->sessions;
    if (w->sessions)
        w->sessions->prev = s;
    w->sessions = s;
    w->n_sessions++;
    atomic_store_explicit(&w->row->sessions, w->n_sessions, memory_order_relaxed);
}

void worker_session_gone(worker *w, session *s)
{
    if (s->prev)
        s->prev->next = s->next;
    else
        w->sessions = s->next;
    if (s->next)
        s->next->prev = s->prev;
    w->n_sessions--;
    atomic_store_explicit(&w->row->sessions, w->n_sessions, memory_order_relaxed);
    if (w->stop != WORKER_RUNNING && w->n_sessions == 0)
        event_base_loopbreak(w->base);
}

static void worker_listener_arm(worker_listener *l, bool on)
{
    if (on && !l->armed && l->fd >= 0)
        l->armed = event_add(&l->ev, NULL) == 0;
    else if (!on && l->armed) {
        event_del(&l->ev);
        l->armed = false;
    }
}

/* Worker j runs: a process in its slot whose heartbeat is recent (not stopped, not hung, not
 * a successor that has not reached its loop yet). */
static bool worker_running(const worker *w, int j, int64_t now_us)
{
    const shm_worker *row = &w->shm->workers[j];
    return atomic_load(&row->pid) != 0 &&
           now_us - atomic_load(&row->heartbeat_us) <= (int64_t)WORKER_STUCK_MS * 1000;
}

/* Whether this worker accepts from owner's sockets: its own always; those of a worker that
 * does not run (dead, or stuck), until it runs again, when this is the first running worker
 * after it. Connections the kernel queued on such a worker's socket wait there (the master
 * keeps it open) and are taken by that neighbour, or by the worker once it runs again. */
static bool worker_accepts_for(const worker *w, int owner)
{
    int64_t now = worker_clock_us();
    if (owner == w->index)
        return true;
    if (worker_running(w, owner, now))
        return false;
    for (int k = 1; k < w->n_listen_workers; k++) {
        int j = (owner + k) % w->n_listen_workers;
        if (j == w->index || worker_running(w, j, now))
            return j == w->index;
    }
    return false;
}

/* Arm or disarm every listener as worker_accepts_for says (all off when not running). */
static void worker_listeners_update(worker *w)
{
    for (int i = 0; i < 2 * w->n_listen_workers; i++) {
        worker_listener *l = &w->listeners[i];
        worker_listener_arm(l, w->stop == WORKER_RUNNING && worker_accepts_for(w, l->owner));
    }
}

static void worker_on_accept_resume(evutil_socket_t fd, short what, void *arg)
{
    worker *w = arg;
    (void)fd;
    (void)what;
    worker_listeners_update(w);
}

static void worker_on_heartbeat(evutil_socket_t fd, short what, void *arg)
{
    worker *w = arg;
    (void)fd;
    (void)what;
    atomic_store(&w->row->heartbeat_us, worker_clock_us());
    if (w->stop == WORKER_RUNNING && !evtimer_pending(&w->ev_accept_resume, NULL))
        worker_listeners_update(w); /* a neighbour got stuck, or runs again */
}

static void worker_take_settings(worker *w);

static void worker_on_accept(evutil_socket_t lfd, short what, void *arg)
{
    worker_listener *l = arg;
    worker *w = l->w;
    (void)what;
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        /* A reload answered before this connection came takes effect for it, even when the
         * master's poke is still on its way: one atomic load per accept. */
        worker_take_settings(w);
        struct sockaddr_storage addr;
        socklen_t len = sizeof(addr);
        int fd = accept4(lfd, (struct sockaddr *)&addr, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED)
                return;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                struct timeval tv = {ACCEPT_PAUSE_MS / 1000, (ACCEPT_PAUSE_MS % 1000) * 1000};
                log_error("accept: %s; not accepting for %d ms", strerror(errno),
                          ACCEPT_PAUSE_MS);
                for (int k = 0; k < 2 * w->n_listen_workers; k++)
                    worker_listener_arm(&w->listeners[k], false);
                evtimer_add(&w->ev_accept_resume, &tv);
                return;
            }
            log_error("accept: %s", strerror(errno));
            return;
        }
        /* a read-only proxy (control plane, proxy option read_only) routes every new session
         * as its read-only port does */
        session_new(fd, &addr, len,
                    l->read_port || atomic_load_explicit(&w->shm->read_only_role,
                                                         memory_order_relaxed) != 0);
    }
}

/* No more accepts: this process's copies of the sockets are closed (the master keeps its). */
static void worker_stop_accepting(worker *w)
{
    evtimer_del(&w->ev_accept_resume);
    evtimer_del(&w->ev_heartbeat); /* stale from now on: it takes over no socket any more */
    for (int i = 0; i < 2 * w->n_listen_workers; i++) {
        worker_listener *l = &w->listeners[i];
        worker_listener_arm(l, false);
        if (l->fd >= 0) {
            close(l->fd);
            l->fd = -1;
        }
    }
}

/* Close every session now (fast shutdown, or the graceful deadline passed). */
static void worker_close_all(worker *w, const char *message)
{
    while (w->sessions)
        session_close(w->sessions, PG_SQLSTATE_ADMIN_SHUTDOWN, message);
}

static void worker_on_shutdown_deadline(evutil_socket_t fd, short what, void *arg)
{
    worker *w = arg;
    (void)fd;
    (void)what;
    log_info("shutdown_timeout reached: closing %d remaining session(s)", w->n_sessions);
    worker_close_all(w, "terminating connection: pgrelay shutdown_timeout reached");
    event_base_loopbreak(w->base);
}

static void worker_begin_graceful(worker *w)
{
    if (w->stop != WORKER_RUNNING)
        return;
    w->stop = WORKER_GRACEFUL;
    worker_stop_accepting(w);
    log_info("graceful shutdown: %d session(s) to finish (at most %d ms)", w->n_sessions,
             w->cfg->shutdown_timeout_ms);
    /* Idle sessions go now; the others at their next safe point. */
    session *next;
    worker_walk_begin(w);
    for (session *s = w->sessions; s; s = next) {
        next = s->next;
        session_close_when_safe(s, PG_SQLSTATE_ADMIN_SHUTDOWN,
                                "terminating connection: pgrelay is shutting down");
    }
    worker_walk_end(w);
    if (w->n_sessions == 0) {
        event_base_loopbreak(w->base);
        return;
    }
    struct timeval tv = {w->cfg->shutdown_timeout_ms / 1000,
                         (w->cfg->shutdown_timeout_ms % 1000) * 1000};
    evtimer_assign(&w->ev_shutdown, w->base, worker_on_shutdown_deadline, w);
    evtimer_add(&w->ev_shutdown, &tv);
}

/* Take the settings of the last reload if this worker has not yet. */
static void worker_take_settings(worker *w)
{
    if (shm_settings_version(w->shm) != w->settings_version) {
        /* The certificate and key files come with the settings, as the master read and
         * checked them at the reload (renewed ones included): new sessions take the new
         * context, running ones keep theirs. */
        shm_settings_half *next = malloc(sizeof(*next)); /* pages used only as written */
        if (!next) {
            log_error("reload: out of memory; taking the new settings at the next look");
            return;
        }
        w->settings_version = shm_settings_read_tls(w->shm, next);
        memcpy(w->cfg, &next->cfg, sizeof(*w->cfg));
        config_apply_logging(w->cfg);
        char err[512];
        if (tls_setup(w->cfg, &next->tls, err, sizeof(err)) != 0)
            log_error("reload: TLS: %s; new sessions keep the previous certificates", err);
        free(next);
        log_debug("settings reloaded");
    }
}

/* Shared memory changed: take new settings, follow maintenance mode. */
static void worker_look_again(worker *w)
{
    worker_take_settings(w);
    worker_routes_refresh(w);
    if (w->stop == WORKER_RUNNING && !evtimer_pending(&w->ev_accept_resume, NULL))
        worker_listeners_update(w); /* a worker died or came back */
    bool maintenance = atomic_load(&w->shm->maintenance) != 0;
    /* Seen before any session runs again: `pause wait` counts this worker from now on. */
    atomic_store(&w->row->maintenance_seen_us,
                 maintenance ? atomic_load(&w->shm->maintenance_since_us) : 0);
    if (maintenance == w->maintenance)
        return;
    w->maintenance = maintenance;
    session *next;
    worker_walk_begin(w);
    for (session *s = w->sessions; s; s = next) {
        next = s->next;
        if (!maintenance && s->phase == PHASE_HELD)
            session_release_held(s); /* may close s, and only s */
        else
            session_arm(s);
    }
    worker_walk_end(w);
}

static void worker_kill_session(worker *w, uint64_t id)
{
    for (session *s = w->sessions; s; s = s->next) {
        if (s->slot && s->slot->id == id) {
            log_info("client %s: session %llu killed by an administrator", s->client_addr,
                     (unsigned long long)id);
            session_close(s, PG_SQLSTATE_ADMIN_SHUTDOWN,
                          "terminating connection due to administrator command");
            return;
        }
    }
}

static void worker_on_channel(evutil_socket_t fd, short what, void *arg)
{
    worker *w = arg;
    channel_msg m;
    (void)what;
    for (;;) {
        ssize_t n = recv(fd, &m, sizeof(m), MSG_DONTWAIT);
        if (n == 0) {
            /* The master is gone; PR_SET_PDEATHSIG also delivers SIGTERM. */
            event_del(&w->ev_channel);
            return;
        }
        if (n != (ssize_t)sizeof(m))
            return;
        switch (m.cmd) {
        case CHANNEL_LOOK_AGAIN:
            worker_look_again(w);
            break;
        case CHANNEL_KILL_SESSION:
            worker_kill_session(w, m.arg);
            break;
        default:
            log_warning("unknown channel command %u from the master", m.cmd);
        }
    }
}

static void worker_on_signal(evutil_socket_t sig, short what, void *arg)
{
    worker *w = arg;
    (void)what;
    switch (sig) {
    case SIGUSR1:
        if (log_reopen() != 0)
            log_error("cannot reopen the log file: %s", strerror(errno));
        break;
    case SIGTERM:
        worker_begin_graceful(w);
        break;
    case SIGINT:
        w->stop = WORKER_FAST;
        worker_stop_accepting(w);
        worker_close_all(w, "terminating connection: pgrelay fast shutdown");
        event_base_loopbreak(w->base);
        break;
    case SIGQUIT:
        _exit(0);
    }
}

void worker_main(int index, const config *cfg, shm_segment *shm, int *const listen_fds[2],
                 int n_workers, int channel_fd)
{
    static const int signals[] = {SIGTERM, SIGINT, SIGQUIT, SIGUSR1};
    char tag[32];

    /* When the master dies, drain and leave rather than serve unsupervised. */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != shm->master_pid)
        _exit(0);
    snprintf(tag, sizeof(tag), "worker %d", index);
    log_set_process(tag);

    worker *w = calloc(1, sizeof(*w));
    if (!w) {
        log_error("out of memory starting the worker");
        _exit(1);
    }
    worker_self = w;
    w->index = index;
    w->cfg = malloc(sizeof(*w->cfg));
    if (!w->cfg) {
        log_error("out of memory starting the worker");
        _exit(1);
    }
    memcpy(w->cfg, cfg, sizeof(*w->cfg));
    w->channel_fd = channel_fd;
    w->shm = shm;
    w->row = &shm->workers[index];
    w->slot_hint = (uint32_t)index * (shm->max_sessions / (shm->n_workers ? shm->n_workers : 1));
    w->settings_version = shm_settings_read(shm, w->cfg);
    w->routes_version = shm_routes_read(shm, &w->routes);
    w->maintenance = atomic_load(&shm->maintenance) != 0;
    atomic_store(&w->row->maintenance_seen_us,
                 w->maintenance ? atomic_load(&shm->maintenance_since_us) : 0);

    w->base = event_base_new();
    if (!w->base) {
        log_error("cannot create the event loop");
        _exit(1);
    }
    for (size_t i = 0; i < sizeof(signals) / sizeof(signals[0]); i++) {
        w->ev_signals[i] = evsignal_new(w->base, signals[i], worker_on_signal, w);
        evsignal_add(w->ev_signals[i], NULL);
    }
    signal(SIGPIPE, SIG_IGN);
    w->n_listen_workers = n_workers;
    w->listeners = calloc(2 * (size_t)n_workers, sizeof(*w->listeners));
    if (!w->listeners) {
        log_error("out of memory starting the worker");
        _exit(1);
    }
    for (int i = 0; i < 2 * n_workers; i++) {
        worker_listener *l = &w->listeners[i];
        l->w = w;
        l->owner = i % n_workers;
        l->read_port = i >= n_workers;
        l->fd = listen_fds[l->read_port][l->owner];
        if (l->fd >= 0)
            event_assign(&l->ev, w->base, l->fd, EV_READ | EV_PERSIST, worker_on_accept, l);
    }
    evtimer_assign(&w->ev_accept_resume, w->base, worker_on_accept_resume, w);
    atomic_store(&w->row->heartbeat_us, worker_clock_us());
    struct timeval beat = {0, WORKER_HEARTBEAT_MS * 1000};
    event_assign(&w->ev_heartbeat, w->base, -1, EV_PERSIST, worker_on_heartbeat, w);
    evtimer_add(&w->ev_heartbeat, &beat);
    worker_listeners_update(w);
    event_assign(&w->ev_channel, w->base, channel_fd, EV_READ | EV_PERSIST, worker_on_channel, w);
    event_add(&w->ev_channel, NULL);

    log_debug("ready");
    event_base_dispatch(w->base);
    log_info("exiting (%s)", w->stop == WORKER_FAST ? "fast shutdown" : "graceful shutdown");
    _exit(0);
}
