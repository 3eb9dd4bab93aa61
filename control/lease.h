/* lease.h - lease election between replicas sharing a store (Kubernetes Lease semantics). */
#ifndef PGRELAY_LEASE_H
#define PGRELAY_LEASE_H

#include <stdbool.h>
#include <stdint.h>

/* Start the take-or-renew timer; with leases disabled it only (re)loads state from the store
 * until that succeeds. The first attempt runs at once. */
int lease_start(void);

/* Shutdown: stop the timer and, when held, give the lease up (bounded by
 * release_timeout_secs). */
void lease_stop(void);

/* [lease] enabled. */
bool lease_enabled(void);

/* This replica holds the lease and its renew deadline has not passed (always true when
 * disabled). */
bool lease_held(void);

/* The holder's identity as last seen in the store ("" when unknown or none). */
const char *lease_holder(void);

/* The renew deadline for these settings: milliseconds from the sending of a renewal to the
 * moment the holder stops acting unless another renewal succeeded: two thirds of the
 * duration, and at least halfway between the interval and the duration. */
int64_t lease_renew_deadline_ms(int duration_s, int interval_s);

/* Step down when the renew deadline passed without a renewal (called before serving and by the
 * housekeeping timer). */
void lease_check(void);

#endif
