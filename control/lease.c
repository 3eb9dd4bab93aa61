/* lease.c - lease election: take or renew the store's lease row; only the holder serves.
 *
 * Mirrors Kubernetes' Lease: every lease_interval_secs a replica tries to take the row
 * lease_name for lease_duration_secs (the store's clock decides expiry, so replicas' clocks
 * need not agree). A holder counts its own term from the moment it sent the renewal, which is
 * never later than the store's renew time, so it stops acting before anyone else may start.
 * With leases disabled the same timer just (re)loads the state until the store answers.
 */
#include "lease.h"
#include "control.h"
#include "log.h"
#include "operator.h"
#include "state.h"
#include "store.h"

#include <event2/event.h>
#include <stdio.h>
#include <string.h>

#define LEASE_RETRY_MS   1000 /* leases disabled: time between two attempts to load state */
#define LEASE_HOLDER_MAX 256
#define MS_PER_S         1000
#define US_PER_MS        1000

static struct {
    struct event *timer;
    bool held;                     /* the last attempt took or renewed it */
    bool schema_ok;                /* the store's schema (and lease table) exists */
    int64_t expires_mono_ms;       /* our term ends here unless renewed */
    char holder[LEASE_HOLDER_MAX]; /* holder seen in the store */
} lease;

bool lease_enabled(void)
{
    return control.cfg->lease_enabled;
}

bool lease_held(void)
{
    if (!lease_enabled())
        return true;
    return lease.held && control_mono_ms() < lease.expires_mono_ms;
}

const char *lease_holder(void)
{
    return lease.holder;
}

void lease_check(void)
{
    if (!lease_enabled() || !lease.held)
        return;
    if (control_mono_ms() >= lease.expires_mono_ms) {
        lease.held = false;
        store_lease_set_guard(control.cfg->lease_name, "", -1);
        log_warning("lease %s: term ran out without a renewal; stepping down",
                    control.cfg->lease_name);
        state_deactivate("lease term ran out");
    }
}

/* One take-or-renew attempt, and what follows from it. */
static void lease_attempt(void)
{
    const cconfig *cfg = control.cfg;
    char holder[LEASE_HOLDER_MAX];
    bool held = false;
    int64_t term = -1;
    int64_t sent = control_mono_ms();

    if (!lease.schema_ok) {
        if (store_migrate() != 0) {
            log_warning("lease %s: cannot prepare the store (%s)", cfg->lease_name, store_error());
            return;
        }
        lease.schema_ok = true;
        sent = control_mono_ms();
    }
    if (store_lease_take(cfg->lease_name, control.identity, cfg->lease_duration_secs, &held, &term,
                         holder, sizeof(holder)) != 0) {
        log_warning("lease %s: cannot reach the store (%s)", cfg->lease_name, store_error());
        lease_check();
        return;
    }
    if (held) {
        if (!lease.held || control_mono_ms() >= lease.expires_mono_ms)
            log_info("lease %s: acquired as %s", cfg->lease_name, control.identity);
        lease.held = true;
        lease.expires_mono_ms = sent + (int64_t)cfg->lease_duration_secs * MS_PER_S;
        snprintf(lease.holder, sizeof(lease.holder), "%s", holder);
        store_lease_set_guard(cfg->lease_name, control.identity, term);
        if (!control.active) {
            if (state_activate() != 0)
                log_error("lease %s: held, but the state cannot be loaded yet", cfg->lease_name);
            else
                operation_recover();
        }
        return;
    }
    if (strcmp(lease.holder, holder) != 0)
        log_info("lease %s: held by %s", cfg->lease_name, holder[0] ? holder : "(nobody)");
    snprintf(lease.holder, sizeof(lease.holder), "%s", holder);
    if (lease.held) {
        lease.held = false;
        store_lease_set_guard(cfg->lease_name, "", -1);
        log_warning("lease %s: lost to %s; stepping down", cfg->lease_name, holder);
    }
    if (control.active)
        state_deactivate("the lease is held by another replica");
}

static void lease_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (control.stopping)
        return;
    if (lease_enabled()) {
        lease_attempt();
        return;
    }
    /* a quiet ping first: a store that stays down is logged once, not every second */
    if (!control.active) {
        if (store_ping() == 0 && state_activate() == 0)
            operation_recover();
    } else if (!store_up()) {
        store_ping();
    }
}

int lease_start(void)
{
    const cconfig *cfg = control.cfg;
    struct timeval tv;
    int64_t ms = cfg->lease_enabled ? (int64_t)cfg->lease_interval_secs * MS_PER_S : LEASE_RETRY_MS;
    tv.tv_sec = ms / MS_PER_S;
    tv.tv_usec = (ms % MS_PER_S) * US_PER_MS;
    lease.timer = event_new(control.base, -1, EV_PERSIST, lease_tick, NULL);
    if (!lease.timer || event_add(lease.timer, &tv) != 0) {
        log_error("cannot start the lease timer");
        return -1;
    }
    store_lease_set_guard(cfg->lease_enabled ? cfg->lease_name : NULL,
                          cfg->lease_enabled ? "" : control.identity, -1);
    if (cfg->lease_enabled)
        log_info("lease %s: competing as %s (duration %ds, interval %ds)", cfg->lease_name,
                 control.identity, cfg->lease_duration_secs, cfg->lease_interval_secs);
    lease_tick(-1, 0, NULL);
    return 0;
}

void lease_stop(void)
{
    const cconfig *cfg = control.cfg;
    if (lease.timer) {
        event_free(lease.timer);
        lease.timer = NULL;
    }
    if (!lease_enabled() || !lease.held)
        return;
    lease.held = false;
    if (store_lease_release(cfg->lease_name, control.identity,
                            cfg->release_timeout_secs * MS_PER_S) == 0)
        log_info("lease %s: released", cfg->lease_name);
    else
        log_warning("lease %s: could not be released within %ds (%s); it runs out by itself",
                    cfg->lease_name, cfg->release_timeout_secs, store_error());
}
