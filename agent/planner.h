/* planner.h - the agent's query planner: EXPLAIN of slow, sampled and running statements. */
#ifndef PGRELAY_PLANNER_H
#define PGRELAY_PLANNER_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "agent.h"

/* Start the planner thread (only under a master: the rings are in its shared memory).
 * Returns 0, or -1 (logged). */
int planner_start(agent *a);

/* The id of a statement's plan: a hash of its normalised text, database and user (the same
 * in every agent), below 2^63. */
uint64_t planner_plan_id(const char *norm, const char *database, const char *user);

/* Plan changes recorded after change number `after` (the reporter's upload): an array of
 * {id, at_ms, text, node, database, user, old_plan, new_plan}; *last is set to the number of
 * the newest one in it (left as it is when there is none). Never NULL. */
json_t *planner_changes_since(uint64_t after, uint64_t *last);

#endif
