/* store_config.c - configuration versions and their apply operations: begun, committed or
 * rolled back, the deployment's current (desired) version.
 *
 * An apply's operation is "running" until the commit step ends, then "done" when every proxy
 * it was prepared on is on the version, or "committed" (the version is the deployment's,
 * some proxies have not reported it yet) until they are.
 *
 * A version is "preparing" while its apply runs and "committed" once every proxy it was
 * prepared on said yes; an apply that is rolled back deletes its version, so that the number
 * is used again by the next apply. Each apply is an operation (pgrelay.operations, kind
 * "config") that records the version, the proxies it was prepared on and the prepare command.
 * Every write is conditional on this replica still holding the lease it acts under
 * (STORE_LEASE_GUARD): a replica that lost it changes nothing.
 */
#include "store.h"
#include "log.h"
#include "store_internal.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* $1..$3 of every write: the lease's name, holder and term. */
#define STORE_CFG_GUARD  STORE_LEASE_GUARD("1", "2", "3")
#define STORE_CFG_PARAMS 10

static int store_cfg_params(const char **params, char *term)
{
    store_lease_guard(&params[0], &params[1], term);
    params[2] = params[0] ? term : NULL;
    return 3;
}

/* Run a guarded write whose result is one row (or none when the lease is gone): the row's
 * first column, or -1 (store error, or not written). */
static int64_t store_cfg_write_one(const char *what, const char *sql, int n, const char **params,
                                   int64_t *second)
{
    PGresult *res = store_exec(PGRES_TUPLES_OK, sql, n, params);
    if (!res)
        return -1;
    int64_t v = -1;
    if (PQntuples(res) == 1) {
        v = get_int(res, 0, 0);
        if (second)
            *second = get_int(res, 0, 1);
    } else {
        store_fail("%s: not written (this replica no longer holds the lease)", what);
    }
    PQclear(res);
    return v;
}

int store_config_begin(const char *deployment, const char *text, int64_t min_version,
                       const char *targets_json, int64_t timeout_s, int64_t *version,
                       int64_t *op_id)
{
    const char *params[STORE_CFG_PARAMS];
    char term[STORE_INT_MAX], minv[STORE_INT_MAX], tmo[STORE_INT_MAX];
    int n = store_cfg_params(params, term);
    params[n++] = deployment;
    params[n++] = text;
    params[n++] = fmt_int(minv, min_version);
    params[n++] = targets_json;
    params[n++] = fmt_int(tmo, timeout_s);
    /* one statement: the version and its operation exist together or not at all */
    *op_id = store_cfg_write_one(
        "configuration version",
        "WITH v AS (INSERT INTO pgrelay.config_versions (deployment, version, text, state)"
        "  SELECT $4, greatest(coalesce((SELECT max(version) FROM pgrelay.config_versions"
        "    WHERE deployment = $4), 0), $6::bigint) + 1, $5, 'preparing'"
        "  WHERE" STORE_CFG_GUARD " RETURNING version),"
        " o AS (INSERT INTO pgrelay.operations (deployment, kind, node, timeout_s, step, steps,"
        "    version, targets)"
        "  SELECT $4, 'config', '', $8::int, 'prepare',"
        "   jsonb_build_array(jsonb_build_object('step', 'prepare', 'at', now(), 'detail',"
        "    'version ' || v.version || ' to ' || jsonb_array_length($7::jsonb) || ' proxies')),"
        "   v.version, $7::jsonb FROM v RETURNING id, version)"
        " SELECT id, version FROM o",
        n, params, version);
    return *op_id > 0 ? 0 : -1;
}

int store_config_prepared(int64_t op_id, int64_t command_id)
{
    const char *params[STORE_CFG_PARAMS];
    char term[STORE_INT_MAX], id[STORE_INT_MAX], cmd[STORE_INT_MAX];
    int n = store_cfg_params(params, term);
    params[n++] = fmt_int(id, op_id);
    params[n++] = fmt_int(cmd, command_id);
    return store_cfg_write_one("configuration prepare",
                               "UPDATE pgrelay.operations SET command_id = $5::bigint"
                               " WHERE id = $4::bigint AND state = 'running' AND" STORE_CFG_GUARD
                               " RETURNING id",
                               n, params, NULL) > 0
               ? 0
               : -1;
}

/* The decision's write (commit or rollback): sql takes the guard, then $4 the deployment, $5
 * the version, $6 the operation and $7 the detail or outcome, and returns the operation's id
 * when it wrote. 0, or -1. */
static int store_cfg_decide(const char *what, const char *sql, const char *deployment,
                            int64_t version, int64_t op_id, const char *detail)
{
    const char *params[STORE_CFG_PARAMS];
    char term[STORE_INT_MAX], v[STORE_INT_MAX], id[STORE_INT_MAX];
    int n = store_cfg_params(params, term);
    params[n++] = deployment;
    params[n++] = fmt_int(v, version);
    params[n++] = fmt_int(id, op_id);
    params[n++] = detail;
    return store_cfg_write_one(what, sql, n, params, NULL) > 0 ? 0 : -1;
}

int store_config_commit(const char *deployment, int64_t version, int64_t op_id, const char *detail)
{
    /* the decision: the version is the deployment's and the operation is at its commit step,
     * together */
    return store_cfg_decide(
        "configuration commit",
        "WITH c AS (UPDATE pgrelay.config_versions SET state = 'committed',"
        "   decided_at = now() WHERE deployment = $4 AND version = $5::bigint"
        "   AND state = 'preparing' AND" STORE_CFG_GUARD " RETURNING version)"
        " UPDATE pgrelay.operations SET step = 'commit', steps = steps ||"
        "  jsonb_build_object('step', 'commit', 'at', now(), 'detail', $7::text)"
        " FROM c WHERE id = $6::bigint AND state = 'running' RETURNING id",
        deployment, version, op_id, detail);
}

int store_config_roll_back(const char *deployment, int64_t version, int64_t op_id,
                           const char *outcome)
{
    /* the version goes (its number is free again), the operation ends rolled back, and its
     * commands that were not answered are withdrawn: together */
    return store_cfg_decide(
        "configuration rollback",
        "WITH o AS (UPDATE pgrelay.operations SET state = 'rolled_back', outcome = $7,"
        "   ended_at = now(), steps = steps || jsonb_build_object('step',"
        "    'rolled_back', 'at', now(), 'detail', $7::text)"
        "  WHERE id = $6::bigint AND state = 'running' AND" STORE_CFG_GUARD "  RETURNING id),"
        " d AS (DELETE FROM pgrelay.config_versions USING o WHERE deployment = $4"
        "   AND version = $5::bigint AND state = 'preparing'),"
        " w AS (UPDATE pgrelay.command_acks a SET acked_at = now(), ok = false,"
        "   detail = 'cancelled: the configuration apply was rolled back'"
        "  FROM pgrelay.commands c, o WHERE c.id = a.command_id AND a.acked_at IS NULL"
        "   AND c.args->>'operation' = o.id::text)"
        " SELECT id FROM o",
        deployment, version, op_id, outcome);
}

int store_config_end(int64_t op_id, const char *state, const char *outcome)
{
    const char *params[STORE_CFG_PARAMS];
    char term[STORE_INT_MAX], id[STORE_INT_MAX];
    int n = store_cfg_params(params, term);
    params[n++] = fmt_int(id, op_id);
    params[n++] = state;
    params[n++] = outcome;
    /* "committed" keeps the record open (no ended_at): it is done when the last proxy of its
     * set reports the version */
    return store_cfg_write_one(
               "configuration operation end",
               "UPDATE pgrelay.operations SET state = $5, outcome = $6,"
               "  ended_at = CASE WHEN $5 = 'committed' THEN NULL ELSE now() END,"
               "  steps = steps || jsonb_build_object('step', $5::text, 'at', now(),"
               "   'detail', $6::text)"
               " WHERE id = $4::bigint AND kind = 'config' AND state IN ('running', 'committed')"
               "  AND" STORE_CFG_GUARD " RETURNING id",
               n, params, NULL) > 0
               ? 0
               : -1;
}

json_t *store_config_committed(void)
{
    PGresult *res = store_exec(PGRES_TUPLES_OK,
                               "SELECT id, deployment, version, targets::text"
                               " FROM pgrelay.operations WHERE kind = 'config'"
                               "  AND state = 'committed' ORDER BY id",
                               0, NULL);
    if (!res)
        return NULL;
    json_t *list = json_array();
    for (int i = 0; list && i < PQntuples(res); i++) {
        json_t *targets = json_loads(PQgetvalue(res, i, 3), 0, NULL);
        json_array_append_new(list, json_pack("{s:I, s:s, s:I, s:o}", "id",
                                              (json_int_t)get_int(res, i, 0), "deployment",
                                              PQgetvalue(res, i, 1), "version",
                                              (json_int_t)get_int(res, i, 2), "targets",
                                              json_is_array(targets) ? targets : json_array()));
        if (!json_is_array(targets))
            json_decref(targets);
    }
    PQclear(res);
    return list;
}

int store_command_answers(int64_t command_id, int *ok, int *total)
{
    char id[STORE_INT_MAX];
    const char *params[] = {fmt_int(id, command_id)};
    PGresult *res = store_exec(PGRES_TUPLES_OK,
                               "SELECT count(*) FILTER (WHERE ok IS TRUE), count(*)"
                               " FROM pgrelay.command_acks WHERE command_id = $1::bigint",
                               1, params);
    if (!res)
        return -1;
    *ok = (int)get_int(res, 0, 0);
    *total = (int)get_int(res, 0, 1);
    PQclear(res);
    return 0;
}

int store_config_current(const char *deployment, int64_t *version, char **text)
{
    const char *params[] = {deployment};
    *version = 0;
    if (text)
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
        if (text) {
            *text = strdup(PQgetvalue(res, 0, 1));
            if (!*text) {
                PQclear(res);
                store_fail("out of memory reading configuration version %lld", (long long)*version);
                return -1;
            }
        }
    }
    PQclear(res);
    return 0;
}

int store_config_recover(void)
{
    /* Versions left "preparing" with no running operation to decide them (written before
     * applies were operations): nothing was committed anywhere, so they go. The ones with an
     * operation are the next holder's to finish or roll back (config_apply.c). */
    PGresult *res = store_exec(PGRES_TUPLES_OK,
                               "DELETE FROM pgrelay.config_versions v WHERE state = 'preparing'"
                               " AND NOT EXISTS (SELECT 1 FROM pgrelay.operations o"
                               "  WHERE o.kind = 'config' AND o.state = 'running'"
                               "   AND o.deployment = v.deployment AND o.version = v.version)"
                               " RETURNING deployment, version",
                               0, NULL);
    if (!res)
        return -1;
    int n = PQntuples(res);
    for (int i = 0; i < n; i++)
        log_warning("store: configuration version %s of deployment %s was left half-applied "
                    "without an operation; dropped",
                    PQgetvalue(res, i, 1), PQgetvalue(res, i, 0));
    PQclear(res);
    return n;
}
