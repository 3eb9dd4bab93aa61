/* store_lease.c - the lease row: take, renew and release (Kubernetes Lease rules, store time). */
#include "store.h"
#include "log.h"
#include "store_internal.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The lease the holder's conditional writes check (see store_lease_set_guard), per thread:
 * the event loop's, and the store worker's copy of it for each job (store_worker.c). A thread
 * that never set it has the name "" (no condition): only the loop and the worker write. */
static __thread struct {
    char name[256];     /* "" when leases are disabled: no condition */
    char identity[256]; /* "" when not held: every guarded write changes nothing */
    int64_t term;       /* lease_transitions when it was taken */
} store_guard;

void store_lease_set_guard(const char *name, const char *identity, int64_t term)
{
    snprintf(store_guard.name, sizeof(store_guard.name), "%s", name ? name : "");
    snprintf(store_guard.identity, sizeof(store_guard.identity), "%s", identity);
    store_guard.term = term;
}

void store_lease_guard(const char **name, const char **identity, char *term)
{
    *name = store_guard.name[0] ? store_guard.name : NULL;
    *identity = store_guard.identity;
    fmt_int(term, store_guard.term);
}

int store_guard_params(const char **params, char *term)
{
    store_lease_guard(&params[0], &params[1], term);
    params[2] = params[0] ? term : NULL;
    return 3;
}

int store_lease_take(const char *name, const char *identity, int duration_s, bool *held,
                     int64_t *term, char *holder, size_t holder_len)
{
    char dur[STORE_INT_MAX];
    const char *params[] = {name, identity, fmt_int(dur, duration_s)};
    /* Kubernetes' Lease rules: the holder renews; anyone takes a lease whose renew time plus
     * duration has passed (store time, so replicas' clocks do not matter), or a released one. */
    PGresult *res = store_exec(
        PGRES_TUPLES_OK,
        "INSERT INTO pgrelay.lease AS l (name, holder, lease_duration_secs, acquire_time,"
        "  renew_time, lease_transitions) VALUES ($1, $2, $3::int, now(), now(), 0) "
        "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder,"
        "  lease_duration_secs = EXCLUDED.lease_duration_secs, renew_time = now(),"
        "  acquire_time = CASE WHEN l.holder IS NOT DISTINCT FROM EXCLUDED.holder"
        "                 THEN l.acquire_time ELSE now() END,"
        "  lease_transitions = l.lease_transitions +"
        "    CASE WHEN l.holder IS NOT DISTINCT FROM EXCLUDED.holder THEN 0 ELSE 1 END "
        "WHERE l.holder = EXCLUDED.holder OR l.holder IS NULL OR l.renew_time IS NULL"
        "   OR l.renew_time + make_interval(secs => l.lease_duration_secs) < now() "
        "RETURNING holder, lease_transitions",
        3, params);
    if (!res)
        return -1;
    *held = PQntuples(res) == 1;
    *term = *held ? get_int(res, 0, 1) : -1;
    PQclear(res);
    if (holder) {
        if (*held) {
            snprintf(holder, holder_len, "%s", identity);
        } else {
            res = store_exec(PGRES_TUPLES_OK, "SELECT holder FROM pgrelay.lease WHERE name = $1", 1,
                             params);
            if (!res)
                return -1;
            if (PQntuples(res) == 1)
                get_text(res, 0, 0, holder, holder_len);
            else
                holder[0] = '\0';
            PQclear(res);
        }
    }
    return 0;
}

int store_lease_release(const char *name, const char *identity, int timeout_ms)
{
    const char *params[] = {name, identity};
    if (store_connect_within(timeout_ms) != 0)
        return -1;
    PGresult *res = store_exec_timeout(timeout_ms > 0 ? timeout_ms : 1, PGRES_COMMAND_OK,
                                       "UPDATE pgrelay.lease SET holder = NULL, renew_time = NULL"
                                       " WHERE name = $1 AND holder = $2",
                                       2, params);
    if (!res)
        return -1;
    PQclear(res);
    return 0;
}
