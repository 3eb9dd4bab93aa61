/* store.h - the durable store: one libpq connection, bounded waits, schema migration, queries. */
#ifndef PGRELAY_STORE_H
#define PGRELAY_STORE_H

#include "state.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#define STORE_STATE_MAX 16 /* "preparing", "committed", "aborted" */
#define STORE_TYPE_MAX  32 /* a command's type, with its terminating zero */

/* Outcome of acknowledging a command. */
typedef enum store_ack_result {
    STORE_ACK_ERROR = -1,  /* the store failed */
    STORE_ACK_UNKNOWN = 0, /* no such command for this proxy */
    STORE_ACK_RECORDED,    /* recorded now */
    STORE_ACK_DUPLICATE,   /* it was acknowledged before; nothing changed */
} store_ack_result;

/* Remember the conninfo and try to connect once (failure is logged, not fatal). */
void store_init(const char *conninfo);
void store_close(void);

/* From now on the calling thread uses a connection of its own (the lease thread, the store
 * worker); store_drop_own_connection closes it before the thread ends. */
void store_use_own_connection(void);
void store_drop_own_connection(void);

/* No call of the calling thread's connection runs past this monotonic time (0: no cap); one
 * started after it fails at once. */
void store_set_cap(int64_t mono_ms);

/* The calling thread's connection's cap (0: none). */
int64_t store_get_cap(void);

/* The last store call of the event loop, or check of the store worker it was told of
 * (store_note), succeeded. */
bool store_up(void);

/* Event loop: what the store worker found (up, or down with error). */
void store_note(bool up, const char *error);

/* Text of the last failure ("" when none). */
const char *store_error(void);

/* Milliseconds since the event loop's last successful call, or store_touch(). */
int64_t store_idle_ms(void);

/* Event loop: the store was just found reachable (by the store worker). */
void store_touch(void);

/* Connect if needed and run SELECT 1. Returns 0 or -1. */
int store_ping(void);

/* The calling thread's connection waits at most ms for a lock, in the store itself (0: as the
 * server is configured). A statement the client gives up on (STORE_TIMEOUT_MS) leaves its
 * backend waiting on the lock until the lock goes; under a shorter lock_timeout the server
 * ends the wait first and the connection stays usable. 0 or -1 (store_error()). A reset (0)
 * does not connect: a new connection has the server's setting. */
int store_lock_timeout(int ms);

/* Create or upgrade the schema (pgrelay.*), serialised between replicas by an advisory
 * lock. Returns 0 or -1. */
int store_migrate(void);

/* Take or renew the lease row for duration_s. *held says whether this identity holds it now,
 * and *term its lease_transitions then (the term it holds it for); holder (may be NULL)
 * receives the current holder's identity ("" when none). 0 or -1. */
int store_lease_take(const char *name, const char *identity, int duration_s, bool *held,
                     int64_t *term, char *holder, size_t holder_len);

/* The lease the holder's conditional writes check (store_operations.c): name, identity and
 * term while held; identity "" after losing it (every such write then changes nothing);
 * name NULL when leases are disabled (no condition). */
void store_lease_set_guard(const char *name, const char *identity, int64_t term);

/* The guard's name (NULL: none), identity and term (as text into term, STORE_INT_MAX). */
void store_lease_guard(const char **name, const char **identity, char *term);

/* Give the lease up if this identity holds it, waiting at most timeout_ms. 0 or -1. */
int store_lease_release(const char *name, const char *identity, int timeout_ms);

/* Insert a deployment or update its token digest. 0 or -1. */
int store_deployment_save(const char *name, const char *token_sha256, bool is_auto);

/* Everything a new holder needs: deployments (with leadership) and their proxies, added to
 * *head. 0 or -1. */
int store_load(state_deployment **head);

int store_proxy_save(const state_proxy *p);

/* store_proxy_save for n proxies (of any deployments) in one statement. 0 or -1. */
int store_proxies_save(state_proxy *const *list, int n);

/* The rows store_proxies_save writes, as JSON text (malloc'd), or NULL (out of memory). */
char *store_proxies_json(state_proxy *const *list, int n);

/* Write rows made by store_proxies_json (any thread: no state is read). 0 or -1. */
int store_proxies_save_text(const char *rows);

/* Persist a leadership decision. The store takes only a higher epoch, or the same epoch with
 * the same leader, so that one epoch never names two leaders: 0 saved, 1 refused (*stored_epoch
 * and stored_leader, STATE_NODE_NAME_MAX, receive what the store holds), -1 store failure. */
int store_leadership_save(const char *deployment, const char *leader, int64_t epoch,
                          int64_t *stored_epoch, char *stored_leader);

/* A command of a type with JSON args for the given proxies; returns its id or -1. */
int64_t store_command_create(const char *deployment, const char *type, json_t *args,
                             state_proxy *const *targets, int n_targets);

/* store_command_create for the proxies named (any thread: no state is read). */
int64_t store_command_create_ids(const char *deployment, const char *type, json_t *args,
                                 const char *const *node_ids, int n_targets);

/* One proxy's unacknowledged commands, read by store_commands_pending_many. */
typedef struct store_pending {
    json_t *commands; /* [{"id", "type", "args"}] (new reference), NULL when the store failed */
    int64_t since_ms; /* time since the most recent earlier delivery of any of them, or -1
                         when one was never delivered before */
} store_pending;

/* The unacknowledged commands of n proxies of one deployment, marked delivered, in one
 * statement: out[i] is node_ids[i]'s (a node id may come twice: both get the same list).
 * 0, or -1 (every out[i].commands NULL). */
int store_commands_pending_many(const char *deployment, const char *const *node_ids, int n,
                                store_pending *out);

/* One acknowledgement of store_command_ack_many: what the proxy said, and what came of it. */
typedef struct store_ack_item {
    int64_t id;             /* the command */
    const char *deployment; /* of the proxy */
    const char *node_id;    /* the proxy */
    bool ok;                /* its answer */
    const char *detail;     /* what it said ("" when nothing) */
    store_ack_result result;   /* out: what came of it */
    char type[STORE_TYPE_MAX]; /* out, on STORE_ACK_RECORDED: the command's type */
    json_t *args;              /* out, on STORE_ACK_RECORDED: its args (new reference) */
} store_ack_item;

/* Record n proxies' answers to commands (of any deployments) in one statement; the second of
 * two for the same command and proxy is a duplicate; STORE_ACK_ERROR with 0 returned: the
 * lease guard let it through no more. 0, or -1 (every result STORE_ACK_ERROR). */
int store_command_ack_many(store_ack_item *items, int n);

/* Mark a command's unacknowledged targets as answered (ok = false, detail). 0 or -1. */
int store_command_cancel(int64_t id, const char *detail);

/* Delete commands older than retention_ms. Returns how many, or -1. */
int store_commands_expire(int64_t retention_ms);
/* Delete deployment's pause renewals (maintenance commands whose args carry "renewal": true)
 * older than command before_id, with their acks; lease-guarded. How many, or -1. */
int store_commands_prune_renewals(const char *deployment, int64_t before_id);

/* ---- configuration applies (store_config.c): every write conditional on the lease guard ---- */

/* A new configuration version (above the stored ones and above min_version) in state
 * "preparing" and its operation (kind "config", step "prepare", targets_json the JSON array
 * of the node ids it goes to), in one statement. *version and *op_id receive them. 0 or -1. */
int store_config_begin(const char *deployment, const char *text, int64_t min_version,
                       const char *targets_json, int64_t timeout_s, int64_t *version,
                       int64_t *op_id);

/* Record the operation's config_prepare command. 0 or -1. */
int store_config_prepared(int64_t op_id, int64_t command_id);

/* The commit decision: the version becomes the deployment's (committed) and the operation
 * moves to its commit step, in one statement. 0 or -1. */
int store_config_commit(const char *deployment, int64_t version, int64_t op_id,
                        const char *detail);

/* Roll an apply back: its version is deleted (the number is free again), the operation ends
 * "rolled_back" with outcome, its unanswered commands are withdrawn; one statement. 0 or -1. */
int store_config_roll_back(const char *deployment, int64_t version, int64_t op_id,
                           const char *outcome);

/* End the apply's answer step: state "committed" (the version is the deployment's but some
 * proxies of its set have not reported it: outcome names them; the record stays open, ended_at
 * empty) or "done" (every proxy of the set is on it), from "running" or from "committed".
 * 0 or -1. */
int store_config_end(int64_t op_id, const char *state, const char *outcome);

/* The applies in state "committed" as [{"id", "deployment", "version", "targets"}], or NULL
 * when the store failed. */
json_t *store_config_committed(void);

/* How many targets of a command answered ok (*ok) out of how many it went to (*total). */
int store_command_answers(int64_t command_id, int *ok, int *total);

/* The newest committed version (0 and *text NULL when none); *text (may be NULL: not read)
 * is malloc'd. 0 or -1. */
int store_config_current(const char *deployment, int64_t *version, char **text);

/* Versions left "preparing" without a running operation (earlier schemas): deleted. Returns
 * how many, or -1. */
int store_config_recover(void);

/* ---- operations (store_operations.c): every write conditional on the lease guard ---- */

/* A new running operation at step "begin"; its id, or -1. */
int64_t store_operation_create(const char *deployment, const char *kind, const char *node,
                               const char *old_leader, bool promote, bool force,
                               int64_t timeout_s);

/* Record that step starts now (before it is acted on), with what is known so far. 0 or -1. */
int store_operation_step(int64_t id, const char *step, const char *runner, bool fenced,
                         bool promote_sent);

/* The last recorded step's outcome. 0 or -1. */
int store_operation_note(int64_t id, const char *detail);

/* End a running operation: state "done", "failed" or "rolled_back", with its outcome. */
int store_operation_end(int64_t id, const char *state, const char *outcome);

/* Operations (newest first, at most limit; of one deployment unless NULL; only the running
 * ones when running_only) as JSON objects, or NULL when the store failed. */
json_t *store_operations_list(const char *deployment, int limit, bool running_only);

/* Withdraw the unacknowledged commands of an operation (args.operation = id). 0 or -1. */
int store_operation_cancel_commands(int64_t id, const char *detail);

#endif
