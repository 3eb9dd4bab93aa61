/* lease.h - lease election between replicas sharing a store (Kubernetes Lease semantics). */
#ifndef PGRELAY_LEASE_H
#define PGRELAY_LEASE_H

#include <stdbool.h>

/* Start the take-or-renew timer; with leases disabled it only (re)loads state from the store
 * until that succeeds. The first attempt runs at once. */
int lease_start(void);

/* Shutdown: stop the timer and, when held, give the lease up (bounded by
 * release_timeout_secs). */
void lease_stop(void);

/* [lease] enabled. */
bool lease_enabled(void);

/* This replica holds the lease and its term has not run out (always true when disabled). */
bool lease_held(void);

/* The holder's identity as last seen in the store ("" when unknown or none). */
const char *lease_holder(void);

/* Step down when the term ran out without a renewal (called before serving and by the
 * housekeeping timer). */
void lease_check(void);

#endif
