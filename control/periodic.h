/* periodic.h - the housekeeping's store work, run by the store worker off the event loop. */
#ifndef PGRELAY_PERIODIC_H
#define PGRELAY_PERIODIC_H

#include <stdint.h>

/* Queue the rows of the proxies that changed or were seen since their last save (batches of
 * 500, one statement each); nothing while the last round is on its way. */
void periodic_flush(void);

/* Queue the deletion of commands older than retention_ms, and of query plans and plan changes
 * older than telemetry_retention_ms (one at a time). */
void periodic_expire(int64_t retention_ms, int64_t telemetry_retention_ms);

/* Queue a check that the store answers (SELECT 1); its outcome feeds store_up(). */
void periodic_ping(void);

#endif
