/* shm.h - the shared-memory segment: routing table, per-worker stats, per-session slots.
 *
 * One writer per region, lock-free readers:
 *   - routes:   written by the master (static config) and later the agent; double-buffered so
 *               a writer that dies mid-update leaves the last good table in place.
 *   - workers:  each worker writes its own row; the master writes pid/start/restarts.
 *   - sessions: a slot is claimed with a CAS by the worker that owns the client and written only
 *               by it; the master frees the slots of a worker that died.
 *   - node stats: after the session slots, one block per worker of shm_node_stats rows (per
 *               node traffic counters and statement latency histogram), one per node_counts
 *               entry, written only by that worker, summed by readers.
 *   - plan rings: after those, one shm_plan_ring per worker: statements queued for EXPLAIN,
 *               written only by that worker (head), taken only by the agent's planner (tail).
 *   - plans:    after the rings, one shm_plans: the plans the agent's planner made, written
 *               only by it (a seqlock per entry), read by the console.
 */
#ifndef PGRELAY_SHM_H
#define PGRELAY_SHM_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "config.h"

#define SHM_MAGIC          0x70677237u /* "pgr7": bumped when the layout changes */
#define SHM_MAX_WORKERS    256
#define SHM_STMT_MAX       1024 /* bytes of statement text kept per session */
#define SHM_IDENT_MAX      64   /* user, database, application name */
#define SHM_TLS_MAX        64   /* "TLSv1.3 TLS_CHACHA20_POLY1305_SHA256" fits */
#define SHM_ADDR_MAX       64   /* "ip:port" of a client */
#define SHM_REFUSE_RESERVE 64   /* slots past max_client_conn, held only while refusing */

typedef enum shm_node_health {
    NODE_HEALTH_UNKNOWN = 0, /* not probed yet (static config: assumed usable) */
    NODE_HEALTH_UP,          /* answering */
    NODE_HEALTH_DOWN,        /* failed probes, or its address does not resolve */
} shm_node_health;

/* What Patroni says of a node ([agent] ha_source = patroni). */
typedef enum shm_node_ha {
    NODE_HA_NONE = 0,   /* no word: ha_source = none, or no Patroni member answered */
    NODE_HA_LEADER,     /* Patroni names it leader and that member's Patroni answers */
    NODE_HA_NOT_LEADER, /* Patroni names another member or none, or the named leader's own
                           Patroni does not answer: no writes go to it */
} shm_node_ha;

typedef struct shm_node {
    char name[CONFIG_NAME_MAX];
    char host[CONFIG_HOST_MAX];
    int port;
    int role;                       /* node_role: what the node is believed to be */
    int health;                     /* shm_node_health */
    struct sockaddr_storage addr;   /* resolved by the writer, so workers never resolve names */
    socklen_t addrlen;              /* 0 when the address could not be resolved */
    bool probed;                    /* the agent has a probe result (else role is the hint) */
    bool in_recovery;               /* last probe: pg_is_in_recovery() */
    bool readable;                  /* a replica fit for read sessions (health, lag limits) */
    uint64_t wal_lsn;               /* current LSN (primary) or replay LSN (replica) */
    int64_t lag_bytes;              /* leader's LSN minus this replay LSN; -1 unknown */
    int64_t lag_ms;                 /* how long it has been behind (replay age, capped by the
                                     * leader's samples); -1 unknown: not readable */
    int64_t last_probe_us;          /* when the last probe finished (shm_mono_us) */
    char last_error[128];           /* why the last probe failed, "" after a good one */
    int ha;                         /* shm_node_ha: Patroni's word on it */
} shm_node;

/* How the write leader last left a node: what sessions still on that node do. */
typedef enum shm_leader_change {
    LEADER_CHANGE_NONE = 0, /* the leader has not left a node yet (start, or a first leader) */
    LEADER_CHANGE_PLANNED,  /* a switchover (set leader, the control plane) away from a leader
                             * that still answered as primary: an open transaction there gets
                             * leader_change_grace to end */
    LEADER_CHANGE_FAILOVER, /* the old leader is down, unreachable, in recovery or deposed while
                             * not answering: its sessions are closed at once, so that nothing
                             * still in flight there is acknowledged when it wakes up */
} shm_leader_change;

typedef struct shm_route_table {
    uint64_t epoch;    /* grows by one at every change of write leader */
    int32_t leader;    /* index into nodes of the write leader, or -1 for none */
    uint32_t n_nodes;
    int32_t agent_pid; /* the agent that wrote this table, 0 = the master (static) */
    int32_t change;    /* shm_leader_change: how the leader last left a node */
    bool confirmed;    /* the leader (or its absence) was established by probes; false in the
                        * master's static table while an agent is to run: write sessions wait */
    shm_node nodes[CONFIG_MAX_NODES];
} shm_route_table;

#define SHM_HISTORY_MAX 32 /* leader changes kept for show leader history */

/* One change of write leader; written by the agent, read by the console. */
typedef struct shm_leader_event {
    int64_t at_us;
    uint64_t epoch;
    char from[CONFIG_NAME_MAX]; /* "" = none */
    char to[CONFIG_NAME_MAX];   /* "" = none */
    char reason[128];
} shm_leader_event;

/* A node's entry, keyed by node name (indexes move on reload): its live sessions, which every
 * worker adds to and takes from (relaxed atomic adds, once per session, never per statement).
 * Its traffic is counted per worker, in the shm_node_stats rows of the same index. Cache-line
 * aligned so that workers busy on different nodes do not share a line. */
typedef struct shm_node_count {
    _Alignas(64) _Atomic uint32_t used; /* 0 free, 1 holds the counters of the node named below */
    char name[CONFIG_NAME_MAX];
    _Atomic int32_t write_sessions; /* live sessions of the write port on this node */
    _Atomic int32_t read_sessions;  /* live sessions of the read-only port on this node */
} shm_node_count;

#define SHM_NODE_COUNTS (2 * CONFIG_MAX_NODES) /* entries of shm_segment.node_counts */

/* Statement latency buckets: upper bounds in microseconds, 100 us to 60 s (a 1-2.5-5 series,
 * then 30 and 60 s). A statement goes into the first bucket whose bound is >= its latency;
 * one more bucket past the last bound takes everything slower. */
#define SHM_LATENCY_BOUNDS 18
extern const uint32_t shm_latency_bounds_us[SHM_LATENCY_BOUNDS];

/* One worker's traffic to one node (the node of the node_counts entry with the same index):
 * counters and a latency histogram. Written only by that worker with plain relaxed stores
 * (shm_stat_add): a session adds what it gathered at the end of each statement, at close, and
 * after RELAY_NODE_FLUSH_BYTES of a long transfer. Readers sum the rows of every worker. Rows
 * are cache-line aligned and each worker's rows are contiguous, so no two workers ever write
 * the same line. */
typedef struct shm_node_stats {
    _Alignas(64) _Atomic uint64_t buckets[SHM_LATENCY_BOUNDS + 1]; /* completed statements per
                                                                    * latency bucket (not
                                                                    * cumulative); the last
                                                                    * one: slower than 60 s */
    _Atomic uint64_t latency_us; /* their summed latency, microseconds */
    _Atomic uint64_t statements; /* as shm_worker_stats.statements, on this node */
    _Atomic uint64_t bytes_in;   /* client -> this node */
    _Atomic uint64_t bytes_out;  /* this node -> client */
    _Atomic uint64_t errors;     /* sessions on this node that pgrelay ended with an error */
} shm_node_stats;

/* A node's shm_node_stats summed over workers (readers' copy, not in shared memory). */
typedef struct shm_node_totals {
    uint64_t buckets[SHM_LATENCY_BOUNDS + 1]; /* as shm_node_stats.buckets */
    uint64_t count;      /* all buckets together: statements completed */
    uint64_t latency_us; /* their summed latency */
    uint64_t statements; /* the other counters of shm_node_stats */
    uint64_t bytes_in;
    uint64_t bytes_out;
    uint64_t errors;
} shm_node_totals;

/* Header of a double buffer: one writer fills the half readers are not using, then flips.
 * A writer that dies mid-write leaves `current` on the last complete half. */
typedef struct shm_dbuf {
    _Atomic uint32_t current;  /* which half readers use */
    _Atomic uint64_t version;  /* bumped after every publish; cheap "has it changed" check */
    _Atomic uint32_t seq[2];   /* odd while half i is being written */
} shm_dbuf;

typedef struct shm_routes {
    shm_dbuf d;
    shm_route_table tab[2];
} shm_routes;

/* The bytes of the certificate, key and CA files the master read and checked at a reload, in
 * the order the proxy's tls.c gives them (a file not used has length 0). Workers build their
 * TLS contexts from these bytes, never from the files: every worker serves what the reload
 * checked, even when a file changes again before a worker looks. */
#define SHM_TLS_FILES 6
#define SHM_TLS_BYTES (16u << 20) /* all the files together, at most (CRLs included); only
                                   * the pages used take memory */
typedef struct shm_tls_files {
    uint32_t len[SHM_TLS_FILES];
    char data[SHM_TLS_BYTES]; /* the files one after the other */
} shm_tls_files;

typedef struct shm_settings_half {
    config cfg;
    shm_tls_files tls; /* copied up to the bytes used */
} shm_settings_half;

/* The effective configuration, published by the master at start and on every reload; workers
 * take the reloadable keys from it, and the certificate files with it. */
typedef struct shm_settings {
    shm_dbuf d;
    shm_settings_half half[2];
} shm_settings;

/* Counters of one worker; written only by that worker (relaxed), read by anyone. */
typedef struct shm_worker_stats {
    _Atomic uint64_t sessions_total;   /* client sessions accepted */
    _Atomic uint64_t server_connects;  /* successful connections to nodes */
    _Atomic uint64_t bytes_in;         /* client -> server */
    _Atomic uint64_t bytes_out;        /* server -> client */
    _Atomic uint64_t statements;       /* Query and Execute messages from clients */
    _Atomic uint64_t errors;           /* sessions pgrelay ended with an error */
    _Atomic uint64_t cancels;          /* cancel requests forwarded */
    _Atomic uint64_t statements_completed; /* statements (a Query, or messages up to a Sync)
                                            * whose closing ReadyForQuery came back */
    _Atomic uint64_t latency_us;           /* their summed latency: from the statement's first
                                            * message to that ReadyForQuery, microseconds */
} shm_worker_stats;

/* One worker's row. Cache-line aligned (its size a multiple of 64 bytes), so that the
 * counters one worker adds to per statement never share a line with another worker's. */
typedef struct shm_worker {
    _Alignas(64) _Atomic int32_t pid; /* 0 when no process is in this slot */
    int64_t started_at_us;      /* wall clock, microseconds */
    uint32_t restarts;          /* times the master re-forked this slot */
    _Atomic int32_t sessions;   /* live client sessions */
    _Atomic int64_t maintenance_seen_us; /* maintenance_since_us of the pause this worker acts
                                          * on, 0 when none (`pause wait` waits for it) */
    _Atomic int64_t heartbeat_us; /* CLOCK_MONOTONIC of the worker's last timer turn (set by the
                                   * master at fork): one older than WORKER_STUCK_MS (worker.c)
                                   * says it is stuck, and a neighbour accepts from its listen
                                   * sockets meanwhile */
    shm_worker_stats stats;
} shm_worker;

typedef enum shm_session_state {
    SESSION_FREE = 0,    /* slot unused */
    SESSION_STARTUP,     /* client connected, startup/authentication not finished */
    SESSION_IDLE,        /* ReadyForQuery 'I' seen and nothing sent since */
    SESSION_ACTIVE,      /* a statement is running */
    SESSION_IN_TX,       /* idle inside a transaction block ('T' or 'E') */
} shm_session_state;

typedef struct shm_session {
    _Atomic uint32_t state;        /* shm_session_state; FREE <-> non-FREE by CAS */
    _Atomic uint32_t seq;          /* odd while the owner rewrites the fields below */
    int32_t worker;                /* owning worker index */
    uint64_t id;                   /* session id, unique for the segment's life */
    uint32_t cancel_pid;           /* the cancel key pgrelay gave the client */
    uint32_t cancel_secret;
    _Atomic uint32_t backend_valid; /* 1 once the node's BackendKeyData is recorded */
    int32_t node;                  /* index of the node in the routing table at connect time */
    char node_name[CONFIG_NAME_MAX];  /* that node's name (indexes move on reload) */
    struct sockaddr_storage node_addr; /* where cancels for this session go */
    socklen_t node_addrlen;
    uint32_t backend_pid;          /* the node's own cancel key */
    uint32_t backend_secret;
    int64_t connected_at_us;       /* when the client connected (shm_mono_us) */
    int64_t stmt_start_us;         /* start of the current statement (shm_mono_us), 0 = none */
    uint64_t epoch;                /* routing epoch the session was routed in */
    bool read_port;                /* came in on the read-only port */
    char client_addr[SHM_ADDR_MAX];
    char user[SHM_IDENT_MAX];
    char database[SHM_IDENT_MAX];
    char application_name[SHM_IDENT_MAX];
    char tls[SHM_TLS_MAX];         /* client side's TLS version and cipher ("TLSv1.3
                                    * TLS_AES_256_GCM_SHA384"), "" in clear; set by the
                                    * worker once the handshake finished */
    char stmt[SHM_STMT_MAX];       /* text of the current or last statement */
} shm_session;

/* ---- query plans (proxy/plan_ring.c queues, agent/planner.c plans) ---- */

#define SHM_PLAN_RING       32   /* requests a worker's ring holds */
#define SHM_PLAN_TYPES_MAX  32   /* parameter types kept from a Parse */
#define SHM_PLAN_PARAMS_MAX 1024 /* bytes of a Bind's parameter values kept with a request */
#define SHM_PLANS_MAX       64   /* plans the agent keeps and publishes */
#define SHM_PLAN_JSON_MAX   16384 /* bytes of a plan's EXPLAIN JSON kept for the console */
#define SHM_PLAN_TEXT_MAX   8192 /* bytes of statement text a plan request carries (NUL incl.):
                                  * longer than the slot's stmt, kept while planning is on */

/* Why a statement was queued for planning. */
typedef enum shm_plan_reason {
    PLAN_REASON_NONE = 0, /* not queued */
    PLAN_REASON_SLOW,     /* its round trip took at least plan_slow_threshold */
    PLAN_REASON_SAMPLED,  /* picked at random (plan_sample_rate) */
    PLAN_REASON_RUNNING,  /* still running past plan_slow_threshold (seen by the agent) */
} shm_plan_reason;

/* What a request knows about its text and parameters (bits of shm_plan_request.flags). */
#define PLAN_REQ_EXTENDED      0x01u /* extended protocol: text from a Parse, values from a Bind */
#define PLAN_REQ_TRUNCATED     0x02u /* the text was longer than SHM_PLAN_TEXT_MAX - 1 (for a
                                      * running statement: than the slot's stmt): cut */
#define PLAN_REQ_BINARY        0x04u /* some parameter values are in binary format (see
                                      * shm_plan_request.binary) */
#define PLAN_REQ_PARAMS_LONG   0x08u /* the Bind's values exceed SHM_PLAN_PARAMS_MAX: not kept */
#define PLAN_REQ_UNKNOWN_STMT  0x10u /* the Bind names a prepared statement whose Parse pgrelay
                                      * did not see last: its text is not known */

/* One statement queued for planning: a copy, so the session may go on at once. */
typedef struct shm_plan_request {
    int64_t at_us;                   /* wall clock when it ended */
    int64_t duration_us;             /* its round trip: first message to ReadyForQuery */
    uint32_t reason;                 /* shm_plan_reason */
    uint32_t flags;                  /* PLAN_REQ_* */
    char node_name[CONFIG_NAME_MAX]; /* node it ran on */
    char user[SHM_IDENT_MAX];        /* the session's user: EXPLAIN runs under SET ROLE to it */
    char database[SHM_IDENT_MAX];    /* the session's database */
    uint16_t n_types;                /* parameter types the Parse declared (0 = inferred) */
    uint16_t n_params;               /* parameter values the Bind carried */
    uint32_t types[SHM_PLAN_TYPES_MAX]; /* their type OIDs (0 = unspecified) */
    uint8_t binary[SHM_PLAN_PARAMS_MAX / 32]; /* bit i: value i is in binary format (the
                                               * planner turns common types into text) */
    uint32_t params_len;             /* bytes used in params */
    char params[SHM_PLAN_PARAMS_MAX]; /* n_params of: int32 length (-1 = NULL), text bytes */
    char text[SHM_PLAN_TEXT_MAX];    /* statement text, NUL-terminated */
} shm_plan_request;

/* A worker's queue of requests: single producer (that worker), single consumer (the agent's
 * planner). head and tail only grow; entry i lives at req[i % SHM_PLAN_RING]. A full ring
 * drops the request (dropped++): the worker never waits. head and tail sit on lines of their
 * own so that the two sides do not share one. */
typedef struct shm_plan_ring {
    _Alignas(64) _Atomic uint64_t head; /* requests published (worker; release after the copy) */
    _Atomic uint64_t dropped;           /* requests lost to a full ring (worker) */
    _Atomic uint64_t sampled;           /* statements picked by plan_sample_rate (worker) */
    _Alignas(64) _Atomic uint64_t tail; /* requests taken (planner; release after its copy) */
    shm_plan_request req[SHM_PLAN_RING];
} shm_plan_ring;

/* One plan the agent made (or failed to make), as the console shows it. */
typedef struct shm_plan {
    _Atomic uint32_t seq;            /* odd while the planner rewrites this entry */
    uint32_t used;                   /* 0: empty slot */
    uint64_t id;                     /* hash of normalised text, database and user */
    uint32_t reason;                 /* shm_plan_reason of the request that made it */
    uint32_t changes;                /* times its shape (node types, relations) changed */
    int64_t planned_at_us;           /* wall clock of the EXPLAIN */
    int64_t duration_us;             /* duration of the statement that triggered it */
    double total_cost;               /* top node's Total Cost; -1 when there is no plan */
    char node_name[CONFIG_NAME_MAX]; /* node the statement ran on, where it was explained */
    char user[SHM_IDENT_MAX];        /* its user: the role the EXPLAIN ran as */
    char database[SHM_IDENT_MAX];    /* its database */
    char top_node[96];               /* "Seq Scan on t", "" when there is no plan */
    char error[256];                 /* why there is no plan ("" when there is one) */
    char text[SHM_STMT_MAX];         /* normalised statement text (its first 1023 bytes) */
    uint32_t json_len;               /* bytes in json; 0 with an error, or when too large */
    char json[SHM_PLAN_JSON_MAX];    /* EXPLAIN (FORMAT JSON) output, not NUL-terminated */
} shm_plan;

/* The planner's counters and plans (written by the agent only). */
typedef struct shm_plans {
    _Atomic uint64_t version;      /* bumped after every change of an entry */
    _Atomic uint64_t requests;     /* requests taken from the rings or made for running ones */
    _Atomic uint64_t planned;      /* EXPLAINs that gave a plan */
    _Atomic uint64_t failed;       /* EXPLAINs that failed (error stored) or could not connect */
    _Atomic uint64_t skipped;      /* not plannable: not SELECT/INSERT/UPDATE/DELETE/MERGE/
                                    * VALUES/WITH/TABLE, several statements, cut text, values
                                    * unknown */
    _Atomic uint64_t deduplicated; /* the same statement was planned within plan_max_age */
    _Atomic uint64_t rate_limited; /* dropped by plan_rate_limit */
    _Atomic uint64_t plan_changes; /* new plans whose shape differs from the previous one */
    shm_plan plans[SHM_PLANS_MAX];
} shm_plans;

typedef struct shm_segment {
    uint32_t magic;
    uint32_t n_workers;
    uint32_t max_sessions;
    size_t size;
    int32_t master_pid;
    int64_t started_at_us;
    _Atomic int32_t clients;           /* live client sessions, all workers */
    _Atomic uint64_t next_session_id;
    _Atomic uint32_t maintenance;      /* 1: hold new sessions and next statements (pause) */
    _Atomic int64_t maintenance_since_us; /* when it was turned on */
    _Atomic int64_t maintenance_until_us; /* automatic resume time, 0 = none */
    _Atomic uint64_t reloads;          /* configuration reloads applied */
    _Atomic uint64_t config_version;   /* control-plane configuration version applied, 0 = none */
    _Atomic uint32_t read_only_role;   /* 1: the control plane made this proxy read-only: new
                                        * write-port sessions are routed as read-port ones */
    _Atomic uint64_t history_count;    /* leader events written; entry i at i % MAX */
    _Atomic uint32_t history_starts;   /* of them, leaders confirmed at start (0 or 1): no
                                        * change, so not in pgrelay_leader_changes_total */
    shm_leader_event history[SHM_HISTORY_MAX];
    shm_node_count node_counts[SHM_NODE_COUNTS];
    _Atomic int32_t probe_requests;    /* workers ask the agent to probe now (see channel) */
    shm_routes routes;
    shm_settings settings;
    shm_worker workers[SHM_MAX_WORKERS];
    size_t latency_offset;             /* from the segment's start to n_workers blocks of
                                        * SHM_NODE_COUNTS shm_node_stats rows (after the sessions) */
    size_t plan_rings_offset;          /* to n_workers shm_plan_ring (after the rows) */
    size_t plans_offset;               /* to the shm_plans (after the rings) */
    shm_session sessions[];            /* max_sessions slots */
} shm_segment;

/* How high max_client_conn may go without a restart: the session slots made at start. */
static inline int shm_client_capacity(const shm_segment *shm)
{
    return (int)(shm->max_sessions - SHM_REFUSE_RESERVE);
}

/* Create an anonymous shared segment sized for cfg (inherited across fork; the fd can be passed
 * to an exec'd process). Returns NULL and logs on failure. */
shm_segment *shm_create(const config *cfg, int *fd_out);

/* Microseconds of wall-clock time: for times people read (timestamps shown or sent). */
int64_t shm_now_us(void);

/* Microseconds of CLOCK_MONOTONIC: for durations and deadlines, which a step of the wall clock
 * (NTP at boot, `date -s`) must not stretch or cut short. The clock is system-wide, so the
 * processes of one pgrelay compare each other's values in shared memory. */
int64_t shm_mono_us(void);

/* Routing table: writer side. Publishes a complete table; readers switch to it atomically. */
void shm_routes_publish(shm_segment *shm, const shm_route_table *tab);

/* Routing table: reader side. Copies the current table into out; returns its version. */
uint64_t shm_routes_read(shm_segment *shm, shm_route_table *out);

static inline uint64_t shm_routes_version(shm_segment *shm)
{
    return atomic_load_explicit(&shm->routes.d.version, memory_order_acquire);
}

/* Settings: the master publishes; workers read when the version moved. tls: the certificate
 * files checked with cfg, or NULL for none (at start, when workers inherit the contexts). */
void shm_settings_publish(shm_segment *shm, const config *cfg, const shm_tls_files *tls);
uint64_t shm_settings_read(shm_segment *shm, config *out);
/* The settings and the certificate files published with them, consistently, into out (the
 * caller's, as large as a half: only the bytes used are written). */
uint64_t shm_settings_read_tls(shm_segment *shm, shm_settings_half *out);

/* Bytes of tls in use: the lengths and the files (what a copy needs). */
size_t shm_tls_files_size(const shm_tls_files *tls);
static inline uint64_t shm_settings_version(shm_segment *shm)
{
    return atomic_load_explicit(&shm->settings.d.version, memory_order_acquire);
}

/* Fill a table from the static config: nodes resolved, the first primary as leader. */
void shm_routes_from_config(shm_route_table *tab, const config *cfg, uint64_t epoch);

/* Resolve a node's address into n->addr (a host starting with '/' is a socket directory). */
int shm_node_resolve(shm_node *n);

/* The counters of a node by name; NULL if the master has not created them. */
shm_node_count *shm_node_count_get(shm_segment *shm, const char *name);
/* Create the counters of a node if missing (master only: one writer, no duplicates).
 * Entries are never removed, so there is room for node renames over a few reloads. */
void shm_node_count_ensure(shm_segment *shm, const char *name);

/* Index of a node_counts entry (the row of its latency histograms). */
static inline size_t shm_node_count_index(const shm_segment *shm, const shm_node_count *c)
{
    return (size_t)(c - shm->node_counts);
}

/* Worker w's latency histogram of node_counts entry i. */
static inline shm_node_stats *shm_node_stats_row(shm_segment *shm, uint32_t w, size_t i)
{
    shm_node_stats *rows = (shm_node_stats *)(void *)((char *)shm + shm->latency_offset);
    return &rows[(size_t)w * SHM_NODE_COUNTS + i];
}

/* Worker w's queue of plan requests. */
static inline shm_plan_ring *shm_plan_ring_of(shm_segment *shm, uint32_t w)
{
    return &((shm_plan_ring *)(void *)((char *)shm + shm->plan_rings_offset))[w];
}

/* The agent's published plans. */
static inline shm_plans *shm_plans_of(shm_segment *shm)
{
    return (shm_plans *)(void *)((char *)shm + shm->plans_offset);
}

/* Copy plan entry i consistently (console, reporter). False when it is empty or was being
 * rewritten every time it was looked at. */
bool shm_plan_snapshot(shm_segment *shm, uint32_t i, shm_plan *out);

/* The bucket of a latency: the first whose bound is >= us (SHM_LATENCY_BOUNDS if none). Most
 * statements are fast, so a scan from the bottom ends after a few compares. */
static inline unsigned shm_latency_bucket(uint64_t us)
{
    unsigned b = 0;
    while (b < SHM_LATENCY_BOUNDS && us > shm_latency_bounds_us[b])
        b++;
    return b;
}

/* Sum the traffic rows of a node_counts entry over every worker into out. */
void shm_node_totals_read(shm_segment *shm, const shm_node_count *c, shm_node_totals *out);

/* Estimate quantile q (0..1) of a summed histogram in microseconds, by linear interpolation
 * inside the bucket that holds it (as Prometheus' histogram_quantile does; the slowest bucket
 * answers with the last bound). -1 when it holds no statement. */
double shm_latency_quantile_us(const shm_node_totals *h, double q);

/* What show nodes says a node is: "primary" or "replica" as its last good probe said, or
 * "unknown" when the agent has not heard from it (never answered, or down now); in the
 * master's static table (no probe yet, or agent = off) the configured role. */
const char *shm_node_role_name(const shm_route_table *t, uint32_t i);

/* Record a leader change (agent only). */
void shm_history_add(shm_segment *shm, uint64_t epoch, const char *from, const char *to,
                     const char *reason);

/* Session slots (max_client_conn + SHM_REFUSE_RESERVE of them). Claim a free slot for worker w, searching from hint. */
shm_session *shm_session_claim(shm_segment *shm, int worker, uint32_t hint);
void shm_session_release(shm_segment *shm, shm_session *s);
/* Free every slot a dead worker owned; returns how many. Only the master calls this. */
int shm_sessions_reclaim(shm_segment *shm, int worker);

/* Seqlock brackets for the owner's updates of a slot's fields. */
static inline void shm_session_write_begin(shm_session *s)
{
    atomic_fetch_add_explicit(&s->seq, 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
}
static inline void shm_session_write_end(shm_session *s)
{
    atomic_fetch_add_explicit(&s->seq, 1, memory_order_release);
}

/* Copy a slot consistently (for readers other than its owner). Returns false if it is free. */
bool shm_session_snapshot(shm_session *s, shm_session *out);

static inline void shm_stat_add(_Atomic uint64_t *c, uint64_t v)
{
    /* Single writer per counter: a relaxed load+store is enough and avoids a locked add. */
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + v,
                          memory_order_relaxed);
}

#endif
