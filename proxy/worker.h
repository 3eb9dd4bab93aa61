/* worker.h - a worker process: one libevent loop that accepts clients and relays their sessions. */
#ifndef PGRELAY_WORKER_H
#define PGRELAY_WORKER_H

#include <event2/event.h>
#include <event2/event_struct.h>
#include <stdbool.h>
#include <stdint.h>

#include "config.h"
#include "session.h"
#include "shm.h"

#define RELAY_BUF_SIZE (64 * 1024) /* one read() of relayed data */

typedef enum worker_stop {
    WORKER_RUNNING = 0, /* accepting and relaying */
    WORKER_GRACEFUL,    /* SIGTERM: no new sessions, live ones end at their next safe point */
    WORKER_FAST,        /* SIGINT: every session closed now */
} worker_stop;

struct worker;

/* A listen socket of one worker (each has its own per port, in the port's SO_REUSEPORT group);
 * a worker also accepts from a dead worker's until the master has respawned it. */
typedef struct worker_listener {
    struct worker *w;
    int fd;                       /* -1 when this port is off (or this worker stopped) */
    int owner;                    /* the worker whose socket it is */
    bool read_port;               /* sessions from it go to replicas */
    bool armed;                   /* ev is added: this worker accepts from it */
    struct event ev;
} worker_listener;

typedef struct worker {
    int index;                    /* 0..workers-1, also the row in shm->workers */
    struct event_base *base;
    config *cfg;                  /* this worker's copy; reloadable keys follow shm settings */
    uint64_t settings_version;    /* shm settings version cfg was taken at */
    shm_segment *shm;
    shm_worker *row;              /* this worker's row in shared memory */
    worker_listener *listeners;   /* every worker's sockets, [port * n_listen_workers + owner]
                                   * (write port 0, read-only port 1) */
    int n_listen_workers;         /* workers, i.e. sockets per port */
    struct event ev_accept_resume; /* re-enables accept after EMFILE */
    struct event ev_heartbeat;     /* WORKER_HEARTBEAT_MS: heartbeat_us, and a look at the
                                    * other workers (a stuck one's sockets are taken over) */
    struct event ev_shutdown;      /* shutdown_timeout deadline */
    struct event ev_channel;       /* messages from the master */
    int channel_fd;
    bool maintenance;              /* pause in force, as last seen in shm */
    struct event *ev_signals[4];
    worker_stop stop;
    session *sessions;            /* list of live sessions */
    int n_sessions;
    uint32_t slot_hint;           /* where the next slot search starts */
    shm_route_table routes;       /* local copy of the routing table */
    shm_route_table routes_prev;  /* the copy before, to see what changed */
    uint64_t routes_version;      /* shm version the copy was taken at */
    int64_t last_probe_request_us; /* rate limit of "probe now" requests (worker_clock_us) */
    int walk_depth;               /* > 0 while a walk over the session list runs: a routing
                                   * refresh then waits for it to end, since dealing with a
                                   * new table may close any session, the walk's next one too */
    bool routes_deferred;         /* a refresh was asked for during a walk */
    uint8_t scratch[RELAY_BUF_SIZE];
} worker;

/* The worker of this process (NULL in the master). */
extern worker *worker_self;

/* Entry point in the forked child; never returns. */
void worker_main(int index, const config *cfg, shm_segment *shm, int *const listen_fds[2],
                 int n_workers, int channel_fd) __attribute__((noreturn));


/* Refresh the local routing table if shared memory has a newer one; sessions on a node that
 * is no longer right are dealt with (route_table_changed). Called during a walk over the
 * session list, it only notes the request; the walk's end does it. */
void worker_routes_refresh(worker *w);

/* Bracket a walk over w->sessions whose steps may route sessions (see walk_depth). */
void worker_walk_begin(worker *w);
void worker_walk_end(worker *w);

/* CLOCK_MONOTONIC in microseconds: every deadline of a session, immune to clock steps. */
int64_t worker_clock_us(void);

/* Called by session_close: drop the session from the list; may end a draining worker. */
void worker_session_gone(worker *w, session *s);
void worker_session_added(worker *w, session *s);

#endif
