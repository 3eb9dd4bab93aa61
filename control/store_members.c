/* store_members.c - declared membership in the store: which proxies an operator created, with
 * their options. Loaded with the proxies by store_load (store_fleet.c). Writes are conditional
 * on this replica still holding the lease (STORE_LEASE_GUARD). */
#include "store_members.h"
#include "log.h"
#include "store.h"
#include "store_internal.h"

#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

/* A guarded upsert of one row: 0, or -1 (store error, or the lease is gone). */
static int store_member_write(const char *sql, int n, const char **params, const char *node_id)
{
    PGresult *res = store_exec(PGRES_COMMAND_OK, sql, n, params);
    if (!res)
        return -1;
    int rows = atoi(PQcmdTuples(res));
    PQclear(res);
    if (rows != 1) {
        store_fail("proxy %s: not declared (this replica no longer holds the lease)", node_id);
        return -1;
    }
    return 0;
}

int store_member_save(const char *deployment, const char *node_id, json_t *options)
{
    char *text = options ? json_dumps(options, JSON_COMPACT) : strdup("{}");
    if (!text) {
        store_fail("out of memory saving proxy %s", node_id);
        return -1;
    }
    char term[STORE_INT_MAX];
    const char *params[6];
    store_guard_params(params, term);
    params[3] = deployment;
    params[4] = node_id;
    params[5] = text;
    int rc = store_member_write("INSERT INTO pgrelay.members (deployment, node_id, options)"
                                " SELECT $4, $5, $6::jsonb WHERE" STORE_LEASE_GUARD("1", "2", "3")
                                " ON CONFLICT (deployment, node_id) DO UPDATE"
                                "  SET options = EXCLUDED.options",
                                6, params, node_id);
    free(text);
    return rc;
}

int store_member_delete(const char *deployment, const char *node_id)
{
    char term[STORE_INT_MAX];
    const char *params[5];
    store_guard_params(params, term);
    params[3] = deployment;
    params[4] = node_id;
    return store_command("WITH g AS (SELECT" STORE_LEASE_GUARD("1", "2", "3") " AS held),"
                         " m AS (DELETE FROM pgrelay.members USING g"
                         "  WHERE g.held AND deployment = $4 AND node_id = $5)"
                         " DELETE FROM pgrelay.proxies USING g"
                         " WHERE g.held AND deployment = $4 AND node_id = $5",
                         5, params);
}
