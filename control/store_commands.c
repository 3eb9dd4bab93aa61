/* store_commands.c - commands to proxies: created, delivered by the long poll, acknowledged.
 * Every write (creating, delivery marks, acknowledgements, cancelling, expiry) is conditional
 * on still holding the lease (STORE_LEASE_GUARD). */
#include "store.h"
#include "log.h"
#include "store_internal.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    char term[STORE_INT_MAX];
    const char *params[7] = {deployment, type, args_text, nodes_text};
    store_lease_guard(&params[4], &params[5], term);
    params[6] = params[4] ? term : NULL;
    /* only while this replica still holds the lease it acts under */
    res = store_exec(PGRES_TUPLES_OK,
                     "WITH c AS (INSERT INTO pgrelay.commands (deployment, type, args)"
                     "  SELECT $1, $2, $3::jsonb WHERE" STORE_LEASE_GUARD("5", "6", "7")
                     "  RETURNING id),"
                     " t AS (INSERT INTO pgrelay.command_acks (command_id, node_id)"
                     "  SELECT c.id, n FROM c, jsonb_array_elements_text($4::jsonb) AS n)"
                     " SELECT id FROM c",
                     7, params);
    if (res && PQntuples(res) == 1)
        id = get_int(res, 0, 0);
    else if (res)
        store_fail("command %s not queued: this replica no longer holds the lease", type);
done:
    PQclear(res);
    free(nodes_text);
    free(args_text);
    json_decref(nodes);
    return id;
}

json_t *store_commands_pending(const char *deployment, const char *node_id, int64_t *since_ms)
{
    char term[STORE_INT_MAX];
    const char *params[5];
    store_guard_params(params, term);
    params[3] = deployment;
    params[4] = node_id;
    /* a replica that no longer holds the lease delivers (and marks) nothing */
    PGresult *res =
        store_exec(PGRES_TUPLES_OK,
                   "WITH p AS (SELECT a.command_id, a.node_id, c.type, c.args,"
                   "    (extract(epoch FROM now() - a.delivered_at) * 1000)::bigint AS since_ms"
                   "  FROM pgrelay.command_acks a JOIN pgrelay.commands c ON c.id = a.command_id"
                   "  WHERE c.deployment = $4 AND a.node_id = $5 AND a.acked_at IS NULL"
                   "   AND" STORE_LEASE_GUARD_NOLOCK("1", "2", "3") " FOR UPDATE OF a),"
                   " u AS (UPDATE pgrelay.command_acks a SET deliveries = a.deliveries + 1,"
                   "    delivered_at = now() FROM p"
                   "  WHERE a.command_id = p.command_id AND a.node_id = p.node_id)"
                   " SELECT command_id, type, args::text, since_ms FROM p ORDER BY command_id",
                   5, params);
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
    char idtext[STORE_INT_MAX], term[STORE_INT_MAX];
    const char *params[8] = {fmt_int(idtext, id), deployment, node_id, ok ? "true" : "false",
                             detail};
    store_guard_params(&params[5], term);
    PGresult *res = store_exec(
        PGRES_TUPLES_OK,
        "UPDATE pgrelay.command_acks a SET acked_at = now(), ok = $4::boolean, detail = $5"
        " FROM pgrelay.commands c"
        " WHERE a.command_id = $1::bigint AND c.id = a.command_id AND c.deployment = $2"
        "   AND a.node_id = $3 AND a.acked_at IS NULL AND" STORE_LEASE_GUARD_NOLOCK("6", "7", "8")
        " RETURNING c.type, c.args::text",
        8, params);
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
                     "SELECT a.acked_at IS NOT NULL FROM pgrelay.command_acks a"
                     "  JOIN pgrelay.commands c ON c.id = a.command_id"
                     " WHERE a.command_id = $1::bigint AND c.deployment = $2 AND a.node_id = $3",
                     3, params);
    if (!res)
        return STORE_ACK_ERROR;
    store_ack_result r = PQntuples(res) > 0 ? STORE_ACK_DUPLICATE : STORE_ACK_UNKNOWN;
    if (r == STORE_ACK_DUPLICATE && !get_bool(res, 0, 0)) { /* the guard let nothing through */
        store_fail("acknowledgement of command %lld: not written (this replica no longer holds "
                   "the lease)",
                   (long long)id);
        r = STORE_ACK_ERROR;
    }
    PQclear(res);
    return r;
}

int store_command_cancel(int64_t id, const char *detail)
{
    char idtext[STORE_INT_MAX], term[STORE_INT_MAX];
    const char *params[5] = {fmt_int(idtext, id), detail};
    store_lease_guard(&params[2], &params[3], term);
    params[4] = params[2] ? term : NULL;
    return store_command("UPDATE pgrelay.command_acks SET acked_at = now(), ok = false,"
                         "  detail = $2 WHERE command_id = $1::bigint AND acked_at IS NULL"
                         "  AND" STORE_LEASE_GUARD("3", "4", "5"),
                         5, params);
}

int store_commands_expire(int64_t retention_ms)
{
    char ms[STORE_INT_MAX], term[STORE_INT_MAX];
    const char *params[4];
    store_guard_params(params, term);
    params[3] = fmt_int(ms, retention_ms);
    PGresult *res =
        store_exec(PGRES_COMMAND_OK,
                   "DELETE FROM pgrelay.commands"
                   " WHERE created_at < now() - make_interval(secs => $4::bigint / 1000.0)"
                   "  AND" STORE_LEASE_GUARD("1", "2", "3"),
                   4, params);
    if (!res)
        return -1;
    int n = atoi(PQcmdTuples(res));
    PQclear(res);
    return n;
}

int store_commands_prune_renewals(const char *deployment, int64_t before_id)
{
    char idtext[STORE_INT_MAX], term[STORE_INT_MAX];
    const char *params[5] = {deployment, fmt_int(idtext, before_id)};
    store_lease_guard(&params[2], &params[3], term);
    params[4] = params[2] ? term : NULL;
    PGresult *res = store_exec(PGRES_COMMAND_OK,
                               "DELETE FROM pgrelay.commands WHERE deployment = $1"
                               " AND id < $2::bigint AND type = 'maintenance'"
                               " AND args @> '{\"renewal\": true}' AND" STORE_LEASE_GUARD("3", "4", "5"),
                               5, params);
    if (!res)
        return -1;
    int n = atoi(PQcmdTuples(res));
    PQclear(res);
    return n;
}
