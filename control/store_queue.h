/* store_queue.h - store writes the event loop asks for and does not wait on: a command for
 * proxies, an operation's records, the operator's maintenance. Each is a job of the store
 * worker (store_worker.h), so they run in the order they were asked for, after every store job
 * queued before them, and never hold the loop. */
#ifndef PGRELAY_STORE_QUEUE_H
#define PGRELAY_STORE_QUEUE_H

#include "state.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

/* Called on the loop once a queued write is done: its outcome (for a command, its id, or -1
 * with error set). */
typedef void (*store_queue_then)(const char *deployment, int64_t id, const char *error, void *arg);

/* Queue a command (args stolen) for targets (copied: they may be gone by then). Once it is in
 * the store its targets' parked polls are woken; then (if set) is called. A failure is logged. */
void store_queue_command(state_deployment *dep, const char *type, json_t *args,
                         state_proxy *const *targets, int n, store_queue_then then, void *arg);

/* The same for one proxy by node id (nothing when it is unknown). */
void store_queue_command_one(state_deployment *dep, const char *node_id, const char *type,
                             json_t *args);

/* An operation's last step's outcome; its end; its unacknowledged commands withdrawn. */
void store_queue_operation_note(const char *deployment, int64_t op_id, const char *detail);
void store_queue_operation_end(const char *deployment, int64_t op_id, const char *state,
                               const char *outcome);
void store_queue_operation_cancel(const char *deployment, int64_t op_id, const char *detail);

/* A configuration operation's end (state "done" or "committed", with its outcome). */
void store_queue_config_end(const char *deployment, int64_t op_id, const char *state,
                            const char *outcome);

/* The operator's maintenance of deployment, on until until_ms (0: until off) or off; then
 * (if set) gets 0 or -1. */
void store_queue_maintenance(const char *deployment, bool on, int64_t until_ms,
                             store_queue_then then, void *arg);

/* A job that does nothing: its then runs once every store write queued before it is done. */
void store_queue_barrier(const char *deployment, store_queue_then then, void *arg);

#endif
