/* store_plans.c - the store's query plans: the latest plan per statement and the plan changes,
 * both kept for telemetry_retention. Every write is conditional on the lease guard. */
#include "log.h"
#include "plans.h"
#include "store.h"
#include "store_internal.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A JSON member as text for a parameter: strings as they are, numbers formatted, anything
 * else (objects, arrays) as compact JSON into *owned; NULL for null or absent. */
static const char *param_of(json_t *obj, const char *key, char **owned, char num[64])
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return NULL;
    if (json_is_string(v))
        return json_string_value(v);
    if (json_is_integer(v)) {
        snprintf(num, 64, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        return num;
    }
    if (json_is_real(v)) {
        snprintf(num, 64, "%.17g", json_real_value(v));
        return num;
    }
    *owned = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    return *owned;
}

/* Run a plan write (sql with the lease guard's parameters first, answering whether the guard
 * held) for what; 0, or -1 when the store failed or this replica no longer holds the lease. */
static int store_plan_write(const char *what, const char *deployment, const char *sql, int nparams,
                            const char *const *params)
{
    PGresult *res = store_exec(PGRES_TUPLES_OK, sql, nparams, params);
    if (!res)
        return -1;
    bool held = PQntuples(res) == 1 && get_int(res, 0, 0) == 1;
    PQclear(res);
    if (!held) {
        store_fail("%s of %s not written: this replica no longer holds the lease", what,
                   deployment);
        return -1;
    }
    return 0;
}

/* Only while this replica holds the lease it acts under (g has its row then). */
#define PLAN_GUARD "WITH g AS (SELECT 1 AS one WHERE" STORE_LEASE_GUARD("1", "2", "3") "),"

int store_plan_put(const char *deployment, const char *node_id, json_t *plan)
{
    static const char *const keys[] = {"id",     "node",        "database",     "user",     "text",
                                       "reason", "duration_ms", "total_cost",   "top_node", "error",
                                       "plan",   "changes",     "planned_at_ms"};
    enum { N = sizeof(keys) / sizeof(keys[0]) };
    const char *params[N + 5];
    char *owned[N] = {0};
    char nums[N][64];
    char term[STORE_INT_MAX];
    store_guard_params(params, term);
    params[3] = deployment;
    params[4] = node_id;
    for (int i = 0; i < N; i++)
        params[i + 5] = param_of(plan, keys[i], &owned[i], nums[i]);
    int rc = store_plan_write(
        "plan", deployment,
        PLAN_GUARD
        " w AS (INSERT INTO pgrelay.plans (deployment, node_id, plan_id, node, database,"
        "  user_name, text, reason, duration_ms, total_cost, top_node, error, plan, changes,"
        "  planned_at_ms)"
        " SELECT $4, $5, $6, $7, $8, $9, $10, $11, $12::bigint, $13::float8, $14, $15,"
        "  $16::jsonb, coalesce($17::int, 0), $18::bigint FROM g"
        " ON CONFLICT (deployment, plan_id) DO UPDATE SET node_id = excluded.node_id,"
        "  node = excluded.node, database = excluded.database, user_name = excluded.user_name,"
        "  text = excluded.text, reason = excluded.reason, duration_ms = excluded.duration_ms,"
        "  total_cost = excluded.total_cost, top_node = excluded.top_node,"
        "  error = excluded.error, plan = excluded.plan,"
        "  changes = greatest(pgrelay.plans.changes, excluded.changes),"
        "  planned_at_ms = excluded.planned_at_ms, received_at = now()"
        " WHERE pgrelay.plans.planned_at_ms <= excluded.planned_at_ms)"
        " SELECT count(*) FROM g",
        N + 5, params);
    for (int i = 0; i < N; i++)
        free(owned[i]);
    return rc;
}

int store_plan_change_add(const char *deployment, const char *node_id, json_t *change)
{
    static const char *const keys[] = {"id",   "node",     "database", "user",
                                       "text", "old_plan", "new_plan", "at_ms"};
    enum { N = sizeof(keys) / sizeof(keys[0]) };
    const char *params[N + 5];
    char *owned[N] = {0};
    char nums[N][64];
    char term[STORE_INT_MAX];
    store_guard_params(params, term);
    params[3] = deployment;
    params[4] = node_id;
    for (int i = 0; i < N; i++)
        params[i + 5] = param_of(change, keys[i], &owned[i], nums[i]);
    int rc = store_plan_write(
        "plan change", deployment,
        PLAN_GUARD
        " w AS (INSERT INTO pgrelay.plan_changes (deployment, node_id, plan_id, node, database,"
        "  user_name, text, old_plan, new_plan, at_ms)"
        " SELECT $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12::jsonb, $13::bigint FROM g)"
        " SELECT count(*) FROM g",
        N + 5, params);
    for (int i = 0; i < N; i++)
        free(owned[i]);
    return rc;
}

json_t *store_plans_list(const char *deployment, const char *text_like, const char *id, int changed,
                         int64_t retention_ms)
{
    char ms[STORE_INT_MAX];
    const char *params[] = {deployment, text_like, id, fmt_int(ms, retention_ms)};
    /* Each row built as JSON by the server; the plans themselves stay jsonb. */
    PGresult *res = store_exec(
        PGRES_TUPLES_OK,
        changed ? "SELECT coalesce(json_agg(json_build_object('id', plan_id, 'node_id', node_id,"
                  "  'node', node, 'database', database, 'user', user_name, 'text', text,"
                  "  'at_ms', at_ms, 'old_plan', old_plan, 'new_plan', new_plan)"
                  "  ORDER BY at_ms DESC, id DESC), '[]')"
                  " FROM pgrelay.plan_changes WHERE deployment = $1"
                  "  AND ($2::text IS NULL OR strpos(text, $2) > 0)"
                  "  AND ($3::text IS NULL OR plan_id = $3)"
                  "  AND received_at >= now() - make_interval(secs => $4::bigint / 1000.0)"
                : "SELECT coalesce(json_agg(json_build_object('id', plan_id, 'node_id', node_id,"
                  "  'node', node, 'database', database, 'user', user_name, 'text', text,"
                  "  'reason', reason, 'duration_ms', duration_ms, 'total_cost', total_cost,"
                  "  'top_node', top_node, 'error', error, 'changes', changes,"
                  "  'planned_at_ms', planned_at_ms, 'plan', plan)"
                  "  ORDER BY planned_at_ms DESC, plan_id), '[]')"
                  " FROM pgrelay.plans WHERE deployment = $1"
                  "  AND ($2::text IS NULL OR strpos(text, $2) > 0)"
                  "  AND ($3::text IS NULL OR plan_id = $3)"
                  "  AND received_at >= now() - make_interval(secs => $4::bigint / 1000.0)",
        4, params);
    if (!res)
        return NULL;
    json_t *list = json_loads(PQgetvalue(res, 0, 0), 0, NULL);
    PQclear(res);
    if (!list)
        store_fail("plans of %s: the store's answer is not JSON", deployment);
    return list;
}

int store_plans_expire(int64_t retention_ms)
{
    char ms[STORE_INT_MAX];
    const char *params[] = {fmt_int(ms, retention_ms)};
    int n = 0;
    static const char *const sql[] = {
        "DELETE FROM pgrelay.plans"
        " WHERE received_at < now() - make_interval(secs => $1::bigint / 1000.0)",
        "DELETE FROM pgrelay.plan_changes"
        " WHERE received_at < now() - make_interval(secs => $1::bigint / 1000.0)",
    };
    for (size_t i = 0; i < sizeof(sql) / sizeof(sql[0]); i++) {
        PGresult *res = store_exec(PGRES_COMMAND_OK, sql[i], 1, params);
        if (!res)
            return -1;
        n += atoi(PQcmdTuples(res));
        PQclear(res);
    }
    return n;
}
