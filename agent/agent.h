/* agent.h - pgrelay-agent: probes every node with libpq and decides who the write leader is. */
#ifndef PGRELAY_AGENT_H
#define PGRELAY_AGENT_H

#include <event2/event.h>
#include <event2/event_struct.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stdint.h>

#include "config.h"
#include "shm.h"

typedef enum probe_state {
    PROBE_IDLE = 0,   /* waiting for the next interval */
    PROBE_CONNECTING, /* PQconnectPoll in progress */
    PROBE_QUERYING,   /* the probe query is out, waiting for its result */
} probe_state;

/* What the agent knows of the leader Patroni names ([agent] ha_source = patroni). */
typedef enum ha_view {
    HA_VIEW_UNKNOWN = 0, /* no poll round has finished yet: the first table waits for one */
    HA_VIEW_ANSWERED,    /* a member answered: only the node it names leader takes writes */
    HA_VIEW_SILENT,      /* no member answered the last round: the probes alone decide */
} ha_view;

/* One database node as the agent sees it. */
typedef struct agent_node {
    int index;                 /* position in cfg->nodes and in the published table */
    shm_node view;             /* what is published for it (address resolved once) */
    PGconn *conn;              /* persistent monitoring connection, NULL when closed */
    probe_state state;
    int sock;                  /* socket ev_io is registered on, -1 when none */
    short io_what;             /* events ev_io waits for */
    struct event ev_io;
    struct event ev_timeout;   /* health_timeout of the probe in flight */
    int64_t started_us;        /* when the probe in flight started */
    bool probed;               /* at least one probe finished */
    bool last_ok;              /* the last probe succeeded */
    int fails;                 /* failed probes in a row */
    bool fails_are_timeouts;   /* every one of those failures was a timeout (slow, not gone) */
    bool slow_logged;          /* "slow leader kept" logged for this run of failures */
    int oks;                   /* good probes in a row */
    int probes_on_conn;        /* probes started on the current monitoring connection */
    bool in_recovery;          /* last good probe */
    uint64_t lsn;              /* current (primary) or replay (replica) LSN, as bytes */
    int64_t replay_age_ms;     /* replica: now() - pg_last_xact_replay_timestamp(); -1 when
                                  nothing was replayed since it started (unknown, not 0) */
    bool streaming;            /* replica: its WAL receiver exists and streams */
    uint32_t timeline;         /* primary: current timeline; replica: received one; 0 unknown */
    uint64_t receive_lsn;      /* replica: pg_last_wal_receive_lsn(), as bytes (0 = none) */
    int64_t receive_moved_us;  /* when receive_lsn last changed (or was first seen) */
    const char *not_fit_kind;  /* the rule it fails for reads, as last logged (a fixed string;
                                  each change logged once), NULL when fit or not logged */
    bool ha_primary_logged;    /* a primary Patroni does not name: logged once per spell */
} agent_node;

#define LEADER_SAMPLES 16 /* recent WAL positions of the leader, for replica lag */

/* The leader's WAL position at one moment. */
typedef struct lsn_sample {
    int64_t at_us;
    uint64_t lsn;
} lsn_sample;

typedef struct agent {
    config *cfg;
    struct event_base *base;
    shm_segment *shm;          /* NULL when run by hand without a master (decisions logged) */
    int channel_fd;            /* to the master; -1 when run by hand */
    agent_node nodes[CONFIG_MAX_NODES];
    int n_nodes;
    struct event ev_tick;      /* every health_interval */
    struct event ev_channel;
    int leader;                /* index of the write leader, -1 for none */
    uint64_t epoch;            /* grows at every leader change; starts from shared memory */
    shm_leader_change change;  /* how the leader last left a node (published with the table) */
    int forced;                /* leader pinned by `set leader NODE force`, -1 when none */
    bool conflict_logged;      /* two primaries reported; logged once per occurrence */
    bool split_brain;          /* at the leader's last good probe another node was primary too:
                                  that one takes no writes while the leader is not down */
    shm_route_table *published; /* last table written, to tell what changed */
    /* Coordinated mode: what the control plane last said (its threads tell the event loop). */
    bool control_on;           /* [control] endpoint configured and threads running */
    struct event ev_control;   /* control_msg from the control threads */
    char control_leader[CONFIG_NAME_MAX]; /* "" = no opinion */
    uint64_t control_epoch;
    int64_t control_seen_us;   /* last answer; 0 = never or unreachable past the grace */
    bool control_lag_logged;   /* its epoch is behind ours: logged once */
    bool control_conflict_logged; /* it named another leader under our epoch: logged once */
    bool control_lost;         /* it was heard, then silent past control_grace_period: the
                                  control_lost setting rules until it answers again */
    bool writes_stopped;       /* control_lost: the table names no leader (the epoch and
                                  a->leader are kept: this is a hold, not a leader change) */
    uint64_t saved_epoch;      /* epoch last written to the state file */
    char saved_leader[CONFIG_NAME_MAX]; /* leader last written to it */
    lsn_sample leader_lsn[LEADER_SAMPLES]; /* ring of the leader's positions */
    int n_leader_lsn;          /* samples in the ring (up to LEADER_SAMPLES) */
    int next_leader_lsn;       /* where the next sample goes */
    /* ha_source = patroni: what its thread (ha_patroni.c) last reported. */
    bool ha_on;                /* ha_source = patroni and the poll thread runs */
    struct event ev_ha;        /* ha_msg from the poll thread */
    int ha_view;               /* ha_view */
    int ha_leader;             /* node Patroni names leader; -1: none (its leader key is gone)
                                  or a member that is no configured node */
    char ha_member[CONFIG_NAME_MAX]; /* Patroni's name of its leader member, "" for none */
    char ha_host[CONFIG_HOST_MAX]; /* its PostgreSQL host and port as Patroni gives them */
    int ha_port;
    bool ha_leader_alive;      /* that member's own Patroni answers its REST API */
    bool ready;                /* the leader was confirmed by a probe (or every node probed):
                                  until then nothing is published, so write sessions wait and a
                                  restarted agent does not disturb the table the workers use */
} agent;

/* state.c: the epoch and leader kept across restarts (state_file). The path, or -1 when
 * there is none; load returns false when there is no usable file; save returns 0 or -1
 * (logged). */
int agent_state_path(const config *cfg, char *buf, size_t len);
bool agent_state_load(const config *cfg, uint64_t *epoch, char *leader, size_t len);
int agent_state_save(const config *cfg, uint64_t epoch, const char *leader);

/* probe.c: start a probe of every idle node; results call leader_decide(). */
void probe_all(agent *a);
/* The same with new connections (a worker could not connect, or a session waits for a leader:
 * only a fresh connection shows a postmaster that accepts no one). */
void probe_all_fresh(agent *a);
/* Take the node's probe in flight off the event loop (its events deleted where libevent has
 * them) and mark it idle; the connection stays. Before a node is copied or moved: deleting an
 * event through a copy relinks libevent's queues from stale pointers. */
void probe_node_detach(agent_node *n);
/* The same, and close the node's monitoring connection. */
void probe_node_close(agent_node *n);

/* leader.c: decide the write leader from the nodes' latest probes; publish when anything
 * changed. reason says what triggered the decision (for the history). */
void leader_decide(agent *a);

/* Switch the leader on an operator's request. Returns 0, or -1 with why. */
int leader_set(agent *a, int index, bool force, char *why, size_t len);

/* Write the current view into shared memory (and poke the master when routing changed). */
void leader_publish(agent *a, bool force_poke);

/* Patroni's word changed (ha_patroni.c, on the event loop): decide again. */
void leader_ha_changed(agent *a);

/* ha_patroni.c: start the thread that polls the members' GET /cluster when ha_source =
 * patroni. Returns the descriptor the event loop reads its ha_msg from, or -1 (not configured,
 * or it could not start: logged). */
int ha_patroni_start(agent *a);
/* Read what the thread reported (ev_ha's callback). */
void ha_patroni_on_msg(evutil_socket_t fd, short what, void *arg);
/* Map Patroni's leader to a node again (the node list was reloaded). */
void ha_patroni_remap(agent *a);

/* Remember the leader's WAL position at a probe (called for the leader's good probes). */
void leader_record_lsn(agent *a, int64_t at_us, uint64_t lsn);

#endif
