/* store.c - the durable store in PostgreSQL: the connections, bounded libpq calls, migrations.
 *
 * The queries of each concern are in their own file (store_lease.c, store_fleet.c,
 * store_commands.c, store_config.c), built on the calls declared in store_internal.h.
 *
 * One connection for the event loop, and one of its own for a thread that asks for it (the
 * lease thread, lease.c). Every call is asynchronous libpq driven by poll() with a deadline,
 * so a store that hangs costs a request at most STORE_TIMEOUT_MS, and never more than the
 * connection's cap (the lease holder's renew deadline: the loop never waits on the store
 * past the moment it must stop acting). A failed call drops the connection; the next call reconnects
 * (at most once per STORE_RETRY_MS, so a dead store is not hammered).
 */
#include "store.h"
#include "log.h"
#include "store_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STORE_RETRY_MS   1000 /* least time between two connection attempts */
#define STORE_ERROR_MAX  512
#define STORE_MAX_PARAMS 12
#define STORE_APP_NAME   "pgrelay-control"
#define STORE_LOCK_KEY   "7232446948713" /* advisory lock serialising migrations */

/* One connection to the store. The event loop uses its own; the lease thread (lease.c) has
 * another (store_use_own_connection), so that a renewal never waits behind another call. */
typedef struct store_conn {
    PGconn *conn;
    bool ok;                     /* the last call succeeded */
    int64_t last_used_ms;        /* monotonic time of the last successful call */
    int64_t last_attempt_ms;     /* monotonic time of the last connection attempt */
    int64_t cap_ms;              /* no call runs past this monotonic time (0: no cap) */
    char error[STORE_ERROR_MAX]; /* why the last call failed */
} store_conn;

static char *store_conninfo;        /* set by store_init before any thread starts */
static store_conn store_loop;       /* the event loop's connection */
static __thread store_conn *store_own; /* a thread's own connection, NULL: the loop's */

static store_conn *store_self(void)
{
    return store_own ? store_own : &store_loop;
}

/* ---- connection and bounded calls ---- */

void store_use_own_connection(void)
{
    store_own = calloc(1, sizeof(*store_own));
    if (store_own)
        store_own->ok = true; /* so that the first failure is logged as an error */
}

void store_drop_own_connection(void)
{
    if (!store_own)
        return;
    if (store_own->conn)
        PQfinish(store_own->conn);
    free(store_own);
    store_own = NULL;
}

void store_set_cap(int64_t mono_ms)
{
    store_self()->cap_ms = mono_ms;
}

int64_t store_get_cap(void)
{
    return store_self()->cap_ms;
}

/* The last store call's outcome as the event loop knows it: its own calls, and the store
 * worker's checks it was told of (store_note). */
static bool store_seen_up = true;

void store_note(bool up, const char *error)
{
    store_conn *sc = &store_loop;
    if (!up && store_seen_up)
        log_error("store: %s", error);
    else if (up && !store_seen_up)
        log_info("store: reachable again");
    if (!up)
        snprintf(sc->error, sizeof(sc->error), "%s", error);
    store_seen_up = up;
}

/* The monotonic time by which a call of timeout_ms must end: no later than the cap. */
static int64_t store_deadline(int timeout_ms)
{
    store_conn *sc = store_self();
    int64_t d = control_mono_ms() + timeout_ms;
    return sc->cap_ms > 0 && sc->cap_ms < d ? sc->cap_ms : d;
}

void store_fail(const char *fmt, ...)
{
    store_conn *sc = store_self();
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sc->error, sizeof(sc->error), fmt, ap);
    va_end(ap);
    sc->error[strcspn(sc->error, "\n")] = '\0';
    if (sc->ok)
        log_error("store: %s", sc->error);
    else
        log_debug("store: %s", sc->error);
    sc->ok = false;
    if (sc == &store_loop)
        store_seen_up = false;
}

/* Server notices (NOTICE, WARNING) go to the log, not to stderr. */
static void store_notice(void *arg, const char *message)
{
    (void)arg;
    log_debug("store: %.*s", (int)strcspn(message, "\n"), message);
}

static void store_disconnect(void)
{
    store_conn *sc = store_self();
    if (sc->conn)
        PQfinish(sc->conn);
    sc->conn = NULL;
}

/* Wait for the socket to become readable or writable until deadline (monotonic ms). Returns
 * 1 when ready, 0 on timeout, -1 on error. */
static int store_wait(int fd, bool for_write, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - control_mono_ms();
        if (left <= 0)
            return 0;
        struct pollfd pfd = {.fd = fd, .events = for_write ? POLLOUT : POLLIN};
        int rc = poll(&pfd, 1, (int)left);
        if (rc > 0)
            return 1;
        if (rc == 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

/* Connect with a deadline. Returns 0 or -1. */
static int store_connect(int timeout_ms)
{
    store_conn *sc = store_self();
    static const char *const keys[] = {"dbname", "fallback_application_name", NULL};
    const char *values[] = {store_conninfo, STORE_APP_NAME, NULL};
    int64_t deadline = store_deadline(timeout_ms);

    store_disconnect();
    sc->last_attempt_ms = control_mono_ms();
    sc->conn = PQconnectStartParams(keys, values, 1);
    if (!sc->conn) {
        store_fail("cannot connect: out of memory");
        return -1;
    }
    if (PQstatus(sc->conn) == CONNECTION_BAD)
        goto failed;
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    while (st != PGRES_POLLING_OK) {
        if (st == PGRES_POLLING_FAILED)
            goto failed;
        int rc = store_wait(PQsocket(sc->conn), st == PGRES_POLLING_WRITING, deadline);
        if (rc == 0) {
            store_fail("cannot connect: no answer within %lld ms",
                       (long long)(deadline - sc->last_attempt_ms));
            store_disconnect();
            return -1;
        }
        if (rc < 0)
            goto failed;
        st = PQconnectPoll(sc->conn);
    }
    if (PQsetnonblocking(sc->conn, 1) != 0)
        goto failed;
    PQsetNoticeProcessor(sc->conn, store_notice, NULL);
    if (!sc->ok)
        log_info("store: connected to %s:%s database %s", PQhost(sc->conn), PQport(sc->conn),
                 PQdb(sc->conn));
    sc->ok = true;
    sc->error[0] = '\0';
    return 0;

failed:
    store_fail("cannot connect: %s", PQerrorMessage(sc->conn));
    store_disconnect();
    return -1;
}

/* A usable connection, connecting when needed (not more often than STORE_RETRY_MS). */
static bool store_ready(void)
{
    store_conn *sc = store_self();
    if (sc->conn && PQstatus(sc->conn) == CONNECTION_OK)
        return true;
    if (sc->conn == NULL && sc->last_attempt_ms &&
        control_mono_ms() - sc->last_attempt_ms < STORE_RETRY_MS) {
        if (!sc->error[0])
            snprintf(sc->error, sizeof(sc->error), "not connected");
        return false;
    }
    return store_connect(STORE_TIMEOUT_MS) == 0;
}

/* Run a statement (or, with nparams < 0, several statements as one simple query) within
 * timeout_ms. Returns the last result when every result has the status want or
 * PGRES_COMMAND_OK; else NULL, with the error recorded and (on a connection problem) the
 * connection dropped. */
PGresult *store_exec_timeout(int timeout_ms, ExecStatusType want, const char *sql, int nparams,
                             const char *const *params)
{
    store_conn *sc = store_self();
    PGresult *last = NULL, *res;
    bool failed = false;
    int64_t started = control_mono_ms();
    int64_t deadline = store_deadline(timeout_ms);

    if (deadline <= started) { /* the cap passed: nothing may be sent now */
        store_fail("not sent: this replica's lease renew deadline has passed");
        return NULL;
    }
    if (!store_ready())
        return NULL;
    deadline = store_deadline(timeout_ms - (int)(control_mono_ms() - started));
    int sent = nparams < 0
                   ? PQsendQuery(sc->conn, sql)
                   : PQsendQueryParams(sc->conn, sql, nparams, NULL, params, NULL, NULL, 0);
    if (!sent) {
        store_fail("%s", PQerrorMessage(sc->conn));
        store_disconnect();
        return NULL;
    }
    int flushed;
    while ((flushed = PQflush(sc->conn)) == 1) {
        if (store_wait(PQsocket(sc->conn), true, deadline) <= 0)
            goto timeout;
    }
    if (flushed < 0)
        goto broken;
    for (;;) {
        while (PQisBusy(sc->conn)) {
            int rc = store_wait(PQsocket(sc->conn), false, deadline);
            if (rc == 0)
                goto timeout;
            if (rc < 0 || !PQconsumeInput(sc->conn))
                goto broken;
        }
        res = PQgetResult(sc->conn);
        if (!res)
            break;
        ExecStatusType st = PQresultStatus(res);
        if (st != want && st != PGRES_COMMAND_OK && !failed) {
            failed = true;
            store_fail("%s", PQresultErrorMessage(res));
        }
        PQclear(last);
        last = res;
    }
    if (failed) {
        PQclear(last);
        if (PQstatus(sc->conn) != CONNECTION_OK)
            store_disconnect();
        return NULL;
    }
    if (!sc->ok)
        log_info("store: reachable again");
    sc->ok = true;
    sc->error[0] = '\0';
    sc->last_used_ms = control_mono_ms();
    if (sc == &store_loop)
        store_seen_up = true;
    return last;

timeout:
    PQclear(last);
    store_fail("no answer within %lld ms", (long long)(control_mono_ms() - started));
    store_disconnect();
    return NULL;
broken:
    PQclear(last);
    store_fail("%s", PQerrorMessage(sc->conn));
    store_disconnect();
    return NULL;
}

PGresult *store_exec(ExecStatusType want, const char *sql, int nparams, const char *const *params)
{
    return store_exec_timeout(STORE_TIMEOUT_MS, want, sql, nparams, params);
}

int store_lock_timeout(int ms)
{
    store_conn *sc = store_self();
    char sql[64];
    if (ms <= 0) { /* a reset: a connection that is gone took the setting with it */
        if (!sc->conn || PQstatus(sc->conn) != CONNECTION_OK)
            return 0;
        return store_command("RESET lock_timeout", 0, NULL);
    }
    snprintf(sql, sizeof(sql), "SET lock_timeout = %d", ms);
    return store_command(sql, 0, NULL);
}

/* Run a statement that returns no rows. 0 or -1. */
int store_command(const char *sql, int nparams, const char *const *params)
{
    PGresult *res = store_exec(PGRES_COMMAND_OK, sql, nparams, params);
    if (!res)
        return -1;
    PQclear(res);
    return 0;
}

/* Room for extra more bytes in a's buffer. */
static bool store_array_room(store_array *a, size_t extra)
{
    if (a->failed)
        return false;
    if (a->len + extra + 1 <= a->cap)
        return true;
    size_t cap = a->cap ? a->cap * 2 : 256;
    while (cap < a->len + extra + 1)
        cap *= 2;
    char *buf = realloc(a->buf, cap);
    if (!buf) {
        a->failed = true;
        return false;
    }
    a->buf = buf;
    a->cap = cap;
    return true;
}

void store_array_add(store_array *a, const char *value)
{
    /* the worst case: every character escaped, the quotes, a separator or the opening brace */
    if (!store_array_room(a, 2 * strlen(value) + 3))
        return;
    char sep = a->len == 0 ? '{' : ',';
    a->buf[a->len++] = sep;
    a->buf[a->len++] = '"';
    for (const char *c = value; *c; c++) {
        if (*c == '"' || *c == '\\')
            a->buf[a->len++] = '\\';
        a->buf[a->len++] = *c;
    }
    a->buf[a->len++] = '"';
    a->buf[a->len] = '\0';
}

const char *store_array_end(store_array *a)
{
    if (!store_array_room(a, 2))
        return NULL;
    if (a->len == 0)
        a->buf[a->len++] = '{';
    a->buf[a->len++] = '}';
    a->buf[a->len] = '\0';
    return a->buf;
}

void store_array_free(store_array *a)
{
    free(a->buf);
    *a = (store_array){0};
}

const char *fmt_int(char buf[STORE_INT_MAX], int64_t v)
{
    snprintf(buf, STORE_INT_MAX, "%" PRId64, v);
    return buf;
}

int64_t get_int(const PGresult *res, int row, int col)
{
    if (PQgetisnull(res, row, col))
        return 0;
    return strtoll(PQgetvalue(res, row, col), NULL, 10);
}

bool get_bool(const PGresult *res, int row, int col)
{
    return !PQgetisnull(res, row, col) && PQgetvalue(res, row, col)[0] == 't';
}

void get_text(const PGresult *res, int row, int col, char *out, size_t len)
{
    snprintf(out, len, "%s", PQgetisnull(res, row, col) ? "" : PQgetvalue(res, row, col));
}

void store_init(const char *conninfo)
{
    store_conn *sc = store_self();
    free(store_conninfo);
    store_conninfo = strdup(conninfo);
    sc->ok = true; /* so that the first failure is logged as an error */
    if (store_connect(STORE_TIMEOUT_MS) != 0)
        log_error("store: not reachable yet (%s); retrying", sc->error);
}

void store_close(void)
{
    store_disconnect();
    free(store_conninfo);
    store_conninfo = NULL;
}

int store_connect_within(int timeout_ms)
{
    store_conn *sc = store_self();
    if (sc->conn && PQstatus(sc->conn) == CONNECTION_OK)
        return 0;
    if (timeout_ms <= 0)
        return -1;
    return store_connect(timeout_ms);
}

bool store_up(void)
{
    return store_seen_up;
}

const char *store_error(void)
{
    store_conn *sc = store_self();
    return sc->error;
}

int64_t store_idle_ms(void)
{
    return control_mono_ms() - store_loop.last_used_ms;
}

void store_touch(void)
{
    store_loop.last_used_ms = control_mono_ms();
}

int store_ping(void)
{
    PGresult *res = store_exec(PGRES_TUPLES_OK, "SELECT 1", 0, NULL);
    if (!res)
        return -1;
    PQclear(res);
    return 0;
}

/* End a failed transaction (nothing to do when the connection is gone). */
void store_rollback(void)
{
    store_conn *sc = store_self();
    if (sc->conn && PQstatus(sc->conn) == CONNECTION_OK) {
        PGresult *r = store_exec(PGRES_COMMAND_OK, "ROLLBACK", 0, NULL);
        PQclear(r);
    }
}

/* ---- schema ---- */

/* Each step upgrades the schema by one version; never edit a step once released, add one. */
static const char *const store_migrations[] = {
    /* 1: the first schema */
    "CREATE TABLE pgrelay.deployments ("
    "  name text PRIMARY KEY,"
    "  token_sha256 text NOT NULL,"
    "  auto boolean NOT NULL DEFAULT false,"
    "  created_at timestamptz NOT NULL DEFAULT now());"
    "CREATE TABLE pgrelay.leadership ("
    "  deployment text PRIMARY KEY REFERENCES pgrelay.deployments(name) ON DELETE CASCADE,"
    "  leader text,"
    "  epoch bigint NOT NULL DEFAULT 0 CHECK (epoch >= 0),"
    "  updated_at timestamptz NOT NULL DEFAULT now());"
    "CREATE TABLE pgrelay.proxies ("
    "  deployment text NOT NULL REFERENCES pgrelay.deployments(name) ON DELETE CASCADE,"
    "  node_id text NOT NULL,"
    "  hostname text NOT NULL DEFAULT '',"
    "  version text NOT NULL DEFAULT '',"
    "  listen jsonb NOT NULL DEFAULT '[]',"
    "  epoch bigint NOT NULL DEFAULT 0,"
    "  leader text,"
    "  maintenance boolean NOT NULL DEFAULT false,"
    "  config_version bigint NOT NULL DEFAULT 0,"
    "  registered_ms bigint NOT NULL DEFAULT 0,"
    "  last_seen_ms bigint NOT NULL DEFAULT 0,"
    "  PRIMARY KEY (deployment, node_id));"
    "CREATE TABLE pgrelay.commands ("
    "  id bigserial PRIMARY KEY,"
    "  deployment text NOT NULL REFERENCES pgrelay.deployments(name) ON DELETE CASCADE,"
    "  type text NOT NULL,"
    "  args jsonb NOT NULL DEFAULT '{}',"
    "  created_at timestamptz NOT NULL DEFAULT now());"
    "CREATE INDEX commands_created ON pgrelay.commands (created_at);"
    "CREATE TABLE pgrelay.command_acks ("
    "  command_id bigint NOT NULL REFERENCES pgrelay.commands(id) ON DELETE CASCADE,"
    "  node_id text NOT NULL,"
    "  deliveries integer NOT NULL DEFAULT 0,"
    "  delivered_at timestamptz,"
    "  acked_at timestamptz,"
    "  ok boolean,"
    "  detail text,"
    "  PRIMARY KEY (command_id, node_id));"
    "CREATE INDEX command_acks_pending ON pgrelay.command_acks (node_id) "
    "  WHERE acked_at IS NULL;"
    "CREATE TABLE pgrelay.config_versions ("
    "  deployment text NOT NULL REFERENCES pgrelay.deployments(name) ON DELETE CASCADE,"
    "  version bigint NOT NULL,"
    "  text text NOT NULL,"
    "  state text NOT NULL CHECK (state IN ('preparing', 'committed', 'aborted')),"
    "  created_at timestamptz NOT NULL DEFAULT now(),"
    "  decided_at timestamptz,"
    "  PRIMARY KEY (deployment, version));"
    "CREATE TABLE pgrelay.lease ("
    "  name text PRIMARY KEY,"
    "  holder text,"
    "  lease_duration_secs integer NOT NULL,"
    "  acquire_time timestamptz,"
    "  renew_time timestamptz,"
    "  lease_transitions integer NOT NULL DEFAULT 0);",
    /* 2: declared membership (store_members.c): the proxies an operator created */
    "CREATE TABLE pgrelay.members ("
    "  deployment text NOT NULL REFERENCES pgrelay.deployments(name) ON DELETE CASCADE,"
    "  node_id text NOT NULL,"
    "  options jsonb NOT NULL DEFAULT '{}',"
    "  declared_at timestamptz NOT NULL DEFAULT now(),"
    "  PRIMARY KEY (deployment, node_id));",
    /* 3: durable operations (switchover): each step recorded before it is acted on */
    "CREATE TABLE pgrelay.operations ("
    "  id bigserial PRIMARY KEY,"
    "  deployment text NOT NULL REFERENCES pgrelay.deployments(name) ON DELETE CASCADE,"
    "  kind text NOT NULL,"
    "  node text NOT NULL,"
    "  old_leader text NOT NULL DEFAULT '',"
    "  promote boolean NOT NULL DEFAULT false,"
    "  force boolean NOT NULL DEFAULT false,"
    "  runner text NOT NULL DEFAULT '',"
    "  step text NOT NULL,"
    "  steps jsonb NOT NULL DEFAULT '[]',"
    "  fenced boolean NOT NULL DEFAULT false,"
    "  promote_sent boolean NOT NULL DEFAULT false,"
    "  state text NOT NULL DEFAULT 'running'"
    "    CHECK (state IN ('running', 'done', 'failed', 'rolled_back')),"
    "  outcome text NOT NULL DEFAULT '',"
    "  timeout_s integer NOT NULL,"
    "  created_at timestamptz NOT NULL DEFAULT now(),"
    "  ended_at timestamptz);"
    "CREATE INDEX operations_running ON pgrelay.operations (deployment)"
    "  WHERE state = 'running';",
    /* 4: the maintenance an operator asked for (store_maintenance.c): a row while it is on */
    "CREATE TABLE pgrelay.maintenance ("
    "  deployment text PRIMARY KEY REFERENCES pgrelay.deployments(name) ON DELETE CASCADE,"
    "  until_ms bigint NOT NULL DEFAULT 0,"
    "  since timestamptz NOT NULL DEFAULT now());",
    /* 5 (plans): query plans the agents upload (store_plans.c), kept for telemetry_retention:
     * the latest plan per statement, and the plan changes with both plans */
    "CREATE TABLE pgrelay.plans ("
    "  deployment text NOT NULL REFERENCES pgrelay.deployments(name) ON DELETE CASCADE,"
    "  plan_id text NOT NULL,"
    "  node_id text NOT NULL,"
    "  node text NOT NULL,"
    "  database text NOT NULL,"
    "  user_name text NOT NULL,"
    "  text text NOT NULL,"
    "  reason text NOT NULL,"
    "  duration_ms bigint NOT NULL,"
    "  total_cost double precision,"
    "  top_node text,"
    "  error text,"
    "  plan jsonb,"
    "  changes integer NOT NULL DEFAULT 0,"
    "  planned_at_ms bigint NOT NULL,"
    "  received_at timestamptz NOT NULL DEFAULT now(),"
    "  PRIMARY KEY (deployment, plan_id));"
    "CREATE TABLE pgrelay.plan_changes ("
    "  id bigserial PRIMARY KEY,"
    "  deployment text NOT NULL REFERENCES pgrelay.deployments(name) ON DELETE CASCADE,"
    "  plan_id text NOT NULL,"
    "  node_id text NOT NULL,"
    "  node text NOT NULL,"
    "  database text NOT NULL,"
    "  user_name text NOT NULL,"
    "  text text NOT NULL,"
    "  old_plan jsonb,"
    "  new_plan jsonb,"
    "  at_ms bigint NOT NULL,"
    "  received_at timestamptz NOT NULL DEFAULT now());"
    "CREATE INDEX plan_changes_deployment ON pgrelay.plan_changes (deployment, at_ms);",
    /* 6: configuration applies as durable operations (store_config.c): the version, the
     * proxies it was prepared on and the prepare command; an aborted version is deleted (its
     * number is used again), so the aborted rows of earlier schemas go */
    "ALTER TABLE pgrelay.operations ADD COLUMN version bigint NOT NULL DEFAULT 0,"
    "  ADD COLUMN targets jsonb NOT NULL DEFAULT '[]',"
    "  ADD COLUMN command_id bigint NOT NULL DEFAULT 0;"
    "DELETE FROM pgrelay.config_versions WHERE state = 'aborted';",
    /* 7: a configuration apply whose version is committed but not yet on every proxy of its
     * set is "committed" until they report it (store_config.c), then "done" */
    "ALTER TABLE pgrelay.operations DROP CONSTRAINT operations_state_check,"
    "  ADD CONSTRAINT operations_state_check"
    "  CHECK (state IN ('running', 'committed', 'done', 'failed', 'rolled_back'));",
};
#define STORE_SCHEMA_VERSION ((int)(sizeof(store_migrations) / sizeof(store_migrations[0])))

int store_migrate(void)
{
    char sql[16384];
    int rc = -1;
    PGresult *res = NULL;

    if (store_command("BEGIN", 0, NULL) != 0)
        return -1;
    res = store_exec(PGRES_TUPLES_OK,
                     "SELECT pg_advisory_xact_lock(" STORE_LOCK_KEY ");"
                     "CREATE SCHEMA IF NOT EXISTS pgrelay;"
                     "CREATE TABLE IF NOT EXISTS pgrelay.schema_version (version integer NOT NULL);"
                     "SELECT coalesce(max(version), 0) FROM pgrelay.schema_version",
                     -1, NULL);
    if (!res)
        goto done;
    int have = (int)get_int(res, 0, 0);
    PQclear(res);
    res = NULL;
    if (have > STORE_SCHEMA_VERSION) {
        store_fail("the store's schema is version %d, newer than this program's %d", have,
                   STORE_SCHEMA_VERSION);
        goto done;
    }
    for (int v = have + 1; v <= STORE_SCHEMA_VERSION; v++) {
        snprintf(sql, sizeof(sql), "%s INSERT INTO pgrelay.schema_version VALUES (%d);",
                 store_migrations[v - 1], v);
        if (store_command(sql, -1, NULL) != 0)
            goto done;
        log_info("store: schema migrated to version %d", v);
    }
    if (store_command("COMMIT", 0, NULL) != 0)
        goto done;
    rc = 0;
done:
    if (rc != 0)
        store_rollback();
    return rc;
}
