/* promote.c - a switchover's target: catch up with the fenced old primary, then promote.
 *
 * The catch-up reads the old primary's final WAL position AFTER its fence (no commit can
 * follow it) and waits until the target has replayed that far. The promote first asks the
 * control plane whether its operation is still running (a promote delivered late, or again
 * after a restart, must never run), runs pg_promote() and then lifts, on the new primary, the
 * fence it replayed from the old one. A promote of an operation already promoted here is not
 * run again: the first result is reported.
 */
#include "fence.h"
#include "control.h"
#include "http.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PROMOTE_STEP_MS    50
#define PROMOTE_DETAIL_MAX 512
#define PROMOTE_WAIT_S     "10" /* pg_promote(wait => true, wait_seconds) */

/* The last promote run here: a second delivery of its operation reports this again. */
static struct {
    int64_t operation; /* 0: none yet */
    int rc;
    char detail[PROMOTE_DETAIL_MAX];
} promote_last;

static int64_t promote_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static const char *promote_arg_str(json_t *args, const char *key)
{
    json_t *v = json_object_get(args, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static int64_t promote_arg_int(json_t *args, const char *key, int64_t def)
{
    json_t *v = json_object_get(args, key);
    return json_is_integer(v) ? json_integer_value(v) : def;
}

/* The old primary's WAL position now (it was fenced before), or -1 with why set. */
static int64_t promote_final_lsn(const config *cfg, const char *old, char *why, size_t len)
{
    int64_t lsn = -1;
    PGconn *conn = fence_connect(cfg, old, FENCE_DBNAME, why, len);
    char *v = conn ? fence_value(conn,
                                 "SELECT CASE WHEN pg_is_in_recovery() THEN -1 ELSE"
                                 " (pg_current_wal_lsn() - '0/0')::bigint END",
                                 why, len)
                   : NULL;
    if (v) {
        lsn = strtoll(v, NULL, 10);
        if (lsn < 0)
            snprintf(why, len, "%s is in recovery", old);
    }
    free(v);
    if (conn)
        PQfinish(conn);
    return lsn;
}

int promote_catch_up_command(json_t *args, char *detail, size_t len)
{
    const char *name = promote_arg_str(args, "node");
    const char *old = promote_arg_str(args, "old");
    int64_t wait_lsn = 0;
    int64_t deadline = promote_now_ms() + promote_arg_int(args, "timeout_ms", 30000);
    bool force = json_is_true(json_object_get(args, "force"));
    char why[PROMOTE_DETAIL_MAX] = "", from[PROMOTE_DETAIL_MAX];
    int rc = -1;
    PGconn *conn = NULL;
    config *cfg = malloc(sizeof(*cfg));

    if (!name || !old || !cfg) {
        snprintf(detail, len, "%s", cfg ? "args need node and old (strings)" : "out of memory");
        goto done;
    }
    shm_settings_read(control.shm, cfg);
    int64_t final = promote_final_lsn(cfg, old, why, sizeof(why));
    if (final >= 0) {
        wait_lsn = final;
        snprintf(from, sizeof(from), "%s's final WAL position after its fence", old);
    } else if (!force) {
        snprintf(detail, len, "cannot read the final WAL position of %s: %s", old, why);
        goto done;
    }
    conn = fence_connect(cfg, name, FENCE_DBNAME, detail, len);
    if (!conn)
        goto done;
    if (final < 0) {
        /* forced: all the target received; what the old primary wrote beyond may be lost */
        char *v =
            fence_value(conn, "SELECT (coalesce(pg_last_wal_receive_lsn(), '0/0') - '0/0')::bigint",
                        detail, len);
        if (!v)
            goto done;
        wait_lsn = strtoll(v, NULL, 10);
        free(v);
        snprintf(from, sizeof(from),
                 "all it received, as %s's position cannot be read (%s; "
                 "--force)",
                 old, why);
        log_error("switchover: %s catches up to %s", name, from);
    }
    for (;;) {
        char *v = fence_value(conn,
                              "SELECT CASE WHEN pg_is_in_recovery() THEN "
                              "(coalesce(pg_last_wal_replay_lsn(), '0/0') - '0/0')::bigint "
                              "ELSE -1 END",
                              detail, len);
        if (!v)
            goto done;
        long long replayed = strtoll(v, NULL, 10);
        free(v);
        if (replayed < 0) {
            snprintf(detail, len, "%s is not in recovery: nothing to catch up", name);
            goto done;
        }
        if (replayed >= wait_lsn) {
            snprintf(detail, len, "%s replayed %lld, up to %s (%lld)", name, replayed, from,
                     (long long)wait_lsn);
            rc = 0;
            goto done;
        }
        if (promote_now_ms() >= deadline) {
            snprintf(detail, len, "%s replayed %lld, not %s (%lld), in time", name, replayed, from,
                     (long long)wait_lsn);
            goto done;
        }
        struct timespec ts = {0, PROMOTE_STEP_MS * 1000000L};
        nanosleep(&ts, NULL);
    }
done:
    if (conn)
        PQfinish(conn);
    free(cfg);
    return rc;
}

/* Ask the control plane whether operation is still running there and has time left. */
static bool promote_still_live(const config *cfg, int64_t operation, char *why, size_t len)
{
    http_client c;
    char path[128];
    json_t *reply = NULL;
    bool live = false;

    if (http_client_init(&c, cfg) != 0) {
        snprintf(why, len, "cannot start the HTTP client to ask the control plane");
        return false;
    }
    snprintf(path, sizeof(path), "/api/v1/agent/operations/%lld", (long long)operation);
    long status = http_request(&c, "GET", path, NULL, &reply, 0);
    if (status == 200 && json_is_true(json_object_get(reply, "live")))
        live = true;
    else if (status == 200)
        snprintf(why, len, "operation %lld is no longer running on the control plane",
                 (long long)operation);
    else
        snprintf(why, len, "cannot ask the control plane whether operation %lld still runs (%s)",
                 (long long)operation, status ? "HTTP error" : c.error);
    json_decref(reply);
    http_client_free(&c);
    return live;
}

int promote_command(json_t *args, char *detail, size_t len)
{
    const char *name = promote_arg_str(args, "node");
    int64_t operation = promote_arg_int(args, "operation", 0);
    char why[PROMOTE_DETAIL_MAX];
    int rc = -1;
    PGconn *conn = NULL;
    char *ok = NULL;
    config *cfg = malloc(sizeof(*cfg));

    if (!name || !cfg) {
        snprintf(detail, len, "%s", cfg ? "args need node (string)" : "out of memory");
        goto done;
    }
    if (operation <= 0) {
        snprintf(detail, len, "args need operation (the switchover's id)");
        goto done;
    }
    if (promote_last.operation == operation) {
        snprintf(detail, len, "%s", promote_last.detail);
        rc = promote_last.rc;
        log_info("switchover: operation %lld was promoted here already: %s", (long long)operation,
                 detail);
        goto done;
    }
    shm_settings_read(control.shm, cfg);
    if (!promote_still_live(cfg, operation, why, sizeof(why))) {
        snprintf(detail, len, "not promoting %s: %s", name, why);
        log_warning("switchover: %s", detail);
        goto done;
    }
    conn = fence_connect(cfg, name, FENCE_DBNAME, detail, len);
    if (!conn)
        goto done;
    promote_last.operation = operation; /* from here on, a repeat reports this attempt */
    ok = fence_value(conn,
                     "SELECT CASE WHEN pg_is_in_recovery() THEN"
                     " pg_promote(true, " PROMOTE_WAIT_S ")::text ELSE 'primary' END",
                     detail, len);
    if (!ok)
        goto done;
    if (strcmp(ok, "primary") == 0) {
        snprintf(detail, len, "%s is not in recovery: nothing to promote", name);
        goto done;
    }
    if (strcmp(ok, "true") != 0) {
        snprintf(detail, len, "pg_promote() on %s returned false", name);
        goto done;
    }
    log_warning("switchover: %s promoted", name);
    /* it replayed the old primary's fence: lift it here, where writes now go */
    if (fence_lift(conn, name, why, sizeof(why)) < 0) {
        snprintf(detail, len, "%s promoted, but its databases stay closed: %s", name, why);
        goto done;
    }
    snprintf(detail, len, "%s promoted (%s)", name, why);
    rc = 0;
done:
    if (promote_last.operation == operation && operation > 0 && conn) {
        promote_last.rc = rc;
        snprintf(promote_last.detail, sizeof(promote_last.detail), "%s", detail);
    }
    free(ok);
    if (conn)
        PQfinish(conn);
    free(cfg);
    return rc;
}
