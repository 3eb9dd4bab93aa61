/* leader.h - coordinated leadership: one write leader per deployment from all agents' reports. */
#ifndef PGRELAY_LEADER_H
#define PGRELAY_LEADER_H

#include "state.h"

#include <stdint.h>

/* Re-decide a deployment's leader from the live proxies' node observations (after a metrics
 * call). A change is persisted before it is announced; returns -1 when the store refused it
 * (the old decision stays). */
int leader_decide(state_deployment *dep);

/* Set the leader directly (switchover) with a new epoch. 0 or -1 (store). */
int leader_set(state_deployment *dep, const char *node, int64_t epoch);

/* The highest LSN any proxy reported for node (0 when none did). */
int64_t leader_highest_lsn(state_deployment *dep, const char *node);

/* Some live proxy observes node (any health), or no proxy has reported observations yet. */
bool leader_node_known(state_deployment *dep, const char *node);

#endif
