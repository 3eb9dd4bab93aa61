/* store.c - the durable store in PostgreSQL: bounded libpq calls, schema migration, queries.
 *
 * One connection, used from the event loop. Every call is asynchronous libpq driven by poll()
 * with a deadline, so a store that hangs costs a request at most STORE_TIMEOUT_MS and never
 * stalls the loop for longer. A failed call drops the connection; the next call reconnects
 * (at most once per STORE_RETRY_MS, so a dead store is not hammered).
 */
#include "store.h"
#include "log.h"

#include <errno.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define STORE_TIMEOUT_MS 5000 /* connect and each statement */
#define STORE_RETRY_MS   1000 /* least time between two connection attempts */
#define STORE_ERROR_MAX  512
#define STORE_INT_MAX    24 /* digits of an int64 and a sign */
#define STORE_MAX_PARAMS 12
#define STORE_APP_NAME   "pgrelay-control"
#define STORE_LOCK_KEY   "7232446948713" /* advisory lock serialising migrations */

static struct {
    char *conninfo;
    PGconn *conn;
    bool ok;                     /* the last call succeeded */
    int64_t last_used_ms;        /* monotonic time of the last successful call */
    int64_t last_attempt_ms;     /* monotonic time of the last connection attempt */
    char error[STORE_ERROR_MAX]; /* why the last call failed */
} store;

/* ---- connection and bounded calls ---- */

static void store_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void store_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(store.error, sizeof(store.error), fmt, ap);
    va_end(ap);
    store.error[strcspn(store.error, "\n")] = '\0';
    if (store.ok)
        log_error("store: %s", store.error);
    else
        log_debug("store: %s", store.error);
    store.ok = false;
}

/* Server notices (NOTICE, WARNING) go to the log, not to stderr. */
static void store_notice(void *arg, const char *message)
{
    (void)arg;
    log_debug("store: %.*s", (int)strcspn(message, "\n"), message);
}

static void store_disconnect(void)
{
    if (store.conn)
        PQfinish(store.conn);
    store.conn = NULL;
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
    static const char *const keys[] = {"dbname", "fallback_application_name", NULL};
    const char *values[] = {store.conninfo, STORE_APP_NAME, NULL};
    int64_t deadline = control_mono_ms() + timeout_ms;

    store_disconnect();
    store.last_attempt_ms = control_mono_ms();
    store.conn = PQconnectStartParams(keys, values, 1);
    if (!store.conn) {
        store_fail("cannot connect: out of memory");
        return -1;
    }
    if (PQstatus(store.conn) == CONNECTION_BAD)
        goto failed;
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    while (st != PGRES_POLLING_OK) {
        if (st == PGRES_POLLING_FAILED)
            goto failed;
        int rc = store_wait(PQsocket(store.conn), st == PGRES_POLLING_WRITING, deadline);
        if (rc == 0) {
            store_fail("cannot connect: no answer within %d ms", timeout_ms);
            store_disconnect();
            return -1;
        }
        if (rc < 0)
            goto failed;
        st = PQconnectPoll(store.conn);
    }
    if (PQsetnonblocking(store.conn, 1) != 0)
        goto failed;
    PQsetNoticeProcessor(store.conn, store_notice, NULL);
    if (!store.ok)
        log_info("store: connected to %s:%s database %s", PQhost(store.conn), PQport(store.conn),
                 PQdb(store.conn));
    store.ok = true;
    store.error[0] = '\0';
    return 0;

failed:
    store_fail("cannot connect: %s", PQerrorMessage(store.conn));
    store_disconnect();
    return -1;
}

/* A usable connection, connecting when needed (not more often than STORE_RETRY_MS). */
static bool store_ready(void)
{
    if (store.conn && PQstatus(store.conn) == CONNECTION_OK)
        return true;
    if (store.conn == NULL && store.last_attempt_ms &&
        control_mono_ms() - store.last_attempt_ms < STORE_RETRY_MS) {
        if (!store.error[0])
            snprintf(store.error, sizeof(store.error), "not connected");
        return false;
    }
    return store_connect(STORE_TIMEOUT_MS) == 0;
}

/* Run a statement (or, with nparams < 0, several statements as one simple query) within
 * timeout_ms. Returns the last result when every result has the status want or
 * PGRES_COMMAND_OK; else NULL, with the error recorded and (on a connection problem) the
 * connection dropped. */
static PGresult *store_exec_timeout(int timeout_ms, ExecStatusType want, const char *sql,
                                    int nparams, const char *const *params)
{
    PGresult *last = NULL, *res;
    bool failed = false;
    int64_t deadline = control_mono_ms() + timeout_ms;

    if (!store_ready())
        return NULL;
    int sent = nparams < 0
                   ? PQsendQuery(store.conn, sql)
                   : PQsendQueryParams(store.conn, sql, nparams, NULL, params, NULL, NULL, 0);
    if (!sent) {
        store_fail("%s", PQerrorMessage(store.conn));
        store_disconnect();
        return NULL;
    }
    int flushed;
    while ((flushed = PQflush(store.conn)) == 1) {
        if (store_wait(PQsocket(store.conn), true, deadline) <= 0)
            goto timeout;
    }
    if (flushed < 0)
        goto broken;
    for (;;) {
        while (PQisBusy(store.conn)) {
            int rc = store_wait(PQsocket(store.conn), false, deadline);
            if (rc == 0)
                goto timeout;
            if (rc < 0 || !PQconsumeInput(store.conn))
                goto broken;
        }
        res = PQgetResult(store.conn);
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
        if (PQstatus(store.conn) != CONNECTION_OK)
            store_disconnect();
        return NULL;
    }
    if (!store.ok)
        log_info("store: reachable again");
    store.ok = true;
    store.error[0] = '\0';
    store.last_used_ms = control_mono_ms();
    return last;

timeout:
    PQclear(last);
    store_fail("no answer within %d ms", timeout_ms);
    store_disconnect();
    return NULL;
broken:
    PQclear(last);
    store_fail("%s", PQerrorMessage(store.conn));
    store_disconnect();
    return NULL;
}

static PGresult *store_exec(ExecStatusType want, const char *sql, int nparams,
                            const char *const *params)
{
    return store_exec_timeout(STORE_TIMEOUT_MS, want, sql, nparams, params);
}

/* Run a statement that returns no rows. 0 or -1. */
static int store_command(const char *sql, int nparams, const char *const *params)
{
    PGresult *res = store_exec(PGRES_COMMAND_OK, sql, nparams, params);
    if (!res)
        return -1;
    PQclear(res);
    return 0;
}

static const char *fmt_int(char buf[STORE_INT_MAX], int64_t v)
{
    snprintf(buf, STORE_INT_MAX, "%" PRId64, v);
    return buf;
}

static int64_t get_int(const PGresult *res, int row, int col)
{
    if (PQgetisnull(res, row, col))
        return 0;
    return strtoll(PQgetvalue(res, row, col), NULL, 10);
}

static bool get_bool(const PGresult *res, int row, int col)
{
    return !PQgetisnull(res, row, col) && PQgetvalue(res, row, col)[0] == 't';
}

static void get_text(const PGresult *res, int row, int col, char *out, size_t len)
{
    snprintf(out, len, "%s", PQgetisnull(res, row, col) ? "" : PQgetvalue(res, row, col));
}

void store_init(const char *conninfo)
{
    free(store.conninfo);
    store.conninfo = strdup(conninfo);
    store.ok = true; /* so that the first failure is logged as an error */
    if (store_connect(STORE_TIMEOUT_MS) != 0)
        log_error("store: not reachable yet (%s); retrying", store.error);
}

void store_close(void)
{
    store_disconnect();
    free(store.conninfo);
    store.conninfo = NULL;
}

bool store_up(void)
{
    return store.ok && store.conn && PQstatus(store.conn) == CONNECTION_OK;
}

const char *store_error(void)
{
    return store.error;
}

int64_t store_idle_ms(void)
{
    return control_mono_ms() - store.last_used_ms;
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
static void store_rollback(void)
{
    if (store.conn && PQstatus(store.conn) == CONNECTION_OK) {
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

/* ---- lease ---- */

int store_lease_take(const char *name, const char *identity, int duration_s, bool *held,
                     char *holder, size_t holder_len)
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
        "RETURNING holder",
        3, params);
    if (!res)
        return -1;
    *held = PQntuples(res) == 1;
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
    if (!store.conn || PQstatus(store.conn) != CONNECTION_OK) {
        if (timeout_ms <= 0 || store_connect(timeout_ms) != 0)
            return -1;
    }
    PGresult *res = store_exec_timeout(timeout_ms > 0 ? timeout_ms : 1, PGRES_COMMAND_OK,
                                       "UPDATE pgrelay.lease SET holder = NULL, renew_time = NULL"
                                       " WHERE name = $1 AND holder = $2",
                                       2, params);
    if (!res)
        return -1;
    PQclear(res);
    return 0;
}

/* ---- deployments, leadership, proxies ---- */

int store_deployment_save(const char *name, const char *token_sha256, bool is_auto)
{
    const char *params[] = {name, token_sha256, is_auto ? "true" : "false"};
    return store_command("INSERT INTO pgrelay.deployments (name, token_sha256, auto)"
                         " VALUES ($1, $2, $3::boolean)"
                         " ON CONFLICT (name) DO UPDATE SET token_sha256 = EXCLUDED.token_sha256",
                         3, params);
}

int store_load(state_deployment **head)
{
    PGresult *res = store_exec(PGRES_TUPLES_OK,
                               "SELECT d.name, d.token_sha256, d.auto, l.leader,"
                               "  coalesce(l.epoch, 0) FROM pgrelay.deployments d"
                               " LEFT JOIN pgrelay.leadership l ON l.deployment = d.name"
                               " ORDER BY d.name DESC",
                               0, NULL);
    if (!res)
        return -1;
    for (int i = 0; i < PQntuples(res); i++) {
        state_deployment *d = calloc(1, sizeof(*d));
        if (!d)
            goto oom;
        get_text(res, i, 0, d->name, sizeof(d->name));
        get_text(res, i, 1, d->token_sha256, sizeof(d->token_sha256));
        d->is_auto = get_bool(res, i, 2);
        get_text(res, i, 3, d->leader, sizeof(d->leader));
        d->epoch = get_int(res, i, 4);
        d->next = *head;
        *head = d;
    }
    PQclear(res);

    res = store_exec(PGRES_TUPLES_OK,
                     "SELECT deployment, node_id, hostname, version, listen::text, epoch,"
                     "  leader, maintenance, config_version, registered_ms, last_seen_ms"
                     " FROM pgrelay.proxies ORDER BY deployment, node_id DESC",
                     0, NULL);
    if (!res)
        return -1;
    for (int i = 0; i < PQntuples(res); i++) {
        state_deployment *d = *head;
        while (d && strcmp(d->name, PQgetvalue(res, i, 0)) != 0)
            d = d->next;
        if (!d)
            continue;
        state_proxy *p = calloc(1, sizeof(*p));
        if (!p)
            goto oom;
        p->dep = d;
        get_text(res, i, 1, p->node_id, sizeof(p->node_id));
        get_text(res, i, 2, p->hostname, sizeof(p->hostname));
        get_text(res, i, 3, p->version, sizeof(p->version));
        p->listen = json_loads(PQgetvalue(res, i, 4), 0, NULL);
        if (!json_is_array(p->listen)) {
            json_decref(p->listen);
            p->listen = json_array();
        }
        p->epoch = get_int(res, i, 5);
        get_text(res, i, 6, p->leader, sizeof(p->leader));
        p->maintenance = get_bool(res, i, 7);
        p->config_version = get_int(res, i, 8);
        p->registered_ms = get_int(res, i, 9);
        p->last_seen_ms = get_int(res, i, 10);
        p->next = d->proxies;
        d->proxies = p;
    }
    PQclear(res);
    return 0;
oom:
    PQclear(res);
    store_fail("out of memory loading the store");
    return -1;
}

int store_proxy_save(const state_proxy *p)
{
    char epoch[STORE_INT_MAX], cv[STORE_INT_MAX], reg[STORE_INT_MAX], seen[STORE_INT_MAX];
    char *listen = json_dumps(p->listen ? p->listen : json_array(), JSON_COMPACT);
    const char *params[] = {p->dep->name,
                            p->node_id,
                            p->hostname,
                            p->version,
                            listen ? listen : "[]",
                            fmt_int(epoch, p->epoch),
                            p->leader[0] ? p->leader : NULL,
                            p->maintenance ? "true" : "false",
                            fmt_int(cv, p->config_version),
                            fmt_int(reg, p->registered_ms),
                            fmt_int(seen, p->last_seen_ms)};
    int rc = store_command(
        "INSERT INTO pgrelay.proxies (deployment, node_id, hostname, version, listen, epoch,"
        "  leader, maintenance, config_version, registered_ms, last_seen_ms)"
        " VALUES ($1, $2, $3, $4, $5::jsonb, $6::bigint, $7, $8::boolean, $9::bigint,"
        "  $10::bigint, $11::bigint)"
        " ON CONFLICT (deployment, node_id) DO UPDATE SET hostname = EXCLUDED.hostname,"
        "  version = EXCLUDED.version, listen = EXCLUDED.listen, epoch = EXCLUDED.epoch,"
        "  leader = EXCLUDED.leader, maintenance = EXCLUDED.maintenance,"
        "  config_version = EXCLUDED.config_version, registered_ms = EXCLUDED.registered_ms,"
        "  last_seen_ms = EXCLUDED.last_seen_ms",
        11, params);
    free(listen);
    return rc;
}

int store_leadership_save(const char *deployment, const char *leader, int64_t epoch)
{
    char e[STORE_INT_MAX];
    const char *params[] = {deployment, leader && leader[0] ? leader : NULL, fmt_int(e, epoch)};
    return store_command("INSERT INTO pgrelay.leadership AS l (deployment, leader, epoch)"
                         " VALUES ($1, $2, $3::bigint)"
                         " ON CONFLICT (deployment) DO UPDATE SET leader = EXCLUDED.leader,"
                         "  epoch = EXCLUDED.epoch, updated_at = now()"
                         " WHERE l.epoch <= EXCLUDED.epoch",
                         3, params);
}

/* ---- commands ---- */

int64_t store_command_create(const char *deployment, const char *type, json_t *args,
                             state_proxy *const *targets, int n_targets)
{
    int64_t id = -1;
    json_t *nodes = json_array();
    char *nodes_text = NULL, *args_text = NULL;
    PGresult *res = NULL;

    if (!nodes)
        goto done;
    for (int i = 0; i < n_targets; i++)
        json_array_append_new(nodes, json_string(targets[i]->node_id));
    nodes_text = json_dumps(nodes, JSON_COMPACT);
    args_text = json_dumps(args, JSON_COMPACT);
    if (!nodes_text || !args_text) {
        store_fail("out of memory creating a command");
        goto done;
    }
    const char *params[] = {deployment, type, args_text, nodes_text};
    res = store_exec(PGRES_TUPLES_OK,
                     "WITH c AS (INSERT INTO pgrelay.commands (deployment, type, args)"
                     "  VALUES ($1, $2, $3::jsonb) RETURNING id),"
                     " t AS (INSERT INTO pgrelay.command_acks (command_id, node_id)"
                     "  SELECT c.id, n FROM c, jsonb_array_elements_text($4::jsonb) AS n)"
                     " SELECT id FROM c",
                     4, params);
    if (res && PQntuples(res) == 1)
        id = get_int(res, 0, 0);
done:
    PQclear(res);
    free(nodes_text);
    free(args_text);
    json_decref(nodes);
    return id;
}

json_t *store_commands_pending(const char *deployment, const char *node_id, int64_t *since_ms)
{
    const char *params[] = {deployment, node_id};
    PGresult *res =
        store_exec(PGRES_TUPLES_OK,
                   "WITH p AS (SELECT a.command_id, a.node_id, c.type, c.args,"
                   "    (extract(epoch FROM now() - a.delivered_at) * 1000)::bigint AS since_ms"
                   "  FROM pgrelay.command_acks a JOIN pgrelay.commands c ON c.id = a.command_id"
                   "  WHERE c.deployment = $1 AND a.node_id = $2 AND a.acked_at IS NULL"
                   "  FOR UPDATE OF a),"
                   " u AS (UPDATE pgrelay.command_acks a SET deliveries = a.deliveries + 1,"
                   "    delivered_at = now() FROM p"
                   "  WHERE a.command_id = p.command_id AND a.node_id = p.node_id)"
                   " SELECT command_id, type, args::text, since_ms FROM p ORDER BY command_id",
                   2, params);
    if (!res)
        return NULL;
    json_t *list = json_array();
    int64_t since = INT64_MAX;
    for (int i = 0; list && i < PQntuples(res); i++) {
        json_t *args = json_loads(PQgetvalue(res, i, 2), 0, NULL);
        json_array_append_new(
            list, json_pack("{s:I, s:s, s:o}", "id", (json_int_t)get_int(res, i, 0), "type",
                            PQgetvalue(res, i, 1), "args", args ? args : json_object()));
        int64_t s = PQgetisnull(res, i, 3) ? -1 : get_int(res, i, 3);
        if (s < since)
            since = s;
    }
    PQclear(res);
    if (since_ms)
        *since_ms = since == INT64_MAX ? -1 : since;
    return list;
}

store_ack_result store_command_ack(int64_t id, const char *deployment, const char *node_id, bool ok,
                                   const char *detail, char *type, json_t **args)
{
    char idtext[STORE_INT_MAX];
    const char *params[] = {fmt_int(idtext, id), deployment, node_id, ok ? "true" : "false",
                            detail};
    PGresult *res = store_exec(
        PGRES_TUPLES_OK,
        "UPDATE pgrelay.command_acks a SET acked_at = now(), ok = $4::boolean, detail = $5"
        " FROM pgrelay.commands c"
        " WHERE a.command_id = $1::bigint AND c.id = a.command_id AND c.deployment = $2"
        "   AND a.node_id = $3 AND a.acked_at IS NULL"
        " RETURNING c.type, c.args::text",
        5, params);
    if (!res)
        return STORE_ACK_ERROR;
    if (PQntuples(res) == 1) {
        get_text(res, 0, 0, type, STORE_TYPE_MAX);
        *args = json_loads(PQgetvalue(res, 0, 1), 0, NULL);
        if (!*args)
            *args = json_object();
        PQclear(res);
        return STORE_ACK_RECORDED;
    }
    PQclear(res);
    res = store_exec(PGRES_TUPLES_OK,
                     "SELECT 1 FROM pgrelay.command_acks a JOIN pgrelay.commands c"
                     "  ON c.id = a.command_id"
                     " WHERE a.command_id = $1::bigint AND c.deployment = $2 AND a.node_id = $3",
                     3, params);
    if (!res)
        return STORE_ACK_ERROR;
    store_ack_result r = PQntuples(res) > 0 ? STORE_ACK_DUPLICATE : STORE_ACK_UNKNOWN;
    PQclear(res);
    return r;
}

int store_command_cancel(int64_t id, const char *detail)
{
    char idtext[STORE_INT_MAX];
    const char *params[] = {fmt_int(idtext, id), detail};
    return store_command("UPDATE pgrelay.command_acks SET acked_at = now(), ok = false,"
                         "  detail = $2 WHERE command_id = $1::bigint AND acked_at IS NULL",
                         2, params);
}

int store_commands_expire(int64_t retention_ms)
{
    char ms[STORE_INT_MAX];
    const char *params[] = {fmt_int(ms, retention_ms)};
    PGresult *res =
        store_exec(PGRES_COMMAND_OK,
                   "DELETE FROM pgrelay.commands"
                   " WHERE created_at < now() - make_interval(secs => $1::bigint / 1000.0)",
                   1, params);
    if (!res)
        return -1;
    int n = atoi(PQcmdTuples(res));
    PQclear(res);
    return n;
}

/* ---- configuration versions ---- */

int64_t store_config_create(const char *deployment, const char *text, int64_t min_version)
{
    char minv[STORE_INT_MAX];
    const char *params[] = {deployment, text, fmt_int(minv, min_version)};
    PGresult *res = store_exec(
        PGRES_TUPLES_OK,
        "INSERT INTO pgrelay.config_versions (deployment, version, text, state)"
        " SELECT $1, greatest(coalesce(max(version), 0), $3::bigint) + 1, $2, 'preparing'"
        " FROM pgrelay.config_versions WHERE deployment = $1 RETURNING version",
        3, params);
    if (!res)
        return -1;
    int64_t v = PQntuples(res) == 1 ? get_int(res, 0, 0) : -1;
    PQclear(res);
    return v;
}

int store_config_decide(const char *deployment, int64_t version, const char *state)
{
    char v[STORE_INT_MAX];
    const char *params[] = {deployment, fmt_int(v, version), state};
    return store_command("UPDATE pgrelay.config_versions SET state = $3, decided_at = now()"
                         " WHERE deployment = $1 AND version = $2::bigint",
                         3, params);
}

int store_config_current(const char *deployment, int64_t *version, char **text)
{
    const char *params[] = {deployment};
    *version = 0;
    *text = NULL;
    PGresult *res = store_exec(PGRES_TUPLES_OK,
                               "SELECT version, text FROM pgrelay.config_versions"
                               " WHERE deployment = $1 AND state = 'committed'"
                               " ORDER BY version DESC LIMIT 1",
                               1, params);
    if (!res)
        return -1;
    if (PQntuples(res) == 1) {
        *version = get_int(res, 0, 0);
        *text = strdup(PQgetvalue(res, 0, 1));
    }
    PQclear(res);
    return 0;
}

int store_config_recover(void)
{
    int n = -1;
    PGresult *res = NULL;

    /* one transaction: a failure half-way leaves the versions "preparing" for the next try */
    if (store_command("BEGIN", 0, NULL) != 0)
        return -1;
    res = store_exec(PGRES_TUPLES_OK,
                     "UPDATE pgrelay.config_versions SET state = 'aborted',"
                     "  decided_at = now() WHERE state = 'preparing'"
                     " RETURNING deployment, version",
                     0, NULL);
    if (!res)
        goto done;
    for (int i = 0; i < PQntuples(res); i++) {
        const char *params[] = {PQgetvalue(res, i, 0), PQgetvalue(res, i, 1)};
        log_warning("store: configuration version %s of deployment %s was left half-applied "
                    "by a previous holder; aborting it",
                    params[1], params[0]);
        if (store_command("UPDATE pgrelay.command_acks a SET acked_at = now(), ok = false,"
                          "  detail = 'cancelled: the control plane changed hands'"
                          " FROM pgrelay.commands c WHERE c.id = a.command_id"
                          "  AND c.deployment = $1 AND c.type = 'config_prepare'"
                          "  AND (c.args->>'version')::bigint = $2::bigint"
                          "  AND a.acked_at IS NULL",
                          2, params) != 0)
            goto done;
        if (store_command("WITH c AS (INSERT INTO pgrelay.commands (deployment, type, args)"
                          "  VALUES ($1, 'config_abort', jsonb_build_object('version', $2::bigint))"
                          "  RETURNING id)"
                          " INSERT INTO pgrelay.command_acks (command_id, node_id)"
                          " SELECT DISTINCT c.id, a.node_id FROM c, pgrelay.command_acks a"
                          "  JOIN pgrelay.commands p ON p.id = a.command_id"
                          " WHERE p.deployment = $1 AND p.type = 'config_prepare'"
                          "  AND (p.args->>'version')::bigint = $2::bigint",
                          2, params) != 0)
            goto done;
    }
    if (store_command("COMMIT", 0, NULL) != 0)
        goto done;
    n = PQntuples(res);
done:
    PQclear(res);
    if (n < 0)
        store_rollback();
    return n;
}
