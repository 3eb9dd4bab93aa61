/* health.h - can this proxy serve: the answers of the HTTP health checks (health.c). */
#ifndef PGRELAY_HEALTH_H
#define PGRELAY_HEALTH_H

#include "master.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Each fills json with a one-line JSON object saying why, and returns whether the check
 * passes. */

/* Room for the longest answer: every node's name quoted in a list, and the rest. */
#define HEALTH_JSON_MAX (CONFIG_MAX_NODES * (CONFIG_NAME_MAX + 4) + 256)

/* The master runs (it answers) and at least one worker runs. */
bool health_is_live(master *m, char *json, size_t len);

/* The write port can serve: not shutting down, a worker runs, not paused, and a write leader
 * is known (confirmed by a probe when the agent runs) and not down. */
bool health_is_ready(master *m, char *json, size_t len);

/* The read-only port can serve: as is-ready, with a readable replica (within lag_bytes and
 * lag_ms when they are not negative), or the leader when read_fallback = leader. */
bool health_is_read_ready(master *m, int64_t lag_bytes, int64_t lag_ms, char *json, size_t len);

#endif
