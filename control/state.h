/* state.h - the lease holder's in-memory picture: deployments, proxies, and their telemetry. */
#ifndef PGRELAY_STATE_H
#define PGRELAY_STATE_H

#include "cconfig.h"
#include "control.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#define STATE_NODE_ID_MAX      129  /* node_id of a proxy, NUL included */
#define STATE_NODE_NAME_MAX    64   /* name of a database node, NUL included */
#define STATE_TEXT_MAX         256  /* hostname, version */
#define STATE_SAMPLES_MAX      3600 /* metrics samples kept per proxy (also bounded by retention) */
#define STATE_NODE_SAMPLES_MAX 64   /* samples kept per node of a proxy: the rate window at 1 s */
#define STATE_NODES_MAX        64   /* nodes followed per proxy (pgrelay's own limit) */
#define STATE_PENDING_MAX      64   /* undeclared node ids remembered per deployment */
#define STATE_LATENCY_BUCKETS  19   /* a node's latency_buckets in a metrics body (protocol.md) */

struct evhttp_request;
struct event;
struct operator_op;

/* The counters of one metrics sample, kept for rates over the retention window. A node's
 * samples have the same fields, clients being the proxy's sessions on the node. */
typedef struct state_sample {
    int64_t received_ms; /* control-plane wall clock when it arrived */
    int64_t ts_ms;       /* the agent's timestamp */
    int64_t clients;
    int64_t statements;
    int64_t bytes_in;
    int64_t bytes_out;
    int64_t errors;
    int64_t latency_us;           /* summed latency of the statements below */
    int64_t statements_completed; /* statements whose closing ReadyForQuery came back */
} state_sample;

/* What one proxy's last observation says about one database node, as the leader decision
 * counts it (leader.c): kept beside the JSON so that a decision reads no JSON. */
typedef struct state_node_view {
    char name[STATE_NODE_NAME_MAX];
    bool primary; /* seen up and not in recovery */
} state_node_view;

/* One database node's counters as one proxy reports them: a short ring, for per-node rates and
 * latency over the rate window. */
typedef struct state_node_series {
    char name[STATE_NODE_NAME_MAX];
    state_sample samples[STATE_NODE_SAMPLES_MAX]; /* ring, the oldest at samples_head */
    int64_t latency_buckets[STATE_NODE_SAMPLES_MAX]
                           [STATE_LATENCY_BUCKETS]; /* of the sample in
                                                     * the same slot: statements per latency bucket
                                                     * since the proxy started; all 0 when the agent
                                                     * sent none */
    int samples_head;
    int samples_n;
    uint64_t observation; /* the proxy's nodes_observation its newest sample came with */
} state_node_series;

/* One proxy host (one pgrelay-agent) of a deployment. */
typedef struct state_proxy {
    struct state_proxy *next;
    struct state_proxy *index_next; /* next in its bucket of the deployment's index */
    struct state_deployment *dep;
    char node_id[STATE_NODE_ID_MAX];
    bool declared;   /* the operator declared it (members.c): it votes, takes commands */
    json_t *options; /* declared: its per-proxy options (object); NULL when pending */
    char hostname[STATE_TEXT_MAX];
    char version[STATE_TEXT_MAX];
    json_t *listen;                   /* array of "addr:port" strings as registered */
    int64_t registered_ms;            /* wall clock of the last register */
    int64_t last_seen_ms;             /* wall clock of the last request */
    int64_t epoch;                    /* as the proxy last reported */
    char leader[STATE_NODE_NAME_MAX]; /* as the proxy last reported; "" = none */
    bool maintenance;                 /* as the proxy last reported */
    int64_t config_version;           /* applied configuration version (reports and commit acks) */
    bool dirty;                       /* fields above changed since the last write to the store */
    int64_t saved_seen_ms;            /* last_seen_ms as last written to the store */

    /* Telemetry: memory only, dropped after telemetry_retention. */
    json_t *last_metrics; /* the last metrics body as received (nodes included) */
    int64_t last_metrics_ms;
    json_t *nodes; /* the last "nodes" observation, or NULL */
    int64_t nodes_ms;
    uint64_t nodes_observation; /* counts the metrics calls with "nodes": a node series is
                                   current when its newest sample came with the last one
                                   (two calls may share a millisecond) */
    state_node_view *views; /* the named nodes of nodes, in order (leader.c); malloc'd */
    int n_views;
    json_t *queries; /* the last running-queries list, or NULL */
    int64_t queries_ms;
    json_t *schema; /* object: database name -> {"tables": [...], "received_ms"} */
    json_t *config; /* the last effective configuration reported, or NULL */
    int64_t config_ms;
    int64_t config_reported_version;
    state_sample *samples; /* ring of STATE_SAMPLES_MAX */
    int samples_head;      /* index of the oldest */
    int samples_n;
    state_node_series *node_series; /* per node, in order of first report; malloc'd */
    int node_series_n;

    /* A parked long poll (agents.c), or NULL. */
    struct evhttp_request *poll_req;
    struct event *poll_timer;
    struct event *poll_watch; /* readable socket of the parked poll: the agent hung up */
    uint64_t wakes;           /* agents_wake calls: a poll read before the last one reads again */
    bool wake_queued;         /* a read for its parked poll waits for the next batch (agents.c) */
    bool poll_marked;         /* commands were marked delivered for a poll that was gone when
                                 they were read: the next poll gets them at once */
} state_proxy;

/* One deployment: the proxies that share a token and a write leader. */
typedef struct state_deployment {
    struct state_deployment *next;
    char name[CCONFIG_NAME_MAX];
    char token_sha256[CONTROL_SHA256_HEX_LEN]; /* digest of its agents' token */
    bool is_auto;                              /* created by auto_register */
    bool configured;                           /* named in control.ini (now) */
    char leader[STATE_NODE_NAME_MAX];          /* coordinated write leader; "" = no opinion yet */
    int64_t epoch;                             /* only grows */
    int64_t config_version;     /* desired configuration: the newest committed version, 0 = none */
    state_proxy *proxies;       /* declared and pending, sorted by node_id */
    int n_declared;             /* proxies with declared set */
    int n_pending;              /* proxies without (at most STATE_PENDING_MAX) */
    struct operator_op *op;     /* orchestration in progress, or NULL */
    state_proxy **index;        /* proxies by node_id hash (state_find_proxy), or NULL */
    int index_size;             /* buckets of index: a power of two */
    struct event *decide_timer; /* a decision put off by the burst limit (leader.c), or NULL */
    int64_t burst_start_ms;     /* monotonic start of the current decision window (leader.c) */
    int burst_count;            /* decisions taken inline in that window */
    int64_t decide_at_ms;       /* wall clock from which the leader decision may come out otherwise
                                   than the last one (leader.c); 0 = at the next metrics call */
    bool leader_saving;         /* a decision is on its way to the store (leader.c) */
    int deleting;               /* proxy deletions on their way to the store (members.c) */
    json_t *members_busy;       /* {node_id: true} of the membership changes on their way */
    struct leader_waiter *leader_waiters; /* metrics calls answered once it is back */
} state_deployment;

/* All deployments (NULL when not active). */
state_deployment *state_deployments(void);

state_deployment *state_find_deployment(const char *name);

/* The deployment whose token digest is sha_hex, or NULL. */
state_deployment *state_deployment_by_digest(const char *sha_hex);

/* Create an auto_register deployment for a token digest (memory and store). NULL on a store
 * failure. */
state_deployment *state_auto_deployment(const char *sha_hex);

state_proxy *state_find_proxy(state_deployment *dep, const char *node_id);

/* Find or create (memory only; the caller saves it) a proxy. A new one is pending; when that
 * makes more than STATE_PENDING_MAX pending ones, the one seen longest ago is forgotten. */
state_proxy *state_get_proxy(state_deployment *dep, const char *node_id);

/* Declare a proxy or make it pending again (memory only; members.c writes the store). */
void state_set_declared(state_proxy *p, bool declared);

/* Live: its last request is at most proxy_timeout old, or a long poll of it is parked and
 * still connected. */
bool state_proxy_live(const state_proxy *p, int64_t now_ms);

/* Live declared proxies of a deployment, sorted by node_id: the ones orchestrations address
 * and the leader decision hears. *out is a malloc'd array (the caller frees it; NULL when there
 * is none). Returns how many, or -1 when out of memory (*out NULL): never fewer than there are. */
int state_live_proxies(state_deployment *dep, state_proxy ***out);

/* Something the leader decision reads changed (a declaration, an observation, an epoch, a
 * liveness): the next metrics call of the deployment decides again. */
void state_decide_again(state_deployment *dep);

/* Number of declared proxies and of live declared proxies. */
void state_count(state_deployment *dep, int *total, int *live);

/* Record the counters of a metrics sample (ring, oldest dropped). */
void state_add_sample(state_proxy *p, const state_sample *s);

/* The oldest and newest sample within window_ms of the newest; false when fewer than two. */
bool state_rate_window(const state_proxy *p, int64_t window_ms, const state_sample **first,
                       const state_sample **last);

/* Record the counters of one node of a metrics sample (its ring, oldest dropped), with its
 * latency histogram (STATE_LATENCY_BUCKETS counts; NULL: none reported). */
void state_add_node_sample(state_proxy *p, const char *node, const state_sample *s,
                           const int64_t *latency_buckets);

/* As state_rate_window, for one node's ring. */
bool state_node_rate_window(const state_node_series *ns, int64_t window_ms,
                            const state_sample **first, const state_sample **last);

/* The newest sample of a node if the proxy's last observation of nodes named it, else NULL
 * (a node since removed from its configuration). */
const state_sample *state_node_current(const state_proxy *p, const state_node_series *ns);

/* Drop telemetry older than telemetry_retention. */
void state_prune(int64_t now_ms);

/* Load deployments, leadership and proxies from the store (after migrating it and writing
 * the configured deployments into it), by the store worker; once loaded the replica is active
 * and then (if set) is called, on the loop. Nothing when active or loading already; a load
 * that fails is logged (the caller's timer tries again). */
void state_activate(void (*then)(void));

/* Forget everything (lease lost or shutdown): parked polls and orchestrations are answered
 * with 503 and reason first. */
void state_deactivate(const char *reason);

/* After a reload: tokens and the configured flag follow the new settings (memory and
 * store). */
void state_apply_config(void);

/* Write declared proxies whose fields or last-seen time changed to the store, many in one
 * statement (pending ones live in memory). */
void state_flush(void);

#endif
