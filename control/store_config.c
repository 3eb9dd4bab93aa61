/* store_config.c - configuration versions: prepared, committed or aborted, recovered. */
#include "store.h"
#include "log.h"
#include "store_internal.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
