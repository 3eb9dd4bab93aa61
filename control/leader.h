/* leader.h - coordinated leadership: one write leader per deployment from all agents' reports. */
#ifndef PGRELAY_LEADER_H
#define PGRELAY_LEADER_H

#include "state.h"

#include <stdbool.h>
#include <stdint.h>

/* Re-decide a deployment's leader from the live proxies' node observations (after a metrics
 * call), when something the decision reads may have changed since the last one: an
 * observation (leader_observe), an epoch or leader a proxy reports, a declaration, a liveness
 * (state_decide_again), or the time at which a proxy or its observation goes stale. Otherwise
 * the decision would come out the same, and it costs nothing. A change is persisted before it
 * is announced; returns -1 when the store refused it (the old decision stays). */
int leader_decide(state_deployment *dep);

/* A decision of dep is on its way to the store: the metrics call req of node_id is answered
 * once it is back (true), or now by the caller (false). */
struct evhttp_request;
bool leader_wait(state_deployment *dep, struct evhttp_request *req, const char *node_id);

/* dep's state is dropped: the metrics calls waiting for a decision are answered 503. */
void leader_forget(state_deployment *dep);

/* Keep the summary of p's new nodes observation that the decision reads; true when it says
 * something else than the one it replaces (which then is counted again at the next metrics
 * call), or that one no longer counted (stale or gone). */
bool leader_observe(state_proxy *p, json_t *nodes, int64_t now);

/* The epoch under which a switchover saves its new leader: above every epoch in use, at
 * least epoch. The save itself is the store worker's (operator.c). */
int64_t leader_set_epoch(const state_deployment *dep, int64_t epoch);

/* A switchover saved node as dep's leader at epoch: take it and announce it. */
void leader_saved(state_deployment *dep, const char *node, int64_t epoch);

/* The highest LSN any proxy reported for node (0 when none did). */
int64_t leader_highest_lsn(state_deployment *dep, const char *node);

/* Some live proxy observes node (any health), or no proxy has reported observations yet. */
bool leader_node_known(state_deployment *dep, const char *node);

#endif
