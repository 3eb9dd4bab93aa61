/* fence.c - the fence: an old primary made to accept no writes from anyone, until lifted.
 *
 * A fenced node refuses connections to every database but FENCE_DBNAME (ALTER DATABASE ...
 * ALLOW_CONNECTIONS false, for superusers too), every other client backend is terminated and
 * waited for, and the fence is verified with a fresh connection that must be refused.
 * Replication connections are not affected: the replicas keep streaming its WAL, the fence
 * included (a target that replays it is unfenced right after its promotion, promote.c).
 * FENCE_DBNAME itself stays open to the agent (a superuser) but gets CONNECTION LIMIT 0, which
 * keeps every other role out. Which databases it closed is kept on the node itself, in the
 * setting pgrelay.fenced of FENCE_DBNAME (their oids), and FENCE_DBNAME's own limit before in
 * pgrelay.fenced_connlimit, so that any agent can lift exactly that fence later.
 */
#include "fence.h"
#include "control.h"
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FENCE_DRAIN_MS     5000 /* how long the fence waits for terminated backends to go */
#define FENCE_STEP_MS      50
#define FENCE_DETAIL_MAX   512
#define FENCE_STATEMENT_MS "15000" /* statement_timeout of the agent's switchover sessions */

/* A setting of FENCE_DBNAME ('-' when not set). */
#define FENCE_SETTING_SQL(name)                                                                    \
    "SELECT coalesce((SELECT substr(s, length('" name "=') + 1)"                                   \
    "  FROM pg_db_role_setting r, unnest(r.setconfig) s"                                           \
    "  WHERE r.setrole = 0 AND r.setdatabase = (SELECT oid FROM pg_database"                       \
    "    WHERE datname = '" FENCE_DBNAME "') AND s LIKE '" name "=%'), '-')"

/* The oids the fence closed ("" when none). */
#define FENCE_MARKER_SQL FENCE_SETTING_SQL("pgrelay.fenced")

/* FENCE_DBNAME's connection limit before the fence set it to 0 (superusers, the agent among
 * them, are not held by it; every other role is). */
#define FENCE_CONNLIMIT_SQL FENCE_SETTING_SQL("pgrelay.fenced_connlimit")

PGconn *fence_connect(const config *cfg, const char *name, const char *dbname, char *detail,
                      size_t len)
{
    const config_node *node = NULL;
    for (int i = 0; i < cfg->n_nodes; i++)
        if (strcmp(cfg->nodes[i].name, name) == 0)
            node = &cfg->nodes[i];
    if (!node) {
        snprintf(detail, len, "no node named %s here", name);
        return NULL;
    }
    char port[16];
    snprintf(port, sizeof(port), "%d", node->port);
    /* local commits: an old primary whose synchronous standby follows another node now
     * would wait forever for it; bounded statements: nothing here may hang the agent */
    const char *keys[] = {
        "host",    "port", "user", "password", "dbname", "connect_timeout", "application_name",
        "options", "sslmode", "sslrootcert", "sslcert", "sslkey", NULL};
    const char *vals[] = {node->host,
                          port,
                          node->monitor_user[0] ? node->monitor_user : cfg->monitor_user,
                          node->monitor_password[0] ? node->monitor_password
                                                    : cfg->monitor_password,
                          dbname                    ? dbname
                          : node->monitor_dbname[0] ? node->monitor_dbname
                                                    : cfg->monitor_dbname,
                          "5",
                          "pgrelay-agent switchover",
                          "-c synchronous_commit=local -c statement_timeout=" FENCE_STATEMENT_MS,
                          /* TLS as the probes speak it (server_tls_*) */
                          config_server_tls_word(config_node_server_tls(cfg, node)),
                          cfg->server_tls_ca_file[0] ? cfg->server_tls_ca_file : NULL,
                          cfg->server_tls_cert_file[0] ? cfg->server_tls_cert_file : NULL,
                          cfg->server_tls_key_file[0] ? cfg->server_tls_key_file : NULL,
                          NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 0);
    if (PQstatus(conn) != CONNECTION_OK) {
        snprintf(detail, len, "cannot connect to %s: %.*s", name,
                 (int)strcspn(PQerrorMessage(conn), "\n"), PQerrorMessage(conn));
        PQfinish(conn);
        return NULL;
    }
    return conn;
}

char *fence_value(PGconn *conn, const char *sql, char *detail, size_t len)
{
    PGresult *res = PQexec(conn, sql);
    char *v = NULL;
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
        v = strdup(PQgetisnull(res, 0, 0) ? "" : PQgetvalue(res, 0, 0));
    else
        snprintf(detail, len, "%.*s", (int)strcspn(PQresultErrorMessage(res), "\n"),
                 PQresultErrorMessage(res));
    PQclear(res);
    return v;
}

bool fence_exec(PGconn *conn, const char *sql, char *detail, size_t len)
{
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(res);
    bool ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK;
    if (!ok)
        snprintf(detail, len, "%.*s", (int)strcspn(PQresultErrorMessage(res), "\n"),
                 PQresultErrorMessage(res));
    PQclear(res);
    return ok;
}

/* Run every statement (one per row) that sql generates. false with detail set. */
static bool fence_exec_generated(PGconn *conn, const char *sql, int *count, char *detail,
                                 size_t len)
{
    PGresult *res = PQexec(conn, sql);
    bool ok = PQresultStatus(res) == PGRES_TUPLES_OK;
    if (!ok)
        snprintf(detail, len, "%.*s", (int)strcspn(PQresultErrorMessage(res), "\n"),
                 PQresultErrorMessage(res));
    for (int i = 0; ok && i < PQntuples(res); i++)
        ok = fence_exec(conn, PQgetvalue(res, i, 0), detail, len);
    if (count)
        *count = ok ? PQntuples(res) : 0;
    PQclear(res);
    return ok;
}

/* A statement built around an oid list, as long as the list needs (a node may have thousands of
 * databases): malloc'd, or NULL with detail set. */
static char *fence_sql(char *detail, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static char *fence_sql(char *detail, size_t len, const char *fmt, ...)
{
    char *sql = NULL;
    va_list ap;
    va_start(ap, fmt);
    int n = vasprintf(&sql, fmt, ap);
    va_end(ap);
    if (n < 0) {
        snprintf(detail, len, "out of memory building a fence statement");
        return NULL;
    }
    return sql;
}

/* An oid list as written by the fence: digits and commas only (it is put into SQL). */
static bool fence_oids_valid(const char *oids)
{
    return strspn(oids, "0123456789,") == strlen(oids);
}

/* A connection limit as kept by the fence: an integer (it is put into SQL). */
static bool fence_limit_valid(const char *limit)
{
    const char *digits = limit[0] == '-' ? limit + 1 : limit;
    return digits[0] && strlen(digits) < 12 && strspn(digits, "0123456789") == strlen(digits);
}

/* FENCE_DBNAME: CONNECTION LIMIT 0, its limit before kept first (once: a fence run again keeps
 * the first one). false with detail set. */
static bool fence_close_door(PGconn *conn, char *detail, size_t len)
{
    char *kept = fence_value(conn, FENCE_CONNLIMIT_SQL, detail, len), *before = NULL, *sql = NULL;
    bool ok = false;
    if (!kept)
        goto done;
    if (strcmp(kept, "-") == 0) {
        if (!(before = fence_value(
                  conn,
                  "SELECT datconnlimit::text FROM pg_database WHERE datname = '" FENCE_DBNAME "'",
                  detail, len)))
            goto done;
        if (!fence_limit_valid(before)) {
            snprintf(detail, len, "unexpected connection limit \"%s\" of " FENCE_DBNAME, before);
            goto done;
        }
        if (!(sql = fence_sql(detail, len,
                              "ALTER DATABASE " FENCE_DBNAME " SET pgrelay.fenced_connlimit = '%s'",
                              before)) ||
            !fence_exec(conn, sql, detail, len))
            goto done;
    }
    ok = fence_exec(conn, "ALTER DATABASE " FENCE_DBNAME " CONNECTION LIMIT 0", detail, len);
done:
    free(kept);
    free(before);
    free(sql);
    return ok;
}

/* FENCE_DBNAME's connection limit back to what the fence kept, when it kept one. false with
 * detail set. */
static bool fence_open_door(PGconn *conn, char *detail, size_t len)
{
    char *kept = fence_value(conn, FENCE_CONNLIMIT_SQL, detail, len), *sql = NULL;
    bool ok = false;
    if (!kept)
        goto done;
    if (strcmp(kept, "-") == 0) {
        ok = true;
        goto done;
    }
    if (!fence_limit_valid(kept)) {
        snprintf(detail, len, "unexpected pgrelay.fenced_connlimit \"%s\"", kept);
        goto done;
    }
    ok = (sql = fence_sql(detail, len, "ALTER DATABASE " FENCE_DBNAME " CONNECTION LIMIT %s",
                          kept)) &&
         fence_exec(conn, sql, detail, len) &&
         fence_exec(conn, "ALTER DATABASE " FENCE_DBNAME " RESET pgrelay.fenced_connlimit", detail,
                    len);
done:
    free(kept);
    free(sql);
    return ok;
}

static void fence_nap(void)
{
    struct timespec ts = {0, FENCE_STEP_MS * 1000000L};
    nanosleep(&ts, NULL);
}

/* Terminate every other client backend and wait until none is left. Returns how many were
 * there at first, or -1 with detail set when some stayed. */
static long fence_drain(PGconn *conn, char *detail, size_t len)
{
    long first = -1;
    for (int waited = 0;; waited += FENCE_STEP_MS) {
        char *v = fence_value(conn,
                              "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                              " WHERE backend_type = 'client backend'"
                              " AND pid <> pg_backend_pid()",
                              detail, len);
        if (!v)
            return -1;
        long n = strtol(v, NULL, 10);
        free(v);
        if (first < 0)
            first = n;
        if (n == 0)
            return first;
        if (waited >= FENCE_DRAIN_MS) {
            snprintf(detail, len, "%ld session(s) still there after %d ms", n, FENCE_DRAIN_MS);
            return -1;
        }
        fence_nap();
    }
}

/* Fence node name through conn (FENCE_DBNAME, a primary). 0 or -1 with detail set. */
static int fence_node(const config *cfg, PGconn *conn, const char *name, char *detail, size_t len)
{
    int rc = -1, closed = 0;
    char *marker = NULL, *oids = NULL, *lsn = NULL, *sql = NULL;

    /* the marker first, so that a fence cut short is still known and can be lifted */
    if (!(marker = fence_value(conn, FENCE_MARKER_SQL, detail, len)))
        goto done;
    if (!(sql = fence_sql(detail, len,
                          "SELECT coalesce(string_agg(oid::text, ',' ORDER BY oid), '')"
                          " FROM pg_database WHERE datname <> '" FENCE_DBNAME "' AND"
                          " (datallowconn OR oid::text = ANY(string_to_array('%s', ',')))",
                          fence_oids_valid(marker) ? marker : "")) ||
        !(oids = fence_value(conn, sql, detail, len)))
        goto done;
    if (!fence_oids_valid(oids)) {
        snprintf(detail, len, "unexpected database oids \"%s\"", oids);
        goto done;
    }
    free(sql);
    if (!(sql = fence_sql(detail, len, "ALTER DATABASE " FENCE_DBNAME " SET pgrelay.fenced = '%s'",
                          oids)) ||
        !fence_exec(conn, sql, detail, len) || !fence_close_door(conn, detail, len))
        goto done;
    free(sql);
    if (!(sql = fence_sql(detail, len,
                          "SELECT format('ALTER DATABASE %%I ALLOW_CONNECTIONS false', datname)"
                          " FROM pg_database WHERE datallowconn AND oid::text ="
                          " ANY(string_to_array('%s', ','))",
                          oids)) ||
        !fence_exec_generated(conn, sql, &closed, detail, len))
        goto done;
    long ended = fence_drain(conn, detail, len);
    if (ended < 0)
        goto done;
    /* verify: nothing but FENCE_DBNAME open, and a fresh session to the node is refused */
    char *open = fence_value(conn,
                             "SELECT count(*) FROM pg_database WHERE datallowconn"
                             " AND datname <> '" FENCE_DBNAME "'",
                             detail, len);
    bool none_open = open && strcmp(open, "0") == 0;
    free(open);
    if (!none_open) {
        snprintf(detail, len, "a database of %s still accepts connections", name);
        goto done;
    }
    char why[FENCE_DETAIL_MAX];
    PGconn *probe = fence_connect(cfg, name, NULL, why, sizeof(why));
    if (probe) {
        PQfinish(probe);
        snprintf(detail, len, "a new session to %s was still accepted after the fence", name);
        goto done;
    }
    if (!(lsn = fence_value(conn, "SELECT pg_current_wal_lsn()", detail, len)))
        goto done;
    snprintf(detail, len,
             "%s fenced: %d more database(s) refuse connections, %ld session(s) ended, a new "
             "session is refused, WAL at %s",
             name, closed, ended, lsn);
    log_warning("switchover: %s", detail);
    rc = 0;
done:
    free(sql);
    free(marker);
    free(oids);
    free(lsn);
    return rc;
}

int fence_command(json_t *args, char *detail, size_t len)
{
    json_t *node_j = json_object_get(args, "node");
    const char *name = json_is_string(node_j) ? json_string_value(node_j) : NULL;
    bool force = json_is_true(json_object_get(args, "force"));
    char why[FENCE_DETAIL_MAX] = "";
    int rc = -1;
    PGconn *conn = NULL;
    char *recovery = NULL;
    config *cfg = malloc(sizeof(*cfg));

    if (!name || !cfg) {
        snprintf(detail, len, "%s", cfg ? "args need node (string)" : "out of memory");
        goto done;
    }
    shm_settings_read(control.shm, cfg);
    conn = fence_connect(cfg, name, FENCE_DBNAME, why, sizeof(why));
    if (conn && (recovery = fence_value(conn, "SELECT pg_is_in_recovery()", why, sizeof(why))) &&
        strcmp(recovery, "t") == 0) {
        snprintf(detail, len, "%s is in recovery: it takes no writes, nothing to fence", name);
        rc = 0;
        goto done;
    }
    if (conn && recovery && fence_node(cfg, conn, name, why, sizeof(why)) == 0) {
        snprintf(detail, len, "%s", why);
        rc = 0;
        goto done;
    }
    if (force) {
        snprintf(detail, len, "NOT FENCED (--force): cannot fence %s: %s", name, why);
        log_error("switchover: %s; going on because the operator forced it", detail);
        rc = 0;
    } else {
        snprintf(detail, len, "cannot fence %s: %s", name, why);
    }
done:
    free(recovery);
    if (conn)
        PQfinish(conn);
    free(cfg);
    return rc;
}

int fence_lift(PGconn *conn, const char *name, char *detail, size_t len)
{
    int rc = -1, opened = 0;
    char *sql = NULL;
    char *recovery = fence_value(conn, "SELECT pg_is_in_recovery()", detail, len);
    char *marker = recovery ? fence_value(conn, FENCE_MARKER_SQL, detail, len) : NULL;

    if (!marker)
        goto done;
    if (strcmp(marker, "-") == 0) {
        snprintf(detail, len, "%s is not fenced", name);
        rc = 0;
        goto done;
    }
    if (strcmp(recovery, "t") == 0) {
        snprintf(detail, len, "%s is in recovery: lift the fence on its primary", name);
        goto done;
    }
    if (!fence_oids_valid(marker)) {
        snprintf(detail, len, "unexpected pgrelay.fenced \"%s\" on %s", marker, name);
        goto done;
    }
    if (!(sql = fence_sql(detail, len,
                          "SELECT format('ALTER DATABASE %%I ALLOW_CONNECTIONS true', datname)"
                          " FROM pg_database WHERE NOT datallowconn AND oid::text ="
                          " ANY(string_to_array('%s', ','))",
                          marker)) ||
        !fence_exec_generated(conn, sql, &opened, detail, len) ||
        !fence_open_door(conn, detail, len) ||
        !fence_exec(conn, "ALTER DATABASE " FENCE_DBNAME " RESET pgrelay.fenced", detail, len))
        goto done;
    snprintf(detail, len, "%s unfenced: %d database(s) accept connections again", name, opened);
    log_warning("switchover: %s", detail);
    rc = 1;
done:
    free(sql);
    free(recovery);
    free(marker);
    return rc;
}

int fence_unfence_command(json_t *args, char *detail, size_t len)
{
    json_t *node_j = json_object_get(args, "node");
    const char *name = json_is_string(node_j) ? json_string_value(node_j) : NULL;
    int rc = -1;
    PGconn *conn = NULL;
    config *cfg = malloc(sizeof(*cfg));

    if (!name || !cfg) {
        snprintf(detail, len, "%s", cfg ? "args need node (string)" : "out of memory");
        goto done;
    }
    shm_settings_read(control.shm, cfg);
    conn = fence_connect(cfg, name, FENCE_DBNAME, detail, len);
    if (conn)
        rc = fence_lift(conn, name, detail, len) < 0 ? -1 : 0;
done:
    if (conn)
        PQfinish(conn);
    free(cfg);
    return rc;
}
