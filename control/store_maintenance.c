/* store_maintenance.c - the maintenance an operator asked for, kept in the store so that the
 * next lease holder renews (or ends) the fleet's pause as the last one would have.
 *
 * One row of pgrelay.maintenance per deployment whose maintenance is on; none when off. Every
 * write is conditional on this replica holding the lease it acts under (store_lease_guard).
 */
#include "store_maintenance.h"
#include "store.h"
#include "store_internal.h"

#include <libpq-fe.h>
#include <stdlib.h>

/* $1..$3: the lease's name, holder and term. */
#define STORE_MAINT_GUARD STORE_LEASE_GUARD("1", "2", "3")

int store_maintenance_save(const char *deployment, bool on, int64_t until_ms)
{
    char term[STORE_INT_MAX], until[STORE_INT_MAX];
    const char *params[5];
    store_lease_guard(&params[0], &params[1], term);
    params[2] = params[0] ? term : NULL;
    params[3] = deployment;
    params[4] = fmt_int(until, until_ms);
    if (!on)
        return store_command(
            "DELETE FROM pgrelay.maintenance WHERE deployment = $4 AND" STORE_MAINT_GUARD, 4,
            params);
    PGresult *res = store_exec(PGRES_COMMAND_OK,
                               "INSERT INTO pgrelay.maintenance (deployment, until_ms)"
                               " SELECT $4, $5::bigint WHERE" STORE_MAINT_GUARD
                               " ON CONFLICT (deployment) DO UPDATE"
                               "  SET until_ms = EXCLUDED.until_ms, since = now()",
                               5, params);
    if (!res)
        return -1;
    int rows = atoi(PQcmdTuples(res));
    PQclear(res);
    if (rows != 1) {
        store_fail("maintenance of %s: not written (this replica no longer holds the lease)",
                   deployment);
        return -1;
    }
    return 0;
}

int store_maintenance_load(void (*fn)(const char *deployment, int64_t until_ms, void *arg),
                           void *arg)
{
    PGresult *res = store_exec(PGRES_TUPLES_OK,
                               "SELECT deployment, until_ms FROM pgrelay.maintenance"
                               " ORDER BY deployment",
                               0, NULL);
    if (!res)
        return -1;
    for (int i = 0; i < PQntuples(res); i++)
        fn(PQgetvalue(res, i, 0), get_int(res, i, 1), arg);
    PQclear(res);
    return 0;
}

static void store_maintenance_row(const char *deployment, int64_t until_ms, void *arg)
{
    json_array_append_new(
        arg, json_pack("{s:s, s:I}", "deployment", deployment, "until_ms", (json_int_t)until_ms));
}

json_t *store_maintenance_rows(void)
{
    json_t *rows = json_array();
    if (!rows) {
        store_fail("out of memory reading the maintenance");
        return NULL;
    }
    if (store_maintenance_load(store_maintenance_row, rows) != 0) {
        json_decref(rows);
        return NULL;
    }
    return rows;
}
