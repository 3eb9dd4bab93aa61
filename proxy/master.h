/* master.h - the master process: listen sockets, shared memory, worker supervision, signals,
 * and the operations the admin console asks of it. */
#ifndef PGRELAY_MASTER_H
#define PGRELAY_MASTER_H

#include <event2/event.h>
#include <event2/event_struct.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "config.h"
#include "shm.h"

typedef enum master_stop {
    MASTER_RUNNING = 0, /* supervising */
    MASTER_GRACEFUL,    /* SIGTERM passed on; waiting for workers to drain */
    MASTER_FAST,        /* SIGINT passed on; waiting for workers to exit */
} master_stop;

/* One row of the process table. */
typedef struct master_child {
    pid_t pid;            /* 0 when not running */
    int64_t started_us;
    int backoff_ms;       /* delay before the next respawn */
    int channel_fd;       /* master's end of the child's channel, -1 when not running */
    struct event ev_channel; /* messages from the child */
    struct event ev_respawn;
} master_child;

/* Command-line choices that outlive parsing (reload needs them). */
typedef struct master_options {
    const char *pidfile;  /* NULL when none */
    int verbose;          /* -v count, added to log_level */
    bool quiet;           /* -q: errors only */
} master_options;

typedef struct master {
    config *cfg;          /* running configuration */
    master_options opts;
    shm_segment *shm;
    int shm_fd;
    int *listen_fds[2];    /* write port, read-only port: one socket per worker, in one
                            * SO_REUSEPORT group per port (-1 when the port is off); kept
                            * here so that a respawned worker takes over its dead one's */
    struct event_base *base;
    struct event ev_signal_pipe;
    struct event ev_kill_deadline;
    struct event ev_maintenance_end;
    master_child *children;       /* workers 0..n_workers-1, then the agent if enabled */
    int n_children;
    int n_workers;
    char agent_path[4096];        /* program started as the agent (PATH_MAX) */
    int64_t last_probe_request_us; /* rate limit of worker -> agent probe requests */
    master_stop stop;
    int64_t started_us;
} master;

/* Run the master with open listen sockets (see master.listen_fds). Returns the exit code. */
int master_run(config *cfg, int *const listen_fds[2], const master_options *opts);

/* Re-read the configuration file. Returns 0 when applied; -1 when the file is invalid (the
 * running configuration stays) with a summary in msg. */
int master_reload(master *m, char *msg, size_t msglen);

/* Begin a shutdown, as SIGTERM (graceful) or SIGINT (fast) would. */
void master_shutdown(master *m, master_stop how);

/* Maintenance mode on (timeout_ms > 0: resume automatically after it) or off. */
void master_set_maintenance(master *m, bool on, int timeout_ms);

/* Ask the worker owning session id to close it. Returns 0, or -1 when no such session. */
int master_kill_session(master *m, uint64_t id);

/* Tell every worker to look at shared memory again. */
void master_poke_workers(master *m);

/* Ask the agent to make NODE (index in the routing table) the write leader. The caller has
 * checked it; returns -1 when no agent runs. */
int master_set_leader(master *m, int node, bool force);

/* The effective log level for a config's log_level and the command-line flags. */
int master_effective_log_level(const master *m, int configured);

#endif
